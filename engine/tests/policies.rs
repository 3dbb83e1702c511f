//! The shipped policy library (conf/policies): every file parses, and replaying its
//! fixture (conf/policies/fixtures/NAME.jsonl) gives exactly the expected decisions.

use std::path::PathBuf;

use esper_engine::parse_policies;
use esper_engine::replay::{read_events, replay_specs};
use esper_protocol::DecisionMode;

fn library() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../conf/policies")
}

/// (time after 10:00, policy, entity, action, shadow?)
type Expected = (&'static str, &'static str, &'static str, &'static str, bool);

async fn check(name: &str, expected: &[Expected]) {
    let dir = library();
    let text = std::fs::read_to_string(dir.join(format!("{name}.toml"))).expect("policy file");
    let specs = parse_policies(&text).unwrap_or_else(|e| panic!("{name}.toml {e}"));
    let events_text =
        std::fs::read_to_string(dir.join(format!("fixtures/{name}.jsonl"))).expect("fixture");
    let events = read_events(&events_text).expect("fixture events");
    let report = replay_specs(specs, &events).await.expect("replay");
    assert!(report.warnings.is_empty(), "{name}: {:?}", report.warnings);
    let got: Vec<_> = report
        .decisions
        .iter()
        .map(|d| {
            let time = d.time.format("%H:%M:%S%.3f").to_string();
            let time = time.strip_suffix(".000").unwrap_or(&time).to_string();
            (
                time,
                d.policy.clone(),
                d.entity.to_string(),
                d.action.to_string(),
                d.mode == DecisionMode::Shadow,
            )
        })
        .collect();
    let want: Vec<_> = expected
        .iter()
        .map(|(t, p, e, a, s)| {
            (
                format!("10:{t}"),
                p.to_string(),
                e.to_string(),
                a.to_string(),
                *s,
            )
        })
        .collect();
    assert_eq!(got, want, "{name}");
    for d in &report.decisions {
        assert!(d.counted >= d.threshold - 1e-9, "{name}: {d:?}");
        assert!(!d.condition.is_empty());
    }
}

#[test]
fn every_library_file_parses_and_has_a_fixture() {
    let dir = library();
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            parse_policies(&text).unwrap_or_else(|e| panic!("{} {e}", path.display()));
            let stem = path.file_stem().unwrap().to_string_lossy().to_string();
            assert!(
                dir.join(format!("fixtures/{stem}.jsonl")).exists(),
                "{stem} has no fixture"
            );
            n += 1;
        }
    }
    assert!(n >= 8, "{n} policy files");
}

#[tokio::test]
async fn login_brute_force() {
    check(
        "login-brute-force",
        &[(
            "00:09",
            "login-brute-force",
            "ip:203.0.113.7",
            "block",
            false,
        )],
    )
    .await;
}

#[tokio::test]
async fn not_found_scanning() {
    check(
        "not-found-scanning",
        &[(
            "01:38",
            "not-found-scanning",
            "cidr:198.51.100.0/24",
            "tarpit(2000ms)",
            true,
        )],
    )
    .await;
}

#[tokio::test]
async fn scraping() {
    check(
        "scraping",
        &[
            (
                "00:29.900",
                "product-scraping",
                "ip:192.0.2.51",
                "throttle(2/s, burst 5)",
                false,
            ),
            ("01:39", "catalogue-crawl", "ip:192.0.2.50", "block", false),
        ],
    )
    .await;
}

#[tokio::test]
async fn credential_stuffing() {
    check(
        "credential-stuffing",
        &[(
            "00:57",
            "credential-stuffing",
            "ip:203.0.113.9",
            "block",
            false,
        )],
    )
    .await;
}

#[tokio::test]
async fn api_key_abuse() {
    check(
        "api-key-abuse",
        &[
            (
                "00:29.500",
                "api-key-abuse",
                "header:x-api-key=k-leaked",
                "throttle(5/s, burst 10)",
                false,
            ),
            (
                "00:59.500",
                "api-key-abuse",
                "header:x-api-key=k-leaked",
                "block",
                false,
            ),
        ],
    )
    .await;
}

#[tokio::test]
async fn distributed_flood() {
    check(
        "distributed-flood",
        &[(
            "00:04.900",
            "network-flood",
            "cidr:203.0.113.0/24",
            "throttle(20/s, burst 40)",
            false,
        )],
    )
    .await;
}

#[tokio::test]
async fn bad_user_agents() {
    check(
        "bad-user-agents",
        &[
            (
                "00:04",
                "attack-tools",
                "tuple:ip:203.0.113.50+header:user-agent=sqlmap/1.7.2#stable (https://sqlmap.org)",
                "block",
                false,
            ),
            (
                "00:18",
                "no-user-agent",
                "ip:198.51.100.3",
                "throttle(1/s, burst 1)",
                true,
            ),
        ],
    )
    .await;
}

#[tokio::test]
async fn account_takeover() {
    check(
        "account-takeover",
        &[(
            "01:00",
            "login-after-failures",
            "ip:203.0.113.70",
            "log",
            false,
        )],
    )
    .await;
}
