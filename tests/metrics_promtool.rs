//! `/metrics` after real traffic passes `promtool check metrics` (Debian's
//! `prometheus` package; installed by the README's test command).

mod common;

use common::*;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_after_traffic() {
    let mut g = TestGateway::start().await;
    let mut events = g.events(None).await;
    let key = cloudlink::keys::generate_private_key();
    let reg = g
        .register("prom-1", &cloudlink::keys::public_key(&key))
        .await;
    let gw_pub =
        cloudlink::keys::decode_key(reg["gateway"]["public_key"].as_str().unwrap()).unwrap();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut dev = TestDevice::with_key(g.udp, &gw_pub, 1, socket, key);
    dev.connect();
    events
        .wait_for(Duration::from_secs(10), |e| e["type"] == "link.up")
        .await;
    dev.socket.send_to(b"junk", g.udp).unwrap();
    assert!(
        eventually(Duration::from_secs(10), async || {
            g.metric("cloudlink_packets_dropped_total{reason=\"malformed\"}")
                .await
                == 1.0
        })
        .await
    );
    let text = g.metrics().await;
    assert!(
        text.contains("cloudlink_handshakes_total{result=\"completed\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("cloudlink_link_events_total{type=\"link.up\"} 1"),
        "{text}"
    );
    assert!(text.contains("cloudlink_sessions 1"), "{text}");
    assert!(text.contains("cloudlink_devices_registered 1"), "{text}");

    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect(
            "promtool could not run; install Debian's prometheus package with `bash tests/run.sh`",
        );
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics complained:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    g.stop().await;
}
