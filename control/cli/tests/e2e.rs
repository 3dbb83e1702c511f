//! End to end: the whole stack, real processes, a real upstream, real HTTP clients on
//! distinct loopback addresses. 127.0.0.2 attacks the login, 127.0.0.3 browses.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// Addresses of one running stack.
struct Stack {
    proxy: String,
    api: String,
    /// The worker's ops listener (`/metrics`).
    worker_ops: String,
}

/// What the browsing client saw while the scenario ran.
#[derive(Default)]
struct Browsing {
    requests: u64,
    refused: Vec<u16>,
    /// Requests that got no answer, or an answer other than 200/403/429.
    failed: u64,
}

/// Browses (GET pages) from 127.0.0.3 until told to stop.
fn browse(
    proxy: String,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Browsing> {
    tokio::spawn(async move {
        let client = client_from("127.0.0.3");
        let mut seen = Browsing::default();
        let mut n = 0u32;
        while !*stop.borrow() {
            n += 1;
            let path = if n.is_multiple_of(3) {
                "/".to_string()
            } else {
                format!("/products/{}", n % 50 + 1)
            };
            match client.get(format!("{proxy}{path}")).send().await {
                Ok(resp) => {
                    seen.requests += 1;
                    match resp.status().as_u16() {
                        200 => {}
                        s @ (403 | 429) => seen.refused.push(s),
                        _ => seen.failed += 1,
                    }
                }
                Err(_) => seen.failed += 1,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        seen
    })
}

/// Hammers POST /login with wrong credentials from 127.0.0.2 until the proxy answers
/// 403; returns the time from the first request to the first 403, and the request count.
async fn attack_until_blocked(proxy: &str) -> (Duration, u32) {
    let client = client_from("127.0.0.2");
    let start = Instant::now();
    let mut sent = 0u32;
    loop {
        sent += 1;
        let resp = client
            .post(format!("{proxy}/login"))
            .form(&[("username", "admin"), ("password", &format!("guess{sent}"))])
            .send()
            .await
            .expect("attacker request");
        match resp.status().as_u16() {
            403 => return (start.elapsed(), sent),
            401 => {}
            other => panic!("attacker got {other} before being blocked"),
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "attacker never blocked after {sent} requests"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn status_from(ip: &str, url: &str) -> u16 {
    client_from(ip)
        .get(url)
        .header("accept", "application/json")
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// The shared scenario: attack is blocked, browsing is not, the block expires.
async fn attack_scenario(stack: &Stack, ttl: Duration) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let browser = browse(stack.proxy.clone(), stop_rx);

    // A normal client passes, and the demo login answers 401 to wrong credentials.
    assert_eq!(
        status_from("127.0.0.2", &format!("{}/", stack.proxy)).await,
        200
    );
    let (elapsed, sent) = attack_until_blocked(&stack.proxy).await;
    println!(
        "time to mitigate: {elapsed:?} from the attack's first request to its first 403 ({sent} requests; threshold 10)"
    );
    assert!(
        sent > 10,
        "blocked before crossing the threshold ({sent} requests)"
    );
    assert!(
        elapsed < Duration::from_secs(10),
        "blocking took {elapsed:?}"
    );
    let blocked_at = Instant::now();

    // The block is against the address: every path, JSON answer for API clients.
    let resp = client_from("127.0.0.2")
        .get(format!("{}/products/1", stack.proxy))
        .header("accept", "application/json")
        .send()
        .await
        .expect("blocked request");
    assert_eq!(resp.status().as_u16(), 403);
    let body: serde_json::Value = resp.json().await.expect("json block body");
    assert_eq!(body["error"], "blocked", "{body}");

    // The reference on the block page leads to the decision record in one step.
    let reference = body["reference"].as_str().expect("a reference").to_string();
    let page = client_from("127.0.0.2")
        .get(format!("{}/", stack.proxy))
        .send()
        .await
        .expect("blocked page")
        .text()
        .await
        .expect("page text");
    assert!(
        page.contains(&format!("Reference: <code>{reference}</code>")),
        "{page}"
    );
    eventually(Duration::from_secs(10), "the decision logged", || async {
        let log: serde_json::Value = reqwest::Client::new()
            .get(format!("{}/api/v1/decisions?id={reference}", stack.api))
            .bearer_auth(TOKEN)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (log["decisions"].as_array()?.len() == 1).then_some(())
    })
    .await;
    let record = esperctl(&stack.api, &["mitigations", "show", &reference]);
    for line in [
        "entity     ip:127.0.0.2",
        "policy     login-brute-force",
        "against a threshold of 10 over a 60s window",
    ] {
        assert!(record.contains(line), "{line}: {record}");
    }

    // The decision is visible through the control plane, with its reason.
    let http = reqwest::Client::new();
    let entity: serde_json::Value = http
        .get(format!(
            "{}/api/v1/mitigations/entity/ip%3A127.0.0.2",
            stack.api
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("entity lookup")
        .json()
        .await
        .expect("entity json");
    let text = entity.to_string();
    assert!(
        text.contains("login-brute-force"),
        "no policy reason in {text}"
    );

    // The block expires after its TTL (and not much before).
    eventually(
        ttl + Duration::from_secs(15),
        "the block to expire",
        || async {
            (status_from("127.0.0.2", &format!("{}/", stack.proxy)).await == 200).then_some(())
        },
    )
    .await;
    let lasted = blocked_at.elapsed();
    assert!(
        lasted + Duration::from_secs(2) >= ttl,
        "block lifted after {lasted:?}, TTL {ttl:?}"
    );

    stop_tx.send(true).ok();
    let seen = browser.await.expect("browser task");
    assert!(
        seen.requests > 10,
        "browser made only {} requests",
        seen.requests
    );
    assert!(
        seen.refused.is_empty(),
        "the browsing client was refused: {:?}",
        seen.refused
    );
}

/// A manual ban through the API takes effect at the proxy; revoking lifts it.
async fn manual_ban_and_revoke(stack: &Stack) {
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{}/api/v1/mitigations", stack.api))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"entity": "ip:127.0.0.4", "action": "block", "ttl": "1h", "reason": "e2e manual ban"}))
        .send()
        .await
        .expect("manual ban");
    assert!(
        resp.status().is_success(),
        "manual ban: {}",
        resp.text().await.unwrap_or_default()
    );
    eventually(
        Duration::from_secs(5),
        "the manual ban at the proxy",
        || async {
            (status_from("127.0.0.4", &format!("{}/", stack.proxy)).await == 403).then_some(())
        },
    )
    .await;
    assert_eq!(
        status_from("127.0.0.3", &format!("{}/", stack.proxy)).await,
        200
    );

    let resp = http
        .post(format!("{}/api/v1/mitigations/revoke", stack.api))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"entity": "ip:127.0.0.4"}))
        .send()
        .await
        .expect("revoke");
    assert!(
        resp.status().is_success(),
        "revoke: {}",
        resp.text().await.unwrap_or_default()
    );
    eventually(
        Duration::from_secs(5),
        "the revoke at the proxy",
        || async {
            (status_from("127.0.0.4", &format!("{}/", stack.proxy)).await == 200).then_some(())
        },
    )
    .await;
}

/// The worker's figure `name` (0 when it has none yet).
async fn worker_metric(stack: &Stack, name: &str) -> i64 {
    let text = match reqwest::get(format!("{}/metrics", stack.worker_ops)).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// A revoked policy decision re-arms its policy: under a policy whose blocks last an
/// hour, the attacker is blocked, an operator revokes the block, and the attacker, going
/// on, is blocked again by the same policy after crossing its threshold anew.
async fn a_revoked_block_rearms_its_policy(stack: &Stack, dir: &std::path::Path) {
    let policy = write_login_policy(dir, "1h");
    esperctl(
        &stack.api,
        &["policies", "apply", "-f", &policy.display().to_string()],
    );
    let active: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/api/v1/policies/active", stack.api))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("active policies")
        .json()
        .await
        .expect("active policies json");
    let revision = active["revision"].as_i64().expect("a revision");
    eventually(
        Duration::from_secs(15),
        "the worker on the hour-long policy",
        || async {
            (worker_metric(stack, "esper_policies_revision").await == revision).then_some(())
        },
    )
    .await;
    let rearmed = worker_metric(stack, "esper_policies_rearmed_total").await;
    attack_until_blocked(&stack.proxy).await;
    let out = esperctl(
        &stack.api,
        &["mitigations", "revoke", "--entity", "ip:127.0.0.2"],
    );
    assert!(out.contains("revoked"), "{out}");
    eventually(
        Duration::from_secs(5),
        "the revoke at the proxy",
        || async {
            (status_from("127.0.0.2", &format!("{}/", stack.proxy)).await == 200).then_some(())
        },
    )
    .await;
    eventually(Duration::from_secs(15), "the policy re-armed", || async {
        (worker_metric(stack, "esper_policies_rearmed_total").await == rearmed + 1).then_some(())
    })
    .await;
    let (elapsed, sent) = attack_until_blocked(&stack.proxy).await;
    println!("blocked again {elapsed:?} after the revocation ({sent} requests)");
    assert!(
        sent > 10,
        "the count starts afresh after a revocation; blocked after {sent} requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn esper_dev_runs_the_whole_scenario() {
    let dir = TempDir::new("dev");
    let policy = write_login_policy(dir.path(), "4s");
    let (proxy, proxy_ops, api, health) = (free_addr(), free_addr(), free_addr(), free_addr());
    let worker_ops = free_addr();
    let args: Vec<String> = [
        "dev".to_string(),
        "--data-dir".into(),
        dir.path().join("data").display().to_string(),
        "--policies".into(),
        policy.display().to_string(),
        "--proxy-listen".into(),
        proxy.to_string(),
        "--proxy-ops-listen".into(),
        proxy_ops.to_string(),
        "--api-listen".into(),
        api.to_string(),
        "--health-listen".into(),
        health.to_string(),
        "--metrics-listen".into(),
        free_addr().to_string(),
        "--ingestion-listen".into(),
        free_addr().to_string(),
        "--mitigation-listen".into(),
        free_addr().to_string(),
        "--worker-ops-listen".into(),
        worker_ops.to_string(),
    ]
    .into();
    // A shell set up for a production cluster does not stop the embedded stack.
    let mut dev = Proc::esper(
        "esper dev",
        &args,
        &[
            ("ESPER_ADMIN_TOKEN", TOKEN.to_string()),
            ("CLUSTER_MODE", "true".to_string()),
            ("ESPER_ACCESS_LOG", "mitigated".to_string()),
        ],
    );
    wait_ready(
        &format!("http://{proxy_ops}/readyz"),
        Duration::from_secs(60),
    )
    .await;
    wait_ready(&format!("http://{health}/readyz"), Duration::from_secs(30)).await;
    assert!(dev.log().contains("Esper dev stack is up"), "{}", dev.log());
    // Logs written to a pipe (a file, a collector) carry no terminal colour codes.
    assert!(!dev.log().contains('\u{1b}'), "{}", dev.log());
    assert!(dev.log().contains(" INFO "), "{}", dev.log());

    let stack = Stack {
        proxy: format!("http://{proxy}"),
        api: format!("http://{api}"),
        worker_ops: format!("http://{worker_ops}"),
    };
    attack_scenario(&stack, Duration::from_secs(4)).await;
    manual_ban_and_revoke(&stack).await;
    a_revoked_block_rearms_its_policy(&stack, dir.path()).await;

    // A hangup is logged, not fatal.
    std::process::Command::new("kill")
        .args(["-HUP", &dev.child_id().to_string()])
        .status()
        .expect("kill -HUP");
    eventually(Duration::from_secs(5), "the SIGHUP logged", || async {
        dev.log().contains("SIGHUP: esper dev").then_some(())
    })
    .await;
    assert_eq!(
        status_from("127.0.0.3", &format!("{}/", stack.proxy)).await,
        200
    );

    // A drained worker finishes and a fresh one takes its place: the stack goes on
    // deciding.
    let out = esperctl(&stack.api, &["workers", "drain", "dev-worker"]);
    assert!(out.contains("drain"), "{out}");
    eventually(Duration::from_secs(15), "a fresh worker", || async {
        dev.log()
            .contains("engine worker drained; starting a fresh one")
            .then_some(())
    })
    .await;
    esperctl(
        &stack.api,
        &["mitigations", "revoke", "--entity", "ip:127.0.0.2"],
    );
    wait_ready(
        &format!("{}/readyz", stack.worker_ops),
        Duration::from_secs(15),
    )
    .await;
    let (elapsed, sent) = attack_until_blocked(&stack.proxy).await;
    println!("blocked by the fresh worker {elapsed:?} after the drain ({sent} requests)");

    // What is in force comes back with a restart; what was revoked does not.
    esperctl(
        &stack.api,
        &["mitigations", "add", "ip:127.0.0.5", "--ttl", "1h"],
    );
    eventually(Duration::from_secs(5), "the ban at the proxy", || async {
        (status_from("127.0.0.5", &format!("{}/", stack.proxy)).await == 403).then_some(())
    })
    .await;
    // The access log (`mitigated`) has a line for each request a mitigation answered,
    // naming it, and none for the browsing client's.
    // The line is written once the answer is sent, and read from the process's pipe.
    let access_lines = || -> Vec<String> {
        dev.log()
            .lines()
            .filter(|l| l.contains(" esper_proxy::access: "))
            .map(String::from)
            .collect()
    };
    eventually(
        Duration::from_secs(5),
        "the blocked request's line",
        || async {
            access_lines()
                .iter()
                .any(|l| {
                    l.contains("client=127.0.0.5")
                        && l.contains("status=403")
                        && l.contains("action=\"block\"")
                        && !l.contains("mitigation=\"\"")
                })
                .then_some(())
        },
    )
    .await;
    let access = access_lines();
    assert!(
        !access.iter().any(|l| l.contains("client=127.0.0.3 ")),
        "{access:#?}"
    );
    // `esper server stop` (the API's shutdown) stops the whole stack, from its edge in,
    // as a signal does (below).
    let resp = reqwest::Client::new()
        .post(format!("{}/api/v1/admin/shutdown", stack.api))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"graceful": true, "timeout_secs": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let exited = loop {
        if let Some(code) = dev.try_exit() {
            break code;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running:\n{}",
            dev.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        exited,
        Some(0),
        "esper dev did not exit cleanly:\n{}",
        dev.log()
    );
    eventually(Duration::from_secs(5), "the last line", || async {
        dev.log().contains("Esper dev stack stopped.").then_some(())
    })
    .await;
    stopped_from_the_edge_in(&dev.log(), "shutdown asked through the control plane's API");
    let mut dev = Proc::esper(
        "esper dev again",
        &args,
        &[("ESPER_ADMIN_TOKEN", TOKEN.to_string())],
    );
    wait_ready(
        &format!("http://{proxy_ops}/readyz"),
        Duration::from_secs(60),
    )
    .await;
    eventually(Duration::from_secs(15), "the ban restored", || async {
        (status_from("127.0.0.5", &format!("{}/", stack.proxy)).await == 403).then_some(())
    })
    .await;
    assert_eq!(
        status_from("127.0.0.4", &format!("{}/", stack.proxy)).await,
        200,
        "a revoked ban stays revoked"
    );

    assert_eq!(
        dev.terminate(Duration::from_secs(30)),
        Some(0),
        "esper dev did not exit cleanly:\n{}",
        dev.log()
    );
    // The stack stops from its edge in, so no part's last words (the proxy's events,
    // the worker's claims and decisions) go to a broker already gone.
    eventually(Duration::from_secs(5), "the last line", || async {
        dev.log().contains("Esper dev stack stopped.").then_some(())
    })
    .await;
    stopped_from_the_edge_in(&dev.log(), "SIGTERM received");
}

/// The parts of `esper dev` stopped after `began` in `log` stopped from the edge in,
/// none with a warning or an error.
fn stopped_from_the_edge_in(log: &str, began: &str) {
    let stopping = log
        .split_once(began)
        .map(|(_, after)| after)
        .unwrap_or_else(|| panic!("no `{began}` line:\n{log}"));
    for line in stopping.lines() {
        assert!(
            !line.contains(" WARN ") && !line.contains(" ERROR "),
            "{line}\nin:\n{stopping}"
        );
    }
    let at = |needle: &str| {
        stopping
            .find(needle)
            .unwrap_or_else(|| panic!("no `{needle}` in:\n{stopping}"))
    };
    assert!(at("engine worker stopped") < at("ingestion broker stopped"));
    assert!(at("traffic listener stopped") < at("mitigation broker stopped"));
    assert!(at("mitigation broker stopped") < at("control plane stopped"));
}

/// Runs `esperctl ARGS` against the stack and returns its stdout; panics on failure.
fn esperctl(api: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_esperctl"))
        .args(args)
        .env("ESPER_SERVER", api)
        .env("ESPER_TOKEN", TOKEN)
        .output()
        .expect("run esperctl");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "esperctl {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_processes_run_the_scenario_and_survive_a_broker_outage() {
    five_processes(Stores::embedded()).await;
}

/// The same scenario with every store in production form: both brokers on one real
/// redis-server, the engine worker's state on it too, the control plane on a real
/// PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_processes_on_redis_and_postgres_run_the_scenario() {
    five_processes(Stores::production("e2e-five").await).await;
}

/// Five processes (both brokers, control plane, worker, proxy) over `stores`.
async fn five_processes(stores: Stores) {
    let dir = TempDir::new("five");
    let policy = write_login_policy(dir.path(), "4s");

    // The protected app: the demo shop, served by this test.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("upstream");
    let upstream_addr = upstream.local_addr().expect("upstream addr");
    let (_trigger, app_shutdown) = esper_common::Shutdown::new();
    tokio::spawn(esper::demo::serve(upstream, app_shutdown));

    let (ingestion, mitigation) = (free_addr(), free_addr());
    let (api, health, metrics) = (free_addr(), free_addr(), free_addr());
    let (worker_ops, proxy, proxy_ops) = (free_addr(), free_addr(), free_addr());
    let env = |extra: &[(&'static str, String)]| {
        let mut v = vec![("ESPER_BROKER_TOKEN", BROKER_TOKEN.to_string())];
        v.extend_from_slice(extra);
        v
    };
    let broker_env = env(&stores.broker_env());
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();

    let mut ingestion_p = Proc::esper(
        "ingestion broker",
        &s(&[
            "broker",
            "run",
            "ingestion",
            "--listen",
            &ingestion.to_string(),
        ]),
        &broker_env,
    );
    let mut mitigation_p = Proc::esper(
        "mitigation broker",
        &s(&[
            "broker",
            "run",
            "mitigation",
            "--listen",
            &mitigation.to_string(),
        ]),
        &broker_env,
    );
    let db = stores.database_url(dir.path());
    let server_p = Proc::esper(
        "server",
        &s(&[
            "server",
            "run",
            "--listen",
            &api.to_string(),
            "--health-listen",
            &health.to_string(),
            "--metrics-listen",
            &metrics.to_string(),
            "--database-url",
            &db,
            "--ingestion-url",
            &format!("http://{ingestion}"),
            "--mitigation-url",
            &format!("http://{mitigation}"),
        ]),
        &env(&[("ESPER_ADMIN_TOKEN", TOKEN.to_string())]),
    );
    wait_ready(&format!("http://{health}/readyz"), Duration::from_secs(30)).await;
    let api_url = format!("http://{api}");
    if stores.redis.is_some() {
        for addr in [ingestion, mitigation] {
            wait_ready(&format!("http://{addr}/readyz"), Duration::from_secs(30)).await;
            let detail = reqwest::get(format!("http://{addr}/healthz/detailed"))
                .await
                .expect("broker health")
                .text()
                .await
                .expect("broker health body");
            assert!(detail.contains("redis"), "{addr} is not on Redis: {detail}");
        }
    }

    // Policies go in through esperctl, as an operator would apply them.
    let policy_path = policy.display().to_string();
    let out = esperctl(&api_url, &["policies", "validate", "-f", &policy_path]);
    assert!(!out.trim().is_empty());
    esperctl(&api_url, &["policies", "apply", "-f", &policy_path]);
    let listed = esperctl(&api_url, &["policies", "list"]);
    assert!(listed.contains("login-brute-force"), "{listed}");

    let worker_p = Proc::esper(
        "worker",
        &s(&[
            "worker",
            "run",
            "engine",
            "--worker-id",
            "e2e-worker",
            "--listen",
            &worker_ops.to_string(),
            "--ingestion-url",
            &format!("http://{ingestion}"),
            "--mitigation-url",
            &format!("http://{mitigation}"),
            "--control-url",
            &api_url,
        ]),
        &env(&[
            vec![("ESPER_TOKEN", TOKEN.to_string())],
            stores.worker_env(),
        ]
        .concat()),
    );
    let proxy_p = Proc::esper(
        "proxy",
        &s(&[
            "proxy",
            "run",
            "--listen",
            &proxy.to_string(),
            "--ops-listen",
            &proxy_ops.to_string(),
            "--upstream",
            &upstream_addr.to_string(),
            "--ingestion-url",
            &format!("http://{ingestion}"),
            "--mitigation-url",
            &format!("http://{mitigation}"),
            "--control-url",
            &api_url,
        ]),
        &env(&[("ESPER_TOKEN", TOKEN.to_string())]),
    );
    wait_ready(
        &format!("http://{worker_ops}/readyz"),
        Duration::from_secs(30),
    )
    .await;
    wait_ready(
        &format!("http://{proxy_ops}/readyz"),
        Duration::from_secs(30),
    )
    .await;

    let stack = Stack {
        proxy: format!("http://{proxy}"),
        api: api_url.clone(),
        worker_ops: format!("http://{worker_ops}"),
    };
    attack_scenario(&stack, Duration::from_secs(4)).await;
    manual_ban_and_revoke(&stack).await;
    a_revoked_block_rearms_its_policy(&stack, dir.path()).await;

    // esperctl sees every part.
    let status = esperctl(&api_url, &["--output", "json", "status"]);
    let status: serde_json::Value = serde_json::from_str(&status).expect("status json");
    assert!(status.to_string().contains("e2e-worker"), "{status}");
    let table = esperctl(&api_url, &["status"]);
    assert!(!table.trim().is_empty());

    // A ban in force, then both brokers go away: the proxy keeps serving and enforcing.
    esperctl(
        &api_url,
        &[
            "mitigations",
            "add",
            "ip:127.0.0.5",
            "--action",
            "block",
            "--ttl",
            "1h",
            "--reason",
            "outage test",
        ],
    );
    eventually(
        Duration::from_secs(5),
        "the ban before the outage",
        || async {
            (status_from("127.0.0.5", &format!("{}/", stack.proxy)).await == 403).then_some(())
        },
    )
    .await;
    assert_eq!(
        ingestion_p.terminate(Duration::from_secs(15)),
        Some(0),
        "{}",
        ingestion_p.log()
    );
    assert_eq!(
        mitigation_p.terminate(Duration::from_secs(15)),
        Some(0),
        "{}",
        mitigation_p.log()
    );
    for _ in 0..20 {
        assert_eq!(
            status_from("127.0.0.3", &format!("{}/", stack.proxy)).await,
            200
        );
        assert_eq!(
            status_from("127.0.0.5", &format!("{}/", stack.proxy)).await,
            403
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready = reqwest::get(format!("http://{proxy_ops}/readyz"))
        .await
        .expect("proxy readyz");
    assert_eq!(
        ready.status().as_u16(),
        200,
        "the proxy must stay ready without its brokers"
    );
    drop((worker_p, proxy_p, server_p));
}

/// Both brokers on a real redis-server, a proxy in front of the demo shop, a client
/// browsing throughout: Redis stops and comes back (empty). The brokers answer not ready
/// while it is down and recover on their own; the proxy answers every request all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_ride_out_a_redis_restart_while_the_proxy_keeps_serving() {
    let mut redis = redis_server::RedisServer::start();
    let stores = Stores {
        redis: Some((redis.url(), redis_server::unique_prefix("e2e-restart"))),
        database_url: None,
    };
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("upstream");
    let upstream_addr = upstream.local_addr().expect("upstream addr");
    let (_trigger, app_shutdown) = esper_common::Shutdown::new();
    tokio::spawn(esper::demo::serve(upstream, app_shutdown));

    let (ingestion, mitigation, proxy, proxy_ops) =
        (free_addr(), free_addr(), free_addr(), free_addr());
    let mut env = stores.broker_env();
    env.push(("ESPER_BROKER_TOKEN", BROKER_TOKEN.to_string()));
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let brokers = [("ingestion", ingestion), ("mitigation", mitigation)].map(|(kind, addr)| {
        Proc::esper(
            kind,
            &s(&["broker", "run", kind, "--listen", &addr.to_string()]),
            &env,
        )
    });
    let _proxy_p = Proc::esper(
        "proxy",
        &s(&[
            "proxy",
            "run",
            "--listen",
            &proxy.to_string(),
            "--ops-listen",
            &proxy_ops.to_string(),
            "--upstream",
            &upstream_addr.to_string(),
            "--ingestion-url",
            &format!("http://{ingestion}"),
            "--mitigation-url",
            &format!("http://{mitigation}"),
        ]),
        &[("ESPER_BROKER_TOKEN", BROKER_TOKEN.to_string())],
    );
    let readyz = |addr: std::net::SocketAddr| format!("http://{addr}/readyz");
    for addr in [ingestion, mitigation, proxy_ops] {
        wait_ready(&readyz(addr), Duration::from_secs(30)).await;
    }
    let publisher = esper_protocol::MitigationClient::new(
        &format!("http://{mitigation}"),
        Some(BROKER_TOKEN.to_string()),
    );
    let ban = |ip: &str| {
        esper_protocol::Mitigation::new(
            format!("ip:{ip}").parse().expect("entity"),
            esper_protocol::Action::Block,
            Duration::from_secs(3600),
            esper_protocol::Origin::Manual,
            esper_protocol::Reason::default(),
        )
    };
    let proxy_url = format!("http://{proxy}/");
    publisher
        .publish(vec![ban("127.0.0.5")])
        .await
        .expect("publish");
    eventually(Duration::from_secs(5), "the ban at the proxy", || async {
        (status_from("127.0.0.5", &proxy_url).await == 403).then_some(())
    })
    .await;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let browser = browse(format!("http://{proxy}"), stop_rx);
    let status_of = |url: String| async move {
        reqwest::get(url)
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };

    tokio::task::block_in_place(|| redis.stop());
    for addr in [ingestion, mitigation] {
        eventually(Duration::from_secs(10), "a broker to say not ready", || {
            let url = readyz(addr);
            async move { (status_of(url).await == 503).then_some(()) }
        })
        .await;
    }
    // The proxy serves and enforces what it holds while the brokers cannot.
    for _ in 0..10 {
        assert_eq!(status_from("127.0.0.5", &proxy_url).await, 403);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status_of(readyz(proxy_ops)).await, 200);

    tokio::task::block_in_place(|| redis.restart());
    for addr in [ingestion, mitigation] {
        eventually(Duration::from_secs(15), "a broker to recover", || {
            let url = readyz(addr);
            async move { (status_of(url).await == 200).then_some(()) }
        })
        .await;
    }
    // The stream flows again: a new ban reaches the proxy.
    eventually(
        Duration::from_secs(10),
        "a publish after the restart",
        || {
            let publisher = publisher.clone();
            async move { publisher.publish(vec![ban("127.0.0.6")]).await.ok() }
        },
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the new ban at the proxy",
        || async { (status_from("127.0.0.6", &proxy_url).await == 403).then_some(()) },
    )
    .await;

    stop_tx.send(true).ok();
    let seen = browser.await.expect("browser task");
    assert!(
        seen.requests > 10,
        "browser made only {} requests",
        seen.requests
    );
    assert!(
        seen.refused.is_empty(),
        "the browsing client was refused: {:?}",
        seen.refused
    );
    assert_eq!(
        seen.failed, 0,
        "requests through the proxy failed during the Redis restart"
    );
    drop(brokers);
}
