//! The control API: every answer the gateway gives itself, errors included.

mod common;

use cloudlink::keys::{encode_key, generate_private_key, public_key};
use common::*;
use serde_json::{json, Value};
use std::time::Duration;

fn key() -> String {
    encode_key(&public_key(&generate_private_key()))
}

fn assert_error(status: u16, body: &Value, want_status: u16, code: &str, field: Option<&str>) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| m.len() > 10),
        "a message for a person: {body}"
    );
    match field {
        Some(f) => assert_eq!(body["field"], f, "{body}"),
        None => assert!(body.get("field").is_none(), "{body}"),
    }
}

#[tokio::test]
async fn auth_is_required_on_v1_only() {
    let mut g = TestGateway::start().await;
    let r = g.http.get(g.url("/v1/devices")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let b: Value = r.json().await.unwrap();
    assert_error(401, &b, 401, "unauthorized", None);
    let r = g
        .http
        .get(g.url("/v1/devices"))
        .bearer_auth("wrong-token-wrong-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = g.http.get(g.url("/v1/events")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    for p in ["/healthz", "/readyz", "/metrics"] {
        let r = g.http.get(g.url(p)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{p}");
    }
    g.stop().await;
}

#[tokio::test]
async fn registration_answers_and_errors() {
    let mut g = TestGateway::start().await;
    let k = key();
    let (st, b) = g
        .call(
            "POST",
            "/v1/devices",
            Some(json!({"uuid": "dev-1", "public_key": k, "name": "kiosk 1"})),
        )
        .await;
    assert_eq!(st, 201, "{b}");
    assert_eq!(b["uuid"], "dev-1");
    assert_eq!(b["public_key"], k);
    assert_eq!(b["name"], "kiosk 1");
    assert_eq!(b["address"], "10.240.0.2");
    assert_eq!(b["gateway"]["address"], "10.240.0.1");
    assert_eq!(b["gateway"]["endpoint"], "127.0.0.1:51820");
    let wg = b["wg_quick"].as_str().unwrap();
    assert!(
        wg.contains("[Interface]\nPrivateKey = <DEVICE_PRIVATE_KEY>\nAddress = 10.240.0.2/32\n"),
        "{wg}"
    );
    assert!(wg.contains(&format!(
        "[Peer]\nPublicKey = {}\n",
        b["gateway"]["public_key"].as_str().unwrap()
    )));
    assert!(
        wg.contains(
            "Endpoint = 127.0.0.1:51820\nAllowedIPs = 10.240.0.1/32\nPersistentKeepalive = 25\n"
        ),
        "{wg}"
    );

    // Same key again: 200, same answer.
    let (st, b2) = g
        .call(
            "POST",
            "/v1/devices",
            Some(json!({"uuid": "dev-1", "public_key": k})),
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(b2["address"], b["address"]);
    // Another key for that uuid: 409.
    let (st, e) = g
        .call(
            "POST",
            "/v1/devices",
            Some(json!({"uuid": "dev-1", "public_key": key()})),
        )
        .await;
    assert_error(st, &e, 409, "uuid_taken", Some("uuid"));
    // That key under another uuid: 409.
    let (st, e) = g
        .call(
            "POST",
            "/v1/devices",
            Some(json!({"uuid": "dev-2", "public_key": k})),
        )
        .await;
    assert_error(st, &e, 409, "public_key_taken", Some("public_key"));

    let bad: &[(Value, &str)] = &[
        (json!({"public_key": key()}), "uuid"),
        (json!({"uuid": "", "public_key": key()}), "uuid"),
        (json!({"uuid": "UPPER", "public_key": key()}), "uuid"),
        (json!({"uuid": "a_b", "public_key": key()}), "uuid"),
        (json!({"uuid": "a".repeat(64), "public_key": key()}), "uuid"),
        (json!({"uuid": 5, "public_key": key()}), "uuid"),
        (json!({"uuid": "ok"}), "public_key"),
        (json!({"uuid": "ok", "public_key": "short"}), "public_key"),
        (
            json!({"uuid": "ok", "public_key": "!".repeat(44)}),
            "public_key",
        ),
        (json!({"uuid": "ok", "public_key": 1}), "public_key"),
        (
            json!({"uuid": "ok", "public_key": key(), "name": 3}),
            "name",
        ),
        (
            json!({"uuid": "ok", "public_key": key(), "name": "a\u{7}b"}),
            "name",
        ),
        (
            json!({"uuid": "ok", "public_key": key(), "colour": "red"}),
            "colour",
        ),
    ];
    for (body, field) in bad {
        let (st, e) = g.call("POST", "/v1/devices", Some(body.clone())).await;
        assert_error(st, &e, 400, "invalid_field", Some(field));
    }
    // Not JSON, not an object.
    for raw in ["{not json", "[1,2]", ""] {
        let r = g
            .http
            .post(g.url("/v1/devices"))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        let st = r.status().as_u16();
        let e: Value = r.json().await.unwrap();
        assert_error(st, &e, 400, "invalid_json", None);
    }
    // Nothing of the refused requests was stored.
    let (_, list) = g.call("GET", "/v1/devices", None).await;
    assert_eq!(list["devices"].as_array().unwrap().len(), 1);
    g.stop().await;
}

#[tokio::test]
async fn batch_registration() {
    let mut g = TestGateway::start().await;
    let shared = key();
    let (st, b) = g
        .call(
            "POST",
            "/v1/devices/batch",
            Some(json!({"devices": [
                {"uuid": "b-1", "public_key": key()},
                {"uuid": "b-2", "public_key": shared},
                {"uuid": "b-3", "public_key": shared},
                {"uuid": "BAD", "public_key": key()},
                "not an object",
                {"uuid": "b-1", "public_key": key()},
            ]})),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    let r = b["results"].as_array().unwrap();
    assert_eq!(b["created"], 2);
    assert_eq!(r[0]["status"], 201);
    assert_eq!(r[0]["address"], "10.240.0.2");
    assert_eq!(r[1]["status"], 201);
    assert_eq!(r[2]["status"], 409);
    assert_eq!(r[2]["error"]["field"], "devices[2].public_key");
    assert_eq!(r[3]["status"], 400);
    assert_eq!(r[3]["error"]["field"], "devices[3].uuid");
    assert_eq!(r[4]["status"], 400);
    assert_eq!(r[4]["error"]["field"], "devices[4]");
    assert_eq!(r[5]["status"], 409);
    assert_eq!(r[5]["error"]["error"], "uuid_taken");

    let (st, e) = g
        .call("POST", "/v1/devices/batch", Some(json!({"devices": {}})))
        .await;
    assert_error(st, &e, 400, "invalid_field", Some("devices"));
    let (st, e) = g.call("POST", "/v1/devices/batch", Some(json!({}))).await;
    assert_error(st, &e, 400, "invalid_field", Some("devices"));
    let (st, e) = g
        .call(
            "POST",
            "/v1/devices/batch",
            Some(json!({"devices": [], "x": 1})),
        )
        .await;
    assert_error(st, &e, 400, "invalid_field", Some("x"));
    let too_many: Vec<Value> = (0..10_001)
        .map(|i| json!({"uuid": format!("m{i}"), "public_key": "x"}))
        .collect();
    let (st, e) = g
        .call(
            "POST",
            "/v1/devices/batch",
            Some(json!({"devices": too_many})),
        )
        .await;
    assert_error(st, &e, 400, "invalid_field", Some("devices"));
    g.stop().await;
}

#[tokio::test]
async fn listing_pages_and_errors() {
    let mut g = TestGateway::start().await;
    let devices: Vec<Value> = (0..25)
        .map(|i| json!({"uuid": format!("d{i:02}"), "public_key": key()}))
        .collect();
    let (st, _) = g
        .call(
            "POST",
            "/v1/devices/batch",
            Some(json!({"devices": devices})),
        )
        .await;
    assert_eq!(st, 200);
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(a) => format!("/v1/devices?limit=10&after={a}"),
            None => "/v1/devices?limit=10".into(),
        };
        let (st, page) = g.call("GET", &path, None).await;
        assert_eq!(st, 200, "{page}");
        // One event so far: the batch's device.registered.
        assert!(page["as_of"].as_str().unwrap().ends_with("-1"), "{page}");
        for d in page["devices"].as_array().unwrap() {
            assert_eq!(d["cloudlink"]["connected"], false);
            seen.push(d["uuid"].as_str().unwrap().to_owned());
        }
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_owned()),
            None => break,
        }
    }
    let want: Vec<String> = (0..25).map(|i| format!("d{i:02}")).collect();
    assert_eq!(seen, want);

    for q in ["limit=0", "limit=1001", "limit=abc", "limit=-1"] {
        let (st, e) = g.call("GET", &format!("/v1/devices?{q}"), None).await;
        assert_error(st, &e, 400, "invalid_field", Some("limit"));
    }
    let (st, e) = g.call("GET", "/v1/devices?sort=size", None).await;
    assert_error(st, &e, 400, "invalid_field", Some("sort"));
    let (st, e) = g.call("GET", "/v1/devices?colour=red", None).await;
    assert_error(st, &e, 400, "invalid_field", Some("colour"));
    g.stop().await;
}

/// `DELETE /v1/devices?prefix=`: every device whose uuid starts with a
/// non-empty prefix goes, each announced as `device.deleted`; no prefix, or
/// an empty one, is a 400 that deletes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_are_deleted_by_prefix() {
    let mut g = TestGateway::start().await;
    for u in ["lg-0000001", "lg-0000002", "lg0", "kiosk-1"] {
        g.register(u, &public_key(&generate_private_key())).await;
    }
    let mut events = g.events(None).await;
    for q in ["", "?prefix=", "?prefix=lg-&x=1"] {
        let (st, e) = g.call("DELETE", &format!("/v1/devices{q}"), None).await;
        assert_eq!(st, 400, "{q}: {e}");
    }
    let (st, r) = g.call("DELETE", "/v1/devices?prefix=lg-", None).await;
    assert_eq!((st, &r), (200, &json!({"deleted": 2, "prefix": "lg-"})));
    let (_, list) = g.call("GET", "/v1/devices", None).await;
    let mut left: Vec<&str> = list["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["uuid"].as_str().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["kiosk-1", "lg0"]);
    for u in ["lg-0000001", "lg-0000002"] {
        events
            .wait_for(Duration::from_secs(5), |e| {
                e["type"] == "device.deleted" && e["device"] == u
            })
            .await;
    }
    let (st, r) = g.call("DELETE", "/v1/devices?prefix=nothing-", None).await;
    assert_eq!((st, &r["deleted"]), (200, &json!(0)));
    g.stop().await;
}

/// `GET /v1/devices/{uuid}/wg-quick`: the device's config as a file, the
/// same text as the JSON's `wg_quick`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wg_quick_config_is_served_as_a_file() {
    let mut g = TestGateway::start().await;
    g.register("kiosk-7", &public_key(&generate_private_key()))
        .await;
    let r = reqwest::Client::new()
        .get(g.url("/v1/devices/kiosk-7/wg-quick"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"].to_str().unwrap(),
        "text/plain; charset=utf-8"
    );
    let text = r.text().await.unwrap();
    assert_eq!(
        text,
        g.device("kiosk-7").await["wg_quick"].as_str().unwrap()
    );
    assert!(
        text.starts_with("# cloudlink device kiosk-7\n[Interface]\n"),
        "{text}"
    );
    let (st, e) = g.call("GET", "/v1/devices/nope/wg-quick", None).await;
    assert_error(st, &e, 404, "device_not_found", Some("uuid"));
    g.stop().await;
}

#[tokio::test]
async fn single_device_patch_delete_and_unknown_routes() {
    let mut g = TestGateway::start().await;
    g.register("solo", &public_key(&generate_private_key()))
        .await;

    let (st, e) = g.call("GET", "/v1/devices/missing", None).await;
    assert_error(st, &e, 404, "device_not_found", Some("uuid"));
    let (st, e) = g.call("GET", "/v1/devices/Not_A_Uuid", None).await;
    assert_error(st, &e, 400, "invalid_field", Some("uuid"));

    let (st, d) = g
        .call(
            "PATCH",
            "/v1/devices/solo",
            Some(json!({"name": "front door"})),
        )
        .await;
    assert_eq!(st, 200, "{d}");
    assert_eq!(d["name"], "front door");
    assert_eq!(g.device("solo").await["name"], "front door");
    let (st, d) = g
        .call("PATCH", "/v1/devices/solo", Some(json!({"name": null})))
        .await;
    assert_eq!(st, 200);
    assert_eq!(d["name"], Value::Null);
    // The address and uuid stay; a key can change (see link_events), but
    // only to a valid one.
    let (st, e) = g
        .call(
            "PATCH",
            "/v1/devices/solo",
            Some(json!({"address": "10.240.0.9"})),
        )
        .await;
    assert_error(st, &e, 400, "invalid_field", Some("address"));
    let (st, e) = g
        .call(
            "PATCH",
            "/v1/devices/solo",
            Some(json!({"public_key": "not a key"})),
        )
        .await;
    assert_error(st, &e, 400, "invalid_field", Some("public_key"));
    let (st, e) = g
        .call("PATCH", "/v1/devices/solo", Some(json!({"nmae": "x"})))
        .await;
    assert_error(st, &e, 400, "invalid_field", Some("nmae"));
    let (st, e) = g
        .call("PATCH", "/v1/devices/solo", Some(json!({"name": ["x"]})))
        .await;
    assert_error(st, &e, 400, "invalid_field", Some("name"));
    let (st, e) = g
        .call("PATCH", "/v1/devices/missing", Some(json!({"name": "x"})))
        .await;
    assert_error(st, &e, 404, "device_not_found", Some("uuid"));
    // The refused patches changed nothing.
    assert_eq!(g.device("solo").await["name"], Value::Null);

    let (st, e) = g.call("DELETE", "/v1/devices/missing", None).await;
    assert_error(st, &e, 404, "device_not_found", Some("uuid"));
    let (st, _) = g.call("DELETE", "/v1/devices/solo", None).await;
    assert_eq!(st, 204);
    let (st, _) = g.call("GET", "/v1/devices/solo", None).await;
    assert_eq!(st, 404);

    let (st, e) = g.call("GET", "/v1/nothing-here", None).await;
    assert_error(st, &e, 404, "not_found", None);
    let (st, e) = g.call("PUT", "/v1/devices", Some(json!({}))).await;
    assert_error(st, &e, 405, "method_not_allowed", None);
    g.stop().await;
}

#[tokio::test]
async fn readyz_reports_ready_and_metrics_parse() {
    let mut g = TestGateway::start().await;
    let r: Value = g
        .http
        .get(g.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["status"], "ready");
    g.register("m1", &public_key(&generate_private_key())).await;
    assert_eq!(g.metric("cloudlink_devices_registered").await, 1.0);
    for name in [
        "cloudlink_sessions",
        "cloudlink_rx_bytes_total",
        "cloudlink_tx_bytes_total",
        "cloudlink_rx_packets_total",
        "cloudlink_tx_packets_total",
        "cloudlink_handshakes_total{result=\"completed\"}",
        "cloudlink_packets_dropped_total{reason=\"spoofed_source\"}",
        "cloudlink_link_events_total{type=\"link.up\"}",
    ] {
        assert_eq!(g.metric(name).await, 0.0, "{name}");
    }
    g.stop().await;
}

/// Names that reach hooks and screens (issue "Hold up under abuse"): a
/// `service_name` that a hook would read as an option or split is refused,
/// device names with direction overrides or zero-width characters are
/// refused, and a new uuid starts with a letter or digit. A device stored
/// before these rules still loads, is listed and can be looked up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_reach_hooks_and_screens_are_checked() {
    let mut g = TestGateway::start().await;
    for uuid in ["-rf", "---"] {
        let (st, b) = g
            .call(
                "POST",
                "/v1/devices",
                Some(json!({"uuid": uuid, "public_key": key()})),
            )
            .await;
        assert_error(st, &b, 400, "invalid_field", Some("uuid"));
    }
    for name in ["kiosk\u{202E}gpj.exe", "zero\u{200B}width", "tag\u{E0041}"] {
        let (st, b) = g
            .call(
                "POST",
                "/v1/devices",
                Some(json!({"uuid": "named", "public_key": key(), "name": name})),
            )
            .await;
        assert_error(st, &b, 400, "invalid_field", Some("name"));
    }
    let (st, _) = g
        .call(
            "POST",
            "/v1/devices",
            Some(json!({"uuid": "named", "public_key": key(), "name": "Kühlschrank 北 2"})),
        )
        .await;
    assert_eq!(st, 201);
    let (st, b) = g
        .call(
            "PATCH",
            "/v1/devices/named",
            Some(json!({"name": "a\u{2066}b"})),
        )
        .await;
    assert_error(st, &b, 400, "invalid_field", Some("name"));
    for bad in ["-rf", "a b", "svc;reboot", "line\nbreak", "", "ü"] {
        let (st, b) = g
            .call(
                "POST",
                "/v1/devices/named/actions/restart-service?queue_ttl=60",
                Some(json!({"service_name": bad, "app_id": 1})),
            )
            .await;
        assert_error(st, &b, 400, "invalid_field", Some("service_name"));
    }
    let (st, b) = g
        .call(
            "POST",
            "/v1/devices/named/actions/restart-service?queue_ttl=60",
            Some(json!({"service_name": "kiosk-ui.v2_1", "app_id": 1})),
        )
        .await;
    assert_eq!((st, &b["state"]), (202, &json!("queued")), "{b}");

    // Stored before the rules: still there, listed, and reachable.
    g.gw()
        .api_state
        .registry
        .register(cloudlink::registry::NewDevice {
            uuid: "-legacy".into(),
            public_key: public_key(&generate_private_key()),
            name: Some("old\u{202E}name".into()),
        })
        .unwrap();
    let (st, d) = g.call("GET", "/v1/devices/-legacy", None).await;
    assert_eq!(st, 200, "{d}");
    assert_eq!(d["name"], "old\u{202E}name");
    let (_, page) = g.call("GET", "/v1/devices?limit=100", None).await;
    assert!(page["devices"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["uuid"] == "-legacy"));
    g.stop().await;
}

/// Keys that can never work are refused (issue "Operate it"): the all-zero
/// key, other points of small order and the gateway's own public key, on
/// registration, in a batch and
/// in a key change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_that_can_never_work_are_refused() {
    let mut g = TestGateway::start().await;
    let own = encode_key(g.gw().path.public_key().as_bytes());
    let zero = encode_key(&[0u8; 32]);
    // Points of small order: u = 1 (order 4) and the order-8 point
    // 0xe0eb7a7c...b800 (from the usual X25519 blocklist).
    let mut one = [0u8; 32];
    one[0] = 1;
    let order8 = [
        0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4,
        0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49,
        0xb8, 0x00,
    ];
    let (one, order8) = (encode_key(&one), encode_key(&order8));
    for k in [&own, &zero, &one, &order8] {
        let (st, b) = g
            .call(
                "POST",
                "/v1/devices",
                Some(json!({"uuid": "bad-key", "public_key": k})),
            )
            .await;
        assert_error(st, &b, 400, "invalid_field", Some("public_key"));
    }
    let (st, b) = g
        .call(
            "POST",
            "/v1/devices/batch",
            Some(json!({"devices": [{"uuid": "ok-1", "public_key": key()}, {"uuid": "bad-2", "public_key": own}]})),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["results"][1]["status"], 400, "{b}");
    let (st, _) = g
        .call(
            "POST",
            "/v1/devices",
            Some(json!({"uuid": "good", "public_key": key()})),
        )
        .await;
    assert_eq!(st, 201);
    let (st, b) = g
        .call(
            "PATCH",
            "/v1/devices/good",
            Some(json!({"public_key": zero})),
        )
        .await;
    assert_error(st, &b, 400, "invalid_field", Some("public_key"));
    g.stop().await;
}

/// Action counters exist at 0 from the start (issue "Operate it"):
/// dashboards and alerts see 0, not "no data", before the first action.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn action_counters_are_there_before_the_first_action() {
    let mut g = TestGateway::start().await;
    let text = g.metrics().await;
    for series in [
        "cloudlink_actions_total{action=\"reboot\",result=\"device_answered\"} 0",
        "cloudlink_actions_total{action=\"restart-service\",result=\"queued\"} 0",
    ] {
        assert!(text.contains(series), "no `{series}`");
    }
    g.stop().await;
}
