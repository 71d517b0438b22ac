//! The connection registry's reads of Redis: an `XREAD` reply of an instance's inbox (the
//! server's bytes, RESP2 or RESP3) to the messages it delivers, and a lease-set member to the
//! instance and connection it names.
//!
//! Properties:
//! - any reply yields entries or none, never a panic;
//! - every entry id, field and value is a string the reply carried (never made up), and there
//!   are no more entries than arrays in the reply;
//! - a member names an instance that is the text before its last `/`, and an id that is the
//!   number after it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use redis::Value;
use tower_turnstile::fuzzing::{inbox_entries, lease_member};

// The bytes are a reply as the server sent it, and (as text) a member.
fuzz_target!(|bytes: &[u8]| {
    if let Ok(reply) = redis::parse_redis_value(bytes) {
        let mut strings = Vec::new();
        let arrays = collect(&reply, &mut strings);
        let entries = inbox_entries(reply);
        assert!(
            entries.len() <= arrays,
            "{} entries from {arrays} arrays",
            entries.len()
        );
        for (id, fields) in &entries {
            assert!(strings.contains(id), "entry id {id:?} was not in the reply");
            for (name, value) in fields {
                assert!(
                    strings.contains(name) && strings.contains(value),
                    "{name:?}={value:?}"
                );
            }
        }
    }

    let Ok(member) = std::str::from_utf8(bytes) else {
        return;
    };
    if let Some((instance, id)) = lease_member(member) {
        let (before, after) = member.rsplit_once('/').expect("a member has a '/'");
        assert_eq!(instance, before);
        assert_eq!(after.parse::<u64>().ok(), Some(id));
    }
});

/// Every string in `value`, at any depth, into `strings`; the number of arrays.
fn collect(value: &Value, strings: &mut Vec<String>) -> usize {
    match value {
        Value::BulkString(bytes) => {
            strings.extend(String::from_utf8(bytes.clone()));
            0
        }
        Value::SimpleString(text) => {
            strings.push(text.clone());
            0
        }
        Value::Array(items) => {
            1 + items
                .iter()
                .map(|item| collect(item, strings))
                .sum::<usize>()
        }
        Value::Set(items) => items.iter().map(|item| collect(item, strings)).sum(),
        Value::Map(pairs) => pairs
            .iter()
            .map(|(k, v)| collect(k, strings) + collect(v, strings))
            .sum(),
        Value::Attribute { data, .. } => collect(data, strings),
        Value::Push { data, .. } => data.iter().map(|item| collect(item, strings)).sum(),
        _ => 0,
    }
}
