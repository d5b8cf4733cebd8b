//! The admin CLI (`cloudlink devices|actions|tokens|events|show|connect`)
//! as an operator runs it: the real binary against a gateway, its tables,
//! its `--json`, its exit codes, and `cloudlink connect` as the real ssh
//! client's ProxyCommand to a real sshd behind the agent.

mod common;

use common::proxy::*;
use common::ssh::*;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_cloudlink");

/// Runs `cloudlink <args>` against `g` with `token` in the environment.
fn cli(g: &TestGateway, token: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("CLOUDLINK_URL", &g.api)
        .env("CLOUDLINK_TOKEN", token)
        .env_remove("CLOUDLINK_TOKEN_FILE")
        .env("CLOUDLINK_DATA_DIR", "/nonexistent")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "{}\n{}",
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    stdout(&o)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_tokens_and_exit_codes() {
    let mut g = TestGateway::start().await;
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("wg0.conf");
    let key = cloudlink::keys::encode_key(&cloudlink::keys::public_key(
        &cloudlink::keys::generate_private_key(),
    ));
    let conf_s = conf.to_str().unwrap().to_owned();
    let g_ref = &g;
    let run = |args: Vec<&str>| {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        tokio::task::block_in_place(|| {
            cli(
                g_ref,
                TOKEN,
                &args.iter().map(String::as_str).collect::<Vec<_>>(),
            )
        })
    };
    // Register: the config is written owner-only.
    ok(run(vec![
        "devices",
        "register",
        "kiosk-1",
        "--public-key",
        &key,
        "--name",
        "lobby",
        "--config-out",
        &conf_s,
    ]));
    let mode = std::fs::metadata(&conf).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&conf).unwrap();
    assert!(
        text.contains("[Interface]") && text.contains("Address = 10.240.0.2/32"),
        "{text}"
    );
    // The same text from `devices config`.
    assert_eq!(ok(run(vec!["devices", "config", "kiosk-1"])), text);

    // A table by default, the API's JSON with --json.
    let table = ok(run(vec!["devices", "list"]));
    let mut lines = table.lines();
    assert!(lines.next().unwrap().starts_with("UUID"), "{table}");
    let row = lines.next().unwrap();
    assert!(
        row.starts_with("kiosk-1") && row.contains("lobby") && row.contains("10.240.0.2"),
        "{table}"
    );
    let list: serde_json::Value =
        serde_json::from_str(&ok(run(vec!["devices", "list", "--json"]))).unwrap();
    assert_eq!(list[0]["uuid"], "kiosk-1");

    // Update, then show.
    ok(run(vec![
        "devices",
        "update",
        "kiosk-1",
        "--name",
        "front door",
        "--rate-limit-kbps",
        "5000",
    ]));
    let d: serde_json::Value =
        serde_json::from_str(&ok(run(vec!["devices", "show", "kiosk-1", "--json"]))).unwrap();
    assert_eq!(
        (d["name"].as_str(), d["rate_limit_kbps"].as_u64()),
        (Some("front door"), Some(5000))
    );
    let shown = ok(run(vec!["devices", "show", "kiosk-1"]));
    assert!(
        shown.contains("5000 kbit/s") && shown.contains("cloudlink: down"),
        "{shown}"
    );

    // Exit codes: not found 3, refused 1, unreachable 4.
    let o = run(vec!["devices", "show", "nope"]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("device_not_found"));
    let o = run(vec![
        "devices",
        "update",
        "kiosk-1",
        "--rate-limit-kbps",
        "fast",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let o = tokio::task::block_in_place(|| {
        Command::new(BIN)
            .args(["devices", "list", "--url", "http://127.0.0.1:1"])
            .env("CLOUDLINK_TOKEN", TOKEN)
            .output()
            .unwrap()
    });
    assert_eq!(o.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot reach http://127.0.0.1:1"));

    // Tokens: a read token lists, but may not delete (403: exit 1).
    let secret = ok(run(vec!["tokens", "create", "noc", "--scope", "read"]));
    let secret = secret.trim().to_owned();
    assert!(secret.starts_with("clt_"), "{secret}");
    let listed = ok(run(vec!["tokens", "list"]));
    assert!(
        listed.contains("noc") && listed.contains("read"),
        "{listed}"
    );
    let token_file = dir.path().join("noc-token");
    std::fs::write(&token_file, format!("{secret}\n")).unwrap();
    let tf = token_file.to_str().unwrap().to_owned();
    ok(run(vec!["devices", "list", "--token-file", &tf]));
    let o = run(vec!["devices", "delete", "kiosk-1", "--token-file", &tf]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    let o = run(vec!["actions", "get", "0123456789abcdef01234567"]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // `show` with no device connected; bulk delete by prefix.
    assert!(ok(run(vec!["show"])).contains("(no device connected)"));
    let out = ok(run(vec!["devices", "delete", "--prefix", "kiosk-"]));
    assert!(out.contains("deleted 1 devices"), "{out}");
    g.stop().await;
}

/// `cloudlink connect` as the ssh client's ProxyCommand, to an sshd behind
/// the agent; `cloudlink show` lists the device like `wg show`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_through_cloudlink_connect_and_show() {
    let mut g = TestGateway::start_with(|c| {
        c.link_timeout = Duration::from_secs(30);
        c.allow_ports = vec![22222];
    })
    .await;
    let mut events = g.events(None).await;
    // `cloudlink events --json` follows the stream from now on.
    let mut follower = Command::new(BIN)
        .args(["events", "--json"])
        .env("CLOUDLINK_URL", &g.api)
        .env("CLOUDLINK_TOKEN", TOKEN)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (line_tx, line_rx) = std::sync::mpsc::channel::<String>();
    let out = follower.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = line_tx.send(l);
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ssh = SshFixture::new();
    let sshd_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut sshd = ssh.start_sshd(&[], &format!("127.0.0.1:{sshd_port}"));
    let marker = tempfile::tempdir().unwrap();
    let rebooted = marker.path().join("rebooted");
    let _agent = Agent::start_with(
        &g,
        "cli-dev",
        &[format!("22222=127.0.0.1:{sshd_port}")],
        &[
            "--on-action".into(),
            format!("reboot=touch {}", rebooted.display()),
        ],
    )
    .await;
    events
        .wait_for(Duration::from_secs(20), |e| {
            e["type"] == "link.up" && e["device"] == "cli-dev"
        })
        .await;
    wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", sshd_port)).is_ok()
    });
    let proxy = g.gw().proxy_addr();
    let o = tokio::task::block_in_place(|| {
        ssh.ssh_through(
            &format!("{BIN} connect %h %p --proxy {proxy}"),
            &[("CLOUDLINK_TOKEN", TOKEN)],
            "cli-dev.cloudlink",
            22222,
            "echo through-cloudlink-connect",
            None,
        )
    });
    assert!(
        o.status.success(),
        "ssh: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(stdout(&o), "through-cloudlink-connect\n");

    // A wrong token: the proxy's 401 comes back as the CLI's error.
    let o = tokio::task::block_in_place(|| {
        Command::new(BIN)
            .args(["connect", "cli-dev", "22222", "--proxy", &proxy.to_string()])
            .env("CLOUDLINK_TOKEN", "wrong")
            .output()
            .unwrap()
    });
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    let shown = tokio::task::block_in_place(|| ok(cli(&g, TOKEN, &["show"])));
    assert!(shown.contains("device: cli-dev (10.240.0.2)"), "{shown}");
    assert!(
        shown.contains("latest handshake:") && shown.contains("transfer:"),
        "{shown}"
    );
    assert!(shown.contains("endpoint: 127.0.0.1:"), "{shown}");

    // An action through the CLI: the agent's hook ran.
    let out = tokio::task::block_in_place(|| {
        ok(cli(
            &g,
            TOKEN,
            &["actions", "run", "cli-dev", "reboot", "--json"],
        ))
    });
    let answer: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["device_status"], 202, "{answer}");
    assert!(
        eventually(Duration::from_secs(10), async || rebooted.exists()).await,
        "the reboot hook did not run"
    );

    // The follower printed the device's link.up as one JSON line.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = line_rx
            .recv_timeout(left)
            .expect("no link.up from `cloudlink events`");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["type"] == "link.up" && v["device"] == "cli-dev" {
            break;
        }
    }
    let _ = follower.kill();
    let _ = follower.wait();

    let _ = sshd.kill();
    let _ = sshd.wait();
    g.stop().await;
}
