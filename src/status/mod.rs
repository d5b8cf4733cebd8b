//! Device status: the heartbeat state of each device and the status derived
//! from its two links (the HTTP heartbeat and cloudlink), exactly as a fleet
//! console's device listing shows them.
//!
//! Sans-IO. [`StatusTracker`] takes `now` (Unix milliseconds) and inputs
//! (heartbeats, link changes, settings) and answers with the status changes
//! to publish; [`StatusTracker::poll`] yields the changes due by `now` and
//! [`StatusTracker::next_deadline`] says when to call it next. It reads no
//! clock and does no I/O, so every rule is tested on simulated time.
//!
//! Cost with 1,000,000 devices: per device a 16-byte slot in a dense vector
//! indexed by a slot number of the tracker's own ([`SlotIndex`]: devices are
//! known by uuid outside this module), plus at most one entry in an ordered
//! set of deadlines (the next moment its heartbeat turns `timeout` or
//! `offline`). A heartbeat or an expiry is O(log n); nothing ever scans all
//! devices after start.
//!
//! Heartbeat state: `unknown` before the first heartbeat; `online` after one;
//! `timeout` once 1.5 × the poll interval passed without one; `offline` once
//! a further grace passed.
//!
//! Status, first match wins:
//! 1. `configuring`: cloudlink never up and heartbeat `unknown`;
//! 2. `disconnected`: cloudlink down, heartbeat `offline` or `unknown`;
//! 3. `reduced-functionality` / `heartbeat-only`: cloudlink down, heartbeat
//!    `online` or `timeout`;
//! 4. `reduced-functionality` / `cloudlink-only`: cloudlink up, heartbeat not
//!    `online`;
//! 5. `operational`: cloudlink up, heartbeat `online`.
//!
//! With cloudlink turned off for a device the heartbeat alone decides:
//! `online` → `operational`, `timeout` → `reduced-functionality` /
//! `heartbeat-timeout`, `offline` → `disconnected`, `unknown` →
//! `configuring` until the device was ever heard from, `disconnected` after.

pub mod service;

use std::collections::BTreeSet;

/// Heartbeat state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Heartbeat {
    Unknown,
    Online,
    Timeout,
    Offline,
}

impl Heartbeat {
    pub fn as_str(self) -> &'static str {
        match self {
            Heartbeat::Unknown => "unknown",
            Heartbeat::Online => "online",
            Heartbeat::Timeout => "timeout",
            Heartbeat::Offline => "offline",
        }
    }
    fn bits(self) -> u8 {
        match self {
            Heartbeat::Unknown => 0,
            Heartbeat::Online => 1,
            Heartbeat::Timeout => 2,
            Heartbeat::Offline => 3,
        }
    }
    fn from_bits(b: u8) -> Self {
        match b & 3 {
            0 => Heartbeat::Unknown,
            1 => Heartbeat::Online,
            2 => Heartbeat::Timeout,
            _ => Heartbeat::Offline,
        }
    }
}

/// Derived device status, with its detail where it has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Configuring,
    Disconnected,
    /// Cloudlink down, heartbeat alive: can poll for updates, cannot be reached.
    HeartbeatOnly,
    /// Cloudlink up, heartbeat not online: reachable, applies no releases.
    CloudlinkOnly,
    /// Cloudlink turned off for the device and its heartbeat timed out.
    HeartbeatTimeout,
    Operational,
}

impl Status {
    pub const ALL: [Status; 6] = [
        Status::Configuring,
        Status::Disconnected,
        Status::HeartbeatOnly,
        Status::CloudlinkOnly,
        Status::HeartbeatTimeout,
        Status::Operational,
    ];
    /// The status names (without detail), as the API and metrics spell them.
    pub const NAMES: [&'static str; 4] = [
        "configuring",
        "disconnected",
        "reduced-functionality",
        "operational",
    ];
    pub fn name(self) -> &'static str {
        match self {
            Status::Configuring => "configuring",
            Status::Disconnected => "disconnected",
            Status::HeartbeatOnly | Status::CloudlinkOnly | Status::HeartbeatTimeout => {
                "reduced-functionality"
            }
            Status::Operational => "operational",
        }
    }
    pub fn detail(self) -> Option<&'static str> {
        match self {
            Status::HeartbeatOnly => Some("heartbeat-only"),
            Status::CloudlinkOnly => Some("cloudlink-only"),
            Status::HeartbeatTimeout => Some("heartbeat-timeout"),
            _ => None,
        }
    }
    fn code(self) -> u8 {
        Status::ALL.iter().position(|s| *s == self).unwrap() as u8
    }
    fn from_code(c: u8) -> Self {
        Status::ALL[c as usize]
    }
}

/// The rules above, as one pure function.
pub fn derive(
    heartbeat: Heartbeat,
    link_up: bool,
    ever_linked: bool,
    cloudlink_enabled: bool,
) -> Status {
    if !cloudlink_enabled {
        return match heartbeat {
            Heartbeat::Online => Status::Operational,
            Heartbeat::Timeout => Status::HeartbeatTimeout,
            Heartbeat::Offline => Status::Disconnected,
            Heartbeat::Unknown if ever_linked => Status::Disconnected,
            Heartbeat::Unknown => Status::Configuring,
        };
    }
    match (link_up, heartbeat) {
        (false, Heartbeat::Unknown) if !ever_linked => Status::Configuring,
        (false, Heartbeat::Offline | Heartbeat::Unknown) => Status::Disconnected,
        (false, Heartbeat::Online | Heartbeat::Timeout) => Status::HeartbeatOnly,
        (true, Heartbeat::Online) => Status::Operational,
        (true, _) => Status::CloudlinkOnly,
    }
}

/// A status transition to publish as `status.changed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusChange {
    pub id: u32,
    pub from: Status,
    pub to: Status,
}

/// What is persisted of a device's status inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stored {
    pub last_heartbeat_ms: Option<u64>,
    /// `None`: the gateway's default poll interval.
    pub poll_interval_s: Option<u32>,
    pub cloudlink_enabled: bool,
    pub ever_linked: bool,
}

/// What the API shows of a device's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    pub heartbeat: Heartbeat,
    pub last_heartbeat_ms: Option<u64>,
    pub poll_interval_s: u32,
    pub custom_poll_interval: bool,
    pub cloudlink_enabled: bool,
    pub link_up: bool,
    pub status: Status,
}

// Flag bits of a slot.
const PRESENT: u8 = 1 << 0;
const ENABLED: u8 = 1 << 1;
const EVER_LINKED: u8 = 1 << 2;
const LINK_UP: u8 = 1 << 3;
/// Changed since the last `take_dirty`: to be persisted.
const DIRTY: u8 = 1 << 4;
const HB_SHIFT: u8 = 5; // two bits of heartbeat state

/// One device: 16 bytes.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// Unix ms of the last heartbeat; 0: none.
    last_hb_ms: u64,
    /// Poll interval in seconds; 0: the default.
    interval_s: u32,
    flags: u8,
    status: u8,
}

impl Slot {
    fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }
    fn set(&mut self, f: u8, on: bool) {
        if on {
            self.flags |= f;
        } else {
            self.flags &= !f;
        }
    }
    fn heartbeat(&self) -> Heartbeat {
        Heartbeat::from_bits(self.flags >> HB_SHIFT)
    }
    fn set_heartbeat(&mut self, h: Heartbeat) {
        self.flags = (self.flags & !(3 << HB_SHIFT)) | (h.bits() << HB_SHIFT);
    }
}

pub struct StatusTracker {
    slots: Vec<Slot>,
    /// (moment, device id) of each pending heartbeat transition.
    deadlines: BTreeSet<(u64, u32)>,
    default_interval_s: u32,
    grace_ms: u64,
    counts: [u64; 6],
    dirty: Vec<u32>,
}

impl StatusTracker {
    pub fn new(default_interval_s: u32, grace_ms: u64) -> Self {
        StatusTracker {
            slots: Vec::new(),
            deadlines: BTreeSet::new(),
            default_interval_s: default_interval_s.max(1),
            grace_ms,
            counts: [0; 6],
            dirty: Vec::new(),
        }
    }

    fn interval_ms(&self, s: &Slot) -> u64 {
        let i = if s.interval_s == 0 {
            self.default_interval_s
        } else {
            s.interval_s
        };
        i as u64 * 1000
    }

    /// When the slot's heartbeat next changes state, if it will.
    fn deadline(&self, s: &Slot) -> Option<u64> {
        let timeout_at = s.last_hb_ms + self.interval_ms(s) * 3 / 2;
        match s.heartbeat() {
            Heartbeat::Online => Some(timeout_at),
            Heartbeat::Timeout => Some(timeout_at + self.grace_ms),
            _ => None,
        }
    }

    /// The heartbeat state a slot should be in at `now`.
    fn heartbeat_at(&self, s: &Slot, now: u64) -> Heartbeat {
        if s.last_hb_ms == 0 {
            return Heartbeat::Unknown;
        }
        let timeout_at = s.last_hb_ms + self.interval_ms(s) * 3 / 2;
        if now < timeout_at {
            Heartbeat::Online
        } else if now < timeout_at + self.grace_ms {
            Heartbeat::Timeout
        } else {
            Heartbeat::Offline
        }
    }

    fn slot_mut(&mut self, id: u32) -> Option<&mut Slot> {
        self.slots.get_mut(id as usize).filter(|s| s.has(PRESENT))
    }

    /// Brings a slot to `now`: heartbeat state, deadline, status and counts.
    /// Returns the status change, if any.
    fn settle(
        &mut self,
        id: u32,
        before: Option<(Slot, Status)>,
        now: u64,
    ) -> Option<StatusChange> {
        let mut s = self.slots[id as usize];
        if let Some((old, _)) = before {
            if let Some(d) = self.deadline(&old) {
                self.deadlines.remove(&(d, id));
            }
        }
        s.set_heartbeat(self.heartbeat_at(&s, now));
        let status = derive(
            s.heartbeat(),
            s.has(LINK_UP),
            s.has(EVER_LINKED),
            s.has(ENABLED),
        );
        s.status = status.code();
        if let Some(d) = self.deadline(&s) {
            self.deadlines.insert((d, id));
        }
        self.slots[id as usize] = s;
        self.counts[status.code() as usize] += 1;
        match before {
            Some((_, from)) => {
                self.counts[from.code() as usize] -= 1;
                (from != status).then_some(StatusChange {
                    id,
                    from,
                    to: status,
                })
            }
            None => None,
        }
    }

    fn update(&mut self, id: u32, now: u64, f: impl FnOnce(&mut Slot)) -> Option<StatusChange> {
        let slot = self.slot_mut(id)?;
        let old = *slot;
        f(slot);
        self.settle(id, Some((old, Status::from_code(old.status))), now)
    }

    fn mark_dirty(&mut self, id: u32) {
        if let Some(s) = self.slot_mut(id) {
            if !s.has(DIRTY) {
                s.set(DIRTY, true);
                self.dirty.push(id);
            }
        }
    }

    /// Adds a device with persisted inputs (at start, or at registration
    /// with `Stored::default()` and cloudlink enabled). Publishes nothing.
    pub fn insert(&mut self, id: u32, stored: Stored, now: u64) {
        if self.slot_mut(id).is_some() {
            self.remove(id);
        }
        let idx = id as usize;
        if idx >= self.slots.len() {
            self.slots.resize(idx + 1, Slot::default());
        }
        let mut s = Slot {
            last_hb_ms: stored.last_heartbeat_ms.unwrap_or(0),
            interval_s: stored.poll_interval_s.unwrap_or(0),
            flags: PRESENT,
            status: 0,
        };
        s.set(ENABLED, stored.cloudlink_enabled);
        s.set(EVER_LINKED, stored.ever_linked);
        self.slots[idx] = s;
        self.settle(id, None, now);
    }

    /// Forgets a deleted device.
    pub fn remove(&mut self, id: u32) {
        let Some(s) = self.slot_mut(id).copied() else {
            return;
        };
        if let Some(d) = self.deadline(&s) {
            self.deadlines.remove(&(d, id));
        }
        self.counts[s.status as usize] -= 1;
        self.slots[id as usize] = Slot::default();
    }

    /// One past the highest slot id ever held.
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    pub fn contains(&self, id: u32) -> bool {
        self.slots.get(id as usize).is_some_and(|s| s.has(PRESENT))
    }

    /// A heartbeat arrived (optionally announcing a new poll interval).
    pub fn heartbeat(
        &mut self,
        id: u32,
        now: u64,
        poll_interval_s: Option<u32>,
    ) -> Option<StatusChange> {
        let change = self.update(id, now, |s| {
            s.last_hb_ms = now.max(1);
            if let Some(i) = poll_interval_s {
                s.interval_s = i;
            }
        });
        self.mark_dirty(id);
        change
    }

    /// Sets (or, with `None`, resets to the default) the poll interval.
    pub fn set_poll_interval(
        &mut self,
        id: u32,
        now: u64,
        poll_interval_s: Option<u32>,
    ) -> Option<StatusChange> {
        self.update(id, now, |s| s.interval_s = poll_interval_s.unwrap_or(0))
    }

    pub fn set_cloudlink_enabled(
        &mut self,
        id: u32,
        now: u64,
        enabled: bool,
    ) -> Option<StatusChange> {
        self.update(id, now, |s| s.set(ENABLED, enabled))
    }

    /// The device's cloudlink went up or down.
    pub fn set_link(&mut self, id: u32, now: u64, up: bool) -> Option<StatusChange> {
        let first = up && self.slot_mut(id).is_some_and(|s| !s.has(EVER_LINKED));
        let change = self.update(id, now, |s| {
            s.set(LINK_UP, up);
            if up {
                s.set(EVER_LINKED, true);
            }
        });
        if first {
            self.mark_dirty(id);
        }
        change
    }

    /// The moment `poll` has something to do, if any.
    pub fn next_deadline(&self) -> Option<u64> {
        self.deadlines.first().map(|(t, _)| *t)
    }

    /// Ids of devices with a transition due by `now` (without applying it).
    pub fn due(&self, now: u64, out: &mut Vec<u32>) {
        out.extend(self.deadlines.range(..=(now, u32::MAX)).map(|(_, id)| *id));
    }

    /// Applies every heartbeat transition due by `now`, appending the status
    /// changes to `out`.
    pub fn poll(&mut self, now: u64, out: &mut Vec<StatusChange>) {
        while let Some(&(t, id)) = self.deadlines.first() {
            if t > now {
                break;
            }
            // `update` removes this very entry (it is the slot's deadline)
            // and inserts the next one, if any.
            if let Some(c) = self.update(id, now.max(t), |_| {}) {
                out.push(c);
            }
            // Guard against a stale entry that `update` did not remove.
            self.deadlines.remove(&(t, id));
        }
    }

    pub fn view(&self, id: u32) -> Option<View> {
        let s = self.slots.get(id as usize).filter(|s| s.has(PRESENT))?;
        Some(View {
            heartbeat: s.heartbeat(),
            last_heartbeat_ms: (s.last_hb_ms != 0).then_some(s.last_hb_ms),
            poll_interval_s: (self.interval_ms(s) / 1000) as u32,
            custom_poll_interval: s.interval_s != 0,
            cloudlink_enabled: s.has(ENABLED),
            link_up: s.has(LINK_UP),
            status: Status::from_code(s.status),
        })
    }

    pub fn status(&self, id: u32) -> Option<Status> {
        self.view(id).map(|v| v.status)
    }

    /// Devices per status, in the order of [`Status::ALL`].
    pub fn counts(&self) -> [u64; 6] {
        self.counts
    }

    /// Devices whose persisted inputs changed (heartbeat time, first link)
    /// since the last call, with what to store.
    pub fn take_dirty(&mut self, out: &mut Vec<(u32, Stored)>) {
        for id in std::mem::take(&mut self.dirty) {
            if let Some(s) = self.slots.get_mut(id as usize).filter(|s| s.has(PRESENT)) {
                s.set(DIRTY, false);
                out.push((
                    id,
                    Stored {
                        last_heartbeat_ms: (s.last_hb_ms != 0).then_some(s.last_hb_ms),
                        poll_interval_s: (s.interval_s != 0).then_some(s.interval_s),
                        cloudlink_enabled: s.has(ENABLED),
                        ever_linked: s.has(EVER_LINKED),
                    },
                ));
            }
        }
    }
}

/// The status module's own dense slot numbers for devices, which the rest
/// of the gateway knows only by uuid (the store's ids never leave the
/// store). A freed slot is reused, so the tracker's vector is as long as
/// the most devices registered at once. Costs about 100 bytes per device
/// (the uuid once, shared by both directions).
#[derive(Default)]
pub struct SlotIndex {
    by_uuid: std::collections::HashMap<std::sync::Arc<str>, u32>,
    uuids: Vec<Option<std::sync::Arc<str>>>,
    free: Vec<u32>,
}

impl SlotIndex {
    pub fn get(&self, uuid: &str) -> Option<u32> {
        self.by_uuid.get(uuid).copied()
    }

    pub fn uuid(&self, slot: u32) -> Option<&str> {
        self.uuids.get(slot as usize)?.as_deref()
    }

    /// The device's slot, given one if it has none.
    pub fn insert(&mut self, uuid: &str) -> u32 {
        if let Some(slot) = self.get(uuid) {
            return slot;
        }
        let uuid: std::sync::Arc<str> = uuid.into();
        let slot = match self.free.pop() {
            Some(slot) => {
                self.uuids[slot as usize] = Some(uuid.clone());
                slot
            }
            None => {
                self.uuids.push(Some(uuid.clone()));
                (self.uuids.len() - 1) as u32
            }
        };
        self.by_uuid.insert(uuid, slot);
        slot
    }

    /// Frees the device's slot; returns it.
    pub fn remove(&mut self, uuid: &str) -> Option<u32> {
        let slot = self.by_uuid.remove(uuid)?;
        self.uuids[slot as usize] = None;
        self.free.push(slot);
        Some(slot)
    }

    /// Every device held, with its slot.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u32)> {
        self.by_uuid.iter().map(|(u, s)| (&**u, *s))
    }

    pub fn len(&self) -> usize {
        self.by_uuid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_uuid.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000;
    const GRACE: u64 = 15_000;

    fn enabled() -> Stored {
        Stored {
            cloudlink_enabled: true,
            ..Default::default()
        }
    }

    fn drain(t: &mut StatusTracker, now: u64) -> Vec<(Status, Status)> {
        let mut out = Vec::new();
        t.poll(now, &mut out);
        out.into_iter().map(|c| (c.from, c.to)).collect()
    }

    #[test]
    fn slot_is_16_bytes() {
        assert_eq!(std::mem::size_of::<Slot>(), 16);
    }

    #[test]
    fn every_rule_of_the_table() {
        use Heartbeat::*;
        use Status::*;
        // (heartbeat, link up, ever linked, enabled) -> status
        let rows = [
            (Unknown, false, false, true, Configuring),
            (Unknown, false, true, true, Disconnected),
            (Offline, false, false, true, Disconnected),
            (Offline, false, true, true, Disconnected),
            (Online, false, true, true, HeartbeatOnly),
            (Timeout, false, true, true, HeartbeatOnly),
            (Online, false, false, true, HeartbeatOnly),
            (Unknown, true, true, true, CloudlinkOnly),
            (Timeout, true, true, true, CloudlinkOnly),
            (Offline, true, true, true, CloudlinkOnly),
            (Online, true, true, true, Operational),
            (Online, false, false, false, Operational),
            (Online, true, true, false, Operational),
            (Timeout, true, true, false, HeartbeatTimeout),
            (Offline, true, true, false, Disconnected),
            (Unknown, false, false, false, Configuring),
            (Unknown, false, true, false, Disconnected),
        ];
        for (hb, up, ever, en, want) in rows {
            assert_eq!(
                derive(hb, up, ever, en),
                want,
                "{hb:?} up={up} ever={ever} enabled={en}"
            );
        }
        assert_eq!(HeartbeatOnly.name(), "reduced-functionality");
        assert_eq!(HeartbeatOnly.detail(), Some("heartbeat-only"));
        assert_eq!(Operational.detail(), None);
    }

    #[test]
    fn powered_off_device_walks_down_on_simulated_time() {
        // Poll interval 10 min: timeout after 15 min, offline 15 s later.
        let mut t = StatusTracker::new(600, GRACE);
        let t0 = 1_700_000_000_000;
        t.insert(1, enabled(), t0);
        assert_eq!(t.status(1), Some(Status::Configuring));
        assert_eq!(t.next_deadline(), None);

        // Cloudlink comes up, then the first heartbeat.
        let c = t.set_link(1, t0, true).unwrap();
        assert_eq!((c.from, c.to), (Status::Configuring, Status::CloudlinkOnly));
        let c = t.heartbeat(1, t0 + 1000, None).unwrap();
        assert_eq!((c.from, c.to), (Status::CloudlinkOnly, Status::Operational));
        assert_eq!(t.view(1).unwrap().heartbeat, Heartbeat::Online);

        // Power off at t0 + 1 s. Cloudlink goes down after --link-timeout
        // (the packet path reports it): operational -> heartbeat-only.
        let link_down_at = t0 + 1000 + 90_000;
        assert!(drain(&mut t, link_down_at).is_empty());
        let c = t.set_link(1, link_down_at, false).unwrap();
        assert_eq!((c.from, c.to), (Status::Operational, Status::HeartbeatOnly));

        // The heartbeat stays online until 1.5 x the poll interval passed.
        let timeout_at = t0 + 1000 + 15 * MIN;
        assert_eq!(t.next_deadline(), Some(timeout_at));
        assert!(drain(&mut t, timeout_at - 1).is_empty());
        assert_eq!(t.view(1).unwrap().heartbeat, Heartbeat::Online);
        // Then timeout: the status does not change (still heartbeat-only).
        assert!(drain(&mut t, timeout_at).is_empty());
        assert_eq!(t.view(1).unwrap().heartbeat, Heartbeat::Timeout);
        assert_eq!(t.status(1), Some(Status::HeartbeatOnly));
        // Offline after the grace: only now disconnected.
        assert_eq!(t.next_deadline(), Some(timeout_at + GRACE));
        assert!(drain(&mut t, timeout_at + GRACE - 1).is_empty());
        assert_eq!(
            drain(&mut t, timeout_at + GRACE),
            vec![(Status::HeartbeatOnly, Status::Disconnected)]
        );
        assert_eq!(t.view(1).unwrap().heartbeat, Heartbeat::Offline);
        assert_eq!(t.next_deadline(), None);

        // Power back: cloudlink first, then the heartbeat.
        let back = timeout_at + 10 * MIN;
        let c = t.set_link(1, back, true).unwrap();
        assert_eq!(
            (c.from, c.to),
            (Status::Disconnected, Status::CloudlinkOnly)
        );
        let c = t.heartbeat(1, back + 5000, None).unwrap();
        assert_eq!((c.from, c.to), (Status::CloudlinkOnly, Status::Operational));
    }

    #[test]
    fn heartbeat_only_when_cloudlink_never_came_up() {
        let mut t = StatusTracker::new(900, GRACE);
        t.insert(3, enabled(), 0);
        let c = t.heartbeat(3, 10, None).unwrap();
        assert_eq!((c.from, c.to), (Status::Configuring, Status::HeartbeatOnly));
        // Heartbeats keep the deadline moving: no transition while they come.
        for i in 1..10 {
            assert!(t.heartbeat(3, 10 + i * 900_000, None).is_none());
            assert!(drain(&mut t, 10 + i * 900_000 + 1).is_empty());
        }
        assert_eq!(t.deadlines.len(), 1, "one pending deadline per device");
    }

    #[test]
    fn cloudlink_disabled_follows_the_heartbeat() {
        let mut t = StatusTracker::new(60, GRACE);
        t.insert(2, enabled(), 0);
        assert!(t.set_cloudlink_enabled(2, 0, false).is_none()); // still configuring
        let c = t.heartbeat(2, 1000, None).unwrap();
        assert_eq!(c.to, Status::Operational);
        assert_eq!(
            drain(&mut t, 1000 + 90_000),
            vec![(Status::Operational, Status::HeartbeatTimeout)]
        );
        assert_eq!(
            drain(&mut t, 1000 + 90_000 + GRACE),
            vec![(Status::HeartbeatTimeout, Status::Disconnected)]
        );
        // Unknown heartbeat, ever heard from over cloudlink: disconnected.
        t.insert(4, enabled(), 0);
        t.set_link(4, 0, true);
        t.set_link(4, 1, false);
        let c = t.set_cloudlink_enabled(4, 2, false);
        assert_eq!(c, None, "already disconnected");
        assert_eq!(t.status(4), Some(Status::Disconnected));
        // Turning cloudlink back on while the link is up.
        t.set_link(4, 3, true);
        assert_eq!(t.status(4), Some(Status::Disconnected));
        let c = t.set_cloudlink_enabled(4, 4, true).unwrap();
        assert_eq!(c.to, Status::CloudlinkOnly);
    }

    #[test]
    fn poll_interval_changes_move_the_deadline() {
        let mut t = StatusTracker::new(900, GRACE);
        t.insert(5, enabled(), 0);
        t.heartbeat(5, 1000, Some(10));
        assert_eq!(t.next_deadline(), Some(16_000));
        assert_eq!(t.view(5).unwrap().poll_interval_s, 10);
        // A shorter interval set later can make the heartbeat time out at once.
        t.heartbeat(5, 100_000, None);
        let c = t.set_poll_interval(5, 120_000, Some(4));
        assert_eq!(c, None, "online and timeout both give heartbeat-only");
        assert_eq!(t.view(5).unwrap().heartbeat, Heartbeat::Timeout);
        assert_eq!(t.next_deadline(), Some(100_000 + 6_000 + GRACE));
        assert_eq!(t.set_poll_interval(5, 120_000, None), None);
        assert_eq!(t.view(5).unwrap().poll_interval_s, 900);
        assert_eq!(t.view(5).unwrap().heartbeat, Heartbeat::Online);
    }

    #[test]
    fn counts_persistence_and_removal() {
        let mut t = StatusTracker::new(900, GRACE);
        for id in 0..10 {
            t.insert(id, enabled(), 0);
        }
        t.heartbeat(3, 5, None);
        t.set_link(4, 5, true);
        let c = t.counts();
        assert_eq!(c[Status::Configuring.code() as usize], 8);
        assert_eq!(c[Status::HeartbeatOnly.code() as usize], 1);
        assert_eq!(c[Status::CloudlinkOnly.code() as usize], 1);
        let mut dirty = Vec::new();
        t.take_dirty(&mut dirty);
        let ids: Vec<u32> = dirty.iter().map(|d| d.0).collect();
        assert_eq!(ids, vec![3, 4]);
        assert_eq!(dirty[0].1.last_heartbeat_ms, Some(5));
        assert!(dirty[1].1.ever_linked);
        dirty.clear();
        t.take_dirty(&mut dirty);
        assert!(dirty.is_empty());
        t.remove(3);
        assert_eq!(t.counts().iter().sum::<u64>(), 9);
        assert!(t.view(3).is_none());
        assert_eq!(t.next_deadline(), None);
        // Reloading what was stored gives the same status, not configuring.
        let mut t2 = StatusTracker::new(900, GRACE);
        t2.insert(
            4,
            Stored {
                ever_linked: true,
                cloudlink_enabled: true,
                ..Default::default()
            },
            10,
        );
        assert_eq!(t2.status(4), Some(Status::Disconnected));
        t2.insert(
            7,
            Stored {
                last_heartbeat_ms: Some(5),
                cloudlink_enabled: true,
                ..Default::default()
            },
            10,
        );
        assert_eq!(t2.status(7), Some(Status::HeartbeatOnly));
    }

    #[test]
    fn slot_index_reuses_freed_slots_and_maps_both_ways() {
        let mut i = SlotIndex::default();
        let a = i.insert("a");
        let b = i.insert("b");
        assert_ne!(a, b);
        assert_eq!(i.insert("a"), a, "a device keeps its slot");
        assert_eq!(i.uuid(b), Some("b"));
        assert_eq!(i.remove("a"), Some(a));
        assert_eq!(i.get("a"), None);
        assert_eq!(i.uuid(a), None);
        assert_eq!(i.insert("c"), a, "the freed slot is reused");
        assert_eq!(i.uuid(a), Some("c"));
        assert_eq!(i.len(), 2);
        assert_eq!(i.remove("zzz"), None);
    }
}
