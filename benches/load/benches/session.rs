//! One request through an axum router with a session layer (in-memory store), ours side by
//! side with tower-sessions 0.15 and its `MemoryStore`, in the same run.
//!
//! - `read`: the request carries the cookie of an existing session; the handler reads a
//!   counter.
//! - `write`: the same, and the handler also writes the counter back (read then write).
//! - `bare`: the same router with no session layer, for scale.
//!
//! Run with `cargo bench --manifest-path benches/load/Cargo.toml --bench session`; the last
//! lines print the ratios (tower-turnstile time / tower-sessions time; below 1.0 means we are
//! faster).

#[path = "../../common/mod.rs"]
mod common;

use std::hint::black_box;

use axum::{Router, routing::get};
use common::{call, estimate};
use criterion::Criterion;
use tokio::runtime::Runtime;

async fn ours_read(session: tower_turnstile::session::Session) -> String {
    let n: u64 = session.get("n").await.ok().flatten().unwrap_or(0);
    n.to_string()
}

async fn ours_write(session: tower_turnstile::session::Session) -> String {
    let n: u64 = session.get("n").await.ok().flatten().unwrap_or(0) + 1;
    let _ = session.insert("n", n).await;
    n.to_string()
}

async fn theirs_read(session: tower_sessions_015::Session) -> String {
    let n: u64 = session.get("n").await.ok().flatten().unwrap_or(0);
    n.to_string()
}

async fn theirs_write(session: tower_sessions_015::Session) -> String {
    let n: u64 = session.get("n").await.ok().flatten().unwrap_or(0) + 1;
    let _ = session.insert("n", n).await;
    n.to_string()
}

fn ours() -> Router {
    let layer =
        tower_turnstile::session::SessionLayer::new(tower_turnstile::session::MemoryStore::new())
            .with_secure(false);
    Router::new()
        .route("/read", get(ours_read))
        .route("/write", get(ours_write))
        .layer(layer)
}

fn theirs() -> Router {
    let layer =
        tower_sessions_015::SessionManagerLayer::new(tower_sessions_015::MemoryStore::default())
            .with_secure(false);
    Router::new()
        .route("/read", get(theirs_read))
        .route("/write", get(theirs_write))
        .layer(layer)
}

fn bare() -> Router {
    Router::new()
        .route("/read", get(|| async { "0" }))
        .route("/write", get(|| async { "1" }))
}

/// A session holding a counter, and its cookie.
fn session_cookie(runtime: &Runtime, app: &Router) -> String {
    runtime.block_on(async {
        let (cookie, body) = call(app, "/write", None).await;
        assert_eq!(body, "1");
        let cookie = cookie.expect("the first write sets a cookie");
        // Both layers must see the session again through the cookie.
        assert_eq!(call(app, "/read", Some(&cookie)).await.1, "1");
        cookie
    })
}

fn bench(c: &mut Criterion, runtime: &Runtime) {
    let contenders: [(&str, Router); 3] = [
        ("tower-turnstile", ours()),
        ("tower-sessions", theirs()),
        ("bare", bare()),
    ];
    for path in ["read", "write"] {
        let mut group = c.benchmark_group(format!("session/{path}"));
        for (name, app) in &contenders {
            let cookie = if *name == "bare" {
                String::new()
            } else {
                session_cookie(runtime, app)
            };
            let uri = format!("/{path}");
            group.bench_function(*name, |b| {
                b.to_async(runtime).iter(|| async {
                    let reply = call(app, &uri, Some(&cookie)).await;
                    black_box(reply)
                });
            });
        }
        group.finish();
    }
}

fn main() {
    common::start();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut criterion = Criterion::default().configure_from_args();
    bench(&mut criterion, &runtime);
    criterion.final_summary();
    for path in ["read", "write"] {
        let group = format!("session/{path}");
        let ours = estimate(&group, "tower-turnstile");
        let theirs = estimate(&group, "tower-sessions");
        let bare = estimate(&group, "bare");
        if let (Some(ours), Some(theirs), Some(bare)) = (ours, theirs, bare) {
            println!(
                "ratio {path:<5}: tower-turnstile / tower-sessions = {:.2}  ({ours:.0} ns vs {theirs:.0} ns; bare router {bare:.0} ns)",
                ours / theirs
            );
        }
    }
}
