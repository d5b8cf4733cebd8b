//! `POST /v1/devices/{uuid}/actions/{action}`: immediate actions delivered
//! now over cloudlink (see `crate::actions`).
//!
//! Every answer says who gave it: `X-Cloudlink-Source: device` when the
//! device's supervisor answered (its status code, and
//! `{"device_status", "device_body"}`), `X-Cloudlink-Source: gateway` when
//! the gateway answers itself (the JSON error shape). A device's status
//! passes through only from an allow-list (2xx but 204, 4xx but 401 and
//! 407); any other answer is 502 `device_error` from the gateway, with the
//! device's status and body inside, so a device can never pose as the
//! gateway refusing the caller's credentials.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::{blocking, json_object, ApiError, SharedState};
use crate::action_queue::{Inserted, NewAction};
use crate::actions::{deliver_counted, supervisor_call, Action, DeliveryError, Params};

/// Who gave an answer: `device` or `gateway` (`X-Cloudlink-Source`).
fn source_of(r: &Response) -> String {
    r.headers()
        .get("x-cloudlink-source")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("gateway")
        .to_owned()
}

fn gateway(e: ApiError) -> Response {
    let mut r = e.into_response();
    r.headers_mut()
        .insert("x-cloudlink-source", HeaderValue::from_static("gateway"));
    r
}

/// A service name as it may reach a device's hook (an environment
/// variable, often a command's argument): 1 to 128 of `[A-Za-z0-9._-]`, not
/// starting with `-` (it would read as an option).
fn valid_service_name(n: &str) -> bool {
    (1..=128).contains(&n.len())
        && !n.starts_with('-')
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Longest `queue_ttl`: a week.
const MAX_QUEUE_TTL_S: u64 = 7 * 24 * 3600;

pub async fn action(
    State(s): State<SharedState>,
    Path((uuid, action)): Path<(String, String)>,
    Query(q): Query<std::collections::HashMap<String, String>>,
    grant: Option<axum::Extension<crate::tokens::Grant>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let r = action_inner(&s, &uuid, &action, &q, &headers, &body).await;
    // Every action asked for, with its answer.
    let source = source_of(&r);
    s.audit.record(
        crate::audit::Kind::Action,
        grant.as_ref().and_then(|g| g.token_id.as_deref()),
        Some(&uuid),
        crate::audit_detail! {
            "action" => action,
            "status" => r.status().as_u16(),
            "source" => source,
        },
    );
    r
}

async fn action_inner(
    s: &SharedState,
    uuid: &str,
    action: &str,
    q: &std::collections::HashMap<String, String>,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    if s.draining.load(std::sync::atomic::Ordering::Acquire) {
        return gateway(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "this gateway is stopping and takes no new actions; retry (through another gateway of the cluster)",
        ));
    }
    if let Some(r) = forward_to_owner(s, uuid, action, q, headers, body).await {
        return r;
    }
    match run(s, uuid, action, q, headers, body).await {
        Ok(r) => r,
        Err(e) => gateway(e),
    }
}

/// Cluster mode: a device another gateway holds gets the action through
/// that gateway (`cluster::routing`); its answer comes back as it is.
/// `None`: run it here.
async fn forward_to_owner(
    s: &SharedState,
    uuid: &str,
    action: &str,
    query: &std::collections::HashMap<String, String>,
    headers: &HeaderMap,
    body: &[u8],
) -> Option<Response> {
    use crate::cluster::routing::{action_subject, ForwardedAction, ForwardedAnswer};
    let c = s.cluster.as_ref()?;
    let owner = c.ownership.owner(uuid)?.record.gateway;
    // A body that is not text is refused here, with the usual 400.
    let text = std::str::from_utf8(body).ok()?;
    if owner == s.gateway_id {
        return None;
    }
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let mut req = ForwardedAction::new(&s.gateway_id, uuid, action);
    req.query = query.clone();
    req.device_api_key = header("x-device-api-key");
    req.idempotency_key = header("idempotency-key");
    req.body = text.to_owned();
    let payload = serde_json::to_vec(&req).unwrap_or_default();
    s.metrics.cluster_forwarded("action");
    // The owner's own delivery takes up to the action timeout.
    let wait = s.action_timeout + std::time::Duration::from_secs(5);
    let asked = c
        .client
        .send_request(
            action_subject(&owner),
            async_nats::Request::new()
                .payload(payload.into())
                .timeout(Some(wait)),
        )
        .await;
    tracing::info!(device = %uuid, action, %owner, ok = asked.is_ok(), "action forwarded to the device's gateway");
    Some(match asked {
        Ok(m) => match ForwardedAnswer::parse(&m.payload) {
            Some(a) => forwarded_answer(a),
            None => gateway(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "owner_bad_answer",
                format!("gateway {owner}, which holds device {uuid}, answered the forwarded action with something that is not an answer"),
            )),
        },
        Err(e) => gateway(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "owner_unreachable",
            format!("device {uuid} is connected through gateway {owner}, which did not answer the forwarded action ({e}); retry, or queue it with queue_ttl"),
        )),
    })
}

/// The owner's answer, as this gateway gives it.
fn forwarded_answer(a: crate::cluster::routing::ForwardedAnswer) -> Response {
    let status = StatusCode::from_u16(a.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let source = if a.source == "device" {
        "device"
    } else {
        "gateway"
    };
    let mut r = (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        a.body,
    )
        .into_response();
    r.headers_mut()
        .insert("x-cloudlink-source", HeaderValue::from_static(source));
    r
}

/// Answers the actions other gateways forward to this one, for as long as
/// the API state lives (cluster mode).
pub async fn serve_forwarded(
    s: std::sync::Weak<super::ApiState>,
    client: async_nats::Client,
    me: String,
) {
    use crate::cluster::routing::{action_subject, ForwardedAction, ForwardedAnswer};
    use futures_util::StreamExt;
    let mut sub = match client.subscribe(action_subject(&me)).await {
        Ok(sub) => sub,
        Err(e) => {
            tracing::error!(error = %e, "cannot take actions forwarded by other gateways");
            return;
        }
    };
    while let Some(m) = sub.next().await {
        let Some(state) = s.upgrade() else { return };
        let Some(reply) = m.reply.clone() else {
            continue;
        };
        let client = client.clone();
        tokio::spawn(async move {
            let answer = match ForwardedAction::parse(&m.payload) {
                None => ForwardedAnswer::new(
                    400,
                    "gateway",
                    json!({"error": "bad_request", "message": "a forwarded action of an unknown format"}).to_string(),
                ),
                Some(req) => {
                    let mut headers = HeaderMap::new();
                    for (name, value) in [
                        ("x-device-api-key", &req.device_api_key),
                        ("idempotency-key", &req.idempotency_key),
                    ] {
                        if let Some(v) = value.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
                            headers.insert(name, v);
                        }
                    }
                    tracing::info!(device = %req.uuid, action = %req.action, by = %req.by, "an action forwarded by another gateway");
                    // Run here, never forwarded again: one hop.
                    let r = match run(&state, &req.uuid, &req.action, &req.query, &headers, req.body.as_bytes()).await {
                        Ok(r) => r,
                        Err(e) => gateway(e),
                    };
                    let status = r.status().as_u16();
                    let source = source_of(&r);
                    let body = axum::body::to_bytes(r.into_body(), 1 << 20)
                        .await
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default();
                    ForwardedAnswer::new(status, &source, body)
                }
            };
            let payload = serde_json::to_vec(&answer).unwrap_or_default();
            if let Err(e) = client.publish(reply, payload.into()).await {
                tracing::warn!(error = %e, "could not answer a forwarded action");
            }
        });
    }
}

/// `GET /v1/actions/{id}`: a queued (or remembered) action and its outcome.
pub async fn get_action(
    State(s): State<SharedState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if id.len() != 24 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::bad_field(
            "id",
            "an action id is 24 hexadecimal characters",
        ));
    }
    match s.action_queue.lookup(&id).await? {
        Some(a) => Ok(Json(a.to_json())),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "action_not_found",
            "no action with that id",
        )
        .field("id")),
    }
}

/// The device's answer: its own status when it may pass through
/// (`crate::actions::status_passes_through`), otherwise 502
/// `device_error` from the gateway with the device's status and body inside.
fn device_answer(uuid: &str, status: u16, body: &Value) -> Response {
    if !crate::actions::status_passes_through(status) {
        let mut r = (
            StatusCode::BAD_GATEWAY,
            Json(json!({
                "error": "device_error",
                "message": format!("device {uuid} answered the action with HTTP {status}"),
                "device_status": status,
                "device_body": body,
            })),
        )
            .into_response();
        r.headers_mut()
            .insert("x-cloudlink-source", HeaderValue::from_static("gateway"));
        return r;
    }
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut r = (
        code,
        Json(json!({"device_status": status, "device_body": body})),
    )
        .into_response();
    r.headers_mut()
        .insert("x-cloudlink-source", HeaderValue::from_static("device"));
    r
}

/// The answer for a request whose idempotency key an earlier one used:
/// that one's device answer, or its id and state.
fn earlier(uuid: &str, first: &crate::action_queue::StoredAction) -> Response {
    match (
        first.state.as_str(),
        first.device_status,
        &first.device_body,
    ) {
        ("completed", Some(st), Some(b)) => device_answer(uuid, st, b),
        _ => accepted(first),
    }
}

fn accepted(a: &crate::action_queue::StoredAction) -> Response {
    let mut r = (
        StatusCode::ACCEPTED,
        Json(json!({"id": a.id, "state": a.state})),
    )
        .into_response();
    r.headers_mut()
        .insert("x-cloudlink-source", HeaderValue::from_static("gateway"));
    r
}

async fn run(
    s: &SharedState,
    uuid: &str,
    action: &str,
    query: &std::collections::HashMap<String, String>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    for k in query.keys() {
        if k != "queue_ttl" {
            return Err(ApiError::bad_field(
                k.clone(),
                format!("unknown query parameter {k:?}; an action takes queue_ttl"),
            ));
        }
    }
    let queue_ttl = match query.get("queue_ttl") {
        None => None,
        Some(v) => match v.parse::<u64>() {
            Ok(n) if (1..=MAX_QUEUE_TTL_S).contains(&n) => Some(std::time::Duration::from_secs(n)),
            _ => {
                return Err(ApiError::bad_field(
                    "queue_ttl",
                    format!("queue_ttl is a whole number of seconds from 1 to {MAX_QUEUE_TTL_S}"),
                ))
            }
        },
    };
    let idempotency = match headers.get("idempotency-key").map(|v| v.to_str()) {
        None => None,
        Some(Ok(k)) if !k.is_empty() && k.len() <= 255 => Some(k.to_owned()),
        Some(_) => {
            return Err(ApiError::bad_field(
                "Idempotency-Key",
                "Idempotency-Key must be 1 to 255 visible ASCII characters",
            ))
        }
    };
    crate::registry::validate_uuid(uuid).map_err(|m| ApiError::bad_field("uuid", m))?;
    let action = Action::parse(action).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "unknown_action",
            format!(
                "{action:?} is not an action; actions are {}",
                Action::NAMES.join(", ")
            ),
        )
        .field("action")
    })?;
    let mut params = Params::default();
    let mut app_given = None;
    if !body.iter().all(u8::is_ascii_whitespace) {
        let obj = json_object(body)?;
        for (k, v) in &obj {
            match (k.as_str(), v) {
                ("force", Value::Bool(b)) => params.force = *b,
                ("force", Value::Null) => {}
                ("force", _) => {
                    return Err(ApiError::bad_field("force", "force must be true or false"))
                }
                ("app_id", Value::Null) => {}
                ("app_id", v) => {
                    app_given = Some(
                        v.as_u64()
                            .filter(|n| *n >= 1 && *n <= u32::MAX as u64)
                            .ok_or_else(|| {
                                ApiError::bad_field(
                                    "app_id",
                                    "app_id must be a positive whole number",
                                )
                            })? as u32,
                    )
                }
                ("service_name", Value::String(n)) if valid_service_name(n) => {
                    params.service_name = Some(n.clone())
                }
                ("service_name", Value::Null) => {}
                ("service_name", _) => {
                    return Err(ApiError::bad_field(
                        "service_name",
                        "service_name is 1 to 128 of A-Z a-z 0-9 . _ - and does not start with -",
                    ))
                }
                (k, _) => {
                    return Err(ApiError::bad_field(
                        k.to_owned(),
                        format!(
                            "unknown field {k:?}; an action takes force, app_id and service_name"
                        ),
                    ))
                }
            }
        }
    }
    let registry = s.registry.clone();
    let u = uuid.to_owned();
    let Some((stored_key, stored_app)) = blocking(move || registry.action_defaults(&u)).await?
    else {
        return Err(ApiError::unknown_device(uuid));
    };
    params.app_id = app_given.or(stored_app);
    // Complete parameters, checked before anything is queued or sent.
    let (path, call) = supervisor_call(action, &params)
        .map_err(|(field, message)| ApiError::bad_field(field, message))?;
    let key = headers
        .get("x-device-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(stored_key);
    // A retried request gets the first one's action, never a second delivery.
    if let Some(k) = &idempotency {
        if let Some(first) = s.action_queue.find_idempotent(uuid, k).await? {
            return Ok(earlier(uuid, &first));
        }
    }
    let online = s
        .path
        .sessions
        .by_uuid(uuid)
        .is_some_and(|x| x.is_connected());
    if let (Some(ttl), false) = (queue_ttl, online) {
        let new = NewAction {
            device: uuid.to_owned(),
            action,
            params: params.clone(),
            api_key: key.clone(),
            state: "queued",
            ttl,
            idempotency_key: idempotency.clone(),
        };
        let stored = match s.action_queue.add(new).await? {
            Inserted::New(a) => a,
            Inserted::Existing(first) => return Ok(earlier(uuid, &first)),
        };
        tracing::info!(device = %uuid, action = action.name(), id = %stored.id, "action queued");
        s.metrics.action(action.name(), "queued");
        return Ok(accepted(&stored));
    }
    // With an idempotency key, the action is recorded before it is sent: a
    // concurrent retry (on any gateway) finds it instead of sending again.
    let reserved = match &idempotency {
        None => None,
        Some(i) => match s
            .action_queue
            .add(NewAction {
                device: uuid.to_owned(),
                action,
                params: params.clone(),
                api_key: None,
                state: "delivering",
                ttl: std::time::Duration::ZERO,
                idempotency_key: Some(i.clone()),
            })
            .await?
        {
            Inserted::New(a) => Some(a.id.clone()),
            Inserted::Existing(first) => return Ok(earlier(uuid, &first)),
        },
    };
    tracing::info!(device = %uuid, action = action.name(), "delivering an action");
    let result = deliver_counted(
        &s.relay,
        &s.metrics,
        uuid,
        action,
        (&path, &call),
        key.as_deref(),
        s.action_timeout,
        false,
    )
    .await;
    if let Some(id) = &reserved {
        // Nothing reached the device when the link was down, the device is
        // gone or its supervisor refused the connection: the key may be
        // used again. Otherwise the outcome is kept for the retries.
        let outcome = match &result {
            Ok(a) => Some(("completed", Some((a.status, &a.body)))),
            Err(
                DeliveryError::Unavailable
                | DeliveryError::UnknownDevice
                | DeliveryError::Unreachable,
            ) => None,
            Err(_) => Some(("failed", None)),
        };
        let (state, answer) = match outcome {
            Some((st, answer)) => (Some(st), answer),
            None => (None, None),
        };
        if let Err(e) = s.action_queue.settle(uuid, id, state, answer).await {
            tracing::warn!(device = %uuid, id = %id, error = %e, "could not record an action's outcome");
        }
    }
    match result {
        Ok(answer) => Ok(device_answer(uuid, answer.status, &answer.body)),
        Err(DeliveryError::UnknownDevice) => Err(ApiError::unknown_device(uuid)),
        Err(DeliveryError::Unavailable) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "cloudlink_unavailable",
            format!("device {uuid}'s cloudlink is down: immediate actions need cloudlink and cannot be delivered now"),
        )),
        Err(DeliveryError::Unreachable) => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "device_unreachable",
            format!("device {uuid} refused the connection to its supervisor API (port {})", crate::actions::SUPERVISOR_PORT),
        )),
        Err(DeliveryError::NoConnection) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "device_timeout",
            format!(
                "device {uuid} did not accept a connection to its supervisor API (port {}) within {} s; it may be off or unplugged although its cloudlink has not timed out yet",
                crate::actions::SUPERVISOR_PORT,
                s.relay.connect_timeout.as_secs_f32()
            ),
        )),
        Err(DeliveryError::Timeout) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "device_timeout",
            format!("device {uuid} did not answer the action within {} s", s.action_timeout.as_secs_f32()),
        )),
        Err(DeliveryError::Busy(why)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_streams",
            why,
        )),
        Err(DeliveryError::BadAnswer(what)) => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "device_bad_answer",
            format!("device {uuid} answered something that is not HTTP: {what}"),
        )),
    }
}
