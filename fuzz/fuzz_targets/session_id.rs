//! Request headers to a session id, as the session layer reads them: the cookie or the id
//! header, unsigned, signed, and signed across a key rotation.
//!
//! Properties:
//! - an id read is a well-formed id, and it is text the request carried (never made up);
//! - signed, an id read from headers the fuzzer wrote alone is one it copied from a seed that
//!   a key of ours signed (a forgery never reads);
//! - an id the layer issued reads back first, whatever junk follows it, and after a rotation
//!   under the previous key too; under an unrelated key it never reads;
//! - an issued value with a byte changed reads as nothing or as that same id, never another.
#![no_main]

use arbitrary::Arbitrary;
use http::{HeaderMap, HeaderValue, header};
use libfuzzer_sys::fuzz_target;
use tower_turnstile::{
    fuzzing::{IdTransport, is_encoded_id},
    session::SigningKey,
};

#[derive(Debug, Arbitrary)]
struct Input {
    /// Cookie or header; unsigned, signed, or signed with the previous key of a rotation.
    transport: u8,
    /// The cookie or header name (the default when the layer would refuse it).
    name: String,
    /// Header values, in order.
    values: Vec<Vec<u8>>,
    /// Where to change a byte of an issued value, and what to put there.
    tamper: (u16, u8),
}

fn key(secret: &str) -> SigningKey {
    SigningKey::from_secret(secret).expect("a non-empty secret")
}

fuzz_target!(|input: Input| {
    let in_header = input.transport & 1 == 1;
    // 0: unsigned; 1: signed; 2: signed by the old key, read under [new, old].
    let signing = (input.transport >> 1) % 3;
    let (old, new, other) = (key("old key"), key("new key"), key("unrelated key"));
    let (issuing_keys, reading_keys) = match signing {
        0 => (vec![], vec![]),
        1 => (vec![new.clone()], vec![new.clone()]),
        _ => (vec![old.clone()], vec![new.clone(), old.clone()]),
    };
    // The fuzzer's name when the layer takes it, else the default.
    let name = if in_header {
        match IdTransport::header(&input.name, vec![]) {
            Some(_) => http::HeaderName::from_bytes(input.name.as_bytes()).expect("valid"),
            None => http::HeaderName::from_static("x-session-id"),
        }
    } else {
        header::COOKIE
    };
    let make = |keys: Vec<SigningKey>| {
        let made = if in_header {
            IdTransport::header(name.as_str(), keys)
        } else {
            IdTransport::cookie(&input.name, keys.clone())
                .or_else(|| IdTransport::cookie("id", keys))
        };
        made.expect("a name the layer takes")
    };
    let (reader, issuer, stranger) = (make(reading_keys), make(issuing_keys), make(vec![other]));

    // Whatever the fuzzer wrote.
    let junk: Vec<HeaderValue> = input
        .values
        .iter()
        .filter_map(|value| HeaderValue::from_bytes(value).ok())
        .collect();
    let mut headers = HeaderMap::new();
    for value in &junk {
        headers.append(name.clone(), value.clone());
    }
    if let Some(id) = reader.read(&headers) {
        assert!(is_encoded_id(&id), "read {id:?}, which is no id");
        assert!(
            junk.iter().any(|v| contains(v.as_bytes(), id.as_bytes())),
            "read {id:?}, which the request did not carry"
        );
    }
    if stranger.read(&headers).is_some() {
        // Only a value signed under the unrelated key reads there, and no seed carries one.
        panic!("a cookie the fuzzer wrote verified under a key it never saw");
    }

    // An issued id reads back first, whatever follows it.
    let Some((id, set)) = issuer.issue() else {
        return;
    };
    let sent = request_value(&set, issuer.in_header());
    let mut headers = HeaderMap::new();
    headers.append(name.clone(), sent.clone());
    for value in &junk {
        headers.append(name.clone(), value.clone());
    }
    assert_eq!(
        reader.read(&headers).as_deref(),
        Some(id.as_str()),
        "issued {sent:?}"
    );
    if signing != 0 {
        assert_eq!(
            stranger.read(&headers),
            None,
            "verified under an unrelated key"
        );
    }

    // Signed, a changed byte reads as nothing or as the same id.
    if signing == 0 {
        return;
    }
    let mut bytes = sent.as_bytes().to_vec();
    let at = usize::from(input.tamper.0) % bytes.len().max(1);
    if let Some(byte) = bytes.get_mut(at) {
        *byte = input.tamper.1;
    }
    if let Ok(tampered) = HeaderValue::from_bytes(&bytes) {
        let mut headers = HeaderMap::new();
        headers.append(name, tampered);
        if let Some(read) = reader.read(&headers) {
            assert_eq!(read, id, "a changed value read as another id");
        }
    }
});

/// What a client sends back for a response's value: the `name=value` pair of a `Set-Cookie`,
/// or a header's value as it is.
fn request_value(set: &HeaderValue, in_header: bool) -> HeaderValue {
    if in_header {
        return set.clone();
    }
    let text = set.to_str().expect("Set-Cookie is text");
    let pair = text.split(';').next().expect("split yields one part");
    HeaderValue::from_str(pair).expect("a pair of a valid header is valid")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}
