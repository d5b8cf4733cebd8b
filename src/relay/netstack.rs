//! A userspace TCP/IP stack (smoltcp). The relay runs one per TCP stream
//! (on the gateway and on the agent), and routes each inbound segment to its
//! stream's stack by port: smoltcp's `Interface::poll` walks every socket of
//! its interface, so one socket per interface makes handling a packet cost
//! the same whatever the number of open streams.
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

/// Send buffer of one stream: the most it can have in flight.
pub const SEND_BUFFER: usize = STREAM_BUFFER;

/// Makes large allocations (stream buffers) come straight from `mmap`, for
/// the life of the process. glibc otherwise raises its mmap threshold after
/// the first large free and serves later buffers from the heap, where
/// `calloc` must clear them and so touches every page. From `mmap` they are
/// zero pages the kernel commits only when written: a stream costs the
/// memory its traffic touched, not its full window, and its buffers go back
/// to the system when it ends. Call once, early, from the binary.
pub fn lazy_stream_buffers() {
    // SAFETY: mallopt only changes allocator tuning; M_MMAP_THRESHOLD with a
    // fixed value also disables glibc's dynamic adjustment.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Gives the whole pages inside `buf` back to the system. Their bytes read
/// as zero afterwards: callers pass only bytes nobody will read again (data
/// just consumed, or an empty send buffer), handed out by smoltcp itself as a
/// `&mut [u8]`.
pub fn release_pages(buf: &mut [u8]) {
    const PAGE: usize = 4096;
    let start = (buf.as_mut_ptr() as usize).div_ceil(PAGE) * PAGE;
    let end = (buf.as_mut_ptr() as usize + buf.len()) / PAGE * PAGE;
    if end > start {
        // SAFETY: [start, end) lies inside `buf`, which we borrow mutably.
        // On private anonymous memory (heap or mmap) MADV_DONTNEED replaces
        // the pages with zero-fill-on-demand ones: in effect, writing zeros
        // through our exclusive borrow.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
        }
    }
}

use crate::egress::Egress;

pub struct NetStack {
    iface: Interface,
    pub sockets: SocketSet<'static>,
    scratch: Vec<u8>,
    origin: Instant,
    pacer: SharedPacer,
    /// The last egress ran out of budget with more to send.
    throttled: bool,
    /// When data was last queued, if the send buffers were not released
    /// since.
    tx_dirty: Option<Instant>,
    /// Receive-side bookkeeping for giving an idle ring's pages back.
    rx: RxTrack,
    /// Send-side bookkeeping for the pacer (bytes in flight, round trips).
    tx: TxTrack,
    /// A segment was [ingested](NetStack::ingest) and not yet answered.
    ack_owed: bool,
}

impl Drop for NetStack {
    fn drop(&mut self) {
        let mut p = self.pacer.lock();
        p.inflight = p.inflight.saturating_sub(self.tx.reported);
    }
}

/// What the stack needs to know to give the pages of an idle receive ring
/// back to the kernel. smoltcp never rewinds its receive ring and does not
/// expose it, so a bulk transfer leaves every page of it committed; and
/// out-of-order segments wait in the ring's free part, invisible from the
/// socket's API. So the stack watches both directions itself: the highest
/// sequence number that arrived and the last acknowledgement it sent. When
/// they match, nothing is waiting out of order; with an empty ring, none of
/// its bytes are live and the pages can go.
#[derive(Default)]
struct RxTrack {
    /// Storage of the receive ring of each socket: (handle, address, length).
    rings: Vec<(SocketHandle, usize, usize)>,
    /// End (seq + len, FIN included) of the furthest inbound segment.
    high: Option<u32>,
    /// Acknowledgement number of the last segment sent.
    acked: Option<u32>,
    /// When data last arrived, if the rings were not released since.
    dirty: Option<Instant>,
}

impl RxTrack {
    /// Notes an inbound IPv4/TCP packet's sequence range (cheap header reads;
    /// smoltcp checks the packet itself).
    fn inbound(&mut self, now: Instant, p: &[u8]) {
        let Some((seq, len, flags)) = tcp_segment(p) else {
            return;
        };
        let end = seq
            .wrapping_add(len)
            .wrapping_add((flags & FIN != 0) as u32);
        if len == 0 && flags & FIN == 0 {
            return;
        }
        self.dirty = Some(now);
        match self.high {
            Some(h) if (end.wrapping_sub(h) as i32) <= 0 => {}
            _ => self.high = Some(end),
        }
    }

    fn outbound(&mut self, p: &[u8]) {
        if let Some(tcp) = tcp_header(p) {
            if tcp[13] & ACK != 0 {
                self.acked = Some(u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]));
            }
        }
    }

    /// True when every byte that arrived has been acknowledged in order,
    /// so nothing sits in a ring out of order.
    fn in_order(&self) -> bool {
        match (self.high, self.acked) {
            (None, _) => true,
            (Some(h), Some(a)) => (h.wrapping_sub(a) as i32) <= 0,
            (Some(_), None) => false,
        }
    }
}

const FIN: u8 = 0x01;
const ACK: u8 = 0x10;

/// The TCP header of an IPv4 packet, if it carries TCP.
fn tcp_header(p: &[u8]) -> Option<&[u8]> {
    if p.len() < 20 || p[0] >> 4 != 4 || p[9] != 6 {
        return None;
    }
    let ihl = (p[0] & 0x0f) as usize * 4;
    let tcp = p.get(ihl..)?;
    (tcp.len() >= 20).then_some(tcp)
}

/// (sequence number, payload length, flags) of an IPv4/TCP segment.
fn tcp_segment(p: &[u8]) -> Option<(u32, u32, u8)> {
    let tcp = tcp_header(p)?;
    let total = u16::from_be_bytes([p[2], p[3]]) as usize;
    let ihl = (p[0] & 0x0f) as usize * 4;
    let doff = (tcp[12] >> 4) as usize * 4;
    let len = total.checked_sub(ihl + doff)?;
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    Some((seq, len as u32, tcp[13]))
}

struct RxTok<'a>(&'a [u8]);
struct TxTok<'a> {
    scratch: &'a mut Vec<u8>,
    egress: &'a dyn Egress,
    emitted: &'a mut usize,
    budget: &'a mut u32,
    rx: &'a mut RxTrack,
    tx: &'a mut TxTrack,
    now: Instant,
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
        self.tx.fix_keep_alive(&mut self.scratch[..len]);
        self.rx.outbound(&self.scratch[..len]);
        self.tx.outbound(self.now, &self.scratch[..len]);
        self.egress.send(&self.scratch[..len]);
        *self.emitted += 1;
        *self.budget = self.budget.saturating_sub(1);
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
    /// Packets this call may still send (see [`Pacer`]).
    budget: &'a mut u32,
    throttled: bool,
    rx_track: &'a mut RxTrack,
    tx_track: &'a mut TxTrack,
    now: Instant,
}

/// Paces the segments sent into the tunnel towards one peer at a rate that
/// follows the path: twice the bytes in flight per smoothed round trip (as
/// Linux paces TCP in slow start), with bursts of two milliseconds' worth
/// (the timer's resolution is one). smoltcp otherwise sends a whole window
/// back to back, and after a loss resends everything from the lost
/// segment; a peer such as wireguard-go with the kernel's default 208 KiB
/// UDP receive buffer drops the tail of such bursts, and the stream crawls
/// from retransmission timeout to retransmission timeout. Pacing spreads a
/// window over half a round trip instead; since the rate is twice what the
/// window delivers, it never holds a stream below what its window allows.
///
/// Until a round trip is measured the rate is `START_PER_MS` (about 490
/// Mbit/s of full segments, what a wireguard-go peer takes on this class of
/// machine); it never falls below `MIN_PER_MS`.
pub struct Pacer {
    /// Packets that may leave now.
    tokens: u32,
    last: Instant,
    /// Smoothed round trip of the peer's streams (RFC 6298's 1/8 gain).
    srtt_us: Option<u64>,
    /// Bytes sent and not yet acknowledged, over the peer's streams.
    inflight: u64,
}

/// A pacer shared by every stream towards one peer: the bound is on what
/// the peer receives, whatever the number of streams.
pub type SharedPacer = std::sync::Arc<parking_lot::Mutex<Pacer>>;

pub fn new_pacer(now: Instant) -> SharedPacer {
    std::sync::Arc::new(parking_lot::Mutex::new(Pacer {
        tokens: START_PER_MS as u32,
        last: now,
        srtt_us: None,
        inflight: 0,
    }))
}

const START_PER_MS: u64 = 44;
const MIN_PER_MS: u64 = 8;
const MIN_BURST: u32 = 16;
/// Full segment on the wire (bytes per paced packet, for the rate).
const SEGMENT: u64 = (MTU - 40) as u64;

impl Pacer {
    /// Packets a millisecond.
    fn per_ms(&self) -> u64 {
        match self.srtt_us {
            None => START_PER_MS,
            Some(rtt) => (2 * self.inflight * 1000 / SEGMENT / rtt.max(1)).max(MIN_PER_MS),
        }
    }

    fn burst(&self) -> u32 {
        (2 * self.per_ms()).clamp(MIN_BURST as u64, 4096) as u32
    }

    fn refill(&mut self, now: Instant) {
        let us = now.saturating_duration_since(self.last).as_micros() as u64;
        let add = us * self.per_ms() / 1000;
        if add > 0 {
            self.tokens = (self.tokens as u64 + add).min(self.burst() as u64) as u32;
            self.last = now;
        }
    }

    /// A round-trip sample of one of the peer's streams.
    fn rtt_sample(&mut self, us: u64) {
        self.srtt_us = Some(match self.srtt_us {
            None => us,
            Some(s) => (7 * s + us) / 8,
        });
    }
}

/// One stack's share of its pacer's view: the bytes it has in flight and a
/// round trip being timed (one segment at a time, not a retransmitted one:
/// Karn's rule).
#[derive(Default)]
struct TxTrack {
    /// End of the furthest segment sent.
    high: Option<u32>,
    /// Furthest acknowledgement received.
    acked: Option<u32>,
    /// (end of a segment, when it left), until an ACK covers it.
    timing: Option<(u32, Instant)>,
    /// In flight as last added to the pacer's total.
    reported: u64,
    /// Furthest acknowledgement received per connection, keyed by
    /// (local port, remote port): what [`TxTrack::fix_keep_alive`] needs.
    peer_acks: Vec<(u32, u32)>,
}

/// (local port, remote port) of a TCP header, for a segment we send
/// (`outbound`) or one we receive.
fn ports(tcp: &[u8], outbound: bool) -> u32 {
    let (src, dst) = (
        u16::from_be_bytes([tcp[0], tcp[1]]),
        u16::from_be_bytes([tcp[2], tcp[3]]),
    );
    let (local, remote) = if outbound { (src, dst) } else { (dst, src) };
    (local as u32) << 16 | remote as u32
}

/// Rewrites a TCP header's sequence number, updating its checksum
/// incrementally (RFC 1624: HC' = ~(~HC + ~m + m') per 16-bit word).
fn set_seq(tcp: &mut [u8], seq: u32) {
    let mut sum = !u16::from_be_bytes([tcp[16], tcp[17]]) as u32;
    for i in [4, 6] {
        let old = u16::from_be_bytes([tcp[i], tcp[i + 1]]);
        sum += !old as u32;
    }
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    for i in [4, 6] {
        sum += u16::from_be_bytes([tcp[i], tcp[i + 1]]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    tcp[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

/// `a` is after `b` in sequence space.
fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

impl TxTrack {
    fn outbound(&mut self, now: Instant, p: &[u8]) {
        let Some((seq, len, _)) = tcp_segment(p) else {
            return;
        };
        if len == 0 {
            return;
        }
        let end = seq.wrapping_add(len);
        match self.high {
            Some(h) if !seq_after(end, h) => {
                // A retransmission: its ACK would time two sends at once.
                self.timing = None;
            }
            _ => {
                self.high = Some(end);
                if self.timing.is_none() {
                    self.timing = Some((end, now));
                }
            }
        }
    }

    /// An inbound segment; returns a round-trip sample if it ended one.
    fn inbound(&mut self, now: Instant, p: &[u8]) -> Option<u64> {
        let tcp = tcp_header(p)?;
        if tcp[13] & ACK == 0 {
            return None;
        }
        let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
        let key = ports(tcp, false);
        match self.peer_acks.iter_mut().find(|(k, _)| *k == key) {
            Some((_, a)) if seq_after(ack, *a) => *a = ack,
            Some(_) => {}
            None => self.peer_acks.push((key, ack)),
        }
        match self.acked {
            Some(a) if !seq_after(ack, a) => return None,
            _ => self.acked = Some(ack),
        }
        let (end, at) = self.timing?;
        if seq_after(end, ack) {
            return None;
        }
        self.timing = None;
        Some(now.saturating_duration_since(at).as_micros() as u64)
    }

    /// smoltcp 0.12's keep-alive is one zero byte at SND.NXT - 1, sent
    /// whenever its idle timer fires, even with data or a FIN not yet
    /// acknowledged (its retransmission path re-arms the idle timer). That
    /// byte then sits where real data (or the FIN) belongs: a peer that lost
    /// the original takes the zero as stream data (found by
    /// `a_reordering_lossy_path_delivers_every_byte_exactly_once`; seen as
    /// "ok\0" for "ok" in the relay bench). RFC 1122's probe is a byte the
    /// peer already has, so such a probe is moved to SND.UNA - 1 (the last
    /// byte the peer acknowledged): it still draws an ACK with the window,
    /// and it can no longer be taken for data.
    ///
    /// A probe is told from data by its shape: one zero byte, ACK alone
    /// (smoltcp marks the last segment of its buffer PSH or FIN), not yet
    /// acknowledged. Only a one-byte window could make data look alike.
    fn fix_keep_alive(&self, p: &mut [u8]) {
        let Some((seq, 1, ACK)) = tcp_segment(p) else {
            return;
        };
        let ihl = (p[0] & 0x0f) as usize * 4;
        let tcp = &p[ihl..];
        let doff = (tcp[12] >> 4) as usize * 4;
        if tcp.get(doff) != Some(&0) {
            return;
        }
        let key = ports(tcp, true);
        let Some(&(_, una)) = self.peer_acks.iter().find(|(k, _)| *k == key) else {
            return;
        };
        if seq_after(seq.wrapping_add(1), una) {
            set_seq(&mut p[ihl..], una.wrapping_sub(1));
        }
    }

    /// Forgets a closed connection's acknowledgements.
    fn forget(&mut self, key: u32) {
        self.peer_acks.retain(|(k, _)| *k != key);
    }

    fn inflight(&self) -> u64 {
        match (self.high, self.acked) {
            (Some(h), Some(a)) if seq_after(h, a) => h.wrapping_sub(a) as u64,
            _ => 0,
        }
    }
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
                budget: self.budget,
                rx: self.rx_track,
                tx: self.tx_track,
                now: self.now,
            },
        ))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<TxTok<'_>> {
        if *self.budget == 0 {
            self.throttled = true;
            return None;
        }
        Some(TxTok {
            scratch: self.scratch,
            egress: self.egress,
            emitted: &mut self.emitted,
            budget: self.budget,
            rx: self.rx_track,
            tx: self.tx_track,
            now: self.now,
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

impl NetStack {
    /// A stack answering on `local`, reaching everything through the tunnel.
    pub fn new(local: Ipv4Addr, now: Instant, pacer: SharedPacer) -> Self {
        let mut seed = [0u8; 8];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut seed);
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = u64::from_le_bytes(seed);
        let mut scratch = vec![0u8; MTU];
        let mut budget = 0;
        let mut rx = RxTrack::default();
        let mut tx = TxTrack::default();
        let mut dev = Dev {
            rx: None,
            scratch: &mut scratch,
            egress: &crate::egress::Unreachable,
            emitted: 0,
            budget: &mut budget,
            throttled: false,
            rx_track: &mut rx,
            tx_track: &mut tx,
            now,
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
            pacer,
            throttled: false,
            tx_dirty: None,
            rx,
            tx,
            ack_owed: false,
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
        // Whatever the pacer says, the segment that acknowledges this input
        // goes out now (every segment carries the current ACK): a pending
        // ACK is what smoltcp's `poll_at` must never see (see `new_socket`).
        self.ingest(now, packet, egress);
        self.poll(now, egress);
    }

    /// Feeds one inbound IP packet without running egress: what it calls
    /// for (the ACK) leaves with the next [`poll`](Self::poll). A receiver
    /// that feeds a burst of segments this way and polls once sends one
    /// ACK for all of them, not one each: on a loopback stream the ACKs
    /// were a third of the receiving agent's work. Only smoltcp's ingress
    /// runs here: nothing asks for the window while data is unacknowledged
    /// (see `new_socket`), and `poll` owes the ACK whatever the pacer says.
    pub fn ingest(&mut self, now: Instant, packet: &[u8], egress: &dyn Egress) {
        let ts = self.ts(now);
        if let Some(us) = self.tx.inbound(now, packet) {
            self.pacer.lock().rtt_sample(us);
        }
        self.rx.inbound(now, packet);
        // Room for an answer ingress makes itself (a reset, a challenge ACK).
        let mut budget = 1;
        let mut dev = Dev {
            rx: Some(packet),
            scratch: &mut self.scratch,
            egress,
            emitted: 0,
            budget: &mut budget,
            throttled: false,
            rx_track: &mut self.rx,
            tx_track: &mut self.tx,
            now,
        };
        self.iface
            .poll_ingress_single(ts, &mut dev, &mut self.sockets);
        self.ack_owed = true;
    }

    /// Takes the pacer's tokens.
    fn take_budget(&self, now: Instant) -> u32 {
        let mut p = self.pacer.lock();
        p.refill(now);
        std::mem::take(&mut p.tokens)
    }

    /// Returns unused tokens and this stack's bytes in flight now.
    fn give_back(&mut self, budget: u32) {
        let inflight = self.tx.inflight();
        let mut p = self.pacer.lock();
        p.inflight = (p.inflight + inflight).saturating_sub(self.tx.reported);
        self.tx.reported = inflight;
        p.tokens = (p.tokens + budget).min(p.burst());
    }

    /// True when the last egress stopped for the pacer with more to send:
    /// poll again in about a millisecond.
    pub fn throttled(&self) -> bool {
        self.throttled
    }

    /// Runs timers and egress until the stack emits nothing more.
    pub fn poll(&mut self, now: Instant, egress: &dyn Egress) {
        let ts = self.ts(now);
        self.flush_with(now, ts, egress);
    }

    fn flush_with(&mut self, now: Instant, ts: smoltcp::time::Instant, egress: &dyn Egress) {
        let mut budget = self.take_budget(now);
        if std::mem::take(&mut self.ack_owed) {
            budget = budget.max(1);
        }
        loop {
            let mut dev = Dev {
                rx: None,
                scratch: &mut self.scratch,
                egress,
                emitted: 0,
                budget: &mut budget,
                throttled: false,
                rx_track: &mut self.rx,
                tx_track: &mut self.tx,
                now,
            };
            self.iface.poll_egress(ts, &mut dev, &mut self.sockets);
            self.throttled = dev.throttled;
            if dev.emitted == 0 || dev.throttled {
                break;
            }
        }
        self.give_back(budget);
    }

    /// How long until the stack needs [`poll`](Self::poll) again.
    pub fn poll_delay(&mut self, now: Instant) -> Option<std::time::Duration> {
        let ts = self.ts(now);
        self.iface
            .poll_delay(ts, &self.sockets)
            .map(|d| std::time::Duration::from_micros(d.total_micros()))
    }

    /// A socket, and the address and length of its receive ring.
    fn new_socket() -> (tcp::Socket<'static>, usize, usize) {
        let mut rx = vec![0u8; STREAM_BUFFER];
        // The Vec's heap block does not move when the Vec is moved into the
        // socket: this address stays valid until the socket is dropped.
        let ring = (rx.as_mut_ptr() as usize, rx.len());
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(rx),
            tcp::SocketBuffer::new(vec![0u8; SEND_BUFFER]),
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
        // Also smoltcp 0.12's only persist timer: it sends no zero-window
        // probes, so a stream whose window update was lost would stall
        // until something else is sent. A keepalive goes out after 5 s of
        // silence and its answer carries the peer's window (measured: 100
        // concurrent downloads stalled ~30 s with the usual 30 s).
        s.set_keep_alive(Some(smoltcp::time::Duration::from_secs(5)));
        s.set_timeout(Some(smoltcp::time::Duration::from_secs(120)));
        (s, ring.0, ring.1)
    }

    fn add(&mut self, (s, addr, len): (tcp::Socket<'static>, usize, usize)) -> SocketHandle {
        let h = self.sockets.add(s);
        self.rx.rings.push((h, addr, len));
        h
    }

    /// Opens a TCP connection from local port `port` to `remote`.
    pub fn connect_from(
        &mut self,
        port: u16,
        remote: (Ipv4Addr, u16),
    ) -> Result<SocketHandle, tcp::ConnectError> {
        let mut s = Self::new_socket();
        s.0.connect(
            self.iface.context(),
            IpEndpoint::new(IpAddress::Ipv4(remote.0), remote.1),
            port,
        )?;
        Ok(self.add(s))
    }

    /// A socket listening on `port` (it serves one connection).
    pub fn listen(&mut self, port: u16) -> Result<SocketHandle, tcp::ListenError> {
        let mut s = Self::new_socket();
        s.0.listen(port)?;
        Ok(self.add(s))
    }

    /// Queues `data` on a stream; returns how much fit.
    pub fn send(&mut self, h: SocketHandle, data: &[u8]) -> usize {
        self.tx_dirty = Some(Instant::now());
        self.tcp(h).send_slice(data).unwrap_or(0)
    }

    /// Once the send buffers that held data are empty again (all of it
    /// acknowledged), gives their pages back, once: an idle stream keeps no
    /// send window's worth of memory. (A syscall per release, and a TLB
    /// flush across threads, so not per packet: the timer calls this.)
    pub fn release_idle_send_buffers(&mut self, now: Instant) {
        // Only after a second without new data: a busy stream refills its
        // buffer at once, and each release costs page faults to refill.
        match self.tx_dirty {
            Some(t) if now.saturating_duration_since(t) >= std::time::Duration::from_secs(1) => {}
            _ => return,
        }
        let mut all_empty = true;
        for (_, socket) in self.sockets.iter_mut() {
            let smoltcp::socket::Socket::Tcp(s) = socket;
            if s.send_queue() != 0 {
                all_empty = false;
            } else if s.may_send() {
                // When empty, smoltcp rewinds the ring and hands out the
                // whole storage.
                let _ = s.send(|free| {
                    release_pages(free);
                    (0, ())
                });
            }
        }
        if all_empty {
            self.tx_dirty = None;
        }
    }

    pub fn tcp(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }

    pub fn remove(&mut self, h: SocketHandle) {
        self.rx.rings.retain(|r| r.0 != h);
        let s = self.tcp(h);
        if let (Some(l), Some(r)) = (s.local_endpoint(), s.remote_endpoint()) {
            self.tx.forget((l.port as u32) << 16 | r.port as u32);
        }
        self.sockets.remove(h);
    }

    /// Gives back the pages of an empty receive ring after a second without
    /// inbound data (see [`RxTrack`]). Only for a stack with one socket: the
    /// sequence tracking covers one connection.
    pub fn release_idle_receive_buffers(&mut self, now: Instant) {
        match self.rx.dirty {
            Some(t) if now.saturating_duration_since(t) >= std::time::Duration::from_secs(1) => {}
            _ => return,
        }
        if self.rx.rings.len() != 1 || !self.rx.in_order() {
            return;
        }
        let (h, addr, len) = self.rx.rings[0];
        if self.tcp(h).recv_queue() != 0 {
            return;
        }
        // SAFETY: `addr..addr + len` is the heap block of the Vec the socket
        // owns (see `new_socket`), alive while the socket is in the set. We
        // hold `&mut self`, so no reference into it exists. The ring is
        // empty and nothing waits out of order, so none of its bytes are
        // read again before being written; the pages come back zeroed.
        let ring = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) };
        release_pages(ring);
        self.rx.dirty = None;
    }

    /// Number of sockets.
    pub fn len(&self) -> usize {
        self.sockets.iter().count()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    //! Two stacks wired back to back in memory: the relay's TCP logic
    //! without sockets, WireGuard or a runtime.
    use super::*;
    use parking_lot::Mutex;

    #[derive(Default)]
    struct Wire(Mutex<Vec<Vec<u8>>>);
    impl Egress for Wire {
        fn send(&self, packet: &[u8]) {
            self.0.lock().push(packet.to_vec());
        }
    }

    /// Moves packets between the two stacks until both are quiet.
    fn settle(a: &mut NetStack, a_out: &Wire, b: &mut NetStack, b_out: &Wire, now: Instant) {
        for _ in 0..10_000 {
            let to_b: Vec<Vec<u8>> = std::mem::take(&mut *a_out.0.lock());
            let to_a: Vec<Vec<u8>> = std::mem::take(&mut *b_out.0.lock());
            if to_a.is_empty() && to_b.is_empty() {
                return;
            }
            for p in to_b {
                b.input(now, &p, b_out);
            }
            for p in to_a {
                a.input(now, &p, a_out);
            }
        }
        panic!("the stacks never went quiet");
    }

    #[test]
    fn connect_transfer_and_half_close_without_sockets() {
        let now = Instant::now();
        let gw_ip: Ipv4Addr = "10.240.0.1".parse().unwrap();
        let dev_ip: Ipv4Addr = "10.240.0.2".parse().unwrap();
        let (gw_out, dev_out) = (Wire::default(), Wire::default());
        // Unlimited pacing for the test: one bucket each, refilled by time.
        let mut gw = NetStack::new(gw_ip, now, new_pacer(now));
        let mut dev = NetStack::new(dev_ip, now, new_pacer(now));
        let listener = dev.listen(22).unwrap();
        let conn = gw.connect_from(50000, (dev_ip, 22)).unwrap();
        gw.poll(now, &gw_out);
        settle(&mut gw, &gw_out, &mut dev, &dev_out, now);
        assert_eq!(gw.tcp(conn).state(), tcp::State::Established);
        assert_eq!(dev.tcp(listener).state(), tcp::State::Established);

        // 100 KiB gateway -> device, in steps (the pacer refills with time).
        let data: Vec<u8> = (0..100 * 1024).map(|i| (i % 251) as u8).collect();
        let mut sent = 0;
        let mut got = Vec::new();
        let mut t = now;
        while got.len() < data.len() {
            t += std::time::Duration::from_millis(2);
            sent += gw.send(conn, &data[sent..]);
            gw.poll(t, &gw_out);
            settle(&mut gw, &gw_out, &mut dev, &dev_out, t);
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = dev.tcp(listener).recv_slice(&mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            dev.poll(t, &dev_out);
            settle(&mut gw, &gw_out, &mut dev, &dev_out, t);
        }
        assert_eq!(got, data);

        // Half-close: the gateway side closes its sending half; the device
        // sees EOF but can still answer, and the answer arrives.
        t += std::time::Duration::from_millis(2);
        gw.tcp(conn).close();
        gw.poll(t, &gw_out);
        settle(&mut gw, &gw_out, &mut dev, &dev_out, t);
        assert!(!dev.tcp(listener).may_recv(), "the device saw FIN");
        assert!(dev.tcp(listener).may_send(), "and may still send");
        t += std::time::Duration::from_millis(2);
        dev.send(listener, b"still here");
        dev.poll(t, &dev_out);
        settle(&mut gw, &gw_out, &mut dev, &dev_out, t);
        let mut buf = [0u8; 32];
        let n = gw.tcp(conn).recv_slice(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"still here");
        t += std::time::Duration::from_millis(2);
        dev.tcp(listener).close();
        dev.poll(t, &dev_out);
        settle(&mut gw, &gw_out, &mut dev, &dev_out, t);
        assert!(matches!(
            gw.tcp(conn).state(),
            tcp::State::TimeWait | tcp::State::Closed
        ));
    }

    /// Sends `data` from `a`'s `conn` to `b`'s `peer` and reads it there.
    #[allow(clippy::too_many_arguments)]
    fn transfer(
        a: &mut NetStack,
        a_out: &Wire,
        conn: SocketHandle,
        b: &mut NetStack,
        b_out: &Wire,
        peer: SocketHandle,
        data: &[u8],
        t: &mut Instant,
    ) -> Vec<u8> {
        let (mut sent, mut got) = (0, Vec::new());
        while got.len() < data.len() {
            *t += std::time::Duration::from_millis(2);
            sent += a.send(conn, &data[sent..]);
            a.poll(*t, a_out);
            settle(a, a_out, b, b_out, *t);
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = b.tcp(peer).recv_slice(&mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            b.poll(*t, b_out);
            settle(a, a_out, b, b_out, *t);
        }
        got
    }

    #[test]
    fn an_idle_receive_ring_is_released_unless_data_waits_out_of_order() {
        let now = Instant::now();
        let (gw_out, dev_out) = (Wire::default(), Wire::default());
        let dev_ip: Ipv4Addr = "10.240.0.2".parse().unwrap();
        let mut gw = NetStack::new("10.240.0.1".parse().unwrap(), now, new_pacer(now));
        let mut dev = NetStack::new(dev_ip, now, new_pacer(now));
        let l = dev.listen(22).unwrap();
        let conn = gw.connect_from(50003, (dev_ip, 22)).unwrap();
        gw.poll(now, &gw_out);
        settle(&mut gw, &gw_out, &mut dev, &dev_out, now);
        let data: Vec<u8> = (0..200 * 1024).map(|i| (i % 251) as u8 | 1).collect();
        let mut t = now;
        let got = transfer(&mut gw, &gw_out, conn, &mut dev, &dev_out, l, &data, &mut t);
        assert_eq!(got, data);

        // Not before a second of silence; then released, once.
        dev.release_idle_receive_buffers(t);
        assert!(dev.rx.dirty.is_some(), "kept while recent");
        t += std::time::Duration::from_secs(2);
        dev.release_idle_receive_buffers(t);
        assert!(dev.rx.dirty.is_none(), "released when idle and empty");
        // The stream goes on, byte-exact, over the released ring.
        let got = transfer(&mut gw, &gw_out, conn, &mut dev, &dev_out, l, &data, &mut t);
        assert_eq!(got, data);

        // A hole: the first segment is lost, the next ones wait out of order
        // in the ring's free part. Idle or not, the ring must be kept.
        t += std::time::Duration::from_millis(2);
        let burst: Vec<u8> = (0..4000).map(|i| (i % 7) as u8 + 1).collect();
        assert_eq!(gw.send(conn, &burst), burst.len());
        gw.poll(t, &gw_out);
        let segments: Vec<Vec<u8>> = std::mem::take(&mut *gw_out.0.lock());
        assert!(segments.len() >= 2, "{} segments", segments.len());
        for p in &segments[1..] {
            dev.input(t, p, &dev_out);
        }
        dev_out.0.lock().clear();
        assert_eq!(dev.tcp(l).recv_queue(), 0, "nothing in order yet");
        t += std::time::Duration::from_secs(2);
        dev.release_idle_receive_buffers(t);
        assert!(dev.rx.dirty.is_some(), "kept: data waits out of order");
        dev.input(t, &segments[0], &dev_out);
        let mut buf = vec![0u8; 8192];
        let n = dev.tcp(l).recv_slice(&mut buf).unwrap();
        assert_eq!(&buf[..n], &burst[..], "the out-of-order bytes survived");
    }

    #[test]
    fn a_closed_port_answers_with_reset() {
        let now = Instant::now();
        let (gw_out, dev_out) = (Wire::default(), Wire::default());
        let dev_ip: Ipv4Addr = "10.240.0.2".parse().unwrap();
        let mut gw = NetStack::new("10.240.0.1".parse().unwrap(), now, new_pacer(now));
        let mut dev = NetStack::new(dev_ip, now, new_pacer(now));
        let conn = gw.connect_from(50001, (dev_ip, 9)).unwrap();
        gw.poll(now, &gw_out);
        settle(&mut gw, &gw_out, &mut dev, &dev_out, now);
        assert_eq!(gw.tcp(conn).state(), tcp::State::Closed, "refused");
    }

    /// The pacer's rate follows the path: twice the bytes in flight per
    /// smoothed round trip, never below its floor, and the first round trip
    /// measured between two stacks reaches it.
    #[test]
    fn pacing_follows_the_round_trip_and_the_window() {
        let now = Instant::now();
        let mut p = Pacer {
            tokens: 0,
            last: now,
            srtt_us: None,
            inflight: 0,
        };
        assert_eq!(p.per_ms(), START_PER_MS, "no round trip measured yet");
        p.rtt_sample(1_000);
        p.inflight = 1_000 * SEGMENT;
        assert_eq!(
            p.per_ms(),
            2_000,
            "1,000 segments in flight over 1 ms, twice"
        );
        p.rtt_sample(9_000);
        assert_eq!(p.srtt_us, Some(2_000), "smoothed with a gain of 1/8");
        assert_eq!(p.per_ms(), 1_000);
        p.inflight = 0;
        assert_eq!(p.per_ms(), MIN_PER_MS, "an idle path keeps the floor");
        p.inflight = 1_000 * SEGMENT;
        p.refill(now + std::time::Duration::from_millis(10));
        assert_eq!(
            p.tokens,
            p.burst(),
            "refills stop at two milliseconds' worth"
        );
        assert_eq!(p.burst(), 2_000);

        // Two stacks: a transfer times round trips and counts what is in
        // flight, and a closed stack takes its share back.
        let (gw_out, dev_out) = (Wire::default(), Wire::default());
        let dev_ip: Ipv4Addr = "10.240.0.2".parse().unwrap();
        let pacer = new_pacer(now);
        let mut gw = NetStack::new("10.240.0.1".parse().unwrap(), now, pacer.clone());
        let mut dev = NetStack::new(dev_ip, now, new_pacer(now));
        let l = dev.listen(22).unwrap();
        let conn = gw.connect_from(50004, (dev_ip, 22)).unwrap();
        gw.poll(now, &gw_out);
        settle(&mut gw, &gw_out, &mut dev, &dev_out, now);
        let t = now + std::time::Duration::from_millis(3);
        gw.send(conn, &[7u8; 10_000]);
        gw.poll(t, &gw_out);
        assert!(
            pacer.lock().inflight >= 10_000,
            "the segments are in flight"
        );
        // The answer comes 3 ms after they left.
        let t2 = t + std::time::Duration::from_millis(3);
        settle(&mut gw, &gw_out, &mut dev, &dev_out, t2);
        let srtt = pacer.lock().srtt_us.expect("a round trip was timed");
        assert!((3_000..=6_000).contains(&srtt), "srtt {srtt} µs");
        assert_eq!(pacer.lock().inflight, 0, "all acknowledged");
        let _ = l;
        gw.send(conn, &[7u8; 5_000]);
        gw.poll(t2, &gw_out);
        assert!(pacer.lock().inflight > 0);
        drop(gw);
        assert_eq!(
            pacer.lock().inflight,
            0,
            "a dropped stack takes its bytes back"
        );
    }

    /// A path that delays each packet by 0-4 ms (so it reorders), drops
    /// some and duplicates some: moves the packets two stacks emitted.
    struct BadPath {
        seed: u64,
        /// (due, to the device?, packet)
        in_flight: Vec<(Instant, bool, Vec<u8>)>,
        keep_alives: u32,
    }

    impl BadPath {
        fn next(&mut self) -> u64 {
            // xorshift64*: deterministic per seed, no dependency.
            self.seed ^= self.seed >> 12;
            self.seed ^= self.seed << 25;
            self.seed ^= self.seed >> 27;
            self.seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn take(&mut self, now: Instant, wire: &Wire, to_dev: bool) {
            for p in std::mem::take(&mut *wire.0.lock()) {
                // Every segment's checksum holds (keep-alives are rewritten
                // on their way out).
                let ip = smoltcp::wire::Ipv4Packet::new_checked(&p[..]).unwrap();
                let tcp = smoltcp::wire::TcpPacket::new_checked(ip.payload()).unwrap();
                assert!(tcp.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()));
                if tcp.payload() == [0] && !tcp.psh() {
                    self.keep_alives += 1;
                }
                let r = self.next();
                if r % 100 < 4 {
                    continue; // lost
                }
                let copies = if r % 100 >= 97 { 2 } else { 1 };
                for _ in 0..copies {
                    let delay = std::time::Duration::from_micros(self.next() % 4_000);
                    self.in_flight.push((now + delay, to_dev, p.clone()));
                }
            }
        }

        /// The packets due by `now`, in the order they arrive.
        fn due(&mut self, now: Instant) -> Vec<(bool, Vec<u8>)> {
            let mut due: Vec<(Instant, bool, Vec<u8>)> = Vec::new();
            self.in_flight.retain(|(t, d, p)| {
                if *t <= now {
                    due.push((*t, *d, p.clone()));
                    false
                } else {
                    true
                }
            });
            due.sort_by_key(|(t, _, _)| *t);
            due.into_iter().map(|(_, d, p)| (d, p)).collect()
        }
    }

    /// Out-of-order, lost and duplicated segments in both directions: the
    /// bytes arrive exactly once and in order each way, and a short answer
    /// followed by FIN (the relay bench's "ok") arrives as sent, with no
    /// byte more; the same when arrivals are ingested in bursts.
    #[test]
    fn a_reordering_lossy_path_delivers_every_byte_exactly_once() {
        let mut keep_alives = 0;
        for seed in 1..=12u64 {
            let start = Instant::now();
            let (gw_out, dev_out) = (Wire::default(), Wire::default());
            let dev_ip: Ipv4Addr = "10.240.0.2".parse().unwrap();
            let mut gw = NetStack::new("10.240.0.1".parse().unwrap(), start, new_pacer(start));
            let mut dev = NetStack::new(dev_ip, start, new_pacer(start));
            let l = dev.listen(22).unwrap();
            let conn = gw.connect_from(50005, (dev_ip, 22)).unwrap();
            let mut path = BadPath {
                seed: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
                in_flight: Vec::new(),
                keep_alives: 0,
            };
            let up: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8 + 1).collect();
            let (mut sent, mut got_up, mut got_down) = (0, Vec::new(), Vec::new());
            let (mut answered, mut gw_eof) = (false, false);
            let mut t = start;
            let mut buf = vec![0u8; 64 * 1024];
            for _ in 0..200_000 {
                t += std::time::Duration::from_micros(250);
                // Even seeds take each tick's arrivals as a receive batch
                // does (`ingest`, one poll after them: one ACK for the lot).
                let batched = seed % 2 == 0;
                for (to_dev, p) in path.due(t) {
                    match (to_dev, batched) {
                        (true, false) => dev.input(t, &p, &dev_out),
                        (false, false) => gw.input(t, &p, &gw_out),
                        (true, true) => dev.ingest(t, &p, &dev_out),
                        (false, true) => gw.ingest(t, &p, &gw_out),
                    }
                }
                if gw.tcp(conn).may_send() && sent < up.len() {
                    sent += gw.send(conn, &up[sent..]);
                    if sent == up.len() {
                        gw.tcp(conn).close();
                    }
                }
                while let Ok(n) = dev.tcp(l).recv_slice(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    got_up.extend_from_slice(&buf[..n]);
                }
                if !answered && !dev.tcp(l).may_recv() && got_up.len() == up.len() {
                    // EOF from the gateway: answer and close, as the sink does.
                    assert_eq!(dev.send(l, b"ok"), 2);
                    dev.tcp(l).close();
                    answered = true;
                }
                match gw.tcp(conn).recv_slice(&mut buf) {
                    Ok(n) => got_down.extend_from_slice(&buf[..n]),
                    Err(tcp::RecvError::Finished) => gw_eof = true,
                    Err(_) => {}
                }
                gw.poll(t, &gw_out);
                dev.poll(t, &dev_out);
                path.take(t, &gw_out, true);
                path.take(t, &dev_out, false);
                if gw_eof {
                    break;
                }
            }
            assert!(
                got_up == up,
                "seed {seed}: {} of {} bytes up, or not in order",
                got_up.len(),
                up.len()
            );
            assert!(gw_eof, "seed {seed}: the device's FIN arrived");
            assert_eq!(got_down, b"ok", "seed {seed}: the answer, exactly");
            keep_alives += path.keep_alives;
        }
        assert!(keep_alives > 0, "the runs included keep-alives");
    }

    #[test]
    fn pacing_bounds_a_burst() {
        let now = Instant::now();
        let (gw_out, dev_out) = (Wire::default(), Wire::default());
        let dev_ip: Ipv4Addr = "10.240.0.2".parse().unwrap();
        let mut gw = NetStack::new("10.240.0.1".parse().unwrap(), now, new_pacer(now));
        let mut dev = NetStack::new(dev_ip, now, new_pacer(now));
        let _l = dev.listen(22).unwrap();
        let conn = gw.connect_from(50002, (dev_ip, 22)).unwrap();
        gw.poll(now, &gw_out);
        settle(&mut gw, &gw_out, &mut dev, &dev_out, now);
        // A full send buffer at one instant: no more than a burst leaves.
        gw.send(conn, &vec![1u8; STREAM_BUFFER]);
        gw.poll(now, &gw_out);
        let sent = gw_out.0.lock().len();
        assert!(sent as u64 <= START_PER_MS, "{sent} packets in one burst");
        assert!(gw.throttled());
    }
}
