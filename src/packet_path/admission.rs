//! Stage 2a, admission: what a handshake initiation passes before any
//! Diffie-Hellman is spent on it.
//!
//! Initiations cost about 250 µs of CPU each; transport packets about 1 µs.
//! So initiations do not run on the receive path: they wait in one bounded
//! queue ([`HandshakeQueue`]) that the workers drain between batches of
//! transport packets, and a reconnect storm cannot starve the keepalives and
//! relay traffic of connected devices.
//!
//! The load decision is the kernel WireGuard's: the gateway is *under load*
//! while the queue is at least 1/8 full (or, when `--handshake-rate-limit`
//! is set, while more initiations than that arrived this second). Then an
//! initiation must carry a valid mac2 (a cookie proving its source
//! address), and one without gets a cookie reply instead of a place in the
//! queue. Initiations that find the queue full are dropped and counted: the
//! device retries, memory does not grow.
//!
//! Fairness under load (issue "Hold up under abuse": one address that
//! answered cookie replies at 0.9 Mpps kept the queue full and a device's
//! handshakes went 86 % unanswered):
//! - an initiation from a **known endpoint** (where a session's device is
//!   now) needs no cookie and waits in a queue of its own, which workers
//!   empty first: devices reconnecting go ahead of unknown sources, and a
//!   fleet behind one carrier-grade NAT is not throttled as one address;
//! - every other source address has a **budget** of
//!   [`SOURCE_PER_SECOND`] initiations a second (burst [`SOURCE_BURST`]),
//!   as the kernel's WireGuard limits each source under load; beyond it
//!   they are dropped (`source_budget`). The budget is asked *before* the
//!   MACs are checked: a cookie reply costs a MAC and an AEAD, and
//!   `benches/abuse.sh` showed that answering 430,000 initiations a second
//!   from 16 addresses with cookie replies took the receive workers' whole
//!   core, so the kernel dropped two thirds of the legitimate devices'
//!   datagrams; a budget lookup costs about as much as dropping junk;
//! - load lasts a second after the queue fell below 1/8 (the kernel's
//!   `UNDER_LOAD_AFTER_TIME`): without that, a flood let through whenever
//!   the queue drained refilled it at once.
//!
//! boringtun's `RateLimiter` judges load by its own per-second count, so the
//! gateway keeps two: one that never reports load (checks mac1 only) and
//! one that always does (demands mac2, writes cookie replies). The queue
//! picks which one looks at a packet, so both agree with the queue.

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::TunnResult;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use super::{PacketPath, Transmit};
use crate::metrics::{DropReason, HandshakeResult};

/// Size of a handshake initiation.
pub const INITIATION_LEN: usize = 148;

/// The kernel's queue size (`MAX_QUEUED_INCOMING_HANDSHAKES`).
pub const DEFAULT_QUEUE: usize = 4096;

/// An admitted initiation, copied by value: no allocation per handshake.
pub(crate) struct Queued {
    pub src: SocketAddr,
    pub datagram: [u8; INITIATION_LEN],
}

/// Initiations a second an unknown source address may have admitted
/// under load, and its burst (the kernel's `INITIATIONS_PER_SECOND` and
/// `INITIATIONS_BURSTABLE`).
pub const SOURCE_PER_SECOND: f32 = 20.0;
pub const SOURCE_BURST: f32 = 5.0;
/// Source addresses the budget remembers at most; a full table refuses new
/// addresses until entries older than a second are pruned.
const SOURCE_TABLE: usize = 65_536;

/// The bounded queues of admitted initiations, shared by all workers: one
/// for known endpoints, emptied first, and one for everybody else. Each
/// holds up to the capacity.
pub struct HandshakeQueue {
    // A mutex, not a lock-free queue: a push or pop is a few nanoseconds
    // next to the 250 µs of the handshake it carries, so it never contends.
    q: Mutex<Queues>,
    len: AtomicUsize,
    cap: usize,
    /// Microseconds after `origin` until which the gateway counts itself
    /// under load (a second after the queue was last 1/8 full).
    loaded_until: AtomicU64,
    origin: Instant,
}

/// How long load lasts after the queue was last 1/8 full.
const UNDER_LOAD_AFTER_US: u64 = 1_000_000;

#[derive(Default)]
struct Queues {
    known: VecDeque<Queued>,
    other: VecDeque<Queued>,
}

impl HandshakeQueue {
    pub fn new(cap: usize) -> Self {
        HandshakeQueue {
            q: Mutex::new(Queues {
                known: VecDeque::new(),
                other: VecDeque::with_capacity(cap.min(DEFAULT_QUEUE)),
            }),
            len: AtomicUsize::new(0),
            cap: cap.max(8),
            loaded_until: AtomicU64::new(0),
            origin: Instant::now(),
        }
    }
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn capacity(&self) -> usize {
        self.cap
    }
    /// Under load from 1/8 full, as the kernel's WireGuard.
    pub fn under_load(&self) -> bool {
        self.len() >= self.cap / 8
    }

    /// [`under_load`](Self::under_load), or it was less than a second
    /// before `now`.
    pub fn under_load_at(&self, now: Instant) -> bool {
        let us = now.saturating_duration_since(self.origin).as_micros() as u64;
        if self.under_load() {
            self.loaded_until
                .store(us + UNDER_LOAD_AFTER_US, Ordering::Relaxed);
            return true;
        }
        us < self.loaded_until.load(Ordering::Relaxed)
    }
    fn push(&self, item: Queued, known: bool) -> bool {
        let mut q = self.q.lock();
        let lane = if known { &mut q.known } else { &mut q.other };
        if lane.len() >= self.cap {
            return false;
        }
        lane.push_back(item);
        self.len
            .store(q.known.len() + q.other.len(), Ordering::Relaxed);
        true
    }
    fn pop(&self) -> Option<Queued> {
        let mut q = self.q.lock();
        let item = q.known.pop_front().or_else(|| q.other.pop_front());
        self.len
            .store(q.known.len() + q.other.len(), Ordering::Relaxed);
        item
    }
}

/// Each unknown source address's initiation budget under load (a token
/// bucket per address), shared by all workers. Sharded mutexes: they are
/// taken only for initiations from unknown sources while under load, never
/// on the transport path, and a flood from many addresses spreads over
/// the shards.
#[derive(Default)]
pub(crate) struct SourceBudget {
    shards: [Mutex<HashMap<IpAddr, (f32, Instant)>>; BUDGET_SHARDS],
}

const BUDGET_SHARDS: usize = 16;

impl SourceBudget {
    /// Takes one initiation from `ip`'s budget; false when it is spent.
    pub(crate) fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        let shard = match ip {
            IpAddr::V4(a) => u32::from(a) as usize,
            IpAddr::V6(a) => (u128::from(a) as usize) ^ ((u128::from(a) >> 64) as usize),
        };
        // Fibonacci hashing: neighbouring addresses land on different shards.
        let shard = (shard.wrapping_mul(0x9E37_79B9) >> 8) % BUDGET_SHARDS;
        let mut b = self.shards[shard].lock();
        if b.len() >= SOURCE_TABLE / BUDGET_SHARDS && !b.contains_key(&ip) {
            // Addresses quiet for a second are back at full budget:
            // forgetting them changes nothing.
            b.retain(|_, (_, at)| now.saturating_duration_since(*at).as_secs() < 1);
            if b.len() >= SOURCE_TABLE / BUDGET_SHARDS {
                return false;
            }
        }
        let (tokens, at) = b.entry(ip).or_insert((SOURCE_BURST, now));
        let refill = now.saturating_duration_since(*at).as_secs_f32() * SOURCE_PER_SECOND;
        *tokens = (*tokens + refill).min(SOURCE_BURST);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Initiations counted this second, against `--handshake-rate-limit`.
pub(crate) struct RateWindow {
    count: AtomicU64,
    since: Mutex<Option<Instant>>,
}

impl Default for RateWindow {
    fn default() -> Self {
        RateWindow {
            count: AtomicU64::new(0),
            since: Mutex::new(None),
        }
    }
}

impl RateWindow {
    /// Starts a new window once a second (the timer driver calls it).
    pub(crate) fn reset_if_due(&self, now: Instant) {
        let mut since = self.since.lock();
        match *since {
            Some(t) if now.saturating_duration_since(t).as_secs() < 1 => {}
            _ => {
                self.count.store(0, Ordering::Relaxed);
                *since = Some(now);
            }
        }
    }
}

impl PacketPath {
    /// Whether initiations must prove their source (mac2) right now.
    pub fn under_load(&self) -> bool {
        self.under_load_at(Instant::now())
    }

    /// [`under_load`](Self::under_load) at `now` (simulated time in tests).
    pub fn under_load_at(&self, now: Instant) -> bool {
        self.handshakes.under_load_at(now)
            || (self.config.handshake_rate_limit > 0
                && self.rate_window.count.load(Ordering::Relaxed)
                    > self.config.handshake_rate_limit)
    }

    /// Checks an initiation's MACs, answers a cookie reply when under load
    /// without a valid mac2, and queues it otherwise (or drops it when the
    /// queue is full).
    pub(crate) fn admit_initiation(
        &self,
        now: Instant,
        src: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
        tx: &mut impl Transmit,
    ) {
        self.rate_window.count.fetch_add(1, Ordering::Relaxed);
        let known = self.sessions.is_known_endpoint(&src);
        let under_load = self.under_load_at(now);
        // Before any MAC: see the module's notes on fairness.
        if under_load && !known && !self.source_budget.allow(src.ip(), now) {
            self.metrics.handshake(HandshakeResult::RateLimited);
            self.metrics.dropped(DropReason::SourceBudget);
            return;
        }
        let limiter = if under_load && !known {
            &self.cookie_limiter
        } else {
            &*self.tunn_limiter
        };
        match limiter.verify_packet(Some(src.ip()), datagram, out) {
            Ok(_) => {}
            Err(TunnResult::WriteToNetwork(cookie)) => {
                self.metrics.handshake(HandshakeResult::Cookie);
                self.transmit(tx, None, src, cookie);
                return;
            }
            Err(TunnResult::Err(WireGuardError::UnderLoad)) => {
                self.metrics.handshake(HandshakeResult::RateLimited);
                self.metrics.dropped(DropReason::UnderLoad);
                return;
            }
            Err(_) => {
                tracing::trace!(%src, "handshake initiation with a bad mac1");
                self.metrics.handshake(HandshakeResult::Invalid);
                self.metrics.dropped(DropReason::InvalidMac);
                return;
            }
        }
        let Ok(datagram) = <[u8; INITIATION_LEN]>::try_from(datagram) else {
            self.metrics.dropped(DropReason::Malformed);
            return;
        };
        if self.handshakes.push(Queued { src, datagram }, known) {
            self.metrics
                .handshake_queue
                .set(self.handshakes.len() as i64);
        } else {
            self.metrics.handshake(HandshakeResult::RateLimited);
            self.metrics.dropped(DropReason::HandshakeQueueFull);
        }
    }

    /// Runs up to `max` queued handshakes; returns how many ran. Workers
    /// call it between batches of received datagrams.
    pub fn process_handshakes(
        &self,
        now: Instant,
        max: usize,
        out: &mut [u8],
        tx: &mut impl Transmit,
    ) -> usize {
        let mut done = 0;
        while done < max {
            let Some(q) = self.handshakes.pop() else {
                break;
            };
            self.metrics
                .handshake_queue
                .set(self.handshakes.len() as i64);
            self.handle_initiation(now, q.src, &q.datagram, out, tx);
            done += 1;
        }
        done
    }
}
