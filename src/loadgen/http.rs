//! The one HTTP call the load generator makes (a JSON POST to the
//! gateway's API on loopback). Plain HTTP/1.1 over a `TcpStream`: the
//! gateway binary has no HTTP client otherwise, and this needs none of one's
//! features (no TLS, no redirects, no pooling).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// POSTs `body` as JSON to `base` (`http://host:port`) + `path`; returns the
/// status and the body.
pub fn post(base: &str, path: &str, token: &str, body: &str) -> std::io::Result<(u16, Vec<u8>)> {
    let invalid = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, m.to_string());
    let hostport = base
        .strip_prefix("http://")
        .ok_or_else(|| invalid("--api must be an http:// URL"))?
        .trim_end_matches('/');
    let mut s = TcpStream::connect(hostport)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {hostport}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body.as_bytes())?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)?;
    let head_end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| invalid("no HTTP head in the answer"))?;
    let head = String::from_utf8_lossy(&answer[..head_end]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid("no status in the answer"))?;
    let mut body = answer.split_off(head_end + 4);
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Ok((status, body))
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 || b.len() < eol + 2 + size {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[(eol + 4 + size).min(b.len())..];
    }
    out
}
