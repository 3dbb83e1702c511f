//! The HTTP client of the control-plane API, shared by `esperctl` and the operator verbs
//! of `esper` (`esper server stop`, `esper worker status`). Every answer is kept as JSON,
//! so `--output json` can print it as the server sent it.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::transport_reason;
use esper_protocol::ingestion::QueueStatus;

use crate::types::{ShutdownRequest, ShutdownResponse, StatusReport, WorkersResponse};

/// The default API address.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";
const TIMEOUT: Duration = Duration::from_secs(30);

/// Why a command failed. [`CtlError::exit_code`] is 2 for usage and input errors and 1
/// for everything the server (or the way to it) caused.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// Bad input on our side: a file that does not parse, an invalid entity key.
    #[error("{0}")]
    Input(String),
    #[error("cannot reach the control plane at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("401 unauthorized: {hint}")]
    Unauthorized { hint: &'static str },
    #[error("{status} {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("unexpected answer from the control plane at {url}: {message}")]
    Decode { url: String, message: String },
    /// The answer could not be written out (a full disk, say).
    #[error("cannot write the output: {0}")]
    Output(String),
}

impl CtlError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Input(_) => 2,
            // Refused for what was asked (an unknown name, a bad value, a conflict), as
            // esperctl refuses what it can check itself; a refused token, a busy or
            // failing server stay 1.
            CtlError::Api { status, .. }
                if (400..500).contains(status) && !matches!(status, 401 | 403 | 408 | 429) =>
            {
                2
            }
            _ => 1,
        }
    }
}

/// A client of one control plane.
#[derive(Clone, Debug)]
pub struct ControlClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl ControlClient {
    /// `server` like `http://127.0.0.1:8080`; `token` is sent as a bearer token.
    pub fn new(server: &str, token: Option<String>) -> Result<ControlClient, CtlError> {
        let base = server.trim().trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(CtlError::Input(format!(
                "--server `{server}` is not an http:// or https:// URL"
            )));
        }
        // Paths are appended to the base: credentials, a query or a fragment in it would
        // be dropped or end up in the middle of every URL.
        let url = reqwest::Url::parse(&base)
            .map_err(|e| CtlError::Input(format!("--server `{server}`: {e}")))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(CtlError::Input(format!(
                "--server `{}` carries credentials; give the token with ESPER_TOKEN or --token",
                url.host_str().unwrap_or_default()
            )));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(CtlError::Input(format!(
                "--server `{server}` has a query or fragment; give the server's base URL"
            )));
        }
        let token = token.filter(|t| !t.trim().is_empty());
        if let Some(t) = &token
            && reqwest::header::HeaderValue::from_str(t).is_err()
        {
            return Err(CtlError::Input(
                "the token holds characters a header cannot carry (a line break?); check \
                 ESPER_TOKEN, --token or the token file"
                    .into(),
            ));
        }
        let http = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| CtlError::Input(format!("cannot set up the HTTP client: {e}")))?;
        Ok(ControlClient { base, token, http })
    }

    /// Also trusts the CA certificates in PEM file `path` (for a control plane serving a
    /// certificate from a private CA).
    pub fn with_ca_cert(mut self, path: &std::path::Path) -> Result<ControlClient, CtlError> {
        let builder = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(Duration::from_secs(5));
        self.http = esper_protocol::trust_ca(builder, path)
            .and_then(|b| b.build().map_err(|e| e.to_string()))
            .map_err(|e| CtlError::Input(format!("--ca-cert {e}")))?;
        Ok(self)
    }

    /// The server's base URL.
    pub fn server(&self) -> &str {
        &self.base
    }

    /// Sends a request and returns the JSON answer, or the error it stands for.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Body>,
    ) -> Result<serde_json::Value, CtlError> {
        let text = self.send_text(method, path, body).await?;
        serde_json::from_str(&text).map_err(|e| CtlError::Decode {
            url: self.base.clone(),
            message: e.to_string(),
        })
    }

    /// Sends a request and returns the answer's body exactly as the server sent it.
    pub async fn send_text(
        &self,
        method: Method,
        path: &str,
        body: Option<Body>,
    ) -> Result<String, CtlError> {
        let mut rb = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("x-request-id", uuid::Uuid::new_v4().to_string());
        if let Some(t) = &self.token {
            rb = rb.bearer_auth(t);
        }
        rb = match body {
            Some(Body::Json(v)) => rb.json(&v),
            Some(Body::Toml(text)) => rb
                .header(reqwest::header::CONTENT_TYPE, "application/toml")
                .body(text),
            None => rb,
        };
        let resp = rb.send().await.map_err(|e| CtlError::Unreachable {
            url: self.base.clone(),
            reason: transport_reason(&e),
        })?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| CtlError::Unreachable {
            url: self.base.clone(),
            reason: transport_reason(&e),
        })?;
        if status == StatusCode::UNAUTHORIZED {
            return Err(CtlError::Unauthorized {
                hint: if self.token.is_some() {
                    "the server refused the token; check ESPER_TOKEN or --token"
                } else {
                    "set ESPER_TOKEN"
                },
            });
        }
        if !status.is_success() {
            let body: Option<esper_protocol::ApiErrorBody> = serde_json::from_slice(&bytes).ok();
            let (code, message) = match body {
                Some(b) => (b.error, b.message),
                // Not an Esper answer (a proxy's error page, another server at this
                // address): one line, not the page.
                None => (
                    status
                        .canonical_reason()
                        .unwrap_or("error")
                        .to_ascii_lowercase()
                        .replace(' ', "_"),
                    not_esper(&self.base, &bytes),
                ),
            };
            return Err(CtlError::Api {
                status: status.as_u16(),
                code,
                message,
            });
        }
        String::from_utf8(bytes.to_vec()).map_err(|_| CtlError::Decode {
            url: self.base.clone(),
            message: "the answer is not UTF-8".into(),
        })
    }

    /// `GET path`, the body as sent.
    pub async fn get(&self, path: &str) -> Result<String, CtlError> {
        self.send_text(Method::GET, path, None).await
    }

    /// `GET path` as JSON; `None` when the server answers 404.
    pub async fn get_optional(&self, path: &str) -> Result<Option<serde_json::Value>, CtlError> {
        match self.send(Method::GET, path, None).await {
            Ok(v) => Ok(Some(v)),
            Err(CtlError::Api { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `POST path` with a JSON body, the answer as sent.
    pub async fn post<B: Serialize>(&self, path: &str, body: &B) -> Result<String, CtlError> {
        let v = serde_json::to_value(body).map_err(|e| CtlError::Input(e.to_string()))?;
        self.send_text(Method::POST, path, Some(Body::Json(v)))
            .await
    }

    /// `GET /api/v1/status`.
    pub async fn status(&self) -> Result<StatusReport, CtlError> {
        let v = self.send(Method::GET, "/api/v1/status", None).await?;
        decode(self, v)
    }

    /// `GET /api/v1/workers` (`esper worker status`).
    pub async fn workers(&self) -> Result<WorkersResponse, CtlError> {
        let v = self.send(Method::GET, "/api/v1/workers", None).await?;
        decode(self, v)
    }

    /// `GET /api/v1/queue/status` (`esper worker autoscale`).
    pub async fn queue_status(&self) -> Result<QueueStatus, CtlError> {
        let v = self.send(Method::GET, "/api/v1/queue/status", None).await?;
        decode(self, v)
    }

    /// `POST /api/v1/admin/shutdown` (`esper server stop`).
    pub async fn shutdown(
        &self,
        graceful: bool,
        timeout: Option<Duration>,
    ) -> Result<ShutdownResponse, CtlError> {
        let req = ShutdownRequest {
            graceful,
            timeout_secs: timeout.map(|d| d.as_secs()),
        };
        let v = serde_json::to_value(&req).map_err(|e| CtlError::Input(e.to_string()))?;
        let v = self
            .send(Method::POST, "/api/v1/admin/shutdown", Some(Body::Json(v)))
            .await?;
        decode(self, v)
    }
}

/// A request body.
#[derive(Clone, Debug)]
pub enum Body {
    Json(serde_json::Value),
    Toml(String),
}

/// Reads a JSON answer as `T`.
pub fn decode<T: DeserializeOwned>(
    client: &ControlClient,
    v: serde_json::Value,
) -> Result<T, CtlError> {
    serde_json::from_value(v).map_err(|e| CtlError::Decode {
        url: client.server().to_string(),
        message: e.to_string(),
    })
}

/// Percent-encodes one path segment.
pub fn segment(s: &str) -> String {
    esper_protocol::client::encode(s)
}

/// Says what answered instead of an Esper control plane, on one line: the start of the
/// body with its whitespace and markup folded away.
fn not_esper(base: &str, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut plain = String::new();
    let mut in_tag = false;
    for c in text.chars() {
        match c {
            '<' => in_tag = true,
            '>' => {
                in_tag = false;
                plain.push(' ');
            }
            c if !in_tag => plain.push(if c.is_control() { ' ' } else { c }),
            _ => {}
        }
    }
    let words: Vec<&str> = plain.split_whitespace().collect();
    let mut start = words.join(" ");
    if start.chars().count() > 80 {
        start = start.chars().take(80).collect::<String>() + "...";
    }
    if start.is_empty() {
        format!("the answer from {base} is not the Esper control plane's")
    } else {
        format!("the answer from {base} is not the Esper control plane's: \"{start}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_servers_page_is_one_line() {
        let page = b"<html>\r\n<head><title>404 Not Found</title></head>\r\n<body>\r\n<center><h1>404 Not Found</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";
        let line = not_esper("http://127.0.0.1:80", page);
        assert_eq!(
            line,
            "the answer from http://127.0.0.1:80 is not the Esper control plane's: \"404 Not Found 404 Not Found nginx\""
        );
        assert!(!not_esper("http://x", &[b'a'; 500]).contains('\n'));
        assert_eq!(
            not_esper("http://x", b""),
            "the answer from http://x is not the Esper control plane's"
        );
    }
}
