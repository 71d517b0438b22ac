//! Session lifecycle events: one capped log per tenant, written by the layer when a session's
//! life changes, read as a range or through a consumer group; on Redis, a Redis Cluster and
//! in memory.

use axum::{Router, http::StatusCode};
use tower_turnstile::{
    backend::RedisBackend,
    session::{
        LifecycleEvent, LifecycleKind, MemoryStore, RedisStore, SESSION_PREFIX_LEN, SessionEvents,
        SessionLayer, SessionStore,
    },
    tenant::Tenant,
};

use crate::support::{RedisCluster, RedisServer, http::Client, session_app::app};

fn layer(store: impl SessionStore, events: &SessionEvents) -> Router {
    app(SessionLayer::new(store)
        .with_secure(false)
        .with_max_sessions_per_user(2)
        .with_lifecycle_events(events.clone()))
}

/// A client in `tenant` (the test app reads it from a header).
fn client(app: &Router, tenant: &str) -> Client {
    let mut client = Client::new(app.clone());
    client.tenant = Some(tenant.to_owned());
    client
}

/// Every kind the layer writes, in order: a login, a new id, a logout, logins past the cap,
/// "log out everywhere". Returns the cookies' ids seen, to check that no event holds one.
async fn a_life(app: &Router, tenant: &str) -> Vec<String> {
    let mut cookies = Vec::new();
    let mut alice = client(app, tenant);
    alice.post("/set/visit/1").await; // anonymous: no event
    alice.post("/login/alice").await; // login
    alice.post("/cycle").await; // cycled
    cookies.extend(alice.cookie.clone());
    alice.post("/destroy").await; // logout
    let mut bobs = Vec::new();
    for _ in 0..3 {
        let mut bob = client(app, tenant);
        bob.post("/login/bob").await; // login (the third one: evicted as well)
        cookies.extend(bob.cookie.clone());
        bobs.push(bob);
    }
    assert_eq!(bobs[2].post("/logout-all").await.status, StatusCode::OK); // revoked, logout
    cookies
}

fn kinds(events: &[LifecycleEvent]) -> Vec<(LifecycleKind, Option<&str>)> {
    events.iter().map(|e| (e.kind, e.user.as_deref())).collect()
}

fn expected() -> Vec<(LifecycleKind, Option<&'static str>)> {
    use LifecycleKind::*;
    vec![
        (Login, Some("alice")),
        (Cycled, Some("alice")),
        (Logout, Some("alice")),
        (Login, Some("bob")),
        (Login, Some("bob")),
        (Login, Some("bob")),
        (Evicted, Some("bob")),
        (Revoked, Some("bob")),
        (Logout, Some("bob")),
    ]
}

/// The log of `acme` holds its life in order, none of globex's, and no session id.
async fn the_log_tells_each_tenants_life(events: SessionEvents, store: impl SessionStore + Clone) {
    let app = layer(store, &events);
    let cookies = a_life(&app, "acme").await;
    client(&app, "globex").post("/login/alice").await;

    let acme = Tenant::new("acme").unwrap();
    let log = events.latest(&acme, 100).await.unwrap();
    assert_eq!(kinds(&log), expected());
    for event in &log {
        assert_eq!(event.tenant, acme);
        assert!(event.at > 0 && !event.instance.is_empty());
        let prefix_len = if event.kind == LifecycleKind::Revoked {
            0
        } else {
            SESSION_PREFIX_LEN
        };
        assert_eq!(event.session.len(), prefix_len, "{event:?}");
        for cookie in &cookies {
            let id = cookie.split_once('=').unwrap().1;
            assert!(
                !format!("{event:?}").contains(id),
                "no session id in {event:?}"
            );
        }
    }
    let ids: Vec<&str> = log.iter().map(|e| e.id.as_str()).collect();
    let mut sorted = ids.clone();
    sorted.sort_by_key(|id| {
        let (ms, seq) = id.split_once('-').unwrap();
        (ms.parse::<u64>().unwrap(), seq.parse::<u64>().unwrap())
    });
    assert_eq!(ids, sorted, "oldest first");

    // Reading on from an event.
    let after_third = events.since(&acme, &log[2].id, 100).await.unwrap();
    assert_eq!(kinds(&after_third), expected()[3..]);
    assert_eq!(events.latest(&acme, 2).await.unwrap(), log[7..]);
    let globex = events
        .latest(&Tenant::new("globex").unwrap(), 100)
        .await
        .unwrap();
    assert_eq!(kinds(&globex), [(LifecycleKind::Login, Some("alice"))]);
}

#[tokio::test]
async fn memory_the_log_tells_each_tenants_life() {
    the_log_tells_each_tenants_life(SessionEvents::memory(), MemoryStore::new()).await;
}

#[tokio::test]
async fn redis_the_log_tells_each_tenants_life() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let backend = RedisBackend::new(&server.url()).unwrap();
    the_log_tells_each_tenants_life(
        SessionEvents::redis(backend.clone()),
        RedisStore::new(backend),
    )
    .await;
    let keys = server.cli(&["--scan", "--pattern", "turnstile:{*}:events"]);
    assert_eq!(keys.lines().count(), 2, "one stream per tenant: {keys}");
}

#[tokio::test]
async fn cluster_the_log_tells_each_tenants_life() {
    let Some(cluster) = RedisCluster::start_masters_only() else {
        return;
    };
    let backend = RedisBackend::cluster(cluster.urls()).unwrap();
    the_log_tells_each_tenants_life(
        SessionEvents::redis(backend.clone()),
        RedisStore::new(backend),
    )
    .await;
}

/// A consumer group reads every event once: what a consumer read and did not acknowledge
/// before its instance restarted comes back to it, then the new ones; nothing twice once
/// acknowledged.
#[tokio::test]
async fn a_consumer_group_reads_every_event_once_across_a_restart() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let backend = || RedisBackend::new(&server.url()).unwrap();
    let events = SessionEvents::redis(backend());
    let app = layer(RedisStore::new(backend()), &events);
    a_life(&app, "acme").await;
    let acme = Tenant::new("acme").unwrap();

    let first = events
        .read_group(&acme, "audit", "worker-1", 4)
        .await
        .unwrap();
    assert_eq!(first.len(), 4);
    events
        .ack(&acme, "audit", &[first[0].id.clone()])
        .await
        .unwrap();
    drop(events);

    // The worker's instance restarts: a new log handle, a new connection.
    let events = SessionEvents::redis(backend());
    let mut seen = vec![first[0].clone()];
    loop {
        let batch = events
            .read_group(&acme, "audit", "worker-1", 3)
            .await
            .unwrap();
        if batch.is_empty() {
            break;
        }
        let ids: Vec<String> = batch.iter().map(|e| e.id.clone()).collect();
        events.ack(&acme, "audit", &ids).await.unwrap();
        seen.extend(batch);
    }
    assert_eq!(kinds(&seen), expected(), "every event once, in order");
    assert!(
        events
            .read_group(&acme, "audit", "worker-2", 10)
            .await
            .unwrap()
            .is_empty(),
        "another consumer of the group gets nothing already delivered"
    );
    let memory = SessionEvents::memory();
    assert!(memory.read_group(&acme, "audit", "w", 1).await.is_err());
}

/// `expired` without keyspace notifications: two instances sweep; a logged-in session left
/// unused expires and is written once; one logged out, or one kept in use, is not.
async fn expiries_are_written_once(instances: [(SessionEvents, SessionLayer); 2]) {
    use std::time::Duration;

    let [(events, one), (other, two)] = instances;
    for (events, layer) in [(&events, &one), (&other, &two)] {
        events
            .sweep_expired(layer.store(), Duration::from_millis(100))
            .unwrap();
    }
    let (one, two) = (app(one), app(two));
    client(&one, "acme").post("/login/alice").await;
    let mut bob = client(&two, "acme");
    bob.post("/login/bob").await;
    bob.post("/destroy").await;
    let mut carol = client(&one, "acme");
    carol.post("/login/carol").await;
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(carol.get("/user").await.body, "carol", "in use, alive");
    }

    let acme = Tenant::new("acme").unwrap();
    let log = events.latest(&acme, 100).await.unwrap();
    let expired: Vec<_> = log
        .iter()
        .filter(|e| e.kind == LifecycleKind::Expired)
        .map(|e| e.user.as_deref())
        .collect();
    assert_eq!(expired, [Some("alice")], "{:?}", kinds(&log));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_expiries_are_written_once_by_one_of_two_sweeping_instances() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let instance = || {
        let backend = RedisBackend::new(&server.url()).unwrap();
        let events = SessionEvents::redis(backend.clone());
        let layer = SessionLayer::new(RedisStore::new(backend))
            .with_secure(false)
            .with_inactivity_timeout(std::time::Duration::from_secs(1))
            .with_lifecycle_events(events.clone());
        (events, layer)
    };
    expiries_are_written_once([instance(), instance()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_expiries_are_written_once() {
    let store = MemoryStore::new();
    let events = SessionEvents::memory();
    let instance = || {
        let layer = SessionLayer::new(store.clone())
            .with_secure(false)
            .with_inactivity_timeout(std::time::Duration::from_secs(1))
            .with_lifecycle_events(events.clone());
        (events.clone(), layer)
    };
    expiries_are_written_once([instance(), instance()]).await;
}
