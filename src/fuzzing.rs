//! The crate's parsers of client and stored input, opened to the fuzz targets under `fuzz/`.
//!
//! Built only with `--cfg fuzzing` (cargo-fuzz sets it), hidden from the docs, and no part of
//! the public API. Each item wraps, unchanged, a parser the middleware runs on a request or on
//! a Redis reply, so a target drives the very code that input reaches in production. The
//! parsers that are public already (tenant resolvers, `ClientIp`) are fuzzed through the
//! public API and have nothing here.

use http::{HeaderMap, HeaderValue};
use redis::Value;

use crate::{
    session::{
        CookieConfig, Record, SessionId, SessionKey, SigningKey, hash_fields, header_name,
        parse_record, record_fields, validate_name,
    },
    tenant::Tenant,
};

/// How the session layer carries an id: a cookie or a header, signed with keys or not.
#[derive(Debug)]
pub struct IdTransport(CookieConfig);

impl IdTransport {
    /// Ids in the cookie `name`; signed with the first of `keys` and verified under any of
    /// them, unsigned when there are none. `None` for a name the layer refuses.
    pub fn cookie(name: &str, keys: Vec<SigningKey>) -> Option<Self> {
        validate_name(name).ok()?;
        Some(Self(CookieConfig {
            name: name.to_owned(),
            signing: keys,
            ..CookieConfig::default()
        }))
    }

    /// Ids in the request and response header `name`, as [`IdTransport::cookie`] signs them.
    pub fn header(name: &str, keys: Vec<SigningKey>) -> Option<Self> {
        let header = header_name(name).ok()?;
        Some(Self(CookieConfig {
            signing: keys,
            header: Some(header),
            ..CookieConfig::default()
        }))
    }

    /// The id the layer takes from these request headers, in its cookie form.
    pub fn read(&self, headers: &HeaderMap) -> Option<String> {
        self.0.read(headers).map(|id| id.encode())
    }

    /// A fresh id in its cookie form, and the response header value that hands it out
    /// (`Set-Cookie`, or the header's value).
    pub fn issue(&self) -> Option<(String, HeaderValue)> {
        let id = SessionId::random()?;
        Some((id.encode(), self.0.set(&id, None)?))
    }

    /// Whether the id travels in a header rather than a cookie.
    pub fn in_header(&self) -> bool {
        self.0.header.is_some()
    }
}

/// Whether `text` is a session id exactly as the layer writes one.
pub fn is_encoded_id(text: &str) -> bool {
    SessionId::decode(text).is_some_and(|id| id.encode() == text)
}

/// A session as the Redis store decodes it from its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSession {
    /// The record.
    pub record: Record,
    /// The tenant the hash says it was written for.
    pub tenant: String,
}

impl StoredSession {
    /// What the store reads from an `HGETALL` reply: the session, or why it is no session.
    pub fn decode(reply: Value) -> Result<Self, String> {
        let fields = hash_fields(reply).map_err(|corrupt| corrupt.to_string())?;
        let (record, tenant) = parse_record(fields).map_err(|corrupt| corrupt.to_string())?;
        Ok(Self { record, tenant })
    }

    /// The hash the store writes for this session (as a RESP2 `HGETALL` reply would list it),
    /// or `None` when its tenant is not a name the store accepts.
    pub fn encode(&self) -> Option<Value> {
        let tenant = Tenant::new(&self.tenant).ok()?;
        let key = SessionKey::from_hash(&tenant, &"A".repeat(43))?;
        let fields = record_fields(&key, &self.record);
        Some(Value::Array(
            fields
                .into_iter()
                .map(|field| Value::BulkString(field.into_bytes()))
                .collect(),
        ))
    }

    /// Bytes of text the record holds: its data's keys and values and its user.
    pub fn held_bytes(&self) -> usize {
        let data: usize = self
            .record
            .data
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum();
        data + self.record.user.as_ref().map_or(0, String::len)
    }
}

/// A rate-limit decision as the Redis store reads it from its script's reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScriptDecision {
    /// Whether the request is allowed.
    pub allowed: bool,
    /// Units left in the window.
    pub remaining: u64,
    /// Microseconds until the window has room again.
    pub reset_us: u64,
    /// Microseconds a refused client should wait, for a refusal.
    pub retry_us: Option<u64>,
}

impl ScriptDecision {
    /// What the store makes of `reply` under a limit of `limit` units; `None` for a reply the
    /// layer treats as a failed check.
    pub fn read(reply: &Value, limit: u64) -> Option<Self> {
        let counted = crate::ratelimit::read_reply(reply, limit).ok()?.counted;
        Some(Self {
            allowed: counted.allowed,
            remaining: counted.remaining,
            reset_us: counted.reset,
            retry_us: counted.retry,
        })
    }
}

/// The entries the connection registry takes from an `XREAD` reply of an instance's inbox:
/// each entry's id and field pairs.
#[cfg(feature = "connections")]
pub fn inbox_entries(reply: Value) -> Vec<(String, Vec<(String, String)>)> {
    crate::connection::stream_entries(reply)
}

/// The instance and connection id the registry reads from a member of a user's lease set.
#[cfg(feature = "connections")]
pub fn lease_member(member: &str) -> Option<(&str, u64)> {
    crate::connection::parse_member(member)
}
