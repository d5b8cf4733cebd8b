//! The relay against a kernel TCP stack it did not write: `wireguard-go` in
//! a network namespace, a real `sshd` on the namespace's tunnel address, the
//! real `ssh` client through the CONNECT proxy.

mod common;

use common::netns::*;
use common::ssh::*;
use common::*;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_and_a_20_mb_file_through_wireguard_go() {
    let tag = format!("r{}", std::process::id() % 10_000);
    let subnet = (std::process::id() % 10 + 170) as u8;
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    // wireguard-go sends keepalives every 25 s: a shorter link timeout would
    // (rightly) take the link down between two ssh runs.
    c.link_timeout = std::time::Duration::from_secs(60);
    let mut g = TestGateway::start_in(dir, c, "0.0.0.0:0").await;
    let mut events = g.events(None).await;
    let mut dev = WgGoDevice::start(&g, "wg-ssh", &tag, subnet).await;
    dev.wait_handshake();
    events
        .wait_for(Duration::from_secs(20), |e| e["type"] == "link.up")
        .await;

    let ssh = SshFixture::new();
    dev.start_sshd(&ssh);
    let proxy_port = g.gw().proxy_addr().port();

    // A command.
    let o = tokio::task::block_in_place(|| {
        ssh.ssh(
            proxy_port,
            TOKEN,
            "wg-ssh.balena",
            22,
            "echo hello-from-device",
            None,
        )
    });
    assert!(
        o.status.success(),
        "ssh failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hello-from-device\n");

    // 20 MB up and its checksum back.
    let (file, sum) = random_file(ssh.dir.path(), 20 * 1024 * 1024);
    let remote = ssh.dir.path().join("received.bin");
    let started = Instant::now();
    let o = tokio::task::block_in_place(|| {
        ssh.ssh(
            proxy_port,
            TOKEN,
            "wg-ssh",
            22,
            &format!(
                "cat > {} && sha256sum {}",
                remote.display(),
                remote.display()
            ),
            Some(&file),
        )
    });
    let up_s = started.elapsed().as_secs_f64();
    assert!(
        o.status.success(),
        "ssh failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let remote_sum = String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(remote_sum, sum, "the file arrived byte-identical");

    // And 20 MB down.
    let back = ssh.dir.path().join("back.bin");
    let started = Instant::now();
    let o = tokio::task::block_in_place(|| {
        let out = std::fs::File::create(&back).unwrap();
        let o = ssh.ssh(
            proxy_port,
            TOKEN,
            "wg-ssh.cloudlink",
            22,
            &format!("cat {}", remote.display()),
            None,
        );
        std::io::Write::write_all(&mut &out, &o.stdout).unwrap();
        o
    });
    let down_s = started.elapsed().as_secs_f64();
    assert!(o.status.success());
    assert_eq!(sha256(&back), sum, "the file came back byte-identical");
    eprintln!(
        "20 MiB through ssh + relay + wireguard-go: up {:.1} s, down {:.1} s",
        up_s, down_s
    );

    assert!(
        g.metric("cloudlink_relay_streams_total{result=\"ok\"}")
            .await
            >= 3.0
    );
    assert!(
        g.metric("cloudlink_relay_bytes_total{direction=\"to_device\"}")
            .await
            > 20e6
    );
    assert!(
        g.metric("cloudlink_relay_bytes_total{direction=\"from_device\"}")
            .await
            > 20e6
    );
    g.stop().await;
}
