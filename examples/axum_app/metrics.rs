//! `GET /metrics`: the crate's metrics in the Prometheus text format. It sits outside every
//! layer, like `/health`: never rate limited, never a session.

use std::sync::OnceLock;

use axum::{
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing::warn;

/// The process's Prometheus recorder, installed by the first app built (the tests build many
/// in one process), with every metric of the crate registered.
pub(crate) fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        match metrics::set_global_recorder(recorder) {
            Ok(()) => tower_turnstile::register_metrics(),
            Err(_) => warn!("another metrics recorder is installed; /metrics shows nothing"),
        }
        handle
    })
}

pub(crate) async fn metrics_text() -> Response {
    let handle = prometheus();
    handle.run_upkeep();
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}
