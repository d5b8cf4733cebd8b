//! The I/O shell around [`status::StatusTracker`](crate::status): it feeds
//! the tracker wall-clock time, publishes `status.changed` events, wakes up
//! at the tracker's next deadline, and persists heartbeat times.
//!
//! Why one mutex around the tracker: its inputs are heartbeats (about 1,100
//! a second for 1,000,000 devices polling every 15 minutes) and link
//! transitions, never packets, and each input costs about a microsecond
//! under the lock. The lock is never held across `.await`.
//!
//! Persistence: heartbeat times and "cloudlink was ever up" are written in
//! one transaction per second (not one fsync per heartbeat); a crash loses
//! at most the last second of them, which only makes those heartbeats look
//! a second older. Poll intervals and `cloudlink_enabled` are settings,
//! stored by the fleet service before its `device.updated` reaches us.
//!
//! Devices are known by uuid; the tracker's dense slots stay inside
//! ([`SlotIndex`], under the same lock).

use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;

use crate::bus::event::{Event, StatusChanged, StatusName};
use crate::bus::{EventBus, Reach};
use crate::registry::Registry;
use crate::status::{SlotIndex, Status, StatusChange, StatusTracker, Stored, View};

pub struct DeviceStatus {
    state: Mutex<Tracked>,
    /// For the `endpoint` of events (weak: the packet path holds us).
    path: std::sync::Weak<crate::packet_path::PacketPath>,
    events: Arc<dyn EventBus>,
    registry: Arc<Registry>,
    wake: tokio::sync::Notify,
    /// Cluster mode: link inputs come from the ownership directory (see
    /// [`link_from_cluster`](Self::link_from_cluster)), not from this
    /// gateway's sessions; heartbeats taken here are told to `shared`.
    cluster: std::sync::OnceLock<ShareHeartbeat>,
}

/// Told a heartbeat taken here: (uuid, Unix ms).
type ShareHeartbeat = Box<dyn Fn(&str, u64) + Send + Sync>;

/// The tracker and its slot numbers, under one lock.
struct Tracked {
    tracker: StatusTracker,
    slots: SlotIndex,
    /// Cluster mode: devices whose last heartbeat another gateway took.
    /// That gateway announces their heartbeat expiry; this one only
    /// applies it.
    heard_elsewhere: std::collections::HashSet<u32>,
}

/// Unix time in milliseconds: the tracker's clock.
pub fn now_ms() -> u64 {
    crate::registry::now_ms() as u64
}

impl DeviceStatus {
    /// Loads every device's status inputs from the registry.
    pub fn load(
        registry: Arc<Registry>,
        events: Arc<dyn EventBus>,
        path: std::sync::Weak<crate::packet_path::PacketPath>,
        default_poll_interval: Duration,
        grace: Duration,
    ) -> Result<Self, crate::registry::RegistryError> {
        let mut t = Tracked {
            tracker: StatusTracker::new(
                default_poll_interval.as_secs().clamp(1, u32::MAX as u64) as u32,
                grace.as_millis() as u64,
            ),
            slots: SlotIndex::default(),
            heard_elsewhere: Default::default(),
        };
        let now = now_ms();
        registry.for_each_status(|uuid, stored| {
            let slot = t.slots.insert(uuid);
            t.tracker.insert(slot, stored, now)
        })?;
        Ok(DeviceStatus {
            state: Mutex::new(t),
            path,
            events,
            registry,
            wake: tokio::sync::Notify::new(),
            cluster: std::sync::OnceLock::new(),
        })
    }

    /// Cluster mode: link changes come from the ownership directory, and
    /// `share` is told each heartbeat taken here (uuid, Unix ms) for the
    /// other gateways. Once.
    pub fn join_cluster(&self, share: impl Fn(&str, u64) + Send + Sync + 'static) {
        let _ = self.cluster.set(Box::new(share));
    }

    pub fn view(&self, uuid: &str) -> Option<View> {
        let t = self.state.lock();
        t.tracker.view(t.slots.get(uuid)?)
    }

    pub fn counts(&self) -> [u64; 6] {
        self.state.lock().tracker.counts()
    }

    /// A device was registered.
    pub fn registered(&self, uuid: &str) {
        let mut t = self.state.lock();
        let slot = t.slots.insert(uuid);
        t.tracker.insert(
            slot,
            Stored {
                cloudlink_enabled: true,
                ..Default::default()
            },
            now_ms(),
        );
    }

    /// Makes the tracker hold exactly the registered devices, after the
    /// fleet reactor lost events (blocking: reads the whole registry).
    /// Devices already tracked keep their state.
    pub fn reconcile(&self) -> Result<(), crate::registry::RegistryError> {
        let mut present = Vec::new();
        self.registry
            .for_each_status(|uuid, stored| present.push((uuid.to_owned(), stored)))?;
        let now = now_ms();
        let mut t = self.state.lock();
        let keep: std::collections::HashSet<&str> =
            present.iter().map(|(u, _)| u.as_str()).collect();
        let gone: Vec<String> = t
            .slots
            .iter()
            .filter(|(u, _)| !keep.contains(u))
            .map(|(u, _)| u.to_owned())
            .collect();
        for uuid in gone {
            if let Some(slot) = t.slots.remove(&uuid) {
                t.tracker.remove(slot);
                t.heard_elsewhere.remove(&slot);
            }
        }
        for (uuid, stored) in present {
            if t.slots.get(&uuid).is_none() {
                let slot = t.slots.insert(&uuid);
                t.tracker.insert(slot, stored, now);
            }
        }
        Ok(())
    }

    /// A device was deleted.
    pub fn removed(&self, uuid: &str) {
        let mut t = self.state.lock();
        if let Some(slot) = t.slots.remove(uuid) {
            t.tracker.remove(slot);
            t.heard_elsewhere.remove(&slot);
        }
    }

    /// The device's current endpoint, if it has a session. Never called
    /// with the tracker locked (lock order: session → tracker).
    fn endpoint_of(&self, uuid: &str) -> Option<String> {
        let path = self.path.upgrade()?;
        let session = path.sessions.by_uuid(uuid)?;
        let endpoint = session.snapshot().endpoint;
        Some(endpoint.to_string())
    }

    /// A heartbeat from the device; `None` if it is not registered.
    pub fn heartbeat(&self, uuid: &str) -> Option<View> {
        let now = now_ms();
        let view = self.apply_heartbeat(uuid, now, false);
        if let (Some(share), Some(_)) = (self.cluster.get(), &view) {
            share(uuid, now);
        }
        view
    }

    /// Cluster mode: another gateway took a heartbeat from the device at
    /// `at_ms`. Applied here; that gateway announces what it changed.
    pub fn heartbeat_elsewhere(&self, uuid: &str, at_ms: u64) {
        self.apply_heartbeat(uuid, at_ms.min(now_ms()), true);
    }

    /// A heartbeat at `at_ms`, taken here or (`elsewhere`) by another
    /// gateway, which then announces the status change.
    fn apply_heartbeat(&self, uuid: &str, at_ms: u64, elsewhere: bool) -> Option<View> {
        let endpoint = self.endpoint_of(uuid);
        let mut t = self.state.lock();
        let slot = t.slots.get(uuid)?;
        let change = t.tracker.heartbeat(slot, at_ms, None);
        let reach = if elsewhere {
            t.heard_elsewhere.insert(slot);
            Reach::Local
        } else {
            t.heard_elsewhere.remove(&slot);
            Reach::Cluster
        };
        self.publish(
            &t.tracker,
            uuid,
            change,
            "heartbeat",
            endpoint.as_deref(),
            reach,
        );
        let view = t.tracker.view(slot);
        drop(t);
        self.wake.notify_one();
        view
    }

    /// Cluster mode: the ownership directory says the device's link is up
    /// (through some gateway) or down. `reach` is `Cluster` on the gateway
    /// whose write it was (the owner's link-up or link-down, the reaper's
    /// `gateway_lost`), `Local` on the others.
    pub fn link_from_cluster(&self, uuid: &str, up: bool, endpoint: Option<&str>, reach: Reach) {
        let mut t = self.state.lock();
        let Some(slot) = t.slots.get(uuid) else {
            return;
        };
        let change = t.tracker.set_link(slot, now_ms(), up);
        let reason = if up { "link.up" } else { "link.down" };
        self.publish(&t.tracker, uuid, change, reason, endpoint, reach);
    }

    /// Settings changed (already stored in the registry).
    pub fn settings(
        &self,
        uuid: &str,
        poll_interval_s: Option<Option<u32>>,
        cloudlink_enabled: Option<bool>,
        reach: Reach,
    ) {
        let endpoint = self.endpoint_of(uuid);
        let mut t = self.state.lock();
        let Some(slot) = t.slots.get(uuid) else {
            return;
        };
        let now = now_ms();
        if let Some(i) = poll_interval_s {
            let c = t.tracker.set_poll_interval(slot, now, i);
            self.publish(
                &t.tracker,
                uuid,
                c,
                "poll_interval_changed",
                endpoint.as_deref(),
                reach,
            );
        }
        if let Some(e) = cloudlink_enabled {
            let c = t.tracker.set_cloudlink_enabled(slot, now, e);
            self.publish(
                &t.tracker,
                uuid,
                c,
                "cloudlink_enabled_changed",
                endpoint.as_deref(),
                reach,
            );
        }
        drop(t);
        self.wake.notify_one();
    }

    /// The device's link went up or down (called by the packet path, after
    /// the link event was published).
    pub fn link(&self, uuid: &str, up: bool, endpoint: std::net::SocketAddr) {
        self.link_from_cluster(uuid, up, Some(&endpoint.to_string()), Reach::Cluster);
    }

    fn publish(
        &self,
        t: &StatusTracker,
        uuid: &str,
        change: Option<StatusChange>,
        reason: &str,
        endpoint: Option<&str>,
        reach: Reach,
    ) {
        if let Some(c) = change {
            publish_change(&*self.events, t, uuid, c, reason, endpoint, reach);
        }
    }

    /// Runs until `stop`: publishes heartbeat expiries at their moment and
    /// persists heartbeat times once a second.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut due = Vec::new();
        let mut dirty = Vec::new();
        let mut next_flush = tokio::time::Instant::now() + Duration::from_secs(1);
        loop {
            let next_deadline = self.state.lock().tracker.next_deadline();
            let wake_at = match next_deadline {
                Some(ms) => {
                    let in_ms = ms.saturating_sub(now_ms());
                    (tokio::time::Instant::now() + Duration::from_millis(in_ms)).min(next_flush)
                }
                None => next_flush,
            };
            tokio::select! {
                _ = tokio::time::sleep_until(wake_at) => {}
                _ = self.wake.notified() => {}
                _ = stop.changed() => {
                    self.flush(&mut dirty).await;
                    return;
                }
            }
            self.expire(now_ms(), &mut due).await;
            if tokio::time::Instant::now() >= next_flush {
                self.flush(&mut dirty).await;
                next_flush = tokio::time::Instant::now() + Duration::from_secs(1);
            }
        }
    }

    /// Applies the transitions due by `now` and publishes them, under one
    /// lock, so they stay in order with concurrent heartbeats. The endpoints
    /// of the devices due are looked up first, off the lock (lock order:
    /// session → tracker); nothing becomes due by `now` meanwhile: a
    /// deadline is always set after the moment of the input that sets it.
    async fn expire(&self, now: u64, due: &mut Vec<StatusChange>) {
        let mut slots = Vec::new();
        let uuids: Vec<String> = {
            let t = self.state.lock();
            t.tracker.due(now, &mut slots);
            slots
                .iter()
                .filter_map(|s| t.slots.uuid(*s).map(str::to_owned))
                .collect()
        };
        if uuids.is_empty() {
            return;
        }
        let endpoints: std::collections::HashMap<&str, String> = uuids
            .iter()
            .filter_map(|u| self.endpoint_of(u).map(|e| (u.as_str(), e)))
            .collect();
        let mut t = self.state.lock();
        due.clear();
        t.tracker.poll(now, due);
        for c in due.iter() {
            if let Some(uuid) = t.slots.uuid(c.id) {
                let reason = match t.tracker.view(c.id).map(|v| v.heartbeat) {
                    Some(crate::status::Heartbeat::Offline) => "heartbeat_offline",
                    _ => "heartbeat_timeout",
                };
                let endpoint = endpoints.get(uuid).map(String::as_str);
                let reach = if t.heard_elsewhere.contains(&c.id) {
                    Reach::Local
                } else {
                    Reach::Cluster
                };
                publish_change(&*self.events, &t.tracker, uuid, *c, reason, endpoint, reach);
            }
        }
    }

    async fn flush(&self, dirty: &mut Vec<(u32, Stored)>) {
        dirty.clear();
        let rows: Vec<(String, Stored)> = {
            let mut t = self.state.lock();
            t.tracker.take_dirty(dirty);
            dirty
                .iter()
                .filter_map(|(slot, st)| t.slots.uuid(*slot).map(|u| (u.to_owned(), *st)))
                .collect()
        };
        if rows.is_empty() {
            return;
        }
        let registry = self.registry.clone();
        match tokio::task::spawn_blocking(move || registry.save_status(&rows)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "could not persist heartbeat times"),
            Err(e) => tracing::error!(error = %e, "heartbeat persistence task failed"),
        }
    }
}

impl crate::packet_path::LinkObserver for DeviceStatus {
    fn link_changed(
        &self,
        session: &crate::session_table::Session,
        up: bool,
        endpoint: std::net::SocketAddr,
        down: Option<crate::link_state::DownReason>,
    ) {
        // In cluster mode the ownership directory says whether a device is
        // connected (a session here may be one another gateway has taken
        // over): see `link_from_cluster`.
        if self.cluster.get().is_some() || down == Some(crate::link_state::DownReason::Moved) {
            return;
        }
        self.link(&session.uuid, up, endpoint);
    }
}

fn publish_change(
    events: &dyn EventBus,
    t: &StatusTracker,
    uuid: &str,
    c: StatusChange,
    reason: &str,
    endpoint: Option<&str>,
    reach: Reach,
) {
    let s = |x: Status| StatusName {
        status: x.name(),
        detail: x.detail(),
    };
    let view = t.view(c.id);
    // The API's words (`reduced-functionality/cloudlink-only`), not the
    // enum's names.
    let word = |x: Status| match x.detail() {
        Some(d) => format!("{}/{d}", x.name()),
        None => x.name().to_owned(),
    };
    tracing::info!(device = %uuid, from = %word(c.from), to = %word(c.to), reason, "status changed");
    events.publish_reach(
        Some(uuid),
        Event::StatusChanged(StatusChanged {
            endpoint: endpoint.map(str::to_owned),
            reason: reason.to_owned(),
            from: s(c.from),
            to: s(c.to),
            heartbeat: view.map(|v| v.heartbeat.as_str()).unwrap_or("unknown"),
            cloudlink: view.is_some_and(|v| v.link_up),
        }),
        std::time::SystemTime::now(),
        reach,
    );
}
