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
    #[error("the device's answer is not HTTP: {0}")]
    BadAnswer(String),
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
                ConnectError::Timeout => DeliveryError::Timeout,
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
            MAX_ANSWER,
            |b| parse_answer(b).is_some(),
        )
        .await
        .unwrap_or_default();
        // Closed or reset before a byte of answer: nothing serves the
        // supervisor port there (an agent whose local supervisor refused).
        if raw.is_empty() {
            return Err(DeliveryError::Unreachable);
        }
        parse_answer(&raw).ok_or_else(|| {
            DeliveryError::BadAnswer(
                String::from_utf8_lossy(&raw[..raw.len().min(80)]).into_owned(),
            )
        })
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(DeliveryError::Timeout),
    }
}

/// Parses a complete HTTP/1.x answer (Content-Length, chunked, or closed
/// by the device); `None` while it is incomplete or not HTTP.
pub fn parse_answer(raw: &[u8]) -> Option<DeviceAnswer> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    if !status_line.starts_with("HTTP/1.") {
        return None;
    }
    let status: u16 = status_line.split_whitespace().nth(1)?.parse().ok()?;
    let mut length = None;
    let mut chunked = false;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let k = k.trim().to_ascii_lowercase();
            if k == "content-length" {
                length = v.trim().parse::<usize>().ok();
            } else if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            }
        }
    }
    let rest = &raw[end..];
    let body: Vec<u8> = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        if rest.len() < n {
            return None;
        }
        rest[..n].to_vec()
    } else {
        // Until the device closes: the caller passes what it got at FIN.
        rest.to_vec()
    };
    let body = match serde_json::from_slice::<Value>(&body) {
        Ok(v) => v,
        Err(_) => Value::String(String::from_utf8_lossy(&body).into_owned()),
    };
    Some(DeviceAnswer { status, body })
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = b.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(
            std::str::from_utf8(&b[..line_end])
                .ok()?
                .split(';')
                .next()?
                .trim(),
            16,
        )
        .ok()?;
        b = &b[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        if b.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
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
        let a = parse_answer(
            b"HTTP/1.1 202 Accepted\r\nContent-Length: 26\r\n\r\n{\"Data\":\"OK\",\"Error\":null}",
        )
        .unwrap();
        assert_eq!(a.status, 202);
        assert_eq!(a.body, json!({"Data": "OK", "Error": null}));
        let a = parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK").unwrap();
        assert_eq!(a.body, json!("OK"));
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nOK").is_none());
        let a = parse_answer(b"HTTP/1.1 423 Locked\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n").unwrap();
        assert_eq!((a.status, a.body), (423, json!({"a": 1})));
        assert!(parse_answer(b"garbage\r\n\r\n").is_none());
    }
}
