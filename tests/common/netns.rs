//! Network namespaces and wireguard-go devices for interop tests. Needs
//! root, `ip`, `wireguard-go` and `wg` (installed by `tests/run.sh`).
#![allow(dead_code)]

use super::TestGateway;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn run(cmd: &str, args: &[&str]) -> String {
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

pub fn run_stdin(cmd: &str, args: &[&str], input: &str) -> String {
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
pub struct Netns {
    pub name: String,
    pub host_if: String,
    pub host_ip: String,
    pub ns_ip: String,
    pub children: Vec<Child>,
}

impl Netns {
    /// `subnet` picks the /24: 0-255 in 198.18.0.0/16, 256-511 in
    /// 198.19.0.0/16 (both in the benchmark range).
    pub fn create(tag: &str, subnet: impl Into<u16>) -> Self {
        let subnet: u16 = subnet.into();
        let (second, third) = (18 + subnet / 256, subnet % 256);
        // Test processes run in parallel; `ip netns add` sets up /run/netns
        // on first use and concurrent calls can trip over each other, so
        // namespace setup is serialised across processes.
        let _lock = SetupLock::take();
        let name = format!("cl-{tag}");
        let host_if = format!("clh-{tag}");
        let ns_if = format!("cld-{tag}");
        let host_ip = format!("198.{second}.{third}.1");
        let ns_ip = format!("198.{second}.{third}.2");
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

    pub fn exec(&self, args: &[&str]) -> String {
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

/// An exclusive `flock` on a file in /tmp, released on drop.
struct SetupLock(std::fs::File);

impl SetupLock {
    fn take() -> Self {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/tmp/cloudlink-test-netns.lock")
            .unwrap();
        // SAFETY: flock on a file descriptor we own.
        unsafe {
            libc::flock(f.as_raw_fd(), libc::LOCK_EX);
        }
        SetupLock(f)
    }
}

impl Drop for SetupLock {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: as above.
        unsafe {
            libc::flock(self.0.as_raw_fd(), libc::LOCK_UN);
        }
    }
}

/// The `[Interface]`/`[Peer]` text `wg setconf` takes: the placeholder
/// replaced by the device's key, wg-quick-only keys (Address) left out.
pub fn setconf_text(wg_quick: &str, private_key: &str) -> String {
    wg_quick
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("Address"))
        .map(|l| l.replace(cloudlink::wg_config::PRIVATE_KEY_PLACEHOLDER, private_key))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A key pair from `wg genkey` / `wg pubkey`: (private, public).
pub fn wg_keypair() -> (String, String) {
    let private = run("wg", &["genkey"]);
    let public = run_stdin("wg", &["pubkey"], &private);
    (private.trim().to_owned(), public.trim().to_owned())
}

/// A wireguard-go device in its own namespace, registered with the gateway
/// and configured from the `wg_quick` text the API returned.
pub struct WgGoDevice {
    pub ns: Netns,
    pub iface: String,
    pub endpoint: String,
    /// The device's tunnel address.
    pub address: String,
}

impl WgGoDevice {
    pub async fn start(g: &TestGateway, uuid: &str, tag: &str, subnet: impl Into<u16>) -> Self {
        let ns = Netns::create(tag, subnet);
        let (private, public) = wg_keypair();
        let (st, reg) = g
            .call(
                "POST",
                "/v1/devices",
                Some(serde_json::json!({"uuid": uuid, "public_key": public})),
            )
            .await;
        assert_eq!(st, 201, "{reg}");
        Self::configure(ns, &reg, &private, g.udp.port(), tag)
    }

    /// Brings wireguard-go up in `ns` for a device registered as `reg` (the
    /// API's answer), dialling the gateway's UDP `port` on the host side of
    /// the namespace's link.
    pub fn configure(
        mut ns: Netns,
        reg: &serde_json::Value,
        private: &str,
        port: u16,
        tag: &str,
    ) -> Self {
        // Device configs name the address the namespace can reach (what
        // --endpoint says in production; the test gateway has a placeholder).
        let endpoint = format!("{}:{}", ns.host_ip, port);
        let address = reg["address"].as_str().unwrap().to_owned();
        let gw_addr = reg["gateway"]["address"].as_str().unwrap().to_owned();
        let wg_quick = reg["wg_quick"]
            .as_str()
            .unwrap()
            .replace(reg["gateway"]["endpoint"].as_str().unwrap(), &endpoint);

        let iface = format!("clwg{tag}");
        // A socket left by a wireguard-go killed in an earlier run would
        // pass for this one's.
        let sock = format!("/run/wireguard/{iface}.sock");
        let _ = std::fs::remove_file(&sock);
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "wireguard-go", "-f", &iface])
            .env("WG_PROCESS_FOREGROUND", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("wireguard-go could not start; install it with `bash tests/run.sh`");
        ns.children.push(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::path::Path::new(&sock).exists() {
            assert!(
                Instant::now() < deadline,
                "wireguard-go did not create {sock}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let conf_path = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(conf_path.path(), setconf_text(&wg_quick, private)).unwrap();
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
            address,
        }
    }

    /// Waits until `wg show` reports a completed handshake.
    pub fn wait_handshake(&self) {
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

    /// A stand-in for balena's supervisor: a plain HTTP server (python3) on
    /// port 48484 of the tunnel address that answers every POST with 202
    /// `{"Data":"OK","Error":null}` and writes what it got (path,
    /// Authorization, JSON body) to `log`. Returns once it listens.
    pub fn start_supervisor(&mut self, log: &std::path::Path) {
        let server = format!(
            r#"
import http.server, json
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        n = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(n).decode()
        open("{log}", "w").write(json.dumps({{"path": self.path, "auth": self.headers.get("Authorization"), "body": json.loads(body)}}))
        out = b'{{"Data":"OK","Error":null}}'
        self.send_response(202)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("{addr}", 48484), H).serve_forever()
"#,
            log = log.display(),
            addr = self.address
        );
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns.name, "python3", "-c", &server])
            .spawn()
            .expect("python3 could not run; install it with `bash tests/run.sh`");
        self.ns.children.push(child);
        self.wait_listening(48484);
    }

    /// Starts `sshd` (from `ssh`) on port 22 of the tunnel address; returns
    /// once it listens.
    pub fn start_sshd(&mut self, ssh: &super::ssh::SshFixture) {
        let listen = format!("{}:22", self.address);
        let child = ssh.start_sshd(&["ip", "netns", "exec", &self.ns.name], &listen);
        self.ns.children.push(child);
        self.wait_listening(22);
    }

    /// Waits until something listens on TCP `port` of the tunnel address.
    pub fn wait_listening(&self, port: u16) {
        let (ns, addr) = (&self.ns.name, &self.address);
        super::ssh::wait_until(Duration::from_secs(10), || {
            Command::new("ip")
                .args(["netns", "exec", ns, "sh", "-c"])
                .arg(format!("ss -ltn | grep -q '{addr}:{port} '"))
                .status()
                .is_ok_and(|s| s.success())
        });
    }

    /// Stops wireguard-go, as a device that powers off.
    pub fn stop(&mut self) {
        for c in &mut self.ns.children {
            c.kill().unwrap();
            c.wait().unwrap();
        }
        self.ns.children.clear();
    }
}
