//! The HTTP CONNECT proxy: `CONNECT <uuid>:<port> HTTP/1.1` (also
//! `<uuid>.balena:<port>` and `<uuid>.cloudlink:<port>`, for clients built for
//! balena's proxy), authenticated with the API token as
//! `Proxy-Authorization: Bearer <token>` or as the password of `Basic`.
//!
//! Checks, in order: a well-formed request (400), the token (407), a
//! well-formed target (400), the port allow-list (403), the device (404), its
//! cloudlink (503), the connection (502 refused, 504 no answer within
//! `--connect-timeout`). Every error answer carries the gateway's JSON error
//! shape. After `200` the bytes flow both ways with half-close carried.

use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{ConnectError, Relay};
use crate::metrics::Metrics;

/// Longest request head accepted.
const MAX_HEAD: usize = 8 * 1024;
/// Time a client gets to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

pub struct ProxyConfig {
    /// Who may open streams: a token with the `relay` scope.
    pub tokens: Arc<crate::tokens::Tokens>,
    pub allow_ports: Vec<u16>,
    /// This gateway's id (what `Forwarded: by=` names).
    pub gateway_id: String,
    /// Cluster mode: who else holds a device, and their proxy.
    pub route: Option<Arc<dyn Route>>,
    /// Set while the gateway drains before a stop: new streams get 503.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// Every stream is recorded (`audit.relay`).
    pub audit: Option<Arc<crate::audit::AuditTrail>>,
}

/// Cluster mode: where a device held by another gateway is reached.
pub trait Route: Send + Sync + 'static {
    /// The gateway holding `uuid` and its proxy address (`host:port`), if
    /// that is another gateway.
    fn held_elsewhere(&self, uuid: &str) -> Option<(String, String)>;
}

/// Longest answer head from another gateway's proxy.
const MAX_UPSTREAM_HEAD: usize = 8 * 1024;

/// Serves CONNECT requests on `listener` until `stop` resolves.
pub async fn serve(
    listener: TcpListener,
    relay: Arc<Relay>,
    metrics: Arc<Metrics>,
    config: Arc<ProxyConfig>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let (conn, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let (relay, metrics, config) = (relay.clone(), metrics.clone(), config.clone());
        let stop = stop.clone();
        tokio::spawn(tracing::Instrument::instrument(
            handle(conn, relay, metrics, config, stop),
            tracing::debug_span!("proxy", %peer),
        ));
    }
}

struct Reject {
    status: u16,
    reason: &'static str,
    error: &'static str,
    message: String,
    result: &'static str,
}

fn reject(
    status: u16,
    reason: &'static str,
    error: &'static str,
    result: &'static str,
    message: impl Into<String>,
) -> Reject {
    Reject {
        status,
        reason,
        error,
        message: message.into(),
        result,
    }
}

async fn write_reject(conn: &mut TcpStream, r: &Reject) {
    let body = serde_json::json!({"error": r.error, "message": r.message}).to_string();
    let extra = if r.status == 407 {
        "Proxy-Authenticate: Basic realm=\"cloudlink\"\r\nProxy-Authenticate: Bearer\r\n"
    } else {
        ""
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.status,
        r.reason,
        body.len()
    );
    let _ = conn.write_all(head.as_bytes()).await;
    let _ = conn.write_all(body.as_bytes()).await;
    let _ = conn.shutdown().await;
}

/// A CONNECT request head, parsed. The target is checked after the
/// credential (so a client without a token learns nothing about targets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectHead {
    /// The device uuid and port, or why the target is not one.
    pub target: Result<(String, u16), String>,
    /// The token offered in `Proxy-Authorization`, if any.
    pub credential: Option<String>,
    /// Cluster mode: the gateway that forwarded this request (`Forwarded:
    /// by=<gateway>`), if one did.
    pub forwarded_by: Option<String>,
    /// Bytes of the head; what follows is the client's first payload.
    pub len: usize,
}

/// Parses a CONNECT request head from the bytes read so far: `Ok(None)`
/// while incomplete, `Err` with what is wrong (a 400). No I/O, never
/// panics (fuzzed: `fuzz/`).
pub fn parse_connect(buf: &[u8]) -> Result<Option<ConnectHead>, String> {
    const LINE: &str = "the request line is not `CONNECT <device uuid>:<port> HTTP/1.1`";
    let head = match crate::http1::parse_request_head(buf, MAX_HEAD) {
        Ok(Some(h)) => h,
        Ok(None) => return Ok(None),
        Err(crate::http1::ParseError::HeadTooLarge(_)) => {
            return Err("the request head is larger than 8 KiB".into())
        }
        Err(e) => return Err(format!("{e}; {LINE}")),
    };
    if head.method != "CONNECT" {
        return Err(format!(
            "this is a CONNECT proxy; {} is not supported",
            head.method
        ));
    }
    let credential = head
        .get("proxy-authorization")
        .and_then(crate::auth::credential);
    // `Forwarded: by=<gateway>` (RFC 7239; one element, ours).
    let forwarded_by = head.get("forwarded").and_then(|v| {
        v.split([';', ','])
            .filter_map(|p| p.trim().split_once('='))
            .find(|(k, _)| k.eq_ignore_ascii_case("by"))
            .map(|(_, v)| v.trim_matches('"').to_owned())
    });
    Ok(Some(ConnectHead {
        target: parse_target(&head.target),
        credential,
        forwarded_by,
        len: head.len,
    }))
}

/// Reads the request head; returns it and whatever followed it.
async fn read_head(conn: &mut TcpStream) -> Result<(ConnectHead, Vec<u8>), Reject> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let bad = |m: String| reject(400, "Bad Request", "bad_request", "bad_request", m);
    let read = async {
        loop {
            if let Some(head) = parse_connect(&buf).map_err(bad)? {
                let rest = buf.split_off(head.len);
                return Ok((head, rest));
            }
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => {
                    return Err(bad(
                        "the connection closed before a complete request head".into()
                    ))
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    match tokio::time::timeout(HEAD_TIMEOUT, read).await {
        Ok(r) => r,
        Err(_) => Err(bad("no complete request head within 10 s".into())),
    }
}

/// The target of a CONNECT: device uuid and port.
fn parse_target(target: &str) -> Result<(String, u16), String> {
    let (host, port) = target
        .rsplit_once(':')
        .ok_or_else(|| format!("the target {target:?} is not <device uuid>:<port>"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("the port in {target:?} is not a number from 1 to 65535"))?;
    let host = host.to_ascii_lowercase();
    let uuid = host
        .strip_suffix(".balena")
        .or_else(|| host.strip_suffix(".cloudlink"))
        .unwrap_or(&host);
    crate::registry::validate_uuid(uuid)
        .map_err(|m| format!("the target host {host:?} is not a device: {m}"))?;
    Ok((uuid.to_owned(), port))
}

async fn handle(
    mut conn: TcpStream,
    relay: Arc<Relay>,
    metrics: Arc<Metrics>,
    config: Arc<ProxyConfig>,
    _stop: tokio::sync::watch::Receiver<bool>,
) {
    let (head, rest) = match read_head(&mut conn).await {
        Ok(h) => h,
        Err(r) => {
            metrics.relay_result(r.result);
            return write_reject(&mut conn, &r).await;
        }
    };
    let grant = head
        .credential
        .as_deref()
        .and_then(|t| config.tokens.check(t, crate::registry::now_ms()));
    let checked = (|| {
        let Some(grant) = &grant else {
            return Err(reject(407, "Proxy Authentication Required", "unauthorized", "unauthorized", "send a token with the relay scope as `Proxy-Authorization: Bearer <token>` or as the password of Basic auth"));
        };
        if !grant.allows(crate::tokens::Scope::Relay) {
            return Err(reject(
                403,
                "Forbidden",
                "forbidden",
                "forbidden",
                format!(
                    "this token's scopes ({}) do not include relay, which the proxy needs",
                    grant.scope_names().join(", ")
                ),
            ));
        }
        let (uuid, port) = head
            .target
            .clone()
            .map_err(|m| reject(400, "Bad Request", "bad_request", "bad_request", m))?;
        if !config.allow_ports.contains(&port) {
            return Err(reject(
                403,
                "Forbidden",
                "port_not_allowed",
                "forbidden",
                format!(
                    "port {port} is not open through the proxy; allowed ports: {}",
                    config
                        .allow_ports
                        .iter()
                        .map(u16::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        Ok((uuid, port))
    })();
    let (uuid, port) = match checked {
        Ok(t) => t,
        Err(r) => {
            metrics.relay_result(r.result);
            return write_reject(&mut conn, &r).await;
        }
    };
    if config.draining.load(std::sync::atomic::Ordering::Acquire) {
        let r = reject(
            503,
            "Service Unavailable",
            "draining",
            "unavailable",
            "this gateway is stopping: open streams may finish, new ones go to another gateway; retry",
        );
        metrics.relay_result(r.result);
        return write_reject(&mut conn, &r).await;
    }
    // Cluster mode: a device another gateway holds is reached through that
    // gateway's proxy, one hop at most.
    if let Some((owner, addr)) = config.route.as_ref().and_then(|r| r.held_elsewhere(&uuid)) {
        if let Some(by) = &head.forwarded_by {
            let r = reject(508, "Loop Detected", "forwarding_loop", "unavailable", format!(
                "gateway {by} forwarded this CONNECT for device {uuid} to {me}, which does not hold it either (its directory names {owner}); a CONNECT is forwarded once, so it stops here: {by} -> {me} -/-> {owner}",
                me = config.gateway_id
            ));
            metrics.relay_result(r.result);
            return write_reject(&mut conn, &r).await;
        }
        metrics.cluster_forwarded("connect");
        let credential = head.credential.clone().unwrap_or_default();
        return forward(
            conn,
            &rest,
            &config.gateway_id,
            &credential,
            (&uuid, port),
            (&owner, &addr),
            relay.connect_timeout,
            &metrics,
        )
        .await;
    }
    let outcome = async {
        match relay.connect(&uuid, port).await {
            Ok(s) => Ok((s, uuid, port)),
            Err(ConnectError::UnknownDevice) => Err(reject(404, "Not Found", "device_not_found", "unknown_device", format!("no device with uuid {uuid:?} is registered"))),
            Err(ConnectError::LinkDown) => Err(reject(503, "Service Unavailable", "cloudlink_unavailable", "unavailable", format!("device {uuid}'s cloudlink is down, so SSH and immediate actions are unavailable; it can still poll for updates over its heartbeat"))),
            Err(ConnectError::Refused) => Err(reject(502, "Bad Gateway", "device_refused", "refused", format!("device {uuid} refused the connection to port {port}: nothing listens there"))),
            Err(ConnectError::Timeout) => Err(reject(504, "Gateway Timeout", "device_timeout", "timeout", format!("device {uuid} did not answer on port {port} within {} s", relay.connect_timeout.as_secs_f32()))),
            Err(ConnectError::TooManyStreams(m)) => Err(reject(503, "Service Unavailable", "too_many_streams", "limited", m)),
            Err(ConnectError::Internal(m)) => Err(reject(502, "Bad Gateway", "relay_failed", "refused", m)),
        }
    }
    .await;
    let (stream, uuid, port) = match outcome {
        Ok(s) => s,
        Err(r) => {
            metrics.relay_result(r.result);
            return write_reject(&mut conn, &r).await;
        }
    };
    metrics.relay_result("ok");
    if conn
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    if !rest.is_empty() {
        stream
            .stack
            .with(|s| s.tcp(stream.handle).send_slice(&rest).ok());
        relay.count_bytes(true, rest.len() as u64);
    }
    tracing::info!(device = %uuid, port, "relay stream open");
    let started = std::time::SystemTime::now();
    let r = relay.clone();
    let m = relay.metrics();
    let on_shaped = move |to_device, n| m.throttled(to_device, false, n);
    let shaping = super::stream::Shaping {
        limiter: &stream.limiter,
        on_shaped: &on_shaped,
    };
    let moved = super::stream::relay(
        &stream.stack,
        stream.handle,
        conn,
        Some(&shaping),
        &move |up, n| r.count_bytes(up, n),
    )
    .await;
    tracing::info!(device = %uuid, port, up = moved.up, down = moved.down, "relay stream closed");
    if let Some(audit) = &config.audit {
        let ended = if stream.stack.is_dead() {
            "ended"
        } else {
            "closed"
        };
        audit.record(
            crate::audit::Kind::Relay,
            grant.as_ref().and_then(|g| g.token_id.as_deref()),
            Some(&uuid),
            crate::audit_detail! {
                "port" => port,
                "started_at" => crate::bus::event::rfc3339(started),
                "ended_at" => crate::bus::event::rfc3339(std::time::SystemTime::now()),
                "bytes_to_device" => moved.up,
                "bytes_from_device" => moved.down,
                "ended" => ended,
            },
        );
    }
}

/// Relays a CONNECT to the proxy of the gateway that holds the device: the
/// same request with the caller's credential and `Forwarded: by=<us>`, its
/// answer head back to the client as it is, then the bytes both ways.
#[allow(clippy::too_many_arguments)]
async fn forward(
    mut conn: TcpStream,
    rest: &[u8],
    me: &str,
    credential: &str,
    (uuid, port): (&str, u16),
    (owner, addr): (&str, &str),
    connect_timeout: Duration,
    metrics: &Metrics,
) {
    let unreachable = |why: String| {
        reject(502, "Bad Gateway", "owner_unreachable", "unavailable", format!(
            "device {uuid} is connected through gateway {owner}, whose proxy at {addr} could not be reached: {why}"
        ))
    };
    let upstream = async {
        let mut up = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
            .await
            .map_err(|_| unreachable("no connection within 5 s".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        let _ = up.set_nodelay(true);
        let request = format!(
            "CONNECT {uuid}:{port} HTTP/1.1\r\nHost: {uuid}:{port}\r\nProxy-Authorization: Bearer {credential}\r\nForwarded: by={me}\r\n\r\n"
        );
        up.write_all(request.as_bytes())
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        // Its answer head, byte by byte up to the blank line (small, once
        // per stream): nothing of the stream that follows is read here.
        let mut head = Vec::with_capacity(256);
        let mut byte = [0u8; 1];
        let read = async {
            while !head.ends_with(b"\r\n\r\n") {
                if head.len() >= MAX_UPSTREAM_HEAD {
                    return Err(unreachable("its answer head is larger than 8 KiB".into()));
                }
                match up.read(&mut byte).await {
                    Ok(1) => head.push(byte[0]),
                    _ => return Err(unreachable("it closed the connection before answering".into())),
                }
            }
            Ok(())
        };
        tokio::time::timeout(connect_timeout + Duration::from_secs(5), read)
            .await
            .map_err(|_| unreachable("no answer in time".into()))??;
        Ok::<_, Reject>((up, head))
    }
    .await;
    let (mut up, head) = match upstream {
        Ok(x) => x,
        Err(r) => {
            metrics.relay_result(r.result);
            return write_reject(&mut conn, &r).await;
        }
    };
    let established = head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200");
    if conn.write_all(&head).await.is_err() || !established {
        return;
    }
    if !rest.is_empty() && up.write_all(rest).await.is_err() {
        return;
    }
    tracing::info!(device = %uuid, port, %owner, "relay stream forwarded to the device's gateway");
    let moved = tokio::io::copy_bidirectional(&mut conn, &mut up).await;
    tracing::info!(device = %uuid, port, %owner, ?moved, "forwarded relay stream closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(parse_target("dev-1:22").unwrap(), ("dev-1".into(), 22));
        assert_eq!(
            parse_target("dev-1.balena:22222").unwrap(),
            ("dev-1".into(), 22222)
        );
        assert_eq!(
            parse_target("DEV-1.cloudlink:48484").unwrap(),
            ("dev-1".into(), 48484)
        );
        assert!(parse_target("dev-1").is_err());
        assert!(parse_target("dev-1:0").is_err());
        assert!(parse_target("dev-1:99999").is_err());
        assert!(parse_target("bad_host:22").is_err());
    }

    #[test]
    fn heads() {
        use base64::Engine as _;
        let token = "secret-token-0123456789";
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("user:{token}"));
        let h = parse_connect(
            format!("CONNECT a:22 HTTP/1.1\r\nProxy-Authorization: Bearer {token}\r\n\r\nSSH-2.0")
                .as_bytes(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.credential.as_deref(), Some(token));
        assert_eq!(h.target, Ok(("a".into(), 22)));
        let h = parse_connect(
            format!("CONNECT a:22 HTTP/1.1\r\nproxy-authorization: Basic {basic}\r\n\r\n")
                .as_bytes(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.credential.as_deref(), Some(token));
        let h = parse_connect(b"CONNECT bad_host:22 HTTP/1.1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.credential, None);
        assert!(h.target.is_err());
        assert_eq!(parse_connect(b"CONNECT a:22 HTTP/1.1\r\n"), Ok(None));
        let h = parse_connect(b"CONNECT a:22 HTTP/1.1\r\nForwarded: by=gw-a\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.forwarded_by.as_deref(), Some("gw-a"));
        let h =
            parse_connect(b"CONNECT a:22 HTTP/1.1\r\nForwarded: for=1.2.3.4;By=\"gw-b\"\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(h.forwarded_by.as_deref(), Some("gw-b"));
        assert!(parse_connect(b"GET / HTTP/1.1\r\n\r\n").is_err());
        assert!(parse_connect(b"CONNECT a:22 HTTP/9.9\r\n\r\n").is_err());
        assert!(parse_connect(b"\x00\x01\r\n\r\n").is_err());
        assert!(parse_connect(&[b'a'; 9000]).is_err());
    }
}
