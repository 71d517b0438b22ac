//! [`StartupError`]: a variable the app cannot use, a store it cannot open, a socket it cannot
//! listen on. `main` logs it with its causes and exits 1.

use std::{error::Error as StdError, fmt, io};

use tower_turnstile::ConfigError;

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
    SigningKey(ConfigError),
    /// `REDIS_URL` (or the Sentinel variables) do not make a Redis backend.
    Redis(ConfigError),
    /// `DATABASE_URL` is not a PostgreSQL URL.
    Database(sqlx::Error),
    /// The registry of live connections could not start.
    Registry(ConfigError),
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
