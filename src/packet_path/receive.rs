//! Stage 1, receive: every datagram from the UDP socket enters here. It is
//! classified by its WireGuard message type, and handed to
//! admission (initiations, which queue for the handshake stage) or the
//! transport stage (everything that names one of our sessions by receiver
//! index). Anything else is dropped
//! and counted as `malformed`.

use boringtun::noise::{Packet, Tunn};
use std::net::SocketAddr;
use std::time::Instant;

use super::transport::Kind;
use super::{canonical, PacketPath, Transmit};
use crate::metrics::DropReason;

impl PacketPath {
    /// Handles one datagram from `src`. `out` is the worker's scratch buffer
    /// (at least [`BUF_SIZE`](super::BUF_SIZE) bytes). Initiations only
    /// queue here; [`process_handshakes`](Self::process_handshakes) runs
    /// them.
    pub fn handle_datagram(
        &self,
        now: Instant,
        src: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
        tx: &mut impl Transmit,
    ) {
        let src = canonical(src);
        match Tunn::parse_incoming_packet(datagram) {
            Ok(Packet::HandshakeInit(_)) => self.admit_initiation(now, src, datagram, out, tx),
            Ok(Packet::PacketData(p)) => {
                self.handle_transport(now, src, p.receiver_idx, Kind::Data, datagram, out, tx)
            }
            Ok(Packet::HandshakeResponse(p)) => self.handle_transport(
                now,
                src,
                p.receiver_idx,
                Kind::HandshakeResponse,
                datagram,
                out,
                tx,
            ),
            Ok(Packet::PacketCookieReply(p)) => self.handle_transport(
                now,
                src,
                p.receiver_idx,
                Kind::CookieReply,
                datagram,
                out,
                tx,
            ),
            Err(_) => {
                tracing::trace!(%src, len = datagram.len(), "malformed datagram");
                self.metrics.dropped(DropReason::Malformed);
            }
        }
    }

    /// Hands a datagram to the I/O layer (which counts what it sends) and
    /// counts it for the session it belongs to.
    #[inline]
    pub(crate) fn transmit(
        &self,
        tx: &mut impl Transmit,
        traffic: Option<&mut crate::session_table::Traffic>,
        to: SocketAddr,
        datagram: &[u8],
    ) {
        if let Some(t) = traffic {
            t.tx(datagram.len());
        }
        tx.send(to, datagram);
    }
}
