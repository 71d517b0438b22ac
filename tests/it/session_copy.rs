//! The instance's coherent local copy of sessions, on real `redis-server`s: reads of a held
//! session cost no round trip, a write with a held copy is one, and nothing stale is served
//! after another instance's change, a destroy, a flush or a reconnect.

use std::{
    collections::BTreeMap,
    future::Future,
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use tower_turnstile::{
    backend::RedisBackend,
    session::{Lifetime, Patch, Record, RedisStore, SessionKey, SessionStore, Written},
    tenant::Tenant,
};

use crate::support::{Monitor, RedisServer};

/// One instance's store: its own backend (connection, breaker, copy), as a separate process
/// would have.
fn instance(server: &RedisServer) -> RedisStore {
    RedisStore::new(RedisBackend::new(&server.url()).unwrap())
        .with_key_prefix("copy:")
        .with_local_copy(RedisStore::SUGGESTED_COPY_CAPACITY)
}

fn random_key() -> SessionKey {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).unwrap();
    SessionKey::from_hash(&Tenant::default(), &URL_SAFE_NO_PAD.encode(bytes)).unwrap()
}

fn record(pairs: &[(&str, &str)]) -> Record {
    let mut record = Record::new(Duration::from_secs(3600), Duration::from_secs(24 * 3600));
    record.data = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect::<BTreeMap<_, _>>();
    record
}

fn set(key: &str, value: &str) -> Patch {
    let mut patch = Patch::default();
    patch.set.push((key.to_owned(), value.to_owned()));
    patch
}

fn round_trips(store: &RedisStore) -> u64 {
    store.backend().status().round_trips
}

async fn value(store: &RedisStore, key: &SessionKey, field: &str) -> Option<String> {
    let record = store.load(key).await.unwrap()?;
    record.data.get(field).cloned()
}

/// The names of the commands `monitor` saw since it was last asked.
fn command_names(monitor: &Monitor) -> Vec<String> {
    monitor
        .take()
        .iter()
        .map(|line| line.split(' ').next().unwrap().to_owned())
        .collect()
}

/// Polls `until` for up to 2 s: an invalidation travels on its own connection.
async fn eventually<F, Fut>(what: &str, mut until: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(2);
    while !until().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn reads_of_a_held_session_cost_no_round_trip() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = instance(&server);
    let key = random_key();
    store.create(&key, &record(&[("n", "1")])).await.unwrap();
    assert_eq!(value(&store, &key, "n").await.as_deref(), Some("1"));
    let before = round_trips(&store);
    let monitor = server.monitor();
    for _ in 0..100 {
        assert_eq!(value(&store, &key, "n").await.as_deref(), Some("1"));
    }
    assert_eq!(
        round_trips(&store),
        before,
        "every read was served from the copy"
    );
    assert!(monitor.take().is_empty(), "no command reached Redis");
    // The creation turned tracking on first, and its copy served even the first read.
    let stats = store.local_copy_stats();
    assert_eq!((stats.hits, stats.misses), (101, 0), "{stats:?}");
}

#[tokio::test]
async fn a_write_with_a_held_copy_is_one_round_trip_of_few_commands() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = instance(&server);
    let key = random_key();
    store.create(&key, &record(&[("n", "1")])).await.unwrap();
    store.load(&key).await.unwrap().unwrap();
    let monitor = server.monitor();
    let before = round_trips(&store);
    assert_eq!(
        store.update(&key, &set("n", "2")).await.unwrap(),
        Written::Applied
    );
    assert_eq!(round_trips(&store), before + 1);
    let names = command_names(&monitor);
    // The inactivity expiry was just restarted (by the creation): the write leaves it.
    assert_eq!(names, ["MULTI", "HSET", "HEXISTS", "EXEC"]);
    // The copy took the write: the next read is served from it, and is the new value.
    assert_eq!(value(&store, &key, "n").await.as_deref(), Some("2"));
    assert_eq!(round_trips(&store), before + 1);
    // And Redis has it.
    let fresh = instance(&server);
    assert_eq!(value(&fresh, &key, "n").await.as_deref(), Some("2"));
}

/// What a save leaves in the session's hash, with a held copy and without: the fields set,
/// the field removed, each with its write time, and the new expiry settings with theirs.
#[tokio::test]
async fn a_save_writes_each_field_with_its_write_time() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let held = instance(&server);
    let unheld =
        RedisStore::new(RedisBackend::new(&server.url()).unwrap()).with_key_prefix("copy:");
    for (store, copy) in [(&held, true), (&unheld, false)] {
        let key = random_key();
        let session = record(&[("kept", "0"), ("n", "1"), ("gone", "2")]);
        store.create(&key, &session).await.unwrap();
        store.load(&key).await.unwrap().unwrap();
        let before = round_trips(store);
        let mut patch = set("n", "\"two\"");
        patch.set.push(("new".to_owned(), "[3]".to_owned()));
        patch.remove.push("gone".to_owned());
        patch.lifetime = Some(Lifetime::new(
            Duration::from_secs(1800),
            session.expires_at - 1000,
            true,
        ));
        let written = unix_now_ms();
        assert_eq!(store.update(&key, &patch).await.unwrap(), Written::Applied);
        if copy {
            assert_eq!(round_trips(store), before + 1, "one round trip with a copy");
        }
        let hash: BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg(format!("copy:default:session:{}", key.hash()))
            .query_async(&mut conn)
            .await
            .unwrap();
        let field = |name: &str| hash.get(name).map(String::as_str);
        assert_eq!(field("d:kept"), Some("0"));
        assert_eq!(field("d:n"), Some("\"two\""));
        assert_eq!(field("d:new"), Some("[3]"));
        assert_eq!(field("d:gone"), None);
        assert_eq!(field("m:idle"), Some("1800000"));
        assert_eq!(
            field("m:abs"),
            Some(&*(session.expires_at - 1000).to_string())
        );
        assert_eq!(field("m:persist"), Some("1"));
        for name in [
            "t:d:n",
            "t:d:new",
            "t:d:gone",
            "t:m:idle",
            "t:m:abs",
            "t:m:persist",
        ] {
            let at: u64 = field(name)
                .unwrap_or_else(|| panic!("{name} in {hash:?}"))
                .parse()
                .unwrap();
            assert!(at >= written && at < written + 60_000, "{name} = {at}");
        }
        assert_eq!(
            field("t:d:kept"),
            None,
            "an unchanged field keeps no write time"
        );
        // Read back, from the copy or from Redis, the session is the patched one.
        let read = store.load(&key).await.unwrap().unwrap();
        let data: Vec<_> = read
            .data
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(data, [("kept", "0"), ("n", "\"two\""), ("new", "[3]")]);
        assert_eq!(read.inactivity_timeout, Duration::from_secs(1800));
        assert!(read.persistent);
    }
}

fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// An ACL that refuses `CLIENT TRACKING`: creations and reads still work, every read goes to
/// Redis, and no copy is served.
#[tokio::test]
async fn a_refused_client_tracking_leaves_the_copy_off_and_sessions_working() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    server.cli(&[
        "ACL", "SETUSER", "limited", "on", ">pw", "~*", "&*", "+@all", "-client",
    ]);
    let url = format!("redis://limited:pw@127.0.0.1:{}/", server.port());
    let store = RedisStore::new(RedisBackend::new(&url).unwrap())
        .with_key_prefix("copy:")
        .with_local_copy(RedisStore::SUGGESTED_COPY_CAPACITY);
    let key = random_key();
    store.create(&key, &record(&[("n", "1")])).await.unwrap();
    for _ in 0..3 {
        assert_eq!(value(&store, &key, "n").await.as_deref(), Some("1"));
    }
    assert_eq!(
        store.update(&key, &set("n", "2")).await.unwrap(),
        Written::Applied
    );
    assert_eq!(value(&store, &key, "n").await.as_deref(), Some("2"));
    let stats = store.local_copy_stats();
    assert_eq!((stats.hits, stats.entries), (0, 0), "{stats:?}");
}

/// Another instance's write drops the copy, and once the push has arrived the change is what
/// this instance serves: 1000 rounds. (Between the write's acknowledgment and the push's
/// arrival the copy can still be served: see "The local copy" on `RedisStore`, and the
/// window measured in `BENCHMARKS.md`.)
#[tokio::test]
async fn another_instance_s_write_drops_the_copy() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (a, b) = (instance(&server), instance(&server));
    let key = random_key();
    a.create(&key, &record(&[("n", "0")])).await.unwrap();
    for round in 1..=1000 {
        // B holds a current copy; A changes the session.
        assert!(b.load(&key).await.unwrap().is_some());
        let n = round.to_string();
        assert_eq!(
            a.update(&key, &set("n", &n)).await.unwrap(),
            Written::Applied
        );
        eventually("B's copy is dropped", || async {
            b.local_copy_stats().invalidations >= round
        })
        .await;
        assert_eq!(value(&b, &key, "n").await, Some(n), "round {round}");
    }
}

#[tokio::test]
async fn a_change_by_any_client_is_never_served_stale() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = instance(&server);
    let key = random_key();
    store
        .create(&key, &record(&[("n", "\"1\"")]))
        .await
        .unwrap();
    store.load(&key).await.unwrap().unwrap();
    let redis_key = format!("copy:default:session:{}", key.hash());
    server.cli(&["HSET", &redis_key, "d:n", "\"changed\""]);
    eventually("the copy is dropped", || async {
        store.local_copy_stats().invalidations == 1
    })
    .await;
    assert_eq!(
        value(&store, &key, "n").await.as_deref(),
        Some("\"changed\"")
    );
}

#[tokio::test]
async fn a_destroy_on_one_instance_ends_the_session_on_the_other() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (a, b) = (instance(&server), instance(&server));
    let key = random_key();
    a.create(&key, &record(&[("n", "1")])).await.unwrap();
    assert!(a.load(&key).await.unwrap().is_some());
    assert!(b.load(&key).await.unwrap().is_some());
    a.delete(&key, None).await.unwrap();
    // The destroyer's own copy is gone at once (its delete raises no invalidation for it).
    assert!(a.load(&key).await.unwrap().is_none());
    eventually("B's copy is dropped", || async {
        b.local_copy_stats().invalidations == 1
    })
    .await;
    assert!(b.load(&key).await.unwrap().is_none());
    // A write from B finds no session, and does not bring it back.
    assert_eq!(
        b.update(&key, &set("n", "2")).await.unwrap(),
        Written::Missing
    );
    assert!(a.load(&key).await.unwrap().is_none());
}

#[tokio::test]
async fn a_flush_unconfirms_every_copy() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = instance(&server);
    let key = random_key();
    store.create(&key, &record(&[("n", "1")])).await.unwrap();
    store.load(&key).await.unwrap().unwrap();
    server.cli(&["FLUSHALL"]);
    eventually("the flush is heard", || async {
        store.load(&key).await.unwrap().is_none()
    })
    .await;
}

#[tokio::test]
async fn a_reconnect_unconfirms_every_copy() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = instance(&server);
    let key = random_key();
    store.create(&key, &record(&[("n", "1")])).await.unwrap();
    store.load(&key).await.unwrap().unwrap();
    // Every client connection is closed; while it was gone, another client changed the
    // session without this instance being told.
    server.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
    let redis_key = format!("copy:default:session:{}", key.hash());
    server.cli(&["HSET", &redis_key, "d:n", "2"]);
    eventually("the lost connection is heard", || async {
        value(&store, &key, "n").await.as_deref() == Some("2")
    })
    .await;
    // Confirmed again on the new connection: served from the copy, and dropped on a change.
    let before = round_trips(&store);
    assert_eq!(value(&store, &key, "n").await.as_deref(), Some("2"));
    assert_eq!(round_trips(&store), before);
    changed_elsewhere(&server, &store, &key, "3").await;
}

/// `CLIENT TRACKING` is turned on once per connection: a read from Redis after that (here,
/// after another client's change dropped the copy) sends the read alone.
#[tokio::test]
async fn tracking_is_turned_on_once_per_connection() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = instance(&server);
    let key = random_key();
    store.create(&key, &record(&[("n", "1")])).await.unwrap();
    changed_elsewhere(&server, &store, &key, "2").await;
    let redis_key = format!("copy:default:session:{}", key.hash());
    let monitor = server.monitor();
    server.cli(&["HSET", &redis_key, "d:n", "3"]);
    eventually("the change is heard", || async {
        store.local_copy_stats().invalidations >= 2
    })
    .await;
    command_names(&monitor);
    assert_eq!(value(&store, &key, "n").await.as_deref(), Some("3"));
    // (The backend's liveness `PING`, should one fall in between, is not the read's.)
    let mut names = command_names(&monitor);
    names.retain(|name| name != "PING");
    assert_eq!(names, ["TIME", "HGETALL", "PTTL"]);
}

#[tokio::test]
async fn the_inactivity_expiry_slides_only_when_due() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = instance(&server);
    let key = random_key();
    // A sixteenth of 3.2 s is 200 ms.
    let mut session = record(&[("n", "1")]);
    session.inactivity_timeout = Duration::from_millis(3200);
    store.create(&key, &session).await.unwrap();
    store.load(&key).await.unwrap().unwrap();
    let monitor = server.monitor();
    for _ in 0..5 {
        store.load(&key).await.unwrap().unwrap();
    }
    assert!(monitor.take().is_empty(), "no slide within a sixteenth");
    tokio::time::sleep(Duration::from_millis(400)).await;
    store.load(&key).await.unwrap().unwrap();
    let names = command_names(&monitor);
    assert_eq!(names, ["MULTI", "PEXPIRE", "PTTL", "EXEC"]);
    let redis_key = format!("copy:default:session:{}", key.hash());
    let ttl: u64 = server.cli(&["PTTL", &redis_key]).trim().parse().unwrap();
    assert!(ttl > 3000, "slid to the full timeout: {ttl}");
    // The slide kept this instance told of changes.
    changed_elsewhere(&server, &store, &key, "2").await;
}

#[tokio::test]
async fn a_held_write_restarts_the_expiry_only_when_due_or_asked() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = instance(&server);
    let key = random_key();
    let redis_key = format!("copy:default:session:{}", key.hash());
    // A sixteenth of 3.2 s is 200 ms.
    let mut session = record(&[("n", "1")]);
    session.inactivity_timeout = Duration::from_millis(3200);
    store.create(&key, &session).await.unwrap();
    store.load(&key).await.unwrap().unwrap();
    let ttl =
        |server: &RedisServer| -> u64 { server.cli(&["PTTL", &redis_key]).trim().parse().unwrap() };
    // The store's commands (the test's own `PTTL`s left out).
    let commands = |monitor: &Monitor| -> Vec<String> {
        let mut names = command_names(monitor);
        names.retain(|name| name != "PTTL");
        names
    };
    let monitor = server.monitor();
    store.update(&key, &set("n", "2")).await.unwrap();
    assert_eq!(commands(&monitor), ["MULTI", "HSET", "HEXISTS", "EXEC"]);
    // Past a sixteenth, the write restarts it, in the same transaction.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(ttl(&server) < 3000);
    store.update(&key, &set("n", "3")).await.unwrap();
    assert_eq!(
        commands(&monitor),
        ["MULTI", "HSET", "PEXPIRE", "HEXISTS", "EXEC"]
    );
    assert!(ttl(&server) > 3000, "slid to the full timeout");
    // Right after, it is not due again: the copy knows the new end.
    store.update(&key, &set("n", "4")).await.unwrap();
    assert_eq!(commands(&monitor), ["MULTI", "HSET", "HEXISTS", "EXEC"]);
    // A change of the expiry settings always sets the TTL, at once.
    let mut patch = set("n", "5");
    patch.lifetime = Some(Lifetime::new(
        Duration::from_millis(1500),
        session.expires_at,
        false,
    ));
    store.update(&key, &patch).await.unwrap();
    assert_eq!(
        commands(&monitor),
        ["MULTI", "HSET", "PEXPIRE", "HEXISTS", "EXEC"]
    );
    assert!(ttl(&server) <= 1500, "the new timeout: {}", ttl(&server));
    assert_eq!(value(&store, &key, "n").await.as_deref(), Some("5"));
}

/// Another client sets the session's field `n` to `n` in Redis; `store` hears of it and serves
/// the new value.
async fn changed_elsewhere(server: &RedisServer, store: &RedisStore, key: &SessionKey, n: &str) {
    let redis_key = format!("copy:default:session:{}", key.hash());
    server.cli(&["HSET", &redis_key, "d:n", n]);
    eventually("the change is heard", || async {
        value(store, key, "n").await.as_deref() == Some(n)
    })
    .await;
}

#[tokio::test]
async fn a_session_past_its_deadline_is_not_served_from_the_copy() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = instance(&server);
    let key = random_key();
    let mut session = record(&[("n", "1")]);
    session.expires_at = session.created_at + 300;
    store.create(&key, &session).await.unwrap();
    assert!(store.load(&key).await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(store.load(&key).await.unwrap().is_none());
}

#[tokio::test]
async fn the_copy_is_bounded_and_off_by_default() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let small = RedisStore::new(RedisBackend::new(&server.url()).unwrap())
        .with_key_prefix("small:")
        .with_local_copy(10);
    let keys: Vec<SessionKey> = (0..100).map(|_| random_key()).collect();
    for key in &keys {
        small.create(key, &record(&[("n", "1")])).await.unwrap();
        small.load(key).await.unwrap().unwrap();
    }
    let held = small.local_copy_stats().entries;
    assert!(held <= 20, "bounded: {held}");

    let none = RedisStore::new(RedisBackend::new(&server.url()).unwrap()).with_key_prefix("none:");
    let key = random_key();
    none.create(&key, &record(&[("n", "1")])).await.unwrap();
    let before = round_trips(&none);
    for _ in 0..3 {
        none.load(&key).await.unwrap().unwrap();
    }
    assert_eq!(round_trips(&none), before + 3, "every read went to Redis");
}

/// One server instance over real TCP, in a thread and runtime of its own, with its own backend
/// and the store's defaults (no local copy), as a separate process would be.
struct Instance {
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Instance {
    fn start(server: &RedisServer) -> Self {
        let url = server.url();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let store = RedisStore::new(RedisBackend::new(&url).unwrap());
                let app = crate::support::session_app::app(
                    tower_turnstile::session::SessionLayer::new(store),
                );
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        });
        Self {
            addr: addr_rx.recv().unwrap(),
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|stop| stop.send(()));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A client holding one session cookie, sending to whichever instance it is told.
struct Browser {
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Empty<bytes::Bytes>,
    >,
    cookie: Option<String>,
}

impl Browser {
    fn new() -> Self {
        let executor = hyper_util::rt::TokioExecutor::new();
        Self {
            client: hyper_util::client::legacy::Client::builder(executor).build_http(),
            cookie: None,
        }
    }

    async fn send(&mut self, to: &Instance, method: http::Method, path: &str) -> String {
        use http_body_util::BodyExt;
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", to.addr));
        if let Some(cookie) = &self.cookie {
            request = request.header(http::header::COOKIE, cookie);
        }
        let response = self
            .client
            .request(request.body(http_body_util::Empty::new()).unwrap())
            .await
            .expect("the instance answers");
        if let Some(set) = response.headers().get(http::header::SET_COOKIE) {
            let set = set.to_str().unwrap();
            let pair = set.split(';').next().unwrap().to_owned();
            self.cookie = (!set.contains("Max-Age=0")).then_some(pair);
        }
        assert!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8_lossy(&body).into_owned()
    }
}

/// By default (no local copy), a write acknowledged to a client by instance A is what instance
/// B serves that client next, with nothing in between but the client: 1000 rounds, and a
/// logout on A ends the session on B at once.
#[tokio::test]
async fn a_write_acknowledged_by_one_instance_is_what_the_other_serves_next() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (a, b) = (Instance::start(&server), Instance::start(&server));
    let mut browser = Browser::new();
    browser.send(&a, http::Method::POST, "/login/ada").await;
    let mut stale = Vec::new();
    for round in 1..=1000u32 {
        // B holds the session (the first round loads it; later ones were dropped by A's write).
        let seen = browser.send(&b, http::Method::GET, "/get/n").await;
        if round > 1 && seen != format!("\"{}\"", round - 1) {
            stale.push((round, seen));
        }
        browser
            .send(&a, http::Method::POST, &format!("/set/n/{round}"))
            .await;
        let seen = browser.send(&b, http::Method::GET, "/get/n").await;
        if seen != format!("\"{round}\"") {
            stale.push((round, seen));
        }
    }
    assert!(stale.is_empty(), "stale reads: {stale:?}");
    // A logout on A: B, holding the session, serves it as ended at once.
    assert_eq!(browser.send(&b, http::Method::GET, "/user").await, "ada");
    let cookie = browser.cookie.clone();
    browser.send(&a, http::Method::POST, "/destroy").await;
    assert!(browser.cookie.is_none(), "the destroy removed the cookie");
    // A client that kept the old cookie (a stolen copy, a second tab) is anonymous on B.
    browser.cookie = cookie;
    assert_eq!(
        browser.send(&b, http::Method::GET, "/user").await,
        "anonymous"
    );
}
