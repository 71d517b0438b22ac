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
/// Moves the gauge `name` by `delta`.
#[cfg_attr(not(feature = "connections"), allow(dead_code))]
pub(crate) fn gauge_add(name: &'static str, delta: f64) {
    #[cfg(feature = "metrics")]
    metrics::gauge!(name).increment(delta);
    #[cfg(not(feature = "metrics"))]
    let _ = (name, delta);
}

#[cfg_attr(not(feature = "redis"), allow(dead_code))]
pub(crate) fn redis_call(outcome: &'static str, elapsed: Duration) {
    #[cfg(feature = "metrics")]
    metrics::histogram!("turnstile_redis_call_seconds", "outcome" => outcome)
        .record(elapsed.as_secs_f64());
    #[cfg(not(feature = "metrics"))]
    let _ = (outcome, elapsed);
}

/// Every metric the crate records: name, kind, unit, help, and the label values it takes.
#[cfg(feature = "metrics")]
const METRICS: &[Metric] = &[
    Metric::new(
        "turnstile_redis_call_seconds",
        Kind::Histogram,
        "Redis round trips, by outcome (ok, outage, refused, error, rejected)",
        &[
            ("outcome", "ok"),
            ("outcome", "outage"),
            ("outcome", "refused"),
            ("outcome", "error"),
            ("outcome", "rejected"),
        ],
    ),
    Metric::new(
        "turnstile_breaker_transitions_total",
        Kind::Counter,
        "Circuit-breaker transitions, by the state entered",
        &[("to", "open"), ("to", "closed")],
    ),
    Metric::new(
        "turnstile_session_copy_total",
        Kind::Counter,
        "Session reads served from the local copy (hit) or sent to Redis (miss), and copies \
         dropped because another client changed the session (invalidated)",
        &[
            ("outcome", "hit"),
            ("outcome", "miss"),
            ("outcome", "invalidated"),
        ],
    ),
    Metric::new(
        "turnstile_session_fallback_transitions_total",
        Kind::Counter,
        "Session fallback runs starting (to=local) and ending (to=redis)",
        &[("to", "local"), ("to", "redis")],
    ),
    Metric::new(
        "turnstile_session_journaled_total",
        Kind::Counter,
        "Session writes journaled while Redis was unavailable or refused writes",
        &[],
    ),
    Metric::new(
        "turnstile_session_replayed_total",
        Kind::Counter,
        "Journaled session writes replayed into Redis",
        &[],
    ),
    Metric::new(
        "turnstile_session_superseded_total",
        Kind::Counter,
        "Journaled writes of sessions gone from Redis, not replayed",
        &[],
    ),
    Metric::new(
        "turnstile_session_dropped_total",
        Kind::Counter,
        "Session writes that could not be kept (journal full, refused on replay)",
        &[],
    ),
    Metric::new(
        "turnstile_session_events_dropped_total",
        Kind::Counter,
        "Session lifecycle events that could not be written (Redis unreachable)",
        &[],
    ),
    Metric::new(
        "turnstile_ratelimit_allowed_total",
        Kind::Counter,
        "Requests a rate limit let through",
        &[],
    ),
    Metric::new(
        "turnstile_ratelimit_denied_total",
        Kind::Counter,
        "Requests refused with 429",
        &[],
    ),
    Metric::new(
        "turnstile_ratelimit_shadow_refusals_total",
        Kind::Counter,
        "Requests a shadow rate limit let through that it would have refused",
        &[],
    ),
    Metric::new(
        "turnstile_ratelimit_fallback_decisions_total",
        Kind::Counter,
        "Rate-limit decisions made without the shared store",
        &[],
    ),
    Metric::new(
        "turnstile_connections",
        Kind::Gauge,
        "Live connections this instance holds in a connection registry",
        &[],
    ),
];

/// One metric: its name, kind, help text, and the label values it takes (one label at most).
#[cfg(feature = "metrics")]
struct Metric {
    name: &'static str,
    kind: Kind,
    help: &'static str,
    labels: &'static [(&'static str, &'static str)],
}

#[cfg(feature = "metrics")]
impl Metric {
    const fn new(
        name: &'static str,
        kind: Kind,
        help: &'static str,
        labels: &'static [(&'static str, &'static str)],
    ) -> Self {
        Self {
            name,
            kind,
            help,
            labels,
        }
    }
}

#[cfg(feature = "metrics")]
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Describes every metric this crate records to the installed `metrics` recorder (help text,
/// and seconds as the unit of the Redis latency), and registers each counter and gauge, with
/// each label value it takes, at zero: dashboards and alerts see every series before its first
/// event, and an exporter such as Prometheus's lists them all. Call it once, after installing
/// the recorder.
///
/// ```
/// // With no recorder installed the calls go nowhere; with one, every series appears.
/// tower_turnstile::register_metrics();
/// ```
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub fn register_metrics() {
    for &Metric {
        name,
        kind,
        help,
        labels,
    } in METRICS
    {
        match kind {
            Kind::Counter => metrics::describe_counter!(name, help),
            Kind::Gauge => metrics::describe_gauge!(name, help),
            Kind::Histogram => {
                metrics::describe_histogram!(name, metrics::Unit::Seconds, help);
            }
        }
        let series: Vec<Option<(&str, &str)>> = if labels.is_empty() {
            vec![None]
        } else {
            labels.iter().copied().map(Some).collect()
        };
        for label in series {
            let labels: Vec<metrics::Label> = label
                .map(|(key, value)| metrics::Label::new(key, value))
                .into_iter()
                .collect();
            match kind {
                Kind::Counter => metrics::counter!(name, labels).increment(0),
                Kind::Gauge => metrics::gauge!(name, labels).increment(0.0),
                // A histogram has no zero to show: it appears with its first sample.
                Kind::Histogram => {}
            }
        }
    }
}
