//! Scoped tokens (issue "Hold up under abuse"): a `read` token lists and
//! streams but gets 403 on actions, registrations, token management and
//! the proxy; a `relay` token opens proxy streams; a revoked token gets 401
//! at once, and so does a dashboard session signed in with it; tokens
//! survive a restart; the secret is shown once.

mod common;

use common::*;
use serde_json::{json, Value};

async fn call_with(
    g: &TestGateway,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut rb = g
        .http
        .request(method.parse().unwrap(), g.url(path))
        .bearer_auth(token);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let r = rb.send().await.unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_limit_what_a_token_does_and_revocation_is_immediate() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path());
    let mut g = TestGateway::start_in(dir, c.clone(), "127.0.0.1:0").await;
    let (st, read) = g
        .call(
            "POST",
            "/v1/tokens",
            Some(json!({"name": "grafana", "scopes": ["read"]})),
        )
        .await;
    assert_eq!(st, 201, "{read}");
    assert_eq!(read["scopes"], json!(["read"]));
    let read_token = read["token"].as_str().unwrap().to_owned();
    assert!(read_token.starts_with("clt_"));
    // Listed without the secret.
    let (st, list) = g.call("GET", "/v1/tokens", None).await;
    assert_eq!(st, 200);
    let text = list.to_string();
    assert!(
        text.contains("grafana") && !text.contains(&read_token[21..]),
        "{text}"
    );
    assert!(list["tokens"][0].get("token").is_none() && list["tokens"][0].get("hash").is_none());

    // Bad requests say what is wrong.
    for (body, field) in [
        (json!({"name": "x", "scopes": ["root"]}), "scopes"),
        (json!({"name": "x", "scopes": []}), "scopes"),
        (json!({"scopes": ["read"]}), "name"),
        (
            json!({"name": "x", "scopes": ["read"], "expires_in_s": 0}),
            "expires_in_s",
        ),
    ] {
        let (st, e) = g.call("POST", "/v1/tokens", Some(body)).await;
        assert_eq!((st, &e["field"]), (400, &json!(field)), "{e}");
    }

    g.register(
        "dev-1",
        &cloudlink::keys::public_key(&cloudlink::keys::generate_private_key()),
    )
    .await;
    // Read: lists and streams.
    assert_eq!(
        call_with(&g, &read_token, "GET", "/v1/devices", None)
            .await
            .0,
        200
    );
    assert_eq!(
        call_with(&g, &read_token, "GET", "/v1/devices/dev-1", None)
            .await
            .0,
        200
    );
    let stream = SseReader::connect_with(&g.url("/v1/events"), &read_token, None).await;
    assert_eq!(stream.status, 200);
    // Not: actions, registrations, tokens.
    for (method, path, body) in [
        ("POST", "/v1/devices/dev-1/actions/reboot", Some(json!({}))),
        (
            "POST",
            "/v1/devices",
            Some(json!({"uuid": "x", "public_key": "y"})),
        ),
        ("DELETE", "/v1/devices/dev-1", None),
        (
            "POST",
            "/v1/tokens",
            Some(json!({"name": "mine", "scopes": ["admin"]})),
        ),
        ("GET", "/v1/tokens", None),
    ] {
        let (st, e) = call_with(&g, &read_token, method, path, body).await;
        assert_eq!(
            (st, &e["error"]),
            (403, &json!("forbidden")),
            "{method} {path}: {e}"
        );
        assert!(e["message"].as_str().unwrap().contains("read"), "{e}");
    }
    // The proxy: 403 for read, a relay token gets through to the device
    // lookup (an unknown device here).
    let proxy = g.gw().proxy_addr();
    let (st, e, _) = common::proxy::raw_connect(
        proxy,
        &format!(
            "CONNECT dev-1.balena:22 HTTP/1.1\r\nProxy-Authorization: Bearer {read_token}\r\n\r\n"
        ),
    )
    .await;
    assert_eq!((st, &e["error"]), (403, &json!("forbidden")), "{e}");
    let (_, relay) = g
        .call(
            "POST",
            "/v1/tokens",
            Some(json!({"name": "ssh-gw", "scopes": ["relay"]})),
        )
        .await;
    let relay_token = relay["token"].as_str().unwrap();
    let (st, e, _) = common::proxy::raw_connect(
        proxy,
        &format!("CONNECT nobody.balena:22 HTTP/1.1\r\nProxy-Authorization: Bearer {relay_token}\r\n\r\n"),
    )
    .await;
    assert_eq!(st, 404, "{e}");
    // A relay token cannot read the API.
    assert_eq!(
        call_with(&g, relay_token, "GET", "/v1/devices", None)
            .await
            .0,
        403
    );

    // A dashboard session signed in with the read token carries its scope.
    let r = g
        .http
        .post(g.url("/v1/session"))
        .json(&json!({"token": read_token}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let cookie = r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let session: Value = r.json().await.unwrap();
    assert_eq!(session["scopes"], json!(["read"]));
    let with_cookie = |method: &str, path: &str| {
        g.http
            .request(method.parse().unwrap(), g.url(path))
            .header("cookie", &cookie)
            .header("x-csrf-token", session["csrf_token"].as_str().unwrap())
            .header("origin", g.url(""))
    };
    assert_eq!(
        with_cookie("GET", "/v1/devices")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        with_cookie("POST", "/v1/devices/dev-1/actions/reboot")
            .json(&json!({}))
            .send()
            .await
            .unwrap()
            .status(),
        403
    );

    // Revoked: refused at once, its session too.
    let id = read["id"].as_str().unwrap();
    let (st, _) = g.call("DELETE", &format!("/v1/tokens/{id}"), None).await;
    assert_eq!(st, 204);
    let (st, e) = call_with(&g, &read_token, "GET", "/v1/devices", None).await;
    assert_eq!(st, 401, "{e}");
    assert_eq!(
        with_cookie("GET", "/v1/devices")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let (st, _) = g.call("DELETE", &format!("/v1/tokens/{id}"), None).await;
    assert_eq!(st, 404);
    drop(stream);

    // Tokens survive a restart (the relay token still works, the revoked
    // one does not come back).
    g.stop().await;
    let dir = std::mem::replace(&mut g.dir, tempfile::tempdir().unwrap());
    let mut g = TestGateway::start_in(dir, c, "127.0.0.1:0").await;
    assert_eq!(
        call_with(&g, &read_token, "GET", "/v1/devices", None)
            .await
            .0,
        401
    );
    let (_, list) = g.call("GET", "/v1/tokens", None).await;
    assert_eq!(list["tokens"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["tokens"][0]["name"], "ssh-gw");
    g.stop().await;
}

/// `--metrics-auth`: `/metrics` needs a token with the read scope (401
/// without, 403 with a relay-only token); open by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_require_a_read_token() {
    let mut open = TestGateway::start().await;
    assert_eq!(
        open.http
            .get(open.url("/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    open.stop().await;
    let mut g = TestGateway::start_with(|c| c.metrics_auth = true).await;
    let (_, read) = g
        .call(
            "POST",
            "/v1/tokens",
            Some(json!({"name": "prometheus", "scopes": ["read"]})),
        )
        .await;
    let (_, relay) = g
        .call(
            "POST",
            "/v1/tokens",
            Some(json!({"name": "ssh", "scopes": ["relay"]})),
        )
        .await;
    let get = |token: Option<&str>| {
        let mut rb = g.http.get(g.url("/metrics"));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        async move { rb.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(get(None).await, 401);
    assert_eq!(get(relay["token"].as_str()).await, 403);
    assert_eq!(get(read["token"].as_str()).await, 200);
    assert_eq!(get(Some(TOKEN)).await, 200);
    g.stop().await;
}
