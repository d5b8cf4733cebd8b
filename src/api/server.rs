//! The API's HTTP server, bounded (issue "Hold up under abuse"): anyone who
//! can reach the API port can open connections, and `POST /v1/session`
//! needs no credentials, so nothing a peer sends may hold memory or a
//! connection for long.
//!
//! - at most `max_connections` connections, and `max_connections_per_ip`
//!   from one source address; beyond, a new one is closed at once
//!   (counted). Why per address: a connection waiting for its head or
//!   body holds about 56 KiB here (hyper's read and write buffers, the
//!   request's futures, the allocator's share), so 2,000 slow clients from
//!   one address held 110 MiB (`benches/abuse.sh`); 128 of them hold 7;
//! - a request head must arrive within `header_timeout` (hyper's header
//!   read timeout), a request body within `body_timeout` of its head (a
//!   deadline on the whole body, not per chunk: a trickle does not reset
//!   it);
//! - a connection with no byte read or written for `idle_timeout` is
//!   closed (an event stream writes a keep-alive comment every 15 s, so an
//!   open stream is never idle);
//! - body sizes are capped per route by the router (`DefaultBodyLimit`).
//!
//! axum's own `serve` has none of these knobs; this is the same hyper
//! connection underneath with them set.

use axum::extract::ConnectInfo;
use hyper::body::{Frame, Incoming, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::metrics::Metrics;

/// The bounds of the API server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
            max_connections: 4096,
            max_connections_per_ip: 128,
        }
    }
}

/// Serves `app` on `listener` until `shutdown`; then stops accepting and
/// gives open connections `drain` to finish before dropping them.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    shutdown: tokio::sync::oneshot::Receiver<()>,
    drain: Duration,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let per_ip = Arc::new(PerIp::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors, most likely: let some close.
                    tracing::warn!(error = %e, "API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            // Reap finished connection tasks as we go.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics.api_refused("max_connections");
            drop(stream);
            continue;
        };
        let Some(ip_slot) = PerIp::take(&per_ip, peer.ip(), limits.max_connections_per_ip) else {
            metrics.api_refused("max_connections_per_ip");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (app, metrics, mut stop) = (app.clone(), metrics.clone(), stop_rx.clone());
        conns.spawn(async move {
            let _permit = (permit, ip_slot);
            metrics.api_connections.inc();
            let body_metrics = metrics.clone();
            let io = hyper_util::rt::TokioIo::new(IdleIo::new(stream, limits.idle_timeout));
            let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let mut req = req.map(|b| {
                    axum::body::Body::new(TimedBody::new(
                        b,
                        limits.body_timeout,
                        body_metrics.clone(),
                    ))
                });
                req.extensions_mut().insert(ConnectInfo(peer));
                let app = app.clone();
                async move { tower::ServiceExt::oneshot(app, req).await }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(io, service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                let kind = if e.is_timeout() {
                    "header"
                } else if e.to_string().contains(IDLE) {
                    "idle"
                } else {
                    ""
                };
                if !kind.is_empty() {
                    metrics.api_timeout(kind);
                }
                tracing::debug!(%peer, error = %e, "API connection ended");
            }
            metrics.api_connections.dec();
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(drain, async { while conns.join_next().await.is_some() {} }).await;
    conns.abort_all();
}

const IDLE: &str = "the connection was idle too long";

/// Connections open per source address.
#[derive(Default)]
struct PerIp(parking_lot::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

/// One connection's place in its address's count, given back on drop.
struct IpSlot(Arc<PerIp>, std::net::IpAddr);

impl PerIp {
    fn take(me: &Arc<PerIp>, ip: std::net::IpAddr, max: usize) -> Option<IpSlot> {
        let mut m = me.0.lock();
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot(me.clone(), ip))
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut m = self.0 .0.lock();
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// A stream that fails once no byte went either way for `idle`.
struct IdleIo<T> {
    inner: T,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
}

impl<T> IdleIo<T> {
    fn new(inner: T, idle: Duration) -> Self {
        IdleIo {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
        }
    }

    fn touch(&mut self) {
        self.timer.as_mut().reset(Instant::now() + self.idle);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.touch();
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                if self.timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        IDLE,
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A request body that must arrive whole before a deadline.
struct TimedBody {
    inner: Incoming,
    deadline: Pin<Box<Sleep>>,
    metrics: Arc<Metrics>,
}

impl TimedBody {
    fn new(inner: Incoming, within: Duration, metrics: Arc<Metrics>) -> Self {
        TimedBody {
            inner,
            deadline: Box::pin(tokio::time::sleep(within)),
            metrics,
        }
    }
}

/// The body did not arrive in time.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within the body timeout")]
pub struct BodyTimeout;

impl hyper::body::Body for TimedBody {
    type Data = bytes::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(f) => Poll::Ready(f.map(|r| r.map_err(Into::into))),
            Poll::Pending => {
                if self.deadline.as_mut().poll(cx).is_ready() {
                    self.metrics.api_timeout("body");
                    return Poll::Ready(Some(Err(Box::new(BodyTimeout))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
