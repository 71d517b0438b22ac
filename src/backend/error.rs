use std::{error::Error as StdError, time::Duration};

use redis::{ErrorKind, RedisError, ServerErrorKind};

type BoxError = Box<dyn StdError + Send + Sync>;

/// Why a call to Redis did not produce an answer. (A backend that cannot be built at all is a
/// [`ConfigError`](crate::ConfigError).)
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The circuit breaker is open: Redis failed recently, so the call was not attempted.
    #[error("Redis circuit breaker is open; the call was not attempted")]
    CircuitOpen,
    /// Redis did not answer within the deadline.
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    /// Redis could not be reached, or the connection broke.
    #[error("Redis is unreachable")]
    Unreachable {
        /// The underlying connection error.
        #[source]
        source: BoxError,
    },
    /// Redis answered with an error, or with a reply of an unexpected shape.
    #[error("Redis answered with an error")]
    Command {
        /// The error Redis or the client library reported.
        #[source]
        source: BoxError,
    },
}

impl BackendError {
    /// Whether this error means Redis is not available (as opposed to a bad reply from a
    /// Redis that is up). Outages count against the circuit breaker; bad replies do not.
    pub fn is_outage(&self) -> bool {
        matches!(
            self,
            Self::CircuitOpen | Self::Timeout(_) | Self::Unreachable { .. }
        )
    }
}

/// Whether `error` says Redis is unavailable, rather than that it refused one command.
pub(super) fn is_outage(error: &RedisError) -> bool {
    if error.is_io_error() || error.is_timeout() || error.is_connection_dropped() {
        return true;
    }
    // A server that wants credentials this client did not send (or that no longer match)
    // cannot be used at all until the configuration is fixed.
    if matches!(error.code(), Some("NOAUTH" | "WRONGPASS")) {
        return true;
    }
    // A transaction whose commands a server that has become a replica refused as they were
    // queued: the master is gone from there.
    if error.kind() == ErrorKind::Server(ServerErrorKind::ExecAbort)
        && error.clone().into_server_errors().is_some_and(|errors| {
            errors
                .iter()
                .any(|(_, error)| error.kind() == Some(ServerErrorKind::ReadOnly))
        })
    {
        return true;
    }
    matches!(
        error.kind(),
        ErrorKind::Io
            | ErrorKind::AuthenticationFailed
            | ErrorKind::ClusterConnectionNotFound
            | ErrorKind::MasterNameNotFoundBySentinel
            | ErrorKind::NoValidReplicasFoundBySentinel
            | ErrorKind::EmptySentinelList
            | ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ReadOnly
            )
    )
}
