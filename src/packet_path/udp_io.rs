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
