//! `deploy/cluster/run-local.sh` driven from tests: 3 NATS servers, two or
//! three `cloudlink serve` processes and the nftables load balancer, each
//! in its own network namespace; devices in namespaces behind the balancer.
//! Torn down on drop.
#![allow(dead_code)]

use super::netns::{wg_keypair, Netns, WgGoDevice};
use serde_json::Value;
use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/cluster/run-local.sh");

pub struct LocalCluster {
    pub dir: tempfile::TempDir,
    env: HashMap<String, String>,
    pub token: String,
    http: reqwest::Client,
}

impl LocalCluster {
    /// Starts a cluster named `name` (at most 5 characters, unique among
    /// tests running at once) on /24s `net` and `net + 1`, with `gateways`
    /// gateways run from `bin` and `extra` `cloudlink serve` flags.
    pub fn up(name: &str, net: u16, gateways: u8, bin: &str, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let nats = super::nats::server_binary();
        let mut args = vec![
            "up".to_owned(),
            "--dir".into(),
            dir.path().display().to_string(),
            "--name".into(),
            name.into(),
            "--net".into(),
            net.to_string(),
            "--gateways".into(),
            gateways.to_string(),
            "--bin".into(),
            bin.into(),
            "--nats-bin".into(),
            nats.display().to_string(),
            "--".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let out = Command::new("bash")
            .arg(SCRIPT)
            .args(&args)
            .output()
            .unwrap();
        let dir_path = dir.path().to_owned();
        let logs = || {
            let mut s = String::new();
            for f in ["gw1.log", "gw2.log", "nats1.log", "lb.log"] {
                let text = std::fs::read_to_string(dir_path.join(f)).unwrap_or_default();
                let tail: Vec<_> = text.lines().rev().take(15).collect();
                s.push_str(&format!("--- {f}\n"));
                for l in tail.into_iter().rev() {
                    s.push_str(l);
                    s.push('\n');
                }
            }
            s
        };
        if !out.status.success() {
            let _ = Command::new("bash")
                .arg(SCRIPT)
                .args(["down", "--dir"])
                .arg(dir.path())
                .output();
            panic!(
                "run-local.sh up failed: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                logs()
            );
        }
        let env = std::fs::read_to_string(dir.path().join("cluster.env"))
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect::<HashMap<_, _>>();
        let token = std::fs::read_to_string(dir.path().join("token"))
            .unwrap()
            .trim()
            .to_owned();
        LocalCluster {
            dir,
            env,
            token,
            http: reqwest::Client::new(),
        }
    }

    fn script(&self, args: &[&str]) -> String {
        let out = Command::new("bash")
            .arg(SCRIPT)
            .args(args)
            .arg("--dir")
            .arg(self.dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "run-local.sh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The API base URL of gateway `g` (1-based).
    pub fn api(&self, g: u8) -> String {
        self.env[&format!("GW{g}_API")].clone()
    }

    /// The proxy of gateway `g`: (host, port).
    pub fn proxy(&self, g: u8) -> (String, u16) {
        let p = &self.env[&format!("GW{g}_PROXY")];
        let (h, port) = p.rsplit_once(':').unwrap();
        (h.to_owned(), port.parse().unwrap())
    }

    /// The address devices dial.
    pub fn service(&self) -> &str {
        &self.env["SERVICE"]
    }

    /// Stops gateway `g` with `signal` (`TERM`, `KILL`) and waits for it
    /// to exit.
    pub fn stop(&self, g: u8, signal: &str) {
        self.script(&["stop", &g.to_string(), "--signal", signal]);
    }

    pub fn start(&self, g: u8) {
        self.script(&["start", &g.to_string()]);
    }

    /// The gateways the load balancer sends new flows to.
    pub fn balanced(&self) -> Vec<u8> {
        std::fs::read_to_string(self.dir.path().join("lb.up"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|g| g.parse().ok())
            .collect()
    }

    /// Waits until the load balancer sends new flows to exactly `gws`.
    pub fn wait_balanced(&self, gws: &[u8], within: Duration) {
        let deadline = Instant::now() + within;
        while self.balanced() != gws {
            assert!(
                Instant::now() < deadline,
                "the balancer has {:?}, not {gws:?}:\n{}",
                self.balanced(),
                self.log("lb.log")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(file)).unwrap_or_default()
    }

    /// An API call with the cluster's token to gateway `g`.
    pub async fn call(&self, g: u8, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut rb = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.api(g)))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.unwrap();
        let st = r.status().as_u16();
        let text = r.text().await.unwrap();
        (st, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// (connected, owning gateway) of `uuid` as gateway `g` shows it.
    pub async fn view(&self, g: u8, uuid: &str) -> (bool, Option<String>) {
        let (_, d) = self
            .call(g, "GET", &format!("/v1/devices/{uuid}"), None)
            .await;
        (
            d["cloudlink"]["connected"] == true,
            d["cloudlink"]["gateway"].as_str().map(str::to_owned),
        )
    }

    /// A wireguard-go device `i` (1..200) in its own namespace behind the
    /// load balancer, registered as `uuid` through gateway `via`; its config
    /// names the service address, as the API gave it.
    pub async fn wireguard_go_device(&self, i: u8, uuid: &str, via: u8) -> WgGoDevice {
        let out = self.script(&["add-device", &i.to_string()]);
        let mut words = out.split_whitespace();
        let name = words.next().unwrap().to_owned();
        let ns_ip = words.next().unwrap().to_owned();
        let (service_ip, port) = self.service().rsplit_once(':').unwrap();
        let ns = Netns {
            name,
            // The namespace's link belongs to the script (removed with the
            // namespace): nothing on the host side to delete.
            host_if: String::new(),
            host_ip: service_ip.to_owned(),
            ns_ip,
            children: Vec::new(),
        };
        let (private, public) = wg_keypair();
        let (st, reg) = self
            .call(
                via,
                "POST",
                "/v1/devices",
                Some(serde_json::json!({"uuid": uuid, "public_key": public})),
            )
            .await;
        assert_eq!(st, 201, "{reg}");
        assert_eq!(reg["gateway"]["endpoint"], self.service());
        let tag = format!("{}{i}", &self.env["CLUSTER_NAME"]);
        WgGoDevice::configure(ns, &reg, &private, port.parse().unwrap(), &tag)
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(SCRIPT)
            .args(["down", "--dir"])
            .arg(self.dir.path())
            .output();
    }
}
