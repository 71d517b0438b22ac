use axum::{
    extract::{FromRequestParts, OptionalFromRequestParts},
    response::{IntoResponse, Response},
};
use http::{StatusCode, request::Parts};

use super::Tenant;

/// The rejection of the [`Tenant`] extractor: the route is not behind a
/// [`TenantLayer`](super::TenantLayer). This is a wiring mistake, so it answers `500` with a
/// message saying so. (Use `Option<Tenant>` to accept requests without one.)
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("no tenant layer in front of this route: add `TenantLayer` to the router")]
#[non_exhaustive]
pub struct MissingTenantLayer;

impl IntoResponse for MissingTenantLayer {
    fn into_response(self) -> Response {
        (StatusCode::INTERNAL_SERVER_ERROR, self.to_string()).into_response()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Tenant {
    type Rejection = MissingTenantLayer;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Tenant>()
            .cloned()
            .ok_or(MissingTenantLayer)
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for Tenant {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<Tenant>().cloned())
    }
}
