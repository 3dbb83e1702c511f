//! The request event: what a proxy (or `POST /api/v1/analyze`) reports about one request.

use std::collections::BTreeMap;
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// What the proxy did with the request it reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnforcedAction {
    /// Forwarded to the upstream with no mitigation in force.
    #[default]
    Allow,
    Block,
    Throttle,
    Tarpit,
    /// A challenge applied and the client had no valid clearance: it got the puzzle.
    Challenge,
    /// A log-only mitigation matched; the request was forwarded.
    Log,
}

impl EnforcedAction {
    /// The name events, metrics and logs give it (as serialised).
    pub fn as_str(self) -> &'static str {
        match self {
            EnforcedAction::Allow => "allow",
            EnforcedAction::Block => "block",
            EnforcedAction::Throttle => "throttle",
            EnforcedAction::Tarpit => "tarpit",
            EnforcedAction::Challenge => "challenge",
            EnforcedAction::Log => "log",
        }
    }
}

/// TLS facts, present when the proxy terminated TLS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsInfo {
    /// For example `TLSv1.3`.
    pub version: String,
    /// A client-hello fingerprint, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

/// One observed request. `weight` is 1 / sample rate, so that counts over sampled
/// traffic stay unbiased. [`RequestEvent::write_json`] writes the same JSON as
/// `Serialize` with serde_json, faster; a field added here must be added there too.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestEvent {
    /// Unique id; the engine deduplicates on it.
    pub id: String,
    /// Serialised as chrono does, in one string rather than piece by piece.
    #[serde(serialize_with = "crate::event_json::serialize_timestamp")]
    pub timestamp: DateTime<Utc>,
    /// The protected app the request was for.
    #[serde(default)]
    pub app: String,
    /// Which proxy (or `control` for the analyze API) reported it.
    #[serde(default)]
    pub proxy_id: String,
    #[serde(serialize_with = "crate::event_json::serialize_ip")]
    pub client_ip: IpAddr,
    pub method: String,
    #[serde(default)]
    pub host: String,
    pub path: String,
    /// Response status; 0 when unknown (the analyze API).
    #[serde(default)]
    pub status: u16,
    /// Time to the end of the response, in microseconds.
    #[serde(default)]
    pub latency_us: u64,
    /// Response body bytes sent to the client.
    #[serde(default)]
    pub bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    /// Headers the proxy was configured to report, names lower-cased.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Named cookies, values hashed (hex SHA-256 prefix) so no secret leaves the proxy.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cookies: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsInfo>,
    #[serde(default)]
    pub action: EnforcedAction,
    /// 1 / sample rate.
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

/// Hex digits kept from a cookie value's SHA-256 (64 bits: unique enough to track a
/// session, short enough to read).
pub const COOKIE_HASH_HEX_LEN: usize = 16;

/// The form in which a cookie value leaves the process that saw it: a hex SHA-256 prefix.
/// Events carry it, and `cookie:NAME=HASH` entity keys match on it, so every reporter
/// (the proxy, the analyze API) must hash with this one function.
pub fn hash_cookie_value(value: &str) -> String {
    cookie_hash(value).as_str().to_string()
}

/// [`hash_cookie_value`] on the stack, for lookups that must not allocate.
pub fn cookie_hash(value: &str) -> CookieHash {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(value.as_bytes());
    let mut out = [0u8; COOKIE_HASH_HEX_LEN];
    // Two hex digits per byte always fit: the buffer is exactly that long.
    let _ = hex::encode_to_slice(&digest[..COOKIE_HASH_HEX_LEN / 2], &mut out);
    CookieHash(out)
}

/// A cookie value's hash as lower-case hex.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CookieHash([u8; COOKIE_HASH_HEX_LEN]);

impl CookieHash {
    pub fn as_str(&self) -> &str {
        // Always ASCII hex digits.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// Longest event id (a UUID is 36 characters).
pub const MAX_EVENT_ID_LEN: usize = 256;

impl RequestEvent {
    /// What workers need of a reported event to count it right: an id of its own
    /// (events sharing one count once), printable and at most [`MAX_EVENT_ID_LEN`]
    /// bytes, and a weight above 0 (it is 1 / the sample rate; JSON has no NaN).
    pub fn check(&self) -> Result<(), String> {
        if self.id.trim().is_empty()
            || self.id.len() > MAX_EVENT_ID_LEN
            || self.id.chars().any(char::is_control)
        {
            return Err(format!(
                "id must be 1 to {MAX_EVENT_ID_LEN} printable characters, unique per event"
            ));
        }
        if !(self.weight.is_finite() && self.weight > 0.0) {
            return Err(format!(
                "weight must be above 0 (1 / the sample rate), not {}",
                self.weight
            ));
        }
        Ok(())
    }

    /// A minimal event with a fresh id; tests and the analyze API fill in the rest.
    pub fn new(client_ip: IpAddr, method: &str, path: &str) -> RequestEvent {
        RequestEvent {
            id: uuid::Uuid::new_v4().to_string(),
            timestamp: Utc::now(),
            app: String::new(),
            proxy_id: String::new(),
            client_ip,
            method: method.to_string(),
            host: String::new(),
            path: path.to_string(),
            status: 0,
            latency_us: 0,
            bytes: 0,
            user_agent: None,
            headers: BTreeMap::new(),
            cookies: BTreeMap::new(),
            tls: None,
            action: EnforcedAction::Allow,
            weight: 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_need_an_id_and_a_positive_weight() {
        let ip = "192.0.2.1".parse().unwrap();
        assert_eq!(RequestEvent::new(ip, "GET", "/").check(), Ok(()));
        for id in ["", "  ", "a\nb", &"x".repeat(MAX_EVENT_ID_LEN + 1)] {
            let mut e = RequestEvent::new(ip, "GET", "/");
            e.id = id.to_string();
            assert!(e.check().unwrap_err().contains("id must be"), "{id:?}");
        }
        for w in [0.0, -5.0, f64::NAN, f64::INFINITY] {
            let mut e = RequestEvent::new(ip, "GET", "/");
            e.weight = w;
            assert!(e.check().unwrap_err().contains("weight must be"), "{w}");
        }
    }

    #[test]
    fn cookie_values_hash_to_a_stable_hex_prefix() {
        let h = hash_cookie_value("abc");
        assert_eq!(cookie_hash("abc").as_str(), h);
        assert_eq!(h, "ba7816bf8f01cfea");
        assert_eq!(h.len(), COOKIE_HASH_HEX_LEN);
        assert_ne!(hash_cookie_value("abd"), h);
    }

    #[test]
    fn minimal_json_gets_defaults_and_unknown_fields_are_refused() {
        let json = r#"{"id":"e1","timestamp":"2026-01-01T00:00:00Z","client_ip":"127.0.0.2","method":"POST","path":"/login"}"#;
        let ev: RequestEvent = serde_json::from_str(json).unwrap();
        assert_eq!(ev.weight, 1.0);
        assert_eq!(ev.action, EnforcedAction::Allow);
        let bad = json.replace("\"path\"", "\"nope\":1,\"path\"");
        let err = serde_json::from_str::<RequestEvent>(&bad).unwrap_err();
        assert!(err.to_string().contains("unknown field `nope`"), "{err}");
    }
}
