//! The healthy-path cost of `FallbackStore` against `RedisStore`, in the same run, on a real
//! `redis-server` over loopback TCP (started by the bench; skipped when none is installed).
//!
//! - `read`: the request carries the cookie of an existing session; the handler reads a
//!   counter (one round trip: load, which also restarts the inactivity clock).
//! - `write`: the handler reads the counter and writes it back (two round trips).
//!
//! Both stores send the same commands (`tests/it/session_layer.rs` checks it with `MONITOR`); the
//! fallback store also keeps its local copy up to date. Run with
//! `cargo bench --bench session_redis --features cluster`; the last lines print the ratios
//! (fallback / Redis).

#[path = "../tests/support/mod.rs"]
mod support;

mod common;

use std::hint::black_box;

use axum::{Router, routing::get};
use common::{call, estimate};
use criterion::Criterion;
use tokio::runtime::Runtime;
use tower_turnstile::{
    backend::RedisBackend,
    session::{FallbackStore, RedisStore, Session, SessionLayer},
};

async fn read(session: Session) -> String {
    let n: u64 = session.get("n").await.ok().flatten().unwrap_or(0);
    n.to_string()
}

async fn write(session: Session) -> String {
    let n: u64 = session.get("n").await.ok().flatten().unwrap_or(0) + 1;
    let _ = session.insert("n", n).await;
    n.to_string()
}

fn app(layer: SessionLayer) -> Router {
    Router::new()
        .route("/read", get(read))
        .route("/write", get(write))
        .layer(layer.with_secure(false))
}

fn main() {
    common::start();
    let Some(server) = support::RedisServer::start() else {
        eprintln!("SKIPPED: no redis-server; session_redis measured nothing");
        return;
    };
    let runtime: Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cluster = support::RedisCluster::start_masters_only();
    let contenders = runtime.block_on(async {
        let redis = RedisBackend::new(&server.url()).unwrap();
        let mut contenders = vec![
            (
                "redis",
                app(SessionLayer::new(RedisStore::new(redis.clone()))),
            ),
            (
                "fallback",
                app(SessionLayer::new(FallbackStore::new(RedisStore::new(
                    redis,
                )))),
            ),
        ];
        if let Some(cluster) = &cluster {
            let backend = RedisBackend::cluster(cluster.urls()).unwrap();
            contenders.push(("cluster", app(SessionLayer::new(RedisStore::new(backend)))));
        }
        contenders
    });
    let mut criterion = Criterion::default().configure_from_args();
    for path in ["read", "write"] {
        let mut group = criterion.benchmark_group(format!("session_redis/{path}"));
        for (name, app) in &contenders {
            let cookie = runtime.block_on(async {
                let (cookie, body) = call(app, "/write", None).await;
                assert_eq!(body, "1");
                cookie.expect("the first write sets a cookie")
            });
            let uri = format!("/{path}");
            group.bench_function(*name, |b| {
                b.to_async(&runtime)
                    .iter(|| async { black_box(call(app, &uri, Some(&cookie)).await) });
            });
        }
        group.finish();
    }
    criterion.final_summary();
    for path in ["read", "write"] {
        let group = format!("session_redis/{path}");
        if let (Some(fallback), Some(redis)) =
            (estimate(&group, "fallback"), estimate(&group, "redis"))
        {
            println!(
                "ratio {path:<5}: FallbackStore / RedisStore = {:.3}  ({:.1} µs vs {:.1} µs, same commands)",
                fallback / redis,
                fallback / 1000.0,
                redis / 1000.0
            );
        }
        if let (Some(cluster), Some(redis)) =
            (estimate(&group, "cluster"), estimate(&group, "redis"))
        {
            println!(
                "ratio {path:<5}: RedisStore on a cluster of 3 masters / on one server = {:.3}  ({:.1} µs vs {:.1} µs, one round trip each)",
                cluster / redis,
                cluster / 1000.0,
                redis / 1000.0
            );
        }
    }
}
