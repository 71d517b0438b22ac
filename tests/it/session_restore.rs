//! Redis that comes back without its data: the sessions an instance held are written back,
//! with their data and their user's index; a session destroyed before the loss stays
//! destroyed; a restart that kept its data rewrites nothing.

use std::{collections::BTreeMap, time::Duration};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use tower_turnstile::{
    backend::RedisBackend,
    session::{Patch, Record, RedisStore, SessionKey, SessionStore, UserKey},
    tenant::Tenant,
};

use crate::support::{RedisServer, proxy::Proxy};

/// One instance's store, its copy kept for restoring only.
fn instance(server: &RedisServer) -> RedisStore {
    RedisStore::new(RedisBackend::new(&server.url()).unwrap())
        .with_key_prefix("restore:")
        .with_restore_copy(RedisStore::SUGGESTED_COPY_CAPACITY)
}

fn random_key() -> SessionKey {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).unwrap();
    SessionKey::from_hash(&Tenant::default(), &URL_SAFE_NO_PAD.encode(bytes)).unwrap()
}

fn record(n: &str, user: Option<&str>) -> Record {
    let mut record = Record::new(Duration::from_secs(3600), Duration::from_secs(24 * 3600));
    record.data = BTreeMap::from([("n".to_owned(), n.to_owned())]);
    record.user = user.map(str::to_owned);
    record
}

/// Creates a session on `store` and reads it back, as a request would: the copy holds it.
async fn held(store: &RedisStore, n: &str, user: Option<&str>) -> SessionKey {
    let key = random_key();
    store.create(&key, &record(n, user)).await.unwrap();
    store.load(&key).await.unwrap().expect("just created");
    key
}

async fn n_of(store: &RedisStore, key: &SessionKey) -> Option<String> {
    let record = store.load(key).await.ok()??;
    record.data.get("n").cloned()
}

/// Loads `key` on `store` until Redis answers again (its connection comes back after a
/// restart), for up to 10 s.
async fn once_back(store: &RedisStore, key: &SessionKey) -> Option<Record> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match store.load(key).await {
            Ok(found) => return found,
            Err(error) => assert!(std::time::Instant::now() < deadline, "{error}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn held_sessions_come_back_after_redis_restarts_empty() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let (a, b) = (instance(&server), instance(&server));
    let alice = held(&a, "1", Some("alice")).await;
    let destroyed_elsewhere = held(&a, "2", None).await;
    let destroyed_here = held(&a, "3", None).await;
    let written = held(&a, "4", None).await;
    let bobs = held(&b, "5", Some("bob")).await;
    // Created and never read: held from its creation, as the connection tracks reads.
    let fresh = random_key();
    a.create(&fresh, &record("6", Some("carol"))).await.unwrap();

    // Before the loss: one destroyed by the other instance, one here, one written here.
    b.load(&destroyed_elsewhere).await.unwrap();
    b.delete(&destroyed_elsewhere, None).await.unwrap();
    a.delete(&destroyed_here, None).await.unwrap();
    let mut patch = Patch::default();
    patch.set.push(("n".to_owned(), "40".to_owned()));
    a.update(&written, &patch).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while a.local_copy_stats().invalidations == 0 {
        assert!(std::time::Instant::now() < deadline, "the destroy is heard");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    server.restart();
    assert_eq!(server.cli(&["DBSIZE"]).trim(), "0", "Redis came back empty");

    let back = once_back(&a, &alice)
        .await
        .expect("alice's session is back");
    assert_eq!(back.data["n"], "1");
    assert_eq!(back.user.as_deref(), Some("alice"));
    let listed = a
        .list_user_sessions(&UserKey::new(&Tenant::default(), "alice"))
        .await
        .unwrap();
    assert_eq!(listed.len(), 1, "the user's index is back too");
    assert_eq!(n_of(&a, &written).await.as_deref(), Some("40"));
    assert_eq!(
        n_of(&a, &destroyed_elsewhere).await,
        None,
        "destroyed elsewhere"
    );
    assert_eq!(n_of(&a, &destroyed_here).await, None, "destroyed here");
    assert_eq!(
        n_of(&a, &fresh).await.as_deref(),
        Some("6"),
        "created, never read"
    );
    assert_eq!(a.local_copy_stats().restored, 3);
    // The other instance writes back what it held, and not what another destroyed.
    let bob = once_back(&b, &bobs).await.expect("bob's session is back");
    assert_eq!(bob.data["n"], "5");
    assert_eq!(b.local_copy_stats().restored, 1);
    // Restored sessions live on: a write to one lands.
    a.update(&alice, &patch).await.unwrap();
    assert_eq!(n_of(&b, &alice).await.as_deref(), Some("40"));
}

#[tokio::test]
async fn a_restart_that_kept_its_data_rewrites_nothing() {
    let Some(mut server) = RedisServer::start_persistent() else {
        return;
    };
    let a = instance(&server);
    let key = held(&a, "1", Some("alice")).await;
    let monitor_before = server.cli(&["INFO", "commandstats"]);
    assert!(
        !monitor_before.contains("cmdstat_eval:"),
        "{monitor_before}"
    );

    server.stop();
    server.restart();
    let back = once_back(&a, &key).await.expect("kept by Redis itself");
    assert_eq!(back.data["n"], "1");
    assert_eq!(a.local_copy_stats().restored, 0);
    let stats = server.cli(&["INFO", "commandstats"]);
    assert!(
        !stats.contains("cmdstat_eval:"),
        "nothing written back: {stats}"
    );
    // Another server process answers (its run id): the latest writes could have been lost, so
    // the store asked which of its sessions Redis still has.
    assert!(stats.contains("cmdstat_exists:"), "{stats}");
}

/// Reads are never served from a copy kept only for restoring: a write on another instance
/// is seen at once.
#[tokio::test]
async fn a_restore_copy_never_serves_reads() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (a, b) = (instance(&server), instance(&server));
    let key = held(&a, "1", None).await;
    for round in 0..200 {
        let value = round.to_string();
        let mut patch = Patch::default();
        patch.set.push(("n".to_owned(), value.clone()));
        b.update(&key, &patch).await.unwrap();
        assert_eq!(n_of(&a, &key).await.as_deref(), Some(value.as_str()));
    }
    assert_eq!(a.local_copy_stats().hits, 0);
}

/// A flush is deliberate: the sessions it removed are not written back.
#[tokio::test]
async fn a_flush_is_not_undone() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let a = instance(&server);
    let key = held(&a, "1", None).await;
    server.cli(&["FLUSHALL"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while a.local_copy_stats().entries > 0 {
        assert!(std::time::Instant::now() < deadline, "the flush is heard");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(a.load(&key).await.unwrap(), None);
    assert_eq!(a.local_copy_stats().restored, 0);
}

/// A failover to a replica that had not received the latest writes: the marker came along,
/// but the server answering is another process (its run id). The sessions the instance held
/// that the new master lacks are written back; the ones it has are left alone.
#[tokio::test]
async fn a_failover_that_lost_the_latest_writes_writes_back_what_is_missing() {
    let Some(master) = RedisServer::start() else {
        return;
    };
    let Some(replica) = RedisServer::start_replica_of(&master) else {
        return;
    };
    let proxy = Proxy::start(master.port()).await;
    let store = RedisStore::new(RedisBackend::new(&proxy.url()).unwrap())
        .with_key_prefix("restore:")
        .with_restore_copy(RedisStore::SUGGESTED_COPY_CAPACITY);
    let replicated = held(&store, "1", Some("alice")).await;

    // The replica has everything so far, then stops following: what comes next is lost.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while replica.cli(&["DBSIZE"]).trim() != master.cli(&["DBSIZE"]).trim() {
        assert!(
            std::time::Instant::now() < deadline,
            "the replica catches up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    replica.cli(&["REPLICAOF", "NO", "ONE"]);
    let unreplicated = held(&store, "2", Some("bob")).await;

    // The failover: the same address now reaches the promoted replica.
    proxy.cut().await;
    proxy.retarget(replica.port());
    proxy.heal();
    let back = once_back(&store, &unreplicated)
        .await
        .expect("bob's session is written back");
    assert_eq!(back.data["n"], "2");
    assert_eq!(back.user.as_deref(), Some("bob"));
    assert_eq!(n_of(&store, &replicated).await.as_deref(), Some("1"));
    assert_eq!(store.local_copy_stats().restored, 1, "only the missing one");
    let bobs = store
        .list_user_sessions(&UserKey::new(&Tenant::default(), "bob"))
        .await
        .unwrap();
    assert_eq!(bobs.len(), 1, "with its user's index");
}
