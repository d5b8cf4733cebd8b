//! The transport packet path, per core, against bare boringtun on the same
//! packets, measured in the same run.
//!
//! - bound: a gateway-side `Tunn` decapsulates a device's packet and
//!   encapsulates the answer (the same packet with its addresses swapped);
//! - gateway: the same packets through the gateway's packet path: receive,
//!   find the session by receiver index, decrypt, link state, cryptokey
//!   routing, deliver to the tunnel sink, which answers through the session
//!   (encrypt, hand to the transmit).
//!
//! Then, reported beside it (not criterion): packets per second through the
//! real UDP sockets on loopback, a device pinging the gateway binary's
//! tunnel address with up to 64 echo requests in flight.
//!
//! Run: `cargo bench --bench packet_path` (target: gateway ≥ 90 % of bound).

mod bound;
mod common;

use boringtun::noise::{Tunn, TunnResult};
use bound::*;
use cloudlink::egress::Egress;
use cloudlink::packet_path::TunnelSink;
use cloudlink::session_table::Session;
use criterion::{criterion_group, BenchmarkId, Criterion};
use std::cell::RefCell;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};
use x25519_dalek::{PublicKey, StaticSecret};

/// The Internet checksum of `bytes`.
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4/UDP packet with `payload` bytes.
fn ip_packet(src: Ipv4Addr, dst: Ipv4Addr, payload: usize) -> Vec<u8> {
    let total = 28 + payload;
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20..22].copy_from_slice(&5000u16.to_be_bytes());
    p[22..24].copy_from_slice(&7u16.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
    p
}

/// Swaps source and destination: the answer the bound and the sink send.
fn swap(p: &mut [u8]) {
    let mut a = [0u8; 4];
    a.copy_from_slice(&p[12..16]);
    p.copy_within(16..20, 12);
    p[16..20].copy_from_slice(&a);
}

/// The gateway's tunnel sink for the bench: answers every packet through
/// the device's session, as the relay's ICMP echo does.
struct EchoSink;

thread_local! {
    static REPLY: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(2048));
}

impl TunnelSink for EchoSink {
    fn deliver(&self, _: &Arc<Session>, packet: &[u8], answer: &dyn Egress) {
        REPLY.with(|r| {
            let reply = &mut *r.borrow_mut();
            reply.clear();
            reply.extend_from_slice(packet);
            swap(reply);
            answer.send(reply);
        });
    }
}

/// Runs a handshake between an initiator and a responder `Tunn`.
fn pair(device: &mut Tunn, gw: &mut Tunn) {
    let mut a = vec![0u8; 2048];
    let mut b = vec![0u8; 2048];
    let TunnResult::WriteToNetwork(init) = device.format_handshake_initiation(&mut a, false) else {
        panic!()
    };
    let TunnResult::WriteToNetwork(resp) = gw.decapsulate(None, init, &mut b) else {
        panic!()
    };
    let TunnResult::WriteToNetwork(keepalive) = device.decapsulate(None, resp, &mut a) else {
        panic!()
    };
    assert!(matches!(
        gw.decapsulate(None, keepalive, &mut b),
        TunnResult::Done
    ));
}

fn bench(c: &mut Criterion) {
    let (mut gw, keys) = gateway(1);
    let _ = gw.path.set_sink(Arc::new(EchoSink));
    let gw_public = PublicKey::from(&gw.secret);
    let src: SocketAddr = "192.0.2.1:51820".parse().unwrap();
    let dev_addr = Ipv4Addr::new(10, 240, 0, 2);
    let gw_addr = gw.path.gateway_address();

    // The device of the gateway path, connected through the packet path.
    let mut dev = Tunn::new(StaticSecret::from(keys[0]), gw_public, None, None, 1, None);
    {
        let mut buf = vec![0u8; 2048];
        let mut tx: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
        let TunnResult::WriteToNetwork(init) = dev.format_handshake_initiation(&mut buf, false)
        else {
            panic!()
        };
        let now = Instant::now();
        gw.path
            .handle_datagram(now, src, init, &mut gw.out, &mut tx);
        gw.path.process_handshakes(now, 1, &mut gw.out, &mut tx);
        let TunnResult::WriteToNetwork(ka) = dev.decapsulate(None, &tx[0].1, &mut buf) else {
            panic!()
        };
        let ka = ka.to_vec();
        gw.path.handle_datagram(now, src, &ka, &mut gw.out, &mut tx);
        assert!(
            gw.path
                .sessions
                .by_uuid("bench-0")
                .unwrap()
                .snapshot()
                .connected
        );
    }
    // The bound's pair: a device and a bare gateway-side Tunn.
    let mut dev2 = Tunn::new(StaticSecret::from(keys[0]), gw_public, None, None, 2, None);
    let mut bare = Tunn::new(
        gw.secret.clone(),
        PublicKey::from(&StaticSecret::from(keys[0])),
        None,
        None,
        3,
        None,
    );
    pair(&mut dev2, &mut bare);

    let mut g = c.benchmark_group("packet_path");
    g.measurement_time(Duration::from_secs(6));
    g.sample_size(20);
    for payload in [64usize, 1392] {
        let packet = ip_packet(dev_addr, gw_addr, payload);
        let bytes = packet.len();
        // Encrypts `n` packets with `t` (untimed).
        let encrypt = |t: &mut Tunn, n: usize| -> Vec<Vec<u8>> {
            let mut buf = vec![0u8; 2048];
            (0..n)
                .map(|_| match t.encapsulate(&packet, &mut buf) {
                    TunnResult::WriteToNetwork(p) => p.to_vec(),
                    _ => panic!(),
                })
                .collect()
        };
        g.bench_with_input(
            BenchmarkId::new("bound_boringtun", bytes),
            &bytes,
            |b, _| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    let mut left = iters as usize;
                    let mut out = vec![0u8; 2048];
                    let mut out2 = vec![0u8; 2048];
                    let mut reply = Vec::with_capacity(2048);
                    while left > 0 {
                        let n = left.min(4096);
                        let dgrams = encrypt(&mut dev2, n);
                        let t = Instant::now();
                        for d in &dgrams {
                            match bare.decapsulate(Some(src.ip()), d, &mut out) {
                                TunnResult::WriteToTunnelV4(p, _) => {
                                    reply.clear();
                                    reply.extend_from_slice(p);
                                    swap(&mut reply);
                                    match bare.encapsulate(&reply, &mut out2) {
                                        TunnResult::WriteToNetwork(_) => {}
                                        other => panic!("{other:?}"),
                                    }
                                }
                                other => panic!("{other:?}"),
                            }
                        }
                        total += t.elapsed();
                        left -= n;
                    }
                    record(&format!("bound/{bytes}"), total, iters);
                    total
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("gateway_packet_path", bytes),
            &bytes,
            |b, _| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    let mut left = iters as usize;
                    let mut tx = Count::default();
                    while left > 0 {
                        let n = left.min(4096);
                        let dgrams = encrypt(&mut dev, n);
                        let t = Instant::now();
                        for d in &dgrams {
                            gw.path.handle_datagram(t, src, d, &mut gw.out, &mut tx);
                        }
                        total += t.elapsed();
                        left -= n;
                    }
                    assert_eq!(tx.0, iters, "every packet answered");
                    record(&format!("gateway/{bytes}"), total, iters);
                    total
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench);

/// Echo requests through the gateway binary over real loopback sockets.
fn loopback_pps() -> Option<(f64, u64)> {
    let rt = tokio::runtime::Runtime::new().ok()?;
    rt.block_on(async {
        let gw = common::GatewayProc::start(&[]).await;
        let key = cloudlink::keys::generate_private_key();
        let body = format!(
            "{{\"uuid\":\"pps-1\",\"public_key\":\"{}\"}}",
            cloudlink::keys::encode_key(&cloudlink::keys::public_key(&key))
        );
        let reg: serde_json::Value = serde_json::from_str(
            &common::http(&gw.api, "POST", "/v1/devices", &body)
                .await
                .ok()?,
        )
        .ok()?;
        let gw_key = cloudlink::keys::decode_key(reg["gateway"]["public_key"].as_str()?).ok()?;
        let dev_addr: Ipv4Addr = reg["address"].as_str()?.parse().ok()?;
        let gw_addr: Ipv4Addr = reg["gateway"]["address"].as_str()?.parse().ok()?;
        let udp: SocketAddr = gw.udp.parse().ok()?;
        tokio::task::spawn_blocking(move || {
            let sock = UdpSocket::bind("127.0.0.1:0").ok()?;
            sock.set_read_timeout(Some(Duration::from_millis(200)))
                .ok()?;
            let mut dev = Tunn::new(
                StaticSecret::from(key),
                PublicKey::from(gw_key),
                None,
                None,
                9,
                None,
            );
            let mut buf = vec![0u8; 4096];
            let mut rbuf = vec![0u8; 4096];
            let TunnResult::WriteToNetwork(init) = dev.format_handshake_initiation(&mut buf, false)
            else {
                return None;
            };
            sock.send_to(init, udp).ok()?;
            let n = sock.recv(&mut rbuf).ok()?;
            if let TunnResult::WriteToNetwork(ka) = dev.decapsulate(None, &rbuf[..n], &mut buf) {
                sock.send_to(ka, udp).ok()?;
            }
            // ICMP echo request, 56 bytes of payload (as `ping`).
            let mut icmp = vec![0u8; 84];
            icmp[0] = 0x45;
            icmp[2..4].copy_from_slice(&84u16.to_be_bytes());
            icmp[8] = 64;
            icmp[9] = 1;
            icmp[12..16].copy_from_slice(&dev_addr.octets());
            icmp[16..20].copy_from_slice(&gw_addr.octets());
            let c = checksum(&icmp[..20]);
            icmp[10..12].copy_from_slice(&c.to_be_bytes());
            icmp[20] = 8;
            let c = checksum(&icmp[20..84]);
            icmp[22..24].copy_from_slice(&c.to_be_bytes());
            let (mut sent, mut got) = (0u64, 0u64);
            let start = Instant::now();
            let window = 64;
            while start.elapsed() < Duration::from_secs(3) {
                while sent - got < window {
                    if let TunnResult::WriteToNetwork(p) = dev.encapsulate(&icmp, &mut buf) {
                        sock.send_to(p, udp).ok()?;
                    }
                    sent += 1;
                }
                match sock.recv(&mut rbuf) {
                    Ok(n) => {
                        if let TunnResult::WriteToTunnelV4(..) =
                            dev.decapsulate(None, &rbuf[..n], &mut buf)
                        {
                            got += 1;
                        }
                    }
                    // Lost: let the window move on.
                    Err(_) => got = sent,
                }
            }
            Some((got as f64 / start.elapsed().as_secs_f64(), got))
        })
        .await
        .ok()?
    })
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    for bytes in [92, 1420] {
        report_ratio(
            &format!("packet path ({bytes}-byte inner packets, decrypt + route + deliver + encrypt the answer)"),
            &format!("gateway/{bytes}"),
            &format!("bound/{bytes}"),
            0.90,
        );
    }
    if std::env::args().any(|a| a == "--bench") {
        match loopback_pps() {
            Some((pps, n)) => println!(
                "real UDP sockets on loopback: {pps:.0} echo round trips/s ({n} answered; device and gateway binary share the 2 cores, 64 in flight)"
            ),
            None => println!("real UDP sockets on loopback: not measured (the gateway binary did not answer)"),
        }
    }
}
