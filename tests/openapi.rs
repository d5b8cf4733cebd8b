//! The OpenAPI document: the committed `docs/openapi.json` is what the
//! code generates and what the gateway serves; every route of the router
//! is in it; and schemathesis (PyPI, installed in a venv by `tests/run.sh`)
//! finds every answer of a live gateway conforming: documented statuses,
//! content types and schemas, no server error, authentication enforced.
//! The event stream is excluded (it never ends).
//!
//! After changing the API: `UPDATE_OPENAPI=1 cargo nextest run --test
//! openapi` rewrites `docs/openapi.json`.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

fn root(p: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

#[test]
fn the_committed_document_is_the_generated_one() {
    let generated = cloudlink::api::openapi::document();
    if std::env::var("UPDATE_OPENAPI").is_ok() {
        std::fs::write(root("docs/openapi.json"), format!("{generated}\n")).unwrap();
    }
    let committed = std::fs::read_to_string(root("docs/openapi.json")).unwrap();
    assert_eq!(
        committed.trim_end(),
        generated,
        "docs/openapi.json is stale: UPDATE_OPENAPI=1 cargo nextest run --test openapi"
    );
}

/// `(method, path)` of every route `src/api/mod.rs` declares (the `/v1`
/// nest included), read from the router's source.
fn routes_in_router() -> BTreeSet<(String, String)> {
    let src = std::fs::read_to_string(root("src/api/mod.rs")).unwrap();
    let start = src.find("pub fn router(").unwrap();
    let end = start + src[start..].find("\n}\n").unwrap();
    let body = &src[start..end];
    let v1_end = body
        .find("Router::new()\n        .nest(\"/v1\", v1)")
        .unwrap();
    let mut out = BTreeSet::new();
    let mut at = 0;
    while let Some(i) = body[at..].find(".route(") {
        let open = at + i + ".route(".len();
        let mut depth = 1;
        let mut close = open;
        for (j, c) in body[open..].char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        close = open + j;
                        break;
                    }
                }
                _ => {}
            }
        }
        let call = &body[open..close];
        let path = call.split('"').nth(1).unwrap();
        let path = if open < v1_end {
            format!("/v1{path}")
        } else {
            path.to_owned()
        };
        for m in ["get", "post", "patch", "delete", "put"] {
            for needle in [format!("{m}("), format!(".{m}(")] {
                let hit = call
                    .match_indices(&needle)
                    .any(|(k, _)| k == 0 || !call.as_bytes()[k - 1].is_ascii_alphanumeric());
                if hit {
                    out.insert((m.to_owned(), path.clone()));
                }
            }
        }
        at = close;
    }
    out
}

#[test]
fn every_route_is_documented() {
    let doc: serde_json::Value =
        serde_json::from_str(&cloudlink::api::openapi::document()).unwrap();
    let mut documented = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for m in ops.as_object().unwrap().keys() {
            documented.insert((m.clone(), path.clone()));
        }
    }
    let routes = routes_in_router();
    assert!(routes.len() >= 20, "{routes:?}");
    let missing: Vec<_> = routes.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "routes not in the document: {missing:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_every_answer_conforming() {
    let mut g = TestGateway::start().await;
    g.register(
        "st-device",
        &cloudlink::keys::public_key(&cloudlink::keys::generate_private_key()),
    )
    .await;
    let served = reqwest::get(g.url("/v1/openapi.json"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(served, cloudlink::api::openapi::document());
    let st = root("target/tools/st-venv/bin/st");
    assert!(
        st.exists(),
        "schemathesis is not installed: run `bash tests/run.sh` (it makes target/tools/st-venv)"
    );
    let url = g.url("/v1/openapi.json");
    let out = tokio::task::block_in_place(|| {
        Command::new(&st)
            .args(["run", &url, "--experimental=openapi-3.1", "--checks", "all"])
            .args(["-H", &format!("Authorization: Bearer {TOKEN}")])
            .args(["--exclude-path", "/v1/events"])
            .args(["--hypothesis-max-examples", "25", "--hypothesis-seed", "7"])
            .args(["--hypothesis-deadline", "None", "--no-color"])
            .env("SCHEMATHESIS_HOOKS", "")
            .current_dir(std::env::temp_dir())
            .output()
            .unwrap()
    });
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("passed"), "{text}");
    g.stop().await;
}
