//! Dashboard sign-outs cluster-wide. In cluster mode a dashboard session is
//! a signed cookie any gateway checks by itself (`api::sign_in`); signing
//! out must then reach every gateway, including one that restarts later.
//! A sign-out is a key `<nonce>` in the KV bucket `cloudlink_signouts`
//! whose value is the session's expiry (Unix ms); the bucket's `max_age`
//! is the longest a session lasts, so revocations go when their sessions
//! would have. Every gateway watches the bucket from its start.

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::StreamExt;
use std::time::Duration;

use super::ClusterError;

pub const BUCKET: &str = "cloudlink_signouts";

/// Shares this gateway's sign-outs and applies every gateway's.
pub async fn share(
    js: &async_nats::jetstream::Context,
    api: std::sync::Weak<crate::api::ApiState>,
    replicas: usize,
) -> Result<(), ClusterError> {
    let store = super::open_bucket(
        js,
        kv::Config {
            bucket: BUCKET.into(),
            description: "cloudlink dashboard sign-outs (revoked session nonces)".into(),
            history: 1,
            max_age: crate::api::sign_in::IDLE_TIMEOUT + Duration::from_secs(60),
            ..Default::default()
        },
        replicas,
    )
    .await?;
    let Some(state) = api.upgrade() else {
        return Ok(());
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, u64)>();
    state.sign_ins.share_sign_outs(move |nonce, expiry| {
        let _ = tx.send((nonce.to_owned(), expiry));
    });
    drop(state);
    let writer = store.clone();
    tokio::spawn(async move {
        while let Some((nonce, expiry)) = rx.recv().await {
            // Retried until it lands: a sign-out must not be lost to a
            // NATS hiccup.
            loop {
                match writer.put(&nonce, Bytes::from(expiry.to_string())).await {
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not share a dashboard sign-out; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
    });
    tokio::spawn(async move {
        loop {
            let mut w = match store.watch_with_history(">").await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch dashboard sign-outs; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            while let Some(Ok(entry)) = w.next().await {
                let Some(state) = api.upgrade() else { return };
                if entry.operation != kv::Operation::Put {
                    continue;
                }
                let expiry = std::str::from_utf8(&entry.value)
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok());
                if let Some(expiry) = expiry {
                    state.sign_ins.revoke(&entry.key, expiry);
                }
            }
            if api.strong_count() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    Ok(())
}

/// The signing key of dashboard sessions: derived from the WireGuard
/// private key every gateway of the cluster shares, under a label of its
/// own (the key is never used for anything else).
pub fn session_key(private_key: &[u8; 32]) -> [u8; 32] {
    use blake2::Digest;
    let mut h = blake2::Blake2s256::new();
    h.update(b"cloudlink dashboard sessions v1");
    h.update(private_key);
    h.finalize().into()
}
