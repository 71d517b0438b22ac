//! Live connections across instances: which user is connected where, delivery to every
//! connection of a user on every instance, and caps on concurrent connections.
//!
//! A [`Registry`] is one instance's view. Each live connection (a WebSocket, an SSE stream, a
//! gRPC stream) is registered with [`Registry::register`], which hands back a
//! [`Registration`]: the connection's inbox, deregistered when dropped.
//!
//! - **In Redis**, each user's connections are a sorted set of leases: a member per connection
//!   (`instance/id`), scored by the time its lease ends, on Redis's clock. The instance renews
//!   the leases of its connections every third of the lease (default lease: 30 s), so the
//!   entries of an instance that dies without a word vanish by themselves within one lease. All
//!   keys of one user share a hash tag, so the store works on a Redis Cluster.
//! - **Delivery**: [`Registry::send_to_user`] hands the message to this instance's connections
//!   of that user at once, and appends it to the inbox stream of every other instance that has
//!   one; each instance reads its inbox every 20 ms (by default). The guarantee is *at most
//!   once, to connections live when the message is sent*: a message for an instance that dies
//!   before reading it is lost with its connections.
//! - **Caps**: [`Registry::register_capped`] admits a connection only while the user has fewer
//!   than `max` live ones on all instances, decided atomically in Redis, so concurrent
//!   connects on several instances let exactly `max` in. A slot frees when its registration is
//!   dropped, or when its instance dies, one lease later. [`ConcurrencyLimitLayer`] does the
//!   same for requests in flight, per client address or any key, answering `429` with the
//!   `RateLimit` fields of a `concurrent-requests` quota.
//! - **Draining**: [`Registry::drain`] refuses new registrations, tells every local connection
//!   to reconnect elsewhere ([`Event::Reconnect`]; a WebSocket closes with 1012 "service
//!   restart"), and removes this instance's entries from Redis at once.
//! - **While Redis is down** the registry is local: registrations succeed (a cap counts this
//!   instance's connections only), delivery reaches this instance's connections only, and the
//!   failures are logged. The next renewal after Redis returns registers every live connection
//!   again.
//!
//! ```no_run
//! use tower_turnstile::{backend::RedisBackend, connection::{Event, Registry}, tenant::Tenant};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let registry = Registry::new(RedisBackend::new("redis://127.0.0.1:6379")?)?;
//! let tenant = Tenant::default();
//! let mut connection = registry.register_capped(&tenant, "alice", "{}", 5).await?;
//! // Anywhere, on any instance:
//! registry.send_to_user(&tenant, "alice", "hello").await;
//! while let Some(event) = connection.next().await {
//!     match event {
//!         Event::Message(text) => println!("{text}"),
//!         // `Event::Reconnect`: this instance is stopping.
//!         _ => break,
//!     }
//! }
//! # Ok(())
//! # }
//! ```

use std::{
    collections::HashMap,
    fmt,
    sync::{
        Arc, LazyLock, Mutex, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use redis::{Script, Value};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::{
    backend::{BackendError, Batch, Part, RedisBackend},
    sync::lock,
    tenant::Tenant,
    time::millis,
};

mod limit;

pub use limit::{ConcurrencyLimitLayer, ConcurrencyLimitService};

/// Takes a lease: drops ended leases, refuses past the cap (`ARGV[3]`, 0 for none), then
/// writes the member's lease and metadata. Answers `{admitted, live}`.
const REGISTER: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(ARGV[2])
local max = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local live = redis.call('ZCARD', KEYS[1])
if max > 0 and live >= max and not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return {0, live}
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ttl * 2)
redis.call('PEXPIRE', KEYS[2], ttl * 2)
return {1, redis.call('ZCARD', KEYS[1])}
";

/// Renews (or writes again, after Redis lost them) the leases of several members of one key:
/// `ARGV[1]` the lease, then member, metadata pairs. With one key, `KEYS[2]` absent, only the
/// sorted set is written (a tenant's count).
const RENEW: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for i = 2, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
  if KEYS[2] then redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
end
redis.call('PEXPIRE', KEYS[1], ttl * 2)
if KEYS[2] then redis.call('PEXPIRE', KEYS[2], ttl * 2) end
return 1
";

/// The live members of a key, with their metadata when `KEYS[2]` is given.
const LIVE: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
if not KEYS[2] or #members == 0 then return {members, {}} end
return {members, redis.call('HMGET', KEYS[2], unpack(members))}
";

static REGISTER_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(REGISTER));
static LIVE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(LIVE));

/// `EVAL` of [`RENEW`] on `keys`: sent whole, so a Redis that lost its script cache (a
/// restart) runs it anyway, in a pipeline too.
fn renew_cmd(keys: &[String], lease: u64, members: &[(String, String)]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(RENEW).arg(keys.len()).arg(keys).arg(lease);
    for (member, meta) in members {
        cmd.arg(member).arg(meta);
    }
    cmd
}

/// What a connection receives.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A message sent to the connection's user ([`Registry::send_to_user`]).
    Message(String),
    /// The instance is stopping ([`Registry::drain`]): the client should reconnect, to another
    /// instance. A WebSocket closes with code 1012 ("service restart").
    Reconnect,
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

/// A registry could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// Built outside a Tokio runtime: its renewal and inbox tasks need one.
    #[error("the connection registry must be built inside a Tokio runtime")]
    NoRuntime,
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

/// One instance's registry of live connections; see the [module docs](self). Cheap to clone;
/// the clones share everything.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Option<RedisBackend>,
    instance: String,
    prefix: String,
    lease: Duration,
    timeout: Duration,
    next_id: AtomicU64,
    draining: AtomicBool,
    local: Mutex<HashMap<u64, Local>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

struct Local {
    tenant: Tenant,
    user: String,
    meta: String,
    inbox: mpsc::Sender<Event>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in self.tasks.get_mut().map(std::mem::take).unwrap_or_default() {
            task.abort();
        }
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("instance", &self.inner.instance)
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
    pub fn build(self) -> Result<Registry, RegistryError> {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| RegistryError::NoRuntime)?;
        let mut id = [0u8; 9];
        // Without the OS's randomness, the clock still tells instances apart.
        if getrandom::fill(&mut id).is_err() {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            id.copy_from_slice(&nanos.to_le_bytes()[..9]);
        }
        let registry = Registry {
            inner: Arc::new(Inner {
                backend: self.backend,
                instance: URL_SAFE_NO_PAD.encode(id),
                prefix: self.prefix,
                lease: self.lease,
                timeout: self.timeout,
                next_id: AtomicU64::new(1),
                draining: AtomicBool::new(false),
                local: Mutex::new(HashMap::new()),
                tasks: Mutex::new(Vec::new()),
            }),
        };
        if registry.inner.backend.is_some() {
            let weak = Arc::downgrade(&registry.inner);
            let renew = runtime.spawn(renew_task(weak.clone(), self.lease / 3));
            let inbox = runtime.spawn(inbox_task(weak, self.poll));
            registry.lock_tasks().extend([renew, inbox]);
        }
        Ok(registry)
    }
}

impl Registry {
    /// A registry shared through `backend` with the defaults of [`RegistryBuilder`].
    pub fn new(backend: RedisBackend) -> Result<Self, RegistryError> {
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
        Self {
            inner: Arc::new(Inner {
                backend: None,
                instance: "local".to_owned(),
                prefix: String::new(),
                lease: Duration::from_secs(30),
                timeout: Duration::ZERO,
                next_id: AtomicU64::new(1),
                draining: AtomicBool::new(false),
                local: Mutex::new(HashMap::new()),
                tasks: Mutex::new(Vec::new()),
            }),
        }
    }

    /// This instance's id in the registry.
    pub fn instance(&self) -> &str {
        &self.inner.instance
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
        if self.inner.draining.load(Ordering::Acquire) {
            return Err(RegisterError::Draining);
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let member = self.member(id);
        let shared = match &self.inner.backend {
            None => None,
            Some(backend) => {
                let (user_key, meta_key) = self.user_keys(tenant, user);
                let lease = millis(self.inner.lease);
                let mut call = REGISTER_SCRIPT.key(user_key);
                call.key(meta_key)
                    .arg(&member)
                    .arg(lease)
                    .arg(max)
                    .arg(meta);
                let count = renew_cmd(
                    &[self.tenant_key(tenant)],
                    lease,
                    &[(member.clone(), String::new())],
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
                match admitted {
                    Ok(answer) => Some(answer),
                    Err(error) => {
                        self.redis_failed("register", &error);
                        None
                    }
                }
            }
        };
        let mut local = self.lock_local();
        match shared {
            Some((0, live)) => {
                return Err(RegisterError::AtCapacity {
                    limit: max,
                    live: u32::try_from(live).unwrap_or(u32::MAX),
                });
            }
            Some(_) => {}
            None if max > 0 => {
                let here = local
                    .values()
                    .filter(|c| c.tenant == *tenant && c.user == user)
                    .count();
                if here >= max as usize {
                    return Err(RegisterError::AtCapacity {
                        limit: max,
                        live: u32::try_from(here).unwrap_or(u32::MAX),
                    });
                }
            }
            None => {}
        }
        let (inbox, events) = mpsc::channel(64);
        local.insert(
            id,
            Local {
                tenant: tenant.clone(),
                user: user.to_owned(),
                meta: meta.to_owned(),
                inbox,
            },
        );
        Ok(Registration {
            registry: Arc::downgrade(&self.inner),
            id,
            events,
        })
    }

    /// The live connections of `user` in `tenant`, on every instance (this instance's alone
    /// while Redis is down).
    pub async fn connections_of(&self, tenant: &Tenant, user: &str) -> Vec<ConnectionInfo> {
        match self.shared_connections_of(tenant, user).await {
            Some(list) => list,
            None => self.local_connections_of(tenant, user),
        }
    }

    /// How many live connections `tenant` has on every instance (this instance's while Redis
    /// is down).
    pub async fn count(&self, tenant: &Tenant) -> usize {
        if let Some(backend) = &self.inner.backend {
            let call = LIVE_SCRIPT.key(self.tenant_key(tenant));
            let listed = backend
                .run(self.inner.timeout, |mut conn| async move {
                    let (members, _): (Vec<String>, Vec<Option<String>>) =
                        call.invoke_async(&mut conn).await?;
                    Ok(members.len())
                })
                .await;
            match listed {
                Ok(count) => return count,
                Err(error) => self.redis_failed("count", &error),
            }
        }
        self.lock_local()
            .values()
            .filter(|c| c.tenant == *tenant)
            .count()
    }

    /// Sends `message` to every live connection of `user` in `tenant`, on every instance; this
    /// instance's connections get it at once. Returns how many connections it was sent to.
    /// While Redis is down, only this instance's connections are reached.
    pub async fn send_to_user(&self, tenant: &Tenant, user: &str, message: &str) -> usize {
        let reached_here = self.deliver_here(tenant, user, message);
        let Some(listed) = self.shared_connections_of(tenant, user).await else {
            return reached_here;
        };
        let mut elsewhere: HashMap<String, usize> = HashMap::new();
        for connection in listed {
            if connection.instance != self.inner.instance {
                *elsewhere.entry(connection.instance).or_default() += 1;
            }
        }
        if elsewhere.is_empty() {
            return reached_here;
        }
        let lease = millis(self.inner.lease);
        let commands = elsewhere
            .keys()
            .flat_map(|instance| {
                let inbox = self.inbox_key(instance);
                // An inbox its instance no longer renews (it died) expires all the same.
                let mut expire = redis::cmd("PEXPIRE");
                expire.arg(&inbox).arg(lease * 2);
                let mut cmd = redis::cmd("XADD");
                cmd.arg(inbox)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(10_000)
                    .arg("*")
                    .arg("t")
                    .arg(tenant.as_str())
                    .arg("u")
                    .arg(user)
                    .arg("m")
                    .arg(message);
                [cmd, expire]
            })
            .collect();
        match self.run_all(commands).await {
            Ok(()) => reached_here + elsewhere.values().sum::<usize>(),
            Err(error) => {
                self.redis_failed("send", &error);
                reached_here
            }
        }
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

    fn member(&self, id: u64) -> String {
        format!("{}/{id}", self.inner.instance)
    }

    /// The user's lease set and metadata hash, in one hash slot.
    fn user_keys(&self, tenant: &Tenant, user: &str) -> (String, String) {
        let hash = URL_SAFE_NO_PAD.encode(Sha256::digest(user.as_bytes()));
        let base = format!("{}{}:conn:{{{}:{hash}}}", self.inner.prefix, tenant, tenant);
        (format!("{base}:live"), format!("{base}:meta"))
    }

    fn tenant_key(&self, tenant: &Tenant) -> String {
        format!("{}{}:conns", self.inner.prefix, tenant)
    }

    fn inbox_key(&self, instance: &str) -> String {
        format!("{}inbox:{instance}", self.inner.prefix)
    }

    fn lock_local(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Local>> {
        lock(&self.inner.local)
    }

    fn lock_tasks(&self) -> std::sync::MutexGuard<'_, Vec<tokio::task::JoinHandle<()>>> {
        lock(&self.inner.tasks)
    }

    fn redis_failed(&self, operation: &'static str, error: &BackendError) {
        tracing::warn!(
            target: "tower_turnstile::connection",
            operation,
            error = %error,
            "connection registry: Redis failed; this instance's connections only until it answers"
        );
    }

    fn local_connections_of(&self, tenant: &Tenant, user: &str) -> Vec<ConnectionInfo> {
        self.lock_local()
            .iter()
            .filter(|(_, c)| c.tenant == *tenant && c.user == user)
            .map(|(id, c)| ConnectionInfo {
                instance: self.inner.instance.clone(),
                id: *id,
                meta: c.meta.clone(),
            })
            .collect()
    }

    async fn shared_connections_of(
        &self,
        tenant: &Tenant,
        user: &str,
    ) -> Option<Vec<ConnectionInfo>> {
        let backend = self.inner.backend.as_ref()?;
        let (live, meta) = self.user_keys(tenant, user);
        let mut call = LIVE_SCRIPT.key(live);
        call.key(meta);
        let listed = backend
            .run(self.inner.timeout, |mut conn| async move {
                let (members, metas): (Vec<String>, Vec<Option<String>>) =
                    call.invoke_async(&mut conn).await?;
                Ok((members, metas))
            })
            .await;
        match listed {
            Ok((members, metas)) => Some(
                members
                    .into_iter()
                    .zip(metas.into_iter().chain(std::iter::repeat(None)))
                    .filter_map(|(member, meta)| {
                        let (instance, id) = member.rsplit_once('/')?;
                        Some(ConnectionInfo {
                            instance: instance.to_owned(),
                            id: id.parse().ok()?,
                            meta: meta.unwrap_or_default(),
                        })
                    })
                    .collect(),
            ),
            Err(error) => {
                self.redis_failed("list", &error);
                None
            }
        }
    }

    fn deliver_here(&self, tenant: &Tenant, user: &str, message: &str) -> usize {
        let local = self.lock_local();
        let mut reached = 0;
        for connection in local.values() {
            if connection.tenant == *tenant && connection.user == user {
                // A connection too slow to keep up loses the message rather than holding
                // up the sender.
                if connection
                    .inbox
                    .try_send(Event::Message(message.to_owned()))
                    .is_ok()
                {
                    reached += 1;
                }
            }
        }
        reached
    }

    /// Removes entries from Redis: the users' lease sets and metadata, and the tenants' counts.
    async fn remove_shared(&self, entries: Vec<(u64, Tenant, String)>) {
        if self.inner.backend.is_none() || entries.is_empty() {
            return;
        }
        let mut commands = Vec::with_capacity(entries.len() * 3);
        for (id, tenant, user) in &entries {
            let member = self.member(*id);
            let (live, meta) = self.user_keys(tenant, user);
            let mut zrem = redis::cmd("ZREM");
            zrem.arg(live).arg(&member);
            let mut hdel = redis::cmd("HDEL");
            hdel.arg(meta).arg(&member);
            let mut count = redis::cmd("ZREM");
            count.arg(self.tenant_key(tenant)).arg(&member);
            commands.extend([zrem, hdel, count]);
        }
        if let Err(error) = self.run_all(commands).await {
            self.redis_failed("deregister", &error);
        }
    }

    /// Runs independent commands in one round trip: one pipeline on a single server, or on a
    /// cluster one request per command, all at once.
    async fn run_all(&self, commands: Vec<redis::Cmd>) -> Result<(), BackendError> {
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

/// A live connection's place in the registry, and its inbox. Dropping it deregisters the
/// connection, here and in Redis.
#[derive(Debug)]
pub struct Registration {
    registry: Weak<Inner>,
    id: u64,
    events: mpsc::Receiver<Event>,
}

impl Registration {
    /// The connection's number on this instance.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The next event for this connection; `None` once the registry is gone.
    pub async fn next(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// Deregisters now, and waits until Redis has forgotten the connection (dropping the
    /// registration does the same in the background).
    pub async fn release(mut self) {
        if let Some((registry, entry)) = self.take_entry() {
            registry.remove_shared(vec![entry]).await;
        }
    }

    /// Removes the connection here; what Redis still needs to forget, if anything.
    fn take_entry(&mut self) -> Option<(Registry, (u64, Tenant, String))> {
        let registry = Registry {
            inner: self.registry.upgrade()?,
        };
        let local = registry.lock_local().remove(&self.id)?;
        registry.inner.backend.as_ref()?;
        Some((registry, (self.id, local.tenant, local.user)))
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let Some((registry, entry)) = self.take_entry() else {
            return;
        };
        // Outside a runtime (a process shutting down), the lease ends by itself.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { registry.remove_shared(vec![entry]).await });
        }
    }
}

/// Renews the leases of this instance's connections, grouped by key: one script per user and
/// one per tenant.
async fn renew_task(registry: Weak<Inner>, every: Duration) {
    let mut ticks = tokio::time::interval(every.max(Duration::from_millis(10)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(inner) = registry.upgrade() else {
            return;
        };
        let registry = Registry { inner };
        registry.renew().await;
    }
}

impl Registry {
    async fn renew(&self) {
        // A draining instance has left the registry; its last connections are closing.
        if self.inner.backend.is_none() || self.inner.draining.load(Ordering::Acquire) {
            return;
        }
        let mut users: HashMap<(String, String), Vec<(String, String)>> = HashMap::new();
        let mut tenants: HashMap<String, Vec<(String, String)>> = HashMap::new();
        for (id, c) in self.lock_local().iter() {
            let member = self.member(*id);
            users
                .entry(self.user_keys(&c.tenant, &c.user))
                .or_default()
                .push((member.clone(), c.meta.clone()));
            tenants
                .entry(self.tenant_key(&c.tenant))
                .or_default()
                .push((member, String::new()));
        }
        let lease = millis(self.inner.lease);
        let mut commands: Vec<redis::Cmd> = users
            .into_iter()
            .map(|((live, meta), members)| renew_cmd(&[live, meta], lease, &members))
            .chain(
                tenants
                    .into_iter()
                    .map(|(key, members)| renew_cmd(&[key], lease, &members)),
            )
            .collect();
        // The inbox lives as long as the instance renews.
        let mut inbox = redis::cmd("PEXPIRE");
        inbox
            .arg(self.inbox_key(&self.inner.instance))
            .arg(lease * 2);
        commands.push(inbox);
        if let Err(error) = self.run_all(commands).await {
            self.redis_failed("renew", &error);
        }
    }
}

/// Reads this instance's inbox and hands each message to the local connections it names.
async fn inbox_task(registry: Weak<Inner>, every: Duration) {
    let mut last = "0-0".to_owned();
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(inner) = registry.upgrade() else {
            return;
        };
        let registry = Registry { inner };
        let Some(backend) = registry.inner.backend.clone() else {
            return;
        };
        let key = registry.inbox_key(&registry.inner.instance);
        let from = last.clone();
        let read = backend
            .run(registry.inner.timeout, |mut conn| async move {
                redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(1000)
                    .arg("STREAMS")
                    .arg(key)
                    .arg(from)
                    .query_async::<Value>(&mut conn)
                    .await
            })
            .await;
        let Ok(reply) = read else {
            continue;
        };
        for (id, fields) in stream_entries(reply) {
            last = id;
            let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v);
            let (Some(tenant), Some(user), Some(message)) = (field("t"), field("u"), field("m"))
            else {
                continue;
            };
            if let Ok(tenant) = Tenant::new(tenant) {
                registry.deliver_here(&tenant, user, message);
            }
        }
    }
}

/// The entries of an `XREAD` reply for one stream: id and field pairs (RESP2 or RESP3).
fn stream_entries(reply: Value) -> Vec<(String, Vec<(String, String)>)> {
    let text = |value: &Value| match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    };
    let streams = match reply {
        Value::Array(streams) => streams
            .into_iter()
            .filter_map(|stream| match stream {
                Value::Array(mut parts) if parts.len() == 2 => parts.pop(),
                _ => None,
            })
            .collect::<Vec<_>>(),
        Value::Map(streams) => streams.into_iter().map(|(_, entries)| entries).collect(),
        _ => Vec::new(),
    };
    let mut out = Vec::new();
    for entries in streams {
        let Value::Array(entries) = entries else {
            continue;
        };
        for entry in entries {
            let Value::Array(parts) = entry else { continue };
            let (Some(id), Some(Value::Array(flat))) = (parts.first().and_then(text), parts.get(1))
            else {
                continue;
            };
            let pairs = flat
                .chunks(2)
                .filter_map(|pair| Some((text(pair.first()?)?, text(pair.get(1)?)?)))
                .collect();
            out.push((id, pairs));
        }
    }
    out
}
