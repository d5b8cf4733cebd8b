//! What the criterion benchmarks share: a sans-IO gateway (the real
//! `PacketPath` with a registry, no sockets), and the ratio report that
//! compares the gateway's path with the bare boringtun calls measured in
//! the same run.
#![allow(dead_code)]

use cloudlink::bus::{EventBus, RingBus};
use cloudlink::directory::Directory;
use cloudlink::keys::{generate_private_key, public_key};
use cloudlink::metrics::Metrics;
use cloudlink::packet_path::{PacketPath, PacketPathConfig, Transmit, BUF_SIZE};
use cloudlink::registry::{AddressPlan, NewDevice, Registry};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use x25519_dalek::StaticSecret;

pub struct Gw {
    pub path: Arc<PacketPath>,
    pub registry: Arc<Registry>,
    pub out: Vec<u8>,
    pub secret: StaticSecret,
    _dir: tempfile::TempDir,
}

/// A gateway with `devices` registered; returns it and their private keys.
pub fn gateway(devices: usize) -> (Gw, Vec<[u8; 32]>) {
    let dir = tempfile::tempdir().unwrap();
    let plan = AddressPlan::new("10.240.0.0/12".parse().unwrap()).unwrap();
    let registry = Arc::new(Registry::open(dir.path(), plan).unwrap());
    let events: Arc<dyn EventBus> = Arc::new(RingBus::new("bench".into(), "gw".into(), 100_000));
    let metrics = Arc::new(Metrics::new());
    let secret = StaticSecret::from(generate_private_key());
    let directory = Arc::new(Directory::default());
    let path = Arc::new(PacketPath::new(
        secret.clone(),
        plan.gateway(),
        directory.clone(),
        events,
        metrics,
        PacketPathConfig {
            link_timeout: Duration::from_secs(3600),
            handshake_rate_limit: 0,
            handshake_queue: 1 << 20,
            name_boringtun_warnings: false,
        },
    ));
    let keys: Vec<[u8; 32]> = (0..devices).map(|_| generate_private_key()).collect();
    for (n, chunk) in keys.chunks(10_000).enumerate() {
        registry
            .register_batch(
                chunk
                    .iter()
                    .enumerate()
                    .map(|(i, k)| NewDevice {
                        uuid: format!("bench-{}", n * 10_000 + i),
                        public_key: public_key(k),
                        name: None,
                    })
                    .collect(),
            )
            .unwrap();
    }
    // As the gateway fills it at start.
    directory.reload(&registry).unwrap();
    (
        Gw {
            path,
            registry,
            out: vec![0; BUF_SIZE],
            secret,
            _dir: dir,
        },
        keys,
    )
}

/// A transmit that only counts (the sockets are not what is measured).
#[derive(Default)]
pub struct Count(pub u64);
impl Transmit for Count {
    fn send(&mut self, _: SocketAddr, _: &[u8]) {
        self.0 += 1;
    }
}

/// Mean time per iteration of each measured function, kept across
/// criterion's samples so the bench can print ratios at the end.
static MEANS: Mutex<BTreeMap<String, (Duration, u64)>> = Mutex::new(BTreeMap::new());

pub fn record(name: &str, total: Duration, iters: u64) {
    let mut m = MEANS.lock();
    let e = m.entry(name.to_string()).or_default();
    e.0 += total;
    e.1 += iters;
}

pub fn mean_ns(name: &str) -> Option<f64> {
    let m = MEANS.lock();
    let (d, n) = m.get(name)?;
    (*n > 0).then(|| d.as_nanos() as f64 / *n as f64)
}

/// Prints the gateway's rate as a share of the bound's, against a target.
pub fn report_ratio(what: &str, gateway: &str, bound: &str, target: f64) {
    let (Some(g), Some(b)) = (mean_ns(gateway), mean_ns(bound)) else {
        println!("{what}: not measured (filtered out?)");
        return;
    };
    let ratio = b / g;
    println!(
        "{what}: gateway {:.2} µs, bound {:.2} µs per operation; gateway at {:.0} % of the bound ({:.0}/s vs {:.0}/s per core), target ≥ {:.0} %: {}",
        g / 1000.0,
        b / 1000.0,
        ratio * 100.0,
        1e9 / g,
        1e9 / b,
        target * 100.0,
        if ratio >= target { "met" } else { "MISSED" }
    );
}
