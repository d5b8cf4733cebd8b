//! Routing to the gateway that holds a device (issue "Cluster mode, part
//! 2"): an action posted to any gateway reaches the device through its
//! owner.
//!
//! Actions go by NATS request/reply on the owner's subject
//! `cloudlink.gw.<gateway-id>.action`: the request carries what the caller
//! sent (device, action, query, body and the headers an action reads), the
//! reply the owner's HTTP answer (status, `X-Cloudlink-Source`, body), which
//! the first gateway gives back as it is. The owner runs the action as if it
//! had been posted to it and never forwards it again (one hop), so a stale
//! ownership view can cost an answer (`cloudlink_unavailable` from the
//! owner), never a loop. The caller was authenticated by the first gateway;
//! gateways of a cluster share the API token, and scoped tokens (issue
//! "Hold up under abuse") will travel in `by_scope`.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;

const VERSION: u32 = 1;

/// The proxy's view of the cluster: a device held by another live gateway
/// whose proxy address is known is reached through that proxy.
pub struct ProxyRoute {
    pub me: String,
    pub ownership: std::sync::Arc<super::ownership::Ownership>,
    pub lease: std::sync::Arc<super::lease::Lease>,
}

impl crate::relay::proxy::Route for ProxyRoute {
    fn held_elsewhere(&self, uuid: &str) -> Option<(String, String)> {
        let owner = self.ownership.owner(uuid)?.record.gateway;
        if owner == self.me {
            return None;
        }
        let addr = self.lease.proxy_of(&owner)?;
        Some((owner, addr))
    }
}

/// The subject a gateway answers forwarded actions on.
pub fn action_subject(gateway: &str) -> String {
    format!("cloudlink.gw.{gateway}.action")
}

/// An action forwarded to the device's owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardedAction {
    pub v: u32,
    /// The gateway that forwarded it.
    pub by: String,
    pub uuid: String,
    pub action: String,
    pub query: HashMap<String, String>,
    pub device_api_key: Option<String>,
    pub idempotency_key: Option<String>,
    /// The request body, as sent (JSON text or empty).
    pub body: String,
}

/// The owner's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardedAnswer {
    pub v: u32,
    pub status: u16,
    /// `device` or `gateway` (`X-Cloudlink-Source`).
    pub source: String,
    /// The answer's body (JSON text).
    pub body: String,
}

impl ForwardedAction {
    pub fn new(by: &str, uuid: &str, action: &str) -> Self {
        ForwardedAction {
            v: VERSION,
            by: by.to_owned(),
            uuid: uuid.to_owned(),
            action: action.to_owned(),
            query: HashMap::new(),
            device_api_key: None,
            idempotency_key: None,
            body: String::new(),
        }
    }

    /// Parses a request from another gateway; `None` for anything else.
    pub fn parse(bytes: &[u8]) -> Option<ForwardedAction> {
        serde_json::from_slice::<ForwardedAction>(bytes)
            .ok()
            .filter(|a| a.v == VERSION)
    }
}

impl ForwardedAnswer {
    pub fn new(status: u16, source: &str, body: String) -> Self {
        ForwardedAnswer {
            v: VERSION,
            status,
            source: source.to_owned(),
            body,
        }
    }

    /// Parses the owner's reply; `None` for anything else.
    pub fn parse(bytes: &[u8]) -> Option<ForwardedAnswer> {
        serde_json::from_slice::<ForwardedAnswer>(bytes)
            .ok()
            .filter(|a| a.v == VERSION && (100..=599).contains(&a.status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_refuse_other_formats() {
        let mut a = ForwardedAction::new("gw-a", "dev-1", "reboot");
        a.body = r#"{"force":true}"#.into();
        a.query.insert("queue_ttl".into(), "60".into());
        assert_eq!(
            ForwardedAction::parse(&serde_json::to_vec(&a).unwrap()),
            Some(a)
        );
        let r = ForwardedAnswer::new(202, "device", "{}".into());
        assert_eq!(
            ForwardedAnswer::parse(&serde_json::to_vec(&r).unwrap()),
            Some(r)
        );
        assert_eq!(ForwardedAction::parse(b"{}"), None);
        assert_eq!(
            ForwardedAnswer::parse(br#"{"v":1,"status":99,"source":"x","body":""}"#),
            None
        );
    }
}
