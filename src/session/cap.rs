//! At most N live sessions per user: [`SessionLayer::with_max_sessions_per_user`](super::SessionLayer::with_max_sessions_per_user).

use super::{
    LifecycleKind, Session, SessionError,
    store::{LoginHold, SessionKey, UserKey},
};
use crate::sync::lock;

/// What a login does when its user already has the most sessions allowed; see
/// [`SessionLayer::with_max_sessions_per_user`](super::SessionLayer::with_max_sessions_per_user).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OverCap {
    /// The login goes through, and the user's oldest other sessions end (on every instance;
    /// their live connections are told, as for a logout). The default.
    #[default]
    EndOldest,
    /// The login is refused: [`Session::set_user`] answers [`SessionError::TooManySessions`]
    /// and the session stays as it was.
    RefuseLogin,
}

/// The cap a layer enforces.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cap {
    pub(crate) max: usize,
    pub(crate) over: OverCap,
}

impl Session {
    /// Before a login of `user` under [`OverCap::RefuseLogin`]: refuses it when the user already
    /// has `max` live sessions besides this one. The store may hold a place for the login
    /// ([`SessionStore::hold_login`](super::SessionStore::hold_login): atomic on Redis),
    /// kept until the login is stored.
    pub(super) async fn admit_login(&self, user: &str) -> Result<(), SessionError> {
        let Some(cap) = self.inner.shared.cap else {
            return Ok(());
        };
        if cap.over != OverCap::RefuseLogin {
            return Ok(());
        }
        let own = self.key();
        let hold = self
            .inner
            .shared
            .store
            .hold_login(
                &UserKey::new(&self.inner.tenant, user),
                own.as_ref(),
                cap.max,
            )
            .await?;
        match hold {
            LoginHold::Admitted(place) => {
                *lock(&self.inner.held) = place;
                Ok(())
            }
            _ => Err(SessionError::TooManySessions { limit: cap.max }),
        }
    }

    /// After a login of `user` stored under `new`: ends the user's oldest other sessions (by
    /// creation) beyond the cap, as the store decides them
    /// ([`SessionStore::sessions_over_cap`](super::SessionStore::sessions_over_cap): atomic
    /// on Redis). Under [`OverCap::RefuseLogin`] it ends none: the login only takes the place
    /// held for it. A failure is logged; the login stands.
    pub(crate) async fn end_sessions_over_cap(&self, user: &str, new: &SessionKey) {
        let Some(cap) = self.inner.shared.cap else {
            return;
        };
        let held = lock(&self.inner.held).take();
        // A refusing cap ends nothing: the login only takes the place held for it.
        let max = match cap.over {
            OverCap::EndOldest => cap.max,
            _ if held.is_some() => usize::MAX,
            _ => return,
        };
        let store = &self.inner.shared.store;
        let over = match store
            .sessions_over_cap(
                &UserKey::new(&self.inner.tenant, user),
                new,
                max,
                held.as_deref(),
            )
            .await
        {
            Ok(over) => over,
            Err(error) => {
                tracing::warn!(target: "tower_turnstile::session", %error, "could not decide the user's sessions over the cap");
                return;
            }
        };
        let shared = &self.inner.shared;
        for key in &over {
            let tenant = &self.inner.tenant;
            shared
                .unschedule_ends(tenant, std::slice::from_ref(key))
                .await;
            match store.delete(key, Some(user)).await {
                Ok(()) => {
                    let evicted = LifecycleKind::Evicted;
                    shared
                        .lifecycle(evicted, tenant, Some(user), Some(key))
                        .await;
                }
                Err(error) => {
                    tracing::warn!(target: "tower_turnstile::session", %error, "could not end a session over the user's cap");
                }
            }
        }
    }
}
