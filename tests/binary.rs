//! The `cloudlink` binary itself: embedded defaults overridden from the
//! environment, generated secrets, `kill -9` durability, key commands.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_cloudlink");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Served {
    child: Child,
    api: String,
    udp: String,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

/// Starts `cloudlink serve` configured only through CLOUDLINK_* variables.
fn serve(dir: &std::path::Path, extra_env: &[(&str, &str)]) -> Served {
    let api = format!("127.0.0.1:{}", free_port());
    let udp = format!("127.0.0.1:{}", free_udp_port());
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .env("CLOUDLINK_LISTEN", &udp)
        .env("CLOUDLINK_API", &api)
        .env("CLOUDLINK_PROXY", "127.0.0.1:0")
        .env("CLOUDLINK_DATA_DIR", dir)
        .env_remove("CLOUDLINK_TOKEN")
        .stderr(Stdio::piped())
        .stdout(Stdio::null());
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let stderr = child.stderr.take().unwrap();
    let l = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            l.lock().unwrap().push_str(&line);
            l.lock().unwrap().push('\n');
        }
    });
    let s = Served {
        child,
        api: format!("http://{api}"),
        udp,
        log,
    };
    wait_ready(&s);
    s
}

fn wait_ready(s: &Served) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok((status, _)) = http("GET", &format!("{}/readyz", s.api), None, None) {
            if status == 200 {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("gateway not ready; log:\n{}", s.log.lock().unwrap());
}

/// A minimal blocking HTTP/1.1 client: enough for these tests.
fn http(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    use std::io::Read;
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let mut s = std::net::TcpStream::connect(host)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.unwrap_or("");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out.split(' ').nth(1).unwrap_or("0").parse().unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn generated_secrets_and_kill_9_durability() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut g = serve(&data, &[]);
    let token_path = data.join("api-token");
    let token = std::fs::read_to_string(&token_path)
        .unwrap()
        .trim()
        .to_owned();
    assert_eq!(mode(&token_path), 0o600);
    assert_eq!(mode(&data.join("gateway.key")), 0o600);
    let log = g.log.lock().unwrap().clone();
    assert!(
        log.contains(&token_path.display().to_string()),
        "token path is logged:\n{log}"
    );
    assert!(!log.contains(&token), "the token value is never logged");
    assert!(
        log.contains("no --endpoint given"),
        "a warning without --endpoint:\n{log}"
    );

    let key = cloudlink::keys::encode_key(&cloudlink::keys::public_key(
        &cloudlink::keys::generate_private_key(),
    ));
    let (st, body) = http(
        "POST",
        &format!("{}/v1/devices", g.api),
        Some(&token),
        Some(&format!(r#"{{"uuid":"durable","public_key":"{key}"}}"#)),
    )
    .unwrap();
    assert_eq!(st, 201, "{body}");
    let gw_key =
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["gateway"]["public_key"].clone();
    // Acknowledged, then killed without any chance to flush.
    g.child.kill().unwrap();
    g.child.wait().unwrap();

    let mut g = serve(&data, &[]);
    let (st, body) = http(
        "GET",
        &format!("{}/v1/devices/durable", g.api),
        Some(&token),
        None,
    )
    .unwrap();
    assert_eq!(st, 200, "{body}");
    let d: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(d["public_key"], key);
    assert_eq!(
        d["gateway"]["public_key"], gw_key,
        "the gateway keeps its identity"
    );
    g.child.kill().unwrap();
    g.child.wait().unwrap();
}

#[test]
fn config_file_and_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "from-a-file-0123456789\n").unwrap();
    let conf = dir.path().join("cloudlink.toml");
    std::fs::write(
        &conf,
        format!(
            "token-file = \"{}\"\nendpoint = \"gw.example.net:51820\"\ntunnel-cidr = \"10.99.0.0/16\"\n",
            token_file.display()
        ),
    )
    .unwrap();
    let mut g = serve(
        &dir.path().join("data"),
        &[("CLOUDLINK_CONFIG", conf.to_str().unwrap())],
    );
    let key = cloudlink::keys::encode_key(&[3; 32]);
    let (st, body) = http(
        "POST",
        &format!("{}/v1/devices", g.api),
        Some("from-a-file-0123456789"),
        Some(&format!(r#"{{"uuid":"c1","public_key":"{key}"}}"#)),
    )
    .unwrap();
    assert_eq!(st, 201, "{body}");
    let d: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(d["address"], "10.99.0.2");
    assert_eq!(d["gateway"]["endpoint"], "gw.example.net:51820");
    assert!(
        !data_has(&dir.path().join("data"), "api-token"),
        "no token generated when one is given"
    );
    g.child.kill().unwrap();
    g.child.wait().unwrap();
}

fn data_has(dir: &std::path::Path, name: &str) -> bool {
    dir.join(name).exists()
}

#[test]
fn bad_configuration_is_a_clear_error() {
    let out = Command::new(BIN)
        .args(["serve", "--link-timeout", "soon"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("link-timeout"));
}

/// `cloudlink completions <shell>` and `cloudlink man` print what the
/// shells and `man` read, covering the client commands.
#[test]
fn completions_and_man_page() {
    let out = Command::new(BIN)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let bash = String::from_utf8_lossy(&out.stdout);
    assert!(
        bash.contains("_cloudlink()") && bash.contains("devices"),
        "{bash}"
    );
    let check = Command::new("bash")
        .arg("-n")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(&out.stdout)?;
            c.wait()
        })
        .unwrap();
    assert!(check.success(), "bash -n refused the completions");
    let out = Command::new(BIN)
        .args(["completions", "zsh"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("#compdef cloudlink"));
    let out = Command::new(BIN).arg("man").output().unwrap();
    let man = String::from_utf8_lossy(&out.stdout);
    assert!(
        man.contains(".TH cloudlink 1") && man.contains("devices"),
        "{man}"
    );
}

/// An IPv6 tunnel network is refused saying tunnel addresses are IPv4; an
/// endpoint without a port is refused.
#[test]
fn an_ipv6_tunnel_network_is_refused_with_a_message_that_says_why() {
    let out = Command::new(BIN)
        .args(["serve", "--tunnel-cidr", "fd00:cl::/64"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not an IPv4 network"), "{err}");
    let out = Command::new(BIN)
        .args(["serve", "--tunnel-cidr", "fd00::/64"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("IPv4 only"), "{err}");
    // An endpoint without a port: devices' `wg` would refuse the config.
    let out = Command::new(BIN)
        .args(["serve", "--endpoint", "gw.example.net"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("must be host:port"), "{err}");
}

/// A second gateway on a UDP port already served (the sockets use
/// SO_REUSEPORT, so its bind alone would succeed and take half of the
/// devices' datagrams) or on a data directory in use is refused at start,
/// saying which; the first keeps serving.
#[test]
fn a_second_gateway_on_the_same_port_or_data_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = serve(&dir.path().join("a"), &[]);
    let second = |data: &std::path::Path, udp: &str| {
        Command::new(BIN)
            .arg("serve")
            .env("CLOUDLINK_LISTEN", udp)
            .env("CLOUDLINK_API", format!("127.0.0.1:{}", free_port()))
            .env("CLOUDLINK_PROXY", "127.0.0.1:0")
            .env("CLOUDLINK_DATA_DIR", data)
            .env_remove("CLOUDLINK_TOKEN")
            .output()
            .unwrap()
    };
    let out = second(&dir.path().join("b"), &first.udp);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("UDP {} is already served", first.udp))
            && err.contains(&format!("(pid {}: ", first.child.id()))
            && err.contains("serve"),
        "{err}"
    );
    let out = second(
        &dir.path().join("a"),
        &format!("127.0.0.1:{}", free_udp_port()),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is in use by another gateway")
            && err.contains(&format!("pid {}", first.child.id())),
        "{err}"
    );
    // The first still answers.
    assert_eq!(
        http("GET", &format!("{}/healthz", first.api), None, None)
            .unwrap()
            .0,
        200
    );
    first.child.kill().unwrap();
    first.child.wait().unwrap();
}

#[test]
fn genkey_and_pubkey() {
    let out = Command::new(BIN).arg("genkey").output().unwrap();
    assert!(out.status.success());
    let private = String::from_utf8(out.stdout).unwrap();
    assert_eq!(private.len(), 45, "44 base64 characters and a newline");
    let mut child = Command::new(BIN)
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=\n"
    );

    let mut child = Command::new(BIN)
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"not a key\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
}

/// `cloudlink loadgen` against the binary: it registers a small fleet
/// through the API, connects every device over real sockets (several per
/// socket, two source addresses), and reports the contract's JSON.
#[test]
fn loadgen_connects_a_small_fleet_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let token = "loadgen-test-token-0001";
    let mut s = serve(dir.path(), &[("CLOUDLINK_TOKEN", token)]);
    let out = Command::new(BIN)
        .args([
            "loadgen",
            "--gateway",
            &s.udp,
            "--api",
            &s.api,
            "--token",
            token,
        ])
        .args([
            "--devices",
            "50",
            "--rate",
            "200",
            "--sockets",
            "4",
            "--source-ips",
            "2",
        ])
        .args(["--duration", "30s", "--exit-when-connected"])
        .args(["--gateway-pid", &s.child.id().to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(r["devices"], 50, "{r}");
    assert_eq!(r["connected"], 50, "{r}");
    assert!(r["all_connected_s"].as_f64().unwrap() < 30.0);
    for k in ["handshakes_per_s", "handshake_p50_ms", "handshake_p99_ms"] {
        assert!(r[k].as_f64().unwrap() > 0.0, "{k}: {r}");
    }
    assert_eq!(r["failures"], serde_json::json!({}), "{r}");
    assert!(r["gateway_rss_bytes"].as_u64().unwrap() > 1 << 20);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("connected 50/50"),
        "a progress line"
    );
    // The gateway saw them: 50 registered, 50 handshakes completed.
    let (_, metrics) = http("GET", &format!("{}/metrics", s.api), None, None).unwrap();
    assert!(
        metrics.contains("cloudlink_devices_registered 50"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cloudlink_handshakes_total{result=\"completed\"} 50"),
        "{metrics}"
    );
    // A device of someone else's stays; `--cleanup` deletes the run's 50.
    let key = cloudlink::keys::encode_key(&cloudlink::keys::public_key(
        &cloudlink::keys::generate_private_key(),
    ));
    let (st, body) = http(
        "POST",
        &format!("{}/v1/devices", s.api),
        Some(token),
        Some(&format!(r#"{{"uuid":"kiosk-1","public_key":"{key}"}}"#)),
    )
    .unwrap();
    assert_eq!(st, 201, "{body}");
    let out = Command::new(BIN)
        .args(["loadgen", "--cleanup", "--api", &s.api, "--token", token])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("deleted 50 devices"), "{err}");
    let (_, metrics) = http("GET", &format!("{}/metrics", s.api), None, None).unwrap();
    assert!(
        metrics.contains("cloudlink_devices_registered 1"),
        "{metrics}"
    );
    let _ = s.child.kill();
    let _ = s.child.wait();
}
