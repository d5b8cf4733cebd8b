//! The dashboard's server side without a browser: the page and its assets,
//! session sign-in/out, CSRF and Origin checks, the summary, and the
//! listing's search, sort and cursor paging.

mod common;

use common::*;
use reqwest::header::{COOKIE, ORIGIN, SET_COOKIE};
use serde_json::{json, Value};
use std::collections::HashSet;

async fn sign_in(g: &TestGateway) -> (String, String) {
    g.sign_in().await
}

fn origin(g: &TestGateway) -> String {
    g.api.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_and_its_assets_need_no_sign_in() {
    let mut g = TestGateway::start().await;
    for (path, ctype) in [
        ("/", "text/html"),
        ("/assets/app.js", "text/javascript"),
        ("/assets/app.css", "text/css"),
        ("/assets/icon.svg", "image/svg+xml"),
    ] {
        let r = g.http.get(g.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let h = r.headers().clone();
        assert!(
            h["content-type"].to_str().unwrap().starts_with(ctype),
            "{path}"
        );
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
        let body = r.text().await.unwrap();
        assert!(!body.contains(TOKEN));
    }
    // Nothing else is open: the data needs a token or a session.
    let r = g.http.get(g.url("/v1/devices")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let b: Value = r.json().await.unwrap();
    assert!(b["message"].as_str().unwrap().contains("sign in"), "{b}");
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_sign_in_csrf_origin_and_sign_out() {
    let mut g = TestGateway::start().await;
    let key = cloudlink::keys::public_key(&cloudlink::keys::generate_private_key());
    g.register("dash-1", &key).await;

    // Bad sign-ins.
    for (body, status, error) in [
        (json!({"token": "wrong"}), 401, "unauthorized"),
        (json!({}), 400, "invalid_field"),
        (json!({"token": TOKEN, "extra": 1}), 400, "invalid_field"),
    ] {
        let r = g
            .http
            .post(g.url("/v1/session"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{body}");
        assert!(r.headers().get(SET_COOKIE).is_none());
        let b: Value = r.json().await.unwrap();
        assert_eq!(b["error"], error, "{b}");
    }
    let r = g
        .http
        .post(g.url("/v1/session"))
        .header(ORIGIN, "http://evil.example")
        .json(&json!({ "token": TOKEN }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "sign-in from another site's page");

    // A good one: the cookie is HttpOnly and SameSite=Strict.
    let r = g
        .http
        .post(g.url("/v1/session"))
        .header(ORIGIN, origin(&g))
        .json(&json!({ "token": TOKEN }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let set = r.headers()[SET_COOKIE].to_str().unwrap().to_string();
    assert!(set.starts_with("cloudlink_session="), "{set}");
    assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict") && set.contains("Path=/"));
    let csrf = r.json::<Value>().await.unwrap()["csrf_token"]
        .as_str()
        .unwrap()
        .to_string();
    let cookie = set.split(';').next().unwrap().to_string();

    // Reads with the cookie, as the page and EventSource do.
    let r = g
        .http
        .get(g.url("/v1/devices"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = g
        .http
        .get(g.url("/v1/session"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap()["csrf_token"],
        csrf.as_str()
    );
    let r = g
        .http
        .get(g.url("/v1/events"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    drop(r);

    // Changes need the CSRF token and this host's Origin.
    let patch = |csrf: Option<&str>, origin: Option<&str>| {
        let mut rb = g
            .http
            .patch(g.url("/v1/devices/dash-1"))
            .header(COOKIE, &cookie)
            .json(&json!({"name": "renamed"}));
        if let Some(c) = csrf {
            rb = rb.header("X-CSRF-Token", c);
        }
        if let Some(o) = origin {
            rb = rb.header(ORIGIN, o);
        }
        rb.send()
    };
    let o = origin(&g);
    for (csrf_sent, origin_sent, error) in [
        (None, Some(o.as_str()), "csrf_token_invalid"),
        (Some("0".repeat(64)), Some(o.as_str()), "csrf_token_invalid"),
        (
            Some(csrf.clone()),
            Some("http://evil.example"),
            "origin_mismatch",
        ),
        (Some(csrf.clone()), None, "origin_mismatch"),
    ] {
        let r = patch(csrf_sent.as_deref(), origin_sent).await.unwrap();
        assert_eq!(r.status(), 403);
        assert_eq!(r.json::<Value>().await.unwrap()["error"], error);
    }
    assert_eq!(
        g.device("dash-1").await["name"],
        Value::Null,
        "nothing changed"
    );
    let r = patch(Some(&csrf), Some(&o)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(g.device("dash-1").await["name"], "renamed");

    // The bearer token needs neither.
    let (st, _) = g
        .call(
            "PATCH",
            "/v1/devices/dash-1",
            Some(json!({"name": "again"})),
        )
        .await;
    assert_eq!(st, 200);

    // Sign-out ends the session on the server: the cookie is dead even if
    // a client keeps sending it.
    let r = g
        .http
        .delete(g.url("/v1/session"))
        .header(COOKIE, &cookie)
        .header("X-CSRF-Token", &csrf)
        .header(ORIGIN, &o)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(r.headers()[SET_COOKIE]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    let r = g
        .http
        .get(g.url("/v1/devices"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "session_expired");
    // Sessions are independent.
    let (other, _) = sign_in(&g).await;
    let r = g
        .http
        .get(g.url("/v1/devices"))
        .header(COOKIE, &other)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    g.stop().await;
}

async fn names_in_order(g: &TestGateway, query: &str) -> (Vec<String>, usize) {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut q = query.to_string();
        if let Some(a) = &after {
            q.push_str(&format!("&after={a}"));
        }
        let (st, b) = g.call("GET", &format!("/v1/devices?{q}"), None).await;
        assert_eq!(st, 200, "{b}");
        pages += 1;
        for d in b["devices"].as_array().unwrap() {
            out.push(d["uuid"].as_str().unwrap().to_string());
        }
        match b["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
        assert!(pages < 100);
    }
    (out, pages)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_search_sort_and_cursor_paging() {
    let mut g = TestGateway::start().await;
    // 25 devices; names in reverse uuid order, every fifth unnamed.
    let devices: Vec<Value> = (0..25)
        .map(|i| {
            let key = cloudlink::keys::public_key(&cloudlink::keys::generate_private_key());
            let name = (i % 5 != 0).then(|| format!("Site {:02} %_", 30 - i));
            json!({"uuid": format!("dev-{i:02}"), "public_key": cloudlink::keys::encode_key(&key), "name": name})
        })
        .collect();
    let (st, b) = g
        .call(
            "POST",
            "/v1/devices/batch",
            Some(json!({ "devices": devices })),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    for u in ["dev-03", "dev-07"] {
        let (st, _) = g
            .call("POST", &format!("/v1/devices/{u}/heartbeat"), None)
            .await;
        assert_eq!(st, 200);
    }

    // Search: uuid or name, case-insensitive, LIKE wildcards taken literally.
    let (hits, _) = names_in_order(&g, "q=SITE%201").await;
    // Site 11..Site 19 are dev-19..dev-11; dev-15 has no name.
    assert_eq!(hits.len(), 8, "{hits:?}");
    let (hits, _) = names_in_order(&g, "q=dev-2").await;
    assert_eq!(hits, ["dev-20", "dev-21", "dev-22", "dev-23", "dev-24"]);
    let (hits, _) = names_in_order(&g, "q=%25_").await; // "%_" literally
    assert_eq!(hits.len(), 20);
    let (hits, _) = names_in_order(&g, "q=x%25").await;
    assert!(hits.is_empty());

    // Sort by name, in pages of 4: every device exactly once, in order
    // (unnamed first), and the same set the other way round.
    let (asc, pages) = names_in_order(&g, "sort=name&limit=4").await;
    assert_eq!(pages, 7);
    assert_eq!(asc.len(), 25);
    assert_eq!(asc.iter().collect::<HashSet<_>>().len(), 25);
    assert_eq!(
        &asc[..5],
        ["dev-00", "dev-05", "dev-10", "dev-15", "dev-20"]
    );
    assert_eq!(asc[5], "dev-24", "Site 06 is the first name");
    let (desc, _) = names_in_order(&g, "sort=-name&limit=4").await;
    assert_eq!(
        desc.iter().rev().collect::<Vec<_>>(),
        asc.iter().collect::<Vec<_>>()
    );

    // Status sort (problems first) with a filter, and a status filter with
    // a search.
    let (by_status, _) = names_in_order(&g, "sort=-status&limit=3").await;
    assert_eq!(by_status.len(), 25);
    let (heartbeat_only, _) = names_in_order(&g, "status=reduced-functionality&sort=name").await;
    assert_eq!(heartbeat_only, ["dev-07", "dev-03"]);
    let (hb, _) = names_in_order(&g, "status_detail=heartbeat-only&q=dev-0").await;
    assert_eq!(hb, ["dev-03", "dev-07"]);
    let (recent, _) = names_in_order(&g, "sort=-heartbeat&limit=2").await;
    assert!(
        ["dev-03", "dev-07"].contains(&recent[0].as_str()),
        "{recent:?}"
    );

    // Bad parameters say what is wrong.
    for (q, field) in [
        ("sort=colour", "sort"),
        ("sort=name&after=not-a-cursor", "after"),
        ("q=", ""),
        ("limit=0", "limit"),
    ] {
        let (st, b) = g.call("GET", &format!("/v1/devices?{q}"), None).await;
        if field.is_empty() {
            assert_eq!(st, 200, "an empty q is no filter");
            continue;
        }
        assert_eq!(st, 400, "{q}: {b}");
        assert_eq!(b["field"], field, "{b}");
    }
    let (st, b) = g.call("GET", "/v1/devices?sort=name&limit=2", None).await;
    assert_eq!(st, 200);
    let cursor = b["next"].as_str().unwrap().to_string();
    let (st, b) = g
        .call(
            "GET",
            &format!("/v1/devices?sort=-rx_bytes&after={cursor}"),
            None,
        )
        .await;
    assert_eq!(st, 400, "a cursor from another sort: {b}");
    let long = "x".repeat(200);
    let (st, b) = g.call("GET", &format!("/v1/devices?q={long}"), None).await;
    assert_eq!((st, b["field"].as_str()), (400, Some("q")));
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summary_counts_and_sessions() {
    let mut g = TestGateway::start().await;
    for i in 0..3 {
        let key = cloudlink::keys::public_key(&cloudlink::keys::generate_private_key());
        g.register(&format!("sum-{i}"), &key).await;
    }
    let (st, _) = g.call("POST", "/v1/devices/sum-1/heartbeat", None).await;
    assert_eq!(st, 200);
    let (st, b) = g.call("GET", "/v1/summary", None).await;
    assert_eq!(st, 200);
    assert_eq!(b["devices"], 3);
    assert_eq!(b["by_status"]["configuring"], 2);
    assert_eq!(b["by_status"]["reduced-functionality"], 1);
    assert_eq!(b["by_status_detail"]["heartbeat-only"], 1);
    assert_eq!(b["sessions"], 0);
    assert_eq!(b["gateway_id"], "test-gw");
    assert!(b["proxy"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(b["handshakes_per_s"].is_number());
    g.stop().await;
}
