//! A userspace TCP/IP stack (smoltcp) for one tunnel peer: the gateway runs
//! one per device it has streams to, the agent one for its own tunnel
//! address. Sharding by peer keeps `Interface::poll` (which walks every
//! socket of its interface) proportional to that peer's streams, never to
//! all streams of the gateway.
//!
//! The stack is sans-IO: packets come in through [`NetStack::input`] and
//! leave through an [`Egress`] (the caller's WireGuard session); the caller
//! passes `now`. It never sleeps and never touches a socket.
//!
//! Two rules that keep throughput up in both directions (userspace
//! forwarders that break them collapse to a few Mbit/s one way):
//! - after every input and every write, run egress until the stack emits
//!   nothing more (smoltcp sends at most one segment per socket per pass);
//! - checksums are computed on transmit but not verified on receive: every
//!   packet arrived inside WireGuard, whose AEAD already authenticated it.

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Checksum, ChecksumCapabilities, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpEndpoint, Ipv4Address};
use std::net::Ipv4Addr;
use std::time::Instant;

/// Inner MTU of a WireGuard tunnel.
pub const MTU: usize = 1420;

/// Receive and send buffer of one stream. Sized for 50 Mbit/s over a 50 ms
/// round trip (312,500 bytes in flight), with room to spare.
pub const STREAM_BUFFER: usize = 384 * 1024;

/// Where the stack's outgoing IP packets go.
pub trait Egress: Send + Sync {
    fn send(&self, packet: &[u8]);
}

pub struct NetStack {
    iface: Interface,
    pub sockets: SocketSet<'static>,
    scratch: Vec<u8>,
    origin: Instant,
    next_port: u16,
    /// One socket in LISTEN per served port (smoltcp accepts one connection
    /// per listening socket).
    listeners: Vec<(u16, SocketHandle)>,
    /// Sockets that left LISTEN and were not handed out yet.
    pending: Vec<(u16, SocketHandle)>,
}

struct RxTok<'a>(&'a [u8]);
struct TxTok<'a> {
    scratch: &'a mut Vec<u8>,
    egress: &'a dyn Egress,
    emitted: &'a mut usize,
}

impl smoltcp::phy::RxToken for RxTok<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl smoltcp::phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        if self.scratch.len() < len {
            self.scratch.resize(len, 0);
        }
        let r = f(&mut self.scratch[..len]);
        self.egress.send(&self.scratch[..len]);
        *self.emitted += 1;
        r
    }
}

/// The device smoltcp sees for one call: at most one inbound packet,
/// borrowed (no copy, no queue), and a transmit path into `egress`.
struct Dev<'a> {
    rx: Option<&'a [u8]>,
    scratch: &'a mut Vec<u8>,
    egress: &'a dyn Egress,
    emitted: usize,
}

impl Device for Dev<'_> {
    type RxToken<'b>
        = RxTok<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = TxTok<'b>
    where
        Self: 'b;

    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(RxTok<'_>, TxTok<'_>)> {
        let p = self.rx.take()?;
        Some((
            RxTok(p),
            TxTok {
                scratch: self.scratch,
                egress: self.egress,
                emitted: &mut self.emitted,
            },
        ))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<TxTok<'_>> {
        Some(TxTok {
            scratch: self.scratch,
            egress: self.egress,
            emitted: &mut self.emitted,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = MTU;
        let mut cs = ChecksumCapabilities::default();
        cs.ipv4 = Checksum::Tx;
        cs.tcp = Checksum::Tx;
        cs.udp = Checksum::Tx;
        cs.icmpv4 = Checksum::Tx;
        caps.checksum = cs;
        caps
    }
}

struct NoEgress;
impl Egress for NoEgress {
    fn send(&self, _: &[u8]) {}
}

impl NetStack {
    /// A stack answering on `local`, reaching everything through the tunnel.
    pub fn new(local: Ipv4Addr, now: Instant) -> Self {
        let mut seed = [0u8; 8];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut seed);
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = u64::from_le_bytes(seed);
        let mut scratch = vec![0u8; MTU];
        let mut dev = Dev {
            rx: None,
            scratch: &mut scratch,
            egress: &NoEgress,
            emitted: 0,
        };
        let origin = now;
        let mut iface = Interface::new(config, &mut dev, smoltcp::time::Instant::from_micros(0));
        let addr: Ipv4Address = local;
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(addr), 32));
        });
        // Medium::Ip has no neighbours: any route sends into the tunnel.
        let _ = iface.routes_mut().add_default_ipv4_route(addr);
        NetStack {
            iface,
            sockets: SocketSet::new(Vec::new()),
            scratch,
            origin,
            next_port: 49152 + (u16::from_le_bytes([seed[0], seed[1]]) % 16000),
            listeners: Vec::new(),
            pending: Vec::new(),
        }
    }

    fn ts(&self, now: Instant) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(
            now.saturating_duration_since(self.origin).as_micros() as i64
        )
    }

    /// Feeds one inbound IP packet, then runs egress until nothing is left
    /// to send.
    pub fn input(&mut self, now: Instant, packet: &[u8], egress: &dyn Egress) {
        let ts = self.ts(now);
        let mut dev = Dev {
            rx: Some(packet),
            scratch: &mut self.scratch,
            egress,
            emitted: 0,
        };
        self.iface.poll(ts, &mut dev, &mut self.sockets);
        // A listener that took a SYN is replaced before the next packet, so
        // a burst of connections finds a listening socket for each.
        self.refresh_listeners();
        self.flush_with(ts, egress);
    }

    /// Serves connections on `port` (see [`take_accepted`](Self::take_accepted)).
    pub fn serve(&mut self, port: u16) -> Result<(), tcp::ListenError> {
        let h = self.listen(port)?;
        self.listeners.push((port, h));
        Ok(())
    }

    fn refresh_listeners(&mut self) {
        for i in 0..self.listeners.len() {
            let (port, h) = self.listeners[i];
            if self.tcp(h).state() != tcp::State::Listen {
                self.pending.push((port, h));
                if let Ok(n) = self.listen(port) {
                    self.listeners[i] = (port, n);
                }
            }
        }
    }

    /// True while connections are on their way in.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Established connections on served ports, handed out once each
    /// (connections that failed before establishing are dropped).
    pub fn take_accepted(&mut self, out: &mut Vec<(u16, SocketHandle)>) {
        let mut i = 0;
        while i < self.pending.len() {
            let (port, h) = self.pending[i];
            match self.tcp(h).state() {
                tcp::State::SynReceived => i += 1,
                tcp::State::Closed | tcp::State::TimeWait => {
                    self.sockets.remove(h);
                    self.pending.swap_remove(i);
                }
                _ => {
                    out.push((port, h));
                    self.pending.swap_remove(i);
                }
            }
        }
    }

    /// Runs timers and egress until the stack emits nothing more.
    pub fn poll(&mut self, now: Instant, egress: &dyn Egress) {
        let ts = self.ts(now);
        self.flush_with(ts, egress);
    }

    fn flush_with(&mut self, ts: smoltcp::time::Instant, egress: &dyn Egress) {
        loop {
            let mut dev = Dev {
                rx: None,
                scratch: &mut self.scratch,
                egress,
                emitted: 0,
            };
            self.iface.poll_egress(ts, &mut dev, &mut self.sockets);
            if dev.emitted == 0 {
                break;
            }
        }
    }

    /// How long until the stack needs [`poll`](Self::poll) again.
    pub fn poll_delay(&mut self, now: Instant) -> Option<std::time::Duration> {
        let ts = self.ts(now);
        self.iface
            .poll_delay(ts, &self.sockets)
            .map(|d| std::time::Duration::from_micros(d.total_micros()))
    }

    fn new_socket() -> tcp::Socket<'static> {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; STREAM_BUFFER]),
            tcp::SocketBuffer::new(vec![0u8; STREAM_BUFFER]),
        );
        // Interactive streams (SSH) want no Nagle delay; bulk streams fill
        // whole segments anyway.
        s.set_nagle_enabled(false);
        // No delayed ACKs. Besides a quicker ACK clock, this avoids a smoltcp
        // 0.12 panic ("attempt to subtract sequence numbers with
        // underflow" in `last_scaled_window`): with window scaling, the
        // advertised right edge can move back by a few bytes through
        // rounding, the peer may fill the older edge, and while that data is
        // unacknowledged `poll_at`/`dispatch` compute a negative window. With
        // immediate ACKs the data is acknowledged in the same locked `input`
        // call, before anything asks for the window.
        s.set_ack_delay(None);
        // Without congestion control smoltcp sends a full window at once;
        // a WireGuard peer's queues (wireguard-go, veth, TUN) drop part of
        // such bursts, and smoltcp then waits for retransmission timeouts.
        s.set_congestion_control(tcp::CongestionControl::Cubic);
        s.set_keep_alive(Some(smoltcp::time::Duration::from_secs(30)));
        s.set_timeout(Some(smoltcp::time::Duration::from_secs(120)));
        s
    }

    /// Opens a TCP connection to `remote`; returns its socket.
    pub fn connect(&mut self, remote: (Ipv4Addr, u16)) -> Result<SocketHandle, tcp::ConnectError> {
        let mut s = Self::new_socket();
        let port = self.take_port();
        s.connect(
            self.iface.context(),
            IpEndpoint::new(IpAddress::Ipv4(remote.0), remote.1),
            port,
        )?;
        Ok(self.sockets.add(s))
    }

    /// A socket listening on `port` (it serves one connection).
    pub fn listen(&mut self, port: u16) -> Result<SocketHandle, tcp::ListenError> {
        let mut s = Self::new_socket();
        s.listen(port)?;
        Ok(self.sockets.add(s))
    }

    fn take_port(&mut self) -> u16 {
        let p = self.next_port;
        self.next_port = if self.next_port == u16::MAX {
            49152
        } else {
            self.next_port + 1
        };
        p
    }

    pub fn tcp(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }

    pub fn remove(&mut self, h: SocketHandle) {
        self.sockets.remove(h);
    }

    /// Number of sockets.
    pub fn len(&self) -> usize {
        self.sockets.iter().count()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
