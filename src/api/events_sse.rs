//! `GET /v1/events`: the event stream as Server-Sent Events.
//!
//! Each message is `id: <epoch>-<id>` and `data: <JSON>`, with no `event:`
//! name (the type is in the JSON). A consumer resumes with the standard
//! `Last-Event-ID` header (or `?last_event_id=`); if the ring no longer holds
//! what followed that id, or the id is of another boot, the first message is
//! a `resync` telling it to reload `GET /v1/devices` and to resume from that
//! listing's `as_of`. The stream then goes on live; the resync message's own
//! SSE id is the current position, so an `EventSource` that reconnects by
//! itself does not loop on the same resync.

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::stream::Stream;
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use super::{ApiError, SharedState};
use crate::bus::{EventBus, Read, Resume};

/// Events copied out of the ring per lock.
const CHUNK: usize = 256;

struct Cursor {
    hub: Arc<dyn EventBus>,
    rx: tokio::sync::watch::Receiver<u64>,
    cursor: u64,
    pending: VecDeque<Event>,
    /// The stream's permit, released when the stream ends.
    _open: OpenStream,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Cursor {
    fn push_resync(&mut self, reason: &str) {
        self.metrics.event_resyncs.inc();
        let (last, as_of, json) = self.hub.resync_json(reason, std::time::SystemTime::now());
        self.cursor = last;
        self.pending
            .push_back(Event::default().id(as_of).data(json));
    }
}

pub async fn events(
    State(s): State<SharedState>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    // Each open stream holds a permit (and the gauge) until it ends.
    let Ok(permit) = s.event_streams.clone().try_acquire_owned() else {
        s.metrics.api_refused("event_streams");
        return Err(ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "too_many_streams",
            format!(
                "{} event streams are open, the most this gateway serves (--max-event-streams); close one or retry later",
                s.metrics.api_event_streams.get()
            ),
        ));
    };
    s.metrics.api_event_streams.inc();
    let open = OpenStream {
        _permit: permit,
        metrics: s.metrics.clone(),
    };
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| q.get("last_event_id").cloned());
    let hub = s.events.clone();
    // Subscribe before reading the position, so no publication is missed.
    let rx = hub.subscribe();
    let resume = hub.resume_from(last.as_deref()).map_err(|_| {
        ApiError::bad_field(
            "Last-Event-ID",
            "Last-Event-ID must be <epoch>-<id>, as sent in an event's id",
        )
    })?;
    let mut c = Cursor {
        cursor: 0,
        hub,
        rx,
        pending: VecDeque::new(),
        _open: open,
        metrics: s.metrics.clone(),
    };
    match resume {
        Resume::Live => c.cursor = c.hub.last_id(),
        Resume::After(id) => c.cursor = id,
        Resume::Resync(reason) => c.push_resync(reason),
    }
    let stream = futures_util::stream::unfold(c, |mut c| async move {
        loop {
            if let Some(ev) = c.pending.pop_front() {
                return Some((Ok(ev), c));
            }
            c.rx.borrow_and_update();
            match c.hub.read_after(c.cursor, CHUNK) {
                Read::Events(v) if !v.is_empty() => {
                    for e in v {
                        c.cursor = e.id;
                        c.pending
                            .push_back(Event::default().id(c.hub.token(e.id)).data(&*e.json));
                    }
                }
                Read::Events(_) => {
                    if c.rx.changed().await.is_err() {
                        return None;
                    }
                }
                // This consumer fell behind the ring while connected.
                Read::Gap => c.push_resync("too_old"),
                Read::Closed => return None,
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// An open event stream: holds its permit and the gauge.
struct OpenStream {
    _permit: tokio::sync::OwnedSemaphorePermit,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.metrics.api_event_streams.dec();
    }
}
