//! Cluster mode: several gateways behind one UDP name, sharing their state
//! through NATS JetStream (`--nats`). Without `--nats` none of this runs and
//! the gateway keeps everything embedded.
//!
//! What is here so far:
//! - joining: connecting to the NATS servers (credentials, a private CA),
//!   checking that the server is recent enough (2.11: KV limit markers,
//!   which make an expired lease visible to watchers), the JetStream
//!   context;
//! - [`lease`]: each gateway's liveness lease, one key per `--gateway-id` in
//!   a bucket whose `max_age` is the lease. A gateway restarted with its
//!   data directory takes its own lease over at once; a second live process
//!   with the same id is refused; the gateways alive are watched.
//!
//! Why NATS JetStream: it is an existing, replicated engine with the two
//! primitives the protocol needs (compare-and-set on a key's revision, and
//! watches), so nothing home-made decides who is alive or who owns what.

pub mod actions;
pub mod audit;
pub mod counters;
pub mod events;
pub mod handover;
pub mod heartbeats;
pub mod lease;
pub mod ownership;
pub mod registry;
pub mod routing;
pub mod sign_outs;
pub mod tokens;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// What `--nats*` and `--cluster-lease` say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    pub urls: Vec<String>,
    pub creds: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    /// A gateway whose lease was not refreshed for this long is gone.
    pub lease: Duration,
    /// Copies of each bucket and of the event stream (`None`: 3 when the
    /// NATS cluster has at least 3 servers, else 1).
    pub replicas: Option<usize>,
}

/// The oldest NATS server cluster mode runs on.
pub const MIN_SERVER: (u64, u64) = (2, 11);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot reach NATS at {urls}: {reason}")]
    Connect { urls: String, reason: String },
    #[error("the NATS server runs version {version}; cluster mode needs {}.{} or later (KV limit markers make an expired lease visible)", MIN_SERVER.0, MIN_SERVER.1)]
    ServerTooOld { version: String },
    #[error("NATS JetStream: {0}")]
    JetStream(String),
    #[error("NATS is unreachable from this gateway")]
    Unreachable,
    #[error("gateway id {id:?} is held by a running gateway (boot {boot}, started {started}); its lease is being refreshed. Stop it, or give this gateway another --gateway-id")]
    DuplicateGateway {
        id: String,
        boot: String,
        started: String,
    },
    #[error("{0:?} cannot name a gateway in cluster mode: use 1 to 64 of A-Z a-z 0-9 - _")]
    BadGatewayId(String),
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ClusterError {
    fn js(e: impl std::fmt::Display) -> Self {
        ClusterError::JetStream(e.to_string())
    }
}

/// Whether a server version string (`2.11.0`, `v2.12.1-RC.2`) is at least
/// `min`. Total: anything unparsable is too old.
pub fn version_at_least(version: &str, min: (u64, u64)) -> bool {
    let v = version.trim().trim_start_matches('v');
    let mut parts = v.split(['.', '-']);
    let num = |p: Option<&str>| p.and_then(|s| s.parse::<u64>().ok());
    match (num(parts.next()), num(parts.next())) {
        (Some(major), Some(minor)) => (major, minor) >= min,
        _ => false,
    }
}

/// A gateway id usable as a KV key and a NATS subject token.
pub fn valid_gateway_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Whether this gateway reaches NATS now, and since when: told by the
/// client's connection events. Changes refuse at once while it does not
/// (503 `cluster_unavailable`, not a request timeout later), and a lease
/// that vanished while the connection was away is not taken for a dead
/// gateway until its holder had time to take it again.
#[derive(Debug)]
pub struct NatsHealth {
    /// `None` while disconnected.
    up_since: parking_lot::Mutex<Option<std::time::Instant>>,
    /// Counts connections made: a reader that must start over after a
    /// reconnect (a consumer the restarted server forgot) compares it.
    connections: std::sync::atomic::AtomicU64,
}

impl NatsHealth {
    fn new() -> Arc<Self> {
        Arc::new(NatsHealth {
            up_since: parking_lot::Mutex::new(Some(std::time::Instant::now())),
            connections: std::sync::atomic::AtomicU64::new(1),
        })
    }

    fn set(&self, up: bool) {
        let mut s = self.up_since.lock();
        match (up, s.is_some()) {
            (true, false) => {
                *s = Some(std::time::Instant::now());
                self.connections
                    .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                tracing::info!("connected to NATS again");
            }
            (false, _) => *s = None,
            _ => {}
        }
    }

    pub fn connected(&self) -> bool {
        self.up_since.lock().is_some()
    }

    /// How many connections were made so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(std::sync::atomic::Ordering::Acquire)
    }

    /// How long the connection has been up (`None`: it is down).
    pub fn up_for(&self) -> Option<Duration> {
        self.up_since.lock().map(|t| t.elapsed())
    }
}

/// This gateway's membership of the cluster.
pub struct Cluster {
    pub client: async_nats::Client,
    pub jetstream: async_nats::jetstream::Context,
    pub gateway_id: String,
    pub lease: Arc<lease::Lease>,
    /// The shared device registry (the local one is its replica).
    pub devices: Arc<registry::SharedRegistry>,
    /// Which gateway holds each connected device.
    pub ownership: Arc<ownership::Ownership>,
    /// The cluster's event stream, and this gateway's bus.
    pub events: Arc<events::ClusterBus>,
    pub health: Arc<NatsHealth>,
    /// Copies JetStream keeps of each bucket and of the stream.
    pub replicas: usize,
    /// Traffic counters of devices held by other gateways.
    pub counters: Arc<counters::RemoteCounters>,
    /// Gateways that handed their devices over (their records wait).
    pub handovers: Arc<handover::Handovers>,
    /// Queued actions and idempotency keys, shared.
    pub actions: Arc<actions::SharedActions>,
    /// The registry watch, from where the initial sync stopped, until
    /// [`follow`](Cluster::follow) takes it.
    watch: parking_lot::Mutex<Option<async_nats::jetstream::kv::Watch>>,
}

/// Who joins: this gateway as the cluster sees it.
pub struct Joining<'a> {
    pub gateway_id: &'a str,
    /// Keeps the boot id of the last start (how a restart is told from a
    /// duplicate).
    pub data_dir: &'a Path,
    /// Where other gateways reach this one's CONNECT proxy.
    pub proxy: Option<String>,
    /// Events kept while NATS is unreachable, and in the stream's view.
    pub event_buffer: usize,
}

impl Cluster {
    /// Connects, checks the server, takes this gateway's lease (see
    /// [`lease::Lease::acquire`]), and brings the local registry in line
    /// with the cluster's.
    pub async fn join(
        config: &ClusterConfig,
        me: Joining<'_>,
        metrics: Arc<crate::metrics::Metrics>,
        local: Arc<crate::registry::Registry>,
        ring: crate::bus::RingBus,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let Joining {
            gateway_id,
            data_dir,
            proxy,
            event_buffer,
        } = me;
        if !valid_gateway_id(gateway_id) {
            return Err(ClusterError::BadGatewayId(gateway_id.to_owned()));
        }
        let health = NatsHealth::new();
        let client = connect(config, health.clone()).await?;
        let version = client.server_info().version;
        if !version_at_least(&version, MIN_SERVER) {
            return Err(ClusterError::ServerTooOld { version });
        }
        // Enough copies that losing a NATS server loses nothing, where
        // there are servers to hold them. A bucket keeps the count it was
        // made with.
        let servers = client.server_info().connect_urls.len().max(1);
        let replicas = config.replicas.unwrap_or(if servers >= 3 { 3 } else { 1 });
        tracing::info!(servers = %config.urls.join(","), %version, cluster_servers = servers, replicas, "connected to NATS");
        let jetstream = async_nats::jetstream::new(client.clone());
        let lease = lease::Lease::acquire(
            &jetstream,
            gateway_id,
            config.lease,
            &data_dir.join(lease::BOOT_FILE),
            metrics.clone(),
            replicas,
            proxy,
        )
        .await?;
        let events = events::ClusterBus::open(
            &jetstream,
            ring,
            event_buffer,
            metrics.clone(),
            health.clone(),
            replicas,
        )
        .await?;
        let bus: Arc<dyn crate::bus::EventBus> = events.clone();
        let ownership =
            ownership::Ownership::open(&jetstream, gateway_id, &lease.boot, bus, metrics, replicas)
                .await?;
        // A gateway's lease went: reap its devices (one survivor does). A
        // restarted gateway's previous boot is reaped a lease later, so the
        // devices it redials come back without a down in between.
        //
        // A lease that vanished while this gateway's own connection was
        // away (NATS restarted or was unreachable for longer than a lease:
        // every lease aged out at once) proves nothing about its holder:
        // reaping waits until the connection has been back for a refresh
        // period and two seconds, and is skipped if the same boot holds the
        // lease again by then.
        let handovers = Arc::new(handover::Handovers::default());
        {
            let mut gone = lease.gone.subscribe();
            let handed = handovers.clone();
            let own = Arc::downgrade(&ownership);
            let leases = Arc::downgrade(&lease);
            let me = gateway_id.to_owned();
            let (delay, lease_age, refresh) = (lease.refresh * 3, config.lease, lease.refresh);
            let health = health.clone();
            tokio::spawn(async move {
                while let Ok((gateway, boot)) = gone.recv().await {
                    let (own, leases, health) = (own.clone(), leases.clone(), health.clone());
                    let (me, handed) = (me.clone(), handed.clone());
                    tokio::spawn(async move {
                        // A gateway that handed its devices over: the
                        // survivors redial them first; what has not come
                        // back by the end of the window is reaped. (Its
                        // hand-over message and its lease's end travel on
                        // different paths: give the message a second.)
                        if gateway != me {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        if let Some(t) = handed.reap_after(&gateway, &boot) {
                            tokio::time::sleep_until(t.into()).await;
                        }
                        if gateway == me {
                            tokio::time::sleep(delay).await;
                        } else if health.up_for().is_none_or(|d| d < lease_age) {
                            let settle = refresh + Duration::from_secs(2);
                            while health.up_for().is_none_or(|d| d < settle) {
                                tokio::time::sleep(Duration::from_millis(250)).await;
                            }
                            let back = match leases.upgrade() {
                                Some(l) => l.holder_boot(&gateway).await,
                                None => return,
                            };
                            if back.as_deref() == Some(boot.as_str()) {
                                tracing::info!(%gateway, "a gateway's lease lapsed during a NATS outage and was taken again: not reaping");
                                return;
                            }
                        }
                        if let Some(o) = own.upgrade() {
                            o.gateway_gone(&gateway, &boot).await;
                        }
                    });
                }
            });
        }
        let devices =
            registry::SharedRegistry::open(&jetstream, local, gateway_id, health.clone(), replicas)
                .await?;
        let watch = devices.sync().await?;
        let actions = actions::SharedActions::open(
            &jetstream,
            gateway_id,
            &lease.boot,
            health.clone(),
            replicas,
        )
        .await?;
        Ok(Arc::new(Cluster {
            actions,
            client,
            jetstream,
            gateway_id: gateway_id.to_owned(),
            lease,
            devices,
            ownership,
            events,
            health,
            replicas,
            counters: Default::default(),
            handovers,
            watch: parking_lot::Mutex::new(Some(watch)),
        }))
    }

    /// Starts applying the cluster's registry changes here, published on
    /// `bus` for the fleet reactor. Once.
    pub fn follow(&self, bus: Arc<dyn crate::bus::EventBus>) {
        if let Some(w) = self.watch.lock().take() {
            tokio::spawn(self.devices.clone().follow(w, bus));
        }
    }

    /// A clean stop: the lease goes at once, so survivors need not wait
    /// for it to expire.
    pub async fn leave(&self) {
        // The devices' link-downs (`shutdown`) first, then the lease.
        self.ownership.flush().await;
        self.events.flush(Duration::from_secs(2)).await;
        self.lease.release().await;
        let _ = self.client.flush().await;
    }
}

/// The KV bucket `config.bucket`, made with `config` if it does not exist
/// yet (a gateway starting at the same moment may make it first).
pub(crate) async fn open_bucket(
    js: &async_nats::jetstream::Context,
    mut config: async_nats::jetstream::kv::Config,
    replicas: usize,
) -> Result<async_nats::jetstream::kv::Store, ClusterError> {
    config.num_replicas = replicas;
    // A NATS cluster that has just started (or is electing leaders) times
    // requests out for a while: keep trying for a minute before giving up,
    // as gateways and NATS servers are often started together.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match open_bucket_once(js, config.clone()).await {
            Ok(store) => return Ok(store),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::info!(bucket = %config.bucket, error = %e, "JetStream is not ready yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn open_bucket_once(
    js: &async_nats::jetstream::Context,
    config: async_nats::jetstream::kv::Config,
) -> Result<async_nats::jetstream::kv::Store, ClusterError> {
    let bucket = config.bucket.clone();
    let mut store = match js.get_key_value(&bucket).await {
        Ok(store) => store,
        Err(_) => match js.create_key_value(config).await {
            Ok(store) => store,
            Err(_) => js.get_key_value(&bucket).await.map_err(ClusterError::js)?,
        },
    };
    // Reads go to the bucket's leader, never to a follower: compare-and-set
    // and create-if-absent need reads that see the latest write. (With
    // "direct get" on, as KV buckets are made, a read may be served by a
    // copy that lags: on a three-server cluster a `create` of an existing
    // key then failed as "wrong last sequence" with the key not found,
    // instead of "already exists".)
    let mut stream = js
        .get_stream(format!("KV_{bucket}"))
        .await
        .map_err(ClusterError::js)?;
    let mut config = stream
        .info()
        .await
        .map_err(ClusterError::js)?
        .config
        .clone();
    if config.allow_direct {
        config.allow_direct = false;
        js.update_stream(config).await.map_err(ClusterError::js)?;
    }
    // The store reads the way its cached stream info says: take it again
    // if it was opened before the change (by us or by another gateway).
    if store.stream.cached_info().config.allow_direct {
        store = js.get_key_value(&bucket).await.map_err(ClusterError::js)?;
    }
    // A replicated bucket another gateway has just made answers only once
    // its copies have elected a leader: the caller retries until it does.
    store.get("_probe").await.map_err(|e| {
        ClusterError::JetStream(format!("the bucket {bucket} does not answer: {e}"))
    })?;
    Ok(store)
}

async fn connect(
    config: &ClusterConfig,
    health: Arc<NatsHealth>,
) -> Result<async_nats::Client, ClusterError> {
    let urls = config.urls.join(",");
    let fail = |reason: String| ClusterError::Connect {
        urls: urls.clone(),
        reason,
    };
    // After the first connection the client reconnects by itself, for
    // ever: the gateway carries on without NATS until it is back.
    let mut options = async_nats::ConnectOptions::new()
        .name("cloudlink")
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .event_callback(move |event| {
            match event {
                async_nats::Event::Connected => health.set(true),
                async_nats::Event::Disconnected => {
                    tracing::warn!("lost the connection to NATS: connected devices stay up; registry changes answer 503 until it is back");
                    health.set(false);
                }
                _ => {}
            }
            async {}
        });
    if let Some(path) = &config.creds {
        options = options
            .credentials_file(path)
            .await
            .map_err(|e| fail(format!("credentials {}: {e}", path.display())))?;
    }
    if let Some(path) = &config.tls_ca {
        if !path.exists() {
            return Err(ClusterError::File {
                path: path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        }
        options = options
            .add_root_certificates(path.clone())
            .require_tls(true);
    }
    let addrs = config
        .urls
        .iter()
        .map(|u| u.parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(format!("bad URL: {e}")))?;
    let client = options
        .connect(addrs)
        .await
        .map_err(|e| fail(e.to_string()))?;
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions() {
        for (v, ok) in [
            ("2.11.0", true),
            ("2.15.1", true),
            ("v2.12.1-RC.2", true),
            ("3.0.0", true),
            ("2.10.22", false),
            ("2.9.10", false),
            ("", false),
            ("banana", false),
            ("2", false),
            ("2.x", false),
            ("99999999999999999999999.1", false),
        ] {
            assert_eq!(version_at_least(v, MIN_SERVER), ok, "{v}");
        }
    }

    #[test]
    fn gateway_ids() {
        assert!(valid_gateway_id("gw-a_1"));
        assert!(!valid_gateway_id(""));
        assert!(!valid_gateway_id("a.b"));
        assert!(!valid_gateway_id("a b"));
        assert!(!valid_gateway_id("*"));
        assert!(!valid_gateway_id(&"x".repeat(65)));
    }
}
