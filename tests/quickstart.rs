//! The README's quick start, run as written: the shell blocks tagged
//! `<!-- quickstart:device -->` and `<!-- quickstart:gateway -->` in
//! README.md, in order, in two network namespaces (a gateway and a device
//! with stock `wg-quick`, which falls back to wireguard-go here), joined by
//! a veth link. The device comes up (an echo to the gateway's tunnel
//! address answers, `cloudlink show` lists it) and no file holding a
//! private key is readable by group or others.
//!
//! What differs from a real pair of hosts, and only that: the device's
//! `/etc/wireguard` is a temporary directory (the namespaces share this
//! machine's file system), the config file is copied from the gateway's
//! directory to the device's ("send it any way you like"), and the gateway
//! runs with `--endpoint` set to its address on the link, as the README
//! says to.

mod common;

use common::netns::Netns;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_cloudlink");

/// The README's tagged blocks, in order: (role, script).
fn blocks() -> Vec<(String, String)> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let mut out = Vec::new();
    let mut lines = readme.lines();
    while let Some(l) = lines.next() {
        let Some(tag) = l.trim().strip_prefix("<!-- quickstart:") else {
            continue;
        };
        let role = tag
            .split(|c: char| c.is_whitespace() || c == '-')
            .next()
            .unwrap()
            .to_owned();
        let fence = lines.next().unwrap();
        assert!(
            fence.trim() == "```sh",
            "a tag not before a block: {fence:?}"
        );
        let indent = fence.len() - fence.trim_start().len();
        let mut script = String::new();
        for l in lines.by_ref() {
            if l.trim() == "```" {
                break;
            }
            script.push_str(l.get(indent..).unwrap_or(l.trim_start()));
            script.push('\n');
        }
        out.push((role, script));
    }
    out
}

/// Runs `script` with bash in namespace `ns`, from `dir`, with the
/// binary's directory first on PATH; its stdout.
fn run_in(ns: &Netns, dir: &Path, script: &str) -> String {
    let path = format!(
        "{}:{}",
        Path::new(BIN).parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("ip")
        .args([
            "netns", "exec", &ns.name, "bash", "-euo", "pipefail", "-c", script,
        ])
        .current_dir(dir)
        .env("PATH", path)
        .env_remove("CLOUDLINK_TOKEN")
        .env_remove("CLOUDLINK_URL")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "in {}: {script}\n{}{}",
        ns.name,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn private(path: &Path) {
    let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode & 0o077, 0, "{} is mode {mode:o}", path.display());
}

#[test]
fn the_readme_quick_start_brings_a_device_up() {
    let blocks = blocks();
    let roles: Vec<&str> = blocks.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(
        roles,
        ["device", "gateway", "device"],
        "the README's tagged blocks"
    );

    let gw_ns = Netns::create("qsgw", 4u16);
    let dev_ns = Netns::create("qsdev", 5u16);
    // A direct link between the two, 198.18.6.0/24.
    let _ = Command::new("ip").args(["link", "del", "clq-g"]).output();
    common::netns::run(
        "ip",
        &[
            "link", "add", "clq-g", "type", "veth", "peer", "name", "clq-d",
        ],
    );
    common::netns::run("ip", &["link", "set", "clq-g", "netns", &gw_ns.name]);
    common::netns::run("ip", &["link", "set", "clq-d", "netns", &dev_ns.name]);
    gw_ns.exec(&["ip", "addr", "add", "198.18.6.1/24", "dev", "clq-g"]);
    gw_ns.exec(&["ip", "link", "set", "clq-g", "up"]);
    dev_ns.exec(&["ip", "addr", "add", "198.18.6.2/24", "dev", "clq-d"]);
    dev_ns.exec(&["ip", "link", "set", "clq-d", "up"]);

    let gw_dir = tempfile::tempdir().unwrap();
    let dev_dir = tempfile::tempdir().unwrap();
    let etc = dev_dir.path().join("etc-wireguard");
    std::fs::create_dir(&etc).unwrap();
    let etc_s = etc.to_str().unwrap();

    // "Run it": the gateway with its defaults, and the endpoint devices dial.
    let mut gateway = Command::new("ip")
        .args([
            "netns",
            "exec",
            &gw_ns.name,
            BIN,
            "serve",
            "--endpoint",
            "198.18.6.1:51820",
        ])
        .current_dir(gw_dir.path())
        .env_remove("CLOUDLINK_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !gw_dir.path().join("cloudlink-data/api-token").exists()
        || Command::new("ip")
            .args([
                "netns",
                "exec",
                &gw_ns.name,
                "curl",
                "-sf",
                "http://127.0.0.1:8080/readyz",
            ])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
    {
        assert!(Instant::now() < deadline, "the gateway did not start");
        std::thread::sleep(Duration::from_millis(100));
    }

    // 1. On the device: its key; the last line printed is the public key.
    let step1 = blocks[0].1.replace("/etc/wireguard", etc_s);
    let printed = run_in(&dev_ns, dev_dir.path(), &step1);
    let public = printed.lines().last().unwrap().trim().to_owned();
    assert_eq!(public.len(), 44, "{printed}");
    private(&etc.join("cloudlink.key"));

    // 2. On the gateway host: register with that public key.
    let step2 = blocks[1].1.replace("<the device public key>", &public);
    run_in(&gw_ns, gw_dir.path(), &step2);
    std::fs::copy(
        gw_dir.path().join("kiosk-0042.conf"),
        dev_dir.path().join("kiosk-0042.conf"),
    )
    .unwrap();

    // 3. On the device: the key in, the tunnel up.
    let step3 = blocks[2]
        .1
        .replace(
            "wg-quick up cloudlink",
            &format!("wg-quick up {etc_s}/cloudlink.conf"),
        )
        .replace("/etc/wireguard", etc_s);
    run_in(&dev_ns, dev_dir.path(), &step3);
    private(&etc.join("cloudlink.conf"));
    private(&gw_dir.path().join("cloudlink-data/gateway.key"));
    private(&gw_dir.path().join("cloudlink-data/api-token"));

    // Up: the gateway answers an echo over the tunnel, and lists the device.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ping = Command::new("ip")
            .args([
                "netns",
                "exec",
                &dev_ns.name,
                "ping",
                "-c",
                "1",
                "-W",
                "1",
                "10.240.0.1",
            ])
            .output()
            .unwrap();
        if ping.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no echo from the gateway over the tunnel"
        );
    }
    let shown = run_in(&gw_ns, gw_dir.path(), "cloudlink show");
    assert!(shown.contains("device: kiosk-0042 (10.240.0.2)"), "{shown}");
    assert!(shown.contains("endpoint: 198.18.6.2:"), "{shown}");

    let _ = Command::new("ip")
        .args(["netns", "exec", &dev_ns.name, "wg-quick", "down"])
        .arg(etc.join("cloudlink.conf"))
        .output();
    let _ = gateway.kill();
    let _ = gateway.wait();
}
