//! Stage 3, transport: a datagram that names one of our sessions by its
//! receiver index (`receiver_idx >> 8`, an O(1) lookup): data packets
//! (keepalives included), and the handshake responses and cookie replies
//! that answer initiations the gateway sent itself.
//!
//! After `decapsulate`:
//! - only packets that decrypted (or authenticated handshake responses) feed
//!   the link state, which learns the endpoint from them (roaming) and brings
//!   the link up on the first transport packet; cookie replies and failures
//!   never move anything;
//! - cryptokey routing: a decrypted packet whose inner source is not the
//!   device's tunnel address is dropped and counted; a packet for anyone but
//!   the gateway is dropped too, so nothing a device sends reaches another;
//! - packets for the gateway go to the [`TunnelSink`](super::TunnelSink)
//!   with the session still locked, so its answers are encrypted under the
//!   same lock (see `send`);
//! - only datagrams that authenticated count towards the device's traffic.

use boringtun::noise::TunnResult;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use super::send::SessionOutput;
use super::{PacketPath, Transmit};
use crate::metrics::DropReason;
use crate::session_table::{Session, SessionState};

/// What kind of message named the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Data,
    HandshakeResponse,
    CookieReply,
}

impl PacketPath {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn handle_transport(
        &self,
        now: Instant,
        src: SocketAddr,
        receiver_idx: u32,
        kind: Kind,
        datagram: &[u8],
        out: &mut [u8],
        tx: &mut impl Transmit,
    ) {
        let Some(session) = self.sessions.by_index(receiver_idx >> 8) else {
            tracing::trace!(%src, receiver_idx, "datagram for an unknown session");
            self.metrics.dropped(DropReason::UnknownSession);
            return;
        };
        let mut st = session.state.lock();
        match st.tunn.decapsulate(Some(src.ip()), datagram, out) {
            TunnResult::Done => {
                // A keepalive, or a cookie reply that boringtun stored.
                st.traffic.rx(datagram.len());
                if kind != Kind::CookieReply {
                    self.authenticated(&session, &mut st, now, src, kind == Kind::Data);
                }
            }
            TunnResult::WriteToNetwork(packet) => {
                // Our own initiation (a redial, or boringtun's rekey) was
                // answered: the device holds the new keys and saw us, which
                // confirms the session as a transport packet would. boringtun
                // sends the keepalive that confirms it to the device.
                st.traffic.rx(datagram.len());
                st.last_handshake_at = Some(self.wall(now));
                self.authenticated(&session, &mut st, now, src, kind == Kind::HandshakeResponse);
                self.transmit(tx, Some(&mut st.traffic), src, packet);
                self.drain_queued(&mut st, src, out, tx);
            }
            TunnResult::WriteToTunnelV4(packet, inner_src) => {
                st.traffic.rx(datagram.len());
                self.authenticated(&session, &mut st, now, src, true);
                if inner_src != session.address {
                    tracing::trace!(device = %session.uuid, %inner_src, "inner source is not the device's address");
                    self.metrics.dropped(DropReason::SpoofedSource);
                } else if boringtun::noise::Tunn::dst_address(packet)
                    != Some(IpAddr::V4(self.gateway_address))
                {
                    self.metrics.dropped(DropReason::NotForGateway);
                } else {
                    self.deliver(&session, &mut st, packet, tx);
                }
            }
            TunnResult::WriteToTunnelV6(_, _) => {
                st.traffic.rx(datagram.len());
                self.authenticated(&session, &mut st, now, src, true);
                self.metrics.dropped(DropReason::Unsupported);
            }
            TunnResult::Err(e) => {
                tracing::trace!(device = %session.uuid, error = ?e, "transport packet refused");
                self.metrics.dropped(DropReason::DecryptFailed);
            }
        }
    }

    fn authenticated(
        &self,
        session: &Session,
        st: &mut SessionState,
        now: Instant,
        src: SocketAddr,
        transport: bool,
    ) {
        let before = st.link.endpoint();
        let transition = st.link.on_authenticated(now, src, transport);
        self.sessions.endpoint_moved(session.index, before, src);
        if let Some(t) = transition {
            let at = self.wall(now);
            if matches!(t, crate::link_state::LinkTransition::Up { .. }) {
                st.connected_since = Some(at);
            }
            self.announce(session, t, at);
        }
    }

    /// Hands a packet for the gateway to the sink, with the session still
    /// locked: its answers are encrypted under this lock (never a second
    /// one) and leave with the batch, which is flushed before the lock goes
    /// so that nothing sent for the device afterwards overtakes them.
    fn deliver(
        &self,
        session: &Arc<Session>,
        st: &mut SessionState,
        packet: &[u8],
        tx: &mut impl Transmit,
    ) {
        let Some(sink) = self.sink.get() else {
            self.metrics.dropped(DropReason::Unsupported);
            return;
        };
        let answered = {
            let answer = SessionOutput::new(st, tx);
            sink.deliver(session, packet, &answer);
            answer.sent()
        };
        if answered {
            tx.flush();
        }
    }

    /// Sends what boringtun queued while it had no session: it hands the
    /// packets out one `decapsulate(None, &[])` call at a time, until `Done`.
    pub(crate) fn drain_queued(
        &self,
        st: &mut SessionState,
        to: SocketAddr,
        out: &mut [u8],
        tx: &mut impl Transmit,
    ) {
        while let TunnResult::WriteToNetwork(packet) = st.tunn.decapsulate(None, &[], out) {
            self.transmit(tx, Some(&mut st.traffic), to, packet);
        }
    }
}
