//! Wiring: opens the data directory, starts the packet threads and the API,
//! and stops them in order. [`run`] is what the binary calls; tests call
//! [`Gateway::start`] on sockets bound to `127.0.0.1:0`.

use std::future::Future;
use std::net::UdpSocket;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::api::{self, ApiState};
use crate::bus::{EventBus, RingBus};
use crate::config::{check_token, GatewayConfig};
use crate::data_dir::{load_or_create_private_key, write_secret_file};
use crate::error::Error;
use crate::keys::encode_key;
use crate::metrics::Metrics;
use crate::packet_path::udp_io::PacketThreads;
use crate::packet_path::{PacketPath, PacketPathConfig};
use crate::registry::{AddressPlan, Registry};
use crate::status::service::DeviceStatus;

/// A running gateway.
pub struct Gateway {
    pub path: Arc<PacketPath>,
    pub api_state: Arc<ApiState>,
    threads: Option<PacketThreads>,
    api_addr: std::net::SocketAddr,
    udp_addr: std::net::SocketAddr,
    stop_api: Option<tokio::sync::oneshot::Sender<()>>,
    stop_status: tokio::sync::watch::Sender<bool>,
    stop_proxy: tokio::sync::watch::Sender<bool>,
    proxy_addr: std::net::SocketAddr,
    pub relay: Arc<crate::relay::Relay>,
    status_task: Option<tokio::task::JoinHandle<()>>,
    api_task: Option<tokio::task::JoinHandle<()>>,
    endpoints_task: Option<tokio::task::JoinHandle<()>>,
    redialer: Option<crate::redial::Redialer>,
    /// Cluster mode's membership (`--nats`).
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Set at the start of a stop: the API and the proxy refuse new work.
    draining: Arc<std::sync::atomic::AtomicBool>,
    drain_timeout: Duration,
}

/// Runs a gateway until `shutdown` resolves, then stops it cleanly.
pub async fn run(
    config: GatewayConfig,
    udp: UdpSocket,
    api: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let gw = Gateway::start(config, udp, api).await?;
    shutdown.await;
    gw.shutdown().await;
    Ok(())
}

impl Gateway {
    pub async fn start(
        config: GatewayConfig,
        udp: UdpSocket,
        api: tokio::net::TcpListener,
    ) -> Result<Self, Error> {
        config.validate()?;
        let dir = config.data_dir.clone();
        crate::data_dir::secure(&dir)?;
        let secret = match &config.private_key_file {
            // A mounted secret: it must be there (every gateway of a
            // cluster has the same identity; generating one would split it).
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
                let key = crate::keys::decode_key(&text).map_err(|e| Error::KeyFile {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                x25519_dalek::StaticSecret::from(key)
            }
            None => load_or_create_private_key(&dir.join("gateway.key"))?,
        };
        let session_key = crate::cluster::sign_outs::session_key(&secret.to_bytes());
        let token = resolve_token(&config, &dir)?;
        let plan = AddressPlan::new(config.tunnel_cidr)?;
        let registry = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || Registry::open(&dir, plan))
                .await
                .map_err(|e| Error::Config(format!("registry open task failed: {e}")))??
        };
        let registry = Arc::new(registry);
        let udp_addr = udp.local_addr().map_err(Error::Socket)?;
        let api_addr = api.local_addr().map_err(Error::Socket)?;
        let hostname = hostname();
        let endpoint = match &config.endpoint {
            Some(e) => e.clone(),
            None => {
                let e = format!("{hostname}:{}", udp_addr.port());
                tracing::warn!(endpoint = %e, "no --endpoint given: device configs will name this host; set --endpoint to the public host:port devices dial");
                e
            }
        };
        let gateway_id = config
            .gateway_id
            .clone()
            .unwrap_or_else(|| hostname.clone());
        let ring = RingBus::new(boot_epoch(), gateway_id.clone(), config.event_ring);
        let metrics = Arc::new(Metrics::new());
        // Before anything serves: a duplicate of a live gateway stops here,
        // and the local registry is brought in line with the cluster's.
        // Bound before joining a cluster: the lease says where other
        // gateways reach this proxy.
        let proxy = tokio::net::TcpListener::bind(config.proxy)
            .await
            .map_err(|e| {
                Error::Config(format!(
                    "binding the CONNECT proxy on {}: {e}",
                    config.proxy
                ))
            })?;
        let proxy_addr = proxy.local_addr().map_err(Error::Socket)?;
        // A proxy on every address is reached by this host's name.
        let proxy_advertised = if proxy_addr.ip().is_unspecified() {
            format!("{hostname}:{}", proxy_addr.port())
        } else {
            proxy_addr.to_string()
        };
        let mut events_alone = None;
        let cluster = match &config.cluster {
            Some(c) => Some(
                crate::cluster::Cluster::join(
                    c,
                    crate::cluster::Joining {
                        gateway_id: &gateway_id,
                        data_dir: &dir,
                        proxy: Some(proxy_advertised),
                        event_buffer: config.event_ring,
                    },
                    metrics.clone(),
                    registry.clone(),
                    ring,
                )
                .await?,
            ),
            None => {
                events_alone = Some(ring);
                None
            }
        };
        // In cluster mode the bus is the cluster's stream (see
        // `cluster::events`); alone, the ring.
        let events: Arc<dyn EventBus> = match (&cluster, events_alone) {
            (Some(c), _) => c.events.clone(),
            (None, Some(ring)) => Arc::new(ring),
            (None, None) => unreachable!("one of the two is set"),
        };
        metrics.devices_registered.set(registry.count());
        let directory = {
            let r = registry.clone();
            tokio::task::spawn_blocking(move || crate::directory::Directory::load(&r))
                .await
                .map_err(|e| Error::Config(format!("directory load task failed: {e}")))??
        };
        let path = Arc::new(PacketPath::new(
            secret,
            plan.gateway(),
            Arc::new(directory),
            events.clone(),
            metrics.clone(),
            PacketPathConfig {
                link_timeout: config.link_timeout,
                handshake_rate_limit: config.handshake_rate_limit,
                handshake_queue: config.handshake_queue,
                name_boringtun_warnings: config.shows_boringtun_log(),
            },
        ));
        let status = {
            let (registry, events) = (registry.clone(), events.clone());
            let (interval, grace) = (config.poll_interval, config.heartbeat_grace);
            let weak = Arc::downgrade(&path);
            tokio::task::spawn_blocking(move || {
                DeviceStatus::load(registry, events, weak, interval, grace)
            })
            .await
            .map_err(|e| Error::Config(format!("status load task failed: {e}")))??
        };
        let status = Arc::new(status);
        let relay = crate::relay::Relay::new(
            path.clone(),
            registry.clone(),
            metrics.clone(),
            config.connect_timeout,
        );
        let _ = path.set_sink(relay.clone());
        relay.set_stream_limits(config.max_relay_streams, config.max_device_streams);
        path.limits.set_default(config.device_rate_limit_kbps);
        {
            let r = registry.clone();
            let own = tokio::task::spawn_blocking(move || r.rate_limits())
                .await
                .map_err(|e| Error::Config(format!("rate limit load task failed: {e}")))??;
            path.limits.load(own);
        }
        let action_queue = {
            let (registry, events, weak) =
                (registry.clone(), events.clone(), Arc::downgrade(&relay));
            let (timeout, max_queued) = (config.action_timeout, config.max_queued_actions);
            let m = metrics.clone();
            Arc::new(
                tokio::task::spawn_blocking(move || {
                    crate::action_queue::ActionQueue::open(
                        &registry, events, m, weak, timeout, max_queued,
                    )
                })
                .await
                .map_err(|e| Error::Config(format!("action queue open task failed: {e}")))??,
            )
        };
        let endpoints = Arc::new(crate::redial::EndpointBook::default());
        let mut observers: Vec<Arc<dyn crate::packet_path::LinkObserver>> = vec![
            relay.clone(),
            status.clone(),
            endpoints.clone(),
            Arc::new(crate::action_queue::QueueObserver {
                queue: action_queue.clone(),
                runtime: tokio::runtime::Handle::current(),
            }),
        ];
        if let Some(c) = &cluster {
            observers.push(c.ownership.clone());
            // Link-ups and link-downs go cluster-wide from the ownership
            // directory, once its write has landed.
            path.set_link_reach(crate::bus::Reach::Local);
            let p = Arc::downgrade(&path);
            c.ownership.set_on_moved(move |uuid| {
                if let Some(path) = p.upgrade() {
                    path.hand_over(uuid, std::time::Instant::now());
                }
            });
        }
        path.set_link_observer(Arc::new(crate::packet_path::Observers(observers)));
        let (stop_status, stop_status_rx) = tokio::sync::watch::channel(false);
        let status_task = tokio::spawn(status.clone().run(stop_status_rx));
        let fleet = Arc::new(crate::fleet::Fleet::with_shared(
            registry.clone(),
            events.clone(),
            cluster.as_ref().map(|c| c.devices.clone()),
        ));
        tokio::spawn(
            crate::fleet::Reactor {
                fleet: fleet.clone(),
                path: path.clone(),
                status: status.clone(),
                metrics: metrics.clone(),
                actions: Some(action_queue.clone()),
            }
            .run(stop_status.subscribe()),
        );
        if let Some(c) = &cluster {
            action_queue.set_shared(c.actions.clone());
            c.follow(events.clone());
            // Status cluster-wide: links from the ownership directory,
            // heartbeats shared between gateways.
            let st = Arc::downgrade(&status);
            c.ownership.set_on_link(move |uuid, up, endpoint, reach| {
                if let Some(status) = st.upgrade() {
                    status.link_from_cluster(uuid, up, endpoint, reach);
                }
            });
            crate::cluster::heartbeats::share(c.client.clone(), c.gateway_id.clone(), &status);
            // A dead gateway's devices: the reaper tells every survivor
            // where they were, as a stopping gateway would; they redial.
            let client = c.client.clone();
            let queue = action_queue.clone();
            c.ownership.set_on_reaped(move |gateway, boot, devices| {
                // Its deliveries under way: outcome unknown, never resent.
                tokio::spawn(
                    queue
                        .clone()
                        .gateway_lost(gateway.to_owned(), boot.to_owned()),
                );
                let (client, gateway, boot) = (client.clone(), gateway.to_owned(), boot.to_owned());
                tokio::spawn(async move {
                    crate::cluster::handover::send(&client, &gateway, &boot, devices).await;
                });
            });
            crate::cluster::handover::follow(
                c.client.clone(),
                crate::cluster::handover::Takeover {
                    me: c.gateway_id.clone(),
                    lease: c.lease.clone(),
                    path: Arc::downgrade(&path),
                    registry: registry.clone(),
                    rate: config.redial_rate,
                    handovers: c.handovers.clone(),
                    metrics: metrics.clone(),
                },
            );
            crate::cluster::counters::share(
                c.client.clone(),
                c.gateway_id.clone(),
                Arc::downgrade(&path),
                c.counters.clone(),
                Arc::downgrade(&c.ownership),
            );
            // After this gateway's lease was lost and taken again, claim the
            // devices still connected here again (survivors reaped them).
            let (lease, own, p) = (c.lease.clone(), c.ownership.clone(), Arc::downgrade(&path));
            tokio::spawn(async move {
                loop {
                    lease.regained.notified().await;
                    let Some(path) = p.upgrade() else { return };
                    let mut all = Vec::new();
                    path.sessions.collect_into(&mut all);
                    for s in all {
                        let snap = s.snapshot();
                        if snap.connected {
                            crate::packet_path::LinkObserver::link_changed(
                                &*own,
                                &s,
                                true,
                                snap.endpoint,
                                None,
                            );
                        }
                    }
                }
            });
        }
        tokio::spawn(action_queue.clone().run_expiry(stop_status.subscribe()));
        let sockets = crate::packet_path::udp_io::worker_sockets(udp, config.workers)
            .map_err(Error::Socket)?;
        // Read before the workers start: nothing has come up yet, so this is
        // exactly who was connected when the gateway last stopped.
        let targets = {
            let r = registry.clone();
            tokio::task::spawn_blocking(move || r.redial_targets())
                .await
                .map_err(|e| Error::Config(format!("redial list task failed: {e}")))??
        };
        let threads = PacketThreads::start(path.clone(), sockets).map_err(Error::Socket)?;
        let redialer = if targets.is_empty() || config.redial_rate == 0 {
            None
        } else {
            tracing::info!(
                devices = targets.len(),
                rate = config.redial_rate,
                "redialing the devices connected before the restart"
            );
            Some(
                crate::redial::spawn(path.clone(), targets, config.redial_rate.max(1))
                    .map_err(Error::Socket)?,
            )
        };
        let endpoints_task = tokio::spawn(endpoints.run(registry.clone(), stop_status.subscribe()));
        tokio::spawn(crate::memory::run(stop_status.subscribe()));
        // Scoped tokens: SQLite alone, the cluster's bucket in cluster mode.
        let tokens = match &cluster {
            None => {
                let r = registry.clone();
                let (table, records) =
                    tokio::task::spawn_blocking(move || crate::tokens::SqliteTokens::open(&r))
                        .await
                        .map_err(|e| Error::Config(format!("token table task failed: {e}")))??;
                let t = Arc::new(crate::tokens::Tokens::new(token.clone(), records));
                t.set_store(crate::tokens::TokenStore::Sqlite(Arc::new(table)));
                t
            }
            Some(c) => {
                let t = Arc::new(crate::tokens::Tokens::new(token.clone(), Vec::new()));
                crate::cluster::tokens::share(&c.jetstream, c.replicas, t.clone()).await?;
                t
            }
        };
        let audit = {
            let (r, e, keep) = (registry.clone(), events.clone(), config.audit_retention);
            Arc::new(
                tokio::task::spawn_blocking(move || crate::audit::AuditTrail::open(&r, e, keep))
                    .await
                    .map_err(|e| Error::Config(format!("audit table task failed: {e}")))??,
            )
        };
        if let Some(c) = &cluster {
            audit.share(
                crate::cluster::audit::SharedAudit::open(
                    &c.jetstream,
                    c.replicas,
                    config.audit_retention,
                    &c.gateway_id,
                )
                .await?,
            );
        }
        tokio::spawn(audit.clone().run_retention(stop_status.subscribe()));
        let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let api_state = Arc::new(ApiState {
            path: path.clone(),
            registry: registry.clone(),
            fleet,
            events: events.clone(),
            metrics,
            status,
            relay: relay.clone(),
            action_queue: action_queue.clone(),
            action_timeout: config.action_timeout,
            token,
            tokens: tokens.clone(),
            sign_ins: match &cluster {
                // Every gateway of the cluster checks the same cookies.
                Some(_) => crate::api::sign_in::SignIns::signed(session_key),
                None => Default::default(),
            },
            proxy: proxy_addr,
            gateway_id: gateway_id.clone(),
            handshake_rate: Default::default(),
            endpoint,
            ready: false.into(),
            cluster: cluster.clone(),
            event_streams: Arc::new(tokio::sync::Semaphore::new(config.max_event_streams)),
            metrics_auth: config.metrics_auth,
            audit: audit.clone(),
            draining: draining.clone(),
            sign_in_failures: Default::default(),
        });
        if let Some(c) = &cluster {
            tokio::spawn(crate::api::actions::serve_forwarded(
                Arc::downgrade(&api_state),
                c.client.clone(),
                c.gateway_id.clone(),
            ));
            crate::cluster::sign_outs::share(&c.jetstream, Arc::downgrade(&api_state), c.replicas)
                .await?;
        }
        let (stop_proxy, stop_proxy_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(crate::relay::proxy::serve(
            proxy,
            relay.clone(),
            api_state.metrics.clone(),
            Arc::new(crate::relay::proxy::ProxyConfig {
                tokens: tokens.clone(),
                allow_ports: config.allow_ports.clone(),
                draining: draining.clone(),
                audit: Some(audit.clone()),
                gateway_id: gateway_id.clone(),
                route: cluster.as_ref().map(|c| {
                    Arc::new(crate::cluster::routing::ProxyRoute {
                        me: c.gateway_id.clone(),
                        ownership: c.ownership.clone(),
                        lease: c.lease.clone(),
                    }) as Arc<dyn crate::relay::proxy::Route>
                }),
            }),
            stop_proxy_rx,
        ));
        let app = api::router(api_state.clone());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let api_task = tokio::spawn(crate::api::server::serve(
            api,
            app,
            config.api_limits,
            api_state.metrics.clone(),
            stop_rx,
            std::time::Duration::from_secs(5),
        ));
        api_state.ready.store(true, Ordering::Release);
        tracing::info!(
            udp = %udp_addr,
            api = %api_addr,
            proxy = %proxy_addr,
            gateway = %gateway_id,
            public_key = %encode_key(path.public_key().as_bytes()),
            address = %plan.gateway(),
            devices = registry.count(),
            "cloudlink gateway serving"
        );
        Ok(Gateway {
            path,
            api_state,
            threads: Some(threads),
            api_addr,
            udp_addr,
            stop_api: Some(stop_tx),
            stop_status,
            stop_proxy,
            proxy_addr,
            relay,
            status_task: Some(status_task),
            api_task: Some(api_task),
            endpoints_task: Some(endpoints_task),
            redialer,
            cluster,
            draining,
            drain_timeout: config.drain_timeout,
        })
    }

    pub fn api_addr(&self) -> std::net::SocketAddr {
        self.api_addr
    }
    pub fn udp_addr(&self) -> std::net::SocketAddr {
        self.udp_addr
    }
    pub fn proxy_addr(&self) -> std::net::SocketAddr {
        self.proxy_addr
    }
    pub fn token(&self) -> &str {
        &self.api_state.token
    }
    /// The device-lifecycle service (what the API, a CLI or the cluster call).
    pub fn fleet(&self) -> &Arc<crate::fleet::Fleet> {
        &self.api_state.fleet
    }

    /// Clean stop: not ready, packet threads stopped, `link.down`
    /// (`shutdown`) for every up link, event streams drained and ended, API
    /// stopped.
    pub async fn shutdown(mut self) {
        self.api_state.ready.store(false, Ordering::Release);
        // Drain: no new relay streams or actions (503), open streams may
        // finish for up to --drain-timeout; then they are ended.
        self.draining.store(true, Ordering::Release);
        let open = self.path.metrics.relay_streams.get();
        if open > 0 && !self.drain_timeout.is_zero() {
            tracing::info!(streams = open, timeout = ?self.drain_timeout, "draining: waiting for open relay streams to finish");
            let deadline = tokio::time::Instant::now() + self.drain_timeout;
            while self.path.metrics.relay_streams.get() > 0
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let left = self.path.metrics.relay_streams.get();
            if left > 0 {
                tracing::warn!(
                    streams = left,
                    "drain timeout: ending the relay streams still open"
                );
            }
        }
        let _ = self.stop_proxy.send(true);
        if let Some(r) = self.redialer.take() {
            let _ = tokio::task::spawn_blocking(move || r.stop()).await;
        }
        self.relay.shutdown();
        if let Some(t) = self.threads.take() {
            let _ = tokio::task::spawn_blocking(move || t.stop()).await;
        }
        // Cluster mode with other gateways alive: hand the devices over
        // (they come back there as `link.moved`); alone: `link.down`.
        match self.cluster.as_ref().filter(|c| c.lease.alive().len() > 1) {
            Some(c) => {
                let devices = self.path.hand_over_all(std::time::Instant::now());
                self.path
                    .metrics
                    .cluster_handed_over
                    .inc_by(devices.len() as u64);
                crate::cluster::handover::send(&c.client, &c.gateway_id, &c.lease.boot, devices)
                    .await;
            }
            None => self.path.shutdown(std::time::Instant::now()),
        }
        // Persist the last heartbeat times before the event stream closes.
        let _ = self.stop_status.send(true);
        if let Some(task) = self.status_task.take() {
            let _ = task.await;
        }
        if let Some(task) = self.endpoints_task.take() {
            let _ = task.await;
        }
        self.path.events.close();
        if let Some(tx) = self.stop_api.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.api_task.take() {
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                tracing::warn!("API connections did not close within 5 s");
            }
        }
        if let Some(c) = &self.cluster {
            c.leave().await;
        }
        tracing::info!("cloudlink gateway stopped");
    }
}

/// `--token`, else `--token-file`, else `<data-dir>/api-token` (generated on
/// first start, mode 0600; its path is logged, never its value).
fn resolve_token(config: &GatewayConfig, dir: &Path) -> Result<String, Error> {
    if let Some(t) = &config.token {
        return Ok(t.clone());
    }
    let (path, generate) = match &config.token_file {
        Some(p) => (p.clone(), false),
        None => (dir.join("api-token"), true),
    };
    match std::fs::read_to_string(&path) {
        Ok(t) => {
            let t = t.trim().to_owned();
            check_token(&t).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
            Ok(t)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && generate => {
            let mut bytes = [0u8; 32];
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
            let t: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            write_secret_file(&path, format!("{t}\n").as_bytes())?;
            tracing::info!(path = %path.display(), "generated an API token; send it as `Authorization: Bearer <token>`");
            Ok(t)
        }
        Err(e) => Err(Error::io(&path, e)),
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc == 0 {
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        if let Ok(s) = std::str::from_utf8(&buf[..end]) {
            if !s.is_empty() {
                return s.to_owned();
            }
        }
    }
    "localhost".into()
}

/// A random id for this boot of the gateway.
fn boot_epoch() -> String {
    let mut b = [0u8; 8];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}
