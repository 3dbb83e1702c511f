//! `esper proxy run` reloads its configuration file on SIGHUP: a new upstream takes over
//! without a restart, a connection opened before keeps being served, and a file that
//! does not validate is refused with the running configuration kept. The other services
//! keep running on SIGHUP, apply the tokens and the addresses of the services they call
//! (and the server its certificate) at once, and say which settings a restart would
//! change. Every service takes a new log level from its file.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::{Proc, TempDir, free_addr, write_login_policy};

/// An app that answers every request with its name.
async fn named_app(name: &'static str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(move || async move { name });
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

fn write_config(path: &std::path::Path, upstream: &str, listen: SocketAddr, ops: SocketAddr) {
    std::fs::write(
        path,
        format!(
            "[proxy]\nupstream = \"{upstream}\"\nlisten = \"{listen}\"\nops_listen = \"{ops}\"\n\
             ingestion_url = \"http://127.0.0.1:9\"\nmitigation_url = \"http://127.0.0.1:9\"\n"
        ),
    )
    .unwrap();
}

fn hangup(proc: &Proc) {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &proc.child_id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Polls `GET url` on `client` until the body is `want`.
async fn answers(client: &reqwest::Client, url: &str, want: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(resp) = client.get(url).send().await
            && resp.text().await.is_ok_and(|body| body == want)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_proxy_configuration_file() {
    let (a, b) = (named_app("a").await, named_app("b").await);
    let dir = TempDir::new("sighup");
    let file = dir.path().join("esper.toml");
    let (listen, ops) = (free_addr(), free_addr());
    write_config(&file, &a.to_string(), listen, ops);
    let mut proxy = Proc::esper_config(&["proxy", "run"], &file, &[]);
    let url = format!("http://{listen}/");
    // One client, so its kept-alive connection outlives the reload.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    assert!(
        answers(&client, &url, "a", Duration::from_secs(20)).await,
        "the proxy serves `a`: {}",
        proxy.log()
    );

    write_config(&file, &b.to_string(), listen, ops);
    hangup(&proxy);
    assert!(
        answers(&client, &url, "b", Duration::from_secs(10)).await,
        "after SIGHUP the proxy serves `b`: {}",
        proxy.log()
    );
    // Logged once the new configuration is live, so possibly after it served `b`.
    logged(&proxy, "configuration reloaded").await;
    // The harness sets LOG_LEVEL: a level in the file would not apply, and it says so.
    logged(&proxy, "set in the environment or on the command line").await;
    assert!(
        proxy.log().contains("variables=LOG_LEVEL"),
        "{}",
        proxy.log()
    );

    // A file that does not validate: refused, and `b` stays.
    write_config(&file, "", listen, ops);
    hangup(&proxy);
    logged(&proxy, "configuration not reloaded").await;
    assert_eq!(
        client.get(&url).send().await.unwrap().text().await.unwrap(),
        "b"
    );
    assert_eq!(
        proxy.terminate(Duration::from_secs(15)),
        Some(0),
        "{}",
        proxy.log()
    );
}

/// The log level in the `--config` file is read again on SIGHUP: a proxy started at
/// `info` logs its debug lines (a broker that stays unreachable) once the file says
/// `debug`, and a level that does not parse leaves the one in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_changes_the_log_level() {
    let a = named_app("a").await;
    let dir = TempDir::new("sighup-log");
    let file = dir.path().join("esper.toml");
    let (listen, ops) = (free_addr(), free_addr());
    let write = |level: &str| {
        write_config(&file, &a.to_string(), listen, ops);
        let proxy = std::fs::read_to_string(&file).unwrap();
        std::fs::write(&file, format!("[log]\nlevel = \"{level}\"\n\n{proxy}")).unwrap();
    };
    write("info");
    // An empty value counts as unset: the file's level applies.
    let mut proxy = Proc::esper_config(&["proxy", "run"], &file, &[("LOG_LEVEL", String::new())]);
    let client = reqwest::Client::new();
    let url = format!("http://{listen}/");
    assert!(
        answers(&client, &url, "a", Duration::from_secs(20)).await,
        "{}",
        proxy.log()
    );
    // Its stream fails first at `warn`, then again and again at `debug`.
    logged(&proxy, "mitigation stream lost").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let quiet = "mitigation stream still unavailable";
    assert!(!proxy.log().contains(quiet), "{}", proxy.log());

    write("debug");
    hangup(&proxy);
    logged(&proxy, "SIGHUP: the log level changed").await;
    logged(&proxy, quiet).await;

    write("info,esper=loud");
    hangup(&proxy);
    logged(&proxy, "SIGHUP: the log level stays as it was").await;
    assert_eq!(
        proxy.terminate(Duration::from_secs(15)),
        Some(0),
        "{}",
        proxy.log()
    );
}

/// Waits until `proc`'s output holds `text`.
async fn logged(proc: &Proc, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !proc.log().contains(text) {
        assert!(Instant::now() < deadline, "`{text}` in: {}", proc.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_leaves_a_broker_running_and_names_what_a_restart_would_change() {
    let dir = TempDir::new("sighup-broker");
    let file = dir.path().join("esper.toml");
    let listen = free_addr();
    let write = |size: &str| {
        std::fs::write(
            &file,
            format!("[ingestion]\nlisten = \"{listen}\"\nmax_queue_size = {size}\n"),
        )
        .unwrap()
    };
    write("1000");
    let mut broker = Proc::esper_config(&["broker", "run", "ingestion"], &file, &[]);
    let client = reqwest::Client::new();
    let healthy = format!("http://{listen}/healthz");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !client
        .get(&healthy)
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(
            Instant::now() < deadline,
            "the broker starts: {}",
            broker.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    hangup(&broker);
    logged(&broker, "the configuration is unchanged").await;
    write("2000");
    hangup(&broker);
    logged(&broker, "changed settings take effect on a restart").await;
    assert!(broker.log().contains("max_queue_size"), "{}", broker.log());
    write("\"many\"");
    hangup(&broker);
    logged(&broker, "the configuration does not load").await;
    let status = client.get(&healthy).send().await.unwrap().status();
    assert_eq!(status, 200, "still serving: {}", broker.log());
    assert_eq!(
        broker.terminate(Duration::from_secs(15)),
        Some(0),
        "{}",
        broker.log()
    );
}

/// `systemctl reload esper-server`: the admin token and the API's certificate are the
/// settings operators rotate, and they apply at once; the others are named for a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_the_servers_admin_token_and_names_the_rest() {
    let dir = TempDir::new("sighup-server");
    let file = dir.path().join("esper.toml");
    let (api, health, metrics) = (free_addr(), free_addr(), free_addr());
    let db = dir.path().join("esper.db");
    let nowhere = format!("http://{}", free_addr());
    let write = |token: &str, drain: &str| {
        std::fs::write(
            &file,
            format!(
                "[server]\nlisten = \"{api}\"\nhealth_listen = \"{health}\"\n\
                 metrics_listen = \"{metrics}\"\ndatabase_url = \"sqlite://{}?mode=rwc\"\n\
                 ingestion_url = \"{nowhere}\"\nmitigation_url = \"{nowhere}\"\n\
                 admin_token = \"{token}\"\nshutdown_timeout = \"{drain}\"\n",
                db.display()
            ),
        )
        .unwrap()
    };
    let (first, second) = (
        "first-admin-token-0123456789",
        "second-admin-token-987654321",
    );
    write(first, "5s");
    let mut server = Proc::esper_config(&["server", "run"], &file, &[]);
    let client = reqwest::Client::new();
    let status = |token: &'static str| {
        let (client, url) = (client.clone(), format!("http://{api}/api/v1/status"));
        async move {
            client
                .get(&url)
                .bearer_auth(token)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while status(first).await != 200 {
        assert!(
            Instant::now() < deadline,
            "the server starts: {}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status(second).await, 401);
    write(second, "7s");
    hangup(&server);
    logged(&server, "SIGHUP: settings applied").await;
    logged(&server, "changed settings take effect on a restart").await;
    assert!(
        server.log().contains("shutdown_timeout"),
        "{}",
        server.log()
    );
    assert_eq!(status(second).await, 200, "{}", server.log());
    assert_eq!(status(first).await, 401, "{}", server.log());
    assert_eq!(
        server.terminate(Duration::from_secs(15)),
        Some(0),
        "{}",
        server.log()
    );
}

/// The broker token rotated with no refusal and no restart, as the README's
/// "Rotating tokens" goes: the token sits in a file named by
/// `ESPER_BROKER_TOKEN_FILE` (the environment itself is fixed at start); the broker
/// takes the new one and keeps the old beside it while the worker moves over, then
/// drops it. The worker's batches go through before, during and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_the_broker_token_between_a_broker_and_a_worker() {
    use esper_protocol::IngestionClient;
    let dir = TempDir::new("sighup-tokens");
    let (old, new) = ("old-broker-token-1", "new-broker-token-2");
    let token_file = dir.path().join("broker.token");
    std::fs::write(&token_file, format!("{old}\n")).unwrap();
    let listen = free_addr();
    let broker_file = dir.path().join("ingestion.env");
    let write_broker = |previous: Option<&str>| {
        let mut text = format!("ESPER_INGESTION_LISTEN={listen}\n");
        if let Some(p) = previous {
            text.push_str(&format!("ESPER_BROKER_PREVIOUS_TOKEN={p}\n"));
        }
        std::fs::write(&broker_file, text).unwrap();
    };
    write_broker(None);
    let env = [("ESPER_BROKER_TOKEN_FILE", token_file.display().to_string())];
    let mut broker = Proc::esper_config(&["broker", "run", "ingestion"], &broker_file, &env);
    // The worker publishes nothing here (no event matches the policy).
    let nowhere = format!("http://{}", free_addr());
    let ingestion = format!("http://{listen}");
    let policies = write_login_policy(dir.path(), "10m");
    let mut worker = Proc::esper(
        "worker",
        &[
            "worker".into(),
            "run".into(),
            "engine".into(),
            "--worker-id".into(),
            "rotating".into(),
            "--ingestion-url".into(),
            ingestion.clone(),
            "--mitigation-url".into(),
            nowhere,
            "--policies".into(),
            policies.display().to_string(),
            "--control-url".into(),
            String::new(),
            "--listen".into(),
            free_addr().to_string(),
        ],
        &env,
    );
    let with = |token: &str| IngestionClient::new(&ingestion, Some(token.into()));
    let events = |tag: &str| five_events("192.0.2.7", tag);
    let acked = |token: &'static str, n: u64| acked(with(token), n, Duration::from_secs(20));
    let deadline = Instant::now() + Duration::from_secs(20);
    while with(old).ingest(events("before")).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the broker starts: {}",
            broker.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(acked(old, 5).await, "the worker works: {}", worker.log());

    // The new token in its file, the old one kept beside it.
    std::fs::write(&token_file, format!("{new}\n")).unwrap();
    write_broker(Some(old));
    hangup(&broker);
    logged(&broker, "SIGHUP: settings applied").await;
    assert!(with(new).status().await.is_ok(), "{}", broker.log());
    assert!(with(old).status().await.is_ok(), "{}", broker.log());
    // The worker, still on the old token, goes on meanwhile.
    with(new).ingest(events("during")).await.unwrap();
    assert!(acked(new, 10).await, "still working: {}", worker.log());

    hangup(&worker);
    logged(&worker, "SIGHUP: settings applied").await;
    assert!(worker.log().contains("broker_token"), "{}", worker.log());

    // The old one dropped: refused from then on.
    write_broker(None);
    hangup(&broker);
    let deadline = Instant::now() + Duration::from_secs(10);
    while with(old).status().await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the old token goes: {}",
            broker.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    with(new).ingest(events("after")).await.unwrap();
    assert!(
        acked(new, 10).await,
        "the worker goes on with the new token: {}",
        worker.log()
    );
    for p in [&mut worker, &mut broker] {
        assert_eq!(p.terminate(Duration::from_secs(15)), Some(0), "{}", p.log());
    }
}

/// A worker moved to another ingestion broker by a SIGHUP: the address is in its
/// configuration file, which the reload reads again; batches queued on the new broker
/// are claimed and acknowledged from then on, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_moves_a_worker_to_another_ingestion_broker() {
    use esper_protocol::IngestionClient;
    let dir = TempDir::new("sighup-move");
    let start_broker = |name: &str| {
        let listen = free_addr();
        let proc = Proc::esper(
            name,
            &["broker".into(), "run".into(), "ingestion".into()],
            &[("ESPER_INGESTION_LISTEN", listen.to_string())],
        );
        (proc, format!("http://{listen}"))
    };
    let (mut broker_a, url_a) = start_broker("ingestion-a");
    let (mut broker_b, url_b) = start_broker("ingestion-b");
    let policies = write_login_policy(dir.path(), "10m");
    let file = dir.path().join("esper.toml");
    let listen = free_addr();
    let write_worker = |ingestion: &str| {
        std::fs::write(
            &file,
            format!(
                "[worker]\nworker_id = \"moving\"\nlisten = \"{listen}\"\n\
                 ingestion_url = \"{ingestion}\"\nmitigation_url = \"http://{}\"\n\
                 control_url = \"\"\npolicies_file = \"{}\"\n",
                free_addr(),
                policies.display()
            ),
        )
        .unwrap();
    };
    write_worker(&url_a);
    let mut worker = Proc::esper_config(&["worker", "run", "engine"], &file, &[]);
    let events = |tag: &str| five_events("192.0.2.8", tag);
    let acked =
        |url: &str, n: u64, within: Duration| acked(IngestionClient::new(url, None), n, within);
    for (url, tag) in [(&url_a, "a"), (&url_b, "b")] {
        let client = IngestionClient::new(url, None);
        let deadline = Instant::now() + Duration::from_secs(20);
        while client.ingest(events(tag)).await.is_err() {
            assert!(Instant::now() < deadline, "the brokers start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert!(
        acked(&url_a, 5, Duration::from_secs(20)).await,
        "the worker works: {}",
        worker.log()
    );
    assert!(
        !acked(&url_b, 1, Duration::from_millis(500)).await,
        "the other broker is not claimed from yet"
    );

    write_worker(&url_b);
    hangup(&worker);
    logged(&worker, "SIGHUP: settings applied").await;
    assert!(worker.log().contains("ingestion_url"), "{}", worker.log());
    assert!(
        acked(&url_b, 5, Duration::from_secs(20)).await,
        "the worker claims from the new broker: {}",
        worker.log()
    );
    for p in [&mut worker, &mut broker_a, &mut broker_b] {
        assert_eq!(p.terminate(Duration::from_secs(15)), Some(0), "{}", p.log());
    }
}

/// Five events from `ip`, with ids `TAG-0` to `TAG-4`.
fn five_events(ip: &str, tag: &str) -> Vec<esper_protocol::RequestEvent> {
    (0..5)
        .map(|i| {
            let mut e = esper_protocol::RequestEvent::new(ip.parse().unwrap(), "GET", "/");
            e.id = format!("{tag}-{i}");
            e
        })
        .collect()
}

/// Polls the broker `client` calls until it has acknowledged `n` events in all; `false`
/// when `within` passed first.
async fn acked(client: esper_protocol::IngestionClient, n: u64, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if client.status().await.is_ok_and(|s| s.acked_total >= n) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
