//! Stage 4, send: an IP packet from the gateway (its userspace TCP/IP stack,
//! the action client) to a device, encrypted in the device's session and sent
//! to the device's current endpoint.
//!
//! If the session has no current keys boringtun queues the packet and hands
//! back a handshake initiation, which goes out instead.

use boringtun::noise::TunnResult;
use std::cell::RefCell;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use super::{PacketPath, Transmit, BUF_SIZE};
use crate::session_table::Session;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SendError {
    #[error("the device has no session: its cloudlink is down")]
    NoSession,
    #[error("packet of {0} bytes is larger than a WireGuard datagram can carry")]
    TooLarge(usize),
    #[error("the gateway has no UDP socket (starting or stopped)")]
    NoSocket,
    #[error("the tunnel refused the packet: {0}")]
    Tunnel(String),
}

struct SocketTx<'a>(&'a std::net::UdpSocket);

impl Transmit for SocketTx<'_> {
    fn send(&mut self, to: SocketAddr, datagram: &[u8]) {
        if let Err(e) = self.0.send_to(datagram, to) {
            tracing::trace!(%to, error = %e, "send failed");
        }
    }
}

thread_local! {
    /// Encryption buffer of the calling thread: sending does not allocate.
    static SEND_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; BUF_SIZE].into_boxed_slice());
}

impl PacketPath {
    /// Encrypts `packet` for `session` and writes the datagram to `tx`.
    pub fn send_ip_with(
        &self,
        session: &Session,
        packet: &[u8],
        out: &mut [u8],
        tx: &mut impl Transmit,
    ) -> Result<(), SendError> {
        if packet.len() + 32 > out.len() || packet.len() > 65_535 {
            return Err(SendError::TooLarge(packet.len()));
        }
        let mut st = session.state.lock();
        let to = st.link.endpoint();
        match st.tunn.encapsulate(packet, out) {
            TunnResult::WriteToNetwork(datagram) => {
                self.transmit(tx, Some(session), to, datagram);
                Ok(())
            }
            TunnResult::Done => Ok(()),
            TunnResult::Err(e) => Err(SendError::Tunnel(format!("{e:?}"))),
            _ => Ok(()),
        }
    }

    /// Sends an IP packet to the device with tunnel address `dst`.
    pub fn send_ip(&self, dst: Ipv4Addr, packet: &[u8]) -> Result<(), SendError> {
        let session = self.sessions.by_address(dst).ok_or(SendError::NoSession)?;
        self.send_ip_to_session(&session, packet)
    }

    /// Sends an IP packet to the device `uuid`.
    pub fn send_ip_to_device(&self, uuid: &str, packet: &[u8]) -> Result<(), SendError> {
        let session = self.sessions.by_uuid(uuid).ok_or(SendError::NoSession)?;
        self.send_ip_to_session(&session, packet)
    }

    pub fn send_ip_to_session(
        &self,
        session: &Arc<Session>,
        packet: &[u8],
    ) -> Result<(), SendError> {
        let socket = self
            .egress
            .get()
            .and_then(|w| w.upgrade())
            .ok_or(SendError::NoSocket)?;
        SEND_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            self.send_ip_with(session, packet, &mut buf, &mut SocketTx(&socket))
        })
    }
}

pub fn socket_tx(socket: &std::net::UdpSocket) -> impl Transmit + '_ {
    SocketTx(socket)
}
