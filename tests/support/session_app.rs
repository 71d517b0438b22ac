//! A router that exercises every session operation, shared by the session tests.

use std::time::{Duration, SystemTime};

use axum::{
    Router,
    extract::{Path, Request},
    http::StatusCode,
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use http::HeaderValue;
use tower_turnstile::{
    backend::{BreakerConfig, RedisBackend},
    session::{Expiry, Session, SessionEvent, SessionLayer, SessionUnavailable},
    tenant::Tenant,
};

use super::http::Reply;

/// Routes that exercise every session operation.
pub fn routes() -> Router {
    async fn read(Path(key): Path<String>, s: Session) -> String {
        match s.get::<serde_json::Value>(&key).await {
            Ok(Some(value)) => value.to_string(),
            Ok(None) => "none".into(),
            Err(error) => format!("error: {error}"),
        }
    }
    async fn write(Path((key, value)): Path<(String, String)>, s: Session) -> &'static str {
        s.insert(&key, value).await.unwrap();
        "ok"
    }
    async fn bump(Path(key): Path<String>, s: Session) -> String {
        let n = s.get::<u64>(&key).await.unwrap().unwrap_or(0) + 1;
        s.insert(&key, n).await.unwrap();
        n.to_string()
    }
    async fn fail(Path((key, value)): Path<(String, String)>, s: Session) -> StatusCode {
        s.insert(&key, value).await.unwrap();
        StatusCode::INTERNAL_SERVER_ERROR
    }
    Router::new()
        .route("/untouched", get(|| async { "ok" }))
        .route("/get/{key}", get(read))
        .route("/set/{key}/{value}", post(write))
        .route("/bump/{key}", post(bump))
        .route("/remove/{key}", post(|Path(key): Path<String>, s: Session| async move { s.remove(&key).await.unwrap() }))
        .route("/login/{user}", post(|Path(user): Path<String>, s: Session| async move { s.set_user(user).await.unwrap() }))
        .route("/try-login/{user}", post(|Path(user): Path<String>, s: Session| async move {
            match s.set_user(user).await {
                Ok(()) => (StatusCode::OK, "ok".to_owned()),
                Err(error @ tower_turnstile::session::SessionError::TooManySessions { .. }) => {
                    (StatusCode::CONFLICT, error.to_string())
                }
                Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
            }
        }))
        .route("/key", get(|s: Session| async move { s.key().map(|k| k.hash()).unwrap_or_default() }))
        .route("/user", get(|s: Session| async move { s.user_id().await.unwrap().unwrap_or_else(|| "anonymous".into()) }))
        .route("/cycle", post(|s: Session| async move { s.cycle_id().await }))
        .route("/destroy", post(|s: Session| async move { s.destroy().await }))
        .route("/sessions", get(|s: Session| async move { s.user_sessions().await.unwrap().len().to_string() }))
        .route("/logout-all", post(|s: Session| async move { s.destroy_user_sessions().await.unwrap().to_string() }))
        .route("/fail/{key}/{value}", post(fail))
        .route("/login-remember/{user}", post(|Path(user): Path<String>, s: Session| async move {
            s.set_expiry(Expiry::Inactivity(Duration::from_secs(7 * 24 * 3600))).await;
            s.set_user(user).await.unwrap()
        }))
        .route("/expiry/browser", post(|s: Session| async move { s.set_expiry(Expiry::BrowserSession).await }))
        .route("/expiry/idle/{ms}", post(|Path(ms): Path<u64>, s: Session| async move {
            s.set_expiry(Expiry::Inactivity(Duration::from_millis(ms))).await
        }))
        .route("/expiry/at/{ms}", post(|Path(ms): Path<u64>, s: Session| async move {
            s.set_expiry(Expiry::At(SystemTime::now() + Duration::from_millis(ms))).await
        }))
        .route("/expiry/ended", post(|s: Session| async move { s.set_expiry(Expiry::At(SystemTime::UNIX_EPOCH)).await }))
        .route("/is-new", get(|s: Session| async move { s.is_new().await.unwrap().to_string() }))
}

/// Shows the layer's [`SessionEvent`] (and the reason of a `503`) as headers, as an outer
/// layer would read them.
async fn show_event(mut response: Response) -> Response {
    if let Some(event) = response.extensions().get::<SessionEvent>().copied() {
        let value = HeaderValue::from_str(&format!("{event:?}")).unwrap();
        response.headers_mut().insert("x-session-event", value);
    }
    if let Some(reason) = response.extensions().get::<SessionUnavailable>().copied() {
        let value = HeaderValue::from_str(&format!("{reason:?}")).unwrap();
        response
            .headers_mut()
            .insert("x-session-unavailable", value);
    }
    response
}

pub fn event(reply: &Reply) -> Option<&str> {
    reply
        .headers
        .get("x-session-event")
        .map(|v| v.to_str().unwrap())
}

/// The `Max-Age` of a `Set-Cookie`, if it has one.
pub fn max_age(set_cookie: &str) -> Option<u64> {
    let value = set_cookie.split("Max-Age=").nth(1)?;
    value.split(';').next()?.parse().ok()
}

/// Sets the tenant from a test header, as a tenant layer would.
pub async fn tenant_from_header(mut request: Request, next: Next) -> Response {
    if let Some(name) = request
        .headers()
        .get("x-tenant")
        .and_then(|v| v.to_str().ok())
    {
        match Tenant::new(name) {
            Ok(tenant) => {
                request.extensions_mut().insert(tenant);
            }
            Err(_) => return StatusCode::BAD_REQUEST.into_response(),
        }
    }
    next.run(request).await
}

pub fn app(layer: SessionLayer) -> Router {
    routes()
        .layer(layer)
        .layer(middleware::map_response(show_event))
        .layer(middleware::from_fn(tenant_from_header))
}

/// A backend that gives up fast, for fault drills: connects within 100 ms, opens its breaker
/// after two outages in a row, probes again after 200 ms.
pub fn fast_failing_backend(url: &str) -> RedisBackend {
    RedisBackend::builder(url)
        .connect_timeout(Duration::from_millis(100))
        .breaker(fast_breaker())
        .build()
        .unwrap()
}

/// A breaker for fault drills: open after two outages in a row, probing again after 200 ms.
pub fn fast_breaker() -> BreakerConfig {
    BreakerConfig::default()
        .failure_threshold(2)
        .open_for(Duration::from_millis(200))
}
