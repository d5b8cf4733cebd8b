//! Interop: an unmodified WireGuard peer (Debian's `wireguard-go`, set up
//! with `wg` from the `wg_quick` text the API hands out) in a network
//! namespace joined to the gateway by a veth pair in 198.18.0.0/15.
//!
//! Needs root, `ip`, `wireguard-go` and `wg`; the README's test command and
//! `.ci/run` install them. This test installs nothing and fails (does not
//! skip) when they are missing.

mod common;

use common::netns::*;
use common::*;
use std::time::{Duration, Instant};

#[test]
fn keys_are_interchangeable_with_wg() {
    let ours = run(env!("CARGO_BIN_EXE_cloudlink"), &["genkey"]);
    assert_eq!(
        run_stdin("wg", &["pubkey"], &ours),
        run_stdin(env!("CARGO_BIN_EXE_cloudlink"), &["pubkey"], &ours)
    );
    let theirs = run("wg", &["genkey"]);
    assert_eq!(
        run_stdin("wg", &["pubkey"], &theirs),
        run_stdin(env!("CARGO_BIN_EXE_cloudlink"), &["pubkey"], &theirs)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wireguard_go_device_connects_and_disconnects() {
    let tag = format!("{}", std::process::id() % 100_000);
    let subnet = (std::process::id() % 150 + 20) as u8;
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.link_timeout = Duration::from_secs(3);
    // Listen on every address: the device reaches us over the veth.
    let mut g = TestGateway::start_in(dir, c, "0.0.0.0:0").await;
    let mut events = g.events(None).await;
    let mut dev = WgGoDevice::start(&g, "wggo-1", &tag, subnet).await;

    // The handshake completes: wg reports it in the namespace...
    dev.wait_handshake();
    // ...link.up arrives on the event stream...
    let up = events
        .wait_for(Duration::from_secs(20), |e| e["type"] == "link.up")
        .await;
    assert_eq!(up.data["device"], "wggo-1");
    assert_eq!(up.data["endpoint"], dev.endpoint);
    // ...and the gateway reports the device connected at that endpoint.
    let d = g.device("wggo-1").await;
    assert_eq!(d["cloudlink"]["connected"], true, "{d}");
    assert_eq!(d["cloudlink"]["endpoint"], dev.endpoint);
    // `ping` from the device checks cloudlink: the gateway answers ICMP echo
    // on its tunnel address.
    let gw_addr = d["gateway"]["address"].as_str().unwrap().to_owned();
    let out = dev.ns.exec(&["ping", "-c", "2", "-W", "2", &gw_addr]);
    assert!(out.contains("2 received"), "{out}");

    // The device stops: link.down follows after the link timeout.
    dev.stop();
    let down = events
        .wait_for(Duration::from_secs(20), |e| e["type"] == "link.down")
        .await;
    assert_eq!(down.data["device"], "wggo-1");
    assert_eq!(down.data["reason"], "timeout");
    assert_eq!(g.device("wggo-1").await["cloudlink"]["connected"], false);
    g.stop().await;
}

/// Device status with a real device: its two links (wireguard-go for
/// cloudlink, heartbeats through the API as the fleet API forwards them) go
/// up and down, and `status.changed` follows on the event stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wireguard_go_device_status_follows_both_links() {
    let tag = format!("s{}", std::process::id() % 10_000);
    let subnet = (std::process::id() % 60 + 180) as u8;
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.link_timeout = Duration::from_secs(3);
    c.heartbeat_grace = Duration::from_secs(2);
    let mut g = TestGateway::start_in(dir, c, "0.0.0.0:0").await;
    let mut events = g.events(None).await;
    let status_change = |e: &serde_json::Value| e["type"] == "status.changed";
    let pair = |e: &serde_json::Value, k: &str| {
        (
            e[k]["status"].as_str().unwrap().to_owned(),
            e[k]["detail"].as_str().map(str::to_owned),
        )
    };
    let s = |st: &str, d: Option<&str>| (st.to_owned(), d.map(str::to_owned));

    let mut dev = WgGoDevice::start(&g, "wggo-status", &tag, subnet).await;
    // Cloudlink up, heartbeat unknown: reachable, but no heartbeat yet.
    let m = events
        .wait_for(Duration::from_secs(20), status_change)
        .await;
    assert_eq!(pair(&m.data, "from"), s("configuring", None));
    assert_eq!(
        pair(&m.data, "to"),
        s("reduced-functionality", Some("cloudlink-only"))
    );
    assert_eq!(m.data["device"], "wggo-status");
    assert_eq!(m.data["reason"], "link.up");
    assert_eq!(m.data["endpoint"], dev.endpoint);

    // The first heartbeat, announcing a 4 s poll interval: operational.
    let (st, hb) = g
        .call(
            "POST",
            "/v1/devices/wggo-status/heartbeat",
            Some(serde_json::json!({"poll_interval_s": 4})),
        )
        .await;
    assert_eq!(st, 200, "{hb}");
    assert_eq!(hb["status"], "operational");
    let m = events
        .wait_for(Duration::from_secs(10), status_change)
        .await;
    assert_eq!(pair(&m.data, "to"), s("operational", None));
    let heartbeat_at = Instant::now();

    // Power off. Cloudlink goes down after the 3 s link timeout while the
    // heartbeat still counts as online: heartbeat-only.
    dev.stop();
    let m = events
        .wait_for(Duration::from_secs(20), status_change)
        .await;
    assert_eq!(pair(&m.data, "from"), s("operational", None));
    assert_eq!(
        pair(&m.data, "to"),
        s("reduced-functionality", Some("heartbeat-only"))
    );
    assert_eq!(m.data["cloudlink"], false);
    let d = g.device("wggo-status").await;
    assert_eq!(d["heartbeat"]["state"], "online", "{d}");

    // 1.5 x 4 s after the heartbeat it turns timeout (no status change),
    // and 2 s later offline: only then disconnected.
    let m = events
        .wait_for(Duration::from_secs(20), status_change)
        .await;
    assert_eq!(
        pair(&m.data, "from"),
        s("reduced-functionality", Some("heartbeat-only"))
    );
    assert_eq!(pair(&m.data, "to"), s("disconnected", None));
    assert_eq!(m.data["heartbeat"], "offline");
    assert_eq!(m.data["reason"], "heartbeat_offline");
    assert!(
        heartbeat_at.elapsed() >= Duration::from_secs(7),
        "disconnected only after 1.5 x poll interval + grace"
    );
    let d = g.device("wggo-status").await;
    assert_eq!(d["status"], "disconnected");
    assert_eq!(d["heartbeat"]["state"], "offline");
    g.stop().await;
}

/// An immediate action reaches a plain HTTP server on port 48484 of the
/// tunnel address inside the wireguard-go namespace, in the supervisor's
/// dialect (a kernel TCP stack and an HTTP server the gateway did not write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_reaches_a_supervisor_behind_wireguard_go() {
    let tag = format!("a{}", std::process::id() % 10_000);
    let subnet = (std::process::id() % 9 + 240) as u8;
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.link_timeout = Duration::from_secs(60);
    let mut g = TestGateway::start_in(dir, c, "0.0.0.0:0").await;
    let mut events = g.events(None).await;
    let mut dev = WgGoDevice::start(&g, "wggo-act", &tag, subnet).await;
    dev.wait_handshake();
    events
        .wait_for(Duration::from_secs(20), |e| e["type"] == "link.up")
        .await;

    let out = tempfile::tempdir().unwrap();
    let log = out.path().join("request.json");
    dev.start_supervisor(&log);

    let (st, d) = g
        .call(
            "PATCH",
            "/v1/devices/wggo-act",
            Some(serde_json::json!({"device_api_key": "sv-key-42", "app_id": 3})),
        )
        .await;
    assert_eq!(st, 200, "{d}");
    let r = g
        .http
        .post(g.url("/v1/devices/wggo-act/actions/restart"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"force": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["x-cloudlink-source"], "device");
    let b: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        b["device_body"],
        serde_json::json!({"Data": "OK", "Error": null})
    );
    let seen: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&log).unwrap()).unwrap();
    assert_eq!(seen["path"], "/v1/restart");
    assert_eq!(seen["auth"], "Bearer sv-key-42");
    assert_eq!(seen["body"], serde_json::json!({"appId": 3, "force": true}));
    g.stop().await;
}

/// An unmodified wireguard-go device, idle, is back within seconds after a
/// gateway restart: the gateway redials it from the endpoint it persisted
/// (wireguard-go alone would wait for its 120 s rekey).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wireguard_go_is_back_within_seconds_after_a_gateway_restart() {
    let tag = format!("r{}", std::process::id() % 10_000);
    let subnet = (std::process::id() % 6 + 249) as u8;
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.link_timeout = Duration::from_secs(30);
    let mut g = TestGateway::start_in(dir, c.clone(), "0.0.0.0:0").await;
    let port = g.udp.port();
    let mut events = g.events(None).await;
    let dev = WgGoDevice::start(&g, "wggo-redial", &tag, subnet).await;
    dev.wait_handshake();
    events
        .wait_for(Duration::from_secs(20), |e| e["type"] == "link.up")
        .await;
    let before = dev
        .ns
        .exec(&["wg", "show", &dev.iface, "latest-handshakes"]);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    g.stop().await;

    let dir = std::mem::replace(&mut g.dir, tempfile::tempdir().unwrap());
    let t = std::time::Instant::now();
    let mut g = TestGateway::start_in(dir, c, &format!("0.0.0.0:{port}")).await;
    // The redial starts with the gateway, and wireguard-go answers within a
    // millisecond: the link may be up before a subscription to the event
    // stream could see it, so ask for the device instead, and read the
    // stream from the start of this boot.
    assert!(
        eventually(Duration::from_secs(20), async || {
            g.device("wggo-redial").await["cloudlink"]["connected"] == true
        })
        .await,
        "wireguard-go did not come back"
    );
    let back = t.elapsed();
    let (_, listing) = g.call("GET", "/v1/devices", None).await;
    let epoch = listing["as_of"]
        .as_str()
        .unwrap()
        .split('-')
        .next()
        .unwrap()
        .to_owned();
    let mut events = g.events(Some(&format!("{epoch}-0"))).await;
    let up = events
        .wait_for(Duration::from_secs(5), |e| e["type"] == "link.up")
        .await;
    assert_eq!(up.data["device"], "wggo-redial");
    assert_eq!(up.data["endpoint"], dev.endpoint);
    println!(
        "wireguard-go back {:.2} s after the restart",
        back.as_secs_f64()
    );
    assert!(back < Duration::from_secs(15), "back after {back:?}");
    // A new handshake, seen from the device's side too, and traffic flows.
    let after = dev
        .ns
        .exec(&["wg", "show", &dev.iface, "latest-handshakes"]);
    assert_ne!(before, after, "wg reports a new handshake");
    let gw_addr = g.device("wggo-redial").await["gateway"]["address"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = dev.ns.exec(&["ping", "-c", "1", "-W", "2", &gw_addr]);
    assert!(out.contains("1 received"), "{out}");
    g.stop().await;
}

/// wireguard-go as an initiator against a gateway under load: it gets a
/// cookie reply, retries with mac2, and the gateway admits it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wireguard_go_handshakes_through_cookie_replies_under_load() {
    let tag = format!("k{}", std::process::id() % 10_000);
    let subnet = (std::process::id() % 200 + 256) as u16;
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    // Under load from the second initiation of a second on.
    c.handshake_rate_limit = 1;
    let mut g = TestGateway::start_in(dir, c, "0.0.0.0:0").await;
    let gw_key = g.gw().path.public_key().to_bytes();
    // Keep the gateway under load: initiations with a valid mac1 from an
    // unregistered key, 200 a second, from loopback. After each once-a-second
    // reset of the rate window only the first few milliseconds admit an
    // initiation without mac2, so wireguard-go connects only if it takes
    // the cookie and retries with a mac2 the gateway accepts.
    let udp = std::net::SocketAddr::from(([127, 0, 0, 1], g.udp.port()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut noise = TestDevice::new(udp, &gw_key, 77);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                noise.send_initiation();
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut events = g.events(None).await;
    let t = std::time::Instant::now();
    let dev = WgGoDevice::start(&g, "wggo-cookie", &tag, subnet).await;
    dev.wait_handshake();
    println!(
        "wireguard-go connected under load after {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let up = events
        .wait_for(Duration::from_secs(30), |e| e["type"] == "link.up")
        .await;
    assert_eq!(up.data["device"], "wggo-cookie");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flood.join().unwrap();
    let cookies = g
        .metric("cloudlink_handshakes_total{result=\"cookie\"}")
        .await;
    assert!(cookies >= 1.0, "the gateway answered cookie replies");
    assert_eq!(
        g.device("wggo-cookie").await["cloudlink"]["connected"],
        true
    );
    g.stop().await;
}
