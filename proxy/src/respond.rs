//! Answers the proxy writes itself (403 for a block, 429 for a throttle or a full
//! tarpit), as an HTML page or as JSON when the client prefers it, and request ids.

use bytes::Bytes;
use http::HeaderValue;
use rand::RngCore;

/// One answer written by the proxy instead of the upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalAnswer {
    pub status: u16,
    /// Stable machine-readable code (`blocked`, `rate_limited`, ...).
    pub code: &'static str,
    pub message: &'static str,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
    /// The template it is rendered with.
    pub kind: Kind,
}

/// The templates, one pair (HTML, JSON) per kind of answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Block,
    Throttle,
    Busy,
    Challenge,
    UnknownHost,
    /// The request could not be proxied: the upstream is unreachable or failed (502,
    /// 504), the request was malformed (400), or the proxy failed (500).
    Error,
}

impl Kind {
    const ALL: [Kind; 6] = [
        Kind::Block,
        Kind::Throttle,
        Kind::Busy,
        Kind::Challenge,
        Kind::UnknownHost,
        Kind::Error,
    ];

    /// The file stem in a templates directory (`block.html`, `block.json`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Block => "block",
            Kind::Throttle => "throttle",
            Kind::Busy => "busy",
            Kind::Challenge => "challenge",
            Kind::UnknownHost => "unknown_host",
            Kind::Error => "error",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl LocalAnswer {
    /// 403 for a blocked client.
    pub fn blocked() -> LocalAnswer {
        LocalAnswer {
            status: 403,
            code: "blocked",
            message: "This request was blocked by the site's abuse protection.",
            retry_after: None,
            kind: Kind::Block,
        }
    }

    /// 429 for a throttled client.
    pub fn rate_limited(retry_after: u64) -> LocalAnswer {
        LocalAnswer {
            status: 429,
            code: "rate_limited",
            message: "Too many requests; slow down and retry later.",
            retry_after: Some(retry_after),
            kind: Kind::Throttle,
        }
    }

    /// 429 when every tarpit slot is taken.
    pub fn busy() -> LocalAnswer {
        LocalAnswer {
            status: 429,
            code: "too_many_requests",
            message: "Too many requests; retry later.",
            retry_after: Some(1),
            kind: Kind::Busy,
        }
    }

    /// 403 with a proof-of-work puzzle.
    pub fn challenge() -> LocalAnswer {
        LocalAnswer {
            status: 403,
            code: "challenge_required",
            message: "A browser check is required: solve the proof-of-work challenge to continue.",
            retry_after: None,
            kind: Kind::Challenge,
        }
    }

    /// 403 when a posted solution or fallback link was refused (a new puzzle follows).
    pub fn challenge_failed() -> LocalAnswer {
        LocalAnswer {
            code: "challenge_failed",
            message: "The browser check failed or expired; a new one follows.",
            ..LocalAnswer::challenge()
        }
    }

    /// 421 (or 404) for a host no app serves.
    pub fn unknown_host(status: u16) -> LocalAnswer {
        LocalAnswer {
            status,
            code: "unknown_host",
            message: "No site is served here under this host name.",
            retry_after: None,
            kind: Kind::UnknownHost,
        }
    }

    /// A 400 for a request no upstream should be sent, saying why.
    pub fn bad_request(message: &'static str) -> LocalAnswer {
        LocalAnswer {
            message,
            ..LocalAnswer::failure(400)
        }
    }

    /// The answer when a request could not be proxied, for `status` (400, 500, 502 or
    /// 504).
    pub fn failure(status: u16) -> LocalAnswer {
        let (code, message) = match status {
            400..500 => ("bad_request", "The request could not be understood."),
            502 => (
                "bad_gateway",
                "The site could not be reached; retry in a moment.",
            ),
            504 => (
                "gateway_timeout",
                "The site took too long to answer; retry in a moment.",
            ),
            _ => ("proxy_error", "The request could not be completed."),
        };
        LocalAnswer {
            status,
            code,
            message,
            retry_after: None,
            kind: Kind::Error,
        }
    }

    fn title(&self) -> &'static str {
        match (self.status, self.kind) {
            (_, Kind::Challenge) => "Checking your browser",
            (400, _) => "400 Bad Request",
            (502, _) => "502 Bad Gateway",
            (504, _) => "504 Gateway Timeout",
            (500, Kind::Error) => "500 Internal Server Error",
            (_, Kind::Error) => "Error",
            (404, _) => "404 Not Found",
            (421, _) => "421 Misdirected Request",
            (403, _) => "403 Forbidden",
            _ => "429 Too Many Requests",
        }
    }
}

/// A value substituted into a template.
pub enum Var<'a> {
    /// Escaped for the template's format.
    Text(&'a str),
    /// Inserted as it is (markup the proxy built itself).
    Raw(&'a str),
}

/// Answer templates: built-in, optionally overridden per kind and format by files
/// `KIND.html` / `KIND.json` in a directory (kinds: `block`, `throttle`, `busy`,
/// `challenge`, `unknown_host`, `error`). Placeholders: `{{status}}`, `{{code}}`,
/// `{{title}}`, `{{message}}`, `{{request_id}}`, `{{retry_after}}`, `{{reference}}` (the
/// id of the mitigation that answered, which `esperctl mitigations show REFERENCE` turns
/// into its decision record; empty for other answers) and `{{reference_html}}` (a
/// paragraph saying it, or nothing), and for challenges
/// `{{token}}`, `{{difficulty}}`, `{{submit}}`, `{{challenge}}` (the puzzle's markup and
/// script, HTML only) and `{{challenge_head}}` (the no-JavaScript fallback's refresh, for
/// the page's head; added before `</head>` when a page leaves it out). JSON values are
/// inserted string-escaped, without quotes.
#[derive(Clone, Debug)]
pub struct Templates {
    html: [String; 6],
    json: [String; 6],
}

const BUILTIN_HTML: &str = "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{{title}}</title></head>\n\
<body><h1>{{title}}</h1>\n<p>{{message}}</p>\n<p>Request ID: <code>{{request_id}}</code></p>\n{{reference_html}}</body></html>\n";
const BUILTIN_JSON: &str = "{\"error\":\"{{code}}\",\"message\":\"{{message}}\",\"request_id\":\"{{request_id}}\",\
\"reference\":\"{{reference}}\"}";
const BUILTIN_CHALLENGE_HTML: &str = "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{{title}}</title>\n\
<meta name=\"robots\" content=\"noindex\">{{challenge_head}}</head>\n<body><h1>{{title}}</h1>\n<p>{{message}}</p>\n\
{{challenge}}\n<p>Request ID: <code>{{request_id}}</code></p>\n{{reference_html}}</body></html>\n";
const BUILTIN_CHALLENGE_JSON: &str = "{\"error\":\"{{code}}\",\"message\":\"{{message}}\",\"request_id\":\"{{request_id}}\",\
\"reference\":\"{{reference}}\",\
\"challenge\":{\"token\":\"{{token}}\",\"difficulty\":{{difficulty}},\"submit\":\"{{submit}}\",\
\"algorithm\":\"find a decimal nonce such that sha256(token + ':' + nonce) has difficulty leading zero bits; POST token and nonce as a form\"}}";

impl Default for Templates {
    fn default() -> Self {
        let pick = |k: Kind, generic: &str, challenge: &str| {
            if k == Kind::Challenge {
                challenge.to_string()
            } else {
                generic.to_string()
            }
        };
        Templates {
            html: Kind::ALL.map(|k| pick(k, BUILTIN_HTML, BUILTIN_CHALLENGE_HTML)),
            json: Kind::ALL.map(|k| pick(k, BUILTIN_JSON, BUILTIN_CHALLENGE_JSON)),
        }
    }
}

/// A challenge page without `{{challenge_head}}` would strand clients without
/// JavaScript, whom its meta refresh moves on: it goes before `</head>`, or first.
fn with_challenge_head(page: String) -> String {
    if page.contains("{{challenge_head}}") {
        return page;
    }
    match page.to_ascii_lowercase().find("</head>") {
        Some(at) => format!("{}{{{{challenge_head}}}}{}", &page[..at], &page[at..]),
        None => format!("{{{{challenge_head}}}}{page}"),
    }
}

impl Templates {
    /// The built-ins with every `KIND.html` / `KIND.json` found in `dir` in their place.
    pub fn load(dir: Option<&std::path::Path>) -> Result<Templates, String> {
        let mut t = Templates::default();
        let Some(dir) = dir else { return Ok(t) };
        if !dir.is_dir() {
            return Err(format!("`{}` is not a directory", dir.display()));
        }
        for kind in Kind::ALL {
            for (ext, slot) in [("html", &mut t.html), ("json", &mut t.json)] {
                let path = dir.join(format!("{}.{ext}", kind.name()));
                match std::fs::read_to_string(&path) {
                    Ok(text) if kind == Kind::Challenge && ext == "html" => {
                        slot[kind.index()] = with_challenge_head(text);
                    }
                    Ok(text) => slot[kind.index()] = text,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(format!("cannot read `{}`: {e}", path.display())),
                }
            }
        }
        Ok(t)
    }

    /// Renders `answer` (plus `extra` variables) as JSON or HTML; returns the content
    /// type and the body.
    pub fn render(
        &self,
        answer: &LocalAnswer,
        request_id: &str,
        json: bool,
        extra: &[(&str, Var<'_>)],
    ) -> (&'static str, Bytes) {
        let status = answer.status.to_string();
        let retry = answer
            .retry_after
            .map(|s| s.to_string())
            .unwrap_or_default();
        let vars: Vec<(&str, Var<'_>)> = [
            ("status", Var::Text(&status)),
            ("code", Var::Text(answer.code)),
            ("title", Var::Text(answer.title())),
            ("message", Var::Text(answer.message)),
            ("request_id", Var::Text(request_id)),
            ("retry_after", Var::Text(&retry)),
        ]
        .into_iter()
        .chain(extra.iter().map(|(k, v)| {
            (
                *k,
                match v {
                    Var::Text(s) => Var::Text(s),
                    Var::Raw(s) => Var::Raw(s),
                },
            )
        }))
        .collect();
        let (template, content_type) = if json {
            (&self.json[answer.kind.index()], "application/json")
        } else {
            (&self.html[answer.kind.index()], "text/html; charset=utf-8")
        };
        (content_type, Bytes::from(substitute(template, &vars, json)))
    }
}

/// The `reference` and `reference_html` variables for an answer given because of
/// mitigation `id` (`html` holds the paragraph's markup).
pub fn reference_vars<'a>(id: &'a str, html: &'a mut String) -> [(&'static str, Var<'a>); 2] {
    *html = format!("<p>Reference: <code>{}</code></p>\n", escape_html(id));
    [
        ("reference", Var::Text(id)),
        ("reference_html", Var::Raw(html)),
    ]
}

/// Replaces `{{name}}` placeholders; unknown ones become empty.
fn substitute(template: &str, vars: &[(&str, Var<'_>)], json: bool) -> String {
    let mut out = String::with_capacity(template.len() + 128);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            out.push_str(&rest[start..]);
            return out;
        };
        let name = after[..end].trim();
        match vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v) {
            Some(Var::Raw(v)) => out.push_str(v),
            Some(Var::Text(v)) if json => out.push_str(&escape_json(v)),
            Some(Var::Text(v)) => out.push_str(&escape_html(v)),
            None => {}
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

fn escape_json(s: &str) -> String {
    let quoted = serde_json::to_string(s).unwrap_or_default();
    quoted
        .strip_prefix('"')
        .and_then(|q| q.strip_suffix('"'))
        .unwrap_or("")
        .to_string()
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

pub use esper_protocol::trace_context::acceptable_request_id;

/// The length of an id [`fresh_id`] writes.
pub const ID_LEN: usize = uuid::fmt::Hyphenated::LENGTH;

/// Writes a fresh random id in UUID v4 form into `buf` and returns it.
///
/// The 16 bytes come from the thread-local generator as one fill: sampling them as an
/// array draws a word per byte, and this runs once per request.
pub fn fresh_id(buf: &mut [u8; ID_LEN]) -> &str {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .hyphenated()
        .encode_lower(buf)
}

/// A fresh random id in UUID v4 form as a header value: the one copy the upstream
/// request, the response and the event all share.
pub fn new_id_header() -> HeaderValue {
    let mut buf = [0; ID_LEN];
    HeaderValue::from_str(fresh_id(&mut buf)).unwrap_or(HeaderValue::from_static(""))
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
        let t = Templates::default();
        let (ct, body) = t.render(&LocalAnswer::blocked(), "abc-1", true, &[]);
        assert_eq!(ct, "application/json");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "blocked");
        assert_eq!(v["request_id"], "abc-1");
        assert!(v["message"].as_str().unwrap().contains("blocked"));
        let (ct, body) = t.render(&LocalAnswer::rate_limited(2), "<x>", false, &[]);
        assert!(ct.starts_with("text/html"));
        let page = String::from_utf8(body.to_vec()).unwrap();
        assert!(page.contains("429 Too Many Requests"));
        assert!(page.contains("&lt;x&gt;") && !page.contains("<x>"));
    }

    #[test]
    fn template_files_override_per_kind_and_format() {
        let dir =
            std::env::temp_dir().join(format!("esper-templates-{}", fresh_id(&mut [0; ID_LEN])));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("block.json"),
            r#"{"denied":true,"id":"{{request_id}}","why":"{{message}}"}"#,
        )
        .unwrap();
        std::fs::write(dir.join("block.html"), "<p>No. {{request_id}}</p>").unwrap();
        let t = Templates::load(Some(&dir)).unwrap();
        let (_, body) = t.render(&LocalAnswer::blocked(), "a\"b", true, &[]);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["denied"], true);
        assert_eq!(v["id"], "a\"b");
        let (_, body) = t.render(&LocalAnswer::blocked(), "<i>", false, &[]);
        assert_eq!(&body[..], b"<p>No. &lt;i&gt;</p>");
        // Kinds without a file keep the built-in.
        let (_, body) = t.render(&LocalAnswer::rate_limited(3), "r", true, &[]);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "rate_limited");
        assert!(Templates::load(Some(&dir.join("missing"))).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_challenge_page_without_its_head_placeholder_gets_it() {
        let page = |s: &str| with_challenge_head(s.to_string());
        assert_eq!(
            page("<html><HEAD><title>x</title></HEAD><body>{{challenge}}</body></html>"),
            "<html><HEAD><title>x</title>{{challenge_head}}</HEAD><body>{{challenge}}</body></html>"
        );
        assert_eq!(
            page("<p>{{challenge}}</p>"),
            "{{challenge_head}}<p>{{challenge}}</p>"
        );
        let kept = "<head>{{challenge_head}}</head>{{challenge}}";
        assert_eq!(page(kept), kept);
    }

    #[test]
    fn the_challenge_json_says_how_to_solve() {
        let (_, body) = Templates::default().render(
            &LocalAnswer::challenge(),
            "r1",
            true,
            &[
                ("token", Var::Text("p.1.8.ab.cd")),
                ("difficulty", Var::Text("8")),
                ("submit", Var::Text("/.esper/challenge")),
            ],
        );
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "challenge_required");
        assert_eq!(v["challenge"]["difficulty"], 8);
        assert_eq!(v["challenge"]["token"], "p.1.8.ab.cd");
    }

    #[test]
    fn request_ids_are_kept_only_when_plain() {
        assert_eq!(acceptable_request_id(b"req-42"), Some("req-42"));
        assert_eq!(acceptable_request_id(b""), None);
        assert_eq!(acceptable_request_id(b"<script>"), None);
        assert_eq!(acceptable_request_id(&[b'a'; 129]), None);
        let id = new_id_header();
        let id = id.to_str().unwrap();
        assert_eq!(id.len(), 36);
        assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 4);
        assert_ne!(new_id_header(), id);
        let mut buf = [0; ID_LEN];
        let other = fresh_id(&mut buf);
        assert_eq!(uuid::Uuid::parse_str(other).unwrap().get_version_num(), 4);
        assert_ne!(other, id);
    }
}
