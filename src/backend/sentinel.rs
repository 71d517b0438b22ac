//! The master of a Sentinel-managed group, found through its sentinels and found again after a
//! failover.

use redis::{
    Client, ProtocolVersion, RedisConnectionInfo, RedisResult,
    aio::{ConnectionManager, ConnectionManagerConfig},
    sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType},
};

use super::node::describe;
use crate::sync::lock;

/// The master of a Sentinel-managed group: asked of the sentinels when first needed and again
/// after any call that finds it gone (a broken connection, or a server that has become a
/// read-only replica).
pub(super) struct SentinelMaster {
    name: String,
    sentinels: Vec<String>,
    db: i64,
    client: tokio::sync::Mutex<SentinelClient>,
    current: std::sync::Mutex<Option<ConnectionManager>>,
    config: ConnectionManagerConfig,
}

impl SentinelMaster {
    pub(super) fn new(
        name: &str,
        sentinels: &[String],
        username: Option<String>,
        password: Option<String>,
        db: i64,
        config: ConnectionManagerConfig,
    ) -> RedisResult<Self> {
        // RESP3, which lets Redis push invalidations (see `tracking`).
        let mut settings = RedisConnectionInfo::default()
            .set_db(db)
            .set_protocol(ProtocolVersion::RESP3);
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

    pub(super) fn describe(&self) -> String {
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
    pub(super) async fn connection(&self) -> RedisResult<ConnectionManager> {
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
    pub(super) fn forget(&self) {
        lock(&self.current).take();
    }
}
