//! Several apps behind one proxy: routing by Host and path prefix, unknown hosts,
//! round-robin pools with failover and active health checks, mitigations scoped per app,
//! and a configuration reload through the handle while requests are in flight.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use esper_protocol::{Action, Mitigation, Origin, Reason, Scope};
use esper_proxy::{AppConfig, Config};
use support::{
    config, dead_url, eventually, get_host, ingestion, mitigations, named_upstream,
    named_upstream_on, start_proxy,
};

fn app(name: &str, hosts: &[&str], prefix: &str, upstreams: &[std::net::SocketAddr]) -> AppConfig {
    AppConfig {
        name: name.into(),
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
        path_prefix: prefix.into(),
        upstreams: upstreams.iter().map(|a| a.to_string()).collect(),
        health_check_interval: Duration::from_millis(100),
        ..AppConfig::default()
    }
}

/// A test config with `apps` instead of a single upstream.
fn multi(apps: Vec<AppConfig>, ingestion_url: &str, mitigation_url: &str) -> Config {
    let mut cfg = config(
        "127.0.0.1:9".parse().expect("an address"),
        ingestion_url,
        mitigation_url,
    );
    cfg.upstream = String::new();
    cfg.apps = apps;
    cfg
}

#[tokio::test]
async fn requests_go_to_the_app_of_their_host_and_path() {
    let (shop, api, blog) = (
        named_upstream("shop").await,
        named_upstream("api").await,
        named_upstream("blog").await,
    );
    let cfg = multi(
        vec![
            app("shop", &["shop.example"], "/", &[shop.addr]),
            app("api", &["shop.example"], "/api", &[api.addr]),
            app("blog", &["*.blog.example"], "/", &[blog.addr]),
        ],
        &dead_url(),
        &dead_url(),
    );
    let proxy = start_proxy(cfg).await;
    let url = |p: &str| format!("{}{p}", proxy.url);
    assert_eq!(
        get_host(&url("/"), "shop.example").await,
        (200, "shop /".into())
    );
    assert_eq!(get_host(&url("/"), "SHOP.example:80").await.1, "shop /");
    assert_eq!(get_host(&url("/api"), "shop.example").await.1, "api /api");
    assert_eq!(
        get_host(&url("/api/v1"), "shop.example").await.1,
        "api /api/v1"
    );
    assert_eq!(
        get_host(&url("/apiary"), "shop.example").await.1,
        "shop /apiary"
    );
    assert_eq!(get_host(&url("/x"), "en.blog.example").await.1, "blog /x");
    // No app for the host: 421 with a JSON body for API clients.
    let resp = reqwest::Client::new()
        .get(url("/"))
        .header("host", "blog.example")
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 421);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "unknown_host");
    assert!(!body["request_id"].as_str().unwrap().is_empty());
    let (status, page) = get_host(&url("/"), "nobody.example").await;
    assert_eq!(status, 421);
    assert!(page.contains("421 Misdirected Request"), "{page}");
    // Routed by the path the upstream will resolve, dot segments and all (sent raw:
    // HTTP clients resolve them before sending).
    for (path, routed) in [
        ("/api/../admin", "shop /api/../admin"),
        ("/x/%2e%2e/api/v1", "api /x/%2e%2e/api/v1"),
        ("//api", "api //api"),
    ] {
        let answer = raw_request(proxy.handle().traffic_addr(), path, "shop.example").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer}");
        assert!(answer.ends_with(routed), "{path}: {answer}");
    }
    assert_eq!(shop.hits() + api.hits() + blog.hits(), 9);
    proxy.stop().await.unwrap();
}

/// A raw GET of `path` with `host`, and the whole answer.
async fn raw_request(proxy: std::net::SocketAddr, path: &str, host: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    support::exchange(proxy, &request).await
}

#[tokio::test]
async fn requests_without_a_host_or_a_path_are_refused_with_a_400() {
    let shop = named_upstream("shop").await;
    // One app for every host (a sidecar's): nothing would otherwise stop these.
    let cfg = multi(
        vec![app("shop", &[], "/", &[shop.addr])],
        &dead_url(),
        &dead_url(),
    );
    let proxy = start_proxy(cfg).await;
    let addr = proxy.handle().traffic_addr();
    for (request, why) in [
        ("GET / HTTP/1.1\r\n", "no Host header"),
        ("GET / HTTP/1.1\r\nHost: a b\r\n", "not a host name"),
        ("GET admin HTTP/1.1\r\nHost: shop.example\r\n", "not a path"),
        ("GET * HTTP/1.1\r\nHost: shop.example\r\n", "not a path"),
    ] {
        let answer = support::exchange(
            addr,
            &format!("{request}Accept: application/json\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{request:?}: {answer}");
        assert!(answer.contains("\"bad_request\""), "{request:?}: {answer}");
        assert!(answer.contains(why), "{request:?}: {answer}");
    }
    assert_eq!(shop.hits(), 0, "none reached the app");
    for request in [
        "OPTIONS * HTTP/1.1\r\nHost: shop.example\r\n",
        // HTTP/1.0 needs no Host; an empty one is allowed too.
        "GET /old HTTP/1.0\r\n",
        "GET /empty HTTP/1.1\r\nHost:\r\n",
        "GET /v6 HTTP/1.1\r\nHost: [2001:db8::1]:8080\r\n",
        "GET http://shop.example/abs HTTP/1.1\r\nHost: shop.example\r\n",
    ] {
        let answer = support::exchange(addr, &format!("{request}Connection: close\r\n\r\n")).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{request:?}: {answer}");
    }
    assert_eq!(shop.hits(), 5);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_turn() {
    let shop = named_upstream("shop").await;
    let cfg = multi(
        vec![app("shop", &["shop.example"], "/", &[shop.addr])],
        &dead_url(),
        &dead_url(),
    );
    let proxy = start_proxy(cfg).await;
    // Three requests in one write: proxied, for no app (answered here), proxied again.
    let answer = support::exchange(
        proxy.handle().traffic_addr(),
        "GET /one HTTP/1.1\r\nHost: shop.example\r\n\r\n\
         GET / HTTP/1.1\r\nHost: other.example\r\n\r\n\
         GET /three HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    let statuses: Vec<&str> = answer
        .match_indices("HTTP/1.1 ")
        .map(|(at, _)| &answer[at + 9..at + 12])
        .collect();
    assert_eq!(statuses, ["200", "421", "200"], "{answer}");
    let one = answer.find("shop /one").expect("the first answer");
    let three = answer.find("shop /three").expect("the third answer");
    assert!(one < three, "{answer}");
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_dead_upstream_is_skipped_and_checked_out_of_the_pool() {
    let mut a = named_upstream("a").await;
    let b = named_upstream("b").await;
    let cfg = multi(
        vec![app("web", &[], "/", &[a.addr, b.addr])],
        &dead_url(),
        &dead_url(),
    );
    let proxy = start_proxy(cfg).await;
    let url = format!("{}/", proxy.url);
    for _ in 0..4 {
        assert_eq!(get_host(&url, "any").await.0, 200);
    }
    assert_eq!((a.hits(), b.hits()), (2, 2), "round robin");
    a.kill().await;
    // Right away a failed connect is retried on the other upstream; once the health
    // check has marked `a` down, it is not even tried.
    for _ in 0..4 {
        assert_eq!(get_host(&url, "any").await, (200, "b /".into()));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    for _ in 0..10 {
        assert_eq!(get_host(&url, "any").await, (200, "b /".into()));
    }
    assert_eq!(b.hits(), 16);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_request_tries_at_most_four_upstreams() {
    // Six upstreams that refuse connections.
    let closed: Vec<std::net::SocketAddr> = (0..6).map(|_| support::refusing_addr()).collect();
    let mut web = app("web", &[], "/", &closed);
    web.health_check = "none".into();
    let proxy = start_proxy(multi(vec![web], &dead_url(), &dead_url())).await;
    let (status, _) = get_host(&format!("{}/", proxy.url), "any").await;
    assert_eq!(status, 502);
    let tried = proxy
        .metric(r#"esper_proxy_upstream_connect_errors_total{app="web"}"#)
        .await;
    assert_eq!(tried, 4.0, "the first upstream and three more");
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn an_http_health_check_takes_a_failing_upstream_out_and_back() {
    let (a, b) = (named_upstream("a").await, named_upstream("b").await);
    let mut web = app("web", &[], "/", &[a.addr, b.addr]);
    web.health_check = "/healthz".into();
    let proxy = start_proxy(multi(vec![web], &dead_url(), &dead_url())).await;
    let url = format!("{}/", proxy.url);
    a.healthy.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let before = a.hits();
    for _ in 0..6 {
        assert_eq!(get_host(&url, "any").await, (200, "b /".into()));
    }
    assert_eq!(a.hits(), before, "an unhealthy upstream gets no traffic");
    let healthy = |up: &support::NamedUpstream| {
        format!(
            r#"esper_proxy_upstream_healthy{{app="web",upstream="{}"}}"#,
            up.addr
        )
    };
    assert_eq!(proxy.metric(&healthy(&a)).await, 0.0);
    assert_eq!(proxy.metric(&healthy(&b)).await, 1.0);
    a.healthy.store(true, Ordering::SeqCst);
    let back = eventually(Duration::from_secs(3), || async {
        get_host(&url, "any").await.1 == "a /"
    })
    .await;
    assert!(back, "a healthy upstream comes back");
    assert_eq!(proxy.metric(&healthy(&a)).await, 1.0);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn mitigations_scoped_to_an_app_apply_to_that_app_only() {
    let (shop, api) = (named_upstream("shop").await, named_upstream("api").await);
    let broker = mitigations().await;
    let events = ingestion().await;
    let mut api_app = app("api", &["api.example"], "/", &[api.addr]);
    api_app.sample_rate = Some(0.5);
    let cfg = multi(
        vec![app("shop", &["shop.example"], "/", &[shop.addr]), api_app],
        &events.url,
        &broker.url,
    );
    let proxy = start_proxy(cfg).await;
    let mut m = Mitigation::new(
        "ip:127.0.0.1".parse().unwrap(),
        Action::Block,
        Duration::from_secs(600),
        Origin::Manual,
        Reason::default(),
    );
    m.scope = Scope::App("shop".into());
    broker.publish_one(m).await;
    let url = format!("{}/", proxy.url);
    let blocked = eventually(Duration::from_secs(3), || async {
        get_host(&url, "shop.example").await.0 == 403
    })
    .await;
    assert!(blocked, "the shop app enforces its mitigation");
    // Half are reported: with 24, one at least (all but certainly).
    for _ in 0..24 {
        assert_eq!(get_host(&url, "api.example").await.0, 200);
    }
    // Events name their app, and carry their app's sampling weight. The shop's may
    // arrive in batches of their own before any of the api's.
    let seen = events
        .claim_until(Duration::from_secs(5), |seen| {
            ["shop", "api"]
                .iter()
                .all(|app| seen.iter().any(|e| e.app == *app))
        })
        .await;
    let shop_ev = seen.iter().find(|e| e.app == "shop").expect("a shop event");
    assert_eq!(shop_ev.status, 403);
    assert_eq!(shop_ev.weight, 1.0);
    let api_ev = seen.iter().find(|e| e.app == "api").expect("an api event");
    assert_eq!(api_ev.weight, 2.0);
    assert_eq!(api_ev.host, "api.example");
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn reload_swaps_apps_without_dropping_requests() {
    let (one, two) = (named_upstream("one").await, named_upstream("two").await);
    let cfg = multi(
        vec![app("one", &["one.example"], "/", &[one.addr])],
        &dead_url(),
        &dead_url(),
    );
    let proxy = start_proxy(cfg.clone()).await;
    let url = format!("{}/", proxy.url);
    assert_eq!(get_host(&url, "two.example").await.0, 421);
    // A slow request is in flight while the configuration changes under it.
    let slow = tokio::spawn(get_host_owned(format!("{}/slow", proxy.url), "one.example"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut next = cfg.clone();
    next.apps
        .push(app("two", &["two.example"], "/", &[two.addr]));
    next.default_app = Some("one".into());
    proxy.handle().reload(next).await.unwrap();
    assert_eq!(get_host(&url, "two.example").await, (200, "two /".into()));
    assert_eq!(get_host(&url, "other.example").await, (200, "one /".into()));
    assert_eq!(slow.await.unwrap(), (200, "one /slow".into()));
    // An invalid configuration is refused and changes nothing.
    let mut bad = cfg.clone();
    bad.apps[0].upstreams = vec!["nohost".into()];
    let err = proxy.handle().reload(bad).await.unwrap_err();
    assert!(err.to_string().contains("apps[0].upstreams"), "{err}");
    assert_eq!(get_host(&url, "two.example").await.0, 200);
    proxy.stop().await.unwrap();
}

async fn get_host_owned(url: String, host: &'static str) -> (u16, String) {
    get_host(&url, host).await
}

#[test]
fn app_options_are_validated() {
    let base = multi(
        vec![app("a", &[], "/", &["127.0.0.1:1".parse().unwrap()])],
        "http://x",
        "http://y",
    );
    base.validate().unwrap();
    let mut c = base.clone();
    c.upstream = "127.0.0.1:2".into();
    assert!(c.validate().unwrap_err().to_string().contains("upstream"));
    let mut c = base.clone();
    c.apps.push(c.apps[0].clone());
    assert!(c.validate().unwrap_err().to_string().contains("used twice"));
    let mut c = base.clone();
    c.apps[0].health_check = "udp".into();
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("apps[0].health_check")
    );
    let mut c = base.clone();
    c.default_app = Some("zzz".into());
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("default_app")
    );
    let mut c = base;
    c.apps[0].hosts = vec!["bad host".into()];
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("apps[0].hosts")
    );
}

#[tokio::test]
async fn each_app_answers_with_its_own_templates() {
    let dir = std::env::temp_dir().join(format!("esper-app-templates-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("block.html"),
        "<h1>Shop says no</h1><p>{{request_id}}</p>",
    )
    .unwrap();
    let (shop, blog) = (named_upstream("shop").await, named_upstream("blog").await);
    let broker = mitigations().await;
    let mut shop_app = app("shop", &["shop.example"], "/", &[shop.addr]);
    shop_app.templates_dir = Some(dir.clone());
    let cfg = multi(
        vec![shop_app, app("blog", &["blog.example"], "/", &[blog.addr])],
        &dead_url(),
        &broker.url,
    );
    let proxy = start_proxy(cfg).await;
    broker
        .publish("ip:127.0.0.1", Action::Block, Duration::from_secs(600))
        .await;
    let url = format!("{}/", proxy.url);
    let blocked = eventually(Duration::from_secs(2), || async {
        get_host(&url, "blog.example").await.0 == 403
    })
    .await;
    assert!(blocked);
    let page = |host: &'static str, id: &'static str| {
        let url = url.clone();
        async move {
            reqwest::Client::new()
                .get(url)
                .header("host", host)
                .header("x-request-id", id)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    assert_eq!(
        page("shop.example", "req-1").await,
        "<h1>Shop says no</h1><p>req-1</p>"
    );
    let built_in = page("blog.example", "req-2").await;
    assert!(
        !built_in.contains("Shop says no") && built_in.contains("req-2"),
        "{built_in}"
    );
    proxy.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Lines of /etc/hosts naming a test host, taken out again on drop. Written so that
/// other tests reading the file at the same time never see it half-written: one append,
/// single-byte changes, truncations.
struct HostsEntry {
    file: std::fs::File,
    /// Held while the lines are in the file, so that test runs editing it (two
    /// checkouts, or a local run beside CI) take turns: each truncates the file back to
    /// the length it found, which would cut another's lines.
    _turn: std::fs::File,
    original_len: u64,
    /// Length of each line (`127.0.0.N name\n`).
    line_len: u64,
}

impl HostsEntry {
    const PATH: &'static str = "/etc/hosts";

    /// A line `127.0.0.{last} name` for each of `lasts`; `None` when /etc/hosts cannot
    /// be written.
    fn add(name: &str, lasts: &[u8]) -> Option<HostsEntry> {
        use std::io::Write;
        assert!(lasts.iter().all(|last| (1..=9).contains(last)));
        let turn = std::fs::File::create(std::env::temp_dir().join("esper-etc-hosts.lock")).ok()?;
        turn.lock().ok()?;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(Self::PATH)
            .ok()?;
        let original_len = file.metadata().ok()?.len();
        // Starting on a fresh line whatever the file ends with.
        let lines: String = lasts
            .iter()
            .map(|last| format!("127.0.0.{last} {name}\n"))
            .collect();
        file.write_all(format!("\n{lines}").as_bytes()).ok()?;
        Some(HostsEntry {
            file,
            _turn: turn,
            original_len,
            line_len: format!("127.0.0.1 {name}\n").len() as u64,
        })
    }

    /// Points line `line` (from 0) at 127.0.0.{last}.
    fn point_to(&self, line: u64, last: u8) {
        use std::os::unix::fs::FileExt;
        assert!((1..=9).contains(&last));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(Self::PATH)
            .unwrap();
        let digit_at = self.original_len + 1 + line * self.line_len + "127.0.0.".len() as u64;
        file.write_all_at(&[b'0' + last], digit_at).unwrap();
    }

    /// Keeps only the first `lines` lines.
    fn keep(&self, lines: u64) {
        self.file
            .set_len(self.original_len + 1 + lines * self.line_len)
            .unwrap();
    }
}

impl Drop for HostsEntry {
    fn drop(&mut self) {
        // Before the turn is passed on (the field is dropped after this).
        let _ = self.file.set_len(self.original_len);
    }
}

/// Lines in /etc/hosts for `name`, or `None` (the test is skipped) where the file
/// cannot be written and skipping was asked for.
fn hosts_entry(name: &str, lasts: &[u8]) -> Option<HostsEntry> {
    let entry = HostsEntry::add(name, lasts);
    if entry.is_none() {
        // Root (as in CI) can write the hosts file; elsewhere skipping must be asked for.
        assert!(
            std::env::var_os("ESPER_SKIP_HOSTS_FILE").is_some(),
            "/etc/hosts is not writable (run as root), and ESPER_SKIP_HOSTS_FILE is not set"
        );
        eprintln!("SKIPPED: /etc/hosts is not writable and ESPER_SKIP_HOSTS_FILE is set");
    }
    entry
}

#[tokio::test]
async fn an_upstream_name_is_followed_as_it_moves_and_scales() {
    let name = format!("esper-upstream-{}.test", std::process::id());
    // Two lines for the name, both at first on one address.
    let Some(hosts) = hosts_entry(&name, &[2, 2]) else {
        return;
    };
    // Two instances on one port of two loopback addresses: the name decides which answer.
    let a = named_upstream_on("a", "127.0.0.2:0".parse().unwrap()).await;
    let b = named_upstream_on("b", format!("127.0.0.3:{}", a.addr.port()).parse().unwrap()).await;
    let mut cfg = config(a.addr, &dead_url(), &dead_url());
    cfg.upstream = format!("{name}:{}", a.addr.port());
    cfg.upstream_resolve_interval = Duration::from_millis(200);
    let proxy = start_proxy(cfg).await;
    let url = format!("{}/", proxy.url);
    // Only `answer` answers, six requests in a row, and the other counts no hit.
    let only = |answer: &'static str, other: &support::NamedUpstream| {
        let url = url.clone();
        let other = other.hits.clone();
        async move {
            let before = other.load(Ordering::SeqCst);
            for _ in 0..6 {
                if get_host(&url, "test").await.1 != answer {
                    return false;
                }
            }
            other.load(Ordering::SeqCst) == before
        }
    };
    assert_eq!(get_host(&url, "test").await.1, "a /");

    // Moved: the name now names the other address only.
    hosts.point_to(0, 3);
    hosts.point_to(1, 3);
    let moved = eventually(Duration::from_secs(5), || only("b /", &a)).await;
    assert!(moved, "the proxy follows the name to its new address");

    // Scaled out: both addresses, both instances serve, turn about.
    hosts.point_to(0, 2);
    let back = eventually(Duration::from_secs(5), || async {
        get_host(&url, "test").await.1 == "a /"
    })
    .await;
    assert!(back, "the first address is used again");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        seen.insert(get_host(&url, "test").await.1);
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["a /", "b /"],
        "every address of the name is a backend"
    );

    // Scaled in to the first line's instance: the address gone is no longer used.
    hosts.keep(1);
    let settled = eventually(Duration::from_secs(5), || only("a /", &b)).await;
    assert!(settled, "the address gone from the name is no longer used");
    proxy.stop().await.unwrap();
    drop(hosts);
}

#[tokio::test]
async fn a_name_that_moves_rebuilds_its_app_only() {
    let name = format!("esper-moving-{}.test", std::process::id());
    let Some(hosts) = hosts_entry(&name, &[6]) else {
        return;
    };
    let a = named_upstream_on("a", "127.0.0.6:0".parse().unwrap()).await;
    let _b = named_upstream_on("b", format!("127.0.0.7:{}", a.addr.port()).parse().unwrap()).await;
    let mut web = app("web", &["web.example"], "/", &[]);
    web.upstreams = vec![format!("{name}:{}", a.addr.port())];
    // Another app, whose health check runs once an hour: its first check finds `down`
    // failing, and the pool keeps it out until the next check, though it recovers.
    let (up, down) = (named_upstream("up").await, named_upstream("down").await);
    down.healthy.store(false, Ordering::SeqCst);
    let mut other = app("other", &["other.example"], "/", &[up.addr, down.addr]);
    other.health_check = "/healthz".into();
    other.health_check_interval = Duration::from_secs(3600);
    let mut cfg = multi(vec![web, other], &dead_url(), &dead_url());
    cfg.upstream_resolve_interval = Duration::from_millis(200);
    let proxy = start_proxy(cfg).await;
    let url = format!("{}/", proxy.url);
    let checked = eventually(Duration::from_secs(3), || async {
        let before = down.hits();
        for _ in 0..4 {
            get_host(&url, "other.example").await;
        }
        down.hits() == before
    })
    .await;
    assert!(checked, "the first check took `down` out");
    down.healthy.store(true, Ordering::SeqCst);
    assert_eq!(get_host(&url, "web.example").await.1, "a /");

    hosts.point_to(0, 7);
    let moved = eventually(Duration::from_secs(5), || async {
        get_host(&url, "web.example").await.1 == "b /"
    })
    .await;
    assert!(moved, "web follows its name");
    // Rebuilt, `other` would check again at once and take `down` back in.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = down.hits();
    for _ in 0..6 {
        assert_eq!(get_host(&url, "other.example").await, (200, "up /".into()));
    }
    assert_eq!(down.hits(), before, "the other app kept its pool as it was");
    proxy.stop().await.unwrap();
    drop(hosts);
}

/// Sends `n` requests for `host`; `true` when `kept_out` served none of them.
async fn none_reach(
    url: &str,
    host: &'static str,
    kept_out: &support::NamedUpstream,
    n: usize,
) -> bool {
    let before = kept_out.hits();
    for _ in 0..n {
        assert_eq!(get_host(url, host).await.0, 200);
    }
    kept_out.hits() == before
}

#[tokio::test]
async fn a_reload_keeps_what_the_health_checks_found() {
    let (up, down) = (named_upstream("up").await, named_upstream("down").await);
    down.healthy.store(false, Ordering::SeqCst);
    // Checks once an hour: only the first, at start, can take `down` out, and a check
    // after that would take it back in (it recovers below).
    let mut web = app("web", &[], "/", &[up.addr, down.addr]);
    web.health_check = "/healthz".into();
    web.health_check_interval = Duration::from_secs(3600);
    let cfg = multi(vec![web], &dead_url(), &dead_url());
    let proxy = start_proxy(cfg.clone()).await;
    let url = format!("{}/", proxy.url);
    let checked = eventually(Duration::from_secs(3), || none_reach(&url, "any", &down, 4)).await;
    assert!(checked, "the first check took `down` out");
    down.healthy.store(true, Ordering::SeqCst);

    // The app is rebuilt (its sampling changed), with the same upstreams and checks.
    let mut next = cfg.clone();
    next.apps[0].sample_rate = Some(0.5);
    proxy.handle().reload(next.clone()).await.unwrap();
    assert!(
        none_reach(&url, "any", &down, 6).await,
        "the rebuilt pool keeps `down` out, as the checks found it"
    );
    let series = format!(
        r#"esper_proxy_upstream_healthy{{app="web",upstream="{}"}}"#,
        down.addr
    );
    let up_series = series.replace(&down.addr.to_string(), &up.addr.to_string());
    assert_eq!(proxy.metric(&up_series).await, 1.0);
    assert_eq!(proxy.metric(&series).await, 0.0, "and says so");

    // Other checks are other checks: a new path is probed at once, and finds `down` up.
    next.apps[0].health_check = "/healthz?v=2".into();
    proxy.handle().reload(next).await.unwrap();
    let back = eventually(Duration::from_secs(3), || async {
        get_host(&url, "any").await.1 == "down /"
    })
    .await;
    assert!(back, "new checks start from scratch");
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_name_whose_answers_change_keeps_the_health_of_the_addresses_that_stay() {
    let name = format!("esper-health-{}.test", std::process::id());
    let Some(hosts) = hosts_entry(&name, &[4, 5, 8]) else {
        return;
    };
    let a = named_upstream_on("a", "127.0.0.4:0".parse().unwrap()).await;
    let port = a.addr.port();
    let b = named_upstream_on("b", format!("127.0.0.5:{port}").parse().unwrap()).await;
    let _c = named_upstream_on("c", format!("127.0.0.8:{port}").parse().unwrap()).await;
    let d = named_upstream_on("d", format!("127.0.0.9:{port}").parse().unwrap()).await;
    b.healthy.store(false, Ordering::SeqCst);
    d.healthy.store(false, Ordering::SeqCst);
    let mut web = app("web", &[], "/", &[]);
    web.upstreams = vec![format!("{name}:{port}")];
    web.health_check = "/healthz".into();
    web.health_check_interval = Duration::from_secs(3600);
    let mut cfg = multi(vec![web], &dead_url(), &dead_url());
    cfg.upstream_resolve_interval = Duration::from_millis(200);
    let proxy = start_proxy(cfg).await;
    let url = format!("{}/", proxy.url);
    let checked = eventually(Duration::from_secs(3), || none_reach(&url, "any", &b, 6)).await;
    assert!(checked, "the first check took `b` out");
    b.healthy.store(true, Ordering::SeqCst);

    // The name drops `c`: the app is rebuilt on `a` and `b`, and `b` stays out.
    hosts.keep(2);
    let rebuilt = eventually(Duration::from_secs(5), || async {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..6 {
            seen.insert(get_host(&url, "any").await.1);
        }
        seen.into_iter().collect::<Vec<_>>() == ["a /"]
    })
    .await;
    assert!(rebuilt, "only `a` serves once `c` is gone from the name");
    assert!(none_reach(&url, "any", &b, 6).await, "`b` is still out");

    // An address the name gains is checked at once, not an hour later.
    hosts.point_to(0, 9);
    let d_out = eventually(Duration::from_secs(5), || async {
        get_host(&url, "any").await.1 != "a /" && none_reach(&url, "any", &d, 6).await
    })
    .await;
    assert!(d_out, "the new address `d` was checked and kept out");
    proxy.stop().await.unwrap();
    drop(hosts);
}
