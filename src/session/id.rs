//! Session ids and the store keys derived from them.

use std::fmt;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use sha2::{Digest, Sha256};

use crate::tenant::Tenant;

/// Bytes of randomness in a session id: 128 bits.
const ID_LEN: usize = 16;
/// Length of an id in the cookie: 16 bytes in unpadded base64url.
const ENCODED_LEN: usize = 22;

/// A session id: 128 bits from the operating system's CSPRNG. Only the cookie holds it; stores
/// see [`SessionKey`], its SHA-256 hash, so a copy of the store yields no usable cookie.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct SessionId([u8; ID_LEN]);

impl SessionId {
    /// A fresh random id, or `None` if the operating system's CSPRNG failed (it does not on
    /// supported platforms; the caller then declines to create a session rather than panic).
    pub(crate) fn random() -> Option<Self> {
        let mut bytes = [0u8; ID_LEN];
        getrandom::fill(&mut bytes).ok()?;
        Some(Self(bytes))
    }

    /// Decodes the cookie form; anything that is not exactly 22 base64url characters is refused.
    pub(crate) fn decode(text: &str) -> Option<Self> {
        if text.len() != ENCODED_LEN {
            return None;
        }
        let mut bytes = [0u8; ID_LEN];
        match URL_SAFE_NO_PAD.decode_slice(text, &mut bytes) {
            Ok(ID_LEN) => Some(Self(bytes)),
            _ => None,
        }
    }

    /// The id made of these 128 bits (tower-sessions' ids, say).
    #[cfg(any(feature = "tower-sessions", feature = "tower-sessions-015"))]
    pub(crate) fn from_bytes(bytes: [u8; ID_LEN]) -> Self {
        Self(bytes)
    }

    /// The id's 128 bits.
    #[cfg(any(feature = "tower-sessions", feature = "tower-sessions-015"))]
    pub(crate) fn bytes(&self) -> [u8; ID_LEN] {
        self.0
    }

    pub(crate) fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }

    pub(crate) fn key(&self, tenant: &Tenant) -> SessionKey {
        SessionKey {
            tenant: tenant.clone(),
            hash: Sha256::digest(self.0).into(),
        }
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The id is a bearer credential: never print it.
        f.write_str("SessionId(..)")
    }
}

/// Where one session lives in a store: its tenant and the SHA-256 hash of its id.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SessionKey {
    tenant: Tenant,
    hash: [u8; 32],
}

impl SessionKey {
    /// The tenant the session belongs to.
    pub fn tenant(&self) -> &Tenant {
        &self.tenant
    }

    /// The hash of the session id, as 43 base64url characters: safe in any key or log line.
    pub fn hash(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.hash)
    }

    /// Appends [`SessionKey::hash`] to `out`, with no allocation of its own.
    #[cfg(feature = "redis")]
    pub(crate) fn push_hash(&self, out: &mut String) {
        URL_SAFE_NO_PAD.encode_string(self.hash, out);
    }

    /// Rebuilds a key from a tenant and a hash produced by [`SessionKey::hash`].
    pub fn from_hash(tenant: &Tenant, hash: &str) -> Option<Self> {
        let mut bytes = [0u8; 32];
        match URL_SAFE_NO_PAD.decode_slice(hash, &mut bytes) {
            Ok(32) if hash.len() == 43 => Some(Self {
                tenant: tenant.clone(),
                hash: bytes,
            }),
            _ => None,
        }
    }
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionKey({}:{})", self.tenant, self.hash())
    }
}

/// The user index of one tenant's user: the set of that user's sessions.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct UserKey {
    tenant: Tenant,
    user: String,
}

impl UserKey {
    /// The key of `user`'s sessions in `tenant`.
    pub fn new(tenant: &Tenant, user: impl Into<String>) -> Self {
        Self {
            tenant: tenant.clone(),
            user: user.into(),
        }
    }

    /// The tenant.
    pub fn tenant(&self) -> &Tenant {
        &self.tenant
    }

    /// The user id as the application set it.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The SHA-256 hash of the user id in base64url: user ids can hold any character, so
    /// stores put this, never the raw id, into their keys.
    pub fn hash(&self) -> String {
        URL_SAFE_NO_PAD.encode(Sha256::digest(self.user.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_differ() {
        let a = SessionId::random().unwrap();
        let b = SessionId::random().unwrap();
        assert_ne!(a, b);
        let text = a.encode();
        assert_eq!(text.len(), ENCODED_LEN);
        assert_eq!(SessionId::decode(&text), Some(a));
    }

    #[test]
    fn malformed_ids_are_refused() {
        let good = SessionId::random().unwrap().encode();
        for bad in [
            "",
            "short",
            &good[..21],
            &format!("{good}A"),
            "!!!!!!!!!!!!!!!!!!!!!!",
            &"é".repeat(11),
        ] {
            assert_eq!(SessionId::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn key_hash_round_trips_and_depends_on_tenant() {
        let id = SessionId::random().unwrap();
        let acme = Tenant::new("acme").unwrap();
        let key = id.key(&acme);
        assert_eq!(SessionKey::from_hash(&acme, &key.hash()), Some(key.clone()));
        assert_ne!(id.key(&Tenant::default_tenant()), key);
        assert!(!key.hash().contains(&id.encode()));
    }
}
