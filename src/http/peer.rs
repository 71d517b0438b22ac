//! The connection's peer address in each request, for servers that do not put it there
//! themselves (hyper, tonic without axum).

use std::{
    net::{IpAddr, SocketAddr},
    task::{Context, Poll},
};

use http::{Extensions, Request};
use tower_layer::Layer;
use tower_service::Service;

/// Puts the TCP peer address of a connection into the extensions of every request on it, as a
/// plain [`SocketAddr`]: where [`ClientIp`](crate::ratelimit::ClientIp) (the rate limiter's
/// default key) looks for it. axum's `into_make_service_with_connect_info` does the same job
/// with `ConnectInfo<SocketAddr>`, which is also understood; a hyper server builds one
/// `PeerAddrLayer` per accepted connection.
///
/// ```
/// use std::net::SocketAddr;
/// use http::{Request, Response};
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
/// use tower_turnstile::PeerAddrLayer;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let peer: SocketAddr = "203.0.113.7:51000".parse()?;
/// let service = ServiceBuilder::new()
///     .layer(PeerAddrLayer::new(peer))
///     .service(service_fn(|request: Request<()>| async move {
///         let peer = request.extensions().get::<SocketAddr>().copied();
///         Ok::<_, std::convert::Infallible>(Response::new(format!("{peer:?}")))
///     }));
/// let response = service.oneshot(Request::new(())).await?;
/// assert_eq!(response.into_body(), "Some(203.0.113.7:51000)");
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct PeerAddrLayer {
    peer: SocketAddr,
}

impl PeerAddrLayer {
    /// A layer for the connection from `peer`.
    pub fn new(peer: SocketAddr) -> Self {
        Self { peer }
    }
}

impl<S> Layer<S> for PeerAddrLayer {
    type Service = PeerAddr<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PeerAddr {
            inner,
            peer: self.peer,
        }
    }
}

/// The service of [`PeerAddrLayer`].
#[derive(Debug, Clone)]
pub struct PeerAddr<S> {
    inner: S,
    peer: SocketAddr,
}

impl<S, B> Service<Request<B>> for PeerAddr<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        request.extensions_mut().insert(self.peer);
        self.inner.call(request)
    }
}

/// The peer address the server recorded: axum's `ConnectInfo`, tonic's `TcpConnectInfo`, or a
/// plain `SocketAddr` or `IpAddr` extension (what [`PeerAddrLayer`] inserts).
pub(crate) fn peer_addr(extensions: &Extensions) -> Option<IpAddr> {
    #[cfg(feature = "axum")]
    if let Some(info) = extensions.get::<axum::extract::ConnectInfo<SocketAddr>>() {
        return Some(info.0.ip());
    }
    #[cfg(feature = "tonic")]
    if let Some(addr) = extensions
        .get::<tonic::transport::server::TcpConnectInfo>()
        .and_then(tonic::transport::server::TcpConnectInfo::remote_addr)
    {
        return Some(addr.ip());
    }
    extensions
        .get::<SocketAddr>()
        .map(SocketAddr::ip)
        .or_else(|| extensions.get::<IpAddr>().copied())
}
