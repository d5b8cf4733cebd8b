//! The relay: TCP streams from internal services to TCP ports on devices,
//! through the devices' WireGuard sessions, with no TUN device and no root.
//!
//! - [`netstack`]: the userspace TCP/IP stack (smoltcp), one per peer;
//! - [`stream`]: the shared stack and the loop that relays one stream;
//! - [`proxy`]: the HTTP CONNECT proxy in front of it;
//! - [`icmp`]: echo replies on the gateway's tunnel address;
//! - [`rate_limit`]: per-device bandwidth limits (shaped streams, policed
//!   other traffic).
//!
//! The gateway keeps one small stack per stream (created with the stream,
//! dropped when it ends), found from an inbound segment by device and port,
//! fed by the packet path through [`TunnelSink`]. When a device's link goes
//! down or the device is deleted, its stacks are killed and its streams end.

pub mod icmp;
pub mod netstack;
pub mod proxy;
pub mod rate_limit;
pub mod stream;

use dashmap::DashMap;
use smoltcp::iface::SocketHandle;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::egress::Egress;
use crate::metrics::{DropReason, Metrics};
use crate::packet_path::{LinkObserver, PacketPath, TunnelSink};
use crate::registry::Registry;
use crate::session_table::Session;
use netstack::NetStack;
use stream::{SharedStack, Wire};

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConnectError {
    #[error("no device with that uuid is registered")]
    UnknownDevice,
    #[error("the device's cloudlink is down, so SSH and immediate actions are unavailable")]
    LinkDown,
    #[error("the device refused the connection")]
    Refused,
    #[error("the device did not answer in time")]
    Timeout,
    /// A bound on open streams (the device's or the gateway's) is reached.
    #[error("{0}")]
    TooManyStreams(String),
    #[error("{0}")]
    Internal(String),
}

/// A stream's way to its device: the device's current WireGuard session,
/// locked before the stack (the lock order is session, then stack, as on
/// the packet path, which feeds a stack with the session locked).
struct SessionWire {
    path: Arc<PacketPath>,
    uuid: Box<str>,
}

impl Wire for SessionWire {
    fn with_egress(&self, f: &mut dyn FnMut(&dyn Egress)) {
        // The table's shard lock is released before the session is locked.
        match self.path.sessions.by_uuid(&self.uuid) {
            Some(session) => self.path.with_session_egress(&session, f),
            // No session: the link is down and the stream is ending.
            None => f(&crate::egress::Unreachable),
        }
    }
}

pub struct Relay {
    path: Arc<PacketPath>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    /// Streams by device uuid, then by the gateway's local port.
    devices: DashMap<Box<str>, Arc<DeviceStreams>>,
    /// Devices whose link went down, and when: the link observer is called
    /// under the session's lock, where no shard lock may be taken, so it
    /// only queues here (a leaf lock) and [`sweep`](Relay::sweep) ends the
    /// streams.
    down: parking_lot::Mutex<Vec<(Box<str>, Instant)>>,
    wake: Arc<tokio::sync::Notify>,
    pub connect_timeout: Duration,
    max_streams: AtomicUsize,
    max_device_streams: AtomicUsize,
}

impl Drop for Relay {
    fn drop(&mut self) {
        // Ends the sweeper task.
        self.wake.notify_one();
    }
}

/// The streams of one device: one stack each, keyed by the gateway's local
/// port (the destination port of the device's segments), so an inbound
/// segment finds its stack in O(1).
struct DeviceStreams {
    /// When this entry was made: a link-down queued before it does not end
    /// its streams.
    created: Instant,
    streams: DashMap<u16, Arc<SharedStack>>,
    next_port: AtomicU16,
    /// Paces all of the device's streams together (see `netstack::Pacer`).
    pacer: netstack::SharedPacer,
}

impl Default for DeviceStreams {
    fn default() -> Self {
        DeviceStreams {
            created: Instant::now(),
            streams: DashMap::new(),
            next_port: AtomicU16::new(0),
            pacer: netstack::new_pacer(Instant::now()),
        }
    }
}

/// Local ports the gateway uses towards a device.
const PORTS: std::ops::RangeInclusive<u16> = 49152..=65535;

/// One open stream: keeps its stack alive and gives the socket back when
/// dropped.
pub struct OpenStream {
    pub stack: Arc<SharedStack>,
    pub handle: SocketHandle,
    metrics: Arc<Metrics>,
    pub device: String,
    /// The device's bandwidth limiter (shared by its streams; a limit set
    /// while the stream runs applies to it).
    pub limiter: Arc<rate_limit::DeviceLimiter>,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.stack.release(self.handle);
        self.stack.open_streams.fetch_sub(1, Ordering::AcqRel);
        self.metrics.relay_streams.dec();
    }
}

impl Relay {
    pub fn new(
        path: Arc<PacketPath>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        connect_timeout: Duration,
    ) -> Arc<Self> {
        let relay = Arc::new(Relay {
            path,
            registry,
            metrics,
            devices: DashMap::new(),
            down: Default::default(),
            wake: Default::default(),
            connect_timeout,
            max_streams: AtomicUsize::new(usize::MAX),
            max_device_streams: AtomicUsize::new(usize::MAX),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (wake, weak) = (relay.wake.clone(), Arc::downgrade(&relay));
            rt.spawn(async move {
                loop {
                    wake.notified().await;
                    match weak.upgrade() {
                        Some(r) => r.sweep(),
                        None => return,
                    }
                }
            });
        }
        relay
    }

    /// Ends the streams of devices whose link went down.
    fn sweep(&self) {
        let down = std::mem::take(&mut *self.down.lock());
        for (uuid, at) in down {
            if let Some((_, d)) = self.devices.remove_if(&uuid, |_, d| d.created <= at) {
                d.streams.iter().for_each(|s| s.kill());
            }
            self.path.limits.release(&uuid);
        }
    }

    /// Bounds on open streams: in all, and per device (`--max-relay-streams`,
    /// `--max-device-streams`). Unbounded until set.
    pub fn set_stream_limits(&self, total: usize, per_device: usize) {
        self.max_streams.store(total, Ordering::Relaxed);
        self.max_device_streams.store(per_device, Ordering::Relaxed);
    }

    /// Opens a TCP connection to `port` on device `uuid`.
    pub async fn connect(
        self: &Arc<Self>,
        uuid: &str,
        port: u16,
    ) -> Result<OpenStream, ConnectError> {
        let registry = self.registry.clone();
        let u = uuid.to_owned();
        let device = tokio::task::spawn_blocking(move || registry.get(&u))
            .await
            .map_err(|e| ConnectError::Internal(e.to_string()))?
            .map_err(|e| ConnectError::Internal(e.to_string()))?
            .ok_or(ConnectError::UnknownDevice)?;
        let session = self
            .path
            .sessions
            .by_uuid(uuid)
            .filter(|s| s.is_connected());
        let Some(session) = session else {
            return Err(ConnectError::LinkDown);
        };
        let total = self.metrics.relay_streams.get().max(0) as usize;
        let max_total = self.max_streams.load(Ordering::Relaxed);
        if total >= max_total {
            return Err(ConnectError::TooManyStreams(format!(
                "the gateway has {total} relay streams open, its limit (--max-relay-streams {max_total}); retry later"
            )));
        }
        // Link-downs queued so far are applied before a new entry is made.
        self.sweep();
        let streams = self
            .devices
            .entry(session.uuid.clone())
            .or_insert_with(|| {
                let d = DeviceStreams::default();
                let mut seed = [0u8; 2];
                rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut seed);
                d.next_port
                    .store(u16::from_le_bytes(seed), Ordering::Relaxed);
                Arc::new(d)
            })
            .clone();
        let max_device = self.max_device_streams.load(Ordering::Relaxed);
        if streams.streams.len() >= max_device {
            return Err(ConnectError::TooManyStreams(format!(
                "device {uuid} has {} relay streams open, its limit (--max-device-streams {max_device}); close one or retry later",
                streams.streams.len()
            )));
        }
        let stack = SharedStack::new(
            NetStack::new(
                self.path.gateway_address(),
                Instant::now(),
                streams.pacer.clone(),
            ),
            Arc::new(SessionWire {
                path: self.path.clone(),
                uuid: session.uuid.clone(),
            }),
        );
        stack.open_streams.store(1, Ordering::Release);
        // Registered before the SYN leaves, so the SYN-ACK finds it.
        let local_port = (0..=(PORTS.end() - PORTS.start()))
            .find_map(|_| {
                let n = streams.next_port.fetch_add(1, Ordering::Relaxed);
                let p = PORTS.start() + n % (PORTS.end() - PORTS.start() + 1);
                match streams.streams.entry(p) {
                    dashmap::Entry::Vacant(v) => {
                        v.insert(stack.clone());
                        Some(p)
                    }
                    dashmap::Entry::Occupied(_) => None,
                }
            })
            .ok_or_else(|| {
                ConnectError::Internal("no free local port towards the device".into())
            })?;
        self.metrics.relay_streams.inc();
        {
            let streams = streams.clone();
            let me = stack.clone();
            tokio::spawn(stack.clone().run_timers(move || {
                streams
                    .streams
                    .remove_if(&local_port, |_, s| Arc::ptr_eq(s, &me));
                true
            }));
        }
        let handle = match stack.with(|s| Some(s.connect_from(local_port, (device.address, port))))
        {
            Some(Ok(h)) => h,
            other => {
                stack.kill();
                stack.open_streams.fetch_sub(1, Ordering::AcqRel);
                self.metrics.relay_streams.dec();
                let why = match other {
                    Some(Err(e)) => format!("connect: {e}"),
                    _ => "the stream's stack failed".to_owned(),
                };
                return Err(ConnectError::Internal(why));
            }
        };
        let open = OpenStream {
            stack: stack.clone(),
            handle,
            metrics: self.metrics.clone(),
            device: uuid.to_owned(),
            limiter: self.path.limits.stream_limiter(uuid),
        };
        // A link-down between the check above and the insert: kill now.
        if !session.is_connected() || self.devices.get(&*session.uuid).is_none() {
            stack.kill();
        }
        match tokio::time::timeout(self.connect_timeout, stack.established(handle)).await {
            Ok(Ok(())) => Ok(open),
            Ok(Err(_)) if stack.is_dead() => Err(ConnectError::LinkDown),
            Ok(Err(_)) => Err(ConnectError::Refused),
            Err(_) => Err(ConnectError::Timeout),
        }
    }

    /// Ends every stream (gateway shutdown).
    pub fn shutdown(&self) {
        let ids: Vec<Box<str>> = self.devices.iter().map(|e| e.key().clone()).collect();
        for id in ids {
            if let Some((_, d)) = self.devices.remove(&id) {
                d.streams.iter().for_each(|s| s.kill());
            }
        }
    }

    /// TCP states of every stream socket, per device (diagnostics).
    pub fn socket_states(&self) -> Vec<(String, Vec<String>)> {
        self.devices
            .iter()
            .map(|e| {
                let states = e
                    .value()
                    .streams
                    .iter()
                    .flat_map(|s| s.socket_states())
                    .collect();
                (e.key().to_string(), states)
            })
            .collect()
    }

    /// The device's current endpoint, if it has a session here (takes the
    /// session's lock: never call it holding one).
    pub fn endpoint_of(&self, uuid: &str) -> Option<String> {
        let session = self.path.sessions.by_uuid(uuid)?;
        Some(session.snapshot().endpoint.to_string())
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    pub fn count_bytes(&self, to_device: bool, n: u64) {
        if to_device {
            self.metrics.relay_bytes_to_device.inc_by(n);
        } else {
            self.metrics.relay_bytes_from_device.inc_by(n);
        }
    }
}

/// The destination port of a TCP segment in an IPv4 packet.
fn tcp_dst_port(packet: &[u8]) -> Option<u16> {
    let ihl = ((packet.first()? & 0x0f) as usize) * 4;
    let p = packet.get(ihl + 2..ihl + 4)?;
    Some(u16::from_be_bytes([p[0], p[1]]))
}

thread_local! {
    /// Stacks the current receive batch of this worker fed segments to,
    /// flushed at its end ([`TunnelSink::end_of_batch`]).
    static FED: std::cell::RefCell<Vec<Arc<SharedStack>>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl TunnelSink for Relay {
    fn end_of_batch(&self) {
        // Taken out of the cell first: a flush takes the session lock and
        // sends, and must not find the list borrowed.
        let mut fed = FED.with(|f| std::mem::take(&mut *f.borrow_mut()));
        for stack in fed.drain(..) {
            stack.flush();
        }
        // The (empty) vector goes back, keeping its capacity.
        FED.with(|f| {
            let mut f = f.borrow_mut();
            if f.is_empty() {
                *f = fed;
            }
        });
    }

    fn deliver(&self, session: &Arc<Session>, packet: &[u8], answer: &dyn Egress) {
        if packet.len() < 20 {
            self.metrics.dropped(DropReason::Unsupported);
            return;
        }
        match packet[9] {
            1 => {
                // Not a relay stream: policed by the device's limit, each
                // way (a leaf shard lock, taken only here).
                let limiter = self.path.limits.limiter(&session.uuid);
                let now = Instant::now();
                use rate_limit::Direction;
                if let Some(l) = &limiter {
                    if !l.admit(Direction::FromDevice, now, packet.len()) {
                        self.metrics.throttled(false, true, packet.len() as u64);
                        return;
                    }
                }
                let mut out = [0u8; 1500];
                match icmp::echo_reply(packet, &mut out) {
                    Some(n) => match &limiter {
                        Some(l) if !l.admit(Direction::ToDevice, now, n) => {
                            self.metrics.throttled(true, true, n as u64)
                        }
                        _ => answer.send(&out[..n]),
                    },
                    None => self.metrics.dropped(DropReason::Unsupported),
                }
            }
            6 => {
                // Shard locks are leaves: taken and released here, under the
                // session lock, before the stack's lock.
                let stack = tcp_dst_port(packet).and_then(|port| {
                    let d = self.devices.get(&*session.uuid)?;
                    let s = d.streams.get(&port)?;
                    Some(s.clone())
                });
                match stack {
                    // The ACK waits for the end of the receive batch: one
                    // for all the stream's segments in it.
                    Some(stack) => {
                        stack.ingest_with(packet, answer);
                        FED.with(|f| stack.note_fed(&mut f.borrow_mut()));
                    }
                    // A segment for a stream that no longer exists.
                    None => self.metrics.dropped(DropReason::NoStream),
                }
            }
            _ => self.metrics.dropped(DropReason::Unsupported),
        }
    }
}

impl LinkObserver for Relay {
    fn link_changed(
        &self,
        session: &Session,
        up: bool,
        _endpoint: std::net::SocketAddr,
        _down: Option<crate::link_state::DownReason>,
    ) {
        if !up {
            // Called with the session lock held: no shard lock here. Queue
            // it; the sweeper flags the stacks dead and their timer tasks
            // abort the streams (stack → session is the lock order
            // everywhere else).
            self.down
                .lock()
                .push((session.uuid.clone(), Instant::now()));
            self.wake.notify_one();
        }
    }
}
