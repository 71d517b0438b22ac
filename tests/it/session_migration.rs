//! `MigrationStore` moving live sessions from PostgreSQL to Redis under traffic, through a
//! cut-over, and with the old store failing. Real `redis-server` and the machine's PostgreSQL.

use std::time::{Duration, Instant, SystemTime};

use axum::{Router, http::StatusCode};
use tower_turnstile::{
    backend::RedisBackend,
    session::{FailurePolicy, MigrationStore, PostgresStore, RedisStore, SessionLayer},
};

use crate::support::{
    RedisServer,
    http::{Client, Reply},
    postgres::PgSchema,
    proxy::Proxy,
    session_app::app,
};

fn ok(reply: &Reply, body: &str) {
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (StatusCode::OK, body),
        "{reply:?}"
    );
}

fn redis_store(url: &str) -> RedisStore {
    RedisStore::new(RedisBackend::new(url).unwrap()).with_key_prefix("moved:")
}

fn sessions_in(server: &RedisServer) -> usize {
    server
        .cli(&["--scan", "--pattern", "moved:*:session:*"])
        .lines()
        .count()
}

/// Sixteen users with sessions in PostgreSQL; two instances switch to the move and serve them
/// for two seconds, through a cut-over one second in; afterwards Redis alone holds every
/// session, user and acknowledged count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_move_under_traffic_and_none_is_lost() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    let database = PostgresStore::new(schema.pool());
    database.migrate().await.unwrap();

    // Before the move: the sessions live in PostgreSQL.
    let before: Router = app(SessionLayer::new(database.clone()));
    let mut clients = Vec::new();
    for i in 0..16 {
        let mut c = Client::new(before.clone());
        ok(&c.post("/bump/n").await, "1");
        ok(&c.post(&format!("/login/user{i}")).await, "");
        clients.push((c, 1u64));
    }

    // The move: both instances at once, writing both stores until the cut-over.
    let cut_over = SystemTime::now() + Duration::from_secs(1);
    let instance = || {
        let moving = MigrationStore::new(database.clone(), redis_store(&server.url()))
            .with_cut_over(cut_over);
        app(SessionLayer::new(moving).with_failure_policy(FailurePolicy::fail_closed_on_write()))
    };
    let instances = [instance(), instance()];
    let stop = Instant::now() + Duration::from_secs(2);
    let mut tasks = Vec::new();
    for (i, (client, mut count)) in clients.into_iter().enumerate() {
        let instances = instances.clone();
        tasks.push(tokio::spawn(async move {
            let mut turn = i;
            let mut c = client;
            while Instant::now() < stop {
                c = c.on(instances[turn % 2].clone());
                turn += 1;
                if turn % 3 == 0 {
                    ok(&c.get("/get/n").await, &count.to_string());
                    ok(&c.get("/user").await, &format!("user{i}"));
                } else {
                    let reply = c.post("/bump/n").await;
                    count += 1;
                    ok(&reply, &count.to_string());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (i, c, count)
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.expect("no client failed"));
    }
    assert_eq!(sessions_in(&server), 16, "every session moved");

    // After the move: Redis alone.
    let after = app(SessionLayer::new(redis_store(&server.url())));
    let mut requests = 0;
    for (i, c, count) in &results {
        let mut c = c.on(after.clone());
        ok(&c.get("/get/n").await, &count.to_string());
        ok(&c.get("/user").await, &format!("user{i}"));
        requests += count;
    }
    eprintln!(
        "moved 16 sessions under traffic; their acknowledged counts (sum {requests}) all in Redis"
    );
    // After the cut-over PostgreSQL was no longer written: its counts stayed behind.
    let (_, c, count) = &results[0];
    let stale = c.on(before.clone()).get("/get/n").await;
    assert_ne!(
        stale.body,
        count.to_string(),
        "the old store stopped at the cut-over"
    );
}

/// A destroyed session is never copied back from the old store, and "log out everywhere"
/// reaches sessions in both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_sessions_stay_ended_in_both_stores() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    let database = PostgresStore::new(schema.pool());
    database.migrate().await.unwrap();
    let before = app(SessionLayer::new(database.clone()));
    let moving = app(SessionLayer::new(MigrationStore::new(
        database.clone(),
        redis_store(&server.url()),
    )));
    let mut phone = Client::new(before.clone());
    phone.post("/login/alice").await;
    let mut laptop = Client::new(before.clone());
    laptop.post("/login/alice").await;
    // The phone's session moves; the laptop's stays in PostgreSQL.
    let mut phone = phone.on(moving.clone());
    ok(&phone.get("/user").await, "alice");
    ok(&phone.get("/sessions").await, "2");
    let old_cookie = phone.cookie.clone();
    phone.post("/destroy").await;
    let mut replay = phone.on(moving.clone());
    replay.cookie = old_cookie;
    ok(&replay.get("/user").await, "anonymous");

    let mut laptop = laptop.on(moving.clone());
    ok(&laptop.post("/logout-all").await, "1");
    ok(&laptop.get("/user").await, "anonymous");
    ok(&laptop.on(before.clone()).get("/user").await, "anonymous");
}

/// The old store cut off: moved sessions are read and written as before, new visitors get
/// sessions, and a session that has not moved reads as unavailable (empty), never a `5xx`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_old_store_costs_only_the_sessions_not_moved() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    PostgresStore::new(schema.pool()).migrate().await.unwrap();
    let proxy = Proxy::start(schema.port()).await;
    let database = PostgresStore::new(schema.pool_through(proxy.port()))
        .with_timeout(Duration::from_millis(300));
    let before = app(SessionLayer::new(database.clone()));
    let moving = app(SessionLayer::new(MigrationStore::new(
        database,
        redis_store(&server.url()),
    )));
    let mut moved = Client::new(before.clone());
    ok(&moved.post("/bump/n").await, "1");
    let mut moved = moved.on(moving.clone());
    ok(&moved.get("/get/n").await, "1");
    let mut waiting = Client::new(before.clone());
    ok(&waiting.post("/bump/n").await, "1");
    let mut waiting = waiting.on(moving.clone());

    proxy.cut().await;
    ok(&moved.post("/bump/n").await, "2");
    ok(&moved.get("/get/n").await, "2");
    let mut newcomer = Client::new(moving.clone());
    ok(&newcomer.post("/bump/n").await, "1");
    ok(&newcomer.get("/get/n").await, "1");
    let reply = waiting.get("/get/n").await;
    ok(&reply, "none");

    proxy.heal();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let reply = waiting.get("/get/n").await;
        if reply.body == "1" {
            break;
        }
        assert!(Instant::now() < deadline, "{reply:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ok(&waiting.post("/bump/n").await, "2");
}
