//! Command line, environment and configuration file.
//!
//! Every `serve` setting can come from a flag, from a `CLOUDLINK_*`
//! environment variable, or from the TOML file named by `--config`, in that
//! order of precedence, falling back to the embedded defaults. The file uses
//! the flag names as keys (`listen = "0.0.0.0:51820"`, `link-timeout =
//! "90s"`); an unknown key is an error, so a typo never goes unnoticed.

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::Error;

#[derive(Debug, Parser)]
#[command(
    name = "cloudlink",
    version,
    about = "WireGuard tunnel gateway for device fleets"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
// Parsed once per process: the size of the variants does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run the gateway.
    Serve(ServeArgs),
    #[command(flatten)]
    Client(crate::cli::CliCommand),
    /// Run on a device: dial the gateway and forward ports to local services.
    Agent(AgentArgs),
    /// Simulate a fleet of WireGuard devices against a gateway (load tests).
    Loadgen(LoadgenArgs),
    /// Print a new private key (like `wg genkey`).
    Genkey,
    /// Read a private key on stdin, print its public key (like `wg pubkey`).
    Pubkey,
    /// Print shell completions (bash, zsh, fish, elvish, powershell)
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `cloudlink man > cloudlink.1`
    Man,
}

/// `cloudlink serve` flags. All optional here: defaults are applied after
/// merging with the configuration file (see [`ServeArgs::resolve`]).
#[derive(Debug, Default, Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServeArgs {
    /// TOML file with any of these settings (flag names as keys).
    #[arg(long, env = "CLOUDLINK_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// UDP address WireGuard devices dial [default: 0.0.0.0:51820]
    #[arg(long, env = "CLOUDLINK_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// HTTP control API address [default: 127.0.0.1:8080]
    #[arg(long, env = "CLOUDLINK_API")]
    pub api: Option<SocketAddr>,
    /// Directory for the registry, the gateway key and the API token [default: ./cloudlink-data]
    #[arg(long, env = "CLOUDLINK_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Tunnel network; the gateway takes its first host address [default: 10.240.0.0/12]
    #[arg(long, env = "CLOUDLINK_TUNNEL_CIDR", value_parser = parse_tunnel_cidr)]
    pub tunnel_cidr: Option<ipnet::Ipv4Net>,
    /// Public host:port written into device configs [default: this host's name and the UDP port]
    #[arg(long, env = "CLOUDLINK_ENDPOINT")]
    pub endpoint: Option<String>,
    /// A link is down after this long without an authenticated packet [default: 90s]
    #[arg(long, env = "CLOUDLINK_LINK_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(default, with = "opt_duration")]
    pub link_timeout: Option<Duration>,
    /// Bearer token for the API (prefer --token-file: flags show in `ps`)
    #[arg(long, env = "CLOUDLINK_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the API bearer token [default: <data-dir>/api-token, generated on first start]
    #[arg(long, env = "CLOUDLINK_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Name of this gateway in events [default: the host name]
    #[arg(long, env = "CLOUDLINK_GATEWAY_ID")]
    pub gateway_id: Option<String>,
    /// Events kept for consumers that resume with Last-Event-ID [default: 100000]
    #[arg(long, env = "CLOUDLINK_EVENT_RING")]
    pub event_ring: Option<usize>,
    /// Handshake initiations per second above which cookie replies are demanded, besides the queue's own load signal; 0 for none [default: 0]
    #[arg(long, env = "CLOUDLINK_HANDSHAKE_RATE_LIMIT")]
    pub handshake_rate_limit: Option<u64>,
    /// Handshake initiations that may wait for a worker; cookie replies from 1/8 full, drops when full [default: 4096]
    #[arg(long, env = "CLOUDLINK_HANDSHAKE_QUEUE")]
    pub handshake_queue: Option<usize>,
    /// Handshakes per second the gateway initiates after a restart, to devices that were connected; 0 turns it off [default: 4000]
    #[arg(long, env = "CLOUDLINK_REDIAL_RATE")]
    pub redial_rate: Option<u32>,
    /// Packet worker threads, each with its own SO_REUSEPORT socket [default: number of CPUs]
    #[arg(long, env = "CLOUDLINK_WORKERS")]
    pub workers: Option<usize>,
    /// HTTP CONNECT proxy to devices' TCP ports [default: 127.0.0.1:3128]
    #[arg(long, env = "CLOUDLINK_PROXY")]
    pub proxy: Option<SocketAddr>,
    /// Device ports the proxy may reach, comma-separated [default: 22,22222,48484]
    #[arg(long, env = "CLOUDLINK_ALLOW_PORTS", value_delimiter = ',')]
    pub allow_ports: Option<Vec<u16>>,
    /// How long the proxy waits for a device to accept a connection [default: 10s]
    #[arg(long, env = "CLOUDLINK_CONNECT_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(default, with = "opt_duration")]
    pub connect_timeout: Option<Duration>,
    /// A request head must arrive within this long, or the API connection is closed [default: 10s]
    #[arg(long, env = "CLOUDLINK_API_HEADER_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(default, with = "opt_duration")]
    pub api_header_timeout: Option<Duration>,
    /// A request body must arrive whole within this long of its head [default: 30s]
    #[arg(long, env = "CLOUDLINK_API_BODY_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(default, with = "opt_duration")]
    pub api_body_timeout: Option<Duration>,
    /// An API connection with no byte either way for this long is closed [default: 120s]
    #[arg(long, env = "CLOUDLINK_API_IDLE_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(default, with = "opt_duration")]
    pub api_idle_timeout: Option<Duration>,
    /// API connections open at once; beyond, new ones are closed at once [default: 4096]
    #[arg(long, env = "CLOUDLINK_API_MAX_CONNECTIONS")]
    pub api_max_connections: Option<usize>,
    /// API connections open at once from one source address; beyond, new ones from it are closed at once (raise it behind a reverse proxy, whose connections all come from its address) [default: 128]
    #[arg(long, env = "CLOUDLINK_API_MAX_CONNECTIONS_PER_IP")]
    pub api_max_connections_per_ip: Option<usize>,
    /// Event streams (`GET /v1/events`) open at once; beyond, 503 [default: 256]
    #[arg(long, env = "CLOUDLINK_MAX_EVENT_STREAMS")]
    pub max_event_streams: Option<usize>,
    /// On SIGTERM, how long open relay streams may go on (new streams and actions get 503) before they are ended [default: 30s]
    #[arg(long, env = "CLOUDLINK_DRAIN_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(default, with = "opt_duration")]
    pub drain_timeout: Option<Duration>,
    /// Relay streams (proxy and actions) open at once in all; beyond, 503 [default: 10000]
    #[arg(long, env = "CLOUDLINK_MAX_RELAY_STREAMS")]
    pub max_relay_streams: Option<usize>,
    /// Relay streams open at once to one device; beyond, 503 [default: 32]
    #[arg(long, env = "CLOUDLINK_MAX_DEVICE_STREAMS")]
    pub max_device_streams: Option<usize>,
    /// Bandwidth limit per device, each way, in kbit/s (relay streams are shaped, other traffic policed); a device's own `rate_limit_kbps` overrides it [default: 0, no limit]
    #[arg(long, env = "CLOUDLINK_DEVICE_RATE_LIMIT_KBPS")]
    pub device_rate_limit_kbps: Option<u32>,
    /// `/metrics` needs a token with the read scope (it is open by default, for scrapers on a private network)
    #[arg(long, env = "CLOUDLINK_METRICS_AUTH", num_args = 0..=1, default_missing_value = "true")]
    #[serde(default)]
    pub metrics_auth: Option<bool>,
    /// How long audit records are kept [default: 30d]
    #[arg(long, env = "CLOUDLINK_AUDIT_RETENTION", value_parser = humantime::parse_duration)]
    #[serde(default, with = "opt_duration")]
    pub audit_retention: Option<Duration>,
    /// Queued actions one device may have waiting; beyond, 429 [default: 100]
    #[arg(long, env = "CLOUDLINK_MAX_QUEUED_ACTIONS")]
    pub max_queued_actions: Option<usize>,
    /// How long an immediate action waits for the device's answer [default: 30s]
    #[arg(long, env = "CLOUDLINK_ACTION_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(default, with = "opt_duration")]
    pub action_timeout: Option<Duration>,
    /// Default heartbeat poll interval of devices (settable per device) [default: 900s]
    #[arg(long, env = "CLOUDLINK_POLL_INTERVAL", value_parser = humantime::parse_duration)]
    #[serde(default, with = "opt_duration")]
    pub poll_interval: Option<Duration>,
    /// After a heartbeat timed out, it is offline after this further grace [default: 15s]
    #[arg(long, env = "CLOUDLINK_HEARTBEAT_GRACE", value_parser = humantime::parse_duration)]
    #[serde(default, with = "opt_duration")]
    pub heartbeat_grace: Option<Duration>,
    /// Log filter (tracing's EnvFilter syntax); boringtun's own messages, which name no device, are shown only at error unless the filter names boringtun [default: info]
    #[arg(long, env = "CLOUDLINK_LOG")]
    pub log: Option<String>,
    /// The gateway's WireGuard private key, from a file (a mounted secret; every gateway of a cluster uses the same) [default: <data-dir>/gateway.key, generated on first start]
    #[arg(long, env = "CLOUDLINK_PRIVATE_KEY_FILE")]
    pub private_key_file: Option<PathBuf>,
    /// NATS servers (nats://host:port, comma-separated): turns on cluster mode [default: none, the gateway runs alone]
    #[arg(long, env = "CLOUDLINK_NATS", value_delimiter = ',')]
    pub nats: Option<Vec<String>>,
    /// NATS credentials file (.creds) for cluster mode
    #[arg(long, env = "CLOUDLINK_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// CA certificate (PEM) the NATS servers' TLS certificates are checked against; turns TLS on
    #[arg(long, env = "CLOUDLINK_NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,
    /// Cluster mode: a gateway whose liveness lease was not refreshed for this long is gone [default: 15s]
    #[arg(long, env = "CLOUDLINK_CLUSTER_LEASE", value_parser = humantime::parse_duration)]
    #[serde(default, with = "opt_duration")]
    pub cluster_lease: Option<Duration>,
    /// Cluster mode: copies JetStream keeps of the cluster's state (1 to 5) [default: 3 when the NATS cluster has at least 3 servers, else 1]
    #[arg(long, env = "CLOUDLINK_NATS_REPLICAS", value_parser = clap::value_parser!(u8).range(1..=5))]
    pub nats_replicas: Option<u8>,
}

/// `cloudlink loadgen` flags; environment variables are `CLOUDLINK_LOADGEN_*`.
#[derive(Debug, Args)]
pub struct LoadgenArgs {
    /// The gateway's WireGuard UDP address
    #[arg(
        long,
        env = "CLOUDLINK_LOADGEN_GATEWAY",
        default_value = "127.0.0.1:51820"
    )]
    pub gateway: SocketAddr,
    /// The gateway's API, to register the devices (http://host:port)
    #[arg(
        long,
        env = "CLOUDLINK_LOADGEN_API",
        default_value = "http://127.0.0.1:8080"
    )]
    pub api: String,
    /// API token
    #[arg(long, env = "CLOUDLINK_LOADGEN_TOKEN")]
    pub token: Option<String>,
    /// File holding the API token (instead of --token)
    #[arg(long, env = "CLOUDLINK_LOADGEN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Number of simulated devices
    #[arg(long, env = "CLOUDLINK_LOADGEN_DEVICES", default_value_t = 1000)]
    pub devices: usize,
    /// Devices started per second
    #[arg(long, env = "CLOUDLINK_LOADGEN_RATE", default_value_t = 1000.0)]
    pub rate: f64,
    /// Start every device at once (a reconnect storm)
    #[arg(long, env = "CLOUDLINK_LOADGEN_STORM")]
    pub storm: bool,
    /// Percent of the devices that drop and reconnect each minute
    #[arg(long, env = "CLOUDLINK_LOADGEN_CHURN", default_value_t = 0.0)]
    pub churn: f64,
    /// How long the run lasts (it always stops by then)
    #[arg(long, env = "CLOUDLINK_LOADGEN_DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// The gateway's process id, for its RSS and CPU time
    #[arg(long, env = "CLOUDLINK_LOADGEN_GATEWAY_PID")]
    pub gateway_pid: Option<u32>,
    /// Do not register through the API (another WireGuard server); needs --gateway-public-key and --keys
    #[arg(long, env = "CLOUDLINK_LOADGEN_NO_REGISTER")]
    pub no_register: bool,
    /// Device private keys, one per line: read if the file exists, else written
    #[arg(long, env = "CLOUDLINK_LOADGEN_KEYS")]
    pub keys: Option<PathBuf>,
    /// Write the fleet as `wg` [Peer] sections (for `wg setconf` on another server)
    #[arg(long, env = "CLOUDLINK_LOADGEN_WG_PEERS")]
    pub wg_peers: Option<PathBuf>,
    /// The server's public key, with --no-register
    #[arg(long, env = "CLOUDLINK_LOADGEN_GATEWAY_PUBLIC_KEY")]
    pub gateway_public_key: Option<String>,
    /// UDP sockets the devices share
    #[arg(long, env = "CLOUDLINK_LOADGEN_SOCKETS", default_value_t = 256)]
    pub sockets: usize,
    /// Distinct source addresses (127.1.x.y) the sockets bind to, on loopback
    #[arg(long, env = "CLOUDLINK_LOADGEN_SOURCE_IPS", default_value_t = 16)]
    pub source_ips: usize,
    /// Worker threads
    #[arg(long, env = "CLOUDLINK_LOADGEN_THREADS", default_value_t = 1)]
    pub threads: usize,
    /// Write connected devices over time (CSV: t_s,connected)
    #[arg(long, env = "CLOUDLINK_LOADGEN_TIMELINE")]
    pub timeline: Option<PathBuf>,
    /// End the run once every device is connected and --settle has passed
    #[arg(long, env = "CLOUDLINK_LOADGEN_EXIT_WHEN_CONNECTED")]
    pub exit_when_connected: bool,
    /// With --exit-when-connected: how long to stay connected before ending
    #[arg(long, env = "CLOUDLINK_LOADGEN_SETTLE", default_value = "0s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// Device uuids are this prefix and a 7-digit number
    #[arg(long, env = "CLOUDLINK_LOADGEN_UUID_PREFIX", default_value = "lg-")]
    pub uuid_prefix: String,
    /// Write "<seconds> <connected>" to this file twice a second
    #[arg(long, env = "CLOUDLINK_LOADGEN_STATUS_FILE")]
    pub status_file: Option<PathBuf>,
    /// With --exit-when-connected: wait for the --gateway-pid process to go away (a restart) and every device to be back
    #[arg(long, env = "CLOUDLINK_LOADGEN_AWAIT_RESTART")]
    pub await_restart: bool,
    /// Only write --keys and --wg-peers, then stop
    #[arg(long, env = "CLOUDLINK_LOADGEN_PREPARE_ONLY")]
    pub prepare_only: bool,
    /// Only register the devices (and write --keys), then stop: the devices dial later with --no-register, from where the API is not reachable
    #[arg(long, env = "CLOUDLINK_LOADGEN_REGISTER_ONLY")]
    pub register_only: bool,
    /// Only delete the devices an earlier run registered (every uuid starting with --uuid-prefix), then stop
    #[arg(long, env = "CLOUDLINK_LOADGEN_CLEANUP")]
    pub cleanup: bool,
    /// Rekey each session this old, as kernel and wireguard-go peers do with keepalives only ("0s": boringtun's own schedule, 180 s)
    #[arg(long, env = "CLOUDLINK_LOADGEN_REKEY_AFTER", default_value = "120s", value_parser = humantime::parse_duration)]
    pub rekey_after: Duration,
    /// Bind the sockets to host addresses of this network (already on an interface), --source-ips of them
    #[arg(long, env = "CLOUDLINK_LOADGEN_SOURCE_NET")]
    pub source_net: Option<ipnet::Ipv4Net>,
    /// Draw a random sender index for every handshake, as kernel and wireguard-go peers do (boringtun keeps the upper 24 bits for the life of a tunnel)
    #[arg(long, env = "CLOUDLINK_LOADGEN_RANDOM_INDEX")]
    pub random_index: bool,
}

impl LoadgenArgs {
    pub fn resolve(self) -> Result<crate::loadgen::LoadgenConfig, Error> {
        let token = match (self.token, &self.token_file) {
            (Some(t), _) => Some(t),
            (None, Some(p)) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| Error::io(p, e))?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        let gateway_public_key = self
            .gateway_public_key
            .as_deref()
            .map(crate::keys::decode_key)
            .transpose()
            .map_err(|e| Error::Config(format!("--gateway-public-key: {e}")))?;
        Ok(crate::loadgen::LoadgenConfig {
            gateway: self.gateway,
            api: Some(self.api),
            token,
            devices: self.devices,
            rate: self.rate,
            storm: self.storm,
            churn: self.churn,
            duration: self.duration,
            gateway_pid: self.gateway_pid,
            no_register: self.no_register,
            keys: self.keys,
            wg_peers: self.wg_peers,
            gateway_public_key,
            sockets: self.sockets,
            source_ips: self.source_ips,
            threads: self.threads,
            timeline: self.timeline,
            exit_when_connected: self.exit_when_connected,
            settle: self.settle,
            uuid_prefix: self.uuid_prefix,
            status_file: self.status_file,
            await_restart: self.await_restart,
            prepare_only: self.prepare_only,
            register_only: self.register_only,
            cleanup: self.cleanup,
            rekey_after: (!self.rekey_after.is_zero()).then_some(self.rekey_after),
            source_net: self.source_net,
            random_index: self.random_index,
        })
    }
}

/// `cloudlink agent` flags; environment variables are `CLOUDLINK_AGENT_*`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The wg-quick configuration the gateway handed out for this device
    #[arg(long, env = "CLOUDLINK_AGENT_CONFIG")]
    pub config: PathBuf,
    /// File with the device's private key (when the config holds the placeholder)
    #[arg(long, env = "CLOUDLINK_AGENT_PRIVATE_KEY_FILE")]
    pub private_key_file: Option<PathBuf>,
    /// Forward a tunnel port to a local service: PORT=HOST:PORT (repeatable; comma-separated in the environment)
    #[arg(
        long = "forward",
        env = "CLOUDLINK_AGENT_FORWARD",
        value_delimiter = ','
    )]
    pub forward: Vec<crate::agent::Forward>,
    /// Run COMMAND (with `sh -c`) for an immediate action: ACTION=COMMAND, ACTION one of reboot, shutdown, purge, restart, restart-service (repeatable; comma-separated in the environment)
    #[arg(
        long = "on-action",
        env = "CLOUDLINK_AGENT_ON_ACTION",
        value_delimiter = ','
    )]
    pub on_action: Vec<crate::agent::supervisor::Hook>,
    /// How long a hook (other than reboot and shutdown) may run
    #[arg(long, env = "CLOUDLINK_AGENT_HOOK_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30s")]
    pub hook_timeout: Duration,
    /// API key the agent's supervisor endpoint demands as `Authorization: Bearer`
    #[arg(
        long,
        env = "CLOUDLINK_AGENT_SUPERVISOR_API_KEY",
        hide_env_values = true
    )]
    pub supervisor_api_key: Option<String>,
    /// How often the agent checks that the gateway still answers
    #[arg(long, env = "CLOUDLINK_AGENT_LIVENESS_INTERVAL", value_parser = humantime::parse_duration, default_value = "10s")]
    pub liveness_interval: Duration,
    /// Log filter (tracing's EnvFilter syntax)
    #[arg(long, env = "CLOUDLINK_AGENT_LOG", default_value = "info")]
    pub log: String,
}

impl AgentArgs {
    pub fn resolve(&self) -> Result<crate::agent::AgentConfig, Error> {
        let text = std::fs::read_to_string(&self.config).map_err(|e| Error::io(&self.config, e))?;
        let wg = crate::agent::wg_quick::parse(&text)
            .map_err(|e| Error::Config(format!("{}: {e}", self.config.display())))?;
        let private_key = match (&self.private_key_file, wg.private_key) {
            (Some(path), _) => {
                let t = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
                crate::keys::decode_key(&t)
                    .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?
            }
            (None, Some(k)) => k,
            (None, None) => {
                return Err(Error::Config(format!(
                    "{} holds no private key: fill it in or give --private-key-file",
                    self.config.display()
                )))
            }
        };
        if self.liveness_interval < Duration::from_millis(100) {
            return Err(Error::Config(
                "--liveness-interval must be at least 100ms".into(),
            ));
        }
        Ok(crate::agent::AgentConfig {
            private_key,
            wg,
            forwards: self.forward.clone(),
            liveness_interval: self.liveness_interval,
            supervisor: crate::agent::supervisor::SupervisorConfig {
                hooks: self.on_action.clone(),
                api_key: self.supervisor_api_key.clone(),
                hook_timeout: self.hook_timeout,
            },
        })
    }
}

mod opt_duration {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// The resolved settings of a gateway.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    pub api: SocketAddr,
    pub data_dir: PathBuf,
    pub tunnel_cidr: ipnet::Ipv4Net,
    pub endpoint: Option<String>,
    pub link_timeout: Duration,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub gateway_id: Option<String>,
    pub event_ring: usize,
    pub handshake_rate_limit: u64,
    pub handshake_queue: usize,
    pub workers: usize,
    pub redial_rate: u32,
    pub poll_interval: Duration,
    pub heartbeat_grace: Duration,
    pub proxy: SocketAddr,
    pub allow_ports: Vec<u16>,
    pub connect_timeout: Duration,
    pub action_timeout: Duration,
    /// The API server's bounds.
    pub api_limits: crate::api::server::Limits,
    pub max_event_streams: usize,
    pub max_queued_actions: usize,
    pub max_relay_streams: usize,
    pub max_device_streams: usize,
    /// kbit/s each way; 0: no default limit.
    pub device_rate_limit_kbps: u32,
    pub metrics_auth: bool,
    pub audit_retention: Duration,
    pub drain_timeout: Duration,
    pub log: String,
    /// `--private-key-file`; `None`: `<data-dir>/gateway.key`.
    pub private_key_file: Option<PathBuf>,
    /// Cluster mode (`--nats`); `None`: the gateway runs alone.
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: "0.0.0.0:51820".parse().unwrap(),
            api: "127.0.0.1:8080".parse().unwrap(),
            data_dir: PathBuf::from("./cloudlink-data"),
            tunnel_cidr: "10.240.0.0/12".parse().unwrap(),
            endpoint: None,
            link_timeout: Duration::from_secs(90),
            token: None,
            token_file: None,
            gateway_id: None,
            event_ring: 100_000,
            handshake_rate_limit: 0,
            handshake_queue: crate::packet_path::admission::DEFAULT_QUEUE,
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            redial_rate: 4000,
            poll_interval: Duration::from_secs(900),
            heartbeat_grace: Duration::from_secs(15),
            proxy: "127.0.0.1:3128".parse().unwrap(),
            allow_ports: vec![22, 22222, 48484],
            connect_timeout: Duration::from_secs(10),
            action_timeout: Duration::from_secs(30),
            api_limits: crate::api::server::Limits::default(),
            max_event_streams: 256,
            max_queued_actions: 100,
            max_relay_streams: 10_000,
            max_device_streams: 32,
            device_rate_limit_kbps: 0,
            metrics_auth: false,
            audit_retention: Duration::from_secs(30 * 24 * 3600),
            drain_timeout: Duration::from_secs(30),
            log: "info".into(),
            private_key_file: None,
            cluster: None,
        }
    }
}

impl ServeArgs {
    /// Merges flags/environment over the configuration file over defaults.
    pub fn resolve(self) -> Result<GatewayConfig, Error> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
                ServeArgs::from_toml(&text)
                    .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?
            }
            None => ServeArgs::default(),
        };
        self.resolve_over(file)
    }

    /// Parses a configuration file's text (flag names as keys). No I/O,
    /// never panics (fuzzed: `fuzz/`).
    pub fn from_toml(text: &str) -> Result<ServeArgs, String> {
        toml::from_str::<ServeArgs>(text).map_err(|e| e.to_string())
    }

    /// Merges these flags over `file`'s settings over the defaults, and
    /// validates the result.
    pub fn resolve_over(self, file: ServeArgs) -> Result<GatewayConfig, Error> {
        let d = GatewayConfig::default();
        let c = GatewayConfig {
            listen: self.listen.or(file.listen).unwrap_or(d.listen),
            api: self.api.or(file.api).unwrap_or(d.api),
            data_dir: self.data_dir.or(file.data_dir).unwrap_or(d.data_dir),
            tunnel_cidr: self
                .tunnel_cidr
                .or(file.tunnel_cidr)
                .unwrap_or(d.tunnel_cidr),
            endpoint: self.endpoint.or(file.endpoint),
            link_timeout: self
                .link_timeout
                .or(file.link_timeout)
                .unwrap_or(d.link_timeout),
            token: self.token.or(file.token),
            token_file: self.token_file.or(file.token_file),
            gateway_id: self.gateway_id.or(file.gateway_id),
            event_ring: self.event_ring.or(file.event_ring).unwrap_or(d.event_ring),
            handshake_rate_limit: self
                .handshake_rate_limit
                .or(file.handshake_rate_limit)
                .unwrap_or(d.handshake_rate_limit),
            handshake_queue: self
                .handshake_queue
                .or(file.handshake_queue)
                .unwrap_or(d.handshake_queue),
            workers: self.workers.or(file.workers).unwrap_or(d.workers),
            redial_rate: self
                .redial_rate
                .or(file.redial_rate)
                .unwrap_or(d.redial_rate),
            poll_interval: self
                .poll_interval
                .or(file.poll_interval)
                .unwrap_or(d.poll_interval),
            heartbeat_grace: self
                .heartbeat_grace
                .or(file.heartbeat_grace)
                .unwrap_or(d.heartbeat_grace),
            proxy: self.proxy.or(file.proxy).unwrap_or(d.proxy),
            allow_ports: self
                .allow_ports
                .or(file.allow_ports)
                .unwrap_or(d.allow_ports),
            connect_timeout: self
                .connect_timeout
                .or(file.connect_timeout)
                .unwrap_or(d.connect_timeout),
            action_timeout: self
                .action_timeout
                .or(file.action_timeout)
                .unwrap_or(d.action_timeout),
            api_limits: crate::api::server::Limits {
                header_timeout: self
                    .api_header_timeout
                    .or(file.api_header_timeout)
                    .unwrap_or(d.api_limits.header_timeout),
                body_timeout: self
                    .api_body_timeout
                    .or(file.api_body_timeout)
                    .unwrap_or(d.api_limits.body_timeout),
                idle_timeout: self
                    .api_idle_timeout
                    .or(file.api_idle_timeout)
                    .unwrap_or(d.api_limits.idle_timeout),
                max_connections: self
                    .api_max_connections
                    .or(file.api_max_connections)
                    .unwrap_or(d.api_limits.max_connections),
                max_connections_per_ip: self
                    .api_max_connections_per_ip
                    .or(file.api_max_connections_per_ip)
                    .unwrap_or(d.api_limits.max_connections_per_ip),
            },
            max_event_streams: self
                .max_event_streams
                .or(file.max_event_streams)
                .unwrap_or(d.max_event_streams),
            max_queued_actions: self
                .max_queued_actions
                .or(file.max_queued_actions)
                .unwrap_or(d.max_queued_actions),
            drain_timeout: self
                .drain_timeout
                .or(file.drain_timeout)
                .unwrap_or(d.drain_timeout),
            max_relay_streams: self
                .max_relay_streams
                .or(file.max_relay_streams)
                .unwrap_or(d.max_relay_streams),
            max_device_streams: self
                .max_device_streams
                .or(file.max_device_streams)
                .unwrap_or(d.max_device_streams),
            device_rate_limit_kbps: self
                .device_rate_limit_kbps
                .or(file.device_rate_limit_kbps)
                .unwrap_or(d.device_rate_limit_kbps),
            metrics_auth: self
                .metrics_auth
                .or(file.metrics_auth)
                .unwrap_or(d.metrics_auth),
            audit_retention: self
                .audit_retention
                .or(file.audit_retention)
                .unwrap_or(d.audit_retention),
            log: self.log.or(file.log).unwrap_or(d.log),
            private_key_file: self.private_key_file.or(file.private_key_file),
            cluster: {
                let creds = self.nats_creds.or(file.nats_creds);
                let tls_ca = self.nats_tls_ca.or(file.nats_tls_ca);
                let lease = self.cluster_lease.or(file.cluster_lease);
                let replicas = self.nats_replicas.or(file.nats_replicas);
                match self.nats.or(file.nats) {
                    Some(urls) => Some(crate::cluster::ClusterConfig {
                        urls: urls
                            .into_iter()
                            .map(|u| u.trim().to_owned())
                            .filter(|u| !u.is_empty())
                            .collect(),
                        creds,
                        tls_ca,
                        lease: lease.unwrap_or(Duration::from_secs(15)),
                        replicas: replicas.map(usize::from),
                    }),
                    None if creds.is_some()
                        || tls_ca.is_some()
                        || lease.is_some()
                        || replicas.is_some() =>
                    {
                        return Err(Error::Config(
                            "--nats-creds, --nats-tls-ca, --nats-replicas and --cluster-lease need --nats (cluster mode)".into(),
                        ))
                    }
                    None => None,
                }
            },
        };
        c.validate()?;
        Ok(c)
    }
}

impl GatewayConfig {
    /// Whether `--log` names boringtun: then its own warnings are shown
    /// (the binary's filter) and the timer pass names their device (the
    /// packet path); otherwise the binary filters them to `error`.
    pub fn shows_boringtun_log(&self) -> bool {
        self.log.contains("boringtun")
    }

    pub fn validate(&self) -> Result<(), Error> {
        if self.link_timeout < Duration::from_secs(1) {
            return Err(Error::Config("--link-timeout must be at least 1s".into()));
        }
        if self.tunnel_cidr.prefix_len() > 30 {
            return Err(Error::Config(format!(
                "--tunnel-cidr {} is too small: it needs the gateway and at least one device",
                self.tunnel_cidr
            )));
        }
        if let Some(e) = &self.endpoint {
            if !endpoint_has_port(e) {
                return Err(Error::Config(format!(
                    "--endpoint {e:?} must be host:port (a device's `wg` refuses an endpoint without a port), e.g. vpn.example.com:51820 or [2001:db8::1]:51820"
                )));
            }
        }
        if self.poll_interval < Duration::from_secs(1) {
            return Err(Error::Config("--poll-interval must be at least 1s".into()));
        }
        if self.event_ring == 0 {
            return Err(Error::Config("--event-ring must be at least 1".into()));
        }
        if self.handshake_queue < 8 {
            return Err(Error::Config("--handshake-queue must be at least 8".into()));
        }
        let l = &self.api_limits;
        for (flag, d) in [
            ("--api-header-timeout", l.header_timeout),
            ("--api-body-timeout", l.body_timeout),
            ("--api-idle-timeout", l.idle_timeout),
        ] {
            if d < Duration::from_secs(1) {
                return Err(Error::Config(format!("{flag} must be at least 1s")));
            }
        }
        if l.max_connections == 0
            || l.max_connections_per_ip == 0
            || self.max_event_streams == 0
            || self.max_queued_actions == 0
            || self.max_relay_streams == 0
            || self.max_device_streams == 0
        {
            return Err(Error::Config(
                "--api-max-connections, --api-max-connections-per-ip, --max-event-streams, --max-queued-actions, --max-relay-streams and --max-device-streams must be at least 1".into(),
            ));
        }
        if self.max_queued_actions > crate::cluster::actions::MAX_PER_DEVICE {
            return Err(Error::Config(format!(
                "--max-queued-actions is at most {}",
                crate::cluster::actions::MAX_PER_DEVICE
            )));
        }
        if !(1..=256).contains(&self.workers) {
            return Err(Error::Config("--workers is from 1 to 256".into()));
        }
        if let Some(t) = &self.token {
            check_token(t)?;
        }
        if let Some(c) = &self.cluster {
            if c.urls.is_empty() {
                return Err(Error::Config(
                    "--nats needs at least one server URL (nats://host:port)".into(),
                ));
            }
            if c.lease < Duration::from_secs(3) {
                return Err(Error::Config("--cluster-lease must be at least 3s".into()));
            }
            if let Some(id) = &self.gateway_id {
                if !crate::cluster::valid_gateway_id(id) {
                    return Err(Error::Config(format!(
                        "--gateway-id {id:?}: in cluster mode a gateway id is 1 to 64 of A-Z a-z 0-9 - _"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// A usable API token: long enough to resist guessing, printable ASCII.
pub fn check_token(token: &str) -> Result<(), Error> {
    if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::Config(
            "the API token must be at least 16 printable ASCII characters without spaces".into(),
        ));
    }
    Ok(())
}

/// `host:port` with a port from 1 to 65535 (an IPv6 host in brackets).
fn endpoint_has_port(e: &str) -> bool {
    e.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty()
            && port.parse::<u16>().is_ok_and(|p| p > 0)
            && (!host.contains(':') || (host.starts_with('[') && host.ends_with(']')))
    })
}

/// `--tunnel-cidr`: an IPv4 network, with a message that says so when given
/// an IPv6 one (ipnet alone says "invalid IP address syntax").
fn parse_tunnel_cidr(s: &str) -> Result<ipnet::Ipv4Net, String> {
    if let Ok(n) = s.parse::<ipnet::Ipv4Net>() {
        return Ok(n);
    }
    if s.parse::<ipnet::Ipv6Net>().is_ok() {
        return Err(format!(
            "{s} is an IPv6 network; tunnel addresses are IPv4 only (devices may still reach the gateway over IPv6: --listen [::]:51820)"
        ));
    }
    Err(format!(
        "{s} is not an IPv4 network in CIDR notation, e.g. 10.240.0.0/12"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_needs_a_port() {
        for ok in [
            "vpn.example.com:51820",
            "198.51.100.7:1",
            "[2001:db8::1]:51820",
        ] {
            assert!(endpoint_has_port(ok), "{ok}");
        }
        for bad in [
            "vpn.example.com",
            "vpn.example.com:",
            ":51820",
            "host:0",
            "host:99999",
            "2001:db8::1",
            "[2001:db8::1]",
        ] {
            assert!(!endpoint_has_port(bad), "{bad}");
        }
        let args = ServeArgs {
            endpoint: Some("vpn.example.com".into()),
            ..Default::default()
        };
        let e = args.resolve().unwrap_err().to_string();
        assert!(e.contains("--endpoint") && e.contains("host:port"), "{e}");
    }

    #[test]
    fn flags_override_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9999\"\nlink-timeout = \"5s\"\napi = \"127.0.0.1:1\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            api: Some("127.0.0.1:2".parse().unwrap()),
            ..Default::default()
        };
        let c = args.resolve().unwrap();
        assert_eq!(c.listen, "127.0.0.1:9999".parse().unwrap());
        assert_eq!(c.api, "127.0.0.1:2".parse().unwrap());
        assert_eq!(c.link_timeout, Duration::from_secs(5));
        assert_eq!(c.tunnel_cidr, "10.240.0.0/12".parse().unwrap());
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "lisen = \"127.0.0.1:9999\"\n").unwrap();
        let err = ServeArgs {
            config: Some(path),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
    }

    #[test]
    fn env_vars_are_read() {
        use clap::Parser;
        // Parse with an explicit environment through clap's env support.
        std::env::set_var("CLOUDLINK_EVENT_RING", "77");
        let cli = Cli::try_parse_from(["cloudlink", "serve"]).unwrap();
        std::env::remove_var("CLOUDLINK_EVENT_RING");
        let Command::Serve(args) = cli.command else {
            panic!()
        };
        assert_eq!(args.resolve().unwrap().event_ring, 77);
    }
}
