//! `GET /ws` and `POST /notify`: live connections, registered across instances, and the
//! messages sent to them.

use axum::{
    extract::{
        Form, State,
        rejection::FormRejection,
        ws::{
            CloseFrame, Message, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection,
        },
    },
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use tower_turnstile::{
    connection::{Event, RegisterError, Registration, Registry},
    session::{Session, SessionEvents},
    tenant::Tenant,
};

use super::routes::{not_logged_in, text};

/// The live connections `/ws` registers and `/notify` reaches.
#[derive(Debug, Clone)]
pub struct Connections {
    /// Where they are registered.
    pub registry: Registry,
    /// `WS_MAX_PER_USER`.
    pub max_per_user: u32,
    /// The sessions' lifecycle log, which `/events` reads (in Redis with Redis, else in
    /// memory).
    pub events: SessionEvents,
}

/// `GET /ws`: a WebSocket for a logged-in session, registered across instances; it receives
/// the `/notify` messages of its user as text frames, closes with 1000 ("session ended") when
/// its session ends on any instance, and with 1012 when the instance stops.
pub(crate) async fn websocket(
    State(connections): State<Connections>,
    tenant: Tenant,
    session: Session,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let user = match session.user_id().await {
        Ok(Some(user)) => user,
        _ => return not_logged_in(),
    };
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    let max = connections.max_per_user;
    let registry = &connections.registry;
    // Bound to the session: it closes when the session ends, on whichever instance.
    let registered = match session.key() {
        Some(key) => registry.register_for_session(&key, &user, "ws", max).await,
        None => registry.register_capped(&tenant, &user, "ws", max).await,
    };
    match registered {
        Ok(registration) => upgrade.on_upgrade(move |socket| serve_socket(socket, registration)),
        Err(RegisterError::AtCapacity { limit, .. }) => {
            let mut response = text(
                StatusCode::TOO_MANY_REQUESTS,
                format!("at most {limit} live connections per user\n"),
            );
            let headers = response.headers_mut();
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            if let Ok(policy) =
                HeaderValue::try_from(format!("\"ws\";q={limit};qu=\"concurrent-requests\""))
            {
                headers.insert("ratelimit-policy", policy);
            }
            headers.insert("ratelimit", HeaderValue::from_static("\"ws\";r=0"));
            response
        }
        Err(_) => {
            let mut response = text(
                StatusCode::SERVICE_UNAVAILABLE,
                "this instance is stopping; connect again\n",
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
    }
}

async fn serve_socket(mut socket: WebSocket, mut registration: Registration) {
    loop {
        tokio::select! {
            event = registration.next() => match event {
                Some(Event::Message(message)) => {
                    if socket.send(Message::Text(message.into())).await.is_err() {
                        return;
                    }
                }
                Some(Event::SessionEnded) => {
                    let close = CloseFrame {
                        code: 1000,
                        reason: "session ended".into(),
                    };
                    let _ = socket.send(Message::Close(Some(close))).await;
                    return;
                }
                _ => {
                    let close = CloseFrame {
                        code: 1012,
                        reason: "service restart".into(),
                    };
                    let _ = socket.send(Message::Close(Some(close))).await;
                    return;
                }
            },
            incoming = socket.recv() => match incoming {
                None | Some(Err(_) | Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct NotifyForm {
    user: Option<String>,
    message: Option<String>,
}

/// `POST /notify`: sends `message` (default `ping`) to every live `/ws` connection of `user`
/// in this tenant, on every instance; the body is how many connections it reached.
pub(crate) async fn notify(
    State(connections): State<Connections>,
    tenant: Tenant,
    form: Result<Form<NotifyForm>, FormRejection>,
) -> Response {
    let (user, message) = match form {
        Ok(Form(NotifyForm {
            user: Some(user),
            message,
        })) if !user.trim().is_empty() => (user, message.unwrap_or_else(|| "ping".to_owned())),
        Ok(_) => return text(StatusCode::BAD_REQUEST, "missing form field: user=<name>\n"),
        Err(rejection) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!(
                    "{}; expected form body user=<name>\n",
                    rejection.body_text()
                ),
            );
        }
    };
    let reached = connections
        .registry
        .send_to_user(&tenant, &user, &message)
        .await;
    text(StatusCode::OK, reached.to_string())
}

/// `GET /events`: the tenant's latest session lifecycle events (at most 100), oldest first,
/// as a JSON array of `{kind, user, at}`; never a session id.
pub(crate) async fn events(State(connections): State<Connections>, tenant: Tenant) -> Response {
    match connections.events.latest(&tenant, 100).await {
        Ok(events) => {
            let list: Vec<serde_json::Value> = events
                .iter()
                .map(|event| {
                    let mut item = serde_json::json!({
                        "kind": event.kind.as_str(),
                        "at": event.at,
                    });
                    if let Some(user) = &event.user {
                        item["user"] = serde_json::Value::from(user.as_str());
                    }
                    item
                })
                .collect();
            axum::Json(list).into_response()
        }
        Err(_) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the event log is unavailable; try again later\n",
        ),
    }
}
