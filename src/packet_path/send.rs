//! Stage 4, send: IP packets from the gateway (its userspace TCP/IP stacks,
//! ICMP answers) to a device, encrypted in the device's session and sent to
//! the device's current endpoint.
//!
//! Every such packet is encrypted here, under the device's session lock
//! taken once: either the lock the transport stage already holds while the
//! tunnel sink handles a packet from the device (its answers leave with the
//! worker's batch), or the lock [`with_session_egress`] takes for output
//! made anywhere else (a stream's timers, a client's bytes), sent at once.
//! A device's datagrams therefore leave in the order they were encrypted:
//! the transport stage flushes its batch before it lets the lock go when the
//! sink answered (see `transport`).
//!
//! If the session has no current keys boringtun queues the packet and hands
//! back a handshake initiation, which goes out instead.
//!
//! [`with_session_egress`]: PacketPath::with_session_egress

use boringtun::noise::TunnResult;
use std::cell::{Cell, RefCell};
use std::net::{Ipv4Addr, SocketAddr};

use super::udp_io::{BatchSlots, SendBatch};
use super::{PacketPath, Transmit, BUF_SIZE};
use crate::egress::{Egress, Unreachable};
use crate::metrics::Metrics;
use crate::session_table::{Session, SessionState};

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

/// Sends each datagram at once through a socket, counting it.
struct SocketTx<'a> {
    socket: &'a std::net::UdpSocket,
    metrics: &'a Metrics,
}

impl Transmit for SocketTx<'_> {
    fn send(&mut self, to: SocketAddr, datagram: &[u8]) {
        self.metrics.tx_packets.inc();
        self.metrics.tx_bytes.inc_by(datagram.len() as u64);
        if let Err(e) = self.socket.send_to(datagram, to) {
            tracing::trace!(%to, error = %e, "send failed");
        }
    }
}

/// A transmit that sends at once through `socket` (the timer thread's and
/// the redialer's; the packet workers batch).
pub fn socket_tx<'a>(socket: &'a std::net::UdpSocket, metrics: &'a Metrics) -> impl Transmit + 'a {
    SocketTx { socket, metrics }
}

thread_local! {
    /// Encryption buffer of the calling thread: sending does not allocate.
    static SEND_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; BUF_SIZE].into_boxed_slice());
    /// Send batch of a thread that makes output outside the packet workers
    /// (relay tasks, the timer thread), allocated on first use.
    static EGRESS_BATCH: RefCell<Option<Box<BatchSlots>>> = const { RefCell::new(None) };
}

/// Encrypts `packet` with the locked session state `st` and hands the
/// datagram to `tx`. `Ok(true)` when a datagram went out.
fn encrypt(
    st: &mut SessionState,
    packet: &[u8],
    tx: &mut impl Transmit,
) -> Result<bool, SendError> {
    if packet.len() > 65_535 {
        return Err(SendError::TooLarge(packet.len()));
    }
    SEND_BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        let to = st.link.endpoint();
        match st.tunn.encapsulate(packet, &mut buf) {
            TunnResult::WriteToNetwork(datagram) => {
                st.traffic.tx(datagram.len());
                tx.send(to, datagram);
                Ok(true)
            }
            TunnResult::Err(e) => Err(SendError::Tunnel(format!("{e:?}"))),
            _ => Ok(false),
        }
    })
}

/// The [`Egress`] of one device while its session is locked: what is sent
/// through it is encrypted at once and handed to `tx`.
pub(crate) struct SessionOutput<'a, T: Transmit> {
    locked: RefCell<(&'a mut SessionState, &'a mut T)>,
    sent: Cell<bool>,
}

impl<'a, T: Transmit> SessionOutput<'a, T> {
    pub(crate) fn new(st: &'a mut SessionState, tx: &'a mut T) -> Self {
        SessionOutput {
            locked: RefCell::new((st, tx)),
            sent: Cell::new(false),
        }
    }

    /// Whether anything went out.
    pub(crate) fn sent(&self) -> bool {
        self.sent.get()
    }
}

impl<T: Transmit> Egress for SessionOutput<'_, T> {
    fn send(&self, packet: &[u8]) {
        // Never re-entered: encrypting calls nothing back.
        let mut locked = self.locked.borrow_mut();
        let (st, tx) = &mut *locked;
        match encrypt(st, packet, *tx) {
            Ok(true) => self.sent.set(true),
            Ok(false) => {}
            Err(e) => tracing::trace!(error = %e, "packet to the device not sent"),
        }
    }
}

impl PacketPath {
    /// Encrypts `packet` for `session` (taking its lock) and writes the
    /// datagram to `tx`.
    pub fn send_ip_with(
        &self,
        session: &Session,
        packet: &[u8],
        tx: &mut impl Transmit,
    ) -> Result<(), SendError> {
        encrypt(&mut session.state.lock(), packet, tx).map(|_| ())
    }

    /// Runs `f` with the egress of `session`: its lock is held while `f`
    /// runs, so whatever `f` does that takes other locks must come after the
    /// session in the lock order (a relay stack's lock does). Datagrams go
    /// out at once through the egress socket; without one (starting or
    /// stopped) they are dropped.
    pub fn with_session_egress(&self, session: &Session, f: &mut dyn FnMut(&dyn Egress)) {
        let Some(socket) = self.egress_socket() else {
            return f(&Unreachable);
        };
        // What `f` makes (a stack's burst of segments) leaves with one
        // `sendmmsg` per batch, still under the session lock (so in the
        // order it was encrypted), from storage this thread keeps.
        EGRESS_BATCH.with(|b| match b.try_borrow_mut() {
            Ok(mut b) => {
                let b = b.get_or_insert_with(|| Box::new(BatchSlots::new()));
                let mut tx = SendBatch::on(std::os::fd::AsFd::as_fd(&*socket), &self.metrics, b);
                let mut st = session.state.lock();
                f(&SessionOutput::new(&mut st, &mut tx));
                tx.flush();
            }
            // Re-entered on this thread (not done today): unbatched.
            Err(_) => {
                let mut tx = SocketTx {
                    socket: &socket,
                    metrics: &self.metrics,
                };
                let mut st = session.state.lock();
                f(&SessionOutput::new(&mut st, &mut tx));
            }
        })
    }

    /// Sends an IP packet to the device with tunnel address `dst`, at once.
    pub fn send_ip(&self, dst: Ipv4Addr, packet: &[u8]) -> Result<(), SendError> {
        let session = self.sessions.by_address(dst).ok_or(SendError::NoSession)?;
        let socket = self.egress_socket().ok_or(SendError::NoSocket)?;
        let mut tx = SocketTx {
            socket: &socket,
            metrics: &self.metrics,
        };
        self.send_ip_with(&session, packet, &mut tx)
    }
}
