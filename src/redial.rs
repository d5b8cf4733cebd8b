//! Coming back after a restart (the I/O half; the sans-IO stage is
//! `packet_path::redial`).
//!
//! - [`EndpointBook`] watches links and persists, once a second in one
//!   transaction, the endpoint of every device whose link comes up, and
//!   forgets it when the link goes down for good (timeout, deletion). A
//!   gateway that stops (cleanly or not) leaves the endpoints of its
//!   connected devices in the registry.
//! - [`spawn`] starts the redial driver after a start: it dials those devices
//!   at a paced rate with at most [`IN_FLIGHT`] initiations unanswered (so
//!   it goes no faster than the devices answer: an initiation that waits
//!   too long is resent by boringtun after 5 s, and each resend costs both
//!   sides a handshake), and holds back while the handshake queue says the
//!   gateway is under load, so redials share the handshake budget with
//!   devices dialling in by themselves.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::link_state::DownReason;
use crate::packet_path::{PacketPath, BUF_SIZE};
use crate::registry::{RedialTarget, Registry};
use crate::session_table::Session;

/// Endpoint changes waiting to be written.
#[derive(Default)]
pub struct EndpointBook {
    dirty: Mutex<HashMap<Box<str>, Option<String>>>,
}

impl crate::packet_path::LinkObserver for EndpointBook {
    fn link_changed(
        &self,
        session: &Session,
        up: bool,
        endpoint: std::net::SocketAddr,
        down: Option<DownReason>,
    ) {
        // Called with the session locked: only note it.
        let value = match (up, down) {
            (true, _) => Some(endpoint.to_string()),
            // Stopping: keep it, it is where to redial.
            (false, Some(DownReason::Shutdown)) => return,
            (false, _) => None,
        };
        self.dirty.lock().insert(session.uuid.clone(), value);
    }
}

impl EndpointBook {
    /// Writes what changed since the last call.
    pub fn flush(&self, registry: &Registry) {
        let rows: Vec<(Box<str>, Option<String>)> = self.dirty.lock().drain().collect();
        if let Err(e) = registry.save_endpoints(&rows) {
            tracing::warn!(error = %e, "could not persist device endpoints");
        }
    }

    /// Flushes once a second until `stop`, then once more.
    pub async fn run(
        self: Arc<Self>,
        registry: Arc<Registry>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => break,
            }
            let (book, reg) = (self.clone(), registry.clone());
            let _ = tokio::task::spawn_blocking(move || book.flush(&reg)).await;
        }
        let (book, reg) = (self.clone(), registry.clone());
        let _ = tokio::task::spawn_blocking(move || book.flush(&reg)).await;
    }
}

/// Initiations the driver leaves unanswered at most.
pub const IN_FLIGHT: usize = 1024;
/// After this long an unanswered redial stops counting as in flight
/// (boringtun keeps retrying it; the device may be gone).
const GIVE_UP: Duration = Duration::from_secs(3);

/// A running redial driver.
pub struct Redialer {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<()>,
}

impl Redialer {
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.handle.join();
    }
}

/// Dials `targets` at up to `per_second`, pausing while the gateway is
/// under load. Sends through the packet path's egress socket.
pub fn spawn(
    path: Arc<PacketPath>,
    targets: Vec<RedialTarget>,
    per_second: u32,
) -> std::io::Result<Redialer> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let handle = std::thread::Builder::new()
        .name("cloudlink-redial".into())
        .spawn(move || {
            let started = Instant::now();
            let total = targets.len();
            let mut out = vec![0u8; BUF_SIZE].into_boxed_slice();
            let mut dialed = 0usize;
            // Paced by deadline: `per_second` on average, in ticks of 10 ms,
            // however long each tick's dialling took.
            let tick = Duration::from_millis(10);
            let per_tick = (per_second / 100).max(1) as usize;
            let mut next = targets.into_iter();
            let mut deadline = Instant::now();
            let mut in_flight: std::collections::VecDeque<(Arc<Session>, Instant)> =
                std::collections::VecDeque::with_capacity(IN_FLIGHT);
            'outer: while !flag.load(Ordering::Relaxed) {
                // Answered (or given up) redials leave the window.
                let now = Instant::now();
                while let Some((s, at)) = in_flight.front() {
                    if s.state.lock().last_handshake_at.is_some()
                        || now.duration_since(*at) >= GIVE_UP
                    {
                        in_flight.pop_front();
                    } else {
                        break;
                    }
                }
                if path.under_load() || in_flight.len() >= IN_FLIGHT {
                    std::thread::sleep(Duration::from_millis(2));
                    deadline = Instant::now();
                    continue;
                }
                let Some(socket) = path.egress_socket() else {
                    break;
                };
                let mut tx = crate::packet_path::send::socket_tx(&socket, &path.metrics);
                for _ in 0..per_tick.min(IN_FLIGHT - in_flight.len()) {
                    let Some(t) = next.next() else {
                        break 'outer;
                    };
                    let now = Instant::now();
                    if let Some(s) = path.redial(now, &t, &mut out, &mut tx) {
                        in_flight.push_back((s, now));
                        dialed += 1;
                    }
                }
                drop(tx);
                deadline += tick;
                let now = Instant::now();
                if deadline > now {
                    std::thread::sleep(deadline - now);
                } else if now - deadline > tick * 10 {
                    // Far behind (the CPU is busy): do not burst to catch up.
                    deadline = now;
                }
            }
            tracing::info!(
                devices = total,
                dialed,
                seconds = started.elapsed().as_secs_f64(),
                "redial after restart done"
            );
        })?;
    Ok(Redialer { stop, handle })
}
