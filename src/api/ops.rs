//! Health, readiness and metrics: unauthenticated, for load balancers and
//! Prometheus.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use std::sync::atomic::Ordering;

use super::{ApiError, SharedState};

pub async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
}

pub async fn readyz(State(s): State<SharedState>) -> Result<impl IntoResponse, ApiError> {
    if s.ready.load(Ordering::Acquire) {
        Ok(axum::Json(serde_json::json!({"status": "ready"})))
    } else {
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the gateway is starting or stopping",
        ))
    }
}

pub async fn metrics(State(s): State<SharedState>) -> impl IntoResponse {
    s.metrics.devices_registered.set(s.registry.count());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}
