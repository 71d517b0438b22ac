//! Session lifecycle events: who logged in, when, and what ended each session, in one capped
//! Redis Stream per tenant (or in memory), written only when a session's life changes.

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    sync::{Arc, Mutex},
};

use crate::{StoreError, sync::lock, tenant::Tenant, time::now_millis};

/// What happened to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LifecycleKind {
    /// A new session was stored (off by default: see [`SessionEvents::with_created`]).
    Created,
    /// A session was bound to a user ([`Session::set_user`](super::Session::set_user)).
    Login,
    /// A session moved to a new id, keeping its user ([`Session::cycle_id`](super::Session::cycle_id)).
    Cycled,
    /// Its holder ended it ([`Session::destroy`](super::Session::destroy)).
    Logout,
    /// Every session of a user was ended: "log out everywhere", or an admin
    /// ([`UserSessions::destroy_all`](super::UserSessions::destroy_all)).
    Revoked,
    /// The session reached the end of its life unused (written by the sweep,
    /// [`SessionEvents::sweep_expired`], for sessions that had logged in).
    Expired,
    /// A login over the per-user cap ended it
    /// ([`SessionLayer::with_max_sessions_per_user`](super::SessionLayer::with_max_sessions_per_user)).
    Evicted,
}

impl LifecycleKind {
    /// The kind's name in the stream and in JSON: `login`, `logout`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Login => "login",
            Self::Cycled => "cycled",
            Self::Logout => "logout",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
            Self::Evicted => "evicted",
        }
    }

    /// The kind named `name`, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        [
            Self::Created,
            Self::Login,
            Self::Cycled,
            Self::Logout,
            Self::Revoked,
            Self::Expired,
            Self::Evicted,
        ]
        .into_iter()
        .find(|kind| kind.as_str() == name)
    }
}

impl fmt::Display for LifecycleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How many characters of a session's store hash an event keeps: enough to tell a user's
/// sessions apart in an audit, far too few to find the session (and the hash is not the id).
pub const SESSION_PREFIX_LEN: usize = 8;

/// One lifecycle event.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LifecycleEvent {
    /// Its id in the tenant's stream (`<ms>-<n>`); read on from here with
    /// [`SessionEvents::since`].
    pub id: String,
    /// What happened.
    pub kind: LifecycleKind,
    /// The tenant.
    pub tenant: Tenant,
    /// The user the session was bound to, when known.
    pub user: Option<String>,
    /// The first [`SESSION_PREFIX_LEN`] characters of the session's store hash (empty for
    /// [`LifecycleKind::Revoked`], which ends all of a user's sessions). Never the id.
    pub session: String,
    /// The instance that wrote it.
    pub instance: String,
    /// When, in Unix milliseconds.
    pub at: u64,
}

/// Where the lifecycle events of every tenant go, and how they are read back: give it to
/// [`SessionLayer::with_lifecycle_events`](super::SessionLayer::with_lifecycle_events).
///
/// - **In Redis** ([`SessionEvents::redis`]), one stream per tenant,
///   `turnstile:{<tenant>}:events` (hash-tagged: it works on a Cluster), capped at about
///   [`SessionEvents::with_max_len`] entries (`XADD MAXLEN ~`). Read a range with
///   [`since`](SessionEvents::since) and [`latest`](SessionEvents::latest), or process every
///   event at least once with a consumer group ([`read_group`](SessionEvents::read_group),
///   [`ack`](SessionEvents::ack)).
/// - **In memory** ([`SessionEvents::memory`]), for one instance and tests: the same capped
///   log per tenant, without consumer groups.
///
/// An event costs one `XADD` when a session's life changes (a login, a logout, ...), never on
/// a read or a plain write; a login also indexes the session's possible end, for
/// [`sweep_expired`](SessionEvents::sweep_expired), which writes [`LifecycleKind::Expired`].
/// While Redis is unreachable the events of that moment are dropped, counted
/// (`turnstile_session_events_dropped_total`) and logged, not journaled.
#[derive(Clone)]
pub struct SessionEvents {
    inner: Arc<Inner>,
}

struct Inner {
    log: Log,
    max_len: usize,
    created: bool,
    instance: String,
    /// When each logged-in session may end, for the sweep that writes `expired`.
    ends: ends::Ends,
}

enum Log {
    #[cfg(feature = "redis")]
    Redis {
        backend: crate::backend::RedisBackend,
        prefix: String,
    },
    Memory(Mutex<HashMap<Tenant, VecDeque<LifecycleEvent>>>),
}

impl fmt::Debug for SessionEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let log = match &self.inner.log {
            #[cfg(feature = "redis")]
            Log::Redis { .. } => "redis",
            Log::Memory(_) => "memory",
        };
        f.debug_struct("SessionEvents")
            .field("log", &log)
            .field("max_len", &self.inner.max_len)
            .field("created", &self.inner.created)
            .field("instance", &self.inner.instance)
            .finish()
    }
}

/// The default cap of each tenant's log.
const DEFAULT_MAX_LEN: usize = 10_000;

impl SessionEvents {
    /// Events kept in this process's memory, at most 10 000 per tenant.
    pub fn memory() -> Self {
        Self::with_log(Log::Memory(Mutex::default()))
    }

    /// Events in one Redis Stream per tenant, at about 10 000 entries each.
    #[cfg(feature = "redis")]
    pub fn redis(backend: crate::backend::RedisBackend) -> Self {
        Self::with_log(Log::Redis {
            backend,
            prefix: "turnstile:".to_owned(),
        })
    }

    fn with_log(log: Log) -> Self {
        Self {
            inner: Arc::new(Inner {
                log,
                max_len: DEFAULT_MAX_LEN,
                created: false,
                instance: instance_name(),
                ends: ends::Ends::default(),
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Inner)) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            f(inner);
        }
        self
    }

    /// About how many events each tenant's log keeps (Redis trims in whole nodes of the
    /// stream, so a few more may stay). Default: 10 000.
    #[must_use]
    pub fn with_max_len(self, max_len: usize) -> Self {
        self.edit(|inner| inner.max_len = max_len.max(1))
    }

    /// Also writes [`LifecycleKind::Created`] for every new session. Default: off (anonymous
    /// visitors are many).
    #[must_use]
    pub fn with_created(self, created: bool) -> Self {
        self.edit(|inner| inner.created = created)
    }

    /// The name this instance signs its events with. Default: 12 random characters.
    #[must_use]
    pub fn with_instance(self, instance: impl Into<String>) -> Self {
        let instance = instance.into();
        self.edit(|inner| inner.instance = instance)
    }

    /// Whether `Created` events are written.
    pub(crate) fn writes_created(&self) -> bool {
        self.inner.created
    }

    /// Appends an event: one round trip in Redis. A failure is counted and logged; the request
    /// goes on.
    pub(crate) async fn record(
        &self,
        kind: LifecycleKind,
        tenant: &Tenant,
        user: Option<&str>,
        session_hash: &str,
    ) {
        let session: String = session_hash.chars().take(SESSION_PREFIX_LEN).collect();
        let at = now_millis();
        let appended: Result<(), StoreError> = match &self.inner.log {
            #[cfg(feature = "redis")]
            Log::Redis { backend, prefix } => {
                let fields = Fields {
                    kind,
                    user,
                    session: &session,
                    instance: &self.inner.instance,
                    at,
                };
                redis_log::append(
                    backend,
                    &stream_key(prefix, tenant),
                    self.inner.max_len,
                    fields,
                )
                .await
            }
            Log::Memory(logs) => {
                let mut logs = lock(logs);
                let log = logs.entry(tenant.clone()).or_default();
                let (ms, seq) = next_id(log.back().map(|last| parse_id(&last.id)), at);
                log.push_back(LifecycleEvent {
                    id: format!("{ms}-{seq}"),
                    kind,
                    tenant: tenant.clone(),
                    user: user.map(str::to_owned),
                    session,
                    instance: self.inner.instance.clone(),
                    at,
                });
                while log.len() > self.inner.max_len {
                    log.pop_front();
                }
                Ok(())
            }
        };
        if let Err(error) = appended {
            crate::metrics::count("turnstile_session_events_dropped_total", 1);
            tracing::warn!(target: "tower_turnstile::session", %error, kind = kind.as_str(), "a session lifecycle event was dropped");
        }
    }

    /// The latest `count` events of `tenant`, oldest first.
    pub async fn latest(
        &self,
        tenant: &Tenant,
        count: usize,
    ) -> Result<Vec<LifecycleEvent>, StoreError> {
        match &self.inner.log {
            #[cfg(feature = "redis")]
            Log::Redis { backend, prefix } => {
                redis_log::latest(backend, &stream_key(prefix, tenant), tenant, count).await
            }
            Log::Memory(logs) => {
                let logs = lock(logs);
                let Some(log) = logs.get(tenant) else {
                    return Ok(Vec::new());
                };
                Ok(log
                    .iter()
                    .skip(log.len().saturating_sub(count))
                    .cloned()
                    .collect())
            }
        }
    }

    /// Up to `count` events of `tenant` after the one with id `after` (`"0"`: from the first
    /// kept), oldest first.
    pub async fn since(
        &self,
        tenant: &Tenant,
        after: &str,
        count: usize,
    ) -> Result<Vec<LifecycleEvent>, StoreError> {
        match &self.inner.log {
            #[cfg(feature = "redis")]
            Log::Redis { backend, prefix } => {
                redis_log::since(backend, &stream_key(prefix, tenant), tenant, after, count).await
            }
            Log::Memory(logs) => {
                let logs = lock(logs);
                let after = parse_id(after);
                Ok(logs
                    .get(tenant)
                    .into_iter()
                    .flatten()
                    .filter(|event| parse_id(&event.id) > after)
                    .take(count)
                    .cloned()
                    .collect())
            }
        }
    }
}

impl SessionEvents {
    /// Up to `count` events of `tenant` for `consumer` of consumer group `group` (created at
    /// the start of the log if it does not exist): first those delivered to this consumer
    /// before and not yet acknowledged (after a restart, say), then new ones. Each event is
    /// delivered to one consumer of the group until it is [acknowledged](Self::ack): at least
    /// once. Redis only.
    pub async fn read_group(
        &self,
        tenant: &Tenant,
        group: &str,
        consumer: &str,
        count: usize,
    ) -> Result<Vec<LifecycleEvent>, StoreError> {
        #[cfg(not(feature = "redis"))]
        let _ = (tenant, group, consumer, count);
        match &self.inner.log {
            #[cfg(feature = "redis")]
            Log::Redis { backend, prefix } => {
                let key = stream_key(prefix, tenant);
                redis_log::read_group(backend, &key, tenant, group, consumer, count).await
            }
            Log::Memory(_) => Err(memory_has_no_groups()),
        }
    }

    /// Acknowledges events `ids` of `tenant` for `group`: they are not delivered again.
    /// Redis only.
    pub async fn ack(
        &self,
        tenant: &Tenant,
        group: &str,
        ids: &[String],
    ) -> Result<(), StoreError> {
        #[cfg(not(feature = "redis"))]
        let _ = (tenant, group, ids);
        match &self.inner.log {
            #[cfg(feature = "redis")]
            Log::Redis { backend, prefix } => {
                redis_log::ack(backend, &stream_key(prefix, tenant), group, ids).await
            }
            Log::Memory(_) => Err(memory_has_no_groups()),
        }
    }
}

fn memory_has_no_groups() -> StoreError {
    StoreError::Failed {
        source: "consumer groups need the Redis log (SessionEvents::redis)".into(),
    }
}

/// The fields of one event as the stream keeps them.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
struct Fields<'a> {
    kind: LifecycleKind,
    user: Option<&'a str>,
    session: &'a str,
    instance: &'a str,
    at: u64,
}

#[cfg(feature = "redis")]
fn stream_key(prefix: &str, tenant: &Tenant) -> String {
    format!("{prefix}{{{tenant}}}:events")
}

/// A stream id as two numbers; malformed ids sort first.
fn parse_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// The id of an event at `at` after the one with id `last`: ids only grow, as in a stream,
/// even when the clock steps back.
fn next_id(last: Option<(u64, u64)>, at: u64) -> (u64, u64) {
    match last {
        Some((ms, seq)) if ms >= at => (ms, seq + 1),
        _ => (at, 0),
    }
}

fn instance_name() -> String {
    let mut bytes = [0u8; 6];
    if getrandom::fill(&mut bytes).is_err() {
        bytes.copy_from_slice(&now_millis().to_le_bytes()[..6]);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

mod ends;
#[cfg(feature = "redis")]
mod redis_log;
