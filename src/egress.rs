//! Where IP packets for one peer go: the one seam between code that makes IP
//! packets (the userspace TCP/IP stacks, ICMP answers) and the WireGuard
//! session that encrypts them.
//!
//! On the gateway an `Egress` is always backed by a device's session whose
//! lock the caller already holds (see `packet_path::send`): a packet sent
//! through it is encrypted at once, in the order it was sent, and leaves
//! through the packet path's I/O layer. On the agent it is the agent's own
//! tunnel.
//!
//! Not `Send`/`Sync`: an egress lives for one call, on one thread, borrowing
//! whatever lock orders the peer's output.

pub trait Egress {
    fn send(&self, packet: &[u8]);
}

/// Drops everything: output for a peer that has no session.
pub struct Unreachable;

impl Egress for Unreachable {
    fn send(&self, _: &[u8]) {}
}
