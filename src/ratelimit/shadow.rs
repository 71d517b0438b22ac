//! Shadow limits: a layer that decides, counts and sends its headers, but never refuses. How a
//! team rolls a new limit out: the refusals it would make are counted and logged, and nobody
//! is refused.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use moka::sync::Cache;

use super::store::Decision;

/// What a shadow layer keeps: the refusals it did not make, and which keys it has logged.
#[derive(Clone)]
pub(crate) struct Shadow {
    refusals: Arc<AtomicU64>,
    /// Keys logged within the last window, so each is logged once per window.
    logged: Cache<String, ()>,
}

/// How many keys a shadow layer remembers having logged.
const LOGGED_KEYS: u64 = 10_000;

impl Shadow {
    pub(crate) fn new(window: Duration) -> Self {
        Self {
            refusals: Arc::new(AtomicU64::new(0)),
            logged: Cache::builder()
                .max_capacity(LOGGED_KEYS)
                .time_to_live(window.max(Duration::from_secs(1)))
                .build(),
        }
    }

    /// A refusal this layer did not make, for `key` (when the request had one).
    pub(crate) fn would_refuse(
        &self,
        policy: &str,
        key: Option<&str>,
        decision: Option<&Decision>,
    ) {
        self.refusals.fetch_add(1, Ordering::Relaxed);
        crate::metrics::count("turnstile_ratelimit_shadow_refusals_total", 1);
        let key = key.unwrap_or("(no key)");
        if self.logged.contains_key(key) {
            return;
        }
        self.logged.insert(key.to_owned(), ());
        tracing::info!(
            target: "tower_turnstile::ratelimit",
            policy,
            key,
            limit = decision.map(|d| d.limit),
            "shadow limit: this request would have been refused (logged once per key per window)"
        );
    }

    pub(crate) fn refusals(&self) -> u64 {
        self.refusals.load(Ordering::Relaxed)
    }
}
