//! Counters and histograms through the [`metrics`](https://docs.rs/metrics) facade, with the
//! `metrics` feature; without it every call here compiles to nothing. The names are listed in the crate docs.

use std::time::Duration;

/// Adds `n` to a counter.
pub(crate) fn count(name: &'static str, n: u64) {
    #[cfg(feature = "metrics")]
    metrics::counter!(name).increment(n);
    #[cfg(not(feature = "metrics"))]
    let _ = (name, n);
}

/// Adds one to a counter with one label.
#[cfg_attr(not(feature = "redis"), allow(dead_code))] // only the Redis parts have labels
pub(crate) fn count_labeled(name: &'static str, label: &'static str, value: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::counter!(name, label => value).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = (name, label, value);
}

/// Records how long one Redis round trip took, and how it ended.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) fn redis_call(outcome: &'static str, elapsed: Duration) {
    #[cfg(feature = "metrics")]
    metrics::histogram!("turnstile_redis_call_seconds", "outcome" => outcome)
        .record(elapsed.as_secs_f64());
    #[cfg(not(feature = "metrics"))]
    let _ = (outcome, elapsed);
}
