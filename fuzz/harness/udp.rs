//! The UDP fuzz target's rig, shared with `tests/fuzz_corpus.rs` (which
//! replays the committed corpus through it): the sans-IO packet path with
//! two registered devices, driven by a small program read from the fuzz
//! input, so that mutations reach every stage (the message-type check,
//! admission, the handshake, transport decryption after a completed
//! handshake, cryptokey routing, the sink, the timers) and not only the
//! first one. Simulated time; the gateway's and devices' keys are fixed.

use boringtun::noise::{Tunn, TunnResult};
use cloudlink::bus::{EventBus, RingBus};
use cloudlink::directory::Directory;
use cloudlink::egress::Egress;
use cloudlink::metrics::{DropReason, Metrics};
use cloudlink::packet_path::{PacketPath, PacketPathConfig, TunnelSink, BUF_SIZE};
use cloudlink::registry::{AddressPlan, NewDevice, Registry};
use cloudlink::session_table::Session;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use x25519_dalek::{PublicKey, StaticSecret};

const GATEWAY_KEY: [u8; 32] = [7; 32];
const DEVICE_KEYS: [[u8; 32]; 2] = [[11; 32], [13; 32]];
const SOURCES: [&str; 4] = [
    "192.0.2.1:5000",
    "192.0.2.2:6000",
    "[2001:db8::1]:7000",
    "198.51.100.9:51820",
];

/// What one run reached, for the corpus replay test.
#[derive(Debug, Default, Clone, Copy)]
pub struct Reached {
    /// Handshakes whose response a device accepted.
    pub handshakes: u64,
    /// Transport packets that decrypted and reached the sink.
    pub delivered: u64,
    /// Transport packets that reached decryption and failed it.
    pub decrypt_failed: u64,
    /// Decrypted packets refused by cryptokey routing.
    pub routing_refused: u64,
}

impl std::ops::AddAssign for Reached {
    fn add_assign(&mut self, o: Reached) {
        self.handshakes += o.handshakes;
        self.delivered += o.delivered;
        self.decrypt_failed += o.decrypt_failed;
        self.routing_refused += o.routing_refused;
    }
}

struct Registered {
    _dir: tempfile::TempDir,
    directory: Arc<Directory>,
    addresses: Vec<Ipv4Addr>,
}

/// The registry is made once per process (SQLite per input would be most
/// of the run time); each input gets a fresh packet path.
fn registered() -> &'static Registered {
    static R: OnceLock<Registered> = OnceLock::new();
    R.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let plan = AddressPlan::new("10.240.0.0/12".parse().unwrap()).unwrap();
        let registry = Arc::new(Registry::open(dir.path(), plan).unwrap());
        let mut addresses = Vec::new();
        for (i, k) in DEVICE_KEYS.iter().enumerate() {
            let public = PublicKey::from(&StaticSecret::from(*k)).to_bytes();
            let d = match registry
                .register(NewDevice {
                    uuid: format!("fuzz-{i}"),
                    public_key: public,
                    name: None,
                })
                .unwrap()
            {
                cloudlink::registry::Registered::Created(d) => d,
                cloudlink::registry::Registered::Existing(d) => d,
                _ => panic!("the fuzz registry is fresh"),
            };
            addresses.push(d.address);
        }
        Registered {
            _dir: dir,
            directory: Arc::new(Directory::load(&registry).unwrap()),
            addresses,
        }
    })
}

#[derive(Default)]
struct CountingSink(AtomicU64);

impl TunnelSink for CountingSink {
    fn deliver(&self, _: &Arc<Session>, packet: &[u8], answer: &dyn Egress) {
        // Echoed, so the send stage runs under the fuzzer too.
        answer.send(packet);
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Reads the fuzz input as a program.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        b
    }
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let total = 20 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total.min(65535) as u16).to_be_bytes());
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20..].copy_from_slice(payload);
    p
}

/// Runs one input. Opcodes (one byte each, then their operands):
/// 0 raw datagram (source, length, bytes); 1 a device's handshake;
/// 2 a device's IP packet to the gateway (protocol, payload); 3 the same,
/// encrypted then corrupted at one position; 4 a device's raw inner packet;
/// 5 time passes and the timers run; 6 a device's packet from a new
/// source (roaming); 7 a device's packet for another device's address.
pub fn run(data: &[u8]) -> Reached {
    let reg = registered();
    let metrics = Arc::new(Metrics::new());
    let events: Arc<dyn EventBus> = Arc::new(RingBus::new("fuzz".into(), "fuzz".into(), 64));
    let path = PacketPath::new(
        StaticSecret::from(GATEWAY_KEY),
        "10.240.0.1".parse().unwrap(),
        reg.directory.clone(),
        events,
        metrics.clone(),
        PacketPathConfig {
            link_timeout: Duration::from_secs(90),
            handshake_rate_limit: 0,
            handshake_queue: 16,
            name_boringtun_warnings: false,
        },
    );
    let sink = Arc::new(CountingSink::default());
    let _ = path.set_sink(sink.clone());
    let gw_public = path.public_key();
    let gw_ip = path.gateway_address();
    let mut devices: Vec<Tunn> = DEVICE_KEYS
        .iter()
        .enumerate()
        .map(|(i, k)| {
            Tunn::new(
                StaticSecret::from(*k),
                gw_public,
                None,
                None,
                i as u32 + 1,
                None,
            )
        })
        .collect();
    let sources: Vec<SocketAddr> = SOURCES.iter().map(|s| s.parse().unwrap()).collect();
    let mut out = vec![0u8; BUF_SIZE];
    let mut dbuf = vec![0u8; BUF_SIZE];
    let mut scratch = Vec::new();
    let mut now = Instant::now();
    let mut reached = Reached::default();
    let mut input = Input(data);

    // Feeds a datagram to the gateway and every answer back to the device.
    #[allow(clippy::too_many_arguments)]
    fn exchange(
        path: &PacketPath,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        dev: Option<&mut Tunn>,
        out: &mut [u8],
        dbuf: &mut [u8],
        reached: &mut Reached,
    ) {
        let mut tx: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
        path.handle_datagram(now, from, datagram, out, &mut tx);
        path.process_handshakes(now, usize::MAX, out, &mut tx);
        let Some(dev) = dev else { return };
        for (_, answer) in tx {
            let mut follow = Vec::new();
            match dev.decapsulate(None, &answer, dbuf) {
                TunnResult::WriteToNetwork(p) => {
                    reached.handshakes += 1;
                    follow.push(p.to_vec());
                    while let TunnResult::WriteToNetwork(p) = dev.decapsulate(None, &[], dbuf) {
                        follow.push(p.to_vec());
                    }
                }
                TunnResult::Done => reached.handshakes += (answer.len() == 92) as u64,
                _ => {}
            }
            for p in follow {
                let mut tx2: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
                path.handle_datagram(now, from, &p, out, &mut tx2);
            }
        }
    }

    let mut steps = 0;
    while let Some(op) = input.byte() {
        steps += 1;
        if steps > 64 {
            break;
        }
        match op % 8 {
            0 => {
                let from = sources[input.byte().unwrap_or(0) as usize % sources.len()];
                let len = input.byte().unwrap_or(0) as usize * 2;
                let d = input.bytes(len).to_vec();
                exchange(
                    &path,
                    now,
                    from,
                    &d,
                    None,
                    &mut out,
                    &mut dbuf,
                    &mut reached,
                );
            }
            1 => {
                let d = input.byte().unwrap_or(0) as usize % devices.len();
                let from = sources[d];
                let init = match devices[d].format_handshake_initiation(&mut dbuf, false) {
                    TunnResult::WriteToNetwork(p) => p.to_vec(),
                    _ => continue,
                };
                exchange(
                    &path,
                    now,
                    from,
                    &init,
                    Some(&mut devices[d]),
                    &mut out,
                    &mut dbuf,
                    &mut reached,
                );
            }
            2..=4 | 6 | 7 => {
                let d = input.byte().unwrap_or(0) as usize % devices.len();
                let arg = input.byte().unwrap_or(0);
                let len = input.byte().unwrap_or(0) as usize;
                let payload = input.bytes(len).to_vec();
                let src = reg.addresses[d];
                let packet = match op % 8 {
                    4 => payload,
                    7 => ipv4(src, reg.addresses[1 - d], arg, &payload),
                    _ => ipv4(src, gw_ip, arg, &payload),
                };
                let mut datagram = match devices[d].encapsulate(&packet, &mut dbuf) {
                    TunnResult::WriteToNetwork(p) => p.to_vec(),
                    _ => continue,
                };
                if op % 8 == 3 && !datagram.is_empty() {
                    let at = input.byte().unwrap_or(0) as usize % datagram.len();
                    datagram[at] ^= input.byte().unwrap_or(1).max(1);
                }
                let from = if op % 8 == 6 {
                    sources[2 + d]
                } else {
                    sources[d]
                };
                exchange(
                    &path,
                    now,
                    from,
                    &datagram,
                    Some(&mut devices[d]),
                    &mut out,
                    &mut dbuf,
                    &mut reached,
                );
            }
            _ => {
                now += Duration::from_secs(input.byte().unwrap_or(1) as u64);
                let mut tx: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
                path.tick(now, &mut out, &mut scratch, &mut tx);
            }
        }
    }
    reached.delivered = sink.0.load(Ordering::Relaxed);
    reached.decrypt_failed = metrics.dropped_count(DropReason::DecryptFailed);
    reached.routing_refused = metrics.dropped_count(DropReason::SpoofedSource)
        + metrics.dropped_count(DropReason::NotForGateway);
    reached
}
