//! [`app`]: the router, its layers, and the session routes (`/`, `/counter`, `/login`, `/me`,
//! `/sessions`, `/logout`, `/logout-all`), with the plain-text answers every route shares.

use std::time::Duration;

use axum::{
    Router,
    extract::{Form, rejection::FormRejection},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;
use tower_turnstile::{
    connection::{Registry, SessionWatch},
    ratelimit::RateLimitLayer,
    session::{Expiry, Session, SessionError, SessionEvents, SessionLayer},
    tenant::{HostSubdomain, TenantLayer},
};
use tracing::{error, warn};

use super::{
    Config, Connections, HealthSource, error_chain,
    health::{HealthState, health_report},
    ws::{events, notify, websocket},
};

/// The session key of the visit counter.
const COUNTER: &str = "counter";

/// The routes, behind the tenant and session layers.
///
/// Layers, outermost first: tenant (from `Host`), then the session layer, which scopes every
/// session to the tenant it finds in the request. `/health` sits outside both, so a probe with
/// an odd `Host` still gets its answer.
pub fn app(sessions: SessionLayer, rate_limit: RateLimitLayer, health: HealthSource) -> Router {
    let connections = Connections {
        registry: Registry::local(),
        max_per_user: Config::default().ws_max_per_user,
        events: SessionEvents::memory(),
    };
    app_with(sessions, rate_limit, health, connections)
}

/// [`app`], with the registry of live connections `/ws` and `/notify` use.
pub fn app_with(
    sessions: SessionLayer,
    rate_limit: RateLimitLayer,
    health: HealthSource,
    connections: Connections,
) -> Router {
    // A session that ends (logout, "log out everywhere", a new login) closes the sockets it
    // opened, on every instance.
    let sessions = sessions
        .on_session_end(connections.registry.clone())
        .with_lifecycle_events(connections.events.clone());
    // Expiries of logged-in sessions go to the lifecycle log, one instance writing each.
    if let Err(error) = connections
        .events
        .sweep_expired(sessions.store(), Duration::from_secs(1))
    {
        warn!(%error, "expired sessions will not be written to the lifecycle log");
    }
    // A session that expires under an open socket closes it within a second.
    let every_second = Duration::from_secs(1);
    let watch = SessionWatch::CloseOnExpiry;
    if let Err(error) = connections
        .registry
        .watch_sessions(sessions.store(), watch, every_second)
    {
        warn!(%error, "expired sessions will not close their sockets");
    }
    let session_routes = Router::new()
        .route("/ws", get(websocket))
        .route("/notify", post(notify))
        .route("/events", get(events))
        .with_state(connections)
        .route("/", get(index))
        .route("/counter", get(show_counter).post(increment_counter))
        .route("/login", post(login))
        .route("/me", get(me))
        .route("/sessions", get(list_sessions))
        .route("/logout", post(logout))
        .route("/logout-all", post(logout_all))
        .layer(sessions)
        // Per client IP within the tenant: after the tenant is known, before any session I/O.
        .layer(rate_limit.clone())
        // The tenant is the first label of a host with a subdomain (`acme.localhost` → acme);
        // a bare host or an IP address is `default`; anything else gets `400`.
        .layer(TenantLayer::new(HostSubdomain::first_label()));

    // Installed before the first request, so that nothing goes unrecorded.
    super::metrics::prometheus();
    Router::new()
        .route("/metrics", get(super::metrics::metrics_text))
        .route("/health", get(health_report))
        .with_state(HealthState {
            redis: health,
            rate_limit,
        })
        .merge(session_routes)
}

/// A plain-text response.
pub(crate) fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body.into(),
    )
        .into_response()
}

pub(crate) fn not_logged_in() -> Response {
    text(StatusCode::UNAUTHORIZED, "not logged in\n")
}

/// `503` for a store that cannot answer, with a hint to retry soon.
fn store_unavailable() -> Response {
    let mut response = text(
        StatusCode::SERVICE_UNAVAILABLE,
        "session store unavailable; try again later\n",
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// The answer to a session operation that failed. The layer degrades by default, so reads and
/// writes of the session do not get here; listing or ending a user's sessions needs the store,
/// and says so with a `503`.
fn session_failure(error: SessionError) -> Response {
    match error {
        SessionError::Store(source) => {
            warn!(error = %error_chain(&source), "session store unavailable");
            store_unavailable()
        }
        SessionError::InvalidUser => text(
            StatusCode::BAD_REQUEST,
            "user name must be 1 to 1024 bytes long\n",
        ),
        other => {
            // The app writes only well-formed keys and values, so this is a bug, not bad input.
            error!(error = %error_chain(&other), "session operation failed");
            text(StatusCode::INTERNAL_SERVER_ERROR, "session error\n")
        }
    }
}

async fn index() -> Response {
    text(
        StatusCode::OK,
        "tower-turnstile reference app\n\
         \n\
         GET  /            this text\n\
         GET  /counter     the session's counter (0 without a session)\n\
         POST /counter     increments the counter; the first call starts a session\n\
         POST /login       form body user=<name>[&remember=1]: binds the session to that user;\n\
                           remember=1 keeps the cookie after the browser closes\n\
         GET  /me          the user of this session, or 401\n\
         GET  /sessions    how many live sessions this user has, or 401\n\
         POST /logout      ends this session\n\
         POST /logout-all  ends every session of this user, or 401\n\
         GET  /ws          WebSocket for a logged-in session: receives /notify messages,\n\
                           closes when the session ends (on any instance)\n\
         POST /notify      form body user=<name>[&message=<text>]: sends the message to every\n\
                           live /ws connection of that user; the body is how many\n\
         GET  /events      JSON: this tenant's latest session lifecycle events\n\
         GET  /metrics     Prometheus text format: the crate's metrics\n\
         GET  /health      JSON: Redis health and whether the fallback is in use\n\
         \n\
         The tenant is the first label of the host: acme.localhost:3000 is tenant acme.\n",
    )
}

/// The counter, or 0. A value that does not read as a number is logged and counted as 0 rather
/// than failing the request.
async fn counter(session: &Session) -> u64 {
    match session.get::<u64>(COUNTER).await {
        Ok(value) => value.unwrap_or(0),
        Err(error) => {
            warn!(error = %error_chain(&error), "session counter unreadable; counting from 0");
            0
        }
    }
}

async fn show_counter(session: Session) -> Response {
    text(StatusCode::OK, counter(&session).await.to_string())
}

async fn increment_counter(session: Session) -> Response {
    let next = counter(&session).await.saturating_add(1);
    match session.insert(COUNTER, next).await {
        Ok(()) => text(StatusCode::OK, next.to_string()),
        Err(error) => session_failure(error),
    }
}

/// The `/login` form.
#[derive(Debug, Deserialize)]
struct LoginForm {
    user: Option<String>,
    /// `1`: a persistent cookie ("remember me"); anything else: a browser-session cookie.
    remember: Option<String>,
}

/// How long a remembered login may stay unused (the session's absolute lifetime still caps it).
const REMEMBERED_FOR: Duration = Duration::from_secs(30 * 24 * 3600);

async fn login(session: Session, form: Result<Form<LoginForm>, FormRejection>) -> Response {
    let (user, remember) = match form {
        Ok(Form(LoginForm {
            user: Some(user),
            remember,
        })) if !user.trim().is_empty() => (user, remember.as_deref() == Some("1")),
        Ok(_) => return text(StatusCode::BAD_REQUEST, "missing form field: user=<name>\n"),
        // Every unreadable form is the client's to fix: wrong content type, bad encoding,
        // duplicated fields. Only an oversized body keeps its more precise `413`.
        Err(rejection) => {
            let status = match rejection.status() {
                StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
                _ => StatusCode::BAD_REQUEST,
            };
            return text(
                status,
                format!(
                    "{}; expected form body user=<name>\n",
                    rejection.body_text()
                ),
            );
        }
    };
    session
        .set_expiry(if remember {
            Expiry::Inactivity(REMEMBERED_FOR)
        } else {
            Expiry::BrowserSession
        })
        .await;
    match session.set_user(user.as_str()).await {
        Ok(()) => text(StatusCode::OK, user),
        Err(error) => session_failure(error),
    }
}

async fn me(session: Session) -> Response {
    match session.user_id().await {
        Ok(Some(user)) => text(StatusCode::OK, user),
        Ok(None) => not_logged_in(),
        Err(error) => session_failure(error),
    }
}

async fn list_sessions(session: Session) -> Response {
    match session.user_id().await {
        Ok(Some(_)) => {}
        // Also a session this instance cannot read while the store is down: as far as it can
        // tell, nobody is logged in (as `/me` says).
        Ok(None) => return not_logged_in(),
        Err(error) => return session_failure(error),
    }
    match session.user_sessions().await {
        Ok(sessions) => text(StatusCode::OK, sessions.len().to_string()),
        Err(error) => session_failure(error),
    }
}

async fn logout(session: Session) -> Response {
    session.destroy().await;
    text(StatusCode::OK, "logged out\n")
}

async fn logout_all(session: Session) -> Response {
    match session.user_id().await {
        Ok(Some(_)) => {}
        // Also a session this instance cannot read while the store is down: as far as it can
        // tell, nobody is logged in (as `/me` says).
        Ok(None) => return not_logged_in(),
        Err(error) => return session_failure(error),
    }
    match session.destroy_user_sessions().await {
        Ok(ended) => text(StatusCode::OK, ended.to_string()),
        Err(error) => session_failure(error),
    }
}
