//! The three layers on a tonic 0.14 gRPC server, on `Server::builder().layer(..)`.
//!
//! ```text
//! cargo run --example tonic_server --features tonic
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example tonic_server --features tonic
//! ```
//!
//! One service, `turnstile.Counter`, whose messages are UTF-8 strings (a codec of a dozen lines
//! below, so the example needs no `protoc` and no generated code):
//!
//! - `/turnstile.Counter/Bump` increments the caller's session counter and returns it;
//! - `/turnstile.Counter/Tenant` returns the caller's tenant.
//!
//! How each layer sees a gRPC call:
//!
//! - **Tenant**: the `x-tenant` metadata entry (a gRPC client usually reaches every tenant
//!   through one address, so the host says little).
//! - **Rate limits**: per peer address (tonic records it as `TcpConnectInfo`, which
//!   `ClientIp` reads with the `tonic` feature), 20 a minute; and per `x-api-key` metadata
//!   entry, 10 a minute. Past a limit the client gets `RESOURCE_EXHAUSTED`, with `retry-after`
//!   (seconds) and the `ratelimit` fields in the metadata.
//! - **Session**: the id travels in the `x-session-id` metadata entry, not a cookie: the
//!   server hands it out in the response metadata, the client sends it back
//!   (`SessionLayer::try_with_id_header`).
//!
//! These are layers, not tonic `Interceptor`s: an interceptor is synchronous and cannot wait
//! for Redis, and it sees no response to hand a session id back in.
//!
//! The file doubles as a module of `tests/it/tonic_server.rs`, which serves [`serve`] on an
//! ephemeral port and calls it with a tonic client.

use std::{
    convert::Infallible,
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf, BufMut};
use http::HeaderName;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{
    Status,
    body::Body,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    server::{Grpc, NamedService},
};
use tower::{ServiceBuilder, service_fn};
use tower_turnstile::{
    backend::RedisBackend,
    ratelimit::{ClientIp, HeaderKey, MissingKey, Policy, Quota, RateLimitLayer},
    session::{FallbackStore, MemoryStore, RedisStore, Session, SessionLayer},
    tenant::{HeaderTenant, Tenant, TenantLayer},
};

/// The metadata entry of the session id.
pub const SESSION_ID: &str = "x-session-id";

/// UTF-8 strings as gRPC messages.
#[derive(Debug, Clone, Copy, Default)]
pub struct Utf8Codec;

impl Codec for Utf8Codec {
    type Encode = String;
    type Decode = String;
    type Encoder = Utf8Codec;
    type Decoder = Utf8Codec;

    fn encoder(&mut self) -> Self::Encoder {
        Utf8Codec
    }

    fn decoder(&mut self) -> Self::Decoder {
        Utf8Codec
    }
}

impl Encoder for Utf8Codec {
    type Item = String;
    type Error = Status;

    fn encode(&mut self, item: String, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(item.as_bytes());
        Ok(())
    }
}

impl Decoder for Utf8Codec {
    type Item = String;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<String>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        String::from_utf8(bytes.to_vec())
            .map(Some)
            .map_err(|_| Status::invalid_argument("the message is not UTF-8"))
    }
}

/// `turnstile.Counter`: routes a call to its method.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counter;

impl NamedService for Counter {
    const NAME: &'static str = "turnstile.Counter";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl tower::Service<http::Request<Body>> for Counter {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        Box::pin(async move {
            let mut grpc = Grpc::new(Utf8Codec);
            let response = match request.uri().path() {
                "/turnstile.Counter/Bump" => grpc.unary(service_fn(bump), request).await,
                "/turnstile.Counter/Tenant" => grpc.unary(service_fn(tenant), request).await,
                _ => Status::unimplemented("no such method").into_http(),
            };
            Ok(response)
        })
    }
}

/// Increments the session's counter. tonic hands the HTTP request's extensions on, so the
/// session the layer put there is in the gRPC request's.
async fn bump(request: tonic::Request<String>) -> Result<tonic::Response<String>, Status> {
    let session = request
        .extensions()
        .get::<Session>()
        .cloned()
        .ok_or_else(|| Status::internal("no session layer"))?;
    let n: u64 = session.get("counter").await.ok().flatten().unwrap_or(0) + 1;
    session
        .insert("counter", n)
        .await
        .map_err(|error| Status::unavailable(error.to_string()))?;
    Ok(tonic::Response::new(n.to_string()))
}

async fn tenant(request: tonic::Request<String>) -> Result<tonic::Response<String>, Status> {
    let tenant = request
        .extensions()
        .get::<Tenant>()
        .cloned()
        .unwrap_or_default();
    Ok(tonic::Response::new(tenant.as_str().to_owned()))
}

/// The layers of the server, built once.
#[derive(Debug, Clone)]
pub struct Layers {
    tenants: TenantLayer,
    per_peer: RateLimitLayer,
    per_key: RateLimitLayer,
    sessions: SessionLayer,
}

impl Layers {
    /// Sessions and limits in Redis through `redis` (sessions falling back to memory while it
    /// is down), or in this process's memory; `per_peer` and `per_key` are the two quotas.
    pub fn new(redis: Option<RedisBackend>, per_peer: Quota, per_key: Quota) -> Self {
        let per_peer = Policy::new("per-peer", per_peer)
            .expect("a valid policy name")
            .with_key(ClientIp::peer());
        let per_key = Policy::new("per-api-key", per_key)
            .expect("a valid policy name")
            .with_key(HeaderKey::new(HeaderName::from_static("x-api-key")))
            // Calls without a key are limited per peer only.
            .on_missing_key(MissingKey::Allow);
        let (per_peer, per_key, sessions) = match redis {
            Some(redis) => (
                RateLimitLayer::new(per_peer).with_redis(redis.clone()),
                RateLimitLayer::new(per_key).with_redis(redis.clone()),
                SessionLayer::new(FallbackStore::new(RedisStore::new(redis))),
            ),
            None => (
                RateLimitLayer::new(per_peer),
                RateLimitLayer::new(per_key),
                SessionLayer::new(MemoryStore::new()),
            ),
        };
        Self {
            tenants: TenantLayer::new(HeaderTenant::new(HeaderName::from_static("x-tenant"))),
            per_peer,
            per_key,
            sessions: sessions
                .try_with_id_header(SESSION_ID)
                .expect("a valid header name"),
        }
    }
}

/// Serves `turnstile.Counter` behind `layers` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    layers: Layers,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    // Outermost first: the tenant, which every count and session is scoped to; the limits,
    // before any session is looked up; the session.
    let stack = ServiceBuilder::new()
        .layer(layers.tenants)
        .layer(layers.per_peer)
        .layer(layers.per_key)
        .layer(layers.sessions);
    tonic::transport::Server::builder()
        .layer(stack)
        .add_service(Counter)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}

#[allow(dead_code)] // unused when the tests include this file as a module
#[tokio::main]
async fn main() -> io::Result<()> {
    let redis = match std::env::var("REDIS_URL") {
        Ok(url) if !url.is_empty() => {
            Some(RedisBackend::new(&url).map_err(|e| io::Error::other(e.to_string()))?)
        }
        _ => None,
    };
    let layers = Layers::new(redis, Quota::per_minute(20), Quota::per_minute(10));
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:50051".to_owned());
    let listener = TcpListener::bind(&bind).await?;
    println!("gRPC on {bind}: turnstile.Counter/Bump, turnstile.Counter/Tenant");
    serve(listener, layers, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
    .map_err(io::Error::other)
}
