//! `ChainStore`, Redis in front of PostgreSQL, under faults: Redis killed and restarted,
//! PostgreSQL cut off, one instance cut off from Redis while another still reaches it. Real
//! `redis-server` processes and the machine's PostgreSQL (a schema per test).

use std::time::{Duration, Instant};

use axum::{Router, http::StatusCode};
use tower_turnstile::session::{
    ChainStore, FailurePolicy, PostgresStore, RedisStore, SessionLayer,
};

use crate::support::{
    RedisServer,
    http::{Client, Reply},
    postgres::PgSchema,
    proxy::Proxy,
    session_app::{app, fast_failing_backend},
};

fn chain(redis_url: &str, pool: sqlx::PgPool) -> ChainStore {
    let redis =
        RedisStore::new(fast_failing_backend(redis_url)).with_timeout(Duration::from_millis(200));
    let database = PostgresStore::new(pool).with_timeout(Duration::from_millis(500));
    ChainStore::new(redis, database).with_generation_refresh(Duration::from_millis(100))
}

fn instance(store: &ChainStore) -> Router {
    app(SessionLayer::new(store.clone()).with_failure_policy(FailurePolicy::fail_closed_on_write()))
}

fn ok(reply: &Reply, body: &str) {
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::OK, body),
        "{reply:?}"
    );
}

async fn migrated(schema: &PgSchema) {
    PostgresStore::new(schema.pool())
        .migrate()
        .await
        .expect("migrate");
}

fn copies_in(server: &RedisServer) -> usize {
    server
        .cli(&["--scan", "--pattern", "*:session:*"])
        .lines()
        .count()
}

/// Redis killed: sessions come from PostgreSQL, writes are kept there, no request fails.
/// Redis back (empty): sessions are copied into it again and served from it, so that
/// PostgreSQL cut off afterwards still leaves them readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_then_back_sessions_go_on_from_postgres_then_redis() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    migrated(&schema).await;
    let database = Proxy::start(schema.port()).await;
    let store = chain(&server.url(), schema.pool_through(database.port()));
    let mut client = Client::new(instance(&store));
    ok(&client.post("/bump/n").await, "1");
    client.post("/login/alice").await;
    ok(&client.post("/bump/n").await, "2");
    assert_eq!(copies_in(&server), 0, "a write drops the copy");
    ok(&client.get("/get/n").await, "2");
    assert_eq!(copies_in(&server), 1, "a read makes it again");

    server.stop();
    for _ in 0..3 {
        ok(&client.get("/get/n").await, "2");
        ok(&client.get("/user").await, "alice");
    }
    ok(&client.post("/bump/n").await, "3");
    let mut newcomer = Client::new(instance(&store));
    ok(&newcomer.post("/set/k/v").await, "ok");

    server.restart();
    let back = Instant::now();
    while !store.redis().backend().status().healthy {
        assert!(
            back.elapsed() < Duration::from_secs(5),
            "Redis not healthy again"
        );
        ok(&client.get("/get/n").await, "3");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ok(&client.get("/get/n").await, "3");
    ok(&newcomer.get("/get/k").await, "\"v\"");
    assert!(copies_in(&server) >= 2, "copied into Redis again");

    // PostgreSQL cut off: the copies answer.
    database.cut().await;
    ok(&client.get("/get/n").await, "3");
    ok(&client.get("/user").await, "alice");
    ok(&newcomer.get("/get/k").await, "\"v\"");
}

/// PostgreSQL cut off: reads of sessions Redis holds answer, other reads see no session, writes
/// answer `503` (fail-closed on write), reads never `5xx`. Healed, writes are kept again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cut_off_reads_answer_and_writes_are_refused() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    migrated(&schema).await;
    let database = Proxy::start(schema.port()).await;
    let store = chain(&server.url(), schema.pool_through(database.port()));
    let mut client = Client::new(instance(&store));
    ok(&client.post("/bump/n").await, "1");
    ok(&client.get("/get/n").await, "1");

    database.cut().await;
    ok(&client.get("/get/n").await, "1");
    let refused = client.post("/bump/n").await;
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{refused:?}"
    );
    let mut stranger = Client::new(instance(&store));
    stranger.cookie = Some(format!("id={}", "B".repeat(22)));
    ok(&stranger.get("/get/n").await, "none");

    database.heal();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let reply = client.post("/bump/n").await;
        if reply.status == StatusCode::OK {
            ok(&reply, "2");
            break;
        }
        assert!(Instant::now() < deadline, "{reply:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ok(&client.get("/get/n").await, "2");
}

/// One instance cut off from Redis writes to PostgreSQL and cannot drop Redis's copy: it moves
/// every instance to a new generation of copies, so the other instance, which still reads
/// Redis, sees the write within the refresh interval, never the stale copy after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_an_instance_could_not_drop_is_not_served_past_the_refresh() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    migrated(&schema).await;
    let redis_for_a = Proxy::start(server.port()).await;
    let a = chain(&redis_for_a.url(), schema.pool());
    let b = chain(&server.url(), schema.pool());
    let mut on_a = Client::new(instance(&a));
    ok(&on_a.post("/bump/n").await, "1");
    let mut on_b = on_a.on(instance(&b));
    ok(&on_b.get("/get/n").await, "1");
    let before = a.generation();

    redis_for_a.cut().await;
    ok(&on_a.post("/bump/n").await, "2");
    assert!(a.generation() > before, "a new generation");
    tokio::time::sleep(Duration::from_millis(250)).await;
    ok(&on_b.get("/get/n").await, "2");
    assert_eq!(b.generation(), a.generation(), "the other instance follows");
    ok(&on_b.post("/bump/n").await, "3");

    redis_for_a.heal();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !a.redis().backend().status().healthy {
        assert!(Instant::now() < deadline);
        on_a.get("/get/n").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ok(&on_a.get("/get/n").await, "3");
}
