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
    /// Redis answers, but will not take writes now: it is out of memory (`OOM`, under
    /// `maxmemory-policy noeviction`). Reads still work; the stores report the write as
    /// unavailable, and the fallback store journals it for later.
    #[error("Redis refuses writes now")]
    WritesRefused {
        /// What Redis answered.
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

    /// Whether Redis answered but refused a write it would take with more memory. Not an
    /// outage: reads go on, and the breaker stays closed.
    pub fn refuses_writes(&self) -> bool {
        matches!(self, Self::WritesRefused { .. })
    }
}

/// Whether an error reply Redis gave to one command of a pipeline means the call as a whole
/// cannot be served now (an outage, or a refused write), rather than something about the data
/// that command touched. A store that reads replies one by one lifts such a reply into the
/// call's error, so that it is never mistaken for a corrupt record.
pub(crate) fn fails_the_call(error: &RedisError) -> bool {
    is_outage(error) || super::refusal::refuses_writes(error)
}

/// Whether `error` says Redis is unavailable, rather than that it refused one command.
pub(super) fn is_outage(error: &RedisError) -> bool {
    if error.is_io_error() || error.is_timeout() || error.is_connection_dropped() {
        return true;
    }
    // A server that wants credentials this client did not send (or that no longer match)
    // cannot be used at all until the configuration is fixed; one busy running a script
    // serves nothing until the script ends or is killed.
    if matches!(error.code(), Some("NOAUTH" | "WRONGPASS" | "BUSY")) {
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

#[cfg(test)]
mod tests {
    use super::{fails_the_call, is_outage};

    /// The error a reply of this RESP text is.
    fn reply(text: &str) -> redis::RedisError {
        let value = redis::parse_redis_value(text.as_bytes()).expect("a RESP reply");
        value.extract_error().expect_err("an error reply")
    }

    /// Every reply the docs' table classifies as an outage, as Redis words it, including the
    /// ones only a resharding Cluster gives (`TRYAGAIN`), which no test provokes on a server.
    #[test]
    fn the_replies_of_an_unavailable_redis_are_outages() {
        for text in [
            "-LOADING Redis is loading the dataset in memory\r\n",
            "-TRYAGAIN Multiple keys request during rehashing of slot\r\n",
            "-CLUSTERDOWN The cluster is down\r\n",
            "-MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.\r\n",
            "-READONLY You can't write against a read only replica.\r\n",
            "-BUSY Redis is busy running a script.\r\n",
            "-NOAUTH Authentication required.\r\n",
            "-WRONGPASS invalid username-password pair or user is disabled.\r\n",
        ] {
            let error = reply(text);
            assert!(is_outage(&error), "{text:?} → {error:?}");
            assert!(fails_the_call(&error), "{text:?}");
        }
    }

    #[test]
    fn a_refused_write_fails_the_call_without_being_an_outage() {
        let error = reply("-OOM command not allowed when used memory > 'maxmemory'.\r\n");
        assert!(!is_outage(&error) && fails_the_call(&error), "{error:?}");
    }

    #[test]
    fn an_error_about_the_data_is_neither() {
        let error = reply("-WRONGTYPE Operation against a key holding the wrong kind of value\r\n");
        assert!(!is_outage(&error) && !fails_the_call(&error), "{error:?}");
    }
}
