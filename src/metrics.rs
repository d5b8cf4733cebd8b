//! Prometheus metrics. Each gateway owns its own `prometheus::Registry` (not
//! the process-global one), so several gateways can run in one test process.
//!
//! Labelled children are resolved once here, so the packet path increments a
//! plain atomic and never hashes label values per packet.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Reasons a datagram or decrypted packet is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Not a WireGuard message, or of the wrong size.
    Malformed,
    /// A handshake whose mac1 does not match our public key.
    InvalidMac,
    /// A handshake that could not be decrypted or was replayed.
    HandshakeFailed,
    /// A handshake from a key that is not registered.
    UnknownKey,
    /// Under load and no valid cookie (mac2).
    UnderLoad,
    /// A transport packet for a session index we do not have.
    UnknownSession,
    /// A transport packet that did not decrypt (bad tag, replayed counter).
    DecryptFailed,
    /// A decrypted packet whose inner source is not the device's address.
    SpoofedSource,
    /// A decrypted packet for somebody other than the gateway.
    NotForGateway,
    /// A decrypted packet the gateway does not handle (IPv6 so far).
    Unsupported,
    /// A TCP segment for a relay stream that no longer exists.
    NoStream,
    /// A handshake initiation that found the handshake queue full.
    HandshakeQueueFull,
    /// Under load, an initiation from a source address that spent its
    /// budget (not a device's known endpoint).
    SourceBudget,
}

impl DropReason {
    pub const ALL: [DropReason; 13] = [
        DropReason::Malformed,
        DropReason::InvalidMac,
        DropReason::HandshakeFailed,
        DropReason::UnknownKey,
        DropReason::UnderLoad,
        DropReason::UnknownSession,
        DropReason::DecryptFailed,
        DropReason::SpoofedSource,
        DropReason::NotForGateway,
        DropReason::Unsupported,
        DropReason::NoStream,
        DropReason::HandshakeQueueFull,
        DropReason::SourceBudget,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::InvalidMac => "invalid_mac",
            DropReason::HandshakeFailed => "handshake_failed",
            DropReason::UnknownKey => "unknown_key",
            DropReason::UnderLoad => "under_load",
            DropReason::UnknownSession => "unknown_session",
            DropReason::DecryptFailed => "decrypt_failed",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::NotForGateway => "not_for_gateway",
            DropReason::Unsupported => "unsupported",
            DropReason::NoStream => "no_stream",
            DropReason::HandshakeQueueFull => "handshake_queue_full",
            DropReason::SourceBudget => "source_budget",
        }
    }

    /// The `reason` label on `/metrics`, which needs no credentials. A
    /// transport datagram naming no session and one naming a session that
    /// failed to decrypt share `unauthenticated`: telling them apart would
    /// let anyone find valid session indices.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::UnknownSession | DropReason::DecryptFailed => "unauthenticated",
            r => r.as_str(),
        }
    }
}

/// Results of handshake initiations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeResult {
    /// Answered with a handshake response.
    Completed,
    /// Key not registered: dropped silently.
    UnknownKey,
    /// mac1 wrong, decryption failed or replayed timestamp.
    Invalid,
    /// Under load: answered with a cookie reply instead.
    Cookie,
    /// Under load without a source address to send a cookie to.
    RateLimited,
}

impl HandshakeResult {
    pub const ALL: [HandshakeResult; 5] = [
        HandshakeResult::Completed,
        HandshakeResult::UnknownKey,
        HandshakeResult::Invalid,
        HandshakeResult::Cookie,
        HandshakeResult::RateLimited,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeResult::Completed => "completed",
            HandshakeResult::UnknownKey => "unknown_key",
            HandshakeResult::Invalid => "invalid",
            HandshakeResult::Cookie => "cookie",
            HandshakeResult::RateLimited => "rate_limited",
        }
    }
}

/// How a handshake initiation found its device's session
/// (`cloudlink_handshake_lookups_total{how}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLookup {
    /// Endpoint and sender-index prefix of the device's last initiation.
    IndexHint = 0,
    /// The only device at the initiation's source.
    Endpoint = 1,
    /// `parse_handshake_anon`: one Diffie-Hellman to learn the key.
    Key = 2,
    /// A hint or an endpoint named a device whose tunnel refused it.
    Missed = 3,
}

impl KeyLookup {
    pub const ALL: [KeyLookup; 4] = [
        KeyLookup::IndexHint,
        KeyLookup::Endpoint,
        KeyLookup::Key,
        KeyLookup::Missed,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            KeyLookup::IndexHint => "index_hint",
            KeyLookup::Endpoint => "endpoint",
            KeyLookup::Key => "key",
            KeyLookup::Missed => "missed",
        }
    }
}

/// Results of actions (`cloudlink_actions_total{result}`).
pub const ACTION_RESULTS: [&str; 11] = [
    "device_answered",
    "queued",
    "cloudlink_unavailable",
    "device_unreachable",
    "device_timeout",
    "device_bad_answer",
    "unknown_device",
    "failed",
    "expired",
    "unknown",
    "too_many_streams",
];

/// Results of relay stream requests (CONNECT answers).
pub const RELAY_RESULTS: [&str; 9] = [
    "ok",
    "bad_request",
    "unauthorized",
    "forbidden",
    "unknown_device",
    "unavailable",
    "refused",
    "timeout",
    // Refused by --max-relay-streams or --max-device-streams.
    "limited",
];

pub const LINK_EVENT_TYPES: [&str; 4] = ["link.up", "link.down", "link.roamed", "link.moved"];

pub struct Metrics {
    pub registry: Registry,
    pub sessions: IntGauge,
    /// Handshake initiations waiting in the queue.
    pub handshake_queue: IntGauge,
    /// Handshakes the gateway initiated after a restart.
    pub redials: IntCounter,
    /// Children in the order of `status::Status::NAMES`.
    pub devices_by_status: Vec<IntGauge>,
    pub devices_registered: IntGauge,
    pub rx_bytes: IntCounter,
    pub tx_bytes: IntCounter,
    pub rx_packets: IntCounter,
    pub tx_packets: IntCounter,
    /// Immediate actions by action and result.
    pub actions: IntCounterVec,
    /// Time to deliver an action and get the device's answer.
    pub action_duration: prometheus::Histogram,
    /// Relay streams open now.
    pub relay_streams: IntGauge,
    pub relay_bytes_to_device: IntCounter,
    pub relay_bytes_from_device: IntCounter,
    /// Bytes held back by per-device bandwidth limits: `[to_device,
    /// from_device]` × `[shaped, policed]` (see [`Metrics::throttled`]).
    throttled_bytes: [[IntCounter; 2]; 2],
    /// Cluster mode (0 when the gateway runs alone): gateways whose lease
    /// is live, this one's included.
    pub cluster_gateways_alive: IntGauge,
    /// Round trip of the last lease refresh (a JetStream write), seconds.
    pub cluster_nats_rtt: prometheus::Gauge,
    /// Times another process took this gateway's lease.
    pub cluster_lease_lost: IntCounter,
    /// Event stream consumers told to `resync` (they fell too far behind,
    /// or resumed from an id this bus no longer has).
    pub event_resyncs: IntCounter,
    /// Devices this gateway holds in the cluster's ownership directory.
    pub cluster_owned: IntGauge,
    /// Devices of gateways whose lease expired that this gateway marked down.
    pub cluster_reaped: IntCounter,
    /// Devices in the cluster's ownership directory (connected anywhere).
    pub cluster_directory: IntGauge,
    /// Events waiting to reach the cluster's stream (NATS unreachable).
    pub cluster_events_buffered: IntGauge,
    /// Events dropped because the buffer was full.
    pub cluster_events_dropped: IntCounter,
    /// Requests sent on to the gateway holding the device, by kind.
    cluster_forwarded: IntCounterVec,
    /// API connections open now.
    pub api_connections: IntGauge,
    /// Event streams open now.
    pub api_event_streams: IntGauge,
    /// API connections or requests refused by a bound, by reason.
    api_refused: IntCounterVec,
    /// API connections closed by a timeout, by kind.
    api_timeouts: IntCounterVec,
    /// Devices this gateway handed over when it stopped.
    pub cluster_handed_over: IntCounter,
    /// Devices this gateway redialled to take them over from one that
    /// stopped.
    pub cluster_takeovers: IntCounter,
    relay_results: Vec<IntCounter>,
    handshakes: Vec<IntCounter>,
    /// How initiations found their device, in the order of
    /// [`KeyLookup::ALL`].
    key_lookups: Vec<IntCounter>,
    dropped: Vec<IntCounter>,
    /// The same, one counter per reason, for the gateway's own use (tests,
    /// the fuzz harness): `/metrics` shows some reasons under one label.
    dropped_exact: Vec<std::sync::atomic::AtomicU64>,
    link_events: Vec<IntCounter>,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        // `cloudlink_build_info{version}` 1: which build runs where (a
        // rollout's progress, a dashboard's version column).
        {
            let info = prometheus::IntGaugeVec::new(
                Opts::new(
                    "cloudlink_build_info",
                    "The running build: 1, labelled with its version.",
                ),
                &["version"],
            )
            .expect("valid metric");
            info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
            registry.register(Box::new(info)).expect("unique metric");
        }
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let vec = |name: &str, help: &str, label: &str, values: &[&str]| {
            let v = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            registry
                .register(Box::new(v.clone()))
                .expect("unique metric");
            values
                .iter()
                .map(|l| v.with_label_values(&[l]))
                .collect::<Vec<_>>()
        };
        let by_status = prometheus::IntGaugeVec::new(
            Opts::new(
                "cloudlink_devices_by_status",
                "Registered devices by derived status (heartbeat and cloudlink).",
            ),
            &["status"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(by_status.clone()))
            .expect("unique metric");
        let relay_bytes = prometheus::IntCounterVec::new(
            Opts::new(
                "cloudlink_relay_bytes_total",
                "Bytes relayed between clients and devices, by direction.",
            ),
            &["direction"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(relay_bytes.clone()))
            .expect("unique metric");
        let throttled = prometheus::IntCounterVec::new(
            Opts::new(
                "cloudlink_throttled_bytes_total",
                "Bytes held back by per-device bandwidth limits, by direction and how: shaped (relay bytes that waited for the device's bucket before they moved) or policed (bytes of other packets dropped).",
            ),
            &["direction", "how"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(throttled.clone()))
            .expect("unique metric");
        let actions = IntCounterVec::new(
            Opts::new(
                "cloudlink_actions_total",
                "Immediate actions, by action and result (device_answered, queued, cloudlink_unavailable, device_unreachable, device_timeout, device_bad_answer, unknown_device, failed, expired, unknown, too_many_streams).",
            ),
            &["action", "result"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(actions.clone()))
            .expect("unique metric");
        // Every series from the start, at 0: dashboards and alerts see 0,
        // not "no data", before the first action.
        for action in crate::actions::Action::NAMES {
            for result in ACTION_RESULTS {
                actions.with_label_values(&[action, result]);
            }
        }
        let action_duration = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new(
                "cloudlink_action_duration_seconds",
                "Time from starting an action's delivery to the device's answer.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(action_duration.clone()))
            .expect("unique metric");
        Metrics {
            actions,
            action_duration,
            relay_streams: gauge("cloudlink_relay_streams", "Relay streams open now."),
            cluster_gateways_alive: gauge(
                "cloudlink_cluster_gateways_alive",
                "Cluster mode: gateways whose liveness lease is live, this one included (0 when running alone).",
            ),
            cluster_nats_rtt: {
                let g = prometheus::Gauge::new(
                    "cloudlink_cluster_nats_rtt_seconds",
                    "Cluster mode: round trip of the last lease refresh, a JetStream KV write.",
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            cluster_owned: gauge(
                "cloudlink_cluster_owned_devices",
                "Cluster mode: devices this gateway holds in the cluster's ownership directory.",
            ),
            cluster_reaped: counter(
                "cloudlink_cluster_reaped_devices_total",
                "Cluster mode: devices of a gateway whose lease expired that this gateway marked down (gateway_lost).",
            ),
            cluster_directory: gauge(
                "cloudlink_cluster_directory_devices",
                "Cluster mode: devices in the cluster's ownership directory (connected through any gateway), as this gateway sees it.",
            ),
            cluster_events_buffered: gauge(
                "cloudlink_cluster_events_buffered",
                "Cluster mode: events published here that wait to reach the cluster's stream (NATS unreachable).",
            ),
            cluster_events_dropped: counter(
                "cloudlink_cluster_events_dropped_total",
                "Cluster mode: events dropped because the buffer for an unreachable NATS was full.",
            ),
            cluster_forwarded: {
                let v = IntCounterVec::new(
                    prometheus::Opts::new(
                        "cloudlink_cluster_forwarded_total",
                        "Cluster mode: requests this gateway sent on to the gateway holding the device, by kind.",
                    ),
                    &["kind"],
                )
                .expect("valid metric");
                registry
                    .register(Box::new(v.clone()))
                    .expect("unique metric");
                for kind in ["action", "connect"] {
                    v.with_label_values(&[kind]);
                }
                v
            },
            api_connections: gauge(
                "cloudlink_api_connections",
                "API connections open now (at most --api-max-connections).",
            ),
            api_event_streams: gauge(
                "cloudlink_api_event_streams",
                "Event streams (GET /v1/events) open now (at most --max-event-streams).",
            ),
            api_refused: {
                let v = IntCounterVec::new(
                    prometheus::Opts::new(
                        "cloudlink_api_refused_total",
                        "API connections or requests refused by a bound: max_connections (closed at once), event_streams (503), sign_in_throttled (429).",
                    ),
                    &["reason"],
                )
                .expect("valid metric");
                registry
                    .register(Box::new(v.clone()))
                    .expect("unique metric");
                for r in ["max_connections", "event_streams", "sign_in_throttled"] {
                    v.with_label_values(&[r]);
                }
                v
            },
            api_timeouts: {
                let v = IntCounterVec::new(
                    prometheus::Opts::new(
                        "cloudlink_api_timeouts_total",
                        "API connections closed because a request head (header) or body (body) did not arrive in time, or nothing moved (idle).",
                    ),
                    &["kind"],
                )
                .expect("valid metric");
                registry
                    .register(Box::new(v.clone()))
                    .expect("unique metric");
                for k in ["header", "body", "idle"] {
                    v.with_label_values(&[k]);
                }
                v
            },
            cluster_handed_over: counter(
                "cloudlink_cluster_handed_over_devices_total",
                "Cluster mode: devices this gateway handed over to the others when it stopped cleanly.",
            ),
            cluster_takeovers: counter(
                "cloudlink_cluster_takeover_redials_total",
                "Cluster mode: devices this gateway redialled to take them over from a gateway that stopped.",
            ),
            event_resyncs: counter(
                "cloudlink_event_resyncs_total",
                "Event stream consumers told to resync (reload the listing and resume from its as_of): they fell too far behind or resumed from an id this bus no longer has.",
            ),
            cluster_lease_lost: counter(
                "cloudlink_cluster_lease_lost_total",
                "Cluster mode: times another process took this gateway's liveness lease (two gateways with one --gateway-id).",
            ),
            relay_bytes_to_device: relay_bytes.with_label_values(&["to_device"]),
            relay_bytes_from_device: relay_bytes.with_label_values(&["from_device"]),
            throttled_bytes: ["to_device", "from_device"].map(|d| {
                ["shaped", "policed"].map(|h| throttled.with_label_values(&[d, h]))
            }),
            relay_results: vec(
                "cloudlink_relay_streams_total",
                "Relay stream requests, by result.",
                "result",
                &RELAY_RESULTS,
            ),
            devices_by_status: crate::status::Status::NAMES
                .iter()
                .map(|n| by_status.with_label_values(&[n]))
                .collect(),
            sessions: gauge(
                "cloudlink_sessions",
                "Devices whose cloudlink is up (link state up).",
            ),
            devices_registered: gauge("cloudlink_devices_registered", "Devices in the registry."),
            handshake_queue: gauge(
                "cloudlink_handshake_queue",
                "Handshake initiations admitted and waiting for a worker.",
            ),
            redials: counter(
                "cloudlink_redials_total",
                "Handshakes the gateway initiated to devices connected before it restarted.",
            ),
            rx_bytes: counter(
                "cloudlink_rx_bytes_total",
                "Bytes of WireGuard datagrams received from devices.",
            ),
            tx_bytes: counter(
                "cloudlink_tx_bytes_total",
                "Bytes of WireGuard datagrams sent to devices.",
            ),
            rx_packets: counter(
                "cloudlink_rx_packets_total",
                "WireGuard datagrams received.",
            ),
            tx_packets: counter("cloudlink_tx_packets_total", "WireGuard datagrams sent."),
            key_lookups: vec(
                "cloudlink_handshake_lookups_total",
                "Handshake initiations by how their device's session was found: index_hint and endpoint spare a Diffie-Hellman, key spends one to learn the initiator's key, missed counts guesses that named another device (one Diffie-Hellman lost).",
                "how",
                &KeyLookup::ALL.map(KeyLookup::as_str),
            ),
            handshakes: vec(
                "cloudlink_handshakes_total",
                "Handshake initiations received, by result.",
                "result",
                &HandshakeResult::ALL.map(HandshakeResult::as_str),
            ),
            dropped: vec(
                "cloudlink_packets_dropped_total",
                "Datagrams or decrypted packets dropped, by reason.",
                "reason",
                &DropReason::ALL.map(DropReason::label),
            ),
            dropped_exact: DropReason::ALL.iter().map(|_| Default::default()).collect(),
            link_events: vec(
                "cloudlink_link_events_total",
                "Link events published, by type.",
                "type",
                &LINK_EVENT_TYPES,
            ),
            registry,
        }
    }

    pub fn dropped(&self, reason: DropReason) {
        let i = DropReason::ALL.iter().position(|r| *r == reason).unwrap();
        self.dropped[i].inc();
        self.dropped_exact[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    /// Drops for exactly `reason` (not its shared `/metrics` label).
    pub fn dropped_count(&self, reason: DropReason) -> u64 {
        let i = DropReason::ALL.iter().position(|r| *r == reason).unwrap();
        self.dropped_exact[i].load(std::sync::atomic::Ordering::Relaxed)
    }
    pub fn handshake(&self, result: HandshakeResult) {
        self.handshakes[HandshakeResult::ALL
            .iter()
            .position(|r| *r == result)
            .unwrap()]
        .inc();
    }
    pub fn handshake_count(&self, result: HandshakeResult) -> u64 {
        self.handshakes[HandshakeResult::ALL
            .iter()
            .position(|r| *r == result)
            .unwrap()]
        .get()
    }
    pub fn key_lookup(&self, how: KeyLookup) {
        self.key_lookups[how as usize].inc();
    }
    pub fn key_lookup_count(&self, how: KeyLookup) -> u64 {
        self.key_lookups[how as usize].get()
    }
    pub fn relay_result(&self, result: &str) {
        if let Some(i) = RELAY_RESULTS.iter().position(|r| *r == result) {
            self.relay_results[i].inc();
        }
    }

    pub fn action(&self, action: &str, result: &str) {
        self.actions.with_label_values(&[action, result]).inc();
    }

    /// Bytes a device's bandwidth limit held back: shaped (delayed) or
    /// policed (dropped).
    pub fn throttled(&self, to_device: bool, policed: bool, n: u64) {
        self.throttled_bytes[usize::from(!to_device)][usize::from(policed)].inc_by(n);
    }

    /// An API connection or request refused by a bound.
    pub fn api_refused(&self, reason: &str) {
        self.api_refused.with_label_values(&[reason]).inc();
    }

    /// An API connection closed by a timeout (`header`, `body`, `idle`).
    pub fn api_timeout(&self, kind: &str) {
        self.api_timeouts.with_label_values(&[kind]).inc();
    }

    /// A request sent on to the device's gateway (`action`, `connect`).
    pub fn cluster_forwarded(&self, kind: &str) {
        self.cluster_forwarded.with_label_values(&[kind]).inc();
    }

    pub fn link_event(&self, kind: &str) {
        if let Some(i) = LINK_EVENT_TYPES.iter().position(|t| *t == kind) {
            self.link_events[i].inc();
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
