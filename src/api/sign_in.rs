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
//! CSRF token in `X-CSRF-Token` and an `Origin` naming this host. A lone
//! gateway keeps sessions in memory only (a restart signs everyone out);
//! they expire after [`IDLE_TIMEOUT`] unused, and are bounded in number
//! ([`MAX_SESSIONS`]): the oldest go first.
//!
//! In cluster mode a session must work on whichever gateway the browser's
//! next request reaches, so the cookie is signed instead
//! (`c1.<expiry ms>.<nonce>.<mac>`, a keyed BLAKE2s over expiry and nonce;
//! the CSRF token is another MAC of the nonce): every gateway of the
//! cluster holds the key, derived from the WireGuard identity they share,
//! and checks a cookie without asking anyone. Such a session lasts
//! [`IDLE_TIMEOUT`] from sign-in (it cannot be touched). Signing out
//! revokes the nonce cluster-wide (the KV bucket `cloudlink_signouts`,
//! kept until the session would have expired, watched by every gateway,
//! so a gateway that restarts learns every revocation again).

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::{token_matches, ApiError, SharedState};
use crate::tokens::Grant;

pub const COOKIE: &str = "cloudlink_session";
/// The largest sign-in body: `{"token": "..."}` with a long token.
pub const MAX_BODY: usize = 4096;
/// Failed sign-ins from one address within [`THROTTLE_WINDOW`] before it
/// is refused (429) until the window ends.
const THROTTLE_AFTER: u32 = 10;
const THROTTLE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses remembered at most (a flood from many addresses cannot grow
/// the table without bound; beyond, new addresses are not throttled).
const THROTTLE_TABLE: usize = 65_536;

/// Failed sign-ins per source address: guessing the token from one
/// address gets 10 tries a minute.
#[derive(Default)]
pub struct Throttle {
    failures: Mutex<HashMap<std::net::IpAddr, (u32, Instant)>>,
}

impl Throttle {
    /// How long `ip` must wait, if it is throttled now.
    pub fn wait(&self, ip: std::net::IpAddr, now: Instant) -> Option<Duration> {
        let f = self.failures.lock();
        let (n, since) = f.get(&ip)?;
        let left = THROTTLE_WINDOW.checked_sub(now.duration_since(*since))?;
        (*n >= THROTTLE_AFTER && !left.is_zero()).then_some(left)
    }

    pub fn failed(&self, ip: std::net::IpAddr, now: Instant) {
        let mut f = self.failures.lock();
        if f.len() >= THROTTLE_TABLE && !f.contains_key(&ip) {
            f.retain(|_, (_, since)| now.duration_since(*since) < THROTTLE_WINDOW);
            if f.len() >= THROTTLE_TABLE {
                return;
            }
        }
        let e = f.entry(ip).or_insert((0, now));
        if now.duration_since(e.1) >= THROTTLE_WINDOW {
            *e = (0, now);
        }
        e.0 += 1;
    }

    pub fn succeeded(&self, ip: std::net::IpAddr) {
        self.failures.lock().remove(&ip);
    }
}
pub const CSRF_HEADER: &str = "x-csrf-token";
/// A session unused this long is gone.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(12 * 3600);
/// At most this many sessions; signing in beyond drops the least recently
/// used.
pub const MAX_SESSIONS: usize = 1024;

struct Session {
    csrf: String,
    last_used: Instant,
    grant: Grant,
}

#[derive(Default)]
pub struct SignIns {
    // One mutex: sign-ins and page requests are a few a second, and the
    // critical sections are a hash lookup.
    map: Mutex<HashMap<String, Session>>,
    /// Cluster mode: sessions are signed cookies (see the module docs).
    signed: Option<Signed>,
}

/// Told a sign-out: (nonce, expiry in Unix ms).
type ShareSignOut = Box<dyn Fn(&str, u64) + Send + Sync>;

struct Signed {
    key: [u8; 32],
    /// Revoked nonces (signed out), with the expiry of their session.
    revoked: Mutex<HashMap<String, u64>>,
    /// Told each sign-out here (nonce, expiry ms), to revoke it everywhere.
    share: std::sync::OnceLock<ShareSignOut>,
}

/// A signed cookie's parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedCookie<'a> {
    /// 1: before scoped tokens (the bootstrap token's, `admin`); 2: with
    /// the signing-in token's scopes and id.
    pub version: u8,
    pub expiry: u64,
    pub scopes: u8,
    pub token_id: Option<&'a str>,
    pub nonce: &'a str,
    pub mac: &'a str,
}

/// No token id (the bootstrap token) in a `c2` cookie.
const NO_TOKEN: &str = "-";

/// A signed cookie's parts, if it has the shape of one: `c1.<expiry>.
/// <nonce>.<mac>` or `c2.<expiry>.<scopes>.<token id|->.<nonce>.<mac>`.
/// Total: any input gets an answer.
pub fn parse_signed(cookie: &str) -> Option<SignedCookie<'_>> {
    let mut parts = cookie.split('.');
    let version = match parts.next()? {
        "c1" => 1,
        "c2" => 2,
        _ => return None,
    };
    let expiry = parts.next()?.parse().ok()?;
    let (scopes, token_id) = if version == 2 {
        let scopes: u8 = parts.next()?.parse().ok()?;
        let id = parts.next()?;
        let id = if id == NO_TOKEN {
            None
        } else {
            (id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()))
                .then_some(id)?
                .into()
        };
        (scopes, id)
    } else {
        (crate::tokens::Scope::Admin as u8, None)
    };
    let nonce = parts.next()?;
    let mac = parts.next()?;
    let hex = |x: &str, len: usize| x.len() == len && x.bytes().all(|b| b.is_ascii_hexdigit());
    (parts.next().is_none() && hex(nonce, 32) && hex(mac, 64)).then_some(SignedCookie {
        version,
        expiry,
        scopes,
        token_id,
        nonce,
        mac,
    })
}

fn mac_hex(key: &[u8; 32], parts: &[&[u8]]) -> String {
    use blake2::digest::{KeyInit, Mac};
    let mut m = <blake2::Blake2sMac256 as KeyInit>::new_from_slice(key).expect("a 32-byte key");
    for p in parts {
        m.update(p);
        m.update(b"|");
    }
    m.finalize()
        .into_bytes()
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn wall_ms() -> u64 {
    crate::registry::now_ms() as u64
}

impl Signed {
    fn cookie(&self, expiry: u64, grant: &Grant, nonce: &str) -> String {
        let e = expiry.to_string();
        let scopes = grant.scopes.to_string();
        let id = grant.token_id.as_deref().unwrap_or(NO_TOKEN);
        let mac = mac_hex(
            &self.key,
            &[
                b"session2",
                e.as_bytes(),
                scopes.as_bytes(),
                id.as_bytes(),
                nonce.as_bytes(),
            ],
        );
        format!("c2.{e}.{scopes}.{id}.{nonce}.{mac}")
    }
    /// A cookie of the first format (before scoped tokens).
    fn cookie_v1(&self, expiry: u64, nonce: &str) -> String {
        let e = expiry.to_string();
        let mac = mac_hex(&self.key, &[b"session", e.as_bytes(), nonce.as_bytes()]);
        format!("c1.{e}.{nonce}.{mac}")
    }
    fn csrf(&self, nonce: &str) -> String {
        mac_hex(&self.key, &[b"csrf", nonce.as_bytes()])
    }
    /// The CSRF token and grant of a valid, unexpired, not revoked cookie.
    fn check(&self, cookie: &str, now_ms: u64) -> Option<(String, Grant)> {
        let c = parse_signed(cookie)?;
        let grant = Grant {
            token_id: c.token_id.map(str::to_owned),
            scopes: c.scopes,
        };
        let want = match c.version {
            1 => self.cookie_v1(c.expiry, c.nonce),
            _ => self.cookie(c.expiry, &grant, c.nonce),
        };
        let ok = token_matches(cookie, &want) && c.expiry > now_ms;
        (ok && !self.revoked.lock().contains_key(c.nonce)).then(|| (self.csrf(c.nonce), grant))
    }
    fn revoke(&self, nonce: &str, expiry: u64, now_ms: u64) {
        let mut r = self.revoked.lock();
        r.retain(|_, e| *e > now_ms);
        if expiry > now_ms {
            r.insert(nonce.to_owned(), expiry);
        }
    }
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
    /// Cluster mode: signed sessions under `key` (the cluster's secret).
    pub fn signed(key: [u8; 32]) -> Self {
        SignIns {
            map: Default::default(),
            signed: Some(Signed {
                key,
                revoked: Default::default(),
                share: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Cluster mode: `share` is told each sign-out here (nonce, expiry in
    /// Unix ms). Once.
    pub fn share_sign_outs(&self, share: impl Fn(&str, u64) + Send + Sync + 'static) {
        if let Some(s) = &self.signed {
            let _ = s.share.set(Box::new(share));
        }
    }

    /// Cluster mode: a sign-out elsewhere (or replayed after a restart).
    pub fn revoke(&self, nonce: &str, expiry_ms: u64) {
        if let Some(s) = &self.signed {
            s.revoke(nonce, expiry_ms, wall_ms());
        }
    }

    /// A new session with `grant`'s scopes: (id, csrf).
    fn create(&self, now: Instant, grant: Grant) -> (String, String) {
        if let Some(s) = &self.signed {
            let mut b = [0u8; 16];
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
            let nonce: String = b.iter().map(|x| format!("{x:02x}")).collect();
            let expiry = wall_ms() + IDLE_TIMEOUT.as_millis() as u64;
            return (s.cookie(expiry, &grant, &nonce), s.csrf(&nonce));
        }
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
                grant,
            },
        );
        (id, csrf)
    }

    /// The CSRF token and grant of a live session, touching it.
    pub fn check(&self, id: &str, now: Instant) -> Option<(String, Grant)> {
        if let Some(s) = &self.signed {
            return s.check(id, wall_ms());
        }
        let mut m = self.map.lock();
        let s = m.get_mut(id)?;
        if now.duration_since(s.last_used) >= IDLE_TIMEOUT {
            m.remove(id);
            return None;
        }
        s.last_used = now;
        Some((s.csrf.clone(), s.grant.clone()))
    }

    fn end(&self, id: &str) {
        if let Some(s) = &self.signed {
            if let Some(c) = parse_signed(id) {
                s.revoke(c.nonce, c.expiry, wall_ms());
                if let Some(share) = s.share.get() {
                    share(c.nonce, c.expiry);
                }
            }
            return;
        }
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
        .expect("hex, digits and dots make a valid header value")
}

fn clear_cookie() -> HeaderValue {
    HeaderValue::from_static("cloudlink_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
}

/// `POST /v1/session`: signs in with the API token.
pub async fn sign_in(
    State(s): State<SharedState>,
    peer: Option<Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let ip = peer.map(|Extension(c)| c.0.ip());
    if let Some(wait) = ip.and_then(|ip| s.sign_in_failures.wait(ip, Instant::now())) {
        s.metrics.api_refused("sign_in_throttled");
        let mut r = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_attempts",
            format!(
                "too many failed sign-ins from this address; try again in {} s",
                wait.as_secs().max(1)
            ),
        )
        .into_response();
        r.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(wait.as_secs().max(1)),
        );
        return Ok(r);
    }
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
    let Some(grant) = s.tokens.check(token, crate::registry::now_ms()) else {
        if let Some(ip) = ip {
            s.sign_in_failures.failed(ip, Instant::now());
        }
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "that is not a valid token of this gateway (the bootstrap token's path is in the gateway's log at start)",
        )
        .field("token"));
    };
    if let Some(ip) = ip {
        s.sign_in_failures.succeeded(ip);
    }
    let scopes = grant.scope_names();
    let (id, csrf) = s.sign_ins.create(Instant::now(), grant);
    let mut r = Json(json!({
        "csrf_token": csrf,
        "idle_timeout_s": IDLE_TIMEOUT.as_secs(),
        "scopes": scopes,
    }))
    .into_response();
    r.headers_mut().insert(header::SET_COOKIE, set_cookie(&id));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

/// `GET /v1/session`: who is signed in, and the CSRF token for a session.
pub async fn current(
    Extension(auth): Extension<Auth>,
    Extension(grant): Extension<Grant>,
) -> Response {
    let scopes = grant.scope_names();
    let body = match auth {
        Auth::Token => json!({"auth": "token", "scopes": scopes, "token_id": grant.token_id}),
        Auth::Session { csrf, .. } => {
            json!({"auth": "session", "csrf_token": csrf, "scopes": scopes, "token_id": grant.token_id})
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_sessions_check_on_any_holder_of_the_key_until_revoked() {
        let a = SignIns::signed([7; 32]);
        let b = SignIns::signed([7; 32]);
        let other = SignIns::signed([8; 32]);
        let read = Grant {
            token_id: Some("0123456789abcdef".into()),
            scopes: crate::tokens::Scope::Read as u8,
        };
        let (cookie, csrf) = a.create(Instant::now(), read.clone());
        assert_eq!(
            b.check(&cookie, Instant::now()),
            Some((csrf.clone(), read.clone()))
        );
        assert_eq!(other.check(&cookie, Instant::now()), None);
        // Any change to the cookie breaks it: its expiry, its scopes.
        let c = parse_signed(&cookie).unwrap();
        let (e, n, m) = (c.expiry, c.nonce, c.mac);
        let later = format!("c2.{}.1.0123456789abcdef.{n}.{m}", e + 1);
        assert_eq!(b.check(&later, Instant::now()), None);
        let wider = format!("c2.{e}.8.0123456789abcdef.{n}.{m}");
        assert_eq!(b.check(&wider, Instant::now()), None);
        let expired = a.signed.as_ref().unwrap().cookie(wall_ms() - 1, &read, n);
        assert_eq!(a.check(&expired, Instant::now()), None);
        // A cookie of the first format still works, as the bootstrap
        // token's (admin).
        let v1 = a.signed.as_ref().unwrap().cookie_v1(wall_ms() + 60_000, n);
        assert_eq!(b.check(&v1, Instant::now()).unwrap().1, Grant::admin());
        // Signed out on A, revoked on B when told.
        a.end(&cookie);
        assert_eq!(a.check(&cookie, Instant::now()), None);
        assert!(b.check(&cookie, Instant::now()).is_some());
        b.revoke(n, e);
        assert_eq!(b.check(&cookie, Instant::now()), None);
    }

    #[test]
    fn cookie_parsing_is_total() {
        for bad in [
            "",
            "c1",
            "c1...",
            "c1.x.y.z",
            "c2.1.aa.bb",
            "c1.1.2.3.4",
            "\u{0}",
            "c1.99999999999999999999999.a.b",
        ] {
            assert_eq!(parse_signed(bad), None, "{bad:?}");
        }
        let ok = format!("c1.5.{}.{}", "a".repeat(32), "b".repeat(64));
        assert!(parse_signed(&ok).is_some());
        let ok2 = format!("c2.5.1.-.{}.{}", "a".repeat(32), "b".repeat(64));
        assert!(parse_signed(&ok2).is_some());
        for bad in [
            format!("c2.5.300.-.{}.{}", "a".repeat(32), "b".repeat(64)),
            format!("c2.5.1.xyz.{}.{}", "a".repeat(32), "b".repeat(64)),
            format!("c2.5.1.{}.{}", "a".repeat(32), "b".repeat(64)),
        ] {
            assert_eq!(parse_signed(&bad), None, "{bad:?}");
        }
    }
}
