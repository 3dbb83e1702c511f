//! The apps behind the proxy: which app a request is for (by Host, then the longest
//! path prefix), and each app's upstream pool, balanced round robin by Pingora's load
//! balancer and kept honest by an active health check running on our runtime.
//!
//! What the health checks found outlives the pool: an app rebuilt by a reload, or
//! because its upstream names now resolve to other addresses, joins the health registry
//! of the app it replaces (same name and same checks), so an upstream found down stays
//! out of the new pool instead of taking traffic until the next check.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pingora::lb::discovery::Static;
use pingora::lb::health_check::{HttpHealthCheck, TcpHealthCheck};
use pingora::lb::selection::RoundRobin;
use pingora::lb::{Backend, Backends, HealthRegistry, LoadBalancer};
use pingora::prelude::HttpPeer;
use tokio::sync::{Notify, watch};

use crate::config::{AppConfig, split_host_port};
use crate::respond::Templates;

/// Timeout of one health check probe (connect, and read for HTTP checks).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The host name an upstream was configured with, kept on its backend for TLS.
#[derive(Clone, Debug)]
struct UpstreamHost(String);

/// One app, ready to serve.
pub struct App {
    pub name: String,
    pub sample_rate: f64,
    pub templates: Templates,
    /// The `Host` a request that named none is sent with: the first upstream's
    /// address, as configured.
    pub host: http::HeaderValue,
    tls: bool,
    timeouts: Timeouts,
    windows: ReuseWindows,
    pool: LoadBalancer<RoundRobin>,
    upstreams: usize,
    /// The peer of an app with a single upstream, which needs no balancing.
    only: Option<HttpPeer>,
    /// Upstreams given by host name, with the addresses each resolved to.
    resolved: Vec<(String, Vec<SocketAddr>)>,
    /// The health checks this app shares with the generations of it before and after
    /// (`None` with `health_check = "none"`).
    _checked: Option<Arc<Checked>>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").field("name", &self.name).finish()
    }
}

/// Which pooled upstream connections a request may take: only those that went back to
/// the pool during the same window of `upstream_idle_timeout`, counted from when the app
/// was built. So no request goes out on a connection idle for longer than the timeout,
/// which is what the timeout is for (the upstream may be closing it, and a NAT may have
/// forgotten it), without Pingora's idle timer: that timer is armed and disarmed every
/// time a connection goes back to the pool, once per request. The windows cost a new
/// connection per window for each connection in use, a handful a minute.
///
/// A connection returned too late in its window to be taken again is closed by Pingora's
/// timer: only requests started in the last eighth of a window arm it, with an eighth of
/// the window. Others left behind (a quiet app whose connection was not needed again
/// before the window ended) are closed when the upstream closes them or when the pool
/// needs their room.
#[derive(Clone, Copy, Debug)]
struct ReuseWindows {
    /// The window's width in microseconds; 0: one window for ever, and no timer.
    width: u64,
    start: Instant,
    /// Keeps this app's windows apart from those of another app with the same upstream,
    /// which start at another moment: connections are pooled by peer and group key.
    salt: u64,
    /// The timer of connections returned in a window's last eighth.
    closing: Duration,
}

impl ReuseWindows {
    fn new(idle_timeout: Duration) -> ReuseWindows {
        let width = u64::try_from(idle_timeout.as_micros()).unwrap_or(u64::MAX);
        // A nonzero timeout below a microsecond is still a timeout.
        let width = if idle_timeout.is_zero() {
            0
        } else {
            width.max(1)
        };
        ReuseWindows {
            width,
            start: Instant::now(),
            salt: rand::random(),
            closing: (idle_timeout / 8).max(Duration::from_millis(1)),
        }
    }

    /// Puts `peer` in the pool of the window `started` falls in.
    fn apply(&self, peer: &mut HttpPeer, started: Instant) {
        if self.width == 0 {
            return;
        }
        let since = started.saturating_duration_since(self.start);
        let at = since.as_secs() * 1_000_000 + u64::from(since.subsec_micros());
        peer.group_key = self.salt.wrapping_add(at / self.width);
        if at % self.width >= self.width - self.width / 8 {
            peer.options.idle_timeout = Some(self.closing);
        }
    }
}

/// Longest wait for an upstream's name to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The addresses `upstream` (`host:port`) resolves to, sorted: every one of the address
/// family the resolver ranks first (its order follows the system's preference, RFC
/// 6724), so a service scaled out behind one name gets a backend per instance while
/// `localhost` stays on the one family instead of also trying `::1` where the app
/// listens only on 127.0.0.1. Bounded: a reload waits on this, and a stuck resolver
/// must not hold up every later reload behind it.
async fn resolve(upstream: &str) -> Result<Vec<SocketAddr>, String> {
    let mut found = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(upstream))
        .await
        .map_err(|_| format!("cannot resolve upstream `{upstream}`: timed out"))?
        .map_err(|e| format!("cannot resolve upstream `{upstream}`: {e}"))?
        .peekable();
    let ipv4 = found
        .peek()
        .ok_or_else(|| format!("cannot resolve upstream `{upstream}`: no address found"))?
        .is_ipv4();
    let mut addrs: Vec<SocketAddr> = found.filter(|a| a.is_ipv4() == ipv4).collect();
    addrs.sort_unstable();
    addrs.dedup();
    Ok(addrs)
}

/// What makes two generations of an app share their health checks: the same app with
/// the same checks.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct CheckKey {
    app: String,
    check: String,
    host: String,
    tls: bool,
    interval: Duration,
}

/// One app's health checks: the registry every generation of its pool joins, and the
/// loop probing it, which ends when the last generation holding this is dropped (after
/// a reload, once its last request is done).
struct Checked {
    registry: Arc<HealthRegistry>,
    /// Backends a probe pass has been asked for, to know when a new generation brings
    /// one that was never checked.
    known: Mutex<BTreeSet<Backend>>,
    /// Asks the loop for a pass now rather than after its interval.
    now: Arc<Notify>,
    _stop: watch::Sender<()>,
}

/// The health checks of the apps in force, by app, so a rebuilt app keeps what they
/// found.
#[derive(Default)]
pub struct HealthKeeper {
    apps: Mutex<HashMap<CheckKey, Weak<Checked>>>,
}

impl HealthKeeper {
    /// The checks for `key`: those in force if some generation of the app still holds
    /// them, else new ones with their loop started on the current runtime.
    fn checks(&self, key: CheckKey) -> Arc<Checked> {
        let mut apps = self.apps.lock();
        apps.retain(|_, checked| checked.strong_count() > 0);
        if let Some(checked) = apps.get(&key).and_then(Weak::upgrade) {
            return checked;
        }
        let registry = Arc::new(HealthRegistry::new());
        registry.set_health_check(health_check(&key.check, &key.host, key.tls));
        let now = Arc::new(Notify::new());
        let (stop, stopped) = watch::channel(());
        tokio::spawn(health_loop(
            key.app.clone(),
            registry.clone(),
            key.interval,
            now.clone(),
            stopped,
        ));
        let checked = Arc::new(Checked {
            registry,
            known: Mutex::new(BTreeSet::new()),
            now,
            _stop: stop,
        });
        apps.insert(key, Arc::downgrade(&checked));
        checked
    }
}

impl Checked {
    /// Notes the backends of a new generation; one never checked gets a pass now.
    fn joined_by(&self, backends: &BTreeSet<Backend>) {
        let mut known = self.known.lock();
        let unchecked = !backends.is_subset(&known);
        // Only the latest membership: addresses come and go with DNS answers.
        known.clone_from(backends);
        drop(known);
        if unchecked {
            // A stored permit: the loop takes it when it next waits.
            self.now.notify_one();
        }
    }
}

/// Settings every app shares.
pub struct Shared {
    pub sample_rate: f64,
    pub templates_dir: Option<std::path::PathBuf>,
    pub timeouts: Timeouts,
    pub idle_timeout: Duration,
}

/// How long the proxy waits on an upstream: to connect, and between reads and writes
/// (zero: no limit).
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub connect: Duration,
    pub read: Duration,
    pub write: Duration,
}

impl App {
    /// Resolves the upstreams and joins the app's health checks in `health` (starting
    /// them on the current runtime if no earlier generation of the app left any).
    pub async fn build(
        cfg: &AppConfig,
        shared: &Shared,
        health: &HealthKeeper,
    ) -> Result<App, String> {
        let mut backends = BTreeSet::new();
        let mut resolved = Vec::new();
        for u in &cfg.upstreams {
            let (host, _) = split_host_port(u)?;
            let addrs = resolve(u).await?;
            for addr in &addrs {
                let mut b = Backend::new(&addr.to_string()).map_err(|e| e.to_string())?;
                // Only TLS upstreams need their name (SNI); without it a backend clones
                // without allocating, once per request.
                if cfg.upstream_tls {
                    b.ext.insert(UpstreamHost(host.to_string()));
                }
                backends.insert(b);
            }
            if u.parse::<SocketAddr>().is_err() {
                resolved.push((u.clone(), addrs));
            }
        }
        let upstreams = backends.len();
        let only = match backends.first() {
            Some(b) if upstreams == 1 => peer_of(b, cfg.upstream_tls, shared.timeouts),
            _ => None,
        };
        let checked = (cfg.health_check != "none").then(|| {
            let host = cfg
                .upstreams
                .first()
                .and_then(|u| split_host_port(u).ok())
                .map_or("localhost", |(h, _)| h);
            health.checks(CheckKey {
                app: cfg.name.clone(),
                check: cfg.health_check.clone(),
                host: host.to_string(),
                tls: cfg.upstream_tls,
                interval: cfg.health_check_interval,
            })
        });
        let members = checked.as_ref().map(|_| backends.clone());
        let discovery = Static::new(backends);
        let backends = match &checked {
            Some(checked) => {
                Backends::new_with_health_registry(discovery, checked.registry.clone())
            }
            None => Backends::new(discovery),
        };
        let pool = LoadBalancer::<RoundRobin>::from_backends(backends);
        pool.update().await.map_err(|e| e.to_string())?;
        // After the update, so a pass asked for now sees the new members.
        if let (Some(checked), Some(members)) = (&checked, &members) {
            checked.joined_by(members);
        }
        let templates_dir = cfg.templates_dir.as_ref().or(shared.templates_dir.as_ref());
        let templates = Templates::load(templates_dir.map(|p| p.as_path()))?;
        let host = cfg
            .upstreams
            .first()
            .and_then(|u| http::HeaderValue::from_str(u).ok())
            .unwrap_or_else(|| http::HeaderValue::from_static("localhost"));
        Ok(App {
            name: cfg.name.clone(),
            host,
            sample_rate: cfg.sample_rate.unwrap_or(shared.sample_rate),
            templates,
            tls: cfg.upstream_tls,
            timeouts: shared.timeouts,
            windows: ReuseWindows::new(shared.idle_timeout),
            pool,
            upstreams,
            only,
            resolved,
            _checked: checked,
        })
    }

    /// Does one of this app's upstream names resolve to other addresses than those in
    /// use (moved, or instances added or gone)? A name that fails to resolve now keeps
    /// its addresses.
    pub async fn resolves_elsewhere(&self) -> bool {
        for (name, addrs) in &self.resolved {
            match resolve(name).await {
                Ok(now) if now != *addrs => {
                    tracing::info!(app = %self.name, upstream = %name, was = ?addrs, now = ?now, "upstream resolves to other addresses");
                    return true;
                }
                Ok(_) => {}
                Err(reason) => {
                    tracing::debug!(app = %self.name, %reason, "upstream not resolved; keeping its addresses")
                }
            }
        }
        false
    }

    /// Each upstream's address and whether the pool would pick it now (healthy, or not
    /// checked).
    pub fn upstream_health(&self) -> Vec<(String, bool)> {
        let backends = self.pool.backends();
        backends
            .get_backend()
            .iter()
            .map(|b| (b.addr.to_string(), backends.ready(b)))
            .collect()
    }

    /// How many upstreams the app has (the most connect attempts one request makes).
    pub fn upstreams(&self) -> usize {
        self.upstreams
    }

    /// The next healthy upstream, round robin, other than `avoid` when there is another,
    /// for a request `started` then.
    pub fn peer(&self, avoid: Option<SocketAddr>, started: Instant) -> Option<HttpPeer> {
        let mut peer = self.pick(avoid)?;
        self.windows.apply(&mut peer, started);
        Some(peer)
    }

    fn pick(&self, avoid: Option<SocketAddr>) -> Option<HttpPeer> {
        if let Some(only) = &self.only {
            // One upstream: whatever its health, it is the one to try.
            return Some(only.clone());
        }
        let b = self
            .pool
            .select_with(b"", self.upstreams.max(1) * 2, |b, healthy| {
                healthy && (avoid.is_none() || b.addr.as_inet().copied() != avoid)
            })
            // With none healthy, trying one beats refusing outright.
            .or_else(|| {
                self.pool
                    .select_with(b"", self.upstreams.max(1), |_, _| true)
            })?;
        peer_of(&b, self.tls, self.timeouts)
    }
}

/// The peer Pingora connects to for backend `b`.
fn peer_of(b: &Backend, tls: bool, timeouts: Timeouts) -> Option<HttpPeer> {
    let sni = if tls {
        b.ext
            .get::<UpstreamHost>()
            .map(|h| h.0.clone())
            .unwrap_or_default()
    } else {
        String::new()
    };
    let mut peer = HttpPeer::new(*b.addr.as_inet()?, tls, sni);
    peer.options.connection_timeout = Some(timeouts.connect);
    let limit = |d: Duration| (!d.is_zero()).then_some(d);
    peer.options.read_timeout = limit(timeouts.read);
    peer.options.write_timeout = limit(timeouts.write);
    Some(peer)
}

fn health_check(
    kind: &str,
    host: &str,
    tls: bool,
) -> Box<dyn pingora::lb::health_check::HealthCheck + Send + Sync> {
    if kind == "tcp" {
        let mut hc = if tls {
            TcpHealthCheck::new_tls(host)
        } else {
            TcpHealthCheck::new()
        };
        hc.peer_template.options.connection_timeout = Some(PROBE_TIMEOUT);
        return hc;
    }
    let mut hc = HttpHealthCheck::new(host, tls);
    if let Ok(req) = pingora::http::RequestHeader::build("GET", kind.as_bytes(), None) {
        let mut req = req;
        if req.insert_header("Host", host).is_ok() {
            hc.req = req;
        }
    }
    hc.peer_template.options.connection_timeout = Some(PROBE_TIMEOUT);
    hc.peer_template.options.read_timeout = Some(PROBE_TIMEOUT);
    Box::new(hc)
}

async fn health_loop(
    app: String,
    registry: Arc<HealthRegistry>,
    interval: Duration,
    now: Arc<Notify>,
    mut stop: watch::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = registry.run_health_check(true) => {}
            _ = stop.changed() => break,
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = now.notified() => {}
            _ = stop.changed() => break,
        }
    }
    tracing::debug!(app, "health checks stopped");
}

/// Which hosts a route matches.
#[derive(Debug)]
enum HostPattern {
    Exact(String),
    /// `*.example.com`, kept as `.example.com`.
    Suffix(String),
    Any,
}

impl HostPattern {
    fn parse(p: &str) -> HostPattern {
        let p = p.to_ascii_lowercase();
        match p.strip_prefix('*') {
            Some(suffix) => HostPattern::Suffix(suffix.to_string()),
            None => HostPattern::Exact(p),
        }
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h.eq_ignore_ascii_case(host),
            HostPattern::Suffix(s) => {
                host.len() > s.len()
                    && host.is_char_boundary(host.len() - s.len())
                    && host[host.len() - s.len()..].eq_ignore_ascii_case(s)
            }
            HostPattern::Any => true,
        }
    }

    /// Exact names before wildcards (longer first) before catch-alls.
    fn rank(&self) -> (u8, usize) {
        match self {
            HostPattern::Exact(h) => (2, h.len()),
            HostPattern::Suffix(s) => (1, s.len()),
            HostPattern::Any => (0, 0),
        }
    }
}

#[derive(Debug)]
struct Route {
    host: HostPattern,
    prefix: String,
    app: Arc<App>,
}

/// Finds the app of a request.
#[derive(Debug, Default)]
pub struct Router {
    routes: Vec<Route>,
    default: Option<Arc<App>>,
    apps: Vec<Arc<App>>,
}

impl Router {
    /// Routes for `apps` (with their configs, same order); `default` names the app for
    /// unclaimed hosts.
    pub fn new(apps: Vec<(AppConfig, Arc<App>)>, default: Option<&str>) -> Router {
        let mut routes = Vec::new();
        let mut all = Vec::new();
        for (cfg, app) in apps {
            let prefix = cfg.path_prefix.trim_end_matches('/').to_string();
            if cfg.hosts.is_empty() {
                routes.push(Route {
                    host: HostPattern::Any,
                    prefix: prefix.clone(),
                    app: app.clone(),
                });
            }
            for h in &cfg.hosts {
                routes.push(Route {
                    host: HostPattern::parse(h),
                    prefix: prefix.clone(),
                    app: app.clone(),
                });
            }
            all.push(app);
        }
        routes.sort_by(|a, b| {
            b.host
                .rank()
                .cmp(&a.host.rank())
                .then(b.prefix.len().cmp(&a.prefix.len()))
        });
        let default = default.and_then(|name| all.iter().find(|a| a.name == name).cloned());
        Router {
            routes,
            default,
            apps: all,
        }
    }

    /// The app for a request to `host` (the Host header or URI authority, port and
    /// case ignored) and `path`.
    pub fn route(&self, host: &str, path: &str) -> Option<&Arc<App>> {
        let host = strip_port(host).trim_end_matches('.');
        self.routes
            .iter()
            .find(|r| r.host.matches(host) && prefix_matches(&r.prefix, path))
            .map(|r| &r.app)
            .or(self.default.as_ref())
    }

    /// Every app, in configuration order.
    pub fn apps(&self) -> &[Arc<App>] {
        &self.apps
    }
}

/// `host:port` or `[v6]:port` without the port.
fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// `/api` matches `/api` and `/api/...`, not `/apiary`; the empty prefix matches all.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    path.starts_with(prefix)
        && (path.len() == prefix.len() || path.as_bytes().get(prefix.len()) == Some(&b'/'))
}

#[cfg(test)]
mod tests {
    use pingora::upstreams::peer::Peer;

    use super::*;

    #[test]
    fn hosts_and_prefixes() {
        assert_eq!(strip_port("a.example:8080"), "a.example");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("a.example"), "a.example");
        assert!(prefix_matches("", "/x"));
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/v1"));
        assert!(!prefix_matches("/api", "/apiary"));
        let w = HostPattern::parse("*.Shop.example");
        assert!(w.matches("a.shop.example"));
        assert!(!w.matches("shop.example"));
        assert!(HostPattern::parse("shop.example").matches("SHOP.example"));
    }

    fn placed(windows: &ReuseWindows, after_ms: u64) -> HttpPeer {
        let mut peer = HttpPeer::new(("127.0.0.1", 8080), false, String::new());
        windows.apply(&mut peer, windows.start + Duration::from_millis(after_ms));
        peer
    }

    #[test]
    fn reuse_windows() {
        let w = ReuseWindows::new(Duration::from_secs(60));
        let (early, late) = (placed(&w, 1_000), placed(&w, 52_000));
        // One window, one pool: a connection returned early is taken again late.
        assert_eq!(early.reuse_hash(), late.reuse_hash());
        assert_eq!(early.options.idle_timeout, None);
        // In the window's last eighth, what goes back to the pool gets a timer.
        let last = placed(&w, 53_000);
        assert_eq!(last.reuse_hash(), early.reuse_hash());
        assert_eq!(
            last.options.idle_timeout,
            Some(Duration::from_millis(7_500))
        );
        // The next window is another pool.
        let next = placed(&w, 60_000);
        assert_ne!(next.reuse_hash(), early.reuse_hash());
        assert_eq!(next.options.idle_timeout, None);
        // Another app's windows are apart from these.
        let other = ReuseWindows {
            salt: w.salt ^ 1,
            ..w
        };
        assert_ne!(placed(&other, 1_000).reuse_hash(), early.reuse_hash());

        // No timeout: one pool for ever, no timer.
        let never = ReuseWindows::new(Duration::ZERO);
        let (first, much_later) = (placed(&never, 0), placed(&never, 86_400_000));
        assert_eq!(first.reuse_hash(), much_later.reuse_hash());
        assert_eq!(much_later.options.idle_timeout, None);
    }
}
