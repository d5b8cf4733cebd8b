//! Cluster mode behind a real UDP load balancer (issue "Cluster mode, part
//! 2"): `deploy/cluster/run-local.sh` puts 3 NATS servers, two gateways and
//! an nftables balancer (DNAT by a hash of the source, health-checked, with
//! `conntrack -D` on a gateway taken out) in network namespaces; unmodified
//! wireguard-go devices in their own namespaces dial the one service
//! address and cannot reach the gateways' own addresses. Needs root, nft,
//! conntrack, wireguard-go, sshd (installed by `tests/run.sh`).

mod common;

use common::local_cluster::LocalCluster;
use common::ssh::SshFixture;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_cloudlink");

/// Through either gateway's API and proxy, an action and an ssh session
/// reach a wireguard-go device held by the other one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_and_ssh_through_one_gateway_reach_a_device_the_other_holds() {
    let c = LocalCluster::up("clka", 0, 2, BIN, &[]);
    let mut dev = c.wireguard_go_device(1, "behind-lb", 1).await;
    dev.wait_handshake();
    // The balancer picked the owner by a hash of the device's address and
    // port; operate through the other gateway.
    let deadline = Instant::now() + Duration::from_secs(10);
    let owner = loop {
        match c.view(1, "behind-lb").await {
            (true, Some(g)) => break g,
            _ => assert!(Instant::now() < deadline, "never connected"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let other: u8 = if owner == "gw1" { 2 } else { 1 };
    eprintln!("the device is on {owner}; operating through gw{other}");

    let out = tempfile::tempdir().unwrap();
    let log = out.path().join("request.json");
    dev.start_supervisor(&log);
    let (st, d) = c
        .call(
            other,
            "PATCH",
            "/v1/devices/behind-lb",
            Some(serde_json::json!({"device_api_key": "sv-key-7"})),
        )
        .await;
    assert_eq!(st, 200, "{d}");
    let (st, r) = c
        .call(
            other,
            "POST",
            "/v1/devices/behind-lb/actions/reboot",
            Some(serde_json::json!({})),
        )
        .await;
    assert_eq!(st, 202, "{r}");
    assert_eq!(
        r["device_body"],
        serde_json::json!({"Data": "OK", "Error": null})
    );
    let seen: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&log).unwrap()).unwrap();
    assert_eq!(seen["path"], "/v1/reboot");
    assert_eq!(seen["auth"], "Bearer sv-key-7");

    let ssh = SshFixture::new();
    dev.start_sshd(&ssh);
    let (host, port) = c.proxy(other);
    tokio::task::block_in_place(|| {
        ssh.echo_via(
            (&host, port),
            &c.token,
            "behind-lb.balena",
            "through-the-other",
        )
    });
    let metrics = reqwest::get(format!("{}/metrics", c.api(other)))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for kind in ["action", "connect"] {
        let line = format!("cloudlink_cluster_forwarded_total{{kind=\"{kind}\"}} 1");
        assert!(metrics.contains(&line), "no `{line}` in:\n{metrics}");
    }
}

/// Twenty wireguard-go devices with sshd, all on gw1 (gw2 joins the
/// balancer after they connected). `kill -9` of gw1: the balancer's health
/// check takes it out, the survivor reaps its devices and redials them from
/// the service address; all twenty are connected through gw2 within 30 s
/// of the kill, with their tunnel addresses, and ssh to each works. Then
/// gw1 is back and gw2, holding all twenty, is stopped with SIGTERM: every
/// device is on gw1 within 30 s, announced as `link.moved`, never
/// `link.down`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_devices_come_back_on_the_survivor_after_kill_9_and_sigterm() {
    const N: u8 = 20;
    let c = LocalCluster::up("clkb", 2, 2, BIN, &["--cluster-lease", "3s"]);
    c.stop(2, "TERM");
    c.wait_balanced(&[1], Duration::from_secs(10));

    let ssh = SshFixture::new();
    let mut devices = Vec::new();
    for i in 1..=N {
        let uuid = format!("fleet-{i}");
        let mut dev = c.wireguard_go_device(i, &uuid, 1).await;
        dev.start_sshd(&ssh);
        devices.push((uuid, dev));
    }
    for (uuid, dev) in &devices {
        dev.wait_handshake();
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.view(1, uuid).await != (true, Some("gw1".into())) {
            assert!(Instant::now() < deadline, "{uuid} never came up on gw1");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    c.start(2);
    c.wait_balanced(&[1, 2], Duration::from_secs(30));
    // Every device's flow stays pinned to gw1 (conntrack) after gw2 joined.
    for (uuid, _) in &devices {
        assert_eq!(c.view(2, uuid).await, (true, Some("gw1".into())), "{uuid}");
    }

    // kill -9 of the gateway holding all twenty.
    let killed = Instant::now();
    c.stop(1, "KILL");
    let back_on = |g: u8, to: &'static str, since: Instant| {
        let c = &c;
        let devices = &devices;
        async move {
            for (uuid, dev) in devices {
                loop {
                    let (_, d) = c.call(g, "GET", &format!("/v1/devices/{uuid}"), None).await;
                    if d["cloudlink"]["connected"] == true && d["cloudlink"]["gateway"] == to {
                        assert_eq!(d["address"].as_str(), Some(dev.address.as_str()));
                        break;
                    }
                    assert!(
                        since.elapsed() < Duration::from_secs(30),
                        "{uuid} not on {to} 30 s after the stop: {d}\n{}",
                        c.log("lb.log")
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            since.elapsed()
        }
    };
    let took = back_on(2, "gw2", killed).await;
    eprintln!("all {N} devices on gw2 {took:?} after kill -9 of gw1 (lease 3 s)");
    let ssh_each = |g: u8| {
        let (host, port) = c.proxy(g);
        for (uuid, _) in &devices {
            tokio::task::block_in_place(|| {
                ssh.echo_via((&host, port), &c.token, &format!("{uuid}.balena"), uuid)
            });
        }
    };
    ssh_each(2);
    let metrics = reqwest::get(format!("{}/metrics", c.api(2)))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let redials = format!("cloudlink_cluster_takeover_redials_total {N}");
    assert!(metrics.contains(&redials), "no `{redials}`");

    // A rolling restart: gw1 back, then SIGTERM of gw2, which holds all.
    c.start(1);
    c.wait_balanced(&[1, 2], Duration::from_secs(30));
    let events = format!("{}/v1/events", c.api(1));
    let mut live = common::SseReader::connect_with(&events, &c.token, None).await;
    let (_, listing) = c.call(1, "GET", "/v1/devices?limit=1", None).await;
    let as_of = listing["as_of"].as_str().unwrap().to_owned();
    let stopped = Instant::now();
    c.stop(2, "TERM");
    let took = back_on(1, "gw1", stopped).await;
    eprintln!("all {N} devices on gw1 {took:?} after SIGTERM of gw2");
    let live = live.drain_for(Duration::from_millis(1000)).await;
    let resumed = common::SseReader::connect_with(&events, &c.token, Some(&as_of))
        .await
        .drain_for(Duration::from_millis(1000))
        .await;
    for seen in [&live, &resumed] {
        let all: Vec<_> = seen.iter().map(|e| &e.data).collect();
        for (uuid, _) in &devices {
            let of = |ty: &str| {
                seen.iter()
                    .filter(|e| e.data["type"] == ty && e.data["device"] == uuid.as_str())
                    .count()
            };
            assert_eq!(of("link.down"), 0, "{uuid}: {all:?}");
            assert_eq!(of("link.moved"), 1, "{uuid}: {all:?}");
        }
    }
    ssh_each(1);
}
