//! The shared handle: one round trip at a time, through the breaker, under a deadline.

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
    Cmd, Pipeline, RedisFuture, RedisResult, Value,
    aio::{ConnectionLike, ConnectionManager},
};

#[cfg(feature = "cluster")]
use super::cluster::ClusterNodes;
#[cfg(feature = "sentinel")]
use super::sentinel::SentinelMaster;
use super::{
    BackendError,
    breaker::{Breaker, BreakerConfig},
    error::is_outage,
    marker::Marker,
    memory::MemoryWatch,
    refusal::{Refusals, refuses_writes},
    tracking::{FRESH_FOR, Tracking},
};
use crate::metrics;

/// A shared handle to Redis: cheap to clone, every clone shares the connection, the circuit
/// breaker and the counters.
///
/// Redis is one server ([`RedisBackend::new`]) or, with the `sentinel` feature, the master of
/// a Sentinel-managed group ([`RedisBackend::sentinel`]), found again by asking the sentinels
/// whenever the connection to it fails, so a failover needs no restart. The stores and layers
/// work the same on either.
///
/// The connection is multiplexed (concurrent commands are pipelined on one socket) and
/// reconnects by itself. It is opened lazily, so building a backend never waits for Redis and
/// a service can start while Redis is down; [`RedisBackend::ping`] checks it on demand.
///
/// Credentials in URLs never reach logs, `Debug` output or the health report: those name the
/// server as `host:port/db` (or the Sentinel master's name and the sentinels' addresses).
#[derive(Clone)]
pub struct RedisBackend {
    pub(crate) inner: Arc<Inner>,
}

/// What every clone of one backend shares.
pub(crate) struct Inner {
    /// The connection (or how to find it), opened lazily.
    servers: Servers,
    /// One breaker for every store on this backend, so an outage opens it once for all.
    pub(crate) breaker: Arc<Breaker>,
    /// Round trips sent: the per-request budgets the tests and health report read.
    pub(crate) round_trips: AtomicU64,
    /// The server as `host:port/db`, or the cluster's or Sentinel group's name; no credentials.
    pub(crate) target: String,
    /// What keeps local copies of keys coherent (see `tracking`).
    pub(crate) tracking: Arc<Tracking>,
    /// Redis's memory limit and eviction policy, as the last health check read them.
    pub(super) memory: MemoryWatch,
    /// Writes Redis refused (out of memory), and whether it still does.
    pub(super) refusals: Refusals,
    /// The marker that tells whether Redis lost its data.
    pub(super) marker: Marker,
}

/// Which Redis the backend talks to, and how it finds it.
pub(super) enum Servers {
    /// One server, at one address.
    Node(ConnectionManager),
    /// The master of a Sentinel-managed group, wherever it is now.
    #[cfg(feature = "sentinel")]
    Sentinel(Box<SentinelMaster>),
    /// A Redis Cluster, through its seed nodes.
    #[cfg(feature = "cluster")]
    Cluster(Box<ClusterNodes>),
}

/// What [`RedisBackend::run`] hands a store: a connection to the server that holds its keys.
/// The stores write their commands against this one type, whatever kind of Redis is behind it.
#[derive(Clone)]
pub(crate) enum Connection {
    /// A server (or the master a Sentinel named).
    Node(ConnectionManager),
    /// A cluster: each command or pipeline goes to the node that holds its slot (a pipeline's
    /// keys must share one slot).
    #[cfg(feature = "cluster")]
    Cluster(redis::cluster_async::ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Node(connection) => connection.req_packed_command(cmd),
            #[cfg(feature = "cluster")]
            Self::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Node(connection) => connection.req_packed_commands(pipeline, offset, count),
            #[cfg(feature = "cluster")]
            Self::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Node(connection) => connection.get_db(),
            #[cfg(feature = "cluster")]
            Self::Cluster(connection) => connection.get_db(),
        }
    }
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("target", &self.inner.target)
            .field("state", &self.inner.breaker.view().state)
            .finish_non_exhaustive()
    }
}

impl RedisBackend {
    /// A backend on `servers`, with its breaker and the task that probes Redis while the
    /// breaker is open.
    pub(super) fn start(
        servers: Servers,
        target: String,
        breaker: BreakerConfig,
        tracking: Arc<Tracking>,
    ) -> Self {
        let inner = Arc::new(Inner {
            servers,
            breaker: Arc::new(Breaker::new(breaker)),
            round_trips: AtomicU64::new(0),
            target,
            tracking,
            memory: MemoryWatch::default(),
            refusals: Refusals::default(),
            marker: Marker::default(),
        });
        tokio::spawn(probe_and_heartbeat(Arc::downgrade(&inner)));
        Self { inner }
    }

    /// Sends `PING` through the breaker, with a deadline of one second.
    pub async fn ping(&self) -> Result<(), BackendError> {
        self.run(Duration::from_secs(1), |mut conn| async move {
            redis::cmd("PING").query_async::<()>(&mut conn).await
        })
        .await
    }

    /// Runs one round trip to Redis: through the breaker, under `deadline`, counted.
    ///
    /// `op` must send exactly one command or one pipeline, so that the round-trip counter
    /// (and the per-request budgets the tests check) stay true.
    pub(crate) async fn run<T, F, Fut>(&self, deadline: Duration, op: F) -> Result<T, BackendError>
    where
        F: FnOnce(Connection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        self.inner.round_trips.fetch_add(1, Ordering::Relaxed);
        self.run_uncounted(deadline, op).await
    }

    /// [`RedisBackend::run`] of one command, its reply read as `T`.
    pub(crate) async fn query<T>(&self, deadline: Duration, cmd: Cmd) -> Result<T, BackendError>
    where
        T: redis::FromRedisValue + Send + 'static,
    {
        self.run(deadline, |mut conn| async move {
            cmd.query_async(&mut conn).await
        })
        .await
    }

    /// [`RedisBackend::run`] of one pipeline, its reply read as `T`.
    pub(crate) async fn query_pipeline<T>(
        &self,
        deadline: Duration,
        pipe: Pipeline,
    ) -> Result<T, BackendError>
    where
        T: redis::FromRedisValue + Send + 'static,
    {
        self.run(deadline, |mut conn| async move {
            pipe.query_async(&mut conn).await
        })
        .await
    }

    /// [`RedisBackend::run`] without counting the round trip: the backend's own heartbeat.
    async fn run_uncounted<T, F, Fut>(&self, deadline: Duration, op: F) -> Result<T, BackendError>
    where
        F: FnOnce(Connection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let Some(permit) = self.inner.breaker.admit() else {
            metrics::redis_call("rejected", Duration::ZERO);
            return Err(BackendError::CircuitOpen);
        };
        let start = Instant::now();
        let call = async {
            let connection = self.connection().await?;
            op(connection).await
        };
        let (outcome, result) = match tokio::time::timeout(deadline, call).await {
            Ok(Ok(value)) => {
                permit.success();
                self.inner.tracking.answered(start);
                ("ok", Ok(value))
            }
            Ok(Err(error)) if is_outage(&error) => {
                permit.failure(&error.to_string());
                self.lost_server();
                let error = BackendError::Unreachable {
                    source: Box::new(error),
                };
                ("outage", Err(error))
            }
            Ok(Err(error)) if refuses_writes(&error) => {
                // Redis answered: it is up, and serves reads.
                permit.success();
                self.inner.tracking.answered(start);
                self.inner.refusals.record(&error);
                let error = BackendError::WritesRefused {
                    source: Box::new(error),
                };
                ("refused", Err(error))
            }
            Ok(Err(error)) => {
                // Redis answered, so it is up: a bad reply says nothing about availability.
                permit.success();
                self.inner.tracking.answered(start);
                let error = BackendError::Command {
                    source: Box::new(error),
                };
                ("error", Err(error))
            }
            Err(_elapsed) => {
                permit.failure(&format!("no answer within {deadline:?}"));
                self.lost_server();
                ("outage", Err(BackendError::Timeout(deadline)))
            }
        };
        metrics::redis_call(outcome, start.elapsed());
        result
    }

    /// What keeps local copies of this backend's keys coherent.
    pub(crate) fn tracking(&self) -> &Arc<Tracking> {
        &self.inner.tracking
    }

    /// Whether this backend talks to a Redis Cluster, where one pipeline may only touch keys
    /// of one hash slot (see [`Batch`](super::Batch)).
    pub(crate) fn is_cluster(&self) -> bool {
        match &self.inner.servers {
            #[cfg(feature = "cluster")]
            Servers::Cluster(_) => true,
            _ => false,
        }
    }

    /// The connection for one call.
    async fn connection(&self) -> RedisResult<Connection> {
        match &self.inner.servers {
            Servers::Node(connection) => Ok(Connection::Node(connection.clone())),
            #[cfg(feature = "sentinel")]
            Servers::Sentinel(master) => master.connection().await.map(Connection::Node),
            #[cfg(feature = "cluster")]
            Servers::Cluster(nodes) => nodes.connection().await.map(Connection::Cluster),
        }
    }

    /// After an outage: a Sentinel-managed backend asks the sentinels for the master again
    /// on its next call (it may have moved); a single server is simply reconnected.
    fn lost_server(&self) {
        // Whatever the connection missed while it was failing, it will not be told again.
        self.inner.tracking.lost("outage");
        match &self.inner.servers {
            #[cfg(feature = "sentinel")]
            Servers::Sentinel(master) => master.forget(),
            // A server is reconnected by its manager; a cluster follows its topology itself.
            _ => {}
        }
    }
}

/// Pings Redis whenever the breaker is open and due for a probe, so that an instance with no
/// traffic still returns to Redis soon after it is back; and, while local copies are kept,
/// whenever the connection has been quiet for a quarter of the time a copy stays current
/// without an answer (see `tracking`), so that reads served from copies learn of a dead
/// connection. Ends when the backend is dropped.
async fn probe_and_heartbeat(backend: Weak<Inner>) {
    loop {
        let every = match backend.upgrade() {
            Some(inner) => {
                (inner.breaker.open_for() / 4).clamp(Duration::from_millis(10), FRESH_FOR / 4)
            }
            None => return,
        };
        tokio::time::sleep(every).await;
        let Some(inner) = backend.upgrade() else {
            return;
        };
        let backend = RedisBackend { inner };
        if backend.inner.breaker.probe_due() {
            // The breaker records the outcome; nothing else to do with it here.
            let _ = backend.ping().await;
        } else if backend.inner.tracking.keeps_copies()
            && backend.inner.tracking.quiet_for() >= FRESH_FOR / 4
        {
            let _ = backend
                .run_uncounted(FRESH_FOR / 2, |mut conn| async move {
                    redis::cmd("PING").query_async::<()>(&mut conn).await
                })
                .await;
        }
    }
}
