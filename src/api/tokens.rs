//! `/v1/tokens`: scoped tokens (`crate::tokens`), managed with an `admin`
//! token. The secret is in the creation's answer only.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::{json_object, ApiError, SharedState};
use crate::tokens::{Grant, Scope, TokenError};
use axum::Extension;

/// Longest `expires_in_s`: ten years.
const MAX_EXPIRES_IN_S: u64 = 10 * 365 * 24 * 3600;

/// `POST /v1/tokens` `{"name", "scopes": [...], "expires_in_s"?}`.
pub async fn create(
    State(s): State<SharedState>,
    who: Option<Extension<Grant>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let obj = json_object(&body)?;
    for k in obj.keys() {
        if !matches!(k.as_str(), "name" | "scopes" | "expires_in_s") {
            return Err(ApiError::bad_field(
                k.clone(),
                format!("unknown field {k:?}; a token takes name, scopes and expires_in_s"),
            ));
        }
    }
    let name = match obj.get("name") {
        Some(Value::String(n))
            if !n.is_empty() && crate::registry::validate_name(n).is_ok() =>
        {
            n.clone()
        }
        _ => {
            return Err(ApiError::bad_field(
                "name",
                "name is 1 to 128 characters without control or format characters: who or what uses the token",
            ))
        }
    };
    let names = Scope::ALL.map(Scope::as_str).join(", ");
    let scopes = match obj.get("scopes") {
        Some(Value::Array(v)) if !v.is_empty() => {
            let mut bits = 0u8;
            for x in v {
                match x.as_str().and_then(Scope::parse) {
                    Some(sc) => bits |= sc as u8,
                    None => {
                        return Err(ApiError::bad_field(
                            "scopes",
                            format!("{x} is not a scope; scopes are {names}"),
                        ))
                    }
                }
            }
            bits
        }
        _ => {
            return Err(ApiError::bad_field(
                "scopes",
                format!("scopes is a non-empty list of {names}"),
            ))
        }
    };
    let expires_in_ms = match obj.get("expires_in_s") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=MAX_EXPIRES_IN_S).contains(&n) => Some(n as i64 * 1000),
            _ => {
                return Err(ApiError::bad_field(
                    "expires_in_s",
                    format!(
                        "expires_in_s is a whole number of seconds from 1 to {MAX_EXPIRES_IN_S}"
                    ),
                ))
            }
        },
    };
    let (record, token) = s
        .tokens
        .create(&name, scopes, expires_in_ms, crate::registry::now_ms())
        .await
        .map_err(token_error)?;
    tracing::info!(token_id = %record.id, name = %record.name, scopes = scopes, "token created");
    s.audit.record(
        crate::audit::Kind::Token,
        who.as_ref().and_then(|g| g.token_id.as_deref()),
        None,
        crate::audit_detail! {
            "change" => "created",
            "token" => record.id,
            "name" => record.name,
            "scopes" => Grant { token_id: None, scopes }.scope_names(),
        },
    );
    let mut answer = record.to_json();
    answer["token"] = Value::String(token);
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

/// `GET /v1/tokens`: every token, never a secret.
pub async fn list(State(s): State<SharedState>) -> Json<Value> {
    let tokens: Vec<Value> = s.tokens.list().iter().map(|r| r.to_json()).collect();
    Json(json!({ "tokens": tokens }))
}

/// `DELETE /v1/tokens/{id}`: revoked from the next request on.
pub async fn delete(
    State(s): State<SharedState>,
    Path(id): Path<String>,
    who: Option<Extension<Grant>>,
) -> Result<StatusCode, ApiError> {
    match s.tokens.delete(&id).await.map_err(token_error)? {
        true => {
            tracing::info!(token_id = %id, "token revoked");
            s.audit.record(
                crate::audit::Kind::Token,
                who.as_ref().and_then(|g| g.token_id.as_deref()),
                None,
                crate::audit_detail! { "change" => "revoked", "token" => id },
            );
            Ok(StatusCode::NO_CONTENT)
        }
        false => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "token_not_found",
            "no token with that id (the bootstrap token cannot be deleted: change --token or its file)",
        )
        .field("id")),
    }
}

fn token_error(e: TokenError) -> ApiError {
    match e {
        TokenError::TooMany => {
            ApiError::new(StatusCode::CONFLICT, "too_many_tokens", e.to_string())
        }
        TokenError::Store(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "token_store_unavailable",
            e.to_string(),
        ),
    }
}

/// `GET /v1/audit?device=&since=&limit=` (admin): the audit records of this
/// gateway, oldest first from `since` (RFC 3339; default: the retention's
/// start), at most `limit` (1 to 1000, default 100).
pub async fn audit(
    State(s): State<SharedState>,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    for k in q.keys() {
        if !matches!(k.as_str(), "device" | "since" | "limit") {
            return Err(ApiError::bad_field(
                k.clone(),
                format!("unknown query parameter {k:?}; the audit takes device, since and limit"),
            ));
        }
    }
    let since = match q.get("since") {
        None => 0,
        Some(v) => humantime::parse_rfc3339_weak(v)
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as i64)
            .ok_or_else(|| {
                ApiError::bad_field(
                    "since",
                    "since is a time in RFC 3339, e.g. 2026-12-01T00:00:00Z",
                )
            })?,
    };
    let limit = match q.get("limit") {
        None => 100,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=crate::audit::MAX_PAGE).contains(n))
            .ok_or_else(|| {
                ApiError::bad_field("limit", "limit is a whole number from 1 to 1000")
            })?,
    };
    let device = q.get("device").cloned();
    if let Some(shared) = s.audit.shared() {
        // Cluster mode: the cluster's records; this gateway's own if NATS
        // cannot be read.
        match shared.query(device.as_deref(), since, limit).await {
            Ok(records) => return Ok(Json(json!({ "records": records }))),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the cluster's audit trail; answering with this gateway's records");
                let trail = s.audit.clone();
                let records =
                    super::blocking(move || trail.query(device.as_deref(), since, limit)).await?;
                return Ok(Json(json!({ "records": records, "partial": true })));
            }
        }
    }
    let trail = s.audit.clone();
    let records = super::blocking(move || trail.query(device.as_deref(), since, limit)).await?;
    Ok(Json(json!({ "records": records })))
}
