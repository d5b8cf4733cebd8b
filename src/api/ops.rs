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
    let counts = s.status.counts();
    let mut by_name = [0i64; 4];
    for (status, n) in crate::status::Status::ALL.iter().zip(counts) {
        let i = crate::status::Status::NAMES
            .iter()
            .position(|name| *name == status.name())
            .unwrap();
        by_name[i] += n as i64;
    }
    for (gauge, n) in s.metrics.devices_by_status.iter().zip(by_name) {
        gauge.set(n);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}
