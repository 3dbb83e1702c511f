//! The control-plane API over TLS (`esper server run --tls`): clients that trust the
//! certificate's CA get answers, others are refused, and bad certificate settings stop
//! the start with one clear error.

#![allow(clippy::unwrap_used)]

mod support;

use esper_common::Shutdown;
use esper_control::{Config, Listeners, ctl};
use support::{Brokers, TOKEN, TempDir, config};

/// A self-signed certificate for 127.0.0.1 and localhost, written into `dir`.
fn certificate(dir: &TempDir) -> Config {
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let (c, k) = (dir.path().join("api.crt"), dir.path().join("api.key"));
    std::fs::write(&c, cert.cert.pem()).unwrap();
    std::fs::write(&k, cert.key_pair.serialize_pem()).unwrap();
    Config {
        tls: true,
        tls_cert: Some(c),
        tls_key: Some(k),
        ..Config::default()
    }
}

#[tokio::test]
async fn the_api_answers_over_tls_to_clients_that_trust_its_ca() {
    let brokers = Brokers::start().await;
    let dir = TempDir::new();
    let tls = certificate(&dir);
    let cfg = Config {
        tls: tls.tls,
        tls_cert: tls.tls_cert.clone(),
        tls_key: tls.tls_key.clone(),
        ..config(&dir, &brokers.ingestion_url, &brokers.mitigation_url)
    };
    let (_trigger, shutdown) = Shutdown::new();
    let started = esper_control::start(cfg, Listeners::loopback().await.unwrap(), shutdown)
        .await
        .unwrap();
    let https = format!("https://{}", started.api_addr);
    let ca = tls.tls_cert.as_deref();

    let client = ctl::client(&https, Some(TOKEN.to_string()), ca).unwrap();
    let status = client.status().await.unwrap();
    assert!(!status.server.version.is_empty(), "{status:?}");

    // Without the CA the certificate is not trusted; plain HTTP gets no HTTP answer.
    let untrusting = ctl::client(&https, Some(TOKEN.to_string()), None).unwrap();
    let err = untrusting.status().await.unwrap_err().to_string();
    assert!(err.starts_with("cannot reach the control plane"), "{err}");
    let plain = format!("http://{}", started.api_addr);
    let err = ctl::client(&plain, Some(TOKEN.to_string()), None)
        .unwrap()
        .status()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot reach") || err.contains("unexpected"),
        "{err}"
    );

    // A bad --ca-cert is the client's input error, not a connection failure.
    let missing = dir.path().join("missing.pem");
    let err = ctl::client(&https, None, Some(&missing)).unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("missing.pem"), "{err}");
}

#[tokio::test]
async fn bad_tls_settings_stop_the_start_with_one_clear_error() {
    let dir = TempDir::new();
    let (i, m) = Brokers::down().await;
    let base = config(&dir, &i, &m);
    let start = |cfg: Config| async move {
        let (_t, shutdown) = Shutdown::new();
        esper_control::start(cfg, Listeners::loopback().await.unwrap(), shutdown)
            .await
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };

    let no_key = Config {
        tls: true,
        tls_cert: Some(dir.path().join("api.crt")),
        ..base.clone()
    };
    let err = start(no_key).await;
    assert!(err.contains("needs tls_key"), "{err}");

    let tls = certificate(&dir);
    std::fs::write(tls.tls_key.as_ref().unwrap(), "not a key").unwrap();
    let bad_key = Config {
        tls: true,
        tls_cert: tls.tls_cert.clone(),
        tls_key: tls.tls_key.clone(),
        ..base.clone()
    };
    let err = start(bad_key).await;
    assert!(err.contains("tls_cert") && err.contains("api.key"), "{err}");
}

/// A renewed certificate written over the files is served from the next connection on,
/// once the server reloads (SIGHUP); a broken one is refused and the last kept.
#[tokio::test]
async fn a_reload_serves_a_renewed_certificate_and_keeps_the_last_over_a_broken_one() {
    let brokers = Brokers::start().await;
    let dir = TempDir::new();
    let first = certificate(&dir);
    let (cert, key) = (
        first.tls_cert.clone().unwrap(),
        first.tls_key.clone().unwrap(),
    );
    let old_ca = dir.path().join("old-ca.pem");
    std::fs::copy(&cert, &old_ca).unwrap();
    let cfg = Config {
        tls: true,
        tls_cert: Some(cert.clone()),
        tls_key: Some(key.clone()),
        ..config(&dir, &brokers.ingestion_url, &brokers.mitigation_url)
    };
    let (_trigger, shutdown) = Shutdown::new();
    let started = esper_control::start(cfg.clone(), Listeners::loopback().await.unwrap(), shutdown)
        .await
        .unwrap();
    let https = format!("https://{}", started.api_addr);
    let trusting =
        |ca: &std::path::Path| ctl::client(&https, Some(TOKEN.to_string()), Some(ca)).unwrap();
    trusting(&old_ca).status().await.unwrap();

    certificate(&dir); // a new key pair over the same files
    let done = started.reloader.apply(&cfg).await;
    assert_eq!(done.applied, ["tls_cert", "tls_key"], "{done:?}");
    trusting(&cert).status().await.unwrap();
    let err = trusting(&old_ca).status().await.unwrap_err().to_string();
    assert!(err.starts_with("cannot reach the control plane"), "{err}");

    let renewed = std::fs::read(&cert).unwrap();
    let current_ca = dir.path().join("current-ca.pem");
    std::fs::write(&current_ca, &renewed).unwrap();
    std::fs::write(&key, "not a key").unwrap();
    let done = started.reloader.apply(&cfg).await;
    assert!(done.applied.is_empty(), "{done:?}");
    assert_eq!(done.kept.len(), 2, "{done:?}");
    assert!(done.kept[0].1.contains("api.key"), "{done:?}");
    trusting(&current_ca).status().await.unwrap();
}
