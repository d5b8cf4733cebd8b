//! A raw CONNECT client for proxy tests, and the `cloudlink agent` process.
#![allow(dead_code)]

use serde_json::Value;
use std::process::{Child, Command, Stdio};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::TestGateway;

/// Sends `request` (a whole head) to the proxy; returns the status, the JSON
/// body of an error answer, and the stream (open after a 200).
pub async fn raw_connect(proxy: std::net::SocketAddr, request: &str) -> (u16, Value, TcpStream) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut b).await.unwrap();
        assert!(
            n > 0,
            "proxy closed before answering: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = Value::Null;
    if status != 200 {
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        let mut buf = vec![0u8; len];
        s.read_exact(&mut buf).await.unwrap();
        body = serde_json::from_slice(&buf).unwrap();
    }
    (status, body, s)
}

/// `CONNECT target` with the bearer token.
pub async fn connect(
    proxy: std::net::SocketAddr,
    token: &str,
    target: &str,
) -> (u16, Value, TcpStream) {
    raw_connect(
        proxy,
        &format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Bearer {token}\r\n\r\n"),
    )
    .await
}

/// A running `cloudlink agent` (killed on drop).
pub struct Agent {
    pub child: Child,
    pub dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    /// Registers `uuid` and starts an agent for it with `forwards`
    /// (`PORT=HOST:PORT`), pointed at the test gateway's UDP address.
    pub async fn start(g: &TestGateway, uuid: &str, forwards: &[String]) -> Agent {
        Self::start_with(g, uuid, forwards, &[]).await
    }

    /// Like `start`, with more agent flags.
    pub async fn start_with(
        g: &TestGateway,
        uuid: &str,
        forwards: &[String],
        extra: &[String],
    ) -> Agent {
        let key = cloudlink::keys::generate_private_key();
        g.register(uuid, &cloudlink::keys::public_key(&key)).await;
        Self::start_registered(g, uuid, &key, forwards, extra).await
    }

    /// Starts an agent for `uuid`, already registered with `key`'s public
    /// key, from the device's `wg_quick` pointed at the test gateway.
    pub async fn start_registered(
        g: &TestGateway,
        uuid: &str,
        key: &cloudlink::keys::KeyBytes,
        forwards: &[String],
        extra: &[String],
    ) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let d = g.device(uuid).await;
        let wg = d["wg_quick"].as_str().unwrap().replace(
            d["gateway"]["endpoint"].as_str().unwrap(),
            &g.udp.to_string(),
        );
        std::fs::write(dir.path().join("wg0.conf"), wg).unwrap();
        std::fs::write(
            dir.path().join("device.key"),
            cloudlink::keys::encode_key(key),
        )
        .unwrap();
        Self::spawn_with(dir, forwards, extra)
    }

    pub fn spawn_with(dir: tempfile::TempDir, forwards: &[String], extra: &[String]) -> Agent {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cloudlink"));
        c.arg("agent")
            .arg("--config")
            .arg(dir.path().join("wg0.conf"))
            .arg("--private-key-file")
            .arg(dir.path().join("device.key"))
            .args(["--liveness-interval", "1s", "--log", "info"]);
        for f in forwards {
            c.arg("--forward").arg(f);
        }
        c.args(extra);
        c.stdout(Stdio::null()).stderr(Stdio::inherit());
        Agent {
            child: c.spawn().unwrap(),
            dir,
        }
    }
}
