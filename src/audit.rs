//! The audit trail (issue "Hold up under abuse"): who opened a shell on
//! which device, who rebooted it, who deleted it, who issued or revoked a
//! token. Each is a stored record (SQLite table `audit`, kept
//! `--audit-retention`, 30 days by default) and an event (`audit.relay`,
//! `audit.action`, `audit.device`, `audit.token`) on the stream.
//!
//! - `audit.relay`: token id, device, port, start, end, bytes each way, why
//!   it ended (`closed`: the ends closed it; `ended`: the gateway ended it,
//!   at a link-down, a deletion or a stop);
//! - `audit.action`: token id, device, action, the answer's status and who
//!   gave it (`device` or `gateway`);
//! - `audit.device`: token id, device, `deleted`;
//! - `audit.token`: token id of the admin, the token made or revoked.
//!
//! Records are written off the async workers and never fail the request
//! they describe (a failed write is logged). In cluster mode the records
//! are the cluster's (`cluster::audit`: a JetStream stream every gateway
//! reads), and each gateway keeps its own in SQLite besides.

use parking_lot::Mutex;
use rusqlite::params;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Duration;

use crate::bus::event::{Audit as AuditEvent, Event};
use crate::bus::EventBus;
use crate::registry::{now_ms, Registry, RegistryError};

/// What a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Relay,
    Action,
    Device,
    Token,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Relay => "audit.relay",
            Kind::Action => "audit.action",
            Kind::Device => "audit.device",
            Kind::Token => "audit.token",
        }
    }
}

pub struct AuditTrail {
    conn: Arc<Mutex<rusqlite::Connection>>,
    events: Arc<dyn EventBus>,
    retention: Duration,
    /// Cluster mode: the shared trail.
    shared: std::sync::OnceLock<Arc<crate::cluster::audit::SharedAudit>>,
}

/// Longest page of `GET /v1/audit`.
pub const MAX_PAGE: usize = 1000;

impl AuditTrail {
    pub fn open(
        registry: &Registry,
        events: Arc<dyn EventBus>,
        retention: Duration,
    ) -> Result<AuditTrail, RegistryError> {
        let conn = crate::registry::open_conn(registry.path(), false)?;
        Ok(AuditTrail {
            conn: Arc::new(Mutex::new(conn)),
            events,
            retention,
            shared: Default::default(),
        })
    }

    /// Cluster mode: records are shared through `shared` from now on.
    pub fn share(&self, shared: crate::cluster::audit::SharedAudit) {
        let _ = self.shared.set(Arc::new(shared));
    }

    /// The shared trail, in cluster mode.
    pub fn shared(&self) -> Option<Arc<crate::cluster::audit::SharedAudit>> {
        self.shared.get().cloned()
    }

    pub fn retention(&self) -> Duration {
        self.retention
    }

    /// Records `kind` done with `token_id`'s token on `device`; `detail` is
    /// the record's own fields. Returns at once.
    pub fn record(
        &self,
        kind: Kind,
        token_id: Option<&str>,
        device: Option<&str>,
        detail: Map<String, Value>,
    ) {
        let at = now_ms();
        let event = AuditEvent {
            token_id: token_id.map(str::to_owned),
            detail: detail.clone(),
        };
        let event = match kind {
            Kind::Relay => Event::AuditRelay(event),
            Kind::Action => Event::AuditAction(event),
            Kind::Device => Event::AuditDevice(event),
            Kind::Token => Event::AuditToken(event),
        };
        self.events
            .publish(device, event, std::time::SystemTime::now());
        if let Some(shared) = self.shared.get() {
            let mut r = Map::new();
            r.insert("at_ms".into(), at.into());
            r.insert("type".into(), kind.as_str().into());
            r.insert("token_id".into(), json!(token_id));
            r.insert("device".into(), json!(device));
            r.insert("detail".into(), Value::Object(detail.clone()));
            shared.publish(device, r);
        }
        let conn = self.conn.clone();
        let (token_id, device) = (token_id.map(str::to_owned), device.map(str::to_owned));
        let text = Value::Object(detail).to_string();
        let write = move || {
            conn.lock().execute(
                "INSERT INTO audit (at, kind, token_id, device, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![at, kind.as_str(), token_id, device, text],
            )
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(move || {
                    if let Err(e) = write() {
                        tracing::error!(error = %e, "could not store an audit record");
                    }
                });
            }
            Err(_) => {
                if let Err(e) = write() {
                    tracing::error!(error = %e, "could not store an audit record");
                }
            }
        }
    }

    /// Records at or after `since_ms` (of `device`), oldest first, at most
    /// `limit`.
    pub fn query(
        &self,
        device: Option<&str>,
        since_ms: i64,
        limit: usize,
    ) -> Result<Vec<Value>, RegistryError> {
        let c = self.conn.lock();
        let mut st = c.prepare_cached(
            "SELECT id, at, kind, token_id, device, detail FROM audit
             WHERE at >= ?1 AND (?2 IS NULL OR device = ?2) ORDER BY at, id LIMIT ?3",
        )?;
        let rows = st.query_map(params![since_ms, device, limit as i64], |r| {
            let at: i64 = r.get(1)?;
            let detail: String = r.get(5)?;
            Ok(json!({
                "id": r.get::<_, i64>(0)?,
                "at": crate::bus::event::rfc3339(
                    std::time::UNIX_EPOCH + Duration::from_millis(at.max(0) as u64)
                ),
                "type": r.get::<_, String>(2)?,
                "token_id": r.get::<_, Option<String>>(3)?,
                "device": r.get::<_, Option<String>>(4)?,
                "detail": serde_json::from_str::<Value>(&detail).unwrap_or(Value::String(detail)),
            }))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Drops records older than the retention; runs until `stop`.
    pub async fn run_retention(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let horizon = now_ms() - me.retention.as_millis() as i64;
                me.conn
                    .lock()
                    .execute("DELETE FROM audit WHERE at < ?1", [horizon])
            })
            .await;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(600)) => {}
                _ = stop.changed() => return,
            }
        }
    }
}

/// A JSON object from pairs, for records.
#[macro_export]
macro_rules! audit_detail {
    ($($k:literal => $v:expr),* $(,)?) => {{
        let mut m = serde_json::Map::new();
        $( m.insert($k.to_owned(), serde_json::json!($v)); )*
        m
    }};
}
