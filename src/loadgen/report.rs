//! The load generator's result: one JSON object, printed at the end.

use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{LoadgenConfig, Shared};

#[derive(Debug, Serialize)]
pub struct Report {
    pub devices: usize,
    pub connected: u64,
    /// Seconds from the first initiation until every device was connected
    /// (`null` if that never happened within the run).
    pub all_connected_s: Option<f64>,
    /// Completed handshakes over the time it took to connect the fleet (or
    /// the whole run when not all connected).
    pub handshakes_per_s: f64,
    pub handshake_p50_ms: Option<f64>,
    pub handshake_p99_ms: Option<f64>,
    pub failures: BTreeMap<&'static str, u64>,
    pub gateway_rss_bytes: Option<u64>,
    /// Beyond the contract: what the fleet scripts compute figures from.
    pub handshakes: u64,
    pub initiations_sent: u64,
    pub cookie_replies: u64,
    pub reconnects: u64,
    pub duration_s: f64,
    /// Gateway CPU seconds (user + system) over the whole run.
    pub gateway_cpu_s: Option<f64>,
    /// Gateway CPU while every device was connected, in percent of one core.
    pub gateway_idle_cpu_pct: Option<f64>,
    /// Gateway RSS once the fleet was registered, before any handshake.
    pub gateway_rss_registered_bytes: Option<u64>,
    /// When the gateway process went away (seconds into the run).
    pub restart_at_s: Option<f64>,
    pub connected_at_restart: Option<u64>,
    /// Seconds from the restart until as many devices were back.
    pub all_back_s: Option<f64>,
    pub back: Option<u64>,
    /// Handshakes the gateway initiated that the devices answered.
    pub redials_answered: u64,
    /// Gateway CPU seconds from the first initiation until all connected.
    pub gateway_cpu_connect_s: Option<f64>,
}

/// User + system CPU seconds of process `pid` (from `/proc/<pid>/stat`).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / hz)
}

/// Resident set size of process `pid`, bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn percentile(sorted: &[u32], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Some(sorted[i] as f64 / 1000.0)
}

pub(super) fn build(
    cfg: &LoadgenConfig,
    shared: &Shared,
    elapsed: f64,
    all_connected: Option<f64>,
    cpu_start: Option<f64>,
    idle_from: Option<(Instant, f64)>,
) -> Report {
    let mut lat = std::mem::take(&mut *shared.latencies_us.lock());
    lat.sort_unstable();
    let connected = shared.connected.load(Ordering::Relaxed);
    let handshakes = shared.handshakes.load(Ordering::Relaxed);
    let window = all_connected.unwrap_or(elapsed).max(1e-3);
    let mut failures = BTreeMap::new();
    let not_connected = cfg.devices as u64 - connected.min(cfg.devices as u64);
    for (k, v) in [
        ("not_connected", not_connected),
        ("send_error", shared.send_errors.load(Ordering::Relaxed)),
        (
            "decrypt_error",
            shared.decrypt_errors.load(Ordering::Relaxed),
        ),
    ] {
        if v > 0 {
            failures.insert(k, v);
        }
    }
    let pid = cfg.gateway_pid;
    let cpu_end = pid.and_then(cpu_seconds);
    let idle = match (idle_from, cpu_end) {
        (Some((t, c0)), Some(c1)) if t.elapsed().as_secs_f64() >= 1.0 => {
            Some((c1 - c0) / t.elapsed().as_secs_f64() * 100.0)
        }
        _ => None,
    };
    Report {
        devices: cfg.devices,
        connected,
        all_connected_s: all_connected,
        handshakes_per_s: lat.len() as f64 / window,
        handshake_p50_ms: percentile(&lat, 0.5),
        handshake_p99_ms: percentile(&lat, 0.99),
        failures,
        gateway_rss_bytes: pid.and_then(rss_bytes),
        handshakes,
        initiations_sent: shared.initiations.load(Ordering::Relaxed),
        cookie_replies: shared.cookies.load(Ordering::Relaxed),
        reconnects: shared.reconnects.load(Ordering::Relaxed),
        duration_s: elapsed,
        gateway_cpu_s: match (cpu_start, cpu_end) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        },
        gateway_idle_cpu_pct: idle,
        gateway_rss_registered_bytes: None,
        restart_at_s: None,
        connected_at_restart: None,
        all_back_s: None,
        back: None,
        redials_answered: 0,
        gateway_cpu_connect_s: None,
    }
}
