//! Request events as JSON without the generic detours: the proxy reports every request,
//! so the JSON of an event is written straight into the batch's buffer (keys as
//! literals, strings copied in runs between escapes, timestamp and address formatted on
//! the stack). The text is byte for byte what serde's derived serialisation of
//! `RequestEvent` writes with serde_json (tests in `tests/event_json.rs` hold it to that).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::IpAddr;

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::Serializer;
use serde::ser::Error as _;

use crate::event::{EnforcedAction, RequestEvent, TlsInfo};

/// A short ASCII text built on the stack.
pub(crate) struct Ascii<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> Ascii<N> {
    fn new() -> Self {
        Ascii {
            buf: [0; N],
            len: 0,
        }
    }

    /// Callers size `N` for the longest text they write, so nothing is ever dropped.
    fn push(&mut self, b: u8) {
        if let Some(slot) = self.buf.get_mut(self.len) {
            *slot = b;
            self.len += 1;
        }
    }

    /// The last `width` decimal digits of `n`, zero-padded (the caller knows the width,
    /// so the digits go straight into place).
    fn fixed(&mut self, mut n: u32, width: usize) {
        let end = self.len + width;
        if let Some(slot) = self.buf.get_mut(self.len..end) {
            for b in slot.iter_mut().rev() {
                *b = b'0' + (n % 10) as u8;
                n /= 10;
            }
            self.len = end;
        }
    }

    /// `n` in decimal, zero-padded to at least `width` digits.
    fn digits(&mut self, n: u32, width: usize) {
        let mut len = 1;
        let mut rest = n / 10;
        while rest > 0 {
            len += 1;
            rest /= 10;
        }
        self.fixed(n, len.max(width));
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    pub(crate) fn as_str(&self) -> Result<&str, std::str::Utf8Error> {
        std::str::from_utf8(self.bytes())
    }
}

impl<const N: usize> fmt::Write for Ascii<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        let slot = self.buf.get_mut(self.len..end).ok_or(fmt::Error)?;
        slot.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// The timestamp as chrono's serde writes a `DateTime<Utc>`: RFC 3339 with `Z`, and 0,
/// 3, 6 or 9 fractional digits, the fewest that keep every non-zero digit (a leap
/// second reads as second 60). Years outside 0..=9999 get a sign and at least 4 digits.
pub(crate) fn rfc3339(ts: &DateTime<Utc>) -> Ascii<40> {
    let dt = ts.naive_utc();
    let mut sec = dt.second();
    let mut nano = dt.nanosecond();
    if nano >= 1_000_000_000 {
        sec += 1;
        nano -= 1_000_000_000;
    }
    let mut a = Ascii::new();
    let year = dt.year();
    if (0..=9999).contains(&year) {
        a.fixed(year.unsigned_abs(), 4);
    } else {
        a.push(if year < 0 { b'-' } else { b'+' });
        a.digits(year.unsigned_abs(), 4);
    }
    a.push(b'-');
    a.fixed(dt.month(), 2);
    a.push(b'-');
    a.fixed(dt.day(), 2);
    a.push(b'T');
    a.fixed(dt.hour(), 2);
    a.push(b':');
    a.fixed(dt.minute(), 2);
    a.push(b':');
    a.fixed(sec, 2);
    if nano != 0 {
        a.push(b'.');
        if nano.is_multiple_of(1_000_000) {
            a.fixed(nano / 1_000_000, 3);
        } else if nano.is_multiple_of(1_000) {
            a.fixed(nano / 1_000, 6);
        } else {
            a.fixed(nano, 9);
        }
    }
    a.push(b'Z');
    a
}

/// The address as its `Display` writes it. IPv6 text (zero-run compression, the dotted
/// tail of IPv4-mapped addresses) is left to the standard library; 48 bytes hold the
/// longest form.
pub(crate) fn ip_text(ip: &IpAddr) -> Result<Ascii<48>, fmt::Error> {
    let mut a = Ascii::new();
    match ip {
        IpAddr::V4(v4) => {
            let [p, q, r, s] = v4.octets();
            a.digits(u32::from(p), 1);
            a.push(b'.');
            a.digits(u32::from(q), 1);
            a.push(b'.');
            a.digits(u32::from(r), 1);
            a.push(b'.');
            a.digits(u32::from(s), 1);
        }
        IpAddr::V6(v6) => write!(a, "{v6}")?,
    }
    Ok(a)
}

/// An address's text, on the stack.
pub struct IpText(Ascii<48>);

impl IpText {
    /// The address as `Display` writes it.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.bytes()
    }
}

/// The text of `ip` without a heap allocation (IPv4, the common case, without the
/// formatting machinery either): for hot paths such as a proxy's forwarding headers.
pub fn format_ip(ip: &IpAddr) -> IpText {
    // 48 bytes hold every address's text, so the write cannot fail.
    IpText(ip_text(ip).unwrap_or_else(|_| Ascii::new()))
}

/// `serialize_with` for `RequestEvent::timestamp`: one string, the text chrono writes.
pub(crate) fn serialize_timestamp<S: Serializer>(
    ts: &DateTime<Utc>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(rfc3339(ts).as_str().map_err(S::Error::custom)?)
}

/// `serialize_with` for `RequestEvent::client_ip`: one string, the `Display` text.
pub(crate) fn serialize_ip<S: Serializer>(ip: &IpAddr, serializer: S) -> Result<S::Ok, S::Error> {
    let text = ip_text(ip).map_err(S::Error::custom)?;
    serializer.serialize_str(text.as_str().map_err(S::Error::custom)?)
}

/// Lower-case hex digits, as serde_json writes `\u00XX` escapes.
const HEX: &[u8; 16] = b"0123456789abcdef";

/// Whether any byte of `bytes` needs escaping in a JSON string: `"`, `\\` or a control
/// character. Eight bytes at a time (the classic "has a byte less than n" and "has a
/// zero byte" word tests), since nearly every string needs none.
fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let mut eight = [0u8; 8];
        eight.copy_from_slice(word);
        let x = u64::from_le_bytes(eight);
        let quote = x ^ (ONES * u64::from(b'"'));
        let backslash = x ^ (ONES * u64::from(b'\\'));
        let found =
            (x.wrapping_sub(ONES * 0x20) | quote.wrapping_sub(ONES) | backslash.wrapping_sub(ONES))
                & !x
                & HIGHS;
        // One `!x` serves all three tests: xor with `"` or `\\` (both below 0x80)
        // keeps every byte's high bit, so `!quote` and `!backslash` mask the same bits.
        if found != 0 {
            return true;
        }
    }
    words
        .remainder()
        .iter()
        .any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

/// A JSON string as serde_json writes it: `"` and `\\` escaped, control characters as
/// `\b \t \n \f \r` or `\u00XX`, everything else (non-ASCII included) as is.
fn push_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.push(b'"');
    if !needs_escape(bytes) {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape = match b {
            b'"' => b'"',
            b'\\' => b'\\',
            0x08 => b'b',
            0x09 => b't',
            0x0A => b'n',
            0x0C => b'f',
            0x0D => b'r',
            0x00..=0x1F => b'u',
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if escape == b'u' {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xF)]);
        } else {
            out.push(b'\\');
            out.push(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
}

/// A float as serde_json writes it. Weights are 1 / sample rate, nearly always whole
/// numbers, which serde_json (through `ryu`) writes as digits and `.0` below 1e16; any
/// other value goes through serde_json itself. Not finite: `null`, as serde_json does.
fn push_f64(out: &mut Vec<u8>, w: f64) {
    if w.fract() == 0.0 && w.abs() < 1e15 {
        if w.is_sign_negative() {
            out.push(b'-');
        }
        push_u64(out, w.abs() as u64);
        out.extend_from_slice(b".0");
    } else {
        match serde_json::Number::from_f64(w) {
            Some(n) => out.extend_from_slice(n.to_string().as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
    }
}

fn push_map(out: &mut Vec<u8>, map: &[(&str, Cow<'_, str>)]) {
    out.push(b'{');
    for (i, (k, v)) in map.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_str(out, k);
        out.push(b':');
        push_str(out, v);
    }
    out.push(b'}');
}

/// A request event's fields, borrowed from wherever they are kept: a [`RequestEvent`], or
/// a request still in the proxy's hands, whose event is written into its batch without
/// an owned copy of any field.
#[derive(Clone, Copy, Debug)]
pub struct EventView<'a> {
    pub id: &'a str,
    pub timestamp: &'a DateTime<Utc>,
    pub app: &'a str,
    pub proxy_id: &'a str,
    pub client_ip: IpAddr,
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub latency_us: u64,
    pub bytes: u64,
    pub user_agent: Option<&'a str>,
    /// Reported headers, name and value; written as one JSON object in this order.
    pub headers: &'a [(&'a str, Cow<'a, str>)],
    /// Reported cookies, name and hashed value.
    pub cookies: &'a [(&'a str, Cow<'a, str>)],
    pub tls: Option<&'a TlsInfo>,
    pub action: EnforcedAction,
    pub weight: f64,
}

impl EventView<'_> {
    /// Appends the event's JSON to `out`: for a view of a [`RequestEvent`], the same text
    /// as `serde_json::to_vec` of it, for about a third of the instructions.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"id\":");
        push_str(out, self.id);
        out.extend_from_slice(b",\"timestamp\":\"");
        out.extend_from_slice(rfc3339(self.timestamp).bytes());
        out.extend_from_slice(b"\",\"app\":");
        push_str(out, self.app);
        out.extend_from_slice(b",\"proxy_id\":");
        push_str(out, self.proxy_id);
        out.extend_from_slice(b",\"client_ip\":\"");
        match ip_text(&self.client_ip) {
            Ok(text) => out.extend_from_slice(text.bytes()),
            // Not reached (the buffer holds any address); correct all the same.
            Err(_) => out.extend_from_slice(self.client_ip.to_string().as_bytes()),
        }
        out.extend_from_slice(b"\",\"method\":");
        push_str(out, self.method);
        out.extend_from_slice(b",\"host\":");
        push_str(out, self.host);
        out.extend_from_slice(b",\"path\":");
        push_str(out, self.path);
        out.extend_from_slice(b",\"status\":");
        push_u64(out, u64::from(self.status));
        out.extend_from_slice(b",\"latency_us\":");
        push_u64(out, self.latency_us);
        out.extend_from_slice(b",\"bytes\":");
        push_u64(out, self.bytes);
        if let Some(agent) = self.user_agent {
            out.extend_from_slice(b",\"user_agent\":");
            push_str(out, agent);
        }
        if !self.headers.is_empty() {
            out.extend_from_slice(b",\"headers\":");
            push_map(out, self.headers);
        }
        if !self.cookies.is_empty() {
            out.extend_from_slice(b",\"cookies\":");
            push_map(out, self.cookies);
        }
        if let Some(tls) = self.tls {
            out.extend_from_slice(b",\"tls\":{\"version\":");
            push_str(out, &tls.version);
            if let Some(fingerprint) = &tls.fingerprint {
                out.extend_from_slice(b",\"fingerprint\":");
                push_str(out, fingerprint);
            }
            out.push(b'}');
        }
        out.extend_from_slice(b",\"action\":\"");
        out.extend_from_slice(self.action.as_str().as_bytes());
        out.extend_from_slice(b"\",\"weight\":");
        push_f64(out, self.weight);
        out.push(b'}');
    }
}

impl RequestEvent {
    /// Appends this event's JSON to `out`: the same text as `serde_json::to_vec(self)`.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let headers = pairs(&self.headers);
        let cookies = pairs(&self.cookies);
        EventView {
            id: &self.id,
            timestamp: &self.timestamp,
            app: &self.app,
            proxy_id: &self.proxy_id,
            client_ip: self.client_ip,
            method: &self.method,
            host: &self.host,
            path: &self.path,
            status: self.status,
            latency_us: self.latency_us,
            bytes: self.bytes,
            user_agent: self.user_agent.as_deref(),
            headers: &headers,
            cookies: &cookies,
            tls: self.tls.as_ref(),
            action: self.action,
            weight: self.weight,
        }
        .write_json(out);
    }
}

fn pairs(map: &BTreeMap<String, String>) -> Vec<(&str, Cow<'_, str>)> {
    map.iter()
        .map(|(k, v)| (k.as_str(), Cow::Borrowed(v.as_str())))
        .collect()
}

/// Room for the body's brackets and a small event, until the batch's first event gives
/// the real size.
const FIRST_EVENT_ROOM: usize = 384;

/// The body of `POST /api/events`, `{"events":[...]}`, for a batch: what
/// `IngestionClient::ingest_slice` sends, the same text serde_json writes for an
/// `IngestRequest`.
pub fn ingest_body(events: &[RequestEvent]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FIRST_EVENT_ROOM);
    out.extend_from_slice(INGEST_BODY_START);
    for (i, ev) in events.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        ev.write_json(&mut out);
        if i == 0 {
            // A batch's events look alike: room for the rest at the first one's size
            // and an eighth, so the buffer is rarely copied while it grows. Without that
            // room (an absurd batch) it grows as it goes.
            let first = out.len();
            let rest = (first + first / 8).saturating_mul(events.len() - 1);
            let _ = out.try_reserve(rest);
        }
    }
    out.extend_from_slice(INGEST_BODY_END);
    out
}

/// What an ingest body starts with, before its events (comma separated).
pub const INGEST_BODY_START: &[u8] = b"{\"events\":[";
/// What an ingest body ends with, after its events.
pub const INGEST_BODY_END: &[u8] = b"]}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_pad_to_width_and_never_cut() {
        let mut a = Ascii::<32>::new();
        a.digits(7, 2);
        a.digits(0, 1);
        a.digits(12345, 4);
        a.digits(u32::MAX, 1);
        assert_eq!(a.as_str().unwrap(), "070123454294967295");
    }

    #[test]
    fn a_full_buffer_refuses_more_text() {
        let mut a = Ascii::<4>::new();
        assert!(a.write_str("abcd").is_ok());
        assert!(a.write_str("e").is_err());
        assert_eq!(a.as_str().unwrap(), "abcd");
    }

    #[test]
    fn escape_detection_matches_the_byte_rule_at_every_position() {
        let naive = |bytes: &[u8]| bytes.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\');
        for len in 0..20 {
            for at in 0..len {
                for b in 0..=255u8 {
                    let mut text = vec![b'a'; len];
                    text[at] = b;
                    assert_eq!(needs_escape(&text), naive(&text), "{b:#x} at {at} of {len}");
                    // Neighbours at and above 0x80 must not hide or fake a hit.
                    text.iter_mut()
                        .filter(|c| **c == b'a')
                        .for_each(|c| *c = 0xff);
                    assert_eq!(needs_escape(&text), naive(&text), "{b:#x} among 0xff");
                    text.iter_mut()
                        .filter(|c| **c == 0xff)
                        .for_each(|c| *c = 0x20);
                    assert_eq!(needs_escape(&text), naive(&text), "{b:#x} among spaces");
                }
            }
        }
    }

    #[test]
    fn integers_print_in_decimal() {
        for n in [0, 9, 10, 601, u64::from(u16::MAX), u64::MAX] {
            let mut out = Vec::new();
            push_u64(&mut out, n);
            assert_eq!(out, n.to_string().into_bytes());
        }
    }
}
