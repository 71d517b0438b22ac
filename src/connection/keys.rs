//! How the registry lives in Redis: its keys, the names of its members, and the scripts that
//! change them (`lua/*.lua`).
//!
//! - A user's connections: a sorted set of leases (`…:live`, a member per connection scored by
//!   the end of its lease on Redis's clock) and a hash of their metadata (`…:meta`), both under
//!   the hash tag `{tenant:hash of user}`, so one script touches both on a cluster.
//! - A tenant's connections: a sorted set of the same leases, for counting.
//! - An instance's inbox: a stream of messages for its connections.

use std::sync::LazyLock;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use redis::{Cmd, Script};
use sha2::{Digest, Sha256};

use crate::{script::without_comments, tenant::Tenant};

/// Takes a lease, refusing past a cap; see `lua/register.lua`.
pub(super) static REGISTER: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/register.lua")));

/// The live members of a key, with their metadata; see `lua/live.lua`.
pub(super) static LIVE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/live.lua")));

/// Renews leases; see `lua/renew.lua`. Sent whole as `EVAL`, so a Redis that lost its script
/// cache (a restart) runs it anyway, in a pipeline too.
static RENEW: LazyLock<String> = LazyLock::new(|| without_comments(include_str!("lua/renew.lua")));

/// The names of one registry's keys and members.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    prefix: String,
    /// This instance's id: part of every member it writes, and of its inbox's name.
    pub(super) instance: String,
}

impl Keys {
    pub(super) fn new(prefix: String, instance: String) -> Self {
        Self { prefix, instance }
    }

    /// The member of this instance's connection `id`: `instance/id`.
    pub(super) fn member(&self, id: u64) -> String {
        format!("{}/{id}", self.instance)
    }

    /// The user's lease set and metadata hash, in one hash slot.
    pub(super) fn user(&self, tenant: &Tenant, user: &str) -> (String, String) {
        let hash = URL_SAFE_NO_PAD.encode(Sha256::digest(user.as_bytes()));
        let base = format!("{}{}:conn:{{{}:{hash}}}", self.prefix, tenant, tenant);
        (format!("{base}:live"), format!("{base}:meta"))
    }

    /// The tenant's lease set.
    pub(super) fn tenant(&self, tenant: &Tenant) -> String {
        format!("{}{}:conns", self.prefix, tenant)
    }

    /// The inbox of `instance`.
    pub(super) fn inbox(&self, instance: &str) -> String {
        format!("{}inbox:{instance}", self.prefix)
    }
}

/// The instance and connection id a member names.
pub(crate) fn parse_member(member: &str) -> Option<(&str, u64)> {
    let (instance, id) = member.rsplit_once('/')?;
    Some((instance, id.parse().ok()?))
}

/// `EVAL` of the renewal script on `keys`: `members` (member, metadata pairs) get a new lease
/// of `lease` ms.
pub(super) fn renew_cmd(keys: &[String], lease: u64, members: &[(String, String)]) -> Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(RENEW.as_str()).arg(keys.len()).arg(keys).arg(lease);
    for (member, meta) in members {
        cmd.arg(member).arg(meta);
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_keys_share_one_hash_tag_and_members_parse_back() {
        let keys = Keys::new("p:".into(), "inst".into());
        let tenant = Tenant::new("acme").unwrap();
        let (live, meta) = keys.user(&tenant, "alice");
        let tag = |key: &str| key[key.find('{').unwrap()..=key.find('}').unwrap()].to_owned();
        assert_eq!(tag(&live), tag(&meta));
        assert!(live.starts_with("p:acme:conn:{acme:") && live.ends_with(":live"));
        assert_eq!(parse_member(&keys.member(7)), Some(("inst", 7)));
        assert_eq!(parse_member("no-slash"), None);
        assert_eq!(parse_member("a/b/not-a-number"), None);
        assert_eq!(keys.inbox("x"), "p:inbox:x");
    }
}
