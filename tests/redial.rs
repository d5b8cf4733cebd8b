//! Coming back after a restart: the gateway persists the endpoints of
//! connected devices and, after a restart, initiates the handshakes itself,
//! so an idle device that would only notice at its next rekey (up to
//! 120 s) is back within seconds.

mod common;

use common::*;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_redials_devices_that_were_connected() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path());
    let mut g = TestGateway::start_in(dir, c.clone(), "127.0.0.1:0").await;
    let udp = g.udp;
    let gw_key = g.gw().path.public_key().to_bytes();
    let mut events = g.events(None).await;

    // Three devices: one stays connected (idle), one's link times out
    // before the restart, one is deleted.
    let mut idle = TestDevice::new(udp, &gw_key, 1);
    let mut gone = TestDevice::new(udp, &gw_key, 2);
    let mut deleted = TestDevice::new(udp, &gw_key, 3);
    for (uuid, d) in [
        ("idle-1", &idle),
        ("gone-1", &gone),
        ("deleted-1", &deleted),
    ] {
        g.register(uuid, &d.public).await;
    }
    let (idle_s, gone_s, deleted_s) = (
        std::thread::spawn(move || {
            idle.connect();
            idle
        }),
        std::thread::spawn(move || {
            gone.connect();
            gone
        }),
        std::thread::spawn(move || {
            deleted.connect();
            deleted
        }),
    );
    idle = idle_s.join().unwrap();
    gone = gone_s.join().unwrap();
    deleted = deleted_s.join().unwrap();
    for _ in 0..3 {
        events.wait_for(WAIT, |e| e["type"] == "link.up").await;
    }
    // `gone` falls silent: its link times out (2 s) and is forgotten. The
    // others keep theirs up with keepalives meanwhile.
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_millis(3500) {
        idle.keepalive();
        deleted.keepalive();
        std::thread::sleep(Duration::from_millis(300));
    }
    events
        .wait_for(WAIT, |e| {
            e["type"] == "link.down" && e["device"] == "gone-1"
        })
        .await;
    let (st, _) = g.call("DELETE", "/v1/devices/deleted-1", None).await;
    assert_eq!(st, 204);
    // Let the endpoint book write once more, then stop (it also flushes).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    g.stop().await;

    // Restart on the same port with the same data. The devices do nothing.
    let dir = std::mem::replace(&mut g.dir, tempfile::tempdir().unwrap());
    let mut g = TestGateway::start_in(dir, c, &udp.to_string()).await;
    let mut events = g.events(None).await;

    // The idle device receives the gateway's initiation and answers it.
    idle.socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = vec![0u8; 2048];
    let (n, from) = idle
        .socket
        .recv_from(&mut buf)
        .expect("an initiation from the gateway");
    assert_eq!(from, udp);
    assert_eq!((buf[0], n), (1, 148), "a handshake initiation");
    idle.feed(&buf[..n]);
    let up = events.wait_for(WAIT, |e| e["type"] == "link.up").await;
    assert_eq!(up.data["device"], "idle-1");
    // The tunnel works both ways again.
    idle.keepalive();
    assert!(
        eventually(WAIT, async || g.device("idle-1").await["cloudlink"]
            ["connected"]
            == true)
        .await
    );

    // Nobody else was dialled: not the device whose link had timed out,
    // not the deleted one.
    for d in [&gone, &deleted] {
        d.socket
            .set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        assert!(d.socket.recv_from(&mut buf).is_err(), "no initiation");
    }
    assert_eq!(g.metric("cloudlink_redials_total").await, 1.0);
    g.stop().await;
}
