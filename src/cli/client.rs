//! The CLI's HTTP client: one hyper HTTP/1 connection per request to the
//! API (plain `http://`: the API listens on a private address; put TLS in
//! front of it with a reverse proxy), the bearer token on every request.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::Value;
use std::time::Duration;

use super::CliError;

pub struct Client {
    /// `host:port`.
    authority: String,
    url: String,
    token: Option<String>,
}

/// How long a request may take (an event stream is not bounded).
const TIMEOUT: Duration = Duration::from_secs(60);

impl Client {
    pub fn new(url: &str, token: Option<String>) -> Result<Client, CliError> {
        let authority = url
            .strip_prefix("http://")
            .ok_or_else(|| {
                CliError::Usage(format!(
                    "--url {url}: an http:// URL, e.g. http://127.0.0.1:8080"
                ))
            })?
            .trim_end_matches('/')
            .to_owned();
        if authority.is_empty() || authority.contains('/') {
            return Err(CliError::Usage(format!(
                "--url {url}: the API's base URL, e.g. http://127.0.0.1:8080"
            )));
        }
        Ok(Client {
            authority,
            url: url.trim_end_matches('/').to_owned(),
            token,
        })
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn unreachable(&self, why: impl std::fmt::Display) -> CliError {
        CliError::Unreachable {
            url: self.url.clone(),
            why: why.to_string(),
        }
    }

    /// Sends a request; the response with its body still to read.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        extra: &[(&str, &str)],
    ) -> Result<hyper::Response<Incoming>, CliError> {
        let tcp = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(&self.authority),
        )
        .await
        .map_err(|_| self.unreachable("no answer within 10 s"))?
        .map_err(|e| self.unreachable(e))?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .map_err(|e| self.unreachable(e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.authority);
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        let payload = match body {
            Some(v) => {
                req = req.header("content-type", "application/json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(payload))
            .map_err(|e| CliError::Usage(format!("{method} {path}: {e}")))?;
        send.send_request(req)
            .await
            .map_err(|e| self.unreachable(e))
    }

    /// A request and its whole answer: (status, body).
    pub async fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        extra: &[(&str, &str)],
    ) -> Result<(u16, Bytes), CliError> {
        tokio::time::timeout(TIMEOUT, async {
            let r = self.send(method, path, body, extra).await?;
            let status = r.status().as_u16();
            let bytes = r
                .into_body()
                .collect()
                .await
                .map_err(|e| self.unreachable(e))?
                .to_bytes();
            Ok::<_, CliError>((status, bytes))
        })
        .await
        .map_err(|_| self.unreachable(format!("no answer within {} s", TIMEOUT.as_secs())))?
    }

    /// A JSON request: the answer's body on 2xx; the API's error otherwise.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, CliError> {
        self.call_with(method, path, body, &[]).await
    }

    /// [`call`](Self::call) with extra headers.
    pub async fn call_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        extra: &[(&str, &str)],
    ) -> Result<Value, CliError> {
        let (status, text) = self.exchange(method, path, body, extra).await?;
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&text)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&text).into_owned()))
        };
        if (200..300).contains(&status) {
            return Ok(value);
        }
        Err(api_error(status, &value))
    }

    /// A text request (the wg-quick file).
    pub async fn text(&self, path: &str) -> Result<String, CliError> {
        let (status, bytes) = self.exchange("GET", path, None, &[]).await?;
        if status == 200 {
            return Ok(String::from_utf8_lossy(&bytes).into_owned());
        }
        let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Err(api_error(status, &v))
    }
}

/// The API's error answer (`{"error", "message"}`) as a `CliError`.
pub fn api_error(status: u16, v: &Value) -> CliError {
    let message = match (v["error"].as_str(), v["message"].as_str()) {
        (Some(code), Some(m)) => format!("{m} ({code})"),
        (_, Some(m)) => m.to_owned(),
        _ => v.to_string(),
    };
    CliError::Api { status, message }
}
