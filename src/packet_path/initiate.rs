//! Stage 6, redial: after a restart, the gateway initiates the handshakes
//! itself. An idle WireGuard device does not notice that the gateway
//! restarted (its keepalives expect no answer) until its own rekey timer
//! fires, up to 120 s later; the gateway knows where every device that was
//! connected when it stopped was last seen, and dials it.
//!
//! [`PacketPath::redial`] is sans-IO: it creates the device's session (the
//! same way a first handshake does, registry check included) and writes one
//! initiation. The driver that paces redials and the book that persists
//! endpoints are in `crate::redial`. boringtun's timers then retry an
//! unanswered initiation every 5 s and give up after 90 s, when the timer
//! stage removes the session.

use boringtun::noise::TunnResult;
use std::sync::Arc;
use std::time::Instant;

use super::{PacketPath, Transmit};
use crate::registry::RedialTarget;
use crate::session_table::Session;

impl PacketPath {
    /// Dials `target` at its last endpoint, unless it already has a session
    /// (it came back by itself) or is no longer registered. Returns the
    /// session an initiation was written for.
    pub fn redial(
        &self,
        _now: Instant,
        target: &RedialTarget,
        out: &mut [u8],
        tx: &mut impl Transmit,
    ) -> Option<Arc<Session>> {
        if self.sessions.by_key(&target.public_key).is_some() {
            return None;
        }
        let session = self.create_session(target.public_key, target.endpoint)?;
        let mut st = session.state.lock();
        if st.last_handshake_at.is_some() {
            // Raced with the device's own handshake, which won.
            return None;
        }
        match st.tunn.format_handshake_initiation(out, false) {
            TunnResult::WriteToNetwork(initiation) => {
                self.transmit(tx, Some(&mut st.traffic), target.endpoint, initiation);
                self.metrics.redials.inc();
                tracing::debug!(device = %session.uuid, endpoint = %target.endpoint, "redialed after restart");
                drop(st);
                Some(session)
            }
            _ => None,
        }
    }
}
