//! The JSON of a request event, from `Serialize` and from `RequestEvent::write_json`,
//! must be the text the derived serialisation wrote (the wire format the broker and the
//! engine parse), and must deserialise back to the same event.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::net::IpAddr;

use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use esper_protocol::ingestion::IngestRequest;
use esper_protocol::{EnforcedAction, RequestEvent, TlsInfo, ingest_body};
use proptest::prelude::*;
use support::derived_event::{DerivedEvent, derived_body};

fn derived(ev: &RequestEvent) -> String {
    serde_json::to_string(&DerivedEvent::from(ev)).unwrap()
}

fn via_serialize(ev: &RequestEvent) -> String {
    serde_json::to_string(ev).unwrap()
}

fn via_writer(ev: &RequestEvent) -> String {
    let mut out = Vec::new();
    ev.write_json(&mut out);
    String::from_utf8(out).unwrap()
}

/// Both serialisations equal the derived text; the text reads back as the same event.
#[track_caller]
fn check(ev: &RequestEvent) {
    let want = derived(ev);
    assert_eq!(via_serialize(ev), want);
    assert_eq!(via_writer(ev), want);
    let mut back: RequestEvent = serde_json::from_str(&want).unwrap();
    // serde_json parses floats fast rather than exactly (its `float_roundtrip` feature is
    // off), so some weights come back one unit in the last place off; the text is the
    // derived one all the same.
    if (back.weight - ev.weight).abs() <= f64::EPSILON * ev.weight.abs() {
        back.weight = ev.weight;
    }
    assert_eq!(&back, ev, "{want}");
}

fn event() -> RequestEvent {
    let mut ev = RequestEvent::new("192.0.2.7".parse().unwrap(), "GET", "/index.html");
    ev.app = "shop".into();
    ev.proxy_id = "proxy-1".into();
    ev.host = "shop.example".into();
    ev.status = 200;
    ev.latency_us = 1234;
    ev.bytes = 601;
    ev
}

fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32, nano: u32) -> DateTime<Utc> {
    NaiveDate::from_ymd_opt(y, mo, d)
        .unwrap()
        .and_hms_nano_opt(h, mi, s, nano)
        .unwrap()
        .and_utc()
}

#[test]
fn timestamps_keep_chronos_text_and_precision() {
    let cases = [
        (at(2026, 3, 4, 5, 6, 7, 0), "2026-03-04T05:06:07Z"),
        (
            at(2026, 3, 4, 5, 6, 7, 120_000_000),
            "2026-03-04T05:06:07.120Z",
        ),
        (
            at(2026, 3, 4, 5, 6, 7, 123_456_000),
            "2026-03-04T05:06:07.123456Z",
        ),
        (
            at(2026, 3, 4, 5, 6, 7, 1_000),
            "2026-03-04T05:06:07.000001Z",
        ),
        (
            at(2026, 3, 4, 5, 6, 7, 123_456_789),
            "2026-03-04T05:06:07.123456789Z",
        ),
        (at(2026, 3, 4, 5, 6, 7, 1), "2026-03-04T05:06:07.000000001Z"),
        (
            at(1969, 12, 31, 23, 59, 59, 999_999_999),
            "1969-12-31T23:59:59.999999999Z",
        ),
        (
            at(1900, 1, 1, 0, 0, 0, 500_000_000),
            "1900-01-01T00:00:00.500Z",
        ),
        (at(0, 1, 1, 0, 0, 0, 0), "0000-01-01T00:00:00Z"),
        (at(-1, 12, 31, 23, 59, 59, 0), "-0001-12-31T23:59:59Z"),
        (at(-44, 3, 15, 12, 0, 0, 0), "-0044-03-15T12:00:00Z"),
        (
            at(9999, 12, 31, 23, 59, 59, 999_000_000),
            "9999-12-31T23:59:59.999Z",
        ),
        (at(10000, 1, 1, 0, 0, 0, 0), "+10000-01-01T00:00:00Z"),
        (
            at(2016, 12, 31, 23, 59, 59, 1_000_000_000),
            "2016-12-31T23:59:60Z",
        ),
        (
            at(2016, 12, 31, 23, 59, 59, 1_250_000_000),
            "2016-12-31T23:59:60.250Z",
        ),
        (DateTime::<Utc>::MIN_UTC, "-262143-01-01T00:00:00Z"),
        (
            DateTime::<Utc>::MAX_UTC,
            "+262142-12-31T23:59:59.999999999Z",
        ),
        (DateTime::<Utc>::UNIX_EPOCH, "1970-01-01T00:00:00Z"),
    ];
    for (ts, text) in cases {
        let mut ev = event();
        ev.timestamp = ts;
        assert_eq!(
            serde_json::to_string(&ts).unwrap(),
            format!("\"{text}\""),
            "chrono's own text"
        );
        assert!(via_writer(&ev).contains(&format!("\"timestamp\":\"{text}\"")));
        check(&ev);
    }
}

#[test]
fn addresses_keep_their_display_text() {
    for text in [
        "0.0.0.0",
        "9.10.99.100",
        "255.255.255.255",
        "::",
        "::1",
        "2001:db8::1",
        "2001:db8:0:1:0:0:0:1",
        "fe80::1:2:3:4",
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        "::ffff:192.0.2.1",
        "::ffff:0.0.0.0",
        "::192.0.2.1",
        "64:ff9b::c000:201",
    ] {
        let ip: IpAddr = text.parse().unwrap();
        let mut ev = event();
        ev.client_ip = ip;
        assert!(
            via_writer(&ev).contains(&format!("\"client_ip\":\"{ip}\"")),
            "{text}"
        );
        check(&ev);
    }
}

#[test]
fn optional_fields_absent_and_present() {
    let bare = event();
    assert!(!via_writer(&bare).contains("user_agent"));
    assert!(!via_writer(&bare).contains("headers"));
    assert!(!via_writer(&bare).contains("tls"));
    check(&bare);

    let mut full = event();
    full.user_agent = Some("curl/8.5.0".into());
    full.headers.insert("accept".into(), "*/*".into());
    full.headers.insert("x-login-user".into(), "alice".into());
    full.cookies
        .insert("session".into(), "ba7816bf8f01cfea".into());
    full.tls = Some(TlsInfo {
        version: "TLSv1.3".into(),
        fingerprint: Some("t13d1516h2_8daaf6152771_02713d6af862".into()),
    });
    check(&full);

    full.tls = Some(TlsInfo {
        version: "TLSv1.2".into(),
        fingerprint: None,
    });
    full.user_agent = Some(String::new());
    check(&full);
}

#[test]
fn strings_needing_escapes_are_escaped_as_serde_json_does() {
    let every_control: String = (0u8..0x20).map(char::from).collect();
    let nasty = [
        "quote \" backslash \\ slash /".to_string(),
        every_control.clone(),
        "\u{7f} del, é, 漢字, 🦀, \u{2028} \u{2029}".to_string(),
        "/search?q=\"<script>\"&x=\\..\\".to_string(),
        "\\\"\\\"".to_string(),
        String::new(),
    ];
    for s in &nasty {
        let mut ev = event();
        ev.id = s.clone();
        ev.app = s.clone();
        ev.proxy_id = s.clone();
        ev.method = s.clone();
        ev.host = s.clone();
        ev.path = s.clone();
        ev.user_agent = Some(s.clone());
        ev.headers.insert(s.clone(), s.clone());
        ev.headers.insert(format!("x-{s}"), format!("{s}{s}"));
        ev.cookies.insert(s.clone(), s.clone());
        ev.tls = Some(TlsInfo {
            version: s.clone(),
            fingerprint: Some(s.clone()),
        });
        check(&ev);
    }
}

#[test]
fn every_action_and_weight() {
    let actions = [
        EnforcedAction::Allow,
        EnforcedAction::Block,
        EnforcedAction::Throttle,
        EnforcedAction::Tarpit,
        EnforcedAction::Challenge,
        EnforcedAction::Log,
    ];
    let weights = [
        1.0,
        2.0,
        100.0,
        0.0,
        1.0 / 0.3,
        0.5,
        1e-7,
        1e15 - 1.0,
        1e15,
        1e16,
        1e300,
        f64::MAX,
        f64::MIN_POSITIVE,
        -3.0,
    ];
    for (i, w) in weights.into_iter().enumerate() {
        let mut ev = event();
        ev.action = actions[i % actions.len()];
        ev.weight = w;
        check(&ev);
    }
    // Not representable in JSON: written as null, as serde_json does (and then refused
    // on the way back, as before).
    for w in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.0] {
        let mut ev = event();
        ev.weight = w;
        assert_eq!(via_writer(&ev), derived(&ev));
        assert_eq!(via_serialize(&ev), derived(&ev));
    }
}

#[test]
fn the_ingest_body_is_the_ingest_request_serde_writes() {
    let mut events = Vec::new();
    for i in 0..50u32 {
        let mut ev = event();
        ev.id = format!("e{i}");
        ev.timestamp += TimeDelta::nanoseconds(i64::from(i) * 1_234_567);
        ev.client_ip = if i % 3 == 0 {
            format!("2001:db8::{i:x}").parse().unwrap()
        } else {
            format!("198.51.100.{i}").parse().unwrap()
        };
        if i % 2 == 0 {
            ev.user_agent = Some(format!("agent \"{i}\""));
        }
        events.push(ev);
    }
    let body = ingest_body(&events);
    let request = IngestRequest {
        events: events.clone(),
    };
    assert_eq!(body, serde_json::to_vec(&request).unwrap());
    let derived: Vec<DerivedEvent> = events.iter().map(DerivedEvent::from).collect();
    assert_eq!(body, derived_body(&derived));
    let back: IngestRequest = serde_json::from_slice(&body).unwrap();
    assert_eq!(back, request);
    assert_eq!(ingest_body(&[]), b"{\"events\":[]}");
}

fn arb_event() -> impl Strategy<Value = RequestEvent> {
    let text = || any::<String>();
    let ts = (
        DateTime::<Utc>::MIN_UTC.timestamp()..=DateTime::<Utc>::MAX_UTC.timestamp(),
        prop_oneof![
            Just(0u32),
            (0u32..1000).prop_map(|m| m * 1_000_000),
            (0u32..1_000_000).prop_map(|u| u * 1_000),
            0u32..1_000_000_000,
        ],
    )
        .prop_filter_map("representable", |(s, n)| DateTime::from_timestamp(s, n));
    let ip = prop_oneof![
        any::<u32>().prop_map(|v| IpAddr::from(v.to_be_bytes())),
        any::<u128>().prop_map(|v| IpAddr::from(v.to_be_bytes())),
        any::<u32>().prop_map(|v| IpAddr::from(std::net::Ipv4Addr::from(v).to_ipv6_mapped())),
    ];
    let map = || proptest::collection::btree_map(text(), text(), 0..3);
    (
        (text(), ts, text(), text(), ip, text(), text(), text()),
        (
            any::<u16>(),
            any::<u64>(),
            any::<u64>(),
            proptest::option::of(text()),
        ),
        (
            map(),
            map(),
            proptest::option::of((text(), proptest::option::of(text()))),
        ),
        (
            0usize..6,
            prop_oneof![Just(1.0), (1u32..1000u32).prop_map(f64::from), 1e-6f64..1e6],
        ),
    )
        .prop_map(
            |(
                (id, timestamp, app, proxy_id, client_ip, method, host, path),
                (status, latency_us, bytes, user_agent),
                (headers, cookies, tls),
                (action, weight),
            )| RequestEvent {
                id,
                timestamp,
                app,
                proxy_id,
                client_ip,
                method,
                host,
                path,
                status,
                latency_us,
                bytes,
                user_agent,
                headers: headers.into_iter().collect::<BTreeMap<_, _>>(),
                cookies,
                tls: tls.map(|(version, fingerprint)| TlsInfo {
                    version,
                    fingerprint,
                }),
                action: [
                    EnforcedAction::Allow,
                    EnforcedAction::Block,
                    EnforcedAction::Throttle,
                    EnforcedAction::Tarpit,
                    EnforcedAction::Challenge,
                    EnforcedAction::Log,
                ][action],
                weight,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_event_serialises_as_the_derive_did(ev in arb_event()) {
        check(&ev);
    }
}
