//! The audit trail cluster-wide (`crate::audit`): the JetStream stream
//! `CLOUDLINK_AUDIT`, kept `--audit-retention` by the stream's `max_age`
//! and replicated like the buckets. The gateway that saw what happened
//! publishes the record (subject `cloudlink.audit.d.<device in hex>`, or
//! `cloudlink.audit.n` without a device); `GET /v1/audit` on any gateway
//! reads the stream from `since` (by start time) with a subject filter for
//! `device=`, so every gateway answers with the whole cluster's records.
//!
//! Each gateway also keeps its own records in SQLite, as alone: if NATS
//! cannot be read, `GET /v1/audit` answers with those and `partial: true`.
//! A record NATS refused is logged and counted, never retried from memory
//! (the local copy stays).

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use serde_json::Value;
use std::time::Duration;

use super::ClusterError;

pub const STREAM: &str = "CLOUDLINK_AUDIT";
const SUBJECT: &str = "cloudlink.audit";

pub struct SharedAudit {
    js: jetstream::Context,
    gateway: String,
}

/// The subject of a record about `device` (hex: a uuid may hold characters
/// a subject may not, such as `.`).
fn subject(device: Option<&str>) -> String {
    match device {
        Some(d) => {
            let mut s = String::with_capacity(SUBJECT.len() + 3 + d.len() * 2);
            s.push_str(SUBJECT);
            s.push_str(".d.");
            for b in d.bytes() {
                s.push_str(&format!("{b:02x}"));
            }
            s
        }
        None => format!("{SUBJECT}.n"),
    }
}

impl SharedAudit {
    /// Makes (or opens) the stream; its `max_age` follows this gateway's
    /// `--audit-retention` (the last gateway to start sets it).
    pub async fn open(
        js: &jetstream::Context,
        replicas: usize,
        retention: Duration,
        gateway: &str,
    ) -> Result<SharedAudit, ClusterError> {
        let config = stream::Config {
            name: STREAM.into(),
            description: Some(
                "cloudlink audit trail: relay streams, actions, deletions, tokens".into(),
            ),
            subjects: vec![format!("{SUBJECT}.>")],
            max_age: retention,
            num_replicas: replicas,
            ..Default::default()
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let attempt = async {
                let s = js
                    .get_or_create_stream(config.clone())
                    .await
                    .map_err(ClusterError::js)?;
                if s.cached_info().config.max_age != retention {
                    js.update_stream(&config).await.map_err(ClusterError::js)?;
                }
                Ok::<_, ClusterError>(())
            };
            match attempt.await {
                Ok(()) => break,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::info!(error = %e, "the audit stream does not answer yet; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(SharedAudit {
            js: js.clone(),
            gateway: gateway.to_owned(),
        })
    }

    /// Publishes a record (`at_ms`, `type`, `token_id`, `device`, `detail`)
    /// in the background.
    pub fn publish(&self, device: Option<&str>, mut record: serde_json::Map<String, Value>) {
        record.insert("gateway".into(), Value::String(self.gateway.clone()));
        let body = Value::Object(record).to_string();
        let (js, subject) = (self.js.clone(), subject(device));
        tokio::spawn(async move {
            let sent = async {
                js.publish(subject, body.into())
                    .await
                    .map_err(ClusterError::js)?
                    .await
                    .map_err(ClusterError::js)
            };
            if let Err(e) = tokio::time::timeout(Duration::from_secs(10), sent)
                .await
                .unwrap_or_else(|_| Err(ClusterError::JetStream("timed out".into())))
            {
                tracing::error!(error = %e, "could not share an audit record; it is kept on this gateway only");
            }
        });
    }

    /// The cluster's records at or after `since_ms` (of `device`), oldest
    /// first, at most `limit`; each with `id` (its sequence in the stream).
    pub async fn query(
        &self,
        device: Option<&str>,
        since_ms: i64,
        limit: usize,
    ) -> Result<Vec<Value>, ClusterError> {
        let mut s = self.js.get_stream(STREAM).await.map_err(ClusterError::js)?;
        let last = s
            .info()
            .await
            .map_err(ClusterError::js)?
            .state
            .last_sequence;
        if last == 0 {
            return Ok(Vec::new());
        }
        let start = async_nats::datetime::from_nanos(since_ms.max(0) as i128 * 1_000_000)
            .map_err(ClusterError::js)?;
        let consumer = s
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: match device {
                    Some(_) => subject(device),
                    None => format!("{SUBJECT}.>"),
                },
                deliver_policy: consumer::DeliverPolicy::ByStartTime { start_time: start },
                ..Default::default()
            })
            .await
            .map_err(ClusterError::js)?;
        let mut messages = consumer.messages().await.map_err(ClusterError::js)?;
        let mut out = Vec::new();
        while out.len() < limit {
            // Nothing within a second: nothing (more) matches.
            let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(1), messages.next()).await
            else {
                break;
            };
            let m = m.map_err(ClusterError::js)?;
            let (seq, pending) = match m.info() {
                Ok(i) => (i.stream_sequence, i.pending),
                Err(_) => (0, 0),
            };
            if let Ok(Value::Object(mut r)) = serde_json::from_slice::<Value>(&m.payload) {
                let at = r.remove("at_ms").and_then(|v| v.as_i64()).unwrap_or(0);
                let mut rec = serde_json::Map::new();
                rec.insert("id".into(), seq.into());
                rec.insert(
                    "at".into(),
                    crate::bus::event::rfc3339(
                        std::time::UNIX_EPOCH + Duration::from_millis(at.max(0) as u64),
                    )
                    .into(),
                );
                for k in ["type", "token_id", "device", "detail", "gateway"] {
                    rec.insert(k.into(), r.remove(k).unwrap_or(Value::Null));
                }
                out.push(Value::Object(rec));
            }
            if pending == 0 || seq >= last {
                break;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn subjects_carry_any_uuid() {
        assert_eq!(super::subject(Some("a.b")), "cloudlink.audit.d.612e62");
        assert_eq!(super::subject(None), "cloudlink.audit.n");
    }
}
