//! The `metrics` feature: an outage drill through the session and rate-limit layers, with a
//! recorder installed, and the counts it must leave. Its own test binary, since a recorder is
//! installed once per process.

mod support;

use std::{collections::HashMap, time::Duration};

use axum::{Router, http::StatusCode};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use support::{RedisServer, http::Client, proxy::Proxy, session_app};
use tower_turnstile::{
    ratelimit::{Fallback, Policy, Quota, RateLimitLayer},
    session::{FallbackStore, RedisStore, SessionEvents, SessionLayer},
};

/// Counter values by `name` or `name{label=value}`, and histogram sample counts the same way.
fn read(snapshotter: &Snapshotter) -> HashMap<String, u64> {
    let mut values = HashMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        let mut name = key.name().to_owned();
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        if !labels.is_empty() {
            name = format!("{name}{{{}}}", labels.join(","));
        }
        let n = match value {
            DebugValue::Counter(n) => n,
            DebugValue::Histogram(samples) => samples.len() as u64,
            DebugValue::Gauge(_) => continue,
        };
        *values.entry(name).or_default() += n;
    }
    values
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_drill_leaves_its_counts() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this binary");
    let Some(server) = RedisServer::start() else {
        return;
    };
    let proxy = Proxy::start(server.port()).await;
    let backend = session_app::fast_failing_backend(&proxy.url());
    let sessions = FallbackStore::new(RedisStore::new(backend.clone()));
    let limit = RateLimitLayer::new(Policy::new("per-client", Quota::per_minute(5)).unwrap())
        .with_redis(backend.clone())
        .with_fallback(Fallback::local_share_of(1));
    let app: Router = session_app::routes()
        .layer(
            SessionLayer::new(sessions.clone())
                .with_lifecycle_events(SessionEvents::redis(backend.clone())),
        )
        .layer(limit.clone());
    let mut client = Client::new(app);
    assert_eq!(client.post("/set/k/0").await.status, StatusCode::OK);
    let healthy = read(&snapshotter);
    assert!(
        healthy["turnstile_redis_call_seconds{outcome=ok}"] >= 2,
        "{healthy:?}"
    );
    assert_eq!(healthy["turnstile_ratelimit_allowed_total"], 1);

    proxy.cut().await;
    let mut statuses = Vec::new();
    for i in 1..=8 {
        // The first a login: journaled like any write, its lifecycle event dropped.
        let path = match i {
            1 => "/login/alice".to_owned(),
            i => format!("/set/k/{i}"),
        };
        statuses.push(client.post(&path).await.status);
    }
    // The local limiter counts on its own: five per minute, as the whole quota.
    assert_eq!(
        statuses.iter().filter(|s| **s == StatusCode::OK).count(),
        5,
        "{statuses:?}"
    );
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::OK || *s == StatusCode::TOO_MANY_REQUESTS)
    );
    let journaled = sessions.status().journaled;
    assert_eq!(journaled, 5);

    proxy.heal();
    let start = std::time::Instant::now();
    while sessions.status().active || sessions.status().journal_len > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            sessions.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let counts = read(&snapshotter);
    eprintln!("metrics after the drill: {counts:?}");
    assert_eq!(counts["turnstile_session_journaled_total"], journaled);
    assert_eq!(counts["turnstile_session_replayed_total"], journaled);
    assert_eq!(counts["turnstile_session_events_dropped_total"], 1);
    assert!(
        !counts.contains_key("turnstile_session_dropped_total"),
        "{counts:?}"
    );
    assert_eq!(
        counts["turnstile_session_fallback_transitions_total{to=local}"],
        1
    );
    assert_eq!(
        counts["turnstile_session_fallback_transitions_total{to=redis}"],
        1
    );
    assert_eq!(counts["turnstile_breaker_transitions_total{to=open}"], 1);
    assert_eq!(counts["turnstile_breaker_transitions_total{to=closed}"], 1);
    assert_eq!(counts["turnstile_ratelimit_fallback_decisions_total"], 8);
    assert_eq!(counts["turnstile_ratelimit_denied_total"], 3);
    // Five of the eight during the outage (a snapshot takes what it reads: the first
    // request's was read above).
    assert_eq!(counts["turnstile_ratelimit_allowed_total"], 5);
    assert!(
        counts["turnstile_redis_call_seconds{outcome=outage}"] >= 2,
        "{counts:?}"
    );
    assert!(
        counts["turnstile_redis_call_seconds{outcome=rejected}"] >= 1,
        "{counts:?}"
    );
    assert_eq!(limit.fallback_decisions(), 8);
}
