//! At most N live sessions per user: [`SessionLayer::with_max_sessions_per_user`](super::SessionLayer::with_max_sessions_per_user).

use super::{
    LifecycleKind, Session, SessionError,
    store::{SessionKey, UserKey},
};

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
    /// has `max` live sessions besides this one.
    pub(super) async fn admit_login(&self, user: &str) -> Result<(), SessionError> {
        let Some(cap) = self.inner.shared.cap else {
            return Ok(());
        };
        if cap.over != OverCap::RefuseLogin {
            return Ok(());
        }
        let listed = self
            .inner
            .shared
            .store
            .list_user_sessions(&UserKey::new(&self.inner.tenant, user))
            .await?;
        let own = self.key();
        let others = listed
            .iter()
            .filter(|info| Some(&info.key) != own.as_ref())
            .count();
        if others >= cap.max {
            return Err(SessionError::TooManySessions { limit: cap.max });
        }
        Ok(())
    }

    /// After a login of `user` stored under `new`, under [`OverCap::EndOldest`]: ends the
    /// user's oldest other sessions (by creation) beyond the cap, as the store decides them
    /// ([`SessionStore::sessions_over_cap`](super::SessionStore::sessions_over_cap): atomic
    /// on Redis). A failure is logged; the login stands.
    pub(crate) async fn end_sessions_over_cap(&self, user: &str, new: &SessionKey) {
        let Some(cap) = self.inner.shared.cap else {
            return;
        };
        if cap.over != OverCap::EndOldest {
            return;
        }
        let store = &self.inner.shared.store;
        let over = match store
            .sessions_over_cap(&UserKey::new(&self.inner.tenant, user), new, cap.max)
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
