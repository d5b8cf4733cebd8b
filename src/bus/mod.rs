//! The event bus: what the gateway publishes (link, status, action and
//! device-lifecycle events, typed in [`event`]) and how consumers follow
//! it from a cursor. `GET /v1/events` reads from it, and so do the
//! in-process reactors (the fleet reactor cuts a deleted device off).
//!
//! [`EventBus`] is the interface; [`ring::RingBus`] (a bounded ring per
//! boot, named by a random epoch) is the embedded implementation. The
//! interface carries what a JetStream implementation needs: every event
//! has a message id fit for deduplication (`Nats-Msg-Id`,
//! `<gateway>-<epoch>-<id>`, derived when it is published, not stored), and a cursor is
//! a `u64` that a stream sequence can be.
//!
//! Ordering invariant: the state change an event announces is made
//! *before* it is published, so a reader that takes [`EventBus::as_of`]
//! first and then reads the state has seen every event up to there.
//! The bus never reads a clock: producers pass the event's time.

pub mod event;
pub mod ring;

pub use event::Event;
pub use ring::RingBus;

use std::sync::Arc;
use std::time::SystemTime;

/// One event on the bus.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    /// Its cursor position.
    pub id: u64,
    pub device: Option<Arc<str>>,
    /// The typed event, kept for device-lifecycle events only (the fleet
    /// applies them; every other reader takes the JSON). `None` for the
    /// rest, and for one read back from a cluster's stream (only its JSON
    /// travels). A retained event is kept small: the ring holds up to
    /// `--event-ring` of them, and their allocations sit among the
    /// sessions' (BENCHMARKS.md, "250,000 devices").
    pub event: Option<Arc<Event>>,
    /// Its JSON, made once when it was published.
    pub json: Arc<str>,
    /// How far it went: in-process consumers that publish what follows from
    /// an event (the status of a changed device) publish it as far.
    pub reach: Reach,
}

/// A resume token that is not one this bus hands out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an event id is <epoch>-<id>")]
pub struct InvalidEventId;

/// What a consumer asked to resume from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// Only events published from now on.
    Live,
    /// Events after this cursor.
    After(u64),
    /// The position cannot be honoured; the consumer must reload.
    Resync(&'static str),
}

/// Up to `max` of `events` (ascending ids) after `cursor`; `next` is the
/// id the next event will get (where the window starts when it is empty).
/// What both buses answer `read_after` with.
pub(crate) fn read_window(
    events: &std::collections::VecDeque<StoredEvent>,
    next: u64,
    cursor: u64,
    max: usize,
    closed: bool,
) -> Read {
    let oldest = events.front().map(|e| e.id).unwrap_or(next);
    if cursor.saturating_add(1) < oldest {
        return Read::Gap;
    }
    let from = events.partition_point(|e| e.id <= cursor);
    let out: Vec<StoredEvent> = events.iter().skip(from).take(max).cloned().collect();
    if out.is_empty() && closed {
        return Read::Closed;
    }
    Read::Events(out)
}

/// The JSON of a `resync` message (see [`EventBus::resync_json`]).
pub(crate) fn resync_message(
    epoch: &str,
    gateway: &str,
    as_of: &str,
    reason: &str,
    at: SystemTime,
) -> String {
    serde_json::json!({
        "type": "resync",
        "epoch": epoch,
        "gateway": gateway,
        "at": event::rfc3339(at),
        "as_of": as_of,
        "reason": reason,
        "message": "events were lost for this consumer: reload GET /v1/devices and resume the stream from its as_of",
    })
    .to_string()
}

/// The answer to [`EventBus::read_after`].
pub enum Read {
    Events(Vec<StoredEvent>),
    /// The cursor fell out of what the bus keeps.
    Gap,
    /// Nothing new, and the bus is closed: the stream ends.
    Closed,
}

/// How far an event goes (cluster mode: see `cluster::events`). A single
/// gateway keeps every event here whatever it says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Everywhere: this gateway is where it happened, and the only one
    /// publishing it.
    Cluster,
    /// This gateway's own consumers only: another gateway publishes it
    /// cluster-wide (what this one derived from a change made elsewhere).
    Local,
}

pub trait EventBus: Send + Sync + 'static {
    /// Publishes `event` about `device` (none for fleet-wide events such as
    /// a batch registration), made at `at`. Returns its cursor on this
    /// gateway's own ring (what the fleet reactor follows).
    fn publish(&self, device: Option<&str>, event: Event, at: SystemTime) -> u64 {
        self.publish_reach(device, event, at, Reach::Cluster)
    }
    /// [`publish`](Self::publish), saying how far the event goes.
    fn publish_reach(
        &self,
        device: Option<&str>,
        event: Event,
        at: SystemTime,
        reach: Reach,
    ) -> u64;
    /// The position of this gateway's own ring (the fleet reactor's cursor;
    /// `last_id` is the stream's, which in cluster mode is the cluster's).
    fn local_last_id(&self) -> u64 {
        self.last_id()
    }
    /// The cursor of the last published event (0 before the first).
    fn last_id(&self) -> u64;
    /// The resume token of `cursor` (an SSE id, `Last-Event-ID`).
    fn token(&self, cursor: u64) -> String;
    /// The token of the last published event.
    fn as_of(&self) -> String {
        self.token(self.last_id())
    }
    /// Interprets a resume token; `Err` if it is malformed.
    fn resume_from(&self, token: Option<&str>) -> Result<Resume, InvalidEventId>;
    /// Up to `max` events after `cursor`.
    fn read_after(&self, cursor: u64, max: usize) -> Read;
    /// Changes whenever an event is published or the bus closes.
    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64>;
    /// Up to `max` device-lifecycle events (`device.*`) after `cursor`,
    /// skipping the others: what the fleet reactor follows (on JetStream, a
    /// consumer filtered to the `device.*` subjects), so a storm of link
    /// events costs it nothing. `Gap` when a device event it had not read
    /// was dropped.
    fn read_device_events_after(&self, cursor: u64, max: usize) -> Read;
    /// Changes when a device-lifecycle event is published or the bus closes.
    fn subscribe_device_events(&self) -> tokio::sync::watch::Receiver<u64>;
    /// No more events: readers end once they have what is kept.
    fn close(&self);
    /// The `resync` message for a consumer that must reload: the cursor it
    /// resumes after, its token and the JSON.
    fn resync_json(&self, reason: &str, at: SystemTime) -> (u64, String, String);
    /// This gateway's id, as events name it.
    fn gateway(&self) -> &str;
}
