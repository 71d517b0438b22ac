//! The hyper example (`examples/hyper_server.rs`) served on ephemeral ports and driven by a
//! real hyper client over TCP, with a cookie jar of its own; two instances on one Redis.

// The example's `pub` items are its interface as a program; here they are a private module's.
#[allow(unreachable_pub)]
#[path = "../../examples/hyper_server.rs"]
mod example;

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use example::{Layers, serve};
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tower_turnstile::{backend::RedisBackend, ratelimit::Quota};

use crate::support::RedisServer;

/// One running server: its address, and how to stop it.
struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Running {
    async fn start(layers: Layers) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(
            listener,
            layers,
            async {
                let _ = stopped.await;
            },
            Duration::from_secs(5),
        ));
        Self {
            addr,
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the server stops within its drain time")
            .unwrap()
            .unwrap();
    }
}

/// A browser: a hyper client and a cookie jar holding one session cookie.
struct Browser {
    client: Client<HttpConnector, Empty<Bytes>>,
    cookie: Option<String>,
    host: String,
}

struct Reply {
    status: StatusCode,
    body: String,
    retry_after: Option<String>,
}

impl Browser {
    fn new(host: &str) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            cookie: None,
            host: host.to_owned(),
        }
    }

    async fn send(&mut self, server: &Running, method: Method, path: &str) -> Reply {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", server.addr))
            .header(header::HOST, &self.host);
        if let Some(cookie) = &self.cookie {
            request = request.header(header::COOKIE, cookie);
        }
        let response = self
            .client
            .request(request.body(Empty::new()).unwrap())
            .await
            .expect("the server answers");
        if let Some(set) = response.headers().get(header::SET_COOKIE) {
            let set = set.to_str().unwrap();
            let pair = set.split(';').next().unwrap().to_owned();
            self.cookie = (!set.contains("Max-Age=0")).then_some(pair);
        }
        let status = response.status();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_owned());
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
            retry_after,
        }
    }
}

fn redis_layers(server: &RedisServer, limit: Quota) -> Layers {
    // Each instance its own connection and breaker, as two processes would have.
    Layers::new(Some(RedisBackend::new(&server.url()).unwrap()), limit)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_sessions_per_tenant() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let one = Running::start(redis_layers(&redis, Quota::per_minute(100))).await;
    let two = Running::start(redis_layers(&redis, Quota::per_minute(100))).await;
    let mut alice = Browser::new("acme.localhost");
    let first = alice.send(&one, Method::POST, "/counter").await;
    assert_eq!((first.status, first.body.as_str()), (StatusCode::OK, "1"));
    assert!(alice.cookie.is_some(), "the first write sets the cookie");
    assert_eq!(alice.send(&two, Method::GET, "/counter").await.body, "1");
    assert_eq!(alice.send(&two, Method::POST, "/counter").await.body, "2");
    assert_eq!(alice.send(&one, Method::GET, "/counter").await.body, "2");
    assert_eq!(alice.send(&one, Method::GET, "/tenant").await.body, "acme");

    // The same cookie on another tenant finds nothing.
    let mut elsewhere = Browser::new("globex.localhost");
    elsewhere.cookie = alice.cookie.clone();
    assert_eq!(
        elsewhere.send(&two, Method::GET, "/counter").await.body,
        "0"
    );
    assert_eq!(
        elsewhere.send(&two, Method::GET, "/tenant").await.body,
        "globex"
    );
    one.stop().await;
    two.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_holds_over_both_instances_per_client_address() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let one = Running::start(redis_layers(&redis, Quota::per_minute(5))).await;
    let two = Running::start(redis_layers(&redis, Quota::per_minute(5))).await;
    let mut client = Browser::new("acme.localhost");
    let mut statuses = Vec::new();
    for attempt in 0..10 {
        let server = if attempt % 2 == 0 { &one } else { &two };
        let reply = client.send(server, Method::GET, "/tenant").await;
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            let retry: u64 = reply.retry_after.expect("Retry-After").parse().unwrap();
            assert!(retry >= 1);
        }
        statuses.push(reply.status);
    }
    let allowed = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert_eq!(allowed, 5, "{statuses:?}");
    assert!(
        statuses[5..]
            .iter()
            .all(|s| *s == StatusCode::TOO_MANY_REQUESTS)
    );
    // Another tenant, same address: a count of its own.
    let mut other = Browser::new("globex.localhost");
    assert_eq!(
        other.send(&one, Method::GET, "/tenant").await.status,
        StatusCode::OK
    );
    one.stop().await;
    two.stop().await;
}

#[tokio::test]
async fn in_memory_and_a_graceful_stop() {
    let server = Running::start(Layers::new(None, Quota::per_minute(100))).await;
    let mut browser = Browser::new("localhost");
    assert_eq!(
        browser.send(&server, Method::POST, "/counter").await.body,
        "1"
    );
    assert_eq!(
        browser.send(&server, Method::GET, "/counter").await.body,
        "1"
    );
    assert_eq!(
        browser.send(&server, Method::GET, "/tenant").await.body,
        "default"
    );
    assert_eq!(
        browser.send(&server, Method::GET, "/nowhere").await.status,
        StatusCode::NOT_FOUND
    );
    let addr = server.addr;
    server.stop().await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
}
