//! Answers the proxy writes itself (403 for a block, 429 for a throttle or a full
//! tarpit), as an HTML page or as JSON when the client prefers it, and request ids.

use bytes::Bytes;
use serde::Serialize;

/// Longest client-supplied `X-Request-ID` the proxy keeps; longer ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// One answer written by the proxy instead of the upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalAnswer {
    pub status: u16,
    /// Stable machine-readable code (`blocked`, `rate_limited`, ...).
    pub code: &'static str,
    pub message: &'static str,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
}

impl LocalAnswer {
    /// 403 for a blocked client.
    pub fn blocked() -> LocalAnswer {
        LocalAnswer {
            status: 403,
            code: "blocked",
            message: "This request was blocked by the site's abuse protection.",
            retry_after: None,
        }
    }

    /// 429 for a throttled client.
    pub fn rate_limited(retry_after: u64) -> LocalAnswer {
        LocalAnswer {
            status: 429,
            code: "rate_limited",
            message: "Too many requests; slow down and retry later.",
            retry_after: Some(retry_after),
        }
    }

    /// 429 when every tarpit slot is taken.
    pub fn busy() -> LocalAnswer {
        LocalAnswer {
            status: 429,
            code: "too_many_requests",
            message: "Too many requests; retry later.",
            retry_after: Some(1),
        }
    }

    fn title(&self) -> &'static str {
        match self.status {
            403 => "403 Forbidden",
            _ => "429 Too Many Requests",
        }
    }

    /// The body and its content type, for a client that prefers JSON or not.
    pub fn render(&self, request_id: &str, json: bool) -> (&'static str, Bytes) {
        if json {
            #[derive(Serialize)]
            struct Body<'a> {
                error: &'a str,
                message: &'a str,
                request_id: &'a str,
            }
            let body = serde_json::to_vec(&Body {
                error: self.code,
                message: self.message,
                request_id,
            })
            .unwrap_or_default();
            ("application/json", Bytes::from(body))
        } else {
            let title = self.title();
            let id = escape_html(request_id);
            let page = format!(
                "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title></head>\n\
                 <body><h1>{title}</h1>\n<p>{}</p>\n<p>Request ID: <code>{id}</code></p>\n</body></html>\n",
                self.message
            );
            ("text/html; charset=utf-8", Bytes::from(page))
        }
    }
}

fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Does an `Accept` header rank `application/json` above `text/html`?
pub fn prefers_json(accept: Option<&str>) -> bool {
    let Some(accept) = accept else { return false };
    let (mut json, mut html) = (0.0_f32, 0.0_f32);
    for item in accept.split(',') {
        let mut parts = item.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        match media.as_str() {
            "application/json" | "application/problem+json" => json = json.max(q),
            "application/*" => json = json.max(q * 0.99),
            "text/html" | "application/xhtml+xml" => html = html.max(q),
            "text/*" => html = html.max(q * 0.99),
            // `*/*` alone favours neither; HTML stays the default.
            _ => {}
        }
    }
    json > html
}

/// Keeps a client-supplied request id when it is short and plain; `None` means make one.
pub fn acceptable_request_id(value: &[u8]) -> Option<&str> {
    if value.is_empty() || value.len() > MAX_REQUEST_ID_LEN {
        return None;
    }
    if !value
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.:+=/".contains(b))
    {
        return None;
    }
    std::str::from_utf8(value).ok()
}

/// A fresh random id in UUID v4 form, from the thread-local generator (no system call
/// per request).
pub fn new_id() -> String {
    let bytes: [u8; 16] = rand::random();
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_negotiation() {
        assert!(!prefers_json(None));
        assert!(!prefers_json(Some("*/*")));
        assert!(prefers_json(Some("application/json")));
        assert!(prefers_json(Some("application/json, text/plain, */*")));
        assert!(!prefers_json(Some(
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
        )));
        assert!(prefers_json(Some("text/html;q=0.5, application/json")));
        assert!(!prefers_json(Some("application/json;q=0.1, text/html")));
    }

    #[test]
    fn bodies_carry_the_request_id() {
        let (ct, body) = LocalAnswer::blocked().render("abc-1", true);
        assert_eq!(ct, "application/json");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "blocked");
        assert_eq!(v["request_id"], "abc-1");
        assert!(v["message"].as_str().unwrap().contains("blocked"));
        let (ct, body) = LocalAnswer::rate_limited(2).render("<x>", false);
        assert!(ct.starts_with("text/html"));
        let page = String::from_utf8(body.to_vec()).unwrap();
        assert!(page.contains("429 Too Many Requests"));
        assert!(page.contains("&lt;x&gt;") && !page.contains("<x>"));
    }

    #[test]
    fn request_ids_are_kept_only_when_plain() {
        assert_eq!(acceptable_request_id(b"req-42"), Some("req-42"));
        assert_eq!(acceptable_request_id(b""), None);
        assert_eq!(acceptable_request_id(b"<script>"), None);
        assert_eq!(acceptable_request_id(&[b'a'; 129]), None);
        let id = new_id();
        assert_eq!(id.len(), 36);
        assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 4);
        assert_ne!(new_id(), id);
    }
}
