//! Per-device bandwidth limits: a token bucket each way.
//!
//! A device's limit is its own (`rate_limit_kbps`, set through PATCH; 0
//! exempts it) or the gateway's default (`--device-rate-limit-kbps`, off
//! unless given). Relay streams are *shaped*: the relay loop asks the
//! bucket before it moves bytes, so the client is read (or the stack's
//! receive buffer drained, which closes the window the device sees) only as
//! fast as the limit allows, and TCP never retransmits against our own
//! drops. Other traffic (ICMP) is *policed*: a packet the bucket cannot pay
//! for is dropped.
//!
//! The buckets are sans-IO (`now` in, a grant or a wait out) and live only
//! for devices that have a limit and traffic; a device without a limit
//! costs one map lookup per non-relay packet, none per relay chunk.

use dashmap::DashMap;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a bucket may hold beyond its steady rate: this much time's worth,
/// but never less than a few full-sized packets (so a low limit still lets
/// a segment through).
const BURST_TIME: Duration = Duration::from_millis(20);
const MIN_BURST: u64 = 4 * 1500;

/// One direction's token bucket, in bytes.
#[derive(Debug)]
pub struct Bucket {
    tokens: u64,
    last: Instant,
}

impl Bucket {
    fn new(now: Instant) -> Self {
        Bucket {
            tokens: 0,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant, bytes_per_s: u64) {
        let burst = burst(bytes_per_s);
        let ns = now.saturating_duration_since(self.last).as_nanos();
        let add = (ns * bytes_per_s as u128 / 1_000_000_000) as u64;
        if add > 0 {
            self.tokens = (self.tokens.saturating_add(add)).min(burst);
            // Only the time that bought whole bytes is spent.
            let used =
                Duration::from_nanos((add as u128 * 1_000_000_000 / bytes_per_s as u128) as u64);
            self.last = if self.tokens == burst {
                now
            } else {
                self.last + used
            };
        }
    }

    /// Up to `want` bytes now (shaping): `Ok(n)` with `n >= 1`, or
    /// `Err(wait)` until enough is available. A grant is at least half a
    /// burst (or all of a smaller `want`): granting whatever trickled in
    /// since the last call would move a few bytes per wakeup, one tiny
    /// segment each, and burn a core at any rate.
    fn take_up_to(&mut self, now: Instant, want: u64, bytes_per_s: u64) -> Result<u64, Duration> {
        self.refill(now, bytes_per_s);
        let need = want.min(burst(bytes_per_s) / 2).max(1);
        if self.tokens < need {
            let ns = ((need - self.tokens) as u128 * 1_000_000_000 / bytes_per_s as u128) as u64;
            return Err(Duration::from_nanos(ns.clamp(100_000, 100_000_000)));
        }
        let n = want.min(self.tokens);
        self.tokens -= n;
        Ok(n)
    }

    /// All of `len` bytes or nothing (policing).
    fn take_all(&mut self, now: Instant, len: u64, bytes_per_s: u64) -> bool {
        self.refill(now, bytes_per_s);
        if self.tokens >= len {
            self.tokens -= len;
            true
        } else {
            false
        }
    }

    fn give_back(&mut self, n: u64, bytes_per_s: u64) {
        self.tokens = (self.tokens + n).min(burst(bytes_per_s));
    }
}

fn burst(bytes_per_s: u64) -> u64 {
    (bytes_per_s * BURST_TIME.as_millis() as u64 / 1000).max(MIN_BURST)
}

/// Which way bytes move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ToDevice,
    FromDevice,
}

/// One device's limiter: the rate (changed live) and a bucket each way.
#[derive(Debug)]
pub struct DeviceLimiter {
    /// kbit/s (1000 bit/s); 0 means unlimited.
    kbps: AtomicU32,
    to_device: Mutex<Bucket>,
    from_device: Mutex<Bucket>,
}

impl DeviceLimiter {
    pub fn new(kbps: u32, now: Instant) -> Self {
        DeviceLimiter {
            kbps: AtomicU32::new(kbps),
            to_device: Mutex::new(Bucket::new(now)),
            from_device: Mutex::new(Bucket::new(now)),
        }
    }

    pub fn kbps(&self) -> u32 {
        self.kbps.load(Ordering::Relaxed)
    }

    fn bytes_per_s(&self) -> Option<u64> {
        match self.kbps() {
            0 => None,
            k => Some(k as u64 * 1000 / 8),
        }
    }

    fn bucket(&self, d: Direction) -> &Mutex<Bucket> {
        match d {
            Direction::ToDevice => &self.to_device,
            Direction::FromDevice => &self.from_device,
        }
    }

    /// Shaping: up to `want` bytes may move now, or wait this long and ask
    /// again. Unlimited: all of `want`.
    pub fn grant(&self, d: Direction, now: Instant, want: usize) -> Result<usize, Duration> {
        match self.bytes_per_s() {
            None => Ok(want),
            Some(r) => self
                .bucket(d)
                .lock()
                .take_up_to(now, want as u64, r)
                .map(|n| n as usize),
        }
    }

    /// Returns bytes granted but not moved.
    pub fn unused(&self, d: Direction, n: usize) {
        if let (Some(r), true) = (self.bytes_per_s(), n > 0) {
            self.bucket(d).lock().give_back(n as u64, r);
        }
    }

    /// Policing: whether a packet of `len` bytes may pass.
    pub fn admit(&self, d: Direction, now: Instant, len: usize) -> bool {
        match self.bytes_per_s() {
            None => true,
            Some(r) => self.bucket(d).lock().take_all(now, len as u64, r),
        }
    }
}

/// The gateway's limits: the default, the devices' own, and the limiters
/// of devices that have a limit and have moved bytes.
#[derive(Debug, Default)]
pub struct RateLimits {
    /// kbit/s; 0: no default limit.
    default_kbps: AtomicU32,
    /// Devices' own limits (0: exempt from the default). Kept current by the
    /// fleet reactor from `device.updated`.
    own: DashMap<Box<str>, u32>,
    limiters: DashMap<Box<str>, Arc<DeviceLimiter>>,
}

impl RateLimits {
    pub fn set_default(&self, kbps: u32) {
        self.default_kbps.store(kbps, Ordering::Relaxed);
    }

    /// Replaces every device's own limit (at start, and after lost events).
    pub fn load(&self, own: impl IntoIterator<Item = (String, u32)>) {
        self.own.clear();
        for (uuid, kbps) in own {
            self.own.insert(uuid.into(), kbps);
        }
        for l in self.limiters.iter() {
            l.kbps.store(self.effective(l.key()), Ordering::Relaxed);
        }
    }

    /// A device's own limit changed (`None`: back to the default); applies
    /// at once to its open streams.
    pub fn set_own(&self, uuid: &str, kbps: Option<u32>) {
        match kbps {
            Some(k) => {
                self.own.insert(uuid.into(), k);
            }
            None => {
                self.own.remove(uuid);
            }
        }
        if let Some(l) = self.limiters.get(uuid) {
            l.kbps.store(self.effective(uuid), Ordering::Relaxed);
        }
    }

    /// The device is gone: forget it.
    pub fn forget(&self, uuid: &str) {
        self.own.remove(uuid);
        self.limiters.remove(uuid);
    }

    /// The limit that applies to a device, kbit/s (0: none).
    pub fn effective(&self, uuid: &str) -> u32 {
        match self.own.get(uuid) {
            Some(k) => *k,
            None => self.default_kbps.load(Ordering::Relaxed),
        }
    }

    /// The device's limiter, made on first use; `None` while it has no
    /// limit. A stream keeps the one it got: a later change of the rate
    /// reaches it through the shared atomic.
    pub fn limiter(&self, uuid: &str) -> Option<Arc<DeviceLimiter>> {
        if let Some(l) = self.limiters.get(uuid) {
            return Some(l.clone());
        }
        let kbps = self.effective(uuid);
        if kbps == 0 {
            return None;
        }
        Some(
            self.limiters
                .entry(uuid.into())
                .or_insert_with(|| Arc::new(DeviceLimiter::new(kbps, Instant::now())))
                .clone(),
        )
    }

    /// Like [`limiter`](Self::limiter), but also for a device without a
    /// limit today (a relay stream: a limit set while it runs applies).
    pub fn stream_limiter(&self, uuid: &str) -> Arc<DeviceLimiter> {
        if let Some(l) = self.limiters.get(uuid) {
            return l.clone();
        }
        let kbps = self.effective(uuid);
        self.limiters
            .entry(uuid.into())
            .or_insert_with(|| Arc::new(DeviceLimiter::new(kbps, Instant::now())))
            .clone()
    }

    /// Drops the limiter of a device without streams (link down).
    pub fn release(&self, uuid: &str) {
        self.limiters
            .remove_if(uuid, |_, l| Arc::strong_count(l) == 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shaping on simulated time: a greedy sender that asks for 64 KiB
    /// whenever it may moves the configured rate, within the burst.
    #[test]
    fn shaping_holds_the_rate_on_simulated_time() {
        let t0 = Instant::now();
        let l = DeviceLimiter::new(10_000, t0); // 10 Mbit/s = 1.25 MB/s
        let mut now = t0;
        let mut moved = 0u64;
        while now < t0 + Duration::from_secs(10) {
            match l.grant(Direction::ToDevice, now, 64 * 1024) {
                Ok(n) => {
                    moved += n as u64;
                    now += Duration::from_micros(50);
                }
                Err(wait) => now += wait,
            }
        }
        let rate = moved as f64 / 10.0;
        assert!(
            (rate - 1_250_000.0).abs() < 1_250_000.0 * 0.01,
            "{rate} B/s"
        );
    }

    #[test]
    fn policing_drops_what_the_bucket_cannot_pay_and_changes_apply_live() {
        let t0 = Instant::now();
        let limits = RateLimits::default();
        assert!(limits.limiter("a").is_none(), "no limit, no limiter");
        limits.set_own("a", Some(100)); // 12,500 B/s, burst 6,000
        let l = limits.limiter("a").unwrap();
        let later = t0 + Duration::from_secs(1);
        let passed = (0..100)
            .filter(|_| l.admit(Direction::FromDevice, later, 1000))
            .count();
        assert_eq!(passed, 6, "the burst, then drops");
        limits.set_own("a", Some(0));
        assert!(
            l.admit(Direction::FromDevice, later, 1_000_000),
            "0 exempts"
        );
        limits.set_default(50);
        limits.set_own("a", None);
        assert_eq!(l.kbps(), 50, "back to the default, live");
        limits.forget("a");
        assert_eq!(limits.effective("b"), 50);
    }

    #[test]
    fn unused_grants_are_given_back() {
        let t0 = Instant::now();
        let l = DeviceLimiter::new(8, t0); // 1,000 B/s, burst 6,000
        let t = t0 + Duration::from_secs(10);
        assert_eq!(l.grant(Direction::FromDevice, t, 100_000), Ok(6000));
        assert!(l.grant(Direction::FromDevice, t, 1).is_err());
        l.unused(Direction::FromDevice, 4000);
        assert_eq!(l.grant(Direction::FromDevice, t, 100_000), Ok(4000));
    }
}
