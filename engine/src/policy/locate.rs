//! Finding where in the TOML text an error lies, so messages can say
//! `line 7, column 10: policy "login": ...`.
//!
//! The document is read a second time into a tree whose every value carries its byte
//! span (`toml::Spanned`); semantic errors name a key (`match.statuses`), and the
//! key's value in that tree gives the position.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use toml::Spanned;

use super::PolicyError;
use super::spec::FieldError;

/// A TOML value with its span and, for tables and arrays, its children.
struct Node(Spanned<Inner>);

enum Inner {
    Table(BTreeMap<String, Node>),
    Array(Vec<Node>),
    Other,
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Spanned::<Inner>::deserialize(d).map(Node)
    }
}

impl<'de> Deserialize<'de> for Inner {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(InnerVisitor)
    }
}

struct InnerVisitor;

impl<'de> Visitor<'de> for InnerVisitor {
    type Value = Inner;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any TOML value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Inner, E> {
        Ok(Inner::Other)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Inner, E> {
        Ok(Inner::Other)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Inner, E> {
        Ok(Inner::Other)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Inner, E> {
        Ok(Inner::Other)
    }
    fn visit_str<E>(self, _: &str) -> Result<Inner, E> {
        Ok(Inner::Other)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Inner, A::Error> {
        let mut items = Vec::new();
        while let Some(n) = seq.next_element::<Node>()? {
            items.push(n);
        }
        Ok(Inner::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Inner, A::Error> {
        let mut table = BTreeMap::new();
        while let Some((k, v)) = map.next_entry::<String, Node>()? {
            table.insert(k, v);
        }
        Ok(Inner::Table(table))
    }
}

/// The `[[policy]]` tables of a document, when it is well-formed TOML.
fn policy_nodes(text: &str) -> Option<Vec<Node>> {
    #[derive(serde::Deserialize)]
    struct Doc {
        #[serde(default)]
        policy: Option<Node>,
    }
    let doc: Doc = toml::from_str(text).ok()?;
    match doc.policy?.0.into_inner() {
        Inner::Array(items) => Some(items),
        _ => None,
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

/// Byte offsets where each `[[policy]]` header starts, in order.
fn headers(text: &str) -> Vec<usize> {
    let mut out = Vec::new();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix("[[")
            && rest.trim_start().starts_with("policy")
            && {
                let name = rest.trim_start().trim_start_matches("policy").trim_start();
                name.starts_with("]]")
            }
        {
            out.push(offset + (line.len() - t.len()));
        }
        offset += line.len();
    }
    out
}

/// The `id = "..."` of a policy whose table starts at `start` and ends before `end`,
/// read line by line (the document may not parse).
fn scan_id(text: &str, start: usize, end: usize) -> Option<String> {
    let body = text.get(start..end)?;
    body.lines().skip(1).find_map(|line| {
        let rest = line
            .trim()
            .strip_prefix("id")?
            .trim_start()
            .strip_prefix('=')?;
        let rest = rest.trim_start();
        let quote = rest.chars().next().filter(|c| *c == '"' || *c == '\'')?;
        let inner = &rest[1..];
        inner.find(quote).map(|end| inner[..end].to_string())
    })
}

/// A parse or type error, placed by the span toml gives it.
pub(super) fn syntax_error(text: &str, e: &toml::de::Error) -> PolicyError {
    let message = esper_common::plain::plain_serde(e.message().trim()).replace('\n', " ");
    let Some(span) = e.span() else {
        return PolicyError {
            line: None,
            column: None,
            policy: None,
            message,
        };
    };
    let (line, column) = line_col(text, span.start);
    let starts = headers(text);
    let index = starts.iter().rposition(|&h| h <= span.start);
    let policy = index.and_then(|i| {
        let end = starts.get(i + 1).copied().unwrap_or(text.len());
        scan_id(text, starts[i], end)
    });
    PolicyError {
        line: Some(line),
        column: Some(column),
        policy,
        message,
    }
}

/// The position of byte `offset` of a string value whose literal starts at `start`.
/// Exact for literal strings ('...', '''...''') and for basic strings without
/// escapes; escapes before the offset shift it by a few columns.
fn inside_string(text: &str, start: usize, offset: usize) -> usize {
    let rest = text.get(start..).unwrap_or("");
    let mut skip = if rest.starts_with("'''") || rest.starts_with("\"\"\"") {
        3
    } else if rest.starts_with('\'') || rest.starts_with('"') {
        1
    } else {
        return start;
    };
    // A newline right after a multi-line string's opening quotes is not part of it.
    if skip == 3 {
        if rest[3..].starts_with('\n') {
            skip += 1;
        } else if rest[3..].starts_with("\r\n") {
            skip += 2;
        }
    }
    let body = &rest[skip..];
    let raw = if rest.starts_with('"') {
        raw_offset(body, offset)
    } else {
        offset
    };
    (start + skip + raw).min(text.len())
}

/// The raw offset in a basic string's source of byte `decoded` of its value: each
/// escape (`\"`, `\u00e9`) is longer in the source than in the value.
fn raw_offset(raw: &str, decoded: usize) -> usize {
    let bytes = raw.as_bytes();
    let (mut i, mut d) = (0, 0);
    while i < bytes.len() && d < decoded {
        if bytes[i] != b'\\' {
            i += 1;
            d += 1;
            continue;
        }
        let hex = match bytes.get(i + 1) {
            Some(b'u') => 4,
            Some(b'U') => 8,
            _ => 0,
        };
        if hex == 0 {
            i += 2;
            d += 1;
        } else {
            let value = raw
                .get(i + 2..i + 2 + hex)
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .and_then(char::from_u32);
            i += 2 + hex;
            d += value.map_or(1, char::len_utf8);
        }
    }
    i
}

/// A validation error of policy number `index`, placed at the value of its key.
pub(super) fn field_error(text: &str, index: usize, id: &str, e: FieldError) -> PolicyError {
    let position = policy_nodes(text)
        .and_then(|mut nodes| (index < nodes.len()).then(|| nodes.swap_remove(index)))
        .map(|node| {
            let table_start = node.0.span().start;
            let mut current = node;
            for part in e.key.split('.') {
                match current.0.into_inner() {
                    Inner::Table(mut table) => match table.remove(part) {
                        Some(child) => current = child,
                        None => return table_start,
                    },
                    Inner::Array(mut items) => match part.parse::<usize>() {
                        Ok(i) if i < items.len() => current = items.swap_remove(i),
                        _ => return table_start,
                    },
                    Inner::Other => return table_start,
                }
            }
            let start = current.0.span().start;
            match e.offset {
                Some(offset) => inside_string(text, start, offset),
                None => start,
            }
        })
        .or_else(|| headers(text).get(index).copied());
    let (line, column) = match position {
        Some(offset) => {
            let (l, c) = line_col(text, offset);
            (Some(l), Some(c))
        }
        None => (None, None),
    };
    PolicyError {
        line,
        column,
        policy: (!id.is_empty()).then(|| id.to_string()),
        message: e.message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_become_lines_and_columns() {
        let text = "a = 1\nbé = 2\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 6), (2, 1));
        assert_eq!(line_col(text, text.find('2').unwrap()), (2, 6));
    }

    #[test]
    fn headers_and_ids_are_found_without_parsing() {
        let text = "[[policy]]\nid = \"a\"\n  [[ policy ]]\n id='b'\n[policy.match]\n";
        let h = headers(text);
        assert_eq!(h.len(), 2);
        assert_eq!(scan_id(text, h[0], h[1]).as_deref(), Some("a"));
        assert_eq!(scan_id(text, h[1], text.len()).as_deref(), Some("b"));
    }
}
