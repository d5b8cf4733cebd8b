//! Immediate actions under load: 100 agents, 1,000 actions a second in all
//! for 10 s (target: p99 under 50 ms), then a burst of 1,000 at once,
//! reporting p50 / p99 and the time until the last answer.
//!
//! Run: `cargo bench --bench actions_load`. The gateway and the 100 agents
//! are the real binary; each agent forwards port 48484 to a stand-in
//! supervisor in this process that answers `202` at once. The load is
//! bounded in count and time.

mod common;

use common::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const AGENTS: usize = 100;
const RATE: u64 = 1_000;
const SECONDS: u64 = 10;
const BURST: usize = 1_000;
const P99_TARGET_MS: f64 = 50.0;

async fn supervisor() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                loop {
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                    if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| {
                                l.strip_prefix("content-length:")
                                    .and_then(|v| v.trim().parse().ok())
                            })
                            .unwrap_or(0);
                        if got.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                let body = r#"{"Data":"OK","Error":null}"#;
                let _ = s
                    .write_all(format!("HTTP/1.1 202 Accepted\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes())
                    .await;
            });
        }
    });
    a
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn one(client: &reqwest::Client, api: &str, i: usize) -> (f64, u16) {
    let t = Instant::now();
    let r = client
        .post(format!(
            "http://{api}/v1/devices/dev-{:03}/actions/reboot",
            i % AGENTS
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    let _ = r.bytes().await;
    (t.elapsed().as_secs_f64() * 1000.0, st)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let sup = supervisor().await;
        let gw = GatewayProc::start(&["--action-timeout", "10s"]).await;
        let mut agents = Vec::new();
        for i in 0..AGENTS {
            agents.push(gw.agent(&format!("dev-{i:03}"), &[format!("48484={sup}")]).await);
        }
        for i in 0..AGENTS {
            gw.wait_connected(&format!("dev-{i:03}")).await;
        }
        let client = reqwest::Client::builder().pool_max_idle_per_host(256).build().unwrap();
        // Warm-up: one action per device.
        for i in 0..AGENTS {
            assert_eq!(one(&client, &gw.api, i).await.1, 202);
        }

        // Sustained: one action every millisecond, spread over the devices.
        let total = (RATE * SECONDS) as usize;
        let start = Instant::now();
        let mut handles = Vec::with_capacity(total);
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        for i in 0..total {
            tick.tick().await;
            let (c, api) = (client.clone(), gw.api.clone());
            handles.push(tokio::spawn(async move { one(&c, &api, i).await }));
        }
        let mut lat = Vec::with_capacity(total);
        let mut failed = 0;
        for h in handles {
            let (ms, st) = h.await.unwrap();
            if st != 202 {
                failed += 1;
            }
            lat.push(ms);
        }
        let sustained_s = start.elapsed().as_secs_f64();
        lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));

        // Burst: 1,000 at once.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let start = Instant::now();
        let handles: Vec<_> = (0..BURST)
            .map(|i| {
                let (c, api) = (client.clone(), gw.api.clone());
                tokio::spawn(async move { one(&c, &api, i).await })
            })
            .collect();
        let mut blat = Vec::with_capacity(BURST);
        let mut bfailed = 0;
        for h in handles {
            let (ms, st) = h.await.unwrap();
            if st != 202 {
                bfailed += 1;
            }
            blat.push(ms);
        }
        let last = start.elapsed().as_secs_f64() * 1000.0;
        blat.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!("actions_load: {AGENTS} agents, reboot actions answered 202 by a stand-in supervisor");
        println!(
            "  sustained {RATE}/s for {SECONDS} s ({total} actions in {sustained_s:.1} s, {failed} not 202): p50 {p50:.1} ms, p99 {p99:.1} ms; p99 target {P99_TARGET_MS} ms, ratio {:.2}",
            p99 / P99_TARGET_MS
        );
        println!(
            "  burst of {BURST} at once ({bfailed} not 202): p50 {:.1} ms, p99 {:.1} ms, last answer after {last:.0} ms",
            percentile(&blat, 0.5),
            percentile(&blat, 0.99)
        );
        println!(
            "{{\"sustained_p50_ms\":{p50:.1},\"sustained_p99_ms\":{p99:.1},\"sustained_failed\":{failed},\"burst_p50_ms\":{:.1},\"burst_p99_ms\":{:.1},\"burst_last_ms\":{last:.0},\"burst_failed\":{bfailed}}}",
            percentile(&blat, 0.5),
            percentile(&blat, 0.99)
        );
        drop(agents);
    });
}
