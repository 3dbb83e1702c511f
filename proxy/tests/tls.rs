//! TLS termination with certificates made here: the certificate follows SNI, files that
//! change are reloaded, invalid new files leave the previous certificate in service,
//! HTTP/2 is negotiated, events carry the TLS version and a JA4 fingerprint, and
//! mitigations on a JA4 fingerprint or a path template are enforced.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use esper_protocol::Action;
use esper_proxy::CertConfig;
use support::{
    client_from, config, dead_url, eventually, ingestion, mitigations, start_proxy, upstream,
};

/// A self-signed certificate for `name`: (cert PEM, key PEM, cert DER).
fn cert_for(name: &str) -> (String, String, Vec<u8>) {
    let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    (
        c.cert.pem(),
        c.key_pair.serialize_pem(),
        c.cert.der().to_vec(),
    )
}

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("esper-tls-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes a certificate pair as `NAME.pem` / `NAME.key`; returns its config.
fn write_cert(
    dir: &Path,
    name: &str,
    pem: &(String, String, Vec<u8>),
    hosts: &[&str],
) -> CertConfig {
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert, &pem.0).unwrap();
    std::fs::write(&key, &pem.1).unwrap();
    CertConfig {
        cert,
        key,
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
    }
}

/// A client reaching `name` at `addr` (SNI `name`), accepting any certificate so the
/// test can look at the one served.
fn client(name: &str, addr: SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .use_rustls_tls()
        .danger_accept_invalid_certs(true)
        .tls_info(true)
        .resolve(name, addr)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// The certificate served for `name` (DER) and the HTTP version of the answer.
async fn served(name: &str, addr: SocketAddr) -> (Vec<u8>, reqwest::Version, String) {
    let resp = client(name, addr)
        .get(format!("https://{name}:{}/", addr.port()))
        .send()
        .await
        .unwrap();
    let der = resp
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .unwrap()
        .to_vec();
    let version = resp.version();
    (der, version, resp.text().await.unwrap())
}

#[tokio::test]
async fn certificates_follow_sni_and_reload_from_their_files() {
    let up = upstream().await;
    let dir = temp_dir();
    let a = cert_for("a.test");
    let b = cert_for("b.test");
    let fallback = cert_for("default.test");
    let mut cfg = config(up.addr, &dead_url(), &dead_url());
    cfg.tls_certificates = vec![
        write_cert(&dir, "a", &a, &["a.test"]),
        write_cert(&dir, "b", &b, &["*.b.test", "b.test"]),
        write_cert(&dir, "default", &fallback, &[]),
    ];
    cfg.tls_reload_interval = Duration::from_millis(50);
    let proxy = start_proxy(cfg).await;
    let addr = proxy.handle().tls_addr().unwrap();

    let (der, version, body) = served("a.test", addr).await;
    assert_eq!(der, a.2, "a.test gets its certificate");
    assert_eq!(version, reqwest::Version::HTTP_2, "h2 by ALPN");
    assert_eq!(body, "hello from upstream");
    assert_eq!(served("b.test", addr).await.0, b.2);
    assert_eq!(served("www.b.test", addr).await.0, b.2);
    assert_eq!(served("other.test", addr).await.0, fallback.2);
    // Plain HTTP keeps working beside TLS.
    assert_eq!(
        reqwest::get(format!("{}/", proxy.url))
            .await
            .unwrap()
            .status(),
        200
    );

    // New files for a.test are picked up while serving.
    let renewed = cert_for("a.test");
    write_cert(&dir, "a", &renewed, &[]);
    let reloaded = eventually(Duration::from_secs(3), || async {
        served("a.test", addr).await.0 == renewed.2
    })
    .await;
    assert!(reloaded, "the renewed certificate is served");

    // A broken certificate (and a key that does not match) keeps the previous one.
    std::fs::write(dir.join("a.pem"), "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(served("a.test", addr).await.0, renewed.2);
    std::fs::write(dir.join("a.pem"), &b.0).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(served("a.test", addr).await.0, renewed.2);
    // Once fixed, it loads again.
    let fixed = cert_for("a.test");
    write_cert(&dir, "a", &fixed, &[]);
    assert!(
        eventually(Duration::from_secs(3), || async {
            served("a.test", addr).await.0 == fixed.2
        })
        .await
    );
    proxy.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn events_carry_the_tls_version_and_fingerprint() {
    let up = upstream().await;
    let events = ingestion().await;
    let dir = temp_dir();
    let mut cfg = config(up.addr, &events.url, &dead_url());
    cfg.tls_certificates = vec![write_cert(&dir, "s", &cert_for("s.test"), &[])];
    cfg.tls_http2 = false;
    let proxy = start_proxy(cfg).await;
    let addr = proxy.handle().tls_addr().unwrap();
    let (_, version, _) = served("s.test", addr).await;
    assert_eq!(version, reqwest::Version::HTTP_11, "h2 off: HTTP/1.1 only");
    reqwest::get(format!("{}/plain", proxy.url)).await.unwrap();
    let seen = events
        .claim_until(Duration::from_secs(3), |seen| {
            ["/", "/plain"]
                .iter()
                .all(|path| seen.iter().any(|e| e.path == *path))
        })
        .await;
    let tls = seen
        .iter()
        .find(|e| e.path == "/")
        .expect("the TLS request's event");
    let info = tls.tls.as_ref().expect("TLS facts");
    assert_eq!(info.version, "TLSv1.3");
    let fp = info.fingerprint.as_deref().expect("a JA4 fingerprint");
    assert!(fp.starts_with("t13d"), "{fp}");
    assert_eq!(fp.len(), 36, "{fp}");
    let plain = seen
        .iter()
        .find(|e| e.path == "/plain")
        .expect("the plain event");
    assert!(plain.tls.is_none());
    proxy.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A client trusting `cert` (DER) for `name` at `addr`, whose TLS records carry at most
/// `fragment` bytes, its ClientHello's included, when given.
fn fragmenting_client(
    name: &str,
    addr: SocketAddr,
    cert: &[u8],
    fragment: Option<usize>,
) -> reqwest::Client {
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(cert.to_vec()))
        .unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.max_fragment_size = fragment;
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .resolve(name, addr)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_client_hello_split_over_records_keeps_its_fingerprint() {
    let up = upstream().await;
    let events = ingestion().await;
    let dir = temp_dir();
    let mut cfg = config(up.addr, &events.url, &dead_url());
    let cert = cert_for("s.test");
    cfg.tls_certificates = vec![write_cert(&dir, "s", &cert, &[])];
    let proxy = start_proxy(cfg).await;
    let addr = proxy.handle().tls_addr().unwrap();
    for (path, fragment) in [("/whole", None), ("/split", Some(64))] {
        let client = fragmenting_client("s.test", addr, &cert.2, fragment);
        let url = format!("https://s.test:{}{path}", addr.port());
        // The upstream serves `/` only: its 404 says the handshake went through.
        assert_eq!(client.get(&url).send().await.unwrap().status(), 404);
    }
    let seen = events
        .claim_until(Duration::from_secs(3), |seen| {
            ["/whole", "/split"]
                .iter()
                .all(|path| seen.iter().any(|e| e.path == *path))
        })
        .await;
    let fingerprint = |path: &str| {
        seen.iter()
            .find(|e| e.path == path)
            .and_then(|e| e.tls.as_ref())
            .and_then(|t| t.fingerprint.clone())
    };
    let whole = fingerprint("/whole").expect("a fingerprint");
    // A hello cut into 64-byte records would otherwise pass with none, out of reach of
    // every `ja4:` mitigation.
    assert_eq!(fingerprint("/split").as_deref(), Some(whole.as_str()));
    proxy.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Polls until `GET url` with `client` answers `status`.
async fn answers(client: &reqwest::Client, url: &str, status: u16) -> bool {
    eventually(Duration::from_secs(2), || async {
        client
            .get(url)
            .send()
            .await
            .is_ok_and(|r| r.status().as_u16() == status)
    })
    .await
}

#[tokio::test]
async fn fingerprint_and_path_template_mitigations_are_enforced() {
    let up = upstream().await;
    let events = ingestion().await;
    let broker = mitigations().await;
    let dir = temp_dir();
    let mut cfg = config(up.addr, &events.url, &broker.url);
    cfg.tls_certificates = vec![write_cert(&dir, "s", &cert_for("s.test"), &[])];
    let proxy = start_proxy(cfg).await;
    let addr = proxy.handle().tls_addr().unwrap();
    let tls = client("s.test", addr);
    let tls_url = format!("https://s.test:{}/", addr.port());
    assert_eq!(tls.get(&tls_url).send().await.unwrap().status(), 200);
    let seen = events.claim_events(1, Duration::from_secs(3)).await;
    let fp = seen[0]
        .tls
        .as_ref()
        .and_then(|t| t.fingerprint.clone())
        .expect("a JA4 fingerprint");

    broker
        .publish(
            &format!("ja4:{fp}"),
            Action::Block,
            Duration::from_secs(600),
        )
        .await;
    assert!(
        answers(&tls, &tls_url, 403).await,
        "the fingerprint is blocked"
    );
    let plain = client_from("127.0.0.2");
    assert_eq!(
        plain
            .get(format!("{}/", proxy.url))
            .send()
            .await
            .unwrap()
            .status(),
        200,
        "a plain-HTTP client has no fingerprint"
    );

    broker
        .publish(
            "path:/users/{id}/orders",
            Action::Block,
            Duration::from_secs(600),
        )
        .await;
    let orders = format!("{}/users/77/orders?page=2", proxy.url);
    assert!(
        answers(&plain, &orders, 403).await,
        "the template is blocked"
    );
    for other in ["/users/77/profile", "/users/me/orders", "/"] {
        let resp = plain
            .get(format!("{}{other}", proxy.url))
            .send()
            .await
            .unwrap();
        assert_ne!(resp.status(), 403, "{other}");
    }
    let resp = plain
        .get(format!("{}/users/8/orders", proxy.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403, "every path with the template");
    proxy.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_bad_certificate_at_start_is_one_clear_error() {
    let up = upstream().await;
    let dir = temp_dir();
    std::fs::write(dir.join("x.pem"), "junk").unwrap();
    std::fs::write(dir.join("x.key"), "junk").unwrap();
    let mut cfg = config(up.addr, &dead_url(), &dead_url());
    cfg.tls_certificates = vec![CertConfig {
        cert: dir.join("x.pem"),
        key: dir.join("x.key"),
        hosts: vec![],
    }];
    let (_t, shutdown) = esper_common::Shutdown::new();
    let err = match esper_proxy::start(cfg, esper_proxy::Listeners::default(), shutdown).await {
        Ok(_) => panic!("a junk certificate must not start"),
        Err(e) => e.to_string(),
    };
    assert!(err.starts_with("TLS:") && err.contains("x.pem"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn http2_clients_get_head_answers_without_a_body_and_send_one_cookie_header() {
    let up = upstream().await;
    let broker = mitigations().await;
    let dir = temp_dir();
    let mut cfg = config(up.addr, &dead_url(), &broker.url);
    cfg.tls_certificates = vec![write_cert(&dir, "h", &cert_for("h.test"), &[])];
    let proxy = start_proxy(cfg).await;
    let addr = proxy.handle().tls_addr().unwrap();
    let tls = client("h.test", addr);
    let url = format!("https://h.test:{}/", addr.port());
    // Cookies in separate fields, as browsers send them over HTTP/2.
    let resp = tls
        .get(&url)
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let cookies: Vec<String> = up
        .seen
        .lock()
        .last()
        .unwrap()
        .get_all("cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert_eq!(cookies, ["a=1; b=2"], "one header for the HTTP/1.1 app");

    broker
        .publish("ip:127.0.0.1", Action::Block, Duration::from_secs(600))
        .await;
    assert!(answers(&tls, &url, 403).await, "the client is blocked");
    // The proxy's own answer to a HEAD: the status and headers, and the stream ends.
    let resp = tls.head(&url).send().await.expect("a clean HTTP/2 answer");
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 403);
    assert!(resp.headers().contains_key("x-request-id"));
    assert_eq!(resp.bytes().await.unwrap().len(), 0);
    proxy.stop().await.unwrap();
}
