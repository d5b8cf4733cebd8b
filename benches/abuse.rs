//! Abuse: five attacks, one after the other, on the real gateway binary
//! with 100 legitimate devices connected, all on loopback.
//!
//! Each attack runs for [`ATTACK`] (at most 30 s, the bound) after
//! a calm spell; the legitimate devices (boringtun initiators, each on its
//! own socket) re-handshake every 2 s and send an ICMP echo to the gateway
//! every 100 ms throughout. For each attack it prints the attack rate, the
//! gateway's CPU and RSS before and after, the share of legitimate
//! handshakes answered with a handshake response within 2 s (a cookie reply
//! is not an answer), and echo p50/p99 over established links (an echo
//! that never came back counts as 1 s).
//!
//! The attacks: a junk flood; a flood of initiations with a valid mac1
//! from unregistered keys and many addresses; the same from one address
//! that answers cookie replies (valid mac2); a registered device sending
//! authenticated keepalives from 50 source ports; slow API clients (heads
//! and sign-in bodies sent a byte at a time). Every loop is bounded in time
//! and stops by itself.
//!
//! Run: `bash benches/abuse.sh` (or `cargo bench --bench abuse`).

mod common;

use blake2::digest::{FixedOutput, KeyInit, Update};
use blake2::{Blake2s256, Blake2sMac, Digest};
use boringtun::noise::{Tunn, TunnResult};
use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::XChaCha20Poly1305;
use common::*;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use x25519_dalek::{PublicKey, StaticSecret};

const LEGIT: usize = 100;
const ATTACK: Duration = Duration::from_secs(30);
const CALM: Duration = Duration::from_secs(4);
const REHANDSHAKE: Duration = Duration::from_secs(2);
const ECHO_EVERY: Duration = Duration::from_millis(100);
const LOST_ECHO_MS: f64 = 1000.0;
const RSS_GROWTH_LIMIT: u64 = 16 << 20;
/// Slow API clients held open at once (`SLOW_CLIENTS` in the environment
/// overrides).
static SLOW_CLIENTS_DEFAULT: usize = 2000;

/// What the legitimate devices saw in one phase (by the phase an
/// initiation or an echo was sent in).
#[derive(Default, Clone)]
struct PhaseStats {
    handshakes: u64,
    answered: u64,
    cookie_replies: u64,
    echo_sent: u64,
    rtts_ms: Vec<f64>,
}

struct Shared {
    phase: AtomicUsize,
    stats: Mutex<Vec<PhaseStats>>,
    stop: AtomicBool,
    connected: AtomicUsize,
}

impl Shared {
    fn with(&self, phase: usize, f: impl FnOnce(&mut PhaseStats)) {
        let mut s = self.stats.lock();
        if s.len() <= phase {
            s.resize(phase + 1, PhaseStats::default());
        }
        f(&mut s[phase]);
    }
}

fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr, id: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![0u8; 36];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&36u16.to_be_bytes());
    p[8] = 64;
    p[9] = 1;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20] = 8;
    p[24..26].copy_from_slice(&id.to_be_bytes());
    p[26..28].copy_from_slice(&seq.to_be_bytes());
    let c = checksum(&p[20..]);
    p[22..24].copy_from_slice(&c.to_be_bytes());
    p
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in b.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One legitimate device: connects, then re-handshakes every 2 s and
/// echoes every 100 ms until `stop`.
async fn legit_device(
    i: usize,
    secret: StaticSecret,
    gw_pub: PublicKey,
    gateway: SocketAddr,
    me: Ipv4Addr,
    gw_addr: Ipv4Addr,
    shared: Arc<Shared>,
) {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(gateway).await.unwrap();
    let mut tunn = Tunn::new(secret, gw_pub, None, Some(25), i as u32 + 1, None);
    let mut buf = vec![0u8; 2048];
    let mut out = vec![0u8; 2048];
    let start = Instant::now();
    // Spread the devices' schedules over the period.
    let offset = REHANDSHAKE * i as u32 / LEGIT as u32;
    let mut next_hs = start;
    let mut next_echo = start + offset / 20;
    let mut next_timers = start + Duration::from_millis(100);
    let mut pending: Option<(Instant, usize)> = None;
    let mut echoes: HashMap<u16, (Instant, usize)> = HashMap::new();
    let mut seq = 0u16;
    let mut connected = false;
    while !shared.stop.load(Ordering::Relaxed) {
        let deadline = next_hs.min(next_echo).min(next_timers);
        let got = tokio::select! {
            r = sock.recv(&mut buf) => r.ok(),
            _ = tokio::time::sleep_until(deadline.into()) => None,
        };
        let now = Instant::now();
        if let Some(n) = got {
            let d = &buf[..n];
            match d.first() {
                Some(2) => {
                    if let Some((t, phase)) = pending.take() {
                        if now - t <= REHANDSHAKE {
                            shared.with(phase, |s| s.answered += 1);
                        }
                    }
                    if !connected {
                        connected = true;
                        shared.connected.fetch_add(1, Ordering::Relaxed);
                        next_hs = start + offset + REHANDSHAKE;
                    }
                }
                Some(3) => {
                    if let Some((_, phase)) = pending {
                        shared.with(phase, |s| s.cookie_replies += 1);
                    }
                }
                _ => {}
            }
            let mut r = tunn.decapsulate(None, d, &mut out);
            loop {
                match r {
                    TunnResult::WriteToNetwork(p) => {
                        let _ = sock.send(p).await;
                        r = tunn.decapsulate(None, &[], &mut out);
                        continue;
                    }
                    TunnResult::WriteToTunnelV4(p, _) if p.len() >= 28 && p[20] == 0 => {
                        let s = u16::from_be_bytes([p[26], p[27]]);
                        if let Some((t, phase)) = echoes.remove(&s) {
                            let ms = (now - t).as_secs_f64() * 1000.0;
                            shared.with(phase, |st| st.rtts_ms.push(ms));
                        }
                    }
                    _ => {}
                }
                break;
            }
        }
        let phase = shared.phase.load(Ordering::Relaxed);
        if now >= next_hs {
            if let TunnResult::WriteToNetwork(p) = tunn.format_handshake_initiation(&mut out, true)
            {
                let _ = sock.send(p).await;
                if connected {
                    pending = Some((now, phase));
                    shared.with(phase, |s| s.handshakes += 1);
                }
            }
            next_hs = now + REHANDSHAKE;
        }
        if now >= next_echo {
            if connected {
                seq = seq.wrapping_add(1);
                let pkt = icmp_echo(me, gw_addr, i as u16, seq);
                if let TunnResult::WriteToNetwork(p) = tunn.encapsulate(&pkt, &mut out) {
                    let _ = sock.send(p).await;
                    echoes.insert(seq, (now, phase));
                    shared.with(phase, |s| s.echo_sent += 1);
                }
                // Echoes older than 5 s are lost; forget them.
                echoes.retain(|_, (t, _)| now - *t < Duration::from_secs(5));
            }
            next_echo = now + ECHO_EVERY;
        }
        if now >= next_timers {
            if let TunnResult::WriteToNetwork(p) = tunn.update_timers(&mut out) {
                let _ = sock.send(p).await;
            }
            next_timers = now + Duration::from_millis(100);
        }
    }
}

/// Pins the calling thread (an attacker) to the last CPU: on this 2-core
/// machine the attacker gets one core of its own, as another machine
/// sending as fast as one core can would, and the gateway and the
/// legitimate devices the other. Unpinned, the scheduler shared both cores
/// among the attacker's threads and the gateway's, and the gateway's
/// receive worker got half a core: the run measured the scheduler.
fn pin_attacker() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: a zeroed cpu_set_t is the empty set; the calls only read it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpus - 1, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// A tiny xorshift: the junk needs no quality, only speed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Initiations from unregistered keys, each with a valid mac1.
fn initiations(gw_pub: PublicKey, n: usize) -> Vec<Vec<u8>> {
    let mut out = vec![0u8; 256];
    (0..n)
        .map(|i| {
            let mut t = Tunn::new(
                StaticSecret::random_from_rng(rand_core::OsRng),
                gw_pub,
                None,
                None,
                i as u32,
                None,
            );
            match t.format_handshake_initiation(&mut out, true) {
                TunnResult::WriteToNetwork(p) => p.to_vec(),
                _ => panic!("no initiation"),
            }
        })
        .collect()
}

fn until(deadline: Instant) -> impl Fn(u64) -> bool {
    move |sent| sent % 256 != 0 || Instant::now() < deadline
}

fn junk_flood(gateway: SocketAddr, deadline: Instant) -> u64 {
    pin_attacker();
    let socks: Vec<UdpSocket> = (0..8)
        .map(|i| {
            let s = UdpSocket::bind(format!("127.0.2.{}:0", i + 1)).unwrap();
            s.connect(gateway).unwrap();
            s
        })
        .collect();
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let mut buf = [0u8; 200];
    let go = until(deadline);
    let mut sent = 0u64;
    while go(sent) {
        let len = 32 + (rng.next() % 168) as usize;
        for c in buf[..len].chunks_mut(8) {
            let r = rng.next().to_le_bytes();
            c.copy_from_slice(&r[..c.len()]);
        }
        // Half of it looks like transport data naming some index.
        if sent.is_multiple_of(2) {
            buf[..4].copy_from_slice(&[4, 0, 0, 0]);
        }
        let _ = socks[(sent % 8) as usize].send(&buf[..len]);
        sent += 1;
    }
    sent
}

fn mac1_flood(gateway: SocketAddr, gw_pub: PublicKey, deadline: Instant) -> u64 {
    pin_attacker();
    let msgs = initiations(gw_pub, 512);
    let socks: Vec<UdpSocket> = (0..16)
        .map(|i| {
            let s = UdpSocket::bind(format!("127.0.3.{}:0", i + 1)).unwrap();
            s.connect(gateway).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let go = until(deadline);
    let mut sent = 0u64;
    let mut sink = [0u8; 256];
    while go(sent) {
        let s = &socks[(sent % 16) as usize];
        let _ = s.send(&msgs[(sent % 512) as usize]);
        // Cookie replies come back: read them so the socket stays open.
        let _ = s.recv(&mut sink);
        sent += 1;
    }
    sent
}

/// The flood that kept the queue full before fair admission: one address
/// that decrypts the cookie replies and sends valid mac2.
fn cookie_answering_flood(gateway: SocketAddr, gw_pub: PublicKey, deadline: Instant) -> u64 {
    pin_attacker();
    let mut msgs = initiations(gw_pub, 512);
    let by_index: HashMap<u32, usize> = msgs
        .iter()
        .enumerate()
        .map(|(i, m)| (u32::from_le_bytes([m[4], m[5], m[6], m[7]]), i))
        .collect();
    let cookie_key = {
        let mut h = Blake2s256::new();
        Digest::update(&mut h, b"cookie--");
        Digest::update(&mut h, gw_pub.as_bytes());
        h.finalize()
    };
    let aead = XChaCha20Poly1305::new_from_slice(&cookie_key).unwrap();
    let s = UdpSocket::bind("127.0.4.1:0").unwrap();
    s.connect(gateway).unwrap();
    s.set_nonblocking(true).unwrap();
    let go = until(deadline);
    let mut sent = 0u64;
    let mut reply = [0u8; 256];
    let mut cookies = 0u64;
    while go(sent) {
        let _ = s.send(&msgs[(sent % 512) as usize]);
        sent += 1;
        while let Ok(n) = s.recv(&mut reply) {
            if n != 64 || reply[0] != 3 {
                continue;
            }
            let idx = u32::from_le_bytes([reply[4], reply[5], reply[6], reply[7]]);
            let Some(&i) = by_index.get(&idx) else {
                continue;
            };
            let Ok(cookie) = aead.decrypt(
                chacha20poly1305::XNonce::from_slice(&reply[8..32]),
                Payload {
                    msg: &reply[32..64],
                    aad: &msgs[i][116..132],
                },
            ) else {
                continue;
            };
            cookies += 1;
            for m in &mut msgs {
                let mut mac =
                    <Blake2sMac<blake2::digest::consts::U16> as KeyInit>::new_from_slice(&cookie)
                        .unwrap();
                Update::update(&mut mac, &m[..132]);
                let tag = mac.finalize_fixed();
                m[132..148].copy_from_slice(&tag);
            }
        }
    }
    eprintln!("    (cookie-answering flood: {cookies} cookies decrypted and used)");
    sent
}

/// A registered device sending authenticated keepalives from 50 source
/// ports, round robin.
fn roaming_flood(
    gateway: SocketAddr,
    gw_pub: PublicKey,
    secret: StaticSecret,
    deadline: Instant,
) -> u64 {
    pin_attacker();
    let mut tunn = Tunn::new(secret, gw_pub, None, None, 77_777, None);
    let socks: Vec<UdpSocket> = (0..50)
        .map(|_| {
            let s = UdpSocket::bind("127.0.5.1:0").unwrap();
            s.connect(gateway).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            s
        })
        .collect();
    let mut out = vec![0u8; 2048];
    let mut buf = vec![0u8; 2048];
    // Connect from the first port.
    if let TunnResult::WriteToNetwork(p) = tunn.format_handshake_initiation(&mut out, true) {
        socks[0].send(p).unwrap();
    }
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        if let Ok(n) = socks[0].recv(&mut buf) {
            if let TunnResult::WriteToNetwork(p) = tunn.decapsulate(None, &buf[..n], &mut out) {
                socks[0].send(p).unwrap();
            }
            break;
        }
    }
    let go = until(deadline);
    let mut sent = 0u64;
    while go(sent) {
        if let TunnResult::WriteToNetwork(p) = tunn.encapsulate(&[], &mut out) {
            let _ = socks[(sent % 50) as usize].send(p);
        }
        sent += 1;
    }
    sent
}

/// Slow API clients: up to `conns` at once, half sending a request head a
/// byte a second, half a sign-in body the same way; reopened when the
/// gateway closes them. Returns connections opened.
async fn slow_api_clients(api: String, conns: usize, deadline: Instant) -> u64 {
    let opened = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..conns {
        let (api, opened) = (api.clone(), opened.clone());
        tasks.push(tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while Instant::now() < deadline {
                let Ok(mut s) = tokio::net::TcpStream::connect(&api).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                opened.fetch_add(1, Ordering::Relaxed);
                let head: &[u8] = if i % 2 == 0 {
                    b"GET /v1/devices HTTP/1.1\r\nHost: x\r\n"
                } else {
                    b"POST /v1/session HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 4000\r\n\r\n{\"token\":\""
                };
                if s.write_all(head).await.is_err() {
                    continue;
                }
                // A byte a second until the gateway closes it.
                while Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if s.write_all(b"a").await.is_err() {
                        break;
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    opened.load(Ordering::Relaxed)
}

/// UDP datagrams the kernel dropped for a full receive buffer, machine-wide
/// (only this run's sockets are busy on loopback).
fn udp_rcvbuf_errors() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// The gateway's CPU time so far, seconds.
fn cpu_s(pid: u32) -> f64 {
    let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = st.rsplit(')').next().unwrap().split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

async fn register(api: &str, uuid: &str, key: &StaticSecret) -> serde_json::Value {
    let body = format!(
        "{{\"uuid\":\"{uuid}\",\"public_key\":\"{}\"}}",
        cloudlink::keys::encode_key(PublicKey::from(key).as_bytes())
    );
    serde_json::from_str(&http(api, "POST", "/v1/devices", &body).await.unwrap()).unwrap()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let slow_clients: usize = std::env::var("SLOW_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(SLOW_CLIENTS_DEFAULT);
    let gw = GatewayProc::start(&[]).await;
    let pid = gw.proc.0.id();
    let gateway: SocketAddr = gw.udp.parse().unwrap();
    let mut gw_pub = None;
    let shared = Arc::new(Shared {
        phase: AtomicUsize::new(0),
        stats: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
        connected: AtomicUsize::new(0),
    });
    let mut devices = Vec::new();
    for i in 0..LEGIT {
        let key = StaticSecret::random_from_rng(rand_core::OsRng);
        let d = register(&gw.api, &format!("legit-{i:03}"), &key).await;
        let me: Ipv4Addr = d["address"].as_str().unwrap().parse().unwrap();
        let wg = d["wg_quick"].as_str().unwrap();
        let gw_addr: Ipv4Addr = wg
            .lines()
            .find_map(|l| l.strip_prefix("AllowedIPs = "))
            .and_then(|v| v.split('/').next())
            .unwrap()
            .parse()
            .unwrap();
        let pk = wg
            .lines()
            .find_map(|l| l.strip_prefix("PublicKey = "))
            .unwrap();
        gw_pub = Some(PublicKey::from(cloudlink::keys::decode_key(pk).unwrap()));
        devices.push((key, me, gw_addr));
    }
    let gw_pub = gw_pub.unwrap();
    let roamer = StaticSecret::random_from_rng(rand_core::OsRng);
    register(&gw.api, "roamer", &roamer).await;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    for (i, (key, me, gw_addr)) in devices.into_iter().enumerate() {
        rt.spawn(legit_device(
            i,
            key,
            gw_pub,
            gateway,
            me,
            gw_addr,
            shared.clone(),
        ));
    }
    let t = Instant::now();
    while shared.connected.load(Ordering::Relaxed) < LEGIT {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "only {} of {LEGIT} legitimate devices connected",
            shared.connected.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "{LEGIT} legitimate devices connected in {:.1} s; each re-handshakes every {} s and echoes every {} ms",
        t.elapsed().as_secs_f64(),
        REHANDSHAKE.as_secs(),
        ECHO_EVERY.as_millis()
    );

    let attacks = [
        "junk flood",
        "mac1-only initiation flood",
        "cookie-answering flood, one address",
        "roaming flood, one device",
        "slow API clients",
    ];
    println!(
        "{:<38} {:>14} {:>8} {:>24} {:>10} {:>9} {:>9} {:>8} {:>12}",
        "attack",
        "rate",
        "gw CPU",
        "RSS MiB (peak)",
        "answered",
        "echo p50",
        "echo p99",
        "lost",
        "kernel drops"
    );
    let mut results = Vec::new();
    let mut ok = true;
    // ATTACKS=3,5 runs only those (1-based); all by default.
    let only: Vec<usize> = std::env::var("ATTACKS")
        .unwrap_or_default()
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    for (n, name) in attacks.iter().enumerate() {
        if !only.is_empty() && !only.contains(&(n + 1)) {
            continue;
        }
        tokio::time::sleep(CALM).await;
        let (rss0, cpu0, drops0) = (rss(pid), cpu_s(pid), udp_rcvbuf_errors());
        let phase = n + 1;
        shared.phase.store(phase, Ordering::Relaxed);
        let started = Instant::now();
        let deadline = started + ATTACK;
        // The peak, sampled every 250 ms while the attack runs.
        let peak = Arc::new(AtomicU64::new(rss0));
        let sampler = {
            let peak = peak.clone();
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    peak.fetch_max(rss(pid), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            })
        };
        let sent = match n {
            0 => tokio::task::spawn_blocking(move || junk_flood(gateway, deadline))
                .await
                .unwrap(),
            1 => tokio::task::spawn_blocking(move || mac1_flood(gateway, gw_pub, deadline))
                .await
                .unwrap(),
            2 => tokio::task::spawn_blocking(move || {
                cookie_answering_flood(gateway, gw_pub, deadline)
            })
            .await
            .unwrap(),
            3 => {
                let k = roamer.clone();
                tokio::task::spawn_blocking(move || roaming_flood(gateway, gw_pub, k, deadline))
                    .await
                    .unwrap()
            }
            _ => slow_api_clients(gw.api.clone(), slow_clients, deadline).await,
        };
        let secs = started.elapsed().as_secs_f64();
        let _ = sampler.await;
        let peak = peak.load(Ordering::Relaxed);
        // Let the answers to the last initiations and echoes come back.
        shared.phase.store(0, Ordering::Relaxed);
        tokio::time::sleep(REHANDSHAKE + Duration::from_millis(200)).await;
        let (rss1, cpu1) = (rss(pid), cpu_s(pid));
        let kernel_drops = udp_rcvbuf_errors() - drops0;
        let st = shared.stats.lock()[phase].clone();
        let answered = st.answered as f64 / st.handshakes.max(1) as f64;
        let mut rtts = st.rtts_ms.clone();
        let lost = st.echo_sent.saturating_sub(rtts.len() as u64);
        rtts.extend(std::iter::repeat_n(LOST_ECHO_MS, lost as usize));
        let (p50, p99) = (percentile(&rtts, 0.5), percentile(&rtts, 0.99));
        let unit = if n == 4 { "conn/s" } else { "pkt/s" };
        let rate = sent as f64 / secs;
        let cpu = (cpu1 - cpu0) / (secs + REHANDSHAKE.as_secs_f64() + 0.2) * 100.0;
        let grew = rss1.saturating_sub(rss0);
        println!(
            "{:<38} {:>8.0} {unit:<6}{:>7.0}% {:>7.1} → {:>6.1} ({:>5.1}) {:>9.1}% {:>7.2}ms {:>7.2}ms {:>8} {:>12}",
            name,
            rate,
            cpu,
            rss0 as f64 / 1048576.0,
            rss1 as f64 / 1048576.0,
            peak as f64 / 1048576.0,
            answered * 100.0,
            p50,
            p99,
            lost,
            kernel_drops
        );
        let mut verdicts = vec![(grew <= RSS_GROWTH_LIMIT, "RSS grows by at most 16 MiB")];
        if n == 2 {
            verdicts.push((answered >= 0.99, "at least 99 % answered within 2 s"));
            verdicts.push((p99 < 50.0, "echo p99 under 50 ms"));
        }
        for (held, what) in &verdicts {
            if !held {
                ok = false;
                println!("    MISSED: {what}");
            }
        }
        results.push(serde_json::json!({
            "attack": name,
            "seconds": secs,
            "rate": rate,
            "rate_unit": unit,
            "gateway_cpu_percent": cpu,
            "rss_before": rss0,
            "rss_after": rss1,
            "rss_peak": peak,
            "legit_handshakes": st.handshakes,
            "legit_answered_within_2s": st.answered,
            "legit_cookie_replies": st.cookie_replies,
            "echo_sent": st.echo_sent,
            "echo_lost": lost,
            "kernel_udp_rcvbuf_drops": kernel_drops,
            "echo_p50_ms": p50,
            "echo_p99_ms": p99,
            "targets_held": verdicts.iter().all(|(h, _)| *h),
        }));
    }
    shared.stop.store(true, Ordering::Relaxed);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results");
    let _ = std::fs::create_dir_all(&dir);
    std::fs::write(
        dir.join("abuse.json"),
        serde_json::to_string_pretty(
            &serde_json::json!({ "legit_devices": LEGIT, "attacks": results }),
        )
        .unwrap(),
    )
    .unwrap();
    rt.shutdown_background();
    println!(
        "targets: {}",
        if ok {
            "all held"
        } else {
            "some missed (above)"
        }
    );
}
