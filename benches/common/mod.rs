//! Shared by the relay benchmarks: the real gateway and agent binaries on
//! loopback, and a minimal HTTP client for the API.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const BIN: &str = env!("CARGO_BIN_EXE_cloudlink");
pub const TOKEN: &str = "bench-token-0123456789abcdef";

/// A child process killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Resident memory of a process, in bytes.
pub fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

pub async fn http(addr: &str, method: &str, path: &str, body: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default())
}

/// A gateway and one agent-backed device, `uuid`, whose agent forwards
/// `forwards` (`PORT=HOST:PORT`); the proxy allows `allow_ports`.
pub struct Fleet {
    pub gw: GatewayProc,
    pub agent: Proc,
    pub proxy: SocketAddr,
}

impl Fleet {
    pub async fn start(uuid: &str, forwards: &[String], allow_ports: &str) -> Fleet {
        let gw = GatewayProc::start(&["--allow-ports", allow_ports]).await;
        let agent = gw.agent(uuid, forwards).await;
        gw.wait_connected(uuid).await;
        Fleet {
            proxy: gw.proxy,
            gw,
            agent,
        }
    }
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

/// `CONNECT target` through the proxy; the stream after `200`.
pub async fn connect(proxy: SocketAddr, target: &str) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(
        format!("CONNECT {target} HTTP/1.1\r\nProxy-Authorization: Bearer {TOKEN}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).await.unwrap(), 1, "proxy closed");
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// A gateway binary on loopback, with its API and proxy addresses.
pub struct GatewayProc {
    pub proc: Proc,
    pub api: String,
    pub udp: String,
    pub proxy: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl GatewayProc {
    pub async fn start(extra: &[&str]) -> GatewayProc {
        let dir = tempfile::tempdir().unwrap();
        let udp = format!(
            "127.0.0.1:{}",
            std::net::UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        );
        let api = format!("127.0.0.1:{}", free_port());
        let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let proc = Proc(
            Command::new(BIN)
                .args([
                    "serve",
                    "--listen",
                    &udp,
                    "--api",
                    &api,
                    "--endpoint",
                    &udp,
                    "--log",
                    "warn",
                ])
                .arg("--proxy")
                .arg(proxy.to_string())
                .args(extra)
                .arg("--data-dir")
                .arg(dir.path())
                .env("CLOUDLINK_TOKEN", TOKEN)
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let t = Instant::now();
        while http(&api, "GET", "/readyz", "").await.is_err() {
            assert!(t.elapsed() < Duration::from_secs(30), "gateway never ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        GatewayProc {
            proc,
            api,
            udp,
            proxy,
            dir,
        }
    }

    /// Registers `uuid` and starts its agent with `forwards`.
    pub async fn agent(&self, uuid: &str, forwards: &[String]) -> Proc {
        let key = cloudlink::keys::generate_private_key();
        let body = format!(
            "{{\"uuid\":\"{uuid}\",\"public_key\":\"{}\"}}",
            cloudlink::keys::encode_key(&cloudlink::keys::public_key(&key))
        );
        let reg: serde_json::Value =
            serde_json::from_str(&http(&self.api, "POST", "/v1/devices", &body).await.unwrap())
                .unwrap();
        let d = self.dir.path().join(uuid);
        std::fs::create_dir_all(&d).unwrap();
        write(&d, "wg0.conf", reg["wg_quick"].as_str().unwrap());
        write(&d, "device.key", &cloudlink::keys::encode_key(&key));
        let mut agent = Command::new(BIN);
        agent
            .args(["agent", "--log", "warn"])
            .arg("--config")
            .arg(d.join("wg0.conf"))
            .arg("--private-key-file")
            .arg(d.join("device.key"));
        for f in forwards {
            agent.arg("--forward").arg(f);
        }
        Proc(agent.spawn().unwrap())
    }

    pub async fn wait_connected(&self, uuid: &str) {
        let t = Instant::now();
        loop {
            let d = http(&self.api, "GET", &format!("/v1/devices/{uuid}"), "")
                .await
                .unwrap_or_default();
            if d.contains("\"connected\":true") {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "{uuid} never connected"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
