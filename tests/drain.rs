//! A graceful stop (issue "Hold up under abuse", drain): SIGTERM with an ssh
//! session open through the proxy. The gateway takes no new relay streams
//! or actions (503 `draining`), lets the open session's command finish
//! within `--drain-timeout`, then stops as before: exit status 0, and the
//! device's `link.down` with reason `shutdown`.

mod common;

use common::ssh::{wait_until, SshFixture};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_cloudlink");

use common::free_port;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_open_ssh_session_finish_then_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (api, proxy, udp) = (free_port(false), free_port(false), free_port(true));
    let mut gw = Command::new(BIN)
        .arg("serve")
        .args(["--listen", &format!("127.0.0.1:{udp}")])
        .args(["--api", &format!("127.0.0.1:{api}")])
        .args(["--proxy", &format!("127.0.0.1:{proxy}")])
        .args(["--token", common::TOKEN, "--endpoint", "127.0.0.1:1"])
        .args(["--drain-timeout", "15s", "--log", "warn"])
        .arg("--data-dir")
        .arg(dir.path())
        .env_remove("CLOUDLINK_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{api}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(Instant::now() < deadline, "the gateway did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A `cloudlink agent` device forwarding port 22 to a real sshd.
    let ssh = SshFixture::new();
    let sshd_port = free_port(false);
    let mut sshd = ssh.start_sshd(&[], &format!("127.0.0.1:{sshd_port}"));
    wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", sshd_port)).is_ok()
    });
    let key = cloudlink::keys::generate_private_key();
    let reg: serde_json::Value = http
        .post(format!("{base}/v1/devices"))
        .bearer_auth(common::TOKEN)
        .json(&serde_json::json!({
            "uuid": "draining",
            "public_key": cloudlink::keys::encode_key(&cloudlink::keys::public_key(&key)),
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let agent_dir = tempfile::tempdir().unwrap();
    std::fs::write(
        agent_dir.path().join("wg0.conf"),
        reg["wg_quick"]
            .as_str()
            .unwrap()
            .replace("127.0.0.1:1", &format!("127.0.0.1:{udp}")),
    )
    .unwrap();
    std::fs::write(
        agent_dir.path().join("device.key"),
        cloudlink::keys::encode_key(&key),
    )
    .unwrap();
    // Following the stream before the agent starts: its link.up may come
    // within milliseconds (a clean-clone run missed it once).
    let mut events = common::SseReader::connect(&format!("{base}/v1/events"), None).await;
    let _agent =
        common::proxy::Agent::spawn_with(agent_dir, &[format!("22=127.0.0.1:{sshd_port}")], &[]);
    events
        .wait_for(Duration::from_secs(20), |e| {
            e["type"] == "link.up" && e["device"] == "draining"
        })
        .await;

    // An ssh session whose command outlives the SIGTERM by two seconds.
    let started = Instant::now();
    let ssh_thread = {
        let ssh = std::sync::Arc::new(ssh);
        let s = ssh.clone();
        (
            std::thread::spawn(move || {
                let o = s.ssh(
                    proxy,
                    common::TOKEN,
                    "draining.balena",
                    22,
                    "sleep 3; echo finished",
                    None,
                );
                (o, Instant::now())
            }),
            ssh,
        )
    };
    let metrics = || {
        let http = http.clone();
        let base = base.clone();
        async move {
            http.get(format!("{base}/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    assert!(
        common::eventually(Duration::from_secs(15), async || metrics()
            .await
            .contains("cloudlink_relay_streams 1"))
        .await,
        "the ssh session never opened a relay stream"
    );
    // SIGTERM while the command runs.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(gw.id() as i32, libc::SIGTERM) };
    let termed = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Draining: no new streams, no new actions.
    let (st, body, _) = common::proxy::raw_connect(
        format!("127.0.0.1:{proxy}").parse().unwrap(),
        &format!(
            "CONNECT draining.balena:22 HTTP/1.1\r\nProxy-Authorization: Bearer {}\r\n\r\n",
            common::TOKEN
        ),
    )
    .await;
    assert_eq!(
        (st, &body["error"]),
        (503, &serde_json::json!("draining")),
        "{body}"
    );
    let r = http
        .post(format!("{base}/v1/devices/draining/actions/reboot"))
        .bearer_auth(common::TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let b: serde_json::Value = r.json().await.unwrap();
    assert_eq!(b["error"], "draining", "{b}");

    // The session's command finishes, then the gateway stops: status 0.
    let (ssh_thread, _ssh) = ssh_thread;
    let (out, done_at) = tokio::task::block_in_place(|| ssh_thread.join().unwrap());
    assert!(
        out.status.success(),
        "ssh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "finished\n");
    assert!(done_at > termed, "the command ended before the SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = gw.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the gateway did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
    eprintln!(
        "ssh command done {:?} after SIGTERM; gateway exited {:?} after SIGTERM ({:?} after the session started)",
        done_at - termed,
        termed.elapsed(),
        started.elapsed()
    );
    let down = events
        .wait_for(Duration::from_secs(5), |e| e["type"] == "link.down")
        .await;
    assert_eq!(down.data["device"], "draining");
    assert_eq!(down.data["reason"], "shutdown");
    let _ = sshd.kill();
    let _ = sshd.wait();
}
