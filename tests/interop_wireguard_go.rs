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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wireguard_go_device_connects_and_disconnects() {
    let tag = format!("{}", std::process::id() % 100_000);
    let subnet = (std::process::id() % 200 + 20) as u8;
    let mut ns = Netns::create(&tag, subnet);

    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.link_timeout = Duration::from_secs(3);
    // Listen on every address: the device reaches us over the veth.
    let mut g = TestGateway::start_in(dir, c, "0.0.0.0:0").await;
    let port = g.udp.port();
    // Device configs name the address the namespace can reach.
    let endpoint = format!("{}:{port}", ns.host_ip);

    let private = run("wg", &["genkey"]);
    let public = run_stdin("wg", &["pubkey"], &private);
    let mut events = g.events(None).await;
    let (st, reg) = g
        .call(
            "POST",
            "/v1/devices",
            Some(serde_json::json!({"uuid": "wggo-1", "public_key": public.trim()})),
        )
        .await;
    assert_eq!(st, 201, "{reg}");
    let address = reg["address"].as_str().unwrap().to_owned();
    let gw_addr = reg["gateway"]["address"].as_str().unwrap().to_owned();
    // The test gateway was configured with a placeholder endpoint; point the
    // device at the veth address (what --endpoint would say in production).
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

    // The handshake completes: wg reports it in the namespace...
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let hs = ns.exec(&["wg", "show", &iface, "latest-handshakes"]);
        let t: u64 = hs
            .split_whitespace()
            .nth(1)
            .unwrap_or("0")
            .parse()
            .unwrap_or(0);
        if t > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no handshake: {hs}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // ...link.up arrives on the event stream...
    let up = events
        .wait_for(Duration::from_secs(20), |e| e["type"] == "link.up")
        .await;
    let device_endpoint = format!("{}:{listen_port}", ns.ns_ip);
    assert_eq!(up.data["device"], "wggo-1");
    assert_eq!(up.data["endpoint"], device_endpoint);
    // ...and the gateway reports the device connected at that endpoint.
    let d = g.device("wggo-1").await;
    assert_eq!(d["cloudlink"]["connected"], true, "{d}");
    assert_eq!(d["cloudlink"]["endpoint"], device_endpoint);

    // The device stops: link.down follows after the link timeout.
    for c in &mut ns.children {
        c.kill().unwrap();
        c.wait().unwrap();
    }
    ns.children.clear();
    let down = events
        .wait_for(Duration::from_secs(20), |e| e["type"] == "link.down")
        .await;
    assert_eq!(down.data["device"], "wggo-1");
    assert_eq!(down.data["reason"], "timeout");
    assert_eq!(g.device("wggo-1").await["cloudlink"]["connected"], false);
    g.stop().await;
}
