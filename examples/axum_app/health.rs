//! `GET /health`: JSON on the storage in use, outside the tenant, session and rate-limit layers
//! so that a probe always gets its answer.

use axum::{
    Json,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use tower_turnstile::{health::HealthService, ratelimit::RateLimitLayer, session::PostgresStore};

use super::HealthSource;

/// What `/health` looks at.
#[derive(Debug, Clone)]
pub(crate) struct HealthState {
    pub(crate) redis: HealthSource,
    pub(crate) rate_limit: RateLimitLayer,
}

pub(crate) async fn health_report(State(state): State<HealthState>) -> Response {
    // Without Redis the limiter counts in memory; its report says what it let through.
    let local_limit = serde_json::json!({
        "falling_back": false,
        "fallback_decisions": 0,
        "shadow_refusals": state.rate_limit.shadow_refusals(),
    });
    let report = match state.redis {
        HealthSource::Disabled => serde_json::json!({
            "redis": "disabled",
            "fallback_active": false,
            "storage": "memory",
            "rate_limit": local_limit,
        }),
        HealthSource::Postgres(database) => serde_json::json!({
            "redis": "disabled",
            "fallback_active": false,
            "storage": "postgres",
            "postgres": postgres_health(&database).await,
            "rate_limit": local_limit,
        }),
        HealthSource::Redis(backend, fallback) => {
            let mut service = HealthService::new(backend).with_rate_limit(&state.rate_limit);
            if let Some(fallback) = fallback {
                service = service.with_sessions(&fallback);
            }
            let mut report = serde_json::to_value(service.report().await)
                .unwrap_or_else(|_| serde_json::json!({}));
            report["storage"] = "redis".into();
            report["breaker"] = report["state"].clone();
            report
        }
        HealthSource::Chain(backend, database) => {
            let service = HealthService::new(backend).with_rate_limit(&state.rate_limit);
            let mut report = serde_json::to_value(service.report().await)
                .unwrap_or_else(|_| serde_json::json!({}));
            report["storage"] = "redis+postgres".into();
            report["breaker"] = report["state"].clone();
            report["postgres"] = postgres_health(&database).await.into();
            report
        }
    };
    (StatusCode::OK, Json(report)).into_response()
}

async fn postgres_health(database: &PostgresStore) -> &'static str {
    match database.ping().await {
        Ok(()) => "healthy",
        Err(_) => "unhealthy",
    }
}
