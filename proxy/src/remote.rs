//! Configuration from the control plane: long-polls `GET /api/v1/proxies/config` for a
//! newer revision, lays its TOML over the proxy's own configuration (file, environment
//! and flags, as last read at start or on SIGHUP; the control plane's keys win) and
//! applies the result through the same reload path as SIGHUP, so no connection is
//! dropped. A SIGHUP keeps the latest document laid over the configuration it reads. A configuration that does not
//! parse or validate is refused with an error line, and the one in force stays.
//! The challenge key the proxies share is followed the same way.

use std::sync::Arc;
use std::time::Duration;

use esper_common::Shutdown;
use esper_protocol::control::{PROXY_LOCAL_ADDRESSES, PROXY_LOCAL_ONLY};
use esper_protocol::{
    ChallengeKey, Endpoints, Instances, ProxyConfigDoc, ReportedFields, Resend, ServiceClient,
    Token,
};
use reqwest::StatusCode;

use crate::config::{Config, MIN_CHALLENGE_SECRET_LEN};
use crate::metrics::Metrics;
use crate::report::ReportNames;
use crate::{ProxyError, Reloader};

/// Slack over the long-poll wait before the request itself times out.
const REQUEST_SLACK: Duration = Duration::from_secs(10);
/// First pause after a failed poll; doubles up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Connecting to one control plane instance, before the next listed is tried.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const CONFIG_PATH: &str = "/api/v1/proxies/config";
const KEY_PATH: &str = "/api/v1/proxies/challenge-key";
const REPORTED_PATH: &str = "/api/v1/proxies/reported";
/// Pause before asking again a control plane that does not have a route (yet).
const NOT_OFFERED_RETRY: Duration = Duration::from_secs(60);
/// Headers a policy cannot have reported: credentials, sent on unhashed. Cookies are
/// reported by name through `cookies["name"]`, hashed. A proxy's own `report_headers`
/// may still name them.
const NEVER_REPORTED_FOR_POLICIES: [&str; 3] = ["authorization", "proxy-authorization", "cookie"];
/// Least time between the starts of two polls: a control plane that answers at once,
/// without waiting and with nothing newer, must not make the proxy spin (each answer
/// may rebuild its apps).
const MIN_POLL_SPACING: Duration = Duration::from_millis(250);

/// Tells a follower that a reload moved the control plane.
type Moved = tokio::sync::watch::Receiver<Arc<Instances>>;

/// Keeps polls [`MIN_POLL_SPACING`] apart.
#[derive(Default)]
struct Pace(Option<tokio::time::Instant>);

impl Pace {
    /// Waits until the next poll may start; `true` when shutdown came first.
    async fn next(&mut self, shutdown: &Shutdown) -> bool {
        if let Some(last) = self.0 {
            let due = last + MIN_POLL_SPACING;
            let now = tokio::time::Instant::now();
            if now < due && shutdown.sleep(due - now).await {
                return true;
            }
        }
        self.0 = Some(tokio::time::Instant::now());
        false
    }
}

/// `base` with the top-level keys of the TOML document `overlay` replacing its own.
pub fn overlay(base: &Config, overlay: &str) -> Result<Config, String> {
    let remote: toml::Table = overlay
        .parse()
        .map_err(|e: toml::de::Error| e.message().to_string())?;
    overlay_table(base, remote, true)
}

/// Whether a proxy would apply the control plane's document `doc`: its options parse and
/// validate over a proxy's defaults. Checked by the control plane when the document is
/// stored, so an operator's mistake is refused there rather than by every proxy.
///
/// Rules that tie an option to one a proxy may set itself are given the benefit of the
/// doubt: a stand-in upstream when the document names none, room for any `batch_size`
/// when it sets no `buffer`, and a `default_app` taken as naming one of the proxies' own
/// apps when it brings none. What only a proxy knows (its own settings, the files the
/// document names) is checked by each proxy when it applies the document.
pub fn check_document(doc: &str) -> Result<(), String> {
    let mut remote: toml::Table = doc
        .parse()
        .map_err(|e: toml::de::Error| e.message().to_string())?;
    let mut base = Config::default();
    if !remote.contains_key("upstream") && !remote.contains_key("apps") {
        base.upstream = "127.0.0.1:80".into();
    }
    if !remote.contains_key("buffer") {
        base.buffer = 1 << 40;
    }
    if !remote.contains_key("apps") {
        remote.remove("default_app");
    }
    overlay_table(&base, remote, false).map(|_| ())
}

fn overlay_table(base: &Config, remote: toml::Table, warn: bool) -> Result<Config, String> {
    let mut merged = toml::Table::try_from(base).map_err(|e| e.to_string())?;
    for (key, value) in remote {
        if PROXY_LOCAL_ADDRESSES.contains(&key.as_str()) {
            if !warn {
                continue;
            }
            tracing::warn!(
                option = %key,
                "the control plane's proxy document sets an address each proxy sets itself; \
                 left out (remove it from the document)"
            );
            continue;
        }
        if PROXY_LOCAL_ONLY.contains(&key.as_str()) {
            return Err(format!(
                "`{key}` is set on each proxy (its configuration or environment), not by the \
                 control plane"
            ));
        }
        merged.insert(key, value);
    }
    // The whole error: a value's type error names its key only there.
    let config: Config = merged.try_into().map_err(|e: toml::de::Error| {
        e.to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    })?;
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

/// What the follower needs.
pub struct Follow {
    /// The control plane in force (a reload may move it).
    pub control: Endpoints,
    pub token: Token,
    pub reloader: Reloader,
    pub metrics: Arc<Metrics>,
    /// Where the outcome of each call is told, for health.
    pub status: Arc<crate::status::Status>,
    /// Long-poll wait per request.
    pub wait: Duration,
}

/// Follows the control plane's proxy configuration until `shutdown`.
pub async fn follow(f: Follow, shutdown: Shutdown) {
    let client = f.client();
    let mut moved = f.control.subscribe();
    let mut after = 0i64;
    let mut backoff = Backoff::default();
    // The latest document, while it could not be built for a reason that may pass (an
    // upstream that does not resolve yet, a templates directory not yet in place): it is
    // tried again after each wait that brings no newer one.
    let mut retry: Option<ProxyConfigDoc> = None;
    let mut pace = Pace::default();
    loop {
        if pace.next(&shutdown).await {
            return;
        }
        let polled = tokio::select! {
            _ = shutdown.wait() => return,
            r = poll::<ProxyConfigDoc>(&client, f.long_poll(&client, CONFIG_PATH, after)) => r,
            Ok(()) = moved.changed() => {
                // Revisions are the control plane's own: start from its latest document.
                (after, retry) = (0, None);
                continue;
            }
        };
        // Named after the poll, which may have failed over to another instance.
        let url = f.url(CONFIG_PATH);
        f.status.control_result(
            polled
                .as_ref()
                .map(|_| ())
                .map_err(|e| format!("{url}: {e}")),
        );
        match polled {
            Ok(Some(doc)) => {
                after = doc.revision;
                retry = apply(&f, &doc).await.then_some(doc);
            }
            Ok(None) => {
                if let Some(doc) = retry.take() {
                    retry = apply(&f, &doc).await.then_some(doc);
                }
            }
            Err(e) => {
                let warn = || tracing::warn!(url, error = %e, "cannot read the proxy configuration from the control plane; retrying");
                match backoff.failed(&shutdown, &mut moved, warn).await {
                    Paused::Shutdown => return,
                    Paused::Moved => (after, retry) = (0, None),
                    Paused::Retry => {}
                }
                continue;
            }
        }
        backoff.reached(&url);
    }
}

impl Follow {
    /// `path` on the control plane in force, for messages.
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.control.load().current_url())
    }

    /// A client of the control plane's instances, with the token: each request sets
    /// its own timeout, after its wait.
    fn client(&self) -> ServiceClient {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        ServiceClient::with_http(http, self.control.clone(), self.token.clone())
    }

    /// `GET path?after=AFTER&wait=SECS`, timed out a little after the wait.
    fn long_poll(&self, client: &ServiceClient, path: &str, after: i64) -> reqwest::RequestBuilder {
        client
            .req(reqwest::Method::GET, path)
            .query(&[("after", after), ("wait", self.wait.as_secs() as i64)])
            .timeout(self.wait + REQUEST_SLACK)
    }
}

/// Pauses between failed polls: from [`FIRST_BACKOFF`], doubling up to [`MAX_BACKOFF`];
/// a failure is logged once until the control plane answers again.
struct Backoff {
    next: Duration,
    failing: bool,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: FIRST_BACKOFF,
            failing: false,
        }
    }
}

/// How a pause after a failed poll ended.
enum Paused {
    Shutdown,
    /// A reload named another control plane: poll it at once.
    Moved,
    Retry,
}

impl Backoff {
    /// After a failed poll: `warn` on the first failure of a run, then the pause, which a
    /// move to another control plane cuts short (the usual reason to move is that the old
    /// one is down).
    async fn failed(
        &mut self,
        shutdown: &Shutdown,
        moved: &mut Moved,
        warn: impl FnOnce(),
    ) -> Paused {
        if !self.failing {
            warn();
        }
        self.failing = true;
        tokio::select! {
            stop = shutdown.sleep(self.next) => if stop {
                return Paused::Shutdown;
            },
            Ok(()) = moved.changed() => {
                *self = Backoff::default();
                return Paused::Moved;
            }
        }
        self.next = (self.next * 2).min(MAX_BACKOFF);
        Paused::Retry
    }

    /// After an answer.
    fn reached(&mut self, url: &str) {
        if self.failing {
            tracing::info!(url, "control plane reachable again");
        }
        *self = Backoff::default();
    }
}

/// A short key would let anyone compute the signatures of clearance cookies: the
/// control plane's keys are held to the length a `challenge_secret` must have.
fn strong_enough(key: &ChallengeKey) -> bool {
    key.key.len() >= MIN_CHALLENGE_SECRET_LEN
        && key
            .previous
            .as_ref()
            .is_none_or(|p| p.len() >= MIN_CHALLENGE_SECRET_LEN)
}

/// One long-poll: something newer, or nothing within the wait. An instance that cannot
/// be reached, or drops the poll unanswered, gives way to the next one listed.
async fn poll<T: serde::de::DeserializeOwned>(
    client: &ServiceClient,
    req: reqwest::RequestBuilder,
) -> Result<Option<T>, PollError> {
    let resp = client
        .call(req, Resend::Unanswered)
        .await
        .map_err(|e| PollError::Failed(e.to_string()))?;
    match resp.status() {
        StatusCode::OK => resp
            .json()
            .await
            .map(Some)
            .map_err(|e| PollError::Failed(e.to_string())),
        StatusCode::NO_CONTENT => Ok(None),
        StatusCode::NOT_FOUND => Err(PollError::NotOffered),
        s => Err(PollError::Failed(format!("answered {s}"))),
    }
}

/// Why a poll brought nothing.
#[derive(Debug)]
enum PollError {
    /// 404: for a route a control plane of an older version does not have.
    NotOffered,
    Failed(String),
}

impl std::fmt::Display for PollError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PollError::NotOffered => f.write_str("answered 404 Not Found"),
            PollError::Failed(e) => f.write_str(e),
        }
    }
}

/// Applies `doc`; `true` when it failed for a reason that may pass, so it is worth
/// trying again. A document that does not parse or validate never will be.
async fn apply(f: &Follow, doc: &ProxyConfigDoc) -> bool {
    let outcome = f.reloader.reload_remote(&doc.config).await;
    match outcome {
        Ok(()) => {
            f.metrics.remote_config_applied.inc();
            f.metrics.remote_config_revision.set(doc.revision);
            tracing::info!(revision = doc.revision, by = %doc.updated_by, "configuration from the control plane applied");
            false
        }
        Err(e) => {
            f.metrics.remote_config_refused.inc();
            let again = !matches!(e, ProxyError::Remote(_));
            tracing::error!(revision = doc.revision, by = %doc.updated_by, error = %e, retried = again, "configuration from the control plane refused; the current one stays");
            again
        }
    }
}

/// Follows the deployment's challenge key on the control plane until `shutdown`: the
/// first answer, then each rotation as its long-poll returns it. The key signs unless the
/// configuration sets its own `challenge_secret`. Until the first answer the proxy signs
/// with its start-up key, whose cookies it keeps honouring after the switch.
pub async fn follow_challenge_key(f: Follow, shutdown: Shutdown) {
    let client = f.client();
    let mut moved = f.control.subscribe();
    let mut after = 0i64;
    let mut backoff = Backoff::default();
    let mut pace = Pace::default();
    loop {
        if pace.next(&shutdown).await {
            return;
        }
        let polled = tokio::select! {
            _ = shutdown.wait() => return,
            r = poll::<ChallengeKey>(&client, f.long_poll(&client, KEY_PATH, after)) => r,
            Ok(()) = moved.changed() => {
                after = 0;
                continue;
            }
        };
        // Named after the poll, which may have failed over to another instance.
        let url = f.url(KEY_PATH);
        f.status.control_result(
            polled
                .as_ref()
                .map(|_| ())
                .map_err(|e| format!("{url}: {e}")),
        );
        match polled {
            Ok(Some(key)) if !strong_enough(&key) => {
                let warn = || {
                    tracing::warn!(
                        url,
                        revision = key.revision,
                        "the control plane's challenge key is shorter than \
                         {MIN_CHALLENGE_SECRET_LEN} bytes; not used (the key in use still signs)"
                    )
                };
                match backoff.failed(&shutdown, &mut moved, warn).await {
                    Paused::Shutdown => return,
                    Paused::Moved => after = 0,
                    Paused::Retry => {}
                }
                continue;
            }
            Ok(Some(key)) => {
                let first = after == 0;
                after = key.revision;
                if f.reloader.use_deployment_key(&key).await {
                    if first {
                        tracing::info!(
                            url,
                            revision = key.revision,
                            "signing challenges with the control plane's key"
                        );
                    } else {
                        tracing::info!(
                            url,
                            revision = key.revision,
                            previous_honoured = key.previous.is_some(),
                            "the control plane rotated the challenge key: new challenges and cookies are signed with it"
                        );
                    }
                }
                // A control plane that keeps no revisions cannot rotate: nothing to follow.
                if key.revision == 0 {
                    return;
                }
            }
            Ok(None) => {}
            Err(e) => {
                let warn = || {
                    if after == 0 {
                        tracing::warn!(url, error = %e, "cannot read the challenge key from the control plane; retrying (clearance cookies are honoured by this process only until then)");
                    } else {
                        tracing::warn!(url, error = %e, "cannot follow the challenge key on the control plane; retrying (the key in use still signs)");
                    }
                };
                match backoff.failed(&shutdown, &mut moved, warn).await {
                    Paused::Shutdown => return,
                    Paused::Moved => after = 0,
                    Paused::Retry => {}
                }
                continue;
            }
        }
        backoff.reached(&url);
    }
}

/// Follows the headers and cookies the control plane's enabled policies read, so this
/// proxy reports them besides its own lists, until `shutdown`: the first answer, then
/// each change of the policies. A control plane that answers 404 (an older version, or
/// something in front of it during a deploy) is asked again a minute later, or at once
/// after a move; the names known meanwhile stay.
pub async fn follow_reported(f: Follow, names: Arc<ReportNames>, shutdown: Shutdown) {
    let client = f.client();
    let mut moved = f.control.subscribe();
    // Below any revision, so the first answer comes even with no policy ever written.
    const FIRST: i64 = -1;
    let mut after = FIRST;
    let mut backoff = Backoff::default();
    let mut told_not_offered = false;
    let mut last_refused: Vec<String> = Vec::new();
    let mut pace = Pace::default();
    loop {
        if pace.next(&shutdown).await {
            return;
        }
        let polled = tokio::select! {
            _ = shutdown.wait() => return,
            r = poll::<ReportedFields>(&client, f.long_poll(&client, REPORTED_PATH, after)) => r,
            Ok(()) = moved.changed() => {
                after = FIRST;
                continue;
            }
        };
        // Named after the poll, which may have failed over to another instance.
        let url = f.url(REPORTED_PATH);
        // A 404 says nothing of the control plane's health either way.
        match &polled {
            Err(PollError::Failed(e)) => f.status.control_result(Err(format!("{url}: {e}"))),
            Err(PollError::NotOffered) => {}
            Ok(_) => f.status.control_result(Ok(())),
        }
        match polled {
            Ok(Some(fields)) => {
                after = fields.revision;
                let (headers, refused): (Vec<String>, Vec<String>) =
                    fields.headers.into_iter().partition(|h| {
                        http::HeaderName::from_bytes(h.as_bytes()).is_ok()
                            && !NEVER_REPORTED_FOR_POLICIES.contains(&h.as_str())
                    });
                // Said once per change, not at every policy revision.
                if !refused.is_empty() && refused != last_refused {
                    tracing::warn!(
                        url,
                        ?refused,
                        "the control plane's policies read headers that are not reported for \
                         them (credentials, or not valid HTTP names); name them in this proxy's \
                         report_headers to report them"
                    );
                }
                last_refused = refused;
                told_not_offered = false;
                if names.set_from_policies(&headers, &fields.cookies) {
                    tracing::info!(
                        url,
                        revision = fields.revision,
                        ?headers,
                        cookies = ?fields.cookies,
                        "reporting the headers and cookies the control plane's policies read"
                    );
                }
            }
            Ok(None) => told_not_offered = false,
            Err(PollError::NotOffered) => {
                if !told_not_offered {
                    tracing::info!(
                        url,
                        "the control plane answers 404 for the headers its policies read (an \
                         older version?); asking again every minute, with the names known \
                         meanwhile"
                    );
                }
                told_not_offered = true;
                // Asked again now and then: the control plane may be upgraded in place.
                tokio::select! {
                    stop = shutdown.sleep(NOT_OFFERED_RETRY) => if stop {
                        return;
                    },
                    Ok(()) = moved.changed() => after = FIRST,
                }
                continue;
            }
            Err(PollError::Failed(e)) => {
                let warn = || tracing::warn!(url, error = %e, "cannot follow the headers and cookies the control plane's policies read; retrying (those known are still reported)");
                match backoff.failed(&shutdown, &mut moved, warn).await {
                    Paused::Shutdown => return,
                    Paused::Moved => after = FIRST,
                    Paused::Retry => {}
                }
                continue;
            }
        }
        backoff.reached(&url);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_plane_keys_replace_the_local_ones() {
        let base = Config {
            upstream: "127.0.0.1:9000".into(),
            proxy_id: "local".into(),
            ..Config::default()
        };
        let merged = overlay(
            &base,
            "upstream = \"127.0.0.1:9001\"\nallow_paths = [\"/health\"]",
        )
        .unwrap();
        assert_eq!(merged.upstream, "127.0.0.1:9001");
        assert_eq!(merged.allow_paths, ["/health"]);
        assert_eq!(merged.proxy_id, "local", "keys not in the document stay");
        assert!(overlay(&base, "no_such_option = 1").is_err());
        assert!(overlay(&base, "sample_rate = 7.0").is_err());
        assert!(overlay(&base, "not toml").is_err());
        for key in PROXY_LOCAL_ONLY {
            let doc = format!("{key} = \"http://10.9.9.9:1\"\nallow_paths = [\"/up\"]");
            if PROXY_LOCAL_ADDRESSES.contains(key) {
                // Left out, the rest applied: documents stored before they were refused.
                let merged = overlay(&base, &doc).unwrap();
                assert_eq!(merged.allow_paths, ["/up"]);
                assert_eq!(
                    serde_json::to_value(&merged).unwrap()[*key],
                    serde_json::to_value(&base).unwrap()[*key]
                );
            } else {
                let err = overlay(&base, &doc).unwrap_err();
                assert!(err.contains(key) && err.contains("each proxy"), "{err}");
            }
        }
    }

    #[tokio::test]
    async fn a_move_cuts_the_pause_after_a_failure_short() {
        let (_trigger, shutdown) = Shutdown::new();
        let control = Endpoints::new("http://127.0.0.1:9");
        let mut moved = control.subscribe();
        let mut backoff = Backoff {
            next: Duration::from_secs(600),
            failing: true,
        };
        let ended = {
            let pause = backoff.failed(&shutdown, &mut moved, || {});
            tokio::pin!(pause);
            assert!(
                tokio::time::timeout(Duration::from_millis(50), &mut pause)
                    .await
                    .is_err(),
                "it waits"
            );
            control.set("http://127.0.0.1:10");
            tokio::time::timeout(Duration::from_secs(5), pause).await
        };
        assert!(matches!(ended, Ok(Paused::Moved)));
        assert_eq!(backoff.next, FIRST_BACKOFF, "the next failure starts over");
    }

    #[test]
    fn short_challenge_keys_are_not_used() {
        let key = |key: &str, previous: Option<&str>| ChallengeKey {
            key: key.into(),
            previous: previous.map(String::from),
            revision: 2,
        };
        let long = "k".repeat(MIN_CHALLENGE_SECRET_LEN);
        assert!(strong_enough(&key(&long, None)));
        assert!(strong_enough(&key(&long, Some(&long))));
        assert!(!strong_enough(&key("", None)));
        assert!(!strong_enough(&key("short", None)));
        assert!(!strong_enough(&key(&long, Some("short"))));
    }

    #[tokio::test]
    async fn polls_start_at_least_a_spacing_apart() {
        let (trigger, shutdown) = Shutdown::new();
        let mut pace = Pace::default();
        let start = tokio::time::Instant::now();
        assert!(!pace.next(&shutdown).await);
        assert!(start.elapsed() < MIN_POLL_SPACING, "the first at once");
        assert!(!pace.next(&shutdown).await);
        assert!(!pace.next(&shutdown).await);
        assert!(start.elapsed() >= 2 * MIN_POLL_SPACING);
        trigger.trigger();
        assert!(pace.next(&shutdown).await, "shutdown ends the wait");
    }
}
