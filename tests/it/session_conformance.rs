//! One conformance suite, written once, run against every session store: memory, Redis
//! (single, cluster, with fallback) and PostgreSQL.
//! Each test takes the store through the `SessionStore` trait, and the same promises must hold.

use std::{sync::Arc, time::Duration};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use tower_turnstile::{
    StoreError,
    backend::RedisBackend,
    session::{
        FallbackStore, Lifetime, ManualClock, MemoryStore, MigrationStore, Patch, Record,
        RedisStore, SessionKey, SessionStore, UserKey, Written,
    },
    tenant::Tenant,
};

use crate::support::{RedisCluster, RedisServer};

/// A store under test, and what keeps its storage alive.
struct Fixture {
    store: Arc<dyn SessionStore>,
    /// Cut off from shared storage: asked for a session it does not hold, the store answers
    /// "unavailable" rather than "none", since it cannot know.
    cut_off: bool,
    twin: Box<dyn Fn() -> Arc<dyn SessionStore> + Send + Sync>,
    /// The store's clock, where the store decides expiry itself; Redis expires keys on its
    /// own clock, so time there passes for real.
    clock: Option<ManualClock>,
    _redis: Option<RedisServer>,
    _cluster: Option<RedisCluster>,
    #[cfg(feature = "postgres")]
    _postgres: Option<crate::support::postgres::PgSchema>,
}

impl Fixture {
    fn memory() -> Option<Self> {
        let clock = ManualClock::new();
        let store = MemoryStore::builder().clock(clock.clone()).build();
        let shared = store.clone();
        Some(Self {
            store: Arc::new(store),
            twin: Box::new(move || Arc::new(shared.clone())),
            clock: Some(clock),
            _redis: None,
            _cluster: None,
            cut_off: false,
            #[cfg(feature = "postgres")]
            _postgres: None,
        })
    }

    /// A move between two memory stores on one clock: the suite's sessions are written to both
    /// and read from the new one.
    fn migration() -> Option<Self> {
        let clock = ManualClock::new();
        let old = MemoryStore::builder().clock(clock.clone()).build();
        let new = MemoryStore::builder().clock(clock.clone()).build();
        let (old_twin, new_twin) = (old.clone(), new.clone());
        Some(Self {
            store: Arc::new(MigrationStore::new(old, new)),
            twin: Box::new(move || {
                Arc::new(MigrationStore::new(old_twin.clone(), new_twin.clone()))
            }),
            clock: Some(clock),
            _redis: None,
            _cluster: None,
            cut_off: false,
            #[cfg(feature = "postgres")]
            _postgres: None,
        })
    }

    /// A Redis Cluster of three masters; every instance connects through all of them as seeds.
    fn cluster() -> Option<Self> {
        let cluster = RedisCluster::start_masters_only()?;
        let urls = cluster.urls();
        let make = move || -> Arc<dyn SessionStore> {
            let backend = RedisBackend::cluster(urls.clone()).expect("backend");
            Arc::new(RedisStore::new(backend).with_key_prefix("conf:"))
        };
        Some(Self {
            store: make(),
            twin: Box::new(make),
            clock: None,
            _redis: None,
            _cluster: Some(cluster),
            cut_off: false,
            #[cfg(feature = "postgres")]
            _postgres: None,
        })
    }

    fn redis() -> Option<Self> {
        let server = RedisServer::start()?;
        let url = server.url();
        let make = move || -> Arc<dyn SessionStore> {
            // A separate backend (its own connection and breaker), as another instance has.
            Arc::new(
                RedisStore::new(RedisBackend::new(&url).expect("backend")).with_key_prefix("conf:"),
            )
        };
        Some(Self {
            store: make(),
            twin: Box::new(make),
            clock: None,
            _redis: Some(server),
            _cluster: None,
            cut_off: false,
            #[cfg(feature = "postgres")]
            _postgres: None,
        })
    }

    /// Redis in front, healthy: every instance has its own local copy and one shared Redis.
    fn fallback() -> Option<Self> {
        let server = RedisServer::start()?;
        let url = server.url();
        let make = move || -> Arc<dyn SessionStore> {
            let redis = RedisStore::new(RedisBackend::new(&url).expect("backend"));
            Arc::new(FallbackStore::new(redis.with_key_prefix("conf:")))
        };
        Some(Self {
            store: make(),
            twin: Box::new(make),
            clock: None,
            _redis: Some(server),
            _cluster: None,
            cut_off: false,
            #[cfg(feature = "postgres")]
            _postgres: None,
        })
    }

    /// Redis unreachable from the start (its server stopped): the local copy serves
    /// everything, and "another instance" can only be this one.
    fn fallback_down() -> Option<Self> {
        let url = RedisServer::start()?.url(); // dropped here: the port now refuses connections
        let clock = ManualClock::new();
        let redis = RedisStore::new(RedisBackend::new(&url).expect("backend"));
        let store = FallbackStore::builder(redis).clock(clock.clone()).build();
        let shared = store.clone();
        Some(Self {
            store: Arc::new(store),
            twin: Box::new(move || Arc::new(shared.clone())),
            clock: Some(clock),
            _redis: None,
            _cluster: None,
            cut_off: true,
            #[cfg(feature = "postgres")]
            _postgres: None,
        })
    }

    /// PostgreSQL: a schema of its own on the machine's server; "another instance" is another
    /// pool on it. Expiry runs on the database's clock, so time passes for real.
    #[cfg(feature = "postgres")]
    fn postgres() -> Option<Self> {
        use tower_turnstile::session::PostgresStore;
        let schema = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(crate::support::postgres::PgSchema::create())
        })?;
        let store = PostgresStore::new(schema.pool());
        tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(store.migrate()))
            .expect("migrate");
        let twin_pool = schema.pool();
        Some(Self {
            store: Arc::new(store),
            twin: Box::new(move || Arc::new(PostgresStore::new(twin_pool.clone()))),
            clock: None,
            _redis: None,
            _cluster: None,
            cut_off: false,
            _postgres: Some(schema),
        })
    }

    /// Redis in front of PostgreSQL; "another instance" has its own Redis connection, pool and
    /// generation.
    #[cfg(feature = "postgres")]
    fn chain() -> Option<Self> {
        use tower_turnstile::session::{ChainStore, PostgresStore};
        let server = RedisServer::start()?;
        let schema = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(crate::support::postgres::PgSchema::create())
        })?;
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(PostgresStore::new(schema.pool()).migrate())
        })
        .expect("migrate");
        let (url, pool) = (server.url(), schema.pool());
        let make = move || -> Arc<dyn SessionStore> {
            let redis =
                RedisStore::new(RedisBackend::new(&url).expect("backend")).with_key_prefix("conf:");
            Arc::new(ChainStore::new(redis, PostgresStore::new(pool.clone())))
        };
        Some(Self {
            store: make(),
            twin: Box::new(make),
            clock: None,
            _redis: Some(server),
            _cluster: None,
            cut_off: false,
            _postgres: Some(schema),
        })
    }

    /// How a store says a session is not there: `None`, or, cut off, an outage.
    fn assert_absent(&self, answer: Result<Option<Record>, StoreError>, why: &str) {
        match answer {
            Ok(None) => {}
            Err(error) if self.cut_off && error.is_outage() => {}
            other => panic!("{why}: expected no session, got {other:?}"),
        }
    }

    /// How a write says its session is gone: `Missing`, or, cut off, an outage.
    fn assert_missing(&self, answer: Result<Written, StoreError>, why: &str) {
        match answer {
            Ok(Written::Missing) => {}
            Err(error) if self.cut_off && error.is_outage() => {}
            other => panic!("{why}: expected a missing session, got {other:?}"),
        }
    }

    /// Lets `time` pass for the store: on its clock if it has one, else for real.
    async fn pass(&self, time: Duration) {
        match &self.clock {
            Some(clock) => clock.advance(time),
            None => tokio::time::sleep(time).await,
        }
    }

    /// The same storage seen through another store instance (another process, for Redis).
    fn twin(&self) -> Arc<dyn SessionStore> {
        (self.twin)()
    }
}

fn tenant(name: &str) -> Tenant {
    Tenant::new(name).unwrap()
}

fn random_key(tenant: &Tenant) -> SessionKey {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).unwrap();
    SessionKey::from_hash(tenant, &URL_SAFE_NO_PAD.encode(bytes)).unwrap()
}

fn record(pairs: &[(&str, &str)], user: Option<&str>) -> Record {
    let mut record = Record::new(Duration::from_secs(3600), Duration::from_secs(7200));
    for (k, v) in pairs {
        record.data.insert((*k).to_owned(), (*v).to_owned());
    }
    record.user = user.map(str::to_owned);
    record
}

fn patch(set: &[(&str, &str)], remove: &[&str]) -> Patch {
    let mut patch = Patch::default();
    patch.set = set
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    patch.remove = remove.iter().map(|k| (*k).to_owned()).collect();
    patch
}

async fn create_load_patch_delete(f: Fixture) {
    let s = &f.store;
    let key = random_key(&Tenant::default());
    f.assert_absent(s.load(&key).await, "no session");

    let created = record(&[("a", "1"), ("b", "\"two\"")], None);
    s.create(&key, &created).await.unwrap();
    assert_eq!(s.load(&key).await.unwrap().unwrap().data, created.data);

    assert_eq!(
        s.update(&key, &patch(&[("c", "[3]"), ("a", "10")], &["b"]))
            .await
            .unwrap(),
        Written::Applied
    );
    let loaded = f.twin().load(&key).await.unwrap().unwrap();
    let data: Vec<(&str, &str)> = loaded
        .data
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(data, [("a", "10"), ("c", "[3]")]);
    assert_eq!(loaded.created_at, created.created_at);
    assert_eq!(loaded.expires_at, created.expires_at);

    s.delete(&key, None).await.unwrap();
    f.assert_absent(s.load(&key).await, "no session");
    f.assert_absent(f.twin().load(&key).await, "no session");
}

async fn inactivity_expiry_slides_on_load(f: Fixture) {
    let s = &f.store;
    let key = random_key(&Tenant::default());
    let mut rec = record(&[("a", "1")], None);
    rec.inactivity_timeout = Duration::from_millis(1500);
    s.create(&key, &rec).await.unwrap();
    // Used every 900 ms, it outlives its 1.5 s timeout: each load restarts the clock.
    for _ in 0..3 {
        f.pass(Duration::from_millis(900)).await;
        assert!(
            s.load(&key).await.unwrap().is_some(),
            "a used session stays alive"
        );
    }
    f.pass(Duration::from_millis(2500)).await;
    f.assert_absent(s.load(&key).await, "an unused session expires");
}

async fn inactivity_expiry_slides_on_update(f: Fixture) {
    let s = &f.store;
    let key = random_key(&Tenant::default());
    let mut rec = record(&[("a", "1")], None);
    rec.inactivity_timeout = Duration::from_millis(1500);
    s.create(&key, &rec).await.unwrap();
    for i in 0..3 {
        f.pass(Duration::from_millis(900)).await;
        let written = s
            .update(&key, &patch(&[("a", &i.to_string())], &[]))
            .await
            .unwrap();
        assert_eq!(written, Written::Applied);
    }
    assert!(s.load(&key).await.unwrap().is_some());
}

async fn absolute_lifetime_is_a_hard_cap(f: Fixture) {
    let s = &f.store;
    let key = random_key(&Tenant::default());
    let mut rec = Record::new(Duration::from_secs(60), Duration::from_millis(1500));
    rec.data.insert("a".into(), "1".into());
    s.create(&key, &rec).await.unwrap();
    f.pass(Duration::from_millis(700)).await;
    assert!(s.load(&key).await.unwrap().is_some());
    f.pass(Duration::from_millis(1300)).await;
    f.assert_absent(
        s.load(&key).await,
        "however active, the session ends at its absolute end",
    );
}

async fn expired_sessions_leave_the_user_listing(f: Fixture) {
    let s = &f.store;
    let t = Tenant::default();
    let (short, long) = (random_key(&t), random_key(&t));
    let mut rec = record(&[("a", "1")], Some("carol"));
    rec.inactivity_timeout = Duration::from_millis(1000);
    s.create(&short, &rec).await.unwrap();
    rec.inactivity_timeout = Duration::from_secs(3600);
    s.create(&long, &rec).await.unwrap();
    let carol = UserKey::new(&t, "carol");
    assert_eq!(s.list_user_sessions(&carol).await.unwrap().len(), 2);
    // Listing is not a use: it does not keep the short session alive.
    f.pass(Duration::from_millis(600)).await;
    assert_eq!(s.list_user_sessions(&carol).await.unwrap().len(), 2);
    f.pass(Duration::from_millis(600)).await;
    let listed = s.list_user_sessions(&carol).await.unwrap();
    assert_eq!(
        listed.iter().map(|i| i.key.clone()).collect::<Vec<_>>(),
        [long],
        "an expired session is not listed"
    );
}

async fn cycle_keeps_data_and_kills_the_old_key(f: Fixture) {
    let s = &f.store;
    let t = Tenant::default();
    let (old, new) = (random_key(&t), random_key(&t));
    s.create(&old, &record(&[("cart", "[1,2]")], None))
        .await
        .unwrap();
    let mut moved = s.load(&old).await.unwrap().unwrap();
    moved.user = Some("alice".into());
    assert_eq!(
        s.cycle(&old, None, &new, &moved).await.unwrap(),
        Written::Applied
    );
    f.assert_absent(s.load(&old).await, "no session");
    let loaded = f.twin().load(&new).await.unwrap().unwrap();
    assert_eq!(loaded.data.get("cart").map(String::as_str), Some("[1,2]"));
    assert_eq!(loaded.user.as_deref(), Some("alice"));
    let listed = s
        .list_user_sessions(&UserKey::new(&t, "alice"))
        .await
        .unwrap();
    assert_eq!(
        listed.iter().map(|i| i.key.clone()).collect::<Vec<_>>(),
        [new]
    );
}

async fn destroyed_sessions_stay_destroyed(f: Fixture) {
    let s = &f.store;
    let t = Tenant::default();
    let key = random_key(&t);
    s.create(&key, &record(&[("a", "1")], Some("bob")))
        .await
        .unwrap();
    let loaded = s.load(&key).await.unwrap().unwrap();
    // Another instance ends it while this one still holds what it loaded.
    f.twin().delete(&key, Some("bob")).await.unwrap();

    f.assert_missing(s.update(&key, &patch(&[("b", "2")], &[])).await, "gone");
    f.assert_absent(s.load(&key).await, "no session");

    let new = random_key(&t);
    f.assert_missing(s.cycle(&key, Some("bob"), &new, &loaded).await, "gone");
    f.assert_absent(
        s.load(&new).await,
        "a cycle of a destroyed session leaves no copy",
    );
    assert!(
        s.list_user_sessions(&UserKey::new(&t, "bob"))
            .await
            .unwrap()
            .is_empty()
    );
}

async fn concurrent_patches_of_different_keys_all_survive(f: Fixture) {
    let key = random_key(&Tenant::default());
    f.store
        .create(&key, &record(&[("base", "0")], None))
        .await
        .unwrap();
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            // Half the writers go through another instance.
            let store = if i % 2 == 0 {
                Arc::clone(&f.store)
            } else {
                f.twin()
            };
            let key = key.clone();
            tokio::spawn(async move {
                // Each request reads, then writes its own key.
                store.load(&key).await.unwrap().unwrap();
                let written = store
                    .update(&key, &patch(&[(&format!("k{i}"), &i.to_string())], &[]))
                    .await
                    .unwrap();
                assert_eq!(written, Written::Applied);
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let data = f.store.load(&key).await.unwrap().unwrap().data;
    assert_eq!(data.len(), 65, "every concurrent write survives: {data:?}");
    for i in 0..64 {
        assert_eq!(data.get(&format!("k{i}")), Some(&i.to_string()));
    }
}

async fn user_index_lists_and_revokes_across_instances(f: Fixture) {
    let (a, b) = (Arc::clone(&f.store), f.twin());
    let acme = tenant("acme");
    let keys: Vec<SessionKey> = (0..3).map(|_| random_key(&acme)).collect();
    a.create(&keys[0], &record(&[], Some("alice")))
        .await
        .unwrap();
    a.create(&keys[1], &record(&[], Some("alice")))
        .await
        .unwrap();
    b.create(&keys[2], &record(&[], Some("alice")))
        .await
        .unwrap();
    let other = random_key(&acme);
    b.create(&other, &record(&[], Some("carol"))).await.unwrap();

    let alice = UserKey::new(&acme, "alice");
    let mut listed: Vec<String> = b
        .list_user_sessions(&alice)
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.key.hash())
        .collect();
    listed.sort();
    let mut expected: Vec<String> = keys.iter().map(SessionKey::hash).collect();
    expected.sort();
    assert_eq!(listed, expected);

    // A session that ended by itself is no longer listed.
    a.delete(&keys[0], None).await.unwrap();
    assert_eq!(a.list_user_sessions(&alice).await.unwrap().len(), 2);

    assert_eq!(a.delete_user_sessions(&alice).await.unwrap(), 2);
    for key in &keys {
        f.assert_absent(b.load(key).await, "no session");
    }
    assert!(b.list_user_sessions(&alice).await.unwrap().is_empty());
    assert!(
        b.load(&other).await.unwrap().is_some(),
        "another user's session is untouched"
    );
    assert_eq!(a.delete_user_sessions(&alice).await.unwrap(), 0);
}

async fn tenants_never_share_records(f: Fixture) {
    let (acme, globex) = (tenant("acme"), tenant("globex"));
    let hash = random_key(&acme).hash();
    let in_acme = SessionKey::from_hash(&acme, &hash).unwrap();
    let in_globex = SessionKey::from_hash(&globex, &hash).unwrap();
    f.store
        .create(&in_acme, &record(&[("secret", "1")], Some("alice")))
        .await
        .unwrap();
    f.assert_absent(f.store.load(&in_globex).await, "no session");
    f.assert_missing(
        f.store.update(&in_globex, &patch(&[("x", "1")], &[])).await,
        "gone",
    );
    assert!(
        f.store
            .list_user_sessions(&UserKey::new(&globex, "alice"))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        f.store
            .delete_user_sessions(&UserKey::new(&globex, "alice"))
            .await
            .unwrap(),
        0
    );
    assert!(f.store.load(&in_acme).await.unwrap().is_some());
}

async fn lifetime_is_stored_and_changed(f: Fixture) {
    let key = random_key(&Tenant::default());
    let mut rec = record(&[("a", "1")], None);
    rec.persistent = true;
    f.store.create(&key, &rec).await.unwrap();
    let loaded = f.twin().load(&key).await.unwrap().unwrap();
    assert_eq!(loaded.lifetime(), rec.lifetime(), "stored as created");

    let shorter = Lifetime::new(Duration::from_secs(42), rec.expires_at - 60_000, false);
    let mut change = Patch::default();
    change.lifetime = Some(shorter);
    assert_eq!(
        f.store.update(&key, &change).await.unwrap(),
        Written::Applied
    );
    let loaded = f.twin().load(&key).await.unwrap().unwrap();
    assert_eq!(
        loaded.lifetime(),
        shorter,
        "read back as changed, on another instance"
    );
    assert_eq!(loaded.data, rec.data, "data untouched");

    // A change that ends the session's life removes it rather than keeping a dead record.
    change.lifetime = Some(Lifetime::new(Duration::from_secs(42), 1, false));
    f.assert_missing(f.store.update(&key, &change).await, "gone");
    f.assert_absent(f.twin().load(&key).await, "no session");
}

macro_rules! conformance {
    ($store:ident: $($test:ident),* $(,)?) => {
        mod $store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let Some(fixture) = super::Fixture::$store() else { return };
                    super::$test(fixture).await;
                }
            )*
        }
    };
}

macro_rules! suite {
    ($($store:ident),*) => {
        $(conformance!($store:
            create_load_patch_delete,
            inactivity_expiry_slides_on_load,
            inactivity_expiry_slides_on_update,
            absolute_lifetime_is_a_hard_cap,
            expired_sessions_leave_the_user_listing,
            cycle_keeps_data_and_kills_the_old_key,
            destroyed_sessions_stay_destroyed,
            concurrent_patches_of_different_keys_all_survive,
            user_index_lists_and_revokes_across_instances,
            tenants_never_share_records,
            lifetime_is_stored_and_changed,
        );)*
    };
}

suite!(memory, redis, cluster, fallback, fallback_down, migration);
#[cfg(feature = "postgres")]
suite!(postgres, chain);
