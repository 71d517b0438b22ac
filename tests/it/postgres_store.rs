//! `PostgresStore` beyond the conformance suite: batched cleanup, bad rows, the read that
//! writes only when its slide is due, outages, and the session layer on it. Every test runs
//! against the machine's PostgreSQL, in a schema of its own.

use std::time::Duration;

use axum::http::StatusCode;
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use sqlx::PgPool;
use tower_turnstile::{
    session::{Patch, PostgresStore, Record, SessionKey, SessionLayer, SessionStore, Written},
    tenant::Tenant,
};

use crate::support::{
    http::Client,
    postgres::PgSchema,
    session_app::{app, event},
};

async fn store() -> Option<(PgSchema, PostgresStore)> {
    let schema = PgSchema::create().await?;
    let store = PostgresStore::new(schema.pool());
    store.migrate().await.expect("migrate");
    Some((schema, store))
}

fn random_key() -> SessionKey {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).unwrap();
    SessionKey::from_hash(&Tenant::default(), &URL_SAFE_NO_PAD.encode(bytes)).unwrap()
}

fn record(idle: Duration) -> Record {
    let mut record = Record::new(idle, Duration::from_secs(3600));
    record.data.insert("a".into(), "1".into());
    record
}

async fn rows(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM turnstile_sessions")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Expired rows go in batches of at most the configured size; live rows stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_deletes_expired_rows_in_bounded_batches() {
    let Some((_schema, store)) = store().await else {
        return;
    };
    let store = store.with_cleanup_batch(10);
    let mut live = Vec::new();
    for _ in 0..5 {
        let key = random_key();
        store
            .create(&key, &record(Duration::from_secs(600)))
            .await
            .unwrap();
        live.push(key);
    }
    for _ in 0..35 {
        store
            .create(&random_key(), &record(Duration::from_millis(1)))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(rows(store.pool()).await, 40);

    assert_eq!(
        store.cleanup_batch().await.unwrap(),
        10,
        "one batch, at most 10"
    );
    assert_eq!(rows(store.pool()).await, 30);
    assert_eq!(
        store.cleanup().await.unwrap(),
        25,
        "the rest, batch by batch"
    );
    assert_eq!(store.cleanup().await.unwrap(), 0);
    assert_eq!(rows(store.pool()).await, 5);
    for key in &live {
        assert!(store.load(key).await.unwrap().is_some(), "live rows stay");
    }
}

/// The cleanup task deletes expired rows by itself, and stops when its handle is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cleanup_task_runs_until_dropped() {
    let Some((_schema, store)) = store().await else {
        return;
    };
    for _ in 0..3 {
        store
            .create(&random_key(), &record(Duration::from_millis(1)))
            .await
            .unwrap();
    }
    let task = store.spawn_cleanup(Duration::from_millis(50));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while rows(store.pool()).await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the task deleted nothing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(task);
    tokio::time::sleep(Duration::from_millis(50)).await;
    store
        .create(&random_key(), &record(Duration::from_millis(1)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        rows(store.pool()).await,
        1,
        "a dropped task deletes nothing"
    );
}

/// A row whose data is not a JSON object (wrong type) reads as no session and is deleted; a
/// save to one answers `Missing`, and through the layer the next write starts a new session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_are_no_session_and_are_replaced() {
    let Some((_schema, store)) = store().await else {
        return;
    };
    let pool = store.pool().clone();
    for bad in ["[1, 2]", "\"text\"", "null", "3"] {
        let key = random_key();
        store
            .create(&key, &record(Duration::from_secs(600)))
            .await
            .unwrap();
        let set = format!("UPDATE turnstile_sessions SET data = '{bad}'::jsonb WHERE id = $1");
        sqlx::query(&set)
            .bind(key.hash())
            .execute(&pool)
            .await
            .unwrap();
        assert_eq!(store.load(&key).await.unwrap(), None, "{bad}");
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM turnstile_sessions WHERE id = $1")
            .bind(key.hash())
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(left, 0, "{bad}: the bad row is removed");

        let key = random_key();
        store
            .create(&key, &record(Duration::from_secs(600)))
            .await
            .unwrap();
        sqlx::query(&set)
            .bind(key.hash())
            .execute(&pool)
            .await
            .unwrap();
        let mut patch = Patch::default();
        patch.set = vec![("b".into(), "2".into())];
        assert_eq!(
            store.update(&key, &patch).await.unwrap(),
            Written::Missing,
            "{bad}"
        );
        assert_eq!(
            store.load(&key).await.unwrap(),
            None,
            "{bad}: not written into"
        );
    }

    // Through the layer: a client whose session row went bad gets a new session on its next
    // write, with nothing of the old one.
    let mut client = Client::new(app(SessionLayer::new(store.clone())));
    assert_eq!(client.post("/bump/n").await.body, "1");
    sqlx::query("UPDATE turnstile_sessions SET data = '[]'::jsonb")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(client.get("/get/n").await.body, "none");
    let reply = client.post("/bump/n").await;
    assert_eq!((reply.status, reply.body.as_str()), (StatusCode::OK, "1"));
    assert!(reply.set_cookie().is_some(), "a new cookie");
    assert_eq!(rows(&pool).await, 1, "only the new session is left");
}

/// A read writes only when the inactivity deadline has fallen behind by more than a sixteenth
/// of the timeout: reads in quick succession leave the row as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_write_only_when_the_slide_is_due() {
    let Some((_schema, store)) = store().await else {
        return;
    };
    let version = |key: SessionKey| {
        let pool = store.pool().clone();
        async move {
            sqlx::query_as::<_, (i64, i64)>(
                "SELECT version, idle_until FROM turnstile_sessions WHERE id = $1",
            )
            .bind(key.hash())
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    // 1.6 s of inactivity: a slide is due once the deadline is 100 ms behind.
    let key = random_key();
    store
        .create(&key, &record(Duration::from_millis(1600)))
        .await
        .unwrap();
    let created = version(key.clone()).await;
    for _ in 0..5 {
        assert!(store.load(&key).await.unwrap().is_some());
    }
    assert_eq!(
        version(key.clone()).await,
        created,
        "no write for fresh reads"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(store.load(&key).await.unwrap().is_some());
    let (_, slid) = version(key.clone()).await;
    assert!(
        slid >= created.1 + 300,
        "the deadline moved: {slid} vs {}",
        created.1
    );
}

/// A database that cannot be reached is an outage, within the deadline, never a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_an_outage() {
    // Port 1 refuses connections at once.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(300))
        .connect_lazy("postgres://postgres@127.0.0.1:1/test")
        .unwrap();
    let store = PostgresStore::new(pool).with_timeout(Duration::from_millis(500));
    let error = store.load(&random_key()).await.unwrap_err();
    assert!(error.is_outage(), "{error:?}");
    let error = store
        .create(&random_key(), &record(Duration::from_secs(1)))
        .await
        .unwrap_err();
    assert!(error.is_outage(), "{error:?}");

    // Through the layer (fail-open by default): reads answer, with an empty session.
    let mut client = Client::new(app(SessionLayer::new(store)));
    client.cookie = Some(format!("id={}", "A".repeat(22)));
    let reply = client.get("/get/n").await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::OK, "none")
    );
}

/// Several instances migrating at once (a rolling deploy) all succeed; so does a second run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_may_run_at_once_and_again() {
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    let stores: Vec<_> = (0..4).map(|_| PostgresStore::new(schema.pool())).collect();
    let runs = stores.iter().map(|store| store.migrate());
    for result in futures_util::future::join_all(runs).await {
        result.expect("migrate");
    }
    stores[0].migrate().await.expect("again");
    // Another table, in another schema.
    let other = PostgresStore::new(schema.pool())
        .try_with_table(&format!("{}.sessions_v2", schema.name))
        .unwrap();
    other.migrate().await.unwrap();
    other
        .create(&random_key(), &record(Duration::from_secs(60)))
        .await
        .unwrap();
    assert!(
        PostgresStore::new(schema.pool())
            .try_with_table("Robert'); DROP")
            .is_err()
    );
    assert!(
        PostgresStore::new(schema.pool())
            .try_with_table("a.b.c")
            .is_err()
    );
}

/// The layer on PostgreSQL: counters, a login that changes the id, listing and ending a user's
/// sessions across two instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layer_on_postgres_logs_in_lists_and_revokes() {
    let Some((schema, store)) = store().await else {
        return;
    };
    let one = app(SessionLayer::new(store));
    let two = app(SessionLayer::new(PostgresStore::new(schema.pool())));
    let mut phone = Client::new(one.clone());
    let mut laptop = Client::new(two.clone());
    for c in [&mut phone, &mut laptop] {
        assert_eq!(c.post("/bump/n").await.body, "1");
        let before = c.cookie.clone();
        let reply = c.post("/login/alice").await;
        assert_eq!(event(&reply), Some("Cycled"));
        assert_ne!(c.cookie, before, "a login changes the id");
        assert_eq!(c.get("/get/n").await.body, "1", "and keeps the data");
    }
    // Each client's session is readable through the other instance.
    let mut phone_on_two = phone.on(two.clone());
    assert_eq!(phone_on_two.get("/user").await.body, "alice");
    assert_eq!(phone_on_two.get("/sessions").await.body, "2");
    assert_eq!(phone.post("/logout-all").await.body, "2");
    assert_eq!(laptop.get("/user").await.body, "anonymous");
    assert_eq!(laptop.get("/get/n").await.body, "none");
}
