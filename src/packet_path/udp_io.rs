//! Stage 0, UDP I/O: the only code of the packet path that touches sockets.
//!
//! One worker thread per CPU, each with its own UDP socket bound to the
//! gateway's port with `SO_REUSEPORT` (the kernel spreads flows over them by
//! 4-tuple hash), receiving up to [`BATCH`] datagrams per `recvmmsg` and
//! sending the answers of a batch with one `sendmmsg`. Between batches a
//! worker runs a few queued handshakes (see `admission`), so transport
//! packets never wait behind a storm of Diffie-Hellman. A timer thread
//! ticks one bucket of sessions every 250 ms (see `timers`).
//!
//! Plain OS threads: the work is CPU-bound crypto and a short SQLite lookup,
//! which would stall an async runtime's workers. Buffers are allocated once
//! per worker; nothing is allocated per packet.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::send::socket_tx;
use super::timers::{BUCKETS, TICK};
use super::{PacketPath, Transmit, BUF_SIZE};
use crate::udp_socket::{get_int, set_int, size_socket_buffers};

/// Datagrams per `recvmmsg`/`sendmmsg`.
pub const BATCH: usize = 32;
/// Queued handshakes a worker runs between two receive batches: about 1 ms
/// of CPU, the most a transport packet waits for one.
pub const HANDSHAKES_PER_TURN: usize = 4;
/// Largest datagram the send batch holds; larger ones go out alone.
const SEND_SLOT: usize = 2048;

/// Running packet threads; stopped by [`PacketThreads::stop`].
pub struct PacketThreads {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

/// Binds a UDP socket with `SO_REUSEPORT`, so that more worker sockets can
/// join it on the same port ([`worker_sockets`]).
pub fn bind_reuseport(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let family = match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: plain socket(2); the fd is owned by the UdpSocket from here.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    let socket = unsafe { UdpSocket::from_raw_fd(fd) };
    set_int(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    let (storage, len) = to_sockaddr(addr);
    // SAFETY: storage holds a sockaddr of `len` bytes.
    if unsafe { libc::bind(fd, (&storage as *const libc::sockaddr_storage).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(socket)
}

/// The gateway's sockets: `first` (bound by the caller) and, when it was
/// bound with `SO_REUSEPORT`, `workers - 1` more on its address. A socket
/// bound without it (tests bind plain sockets) gives one worker.
pub fn worker_sockets(first: UdpSocket, workers: usize) -> std::io::Result<Vec<Arc<UdpSocket>>> {
    let addr = first.local_addr()?;
    let reuse = get_int(first.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEPORT).unwrap_or(0) != 0;
    let mut sockets = vec![Arc::new(first)];
    if workers > 1 && !reuse {
        tracing::info!(
            workers,
            "the UDP socket was bound without SO_REUSEPORT: one packet worker"
        );
        return Ok(sockets);
    }
    for _ in 1..workers {
        sockets.push(Arc::new(bind_reuseport(addr)?));
    }
    Ok(sockets)
}

impl PacketThreads {
    /// Starts one worker per socket and the timer thread.
    pub fn start(path: Arc<PacketPath>, sockets: Vec<Arc<UdpSocket>>) -> std::io::Result<Self> {
        for s in &sockets {
            // Room for bursts from many devices while the workers share
            // the CPUs (ARCHITECTURE.md, "UDP socket buffers").
            size_socket_buffers(s.as_raw_fd(), 16 << 20);
            // The timeout only bounds how long a stop request waits.
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
        }
        path.set_egress(&sockets[0]);
        let stop = Arc::new(AtomicBool::new(false));
        let flooded: Arc<[AtomicBool]> = sockets.iter().map(|_| AtomicBool::new(false)).collect();
        let mut handles = Vec::new();
        for (i, socket) in sockets.iter().cloned().enumerate() {
            let (path, stop, flooded) = (path.clone(), stop.clone(), flooded.clone());
            handles.push(
                std::thread::Builder::new()
                    .name(format!("cloudlink-rx{i}"))
                    .spawn(move || worker_loop(&path, &socket, &stop, &flooded, i))?,
            );
        }
        {
            let (path, socket, stop) = (path.clone(), sockets[0].clone(), stop.clone());
            handles.push(
                std::thread::Builder::new()
                    .name("cloudlink-timers".into())
                    .spawn(move || timer_loop(&path, &socket, &stop))?,
            );
        }
        tracing::info!(workers = sockets.len(), "packet workers started");
        Ok(PacketThreads { stop, handles })
    }

    /// Stops the threads and waits for them.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles {
            let _ = h.join();
        }
    }
}

/// Receive batches in a row a flooded worker may take before it runs one
/// queued handshake itself (when another worker is free to run them).
const FLOODED_BATCHES_PER_HANDSHAKE: u32 = 16;

/// One receive worker. `flooded[me]` says whether its last batch was full
/// (its socket holds more than it has read): such a worker leaves queued
/// handshakes to workers whose sockets are drained, and runs only one
/// every [`FLOODED_BATCHES_PER_HANDSHAKE`] batches itself. Why: SO_REUSEPORT
/// hashes a flow to one socket, so one source flooding at 450,000
/// datagrams a second lands on one worker; at four handshakes (1.2 ms of
/// Diffie-Hellman) per 32 datagrams it read 27,000 a second, its socket
/// overflowed and the legitimate devices hashed to it lost 3 % of their
/// packets (`benches/abuse.sh`), while the other worker sat idle. When
/// every worker is flooded (a reconnect storm) they run handshakes as
/// before.
fn worker_loop(
    path: &PacketPath,
    socket: &UdpSocket,
    stop: &AtomicBool,
    flooded: &[AtomicBool],
    me: usize,
) {
    let mut full_batches = 0u32;
    let fd = socket.as_raw_fd();
    let mut rx = RecvBatch::new();
    let mut tx = SendBatch::new(socket, &path.metrics);
    let mut out = vec![0u8; BUF_SIZE].into_boxed_slice();
    while !stop.load(Ordering::Relaxed) {
        // With handshakes waiting, only look at the socket; else block
        // (up to the read timeout) for the first datagram.
        let flags = if path.handshakes.is_empty() {
            libc::MSG_WAITFORONE
        } else {
            libc::MSG_DONTWAIT
        };
        let mut received = 0;
        match rx.recv(fd, flags) {
            Ok(n) => {
                received = n;
                let now = Instant::now();
                // Counted here, once per batch: no shared counter per packet.
                path.metrics.rx_packets.inc_by(n as u64);
                path.metrics.rx_bytes.inc_by(rx.bytes(n));
                for i in 0..n {
                    let (src, datagram) = rx.get(i);
                    match src {
                        Some(src) => path.handle_datagram(now, src, datagram, &mut out, &mut tx),
                        None => path.metrics.dropped(crate::metrics::DropReason::Malformed),
                    }
                }
                tx.flush();
                path.end_of_batch();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                        | std::io::ErrorKind::ConnectionRefused
                ) => {}
            Err(e) => {
                tracing::warn!(error = %e, "UDP receive failed");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let full = received == BATCH;
        flooded[me].store(full, Ordering::Relaxed);
        let turn = if full {
            full_batches += 1;
            let someone_free = flooded
                .iter()
                .enumerate()
                .any(|(i, f)| i != me && !f.load(Ordering::Relaxed));
            if !someone_free {
                HANDSHAKES_PER_TURN
            } else if full_batches.is_multiple_of(FLOODED_BATCHES_PER_HANDSHAKE) {
                1
            } else {
                0
            }
        } else {
            full_batches = 0;
            HANDSHAKES_PER_TURN
        };
        if turn > 0 && path.process_handshakes(Instant::now(), turn, &mut out, &mut tx) > 0 {
            tx.flush();
        }
    }
}

fn timer_loop(path: &PacketPath, socket: &UdpSocket, stop: &AtomicBool) {
    let mut out = vec![0u8; BUF_SIZE].into_boxed_slice();
    let mut scratch = Vec::new();
    let mut tx = socket_tx(socket, &path.metrics);
    let mut next = Instant::now();
    let mut bucket = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= next {
            if bucket == 0 {
                // The clock is read here, in the I/O layer; stages convert.
                path.anchor_wall_clock(now, std::time::SystemTime::now());
            }
            path.tick_bucket(now, bucket, &mut out, &mut scratch, &mut tx);
            bucket = (bucket + 1) % BUCKETS;
            next = now + TICK;
        }
        std::thread::sleep(
            next.saturating_duration_since(Instant::now())
                .min(Duration::from_millis(50)),
        );
    }
}

/// Receive side of `recvmmsg`: BATCH buffers and their headers, allocated
/// once.
pub(crate) struct RecvBatch {
    bufs: Vec<Box<[u8]>>,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

impl RecvBatch {
    fn new() -> Self {
        Self::with_slots(BUF_SIZE)
    }

    /// BATCH buffers of `slot` bytes each (a longer datagram is cut).
    pub(crate) fn with_slots(slot: usize) -> Self {
        RecvBatch {
            bufs: (0..BATCH)
                .map(|_| vec![0u8; slot].into_boxed_slice())
                .collect(),
            // SAFETY: all-zero is a valid sockaddr_storage / iovec / mmsghdr.
            addrs: vec![unsafe { std::mem::zeroed() }; BATCH],
            iovs: vec![unsafe { std::mem::zeroed() }; BATCH],
            hdrs: vec![unsafe { std::mem::zeroed() }; BATCH],
        }
    }

    pub(crate) fn recv(&mut self, fd: RawFd, flags: libc::c_int) -> std::io::Result<usize> {
        for i in 0..BATCH {
            self.iovs[i] = libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: self.bufs[i].len(),
            };
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: hdrs holds BATCH headers whose names and iovecs point at
        // live buffers of the given lengths.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                flags,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Bytes in the first `n` datagrams of the last receive.
    fn bytes(&self, n: usize) -> u64 {
        self.hdrs[..n].iter().map(|h| h.msg_len as u64).sum()
    }

    /// Source and bytes of datagram `i` of the last receive (no source if the
    /// address family is not IP).
    pub(crate) fn get(&self, i: usize) -> (Option<SocketAddr>, &[u8]) {
        let len = self.hdrs[i].msg_len as usize;
        (
            from_sockaddr(&self.addrs[i]),
            &self.bufs[i][..len.min(self.bufs[i].len())],
        )
    }
}

/// Storage of a send batch: datagrams copied in, flushed with one
/// `sendmmsg`. Owned apart from the socket so that a thread can keep one
/// for output made outside the workers (see `send::with_session_egress`).
pub(crate) struct BatchSlots {
    slots: Vec<[u8; SEND_SLOT]>,
    lens: Vec<usize>,
    addrs: Vec<(libc::sockaddr_storage, libc::socklen_t)>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    n: usize,
}

impl BatchSlots {
    pub(crate) fn new() -> Self {
        BatchSlots {
            slots: vec![[0u8; SEND_SLOT]; BATCH],
            lens: vec![0; BATCH],
            // SAFETY: all-zero is a valid sockaddr_storage / iovec / mmsghdr.
            addrs: vec![(unsafe { std::mem::zeroed() }, 0); BATCH],
            iovs: vec![unsafe { std::mem::zeroed() }; BATCH],
            hdrs: vec![unsafe { std::mem::zeroed() }; BATCH],
            n: 0,
        }
    }
}

/// Send side: datagrams of one batch, flushed with one `sendmmsg`.
pub(crate) struct SendBatch<'a, B: std::borrow::BorrowMut<BatchSlots>> {
    socket: std::os::fd::BorrowedFd<'a>,
    metrics: &'a crate::metrics::Metrics,
    b: B,
}

impl<'a> SendBatch<'a, BatchSlots> {
    fn new(socket: &'a UdpSocket, metrics: &'a crate::metrics::Metrics) -> Self {
        SendBatch {
            socket: std::os::fd::AsFd::as_fd(socket),
            metrics,
            b: BatchSlots::new(),
        }
    }
}

impl<'a, 'b> SendBatch<'a, &'b mut BatchSlots> {
    /// A batch on borrowed storage, sending through the UDP socket
    /// `socket`. Nothing leaves before [`Transmit::flush`].
    pub(crate) fn on(
        socket: std::os::fd::BorrowedFd<'a>,
        metrics: &'a crate::metrics::Metrics,
        b: &'b mut BatchSlots,
    ) -> Self {
        SendBatch { socket, metrics, b }
    }
}

impl<B: std::borrow::BorrowMut<BatchSlots>> SendBatch<'_, B> {
    fn send_now(&mut self) {
        let b = self.b.borrow_mut();
        if b.n == 0 {
            return;
        }
        self.metrics.tx_packets.inc_by(b.n as u64);
        self.metrics
            .tx_bytes
            .inc_by(b.lens[..b.n].iter().map(|&l| l as u64).sum());
        let mut sent = 0;
        while sent < b.n {
            for i in sent..b.n {
                b.iovs[i] = libc::iovec {
                    iov_base: b.slots[i].as_mut_ptr().cast(),
                    iov_len: b.lens[i],
                };
                let h = &mut b.hdrs[i].msg_hdr;
                h.msg_name = (&mut b.addrs[i].0 as *mut libc::sockaddr_storage).cast();
                h.msg_namelen = b.addrs[i].1;
                h.msg_iov = &mut b.iovs[i];
                h.msg_iovlen = 1;
                h.msg_control = std::ptr::null_mut();
                h.msg_controllen = 0;
                h.msg_flags = 0;
            }
            // SAFETY: headers sent..n point at live slots and addresses.
            let r = unsafe {
                libc::sendmmsg(
                    self.socket.as_raw_fd(),
                    b.hdrs[sent..].as_mut_ptr(),
                    (b.n - sent) as libc::c_uint,
                    0,
                )
            };
            if r <= 0 {
                // The first datagram failed (a full socket buffer, or an
                // unreachable address): it is lost, as on any network.
                let e = std::io::Error::last_os_error();
                tracing::trace!(error = %e, "sendmmsg failed");
                sent += 1;
            } else {
                sent += r as usize;
            }
        }
        b.n = 0;
    }
}

impl<B: std::borrow::BorrowMut<BatchSlots>> Transmit for SendBatch<'_, B> {
    fn flush(&mut self) {
        self.send_now();
    }

    fn send(&mut self, to: SocketAddr, datagram: &[u8]) {
        if datagram.len() > SEND_SLOT {
            // Alone, and after what the batch holds: a device's datagrams
            // leave in the order they were encrypted.
            self.send_now();
            self.metrics.tx_packets.inc();
            self.metrics.tx_bytes.inc_by(datagram.len() as u64);
            let (addr, len) = to_sockaddr(to);
            // SAFETY: `datagram` and `addr` are valid for the call.
            let r = unsafe {
                libc::sendto(
                    self.socket.as_raw_fd(),
                    datagram.as_ptr().cast(),
                    datagram.len(),
                    0,
                    (&addr as *const libc::sockaddr_storage).cast(),
                    len,
                )
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                tracing::trace!(%to, error = %e, "send failed");
            }
            return;
        }
        if self.b.borrow().n == BATCH {
            self.send_now();
        }
        let b = self.b.borrow_mut();
        let i = b.n;
        b.slots[i][..datagram.len()].copy_from_slice(datagram);
        b.lens[i] = datagram.len();
        b.addrs[i] = to_sockaddr(to);
        b.n += 1;
    }
}

fn to_sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and aligned for it.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn from_sockaddr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match s.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a: &libc::sockaddr_in = unsafe { &*(s as *const libc::sockaddr_storage).cast() };
            Some(SocketAddr::new(
                std::net::Ipv4Addr::from(a.sin_addr.s_addr.to_ne_bytes()).into(),
                u16::from_be(a.sin_port),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a: &libc::sockaddr_in6 = unsafe { &*(s as *const libc::sockaddr_storage).cast() };
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                a.sin6_addr.s6_addr.into(),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}
