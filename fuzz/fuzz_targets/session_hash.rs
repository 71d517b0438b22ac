//! A Redis session hash (the `HGETALL` reply, RESP2 or RESP3, as the server's bytes) to a
//! session record, and the record back to a hash.
//!
//! Properties:
//! - any reply decodes to a session or to a reason it is none, never a panic;
//! - a session holds no more text than the reply carried;
//! - a decoded session encodes to a hash that decodes to the same session (its tenant's name
//!   in lower case, as the store writes it), and encoding that again gives the very same
//!   fields.
#![no_main]

use libfuzzer_sys::fuzz_target;
use redis::Value;
use tower_turnstile::fuzzing::StoredSession;

fuzz_target!(|bytes: &[u8]| {
    let Ok(reply) = redis::parse_redis_value(bytes) else {
        return;
    };
    let carried = text_bytes(&reply);
    let Ok(session) = StoredSession::decode(reply) else {
        return;
    };
    assert!(
        session.held_bytes() <= carried,
        "{} bytes held from a reply of {carried}",
        session.held_bytes()
    );
    // The store only keys a session under a tenant it accepts.
    let Some(hash) = session.encode() else {
        return;
    };
    let again = StoredSession::decode(hash.clone()).expect("an encoded session decodes");
    // The store writes a tenant's name as it accepts it: lower-case.
    assert_eq!(again.record, session.record);
    assert_eq!(again.tenant, session.tenant.to_ascii_lowercase());
    assert_eq!(again.encode(), Some(hash), "encoding is not stable");
});

/// Bytes of text in a reply, at any depth.
fn text_bytes(value: &Value) -> usize {
    match value {
        Value::BulkString(bytes) => bytes.len(),
        Value::SimpleString(text) => text.len(),
        Value::Array(items) | Value::Set(items) => items.iter().map(text_bytes).sum(),
        Value::Map(pairs) => pairs
            .iter()
            .map(|(k, v)| text_bytes(k) + text_bytes(v))
            .sum(),
        Value::Attribute { data, attributes } => {
            text_bytes(data)
                + attributes
                    .iter()
                    .map(|(k, v)| text_bytes(k) + text_bytes(v))
                    .sum::<usize>()
        }
        Value::Push { data, .. } => data.iter().map(text_bytes).sum(),
        Value::VerbatimString { text, .. } => text.len(),
        _ => 0,
    }
}
