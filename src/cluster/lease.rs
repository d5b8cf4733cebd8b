//! Each gateway's liveness lease: the key `<gateway-id>` in the KV bucket
//! `cloudlink_gateways`, whose `max_age` is the lease (`--cluster-lease`,
//! 15 s by default) and whose history is 1. The holder rewrites it every
//! third of the lease; every write is a new message, so its age starts
//! again. A gateway that stops writing (killed, cut off) ages out, and the
//! server's limit marker tells every watcher so.
//!
//! Taking the lease at start:
//! - no key: create it (create-if-absent, so two starting processes cannot
//!   both win);
//! - a key written by this gateway's previous boot (the boot id kept in the
//!   data directory says so): a restart, take it over at once;
//! - a key of another boot: watch it for a third of the lease and a second.
//!   If it is rewritten, a live process holds the id: refuse to start. If
//!   not, its holder is gone: take it over with compare-and-set on the
//!   revision seen, so that of two newcomers only one wins.
//!
//! Each value carries a format version, the gateway id, the boot id and the
//! start time.

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::ClusterError;

pub const BUCKET: &str = "cloudlink_gateways";
/// File in the data directory holding the boot id of the last start.
pub const BOOT_FILE: &str = "cluster-boot";
/// Format version of a lease value.
const VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseValue {
    pub v: u32,
    pub gateway: String,
    pub boot: String,
    pub started: String,
    /// Where other gateways reach this one's CONNECT proxy (`host:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
}

impl LeaseValue {
    /// Parses a stored value; `None` for anything that is not a lease of a
    /// known format (treated as another gateway's).
    pub fn parse(bytes: &[u8]) -> Option<LeaseValue> {
        serde_json::from_slice::<LeaseValue>(bytes)
            .ok()
            .filter(|v| v.v == VERSION)
    }
}

pub struct Lease {
    store: kv::Store,
    id: String,
    value: Bytes,
    pub boot: String,
    /// The revision of our last write (0: released).
    revision: AtomicU64,
    /// How often the lease is rewritten.
    pub refresh: Duration,
    /// Gateways whose lease is live, with their boot, from the bucket's
    /// watch.
    alive: parking_lot::Mutex<BTreeMap<String, String>>,
    /// Live gateways' proxy addresses, from their lease values.
    proxies: parking_lot::Mutex<BTreeMap<String, String>>,
    /// (gateway, boot) whose lease went: expired, released, or replaced by
    /// a newer boot of the same gateway.
    pub gone: tokio::sync::broadcast::Sender<(String, String)>,
    /// Told when this gateway took its lease again after it had expired
    /// (the process was paused or cut off from NATS for longer than the
    /// lease): survivors have reaped its devices meanwhile, so the ones
    /// still connected here must be claimed again.
    pub regained: tokio::sync::Notify,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Lease {
    /// Opens (or makes) the bucket and takes `id`'s lease as the module
    /// docs say; then keeps it and watches the others in the background.
    pub async fn acquire(
        js: &async_nats::jetstream::Context,
        id: &str,
        lease: Duration,
        boot_file: &Path,
        metrics: Arc<crate::metrics::Metrics>,
        replicas: usize,
        proxy: Option<String>,
    ) -> Result<Arc<Lease>, ClusterError> {
        let store = open_bucket(js, lease, replicas).await?;
        // The bucket's own max_age rules (the first gateway made it).
        let max_age = match store.status().await {
            Ok(s) if !s.info.config.max_age.is_zero() => s.info.config.max_age,
            _ => lease,
        };
        if max_age != lease {
            tracing::warn!(
                bucket = BUCKET,
                ?max_age,
                ?lease,
                "the lease bucket was made with another --cluster-lease; using the bucket's"
            );
        }
        let previous_boot = std::fs::read_to_string(boot_file)
            .ok()
            .map(|s| s.trim().to_owned());
        let boot = new_boot_id();
        let value = Bytes::from(
            serde_json::to_vec(&LeaseValue {
                v: VERSION,
                gateway: id.to_owned(),
                boot: boot.clone(),
                started: crate::bus::event::rfc3339(std::time::SystemTime::now()),
                proxy,
            })
            .expect("a lease value serialises"),
        );
        let revision = take(&store, id, &value, previous_boot.as_deref(), max_age).await?;
        crate::data_dir::write_secret_file(boot_file, boot.as_bytes()).map_err(|e| {
            ClusterError::File {
                path: boot_file.to_owned(),
                source: std::io::Error::other(e.to_string()),
            }
        })?;
        tracing::info!(gateway = %id, %boot, "cluster lease taken");
        let lease = Arc::new(Lease {
            store,
            id: id.to_owned(),
            value,
            boot,
            revision: AtomicU64::new(revision),
            refresh: max_age / 3,
            alive: Default::default(),
            proxies: Default::default(),
            gone: tokio::sync::broadcast::channel(1024).0,
            regained: tokio::sync::Notify::new(),
            metrics,
        });
        tokio::spawn(keep(Arc::downgrade(&lease)));
        tokio::spawn(watch(Arc::downgrade(&lease)));
        Ok(lease)
    }

    /// The proxy address `gateway` advertises in its lease, while it lives.
    pub fn proxy_of(&self, gateway: &str) -> Option<String> {
        self.proxies.lock().get(gateway).cloned()
    }

    /// Gateway ids whose lease is live (this one included).
    pub fn alive(&self) -> Vec<String> {
        self.alive.lock().keys().cloned().collect()
    }

    /// The boot holding `gateway`'s lease in the bucket now, if any.
    pub async fn holder_boot(&self, gateway: &str) -> Option<String> {
        let e = self.store.entry(gateway).await.ok()??;
        (e.operation == kv::Operation::Put)
            .then(|| LeaseValue::parse(&e.value).map(|v| v.boot))
            .flatten()
    }

    /// Gives the lease up (a clean stop).
    pub async fn release(&self) {
        let rev = self.revision.swap(0, Ordering::AcqRel);
        if rev != 0 {
            if let Err(e) = self.store.delete_expect_revision(&self.id, Some(rev)).await {
                tracing::warn!(error = %e, "could not release the cluster lease; it expires by itself");
            }
        }
    }
}

async fn open_bucket(
    js: &async_nats::jetstream::Context,
    lease: Duration,
    replicas: usize,
) -> Result<kv::Store, ClusterError> {
    super::open_bucket(
        js,
        kv::Config {
            bucket: BUCKET.into(),
            description: "cloudlink gateway liveness leases".into(),
            history: 1,
            max_age: lease,
            // A lease that ages out leaves a marker watchers see.
            limit_markers: Some(lease),
            ..Default::default()
        },
        replicas,
    )
    .await
}

/// Takes the key `id` for `value`; returns the revision written.
async fn take(
    store: &kv::Store,
    id: &str,
    value: &Bytes,
    previous_boot: Option<&str>,
    lease: Duration,
) -> Result<u64, ClusterError> {
    for _ in 0..5 {
        let held = store.entry(id).await.map_err(ClusterError::js)?;
        let held = held.filter(|e| e.operation == kv::Operation::Put);
        let Some(entry) = held else {
            match store.create(id, value.clone()).await {
                Ok(rev) => return Ok(rev),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                Err(e) => return Err(ClusterError::js(e)),
            }
        };
        let current = LeaseValue::parse(&entry.value);
        let ours = matches!((&current, previous_boot), (Some(c), Some(p)) if c.boot == p);
        if ours {
            tracing::info!(gateway = %id, "this gateway's previous boot held the lease: a restart, taking it over");
        } else {
            tracing::info!(gateway = %id, held_by = ?current.as_ref().map(|c| &c.boot), "the lease is held by another boot: watching whether it is refreshed");
            // Another boot's: alive if it is rewritten while we watch.
            let deadline = tokio::time::Instant::now() + lease / 3 + Duration::from_secs(1);
            while tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
                match store.entry(id).await.map_err(ClusterError::js)? {
                    Some(e)
                        if e.operation == kv::Operation::Put && e.revision != entry.revision =>
                    {
                        let c = LeaseValue::parse(&e.value);
                        return Err(ClusterError::DuplicateGateway {
                            id: id.to_owned(),
                            boot: c.as_ref().map_or("?".into(), |c| c.boot.clone()),
                            started: c.map_or("?".into(), |c| c.started),
                        });
                    }
                    _ => {}
                }
            }
        }
        match store.update(id, value.clone(), entry.revision).await {
            Ok(rev) => return Ok(rev),
            // Someone else wrote it meanwhile: look again.
            Err(_) => continue,
        }
    }
    Err(ClusterError::JetStream(format!(
        "the lease of {id:?} kept changing while this gateway tried to take it"
    )))
}

/// Rewrites the lease every third of its age, with compare-and-set on our
/// last revision: if another process took the id, this one says so loudly
/// and stops refreshing instead of fighting over it.
async fn keep(lease: std::sync::Weak<Lease>) {
    loop {
        let refresh = match lease.upgrade() {
            Some(l) => l.refresh,
            None => return,
        };
        tokio::time::sleep(refresh).await;
        let Some(l) = lease.upgrade() else { return };
        let rev = l.revision.load(Ordering::Acquire);
        if rev == 0 {
            return; // released
        }
        let started = std::time::Instant::now();
        match l.store.update(&l.id, l.value.clone(), rev).await {
            Ok(new) => {
                let _ = l
                    .revision
                    .compare_exchange(rev, new, Ordering::AcqRel, Ordering::Acquire);
                l.metrics
                    .cluster_nats_rtt
                    .set(started.elapsed().as_secs_f64());
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                let held = match l.store.entry(&l.id).await {
                    Ok(e) => e.filter(|e| e.operation == kv::Operation::Put),
                    Err(e) => {
                        tracing::warn!(error = %e, "could not read the cluster lease");
                        continue;
                    }
                };
                match held {
                    // It aged out while this process could not refresh it:
                    // take it again (create-if-absent: a newcomer with our
                    // id may have been faster, and then it wins).
                    None => match l.store.create(&l.id, l.value.clone()).await {
                        Ok(new) => {
                            l.revision.store(new, Ordering::Release);
                            tracing::warn!(gateway = %l.id, "this gateway's cluster lease had expired (paused or cut off for longer than the lease); taken again, its connected devices are claimed again");
                            l.regained.notify_one();
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "could not take the expired cluster lease again")
                        }
                    },
                    Some(_) => {
                        tracing::error!(gateway = %l.id, "another process took this gateway's cluster lease; two gateways run with one --gateway-id");
                        l.metrics.cluster_lease_lost.inc();
                        return;
                    }
                }
            }
            // NATS unreachable: keep trying; the lease may expire meanwhile.
            Err(e) => tracing::warn!(error = %e, "could not refresh the cluster lease"),
        }
    }
}

/// Follows the bucket: which gateways are alive.
async fn watch(lease: std::sync::Weak<Lease>) {
    loop {
        let Some(l) = lease.upgrade() else { return };
        let mut w = match l.store.watch_with_history(">").await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the cluster leases; retrying");
                drop(l);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        drop(l);
        while let Some(entry) = w.next().await {
            let Some(l) = lease.upgrade() else { return };
            let Ok(entry) = entry else { break };
            let mut alive = l.alive.lock();
            let previous = match entry.operation {
                kv::Operation::Put => {
                    let value = LeaseValue::parse(&entry.value);
                    let mut proxies = l.proxies.lock();
                    match value.as_ref().and_then(|v| v.proxy.clone()) {
                        Some(p) => proxies.insert(entry.key.clone(), p),
                        None => proxies.remove(&entry.key),
                    };
                    drop(proxies);
                    let boot = value.map_or_else(String::new, |v| v.boot);
                    alive
                        .insert(entry.key.clone(), boot.clone())
                        .filter(|old| *old != boot)
                }
                kv::Operation::Delete | kv::Operation::Purge => {
                    l.proxies.lock().remove(&entry.key);
                    alive.remove(&entry.key)
                }
            };
            l.metrics.cluster_gateways_alive.set(alive.len() as i64);
            drop(alive);
            if let Some(boot) = previous.filter(|b| !b.is_empty()) {
                let _ = l.gone.send((entry.key, boot));
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn new_boot_id() -> String {
    let mut b = [0u8; 8];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_values_round_trip_and_refuse_other_formats() {
        let v = LeaseValue {
            v: VERSION,
            gateway: "gw-a".into(),
            boot: "00ff".into(),
            started: "2026-11-30T00:00:00Z".into(),
            proxy: Some("127.0.0.1:3128".into()),
        };
        let bytes = serde_json::to_vec(&v).unwrap();
        assert_eq!(LeaseValue::parse(&bytes), Some(v));
        assert_eq!(LeaseValue::parse(b"{}"), None);
        assert_eq!(LeaseValue::parse(b"\xff"), None);
        assert_eq!(
            LeaseValue::parse(br#"{"v":2,"gateway":"a","boot":"b","started":"c"}"#),
            None
        );
    }
}
