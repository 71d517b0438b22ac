//! Memory under hostile load: a flood of requests with fresh cookies, client addresses and
//! tenants must not grow the process without bound, because every in-memory store is bounded.
//! Alone in its process, so that the process's resident size is the flood's: the drills share a
//! binary, and the test runs itself again in a child process of it.

use std::net::SocketAddr;

use axum::{Router, body::Body, extract::ConnectInfo};
use http::{Request, StatusCode, header};
use tower_turnstile::{
    ratelimit::{MemoryRateStore, Policy, Quota, RateLimitLayer},
    session::{MemoryStore, SessionLayer},
    tenant::{HostSubdomain, TenantLayer},
};

use crate::support::{http::send, session_app::routes};

/// The capacity of every in-memory store in this test.
const CAPACITY: u64 = 1_000;

/// Set in the child process the test runs alone in.
const ALONE: &str = "KEY_FLOOD_ALONE";

/// Runs the test `name` of this module alone, in a new process of this test binary, and fails
/// unless it ran and passed there.
fn run_alone(name: &str) {
    // `module_path!()` starts with the crate's name, which the harness leaves out.
    let module = module_path!().split_once("::").map_or("", |(_, path)| path);
    let output = std::process::Command::new(std::env::current_exe().expect("the test binary"))
        .args(["--exact", &format!("{module}::{name}"), "--nocapture"])
        .env(ALONE, "1")
        .output()
        .expect("the test binary runs");
    eprint!("{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("test result: ok. 1 passed"),
        "{name} alone: {}\n{stdout}",
        output.status
    );
}

/// (current, peak) resident size of this process, in KiB.
fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn stack() -> Router {
    let sessions = SessionLayer::new(
        MemoryStore::builder()
            .max_sessions(CAPACITY)
            .max_users(CAPACITY)
            .build(),
    )
    .with_secure(false);
    let limit = RateLimitLayer::new(Policy::new("per-ip", Quota::per_minute(1_000)).unwrap())
        .with_store(MemoryRateStore::builder().max_keys(CAPACITY).build());
    routes()
        .layer(sessions)
        .layer(limit)
        .layer(TenantLayer::new(HostSubdomain::first_label()))
}

/// Sends `count` requests, each with a fresh random cookie, client address and tenant, each
/// writing a fresh session.
async fn flood(app: &Router, from: u64, count: u64) {
    for n in from..from + count {
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).unwrap();
        let cookie = format!("id={}", hex(&id));
        let mut request = Request::post("/set/k/v")
            .header(header::HOST, format!("t{}.localhost", n % 100_000))
            .header(header::COOKIE, cookie)
            .body(Body::empty())
            .unwrap();
        let peer = SocketAddr::from(([10, (n >> 16) as u8, (n >> 8) as u8, n as u8], 40000));
        request.extensions_mut().insert(ConnectInfo(peer));
        let status = send(app, request).await.status;
        assert!(
            status == StatusCode::OK || status == StatusCode::TOO_MANY_REQUESTS,
            "{status}"
        );
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn a_flood_of_fresh_keys_leaves_memory_bounded() {
    if std::env::var_os(ALONE).is_none() {
        return run_alone("a_flood_of_fresh_keys_leaves_memory_bounded");
    }
    let app = stack();
    // Fill every store to its capacity first: what is measured after is what more keys add.
    flood(&app, 0, CAPACITY).await;
    let (at_capacity, _) = rss_kib();
    flood(&app, CAPACITY, 9 * CAPACITY).await;
    let (at_10x, peak_10x) = rss_kib();
    flood(&app, 10 * CAPACITY, 90 * CAPACITY).await;
    let (at_100x, peak_100x) = rss_kib();
    eprintln!(
        "key flood: RSS {} KiB at capacity ({CAPACITY} keys per store), {} KiB after 10x \
         (peak {}), {} KiB after 100x (peak {})",
        at_capacity, at_10x, peak_10x, at_100x, peak_100x
    );
    // Ten times more keys than at 10x: bounded stores keep the growth to the allocator's
    // slack, far below what 90 000 more sessions, counters and tenants would take if they were
    // all kept (each session alone holds its hashed id, record and index entry).
    assert!(
        peak_100x < peak_10x + 8 * 1024,
        "peak RSS grew from {peak_10x} to {peak_100x} KiB"
    );
}
