//! Tests of every construct of the filter language.

use std::net::IpAddr;

use esper_protocol::{RequestEvent, TlsInfo};

use super::*;
use crate::policy::{ListKind, NamedList};

fn event() -> RequestEvent {
    let mut ev = RequestEvent::new("203.0.113.7".parse().unwrap(), "POST", "/login?next=/a");
    ev.status = 401;
    ev.host = "Shop.example:8443".into();
    ev.app = "shop".into();
    ev.user_agent = Some("Python-Requests/2.31".into());
    ev.latency_us = 1500;
    ev.bytes = 512;
    ev.headers.insert("x-api-key".into(), "k1".into());
    ev.cookies.insert("sid".into(), "abcd".into());
    ev.tls = Some(TlsInfo {
        version: "TLSv1.3".into(),
        fingerprint: Some("t13d1516h2".into()),
    });
    ev
}

fn lists() -> Vec<NamedList> {
    vec![
        NamedList {
            name: "office".into(),
            kind: ListKind::Ip,
            items: vec!["203.0.113.0/24".into(), "2001:db8::1".into()],
        },
        NamedList {
            name: "bad-agents".into(),
            kind: ListKind::String,
            items: (0..20)
                .map(|i| format!("agent{i}"))
                .chain(["curl/8".to_string()])
                .collect(),
        },
    ]
}

fn eval_on(src: &str, ev: &RequestEvent) -> bool {
    let lists = lists();
    let mut l = Lists::new(Some(&lists));
    let cond = compile_filter(src, &mut l).unwrap_or_else(|e| panic!("{src}: {e}"));
    cond.eval(ev, ev.client_ip.to_canonical())
}

fn check(src: &str) -> bool {
    eval_on(src, &event())
}

fn error(src: &str) -> ExprError {
    compile_filter(src, &mut Lists::new(None)).expect_err(src)
}

#[test]
fn string_fields_and_equality() {
    for (src, want) in [
        (r#"method == "POST""#, true),
        (r#""POST" == method"#, true),
        (r#"method != "POST""#, false),
        (r#"path == "/login""#, true),
        (r#"query == "next=/a""#, true),
        (r#"host == "Shop.example""#, true),
        (r#"host.lowerAscii() == "SHOP.EXAMPLE""#, true),
        (r#"app == 'shop'"#, true),
        (r#"user_agent == "Python-Requests/2.31""#, true),
        (r#"proxy_id == """#, true),
        (r#"tls_version == "TLSv1.3""#, true),
        (r#"tls_fingerprint == "t13d1516h2""#, true),
        (r#"headers["X-Api-Key"] == "k1""#, true),
        (r#"headers["missing"] == """#, true),
        (r#"cookies["sid"] == "abcd""#, true),
        (r#"action == "allow""#, true),
        (r#"action in ["block", "challenge"]"#, false),
        ("true", true),
        ("false", false),
    ] {
        assert_eq!(check(src), want, "{src}");
    }
}

#[test]
fn numbers_compare_every_way() {
    for (src, want) in [
        ("status == 401", true),
        ("status != 401", false),
        ("status >= 400 && status < 500", true),
        ("status > 401", false),
        ("status <= 401", true),
        ("500 > status", true),
        ("latency_us > 1000", true),
        ("bytes == 512", true),
        ("weight == 1", true),
        ("status in [401, 403]", true),
        ("status in [200]", false),
        ("size(path) == 6", true),
        ("user_agent.size() > 10", true),
    ] {
        assert_eq!(check(src), want, "{src}");
    }
}

#[test]
fn boolean_operators_and_precedence() {
    for (src, want) in [
        ("status == 401 && method == 'POST'", true),
        ("status == 200 && method == 'POST'", false),
        ("status == 200 || method == 'POST'", true),
        ("!(status == 200)", true),
        ("!status == 200 || true", true),
        ("status == 200 || status == 401 && method == 'GET'", false),
        ("(status == 200 || status == 401) && method == 'POST'", true),
        ("!!(status == 401)", true),
    ] {
        assert_eq!(check(src), want, "{src}");
    }
}

#[test]
fn string_functions() {
    for (src, want) in [
        ("path.startsWith('/log')", true),
        ("path.endsWith('gin')", true),
        ("path.contains('ogi')", true),
        ("user_agent.contains('python')", false),
        ("user_agent.lowerAscii().contains('PYTHON')", true),
        ("user_agent.lowerAscii().startsWith('python-')", true),
        ("user_agent.lowerAscii().endsWith('/2.31')", true),
        (r#"path.matches("^/log(in|out)$")"#, true),
        (r#"path.matches('\d')"#, false),
        (r#"user_agent.lowerAscii().matches("^python")"#, true),
        (
            r#"user_agent.lowerAscii().matches("sqlmap|REQUESTS")"#,
            true,
        ),
        (
            r#"user_agent.lowerAscii().matches("python.requests/\d")"#,
            true,
        ),
        (r#"user_agent.matches("python.requests")"#, false),
        ("headers['x-api-key'].startsWith('k')", true),
    ] {
        assert_eq!(check(src), want, "{src}");
    }
}

#[test]
fn lists_named_lists_and_maps() {
    for (src, want) in [
        ("method in ['GET', 'POST']", true),
        ("method.lowerAscii() in ['get', 'Post']", true),
        ("method in ['GET']", false),
        ("client_ip in list('office')", true),
        ("!(client_ip in list('office'))", false),
        ("user_agent in list('bad-agents')", false),
        ("'x-api-key' in headers", true),
        ("'X-API-KEY' in headers", true),
        ("'nope' in headers", false),
        ("'sid' in cookies", true),
        ("has(headers['x-api-key'])", true),
        ("has(cookies['nope'])", false),
        ("has(tls_fingerprint)", true),
    ] {
        assert_eq!(check(src), want, "{src}");
    }
    let mut ev = event();
    ev.user_agent = Some("curl/8".into());
    assert!(eval_on("user_agent in list('bad-agents')", &ev));
    // A list that does not exist is empty.
    assert!(!check("client_ip in list('nope')"));
}

#[test]
fn addresses_and_networks() {
    for (src, want) in [
        ("client_ip == '203.0.113.7'", true),
        ("client_ip != '203.0.113.7'", false),
        ("client_ip.in_cidr('203.0.113.0/24')", true),
        ("client_ip.inCidr('10.0.0.0/8')", false),
        ("client_ip in ['10.0.0.0/8', '203.0.113.7']", true),
        ("client_ip in ['2001:db8::/32']", false),
    ] {
        assert_eq!(check(src), want, "{src}");
    }
    let mut ev = event();
    ev.client_ip = "::ffff:10.1.2.3".parse::<IpAddr>().unwrap();
    assert!(eval_on("client_ip.in_cidr('10.0.0.0/8')", &ev));
    ev.client_ip = "2001:db8::1".parse::<IpAddr>().unwrap();
    assert!(eval_on("client_ip in list('office')", &ev));
}

#[test]
fn list_references_are_recorded() {
    let mut l = Lists::new(None);
    compile_filter(
        "client_ip in list('office') || user_agent in list('bad') || path in list('bad')",
        &mut l,
    )
    .unwrap();
    assert_eq!(
        l.refs,
        vec![
            ("office".to_string(), ListKind::Ip),
            ("bad".to_string(), ListKind::String)
        ]
    );
}

#[test]
fn type_and_name_errors_point_at_their_place() {
    let cases: &[(&str, usize, &str)] = &[
        ("paht == '/'", 0, "unknown field `paht`"),
        (
            "status == '401'",
            10,
            "a number field cannot be compared with a string",
        ),
        (
            "path == 1",
            8,
            "a string field cannot be compared with a number",
        ),
        ("path < 'b'", 0, "strings compare only with == and !="),
        ("path", 0, "a string field is not a condition"),
        (
            "path == method",
            0,
            "a comparison needs a field on one side and a constant",
        ),
        ("status in ['a']", 11, "this list must hold numbers"),
        ("path.matches('(')", 13, "invalid regex"),
        ("path.lower()", 0, "unknown function `lower`"),
        (
            "status.startsWith('4')",
            0,
            "startsWith() applies to a string field",
        ),
        ("client_ip == '10.0.0.0/8'", 13, "is not an IP address"),
        ("client_ip.in_cidr('x')", 18, "\"x\" is not an address"),
        (
            "status in list('x')",
            10,
            "named lists hold strings or addresses",
        ),
        ("path in 'abc'", 8, "`in` needs a list"),
        (
            "method['x'] == ''",
            0,
            "only headers and cookies can be indexed",
        ),
        ("headers[1] == ''", 8, "the index must be a name in quotes"),
        ("path.startsWith(method)", 16, "takes a string constant"),
        ("path == '/a' &&", 15, "expected a value"),
    ];
    for (src, offset, message) in cases {
        let e = error(src);
        assert!(e.message.contains(message), "{src}: {}", e.message);
        assert_eq!(e.offset, *offset, "{src}: {}", e.message);
    }
}

#[test]
fn values_for_aggregates() {
    let ev = event();
    assert_eq!(
        compile_value("path").unwrap(),
        ValueField::Str(StrField::Path)
    );
    assert_eq!(compile_value("bytes").unwrap().number(&ev), 512.0);
    assert_eq!(compile_value("client_ip").unwrap(), ValueField::ClientIp);
    let h = compile_value("headers['X-Api-Key']").unwrap();
    assert!(h.fingerprint(&ev).is_some());
    assert_eq!(
        compile_value("headers['nope']").unwrap().fingerprint(&ev),
        None,
        "absent values are not counted"
    );
    assert!(compile_value("status == 1").is_err());
    assert!(compile_value("list('x')").is_err());
}

#[test]
fn literals_a_path_or_host_can_never_equal_are_refused() {
    for (src, says) in [
        (r#"path == "/admin/../login""#, r#"write "/login""#),
        (r#"path != "/a//b""#, r#"write "/a/b""#),
        (r#"path in ["/ok", "/%6Cogin"]"#, r#"write "/login""#),
        (r#"path.lowerAscii() == "/A/./B""#, r#"write "/A/B""#),
        (r#"path == "/login?next=/""#, "use `query`"),
        (r#"host == "shop.example:8443""#, r#"write "shop.example""#),
        (r#"host in ["[::1]"]"#, r#"write "::1""#),
        (r#"action == "blocked""#, r#"none of "allow", "block""#),
        (r#"path == "login""#, "starts with '/'"),
        (r#"path != """#, "starts with '/'"),
    ] {
        let e = error(src);
        assert!(e.message.contains(says), "{src}: {}", e.message);
    }
    // Forms events carry, and tests other than equality, are taken as written.
    for (src, want) in [
        (r#"path in ["/login", "/x"]"#, true),
        (r#"path.startsWith("/log")"#, true),
        (r#"path.contains("//")"#, false),
        (r#"host == "shop.example""#, false),
        (r#"query == "next=/a""#, true),
        // Folded, case does not matter: escapes written in either case, names in any.
        (r#"path.lowerAscii() == "/a%2fb""#, false),
        (r#"path.lowerAscii() == "/LOGIN""#, true),
        (r#"action.lowerAscii() == "ALLOW""#, true),
        (r#"host.lowerAscii() in ["SHOP.example"]"#, true),
        (r#"path == "*""#, false),
    ] {
        assert_eq!(check(src), want, "{src}");
    }
}
