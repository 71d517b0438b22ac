//! A Redis Cluster, reached through its seed nodes.

use std::time::Duration;

use redis::{
    Client, ProtocolVersion, RedisResult, aio::AsyncPushSender, cluster::ClusterClient,
    cluster_async::ClusterConnection,
};
use tokio::sync::OnceCell;

/// A Redis Cluster: the client (seed nodes, credentials) and its connection, opened on first
/// use. The connection follows the cluster's topology by itself (`MOVED`, `ASK`, a failover).
pub(super) struct ClusterNodes {
    client: ClusterClient,
    connection: OnceCell<ClusterConnection>,
    /// `cluster via host:port,...`, for logs and health reports (no credentials).
    pub(super) target: String,
}

impl ClusterNodes {
    pub(super) fn new(
        seeds: &[String],
        connect_timeout: Duration,
        tls_roots: Option<Vec<u8>>,
        pushed: impl AsyncPushSender,
    ) -> RedisResult<Self> {
        let mut described = Vec::with_capacity(seeds.len());
        for url in seeds {
            let client = Client::open(url.as_str())?;
            described.push(client.get_connection_info().addr().to_string());
        }
        let builder = ClusterClient::builder(seeds.iter().map(String::as_str))
            .connection_timeout(connect_timeout)
            // RESP3, which lets Redis push invalidations (see `tracking`).
            .use_protocol(ProtocolVersion::RESP3)
            .push_sender(pushed);
        #[cfg(feature = "tls")]
        let builder = match tls_roots {
            Some(roots) => builder.certs(super::node::trusting(roots)),
            None => builder,
        };
        #[cfg(not(feature = "tls"))]
        let _: Option<Vec<u8>> = tls_roots;
        Ok(Self {
            client: builder.build()?,
            connection: OnceCell::new(),
            target: format!("cluster via {}", described.join(",")),
        })
    }

    /// The cluster connection, opened on the first call.
    pub(super) async fn connection(&self) -> RedisResult<ClusterConnection> {
        self.connection
            .get_or_try_init(|| self.client.get_async_connection())
            .await
            .cloned()
    }
}
