//! The reference app: an axum service whose sessions live in Redis (or in memory), scoped per
//! tenant. Its routes and behaviour are a contract: outside tests drive it over plain HTTP.
//!
//! Run it with `cargo run --release --example axum_app --features full`, then for instance:
//!
//! ```text
//! curl -i -c jar -b jar -X POST http://localhost:3000/counter
//! curl -i -c jar -b jar -d user=alice http://acme.localhost:3000/login
//! curl -i -c jar -b jar -d 'user=alice&remember=1' http://acme.localhost:3000/login
//! ```
//!
//! `POST /login` binds the session to `user` and changes its id; with `remember=1` the new
//! cookie is persistent (`Max-Age`), without it a browser-session cookie. `GET /` lists every
//! route.
//!
//! With `REDIS_URL`, sessions go through a `FallbackStore`: during a Redis outage they are
//! served from this instance's local copy and writes are journaled, then replayed. A session
//! this instance holds no copy of is treated as no session while Redis is down: its writes
//! start a new session (a forged id never gets a `5xx`), and only a write the app cannot keep
//! at all (a full journal) answers `503`. `/health` reports it (`fallback_active`,
//! `sessions`), and a stop waits up to five seconds for journaled writes to reach Redis.
//!
//! With `DATABASE_URL` (a PostgreSQL URL), sessions live in PostgreSQL: alone, with rate limits
//! counted in memory per instance; with a Redis setting as well, in a `ChainStore` (Redis copies
//! in front of the database, which serves alone while Redis is down). The app creates its table
//! and deletes expired rows every five minutes.
//!
//! Configuration comes from the environment (see [`Config::from_vars`]): `BIND`, `REDIS_URL`,
//! `DATABASE_URL`,
//! `REDIS_CLUSTER_URLS` (seed nodes of a Redis Cluster) or `REDIS_SENTINEL_MASTER` with
//! `REDIS_SENTINEL_URLS` (a Sentinel-managed master), each used instead of `REDIS_URL`,
//! `SESSION_SECRET`, `COOKIE_SECURE`, `RATE_LIMIT` and `TRUSTED_PROXIES`.
//!
//! The file doubles as a module of `tests/reference_app.rs`, which drives [`app`] directly.

use std::{
    collections::HashMap, env::VarError, error::Error as StdError, fmt, io, net::SocketAddr,
    process::ExitCode, time::Duration,
};

use axum::{
    Json, Router,
    extract::{
        Form, State,
        rejection::FormRejection,
        ws::{
            CloseFrame, Message, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection,
        },
    },
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;
use tower_turnstile::{
    backend::{BackendError, Health, RedisBackend},
    connection::{Event, RegisterError, Registration, Registry, RegistryError},
    ratelimit::{ClientIp, Policy, Quota, RateLimitLayer},
    session::{
        self, ChainStore, Expiry, FailurePolicy, FallbackStore, MemoryStore, PostgresStore,
        RedisStore, Session, SessionError, SessionLayer, SigningKey, store::CleanupTask,
    },
    tenant::{HostSubdomain, Tenant, TenantLayer},
};
use tracing::{error, info, warn};

/// How often expired sessions are deleted from PostgreSQL.
const CLEANUP_EVERY: Duration = Duration::from_secs(300);

/// How long a stop waits for journaled session writes to reach Redis.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);

/// The session key of the visit counter.
const COUNTER: &str = "counter";

/// Every environment variable the app reads, or refuses.
const VARIABLES: [&str; 11] = [
    "BIND",
    "REDIS_URL",
    "DATABASE_URL",
    "REDIS_CLUSTER_URLS",
    "REDIS_SENTINEL_URLS",
    "REDIS_SENTINEL_MASTER",
    "SESSION_SECRET",
    "COOKIE_SECURE",
    "RATE_LIMIT",
    "TRUSTED_PROXIES",
    "WS_MAX_PER_USER",
];

/// Settings read from the environment.
#[derive(Clone, PartialEq, Eq)]
pub struct Config {
    /// `BIND`: the address to listen on.
    pub bind: String,
    /// `REDIS_URL`: where sessions live; `None` keeps them in process memory.
    pub redis_url: Option<String>,
    /// `DATABASE_URL`: a PostgreSQL URL; sessions live there (behind Redis when Redis is set
    /// too).
    pub database_url: Option<String>,
    /// `REDIS_SENTINEL_MASTER` and `REDIS_SENTINEL_URLS`: a Sentinel-managed master, used
    /// instead of `REDIS_URL` when set.
    pub redis_sentinel: Option<SentinelConfig>,
    /// `REDIS_CLUSTER_URLS`: seed nodes of a Redis Cluster, used instead of `REDIS_URL` when
    /// set.
    pub redis_cluster: Option<Vec<String>>,
    /// `SESSION_SECRET`: when set, cookies are signed with a key derived from it.
    pub session_secret: Option<String>,
    /// `COOKIE_SECURE`: whether the cookie carries `Secure`.
    pub cookie_secure: bool,
    /// `RATE_LIMIT`: the quota per client IP (per tenant).
    pub rate_limit: Quota,
    /// `TRUSTED_PROXIES`: the proxies whose `X-Forwarded-For` / `Forwarded` are believed.
    pub trusted_proxies: Vec<String>,
    /// `WS_MAX_PER_USER`: live `/ws` connections allowed per user, across all instances.
    pub ws_max_per_user: u32,
}

impl Default for Config {
    /// In memory, on `127.0.0.1:3000`, unsigned cookies without `Secure`.
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:3000".to_owned(),
            redis_url: None,
            database_url: None,
            redis_sentinel: None,
            redis_cluster: None,
            session_secret: None,
            cookie_secure: false,
            rate_limit: Quota::per_minute(100),
            trusted_proxies: Vec::new(),
            ws_max_per_user: 5,
        }
    }
}

impl fmt::Debug for Config {
    // Hand-written so that neither the secret nor Redis credentials reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("bind", &self.bind)
            .field("redis", &self.redis_url.as_ref().map(|_| ".."))
            .field("database", &self.database_url.as_ref().map(|_| ".."))
            .field(
                "redis_sentinel",
                &self.redis_sentinel.as_ref().map(|s| &s.master),
            )
            .field("redis_cluster", &self.redis_cluster.as_ref().map(Vec::len))
            .field(
                "session_secret",
                &self.session_secret.as_ref().map(|_| ".."),
            )
            .field("cookie_secure", &self.cookie_secure)
            .finish()
    }
}

/// A Sentinel-managed Redis master: its name and the sentinels' URLs.
#[derive(Clone, PartialEq, Eq)]
pub struct SentinelConfig {
    /// `REDIS_SENTINEL_MASTER`.
    pub master: String,
    /// `REDIS_SENTINEL_URLS`, split at commas.
    pub urls: Vec<String>,
}

impl fmt::Debug for SentinelConfig {
    // The URLs may hold the sentinels' passwords: only their number is shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SentinelConfig")
            .field("master", &self.master)
            .field("sentinels", &self.urls.len())
            .finish()
    }
}

impl Config {
    /// Reads the settings from `(name, value)` pairs, as [`config_from_env`] does from the
    /// environment. A variable set to the empty string counts as unset, except
    /// `SESSION_SECRET`: an empty secret is refused rather than quietly leaving cookies
    /// unsigned.
    ///
    /// One of `REDIS_SENTINEL_URLS` and `REDIS_SENTINEL_MASTER` without the other is refused,
    /// and so are Sentinel and Cluster variables together, so a deployment never runs on a
    /// topology it did not ask for.
    pub fn from_vars<K, V>(vars: impl IntoIterator<Item = (K, V)>) -> Result<Self, StartupError>
    where
        K: AsRef<str>,
        V: Into<String>,
    {
        let vars: HashMap<String, String> = vars
            .into_iter()
            .map(|(k, v)| (k.as_ref().to_owned(), v.into()))
            .collect();
        let set = |name: &str| vars.get(name).filter(|value| !value.is_empty()).cloned();

        let list = |text: String| -> Vec<String> {
            text.split(',')
                .map(str::trim)
                .filter(|url| !url.is_empty())
                .map(str::to_owned)
                .collect()
        };
        let redis_cluster = set("REDIS_CLUSTER_URLS").map(list);
        let redis_sentinel = match (set("REDIS_SENTINEL_MASTER"), set("REDIS_SENTINEL_URLS")) {
            (None, None) => None,
            (Some(master), Some(urls)) => Some(SentinelConfig {
                master,
                urls: list(urls),
            }),
            (None, Some(_)) => {
                return Err(StartupError::Invalid {
                    variable: "REDIS_SENTINEL_MASTER",
                    value: String::new(),
                    expected: "the master's name, with REDIS_SENTINEL_URLS",
                });
            }
            (Some(master), None) => {
                return Err(StartupError::Invalid {
                    variable: "REDIS_SENTINEL_URLS",
                    value: master,
                    expected: "comma-separated sentinel URLs, with REDIS_SENTINEL_MASTER",
                });
            }
        };
        if redis_cluster.is_some() && redis_sentinel.is_some() {
            return Err(StartupError::Invalid {
                variable: "REDIS_CLUSTER_URLS",
                value: String::new(),
                expected: "either a cluster or a Sentinel-managed master, not both",
            });
        }
        let rate_limit = match set("RATE_LIMIT") {
            None => Config::default().rate_limit,
            Some(text) => text.parse::<Quota>().map_err(|_| StartupError::Invalid {
                variable: "RATE_LIMIT",
                value: text.clone(),
                expected: "N/<duration> with ms, s, m or h, such as 100/60s",
            })?,
        };
        let trusted_proxies: Vec<String> = set("TRUSTED_PROXIES")
            .map(|list| {
                list.split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        if let Err(error) = ClientIp::trusting(&trusted_proxies) {
            return Err(StartupError::Invalid {
                variable: "TRUSTED_PROXIES",
                value: error.to_string(),
                expected: "comma-separated IP addresses or CIDR blocks",
            });
        }

        let cookie_secure = match set("COOKIE_SECURE").as_deref() {
            None | Some("0" | "false") => false,
            Some("1" | "true") => true,
            Some(other) => {
                return Err(StartupError::Invalid {
                    variable: "COOKIE_SECURE",
                    value: other.to_owned(),
                    expected: "1 or 0",
                });
            }
        };
        let session_secret = match vars.get("SESSION_SECRET") {
            Some(secret) if secret.is_empty() => {
                return Err(StartupError::SigningKey(
                    session::CookieConfigError::EmptySecret,
                ));
            }
            secret => secret.cloned(),
        };

        let ws_max_per_user = match set("WS_MAX_PER_USER") {
            None => Config::default().ws_max_per_user,
            Some(text) => match text.parse::<u32>() {
                Ok(max) if max > 0 => max,
                _ => {
                    return Err(StartupError::Invalid {
                        variable: "WS_MAX_PER_USER",
                        value: text,
                        expected: "a whole number of connections, at least 1",
                    });
                }
            },
        };

        Ok(Self {
            ws_max_per_user,
            bind: set("BIND").unwrap_or_else(|| Config::default().bind),
            redis_url: set("REDIS_URL"),
            database_url: set("DATABASE_URL"),
            redis_sentinel,
            redis_cluster,
            session_secret,
            cookie_secure,
            rate_limit,
            trusted_proxies,
        })
    }
}

/// The settings in the process environment; see [`Config::from_vars`].
#[allow(dead_code)] // only `main` calls it; the tests use `Config::from_vars`
pub fn config_from_env() -> Result<Config, StartupError> {
    let mut vars = Vec::new();
    for name in VARIABLES {
        match std::env::var(name) {
            Ok(value) => vars.push((name, value)),
            Err(VarError::NotPresent) => {}
            Err(VarError::NotUnicode(_)) => {
                return Err(StartupError::NotUnicode { variable: name });
            }
        }
    }
    Config::from_vars(vars)
}

/// Why the app could not start.
#[derive(Debug)]
#[non_exhaustive]
pub enum StartupError {
    /// A variable holds bytes that are not UTF-8.
    NotUnicode {
        /// The variable.
        variable: &'static str,
    },
    /// A variable holds a value the app does not understand.
    Invalid {
        /// The variable.
        variable: &'static str,
        /// Its value.
        value: String,
        /// What it should look like.
        expected: &'static str,
    },
    /// `SESSION_SECRET` does not make a signing key.
    SigningKey(session::CookieConfigError),
    /// `REDIS_URL` (or the Sentinel variables) do not make a Redis backend.
    Redis(BackendError),
    /// `DATABASE_URL` is not a PostgreSQL URL.
    Database(sqlx::Error),
    /// The registry of live connections could not start.
    Registry(RegistryError),
    /// The listening socket could not be opened.
    Bind {
        /// The address from `BIND`.
        address: String,
        /// What the OS said.
        source: io::Error,
    },
    /// The server stopped with an error.
    Serve(io::Error),
}

impl fmt::Display for StartupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotUnicode { variable } => write!(f, "{variable} is not valid UTF-8"),
            Self::Invalid { variable, value, expected } => {
                write!(f, "{variable}={value:?} is invalid: expected {expected}")
            }
            Self::SigningKey(_) => f.write_str(
                "SESSION_SECRET is set but unusable (empty?); unset it to run with unsigned cookies",
            ),
            Self::Redis(_) => f.write_str(
                "the Redis settings (REDIS_URL, REDIS_CLUSTER_URLS or REDIS_SENTINEL_URLS) are unusable",
            ),
            Self::Database(_) => f.write_str("DATABASE_URL is not a usable PostgreSQL URL"),
            Self::Registry(_) => f.write_str("the registry of live connections could not start"),
            Self::Bind { address, .. } => write!(f, "cannot listen on {address} (BIND)"),
            Self::Serve(_) => f.write_str("the server failed"),
        }
    }
}

impl StdError for StartupError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Self::SigningKey(e) => Some(e),
            Self::Redis(e) => Some(e),
            Self::Database(e) => Some(e),
            Self::Registry(e) => Some(e),
            Self::Bind { source, .. } | Self::Serve(source) => Some(source),
            Self::NotUnicode { .. } | Self::Invalid { .. } => None,
        }
    }
}

/// What `/health` reports on.
#[derive(Debug, Clone)]
pub enum HealthSource {
    /// No Redis: sessions are in memory.
    Disabled,
    /// The Redis backend the sessions use, and their fallback store when the app built one.
    Redis(Health, Option<FallbackStore>),
    /// Sessions in PostgreSQL, rate limits in memory.
    Postgres(PostgresStore),
    /// Sessions in PostgreSQL with copies in Redis, rate limits in Redis.
    Chain(Health, PostgresStore),
}

impl HealthSource {
    /// The Redis backend's health, when Redis is used.
    fn redis(&self) -> Option<&Health> {
        match self {
            Self::Redis(health, _) | Self::Chain(health, _) => Some(health),
            Self::Disabled | Self::Postgres(_) => None,
        }
    }
}

/// The app and what its shutdown needs.
#[derive(Debug)]
pub struct Built {
    /// The routes with every layer.
    pub router: Router,
    /// The session store that journals writes during a Redis outage, when Redis alone is used.
    pub fallback: Option<FallbackStore>,
    /// The deletion of expired sessions from PostgreSQL, while the app runs.
    pub cleanup: Option<CleanupTask>,
    /// The live `/ws` connections, to drain on shutdown.
    pub connections: Registry,
}

/// Builds the app `config` describes: picks and logs the session storage, then wires [`app`].
///
/// Must run inside a Tokio runtime (the Redis connection needs one). It never waits for Redis
/// to be up: an unreachable Redis is logged, and the app serves in degraded mode until it
/// answers.
pub async fn build(config: &Config) -> Result<Router, StartupError> {
    Ok(build_parts(config).await?.router)
}

/// [`build`], also handing back the session fallback store (to flush it on shutdown).
pub async fn build_parts(config: &Config) -> Result<Built, StartupError> {
    let redis = match (
        &config.redis_cluster,
        &config.redis_sentinel,
        &config.redis_url,
    ) {
        (Some(seeds), _, _) => Some(RedisBackend::cluster(seeds.iter().cloned())),
        (None, Some(sentinel), _) => Some(RedisBackend::sentinel(
            &sentinel.master,
            sentinel.urls.iter().cloned(),
        )),
        (None, None, Some(url)) => Some(RedisBackend::new(url)),
        (None, None, None) => None,
    }
    .transpose()
    .map_err(StartupError::Redis)?;
    let database = match &config.database_url {
        None => None,
        Some(url) => Some(postgres_store(url).await?),
    };
    let (sessions, health) = match (redis, database) {
        (None, None) => {
            info!(
                "sessions are kept in memory (REDIS_URL and DATABASE_URL are unset): one instance only"
            );
            (
                SessionLayer::new(MemoryStore::new()),
                HealthSource::Disabled,
            )
        }
        (None, Some(database)) => {
            info!(
                "sessions are kept in PostgreSQL (DATABASE_URL); rate limits are counted in memory, \
                 per instance (set REDIS_URL to share them)"
            );
            (
                SessionLayer::new(database.clone()),
                HealthSource::Postgres(database),
            )
        }
        (Some(backend), database) => {
            let target = backend.health().snapshot().target;
            match backend.ping().await {
                Ok(()) => info!(%target, "Redis answers"),
                Err(error) => warn!(
                    %target,
                    error = %error_chain(&error),
                    "Redis does not answer yet; the app serves without it until it does"
                ),
            }
            match database {
                Some(database) => {
                    info!(
                        "sessions are kept in PostgreSQL with copies in Redis; while Redis is \
                         unreachable they are served from PostgreSQL alone"
                    );
                    let store = ChainStore::new(RedisStore::new(backend.clone()), database.clone());
                    (
                        SessionLayer::new(store),
                        HealthSource::Chain(backend.health(), database),
                    )
                }
                None => {
                    info!(
                        "sessions are kept in Redis; while it is unreachable, they are served from \
                         a local copy and writes are journaled"
                    );
                    let store = FallbackStore::new(RedisStore::new(backend.clone()));
                    let health = HealthSource::Redis(backend.health(), Some(store.clone()));
                    (SessionLayer::new(store), health)
                }
            }
        }
    };
    let rate_limit = rate_limit_layer(config, &health);
    // The anonymous counter keeps a persistent cookie (it survives a browser restart); a login
    // chooses its own cookie kind (`remember=1`).
    // While Redis is down, a session this instance holds no copy of reads as none, and a write
    // to it starts a new session, as for a forged id: no input gets a `5xx`. A write the app
    // cannot keep at all (a full journal) answers `503`, never a `200` with a value that was
    // not stored.
    let mut sessions = sessions
        .with_secure(config.cookie_secure)
        .with_persistent_cookie(true)
        .with_failure_policy(
            FailurePolicy::fail_closed_on_write().with_restart_when_unavailable(true),
        );
    match &config.session_secret {
        Some(secret) => {
            let key = SigningKey::from_secret(secret).map_err(StartupError::SigningKey)?;
            sessions = sessions.with_signing_key(key);
            info!("session cookies are signed (SESSION_SECRET)");
        }
        None => info!("session cookies are unsigned (SESSION_SECRET is unset)"),
    }
    if !config.cookie_secure {
        info!("session cookies lack `Secure` (COOKIE_SECURE=0): plain-http development only");
    }
    let fallback = match &health {
        HealthSource::Redis(_, fallback) => fallback.clone(),
        _ => None,
    };
    let cleanup = match &health {
        HealthSource::Postgres(database) | HealthSource::Chain(_, database) => {
            Some(database.spawn_cleanup(CLEANUP_EVERY))
        }
        _ => None,
    };
    let registry = match health.redis() {
        Some(health) => {
            info!("live /ws connections are registered in Redis, across instances");
            Registry::new(health.backend().clone()).map_err(StartupError::Registry)?
        }
        None => {
            info!("live /ws connections are known to this instance only (no Redis)");
            Registry::local()
        }
    };
    let connections = Connections {
        registry: registry.clone(),
        max_per_user: config.ws_max_per_user,
    };
    Ok(Built {
        router: app_with(sessions, rate_limit, health, connections),
        fallback,
        cleanup,
        connections: registry,
    })
}

/// The session store on `DATABASE_URL`. The connection is made on first use, so a database
/// that is down at start is logged and retried, as Redis is: its table is created as soon as
/// the database answers.
async fn postgres_store(url: &str) -> Result<PostgresStore, StartupError> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(StartupError::Invalid {
            variable: "DATABASE_URL",
            value: url.split('@').next_back().unwrap_or_default().to_owned(),
            expected: "a postgres:// or postgresql:// URL",
        });
    }
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy(url)
        .map_err(StartupError::Database)?;
    let store = PostgresStore::new(pool);
    match store.migrate().await {
        Ok(()) => info!("PostgreSQL answers; the session table is ready"),
        Err(error) => {
            warn!(
                error = %error_chain(&error),
                "PostgreSQL does not answer yet; sessions degrade until it does"
            );
            let retrying = store.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    if retrying.migrate().await.is_ok() {
                        info!("PostgreSQL answers; the session table is ready");
                        return;
                    }
                }
            });
        }
    }
    Ok(store)
}

/// The per-client-IP limit of every route but `/health`, counted in Redis when the sessions
/// are (one limit for all instances), with a local limiter while Redis is unreachable.
fn rate_limit_layer(config: &Config, health: &HealthSource) -> RateLimitLayer {
    // Validated in `Config::from_vars`; a config built by hand with bad proxies trusts none.
    let key = ClientIp::trusting(&config.trusted_proxies).unwrap_or_else(|_| ClientIp::peer());
    let policy = Policy::new("per-ip", config.rate_limit)
        .expect("a constant, valid policy name")
        .with_key(key);
    let layer = RateLimitLayer::new(policy);
    info!(quota = %config.rate_limit, trusted_proxies = ?config.trusted_proxies, "rate limit per client IP");
    match health.redis() {
        Some(health) => layer.with_redis(health.backend().clone()),
        None => layer,
    }
}

/// The routes, behind the tenant and session layers.
///
/// Layers, outermost first: tenant (from `Host`), then the session layer, which scopes every
/// session to the tenant it finds in the request. `/health` sits outside both, so a probe with
/// an odd `Host` still gets its answer.
pub fn app(sessions: SessionLayer, rate_limit: RateLimitLayer, health: HealthSource) -> Router {
    let connections = Connections {
        registry: Registry::local(),
        max_per_user: Config::default().ws_max_per_user,
    };
    app_with(sessions, rate_limit, health, connections)
}

/// The live connections `/ws` registers and `/notify` reaches.
#[derive(Debug, Clone)]
pub struct Connections {
    /// Where they are registered.
    pub registry: Registry,
    /// `WS_MAX_PER_USER`.
    pub max_per_user: u32,
}

/// [`app`], with the registry of live connections `/ws` and `/notify` use.
pub fn app_with(
    sessions: SessionLayer,
    rate_limit: RateLimitLayer,
    health: HealthSource,
    connections: Connections,
) -> Router {
    let session_routes = Router::new()
        .route("/ws", get(websocket))
        .route("/notify", post(notify))
        .with_state(connections)
        .route("/", get(index))
        .route("/counter", get(show_counter).post(increment_counter))
        .route("/login", post(login))
        .route("/me", get(me))
        .route("/sessions", get(list_sessions))
        .route("/logout", post(logout))
        .route("/logout-all", post(logout_all))
        .layer(sessions)
        // Per client IP within the tenant: after the tenant is known, before any session I/O.
        .layer(rate_limit.clone())
        // The tenant is the first label of a host with a subdomain (`acme.localhost` → acme);
        // a bare host or an IP address is `default`; anything else gets `400`.
        .layer(TenantLayer::new(HostSubdomain::first_label()));

    Router::new()
        .route("/health", get(health_report))
        .with_state(HealthState {
            redis: health,
            rate_limit,
        })
        .merge(session_routes)
}

/// A plain-text response.
fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body.into(),
    )
        .into_response()
}

fn not_logged_in() -> Response {
    text(StatusCode::UNAUTHORIZED, "not logged in\n")
}

/// The answer to a session operation that failed. The layer degrades by default, so reads and
/// writes of the session do not get here; listing or ending a user's sessions needs the store,
/// and says so with a `503`.
/// `503` for a store that cannot answer, with a hint to retry soon.
fn store_unavailable() -> Response {
    let mut response = text(
        StatusCode::SERVICE_UNAVAILABLE,
        "session store unavailable; try again later\n",
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

fn session_failure(error: SessionError) -> Response {
    match error {
        SessionError::Store(source) => {
            warn!(error = %error_chain(&source), "session store unavailable");
            store_unavailable()
        }
        SessionError::InvalidUser => text(
            StatusCode::BAD_REQUEST,
            "user name must be 1 to 1024 bytes long\n",
        ),
        other => {
            // The app writes only well-formed keys and values, so this is a bug, not bad input.
            error!(error = %error_chain(&other), "session operation failed");
            text(StatusCode::INTERNAL_SERVER_ERROR, "session error\n")
        }
    }
}

async fn index() -> Response {
    text(
        StatusCode::OK,
        "tower-turnstile reference app\n\
         \n\
         GET  /            this text\n\
         GET  /counter     the session's counter (0 without a session)\n\
         POST /counter     increments the counter; the first call starts a session\n\
         POST /login       form body user=<name>[&remember=1]: binds the session to that user;\n\
                           remember=1 keeps the cookie after the browser closes\n\
         GET  /me          the user of this session, or 401\n\
         GET  /sessions    how many live sessions this user has, or 401\n\
         POST /logout      ends this session\n\
         POST /logout-all  ends every session of this user, or 401\n\
         GET  /ws          WebSocket for a logged-in session: receives /notify messages\n\
         POST /notify      form body user=<name>[&message=<text>]: sends the message to every\n\
                           live /ws connection of that user; the body is how many\n\
         GET  /health      JSON: Redis health and whether the fallback is in use\n\
         \n\
         The tenant is the first label of the host: acme.localhost:3000 is tenant acme.\n",
    )
}

/// The counter, or 0. A value that does not read as a number is logged and counted as 0 rather
/// than failing the request.
async fn counter(session: &Session) -> u64 {
    match session.get::<u64>(COUNTER).await {
        Ok(value) => value.unwrap_or(0),
        Err(error) => {
            warn!(error = %error_chain(&error), "session counter unreadable; counting from 0");
            0
        }
    }
}

async fn show_counter(session: Session) -> Response {
    text(StatusCode::OK, counter(&session).await.to_string())
}

async fn increment_counter(session: Session) -> Response {
    let next = counter(&session).await.saturating_add(1);
    match session.insert(COUNTER, next).await {
        Ok(()) => text(StatusCode::OK, next.to_string()),
        Err(error) => session_failure(error),
    }
}

/// The `/login` form.
#[derive(Debug, Deserialize)]
struct LoginForm {
    user: Option<String>,
    /// `1`: a persistent cookie ("remember me"); anything else: a browser-session cookie.
    remember: Option<String>,
}

/// How long a remembered login may stay unused (the session's absolute lifetime still caps it).
const REMEMBERED_FOR: Duration = Duration::from_secs(30 * 24 * 3600);

async fn login(session: Session, form: Result<Form<LoginForm>, FormRejection>) -> Response {
    let (user, remember) = match form {
        Ok(Form(LoginForm {
            user: Some(user),
            remember,
        })) if !user.trim().is_empty() => (user, remember.as_deref() == Some("1")),
        Ok(_) => return text(StatusCode::BAD_REQUEST, "missing form field: user=<name>\n"),
        // Every unreadable form is the client's to fix: wrong content type, bad encoding,
        // duplicated fields. Only an oversized body keeps its more precise `413`.
        Err(rejection) => {
            let status = match rejection.status() {
                StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
                _ => StatusCode::BAD_REQUEST,
            };
            return text(
                status,
                format!(
                    "{}; expected form body user=<name>\n",
                    rejection.body_text()
                ),
            );
        }
    };
    session
        .set_expiry(if remember {
            Expiry::Inactivity(REMEMBERED_FOR)
        } else {
            Expiry::BrowserSession
        })
        .await;
    match session.set_user(user.as_str()).await {
        Ok(()) => text(StatusCode::OK, user),
        Err(error) => session_failure(error),
    }
}

async fn me(session: Session) -> Response {
    match session.user_id().await {
        Ok(Some(user)) => text(StatusCode::OK, user),
        Ok(None) => not_logged_in(),
        Err(error) => session_failure(error),
    }
}

async fn list_sessions(session: Session) -> Response {
    match session.user_id().await {
        Ok(Some(_)) => {}
        // Also a session this instance cannot read while the store is down: as far as it can
        // tell, nobody is logged in (as `/me` says).
        Ok(None) => return not_logged_in(),
        Err(error) => return session_failure(error),
    }
    match session.user_sessions().await {
        Ok(sessions) => text(StatusCode::OK, sessions.len().to_string()),
        Err(error) => session_failure(error),
    }
}

async fn logout(session: Session) -> Response {
    session.destroy().await;
    text(StatusCode::OK, "logged out\n")
}

async fn logout_all(session: Session) -> Response {
    match session.user_id().await {
        Ok(Some(_)) => {}
        // Also a session this instance cannot read while the store is down: as far as it can
        // tell, nobody is logged in (as `/me` says).
        Ok(None) => return not_logged_in(),
        Err(error) => return session_failure(error),
    }
    match session.destroy_user_sessions().await {
        Ok(ended) => text(StatusCode::OK, ended.to_string()),
        Err(error) => session_failure(error),
    }
}

/// `GET /ws`: a WebSocket for a logged-in session, registered across instances; it receives
/// the `/notify` messages of its user as text frames, and closes with 1012 when the instance
/// stops.
async fn websocket(
    State(connections): State<Connections>,
    tenant: Tenant,
    session: Session,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let user = match session.user_id().await {
        Ok(Some(user)) => user,
        _ => return not_logged_in(),
    };
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    let max = connections.max_per_user;
    match connections
        .registry
        .register_capped(&tenant, &user, "ws", max)
        .await
    {
        Ok(registration) => upgrade.on_upgrade(move |socket| serve_socket(socket, registration)),
        Err(RegisterError::AtCapacity { limit, .. }) => {
            let mut response = text(
                StatusCode::TOO_MANY_REQUESTS,
                format!("at most {limit} live connections per user\n"),
            );
            let headers = response.headers_mut();
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            if let Ok(policy) =
                HeaderValue::try_from(format!("\"ws\";q={limit};qu=\"concurrent-requests\""))
            {
                headers.insert("ratelimit-policy", policy);
            }
            headers.insert("ratelimit", HeaderValue::from_static("\"ws\";r=0"));
            response
        }
        Err(_) => {
            let mut response = text(
                StatusCode::SERVICE_UNAVAILABLE,
                "this instance is stopping; connect again\n",
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
    }
}

async fn serve_socket(mut socket: WebSocket, mut registration: Registration) {
    loop {
        tokio::select! {
            event = registration.next() => match event {
                Some(Event::Message(message)) => {
                    if socket.send(Message::Text(message.into())).await.is_err() {
                        return;
                    }
                }
                _ => {
                    let close = CloseFrame {
                        code: 1012,
                        reason: "service restart".into(),
                    };
                    let _ = socket.send(Message::Close(Some(close))).await;
                    return;
                }
            },
            incoming = socket.recv() => match incoming {
                None | Some(Err(_) | Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

#[derive(Debug, Deserialize)]
struct NotifyForm {
    user: Option<String>,
    message: Option<String>,
}

/// `POST /notify`: sends `message` (default `ping`) to every live `/ws` connection of `user`
/// in this tenant, on every instance; the body is how many connections it reached.
async fn notify(
    State(connections): State<Connections>,
    tenant: Tenant,
    form: Result<Form<NotifyForm>, FormRejection>,
) -> Response {
    let (user, message) = match form {
        Ok(Form(NotifyForm {
            user: Some(user),
            message,
        })) if !user.trim().is_empty() => (user, message.unwrap_or_else(|| "ping".to_owned())),
        Ok(_) => return text(StatusCode::BAD_REQUEST, "missing form field: user=<name>\n"),
        Err(rejection) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!(
                    "{}; expected form body user=<name>\n",
                    rejection.body_text()
                ),
            );
        }
    };
    let reached = connections
        .registry
        .send_to_user(&tenant, &user, &message)
        .await;
    text(StatusCode::OK, reached.to_string())
}

/// What `/health` looks at.
#[derive(Debug, Clone)]
struct HealthState {
    redis: HealthSource,
    rate_limit: RateLimitLayer,
}

async fn health_report(State(state): State<HealthState>) -> Response {
    let report = match state.redis {
        HealthSource::Disabled => serde_json::json!({
            "redis": "disabled",
            "fallback_active": false,
            "storage": "memory",
        }),
        HealthSource::Postgres(database) => serde_json::json!({
            "redis": "disabled",
            "fallback_active": false,
            "storage": "postgres",
            "postgres": postgres_health(&database).await,
        }),
        HealthSource::Redis(health, fallback) => {
            let mut service = health.service().with_rate_limit(&state.rate_limit);
            if let Some(fallback) = fallback {
                service = service.with_sessions(fallback);
            }
            let mut report = serde_json::to_value(service.report().await)
                .unwrap_or_else(|_| serde_json::json!({}));
            report["storage"] = "redis".into();
            report["breaker"] = report["state"].clone();
            report
        }
        HealthSource::Chain(health, database) => {
            let service = health.service().with_rate_limit(&state.rate_limit);
            let mut report = serde_json::to_value(service.report().await)
                .unwrap_or_else(|_| serde_json::json!({}));
            report["storage"] = "redis+postgres".into();
            report["breaker"] = report["state"].clone();
            report["postgres"] = postgres_health(&database).await.into();
            report
        }
    };
    (StatusCode::OK, Json(report)).into_response()
}

async fn postgres_health(database: &PostgresStore) -> &'static str {
    match database.ping().await {
        Ok(()) => "healthy",
        Err(_) => "unhealthy",
    }
}

/// `error` and its sources, joined with `: `, for one log line.
fn error_chain(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Resolves on Ctrl-C or SIGTERM.
#[allow(dead_code)] // only `main` uses it
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();

    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    info!("shutting down: finishing in-flight requests");
}

/// Reads the environment, builds the app and serves it until Ctrl-C or SIGTERM.
#[allow(dead_code)] // unused when the tests include this file as a module
async fn run() -> Result<(), StartupError> {
    let config = config_from_env()?;
    let Built {
        router: app,
        fallback,
        cleanup: _cleanup,
        connections,
    } = build_parts(&config).await?;
    let listener = tokio::net::TcpListener::bind(&config.bind)
        .await
        .map_err(|source| StartupError::Bind {
            address: config.bind.clone(),
            source,
        })?;
    let address = listener.local_addr().map_err(StartupError::Serve)?;
    info!(%address, "listening");
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown_signal().await;
        // Live /ws connections are told to reconnect elsewhere (close 1012), and leave the
        // registry at once, so the server's graceful stop does not wait on them.
        let told = connections.drain().await;
        info!(
            connections = told,
            "live connections told to reconnect elsewhere"
        );
    })
    .await
    .map_err(StartupError::Serve)?;
    if let Some(fallback) = fallback {
        // Writes journaled during an outage live in this process only: give them a last chance.
        let waiting = fallback.flush(SHUTDOWN_FLUSH).await;
        if waiting > 0 {
            warn!(
                waiting,
                "stopped with session writes that never reached Redis; they are lost"
            );
        }
    }
    info!("stopped");
    Ok(())
}

#[allow(dead_code)] // unused when the tests include this file as a module
#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(io::stderr)
        .init();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            error!(error = %error_chain(&error), "cannot run");
            ExitCode::FAILURE
        }
    }
}
