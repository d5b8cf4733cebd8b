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
//! removed between rounds, untimed).
//!
//! Rekeys of connected devices whose initiators draw a random sender index
//! (kernel, wireguard-go), against the bound of a responder's
//! cryptography, three variable-base X25519 (es, ee, se; ss is the
//! tunnel's, computed once) and one fixed-base (the ephemeral key):
//! - `gateway_rekey_random_index`: each rekey from the device's endpoint;
//! - `gateway_rekey_random_index_moved`: each from a new endpoint, so the
//!   key must be learned first (one more X25519: what every random-index
//!   rekey cost before the endpoint lookup).
//!
//! Run: `cargo bench --bench handshake_path`; the last lines print the
//! ratios (targets: first contact ≥ 90 % of boringtun's calls, rekeys
//! ≥ 85 % of the X25519 bound).

mod bound;

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use bound::*;
use cloudlink::keys::generate_private_key;
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
                for (i, init) in inits.iter().enumerate() {
                    // Each device from its own endpoint, as in a fleet (all
                    // from one would make each first contact try the
                    // previous device's tunnel, the only one there: one
                    // more DH a fleet does not pay).
                    let src = SocketAddr::new(src.ip(), 1024 + i as u16);
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

fn rekeys(c: &mut Criterion) {
    let (mut gw, keys) = gateway(DEVICES);
    let gw_public = PublicKey::from(&gw.secret);
    let endpoint = |i: usize| {
        SocketAddr::from((
            [198, 18, (i >> 8) as u8, i as u8],
            40_000 + (i % 1000) as u16,
        ))
    };
    let mut tx = Count::default();
    // Connect every device from its own endpoint (untimed).
    let now = Instant::now();
    for (i, init) in initiations(&keys, gw_public).iter().enumerate() {
        gw.path
            .handle_datagram(now, endpoint(i), init, &mut gw.out, &mut tx);
        gw.path.process_handshakes(now, 1, &mut gw.out, &mut tx);
    }
    assert_eq!(tx.0, DEVICES as u64, "every device connected");
    // Initiations as a kernel peer sends them: a new random index each.
    let mut next_index = 1u32;
    let mut random_index_initiations = |n: usize| -> Vec<Vec<u8>> {
        let mut buf = vec![0u8; 256];
        keys[..n]
            .iter()
            .map(|k| {
                next_index = next_index
                    .wrapping_mul(747_796_405)
                    .wrapping_add(2_891_336_453);
                let mut t = Tunn::new(
                    StaticSecret::from(*k),
                    gw_public,
                    None,
                    None,
                    next_index >> 8,
                    None,
                );
                match t.format_handshake_initiation(&mut buf, false) {
                    TunnResult::WriteToNetwork(p) => p.to_vec(),
                    _ => panic!("no initiation"),
                }
            })
            .collect()
    };
    let mut g = c.benchmark_group("handshake_rekey");
    g.measurement_time(Duration::from_secs(8));
    g.sample_size(20);

    let secret = StaticSecret::from(generate_private_key());
    let peers: Vec<PublicKey> = keys[..64]
        .iter()
        .map(|k| PublicKey::from(&StaticSecret::from(*k)))
        .collect();
    g.bench_function("bound_x25519_3_variable_1_fixed", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for i in 0..iters as usize {
                let p = &peers[i % peers.len()];
                std::hint::black_box(secret.diffie_hellman(p));
                std::hint::black_box(secret.diffie_hellman(p));
                std::hint::black_box(secret.diffie_hellman(p));
                std::hint::black_box(PublicKey::from(&secret));
            }
            let total = t.elapsed();
            record("bound_rekey", total, iters);
            total
        })
    });

    for (name, moved) in [
        ("gateway_rekey_random_index", false),
        ("gateway_rekey_random_index_moved", true),
    ] {
        let mut round = 0u16;
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters as usize;
                while left > 0 {
                    let n = left.min(DEVICES);
                    let inits = random_index_initiations(n);
                    round = round.wrapping_add(1);
                    let before = tx.0;
                    let t = Instant::now();
                    for (i, init) in inits.iter().enumerate() {
                        let mut src = endpoint(i);
                        if moved {
                            // A new port each round: never the session's
                            // endpoint.
                            src.set_port(10_000 + round % 20_000);
                        }
                        gw.path.handle_datagram(t, src, init, &mut gw.out, &mut tx);
                        gw.path.process_handshakes(t, 1, &mut gw.out, &mut tx);
                    }
                    total += t.elapsed();
                    assert_eq!(tx.0 - before, n as u64, "one response per rekey");
                    left -= n;
                }
                record(name, total, iters);
                total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench, rekeys);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    report_ratio(
        "handshake path (responder, first contact)",
        "gateway",
        "bound",
        0.90,
    );
    report_ratio(
        "rekey with a random index, from the device's endpoint",
        "gateway_rekey_random_index",
        "bound_rekey",
        0.85,
    );
    report_ratio(
        "rekey with a random index, from a new endpoint (learns the key)",
        "gateway_rekey_random_index_moved",
        "bound_rekey",
        0.85,
    );
}
