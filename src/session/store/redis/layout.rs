//! How a session lives in Redis: its keys, the fields of its hash, and how a record is encoded
//! into them and decoded from them.
//!
//! A session is one hash: a field per session key (`d:<key>`, JSON text), metadata fields
//! (`m:*`), and a write time per field written since the session was created (`t:<field>`,
//! which the replay of an outage's journal compares with). A hash without metadata is no
//! session: it is what a save to a session that is gone leaves for a millisecond.

use std::{collections::BTreeMap, fmt, time::Duration};

use redis::Value;

use crate::{
    session::store::{Patch, Record, SessionKey, UserKey},
    tenant::Tenant,
    time::millis,
};

/// Between a session key's tenant and its hash.
const SESSION: &str = ":session:";
pub(super) const DATA: &str = "d:";
pub(super) const USER: &str = "m:user";
pub(super) const CREATED: &str = "m:created";
pub(super) const ABSOLUTE: &str = "m:abs";
pub(super) const IDLE: &str = "m:idle";
pub(super) const TENANT: &str = "m:tenant";
pub(super) const PERSISTENT: &str = "m:persist";
/// Prefix of a field's write time (see `lua/replay.lua`).
pub(super) const WRITTEN: &str = "t:";

/// The names of a store's keys: `{prefix}{tenant}:session:{hash of id}` for a session,
/// `{prefix}{tenant}:user:{hash of user id}` for a user's index, and that with `:logins` for
/// the user's logins under a cap.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    prefix: String,
}

impl Keys {
    pub(super) fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub(super) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Built in one allocation: every request that reaches Redis names its session's key.
    pub(super) fn session(&self, key: &SessionKey) -> String {
        // The hash, as `SessionKey::hash` writes it: 43 base64url characters.
        const HASH: usize = 43;
        let tenant = key.tenant().as_str();
        let mut name =
            String::with_capacity(self.prefix.len() + tenant.len() + SESSION.len() + HASH);
        name.push_str(&self.prefix);
        name.push_str(tenant);
        name.push_str(SESSION);
        key.push_hash(&mut name);
        name
    }

    /// The session a key of this store names ([`Keys::session`] read back), if it names one.
    pub(super) fn session_key_of(&self, name: &str) -> Option<SessionKey> {
        let rest = name.strip_prefix(self.prefix.as_str())?;
        let (tenant, hash) = rest.split_once(SESSION)?;
        SessionKey::from_hash(&Tenant::new(tenant).ok()?, hash)
    }

    pub(super) fn user(&self, user: &UserKey) -> String {
        format!("{}{}:user:{}", self.prefix, user.tenant(), user.hash())
    }

    /// The user's logins, ranked by their sessions' creation, which the per-user cap decides
    /// on: `{user index}:logins`.
    pub(super) fn logins(&self, user: &UserKey) -> String {
        format!("{}:logins", self.user(user))
    }
}

/// Every field of `record`'s hash, as field, value, field, value, ...
pub(crate) fn record_fields(key: &SessionKey, record: &Record) -> Vec<String> {
    let mut fields = vec![
        TENANT.to_owned(),
        key.tenant().as_str().to_owned(),
        CREATED.to_owned(),
        record.created_at.to_string(),
        ABSOLUTE.to_owned(),
        record.expires_at.to_string(),
        IDLE.to_owned(),
        millis(record.inactivity_timeout).to_string(),
        PERSISTENT.to_owned(),
        flag(record.persistent).to_owned(),
    ];
    if let Some(user) = &record.user {
        fields.extend([USER.to_owned(), user.clone()]);
    }
    for (name, value) in &record.data {
        fields.extend([format!("{DATA}{name}"), value.clone()]);
    }
    fields
}

/// A hash field a patch sets: its name in two parts (`d:` and the session key, or a metadata
/// name and nothing), and its value.
pub(super) struct FieldSet<'a> {
    pub(super) prefix: &'static str,
    pub(super) name: &'a str,
    pub(super) value: FieldValue<'a>,
}

/// The value of a field a patch sets: text borrowed from the patch, or a number.
pub(super) enum FieldValue<'a> {
    Text(&'a str),
    Number(u64),
}

/// The hash fields a patch sets (metadata included when the lifetime changes), borrowed from
/// it: a save names them without building them first.
pub(super) fn patch_sets(patch: &Patch) -> impl Iterator<Item = FieldSet<'_>> {
    let metadata = patch.lifetime.into_iter().flat_map(|lifetime| {
        [
            (
                IDLE,
                FieldValue::Number(millis(lifetime.inactivity_timeout)),
            ),
            (ABSOLUTE, FieldValue::Number(lifetime.expires_at)),
            (PERSISTENT, FieldValue::Text(flag(lifetime.persistent))),
        ]
        .map(|(prefix, value)| FieldSet {
            prefix,
            name: "",
            value,
        })
    });
    let data = patch.set.iter().map(|(name, value)| FieldSet {
        prefix: DATA,
        name,
        value: FieldValue::Text(value),
    });
    metadata.chain(data)
}

/// The hash fields a patch sets (metadata included when the lifetime changes) and removes.
pub(super) fn patch_fields(patch: &Patch) -> (Vec<(String, String)>, Vec<String>) {
    let set = patch_sets(patch)
        .map(|field| {
            let value = match field.value {
                FieldValue::Text(text) => text.to_owned(),
                FieldValue::Number(number) => number.to_string(),
            };
            (format!("{}{}", field.prefix, field.name), value)
        })
        .collect();
    let remove = patch
        .remove
        .iter()
        .map(|name| format!("{DATA}{name}"))
        .collect();
    (set, remove)
}

/// Why a stored hash is not a session.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Corrupt {
    Shape,
    Metadata,
    Value(String),
}

impl fmt::Display for Corrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Shape => f.write_str("not a session hash"),
            Self::Metadata => f.write_str("metadata fields missing or malformed"),
            Self::Value(key) => write!(f, "value of key {key:?} is not JSON"),
        }
    }
}

/// The field, value pairs of an `HGETALL` reply (flat in RESP2, a map in RESP3).
pub(crate) fn hash_fields(reply: Value) -> Result<Vec<(String, String)>, Corrupt> {
    let text = |value: Value| match value {
        Value::BulkString(bytes) => String::from_utf8(bytes).map_err(|_| Corrupt::Shape),
        _ => Err(Corrupt::Shape),
    };
    match reply {
        Value::Array(items) => {
            let mut items = items.into_iter();
            let mut fields = Vec::with_capacity(items.len() / 2);
            while let Some(name) = items.next() {
                let value = items.next().ok_or(Corrupt::Shape)?;
                fields.push((text(name)?, text(value)?));
            }
            Ok(fields)
        }
        Value::Map(pairs) => pairs
            .into_iter()
            .map(|(name, value)| Ok((text(name)?, text(value)?)))
            .collect(),
        Value::Nil => Ok(Vec::new()),
        _ => Err(Corrupt::Shape),
    }
}

/// The record in a session hash's fields, and the tenant it was written for.
pub(crate) fn parse_record(fields: Vec<(String, String)>) -> Result<(Record, String), Corrupt> {
    let mut data = BTreeMap::new();
    let (mut user, mut created, mut absolute, mut idle, mut tenant) =
        (None, None, None, None, None);
    // Records written before the cookie kind was stored had persistent cookies.
    let mut persistent = true;
    for (name, value) in fields {
        if let Some(key) = name.strip_prefix(DATA) {
            if serde_json::from_str::<serde::de::IgnoredAny>(&value).is_err() {
                return Err(Corrupt::Value(key.to_owned()));
            }
            data.insert(key.to_owned(), value);
            continue;
        }
        match name.as_str() {
            USER => user = Some(value),
            CREATED => created = value.parse::<u64>().ok(),
            ABSOLUTE => absolute = value.parse::<u64>().ok(),
            IDLE => idle = value.parse::<u64>().ok(),
            TENANT => tenant = Some(value),
            PERSISTENT => persistent = value != flag(false),
            _ => {}
        }
    }
    let (Some(created_at), Some(expires_at), Some(idle), Some(tenant)) =
        (created, absolute, idle, tenant)
    else {
        return Err(Corrupt::Metadata);
    };
    let record = Record {
        data,
        user,
        created_at,
        expires_at,
        inactivity_timeout: Duration::from_millis(idle),
        persistent,
    };
    Ok((record, tenant))
}

fn flag(on: bool) -> &'static str {
    if on { "1" } else { "0" }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use redis::Value;

    use super::{
        ABSOLUTE, CREATED, DATA, IDLE, PERSISTENT, TENANT, USER, hash_fields, parse_record,
        record_fields,
    };
    use crate::{session::store::SessionKey, tenant::Tenant};

    /// A hash field name: mostly the names the store writes, some of them data fields.
    fn field_name() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec![ABSOLUTE, CREATED, IDLE, PERSISTENT, TENANT, USER])
                .prop_map(str::to_owned),
            "[a-z:]{0,8}".prop_map(|name| format!("{DATA}{name}")),
            "[ -~]{0,10}",
        ]
    }

    /// A field value: numbers, JSON, tenant names, or any text.
    fn field_value() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<u64>().prop_map(|n| n.to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            Just("\"v\"".to_owned()),
            Just("{\"a\":[1,2]}".to_owned()),
            "[a-z]{1,8}",
            "\\PC{0,16}",
        ]
    }

    /// Any fields, after (in most cases) the metadata of a live record, which they may spoil.
    fn fields() -> impl Strategy<Value = Vec<(String, String)>> {
        let metadata = (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            "[a-z]{1,8}",
            any::<bool>(),
        )
            .prop_map(|(created, absolute, idle, tenant, persistent)| {
                vec![
                    (CREATED.to_owned(), created.to_string()),
                    (ABSOLUTE.to_owned(), absolute.to_string()),
                    (IDLE.to_owned(), idle.to_string()),
                    (TENANT.to_owned(), tenant),
                    (
                        PERSISTENT.to_owned(),
                        if persistent { "1" } else { "0" }.to_owned(),
                    ),
                ]
            });
        (
            proptest::option::weighted(0.8, metadata),
            proptest::collection::vec((field_name(), field_value()), 0..12),
        )
            .prop_map(|(metadata, fields)| {
                metadata
                    .unwrap_or_default()
                    .into_iter()
                    .chain(fields)
                    .collect()
            })
    }

    fn size(fields: &[(String, String)]) -> usize {
        fields
            .iter()
            .map(|(name, value)| name.len() + value.len())
            .sum()
    }

    proptest! {
        /// Decoding any hash never panics; a decoded record encodes back to fields that decode
        /// to the same record and tenant (encode(decode(x)) is stable), and it holds no more
        /// text than the hash it came from.
        #[test]
        fn a_decoded_record_encodes_back_to_itself(fields in fields()) {
            let input = size(&fields);
            let Ok((record, tenant)) = parse_record(fields) else {
                return Ok(());
            };
            let held = record.data.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
                + record.user.as_ref().map_or(0, String::len);
            prop_assert!(held <= input, "{held} bytes from {input}");
            // Only a valid tenant name makes a key; the store refuses a record of any other.
            let Ok(name) = Tenant::new(&tenant) else {
                return Ok(());
            };
            let key = SessionKey::from_hash(&name, &"A".repeat(43)).expect("a valid hash");
            let encoded: Vec<(String, String)> = record_fields(&key, &record)
                .chunks(2)
                .map(|pair| (pair[0].clone(), pair[1].clone()))
                .collect();
            let again = parse_record(encoded.clone());
            // The store writes a tenant's name as it accepts it: lower-case.
            prop_assert_eq!(again, Ok((record.clone(), name.as_str().to_owned())));
            // And encoding once more gives the very same fields.
            let (record, _) = parse_record(encoded.clone()).expect("decodes");
            let twice: Vec<String> = record_fields(&key, &record);
            let encoded_flat: Vec<String> =
                encoded.into_iter().flat_map(|(name, value)| [name, value]).collect();
            prop_assert_eq!(twice, encoded_flat);
        }

        /// Any `HGETALL` reply shape reads as field pairs, each taken from the reply's own
        /// strings, or as corrupt; never a panic.
        #[test]
        fn any_hash_reply_reads_as_its_pairs_or_corrupt(
            items in proptest::collection::vec(
                prop_oneof![
                    "[ -~]{0,8}".prop_map(|t| Value::BulkString(t.into_bytes())),
                    proptest::collection::vec(any::<u8>(), 0..8).prop_map(Value::BulkString),
                    any::<i64>().prop_map(Value::Int),
                    Just(Value::Nil),
                ],
                0..10,
            ),
            as_map in any::<bool>(),
        ) {
            let strings = items.iter().filter(|v| matches!(v, Value::BulkString(_))).count();
            let reply = if as_map {
                Value::Map(items.chunks(2).map(|p| (p[0].clone(), p.get(1).cloned().unwrap_or(Value::Nil))).collect())
            } else {
                Value::Array(items.clone())
            };
            if let Ok(pairs) = hash_fields(reply) {
                prop_assert!(pairs.len() * 2 <= strings.max(1) || pairs.is_empty());
                for (name, value) in &pairs {
                    let found = |text: &String| items.contains(&Value::BulkString(text.clone().into_bytes()));
                    prop_assert!(found(name) && found(value));
                }
            }
        }
    }
}
