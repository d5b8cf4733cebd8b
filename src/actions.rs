//! Immediate actions over cloudlink: reboot, shutdown, purge, restart,
//! restart-service, delivered as an HTTP request over the device's tunnel
//! to its supervisor API on port 48484, in the dialect of balena's device
//! supervisor (which our agent speaks too).
//!
//! This module builds the supervisor request, carries it over a relay
//! stream and reads the device's answer; the API module turns the outcome
//! into an HTTP answer.

use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

use crate::relay::{ConnectError, Relay};

/// The supervisor API port on devices.
pub const SUPERVISOR_PORT: u16 = 48484;
/// Largest answer read from a device.
const MAX_ANSWER: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Reboot,
    Shutdown,
    Purge,
    Restart,
    RestartService,
}

impl Action {
    pub const NAMES: [&'static str; 5] =
        ["reboot", "shutdown", "purge", "restart", "restart-service"];

    pub fn parse(s: &str) -> Option<Action> {
        Some(match s {
            "reboot" => Action::Reboot,
            "shutdown" => Action::Shutdown,
            "purge" => Action::Purge,
            "restart" => Action::Restart,
            "restart-service" => Action::RestartService,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Action::Reboot => "reboot",
            Action::Shutdown => "shutdown",
            Action::Purge => "purge",
            Action::Restart => "restart",
            Action::RestartService => "restart-service",
        }
    }
}

/// What the caller asked, after the device's stored defaults were applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params {
    pub force: bool,
    pub app_id: Option<u32>,
    pub service_name: Option<String>,
}

/// Why an action's parameters are incomplete: (field, message).
pub type Missing = (&'static str, &'static str);

/// The supervisor's path and JSON body for an action.
pub fn supervisor_call(action: Action, p: &Params) -> Result<(String, Value), Missing> {
    let app = || {
        p.app_id.ok_or(("app_id", "this action needs an app_id: give it in the body or store one with PATCH /v1/devices/{uuid}"))
    };
    Ok(match action {
        Action::Reboot => ("/v1/reboot".into(), json!({"force": p.force})),
        Action::Shutdown => ("/v1/shutdown".into(), json!({"force": p.force})),
        Action::Purge => (
            "/v1/purge".into(),
            json!({"appId": app()?, "force": p.force}),
        ),
        Action::Restart => (
            "/v1/restart".into(),
            json!({"appId": app()?, "force": p.force}),
        ),
        Action::RestartService => {
            let app_id = app()?;
            let service = p
                .service_name
                .clone()
                .ok_or(("service_name", "restart-service needs a service_name"))?;
            (
                format!("/v2/applications/{app_id}/restart-service"),
                json!({"serviceName": service, "force": p.force}),
            )
        }
    })
}

/// The device's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceAnswer {
    pub status: u16,
    /// Its JSON, or its text as a string (real supervisors answer some
    /// actions with plain `OK`).
    pub body: Value,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeliveryError {
    #[error("no device with that uuid")]
    UnknownDevice,
    #[error("the device's cloudlink is down")]
    Unavailable,
    #[error("the device refused the connection")]
    Unreachable,
    #[error("the device did not answer in time")]
    Timeout,
    /// The device never accepted the connection (within the relay's
    /// connect timeout): it is likely gone although its link looked up.
    #[error("the device did not accept the connection in time")]
    NoConnection,
    #[error("the device's answer is not HTTP: {0}")]
    BadAnswer(String),
    /// A bound on open relay streams: nothing was sent.
    #[error("{0}")]
    Busy(String),
}

/// Delivers one supervisor request and returns the device's answer, all
/// within `timeout`.
pub async fn deliver(
    relay: &Arc<Relay>,
    uuid: &str,
    path: &str,
    body: &Value,
    api_key: Option<&str>,
    timeout: Duration,
) -> Result<DeviceAnswer, DeliveryError> {
    let work = async {
        let stream = relay
            .connect(uuid, SUPERVISOR_PORT)
            .await
            .map_err(|e| match e {
                ConnectError::UnknownDevice => DeliveryError::UnknownDevice,
                ConnectError::LinkDown => DeliveryError::Unavailable,
                ConnectError::Timeout => DeliveryError::NoConnection,
                ConnectError::TooManyStreams(m) => DeliveryError::Busy(m),
                ConnectError::Refused | ConnectError::Internal(_) => DeliveryError::Unreachable,
            })?;
        let payload = body.to_string();
        let auth = api_key
            .map(|k| format!("Authorization: Bearer {k}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {uuid}:{SUPERVISOR_PORT}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{auth}Connection: close\r\n\r\n{payload}",
            payload.len()
        );
        let raw = crate::relay::stream::exchange(
            &stream.stack,
            stream.handle,
            request.as_bytes(),
            MAX_ANSWER_HEAD + MAX_ANSWER,
            // Stop reading once the answer is complete or cannot become one.
            |b| !matches!(parse_answer(b, false), Ok(None)),
        )
        .await
        .unwrap_or_default();
        // Closed or reset before a byte of answer: nothing serves the
        // supervisor port there (an agent whose local supervisor refused).
        if raw.is_empty() {
            return Err(DeliveryError::Unreachable);
        }
        match parse_answer(&raw, true) {
            Ok(Some(a)) => Ok(a),
            Ok(None) => Err(DeliveryError::BadAnswer("an incomplete answer".into())),
            Err(e) => Err(DeliveryError::BadAnswer(format!(
                "{e} (it began {:?})",
                String::from_utf8_lossy(&raw[..raw.len().min(40)])
            ))),
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(DeliveryError::Timeout),
    }
}

/// The one delivery path, for immediate and queued actions alike:
/// delivers `action`'s supervisor call (`path`, `body`, from
/// [`supervisor_call`]) and records its duration and result
/// (`cloudlink_action_duration_seconds`, `cloudlink_actions_total`; a
/// queued action's failure is counted as `failed`, as it always was).
#[allow(clippy::too_many_arguments)]
pub async fn deliver_counted(
    relay: &Arc<Relay>,
    metrics: &crate::metrics::Metrics,
    uuid: &str,
    action: Action,
    (path, body): (&str, &Value),
    api_key: Option<&str>,
    timeout: Duration,
    queued: bool,
) -> Result<DeviceAnswer, DeliveryError> {
    let started = std::time::Instant::now();
    let result = deliver(relay, uuid, path, body, api_key, timeout).await;
    metrics
        .action_duration
        .observe(started.elapsed().as_secs_f64());
    let label = match &result {
        Ok(_) => "device_answered",
        // A queued action whose link went down again waits for the next
        // link-up: not an outcome yet.
        Err(DeliveryError::Unavailable) if queued => return result,
        Err(DeliveryError::Busy(_)) if queued => return result,
        Err(_) if queued => "failed",
        Err(DeliveryError::UnknownDevice) => "unknown_device",
        Err(DeliveryError::Unavailable) => "cloudlink_unavailable",
        Err(DeliveryError::Unreachable) => "device_unreachable",
        Err(DeliveryError::Timeout | DeliveryError::NoConnection) => "device_timeout",
        Err(DeliveryError::BadAnswer(_)) => "device_bad_answer",
        Err(DeliveryError::Busy(_)) => "too_many_streams",
    };
    metrics.action(action.name(), label);
    result
}

/// Longest answer head read from a device.
const MAX_ANSWER_HEAD: usize = 16 * 1024;

/// Parses a device's answer (`at_eof`: the device closed, nothing more will
/// come): `Ok(None)` while incomplete, an error when it is not HTTP, is
/// malformed or is larger than 1 MiB. Never panics (fuzzed: `fuzz/`).
pub fn parse_answer(
    raw: &[u8],
    at_eof: bool,
) -> Result<Option<DeviceAnswer>, crate::http1::ParseError> {
    let Some((head, body)) =
        crate::http1::parse_response(raw, at_eof, MAX_ANSWER_HEAD, MAX_ANSWER)?
    else {
        return Ok(None);
    };
    let body = match serde_json::from_slice::<Value>(&body) {
        Ok(v) => v,
        Err(_) => Value::String(String::from_utf8_lossy(&body).into_owned()),
    };
    Ok(Some(DeviceAnswer {
        status: head.status,
        body,
    }))
}

/// Whether a device's HTTP status may be handed to the caller as is. A
/// device's 401 or 407 would read as the caller's own credentials failing
/// (and sign an operator out of the dashboard), 204 cannot carry the
/// device's body, and 1xx, 3xx and 5xx would be taken for the gateway's own:
/// those become 502 `device_error` with the device's status inside.
pub fn status_passes_through(status: u16) -> bool {
    matches!(status, 200..=299 if status != 204)
        || matches!(status, 400..=499 if status != 401 && status != 407)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supervisor_dialect() {
        let p = Params {
            force: true,
            app_id: Some(7),
            service_name: Some("web".into()),
        };
        assert_eq!(
            supervisor_call(Action::Reboot, &p).unwrap(),
            ("/v1/reboot".into(), json!({"force": true}))
        );
        assert_eq!(
            supervisor_call(Action::Purge, &p).unwrap(),
            ("/v1/purge".into(), json!({"appId": 7, "force": true}))
        );
        assert_eq!(
            supervisor_call(Action::RestartService, &p).unwrap(),
            (
                "/v2/applications/7/restart-service".into(),
                json!({"serviceName": "web", "force": true})
            )
        );
        let none = Params::default();
        assert_eq!(
            supervisor_call(Action::Restart, &none).unwrap_err().0,
            "app_id"
        );
        let app_only = Params {
            app_id: Some(1),
            ..Default::default()
        };
        assert_eq!(
            supervisor_call(Action::RestartService, &app_only)
                .unwrap_err()
                .0,
            "service_name"
        );
        assert_eq!(Action::parse("dance"), None);
    }

    #[test]
    fn answers() {
        let p = |b: &[u8]| parse_answer(b, true).unwrap().unwrap();
        let a = p(
            b"HTTP/1.1 202 Accepted\r\nContent-Length: 26\r\n\r\n{\"Data\":\"OK\",\"Error\":null}",
        );
        assert_eq!(a.status, 202);
        assert_eq!(a.body, json!({"Data": "OK", "Error": null}));
        let a = p(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK");
        assert_eq!(a.body, json!("OK"));
        let short = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nOK";
        assert_eq!(parse_answer(short, false), Ok(None));
        assert!(parse_answer(short, true).is_err());
        let a = p(b"HTTP/1.1 423 Locked\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n");
        assert_eq!((a.status, a.body), (423, json!({"a": 1})));
        assert!(parse_answer(b"garbage\r\n\r\n", true).is_err());
        // The regression: a chunk size of 2^64 - 1 is an error, not a panic.
        let huge = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nab\r\n0\r\n\r\n";
        assert!(parse_answer(huge, false).is_err());
        assert!(parse_answer(huge, true).is_err());
    }

    #[test]
    fn statuses_that_pass_through() {
        for s in [200, 202, 299, 400, 404, 423, 499] {
            assert!(status_passes_through(s), "{s}");
        }
        for s in [0, 100, 101, 204, 301, 304, 401, 407, 500, 501, 503, 999] {
            assert!(!status_passes_through(s), "{s}");
        }
    }
}
