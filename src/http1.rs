//! HTTP/1 messages parsed without I/O: the one parser behind the CONNECT
//! proxy's request head, the agent supervisor's request and a device's
//! answer to an action.
//!
//! Why one module: these bytes come from outside (any token holder, any
//! device), so every function here is total: it returns `Ok(None)` while a
//! message is incomplete, an error on anything malformed or over its cap,
//! and never panics whatever the input (the fuzz targets in `fuzz/` hold it
//! to that). Heads are tokenised by `httparse`; body framing (lengths and
//! chunked encoding) is ours, with checked arithmetic and a cap on every
//! size a peer chooses.

/// Headers kept per message; more is an error (`TooManyHeaders`).
pub const MAX_HEADERS: usize = 64;
/// Longest chunk-size line (with extensions) or trailer section accepted.
const MAX_CHUNK_LINE: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("malformed HTTP/1 head: {0}")]
    Malformed(&'static str),
    #[error("the head is larger than {0} bytes")]
    HeadTooLarge(usize),
    #[error("Content-Length {0:?} is not a length")]
    BadLength(String),
    #[error("the body is larger than {0} bytes")]
    BodyTooLarge(usize),
    #[error("the chunked body is malformed: {0}")]
    BadChunk(&'static str),
    #[error("Transfer-Encoding {0:?} is not supported")]
    UnsupportedEncoding(String),
    #[error("the message ended before it was complete")]
    Truncated,
}

fn head_error(e: httparse::Error) -> ParseError {
    ParseError::Malformed(match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status code",
        httparse::Error::Token => "invalid method or token",
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Version => "not HTTP/1.x",
    })
}

/// One header; the value as sent (not necessarily UTF-8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    pub target: String,
    pub headers: Vec<Header>,
    /// Bytes of the head, blank line included.
    pub len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub headers: Vec<Header>,
    pub len: usize,
}

impl RequestHead {
    /// The first value of header `name` (case-insensitive) as text, trimmed;
    /// `None` when absent or not UTF-8.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(&h.value).ok())
            .map(str::trim)
    }
}

fn collect(headers: &[httparse::Header<'_>]) -> Vec<Header> {
    headers
        .iter()
        .map(|h| Header {
            name: h.name.to_owned(),
            value: h.value.to_vec(),
        })
        .collect()
}

/// A request head, once all of it is in `buf`.
pub fn parse_request_head(buf: &[u8], max_head: usize) -> Result<Option<RequestHead>, ParseError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf).map_err(head_error)? {
        httparse::Status::Complete(len) if len <= max_head => Ok(Some(RequestHead {
            method: req.method.unwrap_or_default().to_owned(),
            target: req.path.unwrap_or_default().to_owned(),
            headers: collect(req.headers),
            len,
        })),
        httparse::Status::Partial if buf.len() <= max_head => Ok(None),
        _ => Err(ParseError::HeadTooLarge(max_head)),
    }
}

/// A response head, once all of it is in `buf`.
pub fn parse_response_head(
    buf: &[u8],
    max_head: usize,
) -> Result<Option<ResponseHead>, ParseError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf).map_err(head_error)? {
        httparse::Status::Complete(len) if len <= max_head => Ok(Some(ResponseHead {
            status: resp.code.unwrap_or_default(),
            headers: collect(resp.headers),
            len,
        })),
        httparse::Status::Partial if buf.len() <= max_head => Ok(None),
        _ => Err(ParseError::HeadTooLarge(max_head)),
    }
}

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
    /// Until the peer closes (responses only).
    UntilClose,
}

/// The framing the headers declare (RFC 9112 §6.3): chunked wins over a
/// length; several differing lengths are an error; a request without
/// either has no body, a response reads until close.
pub fn framing(headers: &[Header], is_response: bool) -> Result<Framing, ParseError> {
    let mut encodings = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
        .peekable();
    if encodings.peek().is_some() {
        // The last coding of the last header decides.
        let last = encodings.last().map(|h| h.value.as_slice()).unwrap_or(b"");
        let last = String::from_utf8_lossy(last);
        let coding = last.rsplit(',').next().unwrap_or("").trim();
        if coding.eq_ignore_ascii_case("chunked") {
            return Ok(Framing::Chunked);
        }
        if is_response {
            return Ok(Framing::UntilClose);
        }
        return Err(ParseError::UnsupportedEncoding(last.into_owned()));
    }
    let mut length: Option<u64> = None;
    for h in headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
    {
        for part in h.value.split(|b| *b == b',') {
            let text = String::from_utf8_lossy(part);
            let t = text.trim();
            let n = (!t.is_empty() && t.len() <= 20 && t.bytes().all(|b| b.is_ascii_digit()))
                .then(|| t.parse::<u64>().ok())
                .flatten()
                .ok_or_else(|| ParseError::BadLength(t.to_owned()))?;
            if length.is_some_and(|l| l != n) {
                return Err(ParseError::BadLength(text.into_owned()));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(n) => Framing::Length(n),
        None if is_response => Framing::UntilClose,
        None => Framing::Length(0),
    })
}

/// Decodes a chunked body at the start of `buf`: the body and the bytes it
/// took (trailers included), `Ok(None)` while incomplete.
fn dechunk(buf: &[u8], max_body: usize) -> Result<Option<(Vec<u8>, usize)>, ParseError> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    loop {
        let rest = &buf[pos..];
        let Some(eol) = find(rest, b"\r\n") else {
            return if rest.len() > MAX_CHUNK_LINE {
                Err(ParseError::BadChunk("chunk-size line too long"))
            } else {
                Ok(None)
            };
        };
        if eol > MAX_CHUNK_LINE {
            return Err(ParseError::BadChunk("chunk-size line too long"));
        }
        let line = &rest[..eol];
        let digits = line
            .split(|b| *b == b';')
            .next()
            .unwrap_or(b"")
            .trim_ascii();
        if digits.is_empty() || digits.len() > 16 || !digits.iter().all(u8::is_ascii_hexdigit) {
            return Err(ParseError::BadChunk("chunk size is not hexadecimal"));
        }
        // At most 16 hex digits: fits a u64.
        let size = digits.iter().fold(0u64, |n, d| {
            (n << 4) | (*d as char).to_digit(16).unwrap_or(0) as u64
        });
        pos += eol + 2;
        if size == 0 {
            // Trailers, then the blank line.
            let rest = &buf[pos..];
            if rest.starts_with(b"\r\n") {
                return Ok(Some((out, pos + 2)));
            }
            return match find(rest, b"\r\n\r\n") {
                Some(end) if end <= MAX_CHUNK_LINE => Ok(Some((out, pos + end + 4))),
                Some(_) => Err(ParseError::BadChunk("trailers too long")),
                None if rest.len() > MAX_CHUNK_LINE => {
                    Err(ParseError::BadChunk("trailers too long"))
                }
                None => Ok(None),
            };
        }
        let room = max_body.saturating_sub(out.len()) as u64;
        if size > room {
            return Err(ParseError::BodyTooLarge(max_body));
        }
        let size = size as usize; // ≤ max_body
        let rest = &buf[pos..];
        if rest.len() < size.saturating_add(2) {
            return Ok(None);
        }
        if &rest[size..size + 2] != b"\r\n" {
            return Err(ParseError::BadChunk("chunk data not followed by CRLF"));
        }
        out.extend_from_slice(&rest[..size]);
        pos += size + 2;
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads a body framed as `framing` from `buf`; `at_eof` says the peer
/// closed (which completes an until-close body and makes anything short an
/// error).
fn body(
    buf: &[u8],
    framing: Framing,
    at_eof: bool,
    max_body: usize,
) -> Result<Option<Vec<u8>>, ParseError> {
    let got = match framing {
        Framing::Length(n) => {
            if n > max_body as u64 {
                return Err(ParseError::BodyTooLarge(max_body));
            }
            let n = n as usize;
            (buf.len() >= n).then(|| buf[..n].to_vec())
        }
        Framing::Chunked => dechunk(buf, max_body)?.map(|(b, _)| b),
        Framing::UntilClose => {
            if buf.len() > max_body {
                return Err(ParseError::BodyTooLarge(max_body));
            }
            at_eof.then(|| buf.to_vec())
        }
    };
    match got {
        None if at_eof => Err(ParseError::Truncated),
        other => Ok(other),
    }
}

/// A whole request (head and body), once all of it is in `buf`.
pub fn parse_request(
    buf: &[u8],
    max_head: usize,
    max_body: usize,
) -> Result<Option<(RequestHead, Vec<u8>)>, ParseError> {
    let Some(head) = parse_request_head(buf, max_head)? else {
        return Ok(None);
    };
    let f = framing(&head.headers, false)?;
    Ok(body(&buf[head.len..], f, false, max_body)?.map(|b| (head, b)))
}

/// A whole response, once all of it is in `buf` (`at_eof`: the peer
/// closed, nothing more will come).
pub fn parse_response(
    buf: &[u8],
    at_eof: bool,
    max_head: usize,
    max_body: usize,
) -> Result<Option<(ResponseHead, Vec<u8>)>, ParseError> {
    let head = match parse_response_head(buf, max_head)? {
        Some(h) => h,
        None if at_eof => return Err(ParseError::Truncated),
        None => return Ok(None),
    };
    // 1xx, 204 and 304 have no body whatever they declare.
    let f = if head.status < 200 || head.status == 204 || head.status == 304 {
        Framing::Length(0)
    } else {
        framing(&head.headers, true)?
    };
    Ok(body(&buf[head.len..], f, at_eof, max_body)?.map(|b| (head, b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests() {
        let r = b"POST /v1/reboot HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody";
        let (h, b) = parse_request(r, 1024, 1024).unwrap().unwrap();
        assert_eq!(
            (h.method.as_str(), h.target.as_str()),
            ("POST", "/v1/reboot")
        );
        assert_eq!(h.get("host"), Some("x"));
        assert_eq!(b, b"body");
        assert_eq!(parse_request(&r[..r.len() - 1], 1024, 1024), Ok(None));
        assert_eq!(
            parse_request(b"POST / HTTP/1.1\r\nHo", 1024, 1024),
            Ok(None)
        );
        // No length: no body.
        let (_, b) = parse_request(b"GET / HTTP/1.1\r\n\r\n", 1024, 1024)
            .unwrap()
            .unwrap();
        assert!(b.is_empty());
        let chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        assert_eq!(
            parse_request(chunked, 1024, 1024).unwrap().unwrap().1,
            b"abc"
        );
    }

    #[test]
    fn hostile_lengths_are_errors_not_panics() {
        // The supervisor regression: a length near u64::MAX.
        let r = b"POST /v1/reboot HTTP/1.1\r\nContent-Length: 18446744073709551615\r\n\r\n{}";
        assert_eq!(
            parse_request(r, 8192, 65536),
            Err(ParseError::BodyTooLarge(65536))
        );
        let r = b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n";
        assert!(matches!(
            parse_request(r, 8192, 65536),
            Err(ParseError::BadLength(_))
        ));
        let r = b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n";
        assert!(matches!(
            parse_request(r, 8192, 65536),
            Err(ParseError::BadLength(_))
        ));
        let r = b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        assert!(matches!(
            parse_request(r, 8192, 65536),
            Err(ParseError::BadLength(_))
        ));
        let r = b"POST / HTTP/1.1\r\nContent-Length: 2, 2\r\n\r\nab";
        assert_eq!(parse_request(r, 8192, 65536).unwrap().unwrap().1, b"ab");
    }

    #[test]
    fn hostile_chunks_are_errors_not_panics() {
        // The action-answer regression: a chunk size of 2^64 - 1.
        let a = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nab\r\n0\r\n\r\n";
        assert_eq!(
            parse_response(a, false, 8192, 1 << 20),
            Err(ParseError::BodyTooLarge(1 << 20))
        );
        assert_eq!(
            parse_response(a, true, 8192, 1 << 20),
            Err(ParseError::BodyTooLarge(1 << 20))
        );
        let a = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1ffffffffffffffff\r\n";
        assert!(matches!(
            parse_response(a, false, 8192, 1 << 20),
            Err(ParseError::BadChunk(_))
        ));
        let a = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n";
        assert!(matches!(
            parse_response(a, false, 8192, 1 << 20),
            Err(ParseError::BadChunk(_))
        ));
        let a = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        assert!(matches!(
            parse_response(a, false, 8192, 1 << 20),
            Err(ParseError::BadChunk(_))
        ));
    }

    #[test]
    fn responses() {
        let a = b"HTTP/1.1 423 Locked\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3;x=y\r\n:1}\r\n0\r\nT: v\r\n\r\n";
        let (h, b) = parse_response(a, false, 8192, 1024).unwrap().unwrap();
        assert_eq!((h.status, b.as_slice()), (423, &b"{\"a\":1}"[..]));
        // Until close: complete only at EOF.
        let a = b"HTTP/1.0 200 OK\r\n\r\nOK";
        assert_eq!(parse_response(a, false, 8192, 1024), Ok(None));
        assert_eq!(
            parse_response(a, true, 8192, 1024).unwrap().unwrap().1,
            b"OK"
        );
        // Short at EOF: an error, not a partial answer.
        let a = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nOK";
        assert_eq!(parse_response(a, false, 8192, 1024), Ok(None));
        assert_eq!(
            parse_response(a, true, 8192, 1024),
            Err(ParseError::Truncated)
        );
        assert!(parse_response(b"garbage\r\n\r\n", true, 8192, 1024).is_err());
        assert_eq!(
            parse_response(b"", true, 8192, 1024),
            Err(ParseError::Truncated)
        );
        let a = b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n";
        assert!(parse_response(a, false, 8192, 1024).unwrap().is_some());
        // A head over its cap.
        let big = [b"HTTP/1.1 200 OK\r\nX: ".as_slice(), &[b'a'; 100]].concat();
        assert_eq!(
            parse_response(&big, false, 64, 1024),
            Err(ParseError::HeadTooLarge(64))
        );
    }
}
