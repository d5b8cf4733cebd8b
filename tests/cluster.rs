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

use common::free_port;

struct Proc {
    child: Child,
    api: String,
    udp: std::net::SocketAddr,
    proxy: u16,
    log: Arc<Mutex<String>>,
}

impl Proc {
    /// `cloudlink serve` in cluster mode, not waiting for it.
    fn spawn(dir: &Path, key: &Path, nats: &str, id: &str, extra: &[&str]) -> Proc {
        Self::spawn_on("127.0.0.1", dir, key, nats, id, extra)
    }

    /// The same, its UDP port on `host` (`0.0.0.0`: reachable from test
    /// namespaces).
    fn spawn_on(host: &str, dir: &Path, key: &Path, nats: &str, id: &str, extra: &[&str]) -> Proc {
        let api = format!("127.0.0.1:{}", free_port(false));
        let proxy = free_port(false);
        let port = free_port(true);
        let udp: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut child = Command::new(BIN)
            .arg("serve")
            .args([
                "--listen",
                &format!("{host}:{port}"),
                "--token",
                common::TOKEN,
            ])
            .args(["--api", &api, "--proxy", &format!("127.0.0.1:{proxy}")])
            .arg("--data-dir")
            .arg(dir)
            .arg("--private-key-file")
            .arg(key)
            .args(if nats.is_empty() {
                vec!["--gateway-id", id]
            } else {
                vec!["--nats", nats, "--gateway-id", id]
            })
            .args(["--endpoint", "127.0.0.1:1"])
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
            udp,
            proxy,
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

/// An API call with the shared token.
async fn call(
    base: &str,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let c = reqwest::Client::new();
    let mut rb = c
        .request(method.parse().unwrap(), format!("{base}{path}"))
        .bearer_auth(common::TOKEN);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let r = rb.send().await.unwrap();
    let st = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        st,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

/// The shared registry: a device registered through one gateway dials the
/// other; a device deleted through one is cut off on the other; batches
/// and concurrent registrations on both never share an address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_is_shared_between_gateways() {
    use cloudlink::keys::{encode_key, generate_private_key, public_key};
    use serde_json::json;
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let key = shared_key(tmp.path());
    let gw_secret = cloudlink::keys::decode_key(&std::fs::read_to_string(&key).unwrap()).unwrap();
    let gw_public = public_key(&gw_secret);
    let mut a = Proc::spawn(&tmp.path().join("a"), &key, &nats.url, "gw-a", &[]);
    let mut b = Proc::spawn(&tmp.path().join("b"), &key, &nats.url, "gw-b", &[]);
    a.ready(Duration::from_secs(20));
    b.ready(Duration::from_secs(20));

    // The cluster's event stream, as A serves it, from before anything.
    let mut events_a0 = common::SseReader::connect(&format!("{}/v1/events", a.api), None).await;
    // Registered through A: B knows it at once (the answer waited for A's
    // replica; B's follows within the watch's latency).
    let dev_key = generate_private_key();
    let reg = register(&a, "shared-1", &dev_key).await;
    let seen = Instant::now();
    loop {
        let (st, d) = call(&b.api, "GET", "/v1/devices/shared-1", None).await;
        if st == 200 {
            assert_eq!(d["address"], reg["address"]);
            break;
        }
        assert!(
            seen.elapsed() < Duration::from_secs(1),
            "B did not see the device within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A change through B reaches A (compare-and-set on the record).
    let (st, d) = call(
        &b.api,
        "PATCH",
        "/v1/devices/shared-1",
        Some(json!({"name": "renamed on B", "poll_interval_s": 60})),
    )
    .await;
    assert_eq!(st, 200, "{d}");
    assert_eq!(d["name"], "renamed on B");
    let seen = Instant::now();
    loop {
        let (_, d) = call(&a.api, "GET", "/v1/devices/shared-1", None).await;
        if d["name"] == "renamed on B" {
            assert_eq!(d["heartbeat"]["poll_interval_s"], 60);
            break;
        }
        assert!(
            seen.elapsed() < Duration::from_secs(1),
            "A did not see the change within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // It dials B and its link comes up there.
    let mut events_b = common::SseReader::connect(&format!("{}/v1/events", b.api), None).await;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut dev = common::TestDevice::with_key(b.udp, &gw_public, 31, socket, dev_key);
    dev.connect();
    let up = events_b
        .wait_for(Duration::from_secs(10), |e| e["type"] == "link.up")
        .await;
    assert_eq!(up.data["device"], "shared-1");
    // A's stream is the cluster's: it shows B's link-up, under the same
    // id; both gateways name B as the owner.
    let up_a = events_a0
        .wait_for(Duration::from_secs(5), |e| {
            e["type"] == "link.up" && e["device"] == "shared-1"
        })
        .await;
    assert_eq!(up_a.data["gateway"], "gw-b");
    assert_eq!(up_a.id, up.id, "one stream, one id per event");
    for gw in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(2);
        while view(gw, "shared-1").await != (true, Some("gw-b".into())) {
            assert!(Instant::now() < deadline, "{} does not show gw-b", gw.api);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // Another device, connected to A, deleted through B: A cuts it off.
    let k2 = generate_private_key();
    let _ = register(&b, "shared-2", &k2).await;
    let mut events_a = common::SseReader::connect(&format!("{}/v1/events", a.api), None).await;
    // A may be a few milliseconds behind B's answer.
    let dev2 = dial_opt(a.udp, &gw_public, 32, k2);
    let _dev2 = dev2.expect("A answered shared-2's handshake");
    events_a
        .wait_for(Duration::from_secs(10), |e| {
            e["type"] == "link.up" && e["device"] == "shared-2"
        })
        .await;
    let t = Instant::now();
    let (st, _) = call(&b.api, "DELETE", "/v1/devices/shared-2", None).await;
    assert_eq!(st, 204);
    let down = events_a
        .wait_for(Duration::from_secs(5), |e| {
            e["type"] == "link.down" && e["device"] == "shared-2"
        })
        .await;
    let took = t.elapsed();
    assert_eq!(down.data["reason"], "revoked");
    assert!(
        took < Duration::from_secs(1),
        "A cut the device off after {took:?}"
    );
    eprintln!("deleted through B, cut off on A after {took:?}");

    // A batch through B and a batch through A at the same time: every
    // device on both gateways, no address twice.
    let batch = |prefix: &str| {
        let devices: Vec<_> = (0..150)
            .map(|i| json!({"uuid": format!("{prefix}-{i}"), "public_key": encode_key(&public_key(&generate_private_key()))}))
            .collect();
        json!({ "devices": devices })
    };
    let (ra, rb) = tokio::join!(
        call(&a.api, "POST", "/v1/devices/batch", Some(batch("from-a"))),
        call(&b.api, "POST", "/v1/devices/batch", Some(batch("from-b"))),
    );
    assert_eq!(
        (ra.0, ra.1["created"].as_u64()),
        (200, Some(150)),
        "{}",
        ra.1
    );
    assert_eq!(
        (rb.0, rb.1["created"].as_u64()),
        (200, Some(150)),
        "{}",
        rb.1
    );
    for gw in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (_, page) = call(&gw.api, "GET", "/v1/devices?limit=1000", None).await;
            let list = page["devices"].as_array().cloned().unwrap_or_default();
            let addrs: std::collections::HashSet<_> = list
                .iter()
                .map(|d| d["address"].as_str().unwrap().to_owned())
                .collect();
            if list.len() == 301 {
                assert_eq!(addrs.len(), 301, "an address was handed out twice");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} devices on {}",
                list.len(),
                gw.api
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // The same key through the other gateway: refused, as on one gateway.
    let (st, e) = call(
        &a.api,
        "POST",
        "/v1/devices",
        Some(json!({"uuid": "thief", "public_key": reg["public_key"]})),
    )
    .await;
    assert_eq!(st, 409, "{e}");
    assert_eq!(e["error"], "public_key_taken");
    // Every change is on the stream once, whichever gateway made it and
    // however many applied it.
    let later = events_a0.drain_for(Duration::from_millis(1000)).await;
    // The whole stream again, from its start (a bare stream sequence).
    let all = common::SseReader::connect(&format!("{}/v1/events", a.api), Some("0"))
        .await
        .drain_for(Duration::from_millis(1000))
        .await;
    let count = |ty: &str, dev: &str| {
        all.iter()
            .filter(|m| m.data["type"] == ty && m.data["device"] == dev)
            .count()
    };
    assert_eq!(count("device.registered", "shared-1"), 1);
    assert_eq!(count("device.updated", "shared-1"), 1);
    assert_eq!(count("device.registered", "shared-2"), 1);
    assert_eq!(count("device.deleted", "shared-2"), 1);
    let batched: u64 = all
        .iter()
        .filter(|m| m.data["type"] == "device.registered" && m.data["device"].is_null())
        .map(|m| m.data["count"].as_u64().unwrap())
        .sum::<u64>()
        + all
            .iter()
            .filter(|m| {
                m.data["type"] == "device.registered"
                    && m.data["device"]
                        .as_str()
                        .is_some_and(|d| d.starts_with("from-"))
            })
            .count() as u64;
    assert_eq!(batched, 300, "each batch device registered once");
    // A consumer resumes on B where it left A: the stream sequence.
    let mut resumed =
        common::SseReader::connect(&format!("{}/v1/events", b.api), up_a.id.as_deref()).await;
    let next = resumed.next(Duration::from_secs(5)).await;
    assert_ne!(next.data["type"], "resync", "{:?}", next.data);
    let after_up = later.first().expect("events after the link-up");
    assert_eq!(next.id, after_up.id);
    drop(dev);
}

/// A gateway that ran alone joins a cluster with its devices (nothing is
/// dropped); a gateway that was away when a device was deleted drops it when
/// it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_keeps_a_lone_gateways_devices_and_catches_up_after_an_absence() {
    use cloudlink::keys::{encode_key, generate_private_key, public_key};
    use serde_json::json;
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let key = shared_key(tmp.path());
    let dir_a = tmp.path().join("a");
    let mut alone = Proc::spawn(&dir_a, &key, "", "gw-a", &[]);
    alone.ready(Duration::from_secs(20));
    let mut addresses = Vec::new();
    for i in 0..3 {
        let (st, d) = call(
            &alone.api,
            "POST",
            "/v1/devices",
            Some(json!({"uuid": format!("old-{i}"), "public_key": encode_key(&public_key(&generate_private_key()))})),
        )
        .await;
        assert_eq!(st, 201);
        addresses.push(d["address"].as_str().unwrap().to_owned());
    }
    alone.terminate();

    // First join: its devices go into the cluster's registry, addresses kept.
    let mut a = Proc::spawn(&dir_a, &key, &nats.url, "gw-a", &[]);
    a.ready(Duration::from_secs(20));
    let mut b = Proc::spawn(&tmp.path().join("b"), &key, &nats.url, "gw-b", &[]);
    b.ready(Duration::from_secs(20));
    for (i, addr) in addresses.iter().enumerate() {
        let (st, d) = call(&b.api, "GET", &format!("/v1/devices/old-{i}"), None).await;
        assert_eq!(st, 200, "{d}");
        assert_eq!(d["address"], addr.as_str());
    }
    // A is away while old-1 is deleted and new-1 registered through B.
    a.terminate();
    let (st, _) = call(&b.api, "DELETE", "/v1/devices/old-1", None).await;
    assert_eq!(st, 204);
    let (st, _) = call(
        &b.api,
        "POST",
        "/v1/devices",
        Some(json!({"uuid": "new-1", "public_key": encode_key(&public_key(&generate_private_key()))})),
    )
    .await;
    assert_eq!(st, 201);
    let mut a = Proc::spawn(&dir_a, &key, &nats.url, "gw-a", &[]);
    a.ready(Duration::from_secs(20));
    let (st, _) = call(&a.api, "GET", "/v1/devices/old-1", None).await;
    assert_eq!(st, 404, "deleted while A was away");
    for uuid in ["old-0", "old-2", "new-1"] {
        let (st, _) = call(&a.api, "GET", &format!("/v1/devices/{uuid}"), None).await;
        assert_eq!(st, 200, "{uuid}");
    }
    assert!(
        a.log().contains("deleted while this gateway was away"),
        "{}",
        a.log()
    );
    b.terminate();
}

/// The device's state on every gateway of the cluster, as the API shows it:
/// (connected, owner).
async fn view(gw: &Proc, uuid: &str) -> (bool, Option<String>) {
    let (_, d) = call(&gw.api, "GET", &format!("/v1/devices/{uuid}"), None).await;
    (
        d["cloudlink"]["connected"].as_bool().unwrap_or(false),
        d["cloudlink"]["gateway"].as_str().map(str::to_owned),
    )
}

/// NATS and two gateways of one cluster (`gw-a`, `gw-b`) with `opts`,
/// ready; the temporary directory holds their data and the shared key.
struct Two {
    nats: NatsServer,
    tmp: tempfile::TempDir,
    key: std::path::PathBuf,
    a: Proc,
    b: Proc,
}

fn two_gateways(opts: &[&str]) -> Two {
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let key = shared_key(tmp.path());
    let mut a = Proc::spawn(&tmp.path().join("a"), &key, &nats.url, "gw-a", opts);
    let mut b = Proc::spawn(&tmp.path().join("b"), &key, &nats.url, "gw-b", opts);
    a.ready(Duration::from_secs(20));
    b.ready(Duration::from_secs(20));
    Two {
        nats,
        tmp,
        key,
        a,
        b,
    }
}

/// The WireGuard public key of the cluster's shared identity.
fn gateway_public(key: &Path) -> cloudlink::keys::KeyBytes {
    cloudlink::keys::public_key(
        &cloudlink::keys::decode_key(&std::fs::read_to_string(key).unwrap()).unwrap(),
    )
}

/// Registers `uuid` with `key`'s public key through `gw`; the answer.
async fn register(gw: &Proc, uuid: &str, key: &cloudlink::keys::KeyBytes) -> serde_json::Value {
    use cloudlink::keys::{encode_key, public_key};
    let (st, reg) = call(
        &gw.api,
        "POST",
        "/v1/devices",
        Some(serde_json::json!({"uuid": uuid, "public_key": encode_key(&public_key(key))})),
    )
    .await;
    assert_eq!(st, 201, "{reg}");
    reg
}

/// The device answers the handshake initiation `gw` sends it (a redial),
/// as a WireGuard peer answers its peer, and says something after.
fn answer_redial(uuid: &str, d: &mut common::TestDevice, gw: &Proc, within: Duration) {
    let mut buf = vec![0u8; 2048];
    d.socket.set_read_timeout(Some(within)).unwrap();
    let (n, from) = d
        .socket
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("{uuid}: no initiation from {}: {e}\n{}", gw.api, gw.log()));
    assert_eq!(from, gw.udp, "{uuid}");
    assert_eq!((buf[0], n), (1, 148), "a handshake initiation");
    d.gateway = from;
    d.feed(&buf[..n]);
    d.keepalive();
}

/// A boringtun test device with `key` that has completed a handshake with
/// the gateway at `udp` (retried: a device registered through another
/// gateway may reach this one's directory a few milliseconds later).
fn dial_opt(
    udp: std::net::SocketAddr,
    gw_public: &cloudlink::keys::KeyBytes,
    index: u32,
    key: cloudlink::keys::KeyBytes,
) -> Option<common::TestDevice> {
    for _ in 0..100 {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut d = common::TestDevice::with_key(udp, gw_public, index, socket, key);
        d.send_initiation();
        // The response is fed to the tunnel, which sends the keepalive.
        if d.receive_one().is_ok() {
            return Some(d);
        }
    }
    None
}

/// Registers a `cloudlink agent` device through `via` and starts it dialling
/// the gateway at `udp`, with `forwards` and more agent flags. Its
/// directory (for hook marks) stays with the agent.
async fn agent_device(
    via: &Proc,
    uuid: &str,
    udp: std::net::SocketAddr,
    forwards: &[String],
    extra: &[String],
) -> common::proxy::Agent {
    let key = cloudlink::keys::generate_private_key();
    let reg = register(via, uuid, &key).await;
    agent_for(&reg, &key, udp, forwards, extra)
}

/// Starts `cloudlink agent` for a registered device (`reg`, the API's
/// answer, and its `key`), dialling the gateway at `udp`.
fn agent_for(
    reg: &serde_json::Value,
    key: &cloudlink::keys::KeyBytes,
    udp: std::net::SocketAddr,
    forwards: &[String],
    extra: &[String],
) -> common::proxy::Agent {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("wg0.conf"),
        reg["wg_quick"]
            .as_str()
            .unwrap()
            .replace("127.0.0.1:1", &udp.to_string()),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("device.key"),
        cloudlink::keys::encode_key(key),
    )
    .unwrap();
    common::proxy::Agent::spawn_with(dir, forwards, extra)
}

/// Waits until `gw` shows `uuid` connected through `owner`.
async fn wait_owner(gw: &Proc, uuid: &str, owner: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while view(gw, uuid).await != (true, Some(owner.to_owned())) {
        assert!(
            Instant::now() < deadline,
            "{} never showed {uuid} on {owner}: {:?}",
            gw.api,
            view(gw, uuid).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every device in a gateway's listing: uuid → (connected, owner).
async fn listing(gw: &Proc) -> std::collections::HashMap<String, (bool, Option<String>)> {
    let (st, page) = call(&gw.api, "GET", "/v1/devices?limit=1000", None).await;
    assert_eq!(st, 200, "{page}");
    page["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["uuid"].as_str().unwrap().to_owned(),
                (
                    d["cloudlink"]["connected"].as_bool().unwrap_or(false),
                    d["cloudlink"]["gateway"].as_str().map(str::to_owned),
                ),
            )
        })
        .collect()
}

/// Ownership: a device connected to B shows `cloudlink.gateway` = B on
/// every gateway. B is killed: within lease + 5 s every one of its devices
/// is down with reason `gateway_lost`, exactly once on each survivor's stream,
/// and no sample ever shows a device with two owners.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_gateways_devices_go_down_exactly_once() {
    use cloudlink::keys::generate_private_key;

    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let key = shared_key(tmp.path());
    let gw_public = gateway_public(&key);
    let lease = ["--cluster-lease", "3s"];
    let mut a = Proc::spawn(&tmp.path().join("a"), &key, &nats.url, "gw-a", &lease);
    let mut b = Proc::spawn(&tmp.path().join("b"), &key, &nats.url, "gw-b", &lease);
    let mut c = Proc::spawn(&tmp.path().join("c"), &key, &nats.url, "gw-c", &lease);
    for p in [&mut a, &mut b, &mut c] {
        p.ready(Duration::from_secs(20));
    }
    const N: usize = 20;
    let mut devices = Vec::new();
    for i in 0..N {
        let k = generate_private_key();
        let _ = register(&a, &format!("held-{i}"), &k).await;
        devices.push(k);
    }
    // B knows them within milliseconds; each connects to B.
    let mut held = Vec::new();
    for (i, k) in devices.into_iter().enumerate() {
        let dev = dial_opt(b.udp, &gw_public, 40 + i as u32, k);
        held.push(dev.expect("B answered the handshake"));
    }
    for i in 0..N {
        let uuid = format!("held-{i}");
        let deadline = Instant::now() + Duration::from_secs(5);
        for gw in [&a, &c] {
            loop {
                if view(gw, &uuid).await == (true, Some("gw-b".into())) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{uuid} not shown on gw-b by {}",
                    gw.api
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let mut events_a = common::SseReader::connect(&format!("{}/v1/events", a.api), None).await;
    let mut events_c = common::SseReader::connect(&format!("{}/v1/events", c.api), None).await;

    let killed = Instant::now();
    let killed_wall = std::time::SystemTime::now();
    b.kill9();
    // Sample both survivors' listings every 100 ms until lease + 5 s.
    let limit = Duration::from_secs(3 + 5);
    let mut settled_at = None;
    let mut samples = 0;
    while killed.elapsed() < limit + Duration::from_secs(2) {
        let mut all_down = true;
        let (la, lc) = (listing(&a).await, listing(&c).await);
        samples += 1;
        for i in 0..N {
            let uuid = format!("held-{i}");
            let (va, vc) = (la[&uuid].clone(), lc[&uuid].clone());
            for v in [&va, &vc] {
                if v.0 {
                    all_down = false;
                    assert_eq!(
                        v.1.as_deref(),
                        Some("gw-b"),
                        "{uuid}: an owner other than gw-b appeared"
                    );
                }
            }
            if va.0 && vc.0 {
                assert_eq!(va.1, vc.1, "{uuid} shown with two owners");
            }
        }
        if all_down && settled_at.is_none() {
            settled_at = Some(killed.elapsed());
        }
        if let Some(t) = settled_at {
            assert!(
                t <= limit,
                "devices still shown on the dead gateway after {t:?}"
            );
        } else {
            assert!(
                killed.elapsed() <= limit,
                "devices still shown on the dead gateway after lease + 5 s"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("all devices of the killed gateway down after {settled_at:?} ({samples} samples of both listings)");
    // The stream is the cluster's: each survivor's shows exactly one
    // gateway_lost per device (one survivor reaped, both show it).
    for ev in [&mut events_a, &mut events_c] {
        let mut lost = std::collections::HashMap::<String, usize>::new();
        for m in ev.drain_for(Duration::from_millis(1500)).await {
            if m.data["type"] == "link.down" && m.data["reason"] == "gateway_lost" {
                let at = humantime::parse_rfc3339(m.data["at"].as_str().unwrap()).unwrap();
                let after = at.duration_since(killed_wall).unwrap_or_default();
                assert!(after <= limit, "gateway_lost {after:?} after the kill");
                *lost
                    .entry(m.data["device"].as_str().unwrap().to_owned())
                    .or_default() += 1;
            }
        }
        for i in 0..N {
            assert_eq!(lost.get(&format!("held-{i}")), Some(&1), "{lost:?}");
        }
    }
    let reaped = a
        .metric("cloudlink_cluster_reaped_devices_total")
        .unwrap_or(0.0)
        + c.metric("cloudlink_cluster_reaped_devices_total")
            .unwrap_or(0.0);
    assert_eq!(reaped, N as f64);
    drop(held);
}

/// A device that moves from A to B: B owns it, A drops its session at once,
/// and consumers see one `link.moved` from A to B, never a `link.down`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_moves_is_announced_as_moved_not_down_and_up() {
    use cloudlink::keys::generate_private_key;

    let opts = ["--link-timeout", "2s"];
    let Two {
        nats: _nats,
        tmp: _tmp,
        key,
        a,
        b,
    } = two_gateways(&opts);
    let gw_public = gateway_public(&key);
    let k = generate_private_key();
    let _ = register(&a, "mover", &k).await;
    let mut events_a = common::SseReader::connect(&format!("{}/v1/events", a.api), None).await;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut on_a = common::TestDevice::with_key(a.udp, &gw_public, 61, socket, k);
    on_a.connect();
    events_a
        .wait_for(Duration::from_secs(5), |e| e["type"] == "link.up")
        .await;
    // The device moves to B (the load balancer sent it there).
    let on_b = dial_opt(b.udp, &gw_public, 62, k);
    let mut on_b = on_b.expect("B answered");
    wait_owner(&a, "mover", "gw-b", Duration::from_secs(5)).await;
    // A let its session go when B took the device over.
    a.wait_metric("cloudlink_sessions", 0.0, Duration::from_secs(2));
    let moved = events_a
        .wait_for(Duration::from_secs(5), |e| e["type"] == "link.moved")
        .await;
    assert_eq!(moved.data["device"], "mover");
    assert_eq!(moved.data["from"], "gw-a");
    assert_eq!(moved.data["to"], "gw-b");
    assert_eq!(moved.data["gateway"], "gw-b");
    // Keep the device alive on B for longer than A's link timeout: nothing
    // else about it appears, on either gateway's stream.
    for _ in 0..15 {
        on_b.keepalive();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rest = events_a.drain_for(Duration::from_millis(300)).await;
    assert!(
        rest.iter()
            .all(|e| !e.data["type"].as_str().unwrap_or("").starts_with("link.")),
        "after the move: {:?}",
        rest.iter().map(|e| &e.data).collect::<Vec<_>>()
    );
    for gw in [&a, &b] {
        assert_eq!(
            view(gw, "mover").await,
            (true, Some("gw-b".into())),
            "on {}",
            gw.api
        );
    }
    assert_eq!(
        a.metric("cloudlink_link_events_total{type=\"link.down\"}"),
        Some(0.0)
    );
    drop(on_a);
}

/// Rolling restarts (issue "Cluster mode, part 2"): a gateway stopped with
/// SIGTERM while another lives hands its devices over. The survivor
/// redials each at its last endpoint, the devices answer it, and consumers
/// see one `link.moved` per device, never a `link.down`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_hands_its_devices_over_without_a_link_down() {
    use cloudlink::keys::generate_private_key;

    // A long lease: only a hand-over can be this quick.
    let lease = ["--cluster-lease", "60s"];
    let Two {
        nats: _nats,
        tmp: _tmp,
        key,
        a,
        mut b,
    } = two_gateways(&lease);
    let gw_public = gateway_public(&key);
    const N: usize = 5;
    let mut devices = Vec::new();
    for i in 0..N {
        let k = generate_private_key();
        let uuid = format!("leaver-{i}");
        let _ = register(&a, &uuid, &k).await;
        let dev = dial_opt(b.udp, &gw_public, 71 + i as u32, k);
        devices.push((uuid, dev.expect("B answered")));
    }
    for (uuid, _) in &devices {
        let deadline = Instant::now() + Duration::from_secs(5);
        while view(&a, uuid).await != (true, Some("gw-b".into())) {
            assert!(Instant::now() < deadline, "A never showed {uuid} on gw-b");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut events = common::SseReader::connect(&format!("{}/v1/events", a.api), None).await;
    let stopped = Instant::now();
    b.terminate();
    // Each device hears from A (B's endpoint record said where it is) and
    // answers it, as a WireGuard peer answers its peer's initiation.
    for (uuid, d) in devices.iter_mut() {
        answer_redial(uuid, d, &a, Duration::from_secs(20));
    }
    for (uuid, _) in &devices {
        let deadline = stopped + Duration::from_secs(30);
        while view(&a, uuid).await != (true, Some("gw-a".into())) {
            assert!(
                Instant::now() < deadline,
                "{uuid} not on gw-a 30 s after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    eprintln!(
        "all {N} devices on gw-a {:?} after SIGTERM",
        stopped.elapsed()
    );
    for (_, d) in devices.iter_mut() {
        d.keepalive();
    }
    let seen = events.drain_for(Duration::from_millis(1500)).await;
    let all: Vec<_> = seen.iter().map(|e| &e.data).collect();
    for (uuid, _) in &devices {
        let of = |ty: &str| {
            seen.iter()
                .filter(|e| e.data["type"] == ty && e.data["device"] == uuid.as_str())
                .count()
        };
        assert_eq!(of("link.moved"), 1, "{uuid}: {all:?}");
        assert_eq!(of("link.down"), 0, "{uuid}: {all:?}");
        assert_eq!(of("link.up"), 0, "{uuid}: {all:?}");
    }
    let moved = seen
        .iter()
        .find(|e| e.data["type"] == "link.moved")
        .unwrap();
    assert_eq!(
        (moved.data["from"].as_str(), moved.data["to"].as_str()),
        (Some("gw-b"), Some("gw-a"))
    );
    assert_eq!(
        a.metric("cloudlink_cluster_takeover_redials_total"),
        Some(N as f64)
    );
    assert_eq!(
        a.metric("cloudlink_cluster_reaped_devices_total"),
        Some(0.0)
    );
    a.wait_metric(ALIVE, 1.0, Duration::from_secs(5));
}

/// Issue 12's own case: A holds the device and is paused (SIGSTOP) while the
/// device moves to B; resumed (SIGCONT), A's timers find the device silent
/// and bring its link down there; that late link-down does not mark the
/// device down in the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_former_owner_does_not_mark_a_moved_device_down() {
    use cloudlink::keys::generate_private_key;

    // The pause stays well inside the lease: A is slow, not dead.
    let opts = ["--link-timeout", "2s", "--cluster-lease", "30s"];
    let Two {
        nats: _nats,
        tmp: _tmp,
        key,
        a,
        b,
    } = two_gateways(&opts);
    let gw_public = gateway_public(&key);
    let k = generate_private_key();
    let _ = register(&a, "paused", &k).await;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut on_a = common::TestDevice::with_key(a.udp, &gw_public, 81, socket, k);
    on_a.connect();
    wait_owner(&b, "paused", "gw-a", Duration::from_secs(5)).await;
    let mut events_b = common::SseReader::connect(&format!("{}/v1/events", b.api), None).await;
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(a.child.id() as i32, libc::SIGSTOP) };
    let on_b = dial_opt(b.udp, &gw_public, 82, k);
    let mut on_b = on_b.expect("B answered");
    let deadline = Instant::now() + Duration::from_secs(5);
    while view(&b, "paused").await != (true, Some("gw-b".into())) {
        assert!(Instant::now() < deadline, "B never took the device over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Longer than A's link timeout, then A runs again.
    for _ in 0..8 {
        on_b.keepalive();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // SAFETY: as above.
    unsafe { libc::kill(a.child.id() as i32, libc::SIGCONT) };
    // A, running again, lets its session go: its timers found the device
    // silent, or its watch saw B's claim, whichever came first.
    a.wait_metric("cloudlink_sessions", 0.0, Duration::from_secs(10));
    for _ in 0..6 {
        on_b.keepalive();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The stream shows the move once and no link-down.
    let seen = events_b.drain_for(Duration::from_millis(500)).await;
    let of = |ty: &str| {
        seen.iter()
            .filter(|e| e.data["type"] == ty && e.data["device"] == "paused")
            .count()
    };
    assert_eq!(
        of("link.moved"),
        1,
        "{:?}",
        seen.iter().map(|e| &e.data).collect::<Vec<_>>()
    );
    assert_eq!(of("link.down"), 0);
    // Nor does its status drop: the device was connected all along.
    assert!(
        !seen.iter().any(|e| e.data["type"] == "status.changed"
            && e.data["device"] == "paused"
            && e.data["cloudlink"] == false),
        "{:?}",
        seen.iter().map(|e| &e.data).collect::<Vec<_>>()
    );
    for gw in [&a, &b] {
        let (_, d) = call(&gw.api, "GET", "/v1/devices/paused", None).await;
        assert_eq!(d["status_detail"], "cloudlink-only", "on {}: {d}", gw.api);
    }
    for gw in [&a, &b] {
        assert_eq!(
            view(gw, "paused").await,
            (true, Some("gw-b".into())),
            "on {}",
            gw.api
        );
    }
    drop(on_a);
}

/// A gateway paused for longer than its lease: the survivor reaps its
/// device (`gateway_lost`); resumed, the gateway takes its lease again
/// (it is not a duplicate) and claims the device it still holds, which
/// every gateway then shows connected through it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_back_from_a_long_pause_claims_its_devices_again() {
    use cloudlink::keys::generate_private_key;

    let opts = ["--cluster-lease", "3s"];
    let Two {
        nats: _nats,
        tmp: _tmp,
        key,
        a,
        b,
    } = two_gateways(&opts);
    let gw_public = gateway_public(&key);
    let k = generate_private_key();
    let _ = register(&a, "sleeper", &k).await;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut dev = common::TestDevice::with_key(a.udp, &gw_public, 91, socket, k);
    dev.connect();
    wait_owner(&b, "sleeper", "gw-a", Duration::from_secs(5)).await;
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(a.child.id() as i32, libc::SIGSTOP) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while view(&b, "sleeper").await != (false, None) {
        assert!(
            Instant::now() < deadline,
            "B never reaped the paused gateway's device"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // SAFETY: as above.
    unsafe { libc::kill(a.child.id() as i32, libc::SIGCONT) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while view(&b, "sleeper").await != (true, Some("gw-a".into())) {
        dev.keepalive();
        assert!(
            Instant::now() < deadline,
            "the device was not claimed again:\n{}",
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = a.log();
    assert!(log.contains("taken again"), "{log}");
    assert!(!log.contains("another process took"), "{log}");
    b.wait_metric(ALIVE, 2.0, Duration::from_secs(5));
}

/// A bucket with no device record but a stray claim (left by a crash
/// between a registration's steps): a gateway joins at once, it does not
/// wait for records that will never come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_holding_only_a_stray_claim_does_not_hold_a_gateway_up() {
    let nats = NatsServer::start();
    let client = async_nats::connect(&nats.url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let kv = js
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: "cloudlink_devices".into(),
            history: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    kv.create("a.167772170", bytes::Bytes::from_static(b"crashed-midway"))
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let key = shared_key(tmp.path());
    let mut a = Proc::spawn(&tmp.path().join("a"), &key, &nats.url, "gw-a", &[]);
    let took = a.ready(Duration::from_secs(20));
    assert!(took < Duration::from_secs(10), "{took:?}");
}

/// Degraded mode: NATS stopped for 30 s. The device A holds (an unmodified
/// wireguard-go peer) keeps its tunnel and ssh to it through A works the
/// whole time; changes answer 503 at once; a device that links up on A
/// meanwhile is claimed when NATS is back, its `link.up` then reaching the
/// cluster's stream once; nothing is reaped, and no event is doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_and_ssh_survive_a_nats_outage() {
    use cloudlink::keys::{encode_key, generate_private_key, public_key};
    use common::netns::{wg_keypair, Netns, WgGoDevice};
    use common::ssh::SshFixture;
    use serde_json::json;
    let mut nats = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let key = shared_key(tmp.path());
    let gw_public = gateway_public(&key);
    // A lease much shorter than the outage: every lease lapses meanwhile.
    // wireguard-go keeps the link with 25 s keepalives.
    let opts = ["--cluster-lease", "6s", "--link-timeout", "60s"];
    let mut a = Proc::spawn_on(
        "0.0.0.0",
        &tmp.path().join("a"),
        &key,
        &nats.url,
        "gw-a",
        &opts,
    );
    let mut b = Proc::spawn(&tmp.path().join("b"), &key, &nats.url, "gw-b", &opts);
    a.ready(Duration::from_secs(20));
    b.ready(Duration::from_secs(20));

    // A wireguard-go device with sshd, connected through A.
    let tag = format!("n{}", std::process::id() % 10_000);
    let subnet = (std::process::id() % 50 + 460) as u16;
    let ns = Netns::create(&tag, subnet);
    let (private, public) = wg_keypair();
    let (st, reg) = call(
        &a.api,
        "POST",
        "/v1/devices",
        Some(json!({"uuid": "steady", "public_key": public})),
    )
    .await;
    assert_eq!(st, 201, "{reg}");
    let mut dev = WgGoDevice::configure(ns, &reg, &private, a.udp.port(), &tag);
    dev.wait_handshake();
    let ssh = SshFixture::new();
    dev.start_sshd(&ssh);
    let ssh_echo = |word: &str| {
        tokio::task::block_in_place(|| {
            ssh.echo_via(("127.0.0.1", a.proxy), common::TOKEN, "steady.balena", word)
        });
    };
    ssh_echo("before");
    let deadline = Instant::now() + Duration::from_secs(5);
    while view(&b, "steady").await != (true, Some("gw-a".into())) {
        assert!(Instant::now() < deadline, "B never showed steady on gw-a");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A `cloudlink agent` device on A, whose reboot hook leaves a mark.
    let marks = tempfile::tempdir().unwrap();
    let mark = marks.path().join("rebooted");
    let hook = format!("reboot=touch {}", mark.display());
    let _agent = agent_device(&a, "agent-1", a.udp, &[], &["--on-action".into(), hook]).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while view(&b, "agent-1").await != (true, Some("gw-a".into())) {
        assert!(Instant::now() < deadline, "the agent never came up on A");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A second device, registered now, first dials during the outage.
    let k2 = generate_private_key();
    let _ = register(&a, "newcomer", &k2).await;
    // Where the stream stood before the outage.
    let mut before = common::SseReader::connect(&format!("{}/v1/events", b.api), None).await;
    let (_, listing) = call(&b.api, "GET", "/v1/devices?limit=1", None).await;
    let as_of = listing["as_of"].as_str().unwrap().to_owned();

    nats.stop();
    let outage = Instant::now();
    // Changes are refused at once, saying why.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    let (st, e) = call(
        &a.api,
        "POST",
        "/v1/devices",
        Some(json!({"uuid": "refused", "public_key": encode_key(&public_key(&generate_private_key()))})),
    )
    .await;
    assert_eq!(st, 503, "{e}");
    assert_eq!(e["error"], "cluster_unavailable");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "503 after {:?}",
        t.elapsed()
    );
    // The newcomer links up on A meanwhile.
    let newcomer = dial_opt(a.udp, &gw_public, 91, k2);
    let mut newcomer = newcomer.expect("A answered the newcomer during the outage");
    // A heartbeat posted to A meanwhile: its status change waits in A's
    // buffer for the stream.
    let (st, _) = call(
        &a.api,
        "POST",
        "/v1/devices/steady/heartbeat",
        Some(json!({})),
    )
    .await;
    assert_eq!(st, 200);
    // An action to the agent A holds is delivered, and its hook runs.
    let (st, r) = call(
        &a.api,
        "POST",
        "/v1/devices/agent-1/actions/reboot",
        Some(json!({})),
    )
    .await;
    assert_eq!(st, 202, "{r}");
    tokio::task::block_in_place(|| {
        common::ssh::wait_until(Duration::from_secs(10), || mark.exists())
    });
    // ssh works throughout.
    ssh_echo("during-1");
    while outage.elapsed() < Duration::from_secs(25) {
        newcomer.keepalive();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    ssh_echo("during-2");
    while outage.elapsed() < Duration::from_secs(30) {
        newcomer.keepalive();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(a.metric("cloudlink_cluster_events_buffered").unwrap_or(0.0) >= 1.0);
    nats.restart();
    let back = Instant::now();

    // Ownership converges: both gateways show both devices on A.
    for uuid in ["steady", "newcomer"] {
        for gw in [&a, &b] {
            wait_owner(gw, uuid, "gw-a", Duration::from_secs(20)).await;
        }
    }
    a.wait_metric(
        "cloudlink_cluster_events_buffered",
        0.0,
        Duration::from_secs(10),
    );
    // Past a lease and the reaping grace: nothing was reaped.
    while back.elapsed() < Duration::from_secs(12) {
        newcomer.keepalive();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    ssh_echo("after");
    for gw in [&a, &b] {
        assert_eq!(
            gw.metric("cloudlink_cluster_reaped_devices_total"),
            Some(0.0)
        );
    }
    // The events of the outage arrived, once each: the live reader and a
    // consumer resuming from before the outage see the same.
    let resumed = common::SseReader::connect(&format!("{}/v1/events", b.api), Some(&as_of))
        .await
        .drain_for(Duration::from_millis(1000))
        .await;
    let live = before.drain_for(Duration::from_millis(500)).await;
    let on_a = common::SseReader::connect(&format!("{}/v1/events", a.api), Some(&as_of))
        .await
        .drain_for(Duration::from_millis(1000))
        .await;
    for seen in [&live, &resumed, &on_a] {
        let of = |ty: &str, dev: &str| {
            seen.iter()
                .filter(|e| e.data["type"] == ty && e.data["device"] == dev)
                .count()
        };
        let all: Vec<_> = seen.iter().map(|e| &e.data).collect();
        assert_eq!(of("link.up", "newcomer"), 1, "{all:?}");
        assert_eq!(of("link.down", "steady"), 0, "{all:?}");
        assert_eq!(of("link.up", "steady"), 0, "{all:?}");
        assert_eq!(of("link.down", "newcomer"), 0, "{all:?}");
        // The heartbeat's status change, buffered during the outage.
        assert_eq!(
            seen.iter()
                .filter(|e| e.data["type"] == "status.changed"
                    && e.data["device"] == "steady"
                    && e.data["reason"] == "heartbeat")
                .count(),
            1,
            "{all:?}"
        );
        assert_eq!(
            seen.iter().filter(|e| e.data["type"] == "resync").count(),
            0
        );
        let ids: std::collections::HashSet<_> = seen.iter().map(|e| e.id.clone()).collect();
        assert_eq!(ids.len(), seen.len(), "an event twice: {all:?}");
    }
    drop(dev);
}

/// Status is the cluster's: a heartbeat posted to B counts on A, a device
/// connected to B is `operational` in A's listing, summary and filters, its
/// traffic counters reach A (lagging by up to 10 s), and each status change
/// is on the stream once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_heartbeats_and_counters_are_the_clusters() {
    use cloudlink::keys::generate_private_key;
    use serde_json::json;
    let Two {
        nats: _nats,
        tmp: _tmp,
        key,
        a,
        b,
    } = two_gateways(&[]);
    let gw_public = gateway_public(&key);
    let mut events = common::SseReader::connect(&format!("{}/v1/events", a.api), None).await;
    let k = generate_private_key();
    let _ = register(&a, "st-1", &k).await;
    let wait_on = |gw: &Proc, what: &'static str, ok: fn(&serde_json::Value) -> bool| {
        let api = gw.api.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(12);
            loop {
                let (_, d) = call(&api, "GET", "/v1/devices/st-1", None).await;
                if ok(&d) {
                    return d;
                }
                assert!(Instant::now() < deadline, "{what} on {api}: {d}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    // A heartbeat through B: A knows within a second.
    let t = Instant::now();
    let (st, _) = call(
        &b.api,
        "POST",
        "/v1/devices/st-1/heartbeat",
        Some(json!({})),
    )
    .await;
    assert_eq!(st, 200);
    let d = wait_on(&a, "heartbeat online", |d| {
        d["heartbeat"]["state"] == "online"
    })
    .await;
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(d["status_detail"], "heartbeat-only");
    // Connected through B: operational on A.
    let socket_dev = dial_opt(b.udp, &gw_public, 95, k);
    let mut dev = socket_dev.expect("B answered");
    for _ in 0..5 {
        dev.keepalive();
    }
    wait_on(&a, "operational", |d| d["status"] == "operational").await;
    let (_, summary) = call(&a.api, "GET", "/v1/summary", None).await;
    assert_eq!(summary["by_status"]["operational"], 1, "{summary}");
    assert_eq!(summary["connected"], 1, "{summary}");
    assert_eq!(summary["sessions"], 0, "{summary}");
    let (_, page) = call(&a.api, "GET", "/v1/devices?status=operational", None).await;
    assert_eq!(page["devices"][0]["uuid"], "st-1", "{page}");
    // Its traffic, as B counted it, within the sharing period.
    let d = wait_on(&a, "counters from B", |d| {
        d["cloudlink"]["rx_packets"].as_u64().unwrap_or(0) >= 5
    })
    .await;
    assert_eq!(d["cloudlink"]["gateway"], "gw-b");
    let (_, on_b) = call(&b.api, "GET", "/v1/devices/st-1", None).await;
    assert!(
        on_b["cloudlink"]["rx_bytes"].as_u64() >= d["cloudlink"]["rx_bytes"].as_u64(),
        "{on_b} vs {d}"
    );
    // Each status change once on the stream, announced by B.
    let seen = events.drain_for(Duration::from_millis(500)).await;
    let changes: Vec<_> = seen
        .iter()
        .filter(|e| e.data["type"] == "status.changed")
        .map(|e| {
            (
                e.data["reason"].as_str().unwrap().to_owned(),
                e.data["to"]["status"].as_str().unwrap().to_owned(),
                e.data["gateway"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        changes,
        vec![
            (
                "heartbeat".into(),
                "reduced-functionality".into(),
                "gw-b".into()
            ),
            ("link.up".into(), "operational".into(), "gw-b".into()),
        ]
    );
}

/// A dashboard session made on A works on B (the cookie is signed with the
/// cluster's key), and signing out on B ends it on A too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_sessions_work_on_every_gateway() {
    let Two {
        nats,
        tmp,
        key,
        a,
        b,
    } = two_gateways(&[]);
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/v1/session", a.api))
        .json(&serde_json::json!({"token": common::TOKEN}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let cookie = r
        .headers()
        .get("set-cookie")
        .unwrap()
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let csrf = r.json::<serde_json::Value>().await.unwrap()["csrf_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let get = |api: String| {
        let (http, cookie) = (http.clone(), cookie.clone());
        async move {
            http.get(format!("{api}/v1/devices"))
                .header("cookie", cookie)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(get(a.api.clone()).await, 200);
    assert_eq!(get(b.api.clone()).await, 200);
    // A forged or foreign cookie is refused.
    let forged = cookie.replace("c2.", "c2.1");
    let st = http
        .get(format!("{}/v1/devices", b.api))
        .header("cookie", forged)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(st, 401);
    // Signed out through B (its own page: Origin and CSRF token).
    let host_b = b.api.strip_prefix("http://").unwrap().to_owned();
    let r = http
        .delete(format!("{}/v1/session", b.api))
        .header("cookie", &cookie)
        .header("origin", format!("http://{host_b}"))
        .header("x-csrf-token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(get(b.api.clone()).await, 401);
    let t = Instant::now();
    while get(a.api.clone()).await != 401 {
        assert!(t.elapsed() < Duration::from_secs(2), "still signed in on A");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A gateway started later knows the sign-out too.
    let mut c = Proc::spawn(&tmp.path().join("c"), &key, &nats.url, "gw-c", &[]);
    c.ready(Duration::from_secs(20));
    let t = Instant::now();
    while get(c.api.clone()).await != 401 {
        assert!(t.elapsed() < Duration::from_secs(2), "signed in on C");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// On a three-server NATS cluster (what production runs): the gateways keep
/// three copies of every bucket and of the stream, so a NATS server killed
/// under them loses nothing. Registration, ownership and the event stream
/// go on through the two left, and no gateway is taken for dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_server_nats_cluster_survives_losing_a_server() {
    use cloudlink::keys::{encode_key, generate_private_key, public_key};
    use serde_json::json;
    let mut nats = common::nats::NatsCluster::start();
    let tmp = tempfile::tempdir().unwrap();
    let key = shared_key(tmp.path());
    let gw_public = gateway_public(&key);
    let mut a = Proc::spawn(&tmp.path().join("a"), &key, &nats.urls, "gw-a", &[]);
    let mut b = Proc::spawn(&tmp.path().join("b"), &key, &nats.urls, "gw-b", &[]);
    a.ready(Duration::from_secs(30));
    b.ready(Duration::from_secs(30));
    assert!(a.log().contains("replicas=3"), "{}", a.log());
    let mut events = common::SseReader::connect(&format!("{}/v1/events", a.api), None).await;
    let connect_to_b =
        |k: [u8; 32], n: u32| dial_opt(b.udp, &gw_public, n, k).expect("B never answered");
    let register = |uuid: &'static str, k: [u8; 32], api: String| async move {
        // Right after a server is lost the client may still be moving to
        // another one (503 cluster_unavailable), and the buckets that server
        // led elect another leader (JetStream's Raft: about 10 s of writes
        // timing out here): then it works.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (st, e) = call(
                &api,
                "POST",
                "/v1/devices",
                Some(json!({"uuid": uuid, "public_key": encode_key(&public_key(&k))})),
            )
            .await;
            if st == 201 {
                return;
            }
            assert!(st == 503 && Instant::now() < deadline, "{st} {e}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    let k1 = generate_private_key();
    register("r3-1", k1, a.api.clone()).await;
    let _d1 = connect_to_b(k1, 101);
    events
        .wait_for(Duration::from_secs(10), |e| {
            e["type"] == "link.up" && e["device"] == "r3-1"
        })
        .await;

    nats.kill(0);
    let killed = Instant::now();
    let k2 = generate_private_key();
    register("r3-2", k2, b.api.clone()).await;
    eprintln!(
        "registered through B {:?} after a NATS server was killed",
        killed.elapsed()
    );
    let _d2 = connect_to_b(k2, 102);
    let up = events
        .wait_for(Duration::from_secs(30), |e| {
            e["type"] == "link.up" && e["device"] == "r3-2"
        })
        .await;
    assert_eq!(up.data["gateway"], "gw-b");
    eprintln!("its link-up on A's stream {:?} after", killed.elapsed());
    for uuid in ["r3-1", "r3-2"] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while view(&a, uuid).await != (true, Some("gw-b".into())) {
            assert!(Instant::now() < deadline, "{uuid} not shown on gw-b by A");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for gw in [&a, &b] {
        assert_eq!(
            gw.metric("cloudlink_cluster_reaped_devices_total"),
            Some(0.0)
        );
        assert_eq!(gw.metric("cloudlink_cluster_gateways_alive"), Some(2.0));
    }
}

/// Routing (issue "Cluster mode, part 2"): an action posted to A for a
/// device B holds (a `cloudlink agent`) goes to B and the device's answer
/// comes back through A; a device nobody holds gets A's own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_posted_to_any_gateway_reaches_the_device_through_its_owner() {
    use serde_json::json;
    let Two {
        nats: _nats,
        tmp: _tmp,
        key: _key,
        a,
        b,
    } = two_gateways(&[]);
    let marks = tempfile::tempdir().unwrap();
    let mark = marks.path().join("restarted");
    let hook = format!(
        "restart-service=echo $CLOUDLINK_SERVICE_NAME > {}",
        mark.display()
    );
    let _agent = agent_device(&a, "routed", b.udp, &[], &["--on-action".into(), hook]).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while view(&a, "routed").await != (true, Some("gw-b".into())) {
        assert!(Instant::now() < deadline, "the agent never came up on B");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = reqwest::Client::new()
        .post(format!(
            "{}/v1/devices/routed/actions/restart-service",
            a.api
        ))
        .bearer_auth(common::TOKEN)
        .json(&json!({"service_name": "kiosk-ui", "app_id": 7}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let source = r.headers()["x-cloudlink-source"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!((status, source.as_str()), (200, "device"), "{body}");
    assert_eq!(body["device_status"], 200, "{body}");
    assert_eq!(std::fs::read_to_string(&mark).unwrap().trim(), "kiosk-ui");
    assert_eq!(
        a.metric("cloudlink_cluster_forwarded_total{kind=\"action\"}"),
        Some(1.0)
    );
    // B's own errors come back as B gave them (an unknown field: 400).
    let (st, e) = call(
        &a.api,
        "POST",
        "/v1/devices/routed/actions/reboot",
        Some(json!({"bogus": 1})),
    )
    .await;
    assert_eq!(st, 400, "{e}");
    assert_eq!(e["field"], "bogus");
}

/// Routing: `ssh` through A's CONNECT proxy reaches a device B holds (a
/// `cloudlink agent` forwarding to a real sshd): A forwards the CONNECT one
/// hop to B's proxy with the caller's credential. A CONNECT already
/// forwarded once is not forwarded again: 508 naming the loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_through_any_gateways_proxy_reaches_the_device_through_its_owner() {
    use common::ssh::{wait_until, SshFixture};
    let Two {
        nats: _nats,
        tmp: _tmp,
        key: _key,
        a,
        b,
    } = two_gateways(&[]);
    let ssh = SshFixture::new();
    let sshd_port = free_port(false);
    let _sshd = KillOnDrop(ssh.start_sshd(&[], &format!("127.0.0.1:{sshd_port}")));
    wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", sshd_port)).is_ok()
    });
    let _agent = agent_device(
        &a,
        "far",
        b.udp,
        &[format!("22=127.0.0.1:{sshd_port}")],
        &[],
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while view(&a, "far").await != (true, Some("gw-b".into())) {
        assert!(Instant::now() < deadline, "the agent never came up on B");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let o = tokio::task::block_in_place(|| {
        ssh.ssh(
            a.proxy,
            common::TOKEN,
            "far.balena",
            22,
            "echo through-a",
            None,
        )
    });
    assert!(
        o.status.success(),
        "ssh through A failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        a.log()
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout), "through-a\n");
    assert_eq!(
        a.metric("cloudlink_cluster_forwarded_total{kind=\"connect\"}"),
        Some(1.0)
    );
    // Without the token, A refuses before forwarding anything.
    let (st, _, _) = common::proxy::raw_connect(
        format!("127.0.0.1:{}", a.proxy).parse().unwrap(),
        "CONNECT far.balena:22 HTTP/1.1\r\n\r\n",
    )
    .await;
    assert_eq!(st, 407);
    // A CONNECT that A already forwarded, reaching a gateway that does not
    // hold the device: not forwarded again.
    let (st, body, _) = common::proxy::raw_connect(
        format!("127.0.0.1:{}", a.proxy).parse().unwrap(),
        &format!(
            "CONNECT far.balena:22 HTTP/1.1\r\nProxy-Authorization: Bearer {}\r\nForwarded: by=gw-c\r\n\r\n",
            common::TOKEN
        ),
    )
    .await;
    assert_eq!(st, 508, "{body}");
    assert_eq!(body["error"], "forwarding_loop");
    assert!(
        body["message"].as_str().unwrap().contains("gw-c -> gw-a"),
        "{body}"
    );
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Coming back on survivors (issue "Cluster mode, part 2"): after `kill -9`
/// of the gateway holding the devices, the survivor that reaps them
/// (`gateway_lost`, once) tells every survivor where they were, and they
/// redial them: each device is connected through a survivor again within
/// seconds, with its address unchanged, not at its next handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateways_devices_are_redialled_by_the_survivors() {
    use cloudlink::keys::generate_private_key;

    let lease = ["--cluster-lease", "3s"];
    let Two {
        nats: _nats,
        tmp: _tmp,
        key,
        a,
        mut b,
    } = two_gateways(&lease);
    let gw_public = gateway_public(&key);
    const N: usize = 5;
    let mut devices = Vec::new();
    for i in 0..N {
        let k = generate_private_key();
        let uuid = format!("orphan-{i}");
        let reg = register(&a, &uuid, &k).await;
        let dev = dial_opt(b.udp, &gw_public, 81 + i as u32, k);
        let address = reg["address"].as_str().unwrap().to_owned();
        devices.push((uuid, address, dev.expect("B answered")));
    }
    for (uuid, _, _) in &devices {
        let deadline = Instant::now() + Duration::from_secs(5);
        while view(&a, uuid).await != (true, Some("gw-b".into())) {
            assert!(Instant::now() < deadline, "A never showed {uuid} on gw-b");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut events = common::SseReader::connect(&format!("{}/v1/events", a.api), None).await;
    let killed = Instant::now();
    b.kill9();
    for (uuid, _, d) in devices.iter_mut() {
        answer_redial(uuid, d, &a, Duration::from_secs(25));
    }
    for (uuid, address, _) in &devices {
        let deadline = killed + Duration::from_secs(30);
        loop {
            let (_, d) = call(&a.api, "GET", &format!("/v1/devices/{uuid}"), None).await;
            if d["cloudlink"]["connected"] == true && d["cloudlink"]["gateway"] == "gw-a" {
                assert_eq!(d["address"].as_str(), Some(address.as_str()));
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{uuid} not back 30 s after the kill: {d}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    eprintln!(
        "all {N} devices back on gw-a {:?} after kill -9 (lease 3 s)",
        killed.elapsed()
    );
    let seen = events.drain_for(Duration::from_millis(1000)).await;
    let all: Vec<_> = seen.iter().map(|e| &e.data).collect();
    for (uuid, _, _) in &devices {
        let of = |ty: &str| {
            seen.iter()
                .filter(|e| e.data["type"] == ty && e.data["device"] == uuid.as_str())
                .count()
        };
        assert_eq!(of("link.down"), 1, "{uuid}: {all:?}");
        assert_eq!(of("link.up"), 1, "{uuid}: {all:?}");
    }
    assert_eq!(
        a.metric("cloudlink_cluster_takeover_redials_total"),
        Some(N as f64)
    );
}

/// Queued actions and idempotency keys are the cluster's (issue "Cluster
/// mode, part 2"): an action queued through A for an offline device, and
/// the same request retried through B with its Idempotency-Key, are one
/// action; the device links up on B, which claims and delivers it once.
/// A delivery cut short by `kill -9` of the delivering gateway ends
/// `unknown` once the survivor reaps it, and a retry with the same key gets
/// that outcome, not a second run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_actions_are_claimed_once_cluster_wide_and_an_interrupted_one_is_never_resent() {
    use serde_json::json;
    let lease = ["--cluster-lease", "3s"];
    let Two {
        nats: _nats,
        tmp: _tmp,
        key: _key,
        a,
        mut b,
    } = two_gateways(&lease);
    let key = cloudlink::keys::generate_private_key();
    let reg = register(&a, "later", &key).await;
    let act = |gw: &Proc, idem: &str, service: &str, query: &str| {
        let url = format!("{}/v1/devices/later/actions/restart-service{query}", gw.api);
        let (idem, service) = (idem.to_owned(), service.to_owned());
        async move {
            let r = reqwest::Client::new()
                .post(url)
                .bearer_auth(common::TOKEN)
                .header("Idempotency-Key", idem)
                .json(&json!({"service_name": service, "app_id": 7}))
                .send()
                .await
                .unwrap();
            let st = r.status().as_u16();
            (st, r.json::<serde_json::Value>().await.unwrap_or_default())
        }
    };
    let (st, first) = act(&a, "q-1", "first", "?queue_ttl=300").await;
    assert_eq!((st, &first["state"]), (202, &json!("queued")), "{first}");
    let id = first["id"].as_str().unwrap().to_owned();
    let (st, again) = act(&b, "q-1", "first", "?queue_ttl=300").await;
    assert_eq!((st, &again["id"]), (202, &json!(id)), "{again}");
    let (st, seen) = call(&b.api, "GET", &format!("/v1/actions/{id}"), None).await;
    assert_eq!((st, &seen["state"]), (200, &json!("queued")), "{seen}");

    // The device comes up on B; its hook logs each run, and a "slow" one
    // takes 20 s to answer.
    let marks = tempfile::tempdir().unwrap();
    let log = marks.path().join("runs");
    let hook = format!(
        "restart-service=echo $CLOUDLINK_SERVICE_NAME >> {}; [ $CLOUDLINK_SERVICE_NAME != slow ] || sleep 20",
        log.display()
    );
    let _agent = agent_for(&reg, &key, b.udp, &[], &["--on-action".into(), hook]);
    let runs = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, seen) = call(&a.api, "GET", &format!("/v1/actions/{id}"), None).await;
        if seen["state"] == "completed" {
            assert_eq!(seen["device_status"], 200, "{seen}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never delivered: {seen}\n{}",
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_owner(&a, "later", "gw-b", Duration::from_secs(5)).await;
    assert_eq!(runs(), "first\n");

    // An immediate action through A, carried out by B, which is killed
    // while the device works on it.
    let slow = tokio::spawn(act(&a, "slow-1", "slow", ""));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !runs().contains("slow") {
        assert!(Instant::now() < deadline, "the slow action never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.kill9();
    // The action's outcome becomes `unknown` once B is reaped; a retry with
    // its key gets that, not a second run.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (st, r) = act(&a, "slow-1", "slow", "").await;
        if r["state"] == "unknown" {
            assert_eq!(st, 202, "{r}");
            break;
        }
        // Until B is reaped A sends the retry to B, which does not answer;
        // after, A finds the record still `delivering` for a moment.
        assert!(
            (st, &r["error"]) == (503, &serde_json::json!("owner_unreachable"))
                || (st, &r["state"]) == (202, &serde_json::json!("delivering")),
            "{st} {r}"
        );
        assert!(Instant::now() < deadline, "still {r}\n{}", a.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(runs(), "first\nslow\n");
    slow.abort();
}

/// Scoped tokens are the cluster's: one issued through A works on B (API
/// and proxy), and revoked through B it is refused on A at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_the_clusters() {
    use serde_json::json;
    let Two {
        nats: _nats,
        tmp: _tmp,
        key: _key,
        a,
        b,
    } = two_gateways(&[]);
    let (st, t) = call(
        &a.api,
        "POST",
        "/v1/tokens",
        Some(json!({"name": "noc", "scopes": ["read"]})),
    )
    .await;
    assert_eq!(st, 201, "{t}");
    let token = t["token"].as_str().unwrap().to_owned();
    let get = |base: String| {
        let token = token.clone();
        async move {
            reqwest::Client::new()
                .get(format!("{base}/v1/devices"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(b.api.clone()).await != 200 {
        assert!(Instant::now() < deadline, "B never took A's token");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, list) = call(&b.api, "GET", "/v1/tokens", None).await;
    assert_eq!(list["tokens"][0]["name"], "noc");
    let (st, _) = call(
        &b.api,
        "DELETE",
        &format!("/v1/tokens/{}", t["id"].as_str().unwrap()),
        None,
    )
    .await;
    assert_eq!(st, 204);
    let deadline = Instant::now() + Duration::from_secs(2);
    while get(a.api.clone()).await != 401 {
        assert!(
            Instant::now() < deadline,
            "A still takes a token revoked on B"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The audit trail is the cluster's: the token made through A and
    // revoked through B are both on A's and on B's `GET /v1/audit`, each
    // naming the gateway that saw it.
    for api in [&a.api, &b.api] {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (st, audit) = call(api, "GET", "/v1/audit", None).await;
            assert_eq!(st, 200, "{audit}");
            assert!(audit.get("partial").is_none(), "{audit}");
            let tokens: Vec<(String, String)> = audit["records"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["type"] == "audit.token")
                .map(|r| {
                    (
                        r["detail"]["change"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                        r["gateway"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect();
            if tokens.len() == 2 {
                assert_eq!(tokens[0].1, "gw-a", "{audit}");
                assert_eq!(tokens[1].1, "gw-b", "{audit}");
                break;
            }
            assert!(Instant::now() < deadline, "{api}: {audit}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
