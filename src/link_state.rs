//! The link state machine of one device: is its cloudlink up?
//!
//! Sans-IO: it is fed `now` and what happened (an authenticated packet, a
//! deletion, a clean shutdown) and answers with the transition to announce and
//! the next moment it must be polled. It never reads a clock and never touches
//! a socket, so it is tested on simulated time.
//!
//! Rules (issue "Gateway core", item 5):
//! - **up** on the first authenticated transport packet after a handshake
//!   while the link was down (the session is then confirmed both ways);
//! - **down** when no authenticated packet arrived for `link_timeout`
//!   (`timeout`), when the device is deleted (`revoked`), or when the gateway
//!   shuts down cleanly (`shutdown`);
//! - **roamed** when an authenticated packet comes from a new endpoint while
//!   the link is up.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Why a link went down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownReason {
    Timeout,
    Revoked,
    Shutdown,
    /// Cluster mode: another gateway took the device over (it now dials
    /// that one); announced cluster-wide as that gateway's `link.moved`.
    Moved,
}

impl DownReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DownReason::Timeout => "timeout",
            DownReason::Revoked => "revoked",
            DownReason::Shutdown => "shutdown",
            DownReason::Moved => "moved",
        }
    }
}

/// A transition to announce as a link event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkTransition {
    Up {
        endpoint: SocketAddr,
    },
    Down {
        endpoint: SocketAddr,
        reason: DownReason,
    },
    Roamed {
        from: SocketAddr,
        to: SocketAddr,
    },
}

/// One device's link state.
#[derive(Debug, Clone)]
pub struct LinkState {
    timeout: Duration,
    up: bool,
    /// Where replies go: the source of the last authenticated packet (or of
    /// the handshake that created the session, until the first one arrives).
    endpoint: SocketAddr,
    /// Last authenticated packet of any kind (transport or handshake).
    last_authenticated: Option<Instant>,
    /// When the link last came up; `None` while down.
    up_since: Option<Instant>,
}

impl LinkState {
    /// A new, down link whose first handshake came from `endpoint`.
    pub fn new(timeout: Duration, endpoint: SocketAddr) -> Self {
        LinkState {
            timeout,
            up: false,
            endpoint,
            last_authenticated: None,
            up_since: None,
        }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }
    pub fn endpoint(&self) -> SocketAddr {
        self.endpoint
    }
    pub fn up_since(&self) -> Option<Instant> {
        self.up_since
    }
    pub fn last_authenticated(&self) -> Option<Instant> {
        self.last_authenticated
    }

    /// An authenticated packet arrived from `from`. `transport` is true for a
    /// decrypted data packet (keepalives included); false for a handshake
    /// message that passed its cryptographic checks (an initiation the
    /// device's static key signed, with a fresh timestamp, or a response to
    /// our own initiation). Both prove the device is alive and where it is,
    /// as in the kernel's WireGuard, but only a transport packet *confirms*
    /// the session (the device got our answer), so only it brings the link up.
    /// (The packet path passes a response to the gateway's own initiation as
    /// `transport`: for the initiator, the response is that confirmation.)
    pub fn on_authenticated(
        &mut self,
        now: Instant,
        from: SocketAddr,
        transport: bool,
    ) -> Option<LinkTransition> {
        self.last_authenticated = Some(now);
        let previous = self.endpoint;
        self.endpoint = from;
        if transport && !self.up {
            self.up = true;
            self.up_since = Some(now);
            return Some(LinkTransition::Up { endpoint: from });
        }
        if self.up && previous != from {
            return Some(LinkTransition::Roamed {
                from: previous,
                to: from,
            });
        }
        None
    }

    /// The moment [`poll`](Self::poll) must be called next, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.up {
            self.last_authenticated.map(|t| t + self.timeout)
        } else {
            None
        }
    }

    /// Advances time: the link goes down once `link_timeout` has passed since
    /// the last authenticated packet.
    pub fn poll(&mut self, now: Instant) -> Option<LinkTransition> {
        match self.next_deadline() {
            Some(deadline) if now >= deadline => self.down(DownReason::Timeout),
            _ => None,
        }
    }

    /// The device was deleted or the gateway is stopping.
    pub fn close(&mut self, reason: DownReason) -> Option<LinkTransition> {
        self.down(reason)
    }

    fn down(&mut self, reason: DownReason) -> Option<LinkTransition> {
        if !self.up {
            return None;
        }
        self.up = false;
        self.up_since = None;
        Some(LinkTransition::Down {
            endpoint: self.endpoint,
            reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    const T: Duration = Duration::from_secs(90);

    #[test]
    fn handshake_alone_does_not_bring_the_link_up() {
        let t0 = Instant::now();
        let e = addr("192.0.2.1:1000");
        let mut l = LinkState::new(T, e);
        assert_eq!(l.on_authenticated(t0, e, false), None);
        assert!(!l.is_up());
        assert_eq!(l.next_deadline(), None);
        assert_eq!(l.poll(t0 + Duration::from_secs(1000)), None);
    }

    #[test]
    fn up_on_first_transport_packet_then_down_after_timeout() {
        let t0 = Instant::now();
        let e = addr("192.0.2.1:1000");
        let mut l = LinkState::new(T, e);
        // An authenticated handshake response is not a transport packet.
        assert_eq!(l.on_authenticated(t0, e, false), None);
        assert_eq!(
            l.on_authenticated(t0 + Duration::from_millis(10), e, true),
            Some(LinkTransition::Up { endpoint: e })
        );
        assert_eq!(l.up_since(), Some(t0 + Duration::from_millis(10)));
        // Keepalives every 25 s keep it up.
        let mut t = t0 + Duration::from_millis(10);
        for _ in 0..10 {
            t += Duration::from_secs(25);
            assert_eq!(l.poll(t), None);
            assert_eq!(l.on_authenticated(t, e, true), None);
        }
        assert_eq!(l.next_deadline(), Some(t + T));
        assert_eq!(l.poll(t + T - Duration::from_millis(1)), None);
        assert_eq!(
            l.poll(t + T),
            Some(LinkTransition::Down {
                endpoint: e,
                reason: DownReason::Timeout
            })
        );
        assert!(!l.is_up());
        // Down only once.
        assert_eq!(l.poll(t + T * 2), None);
        assert_eq!(l.close(DownReason::Revoked), None);
        // Back up on the next authenticated transport packet.
        assert_eq!(
            l.on_authenticated(t + T * 3, e, true),
            Some(LinkTransition::Up { endpoint: e })
        );
    }

    #[test]
    fn roaming_is_reported_only_while_up() {
        let t0 = Instant::now();
        let a = addr("192.0.2.1:1000");
        let b = addr("198.51.100.7:2000");
        let mut l = LinkState::new(T, a);
        // A handshake response from elsewhere moves the endpoint silently
        // while the link is down.
        assert_eq!(l.on_authenticated(t0, b, false), None);
        assert_eq!(l.endpoint(), b);
        assert_eq!(
            l.on_authenticated(t0, a, true),
            Some(LinkTransition::Up { endpoint: a })
        );
        assert_eq!(
            l.on_authenticated(t0 + Duration::from_secs(1), b, true),
            Some(LinkTransition::Roamed { from: a, to: b })
        );
        assert_eq!(l.endpoint(), b);
        assert_eq!(
            l.on_authenticated(t0 + Duration::from_secs(2), b, true),
            None
        );
    }

    #[test]
    fn revoke_and_shutdown_close_an_up_link() {
        let t0 = Instant::now();
        let e = addr("192.0.2.1:1000");
        let mut l = LinkState::new(T, e);
        l.on_authenticated(t0, e, true);
        assert_eq!(
            l.close(DownReason::Revoked),
            Some(LinkTransition::Down {
                endpoint: e,
                reason: DownReason::Revoked
            })
        );
        let mut l = LinkState::new(T, e);
        l.on_authenticated(t0, e, true);
        assert_eq!(
            l.close(DownReason::Shutdown),
            Some(LinkTransition::Down {
                endpoint: e,
                reason: DownReason::Shutdown
            })
        );
    }
}
