//! `FallbackStore` under faults: Redis killed, restarted, stalled, or cut off from one instance
//! while the others still reach it. Every test talks to a real `redis-server`.

use std::time::{Duration, Instant};

use axum::{Router, http::StatusCode};
use tower_turnstile::{
    backend::{BreakerState, RedisBackend},
    session::{FailurePolicy, FallbackStatus, FallbackStore, OutageCopy, RedisStore, SessionLayer},
};

use crate::support::{
    RedisServer,
    http::Client,
    proxy::Proxy,
    session_app::{app, event, fast_failing_backend},
};

/// One instance: its own connection (through `url`), breaker, local copy and journal.
struct Instance {
    app: Router,
    store: FallbackStore,
    backend: RedisBackend,
}

/// Which copy an outage serves from: the fallback's own, kept beside the store, or the
/// `RedisStore`'s (`with_restore_copy`), the one copy (`OutageCopy::Primary`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kept {
    Own,
    Primary,
}

impl Kept {
    fn store(self, backend: &RedisBackend) -> FallbackStore {
        self.fallback(RedisStore::new(backend.clone()).with_timeout(Duration::from_millis(200)))
    }

    fn fallback(self, redis: RedisStore) -> FallbackStore {
        match self {
            Self::Own => FallbackStore::new(redis),
            Self::Primary => {
                FallbackStore::builder(redis.with_restore_copy(RedisStore::SUGGESTED_COPY_CAPACITY))
                    .outage_copy(OutageCopy::Primary)
                    .build()
            }
        }
    }
}

impl Instance {
    fn new(url: &str) -> Self {
        Self::with_store(url, FallbackStore::new)
    }

    fn kept(url: &str, kept: Kept) -> Self {
        Self::with_store(url, |redis| kept.fallback(redis))
    }

    fn with_store(url: &str, build: impl FnOnce(RedisStore) -> FallbackStore) -> Self {
        Self::with_layer(url, build, |layer| layer)
    }

    fn with_layer(
        url: &str,
        build: impl FnOnce(RedisStore) -> FallbackStore,
        configure: impl FnOnce(SessionLayer) -> SessionLayer,
    ) -> Self {
        let backend = fast_failing_backend(url);
        let store =
            build(RedisStore::new(backend.clone()).with_timeout(Duration::from_millis(200)));
        let layer = configure(
            SessionLayer::new(store.clone())
                .with_failure_policy(FailurePolicy::fail_closed_on_write()),
        );
        Self {
            app: app(layer),
            store,
            backend,
        }
    }

    fn client(&self) -> Client {
        Client::new(self.app.clone())
    }

    /// Waits until every journaled write is replayed and the fallback is over; returns how long
    /// that took.
    async fn settled(&self) -> Duration {
        let start = Instant::now();
        loop {
            let status = self.store.status();
            if status.journal_len == 0 && !status.active {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "replay did not finish: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn status(&self) -> FallbackStatus {
        self.store.status()
    }
}

/// How many session hashes Redis holds.
fn sessions_in(server: &RedisServer) -> usize {
    server
        .cli(&["--scan", "--pattern", "turnstile:*:session:*"])
        .lines()
        .count()
}

/// One Redis, instance `a` behind a proxy that can cut it off, instance `b` straight to it.
async fn cut_off_pair() -> Option<(RedisServer, Proxy, Instance, Instance)> {
    cut_off_pair_keeping(Kept::Own).await
}

async fn cut_off_pair_keeping(kept: Kept) -> Option<(RedisServer, Proxy, Instance, Instance)> {
    let server = RedisServer::start()?;
    let proxy = Proxy::start(server.port()).await;
    let a = Instance::kept(&proxy.url(), kept);
    let b = Instance::kept(&server.url(), kept);
    Some((server, proxy, a, b))
}

fn ok(reply: &crate::support::http::Reply, body: &str) {
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::OK, body),
        "{reply:?}"
    );
}

/// Redis killed and restarted (with persistence) under two instances: every session served
/// before the outage keeps working on the instance that held it, writes during the outage are
/// answered and kept, new visitors get sessions, and after Redis returns all of it is in Redis,
/// readable through the other instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_costs_no_session_and_no_write() {
    outage_costs_no_session_and_no_write_keeping(Kept::Own).await;
}

/// The same, with the store's copy as the one copy the outage serves from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_costs_no_session_and_no_write_with_one_copy() {
    outage_costs_no_session_and_no_write_keeping(Kept::Primary).await;
}

async fn outage_costs_no_session_and_no_write_keeping(kept: Kept) {
    let Some(mut server) = RedisServer::start_persistent() else {
        return;
    };
    let (a, b) = (
        Instance::kept(&server.url(), kept),
        Instance::kept(&server.url(), kept),
    );
    let mut on_a = a.client();
    let mut on_b = b.client();
    for c in [&mut on_a, &mut on_b] {
        ok(&c.post("/bump/n").await, "1");
        c.post("/login/alice").await;
        ok(&c.get("/user").await, "alice");
    }

    server.stop();
    // Reads: the sessions each instance served are still there, user included.
    for c in [&mut on_a, &mut on_b] {
        ok(&c.get("/user").await, "alice");
        ok(&c.get("/get/n").await, "1");
        ok(&c.post("/bump/n").await, "2");
        ok(&c.post("/set/during/outage").await, "ok");
    }
    // A new visitor gets a session that lives locally until the replay.
    let mut newcomer = a.client();
    let reply = newcomer.post("/set/fresh/1").await;
    ok(&reply, "ok");
    assert_eq!(event(&reply), Some("Created"));
    ok(&newcomer.get("/get/fresh").await, "\"1\"");
    // A session this instance never saw is unavailable: its write is refused, not faked.
    let mut stranger = on_a.on(b.app.clone());
    assert_eq!(
        stranger.post("/bump/n").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        stranger.get("/get/n").await.status,
        StatusCode::OK,
        "reads never 5xx"
    );

    let journaled = a.status().journal_len + b.status().journal_len;
    assert!(journaled >= 5, "writes were journaled: {journaled}");
    assert!(a.status().active && b.status().active);

    server.restart();
    let back = Instant::now();
    let (took_a, took_b) = tokio::join!(a.settled(), b.settled());
    eprintln!(
        "outage drill: {journaled} writes journaled; replayed and back on Redis after {:?} / {:?}",
        took_a, took_b
    );
    // Back to healthy without anyone asking for health: the background probe did it.
    for instance in [&a, &b] {
        while !instance.backend.status().healthy {
            assert!(back.elapsed() < Duration::from_secs(5), "not healthy again");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let (sa, sb) = (a.status(), b.status());
    assert_eq!(
        (sa.dropped, sb.dropped, sa.superseded, sb.superseded),
        (0, 0, 0, 0)
    );

    // Everything is in Redis now: read it through the other instance.
    let mut a_on_b = on_a.on(b.app.clone());
    let mut b_on_a = on_b.on(a.app.clone());
    for c in [&mut a_on_b, &mut b_on_a] {
        ok(&c.get("/user").await, "alice");
        ok(&c.get("/get/n").await, "2");
        ok(&c.get("/get/during").await, "\"outage\"");
    }
    ok(&newcomer.on(b.app.clone()).get("/get/fresh").await, "\"1\"");
    ok(&a_on_b.get("/sessions").await, "2");
}

/// `FailurePolicy::with_restart_when_unavailable`: during an outage, a write with a session this instance never
/// saw (served elsewhere, or a forged id) starts a new session instead of a `503`; the old one
/// stays in Redis as it was, and the new one is there after the replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_during_an_outage_gets_a_new_session_when_configured() {
    let Some(mut server) = RedisServer::start_persistent() else {
        return;
    };
    let a = Instance::new(&server.url());
    let b = Instance::with_layer(&server.url(), FallbackStore::new, |layer| {
        layer.with_failure_policy(
            FailurePolicy::fail_closed_on_write().with_restart_when_unavailable(true),
        )
    });
    let mut on_a = a.client();
    ok(&on_a.post("/bump/n").await, "1");
    ok(&on_a.post("/bump/n").await, "2");

    server.stop();
    let mut stranger = on_a.on(b.app.clone());
    let reply = stranger.get("/get/n").await;
    assert_eq!(
        (reply.status, event(&reply)),
        (StatusCode::OK, None),
        "{reply:?}"
    );
    let reply = stranger.post("/bump/n").await;
    ok(&reply, "1");
    assert_eq!(event(&reply), Some("Restarted"));
    assert!(reply.set_cookie().is_some(), "a new cookie: {reply:?}");
    ok(&stranger.get("/get/n").await, "1");
    // A removal alone starts nothing: no new session, and the cookie is left alone.
    let mut remover = on_a.on(b.app.clone());
    let reply = remover.post("/remove/n").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}");
    assert_eq!(reply.set_cookie(), None);
    // A well-formed id that no one issued: a fresh session too.
    let mut forger = b.client();
    forger.cookie = Some(format!("id={}", "A".repeat(22)));
    let reply = forger.post("/set/k/v").await;
    ok(&reply, "ok");
    assert_eq!(event(&reply), Some("Restarted"));

    server.restart();
    b.settled().await;
    assert_eq!((b.status().dropped, b.status().superseded), (0, 0));
    let fresh = Instance::new(&server.url());
    ok(&on_a.on(fresh.app.clone()).get("/get/n").await, "2");
    ok(&stranger.on(fresh.app.clone()).get("/get/n").await, "1");
    ok(&forger.on(fresh.app.clone()).get("/get/k").await, "\"v\"");
}

/// One instance cut off from Redis while the other still reaches it: the cut-off instance's
/// journaled writes never bring back a session destroyed meanwhile in Redis, and never
/// overwrite a field written in Redis after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_never_resurrects_and_never_overwrites_newer_writes() {
    let Some((server, proxy, a, b)) = cut_off_pair().await else {
        return;
    };

    let mut kept = a.client();
    ok(&kept.post("/set/x/before").await, "ok");
    let mut doomed = a.client();
    ok(&doomed.post("/set/x/before").await, "ok");
    doomed.post("/login/bob").await;

    proxy.cut().await;
    // On the cut-off instance: writes to both sessions, journaled.
    ok(&kept.post("/set/x/outage").await, "ok");
    ok(&kept.post("/set/only/outage").await, "ok");
    ok(&kept.post("/remove/gone").await, "");
    ok(&doomed.post("/set/y/outage").await, "ok");
    ok(&doomed.post("/login/bob").await, "");
    tokio::time::sleep(Duration::from_millis(5)).await;
    // On the other instance, later: a newer write of x, and the end of the doomed session.
    ok(&kept.on(b.app.clone()).post("/set/x/newer").await, "ok");
    let mut doomed_on_b = Client::new(b.app.clone());
    doomed_on_b.cookie = doomed.cookie.clone();
    // The login during the outage moved the session to a new id only A knows; end bob's
    // sessions from B (the old id is what Redis has).
    let mut bob = Client::new(b.app.clone());
    bob.post("/login/bob").await;
    ok(&bob.post("/logout-all").await, "2");

    proxy.heal();
    a.settled().await;
    let status = a.status();
    assert!(
        status.superseded >= 1,
        "the destroyed session was not replayed: {status:?}"
    );
    assert_eq!(status.dropped, 0);

    let mut kept_on_b = kept.on(b.app.clone());
    ok(&kept_on_b.get("/get/x").await, "\"newer\"");
    ok(&kept_on_b.get("/get/only").await, "\"outage\"");
    // The doomed session stays dead everywhere, under its old id and its new one.
    doomed_on_b.cookie = doomed.cookie.clone();
    ok(&doomed_on_b.get("/user").await, "anonymous");
    ok(&doomed_on_b.get("/get/y").await, "none");
    ok(&doomed.get("/user").await, "anonymous");
    assert_eq!(sessions_in(&server), 1, "only the kept session is in Redis");
}

/// A login, an id change and a destroy made while cut off reach Redis in order: the old ids
/// are dead, the new one works on the other instance, bound to its user and indexed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_and_destroys_during_an_outage_are_replayed() {
    logins_and_destroys_during_an_outage_are_replayed_keeping(Kept::Own).await;
}

/// The same, with the store's copy as the one copy the outage serves from: a session
/// destroyed during the outage never comes back from that copy either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_and_destroys_during_an_outage_are_replayed_with_one_copy() {
    logins_and_destroys_during_an_outage_are_replayed_keeping(Kept::Primary).await;
}

async fn logins_and_destroys_during_an_outage_are_replayed_keeping(kept: Kept) {
    let Some((server, proxy, a, b)) = cut_off_pair_keeping(kept).await else {
        return;
    };

    let mut c = a.client();
    ok(&c.post("/bump/n").await, "1");
    let before_login = c.cookie.clone().unwrap();
    let mut leaving = a.client();
    ok(&leaving.post("/set/a/1").await, "ok");
    let leaving_cookie = leaving.cookie.clone();

    proxy.cut().await;
    c.post("/login/carol").await;
    ok(&c.post("/bump/n").await, "2");
    c.post("/cycle").await;
    ok(&c.get("/user").await, "carol");
    leaving.post("/destroy").await;
    ok(&leaving.get("/get/a").await, "none");
    // A session created and destroyed within the outage.
    let mut brief = a.client();
    brief.post("/set/b/1").await;
    brief.post("/destroy").await;

    proxy.heal();
    a.settled().await;
    assert_eq!(a.status().superseded, 0, "{:?}", a.status());

    let mut on_b = c.on(b.app.clone());
    ok(&on_b.get("/user").await, "carol");
    ok(&on_b.get("/get/n").await, "2");
    ok(&on_b.get("/sessions").await, "1");
    let mut old = Client::new(b.app.clone());
    old.cookie = Some(before_login);
    ok(&old.get("/get/n").await, "none");
    let mut gone = Client::new(b.app.clone());
    gone.cookie = leaving_cookie;
    ok(&gone.get("/get/a").await, "none");
    assert_eq!(sessions_in(&server), 1, "only carol's session is in Redis");
}

/// A journal that is full refuses further writes (the layer answers `503`), counts them, and
/// loses nothing it accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_journal_refuses_writes_and_counts_them() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let proxy = Proxy::start(server.port()).await;
    let a = Instance::with_store(&proxy.url(), |redis| {
        FallbackStore::builder(redis).max_journal(2).build()
    });
    let mut c = a.client();
    ok(&c.post("/set/k/0").await, "ok");

    proxy.cut().await;
    ok(&c.post("/set/k/1").await, "ok");
    ok(&c.post("/set/k/2").await, "ok");
    let refused = c.post("/set/k/3").await;
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{refused:?}"
    );
    assert_eq!(
        refused.headers.get("x-session-unavailable").unwrap(),
        "WriteLost",
        "the refusal says why in its extensions"
    );
    assert_eq!(a.status().dropped, 1);
    assert_eq!(a.status().journal_len, 2);

    proxy.heal();
    a.settled().await;
    ok(&c.get("/get/k").await, "\"2\"");
    assert_eq!(a.status().replayed, 2);
}

/// Redis frozen (SIGSTOP) under concurrent requests: each request is answered within the
/// deadline while the breaker is still closed, at once after it opens, and none fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_costs_at_most_the_deadline() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let a = Instance::new(&server.url());
    let mut clients = Vec::new();
    for _ in 0..8 {
        let mut c = a.client();
        ok(&c.post("/bump/n").await, "1");
        clients.push(c);
    }

    let mut blind = a.client();
    ok(&blind.post("/set/x/0").await, "ok");

    server.pause();
    // Blind writes go to Redis first: the first one waits out its deadline, which (with the
    // connection being re-made) opens the breaker; the rest are journaled at once, in order.
    for value in 1..=3 {
        ok(&blind.post(&format!("/set/x/{value}")).await, "ok");
    }
    let mut tasks = Vec::new();
    for mut c in clients {
        tasks.push(tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            for i in 2..12u64 {
                let start = Instant::now();
                let reply = c.post("/bump/n").await;
                worst = worst.max(start.elapsed());
                assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
                assert_eq!(reply.body, i.to_string());
            }
            (worst, c)
        }));
    }
    let mut worst = Duration::ZERO;
    let mut clients = Vec::new();
    for task in tasks {
        let (slowest, client) = task.await.unwrap();
        worst = worst.max(slowest);
        clients.push(client);
    }
    eprintln!("stalled Redis: worst request {worst:?} (deadline 200 ms per round trip)");
    // A request costs at most its two round trips' deadlines (read, then write).
    assert!(worst < Duration::from_millis(2 * 200 + 600), "{worst:?}");
    assert!(a.status().active);
    let breaker = a.backend.status();
    assert_ne!(
        breaker.state,
        BreakerState::Closed,
        "opened after 2 timeouts: {breaker:?}"
    );

    // Thawed: the journal is replayed in order, the last write of each field wins.
    server.resume();
    a.settled().await;
    let other = Instance::new(&server.url());
    for c in &clients {
        ok(&c.on(other.app.clone()).get("/get/n").await, "11");
    }
    ok(&blind.on(other.app.clone()).get("/get/x").await, "\"3\"");
}

/// `replay.lua` on its own, as Redis runs it: replaying a write twice leaves the same hash, a
/// gone session stays gone, and a write older than Redis's copy of a field is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replay_script_is_idempotent_and_never_resurrects() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let script = redis::Script::new(include_str!("../../src/session/store/redis/lua/replay.lua"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let key = "turnstile:default:session:replay-test";
    let _: () = redis::cmd("HSET")
        .arg(key)
        .arg(&["m:tenant", "default", "m:idle", "3600000"])
        .arg("m:created")
        .arg(now - 1000)
        .arg("m:abs")
        .arg(now + 3_600_000)
        .arg(&["d:a", "1", "d:c", "0", "d:late", "redis"])
        .arg("t:d:late")
        .arg(now + 500)
        .query_async(&mut conn)
        .await
        .unwrap();
    let hash = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        async move {
            let fields: std::collections::BTreeMap<String, String> = redis::cmd("HGETALL")
                .arg(key)
                .query_async(&mut conn)
                .await
                .unwrap();
            fields
        }
    };
    // A journaled write made at `now`: sets a and b and late, removes c.
    let mut patch = script.key(key);
    patch
        .arg("patch")
        .arg(now)
        .arg(0)
        .arg(3)
        .arg(1)
        .arg(&["d:a", "2", "d:b", "3", "d:late", "journal", "d:c"]);
    let applied: i64 = patch.invoke_async(&mut conn).await.unwrap();
    assert_eq!(applied, 1);
    let once = hash(&mut conn).await;
    assert_eq!(once["d:a"], "2");
    assert_eq!(once["d:b"], "3");
    assert!(!once.contains_key("d:c"), "{once:?}");
    assert_eq!(
        once["d:late"], "redis",
        "Redis's newer write of the field is kept"
    );
    let again: i64 = patch.invoke_async(&mut conn).await.unwrap();
    assert_eq!(again, 1);
    assert_eq!(
        hash(&mut conn).await,
        once,
        "a second replay changes nothing"
    );

    // An older journaled write of a field written since is skipped.
    let mut older = script.key(key);
    older
        .arg("patch")
        .arg(now - 10)
        .arg(0)
        .arg(1)
        .arg(0)
        .arg(&["d:a", "stale"]);
    let _: i64 = older.invoke_async(&mut conn).await.unwrap();
    assert_eq!(hash(&mut conn).await["d:a"], "2");

    // A patch of a session gone from Redis brings nothing back.
    let gone = "turnstile:default:session:gone";
    let mut patch_gone = script.key(gone);
    patch_gone
        .arg("patch")
        .arg(now)
        .arg(0)
        .arg(1)
        .arg(0)
        .arg(&["d:a", "1"]);
    let applied: i64 = patch_gone.invoke_async(&mut conn).await.unwrap();
    assert_eq!(applied, 0);
    let exists: i64 = redis::cmd("EXISTS")
        .arg(gone)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 0);

    // A session created during the outage, replayed twice: the same hash, with a TTL.
    let created = "turnstile:default:session:created";
    let mut create = script.key(created);
    create
        .arg("create")
        .arg(now)
        .arg(5)
        .arg(0)
        .arg(0)
        .arg(&["m:tenant", "default", "m:idle", "60000", "d:x", "1"])
        .arg("m:created")
        .arg(now)
        .arg("m:abs")
        .arg(now + 3_600_000);
    let applied: i64 = create.invoke_async(&mut conn).await.unwrap();
    assert_eq!(applied, 1);
    let first = {
        let mut conn = conn.clone();
        let fields: std::collections::BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg(created)
            .query_async(&mut conn)
            .await
            .unwrap();
        fields
    };
    let _: i64 = create.invoke_async(&mut conn).await.unwrap();
    let second: std::collections::BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg(created)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(first, second);
    let ttl: i64 = redis::cmd("PTTL")
        .arg(created)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= 60_000, "{ttl}");
}

/// Two instances with a shared per-client rate limit and fallback sessions, under concurrent
/// clients, while Redis is killed and restarted: no request fails, each is answered within the
/// deadlines, and every increment that was answered `200` is in Redis afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_load_through_a_kill_and_restart_loses_nothing() {
    concurrent_load_through_a_kill_and_restart_keeping(Kept::Own).await;
}

/// The same, with the store's copy as the one copy the outage serves from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_load_through_a_kill_and_restart_loses_nothing_with_one_copy() {
    concurrent_load_through_a_kill_and_restart_keeping(Kept::Primary).await;
}

async fn concurrent_load_through_a_kill_and_restart_keeping(kept: Kept) {
    use tower_turnstile::ratelimit::{Policy, Quota, RateLimitLayer};

    let Some(mut server) = RedisServer::start_persistent() else {
        return;
    };
    let instance = |url: &str| {
        let backend = fast_failing_backend(url);
        let store = kept.store(&backend);
        let limit = RateLimitLayer::new(Policy::new("all", Quota::per_minute(1_000_000)).unwrap())
            .with_redis(backend);
        let app = crate::support::session_app::routes()
            .layer(
                SessionLayer::new(store.clone())
                    .with_failure_policy(FailurePolicy::fail_closed_on_write()),
            )
            .layer(limit);
        (app, store)
    };
    let (a, store_a) = instance(&server.url());
    let (b, store_b) = instance(&server.url());

    let stop = Instant::now() + Duration::from_millis(3000);
    let mut tasks = Vec::new();
    for i in 0..16 {
        let app = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            let mut c = Client::new(app);
            let (mut acknowledged, mut worst, mut requests) = (0u64, Duration::ZERO, 0u64);
            while Instant::now() < stop {
                let start = Instant::now();
                let reply = c.post("/bump/n").await;
                worst = worst.max(start.elapsed());
                requests += 1;
                assert!(!reply.status.is_server_error(), "{reply:?}");
                assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
                acknowledged += 1;
                assert_eq!(
                    reply.body,
                    acknowledged.to_string(),
                    "the count never goes back"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (c, acknowledged, worst, requests)
        }));
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    server.stop();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    server.restart();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    let journaled = store_a.status().journaled + store_b.status().journaled;
    let back = Instant::now();
    for store in [&store_a, &store_b] {
        while store.status().active || store.status().journal_len > 0 {
            assert!(
                back.elapsed() < Duration::from_secs(15),
                "{:?}",
                store.status()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let settled = back.elapsed();
    let requests: u64 = results.iter().map(|r| r.3).sum();
    let worst = results.iter().map(|r| r.2).max().unwrap();
    eprintln!(
        "load drill: {requests} requests, 0 errors, worst {worst:?}, {journaled} writes \
         journaled, replay done {settled:?} after the run"
    );
    assert!(journaled > 0, "the outage was seen");
    assert!(worst < Duration::from_millis(2 * 200 + 600), "{worst:?}");
    // Nothing lost: read each client's count through the other instance, from Redis.
    let fresh = Instance::new(&server.url());
    for (c, acknowledged, _, _) in &results {
        let reply = c.on(fresh.app.clone()).get("/get/n").await;
        ok(&reply, &acknowledged.to_string());
    }
    for store in [&store_a, &store_b] {
        assert_eq!((store.status().dropped, store.status().superseded), (0, 0));
    }
}

/// `flush` (for a graceful stop) waits a bounded time for the journal to reach Redis, and says
/// how many writes did not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_waits_for_the_journal_and_counts_what_is_left() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let proxy = Proxy::start(server.port()).await;
    let a = Instance::new(&proxy.url());
    let mut c = a.client();
    ok(&c.post("/set/k/0").await, "ok");
    proxy.cut().await;
    ok(&c.post("/set/k/1").await, "ok");
    ok(&c.post("/set/k/2").await, "ok");
    assert_eq!(
        a.store.flush(Duration::from_millis(300)).await,
        2,
        "Redis still cut off"
    );
    proxy.heal();
    assert_eq!(a.store.flush(Duration::from_secs(5)).await, 0);
    ok(
        &c.on(Instance::new(&server.url()).app).get("/get/k").await,
        "\"2\"",
    );
}

/// Redis out of memory refuses a write to a session this instance never read (a write without
/// a read, on the second instance): Redis still serves reads, so the session is read from it,
/// the write journaled, and it lands once Redis takes writes again. Never a `503`.
#[tokio::test]
async fn a_write_refused_for_lack_of_memory_is_kept_for_a_session_not_held_here() {
    a_write_refused_for_lack_of_memory_keeping(Kept::Own).await;
}

/// The same, with the store's copy as the one copy the outage serves from.
#[tokio::test]
async fn a_write_refused_for_lack_of_memory_is_kept_with_one_copy() {
    a_write_refused_for_lack_of_memory_keeping(Kept::Primary).await;
}

async fn a_write_refused_for_lack_of_memory_keeping(kept: Kept) {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (one, two) = (
        Instance::kept(&server.url(), kept),
        Instance::kept(&server.url(), kept),
    );
    let mut client = one.client();
    assert_eq!(client.post("/set/colour/teal").await.status, StatusCode::OK);

    server.cli(&["CONFIG", "SET", "maxmemory", "1"]);
    let mut on_two = client.on(two.app.clone());
    assert_eq!(
        on_two.post("/set/shape/square").await.status,
        StatusCode::OK
    );
    assert_eq!(two.status().journal_len, 1, "{:?}", two.status());

    server.cli(&["CONFIG", "SET", "maxmemory", "0"]);
    two.settled().await;
    assert_eq!(client.get("/get/shape").await.body, "\"square\"");
    assert_eq!(client.get("/get/colour").await.body, "\"teal\"");
}

/// With a store that keeps its own copy, the fallback keeps none beside it while Redis answers:
/// one copy of each session. During an outage it serves what that copy holds, and holds only
/// the sessions the outage used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_store_s_copy_the_fallback_keeps_no_second_one() {
    let Some((_server, proxy, a, _b)) = cut_off_pair_keeping(Kept::Primary).await else {
        return;
    };
    let mut clients = Vec::new();
    for i in 0..5 {
        let mut c = a.client();
        ok(&c.post(&format!("/set/k/{i}")).await, "ok");
        ok(&c.get("/get/k").await, &format!("\"{i}\""));
        clients.push(c);
    }
    assert_eq!(a.status().local_sessions, 0, "{:?}", a.status());
    assert_eq!(a.store.primary().local_copy_stats().entries, 5);

    proxy.cut().await;
    for (i, c) in clients.iter_mut().enumerate().take(2) {
        ok(&c.get("/get/k").await, &format!("\"{i}\""));
    }
    ok(&clients[2].post("/set/k/twenty").await, "ok");
    ok(&clients[2].get("/get/k").await, "\"twenty\"");
    assert!(a.status().active);
    assert_eq!(a.status().local_sessions, 3, "{:?}", a.status());

    proxy.heal();
    a.settled().await;
    ok(&clients[2].get("/get/k").await, "\"twenty\"");
}

/// A session another instance changed after this one read it: the store's copy is dead, so an
/// outage does not serve the old value from it (the fallback's own copy would have).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_never_serves_a_copy_another_instance_killed() {
    let Some((_server, proxy, a, b)) = cut_off_pair_keeping(Kept::Primary).await else {
        return;
    };
    let mut on_a = a.client();
    ok(&on_a.post("/set/k/old").await, "ok");
    ok(&on_a.get("/get/k").await, "\"old\"");
    let mut on_b = on_a.on(b.app.clone());
    ok(&on_b.post("/set/k/new").await, "ok");
    let start = Instant::now();
    while a.store.primary().local_copy_stats().invalidations == 0 {
        assert!(start.elapsed() < Duration::from_secs(5), "no invalidation");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    proxy.cut().await;
    let reply = on_a.get("/get/k").await;
    assert_eq!(reply.status, StatusCode::OK, "reads never 5xx: {reply:?}");
    assert_ne!(reply.body, "\"old\"", "the dead copy was served");
    assert_eq!(
        on_a.post("/set/k/during").await.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "a write to a session held nowhere here is refused, not faked"
    );
}

/// `OutageCopy::Own` (the default) beside a store that keeps a copy: the fallback still keeps
/// its own, and an outage serves the version this instance last saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_the_fallback_keeps_its_own_copy_beside_the_store_s() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let proxy = Proxy::start(server.port()).await;
    let a = Instance::with_store(&proxy.url(), |redis| {
        FallbackStore::new(redis.with_restore_copy(RedisStore::SUGGESTED_COPY_CAPACITY))
    });
    let mut c = a.client();
    ok(&c.post("/set/k/1").await, "ok");
    ok(&c.get("/get/k").await, "\"1\"");
    assert_eq!(a.status().local_sessions, 1, "{:?}", a.status());
    proxy.cut().await;
    ok(&c.get("/get/k").await, "\"1\"");
}
