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
//!   the link is up; at most one a [`ROAM_INTERVAL`] (issue "Hold up under
//!   abuse": a device sending from 50 source ports made 628,133 events in
//!   10 s). Roams inside the interval are counted and announced together
//!   once it has passed (at the next poll), from the endpoint last
//!   announced to the current one; a device back where it was announced
//!   announces nothing.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// At most one `link.roamed` a device in this long.
pub const ROAM_INTERVAL: Duration = Duration::from_secs(1);

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
        /// Endpoint changes this announcement stands for (1 but when
        /// roams were coalesced).
        count: u32,
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
    /// The endpoint consumers last heard of (at link-up or a roam).
    announced: SocketAddr,
    /// When the last roam was announced.
    roam_announced_at: Option<Instant>,
    /// Roams since then, not announced yet.
    roams_pending: u32,
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
            announced: endpoint,
            roam_announced_at: None,
            roams_pending: 0,
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
            self.announced = from;
            self.roams_pending = 0;
            return Some(LinkTransition::Up { endpoint: from });
        }
        if self.up && previous != from {
            self.roams_pending += 1;
            if self
                .roam_announced_at
                .is_none_or(|t| now.duration_since(t) >= ROAM_INTERVAL)
            {
                return self.announce_roam(now);
            }
        }
        None
    }

    /// The roams counted since the last announcement, as one, if the
    /// endpoint is not the one announced.
    fn announce_roam(&mut self, now: Instant) -> Option<LinkTransition> {
        if self.roams_pending == 0 || self.endpoint == self.announced {
            // Back where consumers think it is: nothing to say yet (the
            // count waits for the next announcement).
            return None;
        }
        let count = std::mem::take(&mut self.roams_pending);
        let from = std::mem::replace(&mut self.announced, self.endpoint);
        self.roam_announced_at = Some(now);
        Some(LinkTransition::Roamed {
            from,
            to: self.endpoint,
            count,
        })
    }

    /// The moment [`poll`](Self::poll) must be called next, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        if !self.up {
            return None;
        }
        let timeout = self.last_authenticated.map(|t| t + self.timeout);
        let roam = match (self.roams_pending, self.roam_announced_at) {
            (0, _) | (_, None) => None,
            (_, Some(t)) => Some(t + ROAM_INTERVAL),
        };
        match (timeout, roam) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Advances time: the link goes down once `link_timeout` has passed since
    /// the last authenticated packet; coalesced roams are announced once
    /// the roam interval has passed.
    pub fn poll(&mut self, now: Instant) -> Option<LinkTransition> {
        if !self.up {
            return None;
        }
        if self
            .last_authenticated
            .is_some_and(|t| now >= t + self.timeout)
        {
            return self.down(DownReason::Timeout);
        }
        if self.roams_pending > 0
            && self
                .roam_announced_at
                .is_some_and(|t| now.duration_since(t) >= ROAM_INTERVAL)
        {
            return self.announce_roam(now);
        }
        None
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
        self.roams_pending = 0;
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
            Some(LinkTransition::Roamed {
                from: a,
                to: b,
                count: 1
            })
        );
        assert_eq!(l.endpoint(), b);
        assert_eq!(
            l.on_authenticated(t0 + Duration::from_secs(2), b, true),
            None
        );
    }

    #[test]
    fn roams_are_announced_at_most_once_a_second_with_a_count() {
        let t0 = Instant::now();
        let port = |p: u16| addr(&format!("192.0.2.1:{p}"));
        let mut l = LinkState::new(T, port(1000));
        l.on_authenticated(t0, port(1000), true);
        // 50 source ports, 10 packets each per second, for 10 s.
        let mut announced = Vec::new();
        let mut t = t0;
        for i in 0..5000u32 {
            t = t0 + Duration::from_millis(2 * i as u64);
            if let Some(tr) = l.on_authenticated(t, port(2000 + (i % 50) as u16), true) {
                announced.push((t, tr));
            }
            if let Some(tr) = l.poll(t) {
                announced.push((t, tr));
            }
        }
        // A poll after the last interval announces what is left.
        if let Some(tr) = l.poll(t + ROAM_INTERVAL) {
            announced.push((t + ROAM_INTERVAL, tr));
        }
        assert!(announced.len() <= 11, "{}", announced.len());
        for w in announced.windows(2) {
            assert!(w[1].0.duration_since(w[0].0) >= ROAM_INTERVAL);
        }
        let total: u32 = announced
            .iter()
            .map(|(_, tr)| match tr {
                LinkTransition::Roamed { count, .. } => *count,
                other => panic!("{other:?}"),
            })
            .sum();
        // Every change is counted in some announcement, but for those since
        // the last one if the device sits where that one said.
        assert!((4000..=5000).contains(&total), "{total}");
        // The last announcement names where the device is now.
        match announced.last().unwrap().1 {
            LinkTransition::Roamed { to, .. } => assert_eq!(to, l.endpoint()),
            _ => unreachable!(),
        }
        // Back where it was announced within an interval: nothing to say.
        let here = l.endpoint();
        let t2 = t + ROAM_INTERVAL * 3;
        l.poll(t2);
        assert!(l.on_authenticated(t2, port(9), true).is_some());
        assert_eq!(
            l.on_authenticated(t2 + Duration::from_millis(10), here, true),
            None
        );
        assert_eq!(
            l.on_authenticated(t2 + Duration::from_millis(20), port(9), true),
            None
        );
        assert_eq!(l.poll(t2 + ROAM_INTERVAL), None);
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
