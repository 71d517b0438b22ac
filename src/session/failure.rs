//! What the session layer does when something fails.

/// What the session layer does when something fails: the store (a session cannot be read or
/// its changes cannot be written) or the handler (it answered `5xx`). One value, set with
/// [`SessionLayer::with_failure_policy`](super::SessionLayer::with_failure_policy).
///
/// | the store fails… | [`fail_open`](Self::fail_open) (default) | [`fail_closed_on_write`](Self::fail_closed_on_write) | [`fail_closed`](Self::fail_closed) |
/// | --- | --- | --- | --- |
/// | reading the session | the handler sees an empty session ([`Session::is_degraded`](super::Session::is_degraded)) | the same | reads return the error; the answer is `503` |
/// | writing its changes | changes dropped, [`SessionEvent::Failed`](super::SessionEvent::Failed), the handler's answer | `503` instead of the handler's answer | `503` |
///
/// Two options change what happens before that:
/// - [`with_restart_when_unavailable`](Self::with_restart_when_unavailable): changes to a
///   session that could not be read go into a new session (new id and cookie,
///   [`SessionEvent::Restarted`](super::SessionEvent::Restarted)) instead of being dropped;
///   only when that new session cannot be stored either does the write count as lost. It has
///   no effect under `fail_closed`, which answers `503` first.
/// - [`with_save_on_server_error`](Self::with_save_on_server_error): changes are saved even
///   when the handler answers `5xx` (by default a failed request writes nothing).
///
#[cfg_attr(all(feature = "memory", feature = "redis"), doc = "```no_run")]
#[cfg_attr(not(all(feature = "memory", feature = "redis")), doc = "```ignore")]
/// use tower_turnstile::{
///     backend::RedisBackend,
///     session::{FailurePolicy, FallbackStore, RedisStore, SessionLayer},
/// };
///
/// let redis = RedisBackend::new("redis://127.0.0.1:6379")?;
/// // Never claim a write that was not kept; keep what can be kept in a new session.
/// let policy = FailurePolicy::fail_closed_on_write().with_restart_when_unavailable(true);
/// let layer = SessionLayer::new(FallbackStore::new(RedisStore::new(redis)))
///     .with_failure_policy(policy);
/// # let _ = layer;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct FailurePolicy {
    refuse: Refuse,
    restart_when_unavailable: bool,
    save_on_server_error: bool,
}

/// When the layer answers `503` itself; each refuses everything the one before it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Refuse {
    Never,
    LostWrites,
    AnyFailure,
}

impl Default for FailurePolicy {
    /// [`FailurePolicy::fail_open`].
    fn default() -> Self {
        Self::fail_open()
    }
}

impl FailurePolicy {
    /// Never answer `503`: a session that cannot be read reads as empty, changes that cannot be
    /// written are dropped, and both are logged. The default.
    pub const fn fail_open() -> Self {
        Self::refusing(Refuse::Never)
    }

    /// Fail open for reads, closed for writes: answer `503` instead of the handler's answer
    /// when the request's changes could not be kept anywhere, so a client is never told "done"
    /// about a write that was lost. Requests that only read get the handler's answer.
    ///
    /// With a [`FallbackStore`](super::FallbackStore), writes during a Redis outage are kept
    /// locally and journaled, so this answers `503` only for what even the fallback could not
    /// keep (a session this instance never saw, a full journal).
    pub const fn fail_closed_on_write() -> Self {
        Self::refusing(Refuse::LostWrites)
    }

    /// Answer `503` whenever the store fails during the request, and let session reads return
    /// the error.
    pub const fn fail_closed() -> Self {
        Self::refusing(Refuse::AnyFailure)
    }

    const fn refusing(refuse: Refuse) -> Self {
        Self {
            refuse,
            restart_when_unavailable: false,
            save_on_server_error: false,
        }
    }

    /// When the request's session could not be read (the store failed) and the request
    /// changed it, keep the changes in a new session under a new id and cookie instead of
    /// dropping them. Default: off.
    ///
    /// The trade is the client's old session for an answer. The handler saw an empty session
    /// (see [`Session::is_degraded`](super::Session::is_degraded)), so its answer is true of
    /// the new session, which the store keeps. The old session is not touched, but this client
    /// no longer holds its cookie. With a [`FallbackStore`](super::FallbackStore) this happens
    /// only during a Redis outage, to a session this instance never saw: a forged or unknown
    /// id gets a fresh session instead of a `503`, and so does a real session served so far by
    /// another instance. Changes that hold no data and no user (a removal, an expiry) start
    /// nothing and are dropped as before.
    pub const fn with_restart_when_unavailable(mut self, restart: bool) -> Self {
        self.restart_when_unavailable = restart;
        self
    }

    /// Save the session's changes even when the inner service answers `5xx`. Default: off (a
    /// failed request does not half-write a session).
    pub const fn with_save_on_server_error(mut self, save: bool) -> Self {
        self.save_on_server_error = save;
        self
    }

    /// Whether any store failure answers `503` (and reads return the error).
    pub(crate) fn refuses_any_failure(&self) -> bool {
        self.refuse == Refuse::AnyFailure
    }

    /// Whether changes that could not be kept answer `503`.
    pub(crate) fn refuses_lost_writes(&self) -> bool {
        self.refuse >= Refuse::LostWrites
    }

    pub(crate) fn restarts_when_unavailable(&self) -> bool {
        self.restart_when_unavailable
    }

    pub(crate) fn saves_on_server_error(&self) -> bool {
        self.save_on_server_error
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_preset_refuses_what_the_one_before_does() {
        let open = FailurePolicy::default();
        assert_eq!(open, FailurePolicy::fail_open());
        assert!(!open.refuses_lost_writes() && !open.refuses_any_failure());
        let writes = FailurePolicy::fail_closed_on_write();
        assert!(writes.refuses_lost_writes() && !writes.refuses_any_failure());
        let closed = FailurePolicy::fail_closed();
        assert!(closed.refuses_lost_writes() && closed.refuses_any_failure());
        let tuned = closed
            .with_restart_when_unavailable(true)
            .with_save_on_server_error(true);
        assert!(tuned.restarts_when_unavailable() && tuned.saves_on_server_error());
        assert!(!closed.restarts_when_unavailable() && !closed.saves_on_server_error());
    }
}
