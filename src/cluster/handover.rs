//! Hand-over on a clean stop (issue "Cluster mode, part 2", rolling
//! restarts): a gateway stopped with SIGTERM while other gateways live
//! does not take its devices' links down; it tells the others which
//! devices it held and where (`cloudlink.handover`), drops its sessions
//! without a `link.down` (`PacketPath::hand_over_all`) and leaves its
//! ownership records in place. Each survivor redials its share of those
//! devices at their last endpoints, paced like the redial after a restart
//! (`--redial-rate`); a device that answers comes up there and the survivor
//! claims it over the old record: consumers see `link.moved`, never a down
//! and an up. The shares are split by rendezvous hashing over the live
//! gateways, so no two survivors dial one device. Devices that do not come
//! back within [`WINDOW`] are reaped as for a dead gateway (`gateway_lost`):
//! the reaper waits that long for a gateway that handed over.
//!
//! A gateway that died hands nothing over; the survivor that reaps its
//! devices (`gateway_lost`) sends the same message on its behalf, with the
//! endpoints from the ownership records, so the devices come back on the
//! survivors in seconds rather than at their next handshake.

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const SUBJECT: &str = "cloudlink.handover";
const VERSION: u32 = 1;
/// How long survivors give handed-over devices to come back before the
/// ones still on the stopped gateway's records are reaped.
pub const WINDOW: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handover {
    pub v: u32,
    pub from: String,
    pub boot: String,
    /// (uuid, last endpoint).
    pub devices: Vec<(String, String)>,
}

impl Handover {
    /// Parses a message from another gateway; `None` for anything else.
    pub fn parse(bytes: &[u8]) -> Option<Handover> {
        serde_json::from_slice::<Handover>(bytes)
            .ok()
            .filter(|h| h.v == VERSION)
    }
}

/// Which of `gateways` redials `uuid`: the one with the highest hash of
/// (uuid, gateway) (rendezvous hashing: every survivor computes the same
/// answer from the same list, and a gateway leaving moves only its share).
pub fn chosen<'a>(uuid: &str, gateways: &'a [String]) -> Option<&'a str> {
    use blake2::Digest;
    gateways
        .iter()
        .max_by_key(|g| {
            let mut h = blake2::Blake2s256::new();
            h.update(uuid.as_bytes());
            h.update([0]);
            h.update(g.as_bytes());
            let d = h.finalize();
            u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
        })
        .map(String::as_str)
}

/// Gateways that handed over, and until when their records wait.
#[derive(Default)]
pub struct Handovers {
    until: parking_lot::Mutex<HashMap<(String, String), Instant>>,
}

impl Handovers {
    /// When reaping `(gateway, boot)` may start: after its hand-over window.
    pub fn reap_after(&self, gateway: &str, boot: &str) -> Option<Instant> {
        self.until
            .lock()
            .get(&(gateway.to_owned(), boot.to_owned()))
            .copied()
    }

    fn note(&self, gateway: &str, boot: &str) {
        let now = Instant::now();
        let mut u = self.until.lock();
        u.retain(|_, t| *t > now);
        u.insert((gateway.to_owned(), boot.to_owned()), now + WINDOW);
    }
}

/// Devices per hand-over message: a message stays far below NATS's
/// default 1 MiB payload limit (a uuid of 63 characters and an IPv6
/// endpoint make about 120 bytes a device). 41,229 devices in one message
/// were refused by the server in the cluster benchmark.
const DEVICES_PER_MESSAGE: usize = 4000;

/// Tells the gateways alive that `from` (this gateway stopping, or a dead
/// one this gateway reaped) no longer holds `devices`, so they redial them:
/// in messages of [`DEVICES_PER_MESSAGE`]. Waits (briefly) until NATS has
/// them.
pub async fn send(
    client: &async_nats::Client,
    from: &str,
    boot: &str,
    devices: Vec<(String, String)>,
) {
    let n = devices.len();
    for chunk in devices.chunks(DEVICES_PER_MESSAGE) {
        let h = Handover {
            v: VERSION,
            from: from.to_owned(),
            boot: boot.to_owned(),
            devices: chunk.to_vec(),
        };
        let payload = serde_json::to_vec(&h).unwrap_or_default();
        if let Err(e) = client.publish(SUBJECT, payload.into()).await {
            tracing::warn!(error = %e, "could not hand devices over; they come back when they dial again");
            return;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
    tracing::info!(gateway = %from, devices = n, "hand-over sent: the gateways alive redial these devices");
}

/// What a survivor needs to take devices over.
pub struct Takeover {
    pub me: String,
    pub lease: Arc<super::lease::Lease>,
    pub path: std::sync::Weak<crate::packet_path::PacketPath>,
    pub registry: Arc<crate::registry::Registry>,
    pub rate: u32,
    pub handovers: Arc<Handovers>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// How long the messages of one hand-over are gathered before redialling:
/// one paced redial for all of them, not one per message at full rate each.
const GATHER: Duration = Duration::from_millis(250);

/// Follows hand-overs of other gateways: redials this gateway's share.
pub fn follow(client: async_nats::Client, t: Takeover) {
    tokio::spawn(async move {
        let mut sub = match client.subscribe(SUBJECT).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot follow hand-overs");
                return;
            }
        };
        let mut gathered: Vec<Handover> = Vec::new();
        loop {
            let next = if gathered.is_empty() {
                Some(sub.next().await)
            } else {
                tokio::time::timeout(GATHER, sub.next()).await.ok()
            };
            match next {
                Some(None) => return,
                Some(Some(m)) => {
                    let Some(h) = Handover::parse(&m.payload) else {
                        tracing::debug!("a hand-over message of an unknown format was skipped");
                        continue;
                    };
                    if h.from == t.me {
                        continue;
                    }
                    t.handovers.note(&h.from, &h.boot);
                    if t.rate > 0 {
                        gathered.push(h);
                    } // --redial-rate 0: no redials; devices dial back by themselves
                }
                // Quiet for a moment: take over what was gathered.
                None => {
                    if !take_over(&t, std::mem::take(&mut gathered)).await {
                        return;
                    }
                }
            }
        }
    });
}

/// Redials this gateway's share of the devices `handovers` name, in one
/// paced redial. False once the gateway is gone.
async fn take_over(t: &Takeover, handovers: Vec<Handover>) -> bool {
    let alive = t.lease.alive();
    let mut mine: Vec<(String, String)> = Vec::new();
    let mut from = Vec::new();
    for h in handovers {
        let survivors: Vec<String> = alive.iter().filter(|g| **g != h.from).cloned().collect();
        mine.extend(
            h.devices
                .into_iter()
                .filter(|(uuid, _)| chosen(uuid, &survivors) == Some(t.me.as_str())),
        );
        if !from.contains(&h.from) {
            from.push(h.from);
        }
    }
    if mine.is_empty() {
        return true;
    }
    let Some(path) = t.path.upgrade() else {
        return false;
    };
    let registry = t.registry.clone();
    // Keys from our own replica, never from the message.
    let targets = tokio::task::spawn_blocking(move || {
        mine.into_iter()
            .filter_map(|(uuid, endpoint)| {
                let d = registry.get(&uuid).ok()??;
                let endpoint = endpoint.parse().ok()?;
                Some(crate::registry::RedialTarget {
                    public_key: d.public_key,
                    endpoint,
                })
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    tracing::info!(from = ?from, devices = targets.len(), "taking devices over from a gateway that stopped");
    t.metrics.cluster_takeovers.inc_by(targets.len() as u64);
    if let Err(e) = crate::redial::spawn(path, targets, t.rate.max(1)) {
        tracing::warn!(error = %e, "could not start redialling handed-over devices");
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_survivor_picks_the_same_one_and_shares_spread() {
        let gws: Vec<String> = ["gw-a", "gw-b", "gw-c"].map(String::from).to_vec();
        let mut counts = HashMap::new();
        for i in 0..3000 {
            let uuid = format!("dev-{i}");
            let c = chosen(&uuid, &gws).unwrap();
            // The same list in another order gives the same answer.
            let mut rev = gws.clone();
            rev.reverse();
            assert_eq!(chosen(&uuid, &rev), Some(c));
            *counts.entry(c.to_owned()).or_insert(0) += 1;
        }
        for g in &gws {
            let n = counts[g];
            assert!((800..1200).contains(&n), "{counts:?}");
        }
        assert_eq!(chosen("d", &[]), None);
    }

    #[test]
    fn messages_parse_only_their_format() {
        let h = Handover {
            v: VERSION,
            from: "gw-a".into(),
            boot: "b".into(),
            devices: vec![("d".into(), "192.0.2.1:5".into())],
        };
        assert_eq!(Handover::parse(&serde_json::to_vec(&h).unwrap()), Some(h));
        assert_eq!(Handover::parse(b"{}"), None);
    }
}
