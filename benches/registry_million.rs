//! 1,000,000 registered devices: memory per registered (not connected)
//! device, and time from start until `/readyz` answers and a registered
//! device completes a handshake.
//!
//! Run: `cargo bench --bench registry_million` (release build; about two
//! minutes here). `CLOUDLINK_BENCH_DEVICES` changes the count.
//!
//! Method: the real binary is started on loopback; devices are registered
//! through `POST /v1/devices/batch` (10,000 per call). The gateway is then
//! stopped and started again on the same data directory, timed until
//! `/readyz` is ready and until a boringtun device (the last one registered)
//! gets its handshake answered. Memory per device is the RSS of that
//! restarted gateway minus the RSS of a gateway started on an empty data
//! directory and put through the same steps, divided by the device count.

use boringtun::noise::{Tunn, TunnResult};
use cloudlink::keys::{encode_key, generate_private_key, public_key};
use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_cloudlink");
const TOKEN: &str = "bench-token-0123456789abcdef";
const BATCH: usize = 10_000;
const MEMORY_LIMIT: f64 = 512.0;
const START_LIMIT: f64 = 5.0;

fn main() {
    // `cargo bench` passes --bench; ignore arguments.
    let devices: usize = std::env::var("CLOUDLINK_BENCH_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let root = tempfile::tempdir().unwrap();
    let full = root.path().join("full");
    let empty = root.path().join("empty");

    // 1. Register the fleet.
    let mut g = Gateway::start(&full);
    let device_key = generate_private_key();
    let t0 = Instant::now();
    let mut rng_state = 0x9e3779b97f4a7c15u64;
    for batch in 0..devices.div_ceil(BATCH) {
        let n = BATCH.min(devices - batch * BATCH);
        let mut body = String::with_capacity(n * 100);
        body.push_str("{\"devices\":[");
        for i in 0..n {
            let idx = batch * BATCH + i;
            let key = if idx == devices - 1 {
                public_key(&device_key)
            } else {
                // Any 32 bytes are a public key as far as the registry is
                // concerned; real x25519 keys would cost a minute to make.
                let mut k = [0u8; 32];
                for chunk in k.chunks_mut(8) {
                    rng_state ^= rng_state << 13;
                    rng_state ^= rng_state >> 7;
                    rng_state ^= rng_state << 17;
                    chunk.copy_from_slice(&rng_state.to_le_bytes());
                }
                k
            };
            if i > 0 {
                body.push(',');
            }
            body.push_str(&format!(
                "{{\"uuid\":\"dev-{idx:07}\",\"public_key\":\"{}\"}}",
                encode_key(&key)
            ));
        }
        body.push_str("]}");
        let (status, answer) = http(&g.api, "POST", "/v1/devices/batch", Some(&body));
        assert_eq!(status, 200, "{answer}");
        assert!(
            answer.contains(&format!("\"created\":{n}")),
            "batch {batch}: {}",
            &answer[..200.min(answer.len())]
        );
        if batch % 10 == 9 {
            eprintln!("registered {} devices", (batch + 1) * BATCH);
        }
    }
    let register_s = t0.elapsed().as_secs_f64();
    let rss_while_registering = g.rss();
    g.stop();

    // 2. Restart on the full registry, timed.
    let started = Instant::now();
    let mut g = Gateway::spawn(&full);
    let ready_s = g.wait_ready(started);
    let handshake_s = g.handshake(&device_key, started);
    let _ = http(&g.api, "GET", "/v1/devices?limit=100", None);
    std::thread::sleep(Duration::from_millis(500));
    let rss_full = g.rss();
    g.stop();

    // 3. The same steps on an empty registry (one device, for the handshake).
    let mut e = Gateway::start(&empty);
    let body = format!(
        "{{\"uuid\":\"only\",\"public_key\":\"{}\"}}",
        encode_key(&public_key(&device_key))
    );
    assert_eq!(http(&e.api, "POST", "/v1/devices", Some(&body)).0, 201);
    e.stop();
    let started = Instant::now();
    let mut e = Gateway::spawn(&empty);
    e.wait_ready(started);
    e.handshake(&device_key, started);
    let _ = http(&e.api, "GET", "/v1/devices?limit=100", None);
    std::thread::sleep(Duration::from_millis(500));
    let rss_empty = e.rss();
    e.stop();

    let per_device = (rss_full as f64 - rss_empty as f64) / devices as f64;
    let db_bytes = std::fs::metadata(full.join("registry.sqlite3"))
        .map(|m| m.len())
        .unwrap_or(0);
    println!("registry_million: {devices} devices");
    println!("  registration through the batch endpoint: {register_s:.1} s ({:.0} devices/s); gateway RSS while registering {:.1} MiB", devices as f64 / register_s, rss_while_registering as f64 / 1048576.0);
    println!(
        "  memory per registered device: {per_device:.1} B (RSS {:.1} MiB with the fleet vs {:.1} MiB empty); limit {MEMORY_LIMIT} B, ratio {:.3}",
        rss_full as f64 / 1048576.0,
        rss_empty as f64 / 1048576.0,
        per_device.max(0.0) / MEMORY_LIMIT
    );
    println!(
        "  start to /readyz ready: {ready_s:.3} s; start to a completed handshake: {handshake_s:.3} s; limit {START_LIMIT} s, ratio {:.3}",
        handshake_s / START_LIMIT
    );
    println!(
        "  registry on disk: {:.1} MiB ({:.0} B/device)",
        db_bytes as f64 / 1048576.0,
        db_bytes as f64 / devices as f64
    );
    println!(
        "{{\"devices\":{devices},\"register_s\":{register_s:.2},\"bytes_per_registered_device\":{per_device:.1},\"ready_s\":{ready_s:.3},\"first_handshake_s\":{handshake_s:.3},\"rss_full_bytes\":{rss_full},\"rss_empty_bytes\":{rss_empty}}}"
    );
}

struct Gateway {
    child: Child,
    api: String,
    udp: String,
}

impl Gateway {
    fn spawn(dir: &std::path::Path) -> Self {
        let api = format!(
            "127.0.0.1:{}",
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        );
        let udp = format!(
            "127.0.0.1:{}",
            UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        );
        let child = Command::new(BIN)
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
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(dir)
            .env("CLOUDLINK_TOKEN", TOKEN)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Gateway { child, api, udp }
    }

    fn start(dir: &std::path::Path) -> Self {
        let g = Self::spawn(dir);
        g.wait_ready(Instant::now());
        g
    }

    fn wait_ready(&self, started: Instant) -> f64 {
        loop {
            if let Ok((200, _)) = try_http(&self.api, "GET", "/readyz", None) {
                return started.elapsed().as_secs_f64();
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "gateway never became ready"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Handshakes with the gateway as `key`; seconds since `started` when the
    /// response arrived.
    fn handshake(&self, key: &[u8; 32], started: Instant) -> f64 {
        let gw_pub = self.gateway_public_key();
        let mut tunn = Tunn::new((*key).into(), gw_pub.into(), None, None, 1, None);
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = vec![0u8; 2048];
        let mut inbuf = vec![0u8; 2048];
        loop {
            if let TunnResult::WriteToNetwork(p) = tunn.format_handshake_initiation(&mut buf, true)
            {
                sock.send_to(p, &self.udp).unwrap();
            }
            if let Ok((n, _)) = sock.recv_from(&mut inbuf) {
                if let TunnResult::WriteToNetwork(_) = tunn.decapsulate(None, &inbuf[..n], &mut buf)
                {
                    return started.elapsed().as_secs_f64();
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "no handshake answer"
            );
        }
    }

    fn gateway_public_key(&self) -> [u8; 32] {
        let (_, body) = http(&self.api, "GET", "/v1/devices?limit=1", None);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let uuid = v["devices"][0]["uuid"].as_str().unwrap().to_owned();
        let (_, body) = http(&self.api, "GET", &format!("/v1/devices/{uuid}"), None);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        cloudlink::keys::decode_key(v["gateway"]["public_key"].as_str().unwrap()).unwrap()
    }

    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap()
            * 1024
    }

    fn stop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap();
    }
}

fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    try_http(addr, method, path, body).unwrap()
}

fn try_http(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body.as_bytes())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let out = String::from_utf8_lossy(&out);
    let status = out.split(' ').nth(1).unwrap_or("0").parse().unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
