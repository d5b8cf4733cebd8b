//! The cluster's event stream: the JetStream stream `CLOUDLINK_EVENTS`
//! (subjects `cloudlink.events.<type>.<uuid>`, `fleet` for an event about no
//! single device), deduplicated by `Nats-Msg-Id`. `GET /v1/events` on any
//! gateway serves it, and a consumer resumes on any gateway by the stream
//! sequence (`Last-Event-ID: <stream>-<sequence>`).
//!
//! [`ClusterBus`] is the [`EventBus`] of a gateway in cluster mode. It has
//! three parts:
//! - this gateway's own ring ([`RingBus`]): every event published here goes
//!   there first, at once, for the in-process consumers (the fleet reactor
//!   follows its device events); publishing never waits on NATS;
//! - an outbox: the events this gateway publishes cluster-wide, sent by a
//!   task in order, a few hundred acknowledgements in flight. While NATS is
//!   unreachable they wait there (bounded by `--event-ring`; the oldest go
//!   first when it is full, counted in
//!   `cloudlink_cluster_events_dropped_total`) and are sent on reconnect. A
//!   batch whose acknowledgement was lost is sent again under the same
//!   message ids, so the stream keeps each event once;
//! - a view of the stream: an ordered consumer copies the stream into a
//!   ring keyed by stream sequence, which is what `/v1/events` reads. Every
//!   gateway's view holds the same events under the same sequences.
//!
//! Which events go cluster-wide is the producer's call ([`Reach`]): what
//! happened here (a link of a device this gateway holds, a heartbeat posted
//! here, a change of the shared registry written here) goes out once; what
//! a gateway only applies or derives from another's change (the registry
//! change another gateway wrote, which every gateway announces to its own
//! reactor; the status of a device held elsewhere) stays local.

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::ClusterError;
use crate::bus::{Event, EventBus, InvalidEventId, Reach, Read, Resume, RingBus, StoredEvent};

pub const STREAM: &str = "CLOUDLINK_EVENTS";
const SUBJECT_PREFIX: &str = "cloudlink.events";
/// How long the stream remembers message ids: a gateway cut off from NATS
/// for up to this long sends its buffered events again without
/// duplicating any.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(600);
/// Acknowledgements awaited at once.
const IN_FLIGHT: usize = 256;

/// An event as it travels on the stream: the envelope without `id` (the
/// stream sequence is the id; each view adds it).
#[derive(Serialize)]
struct Wire<'a> {
    device: Option<&'a str>,
    at: String,
    gateway: &'a str,
    #[serde(flatten)]
    event: &'a Event,
}

struct Outgoing {
    subject: String,
    msg_id: String,
    payload: Bytes,
}

#[derive(Default)]
struct View {
    /// Stream sequence of the newest event held (0: none yet).
    last: u64,
    events: VecDeque<StoredEvent>,
    closed: bool,
}

pub struct ClusterBus {
    local: RingBus,
    gateway: String,
    /// Names the stream's incarnation in resume tokens: a stream made anew
    /// restarts its sequences, and tokens of the old one must resync.
    epoch: String,
    capacity: usize,
    /// Numbers this gateway's publications in their message ids.
    next_msg: std::sync::atomic::AtomicU64,
    outbox: Mutex<VecDeque<Outgoing>>,
    wake: tokio::sync::Notify,
    view: Mutex<View>,
    notify: tokio::sync::watch::Sender<u64>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl ClusterBus {
    /// Opens (or makes) the stream, starts the outbox sender and the view,
    /// and returns once the view holds what the stream held at the call
    /// (at most `capacity` of the newest), or after 10 s.
    pub async fn open(
        js: &jetstream::Context,
        local: RingBus,
        capacity: usize,
        metrics: Arc<crate::metrics::Metrics>,
        health: Arc<super::NatsHealth>,
        replicas: usize,
    ) -> Result<Arc<ClusterBus>, ClusterError> {
        // As for buckets: a NATS cluster just started, or a replicated
        // stream made a moment ago, answers once it has a leader.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let (s, info) = loop {
            let attempt = async {
                let mut s = js
                    .get_or_create_stream(stream::Config {
                        name: STREAM.into(),
                        description: Some(
                            "cloudlink: link, status, action and device events".into(),
                        ),
                        subjects: vec![format!("{SUBJECT_PREFIX}.>")],
                        max_messages: 10_000_000,
                        max_age: Duration::from_secs(7 * 24 * 3600),
                        duplicate_window: DUPLICATE_WINDOW,
                        num_replicas: replicas,
                        ..Default::default()
                    })
                    .await
                    .map_err(ClusterError::js)?;
                let info = s.info().await.map_err(ClusterError::js)?.clone();
                Ok::<_, ClusterError>((s, info))
            };
            match attempt.await {
                Ok(x) => break x,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::info!(error = %e, "the event stream does not answer yet; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let epoch = format!("c{:x}", info.created.unix_timestamp());
        let last = info.state.last_sequence;
        let capacity = capacity.max(1);
        let start = last
            .saturating_sub(capacity as u64 - 1)
            .max(info.state.first_sequence)
            .max(1);
        let (notify, _) = tokio::sync::watch::channel(0);
        let bus = Arc::new(ClusterBus {
            gateway: local.gateway().to_owned(),
            local,
            epoch,
            capacity,
            next_msg: std::sync::atomic::AtomicU64::new(1),
            outbox: Mutex::new(VecDeque::new()),
            wake: tokio::sync::Notify::new(),
            view: Mutex::new(View {
                last: start - 1,
                ..Default::default()
            }),
            notify,
            metrics,
        });
        tokio::spawn(send(Arc::downgrade(&bus), js.clone()));
        tokio::spawn(follow(Arc::downgrade(&bus), s, start, health));
        let mut rx = bus.notify.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|n| *n >= last)).await;
        Ok(bus)
    }

    /// Events waiting for NATS.
    pub fn buffered(&self) -> usize {
        self.outbox.lock().len()
    }

    /// Sends what the outbox holds now, waiting up to `timeout` (a clean
    /// stop calls it last).
    pub async fn flush(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.buffered() > 0 && tokio::time::Instant::now() < deadline {
            self.wake.notify_one();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn enqueue(&self, device: Option<&str>, event: &Event, at: SystemTime, msg_id: String) {
        let payload = serde_json::to_vec(&Wire {
            device,
            at: crate::bus::event::rfc3339(at),
            gateway: &self.gateway,
            event,
        })
        .unwrap_or_default();
        let subject = format!(
            "{SUBJECT_PREFIX}.{}.{}",
            event.kind(),
            device.filter(|d| subject_token(d)).unwrap_or("fleet")
        );
        let mut out = self.outbox.lock();
        if out.len() >= self.capacity {
            out.pop_front();
            self.metrics.cluster_events_dropped.inc();
        }
        out.push_back(Outgoing {
            subject,
            msg_id,
            payload: payload.into(),
        });
        self.metrics.cluster_events_buffered.set(out.len() as i64);
        drop(out);
        self.wake.notify_one();
    }

    /// Adds one event read from the stream to the view.
    fn view_push(&self, seq: u64, subject: &str, payload: &[u8]) {
        let mut v = self.view.lock();
        if seq <= v.last {
            return; // a redelivery after the consumer was made again
        }
        let device = subject
            .rsplit('.')
            .next()
            .filter(|d| *d != "fleet")
            .map(Arc::<str>::from);
        // `{"id":<seq>,"epoch":"<epoch>",` + the rest of the object. A
        // payload that is not a JSON object (not ours) is skipped.
        let json = match payload.strip_prefix(b"{") {
            Some(rest) if serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_ok() => {
                let mut j = format!("{{\"id\":{seq},\"epoch\":\"{}\"", self.epoch);
                if rest != b"}" {
                    j.push(',');
                }
                j.push_str(&String::from_utf8_lossy(rest));
                j
            }
            _ => {
                v.last = seq;
                drop(v);
                self.notify.send_replace(seq);
                return;
            }
        };
        if v.events.len() == self.capacity {
            v.events.pop_front();
        }
        v.events.push_back(StoredEvent {
            id: seq,
            device,
            event: None,
            json: json.into(),
            reach: Reach::Cluster,
        });
        v.last = seq;
        drop(v);
        self.notify.send_replace(seq);
    }
}

/// Whether `s` can be one token of a NATS subject.
fn subject_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl EventBus for ClusterBus {
    fn publish_reach(
        &self,
        device: Option<&str>,
        event: Event,
        at: SystemTime,
        reach: Reach,
    ) -> u64 {
        if reach == Reach::Cluster {
            // Unique per publication, the same when it is sent again: this
            // gateway, its boot, a count.
            let n = self
                .next_msg
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let msg_id = format!("{}-{}-{n}", self.gateway, self.local.epoch());
            self.enqueue(device, &event, at, msg_id);
        }
        self.local.publish_reach(device, event, at, reach)
    }

    fn local_last_id(&self) -> u64 {
        self.local.last_id()
    }

    fn last_id(&self) -> u64 {
        self.view.lock().last
    }

    fn token(&self, cursor: u64) -> String {
        format!("{}-{cursor}", self.epoch)
    }

    fn resume_from(&self, token: Option<&str>) -> Result<Resume, InvalidEventId> {
        let Some(text) = token else {
            return Ok(Resume::Live);
        };
        let text = text.trim();
        // `<epoch>-<sequence>`, or the bare stream sequence.
        let (epoch, seq) = match text.rsplit_once('-') {
            Some((e, s)) => (Some(e), s),
            None => (None, text),
        };
        let seq: u64 = seq.parse().map_err(|_| InvalidEventId)?;
        if epoch.is_some_and(|e| e != self.epoch) {
            return Ok(Resume::Resync("epoch_changed"));
        }
        let v = self.view.lock();
        let oldest = v.events.front().map(|e| e.id).unwrap_or(v.last + 1);
        if seq + 1 < oldest {
            return Ok(Resume::Resync("too_old"));
        }
        // A sequence beyond this view is one another gateway's view has
        // already shown: wait for it here.
        Ok(Resume::After(seq))
    }

    fn read_after(&self, cursor: u64, max: usize) -> Read {
        let v = self.view.lock();
        crate::bus::read_window(&v.events, v.last + 1, cursor, max, v.closed)
    }

    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.notify.subscribe()
    }

    fn read_device_events_after(&self, cursor: u64, max: usize) -> Read {
        self.local.read_device_events_after(cursor, max)
    }

    fn subscribe_device_events(&self) -> tokio::sync::watch::Receiver<u64> {
        self.local.subscribe_device_events()
    }

    fn close(&self) {
        self.local.close();
        self.view.lock().closed = true;
        self.notify.send_modify(|_| {});
    }

    fn resync_json(&self, reason: &str, at: SystemTime) -> (u64, String, String) {
        let last = self.last_id();
        let as_of = self.token(last);
        let json = crate::bus::resync_message(&self.epoch, &self.gateway, &as_of, reason, at);
        (last, as_of, json)
    }

    fn gateway(&self) -> &str {
        &self.gateway
    }
}

/// Sends the outbox in order. A batch goes out with its acknowledgements
/// awaited together; what was acknowledged leaves the outbox, and the rest
/// is sent again (same message ids) after a pause: NATS is unreachable.
async fn send(bus: std::sync::Weak<ClusterBus>, js: jetstream::Context) {
    let mut pause = Duration::from_millis(100);
    loop {
        let Some(b) = bus.upgrade() else { return };
        let batch: Vec<(String, String, Bytes)> = b
            .outbox
            .lock()
            .iter()
            .take(IN_FLIGHT)
            .map(|o| (o.subject.clone(), o.msg_id.clone(), o.payload.clone()))
            .collect();
        if batch.is_empty() {
            // Woken by a publication; checked again every second so the
            // task ends soon after the bus is gone.
            let _ = tokio::time::timeout(Duration::from_secs(1), b.wake.notified()).await;
            continue;
        }
        drop(b);
        let mut acks = Vec::with_capacity(batch.len());
        for (subject, msg_id, payload) in &batch {
            let publish = jetstream::message::PublishMessage::build()
                .payload(payload.clone())
                .message_id(msg_id);
            match js.send_publish(subject.clone(), publish).await {
                Ok(ack) => acks.push(ack),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot publish an event to the cluster's stream");
                    break;
                }
            }
        }
        let mut done = 0usize;
        for ack in acks {
            match ack.await {
                Ok(_) => done += 1,
                Err(e) => {
                    tracing::debug!(error = %e, "an event was not acknowledged by the cluster's stream");
                    break;
                }
            }
        }
        let Some(b) = bus.upgrade() else { return };
        {
            let mut out = b.outbox.lock();
            // The outbox may have dropped its oldest meanwhile (full):
            // remove only those still at its front.
            for (_, msg_id, _) in batch.iter().take(done) {
                if out.front().is_some_and(|o| &o.msg_id == msg_id) {
                    out.pop_front();
                }
            }
            b.metrics.cluster_events_buffered.set(out.len() as i64);
        }
        drop(b);
        if done < batch.len() {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        } else {
            pause = Duration::from_millis(100);
        }
    }
}

/// Copies the stream into the view from `start`, for as long as the bus
/// lives; the consumer is made again from where it stopped after any
/// failure or reconnect.
async fn follow(
    bus: std::sync::Weak<ClusterBus>,
    mut stream: jetstream::stream::Stream,
    start: u64,
    health: Arc<super::NatsHealth>,
) {
    let mut next = start;
    loop {
        let mut idle = 0u32;
        let connection = health.connections();
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: next,
                },
                ..Default::default()
            })
            .await;
        let mut messages = match consumer {
            Ok(c) => match c.messages().await {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read the cluster's event stream; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the cluster's event stream; retrying");
                if bus.strong_count() == 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            let item = tokio::time::timeout(Duration::from_secs(1), messages.next()).await;
            let Some(b) = bus.upgrade() else { return };
            match item {
                // Nothing new. A consumer made before a reconnect may be
                // one the server no longer has: make it again.
                Err(_) if health.connections() != connection => break,
                Err(_) => {
                    // Quiet for a while: check that the stream is as
                    // quiet. A consumer whose server went away (a NATS
                    // cluster losing a server) can fall silent without an
                    // error; then it is made again from where it stopped.
                    idle += 1;
                    if idle.is_multiple_of(5) {
                        drop(b);
                        if let Ok(info) = stream.info().await {
                            if info.state.last_sequence >= next {
                                tracing::debug!(
                                    next,
                                    last = info.state.last_sequence,
                                    "the event stream's reader fell silent; reading again"
                                );
                                break;
                            }
                        }
                    }
                    continue;
                }
                Ok(Some(Ok(m))) => {
                    idle = 0;
                    let Ok(info) = m.info() else { continue };
                    let seq = info.stream_sequence;
                    b.view_push(seq, m.subject.as_str(), &m.payload);
                    next = seq + 1;
                }
                Ok(Some(Err(e))) => {
                    tracing::debug!(error = %e, "the cluster's event stream broke off; reading again");
                    break;
                }
                Ok(None) => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_tokens() {
        assert!(subject_token("0d5c7c1e-1b2f-4f7e-9a55-0123456789ab"));
        assert!(!subject_token("a.b"));
        assert!(!subject_token("*"));
        assert!(!subject_token(">"));
        assert!(!subject_token(""));
    }
}
