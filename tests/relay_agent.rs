//! The relay end to end with `cloudlink agent` on the device side: the real
//! ssh client to a real sshd through the CONNECT proxy, half-close in each
//! direction, every error answer, deletion ending a stream, and the agent
//! coming back by itself after the gateway restarts, per-device stream caps,
//! the audit trail, and per-device bandwidth limits.

mod common;

use common::proxy::*;
use common::ssh::*;
use common::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(20);

async fn gateway() -> TestGateway {
    TestGateway::start_with(|c| {
        c.link_timeout = Duration::from_secs(30);
        c.allow_ports = vec![22222, 7001, 7002, 9];
        c.connect_timeout = Duration::from_secs(2);
    })
    .await
}

/// A local service: reads until EOF, then answers the byte count and closes.
async fn count_until_eof_server() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut total = 0usize;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n,
                    }
                }
                let _ = s.write_all(format!("got {total}").as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    port
}

/// A local service: greets, closes its sending side at once, then reads
/// until EOF and reports what it received on `tx`.
async fn greet_then_listen_server(tx: tokio::sync::mpsc::UnboundedSender<usize>) -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let tx = tx.clone();
            tokio::spawn(async move {
                let (mut rd, mut wr) = s.into_split();
                wr.write_all(b"hello, then FIN").await.unwrap();
                wr.shutdown().await.unwrap();
                let mut buf = vec![0u8; 65536];
                let mut total = 0usize;
                loop {
                    match rd.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n,
                    }
                }
                let _ = tx.send(total);
            });
        }
    });
    port
}

async fn wait_up(events: &mut SseReader, uuid: &str) {
    events
        .wait_for(WAIT, |e| e["type"] == "link.up" && e["device"] == uuid)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_through_the_agent_and_a_20_mb_file() {
    let mut g = gateway().await;
    let mut events = g.events(None).await;
    let ssh = SshFixture::new();
    let sshd_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut sshd = ssh.start_sshd(&[], &format!("127.0.0.1:{sshd_port}"));
    let _agent = Agent::start(&g, "agent-ssh", &[format!("22222=127.0.0.1:{sshd_port}")]).await;
    wait_up(&mut events, "agent-ssh").await;
    wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", sshd_port)).is_ok()
    });
    let proxy_port = g.gw().proxy_addr().port();

    let o = tokio::task::block_in_place(|| {
        ssh.ssh(
            proxy_port,
            TOKEN,
            "agent-ssh.balena",
            22222,
            "echo through-the-agent",
            None,
        )
    });
    assert!(
        o.status.success(),
        "ssh failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout), "through-the-agent\n");

    let (file, sum) = random_file(ssh.dir.path(), 20 * 1024 * 1024);
    let remote = ssh.dir.path().join("received.bin");
    let t = Instant::now();
    let o = tokio::task::block_in_place(|| {
        ssh.ssh(
            proxy_port,
            TOKEN,
            "agent-ssh",
            22222,
            &format!("cat > {0} && sha256sum {0}", remote.display()),
            Some(&file),
        )
    });
    assert!(
        o.status.success(),
        "ssh failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let got = String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(got, sum, "20 MB arrived byte-identical");
    eprintln!(
        "20 MiB through ssh + relay + agent in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let _ = sshd.kill();
    let _ = sshd.wait();
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_is_carried_in_each_direction() {
    let mut g = gateway().await;
    let mut events = g.events(None).await;
    let count_port = count_until_eof_server().await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let greet_port = greet_then_listen_server(tx).await;
    let _agent = Agent::start(
        &g,
        "agent-half",
        &[
            format!("7001=127.0.0.1:{count_port}"),
            format!("7002=127.0.0.1:{greet_port}"),
        ],
    )
    .await;
    wait_up(&mut events, "agent-half").await;
    let proxy = g.gw().proxy_addr();

    // Client → device: the client sends, closes its side, and still reads
    // the device's answer (given only after the device saw EOF).
    let (st, _, mut s) = connect(proxy, TOKEN, "agent-half:7001").await;
    assert_eq!(st, 200);
    s.write_all(&vec![7u8; 300_000]).await.unwrap();
    s.shutdown().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer, "got 300000");

    // Device → client: the device greets and closes its side; the client
    // sees EOF, then still sends, and the device receives all of it.
    let (st, why, s) = connect(proxy, TOKEN, "agent-half.cloudlink:7002").await;
    assert_eq!(st, 200, "{why}");
    let (mut rd, mut wr) = s.into_split();
    let mut greeting = String::new();
    tokio::time::timeout(WAIT, rd.read_to_string(&mut greeting))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(greeting, "hello, then FIN");
    wr.write_all(&vec![1u8; 200_000]).await.unwrap();
    wr.shutdown().await.unwrap();
    let got = tokio::time::timeout(WAIT, rx.recv()).await;
    if got.is_err() {
        eprintln!("gateway sockets: {:?}", g.gw().relay.socket_states());
    }
    assert_eq!(got.unwrap(), Some(200_000));
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_proxy_error_answer() {
    let mut g = gateway().await;
    let mut events = g.events(None).await;
    let count_port = count_until_eof_server().await;
    let _agent = Agent::start(&g, "agent-err", &[format!("7001=127.0.0.1:{count_port}")]).await;
    wait_up(&mut events, "agent-err").await;
    g.register(
        "offline-dev",
        &cloudlink::keys::public_key(&cloudlink::keys::generate_private_key()),
    )
    .await;
    let proxy = g.gw().proxy_addr();

    let check = |st: u16, body: &serde_json::Value, want: u16, code: &str| {
        assert_eq!(st, want, "{body}");
        assert_eq!(body["error"], code, "{body}");
        assert!(body["message"].as_str().unwrap().len() > 20, "{body}");
    };
    // 400: malformed requests.
    let (st, b, _) = raw_connect(proxy, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    check(st, &b, 400, "bad_request");
    let (st, b, _) = raw_connect(proxy, "CONNECT\r\n\r\n").await;
    check(st, &b, 400, "bad_request");
    let (st, b, _) = connect(proxy, TOKEN, "agent-err").await;
    check(st, &b, 400, "bad_request");
    let (st, b, _) = connect(proxy, TOKEN, "Not_A_Device:7001").await;
    check(st, &b, 400, "bad_request");
    // 407: no token, wrong token; Basic with the token as password works.
    let (st, b, _) = raw_connect(proxy, "CONNECT agent-err:7001 HTTP/1.1\r\n\r\n").await;
    check(st, &b, 407, "unauthorized");
    let (st, b, _) = connect(proxy, "not-the-token-at-all", "agent-err:7001").await;
    check(st, &b, 407, "unauthorized");
    let basic = base64_basic(TOKEN);
    let (st, _, _) = raw_connect(
        proxy,
        &format!("CONNECT agent-err:7001 HTTP/1.1\r\nProxy-Authorization: Basic {basic}\r\n\r\n"),
    )
    .await;
    assert_eq!(st, 200);
    // 403: a port outside --allow-ports.
    let (st, b, _) = connect(proxy, TOKEN, "agent-err:23").await;
    check(st, &b, 403, "port_not_allowed");
    // 404: unknown device.
    let (st, b, _) = connect(proxy, TOKEN, "ghost:7001").await;
    check(st, &b, 404, "device_not_found");
    // 503: registered, but its cloudlink is down.
    let (st, b, _) = connect(proxy, TOKEN, "offline-dev:7001").await;
    check(st, &b, 503, "cloudlink_unavailable");
    assert!(b["message"]
        .as_str()
        .unwrap()
        .contains("SSH and immediate actions are unavailable"));
    // 502: nothing listens on port 9 of the device.
    let (st, b, _) = connect(proxy, TOKEN, "agent-err:9").await;
    check(st, &b, 502, "device_refused");
    assert!(
        g.metric("cloudlink_relay_streams_total{result=\"refused\"}")
            .await
            >= 1.0
    );
    g.stop().await;
}

fn base64_basic(token: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("user:{token}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_does_not_answer_gets_504() {
    let mut g = gateway().await;
    let mut events = g.events(None).await;
    // A WireGuard device whose link is up but which never answers TCP.
    let key = cloudlink::keys::generate_private_key();
    let reg = g.register("mute", &cloudlink::keys::public_key(&key)).await;
    let gw_pub =
        cloudlink::keys::decode_key(reg["gateway"]["public_key"].as_str().unwrap()).unwrap();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut dev = TestDevice::with_key(g.udp, &gw_pub, 5, socket, key);
    dev.connect();
    wait_up(&mut events, "mute").await;
    let t = Instant::now();
    let (st, b, _) = connect(g.gw().proxy_addr(), TOKEN, "mute:7001").await;
    assert_eq!(st, 504, "{b}");
    assert_eq!(b["error"], "device_timeout");
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "after --connect-timeout"
    );
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_device_ends_its_streams() {
    let mut g = gateway().await;
    let mut events = g.events(None).await;
    let count_port = count_until_eof_server().await;
    let _agent = Agent::start(&g, "agent-del", &[format!("7001=127.0.0.1:{count_port}")]).await;
    wait_up(&mut events, "agent-del").await;
    let (st, _, mut s) = connect(g.gw().proxy_addr(), TOKEN, "agent-del:7001").await;
    assert_eq!(st, 200);
    s.write_all(b"some bytes").await.unwrap();
    assert_eq!(g.metric("cloudlink_relay_streams").await, 1.0);
    let (st, _) = g.call("DELETE", "/v1/devices/agent-del", None).await;
    assert_eq!(st, 204);
    // The stream ends: the client reads EOF (or a reset), promptly.
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("stream ended");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert!(
        eventually(WAIT, async || g.metric("cloudlink_relay_streams").await
            == 0.0)
        .await
    );
    g.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_comes_back_after_a_gateway_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.allow_ports = vec![7001];
    // The agent must come back by itself (liveness pings, backoff), not
    // because the gateway redials it: redial off.
    c.redial_rate = 0;
    let mut g = TestGateway::start_in(dir, c.clone(), "127.0.0.1:0").await;
    let udp = g.udp;
    let mut events = g.events(None).await;
    let count_port = count_until_eof_server().await;
    let _agent = Agent::start(&g, "agent-back", &[format!("7001=127.0.0.1:{count_port}")]).await;
    wait_up(&mut events, "agent-back").await;
    g.stop().await;

    // Same data directory, same UDP address, new process state.
    let dir = std::mem::replace(&mut g.dir, tempfile::tempdir().unwrap());
    let mut g = TestGateway::start_in(dir, c, &udp.to_string()).await;
    let mut events = g.events(None).await;
    let t = Instant::now();
    wait_up(&mut events, "agent-back").await;
    eprintln!(
        "agent back {:.1} s after the restart",
        t.elapsed().as_secs_f64()
    );
    // Streams work again. (A stream opened in the very first moments after
    // the reconnect was seen, rarely and only under full-suite load, to end
    // without an answer; the agent keeps serving, so allow a few tries.)
    let deadline = Instant::now() + WAIT;
    let answer = loop {
        let (st, _, mut s) = connect(g.gw().proxy_addr(), TOKEN, "agent-back:7001").await;
        assert_eq!(st, 200);
        s.write_all(b"12345").await.unwrap();
        s.shutdown().await.unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer).await;
        if answer == "got 5" || Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(answer, "got 5");
    g.stop().await;
}

/// Relay streams are bounded per device (`--max-device-streams`) and in all
/// (`--max-relay-streams`): beyond, 503 `too_many_streams`, counted as
/// `limited`; a stream that ends frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_streams_per_device_and_in_all_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.allow_ports = vec![7001];
    c.link_timeout = std::time::Duration::from_secs(30);
    c.max_device_streams = 2;
    let mut g = TestGateway::start_in(dir, c, "127.0.0.1:0").await;
    let mut events = g.events(None).await;
    let count_port = count_until_eof_server().await;
    let _agent = Agent::start(&g, "capped", &[format!("7001=127.0.0.1:{count_port}")]).await;
    wait_up(&mut events, "capped").await;
    let proxy = g.gw().proxy_addr();
    let (st, _, first) = connect(proxy, TOKEN, "capped:7001").await;
    assert_eq!(st, 200);
    let (st, _, _second) = connect(proxy, TOKEN, "capped:7001").await;
    assert_eq!(st, 200);
    let (st, e, _) = connect(proxy, TOKEN, "capped:7001").await;
    assert_eq!(
        (st, &e["error"]),
        (503, &serde_json::json!("too_many_streams")),
        "{e}"
    );
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("--max-device-streams"),
        "{e}"
    );
    assert_eq!(
        g.metric("cloudlink_relay_streams_total{result=\"limited\"}")
            .await,
        1.0
    );
    // One ends: a new one fits (once the stack has let the port go).
    drop(first);
    assert!(
        eventually(WAIT, async || connect(proxy, TOKEN, "capped:7001").await.0
            == 200)
        .await,
        "no place after a stream ended"
    );
    // The gateway-wide bound.
    g.gw().relay.set_stream_limits(1, 32);
    let (st, e, _) = connect(proxy, TOKEN, "capped:7001").await;
    assert_eq!(
        (st, &e["error"]),
        (503, &serde_json::json!("too_many_streams")),
        "{e}"
    );
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("--max-relay-streams"),
        "{e}"
    );
    g.stop().await;
}

/// The audit trail records an ssh session through the proxy (who, which
/// device and port, bytes both ways, start and end) and an action (who,
/// what, the answer), as events and as records that survive a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_trail_records_an_ssh_session_and_an_action_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.link_timeout = Duration::from_secs(30);
    c.allow_ports = vec![22222, 48484];
    let mut g = TestGateway::start_in(dir, c.clone(), "127.0.0.1:0").await;
    let mut events = g.events(None).await;
    let (st, ops) = g
        .call(
            "POST",
            "/v1/tokens",
            Some(serde_json::json!({"name": "ops-desk", "scopes": ["relay", "actions"]})),
        )
        .await;
    assert_eq!(st, 201, "{ops}");
    let (token, token_id) = (
        ops["token"].as_str().unwrap().to_owned(),
        ops["id"].as_str().unwrap().to_owned(),
    );
    let ssh = SshFixture::new();
    let sshd_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut sshd = ssh.start_sshd(&[], &format!("127.0.0.1:{sshd_port}"));
    let marks = tempfile::tempdir().unwrap();
    let hook = format!("reboot=touch {}", marks.path().join("rebooted").display());
    let _agent = Agent::start_with(
        &g,
        "audited",
        &[format!("22222=127.0.0.1:{sshd_port}")],
        &["--on-action".into(), hook],
    )
    .await;
    wait_up(&mut events, "audited").await;
    wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", sshd_port)).is_ok()
    });
    let proxy_port = g.gw().proxy_addr().port();
    let o = tokio::task::block_in_place(|| {
        ssh.ssh(proxy_port, &token, "audited", 22222, "echo audited", None)
    });
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = g
        .http
        .post(g.url("/v1/devices/audited/actions/reboot"))
        .bearer_auth(&token)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // Both events, in whichever order the stream's end and the action's
    // answer came.
    let (mut relay_seen, mut action_seen) = (false, false);
    while !(relay_seen && action_seen) {
        let e = events.next(WAIT).await;
        match e.data["type"].as_str() {
            Some("audit.relay") => {
                assert_eq!(e.data["token_id"], token_id.as_str());
                assert_eq!(e.data["device"], "audited");
                relay_seen = true;
            }
            Some("audit.action") => {
                assert_eq!(e.data["token_id"], token_id.as_str());
                action_seen = true;
            }
            _ => {}
        }
    }

    // After a restart, the records are there.
    g.stop().await;
    let dir = std::mem::replace(&mut g.dir, tempfile::tempdir().unwrap());
    let mut g = TestGateway::start_in(dir, c, "127.0.0.1:0").await;
    let (st, page) = g.call("GET", "/v1/audit?device=audited", None).await;
    assert_eq!(st, 200, "{page}");
    let records = page["records"].as_array().unwrap();
    let relay = records
        .iter()
        .find(|r| r["type"] == "audit.relay")
        .unwrap_or_else(|| panic!("{page}"));
    assert_eq!(relay["token_id"], token_id.as_str());
    assert_eq!(relay["detail"]["port"], 22222);
    assert!(
        relay["detail"]["bytes_to_device"].as_u64().unwrap() > 1000,
        "{relay}"
    );
    assert!(
        relay["detail"]["bytes_from_device"].as_u64().unwrap() > 1000,
        "{relay}"
    );
    assert_eq!(relay["detail"]["ended"], "closed");
    let started =
        humantime::parse_rfc3339(relay["detail"]["started_at"].as_str().unwrap()).unwrap();
    let ended = humantime::parse_rfc3339(relay["detail"]["ended_at"].as_str().unwrap()).unwrap();
    assert!(ended >= started);
    let action = records
        .iter()
        .find(|r| r["type"] == "audit.action")
        .unwrap_or_else(|| panic!("{page}"));
    assert_eq!(action["token_id"], token_id.as_str());
    assert_eq!(action["detail"]["action"], "reboot");
    assert_eq!(action["detail"]["status"], 202);
    assert_eq!(action["detail"]["source"], "device");
    // The token's creation is recorded too (by the bootstrap token).
    let (_, all) = g.call("GET", "/v1/audit", None).await;
    assert!(all["records"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["type"] == "audit.token" && r["detail"]["token"] == token_id.as_str()));
    // Admin only.
    let (st, _) = {
        let r = g
            .http
            .get(g.url("/v1/audit"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), ())
    };
    assert_eq!(st, 403);
    let _ = sshd.kill();
    let _ = sshd.wait();
    g.stop().await;
}

/// A local service: sends `n` bytes, then closes.
async fn send_n_server(n: usize) -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let chunk = vec![0x5au8; 64 * 1024];
                let mut left = n;
                while left > 0 {
                    let k = left.min(chunk.len());
                    if s.write_all(&chunk[..k]).await.is_err() {
                        return;
                    }
                    left -= k;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    port
}

/// Sends `n` bytes through an open CONNECT stream to a counting service and
/// waits for its count; the rate in Mbit/s from the first byte to the
/// count (what the device received).
async fn upload(mut s: tokio::net::TcpStream, n: usize) -> f64 {
    let t = Instant::now();
    let chunk = vec![0xa5u8; 64 * 1024];
    let mut left = n;
    let (mut rd, mut wr) = s.split();
    let writer = async {
        while left > 0 {
            let k = left.min(chunk.len());
            wr.write_all(&chunk[..k]).await.unwrap();
            left -= k;
        }
        wr.shutdown().await.unwrap();
    };
    let mut answer = String::new();
    let reader = rd.read_to_string(&mut answer);
    let ((), r) = tokio::join!(writer, reader);
    r.unwrap();
    assert_eq!(answer, format!("got {n}"));
    n as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e6
}

/// Reads a CONNECT stream to EOF; the rate in Mbit/s and the byte count.
async fn download(mut s: tokio::net::TcpStream) -> (f64, usize) {
    let t = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        match s.read(&mut buf).await.unwrap() {
            0 => break,
            n => total += n,
        }
    }
    (total as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e6, total)
}

/// `--device-rate-limit-kbps 10000`: one device's bulk transfers through the
/// relay run at 10 Mbit/s each way (within 10 %), while another device,
/// exempted with `rate_limit_kbps: 0` through PATCH while its stream was
/// already open, moves as fast alone as beside the limited one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_bandwidth_limit_holds_and_leaves_other_devices_alone() {
    const LIMIT_MBPS: f64 = 10.0;
    const N: usize = 5_000_000; // 4 s at the limit
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.allow_ports = vec![7001, 7002];
    c.link_timeout = Duration::from_secs(30);
    c.device_rate_limit_kbps = 10_000;
    let mut g = TestGateway::start_in(dir, c, "127.0.0.1:0").await;
    let mut events = g.events(None).await;
    let count_port = count_until_eof_server().await;
    let send_port = send_n_server(N).await;
    let forwards = [
        format!("7001=127.0.0.1:{count_port}"),
        format!("7002=127.0.0.1:{send_port}"),
    ];
    let _limited = Agent::start(&g, "limited", &forwards).await;
    let _free = Agent::start(&g, "free", &forwards).await;
    // Both link.up events, in whichever order they come (waiting for one
    // and then the other would skip the second if it came first).
    let mut up = std::collections::HashSet::new();
    while up.len() < 2 {
        let m = events
            .wait_for(WAIT, |e| {
                e["type"] == "link.up" && (e["device"] == "limited" || e["device"] == "free")
            })
            .await;
        up.insert(m.data["device"].as_str().unwrap().to_owned());
    }
    let proxy = g.gw().proxy_addr();

    // The free device's stream opens under the default limit; the PATCH
    // that exempts it applies to that open stream.
    let (st, _, free_up) = connect(proxy, TOKEN, "free:7001").await;
    assert_eq!(st, 200);
    let (st, d) = g
        .call(
            "PATCH",
            "/v1/devices/free",
            Some(serde_json::json!({"rate_limit_kbps": 0})),
        )
        .await;
    assert_eq!(
        (st, &d["rate_limit_kbps"]),
        (200, &serde_json::json!(0)),
        "{d}"
    );
    let (st, e) = g
        .call(
            "PATCH",
            "/v1/devices/free",
            Some(serde_json::json!({"rate_limit_kbps": -5})),
        )
        .await;
    assert_eq!(
        (st, &e["field"]),
        (400, &serde_json::json!("rate_limit_kbps")),
        "{e}"
    );
    let free_alone = upload(free_up, 4 * N).await;
    eprintln!("free device alone: {free_alone:.1} Mbit/s");
    assert!(
        free_alone > 3.0 * LIMIT_MBPS,
        "the exempted device is still limited: {free_alone:.1} Mbit/s"
    );

    // Both at once: the limited one at its limit, the other as fast as alone.
    let (st, _, limited_up) = connect(proxy, TOKEN, "limited:7001").await;
    assert_eq!(st, 200);
    let (st, _, free_up) = connect(proxy, TOKEN, "free:7001").await;
    assert_eq!(st, 200);
    let limited = tokio::spawn(upload(limited_up, N));
    let free_beside = upload(free_up, 4 * N).await;
    let limited = limited.await.unwrap();
    eprintln!("to the devices at once: limited {limited:.2} Mbit/s, free {free_beside:.1} Mbit/s");
    assert!(
        (limited - LIMIT_MBPS).abs() <= LIMIT_MBPS * 0.1,
        "to the limited device: {limited:.2} Mbit/s, limit {LIMIT_MBPS}"
    );
    assert!(
        free_beside >= 0.5 * free_alone,
        "the free device slowed down beside the limited one: {free_beside:.1} Mbit/s, alone {free_alone:.1}"
    );

    // From the limited device: its TCP is held back by the window.
    let (st, _, limited_down) = connect(proxy, TOKEN, "limited:7002").await;
    assert_eq!(st, 200);
    let (down, n) = download(limited_down).await;
    eprintln!("from the limited device: {down:.2} Mbit/s");
    assert_eq!(n, N);
    assert!(
        (down - LIMIT_MBPS).abs() <= LIMIT_MBPS * 0.1,
        "from the limited device: {down:.2} Mbit/s, limit {LIMIT_MBPS}"
    );
    for d in ["to_device", "from_device"] {
        let shaped = g
            .metric(&format!(
                "cloudlink_throttled_bytes_total{{direction=\"{d}\",how=\"shaped\"}}"
            ))
            .await;
        assert!(shaped > 1e6, "{d}: {shaped} bytes shaped");
    }
    let (_, d) = g.call("GET", "/v1/devices/limited", None).await;
    assert_eq!(d["rate_limit_kbps"], serde_json::Value::Null, "{d}");
    g.stop().await;
}

/// The agent's first initiation always goes out (issue "Operate it": in 9
/// of 26 restarts it was lost and the agent came up 5 s late): 50
/// consecutive restarts each bring the tunnel up within 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_comes_up_within_a_second_in_50_restarts() {
    use std::io::BufRead;
    let mut g = gateway().await;
    let key = cloudlink::keys::generate_private_key();
    g.register("restarts", &cloudlink::keys::public_key(&key))
        .await;
    // The agent's files, as `Agent::start_registered` writes them.
    let mut first = Agent::start_registered(&g, "restarts", &key, &[], &[]).await;
    let _ = first.child.kill();
    let _ = first.child.wait();
    let dir = first.dir.path().to_owned();
    let mut slowest = Duration::ZERO;
    for i in 0..50 {
        let t = Instant::now();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cloudlink"))
            .arg("agent")
            .arg("--config")
            .arg(dir.join("wg0.conf"))
            .arg("--private-key-file")
            .arg(dir.join("device.key"))
            .args(["--log", "info"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("cloudlink up") {
                    let _ = tx.send(());
                }
            }
        });
        let up = tokio::task::block_in_place(|| rx.recv_timeout(Duration::from_secs(3)));
        let took = t.elapsed();
        let _ = child.kill();
        let _ = child.wait();
        assert!(up.is_ok(), "restart {i}: not up within 3 s");
        assert!(
            took < Duration::from_secs(1),
            "restart {i}: up after {took:?}"
        );
        slowest = slowest.max(took);
    }
    eprintln!("50 agent restarts, the slowest up after {slowest:?}");
    g.stop().await;
}
