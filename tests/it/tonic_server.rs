//! The gRPC example (`examples/tonic_server.rs`) served on ephemeral ports and called with a
//! real tonic client over HTTP/2; two instances on one Redis where it matters.

// The example's `pub` items are its interface as a program; here they are a private module's.
#[allow(unreachable_pub)]
#[path = "../../examples/tonic_server.rs"]
mod example;

use std::{net::SocketAddr, time::Duration};

use example::{Layers, SESSION_ID, Utf8Codec, serve};
use http::uri::PathAndQuery;
use tokio::{net::TcpListener, sync::oneshot};
use tonic::{Code, Request, Status, metadata::MetadataMap, transport::Channel};
use tower_turnstile::{backend::RedisBackend, ratelimit::Quota};

use crate::support::RedisServer;

/// A server on an ephemeral port, stopped when dropped.
struct Running {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

impl Running {
    async fn start(layers: Layers) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(serve(listener, layers, async {
            let _ = stopped.await;
        }));
        Self { addr, _stop: stop }
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("the server accepts")
    }
}

/// A gRPC client that keeps its session id between calls, as a cookie jar would.
struct Caller {
    channel: Channel,
    tenant: &'static str,
    api_key: Option<&'static str>,
    session: Option<String>,
}

impl Caller {
    fn new(channel: Channel, tenant: &'static str) -> Self {
        Self {
            channel,
            tenant,
            api_key: None,
            session: None,
        }
    }

    /// Calls `method` of `turnstile.Counter`; the answer, or the status and its metadata.
    async fn call(&mut self, method: &str) -> Result<String, Status> {
        let mut request = Request::new(String::new());
        let metadata = request.metadata_mut();
        metadata.insert("x-tenant", self.tenant.parse().unwrap());
        if let Some(key) = self.api_key {
            metadata.insert("x-api-key", key.parse().unwrap());
        }
        if let Some(id) = &self.session {
            metadata.insert(SESSION_ID, id.parse().unwrap());
        }
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready().await.expect("the channel is ready");
        let path = PathAndQuery::try_from(format!("/turnstile.Counter/{method}")).unwrap();
        let response = grpc.unary(request, path, Utf8Codec).await?;
        self.keep_session(response.metadata());
        Ok(response.into_inner())
    }

    fn keep_session(&mut self, metadata: &MetadataMap) {
        if let Some(id) = metadata.get(SESSION_ID) {
            let id = id.to_str().unwrap();
            self.session = (!id.is_empty()).then(|| id.to_owned());
        }
    }
}

fn unlimited() -> Quota {
    Quota::per_minute(1_000_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_travels_in_metadata_and_stays_in_its_tenant() {
    let server = Running::start(Layers::new(None, unlimited(), unlimited())).await;
    let mut alice = Caller::new(server.channel().await, "acme");
    assert_eq!(alice.call("Bump").await.unwrap(), "1");
    assert!(alice.session.is_some(), "the id came back in the metadata");
    assert_eq!(alice.call("Bump").await.unwrap(), "2");
    assert_eq!(alice.call("Tenant").await.unwrap(), "acme");

    // The same id presented on another tenant finds nothing there.
    let mut elsewhere = Caller::new(server.channel().await, "globex");
    elsewhere.session = alice.session.clone();
    assert_eq!(elsewhere.call("Bump").await.unwrap(), "1");
    assert_ne!(elsewhere.session, alice.session, "a session of its own");
    assert_eq!(alice.call("Bump").await.unwrap(), "3", "untouched");

    let status = alice.call("Nope").await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);

    // A tenant name that is no valid tenant: refused as a gRPC status, not an HTTP 400.
    let mut invalid = Caller::new(server.channel().await, "not_a-valid--tenant!");
    let status = invalid.call("Tenant").await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_limit_a_call_is_resource_exhausted_with_the_delay() {
    let server = Running::start(Layers::new(
        None,
        Quota::per_minute(6),
        Quota::per_minute(3),
    ))
    .await;
    let mut keyed = Caller::new(server.channel().await, "acme");
    keyed.api_key = Some("key-1");
    for _ in 0..3 {
        keyed.call("Tenant").await.expect("within the key's limit");
    }
    let status = keyed.call("Tenant").await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let retry: u64 = status
        .metadata()
        .get("retry-after")
        .expect("the delay in the metadata")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    assert!(
        status.metadata().get("ratelimit").is_some(),
        "{:?}",
        status.metadata()
    );
    // Another key has a count of its own, until the peer's limit (6) is spent.
    keyed.api_key = Some("key-2");
    keyed.call("Tenant").await.expect("another key");
    keyed.api_key = None;
    keyed.call("Tenant").await.expect("no key: per peer only");
    let status = keyed.call("Tenant").await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "the peer's limit");
    // Another tenant: counts of its own.
    let mut other = Caller::new(server.channel().await, "globex");
    other.call("Tenant").await.expect("another tenant");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_redis_share_sessions_and_limits() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let layers = || {
        Layers::new(
            Some(RedisBackend::new(&redis.url()).unwrap()),
            unlimited(),
            Quota::per_minute(4),
        )
    };
    let one = Running::start(layers()).await;
    let two = Running::start(layers()).await;
    let mut on_one = Caller::new(one.channel().await, "acme");
    on_one.api_key = Some("shared-key");
    assert_eq!(on_one.call("Bump").await.unwrap(), "1");
    let mut on_two = Caller::new(two.channel().await, "acme");
    on_two.api_key = Some("shared-key");
    on_two.session = on_one.session.clone();
    assert_eq!(
        on_two.call("Bump").await.unwrap(),
        "2",
        "the session, from Redis"
    );
    assert_eq!(on_one.call("Bump").await.unwrap(), "3");
    assert_eq!(on_two.call("Bump").await.unwrap(), "4");
    // Four calls with the key over both instances: its limit is spent everywhere.
    for caller in [&mut on_one, &mut on_two] {
        let status = caller.call("Bump").await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted);
    }
    // The peer's count is keyed by its address, which tonic recorded (not a shared counter
    // for calls without a key).
    let keys = redis.cli(&["--scan", "--pattern", "*"]);
    assert!(
        keys.lines()
            .any(|key| key == "turnstile:acme:rl:per-peer:sliding-window:127.0.0.1"),
        "{keys}"
    );
    assert!(
        keys.contains("acme:rl:per-api-key:sliding-window:shared-key"),
        "{keys}"
    );
}
