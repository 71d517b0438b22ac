//! Carrying a [`Plan`] out against the store.

use std::time::Duration;

use super::{
    Committed, CookieChange,
    plan::{Loaded, Plan, Start, may_start_over, new_session, plan},
};
use crate::{
    session::{
        LifecycleKind, Session, SessionEvent,
        id::SessionId,
        session::State,
        store::{Lifetime, Patch, Record, Written},
    },
    time::now_millis,
};

/// What a write to the cookie's session came to.
enum Wrote {
    Done(Committed),
    /// The session was gone (expired, or destroyed elsewhere): plan again, knowing it.
    Gone,
}

impl Session {
    /// Writes what the request changed, in as few round trips as the change allows, and says
    /// what to do with the cookie.
    pub(crate) async fn commit(&self, server_error: bool) -> Committed {
        let mut state = self.inner.state.lock().await;
        let has_cookie = self.inner.incoming.is_some();
        loop {
            let shared = &self.inner.shared;
            let plan = plan(
                &state.changes,
                &state.loaded,
                has_cookie,
                server_error,
                shared,
                now_millis(),
            );
            return match plan {
                Plan::Nothing => Committed::NOTHING,
                Plan::LoadFirst => {
                    if self.loaded(&mut state).await.is_err() {
                        return Committed::FAILED;
                    }
                    continue;
                }
                Plan::Destroy { user } => {
                    if user.is_none() && self.read_whose(&mut state).await {
                        continue;
                    }
                    self.destroy_now(user.as_deref()).await
                }
                Plan::Create { record, start } => self.create(&record, start).await,
                Plan::RemoveCookie => Committed {
                    cookie: CookieChange::Remove,
                    event: None,
                },
                Plan::Cycle { old_user, record } => {
                    match self.cycle(old_user.as_deref(), &record).await {
                        Wrote::Done(committed) => committed,
                        Wrote::Gone => {
                            state.loaded = Loaded::Gone;
                            continue;
                        }
                    }
                }
                Plan::Update { patch, resend } => match self.update(&patch, resend, &state).await {
                    Wrote::Done(committed) => committed,
                    Wrote::Gone => {
                        state.loaded = Loaded::Gone;
                        continue;
                    }
                },
                Plan::Drop => {
                    tracing::warn!(
                        target: "tower_turnstile::session",
                        "session changes dropped: the store was unavailable when the session was read"
                    );
                    Committed::FAILED
                }
            };
        }
    }

    /// Before a logout of an unread session, when the layer keeps a lifecycle log (which names
    /// the user who logged out) or announces ends (the user tells which instances hold the
    /// session's connections): reads the session. Whether it was read.
    async fn read_whose(&self, state: &mut State) -> bool {
        let shared = &self.inner.shared;
        let wants_user = shared.events.is_some() || shared.announces;
        if !matches!(state.loaded, Loaded::NotYet) || !wants_user {
            return false;
        }
        let _ = self.loaded(state).await;
        !matches!(state.loaded, Loaded::NotYet)
    }

    /// Ends the cookie's session. The cookie goes either way; a failed delete is reported,
    /// since the id still works in the store until it expires.
    async fn destroy_now(&self, user: Option<&str>) -> Committed {
        let Some(key) = self.key() else {
            return Committed::NOTHING;
        };
        let shared = &self.inner.shared;
        // Out of the index of ends first: a sweep must not take the logout for an expiry.
        shared
            .unschedule_ends(&self.inner.tenant, std::slice::from_ref(&key))
            .await;
        let event = match shared.store.delete(&key, user).await {
            Ok(()) => {
                let logout = LifecycleKind::Logout;
                shared
                    .lifecycle(logout, &self.inner.tenant, user, Some(&key))
                    .await;
                SessionEvent::Destroyed
            }
            Err(error) => {
                self.store_failed(&error, "destroy");
                SessionEvent::Failed
            }
        };
        Committed::new(CookieChange::Remove, event)
    }

    /// Stores `record` as a new session under a new id.
    async fn create(&self, record: &Record, start: Start) -> Committed {
        let Some(id) = SessionId::random() else {
            tracing::error!(target: "tower_turnstile::session", "the OS random generator failed; no session created");
            return Committed::FAILED;
        };
        let key = id.key(&self.inner.tenant);
        if let Err(error) = self.inner.shared.store.create(&key, record).await {
            self.store_failed(&error, "create");
            return Committed::FAILED;
        }
        let shared = &self.inner.shared;
        let tenant = &self.inner.tenant;
        if let Some(user) = &record.user {
            shared
                .lifecycle(LifecycleKind::Login, tenant, Some(user), Some(&key))
                .await;
            shared.schedule_end(tenant, &key, record).await;
            self.end_sessions_over_cap(user, &key).await;
        } else if shared.events.as_ref().is_some_and(|e| e.writes_created()) {
            shared
                .lifecycle(LifecycleKind::Created, tenant, None, Some(&key))
                .await;
        }
        let event = match start {
            Start::New => SessionEvent::Created,
            Start::Gone => {
                tracing::info!(
                    target: "tower_turnstile::session",
                    "session gone before its changes were written; they started a new session"
                );
                SessionEvent::Restarted
            }
            Start::Unavailable => {
                tracing::info!(
                    target: "tower_turnstile::session",
                    "the session was unavailable; the request's changes started a new session"
                );
                SessionEvent::Restarted
            }
        };
        Committed::new(CookieChange::Set(id, cookie_age(&record.lifetime())), event)
    }

    /// Moves the session to a new id as `record`.
    async fn cycle(&self, old_user: Option<&str>, record: &Record) -> Wrote {
        let (Some(old), Some(new_id)) = (self.key(), SessionId::random()) else {
            return Wrote::Done(Committed::FAILED);
        };
        let new = new_id.key(&self.inner.tenant);
        let store = &self.inner.shared.store;
        // The old id ends with the move, not by expiry: out of the index of ends first.
        let old_keys = std::slice::from_ref(&old);
        self.inner
            .shared
            .unschedule_ends(&self.inner.tenant, old_keys)
            .await;
        Wrote::Done(match store.cycle(&old, old_user, &new, record).await {
            Ok(Written::Applied) => {
                let (shared, tenant) = (&self.inner.shared, &self.inner.tenant);
                let user = record.user.as_deref();
                // The new id may end unused.
                shared.schedule_end(tenant, &new, record).await;
                if let Some(user) = user.filter(|u| Some(*u) != old_user) {
                    shared
                        .lifecycle(LifecycleKind::Login, tenant, Some(user), Some(&new))
                        .await;
                    self.end_sessions_over_cap(user, &new).await;
                } else {
                    shared
                        .lifecycle(LifecycleKind::Cycled, tenant, user, Some(&new))
                        .await;
                }
                Committed::new(
                    CookieChange::Set(new_id, cookie_age(&record.lifetime())),
                    SessionEvent::Cycled,
                )
            }
            Ok(Written::Missing) => return Wrote::Gone,
            Err(error) => {
                self.store_failed(&error, "cycle");
                Committed::FAILED
            }
        })
    }

    /// Writes the changed fields. When the store fails, the changes may start a new session
    /// (see `FailurePolicy`).
    async fn update(&self, patch: &Patch, resend: Option<Lifetime>, state: &State) -> Wrote {
        let Some(key) = self.key() else {
            return Wrote::Done(Committed::FAILED);
        };
        let shared = &self.inner.shared;
        Wrote::Done(match shared.store.update(&key, patch).await {
            Ok(Written::Applied) => {
                let cookie = match (resend, self.inner.incoming) {
                    (Some(lifetime), Some(id)) => CookieChange::Set(id, cookie_age(&lifetime)),
                    _ => CookieChange::Keep,
                };
                Committed::new(cookie, SessionEvent::Saved)
            }
            Ok(Written::Missing) => return Wrote::Gone,
            Err(error) => {
                self.store_failed(&error, "save");
                if !may_start_over(&state.changes, shared) {
                    return Wrote::Done(Committed::FAILED);
                }
                let start = new_session(
                    &state.changes,
                    true,
                    shared,
                    now_millis(),
                    Start::Unavailable,
                );
                match start {
                    Plan::Create { record, start } => self.create(&record, start).await,
                    _ => Committed::FAILED,
                }
            }
        })
    }
}

/// The `Max-Age` of a cookie for a session with these settings; `None` for a browser-session
/// cookie.
fn cookie_age(lifetime: &Lifetime) -> Option<Duration> {
    lifetime
        .persistent
        .then(|| Duration::from_millis(lifetime.expires_at.saturating_sub(now_millis())))
}
