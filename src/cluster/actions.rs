//! Queued actions and `Idempotency-Key`s cluster-wide (issue "Cluster mode,
//! part 2"). In cluster mode the action queue keeps its records here, not
//! in the gateway's SQLite: an action queued through one gateway is
//! delivered by whichever gateway the device links up on, and a retried
//! request finds the first one's action on any gateway.
//!
//! One KV value per device (`d.<uuid>` in `cloudlink_actions`) holds that
//! device's actions; every change is a compare-and-set on its revision, so
//! two gateways never both take the same step. That gives:
//! - **at most once**: a gateway claims a queued action (`queued` →
//!   `delivering`, naming itself and its boot) before it sends a byte; a
//!   claim that loses the race sends nothing. A gateway that dies or stops
//!   mid-delivery leaves the record `delivering`; its restart, or the
//!   survivor that reaps it, turns that into `unknown`, never back into
//!   `queued`: a reboot is never sent twice.
//! - **idempotency**: an action with a key is recorded before it is
//!   delivered; a second request with the same key (within 24 h) finds that
//!   record, on any gateway, and gets its outcome instead of a delivery.
//!
//! `a.<id>` in `cloudlink_action_ids` maps an action id to its device (for
//! `GET /v1/actions/{id}`). Both buckets keep a value 8 days after its last
//! write (a queue TTL is at most 7): nothing grows without bound. A
//! device's value keeps at most [`MAX_PER_DEVICE`] actions; finished ones
//! older than the idempotency window are dropped at the next write.

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::{ClusterError, NatsHealth};
use crate::action_queue::{NewAction, StoredAction, IDEMPOTENCY_WINDOW};
use crate::actions::Params;
use crate::registry::{now_ms, RegistryError};

pub const BUCKET: &str = "cloudlink_actions";
pub const IDS_BUCKET: &str = "cloudlink_action_ids";
const VERSION: u32 = 1;
/// How long a value outlives its last write: the retention of finished
/// actions (a queue TTL is at most 7 days).
const RETAIN: Duration = crate::action_queue::RETENTION;
/// Actions one device's value holds at most.
pub const MAX_PER_DEVICE: usize = 256;

/// One device's actions, as stored.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeviceActions {
    pub v: u32,
    pub actions: Vec<Record>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub action: String,
    #[serde(default)]
    pub force: bool,
    pub app_id: Option<u32>,
    pub service_name: Option<String>,
    pub api_key: Option<String>,
    pub idempotency_key: Option<String>,
    pub state: String,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    pub device_status: Option<u16>,
    pub device_body: Option<Value>,
    /// The gateway (and its boot) that claimed it for delivery.
    pub by: Option<String>,
    pub boot: Option<String>,
}

impl Record {
    pub fn stored(&self, device: &str) -> StoredAction {
        StoredAction {
            id: self.id.clone(),
            device: device.to_owned(),
            action: self.action.clone(),
            params: Params {
                force: self.force,
                app_id: self.app_id,
                service_name: self.service_name.clone(),
            },
            state: self.state.clone(),
            created_at_ms: self.created_at_ms,
            expires_at_ms: self.expires_at_ms,
            device_status: self.device_status,
            device_body: self.device_body.clone(),
        }
    }
}

impl DeviceActions {
    /// Parses a stored value; `None` for anything this version cannot read.
    pub fn parse(bytes: &[u8]) -> Option<DeviceActions> {
        serde_json::from_slice::<DeviceActions>(bytes)
            .ok()
            .filter(|d| d.v == VERSION)
    }

    fn bytes(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// Drops finished actions older than the idempotency window.
    fn trim(&mut self, now: i64) {
        let horizon = now - IDEMPOTENCY_WINDOW.as_millis() as i64;
        self.actions.retain(|a| {
            matches!(a.state.as_str(), "queued" | "delivering") || a.created_at_ms >= horizon
        });
    }

    fn summary(&self) -> Summary {
        Summary {
            next_expiry: self
                .actions
                .iter()
                .filter(|a| a.state == "queued")
                .map(|a| a.expires_at_ms)
                .min(),
            delivering: self
                .actions
                .iter()
                .filter(|a| a.state == "delivering")
                .filter_map(|a| Some((a.by.clone()?, a.boot.clone().unwrap_or_default())))
                .collect(),
        }
    }
}

/// What the index keeps of each device with actions in flight.
#[derive(Debug, Clone, Default)]
struct Summary {
    next_expiry: Option<i64>,
    /// (gateway, boot) of each delivery under way.
    delivering: Vec<(String, String)>,
}

/// Whether an insert stored a new action or found the first one made with
/// the same idempotency key.
#[derive(Debug)]
pub enum Inserted {
    New(StoredAction),
    Existing(StoredAction),
}

pub struct SharedActions {
    store: kv::Store,
    ids: kv::Store,
    me: String,
    boot: String,
    health: Arc<NatsHealth>,
    /// Devices with queued or delivering actions (kept by a watch).
    index: Mutex<HashMap<String, Summary>>,
    /// True once the watch has read the values present at the start.
    synced: tokio::sync::watch::Sender<bool>,
}

fn me_synced(this: &std::sync::Weak<SharedActions>) {
    if let Some(me) = this.upgrade() {
        me.synced.send_replace(true);
    }
}

fn key(uuid: &str) -> String {
    format!("d.{uuid}")
}

fn cluster(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Cluster(e.to_string())
}

impl SharedActions {
    pub async fn open(
        js: &async_nats::jetstream::Context,
        me: &str,
        boot: &str,
        health: Arc<NatsHealth>,
        replicas: usize,
    ) -> Result<Arc<SharedActions>, ClusterError> {
        let config = |bucket: &str, description: &str| kv::Config {
            bucket: bucket.into(),
            description: description.into(),
            history: 1,
            max_age: RETAIN,
            ..Default::default()
        };
        let store = super::open_bucket(
            js,
            config(
                BUCKET,
                "cloudlink queued actions and idempotency keys, per device",
            ),
            replicas,
        )
        .await?;
        let ids = super::open_bucket(
            js,
            config(IDS_BUCKET, "cloudlink action id -> device"),
            replicas,
        )
        .await?;
        let me = Arc::new(SharedActions {
            store,
            ids,
            me: me.to_owned(),
            boot: boot.to_owned(),
            health,
            index: Mutex::new(HashMap::new()),
            synced: tokio::sync::watch::channel(false).0,
        });
        tokio::spawn(Self::watch(Arc::downgrade(&me)));
        Ok(me)
    }

    /// Waits (at most `within`) until the index holds the values present
    /// at the start.
    pub async fn wait_synced(&self, within: Duration) {
        let mut rx = self.synced.subscribe();
        let _ = tokio::time::timeout(within, rx.wait_for(|s| *s)).await;
    }

    /// The deliveries a previous boot of this gateway left half done become
    /// `unknown`: the ones moved.
    pub async fn interrupted_here(&self) -> Vec<StoredAction> {
        let boot = self.boot.clone();
        self.interrupted(&self.me, move |b| b != boot).await
    }

    /// Keeps the index of devices with actions in flight; says `synced`
    /// once the values present at the start are in.
    async fn watch(this: std::sync::Weak<SharedActions>) {
        let mut told = false;
        loop {
            let Some(me) = this.upgrade() else { return };
            let empty = me
                .store
                .status()
                .await
                .map(|s| s.values() == 0)
                .unwrap_or(false);
            let watch = me.store.watch_with_history(">").await;
            drop(me);
            if empty && !told {
                me_synced(&this);
                told = true;
            }
            let mut watch = match watch {
                Ok(w) => w,
                Err(e) => {
                    tracing::debug!(error = %e, "action watch: retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            while let Some(Ok(entry)) = watch.next().await {
                let Some(me) = this.upgrade() else { return };
                let Some(uuid) = entry.key.strip_prefix("d.") else {
                    continue;
                };
                let summary = match entry.operation {
                    kv::Operation::Put => DeviceActions::parse(&entry.value)
                        .map(|d| d.summary())
                        .unwrap_or_default(),
                    _ => Summary::default(),
                };
                {
                    let mut index = me.index.lock();
                    if summary.next_expiry.is_none() && summary.delivering.is_empty() {
                        index.remove(uuid);
                    } else {
                        index.insert(uuid.to_owned(), summary);
                    }
                }
                if entry.delta == 0 && !told {
                    me.synced.send_replace(true);
                    told = true;
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Reads the device's value, lets `f` change it, and writes it back if
    /// `f` says so, all as one compare-and-set (retried when another
    /// gateway wrote in between).
    async fn modify<T>(
        &self,
        uuid: &str,
        mut f: impl FnMut(&mut DeviceActions) -> Result<(bool, T), RegistryError>,
    ) -> Result<T, RegistryError> {
        if !self.health.connected() {
            return Err(cluster(ClusterError::Unreachable));
        }
        let k = key(uuid);
        for _ in 0..32 {
            let entry = self.store.entry(&k).await.map_err(cluster)?;
            let (mut value, revision) = match &entry {
                Some(e) if e.operation == kv::Operation::Put => (
                    DeviceActions::parse(&e.value).ok_or_else(|| {
                        cluster(format!("the actions of device {uuid} are stored in a format this gateway cannot read"))
                    })?,
                    Some(e.revision),
                ),
                Some(e) => (DeviceActions::default(), Some(e.revision)),
                None => (DeviceActions::default(), None),
            };
            value.v = VERSION;
            value.trim(now_ms());
            let (write, out) = f(&mut value)?;
            if !write {
                return Ok(out);
            }
            let written = match revision {
                Some(rev) => self
                    .store
                    .update(&k, value.bytes(), rev)
                    .await
                    .map_err(|e| {
                        (
                            e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                            e.to_string(),
                        )
                    }),
                None => self.store.create(&k, value.bytes()).await.map_err(|e| {
                    (
                        e.kind() == kv::CreateErrorKind::AlreadyExists,
                        e.to_string(),
                    )
                }),
            };
            match written {
                Ok(_) => return Ok(out),
                Err((true, _)) => continue,
                Err((false, e)) => return Err(cluster(e)),
            }
        }
        Err(cluster(format!(
            "the actions of device {uuid} kept changing under this gateway"
        )))
    }

    /// The action this device got under `idempotency_key` within 24 h.
    pub async fn by_idempotency_key(
        &self,
        uuid: &str,
        idempotency_key: &str,
    ) -> Result<Option<StoredAction>, RegistryError> {
        let since = now_ms() - IDEMPOTENCY_WINDOW.as_millis() as i64;
        let entry = self.store.get(key(uuid)).await.map_err(cluster)?;
        Ok(entry
            .and_then(|b| DeviceActions::parse(&b))
            .and_then(|d| {
                d.actions.into_iter().find(|a| {
                    a.idempotency_key.as_deref() == Some(idempotency_key)
                        && a.created_at_ms >= since
                })
            })
            .map(|a| a.stored(uuid)))
    }

    /// Stores a new action in `state` (`queued`, or `delivering` by this
    /// gateway for an immediate one with an idempotency key), unless the
    /// device already got one under the same key.
    pub async fn insert(
        &self,
        id: &str,
        new: &NewAction,
        max_queued: usize,
    ) -> Result<Inserted, RegistryError> {
        let (uuid, p, state) = (new.device.as_str(), &new.params, new.state);
        let idempotency_key = new.idempotency_key.as_deref();
        // The id's pointer first: an action is never stored without one.
        self.ids
            .put(format!("a.{id}"), Bytes::from(uuid.to_owned()))
            .await
            .map_err(cluster)?;
        let now = now_ms();
        let record = Record {
            id: id.to_owned(),
            action: new.action.name().to_owned(),
            force: p.force,
            app_id: p.app_id,
            service_name: p.service_name.clone(),
            api_key: new.api_key.clone(),
            idempotency_key: new.idempotency_key.clone(),
            state: state.to_owned(),
            created_at_ms: now,
            expires_at_ms: now + new.ttl.as_millis() as i64,
            device_status: None,
            device_body: None,
            by: (state == "delivering").then(|| self.me.clone()),
            boot: (state == "delivering").then(|| self.boot.clone()),
        };
        self.modify(uuid, |d| {
            if let Some(k) = idempotency_key {
                if let Some(first) = d
                    .actions
                    .iter()
                    .find(|a| a.idempotency_key.as_deref() == Some(k))
                {
                    return Ok((false, Inserted::Existing(first.stored(uuid))));
                }
            }
            let waiting = d.actions.iter().filter(|a| a.state == "queued").count();
            if state == "queued" && waiting >= max_queued {
                return Err(RegistryError::QueueFull {
                    device: uuid.to_owned(),
                    limit: max_queued,
                });
            }
            if d.actions.len() >= MAX_PER_DEVICE {
                // Full of recent outcomes: the oldest finished one gives way.
                match d
                    .actions
                    .iter()
                    .position(|a| !matches!(a.state.as_str(), "queued" | "delivering"))
                {
                    Some(i) => {
                        d.actions.remove(i);
                    }
                    None => {
                        return Err(RegistryError::QueueFull {
                            device: uuid.to_owned(),
                            limit: MAX_PER_DEVICE,
                        })
                    }
                }
            }
            d.actions.push(record.clone());
            Ok((true, Inserted::New(record.stored(uuid))))
        })
        .await
    }

    /// An action by id, from any device.
    pub async fn get(&self, id: &str) -> Result<Option<StoredAction>, RegistryError> {
        let Some(uuid) = self.ids.get(format!("a.{id}")).await.map_err(cluster)? else {
            return Ok(None);
        };
        let uuid = String::from_utf8_lossy(&uuid).into_owned();
        let entry = self.store.get(key(&uuid)).await.map_err(cluster)?;
        Ok(entry
            .and_then(|b| DeviceActions::parse(&b))
            .and_then(|d| d.actions.into_iter().find(|a| a.id == id))
            .map(|a| a.stored(&uuid)))
    }

    /// Claims the device's oldest queued action still within its TTL for
    /// delivery by this gateway: (the action, its supervisor API key).
    /// `None` when there is nothing (left) to deliver, or another gateway
    /// claimed it first.
    pub async fn claim_next(
        &self,
        uuid: &str,
    ) -> Result<Option<(StoredAction, Option<String>)>, RegistryError> {
        let now = now_ms();
        self.modify(uuid, |d| {
            let next = d
                .actions
                .iter_mut()
                .filter(|a| a.state == "queued" && a.expires_at_ms > now)
                .min_by_key(|a| a.created_at_ms);
            Ok(match next {
                Some(a) => {
                    a.state = "delivering".into();
                    a.by = Some(self.me.clone());
                    a.boot = Some(self.boot.clone());
                    (true, Some((a.stored(uuid), a.api_key.clone())))
                }
                None => (false, None),
            })
        })
        .await
    }

    /// Records how a delivery this gateway claimed ended: `completed` (with
    /// the device's answer), `failed`, or `queued` again (the link went
    /// down before anything was sent).
    pub async fn settle(
        &self,
        uuid: &str,
        id: &str,
        state: &str,
        answer: Option<(u16, &Value)>,
    ) -> Result<(), RegistryError> {
        self.modify(uuid, |d| {
            let Some(a) = d.actions.iter_mut().find(|a| a.id == id) else {
                return Ok((false, ()));
            };
            a.state = state.to_owned();
            a.device_status = answer.map(|x| x.0);
            a.device_body = answer.map(|x| x.1.clone());
            if state == "queued" {
                a.by = None;
                a.boot = None;
            }
            Ok((true, ()))
        })
        .await
    }

    /// Moves every action of `uuid` in state `from` that `pick` accepts to
    /// `to`; the ones this call moved (another gateway's concurrent call
    /// gets none of them).
    async fn move_all(
        &self,
        uuid: &str,
        to: &str,
        pick: impl Fn(&Record) -> bool,
    ) -> Result<Vec<StoredAction>, RegistryError> {
        self.modify(uuid, |d| {
            let mut moved = Vec::new();
            for a in d.actions.iter_mut().filter(|a| pick(a)) {
                a.state = to.to_owned();
                moved.push(a.stored(uuid));
            }
            Ok((!moved.is_empty(), moved))
        })
        .await
    }

    /// A deleted device's queued actions fail.
    pub async fn fail_queued(&self, uuid: &str) -> Result<Vec<StoredAction>, RegistryError> {
        self.move_all(uuid, "failed", |a| a.state == "queued").await
    }

    /// Queued actions whose TTL passed, on every device, become `expired`.
    pub async fn expire_due(&self) -> Vec<StoredAction> {
        let now = now_ms();
        let due: Vec<String> = self
            .index
            .lock()
            .iter()
            .filter(|(_, s)| s.next_expiry.is_some_and(|t| t <= now))
            .map(|(u, _)| u.clone())
            .collect();
        let mut out = Vec::new();
        for uuid in due {
            match self
                .move_all(&uuid, "expired", |a| {
                    a.state == "queued" && a.expires_at_ms <= now
                })
                .await
            {
                Ok(v) => out.extend(v),
                Err(e) => {
                    tracing::debug!(device = %uuid, error = %e, "could not expire queued actions now")
                }
            }
        }
        out
    }

    /// Deliveries `gateway` had under way when it stopped or died (in the
    /// boots `boots` picks) become `unknown`.
    pub async fn interrupted(
        &self,
        gateway: &str,
        boots: impl Fn(&str) -> bool,
    ) -> Vec<StoredAction> {
        let theirs = |by: &str, boot: &str| by == gateway && boots(boot);
        let devices: Vec<String> = self
            .index
            .lock()
            .iter()
            .filter(|(_, s)| s.delivering.iter().any(|(by, boot)| theirs(by, boot)))
            .map(|(u, _)| u.clone())
            .collect();
        let mut out = Vec::new();
        for uuid in devices {
            let pick = |a: &Record| {
                a.state == "delivering"
                    && theirs(
                        a.by.as_deref().unwrap_or_default(),
                        a.boot.as_deref().unwrap_or_default(),
                    )
            };
            match self.move_all(&uuid, "unknown", pick).await {
                Ok(v) => out.extend(v),
                Err(e) => {
                    tracing::warn!(device = %uuid, error = %e, "could not mark interrupted deliveries unknown")
                }
            }
        }
        out
    }

    /// Drops an action nothing was sent for (its idempotency key may be
    /// used again).
    pub async fn forget(&self, uuid: &str, id: &str) -> Result<(), RegistryError> {
        self.modify(uuid, |d| {
            let before = d.actions.len();
            d.actions.retain(|a| a.id != id);
            Ok((d.actions.len() != before, ()))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_values_round_trip_and_foreign_ones_are_refused() {
        let d = DeviceActions {
            v: VERSION,
            actions: vec![Record {
                id: "00".repeat(12),
                action: "reboot".into(),
                force: true,
                app_id: Some(3),
                service_name: None,
                api_key: Some("k".into()),
                idempotency_key: Some("i-1".into()),
                state: "delivering".into(),
                created_at_ms: 5,
                expires_at_ms: 10,
                device_status: None,
                device_body: None,
                by: Some("gw1".into()),
                boot: Some("b".into()),
            }],
        };
        let back = DeviceActions::parse(&d.bytes()).unwrap();
        assert_eq!(back.actions, d.actions);
        assert_eq!(back.summary().delivering, vec![("gw1".into(), "b".into())]);
        assert!(DeviceActions::parse(b"{\"v\":2,\"actions\":[]}").is_none());
        assert!(DeviceActions::parse(b"\xff").is_none());
    }

    #[test]
    fn trimming_keeps_pending_actions_and_recent_outcomes() {
        let now = 100 * 24 * 3600 * 1000;
        let old = now - IDEMPOTENCY_WINDOW.as_millis() as i64 - 1;
        let rec = |state: &str, at: i64| Record {
            id: format!("{state}{at}"),
            action: "reboot".into(),
            force: false,
            app_id: None,
            service_name: None,
            api_key: None,
            idempotency_key: None,
            state: state.into(),
            created_at_ms: at,
            expires_at_ms: at,
            device_status: None,
            device_body: None,
            by: None,
            boot: None,
        };
        let mut d = DeviceActions {
            v: VERSION,
            actions: vec![
                rec("queued", old),
                rec("delivering", old),
                rec("completed", old),
                rec("completed", now),
            ],
        };
        d.trim(now);
        let states: Vec<_> = d
            .actions
            .iter()
            .map(|a| (a.state.as_str(), a.created_at_ms))
            .collect();
        assert_eq!(
            states,
            vec![("queued", old), ("delivering", old), ("completed", now)]
        );
    }
}
