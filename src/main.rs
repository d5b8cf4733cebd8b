//! The `cloudlink` binary: parses the command line and calls the library.

use anyhow::Context as _;
use clap::Parser;
use std::io::{Read, Write};

use cloudlink::config::{Cli, Command};
use cloudlink::keys;

fn main() -> anyhow::Result<()> {
    cloudlink::relay::netstack::lazy_stream_buffers();
    let cli = Cli::parse();
    match cli.command {
        Command::Client(cmd) => std::process::exit(cloudlink::cli::run(cmd)),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd, "cloudlink", &mut out);
            print_all(&out)
        }
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut out)?;
            print_all(&out)
        }
        Command::Genkey => {
            let k = keys::generate_private_key();
            println!("{}", keys::encode_key(&k));
            Ok(())
        }
        Command::Pubkey => {
            let mut input = String::new();
            std::io::stdin().read_to_string(&mut input)?;
            let private = keys::decode_key(&input).context("reading a private key from stdin")?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", keys::encode_key(&keys::public_key(&private)))?;
            Ok(())
        }
        Command::Agent(args) => {
            let config = args.resolve()?;
            init_tracing(&args.log);
            // One thread: the tunnel is one `Tunn` behind one lock, and
            // threads would only hand segments to each other (a relay
            // stream ran 40-95 % faster on one; ARCHITECTURE.md).
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_name("cloudlink-agent")
                .build()?;
            runtime.block_on(async {
                let (tx, rx) = tokio::sync::watch::channel(false);
                tokio::spawn(async move {
                    shutdown_signal().await;
                    let _ = tx.send(true);
                });
                cloudlink::agent::run(config, rx).await;
            });
            Ok(())
        }
        Command::Loadgen(args) => {
            let config = args.resolve()?;
            let report = cloudlink::loadgen::run(config)?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Command::Serve(args) => {
            let config = args.resolve()?;
            // boringtun's own warnings (`REKEY_TIMEOUT`, one per silent
            // peer per 5 s after a restart: 850 lines in 90 s for 55 gone
            // devices) name no device; the gateway reports link state
            // itself. `--log info,boringtun=warn` brings them back.
            let filter = if config.shows_boringtun_log() {
                config.log.clone()
            } else {
                format!("{},boringtun=error", config.log)
            };
            init_tracing(&filter);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("cloudlink-api")
                .build()?;
            runtime.block_on(serve(config))
        }
    }
}

async fn serve(config: cloudlink::GatewayConfig) -> anyhow::Result<()> {
    // One gateway per data directory and per UDP port, refused at the door.
    let _lock = cloudlink::data_dir::lock(&config.data_dir)?;
    cloudlink::data_dir::probe_udp_port(config.listen)?;
    // SO_REUSEPORT so that each packet worker gets its own socket on the port.
    let udp = cloudlink::packet_path::udp_io::bind_reuseport(config.listen)
        .with_context(|| format!("binding the WireGuard UDP socket on {}", config.listen))?;
    let api = tokio::net::TcpListener::bind(config.api)
        .await
        .with_context(|| format!("binding the API on {}", config.api))?;
    cloudlink::run(config, udp, api, shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping");
}

fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_filter(filter)
        .with_filter(
            // Asked per event for boringtun's callsites only; every other
            // callsite is decided once (no cost on the packet path).
            tracing_subscriber::filter::dynamic_filter_fn(|meta, _| boringtun_budget(meta))
                .with_callsite_filter(|meta| {
                    if meta.target().starts_with("boringtun") {
                        tracing::subscriber::Interest::sometimes()
                    } else {
                        tracing::subscriber::Interest::always()
                    }
                }),
        );
    tracing_subscriber::registry().with(fmt).init();
}

/// boringtun's messages, when shown, at most 20 at once and one a second
/// after that: after a restart it warns once per silent peer every 5 s
/// (850 lines in 90 s for 55 gone devices), which buries everything else.
fn boringtun_budget(meta: &tracing::Metadata<'_>) -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    if !meta.is_event() || !meta.target().starts_with("boringtun") {
        return true;
    }
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    // Tokens are kept as "the time the bucket is empty at", in ms.
    static EMPTY_AT_MS: AtomicU64 = AtomicU64::new(0);
    const BURST: u64 = 20;
    const EVERY_MS: u64 = 1000;
    let now = START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
        + BURST * EVERY_MS;
    let mut at = EMPTY_AT_MS.load(Ordering::Relaxed);
    loop {
        let next = at.max(now - BURST * EVERY_MS) + EVERY_MS;
        if next > now {
            return false;
        }
        match EMPTY_AT_MS.compare_exchange_weak(at, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return true,
            Err(seen) => at = seen,
        }
    }
}

/// Writes to stdout; a reader that went away (`| head`) is not an error.
fn print_all(bytes: &[u8]) -> anyhow::Result<()> {
    match std::io::stdout().lock().write_all(bytes) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}
