//! The responder handshake path, per core, against the bound of its
//! cryptography measured in the same run.
//!
//! - bound: the boringtun calls a first contact needs, timed bare:
//!   `parse_handshake_anon`, `Tunn::new`, and `decapsulate` of the
//!   initiation (which writes the response);
//! - gateway: the same initiation through the gateway's packet path:
//!   receive, admission (mac1, load decision, queue), the registry lookup,
//!   session creation, the response handed to the transmit.
//!
//! Each iteration is a first contact from a registered device (sessions are
//! removed between rounds, untimed). Run: `cargo bench --bench
//! handshake_path`; the last line prints the ratio (target ≥ 90 %).

mod bound;

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use bound::*;
use criterion::{criterion_group, Criterion};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use x25519_dalek::{PublicKey, StaticSecret};

const DEVICES: usize = 2_000;

/// Fresh initiations from every device to `gateway_public`.
fn initiations(keys: &[[u8; 32]], gateway_public: PublicKey) -> Vec<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    keys.iter()
        .enumerate()
        .map(|(i, k)| {
            let mut t = Tunn::new(
                StaticSecret::from(*k),
                gateway_public,
                None,
                None,
                i as u32,
                None,
            );
            match t.format_handshake_initiation(&mut buf, false) {
                TunnResult::WriteToNetwork(p) => p.to_vec(),
                _ => panic!("no initiation"),
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let (mut gw, keys) = gateway(DEVICES);
    let gw_public = PublicKey::from(&gw.secret);
    let src: SocketAddr = "192.0.2.1:51820".parse().unwrap();
    let mut g = c.benchmark_group("handshake_path");
    g.measurement_time(Duration::from_secs(8));
    g.sample_size(20);

    g.bench_function("bound_boringtun", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters as usize;
            let mut out = vec![0u8; 256];
            while left > 0 {
                let n = left.min(DEVICES);
                let inits = initiations(&keys[..n], gw_public);
                let t = Instant::now();
                for (i, init) in inits.iter().enumerate() {
                    let Ok(Packet::HandshakeInit(p)) = Tunn::parse_incoming_packet(init) else {
                        panic!()
                    };
                    let half = parse_handshake_anon(&gw.secret, &gw_public, &p).unwrap();
                    let mut tunn = Tunn::new(
                        gw.secret.clone(),
                        PublicKey::from(half.peer_static_public),
                        None,
                        None,
                        i as u32,
                        None,
                    );
                    match tunn.decapsulate(Some(src.ip()), init, &mut out) {
                        TunnResult::WriteToNetwork(r) => assert_eq!(r.len(), 92),
                        other => panic!("{other:?}"),
                    }
                }
                total += t.elapsed();
                left -= n;
            }
            record("bound", total, iters);
            total
        })
    });

    g.bench_function("gateway_packet_path", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters as usize;
            let mut tx = Count::default();
            while left > 0 {
                let n = left.min(DEVICES);
                let inits = initiations(&keys[..n], gw_public);
                // Every iteration is a first contact: no session yet.
                let mut all = Vec::new();
                gw.path.sessions.collect_into(&mut all);
                for s in all {
                    gw.path.sessions.remove(&s);
                }
                let before = tx.0;
                let t = Instant::now();
                for init in &inits {
                    gw.path.handle_datagram(t, src, init, &mut gw.out, &mut tx);
                    gw.path.process_handshakes(t, 1, &mut gw.out, &mut tx);
                }
                total += t.elapsed();
                assert_eq!(tx.0 - before, n as u64, "one response per initiation");
                left -= n;
            }
            record("gateway", total, iters);
            total
        })
    });
    g.finish();
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    report_ratio(
        "handshake path (responder, first contact)",
        "gateway",
        "bound",
        0.90,
    );
}
