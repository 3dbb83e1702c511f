//! `esperctl` as an operator runs it: the real binary against a control plane started in
//! this process with real ingestion and mitigation brokers, on loopback ephemeral ports.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use esper_common::{Shutdown, ShutdownTrigger};
use esper_control::{Config, Listeners};
use tokio::net::TcpListener;

#[allow(dead_code)] // only `refusing_addr` is used here
#[path = "../../../brokers/testing/ports.rs"]
mod ports;

const TOKEN: &str = "cli-test-token-0123456789";

const POLICIES: &str = r#"[[policy]]
id = "login-burst"
window = "60s"
threshold = 10
action = "block"
[policy.match]
methods = ["POST"]
paths = ["/login"]
"#;

/// Brokers and a control plane, stopped when dropped.
struct Stack {
    api: String,
    dir: PathBuf,
    _trigger: ShutdownTrigger,
}

impl Stack {
    async fn start() -> Stack {
        let (trigger, shutdown) = Shutdown::new();
        let loopback = || async { TcpListener::bind("127.0.0.1:0").await.unwrap() };
        let ingestion = esper_ingestion::start(
            esper_ingestion::Config::default(),
            loopback().await,
            shutdown.clone(),
        )
        .await
        .unwrap();
        let mitigation = esper_mitigation::start(
            esper_mitigation::Config::default(),
            loopback().await,
            shutdown.clone(),
        )
        .await
        .unwrap();
        let dir = std::env::temp_dir().join(format!("esperctl-test-{}", uuid::Uuid::new_v4()));
        let config = Config {
            database_url: format!("sqlite://{}?mode=rwc", dir.join("esper.db").display()),
            ingestion_url: format!("http://{}", ingestion.local_addr()),
            mitigation_url: format!("http://{}", mitigation.local_addr()),
            admin_token: Some(TOKEN.into()),
            ..Config::default()
        };
        let started = esper_control::start(config, Listeners::loopback().await.unwrap(), shutdown)
            .await
            .unwrap();
        Stack {
            api: format!("http://{}", started.api_addr),
            dir,
            _trigger: trigger,
        }
    }

    /// Writes `text` to a file in the stack's directory.
    fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    async fn ctl(&self, args: &[&str]) -> Out {
        run(&self.api, Some(TOKEN), args).await
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl Out {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }
}

/// Runs the binary with a clean environment for its own variables.
async fn run(server: &str, token: Option<&str>, args: &[&str]) -> Out {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_esperctl"));
    cmd.args(args)
        .env("ESPER_SERVER", server)
        .env_remove("ESPER_TOKEN")
        .env_remove("ESPER_TOKEN_FILE");
    if let Some(t) = token {
        cmd.env("ESPER_TOKEN", t);
    }
    let out = cmd.output().await.unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A token in a file, as the services read one: `ESPER_TOKEN_FILE`.
#[tokio::test]
async fn the_token_may_come_from_a_file() {
    let s = Stack::start().await;
    let dir = std::env::temp_dir().join(format!("esperctl-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("token");
    std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
    let with_file = |path: std::path::PathBuf| {
        let api = s.api.clone();
        async move {
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_esperctl"))
                .args(["-o", "json", "status"])
                .env("ESPER_SERVER", api)
                .env_remove("ESPER_TOKEN")
                .env("ESPER_TOKEN_FILE", path)
                .output()
                .await
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    assert_eq!(with_file(file).await, (Some(0), String::new()));
    let (code, stderr) = with_file(dir.join("missing")).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.starts_with("esperctl: ")
            && stderr.contains("ESPER_TOKEN_FILE")
            && stderr.lines().count() == 1,
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn errors_are_one_line_with_the_right_exit_code() {
    let s = Stack::start().await;
    let out = run(&s.api, None, &["status"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(out.stderr, "esperctl: 401 unauthorized: set ESPER_TOKEN\n");
    let out = run(&s.api, Some("wrong"), &["policies", "list"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("the server refused the token"),
        "{out:?}"
    );

    let url = format!("http://{}", ports::refusing_addr());
    let out = run(&url, Some(TOKEN), &["status"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(
        out.stderr,
        format!("esperctl: cannot reach the control plane at {url}: connection refused\n")
    );

    // Usage errors too: what is wrong and the command's usage, on one line.
    let out = run(&s.api, Some(TOKEN), &["policies", "apply", "--fil", "x"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert_eq!(
        out.stderr,
        "esperctl: unexpected argument '--fil' found; a similar argument exists: '--file' \
         (usage: esperctl policies apply --file <FILE>)\n",
        "{out:?}"
    );
    let out = run(&s.api, Some(TOKEN), &["policies", "show", "--help"]).await;
    assert_eq!(out.code, 0, "help is not an error: {out:?}");
    assert!(
        out.stdout.contains("Usage: esperctl policies show"),
        "{out:?}"
    );

    // A plain-HTTP control plane given as https://.
    let tls_url = s.api.replacen("http://", "https://", 1);
    let out = run(&tls_url, Some(TOKEN), &["status"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("it does not answer TLS"), "{out:?}");

    let out = s.ctl(&["policies", "show", "nope"]).await;
    assert_eq!(
        out.code, 2,
        "what the server refuses is bad input too: {out:?}"
    );
    assert_eq!(out.stderr, "esperctl: 404 not_found: no policy `nope`\n");

    let bad = s.file("policies.toml", &POLICIES.replace("\"block\"", "\"blok\""));
    let out = s
        .ctl(&["policies", "validate", "-f", bad.to_str().unwrap()])
        .await;
    assert_eq!(out.code, 2, "{out:?}");
    assert_eq!(
        out.stderr,
        format!(
            "esperctl: {} line 5, column 10: policy \"login-burst\": unknown action \"blok\" (expected block, throttle, tarpit, challenge or log)\n",
            bad.display()
        )
    );
    let out = s
        .ctl(&["policies", "apply", "-f", bad.to_str().unwrap()])
        .await;
    assert_eq!(out.code, 2, "apply validates locally first: {out:?}");
    let empty = s.file("empty.toml", "# no policies yet\n");
    let out = s
        .ctl(&["policies", "validate", "-f", empty.to_str().unwrap()])
        .await;
    assert_eq!(out.code, 2, "what apply refuses is not valid: {out:?}");
    assert!(
        out.stderr
            .ends_with("no [[policy]] tables: nothing to apply\n"),
        "{out:?}"
    );
    let out = s
        .ctl(&[
            "mitigations",
            "revoke",
            "00000000-0000-0000-0000-000000000000",
        ])
        .await;
    assert_eq!(
        out.code, 2,
        "an unknown id is a typo, not a success: {out:?}"
    );
    assert!(out.stderr.contains("404 not_found"), "{out:?}");
    let out = s
        .ctl(&["policies", "apply", "-f", "/nonexistent.toml"])
        .await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr
            .starts_with("esperctl: cannot read /nonexistent.toml")
    );

    let out = s.ctl(&["mitigations", "revoke"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    let out = s.ctl(&["mitigations", "add", "1.2.3.4"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("has no kind"), "{out:?}");
    let out = s
        .ctl(&["mitigations", "add", "ip:1.2.3.4", "--action", "throttle"])
        .await;
    assert_eq!(out.code, 2, "{out:?}");
    assert_eq!(
        out.stderr,
        "esperctl: --action throttle needs --rate (requests per second, above 0)\n"
    );
    let out = s.ctl(&["frobnicate"]).await;
    assert_eq!(out.code, 2, "clap usage errors: {out:?}");
    let out = s
        .ctl(&[
            "mitigations",
            "add",
            "ip:1.2.3.4",
            "--action",
            "block",
            "--ttl",
            "400d",
        ])
        .await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr.starts_with("esperctl: 400 invalid_ttl: "),
        "{out:?}"
    );
    let out = s.ctl(&["workers", "drain", "nobody"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert_eq!(
        out.stderr,
        "esperctl: 404 not_found: no worker `nobody` has sent a heartbeat\n"
    );

    // A throttle is held to the bounds every publisher checks.
    for (rate, burst) in [("5", "2000000"), ("1e300", "10"), ("0", "1")] {
        let out = s
            .ctl(&[
                "mitigations",
                "add",
                "ip:1.2.3.4",
                "--action",
                "throttle",
                "--rate",
                rate,
                "--burst",
                burst,
            ])
            .await;
        assert_eq!(out.code, 2, "{rate}/{burst}: {out:?}");
        assert!(out.stderr.starts_with("esperctl: --rate "), "{out:?}");
    }
    // An empty name names nothing: refused before any request.
    for args in [
        &["policies", "show", ""][..],
        &["lists", "delete", " "],
        &["tokens", "revoke", ""],
        &["workers", "drain", ""],
        &["mitigations", "revoke", ""],
        &["mitigations", "show", ""],
    ] {
        let out = s.ctl(args).await;
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
        assert!(
            out.stderr.contains("must not be empty"),
            "{args:?}: {out:?}"
        );
    }
    // A reference not found is an error in JSON output too.
    let out = s
        .ctl(&["-o", "json", "mitigations", "show", "a13d4656"])
        .await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("404 not_found"), "{out:?}");
    // Both inputs of a test cannot come from stdin; a file of no policies tests nothing.
    let out = s
        .ctl(&["policies", "test", "-f", "-", "--events", "-"])
        .await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("cannot both read stdin"), "{out:?}");
    let events = s.file("events.jsonl", "");
    let out = s
        .ctl(&[
            "policies",
            "test",
            "-f",
            empty.to_str().unwrap(),
            "--events",
            events.to_str().unwrap(),
        ])
        .await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.ends_with("nothing to test\n"), "{out:?}");
    // A token a header cannot carry is the caller's mistake, not an unreachable server.
    let out = run(&s.api, Some("bad\ntoken"), &["status"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("a line break?"), "{out:?}");
    let with_user = s.api.replacen("http://", "http://user:pw@", 1);
    let out = run(&with_user, Some(TOKEN), &["status"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("carries credentials"), "{out:?}");
}

/// The `esper` binary's control plane refuses a proxy document no proxy would apply,
/// with the reason a proxy would give.
#[tokio::test]
async fn a_proxy_document_no_proxy_would_apply_is_refused() {
    esper_control::check_proxy_documents_with(esper_proxy::check_document);
    let s = Stack::start().await;
    let put = async |doc: &str| {
        let resp = reqwest::Client::new()
            .put(format!("{}/api/v1/proxies/config", s.api))
            .bearer_auth(TOKEN)
            .json(&serde_json::json!({ "config": doc }))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json::<serde_json::Value>().await.unwrap())
    };
    for (doc, says) in [
        ("bogus = 1", "bogus"),
        ("sample_rate = 5.0", "sample_rate"),
        ("sample_rate = \"lots\"", "sample_rate"),
        ("allow_ips = [\"office\"]", "`office`"),
        ("[[apps]]\nname = \"x\"", "upstream"),
    ] {
        let (status, body) = put(doc).await;
        assert_eq!(status, 400, "{doc}: {body}");
        assert_eq!(body["error"], "invalid_config", "{body}");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.starts_with("a proxy would refuse this configuration:")
                && message.contains(says),
            "{doc}: {message}"
        );
    }
    for doc in [
        "sample_rate = 0.5\nallow_ips = [\"10.0.0.0/8\", \"192.0.2.7\"]",
        "[[apps]]\nname = \"shop\"\nupstreams = [\"127.0.0.1:3000\"]",
        // Valid with what each proxy sets itself (its own apps, a larger buffer).
        "default_app = \"shop\"",
        "batch_size = 20000",
    ] {
        let (status, body) = put(doc).await;
        assert_eq!(status, 200, "{doc}: {body}");
    }
}

#[tokio::test]
async fn policies_from_file_to_history() {
    let s = Stack::start().await;
    let file = s.file("policies.toml", POLICIES);
    let f = file.to_str().unwrap();
    let out = s.ctl(&["policies", "validate", "-f", f]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, format!("{f}: 1 policy valid\n"));

    let out = s.ctl(&["policies", "apply", "-f", f]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0], "ID           VERSION  RESULT");
    assert_eq!(lines[1], "login-burst  1        changed");
    let out = s.ctl(&["policies", "apply", "-f", f]).await;
    assert!(
        out.stdout.contains("login-burst  1        unchanged"),
        "{out:?}"
    );

    let out = s.ctl(&["policies", "list"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(
        lines[0].starts_with(
            "ID           VERSION  ENABLED  MODE     ACTION  ENTITY  THRESHOLD  WINDOW  UPDATED"
        ),
        "{out:?}"
    );
    assert!(
        lines[1]
            .starts_with("login-burst  1        yes      enforce  block   ip      10         1m"),
        "{out:?}"
    );

    let out = s.ctl(&["-o", "json", "policies", "list"]).await;
    let v = out.json();
    assert_eq!(v["policies"][0]["id"], "login-burst");

    let out = s.ctl(&["policies", "shadow", "login-burst"]).await;
    assert!(
        out.stdout.contains("login-burst  2        changed"),
        "{out:?}"
    );
    let out = s.ctl(&["policies", "show", "login-burst"]).await;
    assert!(
        out.stdout
            .starts_with("# login-burst version 2, enabled, shadow"),
        "{out:?}"
    );
    let toml_start = out.stdout.find("[[policy]]").unwrap();
    let back = esper_engine::policy::parse_policies(&out.stdout[toml_start..]).unwrap();
    assert_eq!(back[0].mode.to_string(), "shadow");

    let out = s
        .ctl(&["policies", "history", "login-burst", "--output", "json"])
        .await;
    let v = out.json();
    assert_eq!(v["versions"][1]["change"], "shadow");
    let out = s.ctl(&["policies", "delete", "login-burst"]).await;
    assert_eq!(out.stdout, "policy login-burst deleted\n");
    let out = s.ctl(&["policies", "list"]).await;
    assert_eq!(out.stdout, "no policies\n");
}

#[tokio::test]
async fn mitigations_queue_lists_and_decisions() {
    let s = Stack::start().await;
    let out = s
        .ctl(&[
            "mitigations",
            "add",
            "ip:198.51.100.7",
            "--ttl",
            "30m",
            "--reason",
            "abuse",
        ])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.starts_with("ID"), "{out:?}");
    assert!(out.stdout.contains("ip:198.51.100.7"), "{out:?}");
    assert!(
        out.stdout.contains("in 29m") || out.stdout.contains("in 30m"),
        "{out:?}"
    );

    let out = s
        .ctl(&[
            "mitigations",
            "add",
            "cidr:203.0.113.0/24",
            "--action",
            "tarpit",
            "--delay",
            "2s",
            "-o",
            "json",
        ])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.json()["action"],
        serde_json::json!({"type": "tarpit", "delay_ms": 2000})
    );
    // A decision's reference (what block pages print) leads to its record.
    let reference = out.json()["id"].as_str().unwrap().to_string();
    let out = s.ctl(&["mitigations", "show", &reference]).await;
    assert_eq!(out.code, 0, "{out:?}");
    for line in [
        format!("reference  {reference}"),
        "entity     cidr:203.0.113.0/24".to_string(),
        "policy     - (manual)".to_string(),
    ] {
        assert!(out.stdout.contains(&line), "{line}: {out:?}");
    }
    let out = s.ctl(&["mitigations", "show", "no-such-reference"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr
            .contains("no decision with reference `no-such-reference`"),
        "{out:?}"
    );

    let out = s.ctl(&["mitigations", "list", "-o", "json"]).await;
    assert_eq!(out.json()["total"], 2);
    let out = s.ctl(&["mitigations", "show", "cidr:203.0.113.0/24"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.starts_with("cidr:203.0.113.0/24\n"), "{out:?}");
    assert!(out.stdout.contains("control:admin"), "{out:?}");

    let out = s
        .ctl(&["decisions", "list", "--entity", "ip:198.51.100.7"])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout
            .lines()
            .nth(1)
            .unwrap()
            .contains("ip:198.51.100.7"),
        "{out:?}"
    );

    let out = s
        .ctl(&["mitigations", "revoke", "--entity", "ip:198.51.100.7"])
        .await;
    assert_eq!(out.stdout, "1 mitigation revoked\n", "{out:?}");

    let out = s.ctl(&["queue", "pause"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("paused yes"), "{out:?}");
    let out = s.ctl(&["queue", "resume", "-o", "json"]).await;
    assert_eq!(out.json()["paused"], false);

    let out = s.ctl(&["proxies", "rotate-challenge-key"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.stdout, "challenge key made (revision 1); proxies sign with it as they hear of it\n",
        "no proxy had asked for one: {out:?}"
    );
    let out = s.ctl(&["proxies", "rotate-challenge-key"]).await;
    assert_eq!(
        out.stdout,
        "challenge key rotated (revision 2); proxies sign with it as they hear of it; cookies signed with the key before stay valid until they expire\n",
        "{out:?}"
    );
    let out = s
        .ctl(&[
            "proxy",
            "rotate-challenge-key",
            "--drop-previous",
            "-o",
            "json",
        ])
        .await;
    assert_eq!(out.json()["revision"], 3, "{out:?}");
    assert_eq!(out.json()["previous_honoured"], false, "{out:?}");
    // Which key each proxy signs with, as its heartbeat says.
    let beat = serde_json::json!({"proxy_id": "edge-1", "apps": ["shop"], "cache_entries": 0,
        "requests_total": 0, "events_sent_total": 0, "events_dropped_total": 0,
        "stream_connected": true, "started_at": chrono::Utc::now(), "challenge_key_revision": 3});
    let status = reqwest::Client::new()
        .post(format!("{}/api/v1/proxies/heartbeat", s.api))
        .bearer_auth(TOKEN)
        .json(&beat)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
    let out = s.ctl(&["proxies", "list"]).await;
    let mut lines = out.stdout.lines();
    let head: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let at = |name: &str| head.iter().position(|h| *h == name).unwrap();
    assert_eq!(
        row[at("CONFIG")],
        "-",
        "no configuration from the control plane: {out:?}"
    );
    assert_eq!(row[at("KEY")], "3", "{out:?}");
    // An app scope is checked against what the proxies report: a misspelt one is taken
    // (a proxy may yet serve it) with a warning.
    let out = s
        .ctl(&["mitigations", "add", "ip:198.51.100.9", "--app", "shop"])
        .await;
    assert_eq!((out.code, out.stderr.as_str()), (0, ""), "{out:?}");
    let out = s
        .ctl(&["mitigations", "add", "ip:198.51.100.9", "--app", "shpo"])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.stderr,
        "warning: no proxy reports an app `shpo` (apps reported: shop); the mitigation applies only where one does\n"
    );
    let out = s
        .ctl(&["mitigations", "revoke", "--entity", "ip:198.51.100.9"])
        .await;
    assert_eq!(out.stdout, "2 mitigations revoked\n", "{out:?}");

    let out = s
        .ctl(&[
            "lists",
            "set",
            "office",
            "--item",
            "10.0.0.0/8",
            "--item",
            "192.0.2.1",
        ])
        .await;
    assert_eq!(
        out.stdout, "list office stored (ip list, 2 items)\n",
        "{out:?}"
    );
    // Items may also follow the name, as they do on `ipset add`.
    let out = s
        .ctl(&[
            "lists",
            "set",
            "office",
            "10.0.0.0/8",
            "192.0.2.1",
            "--item",
            "2001:db8::/32",
        ])
        .await;
    assert_eq!(
        out.stdout, "list office stored (ip list, 3 items)\n",
        "{out:?}"
    );
    let out = s
        .ctl(&["lists", "set", "office", "10.0.0.0/8", "-f", "-"])
        .await;
    assert_eq!(out.code, 2, "items and a file at once: {out:?}");
    let file = s.file("office.txt", "# office\n10.0.0.0/8\nnot-an-ip\n");
    let out = s
        .ctl(&["lists", "set", "office", "-f", file.to_str().unwrap()])
        .await;
    assert_eq!(out.code, 2, "validated locally: {out:?}");
    assert!(
        out.stderr
            .contains("item 2: \"not-an-ip\" is not an IP address"),
        "{out:?}"
    );
    let out = s.ctl(&["lists", "list"]).await;
    assert!(
        out.stdout
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("office  ip    3"),
        "{out:?}"
    );
    // Nothing to store is refused, not taken as "empty the list"; `--empty` says so.
    let out = s.ctl(&["lists", "set", "office"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("--empty"), "{out:?}");
    let blank = s.file("blank.txt", "# nothing yet\n\n");
    let out = s
        .ctl(&["lists", "set", "office", "-f", blank.to_str().unwrap()])
        .await;
    assert_eq!(out.code, 2, "{out:?}");
    let out = s.ctl(&["lists", "show", "office"]).await;
    assert!(out.stdout.contains("3 items"), "left as it was: {out:?}");
    let out = s.ctl(&["lists", "set", "spare", "--empty"]).await;
    assert_eq!(
        out.stdout, "list spare stored (ip list, 0 items)\n",
        "{out:?}"
    );

    // A string list keeps its kind when its items are replaced, and a `#` inside an item.
    let agents = s.file("agents.txt", "# bad agents\nC# client\nfoo#bar\n");
    let out = s
        .ctl(&[
            "lists",
            "set",
            "agents",
            "--kind",
            "string",
            "-f",
            agents.to_str().unwrap(),
        ])
        .await;
    assert_eq!(
        out.stdout, "list agents stored (string list, 2 items)\n",
        "{out:?}"
    );
    let out = s.ctl(&["lists", "show", "agents"]).await;
    assert!(out.stdout.ends_with("\nC# client\nfoo#bar\n"), "{out:?}");
    let out = s.ctl(&["lists", "set", "agents", "1.2.3.4"]).await;
    assert_eq!(
        out.stdout, "list agents stored (string list, 1 item)\n",
        "{out:?}"
    );
    for name in ["agents", "spare"] {
        assert_eq!(s.ctl(&["lists", "delete", name]).await.code, 0);
    }
    let out = s.ctl(&["lists", "delete", "office"]).await;
    assert_eq!(out.stdout, "list office deleted\n");

    let out = s.ctl(&["status"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.starts_with("COMPONENT"), "{out:?}");
    assert!(out.stdout.contains("mitigation  reachable"), "{out:?}");
    assert!(out.stdout.contains("workers     NONE ALIVE"), "{out:?}");
    let out = s.ctl(&["status", "-o", "json"]).await;
    let v = out.json();
    assert_eq!(v["mitigation"]["active"], 1);
    let out = s.ctl(&["workers", "list"]).await;
    assert_eq!(out.stdout, "no workers have reported\n");
}

#[tokio::test]
async fn tokens_are_created_listed_used_and_revoked() {
    let s = Stack::start().await;
    let out = s.ctl(&["tokens", "list"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.stdout,
        "no stored tokens (only the configured admin token)\n"
    );

    let out = s.ctl(&["tokens", "create", "dash", "--role", "read"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        lines[0],
        "token dash created with the read role; it is shown this once:"
    );
    let read = lines[1].to_string();
    assert!(read.starts_with("esper_"), "{out:?}");
    let out = s
        .ctl(&[
            "tokens", "create", "edge", "--role", "service", "-o", "json",
        ])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["role"], "service");

    let out = s.ctl(&["tokens", "list"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let rows: Vec<Vec<&str>> = out
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0], ["NAME", "ROLE", "CREATED", "BY", "LAST", "USED"]);
    assert_eq!(
        (rows[1][0], rows[1][1], rows[1][3], rows[1][4]),
        ("dash", "read", "admin", "never")
    );
    assert_eq!((rows[2][0], rows[2][1]), ("edge", "service"));

    // The read token reads and is refused a change, as a server error (exit 1).
    let out = run(&s.api, Some(&read), &["policies", "list"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let file = s.file("p.toml", POLICIES);
    let out = run(
        &s.api,
        Some(&read),
        &["policies", "apply", "-f", file.to_str().unwrap()],
    )
    .await;
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(
        out.stderr,
        "esperctl: 403 forbidden: token `dash` has the read role, which may not call POST \
         /api/v1/policies\n"
    );

    // Input errors stay on this side: exit 2, nothing sent.
    let out = s
        .ctl(&["tokens", "create", "admin", "--role", "read"])
        .await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("reserved"), "{out:?}");
    let out = s.ctl(&["tokens", "create", "x"]).await;
    assert_eq!(out.code, 2, "--role is required: {out:?}");
    let out = s
        .ctl(&["tokens", "create", "dash", "--role", "admin"])
        .await;
    assert_eq!(out.code, 2, "a taken name: {out:?}");
    assert!(out.stderr.contains("409 conflict"), "{out:?}");

    let out = s.ctl(&["tokens", "revoke", "dash"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.stdout,
        "token dash revoked: it is refused from its next request\n"
    );
    let out = run(&s.api, Some(&read), &["policies", "list"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.starts_with("esperctl: 401 unauthorized"),
        "{out:?}"
    );
    let out = s.ctl(&["tokens", "revoke", "dash"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert_eq!(out.stderr, "esperctl: 404 not_found: no token `dash`\n");
}
