//! Stage 5, timers: for every session, boringtun's `update_timers` (its
//! keepalives, handshake retries and key expiry) and the link timeout.
//!
//! The driver calls [`PacketPath::tick`] every 250 ms, boringtun's expected
//! cadence. A session whose keys boringtun expired (no new handshake for
//! 9 minutes, or 90 s of unanswered initiations) is removed; if its link was
//! still up it goes down with reason `timeout`.

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::TunnResult;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{PacketPath, Transmit};
use crate::link_state::{DownReason, LinkTransition};
use crate::session_table::Session;

/// How often the driver ticks.
pub const TICK: Duration = Duration::from_millis(250);

impl PacketPath {
    /// One pass over every session. `scratch` is a buffer the caller keeps
    /// between ticks, so a tick does not allocate once it has grown.
    pub fn tick(
        &self,
        now: Instant,
        out: &mut [u8],
        scratch: &mut Vec<Arc<Session>>,
        tx: &mut impl Transmit,
    ) {
        // The shared limiter only resets when asked; it resets at most once
        // a second however often it is asked.
        self.handshake_limiter.reset_count();
        scratch.clear();
        self.sessions.collect_into(scratch);
        for session in scratch.drain(..) {
            let mut st = session.state.lock();
            let to = st.link.endpoint();
            let mut expired = false;
            match st.tunn.update_timers(out) {
                TunnResult::WriteToNetwork(datagram) => {
                    self.transmit(tx, Some(&session), to, datagram)
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
                self.announce(&session, t);
            }
            drop(st);
            if expired {
                tracing::debug!(device = %session.uuid, "session expired");
                self.sessions.remove(&session);
            }
        }
    }
}
