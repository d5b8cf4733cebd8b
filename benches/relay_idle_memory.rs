//! Memory of idle relay streams: the gateway's RSS growth per open, idle
//! stream (limit 64 KiB), for streams that carried a little data (an
//! interactive session) and streams that carried a bulk transfer before
//! going idle.
//!
//! Run: `cargo bench --bench relay_idle_memory`. The gateway and the agent
//! are the real binary; streams go through the CONNECT proxy to an echo
//! service behind the agent.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BIN: &str = env!("CARGO_BIN_EXE_cloudlink");
const TOKEN: &str = "bench-token-0123456789abcdef";
const STREAMS: usize = 200;
const LIMIT: f64 = 64.0 * 1024.0;

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

async fn echo() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    a
}

async fn open(proxy: &str) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(
        format!("CONNECT idle-dev:7001 HTTP/1.1\r\nProxy-Authorization: Bearer {TOKEN}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).await.unwrap(), 1);
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"));
    s
}

/// Sends `bytes` and reads them back.
async fn exchange(s: &mut TcpStream, bytes: usize) {
    let buf = vec![7u8; 64 << 10];
    let mut back = vec![0u8; 64 << 10];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len());
        s.write_all(&buf[..n]).await.unwrap();
        s.read_exact(&mut back[..n]).await.unwrap();
        left -= n;
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let echo = echo().await;
        let dir = tempfile::tempdir().unwrap();
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let udp = format!(
            "127.0.0.1:{}",
            std::net::UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        );
        let api = format!("127.0.0.1:{}", free());
        let proxy = format!("127.0.0.1:{}", free());
        let gw = Proc(
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
                    "--proxy",
                    &proxy,
                    "--allow-ports",
                    "7001",
                ])
                .arg("--data-dir")
                .arg(dir.path())
                .env("CLOUDLINK_TOKEN", TOKEN)
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let key = cloudlink::keys::generate_private_key();
        let body = format!(
            "{{\"uuid\":\"idle-dev\",\"public_key\":\"{}\"}}",
            cloudlink::keys::encode_key(&cloudlink::keys::public_key(&key))
        );
        let reg = loop {
            if let Ok(r) = http(&api, "POST", "/v1/devices", &body).await {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let reg: serde_json::Value = serde_json::from_str(&reg).unwrap();
        std::fs::write(
            dir.path().join("wg0.conf"),
            reg["wg_quick"].as_str().unwrap(),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("device.key"),
            cloudlink::keys::encode_key(&key),
        )
        .unwrap();
        let _agent = Proc(
            Command::new(BIN)
                .args(["agent", "--log", "warn"])
                .arg("--config")
                .arg(dir.path().join("wg0.conf"))
                .arg("--private-key-file")
                .arg(dir.path().join("device.key"))
                .arg("--forward")
                .arg(format!("7001={echo}"))
                .spawn()
                .unwrap(),
        );
        let t = Instant::now();
        loop {
            let d = http(&api, "GET", "/v1/devices/idle-dev", "")
                .await
                .unwrap_or_default();
            if d.contains("\"connected\":true") {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(30));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Warm up allocator and code paths with one stream.
        let mut w = open(&proxy).await;
        exchange(&mut w, 1 << 20).await;
        drop(w);
        tokio::time::sleep(Duration::from_secs(1)).await;

        let mut results = Vec::new();
        for (label, bytes) in [
            ("after 4 KiB (interactive)", 4 << 10),
            ("after 2 MiB (bulk, then idle)", 2 << 20),
        ] {
            let before = rss(gw.0.id());
            let mut streams = Vec::new();
            for _ in 0..STREAMS {
                let mut s = open(&proxy).await;
                exchange(&mut s, bytes).await;
                streams.push(s);
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            let after = rss(gw.0.id());
            let per = (after as f64 - before as f64) / STREAMS as f64;
            drop(streams);
            tokio::time::sleep(Duration::from_secs(3)).await;
            let closed = rss(gw.0.id());
            let retained = (closed as f64 - before as f64) / STREAMS as f64;
            results.push((label, per, retained));
        }
        println!("relay_idle_memory: gateway RSS growth per open, idle stream ({STREAMS} streams)");
        for (label, per, retained) in &results {
            println!(
                "  {label:<32} {:>8.1} KiB; limit 64 KiB, ratio {:.2} (still resident after the streams closed: {:.1} KiB per stream)",
                per / 1024.0,
                per / LIMIT,
                retained / 1024.0
            );
        }
        println!(
            "{{\"idle_interactive_bytes\":{:.0},\"idle_after_bulk_bytes\":{:.0}}}",
            results[0].1, results[1].1
        );
    });
}

async fn http(addr: &str, method: &str, path: &str, body: &str) -> std::io::Result<String> {
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
