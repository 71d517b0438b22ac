//! Connections bound to the session that opened them: told ([`Event::SessionEnded`]) on
//! whichever instance holds them when that session ends, through the instances' inboxes.

use std::{collections::HashSet, sync::Arc, time::Duration};

use async_trait::async_trait;
use futures_util::{StreamExt, stream};
use tokio::sync::mpsc::error::TrySendError;

use super::{Event, RegisterError, Registration, Registry};
use crate::{
    ConfigError,
    session::{SessionEndListener, SessionKey, SessionStore, UserKey},
    sync::every_while_alive,
    tenant::Tenant,
};

/// What a watch does with the session of a bound connection; see
/// [`Registry::watch_sessions`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SessionWatch {
    /// Looks whether the session still lives, without restarting its inactivity clock: a
    /// session that expires (or ended unannounced) closes its connections within one period
    /// of the watch. The default.
    #[default]
    CloseOnExpiry,
    /// Uses the session, as a request would, once per check: a session lives as long as a
    /// connection bound to it does (up to its absolute end, where its connections close).
    KeepAlive,
}

/// The store the sessions of bound connections are checked in.
pub(super) struct Watch {
    store: Arc<dyn SessionStore>,
    mode: SessionWatch,
}

/// How many sessions a watch checks at once.
const CHECKS_IN_FLIGHT: usize = 16;

/// What an inbox entry names instead of one session: every session of the user.
const EVERY_SESSION: &str = "*";

impl Registry {
    /// Registers a live connection of `user` opened by the session under `session` (see
    /// [`Session::key`](crate::session::Session::key)), capped at `max` live connections of
    /// the user on all instances (`0`: no cap). When that session ends, the connection
    /// receives [`Event::SessionEnded`] on whichever instance holds it, once the ending is
    /// announced with [`Registry::end_session`] or [`Registry::end_user_sessions`], which
    /// [`SessionLayer::on_session_end`](crate::session::SessionLayer::on_session_end) does for
    /// every session the layer ends.
    ///
    /// ```no_run
    /// use tower_turnstile::{connection::{Event, Registry}, session::Session};
    ///
    /// async fn socket(registry: Registry, session: Session) -> Option<()> {
    ///     let user = session.user_id().await.ok()??;
    ///     let key = session.key()?;
    ///     let mut connection = registry.register_for_session(&key, &user, "ws", 5).await.ok()?;
    ///     while let Some(event) = connection.next().await {
    ///         if event == Event::SessionEnded {
    ///             break; // logged out, on any instance: close the socket
    ///         }
    ///     }
    ///     Some(())
    /// }
    /// ```
    pub async fn register_for_session(
        &self,
        session: &SessionKey,
        user: &str,
        meta: &str,
        max: u32,
    ) -> Result<Registration, RegisterError> {
        let tenant = session.tenant();
        self.admit(tenant, user, meta, max, Some(session.hash()))
            .await
    }

    /// Tells the connections registered under `session` that it ended, here at once and on
    /// the other instances holding connections of `user` through their inboxes (within one
    /// inbox poll, 20 ms by default). Without a user (a session bound to none), only this
    /// instance's are told; a [watch](Self::watch_sessions) tells the others within its period.
    /// While Redis is down only this instance's connections are told. Returns how many
    /// connections here were told.
    pub async fn end_session(&self, session: &SessionKey, user: Option<&str>) -> usize {
        let hash = session.hash();
        let tenant = session.tenant();
        let told = self.end_here(tenant, user, &hash);
        if let Some(user) = user {
            self.end_elsewhere(tenant, user, &hash).await;
        }
        told
    }

    /// Tells every connection bound to a session of `user` that its session ended ("log out
    /// everywhere"), here and on the other instances. Returns how many connections here were
    /// told.
    pub async fn end_user_sessions(&self, user: &UserKey) -> usize {
        let told = self.end_here(user.tenant(), Some(user.user()), EVERY_SESSION);
        self.end_elsewhere(user.tenant(), user.user(), EVERY_SESSION)
            .await;
        told
    }

    /// Tells this instance's connections bound to session `hash` (or, for
    /// [`EVERY_SESSION`], to any session of `user`) that it ended.
    pub(super) fn end_here(&self, tenant: &Tenant, user: Option<&str>, hash: &str) -> usize {
        let local = self.lock_local();
        let mut told = 0;
        for connection in local.values() {
            let Some(session) = &connection.session else {
                continue;
            };
            let ended = connection.tenant == *tenant
                && if hash == EVERY_SESSION {
                    user == Some(connection.user.as_str())
                } else {
                    session == hash
                };
            if !ended {
                continue;
            }
            told += 1;
            // Unlike a message, the end is never dropped: behind a full inbox it waits for
            // room, without holding up the caller.
            if let Err(TrySendError::Full(event)) = connection.inbox.try_send(Event::SessionEnded) {
                let inbox = connection.inbox.clone();
                tokio::spawn(async move { inbox.send(event).await });
            }
        }
        told
    }

    /// Appends the end to the inbox of every other instance holding connections of `user`.
    async fn end_elsewhere(&self, tenant: &Tenant, user: &str, hash: &str) {
        let Some(listed) = self.shared_connections_of(tenant, user).await else {
            return;
        };
        let here = &self.inner.keys.instance;
        let instances: HashSet<String> = listed
            .into_iter()
            .map(|c| c.instance)
            .filter(|instance| instance != here)
            .collect();
        let fields = [("t", tenant.as_str()), ("e", hash), ("u", user)];
        let commands = self.inbox_commands(instances.iter(), &fields);
        if let Err(error) = self.run_all(commands).await {
            self.redis_failed("end session", &error);
        }
    }
}

impl Registry {
    /// Checks, every `every`, that the sessions this instance's bound connections were
    /// registered under still live in `store` (the store of the
    /// [`SessionLayer`](crate::session::SessionLayer), [`SessionLayer::store`](crate::session::SessionLayer::store)),
    /// and tells the connections of those that do not ([`Event::SessionEnded`]). It catches
    /// what no one announces: a session that expires, or one ended while Redis was down. With
    /// [`SessionWatch::KeepAlive`], each check uses the session instead, so a connection keeps
    /// its session alive. One store call per bound session per check, 16 at a time: a third
    /// of the lease is a fair period, a second closes sockets within a second of an expiry.
    /// The first call sets the watch; later ones change nothing.
    pub fn watch_sessions(
        &self,
        store: Arc<dyn SessionStore>,
        mode: SessionWatch,
        every: Duration,
    ) -> Result<(), ConfigError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| ConfigError::NoRuntime("the session watch"))?;
        if self.inner.watch.set(Watch { store, mode }).is_err() {
            return Ok(());
        }
        let registry = Arc::downgrade(&self.inner);
        let watch = every_while_alive(registry, every, |inner| async move {
            Registry { inner }.check_sessions().await;
        });
        self.inner.tasks.keep(runtime.spawn(watch));
        Ok(())
    }

    /// One round of the watch: ends the connections of the sessions found gone.
    async fn check_sessions(&self) {
        let Some(watch) = self.inner.watch.get() else {
            return;
        };
        let bound: HashSet<(Tenant, String)> = self
            .lock_local()
            .values()
            .filter_map(|c| Some((c.tenant.clone(), c.session.clone()?)))
            .collect();
        let gone: Vec<_> = stream::iter(bound)
            .map(|(tenant, hash)| async move {
                let key = SessionKey::from_hash(&tenant, &hash)?;
                let alive = match watch.mode {
                    SessionWatch::CloseOnExpiry => watch.store.exists(&key).await,
                    SessionWatch::KeepAlive => watch.store.load(&key).await.map(|r| r.is_some()),
                };
                // A store that fails says nothing about the session: look again next time.
                matches!(alive, Ok(false)).then_some((tenant, hash))
            })
            .buffer_unordered(CHECKS_IN_FLIGHT)
            .collect()
            .await;
        for (tenant, hash) in gone.into_iter().flatten() {
            self.end_here(&tenant, None, &hash);
        }
    }
}

/// The registry closes the connections registered under a session that a
/// [`SessionLayer`](crate::session::SessionLayer) ends, on every instance.
#[async_trait]
impl SessionEndListener for Registry {
    async fn session_ended(&self, key: &SessionKey, user: Option<&str>) {
        self.end_session(key, user).await;
    }

    async fn user_sessions_ended(&self, user: &UserKey) {
        self.end_user_sessions(user).await;
    }
}
