//! Heartbeat timers of 1,000,000 devices: the cost of one heartbeat and of
//! one expiry (target under 5 µs each) and the memory they take (target
//! under 100 bytes per device), measured on the sans-IO `StatusTracker`.
//!
//! Run: `cargo bench --bench status_timers`. Memory is counted exactly by a
//! counting global allocator (bytes live after the fleet was loaded, minus
//! before); times are wall-clock over the whole fleet, divided by the
//! operations done.

use cloudlink::status::{StatusChange, StatusTracker, Stored};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const HEARTBEAT_LIMIT_NS: f64 = 5_000.0;
const EXPIRY_LIMIT_NS: f64 = 5_000.0;
const MEMORY_LIMIT: f64 = 100.0;

fn main() {
    let n: u32 = std::env::var("CLOUDLINK_BENCH_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let interval_s = 900u64;
    let grace_ms = 15_000u64;
    let t0: u64 = 1_800_000_000_000;
    // Spread the fleet's last heartbeats over one poll interval, as a real
    // fleet's are: every device is online with one pending deadline.
    let last = |i: u32| t0 + (i as u64 * 7919 % (interval_s * 1000));
    let order: Vec<u32> = {
        // A fixed permutation, so heartbeats arrive in no particular order.
        let mut v: Vec<u32> = (0..n).collect();
        let mut x = 0x2545F4914F6CDD1Du64;
        for i in (1..v.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.swap(i, (x % (i as u64 + 1)) as usize);
        }
        v
    };

    let before = LIVE.load(Ordering::Relaxed);
    let mut t = StatusTracker::new(interval_s as u32, grace_ms);
    let load_start = Instant::now();
    for &id in &order {
        t.insert(
            id,
            Stored {
                last_heartbeat_ms: Some(last(id)),
                poll_interval_s: None,
                cloudlink_enabled: true,
                ever_linked: true,
            },
            t0 + interval_s * 1000,
        );
    }
    let load_s = load_start.elapsed().as_secs_f64();
    let bytes = (LIVE.load(Ordering::Relaxed) - before) as f64;
    let per_device = bytes / n as f64;

    // One heartbeat per device, in shuffled order: each moves the device's
    // pending deadline.
    let now = t0 + interval_s * 1000 + 60_000;
    let start = Instant::now();
    for &id in &order {
        std::hint::black_box(t.heartbeat(id, now + (id as u64 % 1000), None));
    }
    let heartbeat_ns = start.elapsed().as_nanos() as f64 / n as f64;

    // Every device falls silent: all turn timeout, then offline.
    let mut out: Vec<StatusChange> = Vec::with_capacity(n as usize);
    let timeout_at = now + 1000 + interval_s * 1500;
    let start = Instant::now();
    t.poll(timeout_at, &mut out);
    let first = start.elapsed();
    let start = Instant::now();
    t.poll(timeout_at + grace_ms, &mut out);
    let second = start.elapsed();
    let expiries = 2.0 * n as f64;
    let expiry_ns = (first + second).as_nanos() as f64 / expiries;
    assert_eq!(t.next_deadline(), None, "every timer fired");
    assert_eq!(
        out.len() as u32,
        n,
        "one status change per device (to disconnected)"
    );

    println!("status_timers: {n} devices, poll interval {interval_s} s");
    println!(
        "  memory: {per_device:.1} B per device ({:.1} MiB); limit {MEMORY_LIMIT} B, ratio {:.3}",
        bytes / 1048576.0,
        per_device / MEMORY_LIMIT
    );
    println!(
        "  heartbeat: {heartbeat_ns:.0} ns each; limit {HEARTBEAT_LIMIT_NS} ns, ratio {:.3}",
        heartbeat_ns / HEARTBEAT_LIMIT_NS
    );
    println!(
        "  expiry: {expiry_ns:.0} ns each ({} online->timeout, then {} timeout->offline); limit {EXPIRY_LIMIT_NS} ns, ratio {:.3}",
        n,
        n,
        expiry_ns / EXPIRY_LIMIT_NS
    );
    println!("  loading the fleet at start: {load_s:.2} s");
    println!(
        "{{\"devices\":{n},\"bytes_per_device\":{per_device:.1},\"heartbeat_ns\":{heartbeat_ns:.0},\"expiry_ns\":{expiry_ns:.0},\"load_s\":{load_s:.3}}}"
    );
}
