//! The deploy files hold what they claim: the systemd unit's exposure
//! score (`systemd-analyze security --offline=true`), the alert rules'
//! own `promtool` tests (a firing and a silent case each), and the Grafana
//! dashboard's queries naming only metrics a live gateway exports.

mod common;

use common::*;
use std::collections::HashSet;
use std::path::Path;
use std::process::Command;

fn deploy(p: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(p)
}

#[test]
fn the_systemd_unit_scores_2_5_or_lower() {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(deploy("cloudlink.service"))
        .output()
        .expect("systemd-analyze could not run (Debian's systemd package)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for cloudlink.service:")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no score in: {text}"));
    eprintln!("systemd-analyze security: {score}");
    assert!(score <= 2.5, "exposure {score}: {text}");
    // The stop timeout leaves room for the drain (--drain-timeout, 30 s).
    let unit = std::fs::read_to_string(deploy("cloudlink.service")).unwrap();
    let stop: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.trim().parse().ok())
        .expect("TimeoutStopSec");
    assert!(stop > 30, "TimeoutStopSec={stop}");
}

#[test]
fn the_alert_rules_pass_their_promtool_tests() {
    let dir = deploy("prometheus");
    for args in [
        vec!["check", "rules", "alerts.yml"],
        vec!["test", "rules", "alerts.test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(&args)
            .current_dir(&dir)
            .output()
            .expect("promtool could not run (Debian's prometheus package)");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The rules the issue asks for are there.
    let rules = std::fs::read_to_string(dir.join("alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("alerts.test.yml")).unwrap();
    for alert in [
        "CloudlinkGatewayDown",
        "CloudlinkHandshakesFailing",
        "CloudlinkDevicesDisconnectingInBulk",
        "CloudlinkHandshakeQueueSaturated",
        "CloudlinkCookieRepliesSustained",
        "CloudlinkEventConsumersResync",
        "CloudlinkActionFailures",
    ] {
        assert!(rules.contains(&format!("alert: {alert}")), "{alert}");
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "no test of {alert}"
        );
    }
}

/// Metric families on `/metrics` (histograms with their series' suffixes).
fn families(text: &str) -> HashSet<String> {
    let mut out = HashSet::new();
    for l in text.lines() {
        let Some(rest) = l.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut it = rest.split_whitespace();
        let (Some(name), Some(kind)) = (it.next(), it.next()) else {
            continue;
        };
        out.insert(name.to_owned());
        if kind == "histogram" {
            for s in ["_bucket", "_sum", "_count"] {
                out.insert(format!("{name}{s}"));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_queries_metrics_the_gateway_exports() {
    let mut g = TestGateway::start().await;
    let exported = families(&g.metrics().await);
    assert!(exported.contains("cloudlink_build_info"), "{exported:?}");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/cloudlink.json")).unwrap())
            .unwrap();
    assert_eq!(dash["uid"], "cloudlink");
    assert!(dash["schemaVersion"].as_u64().unwrap() >= 30);
    let panels = dash["panels"].as_array().unwrap();
    let titles: Vec<&str> = panels
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for want in [
        "Sessions",
        "Devices by status",
        "Handshakes",
        "Handshake failures",
        "bytes",
        "Drops by reason",
        "Relay streams",
        "Actions",
        "Handshake queue",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(want)),
            "no panel for {want}: {titles:?}"
        );
    }
    let name = regex_lite_names;
    for p in panels {
        assert!(p["gridPos"]["w"].as_u64().unwrap() > 0, "{p}");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{p}");
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            let names = name(expr);
            assert!(!names.is_empty(), "{expr}");
            for n in names {
                assert!(
                    exported.contains(&n),
                    "{n} (in {expr:?}) is not on /metrics"
                );
            }
        }
    }
    g.stop().await;
}

/// The `cloudlink_*` metric names in a PromQL expression.
fn regex_lite_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("cloudlink_") {
        let start = i + at;
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        out.push(expr[start..end].to_owned());
        i = end;
    }
    out
}
