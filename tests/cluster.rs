//! Cluster mode with a real `nats-server` (JetStream) and the real binary:
//! joining, the server version check, and each gateway's liveness lease
//! (a restart takes its own lease over at once, a duplicate of a live
//! gateway is refused, a clean stop gives the lease up).

mod common;

use common::nats::NatsServer;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_cloudlink");

fn free_port(udp: bool) -> u16 {
    if udp {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }
}

struct Proc {
    child: Child,
    api: String,
    log: Arc<Mutex<String>>,
}

impl Proc {
    /// `cloudlink serve` in cluster mode, not waiting for it.
    fn spawn(dir: &Path, key: &Path, nats: &str, id: &str, extra: &[&str]) -> Proc {
        let api = format!("127.0.0.1:{}", free_port(false));
        let mut child = Command::new(BIN)
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{}", free_port(true))])
            .args(["--api", &api, "--proxy", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir)
            .arg("--private-key-file")
            .arg(key)
            .args([
                "--nats",
                nats,
                "--gateway-id",
                id,
                "--endpoint",
                "127.0.0.1:1",
            ])
            .args(extra)
            .env_remove("CLOUDLINK_TOKEN")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = l.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        Proc {
            child,
            api: format!("http://{api}"),
            log,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until `/readyz` answers 200; the time it took.
    fn ready(&mut self, within: Duration) -> Duration {
        let start = Instant::now();
        while start.elapsed() < within {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("the gateway exited ({st}):\n{}", self.log());
            }
            if get(&format!("{}/readyz", self.api)).is_some_and(|(s, _)| s == 200) {
                return start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("not ready within {within:?}:\n{}", self.log());
    }

    /// Waits for the process to exit; its status.
    fn exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(start.elapsed() < within, "still running:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn metric(&self, name: &str) -> Option<f64> {
        let (_, text) = get(&format!("{}/metrics", self.api))?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Waits until metric `name` reads `want`.
    fn wait_metric(&self, name: &str, want: f64, within: Duration) {
        let start = Instant::now();
        loop {
            let got = self.metric(name);
            if got == Some(want) {
                return;
            }
            assert!(
                start.elapsed() < within,
                "{name} is {got:?}, not {want}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn terminate(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.exit(Duration::from_secs(20));
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP GET (no token: /readyz and /metrics need none).
fn get(url: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_at(rest.find('/')?);
    let mut s = std::net::TcpStream::connect(host).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split(' ').nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

/// One WireGuard identity for every gateway of a test's cluster.
fn shared_key(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("cluster.key");
    let key = cloudlink::keys::generate_private_key();
    std::fs::write(&path, cloudlink::keys::encode_key(&key)).unwrap();
    path
}

const ALIVE: &str = "cloudlink_cluster_gateways_alive";

#[test]
fn leases_refuse_a_live_duplicate_and_let_a_restart_in_at_once() {
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let key = shared_key(tmp.path());
    let dir = |n: &str| tmp.path().join(n);
    let lease = ["--cluster-lease", "15s"];

    let mut a = Proc::spawn(&dir("a"), &key, &nats.url, "gw-a", &lease);
    a.ready(Duration::from_secs(20));
    a.wait_metric(ALIVE, 1.0, Duration::from_secs(10));

    // A second live process with gw-a's id (its own data directory): the
    // lease is being refreshed, so it refuses to start, and says why.
    let mut dup = Proc::spawn(
        &dir("dup"),
        &key,
        &nats.url,
        "gw-a",
        &["--cluster-lease", "6s"],
    );
    let st = dup.exit(Duration::from_secs(30));
    assert!(!st.success());
    let log = dup.log();
    assert!(
        log.contains("gw-a") && log.contains("held by a running gateway"),
        "{log}"
    );

    // Another id joins; both see two gateways.
    let mut b = Proc::spawn(&dir("b"), &key, &nats.url, "gw-b", &lease);
    b.ready(Duration::from_secs(20));
    a.wait_metric(ALIVE, 2.0, Duration::from_secs(10));
    b.wait_metric(ALIVE, 2.0, Duration::from_secs(10));

    // kill -9, then the same gateway (same data directory) again: its own
    // previous boot holds the lease, which it takes over at once, without
    // watching whether someone refreshes it.
    a.kill9();
    let mut a2 = Proc::spawn(&dir("a"), &key, &nats.url, "gw-a", &lease);
    a2.ready(Duration::from_secs(20));
    let log = a2.log();
    assert!(log.contains("a restart, taking it over"), "{log}");
    assert!(!log.contains("watching whether it is refreshed"), "{log}");
    b.wait_metric(ALIVE, 2.0, Duration::from_secs(10));

    // A clean stop gives the lease up: the other gateway sees it go at once.
    a2.terminate();
    b.wait_metric(ALIVE, 1.0, Duration::from_secs(10));
    assert!(a2.log().contains("cluster lease taken"));
}

#[test]
fn a_lease_no_one_refreshes_is_taken_over_by_another_process() {
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let key = shared_key(tmp.path());
    let lease = ["--cluster-lease", "6s"];
    let mut a = Proc::spawn(&tmp.path().join("a"), &key, &nats.url, "gw-x", &lease);
    a.ready(Duration::from_secs(20));
    a.kill9();
    // Another machine (another data directory) with gw-x's id: the lease is
    // not being refreshed, so after watching it for a third of the lease it
    // takes it over, without waiting for it to expire.
    let mut b = Proc::spawn(&tmp.path().join("b"), &key, &nats.url, "gw-x", &lease);
    b.ready(Duration::from_secs(20));
    b.wait_metric(ALIVE, 1.0, Duration::from_secs(10));
    assert!(
        b.log().contains("watching whether it is refreshed"),
        "{}",
        b.log()
    );
}

#[test]
fn cluster_mode_says_why_it_cannot_start() {
    let tmp = tempfile::tempdir().unwrap();
    let key = shared_key(tmp.path());
    // No server there.
    let port = free_port(false);
    let mut p = Proc::spawn(
        &tmp.path().join("a"),
        &key,
        &format!("nats://127.0.0.1:{port}"),
        "gw-a",
        &[],
    );
    assert!(!p.exit(Duration::from_secs(30)).success());
    assert!(p.log().contains("cannot reach NATS"), "{}", p.log());

    // An id that cannot be a KV key or a subject token.
    let nats = NatsServer::start();
    let mut p = Proc::spawn(&tmp.path().join("b"), &key, &nats.url, "gw.a", &[]);
    assert!(!p.exit(Duration::from_secs(30)).success());
    assert!(p.log().contains("--gateway-id"), "{}", p.log());

    // A missing shared key file is named, not replaced by a new identity.
    let mut p = Proc::spawn(
        &tmp.path().join("c"),
        &tmp.path().join("missing.key"),
        &nats.url,
        "gw-c",
        &[],
    );
    assert!(!p.exit(Duration::from_secs(30)).success());
    assert!(p.log().contains("missing.key"), "{}", p.log());
}

/// Debian's own nats-server (2.9) has no KV limit markers: cluster mode
/// refuses it and names the version it needs.
#[test]
fn a_server_older_than_2_11_is_refused() {
    let old = std::path::PathBuf::from("/usr/sbin/nats-server");
    let old = if old.exists() {
        old
    } else {
        std::path::PathBuf::from("/usr/bin/nats-server")
    };
    assert!(
        old.exists(),
        "Debian's nats-server package (2.9) is needed: tests/run.sh installs it"
    );
    let nats = NatsServer::start_with(old, true);
    let tmp = tempfile::tempdir().unwrap();
    let key = shared_key(tmp.path());
    let mut p = Proc::spawn(&tmp.path().join("a"), &key, &nats.url, "gw-a", &[]);
    assert!(!p.exit(Duration::from_secs(30)).success());
    let log = p.log();
    assert!(log.contains("needs 2.11 or later"), "{log}");
}
