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
    Client, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, ServerErrorKind, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
};

use super::{
    BackendError, Health,
    breaker::{Breaker, BreakerConfig},
};
use crate::metrics;
#[cfg(feature = "sentinel")]
use crate::sync::lock;

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

pub(crate) struct Inner {
    servers: Servers,
    pub(crate) breaker: Arc<Breaker>,
    pub(crate) round_trips: AtomicU64,
    pub(crate) target: String,
}

/// Which Redis the backend talks to, and how it finds it.
enum Servers {
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

/// Builds a [`RedisBackend`] with non-default timeouts or breaker settings.
#[derive(Clone)]
#[must_use]
pub struct RedisBackendBuilder {
    source: Source,
    connect_timeout: Duration,
    breaker: BreakerConfig,
    /// Root certificates (PEM) to trust instead of the system's, for `rediss://` URLs.
    #[cfg(feature = "tls")]
    tls_roots: Option<Vec<u8>>,
}

/// Where the builder finds Redis.
#[derive(Clone)]
enum Source {
    Url(String),
    #[cfg(feature = "sentinel")]
    Sentinel {
        master: String,
        sentinels: Vec<String>,
        username: Option<String>,
        password: Option<String>,
        db: i64,
    },
    #[cfg(feature = "cluster")]
    Cluster(Vec<String>),
}

impl fmt::Debug for RedisBackendBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // URLs may hold passwords: never printed.
        let source = match &self.source {
            Source::Url(_) => "url",
            #[cfg(feature = "sentinel")]
            Source::Sentinel { .. } => "sentinel",
            #[cfg(feature = "cluster")]
            Source::Cluster(_) => "cluster",
        };
        f.debug_struct("RedisBackendBuilder")
            .field("source", &source)
            .field("connect_timeout", &self.connect_timeout)
            .field("breaker", &self.breaker)
            .finish()
    }
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

    /// For `rediss://` URLs (TLS): trust the certificate authorities in `pem` (one or more
    /// PEM certificates) instead of the system's roots. Applies to a single server and to a
    /// cluster's nodes; a Sentinel-managed backend uses the system's roots.
    #[cfg(feature = "tls")]
    pub fn tls_root_certificates(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_roots = Some(pem.into());
        self
    }

    /// For a Sentinel-managed master: the user (ACL) and password of the master and its
    /// replicas. The sentinels' own credentials go in their URLs. Default: none.
    #[cfg(feature = "sentinel")]
    pub fn master_auth(mut self, username: Option<&str>, password: &str) -> Self {
        if let Source::Sentinel {
            username: user,
            password: secret,
            ..
        } = &mut self.source
        {
            *user = username.map(str::to_owned);
            *secret = Some(password.to_owned());
        }
        self
    }

    /// For a Sentinel-managed master: the database number on it. Default: 0.
    #[cfg(feature = "sentinel")]
    pub fn master_db(mut self, db: i64) -> Self {
        if let Source::Sentinel { db: number, .. } = &mut self.source {
            *number = db;
        }
        self
    }

    /// Builds the backend. It does not connect yet: the first command does.
    ///
    /// Fails if a URL is invalid or if called outside a Tokio runtime.
    pub fn build(self) -> Result<RedisBackend, BackendError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(BackendError::NoRuntime);
        }
        let invalid = |e: RedisError| BackendError::InvalidUrl {
            source: Box::new(e),
        };
        // The deadline of each call is ours (see `RedisBackend::run`); the manager only needs to
        // give up on a connection attempt quickly and to try again on the next command.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(100));
        let (servers, target) = match self.source {
            Source::Url(url) => {
                #[cfg(feature = "tls")]
                let client = match self.tls_roots.clone() {
                    Some(roots) => Client::build_with_tls(url.as_str(), trusting(roots)),
                    None => Client::open(url.as_str()),
                }
                .map_err(invalid)?;
                #[cfg(not(feature = "tls"))]
                let client = Client::open(url.as_str()).map_err(invalid)?;
                let target = describe(&client);
                let connection =
                    ConnectionManager::new_lazy_with_config(client, config).map_err(invalid)?;
                (Servers::Node(connection), target)
            }
            #[cfg(feature = "sentinel")]
            Source::Sentinel {
                master,
                sentinels,
                username,
                password,
                db,
            } => {
                let master =
                    SentinelMaster::new(&master, &sentinels, username, password, db, config)
                        .map_err(invalid)?;
                let target = master.describe();
                (Servers::Sentinel(Box::new(master)), target)
            }
            #[cfg(feature = "cluster")]
            Source::Cluster(seeds) => {
                #[cfg(feature = "tls")]
                let roots = self.tls_roots.clone();
                #[cfg(not(feature = "tls"))]
                let roots = None;
                let nodes =
                    ClusterNodes::new(&seeds, self.connect_timeout, roots).map_err(invalid)?;
                let target = nodes.target.clone();
                (Servers::Cluster(Box::new(nodes)), target)
            }
        };
        let inner = Arc::new(Inner {
            servers,
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

/// Trust `pem`'s certificate authorities instead of the system's.
#[cfg(feature = "tls")]
fn trusting(pem: Vec<u8>) -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    }
}

/// `host:port/db` of the client, without credentials, for logs and health reports.
fn describe(client: &Client) -> String {
    let info = client.get_connection_info();
    format!("{}/{}", info.addr(), info.redis_settings().db())
}

/// A Redis Cluster: the client (seed nodes, credentials) and its connection, opened on first
/// use. The connection follows the cluster's topology by itself (`MOVED`, `ASK`, a failover).
#[cfg(feature = "cluster")]
struct ClusterNodes {
    client: redis::cluster::ClusterClient,
    connection: tokio::sync::OnceCell<redis::cluster_async::ClusterConnection>,
    target: String,
}

#[cfg(feature = "cluster")]
impl ClusterNodes {
    fn new(
        seeds: &[String],
        connect_timeout: Duration,
        tls_roots: Option<Vec<u8>>,
    ) -> RedisResult<Self> {
        let mut described = Vec::with_capacity(seeds.len());
        for url in seeds {
            let client = Client::open(url.as_str())?;
            described.push(client.get_connection_info().addr().to_string());
        }
        let builder = redis::cluster::ClusterClient::builder(seeds.iter().map(String::as_str))
            .connection_timeout(connect_timeout);
        #[cfg(feature = "tls")]
        let builder = match tls_roots {
            Some(roots) => builder.certs(trusting(roots)),
            None => builder,
        };
        #[cfg(not(feature = "tls"))]
        let _: Option<Vec<u8>> = tls_roots;
        let client = builder.build()?;
        Ok(Self {
            client,
            connection: tokio::sync::OnceCell::new(),
            target: format!("cluster via {}", described.join(",")),
        })
    }

    async fn connection(&self) -> RedisResult<redis::cluster_async::ClusterConnection> {
        self.connection
            .get_or_try_init(|| self.client.get_async_connection())
            .await
            .cloned()
    }
}

/// The master of a Sentinel-managed group: asked of the sentinels when first needed and again
/// after any call that finds it gone (a broken connection, or a server that has become a
/// read-only replica).
#[cfg(feature = "sentinel")]
struct SentinelMaster {
    name: String,
    sentinels: Vec<String>,
    db: i64,
    client: tokio::sync::Mutex<redis::sentinel::SentinelClient>,
    current: std::sync::Mutex<Option<ConnectionManager>>,
    config: ConnectionManagerConfig,
}

#[cfg(feature = "sentinel")]
impl SentinelMaster {
    fn new(
        name: &str,
        sentinels: &[String],
        username: Option<String>,
        password: Option<String>,
        db: i64,
        config: ConnectionManagerConfig,
    ) -> RedisResult<Self> {
        use redis::{
            RedisConnectionInfo,
            sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType},
        };
        let mut settings = RedisConnectionInfo::default().set_db(db);
        if let Some(username) = username {
            settings = settings.set_username(username);
        }
        if let Some(password) = password {
            settings = settings.set_password(password);
        }
        let mut nodes = SentinelNodeConnectionInfo::default().set_redis_connection_info(settings);
        // Sentinels reached over TLS name masters reached over TLS too.
        if sentinels.iter().any(|url| url.starts_with("rediss://")) {
            nodes = nodes.set_tls_mode(redis::TlsMode::Secure);
        }
        let mut described = Vec::with_capacity(sentinels.len());
        for url in sentinels {
            described.push(describe(&Client::open(url.as_str())?));
        }
        // An owned name: the redis crate takes a `String` here, or any `AsRef<str>` with TLS.
        let name = name.to_owned();
        let client = SentinelClient::build(
            sentinels.iter().map(String::as_str).collect(),
            name.clone(),
            Some(nodes),
            SentinelServerType::Master,
        )?;
        Ok(Self {
            name,
            sentinels: described,
            db,
            client: tokio::sync::Mutex::new(client),
            current: std::sync::Mutex::new(None),
            config,
        })
    }

    fn describe(&self) -> String {
        // The sentinels' addresses without their database suffix, which means nothing there.
        let sentinels: Vec<&str> = self
            .sentinels
            .iter()
            .map(|s| s.rsplit_once('/').map_or(s.as_str(), |(addr, _)| addr))
            .collect();
        format!(
            "sentinel master {} via {} /{}",
            self.name,
            sentinels.join(","),
            self.db
        )
    }

    /// The connection to the master the sentinels last named, asking them if there is none.
    async fn connection(&self) -> RedisResult<ConnectionManager> {
        if let Some(connection) = self.known() {
            return Ok(connection);
        }
        let mut client = self.client.lock().await;
        // Another call may have asked while this one waited.
        if let Some(connection) = self.known() {
            return Ok(connection);
        }
        let master = client.async_get_client().await?;
        tracing::info!(
            target: "tower_turnstile::backend",
            master = %self.name,
            address = %describe(&master),
            "Sentinel named the Redis master"
        );
        let connection = ConnectionManager::new_lazy_with_config(master, self.config.clone())?;
        *lock(&self.current) = Some(connection.clone());
        Ok(connection)
    }

    fn known(&self) -> Option<ConnectionManager> {
        lock(&self.current).clone()
    }

    /// Forgets the master: the next call asks the sentinels again.
    fn forget(&self) {
        lock(&self.current).take();
    }
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
            source: Source::Url(url.into()),
            connect_timeout: Duration::from_millis(500),
            breaker: BreakerConfig::default(),
            #[cfg(feature = "tls")]
            tls_roots: None,
        }
    }

    /// A backend for the Redis Cluster that `seeds` belong to (`redis://[user:password@]host:port`
    /// of one or more of its nodes; the rest are discovered), with default settings.
    ///
    /// Every command or pipeline the stores send touches keys of one hash slot, so each goes to
    /// one node; the connection follows `MOVED` and `ASK` redirections and topology changes by
    /// itself. While a master is down and until its replica is promoted, calls to its slots
    /// fail as an outage (the layers fall back as they do when Redis is down).
    ///
    /// ```no_run
    /// use tower_turnstile::backend::RedisBackend;
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let redis = RedisBackend::cluster(["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"])?;
    /// # let _ = redis;
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "cluster")]
    pub fn cluster<I, U>(seeds: I) -> Result<Self, BackendError>
    where
        I: IntoIterator<Item = U>,
        U: Into<String>,
    {
        Self::cluster_builder(seeds).build()
    }

    /// A builder for a Redis Cluster backend (see [`RedisBackend::cluster`]).
    #[cfg(feature = "cluster")]
    pub fn cluster_builder<I, U>(seeds: I) -> RedisBackendBuilder
    where
        I: IntoIterator<Item = U>,
        U: Into<String>,
    {
        RedisBackendBuilder {
            source: Source::Cluster(seeds.into_iter().map(Into::into).collect()),
            connect_timeout: Duration::from_millis(500),
            breaker: BreakerConfig::default(),
            #[cfg(feature = "tls")]
            tls_roots: None,
        }
    }

    /// Whether this backend talks to a Redis Cluster, where one pipeline may only touch keys
    /// of one hash slot.
    pub(crate) fn is_cluster(&self) -> bool {
        match &self.inner.servers {
            #[cfg(feature = "cluster")]
            Servers::Cluster(_) => true,
            _ => false,
        }
    }

    /// A backend for the master named `master` of a Sentinel-managed group, found through the
    /// sentinels at `sentinels` (`redis://[user:password@]host:port`, the sentinels' own
    /// credentials), with default settings. On a failover the backend asks the sentinels for
    /// the new master by itself; until it answers, calls fail as an outage (the layers fall
    /// back as they do when Redis is down).
    ///
    /// ```no_run
    /// use tower_turnstile::backend::RedisBackend;
    ///
    /// # #[tokio::main]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let redis = RedisBackend::sentinel(
    ///     "mymaster",
    ///     ["redis://10.0.0.1:26379", "redis://10.0.0.2:26379", "redis://10.0.0.3:26379"],
    /// )?;
    /// // Or with the master's own credentials:
    /// let redis = RedisBackend::sentinel_builder("mymaster", ["redis://10.0.0.1:26379"])
    ///     .master_auth(Some("app"), "s3cret")
    ///     .build()?;
    /// # let _ = redis;
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "sentinel")]
    pub fn sentinel<I, U>(master: &str, sentinels: I) -> Result<Self, BackendError>
    where
        I: IntoIterator<Item = U>,
        U: Into<String>,
    {
        Self::sentinel_builder(master, sentinels).build()
    }

    /// A builder for a Sentinel-managed master (see [`RedisBackend::sentinel`]).
    #[cfg(feature = "sentinel")]
    pub fn sentinel_builder<I, U>(master: &str, sentinels: I) -> RedisBackendBuilder
    where
        I: IntoIterator<Item = U>,
        U: Into<String>,
    {
        RedisBackendBuilder {
            source: Source::Sentinel {
                master: master.to_owned(),
                sentinels: sentinels.into_iter().map(Into::into).collect(),
                username: None,
                password: None,
                db: 0,
            },
            connect_timeout: Duration::from_millis(500),
            breaker: BreakerConfig::default(),
            #[cfg(feature = "tls")]
            tls_roots: None,
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
        F: FnOnce(Connection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let Some(permit) = self.inner.breaker.admit() else {
            metrics::redis_call("rejected", Duration::ZERO);
            return Err(BackendError::CircuitOpen);
        };
        self.inner.round_trips.fetch_add(1, Ordering::Relaxed);
        let start = Instant::now();
        let call = async {
            let connection = self.connection().await?;
            op(connection).await
        };
        let (outcome, result) = match tokio::time::timeout(deadline, call).await {
            Ok(Ok(value)) => {
                permit.success();
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
                self.lost_server();
                ("outage", Err(BackendError::Timeout(deadline)))
            }
        };
        metrics::redis_call(outcome, start.elapsed());
        result
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
        match &self.inner.servers {
            #[cfg(feature = "sentinel")]
            Servers::Sentinel(master) => master.forget(),
            // A server is reconnected by its manager; a cluster follows its topology itself.
            _ => {}
        }
    }
}

/// Whether `error` says Redis is unavailable, rather than that it refused one command.
fn is_outage(error: &RedisError) -> bool {
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
        && error.to_string().contains("READONLY")
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
