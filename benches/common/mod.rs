//! What the benches share: one request through a router, and reading criterion's estimates
//! back to print ratios.

#![allow(dead_code)] // each bench uses its own part

use std::{path::PathBuf, sync::OnceLock, time::SystemTime};

use axum::{Router, body::Body};
use http::{Request, header};
use http_body_util::BodyExt;
use tower::ServiceExt;

/// Sends `GET path` (with `cookie`, if any) and returns the cookie it sets and the body.
pub(crate) async fn call(
    app: &Router,
    path: &str,
    cookie: Option<&str>,
) -> (Option<String>, String) {
    let mut request = Request::get(path);
    if let Some(cookie) = cookie {
        request = request.header(header::COOKIE, cookie);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let cookie = response
        .headers()
        .get(header::SET_COOKIE)
        .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_owned());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (cookie, String::from_utf8(body.to_vec()).unwrap())
}

static STARTED: OnceLock<SystemTime> = OnceLock::new();

/// Marks the start of this run: estimates written before it (a run with a filter that left a
/// benchmark out) are not read back as if measured now.
pub(crate) fn start() {
    STARTED.get_or_init(SystemTime::now);
}

/// The mean time (ns) criterion measured for `name` in `group` during this run.
pub(crate) fn estimate(group: &str, name: &str) -> Option<f64> {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from);
    let path = target
        .join("criterion")
        .join(group.replace('/', "_"))
        .join(name)
        .join("new/estimates.json");
    let written = std::fs::metadata(&path).ok()?.modified().ok()?;
    if STARTED.get().is_some_and(|started| written < *started) {
        return None;
    }
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    json["mean"]["point_estimate"].as_f64()
}
