//! Queued actions: an action for an offline device, accepted with
//! `?queue_ttl=<seconds>`, kept in SQLite (so it survives a restart),
//! delivered at the device's next link-up within its TTL, and announced as
//! `action.completed`, `action.failed` or `action.expired`. Also the memory
//! of `Idempotency-Key`s (per device, 24 h), for immediate actions too.
//!
//! States: `queued` → `delivering` → `completed` (the device answered, with
//! whatever status) or `failed` (delivery failed: refused, timed out, not
//! HTTP); `queued` → `expired` once its TTL passed. A delivery that found
//! the link down again (nothing sent) goes back to `queued`. A delivery cut
//! short by the gateway stopping or dying becomes `unknown`, never `queued`:
//! it may have reached the device, and an action is delivered at most once.
//!
//! In cluster mode the records live in NATS (`cluster::actions`), shared by
//! every gateway: whichever gateway the device links up on claims each
//! queued action with a compare-and-set before delivering it.

use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{json, Value};
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::actions::{deliver_counted, supervisor_call, Action, DeliveryError, Params};
use crate::bus::event::{ActionOutcome, Event};
use crate::bus::EventBus;
pub use crate::cluster::actions::Inserted;
use crate::cluster::actions::SharedActions;
use crate::registry::{now_ms, Registry, RegistryError};
use crate::relay::Relay;

/// How long an `Idempotency-Key` is remembered.
pub const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// One action as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredAction {
    pub id: String,
    pub device: String,
    pub action: String,
    pub params: Params,
    pub state: String,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    pub device_status: Option<u16>,
    pub device_body: Option<Value>,
}

impl StoredAction {
    pub fn to_json(&self) -> Value {
        let t = |ms: i64| {
            crate::bus::event::rfc3339(std::time::UNIX_EPOCH + Duration::from_millis(ms as u64))
        };
        json!({
            "id": self.id,
            "device": self.device,
            "action": self.action,
            "state": self.state,
            "device_status": self.device_status,
            "device_body": self.device_body,
            "created_at": t(self.created_at_ms),
            "expires_at": t(self.expires_at_ms),
        })
    }
}

/// An action to store: for whom, what, and in which state (`queued`, or
/// `delivering` for an immediate one with an idempotency key, recorded
/// before it is sent).
#[derive(Debug, Clone)]
pub struct NewAction {
    pub device: String,
    pub action: Action,
    pub params: Params,
    /// The device's supervisor API key, for a queued action.
    pub api_key: Option<String>,
    pub state: &'static str,
    pub ttl: Duration,
    pub idempotency_key: Option<String>,
}

pub struct ActionQueue {
    conn: Mutex<Connection>,
    metrics: Arc<crate::metrics::Metrics>,
    events: Arc<dyn EventBus>,
    relay: Weak<Relay>,
    timeout: Duration,
    /// Cluster mode: the records are the cluster's.
    shared: std::sync::OnceLock<Arc<SharedActions>>,
    /// Queued actions one device may have waiting.
    max_queued: usize,
    /// Devices that may have queued actions (standalone mode): every device
    /// with a `queued` row is here, so a link-up of any other device costs
    /// a set lookup instead of a task, a blocking thread and a query (a
    /// storm of 50,000: 234 and 272 µs of gateway CPU a handshake with the
    /// query at every link-up, 213 and 225 with this set). A device enters
    /// right after a write that queues one of its actions and leaves only
    /// when a look under the connection's lock finds none queued: the lock
    /// orders the two, so a device with a queued action is never left out.
    waiting: dashmap::DashSet<String>,
}

/// Finished actions are kept this long (for `GET /v1/actions/{id}`; a
/// queue TTL is at most 7 days), then pruned.
pub const RETENTION: Duration = Duration::from_secs(8 * 24 * 3600);

const COLUMNS: &str = "id, device, action, force, app_id, service_name, state, created_at, expires_at, device_status, device_body";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredAction> {
    Ok(StoredAction {
        id: r.get(0)?,
        device: r.get(1)?,
        action: r.get(2)?,
        params: Params {
            force: r.get(3)?,
            app_id: r.get::<_, Option<i64>>(4)?.map(|v| v as u32),
            service_name: r.get(5)?,
        },
        state: r.get(6)?,
        created_at_ms: r.get(7)?,
        expires_at_ms: r.get(8)?,
        device_status: r.get::<_, Option<i64>>(9)?.map(|v| v as u16),
        device_body: r
            .get::<_, Option<String>>(10)?
            .map(|s| serde_json::from_str(&s).unwrap_or(Value::String(s))),
    })
}

pub fn new_id() -> String {
    let mut b = [0u8; 12];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl ActionQueue {
    pub fn open(
        registry: &Registry,
        events: Arc<dyn EventBus>,
        metrics: Arc<crate::metrics::Metrics>,
        relay: Weak<Relay>,
        timeout: Duration,
        max_queued: usize,
    ) -> Result<Self, RegistryError> {
        // The registry opened the file first and brought its schema (this
        // table's too) up to date.
        let conn = crate::registry::open_conn(registry.path(), false)?;
        // A delivery cut short by a stop may have reached the device: it is
        // never sent again.
        conn.execute(
            "UPDATE actions SET state = 'unknown' WHERE state = 'delivering'",
            [],
        )?;
        let waiting = dashmap::DashSet::new();
        {
            let mut st =
                conn.prepare("SELECT DISTINCT device FROM actions WHERE state = 'queued'")?;
            for d in st.query_map([], |r| r.get::<_, String>(0))? {
                waiting.insert(d?);
            }
        }
        Ok(ActionQueue {
            waiting,
            conn: Mutex::new(conn),
            metrics,
            events,
            relay,
            timeout,
            shared: std::sync::OnceLock::new(),
            max_queued,
        })
    }

    /// Cluster mode: from now on the records are the cluster's. Deliveries
    /// a previous boot of this gateway left half done become `unknown`.
    pub fn set_shared(self: &Arc<Self>, shared: Arc<SharedActions>) {
        let _ = self.shared.set(shared.clone());
        let q = self.clone();
        tokio::spawn(async move {
            shared.wait_synced(Duration::from_secs(30)).await;
            q.announce_interrupted(shared.interrupted_here().await);
        });
    }

    /// A dead gateway's deliveries under way become `unknown` (the survivor
    /// that reaped it calls this).
    pub async fn gateway_lost(self: Arc<Self>, gateway: String, boot: String) {
        if let Some(shared) = self.shared.get() {
            let moved = shared.interrupted(&gateway, |b| b == boot).await;
            self.announce_interrupted(moved);
        }
    }

    fn announce_interrupted(&self, moved: Vec<StoredAction>) {
        for a in moved {
            tracing::warn!(device = %a.device, action = %a.action, id = %a.id, "a delivery was cut short by a gateway stopping: its outcome is unknown and it is not sent again");
            self.metrics.action(&a.action, "unknown");
            self.publish(&a, Event::ActionFailed, "delivery_interrupted");
        }
    }

    /// The action a device already got under this idempotency key (within
    /// 24 h), if any; from the cluster in cluster mode.
    pub async fn find_idempotent(
        self: &Arc<Self>,
        device: &str,
        key: &str,
    ) -> Result<Option<StoredAction>, RegistryError> {
        if let Some(shared) = self.shared.get() {
            return shared.by_idempotency_key(device, key).await;
        }
        let (q, d, k) = (self.clone(), device.to_owned(), key.to_owned());
        unblock(move || q.by_idempotency_key(&d, &k)).await
    }

    /// Stores `new`, unless its device already got an action under the same
    /// idempotency key: then that one.
    pub async fn add(self: &Arc<Self>, new: NewAction) -> Result<Inserted, RegistryError> {
        let id = new_id();
        if let Some(shared) = self.shared.get() {
            return shared.insert(&id, &new, self.max_queued).await;
        }
        let q = self.clone();
        unblock(move || q.insert(&id, &new)).await
    }

    /// An action by id.
    pub async fn lookup(self: &Arc<Self>, id: &str) -> Result<Option<StoredAction>, RegistryError> {
        if let Some(shared) = self.shared.get() {
            return shared.get(id).await;
        }
        let (q, id) = (self.clone(), id.to_owned());
        unblock(move || q.get(&id)).await
    }

    /// Records the outcome of a delivery: `completed` with the device's
    /// answer, `failed`, `queued` again; `None` forgets the action (nothing
    /// was sent: its idempotency key may be used again).
    pub async fn settle(
        self: &Arc<Self>,
        device: &str,
        id: &str,
        state: Option<&str>,
        answer: Option<(u16, &Value)>,
    ) -> Result<(), RegistryError> {
        if let Some(shared) = self.shared.get() {
            return match state {
                Some(st) => shared.settle(device, id, st, answer).await,
                None => shared.forget(device, id).await,
            };
        }
        let (q, id, st) = (self.clone(), id.to_owned(), state.map(str::to_owned));
        let answer = answer.map(|(s, b)| (s, b.clone()));
        let device = device.to_owned();
        unblock(move || match st {
            Some(st) => {
                q.set_state(&id, &st, answer.as_ref().map(|(s, b)| (*s, b)))?;
                if st == "queued" {
                    q.waiting.insert(device);
                }
                Ok(())
            }
            None => {
                q.conn
                    .lock()
                    .execute("DELETE FROM actions WHERE id = ?1", [&id])?;
                Ok(())
            }
        })
        .await
    }

    /// The action a device already got under this idempotency key (within
    /// 24 h), if any.
    fn by_idempotency_key(
        &self,
        device: &str,
        key: &str,
    ) -> Result<Option<StoredAction>, RegistryError> {
        let since = now_ms() - IDEMPOTENCY_WINDOW.as_millis() as i64;
        let c = self.conn.lock();
        let mut st = c.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM actions WHERE device = ?1 AND idempotency_key = ?2 AND created_at >= ?3"
        ))?;
        Ok(st.query_row(params![device, key, since], row).optional()?)
    }

    fn get(&self, id: &str) -> Result<Option<StoredAction>, RegistryError> {
        let c = self.conn.lock();
        let mut st = c.prepare_cached(&format!("SELECT {COLUMNS} FROM actions WHERE id = ?1"))?;
        Ok(st.query_row([id], row).optional()?)
    }

    /// Stores an action in `state` unless the device got one under the same
    /// idempotency key within 24 h (checked under the same lock: two
    /// concurrent requests never both store one). Committed before it
    /// returns.
    fn insert(&self, id: &str, new: &NewAction) -> Result<Inserted, RegistryError> {
        let NewAction {
            device,
            action,
            params: p,
            api_key,
            state,
            ttl,
            idempotency_key,
        } = new;
        let (device, api_key, idempotency_key) = (
            device.as_str(),
            api_key.as_deref(),
            idempotency_key.as_deref(),
        );
        let (action, state, ttl) = (*action, *state, *ttl);
        let now = now_ms();
        let expires = now + ttl.as_millis() as i64;
        let c = self.conn.lock();
        if let Some(k) = idempotency_key {
            let since = now - IDEMPOTENCY_WINDOW.as_millis() as i64;
            let mut st = c.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM actions WHERE device = ?1 AND idempotency_key = ?2 AND created_at >= ?3"
            ))?;
            if let Some(first) = st.query_row(params![device, k, since], row).optional()? {
                return Ok(Inserted::Existing(first));
            }
            // An old use of the same key (past the window) gives way.
            c.execute(
                "UPDATE actions SET idempotency_key = NULL WHERE device = ?1 AND idempotency_key = ?2",
                params![device, k],
            )?;
        }
        if state == "queued" {
            let waiting: i64 = c.query_row(
                "SELECT COUNT(*) FROM actions WHERE device = ?1 AND state = 'queued'",
                [device],
                |r| r.get(0),
            )?;
            if waiting as usize >= self.max_queued {
                return Err(RegistryError::QueueFull {
                    device: device.to_owned(),
                    limit: self.max_queued,
                });
            }
        }
        c.execute(
            "INSERT INTO actions (id, device, action, force, app_id, service_name, api_key, state, created_at, expires_at, device_status, device_body, idempotency_key)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, NULL, NULL, ?11)",
            params![
                id,
                device,
                action.name(),
                p.force,
                p.app_id.map(|v| v as i64),
                p.service_name,
                api_key,
                state,
                now,
                expires,
                idempotency_key
            ],
        )?;
        if state == "queued" {
            self.waiting.insert(device.to_owned());
        }
        drop(c);
        Ok(Inserted::New(self.get(id)?.expect("just inserted")))
    }

    fn set_state(
        &self,
        id: &str,
        state: &str,
        answer: Option<(u16, &Value)>,
    ) -> Result<(), RegistryError> {
        self.conn.lock().execute(
            "UPDATE actions SET state = ?2, device_status = ?3, device_body = ?4 WHERE id = ?1",
            params![
                id,
                state,
                answer.map(|a| a.0 as i64),
                answer.map(|a| a.1.to_string())
            ],
        )?;
        Ok(())
    }

    fn queued_for(
        &self,
        device: &str,
    ) -> Result<Vec<(StoredAction, Option<String>)>, RegistryError> {
        let c = self.conn.lock();
        let mut st = c.prepare_cached(&format!(
            "SELECT {COLUMNS}, api_key FROM actions WHERE device = ?1 AND state = 'queued' ORDER BY created_at"
        ))?;
        let rows = st.query_map([device], |r| Ok((row(r)?, r.get::<_, Option<String>>(11)?)))?;
        let rows: Vec<_> = rows.collect::<Result<_, _>>()?;
        if rows.is_empty() {
            // Still under the lock every write that queues takes.
            self.waiting.remove(device);
        }
        Ok(rows)
    }

    /// Whether a link-up of `device` must look for queued actions: always
    /// in cluster mode (another gateway may have queued them), otherwise
    /// only if the device is in `waiting`.
    pub fn may_have_queued(&self, device: &str) -> bool {
        self.shared.get().is_some() || self.waiting.contains(device)
    }

    fn publish(&self, a: &StoredAction, kind: fn(ActionOutcome) -> Event, reason: &str) {
        let outcome = ActionOutcome {
            // Where the device is now (`null`: no session here).
            endpoint: self.relay.upgrade().and_then(|r| r.endpoint_of(&a.device)),
            reason: reason.to_owned(),
            action_id: a.id.clone(),
            action: a.action.clone(),
            state: a.state.clone(),
            device_status: a.device_status,
        };
        self.events
            .publish(Some(&a.device), kind(outcome), std::time::SystemTime::now());
    }

    /// Delivers the device's queued actions, oldest first (at link-up).
    pub async fn deliver_queued(self: Arc<Self>, device: String) {
        if let Some(shared) = self.shared.get().cloned() {
            return self.deliver_claimed(&shared, device).await;
        }
        let q = self.clone();
        let d = device.clone();
        let pending = match tokio::task::spawn_blocking(move || q.queued_for(&d)).await {
            Ok(Ok(p)) => p,
            _ => return,
        };
        for (a, key) in pending {
            if a.expires_at_ms <= now_ms() {
                continue; // the expiry task announces it
            }
            let _ = self.set_state(&a.id, "delivering", None);
            if !self.deliver_one(&device, a, key).await {
                return;
            }
        }
    }

    /// Cluster mode: claims the device's queued actions one at a time, each
    /// with a compare-and-set, and delivers what it won.
    async fn deliver_claimed(self: Arc<Self>, shared: &SharedActions, device: String) {
        loop {
            match shared.claim_next(&device).await {
                Ok(Some((a, key))) => {
                    if !self.deliver_one(&device, a, key).await {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(device = %device, error = %e, "could not claim queued actions");
                    return;
                }
            }
        }
    }

    /// Delivers one claimed action and records the outcome; false when the
    /// link went down (the rest wait for the next link-up).
    async fn deliver_one(
        self: &Arc<Self>,
        device: &str,
        a: StoredAction,
        key: Option<String>,
    ) -> bool {
        let Some(relay) = self.relay.upgrade() else {
            return false;
        };
        let parsed = Action::parse(&a.action)
            .and_then(|action| Some((action, supervisor_call(action, &a.params).ok()?)));
        let Some((action, (path, body))) = parsed else {
            let _ = self.settle(device, &a.id, Some("failed"), None).await;
            return true;
        };
        let result = deliver_counted(
            &relay,
            &self.metrics,
            device,
            action,
            (&path, &body),
            key.as_deref(),
            self.timeout,
            true,
        )
        .await;
        let mut done = a.clone();
        match result {
            Ok(answer) => {
                let _ = self
                    .settle(
                        device,
                        &a.id,
                        Some("completed"),
                        Some((answer.status, &answer.body)),
                    )
                    .await;
                done.state = "completed".into();
                done.device_status = Some(answer.status);
                self.publish(&done, Event::ActionCompleted, "delivered");
                true
            }
            Err(DeliveryError::Unavailable | DeliveryError::Busy(_)) => {
                // The link went down again, or the device has all the
                // streams it may: nothing was sent; wait for the next
                // link-up.
                let _ = self.settle(device, &a.id, Some("queued"), None).await;
                false
            }
            Err(e) => {
                let _ = self.settle(device, &a.id, Some("failed"), None).await;
                done.state = "failed".into();
                tracing::warn!(device = %device, action = %a.action, error = %e, "queued action failed");
                self.publish(&done, Event::ActionFailed, &e.to_string());
                true
            }
        }
    }

    /// A deleted device's queued actions fail (`device_deleted`): they must
    /// never reach a device registered later under the same uuid. The fleet
    /// reactor calls it on `device.deleted`.
    pub async fn device_deleted(self: Arc<Self>, device: String) {
        if let Some(shared) = self.shared.get() {
            // Every gateway hears of the deletion; the compare-and-set gives
            // each action to one of them.
            match shared.fail_queued(&device).await {
                Ok(list) => {
                    for a in list {
                        self.metrics.action(&a.action, "failed");
                        self.publish(&a, Event::ActionFailed, "device_deleted");
                    }
                }
                Err(e) => {
                    tracing::warn!(device = %device, error = %e, "could not fail a deleted device's queued actions")
                }
            }
            return;
        }
        let q = self.clone();
        let failed = tokio::task::spawn_blocking(move || -> Result<Vec<StoredAction>, RegistryError> {
            let c = q.conn.lock();
            let mut st = c.prepare_cached(&format!(
                "UPDATE actions SET state = 'failed' WHERE device = ?1 AND state = 'queued' RETURNING {COLUMNS}"
            ))?;
            let rows = st.query_map([&device], row)?;
            let rows = rows.collect::<Result<_, _>>()?;
            q.waiting.remove(&device);
            Ok(rows)
        })
        .await;
        match failed {
            Ok(Ok(list)) => {
                for a in list {
                    self.metrics.action(&a.action, "failed");
                    self.publish(&a, Event::ActionFailed, "device_deleted");
                }
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "could not fail a deleted device's queued actions")
            }
            Err(e) => tracing::error!(error = %e, "queued-action cleanup task failed"),
        }
    }

    /// Marks queued actions whose TTL passed as expired, announcing each;
    /// runs every second until `stop`.
    pub async fn run_expiry(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => return,
            }
            if let Some(shared) = self.shared.get() {
                for a in shared.expire_due().await {
                    self.metrics.action(&a.action, "expired");
                    self.publish(&a, Event::ActionExpired, "ttl_passed");
                }
                continue;
            }
            let q = self.clone();
            let expired = tokio::task::spawn_blocking(move || -> Result<Vec<StoredAction>, RegistryError> {
                let c = q.conn.lock();
                // Finished actions past the retention go (a few at a time:
                // this runs every second).
                c.execute(
                    "DELETE FROM actions WHERE rowid IN (SELECT rowid FROM actions WHERE created_at < ?1 AND state NOT IN ('queued', 'delivering') LIMIT 1000)",
                    [now_ms() - RETENTION.as_millis() as i64],
                )?;
                let mut st = c.prepare_cached(&format!(
                    "UPDATE actions SET state = 'expired' WHERE state = 'queued' AND expires_at <= ?1 RETURNING {COLUMNS}"
                ))?;
                let rows = st.query_map([now_ms()], row)?;
                let rows: Vec<StoredAction> = rows.collect::<Result<_, _>>()?;
                // A device whose last queued action expired leaves
                // `waiting` (it may never link up again to leave it).
                let mut left = c.prepare_cached(
                    "SELECT 1 FROM actions WHERE device = ?1 AND state = 'queued' LIMIT 1",
                )?;
                for a in &rows {
                    if !left.exists([&a.device])? {
                        q.waiting.remove(&a.device);
                    }
                }
                Ok(rows)
            })
            .await;
            if let Ok(Ok(list)) = expired {
                for a in list {
                    self.metrics.action(&a.action, "expired");
                    self.publish(&a, Event::ActionExpired, "ttl_passed");
                }
            }
        }
    }
}

/// Runs blocking SQLite work off the async workers.
async fn unblock<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RegistryError> + Send + 'static,
) -> Result<T, RegistryError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RegistryError::Task(e.to_string()))?
}

/// Starts delivering a device's queued actions when its link comes up.
pub struct QueueObserver {
    pub queue: Arc<ActionQueue>,
    /// The packet path calls observers from its own threads.
    pub runtime: tokio::runtime::Handle,
}

impl crate::packet_path::LinkObserver for QueueObserver {
    fn link_changed(
        &self,
        session: &crate::session_table::Session,
        up: bool,
        _endpoint: std::net::SocketAddr,
        _down: Option<crate::link_state::DownReason>,
    ) {
        // Called with the session locked: only hand the work off, and only
        // for a device that may have some (a storm's link-ups are almost
        // all devices with none).
        if up && self.queue.may_have_queued(&session.uuid) {
            self.runtime
                .spawn(self.queue.clone().deliver_queued(session.uuid.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::RingBus;
    use crate::registry::AddressPlan;

    fn open(dir: &std::path::Path) -> Arc<ActionQueue> {
        let plan = AddressPlan::new("10.240.0.0/12".parse().unwrap()).unwrap();
        let registry = Registry::open(dir, plan).unwrap();
        let events: Arc<dyn EventBus> = Arc::new(RingBus::new("t".into(), "gw".into(), 100));
        let metrics = Arc::new(crate::metrics::Metrics::new());
        Arc::new(
            ActionQueue::open(
                &registry,
                events,
                metrics,
                Weak::new(),
                Duration::from_secs(5),
                10,
            )
            .unwrap(),
        )
    }

    fn action(device: &str, state: &'static str) -> NewAction {
        NewAction {
            device: device.into(),
            action: Action::Reboot,
            params: Params::default(),
            api_key: None,
            state,
            ttl: Duration::from_secs(300),
            idempotency_key: None,
        }
    }

    /// Link-ups skip the query for devices with nothing queued; every way
    /// an action becomes queued (stored, re-queued, found at start) puts
    /// its device back in the set.
    #[tokio::test]
    async fn only_devices_with_queued_actions_are_looked_up_at_link_up() {
        let dir = tempfile::tempdir().unwrap();
        let q = open(dir.path());
        let Inserted::New(a) = q.add(action("a", "queued")).await.unwrap() else {
            panic!("not stored")
        };
        q.add(action("b", "delivering")).await.unwrap();
        assert!(q.may_have_queued("a"));
        assert!(!q.may_have_queued("b"), "an immediate action is not queued");
        assert!(!q.may_have_queued("c"));

        // A new boot finds it in the store.
        drop(q);
        let q = open(dir.path());
        assert!(q.may_have_queued("a"));
        assert!(!q.may_have_queued("b"));

        // Delivered: the next look finds nothing and the device leaves.
        q.settle("a", &a.id, Some("completed"), None).await.unwrap();
        assert!(q.queued_for("a").unwrap().is_empty());
        assert!(!q.may_have_queued("a"));

        // Put back (the link went down during the delivery): in again.
        q.settle("a", &a.id, Some("queued"), None).await.unwrap();
        assert!(q.may_have_queued("a"));
        assert_eq!(q.queued_for("a").unwrap().len(), 1);
        assert!(q.may_have_queued("a"), "still queued: stays");

        // Deleted device: its queued actions fail, it leaves.
        q.clone().device_deleted("a".into()).await;
        assert!(!q.may_have_queued("a"));
    }
}
