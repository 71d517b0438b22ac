//! `TowerSessionsStore`: the crate's stores behind tower-sessions 0.14, driven through
//! tower-sessions' own layer and through axum-login, on a real `redis-server`.

use std::{collections::HashMap, time::Duration};

use axum::{Router, extract::Query, http::StatusCode, routing::get};
use axum_login::{AuthManagerLayerBuilder, AuthSession, AuthUser, AuthnBackend, UserId};
use serde::Deserialize;
use serde_json::json;
use time::OffsetDateTime;
use tower_sessions::{
    Expiry, Session, SessionManagerLayer,
    session::{Id, Record},
    session_store::SessionStore as _,
};
use tower_turnstile::{
    session::{FallbackStore, MemoryStore, RedisStore, SessionStore, TowerSessionsStore},
    tenant::Tenant,
};

use crate::support::{RedisServer, http::Client, proxy::Proxy, session_app::fast_failing_backend};

/// The routes tower-sessions' own tests drive, in this file's words.
fn routes() -> Router {
    Router::new()
        .route("/", get(|_: Session| async { "untouched" }))
        .route(
            "/insert",
            get(|s: Session| async move { s.insert("n", 42).await.unwrap() }),
        )
        .route(
            "/get",
            get(|s: Session| async move { format!("{:?}", s.get::<u32>("n").await.unwrap()) }),
        )
        .route(
            "/remove",
            get(|s: Session| async move { s.remove_value("n").await.unwrap().is_some().to_string() }),
        )
        .route(
            "/cycle",
            get(|s: Session| async move { s.cycle_id().await.unwrap() }),
        )
        .route(
            "/flush",
            get(|s: Session| async move { s.flush().await.unwrap() }),
        )
        .route(
            "/for_a_day",
            get(|s: Session| async move {
                let end = OffsetDateTime::now_utc() + time::Duration::days(1);
                s.set_expiry(Some(Expiry::AtDateTime(end)));
            }),
        )
}

fn app<S: SessionStore + Clone>(store: TowerSessionsStore<S>) -> Router {
    routes().layer(SessionManagerLayer::new(store).with_secure(false))
}

/// A client holding `cookie` (the pair, `id=...`).
fn holding(app: &Router, cookie: &str) -> Client {
    let mut client = Client::new(app.clone());
    client.cookie = Some(cookie.to_owned());
    client
}

/// What tower-sessions promises of a store, checked on `store`.
async fn route_expectations<S: SessionStore + Clone>(store: TowerSessionsStore<S>) {
    let app = app(store);

    // A request that does not touch its session sets no cookie.
    let reply = Client::new(app.clone()).get("/").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.set_cookie().is_none());

    // Ids that name no session: well-formed but unknown, garbage, oversized. Each reads as no
    // session and the write starts a new one under a new id.
    let oversized = format!("id={}", "A".repeat(8192));
    for cookie in [
        "id=AAAAAAAAAAAAAAAAAAAAAA",
        "id=malformed",
        "id=%%%",
        &oversized,
    ] {
        let mut client = holding(&app, cookie);
        assert_eq!(client.get("/get").await.body, "None", "{cookie:.40}");
        let reply = client.get("/insert").await;
        assert_eq!(reply.status, StatusCode::OK);
        let set = reply.set_cookie().expect("a new session's cookie");
        assert!(!set.starts_with(&format!("{cookie};")), "{set}");
        assert_eq!(client.get("/get").await.body, "Some(42)");
    }

    // Values written are read back; a removed last value removes the cookie.
    let mut client = Client::new(app.clone());
    client.get("/insert").await;
    assert_eq!(client.get("/get").await.body, "Some(42)");
    let kept = client.cookie.clone().unwrap();
    assert_eq!(client.get("/remove").await.body, "true");
    assert_eq!(holding(&app, &kept).get("/get").await.body, "None");

    // Cycling keeps the data under a new id and kills the old one.
    let mut client = Client::new(app.clone());
    client.get("/insert").await;
    let before = client.cookie.clone().unwrap();
    client.get("/cycle").await;
    let after = client.cookie.clone().unwrap();
    assert_ne!(before, after);
    assert_eq!(client.get("/get").await.body, "Some(42)");
    assert_eq!(holding(&app, &before).get("/get").await.body, "None");

    // Flushing ends the session: the cookie goes, and the old id finds nothing.
    let mut client = Client::new(app.clone());
    client.get("/insert").await;
    let before = client.cookie.clone().unwrap();
    let reply = client.get("/flush").await;
    assert!(reply.set_cookie().unwrap().contains("Max-Age=0"));
    assert_eq!(holding(&app, &before).get("/get").await.body, "None");

    // An expiry date set by a handler reaches the cookie.
    let mut client = Client::new(app.clone());
    client.get("/insert").await;
    let reply = client.get("/for_a_day").await;
    let set = reply.set_cookie().unwrap();
    let max_age = set
        .split("Max-Age=")
        .nth(1)
        .and_then(|v| v.parse::<u64>().ok());
    assert!(
        max_age.is_some_and(|s| (86_000..=86_400).contains(&s)),
        "{set}"
    );
    assert_eq!(client.get("/get").await.body, "Some(42)");
}

#[tokio::test]
async fn tower_sessions_route_expectations_hold_on_the_memory_store() {
    route_expectations(TowerSessionsStore::new(MemoryStore::builder().build())).await;
}

#[tokio::test]
async fn tower_sessions_route_expectations_hold_on_redis() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = RedisStore::new(fast_failing_backend(&server.url()));
    route_expectations(TowerSessionsStore::new(store.clone())).await;
    // The same with the coherent local copy serving reads.
    route_expectations(TowerSessionsStore::new(store.with_local_copy(1_000))).await;
}

fn record(id: Id, data: serde_json::Value) -> Record {
    let data: HashMap<String, serde_json::Value> = serde_json::from_value(data).unwrap();
    Record {
        id,
        data,
        expiry_date: OffsetDateTime::now_utc() + time::Duration::hours(1),
    }
}

/// Two instances on one Redis: their own connections and stores.
fn two_instances(server: &RedisServer) -> [TowerSessionsStore<RedisStore>; 2] {
    [0, 1].map(|_| TowerSessionsStore::new(RedisStore::new(fast_failing_backend(&server.url()))))
}

#[tokio::test]
async fn saves_write_only_the_keys_that_changed() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let [one, two] = two_instances(&server);
    let mut created = record(Id::default(), json!({"a": 1, "b": 1, "gone": true}));
    one.create(&mut created).await.unwrap();
    let id = created.id;

    // Both instances read the session, then each changes a different key.
    let mut on_one = one.load(&id).await.unwrap().unwrap();
    let mut on_two = two.load(&id).await.unwrap().unwrap();
    on_one.data.insert("a".into(), json!(2));
    on_two.data.insert("b".into(), json!(2));
    on_two.data.remove("gone");
    one.save(&on_one).await.unwrap();
    two.save(&on_two).await.unwrap();

    // A whole-record store would keep only the last save; both changes are here.
    let stored = one.load(&id).await.unwrap().unwrap();
    assert_eq!(stored.data, record(id, json!({"a": 2, "b": 2})).data);
}

#[tokio::test]
async fn create_never_overwrites_a_live_session() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let [one, two] = two_instances(&server);
    let mut first = record(Id::default(), json!({"owner": "first"}));
    one.create(&mut first).await.unwrap();

    // A create that comes with an id already taken draws another one.
    let mut second = record(first.id, json!({"owner": "second"}));
    two.create(&mut second).await.unwrap();
    assert_ne!(second.id, first.id);
    let kept = two.load(&first.id).await.unwrap().unwrap();
    assert_eq!(kept.data["owner"], json!("first"));
    let made = one.load(&second.id).await.unwrap().unwrap();
    assert_eq!(made.data["owner"], json!("second"));
}

#[tokio::test]
async fn a_save_never_brings_back_a_session_ended_elsewhere() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let [one, two] = two_instances(&server);
    let mut created = record(Id::default(), json!({"a": 1}));
    one.create(&mut created).await.unwrap();
    let mut loaded = one.load(&created.id).await.unwrap().unwrap();

    two.delete(&created.id).await.unwrap();
    loaded.data.insert("a".into(), json!(2));
    one.save(&loaded).await.unwrap();
    assert_eq!(one.load(&created.id).await.unwrap(), None);
    assert_eq!(two.load(&created.id).await.unwrap(), None);
}

#[tokio::test]
async fn unknown_ids_and_foreign_records_read_as_no_session() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let [one, _] = two_instances(&server);
    for id in [Id(0), Id(-1), Id(i128::MAX), Id::default()] {
        assert_eq!(one.load(&id).await.unwrap(), None);
    }

    // A record whose value is not JSON (written by something else) is no session, not an error.
    let mut created = record(Id::default(), json!({"a": 1}));
    one.create(&mut created).await.unwrap();
    let keys = server.cli(&["--scan", "--pattern", "*:session:*"]);
    let key = keys.lines().next().expect("the session's hash");
    server.cli(&["HSET", key, "d:a", "not json {"]);
    assert_eq!(one.load(&created.id).await.unwrap(), None);
}

#[tokio::test]
async fn sessions_are_kept_in_the_tenant_given() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let backend = fast_failing_backend(&server.url());
    let acme = TowerSessionsStore::new(RedisStore::new(backend.clone()))
        .with_tenant(Tenant::new("acme").unwrap());
    let other = TowerSessionsStore::new(RedisStore::new(backend));
    let mut created = record(Id::default(), json!({"a": 1}));
    acme.create(&mut created).await.unwrap();

    assert!(acme.load(&created.id).await.unwrap().is_some());
    assert_eq!(other.load(&created.id).await.unwrap(), None);
    let keys = server.cli(&["--scan", "--pattern", "*acme:session:*"]);
    assert_eq!(keys.lines().count(), 1, "{keys}");
}

// An axum-login application, as its users write one.

#[derive(Debug, Clone)]
struct User {
    name: String,
}

impl AuthUser for User {
    type Id = String;

    fn id(&self) -> String {
        self.name.clone()
    }

    fn session_auth_hash(&self) -> &[u8] {
        self.name.as_bytes()
    }
}

#[derive(Debug, Clone)]
struct Users;

#[derive(Debug, thiserror::Error)]
#[error("never fails")]
struct NoError;

impl AuthnBackend for Users {
    type User = User;
    type Credentials = String;
    type Error = NoError;

    async fn authenticate(&self, name: String) -> Result<Option<User>, NoError> {
        Ok(["alice", "bob"]
            .contains(&name.as_str())
            .then_some(User { name }))
    }

    async fn get_user(&self, name: &UserId<Self>) -> Result<Option<User>, NoError> {
        self.authenticate(name.clone()).await
    }
}

#[derive(Deserialize)]
struct Login {
    user: String,
}

async fn login(mut auth: AuthSession<Users>, Query(form): Query<Login>) -> StatusCode {
    match auth.authenticate(form.user).await {
        Ok(Some(user)) if auth.login(&user).await.is_ok() => StatusCode::OK,
        Ok(_) => StatusCode::UNAUTHORIZED,
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

async fn protected(auth: AuthSession<Users>) -> Result<String, StatusCode> {
    auth.user.map(|u| u.name).ok_or(StatusCode::UNAUTHORIZED)
}

async fn logout(mut auth: AuthSession<Users>) -> StatusCode {
    match auth.logout().await {
        Ok(_) => StatusCode::OK,
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

async fn visit(session: Session) -> &'static str {
    session.insert("visited", true).await.unwrap();
    "ok"
}

fn login_app<S: SessionStore + Clone>(store: TowerSessionsStore<S>) -> Router {
    let sessions = SessionManagerLayer::new(store)
        .with_secure(false)
        .with_expiry(Expiry::OnInactivity(time::Duration::minutes(30)));
    Router::new()
        .route("/visit", get(visit))
        .route("/login", get(login))
        .route("/me", get(protected))
        .route("/logout", get(logout))
        .layer(AuthManagerLayerBuilder::new(Users, sessions).build())
}

#[tokio::test]
async fn axum_login_works_across_two_instances_on_redis() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let [one, two] = two_instances(&server).map(login_app);
    let mut browser = Client::new(one.clone());

    // An anonymous session first; logging in moves it to a new id.
    browser.get("/visit").await;
    let anonymous = browser.cookie.clone().unwrap();
    assert_eq!(browser.get("/me").await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        browser.get("/login?user=alice").await.status,
        StatusCode::OK
    );
    let logged_in = browser.cookie.clone().unwrap();
    assert_ne!(anonymous, logged_in, "login cycles the id");

    // Either instance knows the user; the anonymous id is dead on both.
    for app in [&one, &two] {
        let reply = browser.on(app.clone()).get("/me").await;
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (StatusCode::OK, "alice")
        );
        let old = holding(app, &anonymous).get("/me").await;
        assert_eq!(old.status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(
        browser.get("/login?user=mallory").await.status,
        StatusCode::UNAUTHORIZED
    );

    // Logging out on the second instance logs out on the first.
    let mut on_two = browser.on(two.clone());
    assert_eq!(on_two.get("/logout").await.status, StatusCode::OK);
    assert_eq!(
        holding(&one, &logged_in).get("/me").await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn axum_login_keeps_working_through_a_redis_outage_on_the_fallback_store() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let proxy = Proxy::start(server.port()).await;
    let stores = [0, 1].map(|_| {
        let redis = RedisStore::new(fast_failing_backend(&proxy.url()))
            .with_timeout(Duration::from_millis(200));
        FallbackStore::new(redis)
    });
    let [one, two] = stores
        .clone()
        .map(|s| login_app(TowerSessionsStore::new(s)));
    let mut alice = Client::new(one.clone());
    assert_eq!(alice.get("/login?user=alice").await.status, StatusCode::OK);

    proxy.cut().await;
    // Alice's instance serves her from what it holds; Bob logs in while Redis is away.
    for _ in 0..3 {
        let reply = alice.get("/me").await;
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (StatusCode::OK, "alice")
        );
    }
    let mut bob = Client::new(one.clone());
    assert_eq!(bob.get("/login?user=bob").await.status, StatusCode::OK);
    assert_eq!(bob.get("/me").await.body, "bob");
    assert!(
        stores[0].status().journal_len > 0,
        "the outage's writes are journaled"
    );

    // Back: the journal is replayed, and the other instance knows both users.
    proxy.heal();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while stores[0].status().journal_len > 0 || stores[0].status().active {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            stores[0].status()
        );
        alice.get("/me").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (client, name) in [(&alice, "alice"), (&bob, "bob")] {
        let reply = client.on(two.clone()).get("/me").await;
        assert_eq!((reply.status, reply.body.as_str()), (StatusCode::OK, name));
    }
}

#[tokio::test]
async fn the_tower_sessions_0_15_trait_is_served_too() {
    use tower_sessions_core_015::{
        SessionStore as Store015,
        session::{Id, Record},
    };

    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = TowerSessionsStore::new(RedisStore::new(fast_failing_backend(&server.url())));
    let mut record = Record {
        id: Id::default(),
        data: serde_json::from_value(json!({"a": 1})).unwrap(),
        expiry_date: OffsetDateTime::now_utc() + time::Duration::hours(1),
    };
    Store015::create(&store, &mut record).await.unwrap();
    record.data.insert("b".into(), json!(2));
    Store015::save(&store, &record).await.unwrap();
    let loaded = Store015::load(&store, &record.id).await.unwrap().unwrap();
    assert_eq!(loaded.data, record.data);
    Store015::delete(&store, &record.id).await.unwrap();
    assert_eq!(Store015::load(&store, &record.id).await.unwrap(), None);
}
