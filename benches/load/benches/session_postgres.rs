//! Sessions on PostgreSQL against Redis and against tower-sessions' sqlx `PostgresStore`, in
//! the same run, on the machine's PostgreSQL (127.0.0.1:5432, a schema of the bench's own) and
//! a `redis-server` the bench starts, over loopback TCP.
//!
//! - `read`: an existing session's counter is read. Ours slides the inactivity deadline in the
//!   same statement (writing only when the slide is due); tower-sessions' read does not slide.
//! - `write`: the counter is read and written back.
//! - `login`: a fresh session is bound to a user with a new id (ours: `set_user`;
//!   tower-sessions: `cycle_id` and an insert).
//!
//! Round trips per request, by construction: ours on PostgreSQL read 1, write 2, login 2; ours
//! on Redis read 1, write 2, login 2; the chain read 1 (a copy in Redis), write 2 + 2 (load,
//! update, then the copy dropped) ; tower-sessions' sqlx store read 1, write 2, login 3.
//!
//! Run with `cargo bench --manifest-path benches/load/Cargo.toml --bench session_postgres`; the
//! last lines print the ratios.

#[path = "../../../tests/support/mod.rs"]
mod support;

#[path = "../../common/mod.rs"]
mod common;

use std::hint::black_box;

use axum::{Router, routing::get};
use common::{call, estimate};
use criterion::{BatchSize, Criterion};
use tokio::runtime::Runtime;
use tower_turnstile::{
    backend::RedisBackend,
    session::{ChainStore, PostgresStore, RedisStore, Session, SessionLayer},
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

async fn login(session: Session) -> String {
    let _ = session.set_user("alice").await;
    "alice".to_owned()
}

fn ours(layer: SessionLayer) -> Router {
    Router::new()
        .route("/read", get(read))
        .route("/write", get(write))
        .route("/login", get(login))
        .layer(layer.with_secure(false))
}

fn theirs(store: tower_sessions_sqlx_store::PostgresStore) -> Router {
    use tower_sessions::{Expiry, Session, SessionManagerLayer};
    async fn read(session: Session) -> String {
        let n: u64 = session.get("n").await.ok().flatten().unwrap_or(0);
        n.to_string()
    }
    async fn write(session: Session) -> String {
        let n: u64 = session.get("n").await.ok().flatten().unwrap_or(0) + 1;
        let _ = session.insert("n", n).await;
        n.to_string()
    }
    async fn login(session: Session) -> String {
        let _ = session.cycle_id().await;
        let _ = session.insert("user", "alice").await;
        "alice".to_owned()
    }
    Router::new()
        .route("/read", get(read))
        .route("/write", get(write))
        .route("/login", get(login))
        .layer(
            SessionManagerLayer::new(store)
                .with_secure(false)
                .with_expiry(Expiry::OnInactivity(time::Duration::hours(24))),
        )
}

fn main() {
    common::start();
    let runtime: Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let Some(schema) = runtime.block_on(support::postgres::PgSchema::create()) else {
        eprintln!("SKIPPED: no PostgreSQL; session_postgres measured nothing");
        return;
    };
    let Some(server) = support::RedisServer::start() else {
        eprintln!("SKIPPED: no redis-server; session_postgres measured nothing");
        return;
    };
    let contenders: Vec<(&str, Router)> = runtime.block_on(async {
        let database = PostgresStore::new(schema.pool());
        database.migrate().await.unwrap();
        let redis = RedisStore::new(RedisBackend::new(&server.url()).unwrap());
        let peer = tower_sessions_sqlx_store::PostgresStore::new(schema.pool())
            .with_schema_name(&schema.name)
            .unwrap();
        peer.migrate().await.unwrap();
        vec![
            ("ours-postgres", ours(SessionLayer::new(database.clone()))),
            ("ours-redis", ours(SessionLayer::new(redis.clone()))),
            (
                "ours-chain",
                ours(SessionLayer::new(ChainStore::new(redis, database))),
            ),
            ("ts-sqlx-postgres", theirs(peer)),
        ]
    });
    let mut criterion = Criterion::default().configure_from_args();
    for path in ["read", "write", "login"] {
        let mut group = criterion.benchmark_group(format!("session_postgres/{path}"));
        for (name, app) in &contenders {
            let fresh = || {
                runtime.block_on(async {
                    let (cookie, body) = call(app, "/write", None).await;
                    assert_eq!(body, "1");
                    cookie.expect("the first write sets a cookie")
                })
            };
            let uri = format!("/{path}");
            if path == "login" {
                // Each login needs a session of its own: made before, not timed.
                group.bench_function(*name, |b| {
                    b.iter_batched(
                        fresh,
                        |cookie| {
                            runtime
                                .block_on(async { black_box(call(app, &uri, Some(&cookie)).await) })
                        },
                        BatchSize::SmallInput,
                    );
                });
            } else {
                let cookie = fresh();
                group.bench_function(*name, |b| {
                    b.to_async(&runtime)
                        .iter(|| async { black_box(call(app, &uri, Some(&cookie)).await) });
                });
            }
        }
        group.finish();
    }
    criterion.final_summary();
    for path in ["read", "write", "login"] {
        let group = format!("session_postgres/{path}");
        let of = |name| estimate(&group, name);
        if let (Some(ours), Some(theirs)) = (of("ours-postgres"), of("ts-sqlx-postgres")) {
            println!(
                "ratio {path:<5}: throughput ours on PostgreSQL / tower-sessions sqlx = {:.2}  ({:.1} µs vs {:.1} µs)",
                theirs / ours,
                ours / 1000.0,
                theirs / 1000.0
            );
        }
        if let (Some(pg), Some(redis)) = (of("ours-postgres"), of("ours-redis")) {
            println!(
                "ratio {path:<5}: latency ours on PostgreSQL / ours on Redis = {:.2}  ({:.1} µs vs {:.1} µs)",
                pg / redis,
                pg / 1000.0,
                redis / 1000.0
            );
        }
        if let (Some(chain), Some(redis)) = (of("ours-chain"), of("ours-redis")) {
            println!(
                "ratio {path:<5}: latency the chain / ours on Redis = {:.2}  ({:.1} µs vs {:.1} µs)",
                chain / redis,
                chain / 1000.0,
                redis / 1000.0
            );
        }
    }
}
