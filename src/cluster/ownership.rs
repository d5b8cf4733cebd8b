//! Who holds each connected device, cluster-wide: the KV bucket
//! `cloudlink_sessions`, key `s.<uuid>` → `{gateway, boot, endpoint, since}`.
//!
//! - Written from this gateway's link transitions (a [`LinkObserver`]: it
//!   only notes the latest state per device; a task writes, so a burst of
//!   link-ups or roams costs one write per device): on link-up and roam the
//!   gateway takes the key (`create`, or `update` at the revision read, so a
//!   newer owner's write is never lost to an older one's); on link-down it
//!   deletes the key only if it still holds it (compare-and-set on the
//!   revision of its own record), so a late link-down from a former owner
//!   never marks a device that moved elsewhere as down.
//! - Read from a watch into memory (`owner`), which the API uses to show a
//!   device connected through another gateway, with `cloudlink.gateway`.
//! - Reaping: when a gateway's lease goes (it aged out), exactly one
//!   survivor wins `create` on `r.<gateway>.<boot>` and, for every device
//!   that gateway still held, deletes the record at the revision it read
//!   and publishes `link.down` with reason `gateway_lost`. A record the dead
//!   gateway no longer holds (the device came back elsewhere first) is left
//!   alone: its compare-and-set fails.
//!
//! [`LinkObserver`]: crate::packet_path::LinkObserver

use async_nats::jetstream::kv;
use bytes::Bytes;
use dashmap::DashMap;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::ClusterError;
use crate::bus::event::{Event, Link, Moved};
use crate::bus::EventBus;
use crate::link_state::DownReason;

pub const BUCKET: &str = "cloudlink_sessions";
const VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OwnerRecord {
    pub v: u32,
    pub gateway: String,
    pub boot: String,
    pub endpoint: String,
    pub since: String,
    pub address: String,
}

impl OwnerRecord {
    pub fn parse(bytes: &[u8]) -> Option<OwnerRecord> {
        serde_json::from_slice::<OwnerRecord>(bytes)
            .ok()
            .filter(|r| r.v == VERSION)
    }
}

/// A device's owner as this gateway last saw it.
#[derive(Debug, Clone)]
pub struct Owner {
    pub record: OwnerRecord,
    pub revision: u64,
}

/// The latest link state of a device, waiting to be written.
#[derive(Debug, Clone)]
enum Pending {
    Up {
        endpoint: String,
        since: String,
        address: String,
        at: SystemTime,
    },
    Down {
        endpoint: String,
        reason: DownReason,
        address: String,
        at: SystemTime,
    },
}

/// What a write of [`Pending`] came to.
enum Written {
    /// It landed: the directory agrees with this gateway; announce this, if
    /// anything.
    Landed(Option<Event>),
    /// Nothing to write: another gateway holds the device.
    Skipped,
    /// NATS did not answer: keep it for the next round.
    Retry,
}

/// Told what the directory says about a device's link: (uuid, up, its
/// endpoint, how far to announce the status change that follows).
/// Told the devices reaped from a dead gateway.
type ReapedHook = Box<dyn Fn(&str, &str, Vec<(String, String)>) + Send + Sync>;

/// Told a device another gateway took over (its uuid).
type MovedHook = Box<dyn Fn(&str) + Send + Sync>;

type LinkHook = Box<dyn Fn(&str, bool, Option<&str>, crate::bus::Reach) + Send + Sync>;

pub struct Ownership {
    store: kv::Store,
    me: String,
    boot: String,
    owners: DashMap<String, Owner>,
    /// How many of `owners` are this boot's.
    owned: std::sync::atomic::AtomicI64,
    pending: parking_lot::Mutex<HashMap<String, Pending>>,
    wake: tokio::sync::Notify,
    /// Set once the first watch pass has been applied.
    bus: Arc<dyn EventBus>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Told when another gateway takes over a device this one held (the
    /// gateway drops its session there: `PacketPath::hand_over`).
    on_moved: std::sync::OnceLock<MovedHook>,
    /// Told every link change the directory shows (device status).
    on_link: std::sync::OnceLock<LinkHook>,
    /// Told the devices this gateway reaped from a dead gateway (gateway,
    /// boot, [(uuid, last endpoint)]), so the survivors redial them.
    on_reaped: std::sync::OnceLock<ReapedHook>,
    /// Devices whose record this gateway is deleting (its own link-down):
    /// the writer announces that, not the watch.
    releasing: parking_lot::Mutex<std::collections::HashSet<String>>,
}

/// Whether a link-up (or roam) noted here at `since` may replace `current`:
/// a record of this boot always; another gateway's (or an earlier boot's)
/// only if it is not newer than ours, so that of two gateways claiming one
/// device the later link-up wins, whatever order the writes land in. Times
/// are RFC 3339 with milliseconds, UTC: they compare as strings.
fn may_claim(current: Option<&OwnerRecord>, me: &str, boot: &str, since: &str) -> bool {
    match current {
        None => true,
        Some(c) if c.gateway == me && c.boot == boot => true,
        Some(c) => since >= c.since.as_str(),
    }
}

fn skey(uuid: &str) -> String {
    format!("s.{uuid}")
}

impl Ownership {
    pub async fn open(
        js: &async_nats::jetstream::Context,
        me: &str,
        boot: &str,
        bus: Arc<dyn EventBus>,
        metrics: Arc<crate::metrics::Metrics>,
        replicas: usize,
    ) -> Result<Arc<Ownership>, ClusterError> {
        let store = super::open_bucket(
            js,
            kv::Config {
                bucket: BUCKET.into(),
                description: "cloudlink: which gateway holds each connected device".into(),
                history: 1,
                ..Default::default()
            },
            replicas,
        )
        .await?;
        let o = Arc::new(Ownership {
            store,
            me: me.to_owned(),
            boot: boot.to_owned(),
            owners: DashMap::new(),
            owned: Default::default(),
            pending: Default::default(),
            wake: tokio::sync::Notify::new(),
            bus,
            metrics,
            on_moved: std::sync::OnceLock::new(),
            on_link: std::sync::OnceLock::new(),
            on_reaped: std::sync::OnceLock::new(),
            releasing: Default::default(),
        });
        tokio::spawn(watch(Arc::downgrade(&o)));
        tokio::spawn(write(Arc::downgrade(&o)));
        Ok(o)
    }

    /// Sets what is told the devices this gateway reaped. Once.
    pub fn set_on_reaped(
        &self,
        f: impl Fn(&str, &str, Vec<(String, String)>) + Send + Sync + 'static,
    ) {
        let _ = self.on_reaped.set(Box::new(f));
    }

    /// Sets what is told when another gateway takes a device over. Once.
    pub fn set_on_moved(&self, f: impl Fn(&str) + Send + Sync + 'static) {
        let _ = self.on_moved.set(Box::new(f));
    }

    /// Sets what is told each link change the directory shows, and tells it
    /// the devices held elsewhere so far. Once.
    pub fn set_on_link(
        &self,
        f: impl Fn(&str, bool, Option<&str>, crate::bus::Reach) + Send + Sync + 'static,
    ) {
        if self.on_link.set(Box::new(f)).is_ok() {
            let elsewhere: Vec<(String, String)> = self
                .owners
                .iter()
                .filter(|o| !self.is_mine(&o.record))
                .map(|o| (o.key().clone(), o.record.endpoint.clone()))
                .collect();
            for (uuid, endpoint) in elsewhere {
                self.tell_link(&uuid, true, Some(&endpoint), crate::bus::Reach::Local);
            }
        }
    }

    fn tell_link(&self, uuid: &str, up: bool, endpoint: Option<&str>, reach: crate::bus::Reach) {
        if let Some(f) = self.on_link.get() {
            f(uuid, up, endpoint, reach);
        }
    }

    /// Devices connected through any gateway, as the directory says.
    pub fn connected(&self) -> usize {
        self.owners.len()
    }

    /// The device's owner, if it has one.
    pub fn owner(&self, uuid: &str) -> Option<Owner> {
        self.owners.get(uuid).map(|o| o.clone())
    }

    fn is_mine(&self, r: &OwnerRecord) -> bool {
        r.gateway == self.me && r.boot == self.boot
    }

    /// Counts a change of the replica towards `cloudlink_cluster_owned_devices`.
    fn count(&self, old: Option<&Owner>, new: Option<&OwnerRecord>) {
        let delta = i64::from(new.is_some_and(|r| self.is_mine(r)))
            - i64::from(old.is_some_and(|o| self.is_mine(&o.record)));
        if delta != 0 {
            let n = self
                .owned
                .fetch_add(delta, std::sync::atomic::Ordering::Relaxed)
                + delta;
            self.metrics.cluster_owned.set(n);
        }
    }

    /// A record went: the device is down unless it comes up again (its
    /// owner's own write, or the reaper's, already said so cluster-wide).
    fn forget(&self, uuid: &str) {
        if let Some((_, old)) = self.owners.remove(uuid) {
            self.count(Some(&old), None);
            let own_release = self.releasing.lock().remove(uuid);
            if !own_release {
                self.tell_link(uuid, false, None, crate::bus::Reach::Local);
            }
        }
    }

    /// Writes everything noted so far (a clean stop calls it last).
    pub async fn flush(&self) {
        self.write_pending().await;
    }

    /// Writes what is pending; `false` if some of it must wait for NATS.
    async fn write_pending(&self) -> bool {
        let batch: Vec<(String, Pending)> = self.pending.lock().drain().collect();
        let writes = batch.into_iter().map(|(uuid, p)| async move {
            let w = self.apply(&uuid, &p).await;
            (uuid, p, w)
        });
        // A few hundred writes in flight at once, not one at a time.
        let mut writes = futures_util::stream::iter(writes).buffer_unordered(256);
        let mut all = true;
        while let Some((uuid, p, w)) = writes.next().await {
            match w {
                Written::Landed(event) => {
                    // The link event goes cluster-wide only now that the
                    // directory agrees: a former owner's late link-down,
                    // whose write fails, announces nothing; and so does the
                    // status change that follows.
                    let (at, up, endpoint) = match &p {
                        Pending::Up { at, endpoint, .. } => (*at, true, endpoint),
                        Pending::Down { at, endpoint, .. } => (*at, false, endpoint),
                    };
                    if let Some(event) = event {
                        self.metrics.link_event(event.kind());
                        self.bus.publish(Some(&uuid), event, at);
                    }
                    self.tell_link(&uuid, up, Some(endpoint), crate::bus::Reach::Cluster);
                }
                Written::Skipped => {}
                Written::Retry => {
                    all = false;
                    // Unless a newer state was noted meanwhile.
                    self.pending.lock().entry(uuid).or_insert(p);
                }
            }
        }
        all
    }

    async fn apply(&self, uuid: &str, p: &Pending) -> Written {
        let key = skey(uuid);
        for _ in 0..5 {
            let current = match self.store.entry(&key).await {
                Ok(e) => e.filter(|e| e.operation == kv::Operation::Put),
                Err(e) => {
                    tracing::debug!(device = %uuid, error = %e, "cannot read a device's owner; will retry");
                    return Written::Retry;
                }
            };
            let ours = current
                .as_ref()
                .and_then(|e| OwnerRecord::parse(&e.value))
                .is_some_and(|r| r.gateway == self.me && r.boot == self.boot);
            let held = current.as_ref().and_then(|e| OwnerRecord::parse(&e.value));
            let result = match p {
                Pending::Up {
                    endpoint,
                    since,
                    address,
                    ..
                } => {
                    let record = OwnerRecord {
                        v: VERSION,
                        gateway: self.me.clone(),
                        boot: self.boot.clone(),
                        endpoint: endpoint.clone(),
                        since: since.clone(),
                        address: address.clone(),
                    };
                    if !may_claim(held.as_ref(), &self.me, &self.boot, since) {
                        return Written::Skipped; // a later link-up elsewhere holds it
                    }
                    let value = Bytes::from(serde_json::to_vec(&record).expect("serialises"));
                    match &current {
                        None => self
                            .store
                            .create(&key, value)
                            .await
                            .map(|_| ())
                            .map_err(|e| e.to_string()),
                        Some(e) => self
                            .store
                            .update(&key, value, e.revision)
                            .await
                            .map(|_| ())
                            .map_err(|e| e.to_string()),
                    }
                }
                Pending::Down { .. } => match &current {
                    // Someone else holds it now (the device moved): a late
                    // link-down from here must not touch that.
                    Some(e) if ours => {
                        self.releasing.lock().insert(uuid.to_owned());
                        let r = self
                            .store
                            .delete_expect_revision(&key, Some(e.revision))
                            .await
                            .map_err(|e| e.to_string());
                        if r.is_err() {
                            self.releasing.lock().remove(uuid);
                        }
                        r
                    }
                    _ => return Written::Skipped,
                },
            };
            // A record already ours (a link-down and a link-up coalesced,
            // or devices claimed again after a lapsed lease that nobody
            // reaped): the cluster never saw the link go, nothing to say.
            let already =
                held.as_ref().is_some_and(|h| self.is_mine(h)) && matches!(p, Pending::Up { .. });
            match result {
                Ok(()) if already => return Written::Landed(None),
                Ok(()) => return Written::Landed(Some(link_event(&self.me, held.as_ref(), p))),
                Err(e) => {
                    tracing::debug!(device = %uuid, error = %e, "ownership write raced; reading again")
                }
            }
        }
        // Five compare-and-set races in a row, or NATS failing the writes.
        Written::Retry
    }

    /// The lease of `gateway` (boot `boot`) went. Exactly one survivor
    /// reaps its devices.
    pub async fn gateway_gone(&self, gateway: &str, boot: &str) {
        if gateway == self.me && boot == self.boot {
            return;
        }
        let reap_key = format!("r.{gateway}.{boot}");
        if self
            .store
            .create(&reap_key, Bytes::from(self.me.clone()))
            .await
            .is_err()
        {
            return; // another survivor reaps, or did
        }
        let theirs: Vec<(String, Owner)> = self
            .owners
            .iter()
            .filter(|o| o.record.gateway == gateway && o.record.boot == boot)
            .map(|o| (o.key().clone(), o.value().clone()))
            .collect();
        let mut reaped = 0u64;
        let mut back = Vec::new();
        for (uuid, owner) in theirs {
            if self
                .store
                .delete_expect_revision(skey(&uuid), Some(owner.revision))
                .await
                .is_ok()
            {
                reaped += 1;
                back.push((uuid.clone(), owner.record.endpoint.clone()));
                self.tell_link(
                    &uuid,
                    false,
                    Some(&owner.record.endpoint),
                    crate::bus::Reach::Cluster,
                );
                self.bus.publish(
                    Some(&uuid),
                    Event::LinkDown(Link {
                        endpoint: owner.record.endpoint.clone(),
                        reason: "gateway_lost".into(),
                        previous_endpoint: None,
                        roams: None,
                        address: owner.record.address.clone(),
                    }),
                    SystemTime::now(),
                );
                self.metrics.link_event("link.down");
            }
        }
        self.metrics.cluster_reaped.inc_by(reaped);
        if let (Some(f), false) = (self.on_reaped.get(), back.is_empty()) {
            f(gateway, boot, back);
        }
        tracing::warn!(%gateway, %boot, devices = reaped, "a gateway's lease expired; its devices are marked down (gateway_lost)");
    }
}

impl crate::packet_path::LinkObserver for Ownership {
    fn link_changed(
        &self,
        session: &crate::session_table::Session,
        up: bool,
        endpoint: std::net::SocketAddr,
        down: Option<DownReason>,
    ) {
        // Called with the session locked: only note it.
        let at = SystemTime::now();
        let p = match down {
            // Handed over: the new owner's record stays as it is.
            Some(DownReason::Moved) => return,
            Some(reason) => Pending::Down {
                endpoint: endpoint.to_string(),
                reason,
                address: session.address.to_string(),
                at,
            },
            None if up => Pending::Up {
                endpoint: endpoint.to_string(),
                since: crate::bus::event::rfc3339(at),
                address: session.address.to_string(),
                at,
            },
            None => Pending::Down {
                endpoint: endpoint.to_string(),
                reason: DownReason::Timeout,
                address: session.address.to_string(),
                at,
            },
        };
        self.pending.lock().insert(session.uuid.to_string(), p);
        self.wake.notify_one();
    }
}

async fn write(o: std::sync::Weak<Ownership>) {
    loop {
        // Held for at most a second: the task ends soon after the last
        // owner is gone.
        let Some(me) = o.upgrade() else { return };
        // Coalesce: whatever arrives within 20 ms is written together.
        if tokio::time::timeout(Duration::from_secs(1), me.wake.notified())
            .await
            .is_ok()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !me.write_pending().await {
            // NATS is away: the rest waits for the next round.
            drop(me);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// The event announcing a write that landed: `link.up`, or `link.moved`
/// when another gateway held the device; `link.down` for our own record's
/// deletion.
fn link_event(me: &str, held: Option<&OwnerRecord>, p: &Pending) -> Event {
    match p {
        Pending::Up {
            endpoint, address, ..
        } => match held.filter(|h| h.gateway != me) {
            Some(h) => Event::LinkMoved(Moved {
                from: h.gateway.clone(),
                to: me.to_owned(),
                endpoint: endpoint.clone(),
                previous_endpoint: h.endpoint.clone(),
                reason: "handshake".into(),
                address: address.clone(),
            }),
            None => Event::LinkUp(Link {
                endpoint: endpoint.clone(),
                reason: "handshake".into(),
                previous_endpoint: None,
                roams: None,
                address: address.clone(),
            }),
        },
        Pending::Down {
            endpoint,
            reason,
            address,
            ..
        } => Event::LinkDown(Link {
            endpoint: endpoint.clone(),
            reason: reason.as_str().into(),
            previous_endpoint: None,
            roams: None,
            address: address.clone(),
        }),
    }
}

async fn watch(o: std::sync::Weak<Ownership>) {
    loop {
        let Some(me) = o.upgrade() else { return };
        let w = me.store.watch_with_history("s.>").await;
        drop(me);
        let mut w = match w {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch device ownership; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(entry) = w.next().await {
            let Some(me) = o.upgrade() else { return };
            let Ok(entry) = entry else { break };
            let uuid = entry
                .key
                .strip_prefix("s.")
                .unwrap_or(&entry.key)
                .to_owned();
            match entry.operation {
                kv::Operation::Put => match OwnerRecord::parse(&entry.value) {
                    Some(record) => {
                        let was_mine = me.owners.get(&uuid).is_some_and(|o| me.is_mine(&o.record));
                        if was_mine && !me.is_mine(&record) {
                            // Another gateway took the device over: drop
                            // our session without a link-down.
                            if let Some(f) = me.on_moved.get() {
                                f(&uuid);
                            }
                        }
                        me.count(me.owners.get(&uuid).as_deref(), Some(&record));
                        if !me.is_mine(&record) {
                            me.tell_link(
                                &uuid,
                                true,
                                Some(&record.endpoint),
                                crate::bus::Reach::Local,
                            );
                        }
                        me.owners.insert(
                            uuid,
                            Owner {
                                record,
                                revision: entry.revision,
                            },
                        );
                    }
                    None => me.forget(&uuid),
                },
                kv::Operation::Delete | kv::Operation::Purge => me.forget(&uuid),
            }
            me.metrics.cluster_directory.set(me.owners.len() as i64);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_later_link_up_wins() {
        let rec = |gateway: &str, boot: &str, since: &str| OwnerRecord {
            v: VERSION,
            gateway: gateway.into(),
            boot: boot.into(),
            endpoint: "192.0.2.1:5".into(),
            since: since.into(),
            address: "10.240.0.2".into(),
        };
        let t1 = "2026-11-30T20:00:00.100Z";
        let t2 = "2026-11-30T20:00:00.200Z";
        assert!(may_claim(None, "a", "b1", t1));
        // Our own record, even with a later time on it.
        assert!(may_claim(Some(&rec("a", "b1", t2)), "a", "b1", t1));
        // Another gateway's: only by a link-up not older than it.
        assert!(!may_claim(Some(&rec("b", "x", t2)), "a", "b1", t1));
        assert!(may_claim(Some(&rec("b", "x", t1)), "a", "b1", t2));
        // Our previous boot's record is another boot's.
        assert!(!may_claim(Some(&rec("a", "b0", t2)), "a", "b1", t1));
        assert!(may_claim(Some(&rec("a", "b0", t1)), "a", "b1", t2));
    }

    #[test]
    fn owner_records_parse_only_their_format() {
        let r = OwnerRecord {
            v: VERSION,
            gateway: "gw-a".into(),
            boot: "b1".into(),
            endpoint: "192.0.2.1:5".into(),
            since: "2026-11-30T00:00:00Z".into(),
            address: "10.240.0.2".into(),
        };
        assert_eq!(
            OwnerRecord::parse(&serde_json::to_vec(&r).unwrap()),
            Some(r)
        );
        assert_eq!(OwnerRecord::parse(b"[]"), None);
        assert_eq!(OwnerRecord::parse(br#"{"v":9}"#), None);
    }
}
