//! Tests of the policy language: parsing, validation, positions, round trips.

use super::*;

const EXAMPLE: &str = r#"
[[policy]]
id = "login-brute-force"
description = "Repeated failed logins from one address"
mode = "enforce"
entity = "ip"
window = "60s"
threshold = 10
action = "block"
ttl = "5m"
scope = "global"
[policy.match]
methods = ["POST"]
paths = ["/login"]
path_prefixes = ["/api/"]
statuses = [401, "5xx"]
hosts = ["shop.example"]
apps = ["shop"]
user_agent_contains = ["curl", "python-requests"]
ip_in_list = "office"
ip_not_in_list = "partners"

[[policy]]
id = "api-scrapers"
entity = "header:X-Api-Key"
window = "1m"
threshold = 600
action = "throttle"
rate = 5
[policy.match]
path_prefixes = ["/api/"]

[[policy]]
id = "scanner-tarpit"
enabled = false
mode = "shadow"
entity = "ip/24"
window = 600
threshold = 2.5
action = "tarpit"
delay = "2s"
scope = "app:shop"
"#;

#[test]
fn parses_the_documented_example() {
    let policies = parse_policies(EXAMPLE).unwrap();
    assert_eq!(policies.len(), 3);
    let login = &policies[0];
    assert!(login.enabled);
    assert_eq!(login.window, std::time::Duration::from_secs(60));
    assert_eq!(login.threshold, 10.0);
    assert_eq!(login.action, ActionKind::Block);
    assert_eq!(
        login.matches.statuses,
        vec![StatusMatch::Code(401), StatusMatch::Class(5)]
    );
    let api = &policies[1];
    assert_eq!(api.entity, EntitySpec::Header("x-api-key".into()));
    assert_eq!(api.rate, Some(5.0));
    assert_eq!(api.effective_burst(), 5);
    assert_eq!(api.ttl, DEFAULT_TTL);
    let tarpit = &policies[2];
    assert!(!tarpit.enabled);
    assert_eq!(tarpit.mode, PolicyMode::Shadow);
    assert_eq!(tarpit.entity, EntitySpec::Network { v4: 24, v6: 64 });
    assert_eq!(tarpit.window, std::time::Duration::from_secs(600));
    assert_eq!(tarpit.scope, PolicyScope::App("shop".into()));
}

#[test]
fn toml_and_json_round_trip() {
    let policies = parse_policies(EXAMPLE).unwrap();
    let text = policies_to_toml(&policies);
    assert_eq!(parse_policies(&text).unwrap(), policies, "{text}");
    assert!(text.contains("threshold = 10\n"), "{text}");
    assert!(text.contains("[policy.match]"), "{text}");
    let json = serde_json::to_string(&policies).unwrap();
    let back: Vec<PolicySpec> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, policies);
    assert!(json.contains(r#""window":"1m""#), "{json}");
    assert!(json.contains(r#""statuses":[401,"5xx"]"#), "{json}");
    assert!(parse_policies("").unwrap().is_empty());
    assert!(parse_policies(&policies_to_toml(&[])).unwrap().is_empty());
}

#[test]
fn unknown_action_names_line_column_and_policy() {
    let text = "[[policy]]\nid = \"login\"\nwindow = \"1m\"\nthreshold = 5\n\naction = \"blok\"\n";
    let err = parse_policies(text).unwrap_err();
    assert_eq!(
        err.to_string(),
        "line 6, column 10: policy \"login\": unknown action \"blok\" (expected block, throttle, tarpit, challenge or log)"
    );
    assert_eq!((err.line, err.column), (Some(6), Some(10)));
}

#[test]
fn syntax_errors_have_positions() {
    let err = parse_policies("[[policy]]\nid = \"a\"\nwindow = \n").unwrap_err();
    assert_eq!(err.line, Some(3), "{err}");
    assert_eq!(err.policy.as_deref(), Some("a"), "{err}");
    let err = parse_policies("[[policy]]\nid = \"a\"\nwindw = \"1m\"\n").unwrap_err();
    assert_eq!(err.line, Some(3), "{err}");
    assert!(err.message.contains("unknown field `windw`"), "{err}");
    let err =
        parse_policies("[[policy]]\nid = \"a\"\nwindow = \"1m\"\naction = \"log\"\n").unwrap_err();
    assert!(err.message.contains("missing field `threshold`"), "{err}");
    assert_eq!(err.policy.as_deref(), Some("a"), "{err}");
    let err = parse_policies("[[policy]]\nid = \"a\"\nwindow = \"1 fortnight\"\n").unwrap_err();
    assert!(err.message.contains("invalid duration"), "{err}");
    let err = parse_policies("[[rules]]\nid = \"a\"\n").unwrap_err();
    assert!(err.message.contains("unknown field `rules`"), "{err}");
}

fn base(extra: &str) -> String {
    format!("[[policy]]\nid = \"p\"\nwindow = \"1m\"\nthreshold = 5\naction = \"block\"\n{extra}")
}

#[test]
fn semantic_errors_point_at_the_key() {
    let cases: &[(&str, usize, &str)] = &[
        ("rate = 3", 6, "`rate` only applies to action throttle"),
        ("delay = \"1s\"", 6, "`delay` only applies to action tarpit"),
        ("ttl = \"0s\"", 6, "ttl 0s is out of range (1s to 30days)"),
        (
            "entity = \"ip/7\"",
            6,
            "entity prefix \"7\" is not a prefix length (8 to 32 for IPv4, 33 to 128 for IPv6)",
        ),
        (
            "entity = \"header:\"",
            6,
            "entity \"header:\" needs a header name (expected ip, ip/N, ip/V4,V6, header:NAME, cookie:NAME, user_agent, path, ja4 or a list of these)",
        ),
        (
            "scope = \"shop\"",
            6,
            "unknown scope \"shop\" (expected global or app:NAME)",
        ),
        (
            "mode = \"dry\"",
            6,
            "unknown mode \"dry\" (expected enforce or shadow)",
        ),
        (
            "[policy.match]\nstatuses = [401, 700]",
            7,
            "status \"700\" is not a code (100 to 599) or a class (1xx to 5xx)",
        ),
        (
            "[policy.match]\npaths = [\"login\"]",
            7,
            "path \"login\" must start with '/'",
        ),
        (
            "[policy.match]\npaths = [\"/admin/../login\"]",
            7,
            "path \"/admin/../login\" is matched as servers resolve it: write \"/login\"",
        ),
        (
            "[policy.match]\npath_prefixes = [\"/api?v=2\"]",
            7,
            "path \"/api?v=2\" has a query or fragment: paths are matched without them (use `query` in a filter)",
        ),
        (
            "[policy.match]\nhosts = [\"shop.example:8000\"]",
            7,
            "host \"shop.example:8000\" is matched without its port (any port): write \"shop.example\"",
        ),
        (
            "[policy.match]\nmethods = [\"GE T\"]",
            7,
            "\"GE T\" is not an HTTP method",
        ),
        (
            "[policy.match]\nip_in_list = \"Office\"",
            7,
            "list name \"Office\" must be 1 to 64 characters of a-z, 0-9, '-' and '_'",
        ),
        (
            "scope = \"app:shop\"\n[policy.match]\napps = [\"blog\"]",
            8,
            "match.apps does not include \"shop\", the app of the policy's scope, so the policy could never match",
        ),
    ];
    for (extra, line, message) in cases {
        let err = parse_policies(&base(extra)).unwrap_err();
        assert_eq!(err.message, *message, "{extra}");
        assert_eq!(err.line, Some(*line), "{extra}: {err}");
        assert_eq!(err.policy.as_deref(), Some("p"), "{extra}: {err}");
    }
    let err = parse_policies(&base("").replace("\"1m\"", "\"2d\"")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "line 3, column 10: policy \"p\": window 2days is out of range (1s to 24h)"
    );
    let err = parse_policies(&base("").replace("threshold = 5", "threshold = 0")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "line 4, column 13: policy \"p\": threshold 0 must be above 0 (and at most 1e12)"
    );
}

#[test]
fn actions_need_their_parameters() {
    let t = base("").replace("\"block\"", "\"throttle\"");
    let err = parse_policies(&t).unwrap_err();
    assert_eq!(
        err.to_string(),
        "line 5, column 10: policy \"p\": action throttle needs `rate` (requests per second)"
    );
    let ok = parse_policies(&format!("{t}rate = 0.5\n")).unwrap();
    assert_eq!(ok[0].effective_burst(), 1);
    assert!(parse_policies(&format!("{t}rate = 2\nburst = 0\n")).is_err());
    let t = base("").replace("\"block\"", "\"tarpit\"");
    assert!(
        parse_policies(&t)
            .unwrap_err()
            .message
            .contains("needs `delay`")
    );
    assert!(parse_policies(&format!("{t}delay = \"2m\"\n")).is_err());
    parse_policies(&format!("{t}delay = \"250ms\"\n")).unwrap();
}

#[test]
fn challenges_take_an_optional_difficulty() {
    let t = base("").replace("\"block\"", "\"challenge\"");
    let p = parse_policies(&t).unwrap();
    assert_eq!(
        (p[0].action, p[0].difficulty),
        (ActionKind::Challenge, None)
    );
    let p = parse_policies(&format!("{t}difficulty = 20\n")).unwrap();
    assert_eq!(p[0].difficulty, Some(20));
    let err = parse_policies(&format!("{t}difficulty = 30\n")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "line 6, column 14: policy \"p\": difficulty 30 is out of range (1 to 24)"
    );
    let err = parse_policies(&base("difficulty = 8\n")).unwrap_err();
    assert!(
        err.message.contains("only applies to action challenge"),
        "{err}"
    );
    let round = parse_policies(&policies_to_toml(
        &parse_policies(&format!("{t}difficulty = 12\n")).unwrap(),
    ))
    .unwrap();
    assert_eq!(round[0].difficulty, Some(12));
}

#[test]
fn ids_are_checked_and_unique() {
    let err = parse_policies(&base("").replace("\"p\"", "\"Login Page\"")).unwrap_err();
    assert_eq!(err.line, Some(2));
    assert!(err.message.contains("must be 1 to 64 characters"), "{err}");
    let two = format!("{}\n{}", base(""), base(""));
    let err = parse_policies(&two).unwrap_err();
    assert_eq!(
        err.to_string(),
        "line 8, column 6: policy \"p\": another policy already has this id"
    );
}

#[test]
fn entity_forms() {
    for (text, spec) in [
        ("ip", EntitySpec::Ip),
        ("ip/24", EntitySpec::Network { v4: 24, v6: 64 }),
        ("ip/48", EntitySpec::Network { v4: 32, v6: 48 }),
        ("ip/16,48", EntitySpec::Network { v4: 16, v6: 48 }),
        ("cookie:Session", EntitySpec::Cookie("session".into())),
    ] {
        let parsed: EntitySpec = text.parse().unwrap();
        assert_eq!(parsed, spec);
        assert_eq!(parsed.to_string().parse::<EntitySpec>().unwrap(), spec);
    }
    assert_eq!(EntitySpec::Network { v4: 32, v6: 64 }.to_string(), "ip/32");
    assert!("ip/24,8".parse::<EntitySpec>().is_err());
    assert!("ip/33,64".parse::<EntitySpec>().is_err());
    assert!("mac".parse::<EntitySpec>().is_err());
}

#[test]
fn validate_names_the_policy_without_position() {
    let mut p = parse_policies(&base("")).unwrap().remove(0);
    p.validate().unwrap();
    p.threshold = f64::NAN;
    let err = p.validate().unwrap_err();
    assert_eq!((err.line, err.policy.as_deref()), (None, Some("p")));
    assert!(
        err.to_string().starts_with("policy \"p\": threshold NaN"),
        "{err}"
    );
}

#[test]
fn json_refuses_unknown_fields_and_accepts_null_options() {
    let err = serde_json::from_str::<PolicySpec>(
        r#"{"id":"p","window":"1m","threshold":5,"action":"block","nope":1}"#,
    )
    .unwrap_err();
    assert!(err.to_string().contains("unknown field `nope`"), "{err}");
    let p: PolicySpec = serde_json::from_str(
        r#"{"id":"p","window":"1m","threshold":5,"action":"block","delay":null,"rate":null}"#,
    )
    .unwrap();
    assert_eq!(p.delay, None);
}

#[test]
fn expressions_aggregates_ladders_and_sequences_parse() {
    let text = r#"
[[policy]]
id = "stuffing"
priority = 10
window = "10m"
threshold = 20
action = "throttle"
rate = 1
filter = 'method == "POST" && path == "/login"'
count_if = 'status == 401'
aggregate = 'distinct(headers["x-username"])'
entity = ["ip", "user_agent"]
ttl_growth = 2.0
ttl_max = "24h"

[[policy.escalation]]
threshold = 50
action = "block"
ttl = "1h"

[[policy.escalation]]
repeat = 3
threshold = 50
action = "block"
ttl = "6h"

[[policy]]
id = "takeover"
within = "10m"
threshold = 1
action = "block"
sequence = [
  { when = 'path == "/login" && status == 401', min = 5 },
  { when = 'path == "/login" && status == 200' },
]
"#;
    let p = parse_policies(text).unwrap();
    assert_eq!(p[0].priority, 10);
    assert_eq!(
        p[0].aggregate,
        AggregateSpec::Distinct("headers[\"x-username\"]".into())
    );
    assert_eq!(
        p[0].entity,
        EntitySpec::Tuple(vec![EntitySpec::Ip, EntitySpec::UserAgent])
    );
    assert_eq!(p[0].escalation.len(), 2);
    assert_eq!(p[0].escalation[1].repeat, Some(3));
    assert_eq!(p[1].window, std::time::Duration::from_secs(600));
    assert_eq!(p[1].sequence[0].min, 5);
    assert_eq!(p[1].sequence[1].min, 1);
    let back = parse_policies(&policies_to_toml(&p)).unwrap();
    assert_eq!(back, p, "{}", policies_to_toml(&p));
    let json = serde_json::to_string(&p).unwrap();
    assert_eq!(serde_json::from_str::<Vec<PolicySpec>>(&json).unwrap(), p);
    // Older JSON (without the new fields) still reads.
    let old: PolicySpec =
        serde_json::from_str(r#"{"id":"p","window":"1m","threshold":5,"action":"block"}"#).unwrap();
    assert!(old.filter.is_none() && old.escalation.is_empty() && old.aggregate.is_count());
}

#[test]
fn expression_errors_point_into_the_file() {
    let err = parse_policies(&base("filter = 'path == \"/a\" && stauts == 401'")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "line 6, column 27: policy \"p\": unknown field `stauts` (fields: method, path, query, host, app, user_agent, proxy_id, tls_version, tls_fingerprint, action, headers[\"name\"], cookies[\"name\"], status, latency_us, bytes, weight, client_ip)"
    );
    let err =
        parse_policies(&base("count_if = '''\nstatus == 401 &&\n  path ==\n'''")).unwrap_err();
    assert_eq!((err.line, err.column), (Some(9), Some(1)), "{err}");
    assert!(err.message.contains("expected a value"), "{err}");
    let err = parse_policies(&base("filter = \"path == \\\"/a\\\" &&& true\"")).unwrap_err();
    assert_eq!((err.line, err.column), (Some(6), Some(28)), "{err}");
    let text = base("sequence = [\n  { when = 'status == 401' },\n  { when = 'status = 200' },\n]");
    let err = parse_policies(&text).unwrap_err();
    assert_eq!((err.line, err.column), (Some(8), Some(20)), "{err}");
    assert!(err.message.contains("write =="), "{err}");
}

#[test]
fn advanced_fields_are_checked() {
    let cases: &[(&str, &str)] = &[
        ("aggregate = \"median(bytes)\"", "unknown aggregate"),
        ("aggregate = \"sum(path)\"", "sum needs a number field"),
        ("aggregate = \"distinct(nope)\"", "unknown field `nope`"),
        ("ttl_growth = 0.5", "ttl_growth 0.5 must be 1 to 100"),
        ("ttl_max = \"1s\"", "must be at least ttl"),
        (
            "[[policy.escalation]]\naction = \"block\"",
            "needs `repeat`",
        ),
        (
            "[[policy.escalation]]\nthreshold = 2\naction = \"block\"",
            "must be at least 5",
        ),
        (
            "[[policy.escalation]]\nrepeat = 2\naction = \"throttle\"",
            "needs `rate`",
        ),
        ("sequence = [{ when = 'true', min = 0 }]", "min 0 must be 1"),
        (
            "count_if = 'true'\nsequence = [{ when = 'true' }]",
            "does not apply to a sequence",
        ),
        ("entity = [\"ip\"]", "2 to 4 parts"),
        ("entity = [\"ip\", \"ip\"]", "repeated"),
        ("entity = [\"ip\", \"mac\"]", "unknown entity"),
    ];
    for (extra, message) in cases {
        let err = parse_policies(&base(extra)).unwrap_err();
        assert!(err.message.contains(message), "{extra}: {err}");
    }
    let err = parse_policies(
        &base("aggregate = \"distinct(path)\"").replace("threshold = 5", "threshold = 5000"),
    )
    .unwrap_err();
    assert!(err.message.contains("exact up to 4096"), "{err}");
    // An escalation step above the cap would never apply either.
    let err = parse_policies(&format!(
        "{}\n[[policy.escalation]]\nthreshold = 5000\naction = \"block\"\n",
        base("aggregate = \"distinct(path)\"")
    ))
    .unwrap_err();
    assert!(err.message.contains("threshold 5000 is above it"), "{err}");
    let ok = parse_policies(&base("aggregate = \"rate\"\nentity = \"user_agent\"")).unwrap();
    assert_eq!(ok[0].entity.to_string(), "user_agent");
}

#[test]
fn ttls_grow_for_repeat_offenders_up_to_the_cap() {
    let p = &parse_policies(&base("ttl = \"10m\"\nttl_growth = 3\nttl_max = \"1h\"")).unwrap()[0];
    let mins = |level, offense| p.ttl_for(level, offense).as_secs() / 60;
    assert_eq!(
        (mins(0, 1), mins(0, 2), mins(0, 3), mins(0, 9)),
        (10, 30, 60, 60)
    );
    let flat = &parse_policies(&base("ttl = \"10m\"")).unwrap()[0];
    assert_eq!(flat.ttl_for(0, 5).as_secs(), 600);
}

#[test]
fn list_references_include_expressions() {
    let p = &parse_policies(&base(
        "filter = 'client_ip in list(\"office\") && user_agent in list(\"agents\")'\n[policy.match]\nip_not_in_list = \"office\"",
    ))
    .unwrap()[0];
    assert_eq!(
        p.typed_list_refs(),
        vec![
            ("office".to_string(), ListKind::Ip),
            ("agents".to_string(), ListKind::String)
        ]
    );
    assert_eq!(p.list_refs().collect::<Vec<_>>(), vec!["office", "agents"]);
}

#[test]
fn path_and_fingerprint_entities_parse_alone_and_in_tuples() {
    for (text, entity) in [
        ("\"path\"", EntitySpec::PathTemplate),
        ("\"path_template\"", EntitySpec::PathTemplate),
        ("\"ja4\"", EntitySpec::Ja4),
        ("\"tls_fingerprint\"", EntitySpec::Ja4),
        (
            "[\"ip\", \"path\", \"ja4\"]",
            EntitySpec::Tuple(vec![
                EntitySpec::Ip,
                EntitySpec::PathTemplate,
                EntitySpec::Ja4,
            ]),
        ),
    ] {
        let toml = format!(
            "[[policy]]\nid = \"p\"\nentity = {text}\nwindow = \"1m\"\nthreshold = 5\naction = \"block\"\n"
        );
        let p = parse_policies(&toml).unwrap();
        assert_eq!(p[0].entity, entity, "{text}");
        let back = parse_policies(&policies_to_toml(&p)).unwrap();
        assert_eq!(back, p);
    }
}
