//! At most N sessions per user: a login beyond the cap ends the user's oldest session (on
//! every instance, and its connections are told), or is refused; on memory and on Redis.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use axum::{Router, http::StatusCode};
use tower_turnstile::{
    backend::RedisBackend,
    session::{
        MemoryStore, OverCap, RedisStore, SessionEndListener, SessionKey, SessionLayer,
        SessionStore, UserKey,
    },
    tenant::Tenant,
};

use crate::support::{RedisServer, http::Client, session_app::app};

/// Writes down the sessions it is told ended.
#[derive(Debug, Default, Clone)]
struct Ended(Arc<Mutex<Vec<String>>>);

#[async_trait]
impl SessionEndListener for Ended {
    async fn session_ended(&self, key: &SessionKey, _: Option<&str>) {
        self.0.lock().unwrap().push(key.hash());
    }

    async fn user_sessions_ended(&self, _: &UserKey) {}
}

fn capped(store: impl SessionStore + Clone, max: usize, ended: &Ended) -> Router {
    app(SessionLayer::new(store)
        .with_secure(false)
        .with_max_sessions_per_user(max)
        .on_session_end(ended.clone()))
}

async fn logged_in(app: &Router, user: &str) -> Client {
    // Sessions are ranked by creation time, in milliseconds: keep each in a millisecond of
    // its own, so "the oldest" is one session.
    tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    let mut client = Client::new(app.clone());
    client.post("/set/visit/1").await; // an anonymous session first, then the login
    assert_eq!(
        client.post(&format!("/login/{user}")).await.status,
        StatusCode::OK
    );
    client
}

/// Three logins of a user capped at 2, on two instances: the first (oldest) session ends, is
/// announced, and reads as logged out; the other two stay.
async fn a_third_login_ends_the_oldest(one: Router, two: Router, ended: &Ended) {
    let mut first = logged_in(&one, "alice").await;
    let mut second = logged_in(&two, "alice").await;
    // Each login ended its anonymous id (it moved to a new one).
    let before = ended.0.lock().unwrap().len();
    assert_eq!(before, 2);
    let mut third = logged_in(&one, "alice").await;

    assert_eq!(
        first.get("/user").await.body,
        "anonymous",
        "the oldest ended"
    );
    assert_eq!(second.get("/user").await.body, "alice");
    assert_eq!(third.get("/user").await.body, "alice");
    assert_eq!(third.get("/sessions").await.body, "2");
    assert_eq!(
        ended.0.lock().unwrap().len(),
        before + 2,
        "the third login's old id, and the oldest session"
    );
    // Another user is not counted with alice.
    let mut bob = logged_in(&two, "bob").await;
    assert_eq!(bob.get("/sessions").await.body, "1");
}

#[tokio::test]
async fn memory_a_third_login_ends_the_oldest_session() {
    let store = MemoryStore::new();
    let ended = Ended::default();
    let (one, two) = (capped(store.clone(), 2, &ended), capped(store, 2, &ended));
    a_third_login_ends_the_oldest(one, two, &ended).await;
}

#[tokio::test]
async fn redis_a_third_login_ends_the_oldest_session() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = || RedisStore::new(RedisBackend::new(&server.url()).unwrap());
    let ended = Ended::default();
    let (one, two) = (capped(store(), 2, &ended), capped(store(), 2, &ended));
    a_third_login_ends_the_oldest(one, two, &ended).await;
}

/// Under `OverCap::RefuseLogin` the third login is refused with a clear error, and its session
/// stays anonymous; once a session ends, a login goes through again.
#[tokio::test]
async fn a_refusing_cap_refuses_the_login_over_it() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let layer = SessionLayer::new(RedisStore::new(RedisBackend::new(&server.url()).unwrap()))
        .with_secure(false)
        .with_max_sessions_per_user(2)
        .with_over_cap(OverCap::RefuseLogin);
    let app = app(layer);
    let mut first = logged_in(&app, "alice").await;
    logged_in(&app, "alice").await;

    let mut third = Client::new(app.clone());
    third.post("/set/visit/1").await;
    let refused = third.post("/try-login/alice").await;
    assert_eq!(refused.status, StatusCode::CONFLICT);
    assert_eq!(refused.body, "at most 2 sessions per user");
    assert_eq!(third.get("/user").await.body, "anonymous");
    // Logging in again on a session that already has the user is no new session.
    assert_eq!(first.post("/try-login/alice").await.status, StatusCode::OK);

    first.post("/destroy").await;
    assert_eq!(third.post("/try-login/alice").await.status, StatusCode::OK);
}

/// Eight logins of one user at the same moment on two instances, with a cap of 2: the cap is
/// decided atomically, so once they are done the user has exactly 2 sessions, and exactly two
/// of the clients are still logged in.
async fn concurrent_logins(one: Router, two: Router, listing: impl SessionStore, user: &str) {
    let logins = (0..8).map(|n| {
        let app = if n % 2 == 0 { one.clone() } else { two.clone() };
        async move { logged_in(&app, user).await }
    });
    let mut clients = futures_util::future::join_all(logins).await;
    let live = listing
        .list_user_sessions(&UserKey::new(&Tenant::default(), user))
        .await
        .unwrap()
        .len();
    assert_eq!(live, 2, "exactly the cap");
    let mut logged_in = 0;
    for client in &mut clients {
        logged_in += usize::from(client.get("/user").await.body == user);
    }
    assert_eq!(logged_in, 2, "two clients still logged in");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_logins_on_two_instances_leave_exactly_the_cap() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = || RedisStore::new(RedisBackend::new(&server.url()).unwrap());
    let ended = Ended::default();
    let (one, two) = (capped(store(), 2, &ended), capped(store(), 2, &ended));
    concurrent_logins(one.clone(), two, store(), "carol").await;
    // A later login alone keeps it there.
    logged_in(&one, "carol").await;
    let carols = store()
        .list_user_sessions(&UserKey::new(&Tenant::default(), "carol"))
        .await
        .unwrap();
    assert_eq!(carols.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_logins_on_a_cluster_leave_exactly_the_cap() {
    let Some(cluster) = crate::support::RedisCluster::start_masters_only() else {
        return;
    };
    let store = || RedisStore::new(RedisBackend::cluster(cluster.urls()).unwrap());
    let ended = Ended::default();
    let (one, two) = (capped(store(), 2, &ended), capped(store(), 2, &ended));
    concurrent_logins(one, two, store(), "dave").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_logins_in_memory_leave_exactly_the_cap() {
    let store = MemoryStore::new();
    let ended = Ended::default();
    let (one, two) = (
        capped(store.clone(), 2, &ended),
        capped(store.clone(), 2, &ended),
    );
    concurrent_logins(one, two, store, "erin").await;
}

/// Under `OverCap::RefuseLogin`, eight logins of one user at the same moment on two instances
/// with room for 2: the store holds a place for each admitted login atomically, so exactly two
/// pass and the others are refused; once the two are stored, a ninth is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_refused_logins_admit_exactly_the_room() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let refusing = || {
        app(
            SessionLayer::new(RedisStore::new(RedisBackend::new(&server.url()).unwrap()))
                .with_secure(false)
                .with_max_sessions_per_user(2)
                .with_over_cap(OverCap::RefuseLogin),
        )
    };
    let (one, two) = (refusing(), refusing());
    let attempts = (0..8).map(|n| {
        let app = if n % 2 == 0 { one.clone() } else { two.clone() };
        async move {
            let mut client = Client::new(app);
            client.post("/set/visit/1").await;
            client.post("/try-login/gina").await.status
        }
    });
    let statuses = futures_util::future::join_all(attempts).await;
    let passed = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert_eq!(passed, 2, "{statuses:?}");
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::OK || *s == StatusCode::CONFLICT)
    );
    let live = RedisStore::new(RedisBackend::new(&server.url()).unwrap())
        .list_user_sessions(&UserKey::new(&Tenant::default(), "gina"))
        .await
        .unwrap();
    assert_eq!(live.len(), 2);
    let mut ninth = Client::new(one.clone());
    ninth.post("/set/visit/1").await;
    assert_eq!(
        ninth.post("/try-login/gina").await.status,
        StatusCode::CONFLICT
    );
}
