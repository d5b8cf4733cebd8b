//! Scoped API tokens cluster-wide (`crate::tokens`): the KV bucket
//! `cloudlink_tokens` (`t.<id>` → the record, never a secret) is the table;
//! every gateway keeps it in memory by a watch, so a token issued through
//! one gateway works on all, and a revocation reaches every gateway within
//! milliseconds.

use async_nats::jetstream::kv;
use futures_util::StreamExt;
use std::sync::Arc;

use super::ClusterError;
use crate::tokens::{TokenRecord, TokenStore, Tokens};

pub const BUCKET: &str = "cloudlink_tokens";

/// Loads the cluster's tokens into `tokens`, makes the bucket their store,
/// and follows it.
pub async fn share(
    js: &async_nats::jetstream::Context,
    replicas: usize,
    tokens: Arc<Tokens>,
) -> Result<(), ClusterError> {
    let mut store = super::open_bucket(
        js,
        kv::Config {
            bucket: BUCKET.into(),
            description: "cloudlink scoped API tokens (hashes, never secrets)".into(),
            history: 1,
            ..Default::default()
        },
        replicas,
    )
    .await?;
    let empty = store
        .status()
        .await
        .map(|s| s.values() == 0)
        .map_err(ClusterError::js)?;
    let mut watch = store
        .watch_with_history(">")
        .await
        .map_err(ClusterError::js)?;
    if !empty {
        // The values present now, before anyone is served.
        while let Some(Ok(entry)) = watch.next().await {
            apply(&tokens, &entry);
            if entry.delta == 0 {
                break;
            }
        }
    }
    tokens.set_store(TokenStore::Nats(Box::new(store.clone())));
    let weak = Arc::downgrade(&tokens);
    tokio::spawn(async move {
        loop {
            while let Some(Ok(entry)) = watch.next().await {
                let Some(t) = weak.upgrade() else { return };
                apply(&t, &entry);
            }
            // The watch ended (NATS went away): make it again, from the
            // current values.
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            if weak.strong_count() == 0 {
                return;
            }
            match store.watch_with_history(">").await {
                Ok(w) => watch = w,
                Err(e) => tracing::debug!(error = %e, "token watch: retrying"),
            }
            let _ = &mut store;
        }
    });
    Ok(())
}

fn apply(tokens: &Tokens, entry: &kv::Entry) {
    let Some(id) = entry.key.strip_prefix("t.") else {
        return;
    };
    match entry.operation {
        kv::Operation::Put => match TokenRecord::parse(&entry.value) {
            Some(r) if r.id == id => tokens.apply(id, Some(r)),
            _ => {
                tracing::warn!(key = %entry.key, "a token record of an unknown format was skipped")
            }
        },
        _ => tokens.apply(id, None),
    }
}
