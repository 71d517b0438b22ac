//! Redis Stream replies: the entries of `XRANGE` / `XREVRANGE`, and of `XREAD` /
//! `XREADGROUP` for one stream (RESP2 or RESP3).

use redis::Value;

/// One stream entry: its id and its field pairs.
pub(crate) type Entry = (String, Vec<(String, String)>);

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

/// The entries of an `XRANGE`-shaped reply (an array of `[id, [field, value, ...]]`);
/// malformed entries are skipped.
pub(crate) fn entries(reply: Value) -> Vec<Entry> {
    let Value::Array(entries) = reply else {
        return Vec::new();
    };
    entries
        .into_iter()
        .filter_map(|entry| {
            let Value::Array(parts) = entry else {
                return None;
            };
            let (Some(id), Some(Value::Array(flat))) = (parts.first().and_then(text), parts.get(1))
            else {
                return None;
            };
            let pairs = flat
                .chunks(2)
                .filter_map(|pair| Some((text(pair.first()?)?, text(pair.get(1)?)?)))
                .collect();
            Some((id, pairs))
        })
        .collect()
}

/// The entries of an `XREAD` / `XREADGROUP` reply, every stream's in turn (RESP2: an array
/// of `[name, entries]`; RESP3: a map of name to entries; nil: none).
pub(crate) fn read_entries(reply: Value) -> Vec<Entry> {
    let streams = match reply {
        Value::Array(streams) => streams
            .into_iter()
            .filter_map(|stream| match stream {
                Value::Array(mut parts) if parts.len() == 2 => parts.pop(),
                _ => None,
            })
            .collect::<Vec<_>>(),
        Value::Map(streams) => streams.into_iter().map(|(_, entries)| entries).collect(),
        _ => Vec::new(),
    };
    streams.into_iter().flat_map(entries).collect()
}
