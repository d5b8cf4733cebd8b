//! Memory of idle relay streams: the gateway's RSS growth per open, idle
//! stream (limit 64 KiB), for streams that carried a little data (an
//! interactive session) and streams that carried a bulk transfer before
//! going idle.
//!
//! Run: `cargo bench --bench relay_idle_memory`. The gateway and the agent
//! are the real binary; streams go through the CONNECT proxy to an echo
//! service behind the agent.

mod common;

use common::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const STREAMS: usize = 200;
const LIMIT: f64 = 64.0 * 1024.0;

async fn echo() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    a
}

/// Sends `bytes` and reads them back.
async fn exchange(s: &mut TcpStream, bytes: usize) {
    let buf = vec![7u8; 64 << 10];
    let mut back = vec![0u8; 64 << 10];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len());
        s.write_all(&buf[..n]).await.unwrap();
        s.read_exact(&mut back[..n]).await.unwrap();
        left -= n;
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let echo = echo().await;
        let mut results = Vec::new();
        for (label, bytes) in [
            ("after 4 KiB (interactive)", 4 << 10),
            ("after 2 MiB (bulk, then idle)", 2 << 20),
        ] {
            // A fresh gateway per case: memory freed by one case's streams
            // would otherwise be reused by the next and hide its cost.
            let fleet = Fleet::start("idle-dev", &[format!("7001={echo}")], "7001").await;
            let gw = &fleet.gw.proc;
            let proxy = fleet.proxy;
            // Warm up allocator and code paths with one stream.
            let mut w = connect(proxy, "idle-dev:7001").await;
            exchange(&mut w, 1 << 20).await;
            drop(w);
            tokio::time::sleep(Duration::from_secs(1)).await;
            let before = rss(gw.0.id());
            let mut streams = Vec::new();
            for _ in 0..STREAMS {
                let mut s = connect(proxy, "idle-dev:7001").await;
                exchange(&mut s, bytes).await;
                streams.push(s);
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            let after = rss(gw.0.id());
            let per = (after as f64 - before as f64) / STREAMS as f64;
            drop(streams);
            tokio::time::sleep(Duration::from_secs(3)).await;
            let closed = rss(gw.0.id());
            let retained = (closed as f64 - before as f64) / STREAMS as f64;
            results.push((label, per, retained));
            drop(fleet);
        }
        println!("relay_idle_memory: gateway RSS growth per open, idle stream ({STREAMS} streams)");
        for (label, per, retained) in &results {
            println!(
                "  {label:<32} {:>8.1} KiB; limit 64 KiB, ratio {:.2} (still resident after the streams closed: {:.1} KiB per stream)",
                per / 1024.0,
                per / LIMIT,
                retained / 1024.0
            );
        }
        println!(
            "{{\"idle_interactive_bytes\":{:.0},\"idle_after_bulk_bytes\":{:.0}}}",
            results[0].1, results[1].1
        );
    });
}
