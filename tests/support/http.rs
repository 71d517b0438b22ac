//! Drives a Tower service with HTTP requests, keeping cookies as a browser would.

use std::convert::Infallible;

use axum::{Router, body::Body};
use http::{HeaderMap, Request, StatusCode, header};
use http_body_util::BodyExt;
use tower::ServiceExt;

/// One response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    /// Every `Set-Cookie` header.
    pub fn set_cookies(&self) -> Vec<String> {
        self.headers
            .get_all(header::SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }

    /// The single `Set-Cookie` header, if any (panics if there are several).
    pub fn set_cookie(&self) -> Option<String> {
        let all = self.set_cookies();
        assert!(all.len() <= 1, "more than one Set-Cookie: {all:?}");
        all.into_iter().next()
    }
}

/// A client with a one-cookie jar, talking to a router in-process.
#[derive(Debug, Clone)]
pub struct Client {
    app: Router,
    pub cookie: Option<String>,
    pub host: Option<String>,
    /// Sent as `x-tenant`, which the session test app reads the tenant from.
    pub tenant: Option<String>,
}

impl Client {
    pub fn new(app: Router) -> Self {
        Self {
            app,
            cookie: None,
            host: None,
            tenant: None,
        }
    }

    /// The router this client talks to.
    pub fn app(&self) -> Router {
        self.app.clone()
    }

    /// The same jar, talking to another router (another instance of the service).
    pub fn on(&self, app: Router) -> Self {
        Self {
            app,
            cookie: self.cookie.clone(),
            host: self.host.clone(),
            tenant: self.tenant.clone(),
        }
    }

    pub async fn get(&mut self, uri: &str) -> Reply {
        self.send("GET", uri).await
    }

    pub async fn post(&mut self, uri: &str) -> Reply {
        self.send("POST", uri).await
    }

    pub async fn send(&mut self, method: &str, uri: &str) -> Reply {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(cookie) = &self.cookie {
            request = request.header(header::COOKIE, cookie);
        }
        if let Some(host) = &self.host {
            request = request.header(header::HOST, host);
        }
        if let Some(tenant) = &self.tenant {
            request = request.header("x-tenant", tenant);
        }
        let reply = send(&self.app, request.body(Body::empty()).unwrap()).await;
        if let Some(set) = reply.set_cookies().last() {
            let pair = set.split(';').next().unwrap().to_owned();
            let removal = set.contains("Max-Age=0");
            self.cookie = if removal { None } else { Some(pair) };
        }
        reply
    }
}

/// Sends one request to the router and reads the whole response.
pub async fn send(app: &Router, request: Request<Body>) -> Reply {
    let response = app
        .clone()
        .oneshot(request)
        .await
        .unwrap_or_else(|e: Infallible| match e {});
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}
