//! Immediate actions over cloudlink, delivered by the gateway to a
//! supervisor behind `cloudlink agent`: every answer, with who gave it.

mod common;

use common::proxy::Agent;
use common::*;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone)]
struct Seen {
    path: String,
    auth: Option<String>,
    body: Value,
}

/// A stand-in for balena's supervisor API: records each request and answers
/// as real supervisors do (202 JSON for reboot/shutdown, plain `OK` for the
/// others, 423 for a locked shutdown without force).
async fn supervisor(seen: Arc<Mutex<Vec<Seen>>>) -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (head, body) = loop {
                    let n = s.read(&mut chunk).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        let len: usize = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        while buf.len() < end + 4 + len {
                            let n = s.read(&mut chunk).await.unwrap();
                            buf.extend_from_slice(&chunk[..n]);
                        }
                        break (head, buf[end + 4..end + 4 + len].to_vec());
                    }
                };
                let path = head.split_whitespace().nth(1).unwrap().to_owned();
                let auth = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Authorization: ").map(str::to_owned));
                let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let (status, answer) = match path.as_str() {
                    "/v1/shutdown" if body["force"] != true => (
                        "423 Locked",
                        r#"{"status":"failed","message":"Updates are locked"}"#,
                    ),
                    "/v1/reboot" | "/v1/shutdown" => {
                        ("202 Accepted", r#"{"Data":"OK","Error":null}"#)
                    }
                    _ => ("200 OK", "OK"),
                };
                seen.lock().unwrap().push(Seen { path, auth, body });
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}", answer.len()).as_bytes())
                    .await;
            });
        }
    });
    port
}

async fn act(
    g: &TestGateway,
    uuid: &str,
    action: &str,
    body: Option<Value>,
    key: Option<&str>,
) -> (u16, String, Value) {
    let mut rb = g
        .http
        .post(g.url(&format!("/v1/devices/{uuid}/actions/{action}")))
        .bearer_auth(TOKEN);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    if let Some(k) = key {
        rb = rb.header("X-Device-Api-Key", k);
    }
    let r = rb.send().await.unwrap();
    let st = r.status().as_u16();
    let source = r
        .headers()
        .get("x-cloudlink-source")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (st, source, r.json().await.unwrap_or(Value::Null))
}

async fn gateway() -> TestGateway {
    TestGateway::start_with(|c| {
        c.link_timeout = Duration::from_secs(30);
        c.action_timeout = Duration::from_secs(2);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_reach_the_supervisor_and_its_answers_come_back() {
    let mut g = gateway().await;
    let mut events = g.events(None).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let port = supervisor(seen.clone()).await;
    let _agent = Agent::start(&g, "act-1", &[format!("48484=127.0.0.1:{port}")]).await;
    events.wait_for(WAIT, |e| e["type"] == "link.up").await;

    let (st, src, b) = act(&g, "act-1", "reboot", None, None).await;
    assert_eq!((st, src.as_str()), (202, "device"), "{b}");
    assert_eq!(
        b,
        json!({"device_status": 202, "device_body": {"Data": "OK", "Error": null}})
    );
    let s = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        (s.path.as_str(), s.auth.clone(), s.body.clone()),
        ("/v1/reboot", None, json!({"force": false}))
    );

    // A stored key and app id; the key is never shown again.
    let (st, d) = g
        .call(
            "PATCH",
            "/v1/devices/act-1",
            Some(json!({"device_api_key": "secret-key-123", "app_id": 7})),
        )
        .await;
    assert_eq!(st, 200, "{d}");
    assert_eq!(d["app_id"], 7);
    assert_eq!(d["has_device_api_key"], true);
    assert!(!d.to_string().contains("secret-key-123"));
    let (_, list) = g.call("GET", "/v1/devices", None).await;
    assert!(!list.to_string().contains("secret-key-123"));

    let (st, src, b) = act(&g, "act-1", "purge", Some(json!({"force": true})), None).await;
    assert_eq!((st, src.as_str()), (200, "device"));
    assert_eq!(
        b["device_body"], "OK",
        "plain text answers come back as a string"
    );
    let s = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(s.path, "/v1/purge");
    assert_eq!(s.auth.as_deref(), Some("Bearer secret-key-123"));
    assert_eq!(s.body, json!({"appId": 7, "force": true}));

    // The caller's key wins over the stored one.
    let (st, _, _) = act(
        &g,
        "act-1",
        "restart",
        Some(json!({"app_id": 9})),
        Some("caller-key"),
    )
    .await;
    assert_eq!(st, 200);
    let s = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        (s.path.as_str(), s.auth.as_deref()),
        ("/v1/restart", Some("Bearer caller-key"))
    );
    assert_eq!(s.body, json!({"appId": 9, "force": false}));

    let (st, _, _) = act(
        &g,
        "act-1",
        "restart-service",
        Some(json!({"service_name": "web", "force": true})),
        None,
    )
    .await;
    assert_eq!(st, 200);
    let s = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(s.path, "/v2/applications/7/restart-service");
    assert_eq!(s.body, json!({"serviceName": "web", "force": true}));

    // An update lock: the device's 423 comes through as the device's answer.
    let (st, src, b) = act(&g, "act-1", "shutdown", None, None).await;
    assert_eq!((st, src.as_str()), (423, "device"));
    assert_eq!(b["device_status"], 423);
    let (st, _, _) = act(&g, "act-1", "shutdown", Some(json!({"force": true})), None).await;
    assert_eq!(st, 202);

    assert_eq!(
        g.metric("cloudlink_actions_total{action=\"reboot\",result=\"device_answered\"}")
            .await,
        1.0
    );
    assert_eq!(
        g.metric("cloudlink_actions_total{action=\"shutdown\",result=\"device_answered\"}")
            .await,
        2.0
    );
    assert_eq!(
        g.metric("cloudlink_action_duration_seconds_count").await,
        6.0
    );
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_answers_what_it_must() {
    let mut g = gateway().await;
    let mut events = g.events(None).await;
    let check = |r: (u16, String, Value), st: u16, code: &str, field: Option<&str>| {
        assert_eq!(r.0, st, "{}", r.2);
        assert_eq!(r.1, "gateway");
        assert_eq!(r.2["error"], code, "{}", r.2);
        assert!(r.2["message"].as_str().unwrap().len() > 20);
        if let Some(f) = field {
            assert_eq!(r.2["field"], f);
        }
    };
    // A device whose agent forwards nothing on 48484.
    // A device whose supervisor port leads nowhere (nothing listens on the
    // agent's local target).
    let _agent = Agent::start(&g, "no-supervisor", &["48484=127.0.0.1:1".into()]).await;
    events.wait_for(WAIT, |e| e["type"] == "link.up").await;
    g.register(
        "offline",
        &cloudlink::keys::public_key(&cloudlink::keys::generate_private_key()),
    )
    .await;

    check(
        act(&g, "ghost", "reboot", None, None).await,
        404,
        "device_not_found",
        Some("uuid"),
    );
    check(
        act(&g, "offline", "dance", None, None).await,
        400,
        "unknown_action",
        Some("action"),
    );
    check(
        act(&g, "offline", "purge", None, None).await,
        400,
        "invalid_field",
        Some("app_id"),
    );
    check(
        act(
            &g,
            "offline",
            "restart-service",
            Some(json!({"app_id": 3})),
            None,
        )
        .await,
        400,
        "invalid_field",
        Some("service_name"),
    );
    check(
        act(&g, "offline", "reboot", Some(json!({"force": "yes"})), None).await,
        400,
        "invalid_field",
        Some("force"),
    );
    check(
        act(&g, "offline", "reboot", Some(json!({"colour": 1})), None).await,
        400,
        "invalid_field",
        Some("colour"),
    );
    let r = act(&g, "offline", "reboot", None, None).await;
    check(r.clone(), 503, "cloudlink_unavailable", None);
    assert!(r.2["message"]
        .as_str()
        .unwrap()
        .contains("immediate actions need cloudlink"));
    check(
        act(&g, "no-supervisor", "reboot", None, None).await,
        502,
        "device_unreachable",
        None,
    );

    // A device whose link is up but which never answers: 504 after
    // --action-timeout (2 s here).
    let key = cloudlink::keys::generate_private_key();
    let reg = g.register("mute", &cloudlink::keys::public_key(&key)).await;
    let gw_pub =
        cloudlink::keys::decode_key(reg["gateway"]["public_key"].as_str().unwrap()).unwrap();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut dev = TestDevice::with_key(g.udp, &gw_pub, 5, socket, key);
    dev.connect();
    events
        .wait_for(WAIT, |e| e["type"] == "link.up" && e["device"] == "mute")
        .await;
    let t = Instant::now();
    check(
        act(&g, "mute", "reboot", None, None).await,
        504,
        "device_timeout",
        None,
    );
    assert!(t.elapsed() >= Duration::from_secs(2));
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_runs_the_action_hook() {
    let mut g = gateway().await;
    let mut events = g.events(None).await;
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("rebooted");
    let svc = dir.path().join("service");
    let _agent = Agent::start_with(
        &g,
        "hooked",
        &[],
        &[
            "--on-action".into(),
            format!("reboot=echo force=$CLOUDLINK_FORCE > {}", marker.display()),
            "--on-action".into(),
            format!(
                "restart-service=echo $CLOUDLINK_APP_ID/$CLOUDLINK_SERVICE_NAME > {}",
                svc.display()
            ),
            "--on-action".into(),
            "purge=echo the disk is read-only >&2; exit 3".into(),
            "--supervisor-api-key".into(),
            "agent-key-0001".into(),
        ],
    )
    .await;
    events.wait_for(WAIT, |e| e["type"] == "link.up").await;

    // Without the key the agent's supervisor refuses, as a real one would.
    // A device's 401 is not the caller's: 502 device_error with it inside.
    let (st, src, b) = act(&g, "hooked", "reboot", None, None).await;
    assert_eq!((st, src.as_str()), (502, "gateway"), "{b}");
    assert_eq!(
        (b["error"].as_str(), b["device_status"].as_u64()),
        (Some("device_error"), Some(401)),
        "{b}"
    );
    assert!(!marker.exists());

    let (st, _) = g
        .call(
            "PATCH",
            "/v1/devices/hooked",
            Some(json!({"device_api_key": "agent-key-0001"})),
        )
        .await;
    assert_eq!(st, 200);
    let (st, src, b) = act(&g, "hooked", "reboot", Some(json!({"force": true})), None).await;
    assert_eq!((st, src.as_str()), (202, "device"), "{b}");
    assert_eq!(b["device_body"], json!({"Data": "OK", "Error": null}));
    // reboot answers first and runs its hook just after.
    assert!(eventually(WAIT, async || marker.exists()).await);
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "force=true\n");

    let (st, _, b) = act(
        &g,
        "hooked",
        "restart-service",
        Some(json!({"app_id": 12, "service_name": "web"})),
        None,
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(b["device_body"], json!({"Data": "OK", "Error": null}));
    assert_eq!(std::fs::read_to_string(&svc).unwrap(), "12/web\n");

    // A failing hook: the device's 500, with the tail of its stderr, inside
    // a 502 device_error.
    let (st, src, b) = act(&g, "hooked", "purge", Some(json!({"app_id": 1})), None).await;
    assert_eq!((st, src.as_str()), (502, "gateway"), "{b}");
    assert_eq!(b["device_status"], 500, "{b}");
    assert!(
        b["device_body"]["Error"]
            .as_str()
            .unwrap()
            .contains("the disk is read-only"),
        "{b}"
    );

    // An action without a hook: the device's 501, saying so.
    let (st, src, b) = act(&g, "hooked", "shutdown", None, None).await;
    assert_eq!(
        (st, src.as_str(), b["device_status"].as_u64()),
        (502, "gateway", Some(501))
    );
    assert!(b["device_body"]["Error"]
        .as_str()
        .unwrap()
        .contains("--on-action shutdown"));
    g.stop().await;
}

async fn act_with(
    g: &TestGateway,
    uuid: &str,
    action: &str,
    query: &str,
    idempotency: Option<&str>,
) -> (u16, String, Value) {
    let mut rb = g
        .http
        .post(g.url(&format!("/v1/devices/{uuid}/actions/{action}{query}")))
        .bearer_auth(TOKEN);
    if let Some(k) = idempotency {
        rb = rb.header("Idempotency-Key", k);
    }
    let r = rb.send().await.unwrap();
    let st = r.status().as_u16();
    let source = r
        .headers()
        .get("x-cloudlink-source")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (st, source, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_actions_wait_for_link_up_survive_a_restart_and_expire() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.link_timeout = Duration::from_secs(30);
    c.action_timeout = Duration::from_secs(5);
    let mut g = TestGateway::start_in(dir, c.clone(), "127.0.0.1:0").await;
    let udp = g.udp;
    let mut events = g.events(None).await;
    let key = cloudlink::keys::generate_private_key();
    g.register("later", &cloudlink::keys::public_key(&key))
        .await;

    // Offline: queued (the gateway answers 202 with the action's id).
    let (st, src, b) = act_with(&g, "later", "reboot", "?queue_ttl=300", Some("retry-1")).await;
    assert_eq!((st, src.as_str()), (202, "gateway"), "{b}");
    assert_eq!(b["state"], "queued");
    let id = b["id"].as_str().unwrap().to_owned();
    // The same Idempotency-Key: the same action, not a second one.
    let (st, _, b2) = act_with(&g, "later", "reboot", "?queue_ttl=300", Some("retry-1")).await;
    assert_eq!(st, 202);
    assert_eq!(b2["id"], id.as_str());
    // Another one that will expire first.
    let (_, _, short) = act_with(&g, "later", "shutdown", "?queue_ttl=1", None).await;
    let short_id = short["id"].as_str().unwrap().to_owned();
    let m = events
        .wait_for(WAIT, |e| e["type"] == "action.expired")
        .await;
    assert_eq!(m.data["action_id"], short_id.as_str());
    assert_eq!(m.data["state"], "expired");
    assert_eq!(m.data["device"], "later");
    let (_, a) = g
        .call("GET", &format!("/v1/actions/{short_id}"), None)
        .await;
    assert_eq!(a["state"], "expired");

    // The gateway restarts with the reboot still queued.
    g.stop().await;
    let dir = std::mem::replace(&mut g.dir, tempfile::tempdir().unwrap());
    let mut g = TestGateway::start_in(dir, c, &udp.to_string()).await;
    let mut events = g.events(None).await;
    let (_, a) = g.call("GET", &format!("/v1/actions/{id}"), None).await;
    assert_eq!(a["state"], "queued", "{a}");
    assert_eq!(a["action"], "reboot");
    assert_eq!(a["device"], "later");

    // The device comes online: the action is delivered at link-up.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let port = supervisor(seen.clone()).await;
    let _agent =
        Agent::start_registered(&g, "later", &key, &[format!("48484=127.0.0.1:{port}")], &[]).await;
    let m = events
        .wait_for(WAIT, |e| e["type"] == "action.completed")
        .await;
    assert_eq!(m.data["action_id"], id.as_str());
    assert_eq!(m.data["action"], "reboot");
    assert_eq!(m.data["state"], "completed");
    assert_eq!(m.data["device_status"], 202);
    // Where the connected device is (it was `null` before).
    assert!(
        m.data["endpoint"]
            .as_str()
            .is_some_and(|e| e.starts_with("127.0.0.1:")),
        "{}",
        m.data
    );
    let (_, a) = g.call("GET", &format!("/v1/actions/{id}"), None).await;
    assert_eq!(a["state"], "completed");
    assert_eq!(a["device_body"], json!({"Data": "OK", "Error": null}));
    assert_eq!(seen.lock().unwrap().len(), 1, "delivered once");

    // Online: queue_ttl changes nothing, the action is delivered now; a
    // retried request with the same key is answered from memory.
    let (st, src, b) = act_with(&g, "later", "reboot", "?queue_ttl=300", Some("now-1")).await;
    assert_eq!((st, src.as_str()), (202, "device"), "{b}");
    let (st, src, _) = act_with(&g, "later", "reboot", "", Some("now-1")).await;
    assert_eq!((st, src.as_str()), (202, "device"));
    assert_eq!(
        seen.lock().unwrap().len(),
        2,
        "the retry did not deliver again"
    );

    // Errors.
    let (st, _, e) = act_with(&g, "later", "reboot", "?queue_ttl=0", None).await;
    assert_eq!((st, e["field"].as_str()), (400, Some("queue_ttl")));
    let (st, e) = g.call("GET", "/v1/actions/not-an-id", None).await;
    assert_eq!((st, e["field"].as_str()), (400, Some("id")));
    let (st, e) = g
        .call("GET", "/v1/actions/0123456789abcdef01234567", None)
        .await;
    assert_eq!((st, e["error"].as_str()), (404, Some("action_not_found")));
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_action_that_cannot_be_delivered_fails() {
    let mut g = gateway().await;
    let mut events = g.events(None).await;
    let key = cloudlink::keys::generate_private_key();
    g.register("no-sup", &cloudlink::keys::public_key(&key))
        .await;
    let (st, _, b) = act_with(&g, "no-sup", "reboot", "?queue_ttl=60", None).await;
    assert_eq!(st, 202);
    let id = b["id"].as_str().unwrap().to_owned();
    // The device comes up, but nothing answers on its port 48484.
    let _agent =
        Agent::start_registered(&g, "no-sup", &key, &["48484=127.0.0.1:1".into()], &[]).await;
    let m = events
        .wait_for(WAIT, |e| e["type"] == "action.failed")
        .await;
    assert_eq!(m.data["action_id"], id.as_str());
    assert_eq!(m.data["state"], "failed");
    assert_eq!(m.data["device_status"], Value::Null);
    assert!(m.data["reason"].as_str().unwrap().contains("refused"));
    let (_, a) = g.call("GET", &format!("/v1/actions/{id}"), None).await;
    assert_eq!(a["state"], "failed");
    g.stop().await;
}

/// Deleting a device fails its queued actions (`device_deleted`): a device
/// registered later under the same uuid must never receive them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_device_fails_its_queued_actions() {
    let mut g = gateway().await;
    let mut events = g.events(None).await;
    let key = cloudlink::keys::generate_private_key();
    g.register("gone", &cloudlink::keys::public_key(&key)).await;
    let (st, _, b) = act_with(&g, "gone", "reboot", "?queue_ttl=600", None).await;
    assert_eq!(st, 202);
    let id = b["id"].as_str().unwrap().to_owned();
    let (st, _) = g.call("DELETE", "/v1/devices/gone", None).await;
    assert_eq!(st, 204);
    let m = events
        .wait_for(WAIT, |e| e["type"] == "action.failed")
        .await;
    assert_eq!(m.data["action_id"], id.as_str());
    assert_eq!(m.data["reason"], "device_deleted");
    let (_, a) = g.call("GET", &format!("/v1/actions/{id}"), None).await;
    assert_eq!(a["state"], "failed");
    // The same uuid registered again, online: nothing queued reaches it.
    g.register("gone", &cloudlink::keys::public_key(&key)).await;
    let _agent = Agent::start_registered(&g, "gone", &key, &[], &[]).await;
    events.wait_for(WAIT, |e| e["type"] == "link.up").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, a) = g.call("GET", &format!("/v1/actions/{id}"), None).await;
    assert_eq!(a["state"], "failed", "{a}");
    g.stop().await;
}

/// A device's supervisor that answers its n-th request with `answers[n]`
/// (the last one from then on), byte for byte: how a hostile or broken
/// device answers.
async fn raw_supervisor(answers: Vec<Vec<u8>>) -> (u16, Arc<Mutex<usize>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let served = Arc::new(Mutex::new(0usize));
    let count = served.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let n = {
                let mut c = count.lock().unwrap();
                *c += 1;
                *c - 1
            };
            let answer = answers[n.min(answers.len() - 1)].clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = s.write_all(&answer).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (port, served)
}

/// The review's exact input: a chunk size of 2^64 - 1 (which wrapped
/// `size + 2` and panicked the action handler).
const CHUNK_OVERFLOW: &[u8] =
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nab\r\n0\r\n\r\n";
const ACCEPTED: &[u8] =
    b"HTTP/1.1 202 Accepted\r\nContent-Length: 26\r\n\r\n{\"Data\":\"OK\",\"Error\":null}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_size_overflow_from_a_device_is_a_bad_answer_not_a_panic() {
    let mut g = gateway().await;
    let mut events = g.events(None).await;
    let (port, _) = raw_supervisor(vec![CHUNK_OVERFLOW.to_vec(), ACCEPTED.to_vec()]).await;
    let _agent = Agent::start(&g, "chunky", &[format!("48484=127.0.0.1:{port}")]).await;
    events.wait_for(WAIT, |e| e["type"] == "link.up").await;
    let (st, src, b) = act(&g, "chunky", "reboot", None, None).await;
    assert_eq!((st, src.as_str()), (502, "gateway"), "{b}");
    assert_eq!(b["error"], "device_bad_answer", "{b}");
    // The gateway goes on: the next answer is delivered as usual.
    let (st, src, b) = act(&g, "chunky", "reboot", None, None).await;
    assert_eq!((st, src.as_str()), (202, "device"), "{b}");
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_action_answered_with_a_chunk_overflow_fails_and_the_queue_goes_on() {
    let mut g = gateway().await;
    let mut events = g.events(None).await;
    let key = cloudlink::keys::generate_private_key();
    g.register("chunky-q", &cloudlink::keys::public_key(&key))
        .await;
    let (_, _, first) = act_with(&g, "chunky-q", "reboot", "?queue_ttl=60", None).await;
    let (_, _, second) = act_with(&g, "chunky-q", "shutdown", "?queue_ttl=60", None).await;
    let (first, second) = (
        first["id"].as_str().unwrap(),
        second["id"].as_str().unwrap(),
    );
    let (port, served) = raw_supervisor(vec![CHUNK_OVERFLOW.to_vec(), ACCEPTED.to_vec()]).await;
    let _agent = Agent::start_registered(
        &g,
        "chunky-q",
        &key,
        &[format!("48484=127.0.0.1:{port}")],
        &[],
    )
    .await;
    let m = events
        .wait_for(WAIT, |e| e["type"] == "action.failed")
        .await;
    assert_eq!(m.data["action_id"], first);
    let m = events
        .wait_for(WAIT, |e| e["type"] == "action.completed")
        .await;
    assert_eq!(m.data["action_id"], second);
    assert_eq!(m.data["device_status"], 202);
    let (_, a) = g.call("GET", &format!("/v1/actions/{first}"), None).await;
    assert_eq!(a["state"], "failed", "{a}");
    assert_eq!(*served.lock().unwrap(), 2);
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_content_length_to_the_agents_supervisor_ends_the_stream_cleanly() {
    let mut g = gateway().await;
    let mut events = g.events(None).await;
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("restarted");
    let _agent = Agent::start_with(
        &g,
        "sup-cl",
        &[],
        &[
            "--on-action".into(),
            format!("restart=touch {}", marker.display()),
        ],
    )
    .await;
    events.wait_for(WAIT, |e| e["type"] == "link.up").await;
    // Any token holder reaches the supervisor port through the proxy; the
    // review's exact input (which panicked the agent's task and leaked the
    // stream's stack).
    for _ in 0..3 {
        let (st, _, mut s) =
            common::proxy::connect(g.gw().proxy_addr(), TOKEN, "sup-cl:48484").await;
        assert_eq!(st, 200);
        s.write_all(b"POST /v1/restart HTTP/1.1\r\nContent-Length: 18446744073709551615\r\n\r\n{}")
            .await
            .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut answer))
            .await
            .expect("the stream ends")
            .unwrap();
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 413 "), "{text}");
        assert!(text.contains("larger than"), "{text}");
    }
    // Every stream was closed on both sides (none leaked open) ...
    assert!(
        eventually(WAIT, async || g.metric("cloudlink_relay_streams").await
            == 0.0)
        .await,
        "relay streams left open"
    );
    // ... and the supervisor goes on serving.
    let (st, src, b) = act(&g, "sup-cl", "restart", Some(json!({"app_id": 1})), None).await;
    assert_eq!((st, src.as_str()), (200, "device"), "{b}");
    assert!(marker.exists());
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_answering_401_does_not_sign_the_dashboard_out() {
    let mut g = gateway().await;
    let mut events = g.events(None).await;
    let (port, _) = raw_supervisor(vec![
        b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 13\r\n\r\nwho are you?\n".to_vec(),
    ])
    .await;
    let _agent = Agent::start(&g, "says-401", &[format!("48484=127.0.0.1:{port}")]).await;
    events.wait_for(WAIT, |e| e["type"] == "link.up").await;

    // The dashboard's way in: a session cookie, its CSRF token and Origin.
    let (cookie, csrf) = g.sign_in().await;
    let r = g
        .http
        .post(g.url("/v1/devices/says-401/actions/reboot"))
        .header("cookie", &cookie)
        .header("x-csrf-token", &csrf)
        .header("origin", g.api.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["x-cloudlink-source"], "gateway");
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"], "device_error", "{b}");
    assert_eq!(b["device_status"], 401, "{b}");
    assert_eq!(b["device_body"], "who are you?\n", "{b}");
    // Still signed in.
    let r = g
        .http
        .get(g.url("/v1/session"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    g.stop().await;
}

/// At most `--max-queued-actions` wait for one device: beyond, 429
/// `action_queue_full`, and nothing is stored; another device is not
/// affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_actions_per_device_are_capped() {
    let mut g = TestGateway::start_with(|c| c.max_queued_actions = 3).await;
    for uuid in ["busy", "calm"] {
        g.register(
            uuid,
            &cloudlink::keys::public_key(&cloudlink::keys::generate_private_key()),
        )
        .await;
    }
    for i in 0..3 {
        let (st, _, b) = act_with(&g, "busy", "reboot", "?queue_ttl=300", None).await;
        assert_eq!(st, 202, "{i}: {b}");
    }
    let (st, src, b) = act_with(&g, "busy", "reboot", "?queue_ttl=300", None).await;
    assert_eq!((st, src.as_str()), (429, "gateway"), "{b}");
    assert_eq!(b["error"], "action_queue_full");
    assert!(b["message"].as_str().unwrap().contains("busy"), "{b}");
    let (st, _, b) = act_with(&g, "calm", "reboot", "?queue_ttl=300", None).await;
    assert_eq!(st, 202, "{b}");
    g.stop().await;
}
