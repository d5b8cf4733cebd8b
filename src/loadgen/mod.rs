//! `cloudlink loadgen`: a fleet of simulated WireGuard devices for load
//! tests. Each device is a boringtun initiator with its own key and a 25 s
//! persistent keepalive, exactly what a real device's WireGuard does, so the
//! same run can drive cloudlink or any other WireGuard server
//! (`wireguard-go` for side-by-side figures).
//!
//! Devices share a pool of UDP sockets (as devices behind one NAT would),
//! bound to distinct source addresses in 127.0.0.0/8. Worker threads each
//! own a slice of sockets and the devices on them; a device's receiver index
//! is its number, so a datagram finds its device in O(1).
//!
//! The run is bounded: it stops after `--duration` whatever happens, and
//! prints one JSON object (see [`Report`]).

mod http;
mod report;

pub use report::Report;

use boringtun::noise::{Tunn, TunnResult};
use parking_lot::Mutex;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::keys::{decode_key, encode_key, KeyBytes};

/// Persistent keepalive of every simulated device, seconds.
pub const KEEPALIVE_S: u16 = 25;

#[derive(Debug, Clone)]
pub struct LoadgenConfig {
    pub gateway: SocketAddr,
    pub api: Option<String>,
    pub token: Option<String>,
    pub devices: usize,
    /// Devices started per second; `None` with `storm`.
    pub rate: f64,
    pub storm: bool,
    /// Percent of devices that drop and reconnect each minute.
    pub churn: f64,
    pub duration: Duration,
    pub gateway_pid: Option<u32>,
    pub no_register: bool,
    pub keys: Option<PathBuf>,
    pub wg_peers: Option<PathBuf>,
    pub gateway_public_key: Option<KeyBytes>,
    pub sockets: usize,
    pub source_ips: usize,
    pub threads: usize,
    pub timeline: Option<PathBuf>,
    /// Stop as soon as every device is connected (plus `settle`).
    pub exit_when_connected: bool,
    pub settle: Duration,
    pub uuid_prefix: String,
    /// Write `<t> <connected>` here twice a second (for scripts).
    pub status_file: Option<PathBuf>,
    /// With `exit_when_connected`: wait for a gateway restart (the
    /// `gateway_pid` process ending) and for every device to be back.
    pub await_restart: bool,
    /// Only write `keys` and `wg_peers`, then stop.
    pub prepare_only: bool,
    /// Only register the devices (and write `keys`), then stop.
    pub register_only: bool,
    /// Only delete the devices with `uuid_prefix`, then stop.
    pub cleanup: bool,
    /// Rekey every session this old, as kernel and wireguard-go peers do
    /// (`None`: boringtun's own schedule).
    pub rekey_after: Option<Duration>,
    /// Bind the sockets to the first `source_ips` host addresses of this
    /// network instead of 127.1.x.y (a real server rate-limits handshakes
    /// per source address under load, as devices each have their own).
    pub source_net: Option<ipnet::Ipv4Net>,
    /// A new random sender index for every handshake (kernel and
    /// wireguard-go style) instead of boringtun's fixed upper 24 bits.
    pub random_index: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    #[error("registering devices through {api}: {message}")]
    Register { api: String, message: String },
    #[error("{0}")]
    Config(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not started yet (ramp).
    Waiting,
    /// Initiation sent, no session yet.
    Handshaking,
    Connected,
}

struct Device {
    /// Kept to rebuild the tunnel when the device churns.
    secret: StaticSecret,
    /// BLAKE2s("mac1----" ‖ public key): tells which device of a shared
    /// socket an initiation from the gateway is for (its mac1 is keyed with
    /// the responder's public key).
    mac1_key: [u8; 32],
    /// Counted back after the gateway restarted.
    back: bool,
    tunn: Tunn,
    phase: Phase,
    /// When the current connection attempt began.
    attempt: Instant,
    /// When the current session's handshake completed.
    session_at: Instant,
    /// The current tunnel's 24-bit index (with `random_index`).
    index: u32,
    socket: usize,
}

/// Counters shared by the workers (read by the progress line).
#[derive(Default)]
struct Shared {
    connected: AtomicU64,
    handshakes: AtomicU64,
    initiations: AtomicU64,
    cookies: AtomicU64,
    send_errors: AtomicU64,
    decrypt_errors: AtomicU64,
    reconnects: AtomicU64,
    /// New attempts after boringtun gave up on a handshake.
    retries: AtomicU64,
    /// Handshakes the gateway initiated (redials) that the devices answered.
    answered: AtomicU64,
    /// Set when the gateway process went away (a restart).
    restarted: AtomicBool,
    /// Devices back after the restart (answered a redial or re-handshaked).
    back: AtomicU64,
    latencies_us: Mutex<Vec<u32>>,
}

fn mac1_key(public: &PublicKey) -> [u8; 32] {
    use blake2::Digest;
    let mut h = blake2::Blake2s256::new();
    h.update(b"mac1----");
    h.update(public.as_bytes());
    h.finalize().into()
}

/// Whether `initiation` carries a valid mac1 for the responder `key`.
fn mac1_matches(key: &[u8; 32], initiation: &[u8]) -> bool {
    use blake2::digest::{consts::U16, Mac};
    let Ok(mut m) = blake2::Blake2sMac::<U16>::new_from_slice(key) else {
        return false;
    };
    m.update(&initiation[..116]);
    m.verify_slice(&initiation[116..132]).is_ok()
}

/// The private keys of the fleet: from `--keys` when it exists, else new
/// (and written there when a path was given).
fn fleet_keys(cfg: &LoadgenConfig) -> Result<Vec<StaticSecret>, LoadgenError> {
    if let Some(p) = &cfg.keys {
        if p.exists() {
            let text = std::fs::read_to_string(p)?;
            let keys: Vec<StaticSecret> = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .take(cfg.devices)
                .map(|l| {
                    decode_key(l)
                        .map(StaticSecret::from)
                        .map_err(|e| LoadgenError::Config(format!("{}: {e}", p.display())))
                })
                .collect::<Result<_, _>>()?;
            if keys.len() < cfg.devices {
                return Err(LoadgenError::Config(format!(
                    "{} holds {} keys, {} devices asked for",
                    p.display(),
                    keys.len(),
                    cfg.devices
                )));
            }
            return Ok(keys);
        }
    }
    let keys: Vec<StaticSecret> = (0..cfg.devices)
        .map(|_| StaticSecret::random_from_rng(rand_core::OsRng))
        .collect();
    if let Some(p) = &cfg.keys {
        let mut text = String::with_capacity(keys.len() * 45);
        for k in &keys {
            text.push_str(&encode_key(&k.to_bytes()));
            text.push('\n');
        }
        std::fs::write(p, text)?;
    }
    Ok(keys)
}

/// Tunnel address of device `i` in a `wg` peer file (10.64.0.0/10).
fn peer_address(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 2)) + i as u32)
}

fn write_wg_peers(path: &PathBuf, publics: &[PublicKey]) -> Result<(), LoadgenError> {
    let mut text = String::with_capacity(publics.len() * 100);
    for (i, p) in publics.iter().enumerate() {
        text.push_str(&format!(
            "[Peer]\nPublicKey = {}\nAllowedIPs = {}/32\n",
            encode_key(p.as_bytes()),
            peer_address(i)
        ));
    }
    std::fs::write(path, text)?;
    Ok(())
}

/// Registers the fleet through the batch endpoint; returns the gateway's
/// public key from the answer.
fn register(cfg: &LoadgenConfig, publics: &[PublicKey]) -> Result<KeyBytes, LoadgenError> {
    let api = cfg.api.clone().ok_or_else(|| {
        LoadgenError::Config("--api is needed to register devices (or pass --no-register)".into())
    })?;
    let token = cfg.token.clone().unwrap_or_default();
    let err = |message: String| LoadgenError::Register {
        api: api.clone(),
        message,
    };
    let mut gateway_key = None;
    for (chunk_no, chunk) in publics.chunks(10_000).enumerate() {
        let devices: Vec<serde_json::Value> = chunk
            .iter()
            .enumerate()
            .map(|(j, p)| {
                serde_json::json!({
                    "uuid": format!("{}{:07}", cfg.uuid_prefix, chunk_no * 10_000 + j),
                    "public_key": encode_key(p.as_bytes()),
                })
            })
            .collect();
        let body = serde_json::json!({ "devices": devices }).to_string();
        let (status, answer) =
            http::post(&api, "/v1/devices/batch", &token, &body).map_err(|e| err(e.to_string()))?;
        if status != 200 {
            return Err(err(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&answer)
            )));
        }
        let v: serde_json::Value =
            serde_json::from_slice(&answer).map_err(|e| err(e.to_string()))?;
        if let Some(bad) = v["results"].as_array().and_then(|r| {
            r.iter()
                .find(|x| x["status"].as_u64().is_none_or(|s| s >= 300))
        }) {
            return Err(err(format!("a device was refused: {bad}")));
        }
        let k = v["gateway"]["public_key"].as_str().unwrap_or_default();
        gateway_key = Some(decode_key(k).map_err(|e| err(format!("gateway public key: {e}")))?);
    }
    gateway_key.ok_or_else(|| err("no devices to register".into()))
}

/// `--cleanup`: deletes the devices a run registered (every uuid starting
/// with `--uuid-prefix`) through `DELETE /v1/devices?prefix=`.
fn cleanup(cfg: &LoadgenConfig) -> Result<u64, LoadgenError> {
    let api = cfg
        .api
        .clone()
        .ok_or_else(|| LoadgenError::Config("--api is needed to delete the devices".into()))?;
    if cfg.uuid_prefix.is_empty() {
        return Err(LoadgenError::Config(
            "--cleanup needs a non-empty --uuid-prefix (it deletes every device whose uuid starts with it)".into(),
        ));
    }
    let err = |message: String| LoadgenError::Register {
        api: api.clone(),
        message,
    };
    let mut query = String::new();
    for b in cfg.uuid_prefix.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            query.push(b as char);
        } else {
            query.push_str(&format!("%{b:02X}"));
        }
    }
    let (status, answer) = http::request(
        "DELETE",
        &api,
        &format!("/v1/devices?prefix={query}"),
        cfg.token.as_deref().unwrap_or_default(),
        "",
    )
    .map_err(|e| err(e.to_string()))?;
    if status != 200 {
        return Err(err(format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&answer)
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(&answer).map_err(|e| err(e.to_string()))?;
    Ok(v["deleted"].as_u64().unwrap_or(0))
}

fn bind_sockets(cfg: &LoadgenConfig) -> Result<Vec<UdpSocket>, LoadgenError> {
    let ips = cfg.source_ips.max(1);
    (0..cfg.sockets.max(1))
        .map(|j| {
            let k = j % ips;
            let ip = match cfg.source_net {
                // The k-th host address of the network (the caller put
                // them on an interface).
                Some(net) => Ipv4Addr::from(u32::from(net.network()) + 1 + k as u32),
                None if cfg.gateway.ip().is_loopback() => {
                    Ipv4Addr::new(127, 1, (k / 250) as u8, (k % 250 + 1) as u8)
                }
                None => Ipv4Addr::UNSPECIFIED,
            };
            let s = UdpSocket::bind((ip, 0))?;
            s.set_nonblocking(true)?;
            crate::udp_socket::size_socket_buffers(std::os::fd::AsRawFd::as_raw_fd(&s), 4 << 20);
            Ok(s)
        })
        .collect()
}

/// The report of a run that only prepared or registered the devices.
fn no_run(cfg: &LoadgenConfig) -> Report {
    report::build(cfg, &Shared::default(), 0.0, None, None, None)
}

/// Runs the load test and returns its report.
pub fn run(cfg: LoadgenConfig) -> Result<Report, LoadgenError> {
    if cfg.devices == 0 || cfg.devices >= 1 << 24 {
        return Err(LoadgenError::Config(
            "--devices is from 1 to 16,777,215".into(),
        ));
    }
    if !cfg.storm && cfg.rate <= 0.0 {
        return Err(LoadgenError::Config(
            "--rate must be above 0 (or use --storm)".into(),
        ));
    }
    if cfg.cleanup {
        let n = cleanup(&cfg)?;
        eprintln!(
            "loadgen: deleted {n} devices whose uuid starts with {:?}",
            cfg.uuid_prefix
        );
        return Ok(no_run(&cfg));
    }
    let t_keys = Instant::now();
    let secrets = fleet_keys(&cfg)?;
    let publics: Vec<PublicKey> = secrets.iter().map(PublicKey::from).collect();
    if let Some(p) = &cfg.wg_peers {
        write_wg_peers(p, &publics)?;
    }
    if cfg.prepare_only {
        eprintln!("loadgen: {} keys prepared", cfg.devices);
        return Ok(no_run(&cfg));
    }
    let gateway_key = if cfg.no_register {
        cfg.gateway_public_key.ok_or_else(|| {
            LoadgenError::Config("--no-register needs --gateway-public-key".into())
        })?
    } else {
        register(&cfg, &publics)?
    };
    eprintln!(
        "loadgen: {} keys ready and {} in {:.1} s",
        cfg.devices,
        if cfg.no_register {
            "not registered"
        } else {
            "registered"
        },
        t_keys.elapsed().as_secs_f64()
    );
    if cfg.register_only {
        return Ok(no_run(&cfg));
    }
    let gateway_key = PublicKey::from(gateway_key);
    let sockets = Arc::new(bind_sockets(&cfg)?);
    let threads = cfg.threads.max(1).min(sockets.len());
    let shared = Arc::new(Shared::default());
    let stop = Arc::new(AtomicBool::new(false));
    let cfg = Arc::new(cfg);

    // Device i lives on worker i % threads; its socket is one of that
    // worker's, so the worker that receives its datagrams owns it. Each
    // worker builds its own devices (a `Tunn` costs two X25519), then all
    // wait for one another: the run starts when every device is ready.
    let built = Arc::new(std::sync::Barrier::new(threads + 1));
    let go = Arc::new(std::sync::Barrier::new(threads + 1));
    let started: Arc<std::sync::OnceLock<Instant>> = Arc::default();
    let mut secrets: Vec<Option<StaticSecret>> = secrets.into_iter().map(Some).collect();
    let mut handles = Vec::new();
    for w in 0..threads {
        let my_sockets: Vec<usize> = (w..sockets.len()).step_by(threads).collect();
        let mut mine = Vec::new();
        let mut i = w;
        while i < cfg.devices {
            let socket = my_sockets[(i / threads) % my_sockets.len()];
            let secret = secrets[i].take().expect("each key used once");
            mine.push((i, secret, mac1_key(&publics[i]), socket));
            i += threads;
        }
        let (sockets, shared, cfg, stop) =
            (sockets.clone(), shared.clone(), cfg.clone(), stop.clone());
        let (built, go, started) = (built.clone(), go.clone(), started.clone());
        handles.push(
            std::thread::Builder::new()
                .name(format!("loadgen-{w}"))
                .spawn(move || {
                    let now = Instant::now();
                    let devices: Vec<Device> = mine
                        .into_iter()
                        .map(|(i, secret, mac1_key, socket)| Device {
                            mac1_key,
                            back: false,
                            tunn: Tunn::new(
                                secret.clone(),
                                gateway_key,
                                None,
                                Some(KEEPALIVE_S),
                                i as u32,
                                None,
                            ),
                            secret,
                            index: i as u32,
                            phase: Phase::Waiting,
                            attempt: now,
                            session_at: now,
                            socket,
                        })
                        .collect();
                    let mut on_socket = vec![Vec::new(); sockets.len()];
                    for (local, d) in devices.iter().enumerate() {
                        on_socket[d.socket].push(local as u32);
                    }
                    built.wait();
                    go.wait();
                    let start = *started.get().expect("set before the second barrier");
                    let mut worker = Worker {
                        w,
                        threads,
                        on_socket,
                        devices,
                        sockets,
                        my_sockets,
                        shared,
                        cfg,
                        start,
                        stop,
                        gateway_key,
                        by_index: Default::default(),
                    };
                    for d in &mut worker.devices {
                        d.attempt = start;
                        d.session_at = start;
                    }
                    worker.run()
                })?,
        );
    }
    built.wait();
    let cpu_start = cfg.gateway_pid.and_then(report::cpu_seconds);
    let rss_registered = cfg.gateway_pid.and_then(report::rss_bytes);
    let start = Instant::now();
    let _ = started.set(start);
    go.wait();

    // Progress, timeline and the end condition.
    let mut timeline = Vec::new();
    let mut all_connected: Option<f64> = None;
    let mut idle_from: Option<(Instant, f64)> = None;
    let mut last_print = Instant::now();
    let mut last_hs = 0;
    let mut end_at = start + cfg.duration;
    let mut restart: Option<(f64, u64)> = None;
    let mut cpu_connect: Option<f64> = None;
    let mut all_back: Option<f64> = None;
    let mut last_status = Instant::now();
    while Instant::now() < end_at {
        std::thread::sleep(Duration::from_millis(100));
        let t = start.elapsed().as_secs_f64();
        let mut connected = shared.connected.load(Ordering::Relaxed);
        // The gateway process went away: a restart. From now on a device
        // counts as connected once it handshakes with the new gateway.
        if restart.is_none() {
            if let Some(pid) = cfg.gateway_pid {
                if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    restart = Some((t, connected));
                    shared.restarted.store(true, Ordering::Relaxed);
                    eprintln!("loadgen: t={t:6.1}s the gateway process {pid} is gone: counting devices back");
                }
            }
        }
        if let Some((at, before)) = restart {
            connected = shared.back.load(Ordering::Relaxed);
            if all_back.is_none() && connected >= before {
                all_back = Some(t - at);
                if cfg.exit_when_connected {
                    end_at = end_at.min(Instant::now() + cfg.settle);
                }
            }
        }
        timeline.push((t, connected));
        if let Some(p) = &cfg.status_file {
            if last_status.elapsed() >= Duration::from_millis(500) {
                let _ = std::fs::write(p, format!("{t:.1} {connected}\n"));
                last_status = Instant::now();
            }
        }
        if all_connected.is_none() && restart.is_none() && connected as usize == cfg.devices {
            all_connected = Some(t);
            cpu_connect = match (cpu_start, cfg.gateway_pid.and_then(report::cpu_seconds)) {
                (Some(a), Some(b)) => Some(b - a),
                _ => None,
            };
            idle_from = cfg
                .gateway_pid
                .and_then(report::cpu_seconds)
                .map(|c| (Instant::now(), c));
            if cfg.exit_when_connected && !cfg.await_restart {
                end_at = end_at.min(Instant::now() + cfg.settle);
            }
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            let hs = shared.handshakes.load(Ordering::Relaxed);
            eprintln!(
                "loadgen: t={t:6.1}s connected {connected}/{} handshakes {hs} (+{}/s) cookies {} reconnects {}",
                cfg.devices,
                hs - last_hs,
                shared.cookies.load(Ordering::Relaxed),
                shared.reconnects.load(Ordering::Relaxed)
            );
            last_hs = hs;
            last_print = Instant::now();
        }
    }
    stop.store(true, Ordering::Relaxed);
    eprintln!(
        "loadgen: done at t={:.1}s: connected {}/{} handshakes {} cookies {}",
        start.elapsed().as_secs_f64(),
        shared.connected.load(Ordering::Relaxed),
        cfg.devices,
        shared.handshakes.load(Ordering::Relaxed),
        shared.cookies.load(Ordering::Relaxed)
    );
    for h in handles {
        let _ = h.join();
    }
    let elapsed = start.elapsed().as_secs_f64();
    if let Some(p) = &cfg.timeline {
        let mut text = String::from("t_s,connected\n");
        for (t, c) in &timeline {
            text.push_str(&format!("{t:.2},{c}\n"));
        }
        std::fs::write(p, text)?;
    }
    let mut report = report::build(&cfg, &shared, elapsed, all_connected, cpu_start, idle_from);
    report.gateway_rss_registered_bytes = rss_registered;
    report.restart_at_s = restart.map(|r| r.0);
    report.connected_at_restart = restart.map(|r| r.1);
    report.all_back_s = all_back;
    report.back = restart.map(|_| shared.back.load(Ordering::Relaxed));
    report.redials_answered = shared.answered.load(Ordering::Relaxed);
    report.gateway_cpu_connect_s = cpu_connect;
    Ok(report)
}

struct Worker {
    w: usize,
    threads: usize,
    /// Local device numbers on each socket (this worker's sockets only).
    on_socket: Vec<Vec<u32>>,
    devices: Vec<Device>,
    sockets: Arc<Vec<UdpSocket>>,
    my_sockets: Vec<usize>,
    shared: Arc<Shared>,
    cfg: Arc<LoadgenConfig>,
    start: Instant,
    stop: Arc<AtomicBool>,
    gateway_key: PublicKey,
    /// With `random_index`: each device's current 24-bit tunnel index →
    /// the device (this worker's devices only; datagrams for them arrive
    /// on this worker's sockets).
    by_index: std::collections::HashMap<u32, u32>,
}

impl Worker {
    /// Start time of device `local` on this worker.
    fn start_at(&self, local: usize) -> Instant {
        if self.cfg.storm {
            return self.start;
        }
        let global = local * self.threads + self.w;
        self.start + Duration::from_secs_f64(global as f64 / self.cfg.rate)
    }

    fn send(&self, socket: usize, datagram: &[u8]) {
        if let Err(e) = self.sockets[socket].send_to(datagram, self.cfg.gateway) {
            if e.kind() != std::io::ErrorKind::WouldBlock {
                self.shared.send_errors.fetch_add(1, Ordering::Relaxed);
            } else {
                // The socket buffer is full: the datagram is lost, as on a
                // real network; WireGuard's retries take over.
                self.shared.send_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Replaces device `local`'s tunnel with a new one (same key), as a
    /// device that rebooted or started over. Its index is the device's
    /// number, or with `random_index` a new random one.
    fn fresh_tunnel(&mut self, local: usize) {
        let index = self.tunnel_index(local);
        let d = &mut self.devices[local];
        d.tunn = Tunn::new(
            d.secret.clone(),
            self.gateway_key,
            None,
            Some(KEEPALIVE_S),
            index,
            None,
        );
    }

    /// The 24-bit index of device `local`'s next tunnel.
    fn tunnel_index(&mut self, local: usize) -> u32 {
        let global = (local * self.threads + self.w) as u32;
        if !self.cfg.random_index {
            return global;
        }
        let old = self.devices[local].index;
        if self.by_index.get(&old) == Some(&(local as u32)) {
            self.by_index.remove(&old);
        }
        loop {
            let i = rand_core::RngCore::next_u32(&mut rand_core::OsRng) >> 8;
            if i != 0 && !self.by_index.contains_key(&i) {
                self.by_index.insert(i, local as u32);
                self.devices[local].index = i;
                return i;
            }
        }
    }

    /// A rekey: with `random_index` on a new tunnel (a new random index),
    /// as kernel and wireguard-go peers draw one per handshake.
    fn rekey(&mut self, local: usize, now: Instant, buf: &mut [u8]) {
        if self.cfg.random_index {
            self.fresh_tunnel(local);
        }
        let d = &mut self.devices[local];
        d.session_at = now;
        let socket = d.socket;
        if let TunnResult::WriteToNetwork(p) = d.tunn.format_handshake_initiation(buf, false) {
            let p = p.to_vec();
            self.shared.initiations.fetch_add(1, Ordering::Relaxed);
            self.send(socket, &p);
        }
    }

    /// A first attempt: an initiation as for a rekey, timed from now.
    fn initiate(&mut self, local: usize, now: Instant, buf: &mut [u8]) {
        let d = &mut self.devices[local];
        d.phase = Phase::Handshaking;
        d.attempt = now;
        self.rekey(local, now, buf);
    }

    fn run(mut self) {
        let mut buf = vec![0u8; 2048];
        let mut out = vec![0u8; 2048];
        let mut next_start = 0usize;
        let mut timer_cursor = 0usize;
        let mut last_timer = Instant::now();
        let mut last_churn = Instant::now();
        let mut latencies = Vec::new();
        let mut rng = rand_core::OsRng;
        let mut pollfds: Vec<libc::pollfd> = self
            .my_sockets
            .iter()
            .map(|&s| libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&self.sockets[s]),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        while !self.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            // Ramp: start the devices whose time has come (bounded per pass
            // so receiving keeps up during a storm).
            let mut started = 0;
            while next_start < self.devices.len()
                && self.start_at(next_start) <= now
                && started < 512
            {
                self.initiate(next_start, now, &mut out);
                next_start += 1;
                started += 1;
            }
            // Receive what arrived.
            // SAFETY: pollfds is a valid array of its length.
            let ready = unsafe {
                libc::poll(
                    pollfds.as_mut_ptr(),
                    pollfds.len() as libc::nfds_t,
                    if started > 0 { 0 } else { 5 },
                )
            };
            if ready > 0 {
                for (k, pfd) in pollfds.iter().enumerate() {
                    if pfd.revents & libc::POLLIN == 0 {
                        continue;
                    }
                    let s = self.my_sockets[k];
                    for _ in 0..256 {
                        let n = match self.sockets[s].recv(&mut buf) {
                            Ok(n) => n,
                            Err(_) => break,
                        };
                        self.on_datagram(s, &buf[..n], &mut out, &mut latencies);
                    }
                }
            }
            // Timers: every device once a second, in slices.
            let now = Instant::now();
            if now.duration_since(last_timer) >= Duration::from_millis(50) {
                let per_slice = self.devices.len().div_ceil(20).max(1);
                for _ in 0..per_slice {
                    if self.devices.is_empty() {
                        break;
                    }
                    timer_cursor = (timer_cursor + 1) % self.devices.len();
                    if timer_cursor >= next_start {
                        continue;
                    }
                    let d = &mut self.devices[timer_cursor];
                    let socket = d.socket;
                    // Kernel and wireguard-go devices rekey when a session
                    // is `rekey_after` old even if they only send
                    // keepalives; boringtun waits for data (or 180 s).
                    if let Some(rekey) = self.cfg.rekey_after {
                        if d.phase == Phase::Connected && now.duration_since(d.session_at) >= rekey
                        {
                            self.rekey(timer_cursor, now, &mut out);
                            continue;
                        }
                    }
                    match d.tunn.update_timers(&mut out) {
                        TunnResult::WriteToNetwork(p) => {
                            if p.len() == 148 {
                                self.shared.initiations.fetch_add(1, Ordering::Relaxed);
                            }
                            let p = p.to_vec();
                            self.send(socket, &p);
                        }
                        TunnResult::Err(
                            boringtun::noise::errors::WireGuardError::ConnectionExpired,
                        ) if d.phase == Phase::Handshaking
                            && now.duration_since(d.session_at)
                                >= Duration::from_secs(KEEPALIVE_S.into()) =>
                        {
                            // (While handshaking, `session_at` is when this
                            // tunnel was built: one new attempt per
                            // keepalive interval at most.)
                            d.session_at = now;
                            // boringtun gives up after 90 s of unanswered
                            // initiations; a real device's next keepalive
                            // starts a new attempt, so this one does too
                            // (keeping `attempt`, so latency counts it all).
                            self.fresh_tunnel(timer_cursor);
                            self.shared.retries.fetch_add(1, Ordering::Relaxed);
                            let d = &mut self.devices[timer_cursor];
                            if let TunnResult::WriteToNetwork(p) =
                                d.tunn.format_handshake_initiation(&mut out, false)
                            {
                                let p = p.to_vec();
                                self.shared.initiations.fetch_add(1, Ordering::Relaxed);
                                self.send(socket, &p);
                            }
                        }
                        _ => {}
                    }
                }
                last_timer = now;
            }
            // Churn: P % of the devices a minute drop their session and dial
            // again with a fresh one, as after a reboot.
            if self.cfg.churn > 0.0 && now.duration_since(last_churn) >= Duration::from_secs(1) {
                let n =
                    (self.devices.len() as f64 * self.cfg.churn / 100.0 / 60.0).round() as usize;
                for _ in 0..n {
                    let local =
                        (rand_core::RngCore::next_u32(&mut rng) as usize) % self.devices.len();
                    if self.devices[local].phase != Phase::Connected {
                        continue;
                    }
                    self.fresh_tunnel(local);
                    self.shared.connected.fetch_sub(1, Ordering::Relaxed);
                    self.shared.reconnects.fetch_add(1, Ordering::Relaxed);
                    self.initiate(local, now, &mut out);
                }
                last_churn = now;
            }
        }
        self.shared.latencies_us.lock().extend(latencies);
    }

    fn on_datagram(
        &mut self,
        socket: usize,
        datagram: &[u8],
        out: &mut [u8],
        latencies: &mut Vec<u32>,
    ) {
        if datagram.first() == Some(&1) && datagram.len() == 148 {
            self.on_initiation(socket, datagram, out);
            return;
        }
        let idx = match datagram.first() {
            Some(2) if datagram.len() == 92 => {
                u32::from_le_bytes(datagram[8..12].try_into().unwrap())
            }
            Some(3) if datagram.len() == 64 => {
                self.shared.cookies.fetch_add(1, Ordering::Relaxed);
                u32::from_le_bytes(datagram[4..8].try_into().unwrap())
            }
            Some(4) if datagram.len() >= 32 => {
                u32::from_le_bytes(datagram[4..8].try_into().unwrap())
            }
            _ => return,
        };
        let local = if self.cfg.random_index {
            match self.by_index.get(&(idx >> 8)) {
                Some(&l) => l as usize,
                None => return,
            }
        } else {
            let global = (idx >> 8) as usize;
            if global % self.threads != self.w {
                return;
            }
            global / self.threads
        };
        let Some(d) = self.devices.get_mut(local) else {
            return;
        };
        let socket = d.socket;
        let mut first = true;
        loop {
            let input: &[u8] = if first { datagram } else { &[] };
            first = false;
            match d.tunn.decapsulate(None, input, out) {
                TunnResult::WriteToNetwork(p) => {
                    let p = p.to_vec();
                    if let Err(_e) = self.sockets[socket].send_to(&p, self.cfg.gateway) {
                        self.shared.send_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
                TunnResult::Err(_) => {
                    self.shared.decrypt_errors.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
            break;
        }
        if datagram[0] == 2 && d.tunn.time_since_last_handshake().is_some() {
            self.shared.handshakes.fetch_add(1, Ordering::Relaxed);
            d.session_at = Instant::now();
            if d.phase != Phase::Connected {
                d.phase = Phase::Connected;
                // Steady state from the start: a fleet connected for a
                // while rekeys uniformly, not in the wave a ramp would
                // replay 120 s later. The first rekey comes after a uniform
                // share of the period.
                if let Some(period) = self.cfg.rekey_after {
                    let ms = period.as_millis().max(1) as u64;
                    let back = rand_core::RngCore::next_u64(&mut rand_core::OsRng) % ms;
                    d.session_at = d
                        .session_at
                        .checked_sub(Duration::from_millis(back))
                        .unwrap_or(d.session_at);
                }
                self.shared.connected.fetch_add(1, Ordering::Relaxed);
                latencies.push(d.attempt.elapsed().as_micros().min(u32::MAX as u128) as u32);
            }
            if self.shared.restarted.load(Ordering::Relaxed) && !d.back {
                d.back = true;
                self.shared.back.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A handshake initiation from the gateway (a redial after its
    /// restart): find the device it is for by mac1 and answer it.
    fn on_initiation(&mut self, socket: usize, datagram: &[u8], out: &mut [u8]) {
        let Some(local) = self.on_socket[socket]
            .iter()
            .map(|&l| l as usize)
            .find(|&l| mac1_matches(&self.devices[l].mac1_key, datagram))
        else {
            return;
        };
        let d = &mut self.devices[local];
        if let TunnResult::WriteToNetwork(p) = d.tunn.decapsulate(None, datagram, out) {
            let p = p.to_vec();
            let _ = self.sockets[socket].send_to(&p, self.cfg.gateway);
            self.shared.answered.fetch_add(1, Ordering::Relaxed);
            // The gateway initiates only after a restart (it is a responder
            // otherwise), so this counts even when the redial beat the
            // watcher's noticing of the restart.
            if !d.back {
                d.back = true;
                self.shared.back.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
