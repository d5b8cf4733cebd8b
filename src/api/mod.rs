//! The HTTP control API (axum): devices, the event stream, health and
//! metrics. Handlers only translate HTTP to calls on the registry, the
//! packet path and the event hub; they hold no state of their own.
//!
//! Every error the gateway answers itself has one JSON shape,
//! `{"error": <code>, "message": <for a person>, "field": <when one is at fault>}`
//! ([`ApiError`]). Everything under `/v1` needs `Authorization: Bearer
//! <token>`; `/healthz`, `/readyz` and `/metrics` do not.

pub(crate) mod actions;
mod dashboard;
mod devices;
mod events_sse;
mod listing;
pub mod openapi;
mod ops;
pub mod server;
pub mod sign_in;
mod tokens;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Serialize;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::bus::EventBus;
use crate::metrics::Metrics;
use crate::packet_path::PacketPath;
use crate::registry::Registry;

/// What the handlers share.
pub struct ApiState {
    pub path: Arc<PacketPath>,
    pub registry: Arc<Registry>,
    /// Device lifecycle: every registration, change and deletion.
    pub fleet: Arc<crate::fleet::Fleet>,
    pub events: Arc<dyn EventBus>,
    pub metrics: Arc<Metrics>,
    pub status: Arc<crate::status::service::DeviceStatus>,
    pub relay: Arc<crate::relay::Relay>,
    pub action_queue: Arc<crate::action_queue::ActionQueue>,
    /// How long an action waits for the device's answer.
    pub action_timeout: std::time::Duration,
    /// The bootstrap token (`admin`).
    pub token: String,
    /// Every token, scoped (the bootstrap one included).
    pub tokens: Arc<crate::tokens::Tokens>,
    /// Dashboard sign-ins.
    /// Dashboard sign-ins (not WireGuard sessions: those are `path.sessions`).
    pub sign_ins: sign_in::SignIns,
    /// Where the CONNECT proxy listens (for the dashboard's ssh line).
    pub proxy: std::net::SocketAddr,
    pub gateway_id: String,
    /// Last (time, completed handshakes, rate) sample for `/v1/summary`.
    pub handshake_rate: parking_lot::Mutex<Option<(std::time::Instant, u64, f64)>>,
    /// `host:port` written into device configs.
    pub endpoint: String,
    pub ready: AtomicBool,
    /// Cluster mode: who holds devices connected elsewhere.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Who did what (relay streams, actions, deletions, tokens).
    pub audit: Arc<crate::audit::AuditTrail>,
    /// `--metrics-auth`: `/metrics` needs a read token.
    pub metrics_auth: bool,
    /// Set while the gateway drains before a stop: new actions get 503.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// Event streams that may be open at once (`--max-event-streams`).
    pub event_streams: Arc<tokio::sync::Semaphore>,
    /// Failed sign-ins per source address.
    pub sign_in_failures: sign_in::Throttle,
}

pub type SharedState = Arc<ApiState>;

pub fn router(state: SharedState) -> Router {
    let v1 = Router::new()
        .route(
            "/devices",
            get(listing::list)
                .post(devices::register)
                .delete(devices::delete_by_prefix),
        )
        .route("/devices/batch", post(devices::register_batch))
        .route("/devices/{uuid}/heartbeat", post(devices::heartbeat))
        .route("/devices/{uuid}/wg-quick", get(devices::wg_quick_text))
        .route("/heartbeats", post(devices::heartbeats))
        .route("/devices/{uuid}/actions/{action}", post(actions::action))
        .route("/actions/{id}", get(actions::get_action))
        .route(
            "/devices/{uuid}",
            get(devices::get_one)
                .patch(devices::patch)
                .delete(devices::delete),
        )
        .route("/events", get(events_sse::events))
        .route("/summary", get(ops::summary))
        .route("/session", get(sign_in::current).delete(sign_in::sign_out))
        .route("/tokens", get(tokens::list).post(tokens::create))
        .route("/audit", get(tokens::audit))
        .route("/tokens/{id}", axum::routing::delete(tokens::delete))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticate,
        ))
        // Sign-in is the one /v1 call without credentials: its body is a
        // token, so it may be small (anyone may send it).
        .route(
            "/session",
            post(sign_in::sign_in).layer(DefaultBodyLimit::max(sign_in::MAX_BODY)),
        )
        // The API's description: no credentials (it holds no secret).
        .route("/openapi.json", get(openapi_json));
    Router::new()
        .nest("/v1", v1)
        .merge(dashboard::routes())
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // A batch of 10,000 registrations is about 1.3 MB of JSON.
        .layer(DefaultBodyLimit::max(8 * 1024 * 1024))
        .with_state(state)
}

async fn openapi_json() -> impl axum::response::IntoResponse {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        DOC.get_or_init(openapi::document).clone(),
    )
}

/// The gateway's error answer.
#[derive(Debug, Clone, Serialize)]
pub struct ApiError {
    #[serde(skip)]
    pub status: StatusCode,
    pub error: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, error: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            error,
            message: message.into(),
            field: None,
        }
    }
    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }
    pub fn bad_field(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", message).field(field)
    }
    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "internal error answering an API request");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the gateway failed to handle this request; see its log",
        )
    }
    pub fn unknown_device(uuid: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "device_not_found",
            format!("no device with uuid {uuid:?} is registered"),
        )
        .field("uuid")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(&self)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method",
    )
}

/// Authenticates a `/v1` request: `Authorization: Bearer <token>` (checked
/// in constant time), or the dashboard's session cookie. With the cookie, a
/// request that changes state must also carry the session's CSRF token and
/// come from this host's page (`Origin`). Records how in an [`sign_in::Auth`]
/// extension.
async fn authenticate(State(state): State<SharedState>, mut req: Request, next: Next) -> Response {
    let now_ms = crate::registry::now_ms();
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        });
    let grant = match presented {
        Some(t) => match state.tokens.check(t, now_ms) {
            Some(g) => {
                req.extensions_mut().insert(sign_in::Auth::Token);
                g
            }
            None => {
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "the bearer token is not a valid token of this gateway (unknown, expired or revoked)",
                )
                .into_response()
            }
        },
        None => {
            let Some(id) = sign_in::cookie(req.headers()) else {
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "send an API token as `Authorization: Bearer <token>`, or sign in on the dashboard",
                )
                .into_response();
            };
            let checked = state
                .sign_ins
                .check(id, std::time::Instant::now())
                .filter(|(_, g)| state.tokens.still_valid(g, now_ms));
            let Some((csrf, grant)) = checked else {
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "session_expired",
                    "the dashboard session ended (signed out, expired, its token revoked, or the gateway restarted); sign in again",
                )
                .into_response();
            };
            let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
            if !safe {
                if !sign_in::origin_matches(req.headers()) {
                    return sign_in::origin_refused().into_response();
                }
                let sent = req
                    .headers()
                    .get(sign_in::CSRF_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if !token_matches(sent, &csrf) {
                    return sign_in::csrf_refused().into_response();
                }
            }
            let id = id.to_string();
            req.extensions_mut()
                .insert(sign_in::Auth::Session { id, csrf });
            grant
        }
    };
    let need = required_scope(req.method(), req.uri().path());
    if !grant.allows(need) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "this token's scopes ({}) do not include {}, which this request needs",
                grant.scope_names().join(", "),
                need.as_str()
            ),
        )
        .into_response();
    }
    req.extensions_mut().insert(grant);
    next.run(req).await
}

/// The scope a `/v1` request needs: reading is `read`; actions are
/// `actions`; the session itself (who am I, sign out) is `read`; everything
/// that changes the fleet or the tokens is `admin`.
fn required_scope(method: &Method, path: &str) -> crate::tokens::Scope {
    use crate::tokens::Scope;
    let path = path.strip_prefix("/v1").unwrap_or(path);
    if path.starts_with("/tokens") || path.starts_with("/audit") {
        return Scope::Admin;
    }
    if path == "/session" {
        return Scope::Read;
    }
    if matches!(*method, Method::GET | Method::HEAD) {
        return Scope::Read;
    }
    if *method == Method::POST && path.starts_with("/devices/") && path.contains("/actions/") {
        return Scope::Actions;
    }
    Scope::Admin
}

pub(crate) use crate::auth::token_matches;

/// Parses a JSON body into an object, or answers 400 saying why.
pub(crate) fn json_object(
    body: &[u8],
) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "the body must be a JSON object",
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the body is not valid JSON: {e}"),
        )),
    }
}

/// Runs blocking registry work off the async workers.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::registry::RegistryError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => Err(ApiError::internal(e)),
    }
}

impl From<crate::registry::RegistryError> for ApiError {
    fn from(e: crate::registry::RegistryError) -> ApiError {
        use crate::registry::RegistryError;
        match e {
            RegistryError::CidrExhausted(net) => ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "tunnel_cidr_exhausted",
                format!("the tunnel network {net} has no free address; delete devices or start with a larger --tunnel-cidr"),
            ),
            RegistryError::Cluster(why) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "cluster_unavailable",
                format!("the cluster's registry cannot take changes now ({why}); connected devices are not affected; retry later"),
            ),
            RegistryError::KeyTaken { uuid } => ApiError::new(
                StatusCode::CONFLICT,
                "public_key_taken",
                format!("this public key belongs to device {uuid:?}; every device needs its own key"),
            )
            .field("public_key"),
            e @ RegistryError::QueueFull { .. } => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "action_queue_full", e.to_string())
            }
            e => ApiError::internal(e),
        }
    }
}

pub(crate) use crate::bus::event::rfc3339;
