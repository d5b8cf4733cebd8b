//! `cloudlink agent`: the device side, for devices without kernel WireGuard
//! or root. It dials the gateway with boringtun over UDP, runs a userspace
//! TCP/IP stack on its tunnel address, and forwards incoming TCP connections
//! on configured ports to local services (`--forward 22222=127.0.0.1:22`).
//!
//! Liveness: WireGuard keepalives are never answered, so an idle device
//! cannot tell that the gateway restarted. The agent pings the gateway's
//! tunnel address (the gateway answers ICMP echo) every
//! `--liveness-interval`; after three intervals without an authenticated
//! packet it drops the session and dials again. Failed attempts back off
//! exponentially from 1 s to 60 s with ±50 % jitter, so a fleet does not
//! stampede a gateway that comes back.

pub mod supervisor;
pub mod wg_quick;

use boringtun::noise::{Tunn, TunnResult};
use dashmap::DashMap;
use parking_lot::Mutex;
use std::cell::RefCell;

use crate::packet_path::udp_io::RecvBatch;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::egress::Egress;
use crate::keys::KeyBytes;
use crate::relay::netstack::NetStack;
use crate::relay::stream::Wire;
use crate::relay::stream::{relay, SharedStack};

/// One forwarded port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub port: u16,
    pub target: String,
}

impl std::str::FromStr for Forward {
    type Err = String;
    /// `PORT=HOST:PORT`
    fn from_str(s: &str) -> Result<Self, String> {
        let (port, target) = s
            .split_once('=')
            .ok_or_else(|| format!("--forward {s:?} is not PORT=HOST:PORT"))?;
        let port: u16 = port
            .trim()
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("--forward {s:?}: {port:?} is not a port"))?;
        let target = target.trim();
        if !target
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
        {
            return Err(format!("--forward {s:?}: {target:?} is not HOST:PORT"));
        }
        Ok(Forward {
            port,
            target: target.to_owned(),
        })
    }
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub private_key: KeyBytes,
    pub wg: wg_quick::WgQuick,
    pub forwards: Vec<Forward>,
    pub liveness_interval: Duration,
    /// The agent's own supervisor API (served on tunnel port 48484 unless
    /// a forward takes that port).
    pub supervisor: supervisor::SupervisorConfig,
}

const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A handshake that has not completed by then counts as a failed attempt.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

/// Jittered exponential backoff: 1 s doubling to 60 s, each wait ±50 %.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: BACKOFF_MIN }
    }
}

impl Backoff {
    /// The wait before the next attempt, given a random `u` in [0, 1).
    pub fn next_wait(&mut self, u: f64) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        base.mul_f64(0.5 + u)
    }
    pub fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

fn random_unit() -> f64 {
    let mut b = [0u8; 8];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

enum End {
    Stop,
    Lost(&'static str, bool),
}

/// Runs the agent until `stop` turns true.
pub async fn run(config: AgentConfig, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut backoff = Backoff::default();
    loop {
        match session(&config, &mut stop).await {
            End::Stop => return,
            End::Lost(why, was_up) => {
                if was_up {
                    backoff.reset();
                }
                let wait = backoff.next_wait(random_unit());
                tracing::warn!(reason = why, retry_in = ?wait, "cloudlink lost; dialing again");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

struct AgentEgress {
    tunn: Arc<Mutex<Tunn>>,
    socket: Arc<UdpSocket>,
}

thread_local! {
    static ENCAP: RefCell<Vec<u8>> = RefCell::new(vec![0u8; 65_600]);
}

/// The agent's stacks reach the gateway through its one tunnel; the order
/// is stack, then tunnel (the receive loop releases the tunnel before it
/// feeds a stack).
impl Wire for AgentEgress {
    fn with_egress(&self, f: &mut dyn FnMut(&dyn Egress)) {
        // Each datagram leaves at once. Batching a stack call's output (a
        // per-thread `sendmmsg` flushed under the tunnel lock) was measured
        // and gained nothing here (BENCHMARKS.md, "Relay"); one `send` per
        // datagram keeps the lock order simple: stack, then tunnel.
        f(self)
    }
}

impl Egress for AgentEgress {
    fn send(&self, packet: &[u8]) {
        ENCAP.with(|b| {
            let mut b = b.borrow_mut();
            if let TunnResult::WriteToNetwork(d) = self.tunn.lock().encapsulate(packet, &mut b) {
                let _ = self.socket.try_send(d);
            }
        });
    }
}

async fn session(cfg: &AgentConfig, stop: &mut tokio::sync::watch::Receiver<bool>) -> End {
    let endpoint: SocketAddr = match tokio::net::lookup_host(&cfg.wg.endpoint)
        .await
        .map(|mut a| a.next())
    {
        Ok(Some(a)) => a,
        _ => return End::Lost("the gateway's endpoint does not resolve", false),
    };
    let bind = if endpoint.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket = match UdpSocket::bind(bind).await {
        Ok(s) => s,
        Err(_) => return End::Lost("no UDP socket", false),
    };
    crate::udp_socket::size_socket_buffers(std::os::fd::AsRawFd::as_raw_fd(&socket), 1 << 20);
    if socket.connect(endpoint).await.is_err() {
        return End::Lost("the gateway's endpoint is unreachable", false);
    }
    let socket = Arc::new(socket);
    let mut idx = [0u8; 4];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut idx);
    let tunn = Arc::new(Mutex::new(Tunn::new(
        StaticSecret::from(cfg.private_key),
        PublicKey::from(cfg.wg.peer_public_key),
        None,
        cfg.wg.persistent_keepalive,
        u32::from_le_bytes(idx) >> 8,
        None,
    )));
    let mut out = vec![0u8; 65_600];
    let first = match tunn.lock().format_handshake_initiation(&mut out, false) {
        TunnResult::WriteToNetwork(p) => Some(p.len()),
        _ => None,
    };
    if let Some(n) = first {
        // Awaited, not `try_send`: a socket this new may not be known
        // writable yet, and a dropped first initiation costs the device
        // boringtun's 5 s retry.
        let _ = socket.send(&out[..n]).await;
    }
    let egress: Arc<dyn Wire> = Arc::new(AgentEgress {
        tunn: tunn.clone(),
        socket: socket.clone(),
    });
    let mut batch = RecvBatch::with_slots(RECV_SLOT);
    // Stacks fed segments by the current receive batch, flushed after it.
    let mut fed: Vec<Arc<SharedStack>> = Vec::new();
    let pacer = crate::relay::netstack::new_pacer(Instant::now());
    let conns = Connections {
        address: cfg.wg.address,
        egress: egress.clone(),
        forwards: cfg.forwards.clone(),
        by_port: Arc::new(DashMap::new()),
        // A stack with no socket: smoltcp answers a segment for no stream
        // with RST, so the gateway sees "refused" for a port not forwarded.
        reject: SharedStack::new(
            NetStack::new(cfg.wg.address, Instant::now(), pacer.clone()),
            egress,
        ),
        pacer,
        supervisor: Arc::new(cfg.supervisor.clone()),
    };
    let started = Instant::now();
    let mut last_auth: Option<Instant> = None;
    let mut was_up = false;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut next_ping = Instant::now();
    let mut ping_seq: u16 = 0;
    let end = loop {
        tokio::select! {
            r = socket.readable() => {
                if r.is_err() {
                    continue;
                }
                // Up to a batch of datagrams per wakeup, one `recvmmsg`.
                let fd = std::os::fd::AsRawFd::as_raw_fd(&*socket);
                let n = match socket.try_io(tokio::io::Interest::READABLE, || {
                    batch.recv(fd, libc::MSG_DONTWAIT)
                }) {
                    Ok(n) => n,
                    Err(_) => continue,
                };
                for i in 0..n {
                    let (_, datagram) = batch.get(i);
                    if receive(&tunn, &socket, datagram, &mut out, &conns, &mut fed, cfg) {
                        last_auth = Some(Instant::now());
                    }
                }
                // One ACK per stack for the whole batch.
                for stack in fed.drain(..) {
                    stack.flush();
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let up = {
                    let mut t = tunn.lock();
                    match t.update_timers(&mut out) {
                        TunnResult::WriteToNetwork(p) => { let _ = socket.try_send(p); }
                        TunnResult::Err(boringtun::noise::errors::WireGuardError::ConnectionExpired) => {
                            break End::Lost("the WireGuard session expired", was_up);
                        }
                        _ => {}
                    }
                    t.time_since_last_handshake().is_some()
                };
                if up && !was_up {
                    was_up = true;
                    tracing::info!(gateway = %endpoint, address = %cfg.wg.address, "cloudlink up");
                }
                if !was_up && now.duration_since(started) > HANDSHAKE_DEADLINE {
                    break End::Lost("no handshake answer", false);
                }
                if was_up {
                    let silent = now.duration_since(last_auth.unwrap_or(started));
                    if silent > cfg.liveness_interval * 3 {
                        break End::Lost("the gateway stopped answering", true);
                    }
                    if now >= next_ping {
                        ping_seq = ping_seq.wrapping_add(1);
                        let ping = echo_request(cfg.wg.address, cfg.wg.gateway_address, ping_seq);
                        if let TunnResult::WriteToNetwork(p) = tunn.lock().encapsulate(&ping, &mut out) {
                            let _ = socket.try_send(p);
                        }
                        next_ping = now + cfg.liveness_interval;
                    }
                }
            }
            _ = stop.changed() => break End::Stop,
        }
    };
    conns.kill_all();
    end
}

/// Largest datagram the agent takes from the gateway: a full inner packet
/// (the tunnel's MTU) and WireGuard's 32 bytes, with room to spare.
const RECV_SLOT: usize = 2048;

/// One datagram from the gateway: decrypted in the tunnel; handshake
/// answers and queued packets go out at once, TCP segments for the agent's
/// stacks go to them. True when it authenticated.
fn receive(
    tunn: &Mutex<Tunn>,
    socket: &UdpSocket,
    datagram: &[u8],
    out: &mut [u8],
    conns: &Connections,
    fed: &mut Vec<Arc<SharedStack>>,
    cfg: &AgentConfig,
) -> bool {
    let out_start = out.as_ptr() as usize;
    let mut t = tunn.lock();
    match t.decapsulate(None, datagram, out) {
        TunnResult::WriteToNetwork(p) => {
            let _ = socket.try_send(p);
            while let TunnResult::WriteToNetwork(p) = t.decapsulate(None, &[], out) {
                let _ = socket.try_send(p);
            }
            true
        }
        TunnResult::WriteToTunnelV4(p, src) => {
            // boringtun hands back a sub-slice of `out`.
            let start = p.as_ptr() as usize - out_start;
            let range = start..start + p.len();
            drop(t);
            let packet = &out[range];
            if src == cfg.wg.gateway_address && packet.len() >= 20 && packet[9] == 6 {
                conns.input(packet, fed);
            }
            true
        }
        TunnResult::Done => true,
        _ => false,
    }
}

/// The agent's TCP connections, one small stack each, found by the
/// gateway's port (unique per device on the gateway's side), so a segment
/// costs the same however many connections are open.
struct Connections {
    address: Ipv4Addr,
    egress: Arc<dyn Wire>,
    forwards: Vec<Forward>,
    by_port: Arc<DashMap<u16, Arc<SharedStack>>>,
    reject: Arc<SharedStack>,
    /// Paces all connections towards the gateway together.
    pacer: crate::relay::netstack::SharedPacer,
    supervisor: Arc<supervisor::SupervisorConfig>,
}

/// Where an accepted connection goes.
enum Target {
    Forward(String),
    Supervisor,
}

impl Connections {
    /// A segment from the gateway. One for an open connection is ingested
    /// and its stack noted in `fed`, to be flushed after the receive batch.
    fn input(&self, packet: &[u8], fed: &mut Vec<Arc<SharedStack>>) {
        let ihl = ((packet[0] & 0x0f) as usize) * 4;
        let Some(tcp) = packet.get(ihl..ihl + 14) else {
            return;
        };
        let (src_port, dst_port) = (
            u16::from_be_bytes([tcp[0], tcp[1]]),
            u16::from_be_bytes([tcp[2], tcp[3]]),
        );
        let (syn, ack) = (tcp[13] & 0x02 != 0, tcp[13] & 0x10 != 0);
        if let Some(stack) = self.by_port.get(&src_port).map(|s| s.clone()) {
            stack.ingest(packet);
            return stack.note_fed(fed);
        }
        let target = match self.forwards.iter().find(|f| f.port == dst_port) {
            Some(f) => Some(Target::Forward(f.target.clone())),
            None if dst_port == crate::actions::SUPERVISOR_PORT => Some(Target::Supervisor),
            None => None,
        };
        match target {
            Some(target) if syn && !ack => self.accept(src_port, dst_port, target, packet),
            _ => self.reject.input(packet),
        }
    }

    /// A new connection from the gateway: its own stack, a listening socket
    /// that takes this SYN, and a task relaying it to the local service.
    fn accept(&self, key: u16, port: u16, target: Target, syn: &[u8]) {
        let stack = SharedStack::new(
            NetStack::new(self.address, Instant::now(), self.pacer.clone()),
            self.egress.clone(),
        );
        let Some(h) = stack.with(|s| s.listen(port).ok()) else {
            return;
        };
        stack.open_streams.store(1, Ordering::Release);
        self.by_port.insert(key, stack.clone());
        stack.input(syn);
        let by_port = self.by_port.clone();
        let me = stack.clone();
        tokio::spawn(stack.clone().run_timers(move || {
            by_port.remove_if(&key, |_, s| Arc::ptr_eq(s, &me));
            true
        }));
        let supervisor = self.supervisor.clone();
        tokio::spawn(async move {
            if stack.established(h).await.is_ok() {
                match target {
                    Target::Supervisor => supervisor::serve(stack.clone(), h, supervisor).await,
                    Target::Forward(target) => {
                        match tokio::net::TcpStream::connect(&target).await {
                            Ok(tcp) => {
                                relay(&stack, h, tcp, None, &|_, _| {}).await;
                            }
                            Err(e) => {
                                tracing::warn!(%target, error = %e, "forward target refused");
                                stack.with(|s| s.tcp(h).abort());
                            }
                        }
                    }
                }
            }
            stack.release(h);
            stack.open_streams.fetch_sub(1, Ordering::AcqRel);
        });
    }

    fn kill_all(&self) {
        self.by_port.iter().for_each(|s| s.kill());
        self.by_port.clear();
        self.reject.kill();
    }
}

/// An ICMP echo request from `src` to `dst`.
fn echo_request(src: Ipv4Addr, dst: Ipv4Addr, seq: u16) -> [u8; 36] {
    let mut p = [0u8; 36];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&36u16.to_be_bytes());
    p[8] = 64;
    p[9] = 1;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let c = crate::relay::icmp::checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20] = 8;
    p[24..26].copy_from_slice(&0x636cu16.to_be_bytes());
    p[26..28].copy_from_slice(&seq.to_be_bytes());
    p[28..36].copy_from_slice(b"cloudlnk");
    let c = crate::relay::icmp::checksum(&p[20..]);
    p[22..24].copy_from_slice(&c.to_be_bytes());
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_minute_with_jitter() {
        let mut b = Backoff::default();
        let waits: Vec<Duration> = (0..9).map(|_| b.next_wait(0.5)).collect();
        assert_eq!(waits[0], Duration::from_secs(1));
        assert_eq!(waits[1], Duration::from_secs(2));
        assert_eq!(waits[5], Duration::from_secs(32));
        assert_eq!(waits[6], Duration::from_secs(60));
        assert_eq!(waits[8], Duration::from_secs(60));
        let mut b = Backoff::default();
        assert_eq!(b.next_wait(0.0), Duration::from_millis(500));
        assert_eq!(
            b.next_wait(0.999_999),
            Duration::from_secs(2).mul_f64(1.499_999)
        );
        b.reset();
        assert_eq!(b.next_wait(0.5), Duration::from_secs(1));
    }

    #[test]
    fn forwards_parse() {
        assert_eq!(
            "22222=127.0.0.1:22".parse::<Forward>().unwrap(),
            Forward {
                port: 22222,
                target: "127.0.0.1:22".into()
            }
        );
        assert!("22222".parse::<Forward>().is_err());
        assert!("0=127.0.0.1:22".parse::<Forward>().is_err());
        assert!("22=localhost".parse::<Forward>().is_err());
    }

    #[test]
    fn ping_is_answered_by_the_gateway_code() {
        let req = echo_request(
            "10.240.0.2".parse().unwrap(),
            "10.240.0.1".parse().unwrap(),
            3,
        );
        let mut out = [0u8; 1500];
        assert!(crate::relay::icmp::echo_reply(&req, &mut out).is_some());
    }
}
