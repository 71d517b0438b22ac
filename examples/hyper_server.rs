//! The three layers on a hyper 1 server, with no framework: one `ServiceBuilder` around a
//! plain `service_fn`, served by hyper-util's auto (HTTP/1 and HTTP/2) connection builder, with
//! graceful shutdown.
//!
//! ```text
//! cargo run --example hyper_server                      # sessions and limits in memory
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example hyper_server
//! curl -i -c jar -b jar -X POST http://acme.localhost:3001/counter
//! ```
//!
//! Routes: `GET /counter` (the session's counter, `0` without a session), `POST /counter`
//! (increments it; the first call sets the session cookie), `GET /tenant` (the request's
//! tenant: the first label of the `Host`). Every request spends one unit of a per-client-IP
//! limit of 20 a minute, per tenant.
//!
//! The rate limiter finds the client's address in the request's extensions, as a
//! `SocketAddr`. hyper does not put it there: [`PeerAddrLayer`], built per accepted connection,
//! does.
//!
//! The file doubles as a module of `tests/it/hyper_server.rs`, which serves [`serve`] on an
//! ephemeral port and talks to it with a hyper client.

use std::{convert::Infallible, future::Future, io, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::{conn::auto, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use tokio::net::TcpListener;
use tower::{ServiceBuilder, service_fn};
use tower_turnstile::{
    PeerAddrLayer,
    backend::RedisBackend,
    ratelimit::{Policy, Quota, RateLimitLayer},
    session::{FallbackStore, MemoryStore, RedisStore, Session, SessionLayer},
    tenant::{HostSubdomain, Tenant, TenantLayer},
};

/// The session key of the counter.
const COUNTER: &str = "counter";

/// The layers every connection's service is built from, built once.
#[derive(Debug, Clone)]
pub struct Layers {
    tenants: TenantLayer,
    limit: RateLimitLayer,
    sessions: SessionLayer,
}

impl Layers {
    /// Sessions and limits in Redis through `redis` (sessions falling back to memory while it
    /// is down), or in this process's memory.
    pub fn new(redis: Option<RedisBackend>, limit: Quota) -> Self {
        let policy = Policy::new("per-ip", limit).expect("a valid policy name");
        let (limit, sessions) = match redis {
            Some(redis) => (
                RateLimitLayer::new(policy).with_redis(redis.clone()),
                SessionLayer::new(FallbackStore::new(RedisStore::new(redis))),
            ),
            None => (
                RateLimitLayer::new(policy),
                SessionLayer::new(MemoryStore::new()),
            ),
        };
        Self {
            tenants: TenantLayer::new(HostSubdomain::first_label()),
            limit,
            // Plain HTTP in this example; serve over TLS and drop this line in production.
            sessions: sessions.with_secure(false),
        }
    }
}

/// The application: plain async functions over `http` types.
async fn handle(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // The session layer put the handle into the extensions (it loads nothing until asked).
    let session = request.extensions().get::<Session>().cloned();
    let tenant = request.extensions().get::<Tenant>().cloned();
    let answer = |status: StatusCode, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        Ok(response)
    };
    let Some(session) = session else {
        return answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            "no session layer\n".into(),
        );
    };
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/counter") => {
            let n: u64 = session.get(COUNTER).await.ok().flatten().unwrap_or(0);
            answer(StatusCode::OK, n.to_string())
        }
        (&Method::POST, "/counter") => {
            let n: u64 = session.get(COUNTER).await.ok().flatten().unwrap_or(0) + 1;
            match session.insert(COUNTER, n).await {
                Ok(()) => answer(StatusCode::OK, n.to_string()),
                Err(error) => answer(StatusCode::SERVICE_UNAVAILABLE, format!("{error}\n")),
            }
        }
        (&Method::GET, "/tenant") => answer(
            StatusCode::OK,
            tenant.map_or_else(|| "default".to_owned(), |t| t.as_str().to_owned()),
        ),
        _ => answer(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// Serves `layers` on `listener` until `shutdown` resolves, then lets the open connections
/// finish their requests (for at most `drain`) and returns.
pub async fn serve(
    listener: TcpListener,
    layers: Layers,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) -> io::Result<()> {
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        let (stream, peer): (_, SocketAddr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // A failed accept (out of file descriptors, say) ends no other connection.
                Err(_) => continue,
            },
            () = &mut shutdown => break,
        };
        // Outermost first: the tenant is known before the limit keyed by it; the limit
        // refuses floods before any session is looked up.
        let service = ServiceBuilder::new()
            .layer(PeerAddrLayer::new(peer))
            .layer(layers.tenants.clone())
            .layer(layers.limit.clone())
            .layer(layers.sessions.clone())
            .service(service_fn(handle));
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(service))
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // A client that goes away mid-request is its own business.
            let _ = connection.await;
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(drain, graceful.shutdown()).await;
    Ok(())
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
    let layers = Layers::new(redis, Quota::per_minute(20));
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:3001".to_owned());
    let listener = TcpListener::bind(&bind).await?;
    println!("listening on http://{bind} (try http://acme.localhost:3001/counter)");
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    serve(listener, layers, shutdown, Duration::from_secs(10)).await
}
