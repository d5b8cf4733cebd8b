//! The data directory: one written by the previous release opens (and is
//! upgraded) with nothing lost, and its permissions are tightened to
//! 0700/0600 at start.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn copy_fixture(to: &Path) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data-0.1.0");
    for e in std::fs::read_dir(&from).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "README.md" {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_of_the_previous_release_opens_tightened_with_nothing_lost() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(dir.path());
    // As an operator's hand or a permissive umask left it.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for f in ["registry.sqlite3", "gateway.key"] {
        std::fs::set_permissions(dir.path().join(f), std::fs::Permissions::from_mode(0o644))
            .unwrap();
    }
    let c = config(dir.path());
    let mut g = TestGateway::start_in(dir, c, "127.0.0.1:0").await;
    let d = g.dir.path().to_owned();
    assert_eq!(mode(&d), 0o700);
    let files: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        files.iter().any(|f| f.ends_with("registry.sqlite3-wal")),
        "{files:?}"
    );
    for f in &files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }

    // Nothing stored is lost: devices, their settings, the heartbeat, the
    // queued action, the gateway's identity.
    let one = g.device("fixture-one").await;
    assert_eq!(one["name"], "first device");
    assert_eq!(one["address"], "10.240.0.2");
    let two = g.device("fixture-two").await;
    assert_eq!(two["app_id"], 42);
    assert_eq!(two["has_device_api_key"], true);
    assert_eq!(two["heartbeat"]["poll_interval_s"], 60);
    assert_eq!(two["heartbeat"]["last_at"], "2026-11-30T15:23:57.804Z");
    assert_eq!(
        two["gateway"]["public_key"],
        "CH3koSwg/P9Pb+GSMv0tzKS/JelbYIffQHuzC9X05mo="
    );
    let (st, a) = g
        .call("GET", "/v1/actions/faff159f6232cce6fef4cc4c", None)
        .await;
    assert_eq!(st, 200, "{a}");
    assert_eq!(
        (a["device"].as_str(), a["action"].as_str()),
        (Some("fixture-one"), Some("reboot"))
    );
    // And it takes new registrations after the ones it had.
    let key = cloudlink::keys::generate_private_key();
    let r = g
        .register("fixture-three", &cloudlink::keys::public_key(&key))
        .await;
    assert_eq!(r["address"], "10.240.0.4");
    g.stop().await;
    // Upgraded to this build's schema.
    assert_eq!(
        cloudlink::store::schema::stored_version(&d.join("registry.sqlite3")).unwrap(),
        cloudlink::store::schema::LATEST
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_of_a_newer_release_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(dir.path());
    // SQLite's header keeps user_version at byte 60, big-endian: what a
    // newer build writes.
    let db = dir.path().join("registry.sqlite3");
    let mut bytes = std::fs::read(&db).unwrap();
    let newer = cloudlink::store::schema::LATEST + 1;
    bytes[60..64].copy_from_slice(&newer.to_be_bytes());
    std::fs::write(&db, &bytes).unwrap();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let e = match cloudlink::Gateway::start(config(dir.path()), udp, api).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a newer schema was accepted"),
    };
    assert!(e.contains("newer cloudlink"), "{e}");
    assert!(e.contains("registry.sqlite3"), "{e}");
    assert_eq!(
        cloudlink::store::schema::stored_version(&db).unwrap(),
        newer
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_data_directory_is_private_from_the_start() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("data");
    let mut c = config(&dir);
    c.token = None; // the generated token file too
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw = cloudlink::Gateway::start(c, udp, api).await.unwrap();
    assert_eq!(mode(&dir), 0o700);
    for f in [
        "registry.sqlite3",
        "registry.sqlite3-wal",
        "registry.sqlite3-shm",
        "gateway.key",
        "api-token",
    ] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
    gw.shutdown().await;
}
