//! End-to-end over loopback UDP: boringtun devices against an in-process
//! gateway, watched through the SSE stream and the API.

mod common;

use cloudlink::keys::{encode_key, generate_private_key, public_key};
use common::*;
use serde_json::{json, Value};
use std::net::{Ipv4Addr, UdpSocket};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

async fn new_device(g: &TestGateway, uuid: &str, index: u32) -> TestDevice {
    // Register first (as a fleet would), then dial.
    let key = cloudlink::keys::generate_private_key();
    let reg = g.register(uuid, &cloudlink::keys::public_key(&key)).await;
    let gw_pub =
        cloudlink::keys::decode_key(reg["gateway"]["public_key"].as_str().unwrap()).unwrap();
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    TestDevice::with_key(g.udp, &gw_pub, index, socket, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_brings_link_up_then_timeout_brings_it_down() {
    let mut g = TestGateway::start().await;
    let mut events = g.events(None).await;
    assert_eq!(events.status, 200);
    let mut dev = new_device(&g, "dev-e2e", 11).await;
    let local = dev.socket.local_addr().unwrap();
    dev.connect();

    let up = events.wait_for(WAIT, |e| e["type"] == "link.up").await;
    assert_eq!(up.data["device"], "dev-e2e");
    assert_eq!(up.data["endpoint"], local.to_string());
    assert_eq!(up.data["gateway"], "test-gw");
    assert!(
        up.event.is_none(),
        "no SSE event name: the type is in the JSON"
    );
    let epoch = up.data["epoch"].as_str().unwrap().to_owned();
    assert_eq!(
        up.id.as_deref(),
        Some(format!("{epoch}-{}", up.data["id"]).as_str())
    );

    let d = g.device("dev-e2e").await;
    assert_eq!(d["cloudlink"]["connected"], true);
    assert_eq!(d["cloudlink"]["endpoint"], local.to_string());
    assert!(d["cloudlink"]["since"].is_string());
    assert!(d["cloudlink"]["last_handshake_at"].is_string());
    assert!(d["cloudlink"]["rx_bytes"].as_u64().unwrap() > 0);
    assert!(d["cloudlink"]["tx_bytes"].as_u64().unwrap() > 0);
    assert_eq!(g.metric("cloudlink_sessions").await, 1.0);
    assert_eq!(
        g.metric("cloudlink_handshakes_total{result=\"completed\"}")
            .await,
        1.0
    );

    // The device falls silent: link-timeout is 2 s in tests.
    let down = events.wait_for(WAIT, |e| e["type"] == "link.down").await;
    assert_eq!(down.data["device"], "dev-e2e");
    assert_eq!(down.data["reason"], "timeout");
    assert!(down.data["id"].as_u64().unwrap() > up.data["id"].as_u64().unwrap());
    assert_eq!(g.device("dev-e2e").await["cloudlink"]["connected"], false);
    assert_eq!(g.metric("cloudlink_sessions").await, 0.0);

    // A keepalive on the still-valid session brings it back up without a
    // new handshake.
    dev.keepalive();
    let up2 = events.wait_for(WAIT, |e| e["type"] == "link.up").await;
    assert_eq!(up2.data["device"], "dev-e2e");
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_behind_one_endpoint_get_their_own_replies() {
    let mut g = TestGateway::start_with(|c| c.link_timeout = Duration::from_secs(30)).await;
    let mut events = g.events(None).await;
    let nat = UdpSocket::bind("127.0.0.1:0").unwrap();
    nat.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let nat_addr = nat.local_addr().unwrap();
    let mut a = new_device(&g, "behind-nat-a", 100).await;
    let mut b = new_device(&g, "behind-nat-b", 200).await;
    a.socket = nat.try_clone().unwrap();
    b.socket = nat.try_clone().unwrap();

    // Both initiate from the same outer address before either reads.
    a.send_initiation();
    b.send_initiation();
    // Demultiplex the two answers by receiver index, as a NAT'd host would.
    let mut buf = vec![0u8; 2048];
    for _ in 0..2 {
        let (n, _) = nat.recv_from(&mut buf).unwrap();
        let receiver = u32::from_le_bytes(buf[8..12].try_into().unwrap());
        match receiver >> 8 {
            100 => assert!(a.feed(&buf[..n]).is_none()),
            200 => assert!(b.feed(&buf[..n]).is_none()),
            other => panic!("reply for an index neither device owns: {other}"),
        }
    }
    let mut up = Vec::new();
    for _ in 0..2 {
        let m = events.wait_for(WAIT, |e| e["type"] == "link.up").await;
        assert_eq!(m.data["endpoint"], nat_addr.to_string());
        up.push(m.data["device"].as_str().unwrap().to_owned());
    }
    up.sort();
    assert_eq!(up, ["behind-nat-a", "behind-nat-b"]);

    // Gateway-originated packets reach the right tunnel: each decrypts only
    // with its own device's keys.
    let gw = g.gw().path.clone();
    let addr_a: Ipv4Addr = g.device("behind-nat-a").await["address"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let addr_b: Ipv4Addr = g.device("behind-nat-b").await["address"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let gw_ip = gw.gateway_address();
    gw.send_ip(addr_a, &ipv4_udp(gw_ip, addr_a, b"for-a"))
        .unwrap();
    gw.send_ip(addr_b, &ipv4_udp(gw_ip, addr_b, b"for-b"))
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let (n, from) = nat.recv_from(&mut buf).unwrap();
        assert_eq!(from, g.udp);
        let receiver = u32::from_le_bytes(buf[4..8].try_into().unwrap());
        let pkt = match receiver >> 8 {
            100 => a.feed(&buf[..n]).expect("a decrypts its packet"),
            200 => b.feed(&buf[..n]).expect("b decrypts its packet"),
            other => panic!("unknown index {other}"),
        };
        got.push((receiver >> 8, pkt[28..].to_vec()));
    }
    got.sort();
    assert_eq!(
        got,
        vec![(100, b"for-a".to_vec()), (200, b"for-b".to_vec())]
    );
    for uuid in ["behind-nat-a", "behind-nat-b"] {
        let d = g.device(uuid).await;
        assert_eq!(d["cloudlink"]["connected"], true);
        assert_eq!(d["cloudlink"]["endpoint"], nat_addr.to_string());
    }
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roaming_follows_authenticated_packets_only() {
    let mut g = TestGateway::start_with(|c| c.link_timeout = Duration::from_secs(30)).await;
    let mut events = g.events(None).await;
    let mut dev = new_device(&g, "roamer", 7).await;
    let first = dev.socket.local_addr().unwrap();
    dev.connect();
    events.wait_for(WAIT, |e| e["type"] == "link.up").await;

    // A forged datagram naming the session from a third address: it does not
    // decrypt, so the endpoint stays.
    let attacker = UdpSocket::bind("127.0.0.1:0").unwrap();
    let index = g.gw().path.sessions.by_uuid("roamer").unwrap().index;
    let mut forged = vec![0u8; 64];
    forged[0] = 4;
    forged[4..8].copy_from_slice(&((index << 8) | 1).to_le_bytes());
    let counters = |d: &serde_json::Value| {
        (
            d["cloudlink"]["rx_bytes"].clone(),
            d["cloudlink"]["rx_packets"].clone(),
        )
    };
    let before = counters(&g.device("roamer").await);
    attacker.send_to(&forged, g.udp).unwrap();
    let m = g.gw().path.metrics.clone();
    assert!(
        eventually(WAIT, async || m
            .dropped_count(cloudlink::metrics::DropReason::DecryptFailed)
            >= 1)
        .await
    );
    // Junk naming a valid index moves none of the device's counters, and
    // `/metrics` (no credentials) does not say the index was valid.
    assert_eq!(counters(&g.device("roamer").await), before);
    let text = g.metrics().await;
    assert!(text.contains("cloudlink_packets_dropped_total{reason=\"unauthenticated\"} 1"));
    assert!(!text.contains("decrypt_failed") && !text.contains("unknown_session"));
    assert_eq!(
        g.device("roamer").await["cloudlink"]["endpoint"],
        first.to_string()
    );

    // The device moves (new source port, as after a NAT rebinding).
    let moved = UdpSocket::bind("127.0.0.1:0").unwrap();
    moved
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let second = moved.local_addr().unwrap();
    dev.socket = moved;
    dev.keepalive();
    let roamed = events.wait_for(WAIT, |e| e["type"] == "link.roamed").await;
    assert_eq!(roamed.data["device"], "roamer");
    assert_eq!(roamed.data["endpoint"], second.to_string());
    assert_eq!(roamed.data["previous_endpoint"], first.to_string());
    assert_eq!(
        g.device("roamer").await["cloudlink"]["endpoint"],
        second.to_string()
    );

    // Replies now go to the new endpoint.
    let path = g.gw().path.clone();
    let addr = path.sessions.by_uuid("roamer").unwrap().address;
    path.send_ip(addr, &ipv4_udp(path.gateway_address(), addr, b"hello"))
        .unwrap();
    let pkt = dev
        .receive_one()
        .unwrap()
        .expect("a packet at the new endpoint");
    assert_eq!(&pkt[28..], b"hello");
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cryptokey_routing_drops_spoofed_and_foreign_packets() {
    let mut g = TestGateway::start_with(|c| c.link_timeout = Duration::from_secs(30)).await;
    let mut events = g.events(None).await;
    let mut a = new_device(&g, "honest", 1).await;
    let mut b = new_device(&g, "other", 2).await;
    a.connect();
    b.connect();
    events.wait_for(WAIT, |e| e["type"] == "link.up").await;
    events.wait_for(WAIT, |e| e["type"] == "link.up").await;
    let gw_ip = g.gw().path.gateway_address();
    let addr_a: Ipv4Addr = g.device("honest").await["address"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let addr_b: Ipv4Addr = g.device("other").await["address"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    // Inner source is b's address, sent in a's tunnel.
    a.send_ip(&ipv4_udp(addr_b, gw_ip, b"spoofed"));
    assert!(
        eventually(WAIT, async || g
            .metric("cloudlink_packets_dropped_total{reason=\"spoofed_source\"}")
            .await
            == 1.0)
        .await
    );
    // Honest source, but addressed to another device: never forwarded.
    b.socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    a.send_ip(&ipv4_udp(addr_a, addr_b, b"lateral"));
    assert!(
        eventually(WAIT, async || g
            .metric("cloudlink_packets_dropped_total{reason=\"not_for_gateway\"}")
            .await
            == 1.0)
        .await
    );
    assert!(b.receive_one().is_err(), "nothing reaches the other device");
    // Both devices are still up: dropping is not disconnecting.
    assert_eq!(g.device("honest").await["cloudlink"]["connected"], true);
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_keys_and_garbage_are_dropped_and_counted() {
    let mut g = TestGateway::start().await;
    // Learn the gateway key through a registered device.
    let _known = new_device(&g, "known", 1).await;
    let gw_pub = g.gateway_public_key("known").await;
    let mut stranger = TestDevice::new(g.udp, &gw_pub, 3);
    stranger
        .socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    stranger.send_initiation();
    assert!(
        stranger.receive_one().is_err(),
        "no answer to an unknown key"
    );
    assert!(
        eventually(WAIT, async || g
            .metric("cloudlink_handshakes_total{result=\"unknown_key\"}")
            .await
            == 1.0)
        .await
    );
    assert_eq!(
        g.gw().path.sessions.len(),
        0,
        "no session for an unknown key"
    );

    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.send_to(b"\x09garbage", g.udp).unwrap();
    let mut bad_mac = [7u8; 148]; // an initiation with a bad mac1
    bad_mac[..4].copy_from_slice(&1u32.to_le_bytes());
    s.send_to(&bad_mac, g.udp).unwrap();
    assert!(
        eventually(WAIT, async || g
            .metric("cloudlink_packets_dropped_total{reason=\"malformed\"}")
            .await
            == 1.0)
        .await
    );
    assert!(
        eventually(WAIT, async || g
            .metric("cloudlink_packets_dropped_total{reason=\"invalid_mac\"}")
            .await
            == 1.0)
        .await
    );
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_drops_the_session_and_publishes_revoked() {
    let mut g = TestGateway::start_with(|c| c.link_timeout = Duration::from_secs(30)).await;
    let mut events = g.events(None).await;
    let mut dev = new_device(&g, "doomed", 5).await;
    dev.connect();
    events.wait_for(WAIT, |e| e["type"] == "link.up").await;
    let (st, _) = g.call("DELETE", "/v1/devices/doomed", None).await;
    assert_eq!(st, 204);
    let down = events.wait_for(WAIT, |e| e["type"] == "link.down").await;
    assert_eq!(down.data["reason"], "revoked");
    assert_eq!(down.data["device"], "doomed");
    assert!(g.gw().path.sessions.by_uuid("doomed").is_none());
    // Its packets and handshakes are refused from now on.
    dev.keepalive();
    let m = g.gw().path.metrics.clone();
    assert!(
        eventually(WAIT, async || m
            .dropped_count(cloudlink::metrics::DropReason::UnknownSession)
            >= 1)
        .await
    );
    dev.socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    dev.send_initiation();
    assert!(dev.receive_one().is_err());
    assert_eq!(g.metric("cloudlink_sessions").await, 0.0);
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_shutdown_publishes_link_down_and_ends_streams() {
    let mut g = TestGateway::start_with(|c| c.link_timeout = Duration::from_secs(30)).await;
    let mut events = g.events(None).await;
    let mut dev = new_device(&g, "stays", 5).await;
    dev.connect();
    events.wait_for(WAIT, |e| e["type"] == "link.up").await;
    g.stop().await;
    let down = events.wait_for(WAIT, |e| e["type"] == "link.down").await;
    assert_eq!(down.data["reason"], "shutdown");
    assert!(events.ended(WAIT).await, "the stream ends after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_last_event_id_and_resync() {
    let mut g = TestGateway::start_with(|c| {
        c.link_timeout = Duration::from_secs(30);
        c.event_ring = 4;
    })
    .await;
    let mut live = g.events(None).await;
    // Six devices come up.
    let mut devs = Vec::new();
    for i in 0..6 {
        let mut d = new_device(&g, &format!("r{i}"), 10 + i).await;
        d.connect();
        live.wait_for(WAIT, |e| e["type"] == "link.up").await;
        // Published just after link.up, by the status tracker.
        live.wait_for(WAIT, |e| e["type"] == "status.changed").await;
        devs.push(d);
    }
    let (_, listing) = g.call("GET", "/v1/devices", None).await;
    let as_of = listing["as_of"].as_str().unwrap().to_owned();
    let (epoch, last) = as_of.rsplit_once('-').unwrap();
    let last: u64 = last.parse().unwrap();
    // Each device published device.registered, link.up and status.changed.
    assert_eq!(last, 18);

    // Resume after last-2: exactly the last two, in order, with their SSE ids.
    let mut r = g.events(Some(&format!("{epoch}-{}", last - 2))).await;
    let m1 = r.next(WAIT).await;
    let m2 = r.next(WAIT).await;
    assert_eq!(m1.data["id"], last - 1);
    assert_eq!(
        m1.id.as_deref(),
        Some(format!("{epoch}-{}", last - 1).as_str())
    );
    assert_eq!(m2.data["id"], last);
    assert!(r.drain_for(Duration::from_millis(300)).await.is_empty());
    // Then live events follow on the same stream.
    let (st, _) = g.call("DELETE", "/v1/devices/r0", None).await;
    assert_eq!(st, 204);
    let m3 = r.next(WAIT).await;
    assert_eq!(m3.data["id"], last + 1);
    assert_eq!(m3.data["type"], "device.deleted");
    let m4 = r.next(WAIT).await;
    assert_eq!(m4.data["id"], last + 2);
    assert_eq!(m4.data["type"], "link.down");
    assert_eq!(m4.data["reason"], "revoked");

    // Resuming from the listing's as_of loses nothing either.
    let mut r = g.events(Some(&as_of)).await;
    assert_eq!(r.next(WAIT).await.data["id"], last + 1);

    // Older than the ring (it keeps 4): a resync message, never a silent gap.
    let now_last = g.gw().path.events.last_id();
    let mut r = g.events(Some(&format!("{epoch}-1"))).await;
    let m = r.next(WAIT).await;
    assert_eq!(m.data["type"], "resync");
    assert_eq!(m.data["reason"], "too_old");
    assert_eq!(m.data["as_of"], format!("{epoch}-{now_last}"));
    assert_eq!(
        m.id.as_deref(),
        Some(format!("{epoch}-{now_last}").as_str())
    );

    // Another boot's id: resync as well.
    let mut r = g.events(Some("0123456789abcdef-3")).await;
    let m = r.next(WAIT).await;
    assert_eq!(m.data["type"], "resync");
    assert_eq!(m.data["reason"], "epoch_changed");

    // A malformed id is a client error.
    let r = g.events(Some("nonsense")).await;
    assert_eq!(r.status, 400);
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_identity_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path());
    let mut g = TestGateway::start_in(dir, c.clone(), "127.0.0.1:0").await;
    let reg = g.register("persist", &[9; 32]).await;
    let key1 = reg["gateway"]["public_key"].clone();
    g.stop().await;
    let dir = std::mem::replace(&mut g.dir, tempfile::tempdir().unwrap());
    let mut g2 = TestGateway::start_in(dir, c, "127.0.0.1:0").await;
    let d = g2.device("persist").await;
    assert_eq!(d["gateway"]["public_key"], key1);
    assert_eq!(d["address"], reg["address"]);
    g2.stop().await;
}

/// The lifecycle goes through the bus: a deletion made through the fleet
/// service (as a CLI or another gateway would, no HTTP handler involved)
/// publishes `device.deleted`, and the fleet reactor that reads it cuts the
/// connected device off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_through_the_fleet_service_cuts_the_device_off_through_the_bus() {
    let mut g = TestGateway::start_with(|c| c.link_timeout = Duration::from_secs(30)).await;
    let mut events = g.events(None).await;
    let mut dev = new_device(&g, "fleet-doomed", 5).await;
    dev.connect();
    events.wait_for(WAIT, |e| e["type"] == "link.up").await;
    let fleet = g.gw().fleet().clone();
    let changed = tokio::task::spawn_blocking(move || fleet.delete("fleet-doomed").unwrap())
        .await
        .unwrap();
    assert!(changed.value.is_some());
    // No call to the packet path was made: the reactor reads the event.
    let deleted = events
        .wait_for(WAIT, |e| e["type"] == "device.deleted")
        .await;
    assert_eq!(deleted.data["device"], "fleet-doomed");
    let down = events.wait_for(WAIT, |e| e["type"] == "link.down").await;
    assert_eq!(down.data["reason"], "revoked");
    assert_eq!(down.data["device"], "fleet-doomed");
    assert!(g.gw().path.sessions.by_uuid("fleet-doomed").is_none());
    dev.socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    dev.send_initiation();
    assert!(
        dev.receive_one().is_err(),
        "a deleted device gets no answer"
    );
    g.stop().await;
}

/// A key change through `PATCH` (the fleet service) cuts off the session
/// made with the old key; the old key gets no answer, the new one connects
/// with the device's same address; a key another device holds is refused
/// and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_change_cuts_the_old_key_off_and_lets_the_new_one_in() {
    let mut g = TestGateway::start_with(|c| c.link_timeout = Duration::from_secs(30)).await;
    let mut events = g.events(None).await;
    let mut old = new_device(&g, "rekeyed", 21).await;
    let other = g
        .register("other", &public_key(&generate_private_key()))
        .await;
    old.connect();
    events.wait_for(WAIT, |e| e["type"] == "link.up").await;
    let before = g.device("rekeyed").await;

    // Another device's key: 409, nothing changes, the session stays.
    let (st, e) = g
        .call(
            "PATCH",
            "/v1/devices/rekeyed",
            Some(json!({"public_key": other["public_key"]})),
        )
        .await;
    assert_eq!(st, 409, "{e}");
    assert_eq!(e["error"], "public_key_taken");
    assert_eq!(e["field"], "public_key");
    assert_eq!(
        g.device("rekeyed").await["public_key"],
        before["public_key"]
    );
    assert!(g.gw().path.sessions.by_uuid("rekeyed").is_some());

    let key = generate_private_key();
    let new_pub = encode_key(&public_key(&key));
    let (st, d) = g
        .call(
            "PATCH",
            "/v1/devices/rekeyed",
            Some(json!({"public_key": new_pub})),
        )
        .await;
    assert_eq!(st, 200, "{d}");
    assert_eq!(d["public_key"], new_pub);
    assert_eq!(d["address"], before["address"]);
    let e = events
        .wait_for(WAIT, |e| e["type"] == "device.updated")
        .await;
    assert_eq!(e.data["changed"], json!(["public_key"]));
    assert_eq!(e.data["public_key"], new_pub);
    let down = events.wait_for(WAIT, |e| e["type"] == "link.down").await;
    assert_eq!(down.data["device"], "rekeyed");
    assert_eq!(down.data["reason"], "revoked");
    // Applied before the answer (read-your-writes): the old session is gone.
    assert!(g.gw().path.sessions.by_uuid("rekeyed").is_none());

    old.socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    old.send_initiation();
    assert!(old.receive_one().is_err(), "the old key gets no answer");

    let gw_pub = cloudlink::keys::decode_key(d["gateway"]["public_key"].as_str().unwrap()).unwrap();
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut new = TestDevice::with_key(g.udp, &gw_pub, 22, socket, key);
    new.connect();
    let up = events.wait_for(WAIT, |e| e["type"] == "link.up").await;
    assert_eq!(up.data["device"], "rekeyed");
    assert_eq!(up.data["address"], before["address"]);
    g.stop().await;
}

/// Registrations publish `device.registered`: one per device, and one for a
/// whole batch with its count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_publish_one_event_per_device_and_one_per_batch() {
    let mut g = TestGateway::start().await;
    let mut events = g.events(None).await;
    g.register("single-1", &public_key(&generate_private_key()))
        .await;
    let e = events
        .wait_for(WAIT, |e| e["type"] == "device.registered")
        .await;
    assert_eq!(e.data["device"], "single-1");
    assert_eq!(e.data["count"], 1);
    assert!(e.data["address"].as_str().is_some());
    let devices: Vec<_> = (0..500)
        .map(|i| json!({"uuid": format!("batch-{i}"), "public_key": encode_key(&public_key(&generate_private_key()))}))
        .collect();
    let (st, b) = g
        .call(
            "POST",
            "/v1/devices/batch",
            Some(json!({"devices": devices})),
        )
        .await;
    assert_eq!((st, b["created"].as_u64()), (200, Some(500)), "{b}");
    let e = events
        .wait_for(WAIT, |e| e["type"] == "device.registered")
        .await;
    assert_eq!(e.data["device"], Value::Null);
    assert_eq!(e.data["count"], 500);
    // Every device of the batch has its status, applied before the answer.
    let d = g.device("batch-499").await;
    assert_eq!(d["status"], "configuring", "{d}");
    let (st, _) = g
        .call(
            "PATCH",
            "/v1/devices/batch-7",
            Some(json!({"name": "seven"})),
        )
        .await;
    assert_eq!(st, 200);
    let e = events
        .wait_for(WAIT, |e| e["type"] == "device.updated")
        .await;
    assert_eq!(e.data["device"], "batch-7");
    assert_eq!(e.data["changed"], json!(["name"]));
    g.stop().await;
}

/// The review: a device sending from 50 source ports for 10 s made 628,133
/// `link.roamed` events (and as many INFO lines), and the event ring held
/// nothing else. Now a device roams into at most one event a second, which
/// counts the changes it stands for and names where the device is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_roaming_over_50_ports_makes_at_most_one_event_a_second() {
    let mut g = TestGateway::start_with(|c| c.link_timeout = Duration::from_secs(30)).await;
    let mut events = g.events(None).await;
    let mut dev = new_device(&g, "hopper", 9).await;
    dev.connect();
    events.wait_for(WAIT, |e| e["type"] == "link.up").await;
    let ports: Vec<UdpSocket> = (0..50)
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    let start = std::time::Instant::now();
    let mut sent = 0u32;
    while start.elapsed() < Duration::from_secs(3) {
        for p in &ports {
            dev.socket = p.try_clone().unwrap();
            dev.keepalive();
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let last = dev.socket.local_addr().unwrap();
    // Past the interval and a timer pass: the last changes are announced.
    let seen = events.drain_for(Duration::from_secs(4)).await;
    let roams: Vec<_> = seen
        .iter()
        .filter(|e| e.data["type"] == "link.roamed")
        .map(|e| &e.data)
        .collect();
    eprintln!(
        "{sent} packets from 50 ports in 3 s: {} link.roamed",
        roams.len()
    );
    assert!(!roams.is_empty() && roams.len() <= 5, "{roams:?}");
    let counted: u64 = roams.iter().map(|r| r["roams"].as_u64().unwrap()).sum();
    assert!(counted > 50, "{counted}");
    assert_eq!(roams.last().unwrap()["endpoint"], last.to_string());
    assert_eq!(
        g.device("hopper").await["cloudlink"]["endpoint"],
        last.to_string()
    );
    g.stop().await;
}
