//! The events the gateway publishes, as one typed enum. Producers build
//! values; the bus serialises them once, at its edge, into the JSON that
//! `GET /v1/events` sends (`type` plus the variant's fields, beside the
//! envelope's `id`, `epoch`, `device`, `at` and `gateway`). In-process
//! subscribers (the fleet reactor) read the values, never the JSON.

use serde::Serialize;
use std::sync::Arc;

/// Times on the wire: RFC 3339 in UTC with milliseconds, as events and the
/// API write them.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type")]
pub enum Event {
    #[serde(rename = "link.up")]
    LinkUp(Link),
    #[serde(rename = "link.down")]
    LinkDown(Link),
    #[serde(rename = "link.roamed")]
    LinkRoamed(Link),
    #[serde(rename = "link.moved")]
    LinkMoved(Moved),
    #[serde(rename = "status.changed")]
    StatusChanged(StatusChanged),
    #[serde(rename = "action.completed")]
    ActionCompleted(ActionOutcome),
    #[serde(rename = "action.failed")]
    ActionFailed(ActionOutcome),
    #[serde(rename = "action.expired")]
    ActionExpired(ActionOutcome),
    #[serde(rename = "device.registered")]
    DeviceRegistered(DeviceRegistered),
    #[serde(rename = "device.updated")]
    DeviceUpdated(DeviceUpdated),
    #[serde(rename = "device.deleted")]
    DeviceDeleted(DeviceDeleted),
    #[serde(rename = "audit.relay")]
    AuditRelay(Audit),
    #[serde(rename = "audit.action")]
    AuditAction(Audit),
    #[serde(rename = "audit.device")]
    AuditDevice(Audit),
    #[serde(rename = "audit.token")]
    AuditToken(Audit),
}

impl Event {
    /// A device-lifecycle event (`device.*`).
    pub fn is_device_lifecycle(&self) -> bool {
        matches!(
            self,
            Event::DeviceRegistered(_) | Event::DeviceUpdated(_) | Event::DeviceDeleted(_)
        )
    }

    /// The `type` field, as metrics label it.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::LinkUp(_) => "link.up",
            Event::LinkDown(_) => "link.down",
            Event::LinkRoamed(_) => "link.roamed",
            Event::LinkMoved(_) => "link.moved",
            Event::StatusChanged(_) => "status.changed",
            Event::ActionCompleted(_) => "action.completed",
            Event::ActionFailed(_) => "action.failed",
            Event::ActionExpired(_) => "action.expired",
            Event::DeviceRegistered(_) => "device.registered",
            Event::DeviceUpdated(_) => "device.updated",
            Event::DeviceDeleted(_) => "device.deleted",
            Event::AuditRelay(_) => "audit.relay",
            Event::AuditAction(_) => "audit.action",
            Event::AuditDevice(_) => "audit.device",
            Event::AuditToken(_) => "audit.token",
        }
    }
}

/// `audit.*` (`crate::audit`): who (the token's id; `null` for the
/// bootstrap token) did what; the record's own fields beside.
#[derive(Debug, Clone, Serialize)]
pub struct Audit {
    pub token_id: Option<String>,
    #[serde(flatten)]
    pub detail: serde_json::Map<String, serde_json::Value>,
}

/// `link.*`: the device's endpoint, why, and its tunnel address.
#[derive(Debug, Clone, Serialize)]
pub struct Link {
    pub endpoint: String,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_endpoint: Option<String>,
    pub address: String,
    /// `link.roamed`: endpoint changes this event stands for (more than 1
    /// when a device roamed again within the second after the last one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roams: Option<u32>,
}

/// `link.moved` (cluster mode): the device's link came up on gateway `to`
/// while gateway `from` held it (a load balancer moved it, it roamed). Its
/// link never went down: `from` dropped its session without a `link.down`.
#[derive(Debug, Clone, Serialize)]
pub struct Moved {
    pub from: String,
    pub to: String,
    pub endpoint: String,
    /// Its endpoint as `from` knew it.
    pub previous_endpoint: String,
    pub reason: String,
    pub address: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct StatusName {
    pub status: &'static str,
    pub detail: Option<&'static str>,
}

/// `status.changed`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusChanged {
    /// The device's current endpoint (`null` without a session).
    pub endpoint: Option<String>,
    /// What caused the change.
    pub reason: String,
    pub from: StatusName,
    pub to: StatusName,
    pub heartbeat: &'static str,
    pub cloudlink: bool,
}

/// `action.*`: a queued action's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct ActionOutcome {
    pub endpoint: Option<String>,
    pub reason: String,
    pub action_id: String,
    pub action: String,
    pub state: String,
    pub device_status: Option<u16>,
}

/// A device as the fleet reactor needs it (for the directory and the
/// status tracker). In-process only: never serialised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRef {
    pub uuid: String,
    pub public_key: crate::keys::KeyBytes,
    pub address: std::net::Ipv4Addr,
}

/// `device.registered`: one device (`device` names it, with its address
/// and name) or a batch (`device` is null; only the count goes on the wire,
/// in-process subscribers get the list).
#[derive(Debug, Clone, Serialize)]
pub struct DeviceRegistered {
    pub count: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip)]
    pub devices: Arc<[DeviceRef]>,
}

/// `device.updated`: which settings changed (the new values are on
/// `GET /v1/devices/{uuid}`; a device API key is never echoed).
#[derive(Debug, Clone, Serialize)]
pub struct DeviceUpdated {
    pub changed: Vec<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloudlink_enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub poll_interval_s: Option<Option<u32>>,
    /// The device's own bandwidth limit, kbit/s (`null`: back to the
    /// gateway's default), when it changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit_kbps: Option<Option<u32>>,
    /// The new key, after a key change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// The key before a key change (in-process: the reactor takes it out of
    /// the directory).
    #[serde(skip)]
    pub previous_key: Option<crate::keys::KeyBytes>,
    /// The device's address (in-process, for the directory).
    #[serde(skip)]
    pub address: std::net::Ipv4Addr,
}

/// `device.deleted`: the registration is gone; its session is cut off.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceDeleted {
    pub address: String,
    #[serde(skip)]
    pub public_key: crate::keys::KeyBytes,
}
