//! Per-session expiry: how long one session lives and what kind of cookie carries it.

use std::time::{Duration, SystemTime};

use super::store::Lifetime;
use crate::time::{millis, unix_millis};

/// How long one session lives, and whether its cookie outlives the browser. Chosen per session
/// with [`Session::set_expiry`](super::Session::set_expiry) (a "remember me" checkbox, say);
/// sessions that choose nothing follow the layer's settings.
///
/// Whatever is chosen, no session outlives the layer's absolute lifetime
/// ([`SessionLayer::with_absolute_lifetime`](super::SessionLayer::with_absolute_lifetime)),
/// counted from the session's creation. The choice is stored with the session, so every
/// instance applies it, and the cookie is sent again whenever its attributes change.
///
/// ```
/// use std::time::Duration;
/// use tower_turnstile::session::{Expiry, Session, SessionError};
///
/// async fn login(session: Session, user: String, remember: bool) -> Result<(), SessionError> {
///     session.set_user(user).await?;
///     session
///         .set_expiry(if remember {
///             Expiry::Inactivity(Duration::from_secs(14 * 24 * 3600))
///         } else {
///             Expiry::BrowserSession
///         })
///         .await;
///     Ok(())
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Expiry {
    /// A browser-session cookie (no `Max-Age`): the browser forgets it when it closes. The
    /// session itself ends after the layer's inactivity timeout.
    BrowserSession,
    /// A persistent cookie; the session ends after this long unused.
    Inactivity(Duration),
    /// A persistent cookie; the session ends at this time, however it is used. A time already
    /// past ends the session at once, as [`Session::destroy`](super::Session::destroy) does.
    At(SystemTime),
}

impl Expiry {
    /// The stored settings for a session created at `created_at` (Unix ms), under a layer whose
    /// default inactivity timeout is `inactivity` and whose absolute lifetime is `lifetime`.
    pub(crate) fn resolve(
        self,
        created_at: u64,
        inactivity: Duration,
        lifetime: Duration,
    ) -> Lifetime {
        let cap = created_at.saturating_add(millis(lifetime));
        match self {
            Self::BrowserSession => Lifetime::new(inactivity, cap, false),
            Self::Inactivity(timeout) => Lifetime::new(timeout, cap, true),
            // The inactivity clock never cuts such a session short: no session lives longer
            // than `lifetime` from its creation.
            Self::At(end) => Lifetime::new(lifetime, unix_millis(end).min(cap), true),
        }
    }

    /// Whether the session ends as soon as this is chosen.
    pub(crate) fn is_past(self) -> bool {
        matches!(self, Self::At(end) if end <= SystemTime::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn every_choice_is_capped_by_the_absolute_lifetime() {
        let created = 1_000_000;
        let cap = created + millis(10 * HOUR);
        assert_eq!(
            Expiry::BrowserSession.resolve(created, HOUR, 10 * HOUR),
            Lifetime::new(HOUR, cap, false)
        );
        assert_eq!(
            Expiry::Inactivity(100 * HOUR).resolve(created, HOUR, 10 * HOUR),
            Lifetime::new(100 * HOUR, cap, true)
        );
        let soon = SystemTime::UNIX_EPOCH + Duration::from_millis(created + 5_000);
        assert_eq!(
            Expiry::At(soon).resolve(created, HOUR, 10 * HOUR),
            Lifetime::new(10 * HOUR, created + 5_000, true)
        );
        let late = SystemTime::UNIX_EPOCH + Duration::from_millis(cap + 5_000);
        assert_eq!(
            Expiry::At(late)
                .resolve(created, HOUR, 10 * HOUR)
                .expires_at,
            cap
        );
    }

    #[test]
    fn a_past_time_ends_the_session() {
        assert!(Expiry::At(SystemTime::UNIX_EPOCH).is_past());
        assert!(!Expiry::At(SystemTime::now() + HOUR).is_past());
        assert!(!Expiry::BrowserSession.is_past());
    }
}
