//! Shared test harness: an in-process gateway on loopback, an HTTP client,
//! an SSE reader and a boringtun device.
#![allow(dead_code)]

pub mod local_cluster;
pub mod nats;
pub mod netns;
pub mod proxy;
pub mod ssh;

use boringtun::noise::{Tunn, TunnResult};
use cloudlink::keys::{encode_key, generate_private_key, public_key, KeyBytes};
use cloudlink::{Gateway, GatewayConfig};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use x25519_dalek::{PublicKey, StaticSecret};

pub const TOKEN: &str = "test-token-0123456789abcdef";

/// A loopback port free a moment ago (TCP, or UDP with `udp`).
pub fn free_port(udp: bool) -> u16 {
    if udp {
        UdpSocket::bind("127.0.0.1:0")
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

pub struct TestGateway {
    pub gw: Option<Gateway>,
    pub dir: tempfile::TempDir,
    pub api: String,
    pub udp: SocketAddr,
    pub http: reqwest::Client,
}

pub fn config(dir: &std::path::Path) -> GatewayConfig {
    GatewayConfig {
        data_dir: dir.to_owned(),
        token: Some(TOKEN.into()),
        endpoint: Some("127.0.0.1:51820".into()),
        link_timeout: Duration::from_secs(2),
        gateway_id: Some("test-gw".into()),
        proxy: "127.0.0.1:0".parse().unwrap(),
        // Tests that leave a relay stream open stop at once; the drain has
        // its own test.
        drain_timeout: Duration::from_secs(1),
        ..Default::default()
    }
}

impl TestGateway {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(f: impl FnOnce(&mut GatewayConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path());
        f(&mut c);
        Self::start_in(dir, c, "127.0.0.1:0").await
    }

    pub async fn start_in(dir: tempfile::TempDir, c: GatewayConfig, udp_bind: &str) -> Self {
        let udp = UdpSocket::bind(udp_bind).unwrap();
        let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gw = Gateway::start(c, udp, api).await.unwrap();
        TestGateway {
            api: format!("http://{}", gw.api_addr()),
            udp: gw.udp_addr(),
            gw: Some(gw),
            dir,
            http: reqwest::Client::new(),
        }
    }

    pub fn gw(&self) -> &Gateway {
        self.gw.as_ref().unwrap()
    }

    pub async fn stop(&mut self) {
        if let Some(gw) = self.gw.take() {
            gw.shutdown().await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.api, path)
    }

    /// Sends a request with the token; answers (status, JSON or Null).
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut rb = self
            .http
            .request(method.parse().unwrap(), self.url(path))
            .bearer_auth(TOKEN);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn register(&self, uuid: &str, key: &KeyBytes) -> Value {
        let (st, body) = self
            .call(
                "POST",
                "/v1/devices",
                Some(json!({"uuid": uuid, "public_key": encode_key(key)})),
            )
            .await;
        assert_eq!(st, 201, "{body}");
        body
    }

    /// Signs in as the dashboard does: the session cookie (`name=value`)
    /// and its CSRF token.
    pub async fn sign_in(&self) -> (String, String) {
        let r = self
            .http
            .post(self.url("/v1/session"))
            .json(&json!({ "token": TOKEN }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
        let b: Value = r.json().await.unwrap();
        let id = cookie.split(';').next().unwrap().to_string();
        (id, b["csrf_token"].as_str().unwrap().to_string())
    }

    pub async fn device(&self, uuid: &str) -> Value {
        let (st, body) = self.call("GET", &format!("/v1/devices/{uuid}"), None).await;
        assert_eq!(st, 200, "{body}");
        body
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of one metric line (`name{labels}` exactly as printed).
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
            .trim()
            .parse()
            .unwrap()
    }

    pub async fn events(&self, last_event_id: Option<&str>) -> SseReader {
        SseReader::connect(&self.url("/v1/events"), last_event_id).await
    }

    /// The gateway's public key, from the API.
    pub async fn gateway_public_key(&self, uuid: &str) -> KeyBytes {
        let d = self.device(uuid).await;
        cloudlink::keys::decode_key(d["gateway"]["public_key"].as_str().unwrap()).unwrap()
    }
}

/// One SSE message.
#[derive(Debug, Clone)]
pub struct SseMessage {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: Value,
}

pub struct SseReader {
    rx: mpsc::UnboundedReceiver<SseMessage>,
    pub status: u16,
}

impl SseReader {
    pub async fn connect(url: &str, last_event_id: Option<&str>) -> Self {
        Self::connect_with(url, TOKEN, last_event_id).await
    }

    /// The same with another token; asserts that the stream opened (200).
    pub async fn connect_with(url: &str, token: &str, last_event_id: Option<&str>) -> Self {
        let mut rb = reqwest::Client::new().get(url).bearer_auth(token);
        if let Some(id) = last_event_id {
            rb = rb.header("Last-Event-ID", id);
        }
        let resp = rb.send().await.unwrap();
        let status = resp.status().as_u16();
        if token != TOKEN {
            assert_eq!(status, 200, "{url}");
        }
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut stream = resp.bytes_stream();
            let mut buf = String::new();
            while let Some(Ok(chunk)) = stream.next().await {
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buf.find("\n\n") {
                    let block: String = buf.drain(..end + 2).collect();
                    let mut msg = SseMessage {
                        id: None,
                        event: None,
                        data: Value::Null,
                    };
                    let mut data = String::new();
                    for line in block.lines() {
                        if let Some(v) = line.strip_prefix("id:") {
                            msg.id = Some(v.trim().to_owned());
                        } else if let Some(v) = line.strip_prefix("event:") {
                            msg.event = Some(v.trim().to_owned());
                        } else if let Some(v) = line.strip_prefix("data:") {
                            data.push_str(v.trim_start());
                        }
                    }
                    if data.is_empty() {
                        continue; // keep-alive comment
                    }
                    msg.data = serde_json::from_str(&data).unwrap();
                    if tx.send(msg).is_err() {
                        return;
                    }
                }
            }
        });
        SseReader { rx, status }
    }

    /// The next message, or panics after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> SseMessage {
        tokio::time::timeout(timeout, self.rx.recv())
            .await
            .expect("timed out waiting for an SSE message")
            .expect("SSE stream ended")
    }

    /// Skips messages until one satisfies `pred`.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> SseMessage {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = self.next(left).await;
            if pred(&m.data) {
                return m;
            }
        }
    }

    /// Whatever arrives within `d`.
    pub async fn drain_for(&mut self, d: Duration) -> Vec<SseMessage> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + d;
        while let Ok(Some(m)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            out.push(m);
        }
        out
    }

    /// True once the server ended the stream (after draining).
    pub async fn ended(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(_)) => continue,
                Ok(None) => return true,
                Err(_) => return false,
            }
        }
    }
}

/// A device built on boringtun, dialing the gateway over loopback UDP.
pub struct TestDevice {
    pub private: KeyBytes,
    pub public: KeyBytes,
    pub tunn: Tunn,
    pub socket: UdpSocket,
    pub gateway: SocketAddr,
    buf: Vec<u8>,
}

impl TestDevice {
    pub fn new(gateway: SocketAddr, gateway_public: &KeyBytes, index: u32) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        Self::with_socket(gateway, gateway_public, index, socket)
    }

    pub fn with_socket(
        gateway: SocketAddr,
        gateway_public: &KeyBytes,
        index: u32,
        socket: UdpSocket,
    ) -> Self {
        socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let private = generate_private_key();
        Self::with_key(gateway, gateway_public, index, socket, private)
    }

    pub fn with_key(
        gateway: SocketAddr,
        gateway_public: &KeyBytes,
        index: u32,
        socket: UdpSocket,
        private: KeyBytes,
    ) -> Self {
        let tunn = Tunn::new(
            StaticSecret::from(private),
            PublicKey::from(*gateway_public),
            None,
            None,
            index,
            None,
        );
        TestDevice {
            public: public_key(&private),
            private,
            tunn,
            socket,
            gateway,
            buf: vec![0u8; 65_600],
        }
    }

    /// Sends a handshake initiation (from `socket`).
    pub fn send_initiation(&mut self) {
        match self.tunn.format_handshake_initiation(&mut self.buf, true) {
            TunnResult::WriteToNetwork(p) => {
                self.socket.send_to(p, self.gateway).unwrap();
            }
            other => panic!("no initiation: {other:?}"),
        }
    }

    /// Receives one datagram and feeds it to the tunnel; sends whatever the
    /// tunnel answers. Returns a decrypted IP packet if there was one.
    pub fn receive_one(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        let mut inbuf = vec![0u8; 65_600];
        let (n, _from) = self.socket.recv_from(&mut inbuf)?;
        Ok(self.feed(&inbuf[..n]))
    }

    /// Feeds one datagram from the gateway to the tunnel.
    pub fn feed(&mut self, datagram: &[u8]) -> Option<Vec<u8>> {
        let mut result = None;
        match self.tunn.decapsulate(None, datagram, &mut self.buf) {
            TunnResult::WriteToNetwork(p) => {
                self.socket.send_to(p, self.gateway).unwrap();
                while let TunnResult::WriteToNetwork(p) =
                    self.tunn.decapsulate(None, &[], &mut self.buf)
                {
                    self.socket.send_to(p, self.gateway).unwrap();
                }
            }
            TunnResult::WriteToTunnelV4(p, _) => result = Some(p.to_vec()),
            _ => {}
        }
        result
    }

    /// Handshake, then the keepalive that confirms the session.
    pub fn connect(&mut self) {
        self.send_initiation();
        // The response; boringtun answers it with a keepalive, which the
        // gateway takes as the first transport packet.
        self.receive_one()
            .expect("handshake response from the gateway");
    }

    /// Encrypts an IP packet and sends it from `socket`.
    pub fn send_ip(&mut self, packet: &[u8]) {
        match self.tunn.encapsulate(packet, &mut self.buf) {
            TunnResult::WriteToNetwork(p) => {
                self.socket.send_to(p, self.gateway).unwrap();
            }
            other => panic!("could not encapsulate: {other:?}"),
        }
    }

    /// Sends a keepalive (an empty transport packet).
    pub fn keepalive(&mut self) {
        self.send_ip(&[]);
    }

    pub fn public_b64(&self) -> String {
        encode_key(&self.public)
    }
}

/// A minimal IPv4/UDP packet from `src` to `dst`.
pub fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let mut sum: u32 = 0;
    for i in (0..20).step_by(2) {
        sum += u16::from_be_bytes([p[i], p[i + 1]]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p[20..22].copy_from_slice(&1234u16.to_be_bytes());
    p[22..24].copy_from_slice(&5678u16.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    p
}

/// Polls `f` until it returns true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
