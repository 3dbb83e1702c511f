//! Shared helpers of the proxy's integration tests: a real upstream (axum on an
//! ephemeral port), a proxy started on pre-bound ephemeral listeners, clients bound to
//! chosen loopback addresses, and polling.

#![allow(dead_code, clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use esper_common::{Shutdown, ShutdownTrigger};
use esper_protocol::{Action, Mitigation, Origin, Reason};
use esper_proxy::{Config, Listeners, ProxyHandle};
use parking_lot::Mutex;

#[path = "../../../brokers/testing/ports.rs"]
mod ports;
pub use ports::refusing_addr;

/// The protected app: `GET /` answers 200, `POST /login` 401, `GET /slow` 200 after
/// 500 ms. It records the headers of every request it sees.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<HeaderMap>>>,
    _trigger: ShutdownTrigger,
}

impl Upstream {
    /// A header of the last request the upstream saw ("" when absent).
    pub fn last_header(&self, name: &str) -> String {
        let seen = self.seen.lock();
        let last = seen.last().expect("the upstream saw a request");
        last.get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    }
}

pub async fn upstream() -> Upstream {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let record = move |headers: HeaderMap| log.lock().push(headers);
    let on_root = record.clone();
    let on_slow = record.clone();
    let router = Router::new()
        .route(
            "/",
            get(move |h: HeaderMap| async move {
                on_root(h);
                ([("x-upstream", "yes")], "hello from upstream")
            }),
        )
        .route(
            "/login",
            post(move |h: HeaderMap| async move {
                record(h);
                (StatusCode::UNAUTHORIZED, "bad credentials")
            }),
        )
        .route(
            "/slow",
            get(move |h: HeaderMap| async move {
                on_slow(h);
                tokio::time::sleep(Duration::from_millis(500)).await;
                "slow answer"
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (trigger, shutdown) = Shutdown::new();
    tokio::spawn(esper_common::http::serve(
        listener,
        router,
        shutdown,
        Duration::from_secs(1),
    ));
    Upstream {
        addr,
        seen,
        _trigger: trigger,
    }
}

/// An in-process ingestion broker on an ephemeral port.
pub struct Ingestion {
    pub url: String,
    pub client: esper_protocol::IngestionClient,
    pub trigger: ShutdownTrigger,
    pub broker: esper_ingestion::Broker,
}

pub async fn ingestion() -> Ingestion {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (trigger, shutdown) = Shutdown::new();
    let broker = esper_ingestion::start(esper_ingestion::Config::default(), listener, shutdown)
        .await
        .unwrap();
    let url = format!("http://{}", broker.local_addr());
    Ingestion {
        client: esper_protocol::IngestionClient::new(&url, None),
        url,
        trigger,
        broker,
    }
}

impl Ingestion {
    /// Stops the broker and waits until it is gone.
    pub async fn stop(self) {
        self.trigger.trigger();
        self.broker.wait().await.unwrap();
    }

    /// Claims queued events until at least `n` arrived or `within` passed.
    pub async fn claim_events(
        &self,
        n: usize,
        within: Duration,
    ) -> Vec<esper_protocol::RequestEvent> {
        let mut events = Vec::new();
        let deadline = tokio::time::Instant::now() + within;
        while events.len() < n && tokio::time::Instant::now() < deadline {
            let claimed = self
                .client
                .claim(
                    "proxy-tests",
                    1000,
                    Duration::from_secs(60),
                    Duration::from_millis(200),
                )
                .await
                .unwrap();
            events.extend(claimed.items.into_iter().map(|i| i.event));
        }
        events
    }

    /// Claims events until those claimed so far satisfy `enough` or `within` passes:
    /// events come in batches, and the ones a test looks for may not share the first.
    pub async fn claim_until(
        &self,
        within: Duration,
        enough: impl Fn(&[esper_protocol::RequestEvent]) -> bool,
    ) -> Vec<esper_protocol::RequestEvent> {
        let mut events = Vec::new();
        let deadline = tokio::time::Instant::now() + within;
        while !enough(&events) && tokio::time::Instant::now() < deadline {
            events.extend(self.claim_events(1, Duration::from_millis(500)).await);
        }
        events
    }
}

/// An in-process mitigation broker on an ephemeral (or given) port.
pub struct Mitigations {
    pub url: String,
    pub client: esper_protocol::MitigationClient,
    pub trigger: ShutdownTrigger,
    pub broker: esper_mitigation::Broker,
}

pub async fn mitigations() -> Mitigations {
    mitigations_on("127.0.0.1:0".parse().unwrap()).await
}

pub async fn mitigations_on(addr: SocketAddr) -> Mitigations {
    mitigations_with(addr, esper_mitigation::Config::default()).await
}

/// A mitigation broker on `addr` with `config` (its listen address aside).
pub async fn mitigations_with(addr: SocketAddr, config: esper_mitigation::Config) -> Mitigations {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let (trigger, shutdown) = Shutdown::new();
    let broker = esper_mitigation::start(config, listener, shutdown)
        .await
        .unwrap();
    let url = format!("http://{}", broker.local_addr());
    Mitigations {
        client: esper_protocol::MitigationClient::new(&url, None),
        url,
        trigger,
        broker,
    }
}

impl Mitigations {
    /// Publishes a manual mitigation of `entity` for `ttl`; returns it.
    pub async fn publish(&self, entity: &str, action: Action, ttl: Duration) -> Mitigation {
        let m = Mitigation::new(
            entity.parse().unwrap(),
            action,
            ttl,
            Origin::Manual,
            Reason {
                policy_id: None,
                summary: "test".into(),
            },
        );
        self.publish_one(m.clone()).await;
        m
    }

    /// Publishes `m` as it is.
    pub async fn publish_one(&self, m: Mitigation) {
        let published = self.client.publish(vec![m]).await.unwrap();
        assert_eq!(published.accepted, 1);
    }

    /// Stops the broker and waits until it is gone.
    pub async fn stop(self) {
        self.trigger.trigger();
        self.broker.wait().await.unwrap();
    }
}

/// The status of `GET {url}/` from a client bound to `ip`.
pub async fn status_from(ip: &str, url: &str) -> u16 {
    client_from(ip)
        .get(format!("{url}/"))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Polls until a client bound to `ip` gets `status` for `GET {url}/`.
pub async fn wait_for_status(ip: &str, url: &str, status: u16, within: Duration) -> bool {
    eventually(within, || async { status_from(ip, url).await == status }).await
}

/// A URL on which nothing listens (a broker that is down).
pub fn dead_url() -> String {
    format!("http://{}", refusing_addr())
}

/// A config for tests: one traffic thread, fast flushes and polls, short drain.
pub fn config(upstream: SocketAddr, ingestion_url: &str, mitigation_url: &str) -> Config {
    Config {
        upstream: upstream.to_string(),
        ingestion_url: ingestion_url.to_string(),
        mitigation_url: mitigation_url.to_string(),
        proxy_id: "proxy-test".into(),
        threads: 1,
        flush_interval: Duration::from_millis(20),
        stream_wait: Duration::from_secs(1),
        drain_timeout: Duration::from_secs(3),
        ..Config::default()
    }
}

/// A running proxy with its own shutdown trigger.
pub struct TestProxy {
    pub handle: Option<ProxyHandle>,
    pub trigger: ShutdownTrigger,
    /// `http://127.0.0.1:PORT` of the traffic listener.
    pub url: String,
    /// `http://127.0.0.1:PORT` of the ops listener.
    pub ops_url: String,
}

impl TestProxy {
    pub fn handle(&self) -> &ProxyHandle {
        self.handle.as_ref().unwrap()
    }

    /// Triggers shutdown and waits for the proxy to stop.
    pub async fn stop(mut self) -> Result<(), esper_proxy::ProxyError> {
        self.trigger.trigger();
        self.handle.take().unwrap().wait().await
    }

    /// The value of a metric line (`name{labels}`) on `/metrics`, 0 when absent.
    pub async fn metric(&self, line: &str) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.ops_url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(line)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }
}

fn tls_listener(on: &bool) -> Option<std::net::TcpListener> {
    on.then(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
}

/// Starts a proxy on ephemeral loopback listeners (TLS too when certificates are set).
pub async fn start_proxy(config: Config) -> TestProxy {
    let config_tls = !config.tls_certificates.is_empty();
    let traffic = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let ops = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (trigger, shutdown) = Shutdown::new();
    let handle = esper_proxy::start(
        config,
        Listeners {
            traffic: Some(traffic),
            ops: Some(ops),
            tls: tls_listener(&config_tls),
        },
        shutdown,
    )
    .await
    .unwrap();
    TestProxy {
        url: format!("http://{}", handle.traffic_addr()),
        ops_url: format!("http://{}", handle.ops_addr()),
        handle: Some(handle),
        trigger,
    }
}

/// An upstream that names itself: every path answers 200 with body `NAME PATH` and an
/// `x-upstream: NAME` header, except `/healthz` (200 or 503 as `healthy` says) and
/// `/slow` (after 500 ms). It counts the requests it served.
pub struct NamedUpstream {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub hits: Arc<std::sync::atomic::AtomicUsize>,
    pub healthy: Arc<std::sync::atomic::AtomicBool>,
    trigger: Option<ShutdownTrigger>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl NamedUpstream {
    /// Requests served so far.
    pub fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops it: the port is closed and open connections end.
    pub async fn kill(&mut self) {
        if let Some(t) = self.trigger.take() {
            t.trigger();
        }
        if let Some(s) = self.server.take() {
            let _ = s.await;
        }
    }
}

pub async fn named_upstream(name: &'static str) -> NamedUpstream {
    named_upstream_on(name, "127.0.0.1:0".parse().unwrap()).await
}

/// [`named_upstream`] listening on `addr`.
pub async fn named_upstream_on(name: &'static str, addr: SocketAddr) -> NamedUpstream {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let hits = Arc::new(AtomicUsize::new(0));
    let healthy = Arc::new(AtomicBool::new(true));
    let (h, ok) = (hits.clone(), healthy.clone());
    let router = Router::new()
        .route(
            "/healthz",
            get(move || async move {
                if ok.load(Ordering::SeqCst) {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                }
            }),
        )
        .fallback(move |uri: axum::http::Uri| async move {
            h.fetch_add(1, Ordering::SeqCst);
            if uri.path() == "/slow" {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            ([("x-upstream", name)], format!("{name} {}", uri.path()))
        });
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (trigger, shutdown) = Shutdown::new();
    let server = tokio::spawn(esper_common::http::serve(
        listener,
        router,
        shutdown,
        Duration::from_secs(1),
    ));
    NamedUpstream {
        name,
        addr,
        hits,
        healthy,
        trigger: Some(trigger),
        server: Some(server),
    }
}

/// `GET url` with a `Host` header: the status and the body.
pub async fn get_host(url: &str, host: &str) -> (u16, String) {
    let resp = reqwest::Client::new()
        .get(url)
        .header("host", host)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

/// A client whose connections come from `ip` (any 127.0.0.0/8 address works on Linux).
pub fn client_from(ip: &str) -> reqwest::Client {
    let ip: IpAddr = ip.parse().unwrap();
    reqwest::Client::builder()
        .local_address(ip)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Polls `check` every 20 ms until it returns true or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `prefix` (a PROXY header, say) then a `GET path` over a fresh connection from
/// `from` to `proxy`, and returns everything the proxy answered ("" when it closed the
/// connection without a word).
pub async fn raw_get(from: &str, proxy: SocketAddr, prefix: &[u8], path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(from.parse().unwrap(), 0))
        .unwrap();
    let mut stream = socket.connect(proxy).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    let mut bytes = prefix.to_vec();
    bytes.extend_from_slice(request.as_bytes());
    // The proxy may close early on a bad header; a failed write is then expected.
    let _ = stream.write_all(&bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends `request` as it is over a fresh connection to `proxy`, and returns the whole
/// answer (the request should ask to close the connection).
pub async fn exchange(proxy: SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of a raw HTTP/1.1 answer (0 when there was none).
pub fn raw_status(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The admin token of [`control_plane`].
pub const CONTROL_TOKEN: &str = "test-admin-token";

/// A real control plane (SQLite in memory, brokers unreachable) on ephemeral ports.
pub struct ControlPlane {
    /// `http://127.0.0.1:PORT` of its API.
    pub url: String,
    trigger: ShutdownTrigger,
    handle: esper_control::Started,
}

impl ControlPlane {
    /// Stops it and waits for it to end.
    pub async fn stop(self) {
        self.trigger.trigger();
        self.handle.wait().await.unwrap();
    }
}

pub async fn control_plane() -> ControlPlane {
    let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
    let listeners = esper_control::Listeners {
        api: bind().await.unwrap(),
        health: bind().await.unwrap(),
        metrics: bind().await.unwrap(),
    };
    let config = esper_control::Config {
        database_url: "sqlite::memory:".into(),
        admin_token: Some(CONTROL_TOKEN.into()),
        ingestion_url: dead_url(),
        mitigation_url: dead_url(),
        ..esper_control::Config::default()
    };
    let (trigger, shutdown) = Shutdown::new();
    let handle = esper_control::start(config, listeners, shutdown)
        .await
        .unwrap();
    ControlPlane {
        url: format!("http://{}", handle.api_addr),
        trigger,
        handle,
    }
}
