//! The packet path: WireGuard datagrams in, WireGuard datagrams and link
//! events out. One file per stage, in the order a datagram meets them:
//!
//! - [`receive`]: classify a datagram and hand it to the right stage;
//! - [`admission`]: MACs, the load decision, cookie replies, and the bounded
//!   queue initiations wait in;
//! - [`handshake`]: learn the initiator's key, check the registry, create
//!   or reuse the device's session, answer;
//! - [`transport`]: decrypt in the device's session (found in O(1) from the
//!   receiver index), learn the endpoint (roaming), enforce cryptokey routing,
//!   deliver packets addressed to the gateway;
//! - [`send`]: encrypt IP packets from the gateway to a device, under the
//!   session lock held once;
//! - [`timers`]: boringtun's timers and the link timeout for every session;
//! - [`initiate`]: after a restart, handshakes the gateway initiates itself
//!   to the devices that were connected;
//! - [`udp_io`]: the only part that touches sockets: worker threads that
//!   move datagrams between the UDP socket and the stages above.
//!
//! Everything but `udp_io` is sans-IO: it takes `now` and bytes and writes
//! what must go out into a [`Transmit`], so tests drive it without sockets.
//! (boringtun's own timers read the clock internally; our link state does
//! not.)

pub mod admission;
pub mod handshake;
pub mod initiate;
pub mod receive;
pub mod send;
pub mod timers;
pub mod transport;
pub mod udp_io;

use boringtun::noise::rate_limiter::RateLimiter;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::bus::event::{Event, Link};
use crate::bus::EventBus;
use crate::link_state::{DownReason, LinkTransition};
use crate::metrics::Metrics;
use crate::session_table::{Session, SessionTable};

/// Largest UDP payload, plus room for boringtun's overhead.
pub const BUF_SIZE: usize = 65_536 + 64;

/// Where the packet path writes datagrams that must leave: the I/O layer's
/// one egress (which counts what it sends).
pub trait Transmit {
    fn send(&mut self, to: SocketAddr, datagram: &[u8]);
    /// Sends what is held back now. The transport stage calls it before it
    /// releases a session whose sink answered, so that output made for the
    /// device elsewhere right after cannot overtake the answers.
    fn flush(&mut self) {}
}

/// Test and collection helper: keeps every datagram.
impl Transmit for Vec<(SocketAddr, Vec<u8>)> {
    fn send(&mut self, to: SocketAddr, datagram: &[u8]) {
        self.push((to, datagram.to_vec()));
    }
}

/// Receives the IP packets devices send to the gateway's tunnel address
/// (the relay's TCP/IP stacks plug in here). Called on the packet path with
/// the device's session locked: it must not block, and may take only locks
/// that come after the session's (a stack's, leaf locks). What it sends
/// through `answer` is encrypted under that same lock and leaves with the
/// worker's batch.
pub trait TunnelSink: Send + Sync + 'static {
    fn deliver(&self, session: &Arc<Session>, packet: &[u8], answer: &dyn crate::egress::Egress);

    /// Called by a receive worker after each batch, on its thread, with no
    /// lock held: a sink that put answers off (one ACK for a burst of
    /// segments) sends them now.
    fn end_of_batch(&self) {}
}

/// Told when a device's link goes up or down (device status builds on it).
/// Called with the session's lock held: it must not block or call back into
/// the packet path.
pub trait LinkObserver: Send + Sync + 'static {
    /// `down` says why a link went down (`None` when it came up).
    fn link_changed(
        &self,
        session: &Session,
        up: bool,
        endpoint: SocketAddr,
        down: Option<DownReason>,
    );
}

/// Several observers, told in order.
pub struct Observers(pub Vec<Arc<dyn LinkObserver>>);

impl LinkObserver for Observers {
    fn link_changed(
        &self,
        session: &Session,
        up: bool,
        endpoint: SocketAddr,
        down: Option<DownReason>,
    ) {
        for o in &self.0 {
            o.link_changed(session, up, endpoint, down);
        }
    }
}

/// Settings of the packet path.
#[derive(Debug, Clone)]
pub struct PacketPathConfig {
    pub link_timeout: Duration,
    /// Handshake initiations per second, gateway-wide, above which the
    /// gateway counts itself under load and answers with cookie replies
    /// (0: only the queue decides).
    pub handshake_rate_limit: u64,
    /// Initiations that may wait for a worker; under load from 1/8 full.
    pub handshake_queue: usize,
    /// boringtun's warnings are shown (`--log ...,boringtun=warn`): the
    /// timer pass then runs each session's timers inside a span naming the
    /// device, since boringtun's messages name none. Off by default: that
    /// span per session per pass was 3-4 % of a core for 100,000 idle
    /// devices.
    pub name_boringtun_warnings: bool,
}

/// State shared by all packet workers, the timer driver and the API.
pub struct PacketPath {
    pub(crate) secret: StaticSecret,
    pub(crate) public: PublicKey,
    pub(crate) gateway_address: Ipv4Addr,
    /// A limiter that always reports load: demands mac2, writes cookie
    /// replies (see `admission`).
    pub(crate) cookie_limiter: RateLimiter,
    /// A limiter that never reports load: checks mac1 only. Admission uses
    /// it when not under load, and every `Tunn` gets it (boringtun
    /// re-verifies handshakes inside `decapsulate`).
    pub(crate) tunn_limiter: Arc<RateLimiter>,
    /// Admitted initiations waiting for a worker.
    pub handshakes: admission::HandshakeQueue,
    pub(crate) rate_window: admission::RateWindow,
    /// Unknown sources' initiation budgets under load.
    pub(crate) source_budget: admission::SourceBudget,
    pub sessions: SessionTable,
    /// Who may connect (kept current by the fleet reactor).
    pub directory: Arc<crate::directory::Directory>,
    pub events: Arc<dyn EventBus>,
    pub metrics: Arc<Metrics>,
    pub(crate) config: PacketPathConfig,
    pub(crate) sink: OnceLock<Arc<dyn TunnelSink>>,
    pub(crate) observer: OnceLock<Arc<dyn LinkObserver>>,
    /// How far `link.up` and `link.down` published here go: everywhere
    /// (unset), or in cluster mode this gateway only, because the ownership
    /// directory announces them cluster-wide once its write has landed
    /// (`cluster::ownership`).
    link_reach: OnceLock<crate::bus::Reach>,
    /// The socket `send` uses for packets that do not answer a datagram
    /// (the I/O layer's; set when the packet threads start).
    /// Weak: the packet threads own the socket, so stopping them closes it
    /// even while other parts (relay stacks) still hold the packet path.
    pub(crate) egress: OnceLock<std::sync::Weak<std::net::UdpSocket>>,
    /// (monotonic, wall) at the same moment: see [`wall`](Self::wall).
    wall_anchor: parking_lot::RwLock<(Instant, SystemTime)>,
    /// Per-device bandwidth limits (kept current by the fleet reactor; the
    /// relay shapes with them, the sink polices with them).
    pub limits: crate::relay::rate_limit::RateLimits,
}

impl PacketPath {
    pub fn new(
        secret: StaticSecret,
        gateway_address: Ipv4Addr,
        directory: Arc<crate::directory::Directory>,
        events: Arc<dyn EventBus>,
        metrics: Arc<Metrics>,
        config: PacketPathConfig,
    ) -> Self {
        let public = PublicKey::from(&secret);
        PacketPath {
            cookie_limiter: RateLimiter::new(&public, 0),
            tunn_limiter: Arc::new(RateLimiter::new(&public, u64::MAX)),
            handshakes: admission::HandshakeQueue::new(config.handshake_queue),
            rate_window: Default::default(),
            source_budget: Default::default(),
            secret,
            public,
            gateway_address,
            sessions: SessionTable::new(),
            directory,
            events,
            metrics,
            config,
            sink: OnceLock::new(),
            observer: OnceLock::new(),
            link_reach: OnceLock::new(),
            egress: OnceLock::new(),
            // Set-up, not a stage: the I/O layer re-anchors from then on.
            wall_anchor: parking_lot::RwLock::new((Instant::now(), SystemTime::now())),
            limits: Default::default(),
        }
    }

    pub fn public_key(&self) -> PublicKey {
        self.public
    }
    pub fn gateway_address(&self) -> Ipv4Addr {
        self.gateway_address
    }

    /// Lets the sink send what it put off during a receive batch (see
    /// [`TunnelSink::end_of_batch`]).
    pub fn end_of_batch(&self) {
        if let Some(sink) = self.sink.get() {
            sink.end_of_batch();
        }
    }

    /// Plugs in the receiver of packets addressed to the gateway. Once.
    pub fn set_sink(&self, sink: Arc<dyn TunnelSink>) -> Result<(), Arc<dyn TunnelSink>> {
        self.sink.set(sink)
    }

    /// Plugs in the observer of link changes. Once.
    pub fn set_link_observer(&self, observer: Arc<dyn LinkObserver>) {
        let _ = self.observer.set(observer);
    }

    /// Cluster mode: link-ups and link-downs are announced cluster-wide by
    /// the ownership directory, not here. Once.
    pub fn set_link_reach(&self, reach: crate::bus::Reach) {
        let _ = self.link_reach.set(reach);
    }

    /// The egress socket, while the packet threads run.
    pub fn egress_socket(&self) -> Option<Arc<std::net::UdpSocket>> {
        self.egress.get()?.upgrade()
    }

    /// Sets the socket used by [`send`](Self::with_session_egress). Once.
    pub fn set_egress(&self, socket: &Arc<std::net::UdpSocket>) {
        let _ = self.egress.set(Arc::downgrade(socket));
    }

    /// Publishes a link transition of `session` made at `at` (its state
    /// already changed: see the ordering invariant in `bus`).
    pub(crate) fn announce(&self, session: &Session, t: LinkTransition, at: SystemTime) {
        match t {
            LinkTransition::Up { endpoint } => {
                self.metrics.sessions.inc();
                tracing::info!(device = %session.uuid, %endpoint, "link up");
                self.publish(
                    session,
                    Event::LinkUp,
                    endpoint,
                    "handshake",
                    None,
                    None,
                    at,
                );
                if let Some(o) = self.observer.get() {
                    o.link_changed(session, true, endpoint, None);
                }
            }
            LinkTransition::Down { endpoint, reason } => {
                self.metrics.sessions.dec();
                if reason == DownReason::Moved {
                    // Not down: the gateway that took it over announces
                    // `link.moved`.
                    tracing::info!(device = %session.uuid, %endpoint, "link moved to another gateway; session dropped here");
                } else {
                    tracing::info!(device = %session.uuid, %endpoint, reason = reason.as_str(), "link down");
                    self.publish(
                        session,
                        Event::LinkDown,
                        endpoint,
                        reason.as_str(),
                        None,
                        None,
                        at,
                    );
                }
                if let Some(o) = self.observer.get() {
                    o.link_changed(session, false, endpoint, Some(reason));
                }
            }
            LinkTransition::Roamed { from, to, count } => {
                // At most one a second per device (link_state); DEBUG, as a
                // device can change ports many times a second.
                tracing::debug!(device = %session.uuid, %from, %to, count, "link roamed");
                self.publish(
                    session,
                    Event::LinkRoamed,
                    to,
                    "endpoint_changed",
                    Some(from),
                    Some(count),
                    at,
                );
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn publish(
        &self,
        session: &Session,
        kind: fn(Link) -> Event,
        endpoint: SocketAddr,
        reason: &str,
        previous: Option<SocketAddr>,
        roams: Option<u32>,
        at: SystemTime,
    ) {
        let event = kind(Link {
            endpoint: endpoint.to_string(),
            reason: reason.to_string(),
            previous_endpoint: previous.map(|p| p.to_string()),
            address: session.address.to_string(),
            roams,
        });
        // Only the device's gateway sees it roam: that goes everywhere.
        // Ups and downs go as far as `link_reach` says.
        let reach = match event {
            Event::LinkRoamed(_) => crate::bus::Reach::Cluster,
            _ => self.reach(),
        };
        if reach == crate::bus::Reach::Cluster {
            self.metrics.link_event(event.kind());
        }
        self.events
            .publish_reach(Some(&session.uuid), event, at, reach);
    }

    fn reach(&self) -> crate::bus::Reach {
        self.link_reach
            .get()
            .copied()
            .unwrap_or(crate::bus::Reach::Cluster)
    }

    /// The wall-clock time of `now`, from the anchor the I/O layer keeps
    /// current ([`anchor_wall_clock`](Self::anchor_wall_clock)): stages never
    /// read a clock, so simulated time gives simulated timestamps.
    pub fn wall(&self, now: Instant) -> SystemTime {
        let (mono, wall) = *self.wall_anchor.read();
        match now.checked_duration_since(mono) {
            Some(d) => wall + d,
            None => wall - mono.duration_since(now),
        }
    }

    /// Ties `mono` to `wall`. The I/O layer calls it at start and then
    /// about once a second, so NTP corrections reach event timestamps.
    pub fn anchor_wall_clock(&self, mono: Instant, wall: SystemTime) {
        *self.wall_anchor.write() = (mono, wall);
    }

    /// Forgets a deleted device: its session goes at once and, if its link
    /// was up, `link.down` (`revoked`) is published. The fleet reactor calls
    /// it on `device.deleted`.
    pub fn revoke(&self, uuid: &str, now: Instant) {
        self.drop_session(uuid, DownReason::Revoked, now);
    }

    /// Cluster mode: another gateway took the device over. Its session
    /// here goes at once, without a `link.down` (the device is not down:
    /// the other gateway announces `link.moved`).
    pub fn hand_over(&self, uuid: &str, now: Instant) {
        self.drop_session(uuid, DownReason::Moved, now);
    }

    fn drop_session(&self, uuid: &str, reason: DownReason, now: Instant) {
        if let Some(session) = self.sessions.by_uuid(uuid) {
            // Out of the table first (shard locks), then the session's state:
            // never a shard lock under a session lock.
            self.sessions.remove(&session);
            let mut st = session.state.lock();
            if let Some(t) = st.link.close(reason) {
                st.connected_since = None;
                self.announce(&session, t, self.wall(now));
            }
        }
    }

    /// Cluster mode, a clean stop that hands devices over: every session
    /// goes without a `link.down` (the gateways that redial the devices
    /// announce `link.moved`). The up links' (uuid, endpoint), for the
    /// hand-over message.
    pub fn hand_over_all(&self, now: Instant) -> Vec<(String, String)> {
        let mut all = Vec::new();
        self.sessions.collect_into(&mut all);
        let mut up = Vec::new();
        for session in all {
            let mut st = session.state.lock();
            let endpoint = st.link.endpoint();
            if let Some(t) = st.link.close(DownReason::Moved) {
                st.connected_since = None;
                up.push((session.uuid.to_string(), endpoint.to_string()));
                self.announce(&session, t, self.wall(now));
            }
        }
        up
    }

    /// Clean shutdown: every up link goes down with reason `shutdown`.
    pub fn shutdown(&self, now: Instant) {
        let mut all = Vec::new();
        self.sessions.collect_into(&mut all);
        for session in all {
            let mut st = session.state.lock();
            if let Some(t) = st.link.close(crate::link_state::DownReason::Shutdown) {
                st.connected_since = None;
                self.announce(&session, t, self.wall(now));
            }
        }
    }
}

/// Normalises an IPv4-mapped IPv6 source (from a dual-stack socket).
#[inline]
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}
