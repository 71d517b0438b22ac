//! How a [`RedisBackend`] is made: from a URL, a cluster's seed nodes or a Sentinel group.

use std::{convert::Infallible, fmt, sync::Arc, time::Duration};

use redis::{RedisError, RedisResult, aio::ConnectionManagerConfig};

use crate::ConfigError;

#[cfg(feature = "cluster")]
use super::cluster::ClusterNodes;
#[cfg(feature = "sentinel")]
use super::sentinel::SentinelMaster;
use super::{
    BreakerConfig,
    handle::{RedisBackend, Servers},
    node,
    tracking::Tracking,
};

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
    fn new(source: Source) -> Self {
        Self {
            source,
            connect_timeout: Duration::from_millis(500),
            breaker: BreakerConfig::default(),
            #[cfg(feature = "tls")]
            tls_roots: None,
        }
    }

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
    pub fn build(self) -> Result<RedisBackend, ConfigError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(ConfigError::NoRuntime("the Redis backend"));
        }
        let breaker = self.breaker;
        let tracking = Arc::new(Tracking::new());
        let (servers, target) =
            self.connect(&tracking)
                .map_err(|e: RedisError| ConfigError::RedisUrl {
                    source: Box::new(e),
                })?;
        Ok(RedisBackend::start(servers, target, breaker, tracking))
    }

    /// The lazy connection to the servers the source names, and their description for logs.
    /// Every connection speaks RESP3 and hands what Redis pushes on it to `tracking`.
    fn connect(self, tracking: &Arc<Tracking>) -> RedisResult<(Servers, String)> {
        let pushed = {
            let tracking = Arc::clone(tracking);
            move |push| {
                tracking.pushed(push);
                Ok::<(), Infallible>(())
            }
        };
        // The deadline of each call is ours (see `RedisBackend::run`); the manager only needs to
        // give up on a connection attempt quickly and to try again on the next command.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(100))
            .set_push_sender(pushed.clone());
        #[cfg(feature = "tls")]
        let tls_roots = self.tls_roots;
        #[cfg(not(feature = "tls"))]
        let tls_roots = None;
        Ok(match self.source {
            Source::Url(url) => {
                let (connection, target) = node::connect(&url, tls_roots, config)?;
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
                    SentinelMaster::new(&master, &sentinels, username, password, db, config)?;
                let target = master.describe();
                (Servers::Sentinel(Box::new(master)), target)
            }
            #[cfg(feature = "cluster")]
            Source::Cluster(seeds) => {
                let nodes = ClusterNodes::new(&seeds, self.connect_timeout, tls_roots, pushed)?;
                let target = nodes.target.clone();
                (Servers::Cluster(Box::new(nodes)), target)
            }
        })
    }
}

impl RedisBackend {
    /// A backend for `url` (`redis://[user:password@]host[:port][/db]`) with default settings.
    ///
    /// Must be called inside a Tokio runtime. It does not connect: see
    /// [`RedisBackend::ping`] to check that Redis answers.
    pub fn new(url: &str) -> Result<Self, ConfigError> {
        Self::builder(url).build()
    }

    /// A builder for a backend with custom timeouts or breaker settings.
    pub fn builder(url: impl Into<String>) -> RedisBackendBuilder {
        RedisBackendBuilder::new(Source::Url(url.into()))
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
    pub fn cluster<I, U>(seeds: I) -> Result<Self, ConfigError>
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
        RedisBackendBuilder::new(Source::Cluster(seeds.into_iter().map(Into::into).collect()))
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
    pub fn sentinel<I, U>(master: &str, sentinels: I) -> Result<Self, ConfigError>
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
        RedisBackendBuilder::new(Source::Sentinel {
            master: master.to_owned(),
            sentinels: sentinels.into_iter().map(Into::into).collect(),
            username: None,
            password: None,
            db: 0,
        })
    }
}
