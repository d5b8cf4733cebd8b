//! The embedded event bus: a bounded ring per boot.
//!
//! Each event gets the next id of a monotonic counter that restarts with
//! every gateway boot; the boot's random `epoch` tells consumers that ids of
//! another boot mean nothing here. A consumer resumes with `Last-Event-ID:
//! <epoch>-<id>`; if that id fell out of the ring or belongs to another
//! epoch it gets a `resync` message rather than a silent gap.
//!
//! Why a mutex around the ring: publishing is rare (transitions, not
//! packets) and consumers copy out a bounded slice, so the lock is held for
//! microseconds and never across an `.await`.

use parking_lot::Mutex;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::SystemTime;

use super::{Event, EventBus, InvalidEventId, Read, Resume, StoredEvent};

/// The fields every event carries besides its own.
#[derive(Debug, Serialize)]
struct Envelope<'a> {
    id: u64,
    epoch: &'a str,
    device: Option<&'a str>,
    at: String,
    gateway: &'a str,
    #[serde(flatten)]
    event: &'a Event,
}

pub struct RingBus {
    epoch: String,
    gateway: String,
    capacity: usize,
    inner: Mutex<Ring>,
    notify: tokio::sync::watch::Sender<u64>,
    device_notify: tokio::sync::watch::Sender<u64>,
}

struct Ring {
    next_id: u64,
    events: VecDeque<StoredEvent>,
    /// The device-lifecycle events again (rare: a copy of an `Arc`), so
    /// their reader skips the rest without reading it.
    device: VecDeque<StoredEvent>,
    /// Id of the newest device event dropped from `device`.
    device_dropped: u64,
    closed: bool,
}

impl RingBus {
    pub fn new(epoch: String, gateway: String, capacity: usize) -> Self {
        let (notify, _) = tokio::sync::watch::channel(0);
        let (device_notify, _) = tokio::sync::watch::channel(0);
        RingBus {
            epoch,
            gateway,
            capacity: capacity.max(1),
            inner: Mutex::new(Ring {
                next_id: 1,
                events: VecDeque::new(),
                device: VecDeque::new(),
                device_dropped: 0,
                closed: false,
            }),
            notify,
            device_notify,
        }
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }
}

impl EventBus for RingBus {
    fn gateway(&self) -> &str {
        &self.gateway
    }

    fn last_id(&self) -> u64 {
        self.inner.lock().next_id - 1
    }

    fn token(&self, cursor: u64) -> String {
        format!("{}-{}", self.epoch, cursor)
    }

    fn publish_reach(
        &self,
        device: Option<&str>,
        event: Event,
        at: SystemTime,
        reach: super::Reach,
    ) -> u64 {
        let at = humantime::format_rfc3339_millis(at).to_string();
        let mut ring = self.inner.lock();
        let id = ring.next_id;
        ring.next_id += 1;
        // Serialising a value of our own types into a String cannot fail.
        let json = serde_json::to_string(&Envelope {
            id,
            epoch: &self.epoch,
            device,
            at,
            gateway: &self.gateway,
            event: &event,
        })
        .unwrap_or_default();
        if ring.events.len() == self.capacity {
            ring.events.pop_front();
        }
        let lifecycle = event.is_device_lifecycle();
        let stored = StoredEvent {
            id,
            device: device.map(Into::into),
            event: lifecycle.then(|| Arc::new(event)),
            json: json.into(),
            reach,
        };
        if lifecycle {
            if ring.device.len() == self.capacity {
                if let Some(old) = ring.device.pop_front() {
                    ring.device_dropped = old.id;
                }
            }
            ring.device.push_back(stored.clone());
        }
        ring.events.push_back(stored);
        drop(ring);
        self.notify.send_replace(id);
        if lifecycle {
            self.device_notify.send_replace(id);
        }
        id
    }

    fn resume_from(&self, last_event_id: Option<&str>) -> Result<Resume, InvalidEventId> {
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

    fn read_after(&self, cursor: u64, max: usize) -> Read {
        let ring = self.inner.lock();
        super::read_window(&ring.events, ring.next_id, cursor, max, ring.closed)
    }

    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.notify.subscribe()
    }

    fn read_device_events_after(&self, cursor: u64, max: usize) -> Read {
        let ring = self.inner.lock();
        if cursor < ring.device_dropped {
            return Read::Gap;
        }
        let from = ring.device.partition_point(|e| e.id <= cursor);
        let out: Vec<StoredEvent> = ring.device.iter().skip(from).take(max).cloned().collect();
        if out.is_empty() && ring.closed {
            return Read::Closed;
        }
        Read::Events(out)
    }

    fn subscribe_device_events(&self) -> tokio::sync::watch::Receiver<u64> {
        self.device_notify.subscribe()
    }

    fn close(&self) {
        self.inner.lock().closed = true;
        self.notify.send_modify(|_| {});
        self.device_notify.send_modify(|_| {});
    }

    fn resync_json(&self, reason: &str, at: SystemTime) -> (u64, String, String) {
        let last = self.last_id();
        let as_of = self.token(last);
        let json = super::resync_message(&self.epoch, &self.gateway, &as_of, reason, at);
        (last, as_of, json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::bus::event::Link;

    fn link(endpoint: &str, reason: &str) -> Event {
        Event::LinkUp(Link {
            endpoint: endpoint.into(),
            reason: reason.into(),
            previous_endpoint: None,
            roams: None,
            address: "10.0.0.2".into(),
        })
    }

    fn ids(r: Read) -> Vec<u64> {
        match r {
            Read::Events(v) => v.into_iter().map(|e| e.id).collect(),
            _ => panic!("expected events"),
        }
    }

    #[test]
    fn ring_resume_and_gaps() {
        let hub = RingBus::new("e1".into(), "gw".into(), 3);
        assert_eq!(hub.as_of(), "e1-0");
        for _ in 0..5 {
            hub.publish(
                Some("dev"),
                link("1.2.3.4:5", "handshake"),
                SystemTime::now(),
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
    fn device_events_are_read_apart() {
        use crate::bus::event::DeviceDeleted;
        let hub = RingBus::new("e".into(), "gw".into(), 2);
        let del = |n: u8| {
            Event::DeviceDeleted(DeviceDeleted {
                address: "10.0.0.2".into(),
                public_key: [n; 32],
            })
        };
        hub.publish(Some("a"), link("1.2.3.4:5", "handshake"), SystemTime::now()); // 1
        hub.publish(Some("a"), del(1), SystemTime::now()); // 2
        hub.publish(Some("a"), link("1.2.3.4:5", "handshake"), SystemTime::now()); // 3
        hub.publish(Some("b"), del(2), SystemTime::now()); // 4
        assert_eq!(ids(hub.read_device_events_after(0, 10)), vec![2, 4]);
        assert_eq!(ids(hub.read_device_events_after(2, 10)), vec![4]);
        assert_eq!(ids(hub.read_device_events_after(4, 10)), Vec::<u64>::new());
        // The side ring keeps 2: a third drops event 2, and a reader that had
        // not read it gets a gap.
        hub.publish(Some("c"), del(3), SystemTime::now()); // 5
        assert!(matches!(hub.read_device_events_after(1, 10), Read::Gap));
        assert_eq!(ids(hub.read_device_events_after(2, 10)), vec![4, 5]);
    }

    #[test]
    fn event_json_has_the_common_fields() {
        let hub = RingBus::new("boot".into(), "gw-1".into(), 10);
        hub.publish(
            Some("dev-1"),
            link("1.2.3.4:5", "timeout"),
            SystemTime::now(),
        );
        let Read::Events(v) = hub.read_after(0, 10) else {
            panic!()
        };
        let j: serde_json::Value = serde_json::from_str(&v[0].json).unwrap();
        assert_eq!(j["id"], 1);
        assert_eq!(j["epoch"], "boot");
        assert_eq!(j["type"], "link.up");
        assert_eq!(j["device"], "dev-1");
        assert_eq!(j["gateway"], "gw-1");
        assert_eq!(j["endpoint"], "1.2.3.4:5");
        assert_eq!(j["reason"], "timeout");
        assert!(humantime::parse_rfc3339(j["at"].as_str().unwrap()).is_ok());
    }
}
