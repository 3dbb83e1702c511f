//! Type-checks a syntax tree and turns it into [`Cond`]itions: fields are resolved,
//! constants parsed (networks, regexes, lower-cased needles), lists looked up.

use std::net::IpAddr;

use ipnet::IpNet;

use super::parse::{Ast, Node, parse};
use super::{
    CmpOp, Cond, ExprError, IpSet, NumField, StrField, StrSet, StrTest, ValueField, host_only,
};
use crate::policy::{ListKind, NamedList, parse_net};

/// The named lists an expression may use, and the ones it used.
#[derive(Debug, Default)]
pub struct Lists<'a> {
    /// `None` while only validating (every list is then empty).
    pub known: Option<&'a [NamedList]>,
    /// Each list referred to, with the kind the expression needs.
    pub refs: Vec<(String, ListKind)>,
}

impl<'a> Lists<'a> {
    pub fn new(known: Option<&'a [NamedList]>) -> Lists<'a> {
        Lists {
            known,
            refs: Vec::new(),
        }
    }

    fn items(&mut self, name: &str, kind: ListKind) -> Vec<String> {
        if !self.refs.iter().any(|(n, k)| n == name && *k == kind) {
            self.refs.push((name.to_string(), kind));
        }
        self.known
            .and_then(|ls| ls.iter().find(|l| l.name == name && l.kind == kind))
            .map(|l| l.items.clone())
            .unwrap_or_default()
    }
}

/// Compiles a boolean expression.
pub fn compile_filter(src: &str, lists: &mut Lists<'_>) -> Result<Cond, ExprError> {
    let node = parse(src)?;
    cond(&node, lists)
}

/// Compiles a value expression (a field) for an aggregate.
pub fn compile_value(src: &str) -> Result<ValueField, ExprError> {
    let node = parse(src)?;
    match operand(&node)? {
        Operand::Str(f, false) => Ok(ValueField::Str(f)),
        Operand::Num(f) => Ok(ValueField::Num(f)),
        Operand::Ip => Ok(ValueField::ClientIp),
        _ => Err(ExprError::new(
            node.at,
            "expected a field such as path, headers[\"x\"], client_ip or bytes",
        )),
    }
}

/// The value side of a comparison.
enum Operand<'n> {
    /// A string field, possibly `.lowerAscii()`-ed.
    Str(StrField, bool),
    Num(NumField),
    Ip,
    Headers,
    Cookies,
    StrLit(&'n str),
    NumLit(f64),
    List(&'n [Node]),
    Named(&'n str),
}

fn kind_name(o: &Operand<'_>) -> &'static str {
    match o {
        Operand::Str(..) => "a string field",
        Operand::Num(_) => "a number field",
        Operand::Ip => "client_ip",
        Operand::Headers | Operand::Cookies => "a map",
        Operand::StrLit(_) => "a string",
        Operand::NumLit(_) => "a number",
        Operand::List(_) => "a list",
        Operand::Named(_) => "a named list",
    }
}

const FIELDS: &str = "method, path, query, host, app, user_agent, proxy_id, tls_version, \
tls_fingerprint, action, headers[\"name\"], cookies[\"name\"], status, latency_us, bytes, weight, \
client_ip";

/// What `action` can be.
const ACTIONS: [&str; 6] = ["allow", "block", "throttle", "tarpit", "challenge", "log"];

fn str_field(name: &str) -> Option<StrField> {
    Some(match name {
        "method" => StrField::Method,
        "path" => StrField::Path,
        "query" => StrField::Query,
        "host" => StrField::Host,
        "app" => StrField::App,
        "user_agent" => StrField::UserAgent,
        "proxy_id" => StrField::ProxyId,
        "tls_version" => StrField::TlsVersion,
        "tls_fingerprint" => StrField::TlsFingerprint,
        "action" => StrField::Action,
        _ => return None,
    })
}

fn num_field(name: &str) -> Option<NumField> {
    Some(match name {
        "status" => NumField::Status,
        "latency_us" => NumField::LatencyUs,
        "bytes" => NumField::Bytes,
        "weight" => NumField::Weight,
        _ => return None,
    })
}

fn string_arg<'n>(args: &'n [Node], at: usize, what: &str) -> Result<&'n str, ExprError> {
    match args {
        [
            Node {
                ast: Ast::Str(s), ..
            },
        ] => Ok(s),
        [other] => Err(ExprError::new(
            other.at,
            format!("{what} takes a string constant"),
        )),
        _ => Err(ExprError::new(at, format!("{what} takes one argument"))),
    }
}

fn operand(node: &Node) -> Result<Operand<'_>, ExprError> {
    let at = node.at;
    match &node.ast {
        Ast::Str(s) => Ok(Operand::StrLit(s)),
        Ast::Num(n) => Ok(Operand::NumLit(*n)),
        Ast::List(items) => Ok(Operand::List(items)),
        Ast::Ident(name) => {
            if let Some(f) = str_field(name) {
                return Ok(Operand::Str(f, false));
            }
            if let Some(f) = num_field(name) {
                return Ok(Operand::Num(f));
            }
            match name.as_str() {
                "client_ip" => Ok(Operand::Ip),
                "headers" => Ok(Operand::Headers),
                "cookies" => Ok(Operand::Cookies),
                _ => Err(ExprError::new(
                    at,
                    format!("unknown field `{name}` (fields: {FIELDS})"),
                )),
            }
        }
        Ast::Index(map, key) => {
            let name = match &key.ast {
                Ast::Str(s) if !s.is_empty() => s.to_ascii_lowercase().into_boxed_str(),
                _ => return Err(ExprError::new(key.at, "the index must be a name in quotes")),
            };
            match operand(map)? {
                Operand::Headers => Ok(Operand::Str(StrField::Header(name), false)),
                Operand::Cookies => Ok(Operand::Str(StrField::Cookie(name), false)),
                _ => Err(ExprError::new(
                    at,
                    "only headers and cookies can be indexed",
                )),
            }
        }
        Ast::Call { recv, name, args } => match (recv, name.as_str()) {
            (None, "list") => Ok(Operand::Named(string_arg(args, at, "list()")?)),
            (None, "size") => match args.as_slice() {
                [arg] => match operand(arg)? {
                    Operand::Str(f, _) => Ok(Operand::Num(NumField::Size(f))),
                    _ => Err(ExprError::new(arg.at, "size() takes a string field")),
                },
                _ => Err(ExprError::new(at, "size() takes one argument")),
            },
            (Some(r), "size") if args.is_empty() => match operand(r)? {
                Operand::Str(f, _) => Ok(Operand::Num(NumField::Size(f))),
                _ => Err(ExprError::new(at, "size() applies to a string field")),
            },
            (Some(r), "lowerAscii") if args.is_empty() => match operand(r)? {
                Operand::Str(f, _) => Ok(Operand::Str(f, true)),
                _ => Err(ExprError::new(at, "lowerAscii() applies to a string field")),
            },
            _ => Err(ExprError::new(
                at,
                format!("`{name}(...)` is not a value (or takes other arguments)"),
            )),
        },
        _ => Err(ExprError::new(at, "expected a field or a constant")),
    }
}

fn cond(node: &Node, lists: &mut Lists<'_>) -> Result<Cond, ExprError> {
    let at = node.at;
    match &node.ast {
        Ast::Bool(b) => Ok(Cond::Const(*b)),
        Ast::And(items) => Ok(Cond::And(
            items
                .iter()
                .map(|n| cond(n, lists))
                .collect::<Result<_, _>>()?,
        )),
        Ast::Or(items) => Ok(Cond::Or(
            items
                .iter()
                .map(|n| cond(n, lists))
                .collect::<Result<_, _>>()?,
        )),
        Ast::Not(inner) => Ok(Cond::Not(Box::new(cond(inner, lists)?))),
        Ast::Cmp("in", l, r) => membership(l, r, lists),
        Ast::Cmp(op, l, r) => comparison(op, l, r),
        Ast::Call {
            recv: Some(r),
            name,
            args,
        } => method(r, name, args, at),
        Ast::Call {
            recv: None,
            name,
            args,
        } if name == "has" => match args.as_slice() {
            [arg] => match operand(arg)? {
                Operand::Str(field, _) => Ok(Cond::Str {
                    field,
                    fold: false,
                    test: StrTest::Present,
                }),
                _ => Err(ExprError::new(
                    arg.at,
                    "has() takes headers[\"name\"], cookies[\"name\"] or a field",
                )),
            },
            _ => Err(ExprError::new(at, "has() takes one argument")),
        },
        _ => {
            let what = operand(node).map(|o| kind_name(&o)).unwrap_or("this");
            Err(ExprError::new(
                at,
                format!("{what} is not a condition; compare it (==, !=, <, in, ...)"),
            ))
        }
    }
}

/// `s`, when a value of `field` can equal it. Events carry the path in the form servers
/// resolve it to, without its query, the host is compared without its port, and an
/// action is one of a few names: a literal in another form would never match, so it is
/// refused, naming what to write.
/// With `fold` (`lowerAscii()`), case does not matter.
fn matchable<'s>(
    field: &StrField,
    s: &'s str,
    fold: bool,
    at: usize,
) -> Result<&'s str, ExprError> {
    let same = |a: &str, b: &str| {
        if fold {
            a.eq_ignore_ascii_case(b)
        } else {
            a == b
        }
    };
    match field {
        StrField::Path if s.contains(['?', '#']) => Err(ExprError::new(
            at,
            format!(
                "path \"{s}\" has a query or fragment: paths are compared without them (use `query`)"
            ),
        )),
        // `*`: the target of `OPTIONS *`.
        StrField::Path if !s.starts_with('/') && s != "*" => Err(ExprError::new(
            at,
            format!("path \"{s}\" never matches: a request's path starts with '/'"),
        )),
        StrField::Path if s.starts_with('/') => {
            let normal = esper_protocol::normalize_path(s);
            if same(&normal, s) {
                Ok(s)
            } else {
                Err(ExprError::new(
                    at,
                    format!("path \"{s}\" is compared as servers resolve it: write \"{normal}\""),
                ))
            }
        }
        StrField::Action if !ACTIONS.iter().any(|a| same(a, s)) => Err(ExprError::new(
            at,
            format!(
                "action \"{s}\" is none of {}",
                ACTIONS.map(|a| format!("\"{a}\"")).join(", ")
            ),
        )),
        StrField::Host if !same(host_only(s), s) => Err(ExprError::new(
            at,
            format!(
                "host \"{s}\" is compared without its port: write \"{}\"",
                host_only(s)
            ),
        )),
        _ => Ok(s),
    }
}

fn lower_if(s: &str, fold: bool) -> Box<str> {
    if fold {
        s.to_ascii_lowercase().into_boxed_str()
    } else {
        s.into()
    }
}

fn method(recv: &Node, name: &str, args: &[Node], at: usize) -> Result<Cond, ExprError> {
    let target = operand(recv)?;
    if name == "in_cidr" || name == "inCidr" {
        let Operand::Ip = target else {
            return Err(ExprError::new(at, format!("{name}() applies to client_ip")));
        };
        let arg = string_arg(args, at, "in_cidr()")?;
        let net = parse_net(arg).ok_or_else(|| {
            ExprError::new(
                args[0].at,
                format!("\"{arg}\" is not an address or CIDR network"),
            )
        })?;
        return Ok(Cond::Ip(IpSet::new([net])));
    }
    let Operand::Str(field, fold) = target else {
        return Err(ExprError::new(
            at,
            format!(
                "{name}() applies to a string field, not {}",
                kind_name(&target)
            ),
        ));
    };
    let what = format!("{name}()");
    let test = match name {
        "startsWith" => StrTest::StartsWith(lower_if(string_arg(args, at, &what)?, fold)),
        "endsWith" => StrTest::EndsWith(lower_if(string_arg(args, at, &what)?, fold)),
        "contains" => StrTest::Contains(lower_if(string_arg(args, at, &what)?, fold)),
        "matches" => {
            let pattern = string_arg(args, at, &what)?;
            let re = regex::RegexBuilder::new(pattern)
                .case_insensitive(fold)
                .size_limit(1 << 20)
                .build();
            let re = re.map_err(|e| {
                let msg = e.to_string();
                let last = msg.lines().last().unwrap_or("invalid").trim().to_string();
                ExprError::new(args[0].at, format!("invalid regex: {last}"))
            })?;
            StrTest::Matches(re)
        }
        other => {
            return Err(ExprError::new(
                at,
                format!(
                    "unknown function `{other}` (string functions: startsWith, endsWith, contains, matches, lowerAscii, size)"
                ),
            ));
        }
    };
    Ok(Cond::Str { field, fold, test })
}

fn flip(op: CmpOp) -> CmpOp {
    match op {
        CmpOp::Lt => CmpOp::Gt,
        CmpOp::Le => CmpOp::Ge,
        CmpOp::Gt => CmpOp::Lt,
        CmpOp::Ge => CmpOp::Le,
        other => other,
    }
}

fn comparison(op: &str, l: &Node, r: &Node) -> Result<Cond, ExprError> {
    let cmp = match op {
        "==" => CmpOp::Eq,
        "!=" => CmpOp::Ne,
        "<" => CmpOp::Lt,
        "<=" => CmpOp::Le,
        ">" => CmpOp::Gt,
        _ => CmpOp::Ge,
    };
    let (lo, ro) = (operand(l)?, operand(r)?);
    // Put the field on the left.
    let (field, constant, cmp, const_at) = match (&lo, &ro) {
        (Operand::StrLit(_) | Operand::NumLit(_), _) => (ro, lo, flip(cmp), l.at),
        _ => (lo, ro, cmp, r.at),
    };
    let negate = |c: Cond| {
        if cmp == CmpOp::Ne {
            Cond::Not(Box::new(c))
        } else {
            c
        }
    };
    match (field, constant) {
        (Operand::Str(field, fold), Operand::StrLit(s)) => match cmp {
            CmpOp::Eq | CmpOp::Ne => Ok(negate(Cond::Str {
                test: StrTest::Eq(lower_if(matchable(&field, s, fold, const_at)?, fold)),
                field,
                fold,
            })),
            _ => Err(ExprError::new(l.at, "strings compare only with == and !=")),
        },
        (Operand::Num(field), Operand::NumLit(n)) => Ok(Cond::Num(field, cmp, n)),
        (Operand::Ip, Operand::StrLit(s)) => {
            let ip: IpAddr = s.parse().map_err(|_| {
                ExprError::new(
                    const_at,
                    format!("\"{s}\" is not an IP address (use in_cidr for networks)"),
                )
            })?;
            match cmp {
                CmpOp::Eq | CmpOp::Ne => Ok(negate(Cond::Ip(IpSet::new([IpNet::from(
                    ip.to_canonical(),
                )])))),
                _ => Err(ExprError::new(
                    l.at,
                    "client_ip compares only with == and !=",
                )),
            }
        }
        (
            Operand::Str(..) | Operand::Num(_) | Operand::Ip,
            Operand::Str(..) | Operand::Num(_) | Operand::Ip,
        ) => Err(ExprError::new(
            l.at,
            "a comparison needs a field on one side and a constant on the other; two fields cannot be compared",
        )),
        (f @ (Operand::Str(..) | Operand::Num(_) | Operand::Ip), c) => Err(ExprError::new(
            const_at,
            format!(
                "{} cannot be compared with {}",
                kind_name(&f),
                kind_name(&c)
            ),
        )),
        (f, _) => Err(ExprError::new(
            l.at,
            format!(
                "a comparison needs a field on one side and a constant on the other, not {}",
                kind_name(&f)
            ),
        )),
    }
}

fn membership(l: &Node, r: &Node, lists: &mut Lists<'_>) -> Result<Cond, ExprError> {
    let (lo, ro) = (operand(l)?, operand(r)?);
    match (lo, ro) {
        (Operand::StrLit(name), Operand::Headers | Operand::Cookies) => {
            let name = name.to_ascii_lowercase().into_boxed_str();
            let field = match operand(r)? {
                Operand::Headers => StrField::Header(name),
                _ => StrField::Cookie(name),
            };
            Ok(Cond::Str {
                field,
                fold: false,
                test: StrTest::Present,
            })
        }
        (Operand::Str(field, fold), Operand::List(items)) => {
            let mut values = Vec::with_capacity(items.len());
            for item in items {
                match &item.ast {
                    Ast::Str(s) => {
                        let s = matchable(&field, s, fold, item.at)?;
                        values.push(if fold {
                            s.to_ascii_lowercase()
                        } else {
                            s.to_string()
                        })
                    }
                    _ => return Err(ExprError::new(item.at, "this list must hold strings")),
                }
            }
            Ok(Cond::Str {
                field,
                fold,
                test: StrTest::In(StrSet::new(values)),
            })
        }
        (Operand::Str(field, fold), Operand::Named(name)) => {
            let mut items = lists.items(name, ListKind::String);
            if fold {
                items.iter_mut().for_each(|s| s.make_ascii_lowercase());
            }
            Ok(Cond::Str {
                field,
                fold,
                test: StrTest::In(StrSet::new(items)),
            })
        }
        (Operand::Num(field), Operand::List(items)) => {
            let mut values = Vec::with_capacity(items.len());
            for item in items {
                match &item.ast {
                    Ast::Num(n) => values.push(*n),
                    _ => return Err(ExprError::new(item.at, "this list must hold numbers")),
                }
            }
            Ok(Cond::NumIn(field, values.into()))
        }
        (Operand::Ip, Operand::List(items)) => {
            let mut nets = Vec::with_capacity(items.len());
            for item in items {
                match &item.ast {
                    Ast::Str(s) => nets.push(parse_net(s).ok_or_else(|| {
                        ExprError::new(
                            item.at,
                            format!("\"{s}\" is not an address or CIDR network"),
                        )
                    })?),
                    _ => {
                        return Err(ExprError::new(
                            item.at,
                            "this list must hold addresses or networks in quotes",
                        ));
                    }
                }
            }
            Ok(Cond::Ip(IpSet::new(nets)))
        }
        (Operand::Ip, Operand::Named(name)) => {
            let items = lists.items(name, ListKind::Ip);
            Ok(Cond::Ip(IpSet::new(
                items.iter().filter_map(|s| parse_net(s)),
            )))
        }
        (Operand::Num(_), Operand::Named(_)) => Err(ExprError::new(
            r.at,
            "named lists hold strings or addresses, not numbers",
        )),
        (lo, ro) => Err(ExprError::new(
            r.at,
            format!(
                "`in` needs a list (or headers/cookies) on its right, not {} for {}",
                kind_name(&ro),
                kind_name(&lo)
            ),
        )),
    }
}
