use std::{
    fmt,
    future::Future,
    sync::{
        Arc, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use redis::{
    Client, ErrorKind, RedisError, RedisResult, ServerErrorKind,
    aio::{ConnectionManager, ConnectionManagerConfig},
};

use super::{
    BackendError, Health,
    breaker::{Breaker, BreakerConfig},
};
use crate::metrics;

/// A shared handle to one Redis server: cheap to clone, every clone shares the connection,
/// the circuit breaker and the counters.
///
/// The connection is multiplexed (concurrent commands are pipelined on one socket) and
/// reconnects by itself. It is opened lazily, so building a backend never waits for Redis and
/// a service can start while Redis is down; [`RedisBackend::ping`] checks it on demand.
#[derive(Clone)]
pub struct RedisBackend {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    connection: ConnectionManager,
    pub(crate) breaker: Arc<Breaker>,
    pub(crate) round_trips: AtomicU64,
    pub(crate) target: String,
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("target", &self.inner.target)
            .field("state", &self.inner.breaker.view().state)
            .finish_non_exhaustive()
    }
}

/// Builds a [`RedisBackend`] with non-default timeouts or breaker settings.
#[derive(Debug, Clone)]
#[must_use]
pub struct RedisBackendBuilder {
    url: String,
    connect_timeout: Duration,
    breaker: BreakerConfig,
}

impl RedisBackendBuilder {
    /// How long one attempt to (re)connect may take. Default: 500 ms.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// When the circuit breaker opens and for how long. Default: [`BreakerConfig::default`].
    pub fn breaker(mut self, config: BreakerConfig) -> Self {
        self.breaker = config;
        self
    }

    /// Builds the backend. It does not connect yet: the first command does.
    ///
    /// Fails if the URL is invalid or if called outside a Tokio runtime.
    pub fn build(self) -> Result<RedisBackend, BackendError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(BackendError::NoRuntime);
        }
        let client = Client::open(self.url.as_str()).map_err(|e| BackendError::InvalidUrl {
            source: Box::new(e),
        })?;
        let target = describe(&client);
        // The deadline of each call is ours (see `RedisBackend::run`); the manager only needs to
        // give up on a connection attempt quickly and to try again on the next command.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(100));
        let connection = ConnectionManager::new_lazy_with_config(client, config).map_err(|e| {
            BackendError::InvalidUrl {
                source: Box::new(e),
            }
        })?;
        let inner = Arc::new(Inner {
            connection,
            breaker: Arc::new(Breaker::new(self.breaker)),
            round_trips: AtomicU64::new(0),
            target,
        });
        tokio::spawn(probe_while_open(Arc::downgrade(&inner)));
        Ok(RedisBackend { inner })
    }
}

/// Pings Redis whenever the breaker is open and due for a probe, so that an instance with no
/// traffic still returns to Redis soon after it is back. Ends when the backend is dropped.
async fn probe_while_open(backend: Weak<Inner>) {
    loop {
        let every = match backend.upgrade() {
            Some(inner) => (inner.breaker.open_for() / 4)
                .clamp(Duration::from_millis(10), Duration::from_millis(250)),
            None => return,
        };
        tokio::time::sleep(every).await;
        let Some(inner) = backend.upgrade() else {
            return;
        };
        if inner.breaker.probe_due() {
            // The breaker records the outcome; nothing else to do with it here.
            let _ = RedisBackend { inner }.ping().await;
        }
    }
}

/// `host:port/db` of the client, without credentials, for logs and health reports.
fn describe(client: &Client) -> String {
    let info = client.get_connection_info();
    format!("{}/{}", info.addr(), info.redis_settings().db())
}

impl RedisBackend {
    /// A backend for `url` (`redis://[user:password@]host[:port][/db]`) with default settings.
    ///
    /// Must be called inside a Tokio runtime. It does not connect: see
    /// [`RedisBackend::ping`] to check that Redis answers.
    pub fn new(url: &str) -> Result<Self, BackendError> {
        Self::builder(url).build()
    }

    /// A builder for a backend with custom timeouts or breaker settings.
    pub fn builder(url: impl Into<String>) -> RedisBackendBuilder {
        RedisBackendBuilder {
            url: url.into(),
            connect_timeout: Duration::from_millis(500),
            breaker: BreakerConfig::default(),
        }
    }

    /// Sends `PING` through the breaker, with a deadline of one second.
    pub async fn ping(&self) -> Result<(), BackendError> {
        self.run(Duration::from_secs(1), |mut conn| async move {
            redis::cmd("PING").query_async::<()>(&mut conn).await
        })
        .await
    }

    /// The health view of this backend (breaker state, last error, counters).
    pub fn health(&self) -> Health {
        Health::new(self.clone())
    }

    /// Runs one round trip to Redis: through the breaker, under `deadline`, counted.
    ///
    /// `op` must send exactly one command or one pipeline, so that the round-trip counter
    /// (and the per-request budgets the tests check) stay true.
    pub(crate) async fn run<T, F, Fut>(&self, deadline: Duration, op: F) -> Result<T, BackendError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let Some(permit) = self.inner.breaker.admit() else {
            metrics::redis_call("rejected", Duration::ZERO);
            return Err(BackendError::CircuitOpen);
        };
        self.inner.round_trips.fetch_add(1, Ordering::Relaxed);
        let start = Instant::now();
        let (outcome, result) =
            match tokio::time::timeout(deadline, op(self.inner.connection.clone())).await {
                Ok(Ok(value)) => {
                    permit.success();
                    ("ok", Ok(value))
                }
                Ok(Err(error)) if is_outage(&error) => {
                    permit.failure(&error.to_string());
                    let error = BackendError::Unreachable {
                        source: Box::new(error),
                    };
                    ("outage", Err(error))
                }
                Ok(Err(error)) => {
                    // Redis answered, so it is up: a bad reply says nothing about availability.
                    permit.success();
                    let error = BackendError::Command {
                        source: Box::new(error),
                    };
                    ("error", Err(error))
                }
                Err(_elapsed) => {
                    permit.failure(&format!("no answer within {deadline:?}"));
                    ("outage", Err(BackendError::Timeout(deadline)))
                }
            };
        metrics::redis_call(outcome, start.elapsed());
        result
    }
}

/// Whether `error` says Redis is unavailable, rather than that it refused one command.
fn is_outage(error: &RedisError) -> bool {
    if error.is_io_error() || error.is_timeout() || error.is_connection_dropped() {
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
