//! A Redis Cluster on loopback (three masters, a replica each): the layers spread their keys
//! over every master, and carry requests through a master's death until its replica is
//! promoted, then continue on it without a restart.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use http::StatusCode;
use tower_turnstile::backend::RedisBackend;

use crate::support::{
    RedisCluster,
    drill::{self, hit, limited, sessions},
    http::Client,
    session_app::fast_breaker,
};

fn backend(cluster: &RedisCluster) -> RedisBackend {
    RedisBackend::cluster_builder(cluster.urls())
        .connect_timeout(Duration::from_millis(200))
        .breaker(fast_breaker())
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_listing_and_revocation_work_across_slots() {
    let Some(cluster) = RedisCluster::start_masters_only() else {
        return;
    };
    let (app, _) = sessions(&backend(&cluster));
    // Several sessions of one user: each hashes to its own slot, the index to another.
    let mut devices = Vec::new();
    for device in 0..6 {
        let mut client = Client::new(app.clone());
        client.post(&format!("/set/device/{device}")).await;
        assert_eq!(client.post("/login/alice").await.status, StatusCode::OK);
        devices.push(client);
    }
    let spread = cluster.keys_per_master();
    assert!(
        spread.iter().filter(|&&keys| keys > 0).count() >= 2,
        "keys per master: {spread:?}"
    );
    assert_eq!(devices[0].get("/sessions").await.body, "6");
    // A new id for a logged-in session: still one session of hers, listed once.
    let before = devices[1].cookie.clone();
    assert_eq!(devices[1].post("/cycle").await.status, StatusCode::OK);
    assert_ne!(devices[1].cookie, before);
    assert_eq!(devices[1].get("/user").await.body, "alice");
    assert_eq!(devices[0].get("/sessions").await.body, "6");
    assert_eq!(devices[3].get("/get/device").await.body, "\"3\"");
    assert_eq!(devices[0].post("/logout-all").await.body, "6");
    for device in &mut devices[1..] {
        assert_eq!(device.get("/user").await.body, "anonymous", "revoked");
    }
    let left: Vec<String> = cluster
        .keys()
        .into_iter()
        .filter(|key| key.contains(":session:") || key.contains(":user:"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layers_survive_a_master_dying_mid_load() {
    let Some(mut cluster) = RedisCluster::start() else {
        return;
    };
    let backend = backend(&cluster);
    let (app, store) = sessions(&backend);
    let (limited, limiter) = limited(&backend, 1_000_000);
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(drill::run(app.clone(), limited, 12, Arc::clone(&stop)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spread = cluster.keys_per_master();
    assert!(
        spread.iter().all(|&keys| keys > 0),
        "keys on every master before the kill: {spread:?}"
    );

    let killed = Instant::now();
    cluster.kill_master(0);
    cluster.wait_until_ok();
    let promoted = killed.elapsed();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(backend.ping().await.is_ok() && backend.status().healthy) {
        assert!(Instant::now() < deadline, "the backend did not recover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovered = killed.elapsed();
    // Let the clients run on the new topology for a while.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let report = load.await.unwrap();
    eprintln!(
        "cluster drill: {} requests, {} server errors, longest {:?}; replica promoted {:?} and \
         the backend healthy {:?} after the kill; {} rate-limit decisions by the fallback",
        report.requests(),
        report.server_errors(),
        report.longest(),
        promoted,
        recovered,
        limiter.fallback_decisions()
    );
    assert_eq!(report.server_errors(), 0);
    // Every client's last acknowledged write is in the cluster once the journal has replayed.
    drill::assert_nothing_lost(&report, &store, &app).await;
    let sessions_in_cluster = cluster
        .keys()
        .iter()
        .filter(|key| key.contains(":session:"))
        .count();
    assert_eq!(sessions_in_cluster, report.clients.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_wants_a_password() {
    let Some(cluster) = RedisCluster::start_masters_only_with_password("cluster-secret") else {
        return;
    };
    let seeds: Vec<String> = cluster
        .nodes
        .iter()
        .map(|node| format!("redis://:cluster-secret@127.0.0.1:{}", node.port()))
        .collect();
    let backend = RedisBackend::cluster(seeds).unwrap();
    let (app, _) = sessions(&backend);
    let mut client = Client::new(app);
    client.post("/set/colour/teal").await;
    assert_eq!(client.post("/login/alice").await.status, StatusCode::OK);
    assert_eq!(client.get("/get/colour").await.body, "\"teal\"");
    assert_eq!(client.get("/sessions").await.body, "1");
    let (limited, limiter) = limited(&backend, 3);
    let statuses = [
        hit(&limited).await,
        hit(&limited).await,
        hit(&limited).await,
        hit(&limited).await,
    ];
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    assert_eq!(limiter.fallback_decisions(), 0, "decided in the cluster");
    let shown = format!("{backend:?} {:?}", backend.status());
    assert!(!shown.contains("secret"), "{shown}");
    assert!(shown.contains("cluster via 127.0.0.1:"), "{shown}");

    // Without the password the cluster cannot be used: the layers fall back.
    let urls = cluster.urls();
    let anonymous = RedisBackend::cluster(urls).unwrap();
    let error = anonymous.ping().await.unwrap_err();
    assert!(error.is_outage(), "{error:?}");
}
