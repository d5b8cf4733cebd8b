//! The agent's own supervisor API: it answers the gateway's immediate
//! actions (balena supervisor's dialect) on the tunnel's port 48484, unless
//! `--forward 48484=...` points to a real supervisor, by running the hook
//! configured for each action (`--on-action reboot='systemctl reboot'`).
//!
//! It is served straight on the tunnel stream, never on a local socket, so
//! only the gateway's tunnel address can reach it. A hook runs with `sh -c`,
//! with `CLOUDLINK_ACTION`, `CLOUDLINK_FORCE`, `CLOUDLINK_APP_ID` and
//! `CLOUDLINK_SERVICE_NAME` in its environment. As balena's supervisor
//! does, `reboot` and `shutdown` answer `202` first and run their hook just
//! after (a reboot cannot report its own success); other hooks run within
//! `--hook-timeout`: exit status 0 answers `200 {"Data": "OK", "Error":
//! null}`, anything else `500` with the tail of the hook's stderr. An action
//! without a hook answers `501`; a wrong or missing key (when
//! `--supervisor-api-key` is set) `401`.

use serde_json::{json, Value};
use smoltcp::iface::SocketHandle;
use std::sync::Arc;
use std::time::Duration;

use crate::http1::{parse_request, ParseError, RequestHead};
use crate::relay::stream::{recv_into, SharedStack};

/// Largest request head and body accepted.
const MAX_HEAD: usize = 8 * 1024;
const MAX_BODY: usize = 64 * 1024;

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
            .ok_or_else(|| format!("--on-action {s:?} is not ACTION=COMMAND"))?;
        if crate::actions::Action::parse(action.trim()).is_none() {
            return Err(format!(
                "--on-action {s:?}: {action:?} is not one of {}",
                crate::actions::Action::NAMES.join(", ")
            ));
        }
        Ok(Hook {
            action: action.trim().to_owned(),
            command: command.to_owned(),
        })
    }
}

/// How the agent's supervisor API behaves.
#[derive(Debug, Clone, Default)]
pub struct SupervisorConfig {
    pub hooks: Vec<Hook>,
    pub api_key: Option<String>,
    pub hook_timeout: Duration,
}

/// Which action a supervisor path names, and the hook's environment.
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

/// Parses a request with the supervisor's caps: `Ok(None)` while
/// incomplete. No I/O, never panics (fuzzed: `fuzz/`).
pub fn parse(raw: &[u8]) -> Result<Option<(RequestHead, Vec<u8>)>, ParseError> {
    parse_request(raw, MAX_HEAD, MAX_BODY)
}

fn response(status: &str, body: &Value) -> Vec<u8> {
    let body = body.to_string();
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn error(status: &str, message: &str) -> Vec<u8> {
    response(status, &json!({"Data": null, "Error": message}))
}

/// Serves one request on an accepted tunnel stream.
pub async fn serve(stack: Arc<SharedStack>, h: SocketHandle, config: Arc<SupervisorConfig>) {
    let mut raw = Vec::new();
    let mut buf = Vec::new();
    // The parser caps head and body, so `raw` stays under both caps plus
    // one receive.
    let request = loop {
        match tokio::time::timeout(Duration::from_secs(10), recv_into(&stack, h, &mut buf)).await {
            Ok(Some(n)) => {
                raw.extend_from_slice(&buf[..n]);
                match parse(&raw) {
                    Ok(Some(r)) => break Ok(r),
                    Ok(None) => {}
                    Err(e) => break Err(e),
                }
            }
            _ => break Err(ParseError::Truncated),
        }
    };
    let (answer, after) = match request {
        Err(e @ (ParseError::BodyTooLarge(_) | ParseError::HeadTooLarge(_))) => {
            (error("413 Content Too Large", &e.to_string()), None)
        }
        Err(e) => (error("400 Bad Request", &e.to_string()), None),
        Ok((head, body)) => handle(&head, &body, &config).await,
    };
    stack.with(|s| s.send(h, &answer));
    stack.with(|s| s.tcp(h).close());
    // reboot and shutdown: the answer is out, now the hook.
    if let Some((command, action, env)) = after {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = run_hook(&command, action, &env, config.hook_timeout).await;
    }
}

type Deferred = (String, &'static str, Vec<(&'static str, String)>);

async fn handle(
    head: &RequestHead,
    body: &[u8],
    config: &SupervisorConfig,
) -> (Vec<u8>, Option<Deferred>) {
    if let Some(key) = &config.api_key {
        let ok = head
            .get("authorization")
            .and_then(crate::auth::credential)
            .is_some_and(|t| crate::auth::token_matches(&t, key));
        if !ok {
            return (error("401 Unauthorized", "missing or wrong API key"), None);
        }
    }
    let (method, path) = (head.method.as_str(), head.target.as_str());
    let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let Some((action, env)) = (method == "POST").then(|| route(path, &body)).flatten() else {
        return (error("404 Not Found", "no such endpoint"), None);
    };
    let Some(hook) = config.hooks.iter().find(|h| h.action == action) else {
        return (
            error(
                "501 Not Implemented",
                &format!("this device has no hook for {action}: start the agent with --on-action {action}=COMMAND"),
            ),
            None,
        );
    };
    tracing::info!(action, "action received");
    if matches!(action, "reboot" | "shutdown") {
        let ok = response("202 Accepted", &json!({"Data": "OK", "Error": null}));
        return (ok, Some((hook.command.clone(), action, env)));
    }
    match run_hook(&hook.command, action, &env, config.hook_timeout).await {
        Ok(()) => (
            response("200 OK", &json!({"Data": "OK", "Error": null})),
            None,
        ),
        Err(why) => (error("500 Internal Server Error", &why), None),
    }
}

/// Runs a hook; `Err` with the tail of its stderr when it fails.
async fn run_hook(
    command: &str,
    action: &str,
    env: &[(&'static str, String)],
    timeout: Duration,
) -> Result<(), String> {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .env("CLOUDLINK_ACTION", action)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("the hook could not start: {e}"))?;
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: String = err
                .chars()
                .rev()
                .take(500)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            tracing::warn!(action, status = %out.status, "action hook failed");
            Err(format!("the hook failed ({}): {}", out.status, tail.trim()))
        }
        Ok(Err(e)) => Err(format!("the hook failed: {e}")),
        Err(_) => Err(format!(
            "the hook did not finish within {} s",
            timeout.as_secs_f32()
        )),
    }
}
