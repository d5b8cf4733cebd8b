//! Interop: an unmodified WireGuard peer (Debian's `wireguard-go`, set up
//! with `wg` from the `wg_quick` text the API hands out) in a network
//! namespace joined to the gateway by a veth pair in 198.18.0.0/15.
//!
//! Needs root, `ip`, `wireguard-go` and `wg`; the README's test command and
//! `.ci/run` install them. This test installs nothing and fails (does not
//! skip) when they are missing.

mod common;

use common::*;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| {
        panic!("{cmd} could not run ({e}); install it with `bash tests/run.sh`")
    });
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run_stdin(cmd: &str, args: &[&str], input: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// A namespace with a veth link to the root namespace; removed on drop,
/// with the processes started in it.
struct Netns {
    name: String,
    host_if: String,
    host_ip: String,
    ns_ip: String,
    children: Vec<Child>,
}

impl Netns {
    fn create(tag: &str, subnet: u8) -> Self {
        let name = format!("cl-{tag}");
        let host_if = format!("clh-{tag}");
        let ns_if = format!("cld-{tag}");
        let host_ip = format!("198.18.{subnet}.1");
        let ns_ip = format!("198.18.{subnet}.2");
        // Leftovers of an interrupted run.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        run("ip", &["netns", "add", &name]);
        let ns = Netns {
            name: name.clone(),
            host_if: host_if.clone(),
            host_ip: host_ip.clone(),
            ns_ip: ns_ip.clone(),
            children: Vec::new(),
        };
        run(
            "ip",
            &[
                "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
            ],
        );
        run("ip", &["link", "set", &ns_if, "netns", &name]);
        run(
            "ip",
            &["addr", "add", &format!("{host_ip}/24"), "dev", &host_if],
        );
        run("ip", &["link", "set", &host_if, "up"]);
        ns.exec(&["ip", "addr", "add", &format!("{ns_ip}/24"), "dev", &ns_if]);
        ns.exec(&["ip", "link", "set", &ns_if, "up"]);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
}

/// The `[Interface]`/`[Peer]` text `wg setconf` takes: the placeholder
/// replaced by the device's key, wg-quick-only keys (Address) left out.
fn setconf_text(wg_quick: &str, private_key: &str) -> String {
    wg_quick
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("Address"))
        .map(|l| l.replace(cloudlink::wg_config::PRIVATE_KEY_PLACEHOLDER, private_key))
        .collect::<Vec<_>>()
        .join("\n")
}

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

/// A wireguard-go device in its own namespace, registered with the gateway
/// and configured from the `wg_quick` text the API returned.
struct WgGoDevice {
    ns: Netns,
    iface: String,
    endpoint: String,
}

impl WgGoDevice {
    async fn start(g: &TestGateway, uuid: &str, tag: &str, subnet: u8) -> Self {
        let mut ns = Netns::create(tag, subnet);
        // Device configs name the address the namespace can reach (what
        // --endpoint says in production; the test gateway has a placeholder).
        let endpoint = format!("{}:{}", ns.host_ip, g.udp.port());
        let private = run("wg", &["genkey"]);
        let public = run_stdin("wg", &["pubkey"], &private);
        let (st, reg) = g
            .call(
                "POST",
                "/v1/devices",
                Some(serde_json::json!({"uuid": uuid, "public_key": public.trim()})),
            )
            .await;
        assert_eq!(st, 201, "{reg}");
        let address = reg["address"].as_str().unwrap().to_owned();
        let gw_addr = reg["gateway"]["address"].as_str().unwrap().to_owned();
        let wg_quick = reg["wg_quick"]
            .as_str()
            .unwrap()
            .replace(reg["gateway"]["endpoint"].as_str().unwrap(), &endpoint);

        let iface = format!("clwg{tag}");
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "wireguard-go", "-f", &iface])
            .env("WG_PROCESS_FOREGROUND", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("wireguard-go could not start; install it with `bash tests/run.sh`");
        ns.children.push(child);
        let sock = format!("/run/wireguard/{iface}.sock");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::path::Path::new(&sock).exists() {
            assert!(
                Instant::now() < deadline,
                "wireguard-go did not create {sock}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let conf_path = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(conf_path.path(), setconf_text(&wg_quick, private.trim())).unwrap();
        ns.exec(&["wg", "setconf", &iface, conf_path.path().to_str().unwrap()]);
        ns.exec(&["ip", "addr", "add", &format!("{address}/32"), "dev", &iface]);
        ns.exec(&["ip", "link", "set", &iface, "up"]);
        ns.exec(&[
            "ip",
            "route",
            "add",
            &format!("{gw_addr}/32"),
            "dev",
            &iface,
        ]);
        let listen_port = ns
            .exec(&["wg", "show", &iface, "listen-port"])
            .trim()
            .to_owned();
        let endpoint = format!("{}:{listen_port}", ns.ns_ip);
        WgGoDevice {
            ns,
            iface,
            endpoint,
        }
    }

    /// Waits until `wg show` reports a completed handshake.
    fn wait_handshake(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let hs = self
                .ns
                .exec(&["wg", "show", &self.iface, "latest-handshakes"]);
            let t: u64 = hs
                .split_whitespace()
                .nth(1)
                .unwrap_or("0")
                .parse()
                .unwrap_or(0);
            if t > 0 {
                return;
            }
            assert!(Instant::now() < deadline, "no handshake: {hs}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops wireguard-go, as a device that powers off.
    fn stop(&mut self) {
        for c in &mut self.ns.children {
            c.kill().unwrap();
            c.wait().unwrap();
        }
        self.ns.children.clear();
    }
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
    assert!(
        heartbeat_at.elapsed() >= Duration::from_secs(7),
        "disconnected only after 1.5 x poll interval + grace"
    );
    let d = g.device("wggo-status").await;
    assert_eq!(d["status"], "disconnected");
    assert_eq!(d["heartbeat"]["state"], "offline");
    g.stop().await;
}
