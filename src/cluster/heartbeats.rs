//! Heartbeats cluster-wide: a heartbeat posted to any gateway counts on all.
//!
//! The gateway that takes a heartbeat applies it at once and publishes
//! `{uuid, at_ms, gateway}` on the core NATS subject `cloudlink.heartbeats`
//! (no stream: a heartbeat is worth something only until the next one);
//! every other gateway applies it to its own status tracker and persists it
//! with its own heartbeat times. The gateway that took it announces any
//! status change (`status.changed`) cluster-wide, the others apply it
//! quietly; it also announces the expiry if no heartbeat follows.
//!
//! Cost: one small message per heartbeat (about 1,100 a second for
//! 1,000,000 devices polling every 15 minutes). A heartbeat taken while
//! NATS is unreachable is not shared: the other gateways learn of the
//! device's next one.

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

const SUBJECT: &str = "cloudlink.heartbeats";
const VERSION: u32 = 1;
/// Heartbeats waiting to be published; beyond this they are not shared.
const QUEUE: usize = 65_536;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heard {
    pub v: u32,
    pub uuid: String,
    pub at_ms: u64,
    pub gateway: String,
}

impl Heard {
    /// Parses a message from another gateway; `None` for anything else.
    pub fn parse(bytes: &[u8]) -> Option<Heard> {
        serde_json::from_slice::<Heard>(bytes)
            .ok()
            .filter(|h| h.v == VERSION)
    }
}

/// Shares this gateway's heartbeats and applies the others'.
pub fn share(
    client: async_nats::Client,
    me: String,
    status: &Arc<crate::status::service::DeviceStatus>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Heard>(QUEUE);
    {
        let me = me.clone();
        status.join_cluster(move |uuid, at_ms| {
            let _ = tx.try_send(Heard {
                v: VERSION,
                uuid: uuid.to_owned(),
                at_ms,
                gateway: me.clone(),
            });
        });
    }
    let publisher = client.clone();
    tokio::spawn(async move {
        while let Some(h) = rx.recv().await {
            let payload = serde_json::to_vec(&h).unwrap_or_default();
            if let Err(e) = publisher.publish(SUBJECT, payload.into()).await {
                tracing::debug!(error = %e, "could not share a heartbeat");
            }
        }
    });
    let status = Arc::downgrade(status);
    tokio::spawn(async move {
        let mut sub = match client.subscribe(SUBJECT).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot follow the cluster's heartbeats");
                return;
            }
        };
        // The client subscribes again by itself after a reconnect.
        while let Some(m) = sub.next().await {
            let Some(status) = status.upgrade() else {
                return;
            };
            match Heard::parse(&m.payload) {
                Some(h) if h.gateway != me => status.heartbeat_elsewhere(&h.uuid, h.at_ms),
                Some(_) => {}
                None => tracing::debug!("a heartbeat message of an unknown format was skipped"),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heard_round_trips_and_refuses_other_formats() {
        let h = Heard {
            v: VERSION,
            uuid: "dev".into(),
            at_ms: 5,
            gateway: "gw-a".into(),
        };
        assert_eq!(Heard::parse(&serde_json::to_vec(&h).unwrap()), Some(h));
        assert_eq!(Heard::parse(b"{}"), None);
        assert_eq!(Heard::parse(b"\xff\x00"), None);
        assert_eq!(
            Heard::parse(br#"{"v":2,"uuid":"d","at_ms":1,"gateway":"g"}"#),
            None
        );
    }
}
