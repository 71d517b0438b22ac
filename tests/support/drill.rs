//! A load drill for failovers: concurrent clients writing their sessions and spending a rate
//! limit while the test breaks Redis, with a record of every answer.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Router, body::Body, extract::ConnectInfo, routing::get};
use http::{Request, StatusCode};
use tower_turnstile::{
    backend::RedisBackend,
    ratelimit::{Policy, Quota, RateLimitLayer, RedisRateStore},
    session::{FallbackStore, RedisStore, SessionLayer},
};

use super::{
    http::{Client, send},
    session_app::app,
};

/// The session routes on a `FallbackStore` over `backend`, with a 300 ms deadline per round
/// trip, and the store (to flush it and read its counters).
pub fn sessions(backend: &RedisBackend) -> (Router, FallbackStore) {
    let store = FallbackStore::new(
        RedisStore::new(backend.clone()).with_timeout(Duration::from_millis(300)),
    );
    (app(SessionLayer::new(store.clone())), store)
}

/// `GET /` behind a Redis rate limit of `limit` a minute per client address (300 ms deadline),
/// and the layer (to read its fallback counter).
pub fn limited(backend: &RedisBackend, limit: u32) -> (Router, RateLimitLayer) {
    let store = RedisRateStore::new(backend.clone()).with_timeout(Duration::from_millis(300));
    let layer = RateLimitLayer::new(Policy::new("test", Quota::per_minute(limit)).unwrap())
        .with_store(store);
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(layer.clone());
    (app, layer)
}

/// One `GET /` from 198.51.100.1.
pub async fn hit(app: &Router) -> StatusCode {
    let mut request = Request::get("/").body(Body::empty()).unwrap();
    let peer: SocketAddr = "198.51.100.1:40000".parse().unwrap();
    request.extensions_mut().insert(ConnectInfo(peer));
    send(app, request).await.status
}

/// What one client of the drill saw.
#[derive(Debug, Default)]
pub struct ClientRecord {
    /// The cookie of its session, once it has one.
    pub cookie: Option<String>,
    /// The last value of `n` whose write was answered 2xx.
    pub last_written: Option<u64>,
    pub requests: u64,
    pub server_errors: u64,
    pub longest: Duration,
}

/// Every client's record, and the drill's totals.
#[derive(Debug)]
pub struct DrillReport {
    pub clients: Vec<ClientRecord>,
}

impl DrillReport {
    pub fn requests(&self) -> u64 {
        self.clients.iter().map(|c| c.requests).sum()
    }

    pub fn server_errors(&self) -> u64 {
        self.clients.iter().map(|c| c.server_errors).sum()
    }

    pub fn longest(&self) -> Duration {
        self.clients
            .iter()
            .map(|c| c.longest)
            .max()
            .unwrap_or_default()
    }
}

/// Runs `clients` clients until `stop` is set: each writes `n` = 1, 2, 3, ... into its session
/// on `sessions` (`POST /set/n/{n}`) and spends one unit on `limited` (`GET /`) per round.
pub async fn run(
    sessions: Router,
    limited: Router,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> DrillReport {
    let mut tasks = Vec::new();
    for id in 0..clients {
        let (sessions, limited, stop) = (sessions.clone(), limited.clone(), Arc::clone(&stop));
        tasks.push(tokio::spawn(async move {
            let mut record = ClientRecord::default();
            let mut client = Client::new(sessions);
            let peer: SocketAddr = format!("198.51.100.{}:40000", id + 1).parse().unwrap();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let started = Instant::now();
                let reply = client.post(&format!("/set/n/{n}")).await;
                let mut statuses = vec![reply.status];
                if reply.status.is_success() {
                    record.last_written = Some(n);
                }
                let mut request = Request::get("/").body(Body::empty()).unwrap();
                request.extensions_mut().insert(ConnectInfo(peer));
                statuses.push(send(&limited, request).await.status);
                record.longest = record.longest.max(started.elapsed());
                record.requests += 2;
                record.server_errors +=
                    statuses.iter().filter(|s| s.is_server_error()).count() as u64;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            record.cookie = client.cookie.clone();
            record
        }));
    }
    let mut records = Vec::new();
    for task in tasks {
        records.push(task.await.expect("a drill client"));
    }
    DrillReport { clients: records }
}

/// After a drill: the journal drains, no journaled write was superseded or dropped, and every
/// client reads back its last acknowledged write through `app`.
pub async fn assert_nothing_lost(report: &DrillReport, store: &FallbackStore, app: &Router) {
    assert_eq!(
        store.flush(Duration::from_secs(5)).await,
        0,
        "the journal drains"
    );
    let status = store.status();
    eprintln!(
        "  session writes journaled during the outage {}, replayed {}, superseded {}, dropped {}",
        status.journaled, status.replayed, status.superseded, status.dropped
    );
    assert_eq!((status.superseded, status.dropped), (0, 0), "no write lost");
    for record in &report.clients {
        let mut client = client_of(record, app.clone());
        let expected = format!("\"{}\"", record.last_written.expect("a write"));
        assert_eq!(client.get("/get/n").await.body, expected);
    }
}

/// A `Client` with `record`'s cookie, on `app`.
pub fn client_of(record: &ClientRecord, app: Router) -> Client {
    let mut client = Client::new(app);
    client.cookie = record.cookie.clone();
    client
}
