//! The CLI's commands: argument structs (clap derive) and what each does.

use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};
use std::io::Write as _;
use std::path::PathBuf;

use super::client::{api_error, Client};
use super::render::{ago, bytes, cell, table};
use super::CliError;

/// Where the API is, who we are, how to print: every client command takes
/// these.
#[derive(Debug, Args)]
pub struct CliArgs {
    /// The gateway's API
    #[arg(
        long,
        env = "CLOUDLINK_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// File holding the API token [default: $CLOUDLINK_TOKEN, else <data-dir>/api-token when readable]
    #[arg(long, env = "CLOUDLINK_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// The gateway's data directory, for its api-token (on the gateway host)
    #[arg(
        long,
        env = "CLOUDLINK_DATA_DIR",
        default_value = "./cloudlink-data",
        global = true
    )]
    pub data_dir: PathBuf,
    /// Print the API's JSON instead of tables
    #[arg(long, global = true)]
    pub json: bool,
}

/// The client commands, flattened into the binary's command list.
#[derive(Debug, Subcommand)]
pub enum CliCommand {
    /// Devices: list, show, register, update, delete (through the API)
    Devices {
        #[command(flatten)]
        common: CliArgs,
        #[command(subcommand)]
        cmd: DevicesCmd,
    },
    /// Immediate and queued actions: run one, look one up
    Actions {
        #[command(flatten)]
        common: CliArgs,
        #[command(subcommand)]
        cmd: ActionsCmd,
    },
    /// Scoped API tokens: list, create, revoke (admin)
    Tokens {
        #[command(flatten)]
        common: CliArgs,
        #[command(subcommand)]
        cmd: TokensCmd,
    },
    /// Follow the event stream (resumes after a disconnect)
    Events {
        #[command(flatten)]
        common: CliArgs,
        /// Start after this event id (as printed, or an SSE Last-Event-ID)
        #[arg(long)]
        after: Option<String>,
        /// Only events of this device
        #[arg(long)]
        device: Option<String>,
    },
    /// Connected devices like `wg show`: endpoint, latest handshake, transfer
    Show {
        #[command(flatten)]
        common: CliArgs,
    },
    /// Relay stdin/stdout to a TCP port on a device, through the proxy (an ssh ProxyCommand: `ssh -o ProxyCommand='cloudlink connect %h %p' root@<uuid>.cloudlink`)
    Connect {
        #[command(flatten)]
        common: CliArgs,
        /// The device: `<uuid>`, `<uuid>.cloudlink` or `<uuid>.balena`
        host: String,
        port: u16,
        /// The gateway's CONNECT proxy
        #[arg(long, env = "CLOUDLINK_PROXY", default_value = "127.0.0.1:3128")]
        proxy: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum DevicesCmd {
    /// List devices (paging through the API's cursors)
    List {
        /// operational, reduced-functionality, disconnected or configuring
        #[arg(long)]
        status: Option<String>,
        /// uuid or name contains this
        #[arg(long)]
        q: Option<String>,
        /// A column (uuid, name, status, heartbeat, cloudlink, endpoint, connected_since, rx_bytes, tx_bytes, created_at), `-` in front for descending
        #[arg(long, allow_hyphen_values = true)]
        sort: Option<String>,
        /// At most this many devices
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Every device (pages through the whole fleet)
        #[arg(long)]
        all: bool,
    },
    /// One device
    Show { uuid: String },
    /// Register a device by its public key; prints its wg-quick config
    Register {
        uuid: String,
        /// The device's public key (`wg pubkey` on the device)
        #[arg(long)]
        public_key: String,
        #[arg(long)]
        name: Option<String>,
        /// Write the config to this file (mode 0600) instead of printing it
        #[arg(long)]
        config_out: Option<PathBuf>,
    },
    /// Change a device's settings
    Update {
        uuid: String,
        #[arg(long)]
        name: Option<String>,
        /// Clear the name
        #[arg(long, conflicts_with = "name")]
        clear_name: bool,
        /// Heartbeat period in seconds (`default`: the gateway's)
        #[arg(long)]
        poll_interval: Option<String>,
        /// true or false
        #[arg(long)]
        cloudlink_enabled: Option<bool>,
        /// Default application id for actions (`none` clears it)
        #[arg(long)]
        app_id: Option<String>,
        /// Bandwidth limit each way in kbit/s (0: none; `default`: the gateway's)
        #[arg(long)]
        rate_limit_kbps: Option<String>,
        /// A new WireGuard public key (the device rotated its key)
        #[arg(long)]
        public_key: Option<String>,
    },
    /// Delete a device, or every device whose uuid starts with --prefix
    Delete {
        #[arg(required_unless_present = "prefix")]
        uuid: Option<String>,
        #[arg(long, conflicts_with = "uuid")]
        prefix: Option<String>,
    },
    /// A device's wg-quick config, as a file
    Config { uuid: String },
}

#[derive(Debug, Subcommand)]
pub enum ActionsCmd {
    /// Run an action on a device: reboot, shutdown, purge, restart, ...
    Run {
        uuid: String,
        action: String,
        #[arg(long)]
        force: bool,
        #[arg(long)]
        app_id: Option<u32>,
        #[arg(long)]
        service_name: Option<String>,
        /// Queue it this long if the device is offline (e.g. 1h)
        #[arg(long)]
        queue_ttl: Option<String>,
        /// Retry-safe key: the same key again returns the first result
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// An action by its id
    Get { id: String },
}

#[derive(Debug, Subcommand)]
pub enum TokensCmd {
    /// List tokens (never their secrets)
    List,
    /// Create a token; its secret is printed this once
    Create {
        name: String,
        /// read, actions, relay or admin (repeat for several)
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Expire it after this long (e.g. 30d)
        #[arg(long, value_parser = humantime::parse_duration)]
        expires_in: Option<std::time::Duration>,
    },
    /// Revoke a token (at once, on every gateway)
    Revoke { id: String },
}

fn common(cmd: &CliCommand) -> &CliArgs {
    match cmd {
        CliCommand::Devices { common, .. }
        | CliCommand::Actions { common, .. }
        | CliCommand::Tokens { common, .. }
        | CliCommand::Events { common, .. }
        | CliCommand::Show { common }
        | CliCommand::Connect { common, .. } => common,
    }
}

/// The token: `--token-file`, `CLOUDLINK_TOKEN`, or the data directory's.
fn token(c: &CliArgs) -> Result<Option<String>, CliError> {
    if let Some(p) = &c.token_file {
        return std::fs::read_to_string(p)
            .map(|t| Some(t.trim().to_owned()))
            .map_err(|e| CliError::Usage(format!("--token-file {}: {e}", p.display())));
    }
    if let Ok(t) = std::env::var("CLOUDLINK_TOKEN") {
        if !t.is_empty() {
            return Ok(Some(t));
        }
    }
    Ok(std::fs::read_to_string(c.data_dir.join("api-token"))
        .ok()
        .map(|t| t.trim().to_owned()))
}

/// Percent-encodes a query value.
fn q(v: &str) -> String {
    let mut s = String::new();
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Runs a client command; the process's exit code.
pub fn run(cmd: CliCommand) -> i32 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    let result = rt.block_on(dispatch(cmd));
    // A read of stdin may still block in a thread (`connect`): do not wait.
    rt.shutdown_background();
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

async fn dispatch(cmd: CliCommand) -> Result<(), CliError> {
    let c = common(&cmd);
    let client = Client::new(&c.url, token(c)?)?;
    let json_out = c.json;
    match cmd {
        CliCommand::Devices { cmd, .. } => devices(&client, cmd, json_out).await,
        CliCommand::Actions { cmd, .. } => actions(&client, cmd, json_out).await,
        CliCommand::Tokens { cmd, .. } => tokens(&client, cmd, json_out).await,
        CliCommand::Events { after, device, .. } => events(&client, after, device, json_out).await,
        CliCommand::Show { .. } => show(&client, json_out).await,
        CliCommand::Connect {
            host, port, proxy, ..
        } => connect(&client, &host, port, &proxy).await,
    }
}

fn device_row(d: &Value) -> Vec<String> {
    vec![
        cell(&d["uuid"]),
        cell(&d["name"]),
        cell(&d["address"]),
        cell(&d["status"]),
        if d["cloudlink"]["connected"] == true {
            "up".into()
        } else {
            "down".into()
        },
        cell(&d["heartbeat"]["state"]),
        cell(&d["cloudlink"]["endpoint"]),
    ]
}

async fn devices(client: &Client, cmd: DevicesCmd, json_out: bool) -> Result<(), CliError> {
    match cmd {
        DevicesCmd::List {
            status,
            q: text,
            sort,
            limit,
            all,
        } => {
            let mut base = String::new();
            for (k, v) in [("status", &status), ("q", &text), ("sort", &sort)] {
                if let Some(v) = v {
                    base.push_str(&format!("&{k}={}", q(v)));
                }
            }
            let mut out = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let want = if all {
                    1000
                } else {
                    limit.saturating_sub(out.len()).clamp(1, 1000)
                };
                let mut path = format!("/v1/devices?limit={want}{base}");
                if let Some(a) = &after {
                    path.push_str(&format!("&after={}", q(a)));
                }
                let page = client.call("GET", &path, None).await?;
                out.extend(page["devices"].as_array().cloned().unwrap_or_default());
                after = page["next"].as_str().map(str::to_owned);
                if after.is_none() || (!all && out.len() >= limit) {
                    break;
                }
            }
            if json_out {
                print_json(&Value::Array(out));
            } else {
                let rows: Vec<Vec<String>> = out.iter().map(device_row).collect();
                table(
                    &[
                        "UUID",
                        "NAME",
                        "ADDRESS",
                        "STATUS",
                        "CLOUDLINK",
                        "HEARTBEAT",
                        "ENDPOINT",
                    ],
                    &rows,
                );
                if after.is_some() && !all {
                    eprintln!("(more devices: --limit or --all)");
                }
            }
            Ok(())
        }
        DevicesCmd::Show { uuid } => {
            let d = client
                .call("GET", &format!("/v1/devices/{}", q(&uuid)), None)
                .await?;
            if json_out {
                print_json(&d);
                return Ok(());
            }
            let c = &d["cloudlink"];
            for (k, v) in [
                ("uuid", cell(&d["uuid"])),
                ("name", cell(&d["name"])),
                (
                    "status",
                    format!("{} ({})", cell(&d["status"]), cell(&d["status_detail"])),
                ),
                ("address", cell(&d["address"])),
                ("public key", cell(&d["public_key"])),
                (
                    "cloudlink",
                    if c["connected"] == true {
                        "up".into()
                    } else {
                        "down".into()
                    },
                ),
                ("endpoint", cell(&c["endpoint"])),
                ("latest handshake", ago(&c["last_handshake_at"])),
                (
                    "transfer",
                    format!(
                        "{} received, {} sent",
                        bytes(c["rx_bytes"].as_u64().unwrap_or(0)),
                        bytes(c["tx_bytes"].as_u64().unwrap_or(0))
                    ),
                ),
                ("heartbeat", cell(&d["heartbeat"]["state"])),
                (
                    "rate limit",
                    match &d["rate_limit_kbps"] {
                        Value::Null => "the gateway's default".into(),
                        v => format!("{} kbit/s", cell(v)),
                    },
                ),
            ] {
                println!("{k:>17}: {v}");
            }
            Ok(())
        }
        DevicesCmd::Register {
            uuid,
            public_key,
            name,
            config_out,
        } => {
            let mut body = json!({"uuid": uuid, "public_key": public_key});
            if let Some(n) = name {
                body["name"] = json!(n);
            }
            let d = client.call("POST", "/v1/devices", Some(&body)).await?;
            if json_out {
                print_json(&d);
            }
            let config = d["wg_quick"].as_str().unwrap_or_default();
            match config_out {
                Some(p) => {
                    write_private(&p, config)?;
                    eprintln!(
                        "registered {} as {}; its config is in {} (put the device's private key in it, on the device)",
                        cell(&d["uuid"]),
                        cell(&d["address"]),
                        p.display()
                    );
                }
                None if !json_out => print!("{config}"),
                None => {}
            }
            Ok(())
        }
        DevicesCmd::Update {
            uuid,
            name,
            clear_name,
            poll_interval,
            cloudlink_enabled,
            app_id,
            rate_limit_kbps,
            public_key,
        } => {
            let mut patch = Map::new();
            if let Some(n) = name {
                patch.insert("name".into(), json!(n));
            }
            if clear_name {
                patch.insert("name".into(), Value::Null);
            }
            let number_or = |flag: &str, v: String, word: &str| -> Result<Value, CliError> {
                if v == word {
                    return Ok(Value::Null);
                }
                v.parse::<u64>().map(|n| json!(n)).map_err(|_| {
                    CliError::Usage(format!("--{flag} {v}: a whole number, or {word}"))
                })
            };
            if let Some(v) = poll_interval {
                patch.insert(
                    "poll_interval_s".into(),
                    number_or("poll-interval", v, "default")?,
                );
            }
            if let Some(v) = cloudlink_enabled {
                patch.insert("cloudlink_enabled".into(), json!(v));
            }
            if let Some(v) = app_id {
                patch.insert("app_id".into(), number_or("app-id", v, "none")?);
            }
            if let Some(v) = rate_limit_kbps {
                patch.insert(
                    "rate_limit_kbps".into(),
                    number_or("rate-limit-kbps", v, "default")?,
                );
            }
            if let Some(k) = public_key {
                patch.insert("public_key".into(), json!(k));
            }
            if patch.is_empty() {
                return Err(CliError::Usage(
                    "nothing to change: give a setting, e.g. --name".into(),
                ));
            }
            let d = client
                .call(
                    "PATCH",
                    &format!("/v1/devices/{}", q(&uuid)),
                    Some(&Value::Object(patch)),
                )
                .await?;
            if json_out {
                print_json(&d);
            } else {
                println!("updated {}", cell(&d["uuid"]));
            }
            Ok(())
        }
        DevicesCmd::Delete { uuid, prefix } => {
            match (uuid, prefix) {
                (_, Some(p)) => {
                    let r = client
                        .call("DELETE", &format!("/v1/devices?prefix={}", q(&p)), None)
                        .await?;
                    if json_out {
                        print_json(&r);
                    } else {
                        println!(
                            "deleted {} devices whose uuid starts with {p:?}",
                            cell(&r["deleted"])
                        );
                    }
                }
                (Some(u), None) => {
                    client
                        .call("DELETE", &format!("/v1/devices/{}", q(&u)), None)
                        .await?;
                    if !json_out {
                        println!("deleted {u}");
                    }
                }
                (None, None) => unreachable!("clap requires one"),
            }
            Ok(())
        }
        DevicesCmd::Config { uuid } => {
            print!(
                "{}",
                client
                    .text(&format!("/v1/devices/{}/wg-quick", q(&uuid)))
                    .await?
            );
            Ok(())
        }
    }
}

/// Writes `text` to a new file only its owner can read.
fn write_private(path: &std::path::Path, text: &str) -> Result<(), CliError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
    f.write_all(text.as_bytes())
        .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))
}

async fn actions(client: &Client, cmd: ActionsCmd, json_out: bool) -> Result<(), CliError> {
    let a = match cmd {
        ActionsCmd::Run {
            uuid,
            action,
            force,
            app_id,
            service_name,
            queue_ttl,
            idempotency_key,
        } => {
            let mut body = Map::new();
            if force {
                body.insert("force".into(), json!(true));
            }
            if let Some(a) = app_id {
                body.insert("app_id".into(), json!(a));
            }
            if let Some(s) = service_name {
                body.insert("service_name".into(), json!(s));
            }
            let mut path = format!("/v1/devices/{}/actions/{}", q(&uuid), q(&action));
            if let Some(t) = queue_ttl {
                path.push_str(&format!("?queue_ttl={}", q(&t)));
            }
            let body = Value::Object(body);
            let mut headers = Vec::new();
            if let Some(k) = &idempotency_key {
                headers.push(("idempotency-key", k.as_str()));
            }
            client
                .call_with("POST", &path, Some(&body), &headers)
                .await?
        }
        ActionsCmd::Get { id } => {
            client
                .call("GET", &format!("/v1/actions/{}", q(&id)), None)
                .await?
        }
    };
    if json_out {
        print_json(&a);
    } else {
        for k in ["id", "device", "action", "state", "device_status"] {
            if !a[k].is_null() {
                println!("{k:>13}: {}", cell(&a[k]));
            }
        }
        for k in ["device_body", "body"] {
            if !a[k].is_null() {
                println!("{k:>13}: {}", a[k]);
            }
        }
    }
    Ok(())
}

async fn tokens(client: &Client, cmd: TokensCmd, json_out: bool) -> Result<(), CliError> {
    match cmd {
        TokensCmd::List => {
            let r = client.call("GET", "/v1/tokens", None).await?;
            if json_out {
                print_json(&r);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = r["tokens"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|t| {
                    vec![
                        cell(&t["id"]),
                        cell(&t["name"]),
                        t["scopes"]
                            .as_array()
                            .map(|s| s.iter().map(cell).collect::<Vec<_>>().join(","))
                            .unwrap_or_default(),
                        cell(&t["created_at"]),
                        cell(&t["expires_at"]),
                    ]
                })
                .collect();
            table(&["ID", "NAME", "SCOPES", "CREATED", "EXPIRES"], &rows);
        }
        TokensCmd::Create {
            name,
            scopes,
            expires_in,
        } => {
            let mut body = json!({"name": name, "scopes": scopes});
            if let Some(d) = expires_in {
                body["expires_in_s"] = json!(d.as_secs());
            }
            let t = client.call("POST", "/v1/tokens", Some(&body)).await?;
            if json_out {
                print_json(&t);
            } else {
                eprintln!(
                    "token {} ({}) created; its secret is shown this once:",
                    cell(&t["id"]),
                    cell(&t["name"])
                );
                println!("{}", cell(&t["token"]));
            }
        }
        TokensCmd::Revoke { id } => {
            client
                .call("DELETE", &format!("/v1/tokens/{}", q(&id)), None)
                .await?;
            if !json_out {
                println!("revoked {id}");
            }
        }
    }
    Ok(())
}

/// Follows `/v1/events`, one line per event; after a lost connection it
/// reconnects with the last id seen (the stream resumes from there).
async fn events(
    client: &Client,
    mut after: Option<String>,
    device: Option<String>,
    json_out: bool,
) -> Result<(), CliError> {
    use http_body_util::BodyExt;
    let mut failures = 0u32;
    loop {
        let mut headers = vec![("accept", "text/event-stream")];
        let last;
        if let Some(a) = &after {
            last = a.clone();
            headers.push(("last-event-id", last.as_str()));
        }
        let r = match client.send("GET", "/v1/events", None, &headers).await {
            Ok(r) => r,
            Err(e @ CliError::Unreachable { .. }) if after.is_some() && failures < 30 => {
                failures += 1;
                eprintln!("({e}; reconnecting)");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let status = r.status().as_u16();
        if status != 200 {
            let bytes = r
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err(api_error(
                status,
                &serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            ));
        }
        failures = 0;
        let mut body = r.into_body();
        let mut buf = String::new();
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { break };
            let Some(data) = frame.data_ref() else {
                continue;
            };
            buf.push_str(&String::from_utf8_lossy(data));
            while let Some(end) = buf.find("\n\n") {
                let message: String = buf.drain(..end + 2).collect();
                let (mut id, mut data) = (None, String::new());
                for line in message.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if let Some(id) = id {
                    after = Some(id);
                }
                if data.is_empty() {
                    continue;
                }
                let v: Value = serde_json::from_str(&data).unwrap_or(Value::String(data));
                if device.as_ref().is_some_and(|d| v["device"] != d.as_str()) {
                    continue;
                }
                if json_out {
                    println!("{v}");
                } else {
                    let mut line = format!(
                        "{} {:<16} {}",
                        cell(&v["at"]),
                        cell(&v["type"]),
                        cell(&v["device"])
                    );
                    for k in ["reason", "endpoint", "state", "action"] {
                        if !v[k].is_null() {
                            line.push_str(&format!(" {k}={}", cell(&v[k])));
                        }
                    }
                    println!("{line}");
                }
                let _ = std::io::stdout().flush();
            }
        }
        eprintln!("(the event stream ended; resuming)");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// `wg show` for the gateway: its key and listening endpoint, then each
/// connected device.
async fn show(client: &Client, json_out: bool) -> Result<(), CliError> {
    let mut connected = Vec::new();
    let mut after: Option<String> = None;
    'pages: loop {
        let mut path = "/v1/devices?limit=1000&sort=-cloudlink".to_owned();
        if let Some(a) = &after {
            path.push_str(&format!("&after={}", q(a)));
        }
        let page = client.call("GET", &path, None).await?;
        for d in page["devices"].as_array().cloned().unwrap_or_default() {
            if d["cloudlink"]["connected"] != true {
                break 'pages;
            }
            connected.push(d);
        }
        after = page["next"].as_str().map(str::to_owned);
        if after.is_none() {
            break;
        }
    }
    if json_out {
        print_json(&Value::Array(connected));
        return Ok(());
    }
    let summary = client
        .call("GET", "/v1/summary", None)
        .await
        .unwrap_or(Value::Null);
    println!("gateway: {}", client.url());
    if !summary["gateway"].is_null() {
        for (k, v) in [
            ("public key", &summary["gateway"]["public_key"]),
            ("endpoint", &summary["gateway"]["endpoint"]),
        ] {
            if !v.is_null() {
                println!("  {k}: {}", cell(v));
            }
        }
    }
    for d in &connected {
        let c = &d["cloudlink"];
        println!();
        println!("device: {} ({})", cell(&d["uuid"]), cell(&d["address"]));
        println!("  public key: {}", cell(&d["public_key"]));
        println!("  endpoint: {}", cell(&c["endpoint"]));
        println!("  latest handshake: {}", ago(&c["last_handshake_at"]));
        println!(
            "  transfer: {} received, {} sent",
            bytes(c["rx_bytes"].as_u64().unwrap_or(0)),
            bytes(c["tx_bytes"].as_u64().unwrap_or(0))
        );
    }
    if connected.is_empty() {
        println!("(no device connected)");
    }
    Ok(())
}

/// An ssh ProxyCommand: CONNECT through the proxy, then stdin/stdout.
async fn connect(client: &Client, host: &str, port: u16, proxy: &str) -> Result<(), CliError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let unreachable = |why: String| CliError::Unreachable {
        url: format!("the proxy at {proxy}"),
        why,
    };
    let mut s = tokio::net::TcpStream::connect(proxy)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let target = format!("{host}:{port}");
    let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(t) = client_token(client) {
        head.push_str(&format!("Proxy-Authorization: Bearer {t}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    // The answer's head, byte by byte: nothing past it may be consumed.
    let mut answer = Vec::new();
    let mut b = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        if answer.len() > 16 * 1024
            || s.read(&mut b)
                .await
                .map_err(|e| unreachable(e.to_string()))?
                == 0
        {
            return Err(unreachable("the proxy closed before answering".into()));
        }
        answer.push(b[0]);
    }
    let head = crate::http1::parse_response_head(&answer, 16 * 1024)
        .ok()
        .flatten()
        .ok_or_else(|| unreachable("the proxy's answer is not HTTP".into()))?;
    if head.status != 200 {
        let len = head
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| std::str::from_utf8(&h.value).ok())
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0)
            .min(64 * 1024);
        let mut body = vec![0u8; len];
        let _ = s.read_exact(&mut body).await;
        let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
        return Err(api_error(head.status, &v));
    }
    let (mut rd, mut wr) = s.into_split();
    let up = async {
        let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut wr).await;
        let _ = wr.shutdown().await;
    };
    let down = async {
        let mut out = tokio::io::stdout();
        let _ = tokio::io::copy(&mut rd, &mut out).await;
        let _ = out.flush().await;
    };
    // Done when the device's side ends; stdin's end only half-closes.
    tokio::pin!(up);
    tokio::pin!(down);
    tokio::select! {
        _ = &mut down => {}
        _ = &mut up => down.await,
    }
    Ok(())
}

fn client_token(client: &Client) -> Option<String> {
    client.token().map(str::to_owned)
}
