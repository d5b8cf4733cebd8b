//! Health, readiness and metrics: unauthenticated, for load balancers and
//! Prometheus.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use std::sync::atomic::Ordering;

use super::{ApiError, SharedState};
use crate::metrics::HandshakeResult;
use crate::status::Status;

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

/// Devices per status name, in the order of `Status::NAMES`, and per
/// status with its detail.
fn status_counts(s: &SharedState) -> ([i64; 4], [(Status, u64); 6]) {
    let counts = s.status.counts();
    let mut by_name = [0i64; 4];
    for (status, n) in Status::ALL.iter().zip(counts) {
        let i = Status::NAMES
            .iter()
            .position(|name| *name == status.name())
            .unwrap();
        by_name[i] += n as i64;
    }
    let mut all = [(Status::Configuring, 0); 6];
    for (i, (st, n)) in Status::ALL.iter().zip(counts).enumerate() {
        all[i] = (*st, n);
    }
    (by_name, all)
}

/// `GET /v1/summary`: what the dashboard's summary strip shows. The
/// handshake rate is averaged since the previous call at least a second
/// ago (the page asks every second or two).
pub async fn summary(State(s): State<SharedState>) -> impl IntoResponse {
    let (by_name, all) = status_counts(&s);
    let mut by_status = serde_json::Map::new();
    for (name, n) in Status::NAMES.iter().zip(by_name) {
        by_status.insert(name.to_string(), n.into());
    }
    let mut by_detail = serde_json::Map::new();
    for (st, n) in all {
        if let Some(d) = st.detail() {
            by_detail.insert(d.to_string(), n.into());
        }
    }
    let completed = s.metrics.handshake_count(HandshakeResult::Completed);
    let now = std::time::Instant::now();
    let rate = {
        let mut r = s.handshake_rate.lock();
        match *r {
            Some((t, _, rate)) if now.duration_since(t).as_secs_f64() < 1.0 => rate,
            Some((t, n, _)) => {
                let rate = completed.saturating_sub(n) as f64 / now.duration_since(t).as_secs_f64();
                *r = Some((now, completed, rate));
                rate
            }
            None => {
                *r = Some((now, completed, 0.0));
                0.0
            }
        }
    };
    axum::Json(serde_json::json!({
        "gateway_id": s.gateway_id,
        "devices": s.registry.count(),
        "by_status": by_status,
        "by_status_detail": by_detail,
        // Links up now on this gateway (the session table also keeps
        // disconnected sessions until they expire).
        "sessions": s.metrics.sessions.get(),
        // Devices connected through any gateway of the cluster (this
        // gateway's links when it runs alone).
        "connected": s.cluster.as_ref().map_or(s.metrics.sessions.get(), |c| c.ownership.connected() as i64),
        "handshakes_total": completed,
        "handshakes_per_s": (rate * 10.0).round() / 10.0,
        "proxy": s.proxy.to_string(),
        "gateway_address": s.path.gateway_address().to_string(),
    }))
}

pub async fn metrics(
    State(s): State<SharedState>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    if s.metrics_auth {
        let grant = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(crate::auth::credential)
            .and_then(|t| s.tokens.check(&t, crate::registry::now_ms()));
        match grant {
            Some(g) if g.allows(crate::tokens::Scope::Read) => {}
            Some(_) => {
                return super::ApiError::new(
                    axum::http::StatusCode::FORBIDDEN,
                    "forbidden",
                    "this token's scopes do not include read, which /metrics needs (--metrics-auth)",
                )
                .into_response()
            }
            None => {
                return super::ApiError::new(
                    axum::http::StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "/metrics needs a token with the read scope (--metrics-auth): Authorization: Bearer <token>",
                )
                .into_response()
            }
        }
    }
    s.metrics.devices_registered.set(s.registry.count());
    let (by_name, _) = status_counts(&s);
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
        .into_response()
}
