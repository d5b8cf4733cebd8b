//! Traffic counters of devices held by other gateways, for the API.
//!
//! Every [`PERIOD`] each gateway publishes the counters of its connected
//! devices on the core NATS subject `cloudlink.counters` (chunks of
//! [`CHUNK`] devices); every gateway keeps the latest it heard per device,
//! so the device JSON and the listing's sort by `rx_bytes` / `tx_bytes` on
//! any gateway cover the whole cluster. They lag by up to `PERIOD`
//! (documented in the API reference); the owner's own API is exact. The
//! packet path is not involved: counters are read from session snapshots,
//! once per period.

use dashmap::DashMap;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

const SUBJECT: &str = "cloudlink.counters";
const VERSION: u32 = 1;
/// How often counters are shared (and so how far they may lag elsewhere).
pub const PERIOD: Duration = Duration::from_secs(10);
/// Devices per message (about 100 bytes each).
const CHUNK: usize = 500;

/// One device's counters as its gateway last shared them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub uuid: String,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    /// Unix milliseconds (0: none yet).
    pub last_handshake_ms: u64,
    pub last_packet_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Batch {
    v: u32,
    gateway: String,
    devices: Vec<Counters>,
}

/// What the other gateways last said, by device.
#[derive(Default)]
pub struct RemoteCounters {
    by_device: DashMap<String, (String, Counters)>,
}

impl RemoteCounters {
    /// The device's counters as `gateway` last shared them.
    pub fn get(&self, uuid: &str, gateway: &str) -> Option<Counters> {
        self.by_device
            .get(uuid)
            .filter(|e| e.0 == gateway)
            .map(|e| e.1.clone())
    }

    /// Applies a message; `false` if it is not one.
    pub fn apply(&self, me: &str, bytes: &[u8]) -> bool {
        let Ok(batch) = serde_json::from_slice::<Batch>(bytes) else {
            return false;
        };
        if batch.v != VERSION {
            return false;
        }
        if batch.gateway != me {
            for c in batch.devices {
                self.by_device
                    .insert(c.uuid.clone(), (batch.gateway.clone(), c));
            }
        }
        true
    }

    /// Keeps only devices that `holds(uuid, gateway)` says that gateway
    /// still holds (the others went down, moved or were deleted).
    fn retain(&self, holds: impl Fn(&str, &str) -> bool) {
        self.by_device.retain(|uuid, (gw, _)| holds(uuid, gw));
    }
}

fn ms(t: Option<std::time::SystemTime>) -> u64 {
    t.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// Shares this gateway's counters every [`PERIOD`] and keeps the others'.
pub fn share(
    client: async_nats::Client,
    me: String,
    path: std::sync::Weak<crate::packet_path::PacketPath>,
    remote: Arc<RemoteCounters>,
    ownership: std::sync::Weak<super::ownership::Ownership>,
) {
    let publisher = client.clone();
    let gateway = me.clone();
    let kept = Arc::downgrade(&remote);
    tokio::spawn(async move {
        let mut sessions = Vec::new();
        let mut tick = tokio::time::interval(PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // Forget what the directory no longer has there.
            if let (Some(r), Some(o)) = (kept.upgrade(), ownership.upgrade()) {
                r.retain(|uuid, gw| o.owner(uuid).is_some_and(|w| w.record.gateway == gw));
            }
            let Some(p) = path.upgrade() else { return };
            sessions.clear();
            p.sessions.collect_into(&mut sessions);
            drop(p);
            let mut devices: Vec<Counters> = sessions
                .iter()
                .filter_map(|s| {
                    let snap = s.snapshot();
                    snap.connected.then(|| Counters {
                        uuid: s.uuid.to_string(),
                        rx_bytes: snap.rx_bytes,
                        tx_bytes: snap.tx_bytes,
                        rx_packets: snap.rx_packets,
                        tx_packets: snap.tx_packets,
                        last_handshake_ms: ms(snap.last_handshake_at),
                        last_packet_ms: ms(snap.last_packet_at),
                    })
                })
                .collect();
            sessions.clear();
            while !devices.is_empty() {
                let rest = devices.split_off(devices.len().min(CHUNK));
                let batch = Batch {
                    v: VERSION,
                    gateway: gateway.clone(),
                    devices: std::mem::replace(&mut devices, rest),
                };
                let payload = serde_json::to_vec(&batch).unwrap_or_default();
                if let Err(e) = publisher.publish(SUBJECT, payload.into()).await {
                    tracing::debug!(error = %e, "could not share traffic counters");
                    break;
                }
            }
        }
    });
    let remote = Arc::downgrade(&remote);
    tokio::spawn(async move {
        let mut sub = match client.subscribe(SUBJECT).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot follow the cluster's traffic counters");
                return;
            }
        };
        while let Some(m) = sub.next().await {
            let Some(r) = remote.upgrade() else { return };
            if !r.apply(&me, &m.payload) {
                tracing::debug!("a counters message of an unknown format was skipped");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_from_others_are_kept_by_device_and_gateway() {
        let r = RemoteCounters::default();
        let c = Counters {
            uuid: "d1".into(),
            rx_bytes: 10,
            tx_bytes: 20,
            rx_packets: 1,
            tx_packets: 2,
            last_handshake_ms: 5,
            last_packet_ms: 6,
        };
        let batch = |gw: &str| {
            serde_json::to_vec(&Batch {
                v: VERSION,
                gateway: gw.into(),
                devices: vec![c.clone()],
            })
            .unwrap()
        };
        assert!(r.apply("gw-a", &batch("gw-b")));
        assert_eq!(r.get("d1", "gw-b"), Some(c.clone()));
        // Only the owner's numbers count.
        assert_eq!(r.get("d1", "gw-c"), None);
        // Our own messages are ignored; other formats refused.
        assert!(r.apply("gw-a", &batch("gw-a")));
        assert!(!r.apply("gw-a", b"{}"));
        assert!(!r.apply("gw-a", b"\x00"));
        r.retain(|_, gw| gw == "gw-b");
        assert_eq!(r.get("d1", "gw-b"), Some(c.clone()));
        r.retain(|_, _| false);
        assert_eq!(r.get("d1", "gw-b"), None);
    }
}
