//! The shared device registry of cluster mode: the JetStream KV bucket
//! `cloudlink_devices` is the source of truth; each gateway's SQLite
//! registry is a replica kept by a watch of the bucket, so every read (the
//! API, listings, the in-memory directory) stays local and fast.
//!
//! Keys:
//! - `d.<uuid>`: the device record (JSON with a format version);
//! - `k.<hex public key>`: the uuid holding that key (one device per key);
//! - `a.<address as a number>`: the uuid holding that tunnel address.
//!
//! Every claim is a `create` (create-if-absent), so two gateways can never
//! hand out one address or one key twice; record changes are `update` at
//! the revision read (compare-and-set), deletions `delete` at it. The
//! record is written last and claims are given back after it is gone, so a
//! crash in between leaves at most a claim nobody uses (a stale address
//! is skipped, a stale key claim naming the same uuid is reused).
//!
//! The replica ([`SharedRegistry::follow`]) applies the bucket's changes in
//! order and publishes them on this gateway's bus as `device.registered` (a
//! burst of new devices as one event), `device.updated` and
//! `device.deleted`; the fleet reactor then applies them here as it does
//! for a single gateway. A change made on any gateway is therefore seen on
//! every gateway within the watch's latency (milliseconds on a LAN).

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::ClusterError;
use crate::bus::event::{DeviceDeleted, DeviceRef, DeviceRegistered, DeviceUpdated, Event};
use crate::bus::{EventBus, Reach};
use crate::keys::{decode_key, encode_key, KeyBytes};
use crate::registry::{AddressPlan, Device, DevicePatch, NewDevice, Registered, Registry};

pub const BUCKET: &str = "cloudlink_devices";
/// A record that is always there (no uuid can be `_`), so the first pass of
/// the watch over `d.>` always has something to deliver and ends, whatever
/// else the bucket holds.
const SENTINEL: &str = "d._";
const VERSION: u32 = 1;
/// Registrations of a batch in flight at once.
const PARALLEL: usize = 64;

/// A device as the bucket stores it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceRecord {
    pub v: u32,
    pub uuid: String,
    pub public_key: String,
    pub address: Ipv4Addr,
    pub name: Option<String>,
    pub created_at_ms: i64,
    pub poll_interval_s: Option<u32>,
    pub cloudlink_enabled: bool,
    pub app_id: Option<u32>,
    pub device_api_key: Option<String>,
    /// A record written before limits existed has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_kbps: Option<u32>,
    /// The gateway that wrote this version: it alone announces the change
    /// cluster-wide (every gateway announces it to its own reactor).
    #[serde(default)]
    pub by: String,
}

impl DeviceRecord {
    /// Parses a stored value; `None` for anything of another format.
    pub fn parse(bytes: &[u8]) -> Option<DeviceRecord> {
        let r = serde_json::from_slice::<DeviceRecord>(bytes).ok()?;
        (r.v == VERSION && decode_key(&r.public_key).is_ok()).then_some(r)
    }

    fn bytes(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("a device record serialises"))
    }

    pub fn device(&self) -> Device {
        Device {
            uuid: self.uuid.clone(),
            public_key: decode_key(&self.public_key).unwrap_or([0; 32]),
            address: self.address,
            name: self.name.clone(),
            created_at_ms: self.created_at_ms,
            status: crate::status::Stored {
                poll_interval_s: self.poll_interval_s,
                cloudlink_enabled: self.cloudlink_enabled,
                ..Default::default()
            },
            app_id: self.app_id,
            has_device_api_key: self.device_api_key.is_some(),
            rate_limit_kbps: self.rate_limit_kbps,
        }
    }
}

fn dev_key(uuid: &str) -> String {
    format!("d.{uuid}")
}
fn pk_key(key: &KeyBytes) -> String {
    let mut s = String::with_capacity(66);
    s.push_str("k.");
    for b in key {
        s.push_str(&format!("{b:02x}"));
    }
    s
}
fn addr_key(a: Ipv4Addr) -> String {
    format!("a.{}", u32::from(a))
}

pub struct SharedRegistry {
    store: kv::Store,
    local: Arc<Registry>,
    plan: AddressPlan,
    /// Where the next address search starts.
    next: AtomicU32,
    /// The last bucket revision the replica applied.
    applied: tokio::sync::watch::Sender<u64>,
    /// This gateway's id (records name their writer).
    me: String,
    /// Devices this gateway is deleting: their deletion is announced
    /// cluster-wide from here.
    deleting: parking_lot::Mutex<std::collections::HashSet<String>>,
    health: Arc<super::NatsHealth>,
}

type R<T> = Result<T, ClusterError>;

impl SharedRegistry {
    pub async fn open(
        js: &async_nats::jetstream::Context,
        local: Arc<Registry>,
        me: &str,
        health: Arc<super::NatsHealth>,
        replicas: usize,
    ) -> R<Arc<SharedRegistry>> {
        let store = super::open_bucket(
            js,
            kv::Config {
                bucket: BUCKET.into(),
                description: "cloudlink device registry".into(),
                history: 1,
                ..Default::default()
            },
            replicas,
        )
        .await?;
        match store.create(SENTINEL, Bytes::from_static(b"{}")).await {
            Ok(_) => {}
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(ClusterError::js(e)),
        }
        let plan = local.plan();
        let start = u32::from(plan.gateway()) + 1;
        Ok(Arc::new(SharedRegistry {
            store,
            plan,
            local,
            next: AtomicU32::new(start),
            applied: tokio::sync::watch::channel(0).0,
            me: me.to_owned(),
            deleting: Default::default(),
            health,
        }))
    }

    /// Registers devices (up to [`PARALLEL`] at a time); the answers in
    /// order, and the highest revision written.
    pub async fn register_batch(&self, devs: Vec<NewDevice>) -> R<(Vec<Registered>, u64)> {
        self.reachable()?;
        let mut out = Vec::with_capacity(devs.len());
        let mut top = 0;
        let mut devs = devs.into_iter().peekable();
        while devs.peek().is_some() {
            let chunk: Vec<NewDevice> = devs.by_ref().take(PARALLEL).collect();
            let results =
                futures_util::future::join_all(chunk.into_iter().map(|d| self.register_one(d)))
                    .await;
            for r in results {
                let (r, rev) = r?;
                top = top.max(rev);
                out.push(r);
            }
        }
        Ok((out, top))
    }

    async fn register_one(&self, dev: NewDevice) -> R<(Registered, u64)> {
        let dk = dev_key(&dev.uuid);
        if let Some(existing) = self.record(&dk).await? {
            return Ok((judge(&existing, &dev.public_key), 0));
        }
        // One device per key.
        let pk = pk_key(&dev.public_key);
        let key_claim = match self.store.create(&pk, Bytes::from(dev.uuid.clone())).await {
            Ok(rev) => Some(rev),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let holder = self.holder(&pk).await?;
                match holder {
                    Some(h) if h == dev.uuid => None, // ours, from an attempt that crashed
                    Some(h) => return Ok((Registered::KeyTaken { uuid: h }, 0)),
                    None => {
                        return Err(ClusterError::JetStream(
                            "a key claim vanished while it was read".into(),
                        ))
                    }
                }
            }
            Err(e) => return Err(ClusterError::js(e)),
        };
        let (address, addr_rev) = match self.claim_address(&dev.uuid).await {
            Ok(a) => a,
            Err(e) => {
                self.give_back(&pk, key_claim).await;
                return Err(e);
            }
        };
        let record = DeviceRecord {
            v: VERSION,
            uuid: dev.uuid.clone(),
            public_key: encode_key(&dev.public_key),
            address,
            name: dev.name.clone(),
            created_at_ms: crate::registry::now_ms(),
            poll_interval_s: None,
            cloudlink_enabled: true,
            app_id: None,
            device_api_key: None,
            rate_limit_kbps: None,
            by: self.me.clone(),
        };
        match self.store.create(&dk, record.bytes()).await {
            Ok(rev) => Ok((Registered::Created(record.device()), rev)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                // Another gateway registered this uuid meanwhile.
                self.give_back(&addr_key(address), Some(addr_rev)).await;
                let winner = self.record(&dk).await?;
                if winner.as_ref().map(|w| w.public_key.as_str()) != Some(&record.public_key) {
                    self.give_back(&pk, key_claim).await;
                }
                Ok((
                    winner.map_or(Registered::UuidTaken, |w| judge(&w, &dev.public_key)),
                    0,
                ))
            }
            Err(e) => {
                self.give_back(&addr_key(address), Some(addr_rev)).await;
                self.give_back(&pk, key_claim).await;
                Err(ClusterError::js(e))
            }
        }
    }

    /// The next free tunnel address, claimed for `uuid`.
    async fn claim_address(&self, uuid: &str) -> R<(Ipv4Addr, u64)> {
        let (first, last) = (
            u32::from(self.plan.gateway()) + 1,
            u32::from(self.plan.net.broadcast()) - 1,
        );
        let span = (last - first + 1) as u64;
        for _ in 0..span.min(1 << 20) {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let candidate = first + (n.wrapping_sub(first)) % (last - first + 1);
            let a = Ipv4Addr::from(candidate);
            // Known taken here: skip without a round trip.
            if self.local.address_taken(a).unwrap_or(false) {
                continue;
            }
            match self
                .store
                .create(addr_key(a), Bytes::from(uuid.to_owned()))
                .await
            {
                Ok(rev) => return Ok((a, rev)),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                Err(e) => return Err(ClusterError::js(e)),
            }
        }
        Err(ClusterError::JetStream(format!(
            "the tunnel network {} has no free address",
            self.plan.net
        )))
    }

    async fn record(&self, key: &str) -> R<Option<DeviceRecord>> {
        Ok(self
            .store
            .entry(key)
            .await
            .map_err(ClusterError::js)?
            .filter(|e| e.operation == kv::Operation::Put)
            .and_then(|e| DeviceRecord::parse(&e.value)))
    }

    async fn holder(&self, key: &str) -> R<Option<String>> {
        Ok(self
            .store
            .entry(key)
            .await
            .map_err(ClusterError::js)?
            .filter(|e| e.operation == kv::Operation::Put)
            .and_then(|e| String::from_utf8(e.value.to_vec()).ok()))
    }

    /// Releases a claim this call made (`rev`: the revision it wrote).
    async fn give_back(&self, key: &str, rev: Option<u64>) {
        if let Some(rev) = rev {
            if let Err(e) = self.store.delete_expect_revision(key, Some(rev)).await {
                tracing::warn!(%key, error = %e, "could not give a registry claim back");
            }
        }
    }

    /// Releases `key` if `uuid` holds it.
    async fn release(&self, key: &str, uuid: &str) {
        if let Ok(Some(e)) = self.store.entry(key).await {
            if e.operation == kv::Operation::Put && e.value == uuid.as_bytes() {
                self.give_back(key, Some(e.revision)).await;
            }
        }
    }

    /// Applies `patch` with compare-and-set; the device before and after
    /// and the revision written, or `None` if there is no such device.
    pub async fn update(&self, uuid: &str, patch: &DevicePatch) -> R<UpdateOutcome> {
        self.reachable()?;
        let dk = dev_key(uuid);
        for _ in 0..10 {
            let Some(entry) = self
                .store
                .entry(&dk)
                .await
                .map_err(ClusterError::js)?
                .filter(|e| e.operation == kv::Operation::Put)
            else {
                return Ok(UpdateOutcome::NoDevice);
            };
            let Some(before) = DeviceRecord::parse(&entry.value) else {
                return Err(ClusterError::JetStream(format!(
                    "the record of {uuid:?} is of an unknown format"
                )));
            };
            let mut after = before.clone();
            after.by = self.me.clone();
            if let Some(n) = &patch.name {
                after.name = n.clone();
            }
            if let Some(i) = patch.poll_interval_s {
                after.poll_interval_s = i;
            }
            if let Some(e) = patch.cloudlink_enabled {
                after.cloudlink_enabled = e;
            }
            if let Some(k) = &patch.device_api_key {
                after.device_api_key = k.clone();
            }
            if let Some(a) = patch.app_id {
                after.app_id = a;
            }
            if let Some(l) = patch.rate_limit_kbps {
                after.rate_limit_kbps = l;
            }
            let mut new_claim = None;
            if let Some(key) = &patch.public_key {
                let encoded = encode_key(key);
                if encoded != before.public_key {
                    let pk = pk_key(key);
                    match self.store.create(&pk, Bytes::from(uuid.to_owned())).await {
                        Ok(rev) => new_claim = Some((pk, rev)),
                        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                            match self.holder(&pk).await? {
                                Some(h) if h == uuid => {}
                                Some(h) => return Ok(UpdateOutcome::KeyTaken(h)),
                                None => continue,
                            }
                        }
                        Err(e) => return Err(ClusterError::js(e)),
                    }
                    after.public_key = encoded;
                }
            }
            match self.store.update(&dk, after.bytes(), entry.revision).await {
                Ok(rev) => {
                    if after.public_key != before.public_key {
                        if let Ok(old) = decode_key(&before.public_key) {
                            self.release(&pk_key(&old), uuid).await;
                        }
                    }
                    return Ok(UpdateOutcome::Updated(
                        Box::new((before.device(), after.device())),
                        rev,
                    ));
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    if let Some((pk, rev)) = new_claim {
                        self.give_back(&pk, Some(rev)).await;
                    }
                    continue;
                }
                Err(e) => return Err(ClusterError::js(e)),
            }
        }
        Err(ClusterError::JetStream(format!(
            "the record of {uuid:?} kept changing"
        )))
    }

    /// Deletes a device (compare-and-set), then gives its claims back.
    pub async fn delete(&self, uuid: &str) -> R<Option<Device>> {
        self.reachable()?;
        let dk = dev_key(uuid);
        for _ in 0..10 {
            let Some(entry) = self
                .store
                .entry(&dk)
                .await
                .map_err(ClusterError::js)?
                .filter(|e| e.operation == kv::Operation::Put)
            else {
                return Ok(None);
            };
            self.deleting.lock().insert(uuid.to_owned());
            let deleted = self
                .store
                .delete_expect_revision(&dk, Some(entry.revision))
                .await;
            if deleted.is_err() {
                self.deleting.lock().remove(uuid);
            }
            match deleted {
                Ok(()) => {
                    let rec = DeviceRecord::parse(&entry.value);
                    if let Some(r) = &rec {
                        if let Ok(k) = decode_key(&r.public_key) {
                            self.release(&pk_key(&k), uuid).await;
                        }
                        self.release(&addr_key(r.address), uuid).await;
                    }
                    return Ok(rec.map(|r| r.device()));
                }
                Err(_) => continue,
            }
        }
        Err(ClusterError::JetStream(format!(
            "the record of {uuid:?} kept changing"
        )))
    }

    /// Refuses at once while NATS is unreachable (rather than after a
    /// request timeout).
    fn reachable(&self) -> R<()> {
        if self.health.connected() {
            Ok(())
        } else {
            Err(ClusterError::Unreachable)
        }
    }

    /// Waits (at most `timeout`) until the replica applied `revision`.
    pub async fn wait_applied(&self, revision: u64, timeout: Duration) {
        let mut rx = self.applied.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|a| *a >= revision)).await;
    }

    /// Waits (at most `timeout`) until the replica no longer has `uuid`.
    pub async fn wait_gone(&self, uuid: &str, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while matches!(self.local.get(uuid), Ok(Some(_))) && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Brings the local replica in line with the bucket, before anything
    /// reads it: every record is applied; local devices the bucket does not
    /// have are deleted, except on the first join of this data directory,
    /// when they are added to the bucket (a gateway that ran alone joins a
    /// cluster with its devices). Returns the watch to [`follow`](Self::follow).
    pub async fn sync(&self) -> R<kv::Watch> {
        let mut watch = self
            .store
            .watch_with_history("d.>")
            .await
            .map_err(ClusterError::js)?;
        let mut seen = HashSet::new();
        loop {
            let next = tokio::time::timeout(Duration::from_secs(30), watch.next())
                .await
                .map_err(|_| {
                    ClusterError::JetStream("the device registry did not arrive within 30 s".into())
                })?;
            let Some(entry) = next else {
                return Err(ClusterError::JetStream("the registry watch ended".into()));
            };
            let entry = entry.map_err(ClusterError::js)?;
            if entry.operation == kv::Operation::Put {
                if let Some(r) = DeviceRecord::parse(&entry.value) {
                    self.local
                        .replica_upsert(&r.device(), r.device_api_key.as_deref())
                        .map_err(ClusterError::js)?;
                    seen.insert(r.uuid);
                }
            }
            self.applied.send_replace(entry.revision);
            if entry.delta == 0 {
                break;
            }
        }
        let first_join = self
            .local
            .meta("cluster_joined")
            .map_err(ClusterError::js)?
            .is_none();
        let strays: Vec<String> = self
            .local
            .uuids()
            .map_err(ClusterError::js)?
            .into_iter()
            .filter(|u| !seen.contains(u))
            .collect();
        if first_join && !strays.is_empty() {
            self.upload(&strays).await?;
        } else {
            for u in &strays {
                self.local.delete(u).map_err(ClusterError::js)?;
            }
            if !strays.is_empty() {
                tracing::info!(
                    count = strays.len(),
                    "removed devices the cluster deleted while this gateway was away"
                );
            }
        }
        self.local
            .set_meta("cluster_joined", "1")
            .map_err(ClusterError::js)?;
        let max = self.local.max_address().map_err(ClusterError::js)?;
        if let Some(m) = max {
            self.next.store(u32::from(m) + 1, Ordering::Relaxed);
        }
        Ok(watch)
    }

    /// Adds local devices to the bucket with their addresses (first join).
    /// A conflict (its key, address or uuid held by another device in the
    /// cluster) stops the join: nothing is dropped silently.
    async fn upload(&self, uuids: &[String]) -> R<()> {
        for uuid in uuids {
            let Some(d) = self.local.get(uuid).map_err(ClusterError::js)? else {
                continue;
            };
            let (api_key, _) = self
                .local
                .action_defaults(uuid)
                .map_err(ClusterError::js)?
                .unwrap_or_default();
            let conflict = |what: &str| {
                ClusterError::JetStream(format!(
                "device {uuid:?} of this data directory cannot join the cluster: its {what} belongs to another device there; delete one of them first"
            ))
            };
            let pk = pk_key(&d.public_key);
            match self.store.create(&pk, Bytes::from(uuid.clone())).await {
                Ok(_) => {}
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    if self.holder(&pk).await?.as_deref() != Some(uuid.as_str()) {
                        return Err(conflict("public key"));
                    }
                }
                Err(e) => return Err(ClusterError::js(e)),
            }
            let ak = addr_key(d.address);
            match self.store.create(&ak, Bytes::from(uuid.clone())).await {
                Ok(_) => {}
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    if self.holder(&ak).await?.as_deref() != Some(uuid.as_str()) {
                        return Err(conflict("tunnel address"));
                    }
                }
                Err(e) => return Err(ClusterError::js(e)),
            }
            let record = DeviceRecord {
                v: VERSION,
                uuid: d.uuid.clone(),
                public_key: encode_key(&d.public_key),
                address: d.address,
                name: d.name.clone(),
                created_at_ms: d.created_at_ms,
                poll_interval_s: d.status.poll_interval_s,
                cloudlink_enabled: d.status.cloudlink_enabled,
                app_id: d.app_id,
                device_api_key: api_key,
                rate_limit_kbps: d.rate_limit_kbps,
                by: self.me.clone(),
            };
            match self.store.create(dev_key(uuid), record.bytes()).await {
                Ok(_) => {}
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    return Err(conflict("uuid"))
                }
                Err(e) => return Err(ClusterError::js(e)),
            }
        }
        tracing::info!(
            count = uuids.len(),
            "added this data directory's devices to the cluster's registry"
        );
        Ok(())
    }

    /// Follows the bucket from where [`sync`](Self::sync) stopped: applies
    /// each change to the replica and publishes it on `bus`. Runs until the
    /// watch ends for good.
    pub async fn follow(self: Arc<Self>, mut watch: kv::Watch, bus: Arc<dyn EventBus>) {
        let mut burst: Vec<DeviceRef> = Vec::new();
        // Whether the burst's devices were registered here.
        let mut burst_mine = false;
        loop {
            let entry = match watch.next().await {
                Some(Ok(e)) => e,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "registry watch error");
                    continue;
                }
                None => {
                    // The watch ended (NATS went away for long): start again
                    // from the current state.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    match self.store.watch_with_history("d.>").await {
                        Ok(w) => {
                            watch = w;
                            continue;
                        }
                        Err(_) => continue,
                    }
                }
            };
            let revision = entry.revision;
            let more = entry.delta > 0;
            if entry.key == SENTINEL {
                self.applied.send_replace(revision);
                continue;
            }
            let uuid = entry
                .key
                .strip_prefix("d.")
                .unwrap_or(&entry.key)
                .to_owned();
            match entry.operation {
                kv::Operation::Put => {
                    let Some(r) = DeviceRecord::parse(&entry.value) else {
                        tracing::warn!(device = %uuid, "a registry record of an unknown format was skipped");
                        continue;
                    };
                    let after = r.device();
                    let mine = r.by == self.me;
                    if mine != burst_mine {
                        flush(&*bus, &mut burst, burst_mine);
                        burst_mine = mine;
                    }
                    match self
                        .local
                        .replica_upsert(&after, r.device_api_key.as_deref())
                    {
                        Ok(None) => burst.push(DeviceRef {
                            uuid: after.uuid.clone(),
                            public_key: after.public_key,
                            address: after.address,
                        }),
                        Ok(Some(before)) => {
                            flush(&*bus, &mut burst, burst_mine);
                            publish_update(&*bus, &before, &after, reach(mine));
                        }
                        Err(e) => {
                            tracing::error!(device = %uuid, error = %e, "could not apply a registry change")
                        }
                    }
                }
                kv::Operation::Delete | kv::Operation::Purge => {
                    flush(&*bus, &mut burst, burst_mine);
                    let mine = self.deleting.lock().remove(&uuid);
                    match self.local.delete(&uuid) {
                        Ok(Some(d)) => {
                            bus.publish_reach(
                                Some(&uuid),
                                Event::DeviceDeleted(DeviceDeleted {
                                    address: d.address.to_string(),
                                    public_key: d.public_key,
                                }),
                                SystemTime::now(),
                                reach(mine),
                            );
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::error!(device = %uuid, error = %e, "could not apply a registry deletion")
                        }
                    }
                }
            }
            if !more || burst.len() >= 10_000 {
                flush(&*bus, &mut burst, burst_mine);
            }
            self.applied.send_replace(revision);
        }
    }
}

/// What [`SharedRegistry::update`] did.
pub enum UpdateOutcome {
    NoDevice,
    KeyTaken(String),
    Updated(Box<(Device, Device)>, u64),
}

fn judge(existing: &DeviceRecord, key: &KeyBytes) -> Registered {
    if decode_key(&existing.public_key).ok().as_ref() == Some(key) {
        Registered::Existing(existing.device())
    } else {
        Registered::UuidTaken
    }
}

/// A change written here goes cluster-wide; one written elsewhere only to
/// this gateway's reactor (its writer announces it).
fn reach(mine: bool) -> Reach {
    if mine {
        Reach::Cluster
    } else {
        Reach::Local
    }
}

/// Publishes new devices seen together as one `device.registered`.
fn flush(bus: &dyn EventBus, burst: &mut Vec<DeviceRef>, mine: bool) {
    if burst.is_empty() {
        return;
    }
    let devices: Arc<[DeviceRef]> = std::mem::take(burst).into();
    let single = devices.len() == 1;
    bus.publish_reach(
        single.then(|| devices[0].uuid.as_str()),
        Event::DeviceRegistered(DeviceRegistered {
            count: devices.len(),
            address: single.then(|| devices[0].address.to_string()),
            name: None,
            devices: devices.clone(),
        }),
        SystemTime::now(),
        reach(mine),
    );
}

fn publish_update(bus: &dyn EventBus, before: &Device, after: &Device, reach: Reach) {
    let mut changed = Vec::new();
    let rekeyed = before.public_key != after.public_key;
    if rekeyed {
        changed.push("public_key");
    }
    if before.name != after.name {
        changed.push("name");
    }
    let interval = before.status.poll_interval_s != after.status.poll_interval_s;
    if interval {
        changed.push("poll_interval_s");
    }
    let enabled = before.status.cloudlink_enabled != after.status.cloudlink_enabled;
    if enabled {
        changed.push("cloudlink_enabled");
    }
    if before.has_device_api_key != after.has_device_api_key {
        changed.push("device_api_key");
    }
    if before.app_id != after.app_id {
        changed.push("app_id");
    }
    let limit = before.rate_limit_kbps != after.rate_limit_kbps;
    if limit {
        changed.push("rate_limit_kbps");
    }
    bus.publish_reach(
        Some(&after.uuid),
        Event::DeviceUpdated(DeviceUpdated {
            changed,
            cloudlink_enabled: enabled.then_some(after.status.cloudlink_enabled),
            poll_interval_s: interval.then_some(after.status.poll_interval_s),
            public_key: rekeyed.then(|| encode_key(&after.public_key)),
            previous_key: rekeyed.then_some(before.public_key),
            address: after.address,
            rate_limit_kbps: limit.then_some(after.rate_limit_kbps),
        }),
        SystemTime::now(),
        reach,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_refuse_other_formats() {
        let r = DeviceRecord {
            v: VERSION,
            uuid: "dev-1".into(),
            public_key: encode_key(&[7; 32]),
            address: Ipv4Addr::new(10, 240, 0, 2),
            name: Some("kiosk".into()),
            created_at_ms: 1,
            poll_interval_s: Some(60),
            cloudlink_enabled: true,
            app_id: None,
            device_api_key: Some("secret".into()),
            rate_limit_kbps: Some(10_000),
            by: "gw-a".into(),
        };
        assert_eq!(DeviceRecord::parse(&r.bytes()), Some(r.clone()));
        let d = r.device();
        assert_eq!(d.public_key, [7; 32]);
        assert!(d.has_device_api_key);
        assert_eq!(DeviceRecord::parse(b"{}"), None);
        assert_eq!(DeviceRecord::parse(b"\x00"), None);
        let mut bad = r.clone();
        bad.public_key = "nope".into();
        assert_eq!(DeviceRecord::parse(&bad.bytes()), None);
        bad = r;
        bad.v = 2;
        assert_eq!(DeviceRecord::parse(&bad.bytes()), None);
    }

    #[test]
    fn keys_are_valid_kv_keys() {
        assert_eq!(pk_key(&[0xab; 32]).len(), 66);
        assert_eq!(addr_key(Ipv4Addr::new(10, 0, 0, 2)), "a.167772162");
        assert_eq!(dev_key("dev-1"), "d.dev-1");
    }
}
