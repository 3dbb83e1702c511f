//! A JA4 fingerprint of a TLS ClientHello, computed from the raw TLS records the accept
//! loop reads (and puts back) before the handshake: `t`, TLS version, SNI or
//! not, cipher and extension counts, first ALPN; then truncated SHA-256 of the sorted
//! cipher suites, and of the sorted extensions with the signature algorithms. GREASE
//! values are ignored, as the JA4 specification says.

use sha2::{Digest, Sha256};

const HANDSHAKE: u8 = 0x16;
const CLIENT_HELLO: u8 = 0x01;
const EXT_SNI: u16 = 0x0000;
const EXT_ALPN: u16 = 0x0010;
const EXT_SIGNATURE_ALGORITHMS: u16 = 0x000d;
const EXT_SUPPORTED_VERSIONS: u16 = 0x002b;

/// Longest ClientHello read for a fingerprint (a browser's, post-quantum key shares
/// included, is under 2 KiB).
pub const MAX_HELLO: usize = 32 * 1024;

/// What the first bytes of a connection say of the ClientHello they begin.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// A handshake so far: more bytes are needed.
    More,
    /// Not a ClientHello (or one longer than [`MAX_HELLO`]): no fingerprint.
    Not,
    /// The whole ClientHello message (type, length and body).
    Whole(Vec<u8>),
}

/// The ClientHello at the start of `buf`, put together from as many handshake records as
/// it spans: a client may split it over several (RFC 8446 5.1), and one read from the
/// first record alone would give such a client no fingerprint, and so no `ja4:`
/// mitigation could reach it.
pub fn client_hello(buf: &[u8]) -> Hello {
    let mut message: Vec<u8> = Vec::new();
    let mut rest = buf;
    loop {
        if rest.len() < 5 {
            return if rest.first().is_none_or(|b| *b == HANDSHAKE) {
                Hello::More
            } else {
                Hello::Not
            };
        }
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        // Handshake records are never empty (RFC 8446 5.1).
        if rest[0] != HANDSHAKE || len == 0 {
            return Hello::Not;
        }
        let Some(fragment) = rest.get(5..5 + len) else {
            return Hello::More;
        };
        message.extend_from_slice(fragment);
        rest = &rest[5 + len..];
        if let [kind, a, b, c, ..] = message[..] {
            let need = 4 + (usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c));
            if kind != CLIENT_HELLO || need > MAX_HELLO {
                return Hello::Not;
            }
            if message.len() >= need {
                message.truncate(need);
                return Hello::Whole(message);
            }
        }
    }
}

fn is_grease(v: u16) -> bool {
    v & 0x0f0f == 0x0a0a && (v >> 8) == (v & 0xff)
}

/// A byte reader that fails softly at the end of its input.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
    }
    fn vec8(&mut self) -> Option<Reader<'a>> {
        let n = self.u8()?;
        self.take(n.into()).map(Reader)
    }
    fn vec16(&mut self) -> Option<Reader<'a>> {
        let n = self.u16()?;
        self.take(n.into()).map(Reader)
    }
    fn u16s(mut self) -> Vec<u16> {
        let mut out = Vec::new();
        while let Some(v) = self.u16() {
            out.push(v);
        }
        out
    }
}

/// The JA4 fingerprint of the ClientHello in `records` (whole TLS records), or `None`
/// when they do not hold a complete one.
#[cfg(test)]
pub fn fingerprint(records: &[u8]) -> Option<String> {
    match client_hello(records) {
        Hello::Whole(message) => fingerprint_hello(&message),
        _ => None,
    }
}

/// The JA4 fingerprint of a ClientHello message, or `None` when it cannot be read.
pub fn fingerprint_hello(message: &[u8]) -> Option<String> {
    let mut r = Reader(message);
    if r.u8()? != CLIENT_HELLO {
        return None;
    }
    let len = r.u24()?;
    let mut hello = Reader(r.take(len)?);
    let legacy_version = hello.u16()?;
    hello.take(32)?;
    hello.vec8()?;
    let ciphers: Vec<u16> = hello
        .vec16()?
        .u16s()
        .into_iter()
        .filter(|c| !is_grease(*c))
        .collect();
    hello.vec8()?;
    let mut exts = hello.vec16().unwrap_or(Reader(&[]));
    let (mut ext_types, mut sig_algs) = (Vec::new(), Vec::new());
    let (mut sni, mut alpn, mut version) = (false, None, legacy_version);
    while let Some(ty) = exts.u16() {
        let mut body = exts.vec16()?;
        if is_grease(ty) {
            continue;
        }
        ext_types.push(ty);
        match ty {
            EXT_SNI => sni = true,
            EXT_ALPN => {
                alpn = body
                    .vec16()
                    .and_then(|mut l| l.vec8())
                    .map(|p| p.0.to_vec());
            }
            EXT_SIGNATURE_ALGORITHMS => sig_algs = body.vec16()?.u16s(),
            EXT_SUPPORTED_VERSIONS => {
                if let Some(v) = body
                    .vec8()?
                    .u16s()
                    .into_iter()
                    .filter(|v| !is_grease(*v))
                    .max()
                {
                    version = v;
                }
            }
            _ => {}
        }
    }
    let version = match version {
        0x0304 => "13",
        0x0303 => "12",
        0x0302 => "11",
        0x0301 => "10",
        0x0300 => "s3",
        _ => "00",
    };
    let a = format!(
        "t{version}{}{:02}{:02}{}",
        if sni { 'd' } else { 'i' },
        ciphers.len().min(99),
        ext_types.len().min(99),
        alpn_chars(alpn.as_deref())
    );
    let mut sorted_ciphers = ciphers;
    sorted_ciphers.sort_unstable();
    let b = hash12(&hex_list(&sorted_ciphers));
    let mut sorted_exts: Vec<u16> = ext_types
        .into_iter()
        .filter(|t| *t != EXT_SNI && *t != EXT_ALPN)
        .collect();
    sorted_exts.sort_unstable();
    let c = if sorted_exts.is_empty() {
        "000000000000".to_string()
    } else if sig_algs.is_empty() {
        hash12(&hex_list(&sorted_exts))
    } else {
        hash12(&format!(
            "{}_{}",
            hex_list(&sorted_exts),
            hex_list(&sig_algs)
        ))
    };
    Some(format!("{a}_{b}_{c}"))
}

/// First and last character of the first ALPN value; hex digits when not alphanumeric.
fn alpn_chars(alpn: Option<&[u8]>) -> String {
    match alpn {
        None | Some([]) => "00".into(),
        Some(p) => {
            let (first, last) = (p[0], p[p.len() - 1]);
            if first.is_ascii_alphanumeric() && last.is_ascii_alphanumeric() {
                format!("{}{}", first as char, last as char)
            } else {
                let h = hex::encode(p);
                let first = h.chars().next().unwrap_or('0');
                let last = h.chars().last().unwrap_or('0');
                format!("{first}{last}")
            }
        }
    }
}

fn hex_list(values: &[u16]) -> String {
    values
        .iter()
        .map(|v| format!("{v:04x}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn hash12(s: &str) -> String {
    if s.is_empty() {
        return "000000000000".into();
    }
    let mut h = hex::encode(Sha256::digest(s.as_bytes()));
    h.truncate(12);
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello with the given ciphers and (type, body) extensions.
    fn hello(ciphers: &[u16], exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend([7u8; 32]);
        body.push(0);
        body.extend(u16::try_from(ciphers.len() * 2).unwrap().to_be_bytes());
        for c in ciphers {
            body.extend(c.to_be_bytes());
        }
        body.extend([1, 0]);
        let mut ext_bytes = Vec::new();
        for (t, b) in exts {
            ext_bytes.extend(t.to_be_bytes());
            ext_bytes.extend(u16::try_from(b.len()).unwrap().to_be_bytes());
            ext_bytes.extend(b);
        }
        body.extend(u16::try_from(ext_bytes.len()).unwrap().to_be_bytes());
        body.extend(ext_bytes);
        let mut hs = vec![CLIENT_HELLO, 0];
        hs.extend(u16::try_from(body.len()).unwrap().to_be_bytes());
        hs.extend(body);
        let mut rec = vec![HANDSHAKE, 3, 1];
        rec.extend(u16::try_from(hs.len()).unwrap().to_be_bytes());
        rec.extend(hs);
        rec
    }

    #[test]
    fn fingerprints_follow_the_spec() {
        let sni = (EXT_SNI, vec![0, 6, 0, 0, 3, b'a', b'.', b'b']);
        let alpn = (EXT_ALPN, vec![0, 3, 2, b'h', b'2']);
        let versions = (EXT_SUPPORTED_VERSIONS, vec![4, 0x0a, 0x0a, 0x03, 0x04]);
        let sigs = (EXT_SIGNATURE_ALGORITHMS, vec![0, 4, 0x04, 0x03, 0x08, 0x04]);
        let grease = (0x1a1a, vec![]);
        let groups = (0x000a, vec![0, 2, 0, 0x1d]);
        let rec = hello(
            &[0x2a2a, 0x1302, 0x1301],
            &[grease, sni, alpn, versions, sigs, groups],
        );
        let fp = fingerprint(&rec).unwrap();
        let parts: Vec<&str> = fp.split('_').collect();
        // 2 ciphers and 5 extensions once GREASE is dropped; TLS 1.3 from
        // supported_versions; SNI present; ALPN h2.
        assert_eq!(parts[0], "t13d0205h2");
        assert_eq!(parts[1], hash12("1301,1302"));
        assert_eq!(parts[2], hash12("000a,000d,002b_0403,0804"));
        // Without SNI, ALPN or extensions.
        let bare = fingerprint(&hello(&[0x002f], &[])).unwrap();
        assert_eq!(bare, format!("t12i010000_{}_000000000000", hash12("002f")));
        assert_eq!(fingerprint(&rec[..rec.len() - 3]), None);
        assert_eq!(client_hello(&rec[..rec.len() - 3]), Hello::More);
        assert_eq!(client_hello(b"GET / HTTP/1.1"), Hello::Not);
        assert_eq!(client_hello(b""), Hello::More);
    }

    /// `record` cut into handshake records of at most `size` bytes of payload.
    fn split(record: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for part in record[5..].chunks(size) {
            out.extend([HANDSHAKE, record[1], record[2]]);
            out.extend(u16::try_from(part.len()).unwrap().to_be_bytes());
            out.extend(part);
        }
        out
    }

    #[test]
    fn a_client_hello_split_over_records_has_the_same_fingerprint() {
        for record in reference_records() {
            let whole = fingerprint(&record).expect("a fingerprint");
            for size in [1, 3, 4, 100] {
                let split = split(&record, size);
                assert_eq!(
                    fingerprint(&split).as_deref(),
                    Some(whole.as_str()),
                    "{size}"
                );
                // Until its last record is in, more is needed.
                assert_eq!(client_hello(&split[..split.len() - 1]), Hello::More);
            }
        }
        // What follows the hello (the client's next record) is not part of it.
        let mut rec = reference_records().swap_remove(0);
        let whole = fingerprint(&rec);
        rec.extend([0x14, 3, 3, 0, 1, 1]);
        assert_eq!(fingerprint(&rec), whole);
        // A hello longer than a fingerprint is read for is not waited for.
        let huge = [HANDSHAKE, 3, 1, 0, 4, CLIENT_HELLO, 1, 0, 0];
        assert_eq!(client_hello(&huge), Hello::Not);
        // An empty handshake record is not a handshake.
        assert_eq!(client_hello(&[HANDSHAKE, 3, 1, 0, 0]), Hello::Not);
    }

    /// The examples of the specification's ALPN section.
    #[test]
    fn alpn_edge_cases_follow_the_spec() {
        let cases: [(&[u8], &str); 9] = [
            (b"h2", "h2"),
            (b"http/1.1", "h1"),
            (b"z", "zz"),
            (&[0xab], "ab"),
            (&[0x20], "20"),
            (&[0xab, 0xcd], "ad"),
            (&[0x20, 0x61], "21"),
            (&[0x30, 0xab], "3b"),
            (&[0x30, 0x31, 0xab, 0xcd], "3d"),
        ];
        for (alpn, want) in cases {
            assert_eq!(alpn_chars(Some(alpn)), want, "{alpn:02x?}");
        }
        assert_eq!(alpn_chars(Some(&[0x61, 0x20])), "60");
        assert_eq!(alpn_chars(Some(&[])), "00");
        assert_eq!(alpn_chars(None), "00");
    }

    /// Real ClientHellos captured in FoxIO-LLC/ja4's test pcaps, with the fingerprint
    /// their reference implementation gives (browsers with GREASE, TLS 1.2 and 1.3, a
    /// non-alphanumeric ALPN value, where the specification is followed).
    #[test]
    fn reference_vectors_match() {
        let vectors = include_str!("ja4_vectors.txt");
        let mut checked = 0;
        for line in vectors.lines().filter(|l| !l.starts_with('#')) {
            let mut parts = line.split(' ');
            let (Some(source), Some(expected), Some(record)) =
                (parts.next(), parts.next(), parts.next())
            else {
                panic!("bad vector line: {line}");
            };
            let record = hex::decode(record).unwrap();
            assert!(matches!(client_hello(&record), Hello::Whole(_)), "{source}");
            assert_eq!(fingerprint(&record).as_deref(), Some(expected), "{source}");
            checked += 1;
        }
        assert_eq!(checked, 4);
    }

    fn reference_records() -> Vec<Vec<u8>> {
        include_str!("ja4_vectors.txt")
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(' ').nth(2))
            .map(|h| hex::decode(h).unwrap())
            .collect()
    }

    proptest::proptest! {
        // The first bytes of every TLS connection come from whoever connects.
        #[test]
        fn any_bytes_are_read_without_panicking(bytes in proptest::collection::vec(0u8.., 0..600)) {
            let _ = client_hello(&bytes);
            if let Some(fp) = fingerprint(&bytes) {
                proptest::prop_assert!(fp.is_ascii());
            }
        }

        #[test]
        fn damaged_client_hellos_are_read_without_panicking(
            which in 0usize..4,
            cut in 0usize..2000,
            flips in proptest::collection::vec((0usize..2000, 0u8..), 0..8),
        ) {
            let records = reference_records();
            let mut record = records[which % records.len()].clone();
            for (at, byte) in flips {
                let n = record.len();
                record[at % n] = byte;
            }
            record.truncate(cut.min(record.len()));
            let _ = fingerprint(&record);
            if record.len() >= 5 {
                let _ = fingerprint(&split(&record, 7));
            }
        }
    }
}
