//! [`Config`]: the settings the app reads from its environment, checked before anything starts.

use std::{collections::HashMap, env::VarError, fmt};

use tower_turnstile::{
    ConfigError,
    ratelimit::{ClientIp, Penalty, Quota},
};

use super::StartupError;

/// Every environment variable the app reads, or refuses.
const VARIABLES: [&str; 15] = [
    "BIND",
    "REDIS_URL",
    "REDIS_ENABLED",
    "DATABASE_URL",
    "REDIS_CLUSTER_URLS",
    "REDIS_SENTINEL_URLS",
    "REDIS_SENTINEL_MASTER",
    "SESSION_SECRET",
    "COOKIE_SECURE",
    "RATE_LIMIT",
    "TRUSTED_PROXIES",
    "WS_MAX_PER_USER",
    "MAX_SESSIONS_PER_USER",
    "RATE_LIMIT_SHADOW",
    "RATE_LIMIT_PENALTY",
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
    /// `MAX_SESSIONS_PER_USER`: live sessions allowed per user (per tenant), across all
    /// instances; a login beyond it ends the user's oldest session. `None`: no cap.
    pub max_sessions_per_user: Option<usize>,
    /// `RATE_LIMIT_SHADOW`: the per-IP limit decides, counts and sends its headers, but never
    /// refuses.
    pub rate_limit_shadow: bool,
    /// `RATE_LIMIT_PENALTY`: a client refused N times within one window of `RATE_LIMIT` is
    /// blocked, for longer each time it offends again. `None`: no penalty.
    pub rate_limit_penalty: Option<Penalty>,
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
            max_sessions_per_user: None,
            rate_limit_shadow: false,
            rate_limit_penalty: None,
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
        let vars = Vars(
            vars.into_iter()
                .map(|(k, v)| (k.as_ref().to_owned(), v.into()))
                .collect(),
        );
        // Checked in this order: of several unusable variables, the first one is reported.
        let redis_enabled = redis_enabled(&vars)?;
        let redis_cluster = vars.set("REDIS_CLUSTER_URLS").map(comma_list);
        let redis_sentinel = redis_sentinel(&vars)?;
        if redis_cluster.is_some() && redis_sentinel.is_some() {
            return Err(StartupError::Invalid {
                variable: "REDIS_CLUSTER_URLS",
                value: String::new(),
                expected: "either a cluster or a Sentinel-managed master, not both",
            });
        }
        let rate_limit = rate_limit(&vars)?;
        let trusted_proxies = trusted_proxies(&vars)?;
        let cookie_secure = cookie_secure(&vars)?;
        let session_secret = session_secret(&vars)?;
        let ws_max_per_user = ws_max_per_user(&vars)?;
        let max_sessions_per_user = max_sessions_per_user(&vars)?;
        let rate_limit_shadow = flag(&vars, "RATE_LIMIT_SHADOW")?;
        let rate_limit_penalty = rate_limit_penalty(&vars)?;

        // `REDIS_ENABLED=0`: the Redis variables are read (and checked) but not used.
        Ok(Self {
            ws_max_per_user,
            max_sessions_per_user,
            rate_limit_shadow,
            rate_limit_penalty,
            bind: vars.set("BIND").unwrap_or_else(|| Config::default().bind),
            redis_url: vars.set("REDIS_URL").filter(|_| redis_enabled),
            database_url: vars.set("DATABASE_URL"),
            redis_sentinel: redis_sentinel.filter(|_| redis_enabled),
            redis_cluster: redis_cluster.filter(|_| redis_enabled),
            session_secret,
            cookie_secure,
            rate_limit,
            trusted_proxies,
        })
    }
}

/// The variables [`Config::from_vars`] was given, by name.
struct Vars(HashMap<String, String>);

impl Vars {
    /// The value of `name`; a variable set to the empty string counts as unset.
    fn set(&self, name: &str) -> Option<String> {
        self.0.get(name).filter(|value| !value.is_empty()).cloned()
    }
}

/// The items of a comma-separated list, trimmed, empty ones left out.
fn comma_list(text: String) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `REDIS_SENTINEL_MASTER` and `REDIS_SENTINEL_URLS`: both or neither.
fn redis_sentinel(vars: &Vars) -> Result<Option<SentinelConfig>, StartupError> {
    match (
        vars.set("REDIS_SENTINEL_MASTER"),
        vars.set("REDIS_SENTINEL_URLS"),
    ) {
        (None, None) => Ok(None),
        (Some(master), Some(urls)) => Ok(Some(SentinelConfig {
            master,
            urls: comma_list(urls),
        })),
        (None, Some(_)) => Err(StartupError::Invalid {
            variable: "REDIS_SENTINEL_MASTER",
            value: String::new(),
            expected: "the master's name, with REDIS_SENTINEL_URLS",
        }),
        (Some(master), None) => Err(StartupError::Invalid {
            variable: "REDIS_SENTINEL_URLS",
            value: master,
            expected: "comma-separated sentinel URLs, with REDIS_SENTINEL_MASTER",
        }),
    }
}

/// `RATE_LIMIT`, such as `100/60s`.
fn rate_limit(vars: &Vars) -> Result<Quota, StartupError> {
    match vars.set("RATE_LIMIT") {
        None => Ok(Config::default().rate_limit),
        Some(text) => text.parse::<Quota>().map_err(|_| StartupError::Invalid {
            variable: "RATE_LIMIT",
            value: text.clone(),
            expected: "N/<duration> with ms, s, m or h, such as 100/60s",
        }),
    }
}

/// `RATE_LIMIT_PENALTY`, such as `5/30s`: 5 refusals within a window, then 30 s blocked.
fn rate_limit_penalty(vars: &Vars) -> Result<Option<Penalty>, StartupError> {
    match vars.set("RATE_LIMIT_PENALTY") {
        None => Ok(None),
        Some(text) => match text.parse::<Penalty>() {
            Ok(penalty) => Ok(Some(penalty)),
            Err(_) => Err(StartupError::Invalid {
                variable: "RATE_LIMIT_PENALTY",
                value: text,
                expected: "N/<duration> with N at least 1 and a duration from 1ms to 24h, such as 5/30s",
            }),
        },
    }
}

/// `TRUSTED_PROXIES`, each one checked the way the rate limit will read it.
fn trusted_proxies(vars: &Vars) -> Result<Vec<String>, StartupError> {
    let proxies = vars
        .set("TRUSTED_PROXIES")
        .map(comma_list)
        .unwrap_or_default();
    match ClientIp::trusting(&proxies) {
        Ok(_) => Ok(proxies),
        Err(error) => Err(StartupError::Invalid {
            variable: "TRUSTED_PROXIES",
            value: error.to_string(),
            expected: "comma-separated IP addresses or CIDR blocks",
        }),
    }
}

/// `COOKIE_SECURE`: `1` or `true`, `0` or `false`; unset is `false`.
/// `REDIS_ENABLED`: on unless `0` or `false`, so that a deployment can keep its Redis
/// variables and still run in memory.
fn redis_enabled(vars: &Vars) -> Result<bool, StartupError> {
    match vars.set("REDIS_ENABLED").as_deref() {
        None | Some("1" | "true") => Ok(true),
        Some("0" | "false") => Ok(false),
        Some(other) => Err(StartupError::Invalid {
            variable: "REDIS_ENABLED",
            value: other.to_owned(),
            expected: "1 or 0",
        }),
    }
}

fn cookie_secure(vars: &Vars) -> Result<bool, StartupError> {
    flag(vars, "COOKIE_SECURE")
}

/// A variable that is `1`/`true` or `0`/`false` (the default).
fn flag(vars: &Vars, variable: &'static str) -> Result<bool, StartupError> {
    match vars.set(variable).as_deref() {
        None | Some("0" | "false") => Ok(false),
        Some("1" | "true") => Ok(true),
        Some(other) => Err(StartupError::Invalid {
            variable,
            value: other.to_owned(),
            expected: "1 or 0",
        }),
    }
}

/// `SESSION_SECRET`, the one variable whose empty value is refused rather than read as unset.
fn session_secret(vars: &Vars) -> Result<Option<String>, StartupError> {
    match vars.0.get("SESSION_SECRET") {
        Some(secret) if secret.is_empty() => {
            Err(StartupError::SigningKey(ConfigError::EmptySecret))
        }
        secret => Ok(secret.cloned()),
    }
}

/// `WS_MAX_PER_USER`: a whole number, at least 1.
fn ws_max_per_user(vars: &Vars) -> Result<u32, StartupError> {
    match vars.set("WS_MAX_PER_USER") {
        None => Ok(Config::default().ws_max_per_user),
        Some(text) => match text.parse::<u32>() {
            Ok(max) if max > 0 => Ok(max),
            _ => Err(StartupError::Invalid {
                variable: "WS_MAX_PER_USER",
                value: text,
                expected: "a whole number of connections, at least 1",
            }),
        },
    }
}

/// `MAX_SESSIONS_PER_USER`: a whole number, at least 1, or unset (no cap).
fn max_sessions_per_user(vars: &Vars) -> Result<Option<usize>, StartupError> {
    let Some(text) = vars.set("MAX_SESSIONS_PER_USER") else {
        return Ok(None);
    };
    match text.parse::<usize>() {
        Ok(max) if max > 0 => Ok(Some(max)),
        _ => Err(StartupError::Invalid {
            variable: "MAX_SESSIONS_PER_USER",
            value: text,
            expected: "a whole number of sessions, at least 1",
        }),
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
