//! PostgreSQL for the tests: the machine's server (`POSTGRES_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`), one fresh schema per [`PgSchema`], dropped with
//! it, so test binaries and tests never share a table. Without a reachable server the tests
//! print a loud SKIPPED line, unless `REQUIRE_POSTGRES=1` (CI), which makes it a failure.

use std::time::Duration;

use sqlx::{
    Connection, PgConnection, PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

fn admin_url() -> String {
    std::env::var("POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn required() -> bool {
    std::env::var("REQUIRE_POSTGRES").is_ok_and(|v| v == "1")
}

/// A schema of its own on the machine's PostgreSQL; dropped (with everything in it) on drop.
#[derive(Debug)]
pub struct PgSchema {
    pub name: String,
    options: PgConnectOptions,
}

impl PgSchema {
    /// A new, empty schema, or `None` (said loudly) when PostgreSQL cannot be reached and
    /// `REQUIRE_POSTGRES` is not `1`.
    pub async fn create() -> Option<Self> {
        let url = admin_url();
        let options: PgConnectOptions = url.parse().expect("POSTGRES_URL parses");
        let connected =
            tokio::time::timeout(Duration::from_secs(5), PgConnection::connect_with(&options))
                .await;
        let mut conn = match connected {
            Ok(Ok(conn)) => conn,
            other => {
                let why = match other {
                    Ok(Err(error)) => error.to_string(),
                    _ => "timed out".to_owned(),
                };
                assert!(!required(), "PostgreSQL at {url} is required: {why}");
                eprintln!("SKIPPED: PostgreSQL at {url} unreachable ({why})");
                return None;
            }
        };
        let mut bytes = [0u8; 6];
        getrandom::fill(&mut bytes).expect("random");
        let name = format!(
            "turnstile_test_{}",
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        sqlx::raw_sql(&format!("CREATE SCHEMA {name}"))
            .execute(&mut conn)
            .await
            .expect("create schema");
        let options = options.options([("search_path", name.as_str())]);
        Some(Self { name, options })
    }

    /// A pool whose connections see this schema first.
    pub fn pool(&self) -> PgPool {
        self.pool_with(PgPoolOptions::new().max_connections(8))
    }

    pub fn pool_with(&self, options: PgPoolOptions) -> PgPool {
        options
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(self.options.clone())
    }

    /// A pool on this schema that connects through another loopback port (a proxy's).
    pub fn pool_through(&self, port: u16) -> PgPool {
        PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_millis(500))
            .connect_lazy_with(self.options.clone().host("127.0.0.1").port(port))
    }

    /// The port of the server.
    pub fn port(&self) -> u16 {
        self.options.get_port()
    }

    /// The URL of the server, with this schema as the search path.
    pub fn url(&self) -> String {
        let base = admin_url();
        let sep = if base.contains('?') { '&' } else { '?' };
        format!("{base}{sep}options=-c%20search_path%3D{}", self.name)
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let name = self.name.clone();
        let url = admin_url();
        // The test's runtime may be gone or busy: drop the schema from a thread of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let mut conn = PgConnection::connect(&url).await?;
                sqlx::raw_sql(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                    .execute(&mut conn)
                    .await
                    .map(|_| ())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test schema {}: {dropped:?}", self.name);
        }
    }
}
