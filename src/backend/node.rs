//! One Redis server at one address.

use redis::{
    Client, ProtocolVersion, RedisResult,
    aio::{ConnectionManager, ConnectionManagerConfig},
};

/// A lazy, self-reconnecting connection to the server at `url`, trusting `tls_roots` (PEM)
/// instead of the system's roots for a `rediss://` URL when given; and the server's name for
/// logs.
pub(super) fn connect(
    url: &str,
    tls_roots: Option<Vec<u8>>,
    config: ConnectionManagerConfig,
) -> RedisResult<(ConnectionManager, String)> {
    #[cfg(feature = "tls")]
    let client = match tls_roots {
        Some(roots) => Client::build_with_tls(url, trusting(roots))?,
        None => Client::open(url)?,
    };
    #[cfg(not(feature = "tls"))]
    let client = {
        let _: Option<Vec<u8>> = tls_roots;
        Client::open(url)?
    };
    let client = speaking_resp3(client)?;
    let target = describe(&client);
    Ok((
        ConnectionManager::new_lazy_with_config(client, config)?,
        target,
    ))
}

/// `client` made to speak RESP3, which lets Redis push invalidations (see `tracking`).
fn speaking_resp3(client: Client) -> RedisResult<Client> {
    let info = client.get_connection_info().clone();
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    Client::open(info.set_redis_settings(settings))
}

/// `host:port/db` of the client, without credentials, for logs and health reports.
pub(super) fn describe(client: &Client) -> String {
    let info = client.get_connection_info();
    format!("{}/{}", info.addr(), info.redis_settings().db())
}

/// Trust `pem`'s certificate authorities instead of the system's.
#[cfg(feature = "tls")]
pub(super) fn trusting(pem: Vec<u8>) -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    }
}
