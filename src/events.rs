//! The event stream: link events (and, in later issues, status and action
//! events) kept in a bounded ring and fanned out to Server-Sent-Event
//! consumers.
//!
//! Each event gets the next id of a monotonic counter that restarts with every
//! gateway boot; the boot's random `epoch` tells consumers that ids of another
//! boot mean nothing here. A consumer resumes with `Last-Event-ID:
//! <epoch>-<id>`; if that id fell out of the ring or belongs to another epoch
//! it gets a `resync` message rather than a silent gap.
//!
//! Ordering invariant: the state change an event announces is made *before*
//! the event is published. So a reader that takes [`EventHub::last_id`] first
//! and then reads the state has seen every event up to that id (that is what
//! `GET /v1/devices` returns as `as_of`).
//!
//! Why a mutex around the ring: publishing is rare (transitions, not packets)
//! and consumers copy out a bounded slice, so the lock is held for
//! microseconds and never across an `.await`.

use parking_lot::Mutex;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::Arc;

/// One published event, serialised once at publication.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub id: u64,
    /// The JSON text of the event.
    pub json: Arc<str>,
}

/// The fields every event carries besides its own.
#[derive(Debug, Serialize)]
struct Common<'a, T: Serialize> {
    id: u64,
    epoch: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    device: &'a str,
    at: String,
    gateway: &'a str,
    #[serde(flatten)]
    extra: T,
}

/// A `Last-Event-ID` that is not `<epoch>-<id>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an event id is <epoch>-<id>")]
pub struct InvalidEventId;

/// What a consumer asked to resume from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// Only events published from now on.
    Live,
    /// Events after this id of this epoch.
    After(u64),
    /// The position cannot be honoured; the consumer must reload.
    Resync(&'static str),
}

pub struct EventHub {
    epoch: String,
    gateway: String,
    capacity: usize,
    inner: Mutex<Ring>,
    notify: tokio::sync::watch::Sender<u64>,
}

struct Ring {
    next_id: u64,
    events: VecDeque<StoredEvent>,
    closed: bool,
}

/// The answer to [`EventHub::read_after`].
pub enum Read {
    Events(Vec<StoredEvent>),
    /// The cursor fell out of the ring.
    Gap,
    /// Nothing new, and the hub is closed: the stream ends.
    Closed,
}

impl EventHub {
    pub fn new(epoch: String, gateway: String, capacity: usize) -> Self {
        let (notify, _) = tokio::sync::watch::channel(0);
        EventHub {
            epoch,
            gateway,
            capacity: capacity.max(1),
            inner: Mutex::new(Ring {
                next_id: 1,
                events: VecDeque::new(),
                closed: false,
            }),
            notify,
        }
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }
    pub fn gateway(&self) -> &str {
        &self.gateway
    }

    /// Id of the last published event (0 before the first).
    pub fn last_id(&self) -> u64 {
        self.inner.lock().next_id - 1
    }

    /// `"<epoch>-<id>"` of the last published event.
    pub fn as_of(&self) -> String {
        format!("{}-{}", self.epoch, self.last_id())
    }

    /// Publishes an event of type `kind` about `device`, with `extra` fields
    /// flattened beside the common ones. Returns its id.
    pub fn publish<T: Serialize>(&self, kind: &str, device: &str, extra: T) -> u64 {
        let at = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        let mut ring = self.inner.lock();
        let id = ring.next_id;
        ring.next_id += 1;
        let json = serde_json::to_string(&Common {
            id,
            epoch: &self.epoch,
            kind,
            device,
            at,
            gateway: &self.gateway,
            extra,
        })
        .expect("events serialise");
        if ring.events.len() == self.capacity {
            ring.events.pop_front();
        }
        ring.events.push_back(StoredEvent {
            id,
            json: json.into(),
        });
        drop(ring);
        self.notify.send_replace(id);
        id
    }

    /// Interprets a `Last-Event-ID` value. `Err` if it is not of the form
    /// `<epoch>-<id>`.
    pub fn resume_from(&self, last_event_id: Option<&str>) -> Result<Resume, InvalidEventId> {
        let Some(text) = last_event_id else {
            return Ok(Resume::Live);
        };
        let (epoch, id) = text.trim().rsplit_once('-').ok_or(InvalidEventId)?;
        let id: u64 = id.parse().map_err(|_| InvalidEventId)?;
        if epoch != self.epoch {
            return Ok(Resume::Resync("epoch_changed"));
        }
        let ring = self.inner.lock();
        if id >= ring.next_id {
            // An id from the future of this epoch: refuse to guess.
            return Ok(Resume::Resync("unknown_id"));
        }
        let oldest = ring.events.front().map(|e| e.id).unwrap_or(ring.next_id);
        if id + 1 < oldest {
            return Ok(Resume::Resync("too_old"));
        }
        Ok(Resume::After(id))
    }

    /// Up to `max` events with ids after `cursor`.
    pub fn read_after(&self, cursor: u64, max: usize) -> Read {
        let ring = self.inner.lock();
        let oldest = ring.events.front().map(|e| e.id).unwrap_or(ring.next_id);
        if cursor + 1 < oldest {
            return Read::Gap;
        }
        let skip = (cursor + 1 - oldest) as usize;
        let out: Vec<StoredEvent> = ring.events.iter().skip(skip).take(max).cloned().collect();
        if out.is_empty() && ring.closed {
            return Read::Closed;
        }
        Read::Events(out)
    }

    /// A receiver that changes whenever an event is published or the hub
    /// closes.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.notify.subscribe()
    }

    /// No more events: streams end once they have sent what is in the ring.
    pub fn close(&self) {
        self.inner.lock().closed = true;
        self.notify.send_modify(|_| {});
    }

    /// The `resync` message for a consumer that must reload: the id it
    /// resumes after, the SSE id (`as_of`) and the JSON.
    pub fn resync_json(&self, reason: &str) -> (u64, String, String) {
        let last = self.last_id();
        let as_of = format!("{}-{}", self.epoch, last);
        let json = serde_json::json!({
            "type": "resync",
            "epoch": self.epoch,
            "gateway": self.gateway,
            "at": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            "as_of": as_of,
            "reason": reason,
            "message": "events were lost for this consumer: reload GET /v1/devices and resume the stream from its as_of",
        });
        (last, as_of, json.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(r: Read) -> Vec<u64> {
        match r {
            Read::Events(v) => v.into_iter().map(|e| e.id).collect(),
            _ => panic!("expected events"),
        }
    }

    #[test]
    fn ring_resume_and_gaps() {
        let hub = EventHub::new("e1".into(), "gw".into(), 3);
        assert_eq!(hub.as_of(), "e1-0");
        for _ in 0..5 {
            hub.publish(
                "link.up",
                "dev",
                serde_json::json!({"endpoint": "1.2.3.4:5"}),
            );
        }
        assert_eq!(hub.last_id(), 5);
        // Ring holds 3, 4, 5.
        assert_eq!(hub.resume_from(Some("e1-2")), Ok(Resume::After(2)));
        assert_eq!(ids(hub.read_after(2, 10)), vec![3, 4, 5]);
        assert_eq!(ids(hub.read_after(4, 10)), vec![5]);
        assert_eq!(hub.resume_from(Some("e1-1")), Ok(Resume::Resync("too_old")));
        assert!(matches!(hub.read_after(1, 10), Read::Gap));
        assert_eq!(
            hub.resume_from(Some("e0-4")),
            Ok(Resume::Resync("epoch_changed"))
        );
        assert_eq!(
            hub.resume_from(Some("e1-9")),
            Ok(Resume::Resync("unknown_id"))
        );
        assert_eq!(hub.resume_from(Some("garbage")), Err(InvalidEventId));
        assert_eq!(hub.resume_from(None), Ok(Resume::Live));
        hub.close();
        assert!(matches!(hub.read_after(5, 10), Read::Closed));
    }

    #[test]
    fn event_json_has_the_common_fields() {
        let hub = EventHub::new("boot".into(), "gw-1".into(), 10);
        hub.publish(
            "link.down",
            "dev-1",
            serde_json::json!({"endpoint": "1.2.3.4:5", "reason": "timeout"}),
        );
        let Read::Events(v) = hub.read_after(0, 10) else {
            panic!()
        };
        let j: serde_json::Value = serde_json::from_str(&v[0].json).unwrap();
        assert_eq!(j["id"], 1);
        assert_eq!(j["epoch"], "boot");
        assert_eq!(j["type"], "link.down");
        assert_eq!(j["device"], "dev-1");
        assert_eq!(j["gateway"], "gw-1");
        assert_eq!(j["endpoint"], "1.2.3.4:5");
        assert_eq!(j["reason"], "timeout");
        assert!(humantime::parse_rfc3339(j["at"].as_str().unwrap()).is_ok());
    }
}
