//! What Redis does with keys when it runs out of memory, read from `INFO memory` (which a user
//! that ACLs refuse `CONFIG GET` can still read), and whether that puts this crate's keys at
//! risk.

use std::sync::{
    Mutex,
    atomic::{AtomicBool, Ordering},
};

use serde::Serialize;

use super::RedisBackend;
use crate::sync::lock;

/// Redis's memory limit and what it does when the limit is reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct MemorySettings {
    /// `maxmemory`, in bytes; `0` is no limit.
    pub maxmemory: u64,
    /// `maxmemory-policy`: `noeviction`, `allkeys-lru`, `volatile-ttl`, ...
    pub policy: String,
}

impl MemorySettings {
    /// The settings in the text of an `INFO memory` reply, when it has both.
    pub(super) fn parse(info: &str) -> Option<Self> {
        let field = |name: &str| {
            info.lines()
                .find_map(|line| line.trim().strip_prefix(name)?.strip_prefix(':'))
        };
        Some(Self {
            maxmemory: field("maxmemory")?.parse().ok()?,
            policy: field("maxmemory_policy")?.to_owned(),
        })
    }

    /// The policy, when Redis may evict this crate's keys under memory pressure: a memory
    /// limit is set and the policy is not `noeviction`. Every session and rate-limit key has a
    /// TTL, so the `volatile-*` policies evict them as readily as the `allkeys-*` ones.
    pub fn eviction_risk(&self) -> Option<&str> {
        (self.maxmemory > 0 && self.policy != "noeviction").then_some(self.policy.as_str())
    }
}

/// What a backend knows of Redis's memory settings.
#[derive(Debug, Default)]
pub(super) struct MemoryWatch {
    /// As the last health check read them.
    settings: Mutex<Option<MemorySettings>>,
    /// Whether the eviction risk has been logged (once per backend).
    warned: AtomicBool,
}

impl RedisBackend {
    /// Records the settings an `INFO memory` reply shows, and warns once (per backend) when
    /// they put sessions at risk of eviction.
    pub(super) fn memory_seen(&self, info: &str) {
        let Some(settings) = MemorySettings::parse(info) else {
            return;
        };
        if let Some(policy) = settings.eviction_risk()
            && !self.inner.memory.warned.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                target = %self.inner.target,
                maxmemory = settings.maxmemory,
                policy,
                "Redis may evict sessions and rate-limit counters under memory pressure \
                 (maxmemory-policy {policy}); set maxmemory-policy noeviction"
            );
        }
        *lock(&self.inner.memory.settings) = Some(settings);
    }

    /// Redis's memory settings as last read (each [`check`](Self::check) reads them), if ever.
    pub fn memory_settings(&self) -> Option<MemorySettings> {
        lock(&self.inner.memory.settings).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::MemorySettings;

    #[test]
    fn reads_the_two_settings_from_info_memory() {
        let info = "# Memory\r\nused_memory:1000\r\nmaxmemory:104857600\r\n\
                    maxmemory_human:100.00M\r\nmaxmemory_policy:allkeys-lru\r\n";
        let settings = MemorySettings::parse(info).expect("both settings");
        assert_eq!(settings.maxmemory, 104_857_600);
        assert_eq!(settings.policy, "allkeys-lru");
        assert_eq!(settings.eviction_risk(), Some("allkeys-lru"));
    }

    #[test]
    fn no_limit_or_noeviction_is_no_risk() {
        let parse = |text: &str| MemorySettings::parse(text).expect("both settings");
        assert_eq!(
            parse("maxmemory:0\nmaxmemory_policy:allkeys-lru").eviction_risk(),
            None
        );
        assert_eq!(
            parse("maxmemory:100\nmaxmemory_policy:noeviction").eviction_risk(),
            None
        );
        assert_eq!(
            parse("maxmemory:100\nmaxmemory_policy:volatile-ttl").eviction_risk(),
            Some("volatile-ttl")
        );
        assert_eq!(MemorySettings::parse("maxmemory:100\n"), None);
        assert_eq!(
            MemorySettings::parse("maxmemory:x\nmaxmemory_policy:a"),
            None
        );
    }
}
