//! A Sentinel-managed Redis (a master, a replica, three sentinels) on loopback: the layers keep
//! working through a failover and through the master's death, on the new master, without a
//! restart.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use http::StatusCode;
use tower_turnstile::{
    backend::RedisBackend,
    session::{FallbackStore, RedisStore, SessionLayer},
};

use crate::support::{
    SentinelGroup,
    drill::{self, hit, limited, sessions},
    http::Client,
    session_app::{self, fast_breaker},
};

/// A backend on the group's master, found through its sentinel, that gives up fast.
fn backend(group: &SentinelGroup) -> RedisBackend {
    RedisBackend::sentinel_builder(SentinelGroup::MASTER, group.sentinel_urls())
        .connect_timeout(Duration::from_millis(200))
        .breaker(fast_breaker())
        .build()
        .unwrap()
}

/// Keys in a server's database 0.
fn keys(server: &crate::support::RedisServer) -> Vec<String> {
    server.cli(&["--scan"]).lines().map(str::to_owned).collect()
}

/// Polls `until` (with requests of its own) for up to 20 s.
async fn eventually<F, Fut>(what: &str, mut until: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while !until().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_and_limits_follow_a_failover() {
    let Some(group) = SentinelGroup::start() else {
        return;
    };
    let backend = backend(&group);
    let (app, store) = sessions(&backend);
    let (limited, limiter) = limited(&backend, 5);
    let mut alice = Client::new(app.clone());
    assert_eq!(alice.post("/set/colour/teal").await.status, StatusCode::OK);
    for _ in 0..3 {
        assert_eq!(hit(&limited).await, StatusCode::OK);
    }
    assert!(
        keys(&group.master).len() >= 2,
        "the session and the count are on the master"
    );
    group.sync();

    group.fail_over();

    // Through the switch, nothing fails: the fallback answers until the backend has found
    // the new master by itself.
    let mut statuses = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let reply = alice.post("/set/shape/square").await;
        statuses.push(reply.status);
        let landed = group
            .replica
            .cli(&["--scan", "--pattern", "*session*"])
            .lines()
            .any(|key| {
                group
                    .replica
                    .cli(&["HGET", key, "d:shape"])
                    .contains("square")
            });
        if landed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no write reached the new master: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(statuses.iter().all(StatusCode::is_success), "{statuses:?}");
    // Written during the switch or after: every write is in the new master once the fallback
    // has replayed its journal.
    store.flush(Duration::from_secs(5)).await;
    let read = alice.get("/get/colour").await;
    assert_eq!(
        read.body, "\"teal\"",
        "the session made before the failover"
    );
    assert_eq!(alice.get("/get/shape").await.body, "\"square\"");
    assert_eq!(
        backend.status().state,
        tower_turnstile::backend::BreakerState::Closed
    );

    // The count made before the failover was carried over: 3 spent, 2 left, decided on the
    // new master (not by the local fallback, which would grant a full quota).
    eventually("the backend answers on the new master", || {
        let backend = backend.clone();
        async move { backend.ping().await.is_ok() }
    })
    .await;
    let fallbacks = limiter.fallback_decisions();
    let mut allowed = 0;
    for _ in 0..5 {
        allowed += usize::from(hit(&limited).await == StatusCode::OK);
    }
    assert_eq!(limiter.fallback_decisions(), fallbacks, "decided in Redis");
    assert_eq!(allowed, 2, "3 of 5 were spent before the failover");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layers_survive_the_master_dying_mid_load() {
    let Some(mut group) = SentinelGroup::start() else {
        return;
    };
    let backend = backend(&group);
    let (app, store) = sessions(&backend);
    let (limited, limiter) = limited(&backend, 1_000_000);
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(drill::run(app.clone(), limited, 8, Arc::clone(&stop)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    // What the old master acknowledged before it dies is what the replica has.
    group.sync();

    let killed = Instant::now();
    group.master.stop();
    group.wait_for_replica_promotion();
    let promoted = killed.elapsed();
    eventually("the backend is healthy on the new master", || {
        let backend = backend.clone();
        async move { backend.ping().await.is_ok() && backend.status().healthy }
    })
    .await;
    let recovered = killed.elapsed();
    let fallbacks = limiter.fallback_decisions();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let report = load.await.unwrap();
    eprintln!(
        "sentinel drill: {} requests, {} server errors, longest {:?}; replica promoted {:?} \
         and the backend healthy {:?} after the kill; {} rate-limit decisions by the fallback",
        report.requests(),
        report.server_errors(),
        report.longest(),
        promoted,
        recovered,
        fallbacks
    );
    assert_eq!(report.server_errors(), 0);
    assert!(fallbacks > 0, "the outage was bridged by the local limiter");
    assert_eq!(
        limiter.fallback_decisions(),
        fallbacks,
        "after recovery the limiter decides in Redis again"
    );
    // Every client's last acknowledged write is in the new master once the journal has
    // replayed: nothing acknowledged was lost.
    drill::assert_nothing_lost(&report, &store, &app).await;
    let on_new_master = keys(&group.replica);
    let sessions_there = on_new_master
        .iter()
        .filter(|key| key.contains(":session:"))
        .count();
    assert_eq!(sessions_there, report.clients.len(), "{on_new_master:?}");
}

#[tokio::test]
async fn credentials_never_show() {
    let Some(group) = SentinelGroup::start() else {
        return;
    };
    let url = group
        .sentinel_url()
        .replace("redis://", "redis://watcher:sentinel-secret@");
    let backend = RedisBackend::sentinel_builder(SentinelGroup::MASTER, [url])
        .master_auth(Some("app"), "master-secret");
    let builder = format!("{backend:?}");
    let backend = backend.build().unwrap();
    let shown = [
        builder,
        format!("{backend:?}"),
        format!("{:?}", backend.status()),
        backend.status().target,
    ];
    for text in &shown {
        assert!(
            !text.contains("secret") && !text.contains("watcher"),
            "{text}"
        );
    }
    assert!(shown[3].contains(SentinelGroup::MASTER), "{}", shown[3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_that_wants_a_password() {
    let Some(group) = SentinelGroup::start_with_password("master-secret") else {
        return;
    };
    let backend = RedisBackend::sentinel_builder(SentinelGroup::MASTER, group.sentinel_urls())
        .master_auth(None, "master-secret")
        .build()
        .unwrap();
    let (app, _) = sessions(&backend);
    let mut client = Client::new(app);
    assert_eq!(client.post("/set/colour/teal").await.status, StatusCode::OK);
    assert_eq!(client.get("/get/colour").await.body, "\"teal\"");
    assert!(backend.status().healthy);
    assert!(
        keys(&group.master)
            .iter()
            .any(|key| key.contains(":session:"))
    );

    let wrong = RedisBackend::sentinel_builder(SentinelGroup::MASTER, group.sentinel_urls())
        .master_auth(None, "wrong")
        .build()
        .unwrap();
    assert!(wrong.ping().await.unwrap_err().is_outage());
}

/// A failover to a replica that missed the last writes: the marker key reached it, but the
/// server is another process (its run id), so the instance writes back the sessions it held
/// that the new master lacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_to_a_replica_that_missed_writes_restores_the_sessions() {
    let Some(mut group) = SentinelGroup::start() else {
        return;
    };
    let redis = backend(&group);
    eventually("the backend answers", || {
        let redis = redis.clone();
        async move { redis.ping().await.is_ok() }
    })
    .await;
    let store = FallbackStore::new(
        RedisStore::new(redis)
            .with_timeout(Duration::from_millis(300))
            .with_restore_copy(RedisStore::SUGGESTED_COPY_CAPACITY),
    );
    let app = session_app::app(SessionLayer::new(store.clone()));
    let mut alice = Client::new(app.clone());
    assert_eq!(alice.post("/set/colour/teal").await.status, StatusCode::OK);
    assert_eq!(alice.get("/get/colour").await.body, "\"teal\"");
    // In Redis, not in the fallback's journal (a slow first call under load would put it
    // there).
    store.flush(Duration::from_secs(5)).await;
    group.sync();

    // The replica stops following (it is told its master is at a port nobody listens on), so
    // it keeps what it has and misses what comes next: bob's session.
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .unwrap()
        .port();
    group
        .replica
        .cli(&["REPLICAOF", "127.0.0.1", &nowhere.to_string()]);
    let mut bob = Client::new(app.clone());
    assert_eq!(bob.post("/set/colour/plum").await.status, StatusCode::OK);
    assert_eq!(bob.get("/get/colour").await.body, "\"plum\"");
    store.flush(Duration::from_secs(5)).await;
    let sessions_on = |server: &crate::support::RedisServer| {
        server
            .cli(&["--scan", "--pattern", "*:session:*"])
            .lines()
            .count()
    };
    assert_eq!(sessions_on(&group.replica), 1, "the replica missed bob's");

    group.master.stop();
    group.wait_for_replica_promotion();

    // Back on the new master: bob's session is written back there, alice's was never lost.
    eventually("bob's session is on the new master", || {
        let (mut bob, replica) = (bob.clone(), &group.replica);
        async move { bob.get("/get/colour").await.body == "\"plum\"" && sessions_on(replica) == 2 }
    })
    .await;
    assert_eq!(alice.get("/get/colour").await.body, "\"teal\"");
    assert_eq!(store.primary().local_copy_stats().restored, 1);
}
