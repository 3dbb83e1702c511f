//! The proxy as an edge: the real client address from trusted forwarding headers and
//! from PROXY protocol headers, the forwarding headers it adds, allowlists that bypass mitigations, and answer templates
//! from files. Clients connect from distinct loopback addresses.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use esper_protocol::Action;
use esper_proxy::proxyproto::{encode_v1, encode_v2};
use support::{
    client_from, config, dead_url, mitigations, raw_get, raw_status, start_proxy, upstream,
    wait_for_status,
};

const TTL: Duration = Duration::from_secs(600);

fn nets(list: &[&str]) -> Vec<ipnet::IpNet> {
    list.iter().map(|s| s.parse().expect("a network")).collect()
}

#[tokio::test]
async fn forwarded_headers_count_only_from_trusted_proxies() {
    let up = upstream().await;
    let broker = mitigations().await;
    let mut cfg = config(up.addr, &dead_url(), &broker.url);
    cfg.trusted_proxies = nets(&["127.0.0.10/32"]);
    let proxy = start_proxy(cfg).await;
    broker.publish("ip:198.51.100.7", Action::Block, TTL).await;
    // A marker mitigation to know the cache is loaded.
    broker.publish("ip:127.0.0.19", Action::Block, TTL).await;
    assert!(wait_for_status("127.0.0.19", &proxy.url, 403, Duration::from_secs(2)).await);

    let get = |from: &'static str, xff: &'static str, fwd: Option<&'static str>| {
        let url = format!("{}/", proxy.url);
        async move {
            let mut req = client_from(from).get(url).header("x-forwarded-for", xff);
            if let Some(f) = fwd {
                req = req.header("forwarded", f);
            }
            req.send().await.unwrap().status().as_u16()
        }
    };
    // Through the trusted balancer: the rightmost untrusted address is the client.
    assert_eq!(get("127.0.0.10", "6.6.6.6, 198.51.100.7", None).await, 403);
    assert_eq!(
        get("127.0.0.10", "198.51.100.7, 203.0.113.5", None).await,
        200
    );
    assert_eq!(up.last_header("x-real-ip"), "203.0.113.5");
    assert_eq!(
        up.last_header("x-forwarded-for"),
        "198.51.100.7, 203.0.113.5, 127.0.0.10"
    );
    // The balancer sets X-Forwarded-For and passes on a `Forwarded` the client wrote:
    // that one is neither read nor forwarded.
    assert_eq!(
        get(
            "127.0.0.10",
            "203.0.113.5",
            Some("for=\"198.51.100.7:5000\"")
        )
        .await,
        200
    );
    assert_eq!(up.last_header("x-real-ip"), "203.0.113.5");
    assert_eq!(up.last_header("forwarded"), "");
    // A direct client cannot pose as someone else, nor escape its own block.
    assert_eq!(get("127.0.0.11", "198.51.100.7", None).await, 200);
    assert_eq!(up.last_header("x-real-ip"), "127.0.0.11");
    assert_eq!(up.last_header("x-forwarded-for"), "127.0.0.11");
    assert_eq!(up.last_header("forwarded"), "");
    assert_eq!(get("127.0.0.19", "203.0.113.5", None).await, 403);
    // A balancer may add its own line rather than append to the client's: every line
    // counts. One appending to the client's line may leave a byte there that is not
    // text: it spoils that hop only, not the one the balancer wrote after it.
    let lines = |values: &[&[u8]]| {
        let mut req = client_from("127.0.0.10").get(format!("{}/", proxy.url));
        for v in values {
            let v = reqwest::header::HeaderValue::from_bytes(v).unwrap();
            req = req.header("x-forwarded-for", v);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(lines(&[b"6.6.6.6", b"198.51.100.7"]).await, 403);
    assert_eq!(lines(&[b"6.6.6.6", b"203.0.113.5"]).await, 200);
    assert_eq!(up.last_header("x-real-ip"), "203.0.113.5");
    assert_eq!(
        up.last_header("x-forwarded-for"),
        "6.6.6.6, 203.0.113.5, 127.0.0.10"
    );
    assert_eq!(lines(&[b"6.6.6.6\xff, 198.51.100.7"]).await, 403);
    assert_eq!(lines(&[b"6.6.6.6\xff, 203.0.113.5"]).await, 200);
    assert_eq!(up.last_header("x-real-ip"), "203.0.113.5");
    assert_eq!(up.last_header("x-forwarded-for"), "203.0.113.5, 127.0.0.10");
    proxy.stop().await.unwrap();

    // Balancers that name the client in `Forwarded`: that header is read and passed
    // on, and an X-Forwarded-For the client wrote is not believed.
    let mut cfg = config(up.addr, &dead_url(), &broker.url);
    cfg.trusted_proxies = nets(&["127.0.0.10/32"]);
    cfg.real_ip_header = esper_proxy::config::RealIpHeader::Forwarded;
    let proxy = start_proxy(cfg).await;
    assert!(wait_for_status("127.0.0.19", &proxy.url, 403, Duration::from_secs(2)).await);
    let get = |xff: &'static str, fwd: &'static str| {
        let url = format!("{}/", proxy.url);
        async move {
            client_from("127.0.0.10")
                .get(url)
                .header("x-forwarded-for", xff)
                .header("forwarded", fwd)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(get("203.0.113.5", "for=\"198.51.100.7:5000\"").await, 403);
    assert_eq!(get("198.51.100.7", "for=203.0.113.5").await, 200);
    assert_eq!(up.last_header("x-real-ip"), "203.0.113.5");
    assert_eq!(up.last_header("forwarded"), "for=203.0.113.5");
    // The X-Forwarded-For the client wrote is replaced by what is known: the client the
    // balancer named, then the balancer.
    assert_eq!(up.last_header("x-forwarded-for"), "203.0.113.5, 127.0.0.10");
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_trusted_balancer_tells_the_client_scheme() {
    let up = upstream().await;
    let mut cfg = config(up.addr, &dead_url(), &dead_url());
    cfg.trusted_proxies = nets(&["127.0.0.10/32"]);
    let proxy = start_proxy(cfg).await;
    let proto_seen = |from: &'static str, sent: Option<&'static str>| {
        let url = format!("{}/", proxy.url);
        let up = &up;
        async move {
            let mut req = client_from(from).get(url);
            if let Some(p) = sent {
                req = req.header("x-forwarded-proto", p);
            }
            assert_eq!(req.send().await.unwrap().status(), 200);
            up.last_header("x-forwarded-proto")
        }
    };
    // A balancer that terminated TLS says `https`, and the app must hear it.
    assert_eq!(proto_seen("127.0.0.10", Some("https")).await, "https");
    assert_eq!(proto_seen("127.0.0.10", Some("HTTP")).await, "http");
    // Nothing said, or something that is not one scheme: this hop's.
    assert_eq!(proto_seen("127.0.0.10", None).await, "http");
    assert_eq!(proto_seen("127.0.0.10", Some("https, http")).await, "http");
    assert_eq!(proto_seen("127.0.0.10", Some("gopher")).await, "http");
    // A client's own claim is replaced.
    assert_eq!(proto_seen("127.0.0.11", Some("https")).await, "http");
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_balancer_speaking_forwarded_tells_the_scheme_there() {
    let up = upstream().await;
    let mut cfg = config(up.addr, &dead_url(), &dead_url());
    cfg.trusted_proxies = nets(&["127.0.0.10/32", "10.0.0.0/8"]);
    cfg.real_ip_header = esper_proxy::config::RealIpHeader::Forwarded;
    let proxy = start_proxy(cfg).await;
    let proto_seen = |from: &'static str, headers: &'static [(&'static str, &'static str)]| {
        let url = format!("{}/", proxy.url);
        let up = &up;
        async move {
            let mut req = client_from(from).get(url);
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            assert_eq!(req.send().await.unwrap().status(), 200);
            up.last_header("x-forwarded-proto")
        }
    };
    const FWD: &str = "forwarded";
    assert_eq!(
        proto_seen("127.0.0.10", &[(FWD, "for=198.51.100.7;proto=https")]).await,
        "https"
    );
    // Through two balancers: the scheme is the one the client used, at the first.
    assert_eq!(
        proto_seen(
            "127.0.0.10",
            &[(FWD, "for=198.51.100.7;proto=https, for=10.0.0.5;proto=http")]
        )
        .await,
        "https"
    );
    // A client's own element on the left says nothing about the scheme.
    assert_eq!(
        proto_seen(
            "127.0.0.10",
            &[(FWD, "for=6.6.6.6;proto=https, for=198.51.100.7")]
        )
        .await,
        "http"
    );
    // X-Forwarded-Proto is not this balancer's header: passed on by it, it is the
    // client's claim, replaced.
    assert_eq!(
        proto_seen(
            "127.0.0.10",
            &[(FWD, "for=198.51.100.7"), ("x-forwarded-proto", "https")]
        )
        .await,
        "http"
    );
    // And from a client, `Forwarded` is its own claim.
    assert_eq!(
        proto_seen("127.0.0.11", &[(FWD, "for=198.51.100.7;proto=https")]).await,
        "http"
    );
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn forward_headers_left_out_are_not_added_and_not_spoofable() {
    let up = upstream().await;
    let mut cfg = config(up.addr, &dead_url(), &dead_url());
    cfg.trusted_proxies = nets(&["127.0.0.10/32"]);
    cfg.forward_headers = vec!["x-forwarded-proto".into()];
    let proxy = start_proxy(cfg).await;
    let get = |from: &'static str, spoof: bool| {
        let url = format!("{}/", proxy.url);
        async move {
            let mut req = client_from(from).get(url);
            if spoof {
                req = req
                    .header("x-forwarded-for", "198.51.100.7")
                    .header("x-real-ip", "198.51.100.7")
                    .header("forwarded", "for=198.51.100.7");
            }
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.headers()
                .get("x-request-id")
                .map(|v| v.to_str().unwrap().to_string())
        }
    };
    // Left out: not added, and no request id on the response either.
    assert_eq!(get("127.0.0.11", false).await, None);
    for name in ["x-forwarded-for", "x-real-ip", "x-request-id", "forwarded"] {
        assert_eq!(up.last_header(name), "", "{name}");
    }
    assert_eq!(up.last_header("x-forwarded-proto"), "http");
    // A direct client's own copies are removed all the same.
    get("127.0.0.11", true).await;
    for name in ["x-forwarded-for", "x-real-ip", "forwarded"] {
        assert_eq!(up.last_header(name), "", "{name}");
    }
    // A client's usable request id passes on; one this proxy would not keep does not.
    for (sent, seen) in [("req-42", "req-42"), ("<script>", "")] {
        let resp = client_from("127.0.0.11")
            .get(format!("{}/", proxy.url))
            .header("x-request-id", sent)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(up.last_header("x-request-id"), seen, "{sent}");
    }
    // A trusted proxy's pass through untouched, except a `Forwarded` header when the
    // proxies name the client in X-Forwarded-For (then it is a client's own claim).
    get("127.0.0.10", true).await;
    assert_eq!(up.last_header("x-forwarded-for"), "198.51.100.7");
    assert_eq!(up.last_header("x-real-ip"), "198.51.100.7");
    assert_eq!(up.last_header("forwarded"), "");
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn proxy_protocol_headers_name_the_client() {
    let up = upstream().await;
    let broker = mitigations().await;
    let mut cfg = config(up.addr, &dead_url(), &broker.url);
    cfg.proxy_protocol = true;
    cfg.trusted_proxies = nets(&["127.0.0.20/32"]);
    let proxy = start_proxy(cfg).await;
    let addr = proxy.handle().traffic_addr();
    broker.publish("ip:198.51.100.7", Action::Block, TTL).await;
    broker.publish("ip:2001:db8::7", Action::Block, TTL).await;
    let dst: SocketAddr = "10.0.0.1:80".parse().unwrap();
    let dst6: SocketAddr = "[2001:db8::1]:80".parse().unwrap();
    let blocked = || encode_v1("198.51.100.7:40000".parse().unwrap(), dst);
    let loaded = support::eventually(Duration::from_secs(2), || async {
        raw_status(&raw_get("127.0.0.20", addr, &blocked(), "/").await) == 403
    })
    .await;
    assert!(loaded, "version 1 header from the balancer is believed");

    let v2 = encode_v2("198.51.100.7:40000".parse().unwrap(), dst);
    assert_eq!(
        raw_status(&raw_get("127.0.0.20", addr, &v2, "/").await),
        403
    );
    let v2_6 = encode_v2("[2001:db8::7]:1".parse().unwrap(), dst6);
    assert_eq!(
        raw_status(&raw_get("127.0.0.20", addr, &v2_6, "/").await),
        403
    );
    let other = encode_v2("198.51.100.9:40000".parse().unwrap(), dst);
    let answer = raw_get("127.0.0.20", addr, &other, "/").await;
    assert_eq!(raw_status(&answer), 200, "{answer}");
    assert_eq!(up.last_header("x-real-ip"), "198.51.100.9");
    let other_v1 = encode_v1("198.51.100.10:1".parse().unwrap(), dst);
    assert_eq!(
        raw_status(&raw_get("127.0.0.20", addr, &other_v1, "/").await),
        200
    );
    assert_eq!(up.last_header("x-real-ip"), "198.51.100.10");

    // No header, or a header from a peer that is not a trusted balancer: closed unanswered.
    assert_eq!(raw_get("127.0.0.20", addr, b"", "/").await, "");
    assert_eq!(raw_get("127.0.0.21", addr, &other, "/").await, "");
    // Malformed headers: closed unanswered, and the proxy goes on serving.
    let mut v3 = v2.clone();
    v3[12] = 0x31;
    let mut huge_v2 = v2.clone();
    huge_v2[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
    for bad in [
        &b"PROXY TCP4 not-an-address 10.0.0.1 1 80\r\n"[..],
        b"PROXY TCP4 198.51.100.7 10.0.0.1 99999 80\r\n",
        b"PROXY SCTP 198.51.100.7 10.0.0.1 1 80\r\n",
        b"GET / HTTP/1.1\r\n",
        &v3,
        &huge_v2,
    ] {
        assert_eq!(
            raw_get("127.0.0.20", addr, bad, "/").await,
            "",
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
    assert_eq!(
        raw_status(&raw_get("127.0.0.20", addr, &other_v1, "/").await),
        200
    );
    // A balancer that opens a connection and stays silent is dropped after 5 s.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.20:0".parse().unwrap()).unwrap();
    let mut silent = socket.connect(addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    silent.write_all(b"PROX").await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(15), silent.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "closed without an answer: {read:?}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(15),
        "closed at the header timeout: {waited:?}"
    );
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn allowlists_bypass_every_mitigation() {
    let up = upstream().await;
    let broker = mitigations().await;
    let mut cfg = config(up.addr, &dead_url(), &broker.url);
    cfg.allow_ips = nets(&["127.0.0.30/32"]);
    cfg.allow_paths = vec!["/slow".into(), "/.well-known/*".into()];
    let proxy = start_proxy(cfg).await;
    broker
        .publish("cidr:127.0.0.0/24", Action::Block, TTL)
        .await;
    assert!(wait_for_status("127.0.0.31", &proxy.url, 403, Duration::from_secs(2)).await);
    assert_eq!(support::status_from("127.0.0.30", &proxy.url).await, 200);
    let slow = client_from("127.0.0.31")
        .get(format!("{}/slow", proxy.url))
        .send()
        .await
        .unwrap();
    assert_eq!(slow.status(), 200);
    let prefixed = client_from("127.0.0.31")
        .get(format!("{}/.well-known/x", proxy.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        prefixed.status(),
        404,
        "reached the upstream, which has no such path"
    );
    // A path that may resolve outside the list at the upstream gets no bypass.
    for sneaky in [
        "/.well-known/../admin",
        "/.well-known/%2e%2e/admin",
        "/.well-known/..%2fadmin",
        "/.well-known/..;/admin",
        "/.well-known//x",
        "/slow/..",
    ] {
        let answer =
            support::raw_get("127.0.0.31", proxy.handle().traffic_addr(), b"", sneaky).await;
        assert_eq!(support::raw_status(&answer), 403, "{sneaky}");
    }
    assert_eq!(
        support::raw_status(
            &support::raw_get("127.0.0.31", proxy.handle().traffic_addr(), b"", "/slow").await
        ),
        200
    );
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn answers_use_template_files_with_the_request_id() {
    let dir = std::env::temp_dir().join(format!("esper-edge-templates-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("block.json"),
        r#"{"blocked_by":"acme","ref":"{{request_id}}","status":{{status}}}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("block.html"),
        "<h1>ACME says no</h1><p>{{request_id}}</p>",
    )
    .unwrap();
    let up = upstream().await;
    let broker = mitigations().await;
    let mut cfg = config(up.addr, &dead_url(), &broker.url);
    cfg.templates_dir = Some(dir.clone());
    let proxy = start_proxy(cfg).await;
    broker.publish("ip:127.0.0.40", Action::Block, TTL).await;
    assert!(wait_for_status("127.0.0.40", &proxy.url, 403, Duration::from_secs(2)).await);
    let client = client_from("127.0.0.40");
    let resp = client
        .get(format!("{}/", proxy.url))
        .header("accept", "application/json")
        .header("x-request-id", "req-77")
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["blocked_by"], "acme");
    assert_eq!(body["ref"], "req-77");
    assert_eq!(body["status"], 403);
    let page = client
        .get(format!("{}/", proxy.url))
        .header("x-request-id", "req-78")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(page, "<h1>ACME says no</h1><p>req-78</p>");
    proxy.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
