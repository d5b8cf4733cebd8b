//! `/v1/devices`: registration (one or a batch), listing, one device,
//! renaming, deletion.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::{blocking, json_object, rfc3339, ApiError, SharedState};
use crate::keys::{decode_key, encode_key};
use crate::registry::{
    validate_name, validate_new_uuid, validate_uuid, Device, DevicePatch, NewDevice, Registered,
    MAX_BATCH,
};
use crate::wg_config;

/// How long a change waits for the fleet reactor to apply it before the
/// API answers (it takes microseconds; this bounds a stuck reactor).
const SETTLE: std::time::Duration = std::time::Duration::from_secs(5);

/// Largest poll interval accepted: a year.
const MAX_POLL_INTERVAL_S: u64 = 365 * 24 * 3600;

/// Validates one registration object; `prefix` names it in errors
/// (`""` for a single registration, `"devices[3]."` in a batch).
/// A device key that can work: not the all-zero key (no handshake ever
/// completes with it) and not the gateway's own public key.
fn usable_key(
    key: &crate::keys::KeyBytes,
    gateway: &crate::keys::KeyBytes,
    field: String,
) -> Result<(), ApiError> {
    if key.iter().all(|b| *b == 0) {
        return Err(ApiError::bad_field(
            field,
            "the all-zero key cannot make a WireGuard handshake; generate the device's key with `wg genkey`",
        ));
    }
    if key == gateway {
        return Err(ApiError::bad_field(
            field,
            "that is the gateway's own public key; the device needs its own (`wg genkey`, then `wg pubkey`)",
        ));
    }
    // A point of small order: every (clamped, so a multiple of 8) scalar
    // maps it to zero, and WireGuard refuses a zero shared secret. One
    // X25519 with a fixed scalar tells (about 50 µs, at registration only).
    if x25519_dalek::x25519([1u8; 32], *key) == [0u8; 32] {
        return Err(ApiError::bad_field(
            field,
            "that key is a point of small order, which can never make a WireGuard handshake; generate the device's key with `wg genkey`",
        ));
    }
    Ok(())
}

fn parse_new_device(
    obj: &Map<String, Value>,
    prefix: &str,
    gateway: &crate::keys::KeyBytes,
) -> Result<NewDevice, ApiError> {
    for k in obj.keys() {
        if !matches!(k.as_str(), "uuid" | "public_key" | "name") {
            return Err(ApiError::bad_field(
                format!("{prefix}{k}"),
                format!("unknown field {k:?}; a registration takes uuid, public_key and name"),
            ));
        }
    }
    let uuid = match obj.get("uuid") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(ApiError::bad_field(
                format!("{prefix}uuid"),
                "uuid must be a string",
            ))
        }
        None => {
            return Err(ApiError::bad_field(
                format!("{prefix}uuid"),
                "uuid is required",
            ))
        }
    };
    validate_new_uuid(&uuid).map_err(|m| ApiError::bad_field(format!("{prefix}uuid"), m))?;
    let public_key = match obj.get("public_key") {
        Some(Value::String(s)) => decode_key(s)
            .map_err(|e| ApiError::bad_field(format!("{prefix}public_key"), e.to_string()))?,
        Some(_) => {
            return Err(ApiError::bad_field(
                format!("{prefix}public_key"),
                "public_key must be a string (base64, as `wg pubkey` prints it)",
            ))
        }
        None => {
            return Err(ApiError::bad_field(
                format!("{prefix}public_key"),
                "public_key is required",
            ))
        }
    };
    usable_key(&public_key, gateway, format!("{prefix}public_key"))?;
    let name = parse_name(obj.get("name"), prefix)?;
    Ok(NewDevice {
        uuid,
        public_key,
        name,
    })
}

fn parse_name(v: Option<&Value>, prefix: &str) -> Result<Option<String>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            validate_name(s).map_err(|m| ApiError::bad_field(format!("{prefix}name"), m))?;
            Ok(Some(s.clone()))
        }
        Some(_) => Err(ApiError::bad_field(
            format!("{prefix}name"),
            "name must be a string or null",
        )),
    }
}

fn gateway_json(s: &SharedState) -> Value {
    json!({
        "public_key": encode_key(s.path.public_key().as_bytes()),
        "endpoint": s.endpoint,
        "address": s.path.gateway_address().to_string(),
    })
}

fn wg_quick(s: &SharedState, d: &Device) -> String {
    wg_config::render(
        &d.uuid,
        d.address,
        &encode_key(s.path.public_key().as_bytes()),
        &s.endpoint,
        s.path.gateway_address(),
    )
}

/// `heartbeat`, `status`, `status_detail` and `cloudlink_enabled` of a device.
pub(super) fn status_fields(s: &SharedState, d: &Device, m: &mut Map<String, Value>) {
    let Some(v) = s.status.view(&d.uuid) else {
        return;
    };
    m.insert(
        "heartbeat".into(),
        json!({
            "state": v.heartbeat.as_str(),
            "last_at": v.last_heartbeat_ms.map(|ms| rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))),
            "poll_interval_s": v.poll_interval_s,
        }),
    );
    m.insert("status".into(), json!(v.status.name()));
    m.insert("status_detail".into(), json!(v.status.detail()));
    m.insert("cloudlink_enabled".into(), json!(v.cloudlink_enabled));
}

pub(super) fn registration_json(d: &Device) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("uuid".into(), json!(d.uuid));
    m.insert("public_key".into(), json!(encode_key(&d.public_key)));
    m.insert("address".into(), json!(d.address.to_string()));
    m.insert("name".into(), json!(d.name));
    m.insert("app_id".into(), json!(d.app_id));
    m.insert("has_device_api_key".into(), json!(d.has_device_api_key));
    m.insert("rate_limit_kbps".into(), json!(d.rate_limit_kbps));
    m.insert(
        "created_at".into(),
        json!(rfc3339(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(d.created_at_ms as u64)
        )),
    );
    m
}

/// A device's cloudlink: its session here, or (cluster mode) the gateway
/// that holds it, with the counters that gateway last shared (they lag by
/// up to `cluster::counters::PERIOD`).
pub(super) fn cloudlink_json(s: &SharedState, uuid: &str) -> Value {
    // The cluster's ownership record is the truth: a session here that
    // another gateway has taken over (the device moved) is not shown.
    let owner = s
        .cluster
        .as_ref()
        .and_then(|c| c.ownership.owner(uuid))
        .map(|o| o.record);
    let moved_away = owner.as_ref().is_some_and(|o| o.gateway != s.gateway_id);
    let here = s
        .path
        .sessions
        .by_uuid(uuid)
        .map(|x| x.snapshot())
        .filter(|snap| (snap.connected || s.cluster.is_none()) && !moved_away);
    let elsewhere = || owner.clone().filter(|o| o.gateway != s.gateway_id);
    match here {
        None => match elsewhere() {
            Some(o) => {
                let c = s
                    .cluster
                    .as_ref()
                    .and_then(|c| c.counters.get(uuid, &o.gateway))
                    .unwrap_or_default();
                let at = |ms: u64| {
                    (ms > 0).then(|| {
                        rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
                    })
                };
                json!({
                    "connected": true,
                    "gateway": o.gateway,
                    "since": o.since,
                    "endpoint": o.endpoint,
                    "last_handshake_at": at(c.last_handshake_ms),
                    "last_packet_at": at(c.last_packet_ms),
                    "rx_bytes": c.rx_bytes,
                    "tx_bytes": c.tx_bytes,
                    "rx_packets": c.rx_packets,
                    "tx_packets": c.tx_packets,
                })
            }
            None => json!({
                "connected": false,
                "gateway": null,
                "since": null,
                "endpoint": null,
                "last_handshake_at": null,
                "last_packet_at": null,
                "rx_bytes": 0,
                "tx_bytes": 0,
                "rx_packets": 0,
                "tx_packets": 0,
            }),
        },
        Some(snap) => {
            json!({
                "connected": snap.connected,
                "gateway": snap.connected.then_some(s.gateway_id.as_str()),
                "since": snap.since.map(rfc3339),
                "endpoint": snap.endpoint.to_string(),
                "last_handshake_at": snap.last_handshake_at.map(rfc3339),
                "last_packet_at": snap.last_packet_at.map(rfc3339),
                "rx_bytes": snap.rx_bytes,
                "tx_bytes": snap.tx_bytes,
                "rx_packets": snap.rx_packets,
                "tx_packets": snap.tx_packets,
            })
        }
    }
}

fn full_device_json(s: &SharedState, d: &Device) -> Value {
    let mut m = registration_json(d);
    status_fields(s, d, &mut m);
    m.insert("gateway".into(), gateway_json(s));
    m.insert("wg_quick".into(), json!(wg_quick(s, d)));
    m.insert("cloudlink".into(), cloudlink_json(s, &d.uuid));
    Value::Object(m)
}

fn conflict_uuid(uuid: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "uuid_taken",
        format!(
            "device {uuid:?} is registered with another public key; delete it first to re-key it"
        ),
    )
    .field("uuid")
}

fn conflict_key(other: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "public_key_taken",
        format!("this public key belongs to device {other:?}; every device needs its own key"),
    )
    .field("public_key")
}

/// `POST /v1/devices`
pub async fn register(State(s): State<SharedState>, body: Bytes) -> Result<Response, ApiError> {
    let obj = json_object(&body)?;
    let dev = parse_new_device(&obj, "", s.path.public_key().as_bytes())?;
    let fleet = s.fleet.clone();
    let changed = blocking(move || fleet.register(dev)).await?;
    s.fleet.settled(changed.cursor, SETTLE).await;
    match changed.value {
        Registered::Created(d) => {
            Ok((StatusCode::CREATED, Json(full_device_json(&s, &d))).into_response())
        }
        Registered::Existing(d) => {
            Ok((StatusCode::OK, Json(full_device_json(&s, &d))).into_response())
        }
        Registered::UuidTaken => Err(conflict_uuid(obj["uuid"].as_str().unwrap_or_default())),
        Registered::KeyTaken { uuid } => Err(conflict_key(&uuid)),
    }
}

/// `POST /v1/devices/batch`: `{"devices": [...]}`, up to 10,000, one
/// transaction; answers per device, in order.
pub async fn register_batch(
    State(s): State<SharedState>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let mut obj = json_object(&body)?;
    if let Some(k) = obj.keys().find(|k| k.as_str() != "devices") {
        return Err(ApiError::bad_field(
            k.clone(),
            format!("unknown field {k:?}; a batch takes devices"),
        ));
    }
    let items = match obj.remove("devices") {
        Some(Value::Array(a)) => a,
        Some(_) => return Err(ApiError::bad_field("devices", "devices must be an array")),
        None => return Err(ApiError::bad_field("devices", "devices is required")),
    };
    if items.len() > MAX_BATCH {
        return Err(ApiError::bad_field(
            "devices",
            format!(
                "a batch holds at most {MAX_BATCH} devices, got {}",
                items.len()
            ),
        ));
    }
    // Validate everything first; invalid entries are answered without
    // touching the registry, valid ones go in together.
    let mut results: Vec<Option<Value>> = vec![None; items.len()];
    let mut valid = Vec::with_capacity(items.len());
    let mut positions = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let prefix = format!("devices[{i}].");
        let parsed = match item {
            Value::Object(o) => parse_new_device(o, &prefix, s.path.public_key().as_bytes()),
            _ => Err(ApiError::bad_field(
                format!("devices[{i}]"),
                "each device must be an object",
            )),
        };
        match parsed {
            Ok(d) => {
                valid.push(d);
                positions.push(i);
            }
            Err(e) => {
                results[i] = Some(json!({
                    "uuid": item.get("uuid"),
                    "status": e.status.as_u16(),
                    "error": e,
                }))
            }
        }
    }
    let uuids: Vec<String> = valid.iter().map(|d| d.uuid.clone()).collect();
    let fleet = s.fleet.clone();
    let changed = blocking(move || fleet.register_batch(valid)).await?;
    s.fleet.settled(changed.cursor, SETTLE).await;
    for ((pos, uuid), outcome) in positions.into_iter().zip(uuids).zip(changed.value) {
        results[pos] = Some(match outcome {
            Registered::Created(d) => {
                json!({"uuid": d.uuid, "status": 201, "address": d.address.to_string()})
            }
            Registered::Existing(d) => {
                json!({"uuid": d.uuid, "status": 200, "address": d.address.to_string()})
            }
            Registered::UuidTaken => {
                let e = conflict_uuid(&uuid).field(format!("devices[{pos}].uuid"));
                json!({"uuid": uuid, "status": 409, "error": e})
            }
            Registered::KeyTaken { uuid: other } => {
                let e = conflict_key(&other).field(format!("devices[{pos}].public_key"));
                json!({"uuid": uuid, "status": 409, "error": e})
            }
        });
    }
    let created = results
        .iter()
        .filter(|r| r.as_ref().and_then(|v| v["status"].as_u64()) == Some(201))
        .count();
    Ok(Json(json!({
        "created": created,
        "results": results,
        "gateway": gateway_json(&s),
    }))
    .into_response())
}

fn check_path_uuid(uuid: &str) -> Result<(), ApiError> {
    validate_uuid(uuid).map_err(|m| ApiError::bad_field("uuid", m))
}

/// `GET /v1/devices/{uuid}/wg-quick`: the device's wg-quick configuration
/// as a file (`text/plain`), its private key left as a placeholder for the
/// device to fill in: `curl ... > wg0.conf` on the device.
pub async fn wg_quick_text(
    State(s): State<SharedState>,
    Path(uuid): Path<String>,
) -> Result<axum::response::Response, ApiError> {
    check_path_uuid(&uuid)?;
    let registry = s.registry.clone();
    let u = uuid.clone();
    match blocking(move || registry.get(&u)).await? {
        Some(d) => Ok(axum::response::IntoResponse::into_response((
            [
                (
                    axum::http::header::CONTENT_TYPE,
                    "text/plain; charset=utf-8",
                ),
                (axum::http::header::CACHE_CONTROL, "no-store"),
            ],
            wg_quick(&s, &d),
        ))),
        None => Err(ApiError::unknown_device(&uuid)),
    }
}

/// `GET /v1/devices/{uuid}`
pub async fn get_one(
    State(s): State<SharedState>,
    Path(uuid): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_path_uuid(&uuid)?;
    let registry = s.registry.clone();
    let u = uuid.clone();
    match blocking(move || registry.get(&u)).await? {
        Some(d) => Ok(Json(full_device_json(&s, &d))),
        None => Err(ApiError::unknown_device(&uuid)),
    }
}

/// The highest per-device limit (100 Gbit/s): beyond, a number is a typo.
const MAX_RATE_LIMIT_KBPS: u64 = 100_000_000;

/// `PATCH /v1/devices/{uuid}`: mutable fields (`name`, `poll_interval_s`,
/// `cloudlink_enabled`, `device_api_key`, `app_id`, `rate_limit_kbps` (kbit/s
/// each way, 0 for none, null for the gateway's default; applies at once to
/// open streams), and `public_key`: a key
/// change, which cuts off the session made with the old key; the device
/// keeps its uuid, address and status).
pub async fn patch(
    State(s): State<SharedState>,
    Path(uuid): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    check_path_uuid(&uuid)?;
    let obj = json_object(&body)?;
    for k in obj.keys() {
        if !matches!(
            k.as_str(),
            "name"
                | "poll_interval_s"
                | "cloudlink_enabled"
                | "device_api_key"
                | "app_id"
                | "rate_limit_kbps"
                | "public_key"
        ) {
            let hint = if matches!(k.as_str(), "uuid" | "address") {
                format!("{k} cannot be changed; delete the device and register it again")
            } else {
                format!(
                    "unknown field {k:?}; PATCH takes name, poll_interval_s, cloudlink_enabled, device_api_key, app_id, rate_limit_kbps and public_key"
                )
            };
            return Err(ApiError::bad_field(k.clone(), hint));
        }
    }
    let mut patch = DevicePatch::default();
    match obj.get("public_key") {
        None => {}
        Some(Value::String(k)) => {
            let key =
                decode_key(k).map_err(|e| ApiError::bad_field("public_key", e.to_string()))?;
            usable_key(&key, s.path.public_key().as_bytes(), "public_key".into())?;
            patch.public_key = Some(key)
        }
        Some(_) => {
            return Err(ApiError::bad_field(
                "public_key",
                "public_key must be a string (base64, as `wg pubkey` prints it)",
            ))
        }
    }
    if obj.contains_key("name") {
        patch.name = Some(parse_name(obj.get("name"), "")?);
    }
    if let Some(v) = obj.get("poll_interval_s") {
        patch.poll_interval_s = Some(match v {
            Value::Null => None,
            v => Some(parse_poll_interval(v)?),
        });
    }
    match obj.get("cloudlink_enabled") {
        None => {}
        Some(Value::Bool(b)) => patch.cloudlink_enabled = Some(*b),
        Some(_) => {
            return Err(ApiError::bad_field(
                "cloudlink_enabled",
                "cloudlink_enabled must be true or false",
            ))
        }
    }
    match obj.get("device_api_key") {
        None => {}
        Some(Value::Null) => patch.device_api_key = Some(None),
        Some(Value::String(k))
            if !k.is_empty() && k.len() <= 256 && k.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            patch.device_api_key = Some(Some(k.clone()))
        }
        Some(_) => {
            return Err(ApiError::bad_field(
                "device_api_key",
                "device_api_key must be 1 to 256 printable characters, or null to clear it",
            ))
        }
    }
    match obj.get("app_id") {
        None => {}
        Some(Value::Null) => patch.app_id = Some(None),
        Some(v) => match v.as_u64().filter(|n| *n >= 1 && *n <= u32::MAX as u64) {
            Some(n) => patch.app_id = Some(Some(n as u32)),
            None => {
                return Err(ApiError::bad_field(
                    "app_id",
                    "app_id must be a positive whole number, or null",
                ))
            }
        },
    }
    match obj.get("rate_limit_kbps") {
        None => {}
        Some(Value::Null) => patch.rate_limit_kbps = Some(None),
        Some(v) => match v.as_u64().filter(|n| *n <= MAX_RATE_LIMIT_KBPS) {
            Some(n) => patch.rate_limit_kbps = Some(Some(n as u32)),
            None => {
                return Err(ApiError::bad_field(
                    "rate_limit_kbps",
                    format!("rate_limit_kbps must be a whole number of kbit/s from 0 (no limit) to {MAX_RATE_LIMIT_KBPS}, or null for the gateway's default"),
                ))
            }
        },
    }
    let fleet = s.fleet.clone();
    let u = uuid.clone();
    let changed = blocking(move || fleet.update(&u, &patch)).await?;
    s.fleet.settled(changed.cursor, SETTLE).await;
    match changed.value {
        Some(d) => Ok(Json(full_device_json(&s, &d))),
        None => Err(ApiError::unknown_device(&uuid)),
    }
}

/// `DELETE /v1/devices/{uuid}`: the registration goes (fsync'd) and
/// `device.deleted` is published; the fleet reactor drops the session and
/// publishes `link.down` (`revoked`) if it was up, before the answer.
pub async fn delete(
    State(s): State<SharedState>,
    Path(uuid): Path<String>,
    grant: Option<axum::Extension<crate::tokens::Grant>>,
) -> Result<StatusCode, ApiError> {
    check_path_uuid(&uuid)?;
    let fleet = s.fleet.clone();
    let u = uuid.clone();
    let changed = blocking(move || fleet.delete(&u)).await?;
    s.fleet.settled(changed.cursor, SETTLE).await;
    match changed.value {
        Some(_) => {
            s.audit.record(
                crate::audit::Kind::Device,
                grant.as_ref().and_then(|g| g.token_id.as_deref()),
                Some(&uuid),
                crate::audit_detail! { "change" => "deleted" },
            );
            Ok(StatusCode::NO_CONTENT)
        }
        None => Err(ApiError::unknown_device(&uuid)),
    }
}

/// `DELETE /v1/devices?prefix=`: deletes every device whose uuid starts
/// with a non-empty prefix (admin); `{"deleted": n, "prefix"}`. Cleaning up
/// after a load test or a retired batch of devices.
pub async fn delete_by_prefix(
    State(s): State<SharedState>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
    grant: Option<axum::Extension<crate::tokens::Grant>>,
) -> Result<Json<Value>, ApiError> {
    if let Some(k) = q.keys().find(|k| k.as_str() != "prefix") {
        return Err(ApiError::bad_field(
            k.clone(),
            format!("unknown query parameter {k:?}; a bulk delete takes prefix"),
        ));
    }
    let prefix = q.get("prefix").cloned().unwrap_or_default();
    if prefix.is_empty() {
        return Err(ApiError::bad_field(
            "prefix",
            "a bulk delete needs a non-empty prefix (DELETE /v1/devices?prefix=lg-); one device is DELETE /v1/devices/{uuid}",
        ));
    }
    let fleet = s.fleet.clone();
    let p = prefix.clone();
    let changed = blocking(move || fleet.delete_prefix(&p)).await?;
    s.fleet.settled(changed.cursor, SETTLE).await;
    if changed.value > 0 {
        s.audit.record(
            crate::audit::Kind::Device,
            grant.as_ref().and_then(|g| g.token_id.as_deref()),
            None,
            crate::audit_detail! {
                "change" => "deleted_by_prefix",
                "prefix" => prefix,
                "count" => changed.value,
            },
        );
    }
    Ok(Json(json!({ "deleted": changed.value, "prefix": prefix })))
}

fn parse_poll_interval(v: &Value) -> Result<u32, ApiError> {
    match v.as_u64() {
        Some(n) if (1..=MAX_POLL_INTERVAL_S).contains(&n) => Ok(n as u32),
        _ => Err(ApiError::bad_field(
            "poll_interval_s",
            format!(
                "poll_interval_s must be a whole number of seconds from 1 to {MAX_POLL_INTERVAL_S}"
            ),
        )),
    }
}

fn heartbeat_json(s: &SharedState, d: &Device) -> Value {
    let mut m = Map::new();
    m.insert("uuid".into(), json!(d.uuid));
    status_fields(s, d, &mut m);
    m.insert(
        "cloudlink".into(),
        json!({"connected": s.path.sessions.by_uuid(&d.uuid).is_some_and(|x| x.is_connected())}),
    );
    Value::Object(m)
}

/// `POST /v1/devices/{uuid}/heartbeat`, optional body `{"poll_interval_s": N}`
/// (which becomes the device's poll interval).
pub async fn heartbeat(
    State(s): State<SharedState>,
    Path(uuid): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    check_path_uuid(&uuid)?;
    let mut interval = None;
    if !body.iter().all(u8::is_ascii_whitespace) {
        let obj = json_object(&body)?;
        for k in obj.keys() {
            if k != "poll_interval_s" {
                return Err(ApiError::bad_field(
                    k.clone(),
                    format!("unknown field {k:?}; a heartbeat takes poll_interval_s"),
                ));
            }
        }
        if let Some(v) = obj.get("poll_interval_s") {
            interval = Some(parse_poll_interval(v)?);
        }
    }
    let registry = s.registry.clone();
    let u = uuid.clone();
    let Some(mut d) = blocking(move || registry.get(&u)).await? else {
        return Err(ApiError::unknown_device(&uuid));
    };
    // A new interval is a setting: changed through the fleet (stored, and
    // `device.updated` published) before the heartbeat counts. The same
    // interval again changes nothing and publishes nothing.
    if let Some(i) = interval.filter(|i| d.status.poll_interval_s != Some(*i)) {
        let fleet = s.fleet.clone();
        let patch = DevicePatch {
            poll_interval_s: Some(Some(i)),
            ..Default::default()
        };
        let u = uuid.clone();
        let changed = blocking(move || fleet.update(&u, &patch)).await?;
        s.fleet.settled(changed.cursor, SETTLE).await;
        match changed.value {
            Some(updated) => d = updated,
            None => return Err(ApiError::unknown_device(&uuid)),
        }
    }
    s.status.heartbeat(&d.uuid);
    Ok(Json(heartbeat_json(&s, &d)))
}

/// `POST /v1/heartbeats` `{"uuids": [...]}`: heartbeats forwarded in bulk.
/// Unknown uuids are reported back; the others are applied.
pub async fn heartbeats(
    State(s): State<SharedState>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let mut obj = json_object(&body)?;
    if let Some(k) = obj.keys().find(|k| k.as_str() != "uuids") {
        return Err(ApiError::bad_field(
            k.clone(),
            format!("unknown field {k:?}; a batch takes uuids"),
        ));
    }
    let uuids: Vec<String> = match obj.remove("uuids") {
        Some(Value::Array(a)) => {
            if a.len() > MAX_BATCH {
                return Err(ApiError::bad_field(
                    "uuids",
                    format!("a batch holds at most {MAX_BATCH} uuids, got {}", a.len()),
                ));
            }
            a.into_iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(u) => Ok(u),
                    _ => Err(ApiError::bad_field(
                        format!("uuids[{i}]"),
                        "each uuid must be a string",
                    )),
                })
                .collect::<Result<_, _>>()?
        }
        Some(_) => {
            return Err(ApiError::bad_field(
                "uuids",
                "uuids must be an array of strings",
            ))
        }
        None => return Err(ApiError::bad_field("uuids", "uuids is required")),
    };
    // The status tracker holds exactly the registered devices.
    let mut applied = 0usize;
    let mut unknown = Vec::new();
    for uuid in uuids {
        match s.status.heartbeat(&uuid) {
            Some(_) => applied += 1,
            None => unknown.push(uuid),
        }
    }
    Ok(Json(json!({"applied": applied, "unknown": unknown})))
}
