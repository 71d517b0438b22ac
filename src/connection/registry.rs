//! One instance's view of the registry: registering connections, caps, draining.

use std::{
    collections::HashMap,
    fmt,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use redis::Value;
use tokio::sync::mpsc;

use super::{
    Registration,
    keys::{Keys, REGISTER, renew_cmd},
    tasks::Tasks,
};
use crate::{
    ConfigError,
    backend::{BackendError, Batch, Part, RedisBackend},
    sync::lock,
    tenant::Tenant,
    time::millis,
};

/// What a connection receives.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A message sent to the connection's user ([`Registry::send_to_user`]).
    Message(String),
    /// The instance is stopping ([`Registry::drain`]): the client should reconnect, to another
    /// instance. A WebSocket closes with code 1012 ("service restart").
    Reconnect,
    /// The session the connection was registered under
    /// ([`Registry::register_for_session`]) ended, on whichever instance: a logout, a new id,
    /// "log out everywhere". The connection should close.
    SessionEnded,
}

/// Why a connection was not registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError {
    /// The user already has `limit` live connections (`live` counted, on every instance).
    #[error("{live} live connections of this user, at most {limit} allowed")]
    AtCapacity {
        /// The cap.
        limit: u32,
        /// The live connections counted.
        live: u32,
    },
    /// The instance is draining: connect to another one.
    #[error("this instance is stopping; connect to another")]
    Draining,
}

/// One live connection elsewhere or here, as [`Registry::connections_of`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionInfo {
    /// The instance holding it.
    pub instance: String,
    /// Its number on that instance.
    pub id: u64,
    /// What it was registered with.
    pub meta: String,
}

/// One instance's registry of live connections; see the [module docs](crate::connection). Cheap to clone;
/// the clones share everything.
#[derive(Clone)]
pub struct Registry {
    pub(super) inner: Arc<Inner>,
}

/// What every clone of one registry shares.
pub(super) struct Inner {
    /// Redis, or `None` for a registry of this instance alone.
    pub(super) backend: Option<RedisBackend>,
    pub(super) keys: Keys,
    /// How long an entry lives without renewal.
    pub(super) lease: Duration,
    /// The deadline of each Redis round trip.
    pub(super) timeout: Duration,
    next_id: AtomicU64,
    /// Set by `drain`: no new registration, no more renewal.
    pub(super) draining: AtomicBool,
    /// This instance's connections, by id.
    pub(super) local: Mutex<HashMap<u64, Local>>,
    /// The renewal and inbox tasks, stopped with the last clone.
    pub(super) tasks: Tasks,
    /// The store the sessions of bound connections are checked in, once set.
    pub(super) watch: std::sync::OnceLock<super::sessions::Watch>,
}

/// One of this instance's connections.
pub(super) struct Local {
    pub(super) tenant: Tenant,
    pub(super) user: String,
    pub(super) meta: String,
    /// The store hash of the session it is bound to, if any.
    pub(super) session: Option<String>,
    /// Where its events go; bounded, so a slow connection loses messages, not memory.
    pub(super) inbox: mpsc::Sender<Event>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("instance", &self.inner.keys.instance)
            .field("shared", &self.inner.backend.is_some())
            .field("lease", &self.inner.lease)
            .field("local_connections", &self.local_count())
            .finish_non_exhaustive()
    }
}

/// Settings for a [`Registry`]; see [`Registry::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct RegistryBuilder {
    backend: Option<RedisBackend>,
    prefix: String,
    lease: Duration,
    poll: Duration,
    timeout: Duration,
}

impl RegistryBuilder {
    /// How long an entry lives without renewal: the longest a dead instance's connections
    /// stay listed and hold their slots. Renewed every third of it. Default: 30 s.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(30));
        self
    }

    /// How often the instance reads its inbox: the added delay of a delivery to another
    /// instance. Default: 20 ms.
    pub fn poll_every(mut self, every: Duration) -> Self {
        self.poll = every.max(Duration::from_millis(1));
        self
    }

    /// The prefix of every key. Default: `turnstile:`.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The deadline of each Redis round trip. Default: 250 ms.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The registry, with its renewal and inbox tasks running (they stop with the last
    /// clone).
    pub fn build(self) -> Result<Registry, ConfigError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| ConfigError::NoRuntime("the connection registry"))?;
        let registry = Registry::with(
            self.backend,
            self.prefix,
            instance_id(),
            self.lease,
            self.timeout,
        );
        if registry.inner.backend.is_some() {
            registry
                .inner
                .tasks
                .start(&runtime, &registry, self.lease / 3, self.poll);
        }
        Ok(registry)
    }
}

/// A new instance's id: 72 random bits, or the clock's nanoseconds without the OS's randomness
/// (still enough to tell instances apart).
fn instance_id() -> String {
    let mut id = [0u8; 9];
    if getrandom::fill(&mut id).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        id.copy_from_slice(&nanos.to_le_bytes()[..9]);
    }
    URL_SAFE_NO_PAD.encode(id)
}

impl Registry {
    /// A registry shared through `backend` with the defaults of [`RegistryBuilder`].
    pub fn new(backend: RedisBackend) -> Result<Self, ConfigError> {
        Self::builder(backend).build()
    }

    /// A registry shared through `backend`, to configure.
    pub fn builder(backend: RedisBackend) -> RegistryBuilder {
        RegistryBuilder {
            backend: Some(backend),
            prefix: "turnstile:".to_owned(),
            lease: Duration::from_secs(30),
            poll: Duration::from_millis(20),
            timeout: Duration::from_millis(250),
        }
    }

    /// A registry of this instance alone (no Redis): for one instance, or tests.
    pub fn local() -> Self {
        Self::with(
            None,
            String::new(),
            "local".to_owned(),
            Duration::from_secs(30),
            Duration::ZERO,
        )
    }

    fn with(
        backend: Option<RedisBackend>,
        prefix: String,
        instance: String,
        lease: Duration,
        timeout: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                backend,
                keys: Keys::new(prefix, instance),
                lease,
                timeout,
                next_id: AtomicU64::new(1),
                draining: AtomicBool::new(false),
                local: Mutex::new(HashMap::new()),
                tasks: Tasks::default(),
                watch: std::sync::OnceLock::new(),
            }),
        }
    }

    /// This instance's id in the registry.
    pub fn instance(&self) -> &str {
        &self.inner.keys.instance
    }

    /// How many connections this instance holds.
    pub fn local_count(&self) -> usize {
        self.lock_local().len()
    }

    /// Registers a live connection of `user` in `tenant`, with `meta` (any text, listed by
    /// [`connections_of`](Self::connections_of)).
    pub async fn register(
        &self,
        tenant: &Tenant,
        user: &str,
        meta: &str,
    ) -> Result<Registration, RegisterError> {
        self.register_capped(tenant, user, meta, 0).await
    }

    /// [`register`](Self::register), unless the user already has `max` live connections on
    /// all instances (`0`: no cap). While Redis is down, this instance's connections are
    /// counted.
    ///
    /// `user` is any key: to cap connections per client address or API key as well, register
    /// the connection a second time under that key (and keep both registrations).
    pub async fn register_capped(
        &self,
        tenant: &Tenant,
        user: &str,
        meta: &str,
        max: u32,
    ) -> Result<Registration, RegisterError> {
        self.admit(tenant, user, meta, max, None).await
    }

    /// Registers a connection (see [`register_capped`](Self::register_capped)), bound to the
    /// session whose store hash is `session`, if any.
    pub(super) async fn admit(
        &self,
        tenant: &Tenant,
        user: &str,
        meta: &str,
        max: u32,
        session: Option<String>,
    ) -> Result<Registration, RegisterError> {
        if self.inner.draining.load(Ordering::Acquire) {
            return Err(RegisterError::Draining);
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let shared = self.register_shared(tenant, user, meta, max, id).await;
        let mut local = self.lock_local();
        let live = match shared {
            Some((admitted, live)) => (admitted == 0).then_some(live),
            // Redis is down: this instance's connections of the user are all it can count.
            None => {
                let here = local
                    .values()
                    .filter(|c| c.tenant == *tenant && c.user == user)
                    .count();
                (max > 0 && here >= max as usize).then_some(here as i64)
            }
        };
        if let Some(live) = live {
            return Err(RegisterError::AtCapacity {
                limit: max,
                live: u32::try_from(live).unwrap_or(u32::MAX),
            });
        }
        let (inbox, events) = mpsc::channel(64);
        local.insert(
            id,
            Local {
                tenant: tenant.clone(),
                user: user.to_owned(),
                meta: meta.to_owned(),
                session,
                inbox,
            },
        );
        crate::metrics::gauge_add("turnstile_connections", 1.0);
        Ok(Registration::new(Arc::downgrade(&self.inner), id, events))
    }

    /// Takes the lease of connection `id` in Redis, counted in the tenant too when admitted:
    /// `(admitted, live)`, or `None` when Redis failed (or there is none).
    async fn register_shared(
        &self,
        tenant: &Tenant,
        user: &str,
        meta: &str,
        max: u32,
        id: u64,
    ) -> Option<(i64, i64)> {
        let backend = self.inner.backend.as_ref()?;
        let member = self.inner.keys.member(id);
        let (user_key, meta_key) = self.inner.keys.user(tenant, user);
        let lease = millis(self.inner.lease);
        let mut call = REGISTER.key(user_key);
        call.key(meta_key)
            .arg(&member)
            .arg(lease)
            .arg(max)
            .arg(meta);
        let count = renew_cmd(
            &[self.inner.keys.tenant(tenant)],
            lease,
            &[(member, String::new())],
        );
        let admitted = backend
            .run(self.inner.timeout, |mut conn| async move {
                let answer: (i64, i64) = call.invoke_async(&mut conn).await?;
                if answer.0 == 1 {
                    count.query_async::<Value>(&mut conn).await?;
                }
                Ok(answer)
            })
            .await;
        admitted
            .inspect_err(|error| self.redis_failed("register", error))
            .ok()
    }

    /// Stops this instance's part: refuses new registrations, sends [`Event::Reconnect`] to
    /// every local connection, and removes this instance's entries from Redis at once. Returns
    /// how many connections were told to reconnect.
    pub async fn drain(&self) -> usize {
        self.inner.draining.store(true, Ordering::Release);
        let connections: Vec<(u64, Tenant, String, mpsc::Sender<Event>)> = self
            .lock_local()
            .iter()
            .map(|(id, c)| (*id, c.tenant.clone(), c.user.clone(), c.inbox.clone()))
            .collect();
        for (_, _, _, inbox) in &connections {
            let _ = inbox.try_send(Event::Reconnect);
        }
        let entries: Vec<(u64, Tenant, String)> = connections
            .into_iter()
            .map(|(id, tenant, user, _)| (id, tenant, user))
            .collect();
        let told = entries.len();
        self.remove_shared(entries).await;
        told
    }

    pub(super) fn lock_local(&self) -> MutexGuard<'_, HashMap<u64, Local>> {
        lock(&self.inner.local)
    }

    pub(super) fn redis_failed(&self, operation: &'static str, error: &BackendError) {
        tracing::warn!(
            target: "tower_turnstile::connection",
            operation,
            error = %error,
            "connection registry: Redis failed; this instance's connections only until it answers"
        );
    }

    /// Removes entries from Redis: the users' lease sets and metadata, and the tenants' counts.
    pub(super) async fn remove_shared(&self, entries: Vec<(u64, Tenant, String)>) {
        if self.inner.backend.is_none() || entries.is_empty() {
            return;
        }
        let mut commands = Vec::with_capacity(entries.len() * 3);
        for (id, tenant, user) in &entries {
            let member = self.inner.keys.member(*id);
            let (live, meta) = self.inner.keys.user(tenant, user);
            let mut zrem = redis::cmd("ZREM");
            zrem.arg(live).arg(&member);
            let mut hdel = redis::cmd("HDEL");
            hdel.arg(meta).arg(&member);
            let mut count = redis::cmd("ZREM");
            count.arg(self.inner.keys.tenant(tenant)).arg(&member);
            commands.extend([zrem, hdel, count]);
        }
        if let Err(error) = self.run_all(commands).await {
            self.redis_failed("deregister", &error);
        }
    }

    /// Runs independent commands in one round trip: one pipeline on a single server, or on a
    /// cluster one request per command, all at once.
    pub(super) async fn run_all(&self, commands: Vec<redis::Cmd>) -> Result<(), BackendError> {
        let Some(backend) = &self.inner.backend else {
            return Ok(());
        };
        let mut batch = Batch::new();
        for command in commands {
            let mut part = Part::new();
            part.add(command);
            batch.push(part);
        }
        backend.run_batch(self.inner.timeout, batch).await.map(drop)
    }
}
