//! The HTTP calls the load generator makes (registering its devices, and
//! deleting them with `--cleanup`) to the gateway's API. Plain HTTP/1.1 over a `TcpStream`: the
//! gateway binary has no HTTP client otherwise, and this needs none of one's
//! features (no TLS, no redirects, no pooling).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// POSTs `body` as JSON to `base` (`http://host:port`) + `path`; returns the
/// status and the body.
pub fn post(base: &str, path: &str, token: &str, body: &str) -> std::io::Result<(u16, Vec<u8>)> {
    request("POST", base, path, token, body)
}

/// `method` with `body` as JSON; the status and the body.
pub fn request(
    method: &str,
    base: &str,
    path: &str,
    token: &str,
    body: &str,
) -> std::io::Result<(u16, Vec<u8>)> {
    let invalid = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, m.to_string());
    let hostport = base
        .strip_prefix("http://")
        .ok_or_else(|| invalid("--api must be an http:// URL"))?
        .trim_end_matches('/');
    let mut s = TcpStream::connect(hostport)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {hostport}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body.as_bytes())?;
    let mut answer = Vec::new();
    // The gateway's answers are small; 16 MiB is far past any of them.
    (&mut s).take(16 << 20).read_to_end(&mut answer)?;
    match crate::http1::parse_response(&answer, true, 64 * 1024, 16 << 20) {
        Ok(Some((head, body))) => Ok((head.status, body)),
        Ok(None) => Err(invalid("an incomplete HTTP answer")),
        Err(e) => Err(invalid(&format!("the gateway's answer: {e}"))),
    }
}
