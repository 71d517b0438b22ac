use axum::{
    extract::FromRequestParts,
    response::{IntoResponse, Response},
};
use http::{StatusCode, request::Parts};

use super::Session;

/// The rejection of the [`Session`] extractor: the route is not behind a
/// [`SessionLayer`](super::SessionLayer). This is a wiring mistake, so it answers `500` with a
/// message saying so.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("no session layer in front of this route: add `SessionLayer` to the router")]
#[non_exhaustive]
pub struct MissingSessionLayer;

impl IntoResponse for MissingSessionLayer {
    fn into_response(self) -> Response {
        (StatusCode::INTERNAL_SERVER_ERROR, self.to_string()).into_response()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Session {
    type Rejection = MissingSessionLayer;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Session>()
            .cloned()
            .ok_or(MissingSessionLayer)
    }
}
