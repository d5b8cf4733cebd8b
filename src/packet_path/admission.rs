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
//! boringtun's `RateLimiter` judges load by its own per-second count, so the
//! gateway keeps two: one that never reports load (checks mac1 only) and
//! one that always does (demands mac2, writes cookie replies). The queue
//! picks which one looks at a packet, so both agree with the queue.

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::TunnResult;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::net::SocketAddr;
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

/// The bounded queue of admitted initiations, shared by all workers.
pub struct HandshakeQueue {
    // A mutex, not a lock-free queue: a push or pop is a few nanoseconds
    // next to the 250 µs of the handshake it carries, so it never contends.
    q: Mutex<VecDeque<Queued>>,
    len: AtomicUsize,
    cap: usize,
}

impl HandshakeQueue {
    pub fn new(cap: usize) -> Self {
        HandshakeQueue {
            q: Mutex::new(VecDeque::with_capacity(cap.min(DEFAULT_QUEUE))),
            len: AtomicUsize::new(0),
            cap: cap.max(8),
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
    fn push(&self, item: Queued) -> bool {
        let mut q = self.q.lock();
        if q.len() >= self.cap {
            return false;
        }
        q.push_back(item);
        self.len.store(q.len(), Ordering::Relaxed);
        true
    }
    fn pop(&self) -> Option<Queued> {
        let mut q = self.q.lock();
        let item = q.pop_front();
        self.len.store(q.len(), Ordering::Relaxed);
        item
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
        self.handshakes.under_load()
            || (self.config.handshake_rate_limit > 0
                && self.rate_window.count.load(Ordering::Relaxed)
                    > self.config.handshake_rate_limit)
    }

    /// Checks an initiation's MACs, answers a cookie reply when under load
    /// without a valid mac2, and queues it otherwise (or drops it when the
    /// queue is full).
    pub(crate) fn admit_initiation(
        &self,
        src: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
        tx: &mut impl Transmit,
    ) {
        self.rate_window.count.fetch_add(1, Ordering::Relaxed);
        let limiter = if self.under_load() {
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
        if self.handshakes.push(Queued { src, datagram }) {
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
