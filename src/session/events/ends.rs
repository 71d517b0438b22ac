//! `expired` without keyspace notifications: each logged-in session's possible end goes into a
//! per-tenant index when it logs in; a sweep looks at the sessions whose end is due, puts back
//! those still alive, and claims the others atomically (`ZREM` answers 1 to one instance
//! only), so each expiry is written once, by one instance.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use super::{Log, SessionEvents};
use crate::{
    ConfigError,
    session::{LifecycleKind, SessionKey, SessionStore},
    sync::{every_while_alive, lock},
    tenant::Tenant,
    time::{millis, now_millis},
};

/// How many due sessions one sweep of a tenant looks at.
const SWEEP_BATCH: usize = 256;

/// The shortest wait before a live session is looked at again.
const MIN_RECHECK: u64 = 1_000;

/// The index of possible ends.
#[derive(Default)]
pub(super) struct Ends {
    /// Tenants this process has put in the shared list of tenants to sweep.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    listed: Mutex<HashSet<Tenant>>,
    /// The index itself, for the memory log.
    memory: Mutex<HashMap<Tenant, MemoryEnds>>,
}

/// One tenant's index in memory: (end, hash) in order, and each hash's end, idle and user.
#[derive(Default)]
struct MemoryEnds {
    due: BTreeSet<(u64, String)>,
    info: HashMap<String, (u64, u64, String)>,
}

/// What the index keeps of a session: its inactivity timeout and its user.
#[cfg(feature = "redis")]
fn info(idle: Duration, user: &str) -> String {
    format!("{}:{user}", millis(idle))
}

#[cfg(feature = "redis")]
fn parse_info(text: &str) -> Option<(u64, String)> {
    let (idle, user) = text.split_once(':')?;
    Some((idle.parse().ok()?, user.to_owned()))
}

/// When to look at a live session with inactivity timeout `idle` (ms) again.
fn recheck_at(now: u64, idle: u64) -> u64 {
    now + (idle / 4).max(MIN_RECHECK)
}

impl SessionEvents {
    /// Indexes a logged-in session that may end, unused, at `end_at` (Unix ms). A failure is
    /// logged: its expiry will not be written.
    pub(crate) async fn schedule(
        &self,
        tenant: &Tenant,
        user: &str,
        hash: &str,
        idle: Duration,
        end_at: u64,
    ) {
        match &self.inner.log {
            #[cfg(feature = "redis")]
            Log::Redis { backend, prefix } => {
                let listed = lock(&self.inner.ends.listed).insert(tenant.clone());
                let tenants = listed.then(|| tenants_key(prefix));
                let keys = (ends_key(prefix, tenant), info_key(prefix, tenant));
                let done = redis_ends::schedule(
                    backend,
                    keys,
                    tenants,
                    tenant,
                    hash,
                    end_at,
                    &info(idle, user),
                )
                .await;
                if let Err(error) = done {
                    lock(&self.inner.ends.listed).remove(tenant);
                    tracing::warn!(target: "tower_turnstile::session", %error, "a session's end could not be indexed; its expiry will not be written");
                }
            }
            Log::Memory(_) => {
                let mut memory = lock(&self.inner.ends.memory);
                let ends = memory.entry(tenant.clone()).or_default();
                if let Some((old, ..)) = ends.info.remove(hash) {
                    ends.due.remove(&(old, hash.to_owned()));
                }
                ends.due.insert((end_at, hash.to_owned()));
                ends.info
                    .insert(hash.to_owned(), (end_at, millis(idle), user.to_owned()));
            }
        }
    }

    /// Takes sessions out of the index: they ended some other way (a logout, an eviction, a
    /// new id), so their end is not an expiry.
    pub(crate) async fn unschedule(&self, tenant: &Tenant, hashes: &[String]) {
        if hashes.is_empty() {
            return;
        }
        match &self.inner.log {
            #[cfg(feature = "redis")]
            Log::Redis { backend, prefix } => {
                let keys = (ends_key(prefix, tenant), info_key(prefix, tenant));
                if let Err(error) = redis_ends::unschedule(backend, keys, hashes).await {
                    tracing::warn!(target: "tower_turnstile::session", %error, "sessions could not leave the index of ends; their end may be written as an expiry");
                }
            }
            Log::Memory(_) => {
                let mut memory = lock(&self.inner.ends.memory);
                if let Some(ends) = memory.get_mut(tenant) {
                    for hash in hashes {
                        if let Some((end, ..)) = ends.info.remove(hash) {
                            ends.due.remove(&(end, hash.clone()));
                        }
                    }
                }
            }
        }
    }

    /// Writes [`LifecycleKind::Expired`] for the logged-in sessions that end unused: every
    /// `every`, the sessions whose end is due are looked at in `store` (the layer's,
    /// [`SessionLayer::store`](crate::session::SessionLayer::store)), without restarting
    /// their clock; one still alive is looked at again a quarter of its inactivity timeout
    /// later; one gone is claimed, by one instance of all that sweep, which writes the event.
    /// The sweep stops with the last clone of these events.
    ///
    /// A session that ends some other way (logout, "log out everywhere", the per-user cap, a
    /// new id) leaves the index when the layer ends it; an expiry is written within about
    /// `every` of the session's end (plus up to a quarter of its inactivity timeout, when it
    /// was used since its last look).
    pub fn sweep_expired(
        &self,
        store: Arc<dyn SessionStore>,
        every: Duration,
    ) -> Result<(), ConfigError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| ConfigError::NoRuntime("the sweep of expired sessions"))?;
        let events = Arc::downgrade(&self.inner);
        runtime.spawn(every_while_alive(events, every, move |inner| {
            let store = Arc::clone(&store);
            async move { SessionEvents { inner }.sweep(store.as_ref()).await }
        }));
        Ok(())
    }

    /// One sweep of every tenant.
    pub(crate) async fn sweep(&self, store: &dyn SessionStore) {
        for tenant in self.swept_tenants().await {
            for (hash, idle, user) in self.due(&tenant).await {
                let Some(key) = SessionKey::from_hash(&tenant, &hash) else {
                    self.unschedule(&tenant, &[hash]).await;
                    continue;
                };
                match store.exists(&key).await {
                    Ok(true) => {
                        self.reschedule(&tenant, &hash, recheck_at(now_millis(), idle))
                            .await
                    }
                    Ok(false) if self.claim(&tenant, &hash).await => {
                        let user = Some(user.as_str()).filter(|u| !u.is_empty());
                        self.record(LifecycleKind::Expired, &tenant, user, &hash)
                            .await;
                    }
                    // Claimed by another instance, or the store cannot say now.
                    _ => {}
                }
            }
        }
    }

    async fn swept_tenants(&self) -> Vec<Tenant> {
        match &self.inner.log {
            #[cfg(feature = "redis")]
            Log::Redis { backend, prefix } => redis_ends::tenants(backend, &tenants_key(prefix))
                .await
                .unwrap_or_default(),
            Log::Memory(_) => lock(&self.inner.ends.memory).keys().cloned().collect(),
        }
    }

    /// The due sessions of `tenant`: hash, inactivity timeout (ms) and user.
    async fn due(&self, tenant: &Tenant) -> Vec<(String, u64, String)> {
        let now = now_millis();
        match &self.inner.log {
            #[cfg(feature = "redis")]
            Log::Redis { backend, prefix } => {
                let keys = (ends_key(prefix, tenant), info_key(prefix, tenant));
                let due = redis_ends::due(backend, keys, now, SWEEP_BATCH).await;
                due.unwrap_or_default()
                    .into_iter()
                    .map(|(hash, text)| {
                        let (idle, user) = text.as_deref().and_then(parse_info).unwrap_or_default();
                        (hash, idle, user)
                    })
                    .collect()
            }
            Log::Memory(_) => {
                let memory = lock(&self.inner.ends.memory);
                let Some(ends) = memory.get(tenant) else {
                    return Vec::new();
                };
                ends.due
                    .iter()
                    .take_while(|(end, _)| *end <= now)
                    .take(SWEEP_BATCH)
                    .filter_map(|(_, hash)| {
                        let (_, idle, user) = ends.info.get(hash)?;
                        Some((hash.clone(), *idle, user.clone()))
                    })
                    .collect()
            }
        }
    }

    async fn reschedule(&self, tenant: &Tenant, hash: &str, at: u64) {
        match &self.inner.log {
            #[cfg(feature = "redis")]
            Log::Redis { backend, prefix } => {
                let _ = redis_ends::reschedule(backend, &ends_key(prefix, tenant), hash, at).await;
            }
            Log::Memory(_) => {
                let mut memory = lock(&self.inner.ends.memory);
                if let Some(ends) = memory.get_mut(tenant)
                    && let Some(entry) = ends.info.get_mut(hash)
                {
                    ends.due.remove(&(entry.0, hash.to_owned()));
                    entry.0 = at;
                    ends.due.insert((at, hash.to_owned()));
                }
            }
        }
    }

    /// Takes `hash` out of the index; whether this call was the one that did (the claim).
    async fn claim(&self, tenant: &Tenant, hash: &str) -> bool {
        match &self.inner.log {
            #[cfg(feature = "redis")]
            Log::Redis { backend, prefix } => {
                let keys = (ends_key(prefix, tenant), info_key(prefix, tenant));
                redis_ends::claim(backend, keys, hash)
                    .await
                    .unwrap_or(false)
            }
            Log::Memory(_) => {
                let mut memory = lock(&self.inner.ends.memory);
                let Some(ends) = memory.get_mut(tenant) else {
                    return false;
                };
                match ends.info.remove(hash) {
                    Some((end, ..)) => ends.due.remove(&(end, hash.to_owned())),
                    None => false,
                }
            }
        }
    }
}

#[cfg(feature = "redis")]
fn ends_key(prefix: &str, tenant: &Tenant) -> String {
    format!("{prefix}{{{tenant}}}:ends")
}

#[cfg(feature = "redis")]
fn info_key(prefix: &str, tenant: &Tenant) -> String {
    format!("{prefix}{{{tenant}}}:ends-info")
}

#[cfg(feature = "redis")]
fn tenants_key(prefix: &str) -> String {
    format!("{prefix}swept-tenants")
}

#[cfg(feature = "redis")]
mod redis_ends;
