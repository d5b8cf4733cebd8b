//! Dashboard sign-ins (the browser's "session" cookie; not a WireGuard
//! session, which lives in the session table). A browser cannot keep the API token
//! out of script reach and `EventSource` cannot send headers, so the page
//! trades the token once for a session cookie:
//!
//! - `POST /v1/session` `{"token"}` sets `cloudlink_session` (HttpOnly,
//!   SameSite=Strict, Path=/) and answers the session's CSRF token;
//! - `GET /v1/session` answers the CSRF token again (after a reload);
//! - `DELETE /v1/session` ends the session on the server.
//!
//! A request authenticated by the cookie that changes state must carry the
//! CSRF token in `X-CSRF-Token` and an `Origin` naming this host. Sessions
//! live in memory only (a restart signs everyone out), expire after
//! [`IDLE_TIMEOUT`] unused, and are bounded in number ([`MAX_SESSIONS`]):
//! the oldest go first.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::{token_matches, ApiError, SharedState};

pub const COOKIE: &str = "cloudlink_session";
pub const CSRF_HEADER: &str = "x-csrf-token";
/// A session unused this long is gone.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(12 * 3600);
/// At most this many sessions; signing in beyond drops the least recently
/// used.
pub const MAX_SESSIONS: usize = 1024;

struct Session {
    csrf: String,
    last_used: Instant,
}

#[derive(Default)]
pub struct SignIns {
    // One mutex: sign-ins and page requests are a few a second, and the
    // critical sections are a hash lookup.
    map: Mutex<HashMap<String, Session>>,
}

/// How a request was authenticated (set by the auth middleware).
#[derive(Clone, Debug)]
pub enum Auth {
    Token,
    Session { id: String, csrf: String },
}

fn random_hex() -> String {
    let mut b = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl SignIns {
    /// A new session: (id, csrf).
    fn create(&self, now: Instant) -> (String, String) {
        let (id, csrf) = (random_hex(), random_hex());
        let mut m = self.map.lock();
        m.retain(|_, s| now.duration_since(s.last_used) < IDLE_TIMEOUT);
        while m.len() >= MAX_SESSIONS {
            let oldest = m
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(k, _)| k.clone())
                .expect("non-empty");
            m.remove(&oldest);
        }
        m.insert(
            id.clone(),
            Session {
                csrf: csrf.clone(),
                last_used: now,
            },
        );
        (id, csrf)
    }

    /// The CSRF token of a live session, touching it.
    pub fn check(&self, id: &str, now: Instant) -> Option<String> {
        let mut m = self.map.lock();
        let s = m.get_mut(id)?;
        if now.duration_since(s.last_used) >= IDLE_TIMEOUT {
            m.remove(id);
            return None;
        }
        s.last_used = now;
        Some(s.csrf.clone())
    }

    fn end(&self, id: &str) {
        self.map.lock().remove(id);
    }

    pub fn len(&self) -> usize {
        self.map.lock().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The session cookie's value, if the request has one.
pub fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

/// Whether `Origin` names the host the request was sent to. Absent counts
/// as a mismatch: browsers send it on every state-changing fetch.
pub fn origin_matches(headers: &HeaderMap) -> bool {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    match (host, origin) {
        (Some(h), Some(o)) => {
            o.strip_prefix("http://")
                .or_else(|| o.strip_prefix("https://"))
                == Some(h)
        }
        _ => false,
    }
}

fn set_cookie(id: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/"))
        .expect("hex is a valid header value")
}

fn clear_cookie() -> HeaderValue {
    HeaderValue::from_static("cloudlink_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
}

/// `POST /v1/session`: signs in with the API token.
pub async fn sign_in(
    State(s): State<SharedState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    // A sign-in from another site's page would log the victim into the
    // attacker's gateway view; only this host's page may sign in.
    if headers.contains_key(header::ORIGIN) && !origin_matches(&headers) {
        return Err(origin_refused());
    }
    let obj = super::json_object(&body)?;
    for k in obj.keys() {
        if k != "token" {
            return Err(ApiError::bad_field(
                k.clone(),
                format!("unknown field {k:?}; sign-in takes token"),
            ));
        }
    }
    let token = match obj.get("token") {
        Some(Value::String(t)) if !t.is_empty() => t,
        _ => {
            return Err(ApiError::bad_field(
                "token",
                "token is the gateway's API token, a non-empty string",
            ))
        }
    };
    if !token_matches(token.trim(), &s.token) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "that is not this gateway's API token (see the path the gateway logged at start)",
        )
        .field("token"));
    }
    let (id, csrf) = s.sign_ins.create(Instant::now());
    let mut r = Json(json!({
        "csrf_token": csrf,
        "idle_timeout_s": IDLE_TIMEOUT.as_secs(),
    }))
    .into_response();
    r.headers_mut().insert(header::SET_COOKIE, set_cookie(&id));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

/// `GET /v1/session`: who is signed in, and the CSRF token for a session.
pub async fn current(Extension(auth): Extension<Auth>) -> Response {
    let body = match auth {
        Auth::Token => json!({"auth": "token"}),
        Auth::Session { csrf, .. } => json!({"auth": "session", "csrf_token": csrf}),
    };
    let mut r = Json(body).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `DELETE /v1/session`: signs out.
pub async fn sign_out(State(s): State<SharedState>, Extension(auth): Extension<Auth>) -> Response {
    if let Auth::Session { id, .. } = auth {
        s.sign_ins.end(&id);
    }
    let mut r = StatusCode::NO_CONTENT.into_response();
    r.headers_mut().insert(header::SET_COOKIE, clear_cookie());
    r
}

pub fn origin_refused() -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "origin_mismatch",
        "a request authenticated by the session cookie must come from this gateway's own page (its Origin header must name this host)",
    )
}

pub fn csrf_refused() -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "csrf_token_invalid",
        "a request that changes state with the session cookie must carry the session's X-CSRF-Token header (from sign-in or GET /v1/session)",
    )
}
