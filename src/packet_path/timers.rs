//! Stage 5, timers: for every session, boringtun's `update_timers` (its
//! keepalives, handshake retries and key expiry) and the link timeout.
//!
//! The driver ticks one of [`BUCKETS`] shares of the sessions every
//! [`TICK`], so each session's timers run every 2 s. That is 50,000
//! `update_timers` calls a second for 100,000 sessions, not the 400,000 a
//! 250 ms pass over all of them would cost (measured: the timer thread was
//! about 8 % of a core for 100,000 sessions at a 1 s period), and every
//! WireGuard timer the gateway relies on (a passive keepalive after 10 s, a
//! redial resent after 5 s, key expiry after minutes) keeps to within 2 s.
//! The link timeout is checked on the same pass, so a link goes down at
//! most 2 s after its deadline. A session whose keys
//! boringtun expired (no new handshake for 9 minutes, or 90 s of unanswered
//! initiations) is removed; if its link was still up it goes down with
//! reason `timeout`.

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::TunnResult;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{PacketPath, Transmit};
use crate::link_state::{DownReason, LinkTransition};
use crate::session_table::Session;

/// How often the driver ticks one bucket.
pub const TICK: Duration = Duration::from_millis(250);
/// Buckets: each session's timers run every `BUCKETS × TICK` (2 s).
pub const BUCKETS: u32 = 8;

impl PacketPath {
    /// One pass over every session (every bucket).
    pub fn tick(
        &self,
        now: Instant,
        out: &mut [u8],
        scratch: &mut Vec<Arc<Session>>,
        tx: &mut impl Transmit,
    ) {
        for b in 0..BUCKETS {
            self.tick_bucket(now, b, out, scratch, tx);
        }
    }

    /// One pass over the sessions of `bucket`. `round` is a buffer the
    /// caller keeps between ticks: bucket 0 fills it with every session (one
    /// walk of the table a second, not one per tick), and each bucket takes
    /// its share of it. A tick does not allocate once it has grown.
    pub fn tick_bucket(
        &self,
        now: Instant,
        bucket: u32,
        out: &mut [u8],
        round: &mut Vec<Arc<Session>>,
        tx: &mut impl Transmit,
    ) {
        self.rate_window.reset_if_due(now);
        let bucket = (bucket % BUCKETS) as usize;
        if bucket == 0 {
            round.clear();
            self.sessions.collect_into(round);
        }
        let n = round.len();
        let share = n * bucket / BUCKETS as usize..n * (bucket + 1) / BUCKETS as usize;
        // boringtun's own warnings (REKEY_TIMEOUT, ...) name no peer: when
        // they are shown at all (`--log ...,boringtun=warn`), they are
        // emitted inside a span naming the device. Decided by the
        // configuration, not by `tracing::enabled!`, which answered yes
        // with the binary's layered filters even while boringtun's
        // warnings were filtered out, so every session paid for a span on
        // every pass.
        let tag_boringtun = self.config.name_boringtun_warnings
            && tracing::enabled!(target: "boringtun", tracing::Level::WARN);
        for session in &round[share] {
            let session = session.clone();
            let mut st = session.state.lock();
            let to = st.link.endpoint();
            let mut expired = false;
            let span = tag_boringtun
                .then(|| tracing::warn_span!("session", device = %session.uuid).entered());
            let result = st.tunn.update_timers(out);
            drop(span);
            match result {
                TunnResult::WriteToNetwork(datagram) => {
                    self.transmit(tx, Some(&mut st.traffic), to, datagram)
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) => expired = true,
                _ => {}
            }
            let mut transition = st.link.poll(now);
            if expired && transition.is_none() {
                transition = st.link.close(DownReason::Timeout);
            }
            if let Some(t) = transition {
                if matches!(t, LinkTransition::Down { .. }) {
                    st.connected_since = None;
                }
                self.announce(&session, t, self.wall(now));
            }
            drop(st);
            if expired {
                tracing::debug!(device = %session.uuid, "session expired");
                self.sessions.remove(&session);
            }
        }
    }
}
