//! The device lifecycle in one place: registration (one or a batch),
//! settings, deletion. The API (and later a CLI and the cluster) call
//! [`Fleet`]; it changes the store and publishes one typed event per change
//! (`device.registered`, `device.updated`, `device.deleted`; one
//! `device.registered` per batch, with its count). It never calls the
//! packet path, status or relay itself: the [`Reactor`] applies every
//! change it reads from the bus, so a change made anywhere (this gateway's
//! API, another gateway's, a CLI) has the same effect here.
//!
//! Read-your-writes: each change returns the bus cursor of its event, and
//! [`Fleet::settled`] waits until the reactor has applied it, so an API
//! answer shows the device as the change left it (a new device has its
//! status slot, a deleted one's session is gone).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::bus::event::{DeviceDeleted, DeviceRef, DeviceRegistered, DeviceUpdated, Event};
use crate::bus::{EventBus, Read};
use crate::registry::{Device, DevicePatch, NewDevice, Registered, Registry, RegistryError};

pub struct Fleet {
    registry: Arc<Registry>,
    bus: Arc<dyn EventBus>,
    /// The last bus cursor the reactor applied.
    applied: tokio::sync::watch::Sender<u64>,
    /// Cluster mode: the shared registry is the source of truth; `registry`
    /// is its replica, and the replica (not this service) publishes the
    /// `device.*` events, on every gateway.
    shared: Option<Arc<crate::cluster::registry::SharedRegistry>>,
}

/// How long a cluster change waits for this gateway's replica to apply it.
const REPLICA_WAIT: Duration = Duration::from_secs(5);

fn cluster_error(e: crate::cluster::ClusterError) -> RegistryError {
    RegistryError::Cluster(e.to_string())
}

/// A change and the bus cursor of its event (`None` when nothing changed).
pub struct Changed<T> {
    pub value: T,
    pub cursor: Option<u64>,
}

impl Fleet {
    pub fn new(registry: Arc<Registry>, bus: Arc<dyn EventBus>) -> Self {
        Self::with_shared(registry, bus, None)
    }

    /// A fleet service over a cluster's shared registry (`Some`) or the
    /// local one alone.
    pub fn with_shared(
        registry: Arc<Registry>,
        bus: Arc<dyn EventBus>,
        shared: Option<Arc<crate::cluster::registry::SharedRegistry>>,
    ) -> Self {
        let (applied, _) = tokio::sync::watch::channel(bus.local_last_id());
        Fleet {
            registry,
            bus,
            applied,
            shared,
        }
    }

    /// Runs a cluster operation from the blocking thread the API calls the
    /// fleet on.
    fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Handle::current().block_on(f)
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Registers one device (blocking: the store commits before it returns).
    pub fn register(&self, dev: NewDevice) -> Result<Changed<Registered>, RegistryError> {
        if self.shared.is_some() {
            let mut c = self.register_batch(vec![dev])?;
            return Ok(Changed {
                value: c.value.pop().expect("one result per device"),
                cursor: c.cursor,
            });
        }
        let r = self.registry.register(dev)?;
        let cursor = match &r {
            Registered::Created(d) => Some(self.bus.publish(
                Some(&d.uuid),
                Event::DeviceRegistered(DeviceRegistered {
                    count: 1,
                    address: Some(d.address.to_string()),
                    name: d.name.clone(),
                    devices: Arc::new([device_ref(d)]),
                }),
                SystemTime::now(),
            )),
            _ => None,
        };
        Ok(Changed { value: r, cursor })
    }

    /// Registers a batch in one transaction; one event for all the devices
    /// it created.
    pub fn register_batch(
        &self,
        devs: Vec<NewDevice>,
    ) -> Result<Changed<Vec<Registered>>, RegistryError> {
        if let Some(shared) = &self.shared {
            let (r, rev) = Self::block_on(async {
                let (r, rev) = shared.register_batch(devs).await?;
                shared.wait_applied(rev, REPLICA_WAIT).await;
                Ok::<_, crate::cluster::ClusterError>((r, rev))
            })
            .map_err(cluster_error)?;
            return Ok(Changed {
                value: r,
                cursor: (rev > 0).then(|| self.bus.local_last_id()),
            });
        }
        let r = self.registry.register_batch(devs)?;
        let created: Arc<[DeviceRef]> = r
            .iter()
            .filter_map(|x| match x {
                Registered::Created(d) => Some(device_ref(d)),
                _ => None,
            })
            .collect();
        let cursor = (!created.is_empty()).then(|| {
            self.bus.publish(
                None,
                Event::DeviceRegistered(DeviceRegistered {
                    count: created.len(),
                    address: None,
                    name: None,
                    devices: created,
                }),
                SystemTime::now(),
            )
        });
        Ok(Changed { value: r, cursor })
    }

    /// Changes a device's settings; `None` if there is no such device.
    pub fn update(
        &self,
        uuid: &str,
        patch: &DevicePatch,
    ) -> Result<Changed<Option<Device>>, RegistryError> {
        if let Some(shared) = &self.shared {
            use crate::cluster::registry::UpdateOutcome;
            let outcome = Self::block_on(async {
                let o = shared.update(uuid, patch).await?;
                if let UpdateOutcome::Updated(_, rev) = &o {
                    shared.wait_applied(*rev, REPLICA_WAIT).await;
                }
                Ok::<_, crate::cluster::ClusterError>(o)
            })
            .map_err(cluster_error)?;
            return match outcome {
                UpdateOutcome::NoDevice => Ok(Changed {
                    value: None,
                    cursor: None,
                }),
                UpdateOutcome::KeyTaken(uuid) => Err(RegistryError::KeyTaken { uuid }),
                UpdateOutcome::Updated(change, _) => Ok(Changed {
                    // The replica's row: it carries what the record does not
                    // (heartbeat times).
                    value: Some(self.registry.get(uuid)?.unwrap_or(change.1)),
                    cursor: Some(self.bus.local_last_id()),
                }),
            };
        }
        let d = self.registry.update(uuid, patch)?;
        let cursor = d.as_ref().map(|(before, d)| {
            let rekeyed = before.public_key != d.public_key;
            let mut changed = Vec::new();
            for (set, name) in [
                (patch.public_key.is_some(), "public_key"),
                (patch.name.is_some(), "name"),
                (patch.poll_interval_s.is_some(), "poll_interval_s"),
                (patch.cloudlink_enabled.is_some(), "cloudlink_enabled"),
                (patch.device_api_key.is_some(), "device_api_key"),
                (patch.app_id.is_some(), "app_id"),
                (patch.rate_limit_kbps.is_some(), "rate_limit_kbps"),
            ] {
                if set {
                    changed.push(name);
                }
            }
            self.bus.publish(
                Some(&d.uuid),
                Event::DeviceUpdated(DeviceUpdated {
                    changed,
                    cloudlink_enabled: patch.cloudlink_enabled,
                    poll_interval_s: patch.poll_interval_s,
                    public_key: rekeyed.then(|| crate::keys::encode_key(&d.public_key)),
                    previous_key: rekeyed.then_some(before.public_key),
                    address: d.address,
                    rate_limit_kbps: patch.rate_limit_kbps,
                }),
                SystemTime::now(),
            )
        });
        Ok(Changed {
            value: d.map(|(_, after)| after),
            cursor,
        })
    }

    /// Deletes a device; `None` if there is no such device. Its session is
    /// cut off by the reactor when it reads `device.deleted`.
    pub fn delete(&self, uuid: &str) -> Result<Changed<Option<Device>>, RegistryError> {
        if let Some(shared) = &self.shared {
            let d = Self::block_on(async {
                let d = shared.delete(uuid).await?;
                if d.is_some() {
                    shared.wait_gone(uuid, REPLICA_WAIT).await;
                }
                Ok::<_, crate::cluster::ClusterError>(d)
            })
            .map_err(cluster_error)?;
            let cursor = d.as_ref().map(|_| self.bus.local_last_id());
            return Ok(Changed { value: d, cursor });
        }
        let d = self.registry.delete(uuid)?;
        let cursor = d.as_ref().map(|d| {
            self.bus.publish(
                Some(&d.uuid),
                Event::DeviceDeleted(DeviceDeleted {
                    address: d.address.to_string(),
                    public_key: d.public_key,
                }),
                SystemTime::now(),
            )
        });
        Ok(Changed { value: d, cursor })
    }

    /// Deletes every device whose uuid starts with `prefix` (not empty:
    /// the API refuses that); how many were deleted. Alone: one
    /// transaction, then one `device.deleted` each. Cluster mode: each
    /// through the shared registry, 64 at a time.
    pub fn delete_prefix(&self, prefix: &str) -> Result<Changed<usize>, RegistryError> {
        assert!(!prefix.is_empty(), "a bulk delete needs a prefix");
        let uuids = self.registry.uuids_with_prefix(prefix)?;
        if let Some(shared) = &self.shared {
            let deleted = Self::block_on(async {
                use futures_util::StreamExt;
                let results: Vec<_> = futures_util::stream::iter(uuids.iter())
                    .map(|u| shared.delete(u))
                    .buffer_unordered(64)
                    .collect()
                    .await;
                let mut n = 0;
                for r in results {
                    if r?.is_some() {
                        n += 1;
                    }
                }
                if let Some(last) = uuids.last() {
                    shared.wait_gone(last, REPLICA_WAIT).await;
                }
                Ok::<_, crate::cluster::ClusterError>(n)
            })
            .map_err(cluster_error)?;
            return Ok(Changed {
                value: deleted,
                cursor: Some(self.bus.local_last_id()),
            });
        }
        let gone = self.registry.delete_many(&uuids)?;
        let mut cursor = None;
        for d in &gone {
            cursor = Some(self.bus.publish(
                Some(&d.uuid),
                Event::DeviceDeleted(DeviceDeleted {
                    address: d.address.to_string(),
                    public_key: d.public_key,
                }),
                SystemTime::now(),
            ));
        }
        Ok(Changed {
            value: gone.len(),
            cursor,
        })
    }

    /// Waits until the reactor applied the event at `cursor` (at most
    /// `timeout`: a stopped reactor must not hang the API).
    pub async fn settled(&self, cursor: Option<u64>, timeout: Duration) {
        let Some(cursor) = cursor else { return };
        let mut rx = self.applied.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|a| *a >= cursor)).await;
    }
}

fn device_ref(d: &Device) -> DeviceRef {
    DeviceRef {
        uuid: d.uuid.clone(),
        public_key: d.public_key,
        address: d.address,
    }
}

/// What reacts to device-lifecycle events on this gateway.
pub struct Reactor {
    pub fleet: Arc<Fleet>,
    pub path: Arc<crate::packet_path::PacketPath>,
    pub status: Arc<crate::status::service::DeviceStatus>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Queued actions of a deleted device fail (none in tests without one).
    pub actions: Option<Arc<crate::action_queue::ActionQueue>>,
}

impl Reactor {
    /// Follows the bus's device events from its current end until `stop`,
    /// applying each once, in order (link and status events are not read).
    pub async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let bus = self.fleet.bus.clone();
        let mut rx = bus.subscribe_device_events();
        let mut cursor = *self.fleet.applied.borrow();
        loop {
            rx.borrow_and_update();
            match bus.read_device_events_after(cursor, 256) {
                Read::Events(v) if !v.is_empty() => {
                    for e in &v {
                        if let Some(event) = &e.event {
                            self.apply(e.device.as_deref(), event, e.reach);
                        }
                        cursor = e.id;
                    }
                    self.fleet.applied.send_replace(cursor);
                    continue;
                }
                Read::Events(_) => {}
                Read::Gap => {
                    // Events were lost to this reader: rebuild from the store.
                    let (fleet, path, status, metrics) = (
                        self.fleet.clone(),
                        self.path.clone(),
                        self.status.clone(),
                        self.metrics.clone(),
                    );
                    tracing::warn!(
                        "the fleet reactor fell behind the event bus; reconciling with the store"
                    );
                    let _ = tokio::task::spawn_blocking(move || {
                        reconcile(&fleet, &path, &status, &metrics)
                    })
                    .await;
                    cursor = bus.local_last_id();
                    self.fleet.applied.send_replace(cursor);
                    continue;
                }
                Read::Closed => return,
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                _ = stop.changed() => return,
            }
        }
    }

    /// `reach`: how far the event went, and so how far what follows from
    /// it does (a status change).
    fn apply(&self, device: Option<&str>, event: &Event, reach: crate::bus::Reach) {
        match event {
            Event::DeviceRegistered(r) => {
                for d in r.devices.iter() {
                    self.path.directory.insert(
                        d.public_key,
                        crate::directory::Identity {
                            uuid: d.uuid.as_str().into(),
                            address: d.address,
                        },
                    );
                    self.status.registered(&d.uuid);
                }
                self.metrics
                    .devices_registered
                    .set(self.fleet.registry.count());
                match device {
                    Some(uuid) => tracing::info!(device = %uuid, "device registered"),
                    None => tracing::info!(count = r.count, "devices registered"),
                }
            }
            Event::DeviceUpdated(u) => {
                if let (Some(uuid), Some(old)) = (device, u.previous_key) {
                    // A key change: the old key may no longer connect, and
                    // the session made with it goes; the device dials again
                    // with its new key.
                    self.path.directory.remove(&old);
                    if let Some(new) = u
                        .public_key
                        .as_deref()
                        .and_then(|k| crate::keys::decode_key(k).ok())
                    {
                        self.path.directory.insert(
                            new,
                            crate::directory::Identity {
                                uuid: uuid.into(),
                                address: u.address,
                            },
                        );
                    }
                    self.path.revoke(uuid, Instant::now());
                    tracing::info!(device = %uuid, "device key changed");
                }
                if let Some(uuid) = device {
                    self.status
                        .settings(uuid, u.poll_interval_s, u.cloudlink_enabled, reach);
                    if let Some(limit) = u.rate_limit_kbps {
                        self.path.limits.set_own(uuid, limit);
                        tracing::info!(device = %uuid, rate_limit_kbps = ?limit, "device bandwidth limit changed");
                    }
                }
            }
            Event::DeviceDeleted(d) => {
                // Out of the directory first: no new session from here on.
                self.path.directory.remove(&d.public_key);
                if let Some(uuid) = device {
                    self.path.revoke(uuid, Instant::now());
                    self.path.limits.forget(uuid);
                    self.status.removed(uuid);
                    if let Some(q) = &self.actions {
                        tokio::spawn(q.clone().device_deleted(uuid.to_owned()));
                    }
                    tracing::info!(device = %uuid, "device deleted");
                }
                self.metrics
                    .devices_registered
                    .set(self.fleet.registry.count());
            }
            _ => {}
        }
    }
}

/// After lost events: cut off every session whose device is no longer
/// registered and bring the status tracker in line with the store
/// (blocking: reads the store).
fn reconcile(
    fleet: &Fleet,
    path: &crate::packet_path::PacketPath,
    status: &crate::status::service::DeviceStatus,
    metrics: &crate::metrics::Metrics,
) {
    if let Err(e) = path.directory.reload(&fleet.registry) {
        tracing::error!(error = %e, "reloading the directory from the store failed");
    }
    match fleet.registry.rate_limits() {
        Ok(own) => path.limits.load(own),
        Err(e) => tracing::error!(error = %e, "reloading bandwidth limits from the store failed"),
    }
    if let Err(e) = status.reconcile() {
        tracing::error!(error = %e, "reconciling device status with the store failed");
    }
    let mut all = Vec::new();
    path.sessions.collect_into(&mut all);
    for s in all {
        if matches!(fleet.registry.get(&s.uuid), Ok(None)) {
            path.revoke(&s.uuid, Instant::now());
        }
    }
    metrics.devices_registered.set(fleet.registry.count());
}
