//! The agent's own supervisor API, for devices without balena's supervisor:
//! it answers the gateway's immediate actions (the same dialect) on the
//! tunnel's port 48484 by running the hook configured for each action
//! (`--hook reboot='systemctl reboot'`).
//!
//! It listens on a loopback port of its own; the agent forwards tunnel port
//! 48484 there like any other forward. The hook runs with `sh -c`, with
//! `CLOUDLINK_ACTION`, `CLOUDLINK_FORCE`, `CLOUDLINK_APP_ID` and
//! `CLOUDLINK_SERVICE_NAME` in its environment. Answers: `202
//! {"Data":"OK","Error":null}` for reboot and shutdown, `200 OK` for the
//! others (as balena's supervisor), `500` if the hook failed, `404` for an
//! action without a hook, `401` without the configured API key.

use serde_json::Value;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long a hook may run before it counts as failed.
const HOOK_TIMEOUT: Duration = Duration::from_secs(20);

/// One action's hook: `ACTION=COMMAND`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub action: String,
    pub command: String,
}

impl std::str::FromStr for Hook {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (action, command) = s
            .split_once('=')
            .ok_or_else(|| format!("--hook {s:?} is not ACTION=COMMAND"))?;
        if crate::actions::Action::parse(action.trim()).is_none() {
            return Err(format!(
                "--hook {s:?}: {action:?} is not one of {}",
                crate::actions::Action::NAMES.join(", ")
            ));
        }
        Ok(Hook {
            action: action.trim().to_owned(),
            command: command.to_owned(),
        })
    }
}

/// Starts the endpoint on a loopback port; returns the port.
pub async fn start(hooks: Vec<Hook>, api_key: Option<String>) -> std::io::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let port = l.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (hooks, key) = (hooks.clone(), api_key.clone());
            tokio::spawn(async move {
                let _ = serve_one(s, &hooks, key.as_deref()).await;
            });
        }
    });
    Ok(port)
}

/// Which action a supervisor path names, and its parameters from the body.
fn route(path: &str, body: &Value) -> Option<(&'static str, Vec<(&'static str, String)>)> {
    let force = body["force"].as_bool().unwrap_or(false).to_string();
    let app = body["appId"]
        .as_u64()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let action = match path {
        "/v1/reboot" => "reboot",
        "/v1/shutdown" => "shutdown",
        "/v1/purge" => "purge",
        "/v1/restart" => "restart",
        p => {
            let app_id = p
                .strip_prefix("/v2/applications/")?
                .strip_suffix("/restart-service")?;
            let service = body["serviceName"].as_str().unwrap_or_default().to_owned();
            return Some((
                "restart-service",
                vec![
                    ("CLOUDLINK_FORCE", force),
                    ("CLOUDLINK_APP_ID", app_id.to_owned()),
                    ("CLOUDLINK_SERVICE_NAME", service),
                ],
            ));
        }
    };
    Some((
        action,
        vec![("CLOUDLINK_FORCE", force), ("CLOUDLINK_APP_ID", app)],
    ))
}

async fn serve_one(mut s: TcpStream, hooks: &[Hook], api_key: Option<&str>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let (head, body) = loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 64 * 1024 {
            return answer(
                &mut s,
                "413 Payload Too Large",
                r#"{"Data":null,"Error":"request too large"}"#,
            )
            .await;
        }
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .and_then(|v| v.trim().parse().ok())
                })
                .unwrap_or(0);
            if len > 64 * 1024 {
                return answer(
                    &mut s,
                    "413 Payload Too Large",
                    r#"{"Data":null,"Error":"request too large"}"#,
                )
                .await;
            }
            while buf.len() < end + 4 + len {
                let n = s.read(&mut chunk).await?;
                if n == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            break (head, buf[end + 4..end + 4 + len].to_vec());
        }
    };
    if let Some(key) = api_key {
        let ok = head.lines().any(|l| {
            l.split_once(':').is_some_and(|(k, v)| {
                k.eq_ignore_ascii_case("authorization")
                    && crate::api::token_matches(
                        v.trim().strip_prefix("Bearer ").unwrap_or(""),
                        key,
                    )
            })
        });
        if !ok {
            return answer(
                &mut s,
                "401 Unauthorized",
                r#"{"Data":null,"Error":"missing or wrong API key"}"#,
            )
            .await;
        }
    }
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let Some((action, env)) = (method == "POST").then(|| route(path, &body)).flatten() else {
        return answer(
            &mut s,
            "404 Not Found",
            r#"{"Data":null,"Error":"no such endpoint"}"#,
        )
        .await;
    };
    let Some(hook) = hooks.iter().find(|h| h.action == action) else {
        return answer(
            &mut s,
            "404 Not Found",
            r#"{"Data":null,"Error":"this device has no hook for that action"}"#,
        )
        .await;
    };
    tracing::info!(action, "running the action's hook");
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(&hook.command)
        .env("CLOUDLINK_ACTION", action);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let ok = match tokio::time::timeout(HOOK_TIMEOUT, cmd.status()).await {
        Ok(Ok(st)) => st.success(),
        _ => false,
    };
    match (ok, action) {
        (false, _) => {
            answer(
                &mut s,
                "500 Internal Server Error",
                r#"{"Data":null,"Error":"the hook failed"}"#,
            )
            .await
        }
        (true, "reboot" | "shutdown") => {
            answer(&mut s, "202 Accepted", r#"{"Data":"OK","Error":null}"#).await
        }
        (true, _) => answer(&mut s, "200 OK", "OK").await,
    }
}

async fn answer(s: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let kind = if body.starts_with('{') {
        "application/json"
    } else {
        "text/plain"
    };
    s.write_all(
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await?;
    s.shutdown().await
}
