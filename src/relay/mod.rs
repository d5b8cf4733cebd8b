//! The relay: TCP streams from internal services to TCP ports on devices,
//! through the devices' WireGuard sessions, with no TUN device and no root.
//!
//! - [`netstack`]: the userspace TCP/IP stack (smoltcp), one per peer;
//! - [`stream`]: the shared stack and the loop that relays one stream;
//! - [`proxy`]: the HTTP CONNECT proxy in front of it;
//! - [`icmp`]: echo replies on the gateway's tunnel address.
//!
//! The gateway keeps one stack per device that has streams (created on the
//! first stream, dropped when the last one ends), fed by the packet path
//! through [`TunnelSink`]. When a device's link goes down or the device is
//! deleted, its stack is killed and every stream on it ends.

pub mod icmp;
pub mod netstack;
pub mod proxy;
pub mod stream;

use dashmap::DashMap;
use smoltcp::iface::SocketHandle;
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics::{DropReason, Metrics};
use crate::packet_path::{LinkObserver, PacketPath, TunnelSink};
use crate::registry::Registry;
use crate::session_table::Session;
use netstack::{Egress, NetStack};
use stream::SharedStack;

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
    #[error("{0}")]
    Internal(String),
}

/// Sends a stack's packets into the device's WireGuard session.
struct SessionEgress {
    path: Arc<PacketPath>,
    address: Ipv4Addr,
}

impl Egress for SessionEgress {
    fn send(&self, packet: &[u8]) {
        let _ = self.path.send_ip(self.address, packet);
    }
}

pub struct Relay {
    path: Arc<PacketPath>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    /// Stacks by device id. Entries are added by `connect` and removed by
    /// the stack's own timer task (when idle) or a link-down (when dead),
    /// both under the map entry's lock, so a stack is never in use without
    /// being reachable by inbound packets.
    stacks: DashMap<u32, Arc<SharedStack>>,
    pub connect_timeout: Duration,
}

/// One open stream: keeps its stack alive and gives the socket back when
/// dropped.
pub struct OpenStream {
    pub stack: Arc<SharedStack>,
    pub handle: SocketHandle,
    metrics: Arc<Metrics>,
    pub device: String,
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
        Arc::new(Relay {
            path,
            registry,
            metrics,
            stacks: DashMap::new(),
            connect_timeout,
        })
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
        let stack = self.stack_for(&session);
        self.metrics.relay_streams.inc();
        let handle = match stack.with(|s| Some(s.connect((device.address, port)))) {
            Some(Ok(h)) => h,
            other => {
                stack.open_streams.fetch_sub(1, Ordering::AcqRel);
                self.metrics.relay_streams.dec();
                let why = match other {
                    Some(Err(e)) => format!("connect: {e}"),
                    _ => "the device's stack failed".to_owned(),
                };
                return Err(ConnectError::Internal(why));
            }
        };
        let open = OpenStream {
            stack: stack.clone(),
            handle,
            metrics: self.metrics.clone(),
            device: uuid.to_owned(),
        };
        match tokio::time::timeout(self.connect_timeout, stack.established(handle)).await {
            Ok(Ok(())) => Ok(open),
            Ok(Err(_)) if stack.is_dead() => Err(ConnectError::LinkDown),
            Ok(Err(_)) => Err(ConnectError::Refused),
            Err(_) => Err(ConnectError::Timeout),
        }
    }

    /// The device's stack, created if needed, with one more open stream
    /// counted (under the map entry's lock: see `stacks`).
    fn stack_for(self: &Arc<Self>, session: &Arc<Session>) -> Arc<SharedStack> {
        let id = session.device_id;
        let mut created = false;
        let stack = {
            let entry = self.stacks.entry(id).or_insert_with(|| {
                created = true;
                SharedStack::new(
                    NetStack::new(self.path.gateway_address(), Instant::now()),
                    Arc::new(SessionEgress {
                        path: self.path.clone(),
                        address: session.address,
                    }),
                )
            });
            entry.open_streams.fetch_add(1, Ordering::AcqRel);
            entry.clone()
        };
        if created {
            let relay = Arc::downgrade(self);
            let me = stack.clone();
            tokio::spawn(stack.clone().run_timers(move || {
                // Idle: no stream and no socket left. Leave the map only if
                // nobody took a stream meanwhile (checked under the lock).
                relay.upgrade().is_none_or(|r| {
                    r.stacks.remove_if(&id, |_, x| {
                        Arc::ptr_eq(x, &me) && x.open_streams.load(Ordering::Acquire) == 0
                    });
                    !r.stacks.get(&id).is_some_and(|x| Arc::ptr_eq(&x, &me))
                })
            }));
        }
        stack
    }

    /// Ends every stream (gateway shutdown).
    pub fn shutdown(&self) {
        let ids: Vec<u32> = self.stacks.iter().map(|e| *e.key()).collect();
        for id in ids {
            if let Some((_, stack)) = self.stacks.remove(&id) {
                stack.kill();
            }
        }
    }

    /// TCP states of every stream socket, per device id (diagnostics).
    pub fn socket_states(&self) -> Vec<(u32, Vec<String>)> {
        self.stacks
            .iter()
            .map(|e| (*e.key(), e.value().socket_states()))
            .collect()
    }

    /// Number of device stacks alive (for tests and metrics).
    pub fn stacks(&self) -> usize {
        self.stacks.len()
    }

    pub fn count_bytes(&self, to_device: bool, n: u64) {
        if to_device {
            self.metrics.relay_bytes_to_device.inc_by(n);
        } else {
            self.metrics.relay_bytes_from_device.inc_by(n);
        }
    }
}

impl TunnelSink for Relay {
    fn deliver(&self, session: &Arc<Session>, packet: &[u8]) {
        if packet.len() < 20 {
            self.metrics.dropped(DropReason::Unsupported);
            return;
        }
        match packet[9] {
            1 => {
                let mut out = [0u8; 1500];
                match icmp::echo_reply(packet, &mut out) {
                    Some(n) => {
                        let _ = self.path.send_ip_to_session(session, &out[..n]);
                    }
                    None => self.metrics.dropped(DropReason::Unsupported),
                }
            }
            6 => match self.stacks.get(&session.device_id).map(|s| s.clone()) {
                Some(stack) => stack.input(packet),
                // A segment for a stream we do not have (it ended): smoltcp
                // is not there to answer; the device times out or its RST
                // is lost, like a closed port behind a firewall.
                None => self.metrics.dropped(DropReason::NoStream),
            },
            _ => self.metrics.dropped(DropReason::Unsupported),
        }
    }
}

impl LinkObserver for Relay {
    fn link_changed(&self, session: &Session, up: bool) {
        if !up {
            // Called with the session lock held: only flag the stack; its
            // timer task aborts the streams (stack → session is the lock
            // order everywhere else).
            if let Some((_, stack)) = self.stacks.remove(&session.device_id) {
                stack.kill();
            }
        }
    }
}
