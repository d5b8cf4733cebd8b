//! A [`NetStack`] shared between the packet path (which feeds it packets)
//! and the tasks that relay its TCP streams to kernel sockets, and the
//! relay loop itself.
//!
//! Why a mutex per stack: smoltcp needs `&mut` for every operation. One
//! stack serves one peer, so the lock serialises one device's streams only,
//! and it is held for one smoltcp call (never across `.await`).
//!
//! Backpressure, both ways: a client is read only when its socket has room
//! in the stack's send buffer; the stack's receive buffer is drained only as
//! fast as the client accepts the bytes, so the advertised window closes
//! when the client is slow. Half-close is carried: a client EOF becomes a
//! FIN to the device, a FIN from the device becomes `shutdown(Write)`.

use parking_lot::Mutex;
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

use super::netstack::NetStack;
use super::rate_limit::{DeviceLimiter, Direction};
use crate::egress::Egress;

/// How a shared stack reaches its peer. Every stack operation that can emit
/// packets runs inside [`with_egress`](Wire::with_egress), which takes
/// whatever orders the peer's output first (on the gateway: the device's
/// session lock, so the lock order is session, then stack) and hands the
/// stack an [`Egress`] that encrypts under it.
pub trait Wire: Send + Sync {
    /// Calls `f` exactly once.
    fn with_egress(&self, f: &mut dyn FnMut(&dyn Egress));
}

/// Bytes a relay task copies per lock.
const CHUNK: usize = 64 * 1024;
/// A stream without traffic for this long gives back its copy buffers.
const IDLE: Duration = Duration::from_secs(1);

/// Waits until the stream has bytes from the device and copies them into
/// `buf` (allocated on demand); `None` once the device sent FIN or the
/// stream is gone.
pub async fn recv_into(stack: &SharedStack, h: SocketHandle, buf: &mut Vec<u8>) -> Option<usize> {
    recv_at_most(stack, h, buf, CHUNK).await
}

/// [`recv_into`], copying at most `max` bytes.
async fn recv_at_most(
    stack: &SharedStack,
    h: SocketHandle,
    buf: &mut Vec<u8>,
    max: usize,
) -> Option<usize> {
    let got = poll_fn(|cx| {
        let mut s = stack.stack.lock();
        let sock = s.tcp(h);
        if sock.can_recv() {
            if buf.is_empty() {
                *buf = vec![0u8; CHUNK];
            }
            let max = max.min(buf.len());
            Poll::Ready(Some(sock.recv_slice(&mut buf[..max]).unwrap_or(0)))
        } else if !sock.may_recv() {
            Poll::Ready(None)
        } else {
            sock.register_recv_waker(cx.waker());
            Poll::Pending
        }
    })
    .await;
    if got.is_some() {
        // The window opened: let the device know now.
        stack.with(|_| ());
    }
    got
}

/// Waits until the stream's send buffer has room; returns how much, or 0
/// once the stream can no longer send.
async fn room(stack: &SharedStack, h: SocketHandle) -> usize {
    poll_fn(|cx| {
        let mut s = stack.stack.lock();
        let sock = s.tcp(h);
        if !sock.may_send() {
            return Poll::Ready(0);
        }
        let free = sock.send_capacity() - sock.send_queue();
        if free > 0 {
            Poll::Ready(free)
        } else {
            sock.register_send_waker(cx.waker());
            Poll::Pending
        }
    })
    .await
}

/// Waits until the client has bytes; after [`IDLE`] of waiting, gives the
/// copy buffer back first.
async fn readable_or_shed(
    rd: &tokio::net::tcp::OwnedReadHalf,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    if !buf.is_empty() {
        match tokio::time::timeout(IDLE, rd.readable()).await {
            Ok(r) => return r,
            Err(_) => *buf = Vec::new(),
        }
    }
    rd.readable().await
}

pub struct SharedStack {
    stack: Mutex<NetStack>,
    wire: Arc<dyn Wire>,
    timer: tokio::sync::Notify,
    /// When the timer task will next run on its own (µs on [`clock`]),
    /// written under the stack's lock: an operation wakes it only when the
    /// stack needs it sooner (a wakeup per segment would cost a context
    /// switch per segment).
    timer_at: AtomicU64,
    /// Handles whose relay ended; removed once their TCP state allows.
    released: Mutex<Vec<SocketHandle>>,
    dead: AtomicBool,
    /// Streams open on this stack (for idle cleanup).
    pub open_streams: AtomicU64,
}

impl SharedStack {
    pub fn new(stack: NetStack, wire: Arc<dyn Wire>) -> Arc<Self> {
        Arc::new(SharedStack {
            stack: Mutex::new(stack),
            wire,
            timer: tokio::sync::Notify::new(),
            timer_at: AtomicU64::new(0),
            released: Mutex::new(Vec::new()),
            dead: AtomicBool::new(false),
            open_streams: AtomicU64::new(0),
        })
    }

    /// Runs `f` on the locked stack with the egress of its [`Wire`], then
    /// wakes the timer task if the stack now needs it sooner.
    fn output<R: Default>(&self, f: impl FnOnce(&mut NetStack, &dyn Egress) -> R) -> R {
        let mut f = Some(f);
        let mut r = None;
        let mut wake = false;
        self.wire.with_egress(&mut |egress| {
            if let Some(f) = f.take() {
                let mut s = self.stack.lock();
                r = Some(self.guard(|| f(&mut s, egress)));
                wake = self.timer_needed_sooner(&mut s);
            }
        });
        if wake {
            self.timer.notify_one();
        }
        r.unwrap_or_default()
    }

    /// Whether the locked stack `s` needs its timers before the timer task
    /// wakes by itself.
    fn timer_needed_sooner(&self, s: &mut NetStack) -> bool {
        let now = Instant::now();
        let delay = if s.throttled() {
            Some(Duration::from_millis(1))
        } else {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.poll_delay(now)))
                .unwrap_or(Some(Duration::ZERO))
        };
        match delay {
            // Half a millisecond of slack: the timer's resolution is one.
            Some(d) => clock(now + d) + 500 < self.timer_at.load(Ordering::Acquire),
            None => false,
        }
    }

    /// One inbound packet from the tunnel.
    pub fn input(&self, packet: &[u8]) {
        self.output(|s, egress| s.input(Instant::now(), packet, egress));
    }

    /// One inbound packet from the tunnel whose answer waits for
    /// [`flush`](Self::flush): a receiver feeds a whole receive batch, then
    /// flushes each stack it fed once (one ACK for the batch).
    pub fn ingest(&self, packet: &[u8]) {
        self.wire.with_egress(&mut |egress| {
            let mut s = self.stack.lock();
            self.guard(|| s.ingest(Instant::now(), packet, egress));
        });
    }

    /// [`ingest`](Self::ingest) for a caller that already holds what orders
    /// the peer's output and passes its `egress` (the gateway's packet
    /// path, under the device's session lock).
    pub fn ingest_with(&self, packet: &[u8], egress: &dyn Egress) {
        let mut s = self.stack.lock();
        self.guard(|| s.ingest(Instant::now(), packet, egress));
    }

    /// Notes this stack in `fed`, the stacks a receive batch ingested into
    /// (each once), to be [flushed](Self::flush) after the batch.
    pub fn note_fed(self: Arc<Self>, fed: &mut Vec<Arc<SharedStack>>) {
        if !fed.iter().any(|s| Arc::ptr_eq(s, &self)) {
            fed.push(self);
        }
    }

    /// Sends what the stack owes after [`ingest`](Self::ingest).
    pub fn flush(&self) {
        self.with(|_| ())
    }

    /// Runs `f` on the stack, then egress.
    pub fn with<R: Default>(&self, f: impl FnOnce(&mut NetStack) -> R) -> R {
        self.output(|s, egress| {
            let r = f(s);
            s.poll(Instant::now(), egress);
            r
        })
    }

    /// A panic inside smoltcp must not take the packet thread (or a relay
    /// task) down with it: the stack is killed, its streams end, the rest of
    /// the gateway goes on. (parking_lot's mutex is not poisoned; a dead
    /// stack is only aborted and dropped afterwards.)
    fn guard<R: Default>(&self, f: impl FnOnce() -> R) -> R {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            Ok(r) => r,
            Err(_) => {
                tracing::error!("the userspace TCP/IP stack panicked; its streams are ended");
                self.dead.store(true, Ordering::Release);
                R::default()
            }
        }
    }

    /// TCP state and queue lengths of every socket (diagnostics).
    pub fn socket_states(&self) -> Vec<String> {
        let mut s = self.stack.lock();
        let hs: Vec<SocketHandle> = s.sockets.iter().map(|(h, _)| h).collect();
        hs.into_iter()
            .map(|h| {
                let t = s.tcp(h);
                format!(
                    "{} send_q={} recv_q={}",
                    t.state(),
                    t.send_queue(),
                    t.recv_queue()
                )
            })
            .collect()
    }

    /// Marks the stack dead (its peer's link went down or it was deleted):
    /// every stream ends. Safe to call from any thread: it takes no lock,
    /// the timer task does the work.
    pub fn kill(&self) {
        self.dead.store(true, Ordering::Release);
        self.timer.notify_one();
    }

    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Drives smoltcp's timers (retransmissions, delayed ACKs, keepalives)
    /// and removes finished sockets. Ends when no stream is open and either
    /// the stack is dead, or it holds no socket and `try_exit` agrees (the
    /// owner unregisters the stack there).
    pub async fn run_timers(self: Arc<Self>, try_exit: impl Fn() -> bool) {
        loop {
            let delay = self.output(|s, egress| {
                if self.is_dead() {
                    for h in s.sockets.iter().map(|(h, _)| h).collect::<Vec<_>>() {
                        s.tcp(h).abort();
                    }
                }
                s.poll(Instant::now(), egress);
                s.release_idle_send_buffers(Instant::now());
                s.release_idle_receive_buffers(Instant::now());
                let mut released = self.released.lock();
                released.retain(|h| {
                    let st = s.tcp(*h).state();
                    if matches!(st, tcp::State::Closed | tcp::State::TimeWait) {
                        s.remove(*h);
                        false
                    } else {
                        true
                    }
                });
                // `poll_delay` only reads state; should smoltcp panic in it,
                // poll again soon rather than killing the stream.
                let delay = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    s.poll_delay(Instant::now())
                }))
                .unwrap_or(Some(Duration::from_millis(1)));
                // Paced: come back when the bucket has refilled a little.
                let delay = if s.throttled() {
                    Some(Duration::from_millis(1))
                } else {
                    delay
                };
                // Under the lock: an operation after this sees when the
                // task wakes (see `timer_at`).
                let sleep = delay
                    .unwrap_or(Duration::from_secs(1))
                    .min(Duration::from_secs(1));
                self.timer_at
                    .store(clock(Instant::now() + sleep), Ordering::Release);
                (delay, s.is_empty())
            });
            let (delay, empty) = delay;
            if self.open_streams.load(Ordering::Acquire) == 0
                && (self.is_dead() || (empty && try_exit()))
            {
                return;
            }
            let delay = delay
                .unwrap_or(Duration::from_secs(1))
                .min(Duration::from_secs(1));
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.timer.notified() => {}
            }
        }
    }

    /// Waits until the socket is established (`Ok`), refused or reset
    /// (`Err(true)`), or closed otherwise (`Err(false)`).
    pub async fn established(&self, h: SocketHandle) -> Result<(), bool> {
        poll_fn(|cx| {
            let mut s = self.stack.lock();
            let sock = s.tcp(h);
            match sock.state() {
                tcp::State::Established => Poll::Ready(Ok(())),
                tcp::State::SynSent | tcp::State::SynReceived | tcp::State::Listen => {
                    sock.register_send_waker(cx.waker());
                    sock.register_recv_waker(cx.waker());
                    Poll::Pending
                }
                tcp::State::Closed => Poll::Ready(Err(true)),
                _ => Poll::Ready(Err(false)),
            }
        })
        .await
    }

    /// Gives a finished stream's socket back for removal.
    pub fn release(&self, h: SocketHandle) {
        self.output(|s, egress| {
            let sock = s.tcp(h);
            if sock.is_open() {
                sock.close();
            }
            s.poll(Instant::now(), egress);
        });
        self.released.lock().push(h);
        self.timer.notify_one();
    }
}

/// Microseconds since the first call in this process: instants as
/// numbers an atomic can hold.
fn clock(t: Instant) -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let e = *EPOCH.get_or_init(Instant::now);
    t.saturating_duration_since(e).as_micros() as u64
}

/// Bytes moved by one relay, per direction.
#[derive(Debug, Default, Clone, Copy)]
pub struct Moved {
    /// Client to device.
    pub up: u64,
    /// Device to client.
    pub down: u64,
}

/// A device's bandwidth limit as a relay applies it: bytes move only as
/// the limiter grants them; `on_shaped(to_device, n)` is told of bytes that
/// had to wait.
pub struct Shaping<'a> {
    pub limiter: &'a DeviceLimiter,
    pub on_shaped: &'a (dyn Fn(bool, u64) + Sync),
}

impl Shaping<'_> {
    /// Waits until the limiter grants some of `want` bytes; the grant, and
    /// whether it had to wait.
    async fn grant(&self, d: Direction, want: usize) -> (usize, bool) {
        let mut waited = false;
        loop {
            match self.limiter.grant(d, Instant::now(), want) {
                Ok(n) => return (n, waited),
                Err(wait) => {
                    waited = true;
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Settles a grant of which `used` bytes moved.
    fn settle(&self, d: Direction, granted: usize, used: usize, waited: bool) {
        self.limiter.unused(d, granted.saturating_sub(used));
        if waited && used > 0 {
            (self.on_shaped)(d == Direction::ToDevice, used as u64);
        }
    }
}

/// Relays between an established stack socket and a kernel TCP stream until
/// both directions are finished. `on_bytes(up, n)` is called per chunk.
/// With `shaping`, each direction moves no faster than the device's limit:
/// the client is read only as the bucket allows, and the device's bytes are
/// taken from the stack only as the bucket allows, so the window the device
/// sees closes (its TCP slows down instead of losing segments).
pub async fn relay(
    stack: &SharedStack,
    h: SocketHandle,
    client: tokio::net::TcpStream,
    shaping: Option<&Shaping<'_>>,
    on_bytes: &(dyn Fn(bool, u64) + Sync),
) -> Moved {
    let _ = client.set_nodelay(true);
    let (rd, mut wr) = client.into_split();
    // Copy buffers exist only while bytes flow: an idle stream holds none.
    let up = async {
        let mut buf: Vec<u8> = Vec::new();
        let mut total = 0u64;
        loop {
            // Read the client only when the stack has room for the bytes.
            let room = room(stack, h).await;
            if room == 0 {
                break;
            }
            let want = room.min(CHUNK);
            // Wait for the client, but give up as soon as the stream is torn
            // down on the device's side (link down, deletion, reset).
            let closed = poll_fn(|cx| {
                let mut s = stack.stack.lock();
                let sock = s.tcp(h);
                if sock.may_send() {
                    sock.register_send_waker(cx.waker());
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            });
            tokio::select! {
                r = readable_or_shed(&rd, &mut buf) => if r.is_err() { stack.with(|s| s.tcp(h).close()); break },
                _ = closed => break,
            };
            if buf.is_empty() {
                buf = vec![0u8; CHUNK];
            }
            let (want, waited) = match shaping {
                Some(s) => s.grant(Direction::ToDevice, want).await,
                None => (want, false),
            };
            let read = rd.try_read(&mut buf[..want]);
            if let Some(s) = shaping {
                let used = *read.as_ref().unwrap_or(&0);
                s.settle(Direction::ToDevice, want, used, waited);
            }
            let read = match read {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                r => r,
            };
            match read {
                Ok(0) | Err(_) => {
                    // Client EOF: FIN to the device (half-close).
                    stack.with(|s| s.tcp(h).close());
                    break;
                }
                Ok(n) => {
                    let sent = stack.with(|s| s.send(h, &buf[..n]));
                    total += sent as u64;
                    on_bytes(true, sent as u64);
                    if sent < n {
                        break; // the socket closed under us
                    }
                }
            }
        }
        total
    };
    let down = async {
        let mut buf: Vec<u8> = Vec::new();
        let mut total = 0u64;
        loop {
            let (max, waited) = match shaping {
                Some(s) => s.grant(Direction::FromDevice, CHUNK).await,
                None => (CHUNK, false),
            };
            // Keep the copy buffer through short pauses; after a second
            // without data it goes, and comes back with the next bytes.
            let got = match tokio::time::timeout(IDLE, recv_at_most(stack, h, &mut buf, max)).await
            {
                Ok(got) => got,
                Err(_) => {
                    buf = Vec::new();
                    recv_at_most(stack, h, &mut buf, max).await
                }
            };
            if let Some(s) = shaping {
                s.settle(Direction::FromDevice, max, got.unwrap_or(0), waited);
            }
            match got {
                Some(n) => {
                    if wr.write_all(&buf[..n]).await.is_err() {
                        stack.with(|s| s.tcp(h).abort());
                        break;
                    }
                    total += n as u64;
                    on_bytes(false, n as u64);
                }
                None => {
                    // FIN (or reset) from the device: half-close the client.
                    let _ = wr.shutdown().await;
                    break;
                }
            }
        }
        total
    };
    let (up, down) = tokio::join!(up, down);
    Moved { up, down }
}

/// Sends `request` on an established stream, then reads the answer until
/// `complete` says it is whole or the device closes its side. At most
/// `limit` bytes are read (what was read is returned, for the caller's
/// parser to refuse). `None` if the request could not be sent.
pub async fn exchange(
    stack: &SharedStack,
    h: SocketHandle,
    request: &[u8],
    limit: usize,
    complete: impl Fn(&[u8]) -> bool,
) -> Option<Vec<u8>> {
    let mut sent = 0;
    while sent < request.len() {
        let room = room(stack, h).await;
        if room == 0 {
            return None;
        }
        sent += stack.with(|s| s.send(h, &request[sent..]));
    }
    let mut out = Vec::new();
    let mut buf = Vec::new();
    while let Some(n) = recv_into(stack, h, &mut buf).await {
        out.extend_from_slice(&buf[..n]);
        if out.len() > limit || complete(&out) {
            return Some(out);
        }
    }
    Some(out)
}
