//! Device status through the API: heartbeats (single and batch), the derived
//! status in listings, filters, settings, persistence across a restart.

mod common;

use cloudlink::keys::{generate_private_key, public_key};
use common::*;
use serde_json::{json, Value};
use std::time::Duration;

fn assert_error(status: u16, body: &Value, want: u16, code: &str, field: &str) {
    assert_eq!(status, want, "{body}");
    assert_eq!(body["error"], code, "{body}");
    assert_eq!(body["field"], field, "{body}");
    assert!(body["message"].as_str().unwrap().len() > 10);
}

async fn register(g: &TestGateway, uuid: &str) {
    g.register(uuid, &public_key(&generate_private_key())).await;
}

#[tokio::test]
async fn heartbeat_endpoint_and_its_errors() {
    let mut g = TestGateway::start().await;
    register(&g, "hb-1").await;
    let d = g.device("hb-1").await;
    assert_eq!(d["status"], "configuring");
    assert_eq!(d["status_detail"], Value::Null);
    assert_eq!(d["heartbeat"]["state"], "unknown");
    assert_eq!(d["heartbeat"]["last_at"], Value::Null);
    assert_eq!(d["heartbeat"]["poll_interval_s"], 900);
    assert_eq!(d["cloudlink_enabled"], true);

    let (st, b) = g.call("POST", "/v1/devices/hb-1/heartbeat", None).await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["heartbeat"]["state"], "online");
    assert!(b["heartbeat"]["last_at"].is_string());
    assert_eq!(b["status"], "reduced-functionality");
    assert_eq!(b["status_detail"], "heartbeat-only");
    assert_eq!(b["cloudlink"]["connected"], false);

    let mut events = g.events(None).await;
    let (st, b) = g
        .call(
            "POST",
            "/v1/devices/hb-1/heartbeat",
            Some(json!({"poll_interval_s": 60})),
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(b["heartbeat"]["poll_interval_s"], 60);
    assert_eq!(g.device("hb-1").await["heartbeat"]["poll_interval_s"], 60);
    // A new interval is a setting change like any other: device.updated.
    let wait = Duration::from_secs(10);
    let e = events
        .wait_for(wait, |e| e["type"] == "device.updated")
        .await;
    assert_eq!(e.data["device"], "hb-1");
    assert_eq!(e.data["changed"], json!(["poll_interval_s"]));
    assert_eq!(e.data["poll_interval_s"], 60);
    // The same interval again is only a heartbeat: the next device.updated
    // is the rename after it.
    let (st, _) = g
        .call(
            "POST",
            "/v1/devices/hb-1/heartbeat",
            Some(json!({"poll_interval_s": 60})),
        )
        .await;
    assert_eq!(st, 200);
    let (st, _) = g
        .call("PATCH", "/v1/devices/hb-1", Some(json!({"name": "hb"})))
        .await;
    assert_eq!(st, 200);
    let e = events
        .wait_for(wait, |e| e["type"] == "device.updated")
        .await;
    assert_eq!(e.data["changed"], json!(["name"]));

    let (st, e) = g.call("POST", "/v1/devices/nobody/heartbeat", None).await;
    assert_error(st, &e, 404, "device_not_found", "uuid");
    for bad in [
        json!({"poll_interval_s": 0}),
        json!({"poll_interval_s": -5}),
        json!({"poll_interval_s": "60"}),
        json!({"poll_interval_s": 1e12}),
    ] {
        let (st, e) = g
            .call("POST", "/v1/devices/hb-1/heartbeat", Some(bad))
            .await;
        assert_error(st, &e, 400, "invalid_field", "poll_interval_s");
    }
    let (st, e) = g
        .call(
            "POST",
            "/v1/devices/hb-1/heartbeat",
            Some(json!({"interval": 5})),
        )
        .await;
    assert_error(st, &e, 400, "invalid_field", "interval");
    // Refused requests changed nothing.
    assert_eq!(g.device("hb-1").await["heartbeat"]["poll_interval_s"], 60);
    g.stop().await;
}

#[tokio::test]
async fn batch_heartbeats_report_unknown_uuids() {
    let mut g = TestGateway::start().await;
    register(&g, "b-1").await;
    register(&g, "b-2").await;
    register(&g, "b-3").await;
    let (st, b) = g
        .call(
            "POST",
            "/v1/heartbeats",
            Some(json!({"uuids": ["b-1", "ghost", "b-3", "NOT-VALID"]})),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["applied"], 2);
    assert_eq!(b["unknown"], json!(["ghost", "NOT-VALID"]));
    assert_eq!(g.device("b-1").await["heartbeat"]["state"], "online");
    assert_eq!(g.device("b-2").await["heartbeat"]["state"], "unknown");
    assert_eq!(g.device("b-3").await["heartbeat"]["state"], "online");

    let (st, e) = g.call("POST", "/v1/heartbeats", Some(json!({}))).await;
    assert_error(st, &e, 400, "invalid_field", "uuids");
    let (st, e) = g
        .call("POST", "/v1/heartbeats", Some(json!({"uuids": "b-1"})))
        .await;
    assert_error(st, &e, 400, "invalid_field", "uuids");
    let (st, e) = g
        .call("POST", "/v1/heartbeats", Some(json!({"uuids": ["b-1", 7]})))
        .await;
    assert_error(st, &e, 400, "invalid_field", "uuids[1]");
    let many: Vec<String> = (0..10_001).map(|i| format!("x{i}")).collect();
    let (st, e) = g
        .call("POST", "/v1/heartbeats", Some(json!({"uuids": many})))
        .await;
    assert_error(st, &e, 400, "invalid_field", "uuids");
    let (st, e) = g
        .call(
            "POST",
            "/v1/heartbeats",
            Some(json!({"uuids": [], "extra": 1})),
        )
        .await;
    assert_error(st, &e, 400, "invalid_field", "extra");
    g.stop().await;
}

#[tokio::test]
async fn listing_filters_by_status() {
    let mut g = TestGateway::start().await;
    for i in 0..30 {
        register(&g, &format!("f{i:02}")).await;
    }
    let beating: Vec<String> = (0..30).step_by(3).map(|i| format!("f{i:02}")).collect();
    let (st, _) = g
        .call("POST", "/v1/heartbeats", Some(json!({"uuids": beating})))
        .await;
    assert_eq!(st, 200);

    // Page through the filtered listing 4 at a time.
    let mut got = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let q = match &after {
            Some(a) => format!("/v1/devices?status=reduced-functionality&limit=4&after={a}"),
            None => "/v1/devices?status=reduced-functionality&limit=4".into(),
        };
        let (st, page) = g.call("GET", &q, None).await;
        assert_eq!(st, 200, "{page}");
        for d in page["devices"].as_array().unwrap() {
            assert_eq!(d["status"], "reduced-functionality");
            assert_eq!(d["status_detail"], "heartbeat-only");
            got.push(d["uuid"].as_str().unwrap().to_owned());
        }
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_owned()),
            None => break,
        }
    }
    assert_eq!(got, beating);
    let (_, page) = g
        .call("GET", "/v1/devices?status=configuring&limit=1000", None)
        .await;
    assert_eq!(page["devices"].as_array().unwrap().len(), 20);
    let (_, page) = g
        .call("GET", "/v1/devices?status_detail=heartbeat-only", None)
        .await;
    assert_eq!(page["devices"].as_array().unwrap().len(), 10);
    let (_, page) = g.call("GET", "/v1/devices?status=operational", None).await;
    assert_eq!(page["devices"], json!([]));
    assert_eq!(page["next"], Value::Null);

    let (st, e) = g.call("GET", "/v1/devices?status=online", None).await;
    assert_error(st, &e, 400, "invalid_field", "status");
    let (st, e) = g
        .call("GET", "/v1/devices?status_detail=sleepy", None)
        .await;
    assert_error(st, &e, 400, "invalid_field", "status_detail");

    assert_eq!(
        g.metric("cloudlink_devices_by_status{status=\"configuring\"}")
            .await,
        20.0
    );
    assert_eq!(
        g.metric("cloudlink_devices_by_status{status=\"reduced-functionality\"}")
            .await,
        10.0
    );
    assert_eq!(
        g.metric("cloudlink_devices_by_status{status=\"operational\"}")
            .await,
        0.0
    );
    assert_eq!(
        g.metric("cloudlink_devices_by_status{status=\"disconnected\"}")
            .await,
        0.0
    );
    g.stop().await;
}

#[tokio::test]
async fn patch_status_settings_and_errors() {
    let mut g = TestGateway::start().await;
    register(&g, "p-1").await;
    let mut events = g.events(None).await;
    let (st, d) = g
        .call(
            "PATCH",
            "/v1/devices/p-1",
            Some(json!({"cloudlink_enabled": false, "poll_interval_s": 120})),
        )
        .await;
    assert_eq!(st, 200, "{d}");
    assert_eq!(d["cloudlink_enabled"], false);
    assert_eq!(d["heartbeat"]["poll_interval_s"], 120);
    assert_eq!(d["status"], "configuring");
    // With cloudlink off, a heartbeat alone makes the device operational.
    let (_, b) = g.call("POST", "/v1/devices/p-1/heartbeat", None).await;
    assert_eq!(b["status"], "operational");
    let m = events
        .wait_for(Duration::from_secs(5), |e| e["type"] == "status.changed")
        .await;
    assert_eq!(
        m.data["from"],
        json!({"status": "configuring", "detail": null})
    );
    assert_eq!(
        m.data["to"],
        json!({"status": "operational", "detail": null})
    );
    assert_eq!(m.data["device"], "p-1");
    assert_eq!(m.data["gateway"], "test-gw");
    // The common fields of every event, status.changed included.
    assert_eq!(m.data["reason"], "heartbeat");
    assert_eq!(
        m.data["endpoint"],
        serde_json::Value::Null,
        "no session, no endpoint"
    );
    assert!(m.data["id"].is_u64() && m.data["epoch"].is_string() && m.data["at"].is_string());
    // Turning cloudlink back on: the link is down, so heartbeat-only.
    let (_, d) = g
        .call(
            "PATCH",
            "/v1/devices/p-1",
            Some(json!({"cloudlink_enabled": true})),
        )
        .await;
    assert_eq!(d["status_detail"], "heartbeat-only");
    let m = events
        .wait_for(Duration::from_secs(5), |e| e["type"] == "status.changed")
        .await;
    assert_eq!(
        m.data["to"],
        json!({"status": "reduced-functionality", "detail": "heartbeat-only"})
    );
    // Back to the gateway's default interval.
    let (_, d) = g
        .call(
            "PATCH",
            "/v1/devices/p-1",
            Some(json!({"poll_interval_s": null})),
        )
        .await;
    assert_eq!(d["heartbeat"]["poll_interval_s"], 900);

    let (st, e) = g
        .call(
            "PATCH",
            "/v1/devices/p-1",
            Some(json!({"cloudlink_enabled": "no"})),
        )
        .await;
    assert_error(st, &e, 400, "invalid_field", "cloudlink_enabled");
    let (st, e) = g
        .call(
            "PATCH",
            "/v1/devices/p-1",
            Some(json!({"poll_interval_s": 0})),
        )
        .await;
    assert_error(st, &e, 400, "invalid_field", "poll_interval_s");
    let (st, e) = g
        .call("PATCH", "/v1/devices/p-1", Some(json!({"heartbeat": {}})))
        .await;
    assert_error(st, &e, 400, "invalid_field", "heartbeat");
    assert_eq!(g.device("p-1").await["cloudlink_enabled"], true);
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_inputs_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path());
    let mut g = TestGateway::start_in(dir, c.clone(), "127.0.0.1:0").await;
    register(&g, "keep-1").await;
    register(&g, "keep-2").await;
    let (_, b) = g
        .call(
            "POST",
            "/v1/devices/keep-1/heartbeat",
            Some(json!({"poll_interval_s": 3600})),
        )
        .await;
    let last_at = b["heartbeat"]["last_at"].clone();
    let (_, _) = g
        .call(
            "PATCH",
            "/v1/devices/keep-2",
            Some(json!({"cloudlink_enabled": false})),
        )
        .await;
    g.stop().await;
    let dir = std::mem::replace(&mut g.dir, tempfile::tempdir().unwrap());
    let mut g = TestGateway::start_in(dir, c, "127.0.0.1:0").await;
    let d = g.device("keep-1").await;
    assert_eq!(
        d["status"], "reduced-functionality",
        "not back to configuring: {d}"
    );
    assert_eq!(d["heartbeat"]["state"], "online");
    assert_eq!(d["heartbeat"]["last_at"], last_at);
    assert_eq!(d["heartbeat"]["poll_interval_s"], 3600);
    assert_eq!(g.device("keep-2").await["cloudlink_enabled"], false);
    g.stop().await;
}
