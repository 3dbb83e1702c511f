//! Challenge mitigations end to end: the JSON form for API clients, a solution posted
//! over HTTP, the clearance cookie and what it is bound to, replays and forgeries, the
//! no-JavaScript fallback, IPv6 /64 binding and expiry through a balancer, difficulty
//! binding, other mitigations behind a cleared challenge, and a real headless Chromium
//! solving the puzzle.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use esper_protocol::Action;
use sha2::{Digest, Sha256};
use support::{
    CONTROL_TOKEN, TestProxy, client_from, config, control_plane, dead_url, eventually,
    mitigations, start_proxy, upstream,
};

const TTL: Duration = Duration::from_secs(600);
const SECRET: &str = "a shared secret of enough bytes";
const UA: &str = "challenge-tests/1";

/// A nonce such that sha256(token:nonce) has `bits` leading zero bits.
fn solve(token: &str, bits: u32) -> String {
    (0u64..)
        .find(|n| {
            let d = Sha256::digest(format!("{token}:{n}").as_bytes());
            let mut zeros = 0;
            for b in d {
                if b == 0 {
                    zeros += 8;
                } else {
                    zeros += b.leading_zeros();
                    break;
                }
            }
            zeros >= bits
        })
        .map(|n| n.to_string())
        .expect("a nonce exists")
}

async fn challenged_proxy(
    entity: &str,
    difficulty: u8,
) -> (TestProxy, support::Upstream, support::Mitigations) {
    let up = upstream().await;
    let broker = mitigations().await;
    let mut cfg = config(up.addr, &dead_url(), &broker.url);
    cfg.challenge_secret = Some(SECRET.into());
    cfg.challenge_fallback_delay = Duration::from_secs(1);
    let proxy = start_proxy(cfg).await;
    broker
        .publish(entity, Action::Challenge { difficulty }, TTL)
        .await;
    (proxy, up, broker)
}

/// The JSON challenge a client from `ip` gets, once the mitigation has arrived.
async fn json_challenge(proxy: &TestProxy, ip: &str) -> serde_json::Value {
    let client = client_from(ip);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let resp = client
            .get(format!("{}/", proxy.url))
            .header("accept", "application/json")
            .header("user-agent", UA)
            .send()
            .await
            .unwrap();
        if resp.status() == 403 {
            return resp.json().await.unwrap();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the challenge mitigation arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Posts a solution from `ip` and returns the clearance cookie (`name=value`).
async fn post_solution(proxy: &TestProxy, ip: &str, token: &str, nonce: &str) -> reqwest::Response {
    client_from(ip)
        .post(format!("{}/.esper/challenge", proxy.url))
        .header("accept", "application/json")
        .header("user-agent", UA)
        .form(&[("token", token), ("nonce", nonce)])
        .send()
        .await
        .unwrap()
}

fn cookie_of(resp: &reqwest::Response) -> String {
    let set = resp.headers()["set-cookie"].to_str().unwrap();
    assert!(
        set.contains("HttpOnly") && set.contains("Max-Age=3600"),
        "{set}"
    );
    set.split(';').next().unwrap().to_string()
}

/// A clearance cookie (`name=value`) earned by a client from `ip` solving its challenge
/// of `bits`.
async fn earn_cookie(proxy: &TestProxy, ip: &str, bits: u32) -> String {
    let body = json_challenge(proxy, ip).await;
    let token = body["challenge"]["token"].as_str().unwrap();
    cookie_of(&post_solution(proxy, ip, token, &solve(token, bits)).await)
}

async fn get_with(proxy: &TestProxy, ip: &str, cookie: &str, ua: &str) -> u16 {
    client_from(ip)
        .get(format!("{}/", proxy.url))
        .header("cookie", cookie)
        .header("user-agent", ua)
        .header("accept", "application/json")
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn api_clients_get_json_and_a_solution_earns_a_bound_cookie() {
    let (proxy, up, _broker) = challenged_proxy("cidr:127.0.0.0/24", 8).await;
    let body = json_challenge(&proxy, "127.0.0.50").await;
    assert_eq!(body["error"], "challenge_required");
    assert!(body["request_id"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(body["challenge"]["difficulty"], 8);
    assert_eq!(body["challenge"]["submit"], "/.esper/challenge");
    let token = body["challenge"]["token"].as_str().unwrap().to_string();
    let seen_before = up.seen.lock().len();

    // A wrong nonce earns nothing.
    let wrong = post_solution(&proxy, "127.0.0.50", &token, "x").await;
    assert_eq!(wrong.status(), 403);
    let nonce = solve(&token, 8);
    let ok = post_solution(&proxy, "127.0.0.50", &token, &nonce).await;
    assert_eq!(ok.status(), 200);
    let cookie = cookie_of(&ok);
    let cleared: serde_json::Value = ok.json().await.unwrap();
    assert_eq!(cleared["cleared"], true);

    // The cookie lets this client through, and only this client with this browser.
    assert_eq!(get_with(&proxy, "127.0.0.50", &cookie, UA).await, 200);
    assert_eq!(up.seen.lock().len(), seen_before + 1);
    assert_eq!(get_with(&proxy, "127.0.0.51", &cookie, UA).await, 403);
    assert_eq!(
        get_with(&proxy, "127.0.0.50", &cookie, "other-agent/2").await,
        403
    );
    // A forged cookie (expiry pushed out) is refused.
    let (name, value) = cookie.split_once('=').unwrap();
    let (exp, rest) = value.split_once('.').unwrap();
    let forged = format!("{name}={}.{rest}", exp.parse::<u64>().unwrap() + 86_400);
    assert_eq!(get_with(&proxy, "127.0.0.50", &forged, UA).await, 403);
    // The same solution cannot be redeemed twice.
    let replay = post_solution(&proxy, "127.0.0.50", &token, &nonce).await;
    assert_eq!(replay.status(), 403);
    let replay: serde_json::Value = replay.json().await.unwrap();
    assert_eq!(replay["error"], "challenge_failed");
    // A form larger than any browser posts is refused the same way, with a new puzzle.
    let body = json_challenge(&proxy, "127.0.0.50").await;
    let token = body["challenge"]["token"].as_str().unwrap();
    let padding = "x".repeat(8192);
    let big = client_from("127.0.0.50")
        .post(format!("{}/.esper/challenge", proxy.url))
        .header("accept", "application/json")
        .header("user-agent", UA)
        .form(&[
            ("token", token),
            ("nonce", &solve(token, 8)),
            ("pad", &padding),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 403);
    let big: serde_json::Value = big.json().await.unwrap();
    assert_eq!(big["error"], "challenge_failed");
    assert!(
        big["challenge"]["token"]
            .as_str()
            .is_some_and(|t| t != token)
    );
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_host_served_only_under_a_path_prefix_takes_its_puzzles_answers() {
    let up = upstream().await;
    let broker = mitigations().await;
    let mut cfg = config(up.addr, &dead_url(), &broker.url);
    cfg.upstream = String::new();
    cfg.apps = vec![esper_proxy::AppConfig {
        name: "api".into(),
        path_prefix: "/api".into(),
        upstreams: vec![up.addr.to_string()],
        ..esper_proxy::AppConfig::default()
    }];
    cfg.challenge_secret = Some(SECRET.into());
    let proxy = start_proxy(cfg).await;
    broker
        .publish("ip:127.0.0.2", Action::Challenge { difficulty: 4 }, TTL)
        .await;
    let client = client_from("127.0.0.2");
    let api = format!("{}/api/items", proxy.url);
    let challenged = eventually(Duration::from_secs(2), || async {
        client
            .get(&api)
            .header("accept", "application/json")
            .header("user-agent", UA)
            .send()
            .await
            .is_ok_and(|r| r.status() == 403)
    })
    .await;
    assert!(challenged, "the challenge mitigation arrived");
    let body: serde_json::Value = client
        .get(&api)
        .header("accept", "application/json")
        .header("user-agent", UA)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = body["challenge"]["token"].as_str().unwrap();
    // `/.esper/challenge` is under no app's prefix; it is answered all the same.
    let solved = post_solution(&proxy, "127.0.0.2", token, &solve(token, 4)).await;
    assert_eq!(solved.status(), 200);
    let cookie = cookie_of(&solved);
    let resp = client
        .get(&api)
        .header("cookie", &cookie)
        .header("user-agent", UA)
        .send()
        .await
        .unwrap();
    // Past the challenge: the upstream's own answer (it serves no `/api/items`).
    assert_eq!(resp.status(), 404, "cleared through the prefixed app");
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_cookie_from_one_instance_is_honoured_by_another_with_the_key() {
    let (proxy, up, broker) = challenged_proxy("ip:127.0.0.52", 4).await;
    let mut cfg = config(up.addr, &dead_url(), &broker.url);
    cfg.challenge_secret = Some(SECRET.into());
    let second = start_proxy(cfg).await;
    let body = json_challenge(&proxy, "127.0.0.52").await;
    let token = body["challenge"]["token"].as_str().unwrap();
    let ok = post_solution(&proxy, "127.0.0.52", token, &solve(token, 4)).await;
    let cookie = cookie_of(&ok);
    json_challenge(&second, "127.0.0.52").await;
    assert_eq!(get_with(&second, "127.0.0.52", &cookie, UA).await, 200);
    // Several tabs: each solves its own puzzle, and every cookie earned stays valid.
    let other = json_challenge(&second, "127.0.0.52").await;
    let token2 = other["challenge"]["token"].as_str().unwrap();
    let ok2 = post_solution(&second, "127.0.0.52", token2, &solve(token2, 4)).await;
    let cookie2 = cookie_of(&ok2);
    assert_eq!(get_with(&proxy, "127.0.0.52", &cookie, UA).await, 200);
    assert_eq!(get_with(&proxy, "127.0.0.52", &cookie2, UA).await, 200);
    second.stop().await.unwrap();
    proxy.stop().await.unwrap();
}

/// A control plane, an upstream, a mitigation broker, and the configuration of a proxy
/// that follows the control plane (no `challenge_secret` of its own).
async fn with_control_plane() -> (
    support::ControlPlane,
    support::Upstream,
    support::Mitigations,
    esper_proxy::Config,
) {
    let control = control_plane().await;
    let up = upstream().await;
    let broker = mitigations().await;
    let mut cfg = config(up.addr, &dead_url(), &broker.url);
    cfg.control_url = Some(control.url.clone());
    cfg.control_token = Some(CONTROL_TOKEN.into());
    (control, up, broker, cfg)
}

#[tokio::test]
async fn without_a_secret_proxies_share_the_control_planes_key_and_a_reload_brings_a_new_one() {
    let (control, _up, broker, cfg) = with_control_plane().await;
    let (a, b) = (
        start_proxy(cfg.clone()).await,
        start_proxy(cfg.clone()).await,
    );
    broker
        .publish("ip:127.0.0.53", Action::Challenge { difficulty: 4 }, TTL)
        .await;
    json_challenge(&b, "127.0.0.53").await;
    // Each signs with a key of its own until the control plane's arrives.
    let shared = eventually(Duration::from_secs(5), || async {
        let from_a = earn_cookie(&a, "127.0.0.53", 4).await;
        get_with(&b, "127.0.0.53", &from_a, UA).await == 200
    })
    .await;
    assert!(
        shared,
        "a cookie earned through one proxy is honoured by the other"
    );
    let from_b = earn_cookie(&b, "127.0.0.53", 4).await;
    assert_eq!(get_with(&a, "127.0.0.53", &from_b, UA).await, 200);

    // A reload with a secret of its own: new cookies are signed with it, and those
    // signed with the control plane's key are still honoured.
    let mut own = cfg.clone();
    own.challenge_secret = Some(SECRET.into());
    assert_eq!(a.metric("esper_proxy_challenge_key_revision").await, 1.0);
    a.handle().reload(own.clone()).await.unwrap();
    assert_eq!(
        a.metric("esper_proxy_challenge_key_revision").await,
        0.0,
        "a key of its own signs"
    );
    let after = earn_cookie(&a, "127.0.0.53", 4).await;
    assert_eq!(
        get_with(&b, "127.0.0.53", &after, UA).await,
        403,
        "b has the old key"
    );
    assert_eq!(get_with(&a, "127.0.0.53", &from_b, UA).await, 200);
    let c = start_proxy(own).await;
    json_challenge(&c, "127.0.0.53").await;
    assert_eq!(
        get_with(&c, "127.0.0.53", &after, UA).await,
        200,
        "the new key signed it"
    );
    // The secret taken away again: the control plane's key signs once more.
    a.handle().reload(cfg.clone()).await.unwrap();
    assert_eq!(a.metric("esper_proxy_challenge_key_revision").await, 1.0);
    let back = earn_cookie(&a, "127.0.0.53", 4).await;
    assert_eq!(get_with(&b, "127.0.0.53", &back, UA).await, 200);
    for p in [a, b, c] {
        p.stop().await.unwrap();
    }
    control.stop().await;
}

/// Rotates the control plane's challenge key (`keep_previous` as asked).
async fn rotate(control: &support::ControlPlane, keep_previous: bool) {
    let resp = reqwest::Client::new()
        .post(format!(
            "{}/api/v1/proxies/challenge-key/rotate",
            control.url
        ))
        .bearer_auth(CONTROL_TOKEN)
        .json(&serde_json::json!({ "keep_previous": keep_previous }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn a_rotated_control_plane_key_signs_at_once_and_the_one_before_stays_honoured_unless_dropped()
 {
    let (control, _up, broker, mut cfg) = with_control_plane().await;
    // Long-polls far longer than the test waits: a rotation must wake them.
    cfg.stream_wait = Duration::from_secs(30);
    let ip = "127.0.0.54";
    let (a, b) = (
        start_proxy(cfg.clone()).await,
        start_proxy(cfg.clone()).await,
    );
    broker
        .publish(
            &format!("ip:{ip}"),
            Action::Challenge { difficulty: 4 },
            TTL,
        )
        .await;
    json_challenge(&b, ip).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let before = loop {
        let cookie = earn_cookie(&a, ip, 4).await;
        if get_with(&b, ip, &cookie, UA).await == 200 {
            break cookie;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "both sign with the control plane's key"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    rotate(&control, true).await;
    let rotated = std::time::Instant::now();
    // A proxy started after the rotation learns only the new key and the one before,
    // so a cookie it honours from a or b was signed with the new key.
    let c = start_proxy(cfg.clone()).await;
    json_challenge(&c, ip).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let after = loop {
        let from_b = earn_cookie(&b, ip, 4).await;
        let from_a = earn_cookie(&a, ip, 4).await;
        if get_with(&c, ip, &from_b, UA).await == 200 && get_with(&c, ip, &from_a, UA).await == 200
        {
            break from_a;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a and b sign with the rotated key"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        rotated.elapsed() < Duration::from_secs(10),
        "heard of at once, not at the end of a 30 s long-poll"
    );
    for p in [&a, &b, &c] {
        assert_eq!(
            get_with(p, ip, &before, UA).await,
            200,
            "a cookie signed with the key before stays honoured"
        );
        assert_eq!(get_with(p, ip, &after, UA).await, 200);
    }

    // After a leak: every cookie signed before is refused everywhere.
    rotate(&control, false).await;
    let dropped = eventually(Duration::from_secs(5), || {
        let (a, b, c, before, after) = (&a, &b, &c, &before, &after);
        async move {
            let mut refused = true;
            for p in [a, b, c] {
                refused &= get_with(p, ip, before, UA).await == 403;
                refused &= get_with(p, ip, after, UA).await == 403;
            }
            refused
        }
    })
    .await;
    assert!(dropped, "cookies signed with the keys before are refused");
    let fresh = earn_cookie(&a, ip, 4).await;
    for p in [&b, &c] {
        assert_eq!(get_with(p, ip, &fresh, UA).await, 200);
    }
    for p in [a, b, c] {
        p.stop().await.unwrap();
    }
    control.stop().await;
}

#[tokio::test]
async fn without_javascript_the_fallback_link_clears_after_its_wait() {
    // One bit above the base difficulty: the configured second, doubled.
    let (proxy, _up, _broker) = challenged_proxy("ip:127.0.0.53", 17).await;
    json_challenge(&proxy, "127.0.0.53").await;
    let client = reqwest::Client::builder()
        .local_address("127.0.0.53".parse::<std::net::IpAddr>().unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let page = client
        .get(format!("{}/some/page?q=1", proxy.url))
        .header("user-agent", UA)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 403);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let html = page.text().await.unwrap();
    assert!(html.contains("crypto.subtle.digest"), "{html}");
    let refresh = html
        .split("http-equiv=\"refresh\" content=\"2;url=")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("a meta refresh")
        .replace("&amp;", "&");
    let follow = || {
        client
            .get(format!("{}{refresh}", proxy.url))
            .header("user-agent", UA)
            .send()
    };
    // Too early: a new challenge page.
    assert_eq!(follow().await.unwrap().status(), 403);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let done = follow().await.unwrap();
    assert_eq!(done.status(), 303);
    assert_eq!(done.headers()["location"], "/some/page?q=1");
    let cookie = cookie_of(&done);
    assert_eq!(get_with(&proxy, "127.0.0.53", &cookie, UA).await, 200);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_cookie_earned_on_an_easy_puzzle_does_not_clear_a_harder_challenge() {
    let (proxy, _up, broker) = challenged_proxy("ip:127.0.0.54", 4).await;
    let cookie = earn_cookie(&proxy, "127.0.0.54", 4).await;
    assert_eq!(get_with(&proxy, "127.0.0.54", &cookie, UA).await, 200);

    // A refused solution is asked again at its token's signed difficulty; a made-up
    // token with difficulty 0 gets the default, not 0.
    let body = json_challenge(&proxy, "127.0.0.54").await;
    let token = body["challenge"]["token"].as_str().unwrap();
    let wrong = post_solution(&proxy, "127.0.0.54", token, "x").await;
    let wrong: serde_json::Value = wrong.json().await.unwrap();
    assert_eq!(wrong["challenge"]["difficulty"], 4);
    let forged = post_solution(&proxy, "127.0.0.54", "p.99999999999.0.0.00", "0").await;
    assert_eq!(forged.status(), 403);
    let forged: serde_json::Value = forged.json().await.unwrap();
    assert_eq!(forged["error"], "challenge_failed");
    assert_eq!(forged["challenge"]["difficulty"], 16);

    // The client is now asked for more work: the easy cookie no longer clears it.
    broker
        .publish("ip:127.0.0.54", Action::Challenge { difficulty: 12 }, TTL)
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while get_with(&proxy, "127.0.0.54", &cookie, UA).await == 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the harder challenge applies to the easy cookie"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let harder = json_challenge(&proxy, "127.0.0.54").await;
    assert_eq!(harder["challenge"]["difficulty"], 12);
    let token = harder["challenge"]["token"].as_str().unwrap();
    let cookie = cookie_of(&post_solution(&proxy, "127.0.0.54", token, &solve(token, 12)).await);
    assert_eq!(get_with(&proxy, "127.0.0.54", &cookie, UA).await, 200);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_cleared_client_still_meets_its_other_mitigations() {
    let (proxy, _up, broker) = challenged_proxy("ip:127.0.0.55", 4).await;
    let cookie = earn_cookie(&proxy, "127.0.0.55", 4).await;
    assert_eq!(get_with(&proxy, "127.0.0.55", &cookie, UA).await, 200);
    // Its network is throttled as well: the cookie passes the challenge, not that.
    broker
        .publish(
            "cidr:127.0.0.0/24",
            Action::Throttle {
                rate: 0.01,
                burst: 1,
            },
            TTL,
        )
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while get_with(&proxy, "127.0.0.55", &cookie, UA).await != 429 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the throttle applies to the cleared client"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_cookie_follows_its_client_inside_an_ipv6_64_until_it_expires() {
    let up = upstream().await;
    let broker = mitigations().await;
    let mut cfg = config(up.addr, &dead_url(), &broker.url);
    cfg.challenge_secret = Some(SECRET.into());
    cfg.challenge_ttl = Duration::from_secs(2);
    // The clients' IPv6 addresses come through a trusted balancer on loopback.
    cfg.trusted_proxies = vec!["127.0.0.60/32".parse().unwrap()];
    let proxy = start_proxy(cfg).await;
    broker
        .publish(
            "cidr:2001:db8:1::/48",
            Action::Challenge { difficulty: 4 },
            TTL,
        )
        .await;
    let send = |client_ip: &'static str, cookie: Option<String>| {
        let url = format!("{}/", proxy.url);
        async move {
            let mut req = client_from("127.0.0.60")
                .get(url)
                .header("x-forwarded-for", client_ip)
                .header("accept", "application/json")
                .header("user-agent", UA);
            if let Some(c) = cookie {
                req = req.header("cookie", c);
            }
            req.send().await.unwrap()
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let body: serde_json::Value = loop {
        let resp = send("2001:db8:1:2::5", None).await;
        if resp.status() == 403 {
            break resp.json().await.unwrap();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the challenge arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let token = body["challenge"]["token"].as_str().unwrap();
    let solved = client_from("127.0.0.60")
        .post(format!("{}/.esper/challenge", proxy.url))
        .header("x-forwarded-for", "2001:db8:1:2::5")
        .header("accept", "application/json")
        .header("user-agent", UA)
        .form(&[("token", token), ("nonce", solve(token, 4).as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(solved.status(), 200);
    let set = solved.headers()["set-cookie"].to_str().unwrap();
    assert!(set.contains("Max-Age=2"), "{set}");
    let cookie = set.split(';').next().unwrap().to_string();
    // Another address of the same /64 (a privacy address) keeps it; another /64 does not.
    assert_eq!(
        send("2001:db8:1:2::5", Some(cookie.clone())).await.status(),
        200
    );
    assert_eq!(
        send("2001:db8:1:2:aaaa::99", Some(cookie.clone()))
            .await
            .status(),
        200
    );
    assert_eq!(
        send("2001:db8:1:3::5", Some(cookie.clone())).await.status(),
        403
    );
    // And not after its expiry.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(send("2001:db8:1:2::5", Some(cookie)).await.status(), 403);
    proxy.stop().await.unwrap();
}

/// Debian's Chromium, when installed.
fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser"].into_iter().find(|c| {
        std::process::Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

#[tokio::test]
async fn headless_chromium_solves_the_challenge_and_reaches_the_app() {
    // CI installs Chromium, so its absence is a failure unless skipping was asked for.
    let Some(browser) = chromium() else {
        assert!(
            std::env::var_os("ESPER_SKIP_BROWSER").is_some(),
            "chromium is not installed (apt-get install -y chromium), and ESPER_SKIP_BROWSER is not set"
        );
        eprintln!("SKIPPED: chromium is not installed and ESPER_SKIP_BROWSER is set");
        return;
    };
    // Chromium connects from 127.0.0.1.
    let (proxy, up, _broker) = challenged_proxy("ip:127.0.0.1", 10).await;
    json_challenge(&proxy, "127.0.0.1").await;
    let profile = std::env::temp_dir().join(format!("esper-chromium-{}", std::process::id()));
    let output = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new(browser)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--virtual-time-budget=30000",
                "--dump-dom",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(format!("{}/", proxy.url))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium finished within 90s")
    .unwrap();
    let _ = std::fs::remove_dir_all(&profile);
    let dom = String::from_utf8_lossy(&output.stdout);
    assert!(
        dom.contains("hello from upstream"),
        "the browser reached the app; DOM:\n{dom}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let last = up.seen.lock().last().cloned().unwrap();
    assert!(
        last.get("cookie")
            .and_then(|c| c.to_str().ok())
            .is_some_and(|c| c.contains("esper_clearance=")),
        "the app was reached with the clearance cookie"
    );
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn behind_a_trusted_tls_balancer_the_clearance_cookie_is_secure() {
    let up = upstream().await;
    let broker = mitigations().await;
    let mut cfg = config(up.addr, &dead_url(), &broker.url);
    cfg.challenge_secret = Some(SECRET.into());
    cfg.trusted_proxies = vec!["127.0.0.70/32".parse().unwrap()];
    let proxy = start_proxy(cfg).await;
    broker
        .publish(
            "cidr:127.0.0.0/24",
            Action::Challenge { difficulty: 4 },
            TTL,
        )
        .await;
    // The balancer terminated TLS and says so; a client's own claim counts for nothing.
    for (from, secure) in [("127.0.0.70", true), ("127.0.0.71", false)] {
        let body = json_challenge(&proxy, from).await;
        let token = body["challenge"]["token"].as_str().unwrap();
        let resp = client_from(from)
            .post(format!("{}/.esper/challenge", proxy.url))
            .header("accept", "application/json")
            .header("user-agent", UA)
            .header("x-forwarded-proto", "https")
            .form(&[("token", token), ("nonce", solve(token, 4).as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{from}");
        let set = resp.headers()["set-cookie"].to_str().unwrap();
        assert_eq!(set.contains("; Secure"), secure, "{from}: {set}");
    }
    proxy.stop().await.unwrap();
}
