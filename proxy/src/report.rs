//! The reporting filter: after a response, samples the request and writes its event,
//! as JSON, into the forwarder's bounded queue without waiting; a full queue drops the
//! event and counts it. The event's fields are borrowed from the request while it is
//! written: nothing per event is copied into owned strings first.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use esper_protocol::{EnforcedAction, EventView, TlsInfo, hash_cookie_value};
use http::{HeaderMap, HeaderName};

use crate::cache::cookie_pairs;
use crate::metrics::{DropReason, Metrics};
use crate::queue::{EventQueue, Refused};

/// Longest header value, user agent or path kept in an event, in bytes.
const MAX_FIELD_LEN: usize = 1024;

/// What the proxy saw of one finished request.
pub struct Observed<'a> {
    /// The app the request was for.
    pub app: &'a str,
    /// The app's sampling rate (each event weighs its inverse).
    pub sample_rate: f64,
    /// The TLS connection's facts, for requests over TLS.
    pub tls: Option<TlsInfo>,
    pub timestamp: DateTime<Utc>,
    pub client_ip: IpAddr,
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    pub status: u16,
    pub latency: Duration,
    pub bytes: u64,
    pub action: EnforcedAction,
    /// A request id this proxy generated for the request, reused as the event id; `None`
    /// when the client chose the request id (then the event gets a fresh one).
    pub own_id: Option<&'a str>,
}

/// Samples finished requests into the forwarder's queue.
pub struct Reporter {
    queue: Arc<EventQueue>,
    metrics: Arc<Metrics>,
    proxy_id: String,
    names: Arc<ReportNames>,
}

/// Header and cookie names, lower-case, each once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NameLists {
    pub headers: Vec<String>,
    pub cookies: Vec<String>,
}

impl NameLists {
    pub fn new(headers: &[String], cookies: &[String]) -> NameLists {
        let tidy = |names: &[String]| {
            let mut v: Vec<String> = names.iter().map(|n| n.to_ascii_lowercase()).collect();
            v.sort();
            v.dedup();
            v
        };
        NameLists {
            headers: tidy(headers),
            cookies: tidy(cookies),
        }
    }
}

/// What events carry, ready for the request path.
struct Names {
    headers: Vec<HeaderName>,
    cookies: Vec<String>,
}

/// The headers and cookies a proxy reports: those its configuration names (replaced by
/// a reload) and those the control plane's policies read (followed), together.
pub struct ReportNames {
    merged: ArcSwap<Names>,
    /// (the configuration's, the policies'); held while `merged` is rebuilt, so two
    /// changes at once cannot lose one.
    parts: parking_lot::Mutex<(NameLists, NameLists)>,
}

impl ReportNames {
    /// The configuration's names; none from policies yet.
    pub fn new(headers: &[String], cookies: &[String]) -> ReportNames {
        let local = NameLists::new(headers, cookies);
        let merged = ArcSwap::from_pointee(Self::merge(&local, &NameLists::default()));
        ReportNames {
            merged,
            parts: parking_lot::Mutex::new((local, NameLists::default())),
        }
    }

    /// The configuration's names changed (a reload); `true` when they differ.
    pub fn set_local(&self, headers: &[String], cookies: &[String]) -> bool {
        self.set(|parts| &mut parts.0, NameLists::new(headers, cookies))
    }

    /// The names the policies read changed; `true` when they differ.
    pub fn set_from_policies(&self, headers: &[String], cookies: &[String]) -> bool {
        self.set(|parts| &mut parts.1, NameLists::new(headers, cookies))
    }

    /// The names the policies read, as last set.
    pub fn policies_read(&self) -> NameLists {
        self.parts.lock().1.clone()
    }

    fn set(
        &self,
        part: impl FnOnce(&mut (NameLists, NameLists)) -> &mut NameLists,
        lists: NameLists,
    ) -> bool {
        let mut parts = self.parts.lock();
        let slot = part(&mut parts);
        if *slot == lists {
            return false;
        }
        *slot = lists;
        self.merged.store(Arc::new(Self::merge(&parts.0, &parts.1)));
        true
    }

    /// Header names that are not valid HTTP names were refused by config validation
    /// (and are dropped from the control plane's); any left are skipped.
    fn merge(a: &NameLists, b: &NameLists) -> Names {
        let mut headers: Vec<HeaderName> = a
            .headers
            .iter()
            .chain(&b.headers)
            .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
            .collect();
        // Each name once: an event's headers are one JSON object.
        headers.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        headers.dedup();
        let mut cookies: Vec<String> = a.cookies.iter().chain(&b.cookies).cloned().collect();
        cookies.sort();
        cookies.dedup();
        Names { headers, cookies }
    }
}

/// The first `MAX_FIELD_LEN` bytes of `s`, cut at a character boundary.
fn clip(s: &str) -> &str {
    if s.len() <= MAX_FIELD_LEN {
        return s;
    }
    let mut end = MAX_FIELD_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A header value as text (invalid UTF-8 replaced), clipped.
fn header_text(bytes: &[u8]) -> Cow<'_, str> {
    match String::from_utf8_lossy(bytes) {
        Cow::Borrowed(s) => Cow::Borrowed(clip(s)),
        Cow::Owned(s) => Cow::Owned(clip(&s).to_string()),
    }
}

impl Reporter {
    /// A reporter feeding `queue` with the headers and cookies `names` holds.
    pub fn new(
        queue: Arc<EventQueue>,
        metrics: Arc<Metrics>,
        proxy_id: String,
        names: Arc<ReportNames>,
    ) -> Reporter {
        Reporter {
            queue,
            metrics,
            proxy_id,
            names,
        }
    }

    /// Is this request among those reported at `sample_rate`? Asked before the event
    /// is assembled, so unsampled requests cost nothing more.
    pub fn sampled(&self, sample_rate: f64) -> bool {
        sample_rate >= 1.0 || rand::random::<f64>() < sample_rate
    }

    /// Queues the event of a sampled request; never waits.
    pub fn report(&self, seen: Observed<'_>) {
        let names = self.names.merged.load();
        let mut headers: Vec<(&str, Cow<'_, str>)> = Vec::new();
        for name in &names.headers {
            let mut values = seen.headers.get_all(name).iter();
            let Some(first) = values.next() else { continue };
            let mut value = header_text(first.as_bytes());
            for more in values {
                let joined = value.to_mut();
                joined.push_str(", ");
                joined.push_str(&String::from_utf8_lossy(more.as_bytes()));
            }
            if let Cow::Owned(joined) = &mut value {
                let keep = clip(joined).len();
                joined.truncate(keep);
            }
            headers.push((name.as_str(), value));
        }
        let mut cookies: Vec<(&str, Cow<'_, str>)> = Vec::new();
        if !names.cookies.is_empty() {
            for header in seen.headers.get_all(http::header::COOKIE) {
                let Ok(text) = header.to_str() else { continue };
                for (name, value) in cookie_pairs(text) {
                    if let Some(wanted) =
                        names.cookies.iter().find(|c| c.eq_ignore_ascii_case(name))
                    {
                        // The last of a repeated cookie wins, as it would in a map.
                        cookies.retain(|(n, _)| n != wanted);
                        cookies.push((wanted, Cow::Owned(hash_cookie_value(value))));
                    }
                }
            }
        }
        let mut fresh = [0; crate::respond::ID_LEN];
        let id = match seen.own_id {
            Some(id) => id,
            // Always one this proxy made: a client-chosen request id must not be able
            // to make the engine deduplicate its events away.
            None => crate::respond::fresh_id(&mut fresh),
        };
        let user_agent = seen
            .headers
            .get(http::header::USER_AGENT)
            .map(|v| header_text(v.as_bytes()));
        let event = EventView {
            id,
            timestamp: &seen.timestamp,
            app: seen.app,
            proxy_id: &self.proxy_id,
            client_ip: seen.client_ip,
            method: seen.method,
            host: clip(seen.host),
            path: clip(seen.path),
            status: seen.status,
            latency_us: u64::try_from(seen.latency.as_micros()).unwrap_or(u64::MAX),
            bytes: seen.bytes,
            user_agent: user_agent.as_deref(),
            headers: &headers,
            cookies: &cookies,
            tls: seen.tls.as_ref(),
            action: seen.action,
            weight: 1.0 / seen.sample_rate,
        };
        match self.queue.push(&event) {
            Ok(()) => {}
            Err(Refused::Full) => self.metrics.drop_events(DropReason::BufferFull, 1),
            Err(Refused::Closed) => self.metrics.drop_events(DropReason::Shutdown, 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use esper_protocol::RequestEvent;
    use esper_protocol::ingestion::IngestRequest;
    use http::HeaderValue;

    use super::*;

    fn observed(headers: &HeaderMap) -> Observed<'_> {
        Observed {
            app: "shop",
            sample_rate: 0.5,
            tls: None,
            timestamp: Utc::now(),
            client_ip: "192.0.2.1".parse().unwrap(),
            method: "POST",
            host: "shop.example",
            path: "/login",
            headers,
            status: 401,
            latency: Duration::from_micros(1500),
            bytes: 12,
            action: EnforcedAction::Log,
            own_id: None,
        }
    }

    fn drained(queue: &EventQueue) -> Vec<RequestEvent> {
        let mut batches = Vec::new();
        queue.drain_into(&mut batches);
        let mut events = Vec::new();
        for b in batches {
            let body: IngestRequest = serde_json::from_slice(&b.into_body()).unwrap();
            events.extend(body.events);
        }
        events
    }

    #[test]
    fn the_policies_names_are_reported_with_the_configurations() {
        let queue = Arc::new(EventQueue::new(100, 1, 10));
        let names = Arc::new(ReportNames::new(&["Accept".into()], &[]));
        let r = Reporter::new(
            queue.clone(),
            Arc::new(Metrics::new()),
            "p".into(),
            names.clone(),
        );
        let mut h = HeaderMap::new();
        h.insert("accept", HeaderValue::from_static("*/*"));
        h.insert("x-api-key", HeaderValue::from_static("k1"));
        h.insert("cookie", HeaderValue::from_static("cart=9; flow=a"));
        let reported = |names_of: fn(&RequestEvent) -> Vec<String>| {
            r.report(observed(&h));
            let [ev] = <[RequestEvent; 1]>::try_from(drained(&queue)).unwrap();
            names_of(&ev)
        };
        let headers = |ev: &RequestEvent| ev.headers.keys().cloned().collect::<Vec<_>>();
        let cookies = |ev: &RequestEvent| ev.cookies.keys().cloned().collect::<Vec<_>>();
        assert_eq!(reported(headers), ["accept"]);

        assert!(names.set_from_policies(&["X-Api-Key".into(), "accept".into()], &["Cart".into()]));
        assert!(!names.set_from_policies(&["x-api-key".into(), "accept".into()], &["cart".into()]));
        assert_eq!(reported(headers), ["accept", "x-api-key"]);
        assert_eq!(reported(cookies), ["cart"]);
        assert_eq!(
            names.policies_read(),
            NameLists::new(&["accept".into(), "x-api-key".into()], &["cart".into()])
        );

        // A reload replaces the configuration's names and keeps the policies'.
        assert!(names.set_local(&[], &["flow".into()]));
        assert_eq!(reported(headers), ["accept", "x-api-key"]);
        assert_eq!(reported(cookies), ["cart", "flow"]);
        // Policies that read nothing any more leave the configuration's names.
        assert!(names.set_from_policies(&[], &[]));
        assert!(reported(headers).is_empty());
        assert_eq!(reported(cookies), ["flow"]);
    }

    #[test]
    fn events_carry_the_request_facts() {
        let queue = Arc::new(EventQueue::new(100, 1, 10));
        let r = Reporter::new(
            queue.clone(),
            Arc::new(Metrics::new()),
            "p1".into(),
            Arc::new(ReportNames::new(
                &[
                    "accept-language".into(),
                    "x-missing".into(),
                    "accept".into(),
                ],
                &["session".into()],
            )),
        );
        let mut h = HeaderMap::new();
        h.insert("user-agent", HeaderValue::from_static("curl/8"));
        h.insert("accept-language", HeaderValue::from_static("en"));
        h.append("accept", HeaderValue::from_static("text/html"));
        h.append("accept", HeaderValue::from_static("*/*"));
        h.insert("cookie", HeaderValue::from_static("Session=abc; other=1"));
        let mut seen = observed(&h);
        seen.own_id = Some("req-1");
        r.report(seen);
        let [ev] = <[RequestEvent; 1]>::try_from(drained(&queue)).unwrap();
        assert_eq!(ev.id, "req-1");
        assert_eq!(ev.app, "shop");
        assert_eq!(ev.proxy_id, "p1");
        assert_eq!(ev.method, "POST");
        assert_eq!(ev.host, "shop.example");
        assert_eq!(ev.path, "/login");
        assert_eq!(ev.status, 401);
        assert_eq!(ev.latency_us, 1500);
        assert_eq!(ev.bytes, 12);
        assert_eq!(ev.weight, 2.0);
        assert_eq!(ev.user_agent.as_deref(), Some("curl/8"));
        assert_eq!(ev.headers.len(), 2);
        assert_eq!(ev.headers["accept-language"], "en");
        assert_eq!(ev.headers["accept"], "text/html, */*");
        assert_eq!(ev.cookies.len(), 1);
        assert_eq!(ev.cookies["session"], hash_cookie_value("abc"));
        assert_eq!(ev.action, EnforcedAction::Log);
        // Without a request id of the proxy's own, the event gets a fresh id.
        r.report(observed(&h));
        r.report(observed(&h));
        let ids: Vec<_> = drained(&queue).into_iter().map(|e| e.id).collect();
        assert_eq!(ids.len(), 2);
        assert_ne!(ids[0], ids[1]);
        assert!(ids.iter().all(|id| id.len() == 36), "{ids:?}");
        // Sampling at 0.5 keeps some and skips some.
        for _ in 0..64 {
            if r.sampled(0.5) {
                r.report(observed(&h));
            }
        }
        let kept = queue.len();
        assert!(kept > 0 && kept < 64, "kept {kept} of 64");
    }

    #[test]
    fn long_and_odd_fields_are_clipped_and_kept_readable() {
        let queue = Arc::new(EventQueue::new(10, 1, 10));
        let r = Reporter::new(
            queue.clone(),
            Arc::new(Metrics::new()),
            "p".into(),
            Arc::new(ReportNames::new(&["referer".into()], &[])),
        );
        let mut h = HeaderMap::new();
        let long = "é".repeat(600);
        h.insert(
            "user-agent",
            HeaderValue::from_bytes(b"bad \xff agent").unwrap(),
        );
        h.append("referer", HeaderValue::from_str(&long).unwrap());
        h.append("referer", HeaderValue::from_static("https://b.example/"));
        let path = format!("/{}", "p".repeat(2000));
        let mut seen = observed(&h);
        seen.path = &path;
        r.report(seen);
        let [ev] = <[RequestEvent; 1]>::try_from(drained(&queue)).unwrap();
        assert_eq!(ev.user_agent.as_deref(), Some("bad \u{fffd} agent"));
        assert_eq!(ev.path.len(), MAX_FIELD_LEN);
        assert_eq!(ev.headers["referer"].len(), MAX_FIELD_LEN);
        assert!(ev.headers["referer"].starts_with("éé"));
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let queue = Arc::new(EventQueue::new(1, 1, 1));
        let metrics = Arc::new(Metrics::new());
        let r = Reporter::new(
            queue.clone(),
            metrics.clone(),
            "p".into(),
            Arc::new(ReportNames::new(&[], &[])),
        );
        let h = HeaderMap::new();
        r.report(observed(&h));
        r.report(observed(&h));
        r.report(observed(&h));
        assert_eq!(metrics.dropped(DropReason::BufferFull), 2);
        queue.close();
        r.report(observed(&h));
        assert_eq!(metrics.dropped(DropReason::Shutdown), 1);
        assert_eq!(clip(&"é".repeat(600)).len(), MAX_FIELD_LEN);
    }
}
