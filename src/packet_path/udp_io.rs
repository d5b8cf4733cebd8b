//! Stage 0, UDP I/O: the only code of the packet path that touches sockets.
//!
//! A worker thread blocks on the UDP socket, hands each datagram to
//! [`PacketPath::handle_datagram`] with its own scratch buffer and registry
//! connection, and writes the answers straight back to the socket. A timer
//! thread runs [`PacketPath::tick`] every 250 ms. Both are plain OS threads:
//! the work is CPU-bound crypto and a short SQLite lookup, which would stall
//! an async runtime's workers.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::send::socket_tx;
use super::timers::TICK;
use super::{PacketPath, BUF_SIZE};
use crate::registry::RegistryReader;

/// Running packet threads; stopped by [`PacketThreads::stop`].
pub struct PacketThreads {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

impl PacketThreads {
    /// Starts one receive worker on `socket` and the timer thread.
    pub fn start(
        path: Arc<PacketPath>,
        socket: Arc<UdpSocket>,
        reader: RegistryReader,
    ) -> std::io::Result<Self> {
        size_socket_buffers(std::os::fd::AsRawFd::as_raw_fd(&*socket), 4 << 20);
        // The timeout only bounds how long a stop request waits.
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        path.set_egress(&socket);
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        {
            let (path, socket, stop) = (path.clone(), socket.clone(), stop.clone());
            handles.push(
                std::thread::Builder::new()
                    .name("cloudlink-rx".into())
                    .spawn(move || receive_loop(&path, &socket, reader, &stop))?,
            );
        }
        {
            let (path, socket, stop) = (path.clone(), socket.clone(), stop.clone());
            handles.push(
                std::thread::Builder::new()
                    .name("cloudlink-timers".into())
                    .spawn(move || timer_loop(&path, &socket, &stop))?,
            );
        }
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

fn receive_loop(
    path: &PacketPath,
    socket: &UdpSocket,
    mut reader: RegistryReader,
    stop: &AtomicBool,
) {
    let mut inbuf = vec![0u8; BUF_SIZE].into_boxed_slice();
    let mut out = vec![0u8; BUF_SIZE].into_boxed_slice();
    let mut tx = socket_tx(socket);
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut inbuf) {
            Ok((n, src)) => path.handle_datagram(
                Instant::now(),
                src,
                &inbuf[..n],
                &mut out,
                &mut reader,
                &mut tx,
            ),
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
    }
}

fn timer_loop(path: &PacketPath, socket: &UdpSocket, stop: &AtomicBool) {
    let mut out = vec![0u8; BUF_SIZE].into_boxed_slice();
    let mut scratch = Vec::new();
    let mut tx = socket_tx(socket);
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= next {
            path.tick(now, &mut out, &mut scratch, &mut tx);
            next = now + TICK;
        }
        std::thread::sleep(
            next.saturating_duration_since(Instant::now())
                .min(Duration::from_millis(50)),
        );
    }
}

/// Asks for `bytes` of kernel receive and send buffer on a UDP socket:
/// bursts (a relay stream's window, a reconnect storm) must not overflow the
/// default ~200 KiB. `SO_*BUFFORCE` (root or CAP_NET_ADMIN) goes past
/// `net.core.rmem_max`/`wmem_max`; without it the kernel caps the request
/// at those sysctls, and a warning says so.
pub fn size_socket_buffers(fd: std::os::fd::RawFd, bytes: usize) {
    let set = |opt: libc::c_int| -> bool {
        let v = bytes as libc::c_int;
        // SAFETY: setsockopt reads an int of the given size from &v.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) == 0
        }
    };
    let rcv = set(libc::SO_RCVBUFFORCE) || set(libc::SO_RCVBUF);
    let snd = set(libc::SO_SNDBUFFORCE) || set(libc::SO_SNDBUF);
    let get = |opt: libc::c_int| -> usize {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into &v.
        unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            );
        }
        v as usize
    };
    // The kernel reports twice the usable size.
    let got = get(libc::SO_RCVBUF) / 2;
    if !rcv || !snd || got < bytes {
        tracing::warn!(
            wanted = bytes,
            got,
            "UDP socket buffers are smaller than wanted; raise the net.core.rmem_max and net.core.wmem_max sysctls (or run with CAP_NET_ADMIN)"
        );
    }
}
