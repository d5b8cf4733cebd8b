//! Relay throughput: bytes per second through one relayed stream in each
//! direction and through 100 concurrent streams, gateway and agent on
//! loopback, beside plain loopback TCP measured in the same run.
//!
//! Run: `cargo bench --bench relay_throughput` (release; `SINGLE_ONLY=1`
//! measures one stream each way only, `SINGLE_ONLY=up` or `down` one way). The gateway and
//! the agent are the real binary; the client, the sink and the source are
//! in this process. Each figure moves a fixed number of bytes and is
//! bounded in time.

mod common;

use common::*;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SINGLE: usize = 256 << 20;
const PER_STREAM: usize = 4 << 20;
const STREAMS: usize = 100;
/// Devices the 100 streams are spread over.
const DEVICES: usize = 10;
/// Issue 16's targets: one stream each way, and 100 streams in all.
const TARGET_MBIT: f64 = 1000.0;
const TARGET_100_MBIT: f64 = 1500.0;
const LIMIT: Duration = Duration::from_secs(120);

/// Accepts connections; reads each to EOF, then answers "ok".
async fn sink() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 << 10];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                let _ = s.write_all(b"ok").await;
            });
        }
    });
    a
}

/// Accepts connections; reads an 8-byte length, writes that many bytes, closes.
async fn source() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut len = [0u8; 8];
                if s.read_exact(&mut len).await.is_err() {
                    return;
                }
                let mut left = u64::from_le_bytes(len) as usize;
                let buf = vec![0x5au8; 256 << 10];
                while left > 0 {
                    let n = left.min(buf.len());
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                    left -= n;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    a
}

async fn open(proxy: Option<SocketAddr>, direct: SocketAddr, target: &str) -> TcpStream {
    match proxy {
        None => TcpStream::connect(direct).await.unwrap(),
        Some(p) => connect(p, target).await,
    }
}

async fn upload(proxy: Option<SocketAddr>, sink: SocketAddr, bytes: usize, device: String) {
    let mut s = open(proxy, sink, &format!("{device}:7001")).await;
    let _ = s.set_nodelay(true);
    let buf = vec![0xa5u8; 256 << 10];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len());
        s.write_all(&buf[..n]).await.unwrap();
        left -= n;
    }
    s.shutdown().await.unwrap();
    let mut ok = Vec::new();
    s.read_to_end(&mut ok).await.unwrap();
    assert_eq!(ok, b"ok");
}

async fn download(proxy: Option<SocketAddr>, source: SocketAddr, bytes: usize, device: String) {
    let mut s = open(proxy, source, &format!("{device}:7002")).await;
    s.write_all(&(bytes as u64).to_le_bytes()).await.unwrap();
    let mut buf = vec![0u8; 256 << 10];
    let mut got = 0usize;
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got += n;
    }
    assert_eq!(got, bytes);
}

async fn measure<F: std::future::Future<Output = ()>>(bytes: usize, f: F) -> f64 {
    let t = Instant::now();
    tokio::time::timeout(LIMIT, f)
        .await
        .expect("bounded in time");
    bytes as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e6
}

/// The device stream `k` of the 100 goes to: ten streams to each of ten.
fn device(k: usize) -> String {
    match k % DEVICES {
        0 => "bench-dev".into(),
        d => format!("bench-dev-{d}"),
    }
}

async fn run_set(proxy: Option<SocketAddr>, sink: SocketAddr, source: SocketAddr) -> [f64; 4] {
    let only = std::env::var("SINGLE_ONLY").unwrap_or_default();
    let up1 = if only != "down" {
        measure(SINGLE, upload(proxy, sink, SINGLE, "bench-dev".into())).await
    } else {
        f64::NAN
    };
    let down1 = if only != "up" {
        measure(SINGLE, download(proxy, source, SINGLE, "bench-dev".into())).await
    } else {
        f64::NAN
    };
    if !only.is_empty() {
        // For profiling one stream: the 100-stream sets are skipped.
        return [up1, down1, f64::NAN, f64::NAN];
    }
    let total = PER_STREAM * STREAMS;
    let upn = measure(total, async {
        let hs: Vec<_> = (0..STREAMS)
            .map(|k| tokio::spawn(upload(proxy, sink, PER_STREAM, device(k))))
            .collect();
        for h in hs {
            h.await.unwrap();
        }
    })
    .await;
    let downn = measure(total, async {
        let hs: Vec<_> = (0..STREAMS)
            .map(|k| tokio::spawn(download(proxy, source, PER_STREAM, device(k))))
            .collect();
        for h in hs {
            h.await.unwrap();
        }
    })
    .await;
    [up1, down1, upn, downn]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let sink = sink().await;
        let source = source().await;
        let fleet = Fleet::start(
            "bench-dev",
            &[format!("7001={sink}"), format!("7002={source}")],
            "7001,7002",
        )
        .await;
        // Nine more devices, each its own agent (process) with the same
        // forwards: the 100 streams go ten to each.
        let mut agents = Vec::new();
        for d in 1..DEVICES {
            let uuid = format!("bench-dev-{d}");
            agents.push(
                fleet
                    .gw
                    .agent(&uuid, &[format!("7001={sink}"), format!("7002={source}")])
                    .await,
            );
            fleet.gw.wait_connected(&uuid).await;
        }
        let proxy = fleet.proxy;
        let plain = run_set(None, sink, source).await;
        let relay = run_set(Some(proxy), sink, source).await;
        let names = [
            "one stream, client to device",
            "one stream, device to client",
            "100 streams to 10 devices, up",
            "100 streams to 10 devices, down",
        ];
        println!("relay_throughput (Mbit/s; gateway and agent on loopback; plain loopback TCP beside)");
        for i in 0..4 {
            println!(
                "  {:<32} relay {:>8.0}   plain {:>8.0}   ratio {:.3}",
                names[i],
                relay[i],
                plain[i],
                relay[i] / plain[i]
            );
        }
        println!(
            "  single-stream target {TARGET_MBIT} Mbit/s: client to device {:.2}x, device to client {:.2}x",
            relay[0] / TARGET_MBIT,
            relay[1] / TARGET_MBIT
        );
        println!(
            "  100-stream target {TARGET_100_MBIT} Mbit/s in all: up {:.2}x, down {:.2}x",
            relay[2] / TARGET_100_MBIT,
            relay[3] / TARGET_100_MBIT
        );
        println!(
            "{{\"relay_up_mbit\":{:.0},\"relay_down_mbit\":{:.0},\"relay_up_100_mbit\":{:.0},\"relay_down_100_mbit\":{:.0},\"plain_up_mbit\":{:.0},\"plain_down_mbit\":{:.0},\"plain_up_100_mbit\":{:.0},\"plain_down_100_mbit\":{:.0}}}",
            relay[0], relay[1], relay[2], relay[3], plain[0], plain[1], plain[2], plain[3]
        );
    });
}
