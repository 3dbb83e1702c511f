//! Proof-of-work challenges and clearance cookies, all stateless and signed with one
//! shared HMAC-SHA256 key, so any proxy instance holding the key accepts what another
//! issued.
//!
//! - A puzzle token `p.EXP.DIFFICULTY.SALT.MAC` asks for a nonce such that
//!   `SHA-256("TOKEN:NONCE")` starts with DIFFICULTY zero bits.
//! - A fallback token `f.NOT_BEFORE.EXP.DIFFICULTY.SALT.MAC` (for clients without
//!   JavaScript) is redeemed by waiting until NOT_BEFORE; the wait doubles with every bit
//!   of difficulty above [`FALLBACK_BASE_DIFFICULTY`], as the work of the puzzle does, so
//!   the no-script path is never the cheap way past a hard challenge.
//! - A clearance cookie `EXP.DIFFICULTY.SALT.MAC` lets requests through a challenge of
//!   at most DIFFICULTY until EXP: a cookie earned on an easy puzzle (before the client
//!   was flagged, or on one it asked for itself) does not clear a harder challenge.
//!
//! Every MAC covers the client's address (its /64 for IPv6, so privacy addresses inside
//! one network keep the cookie) and its User-Agent; neither travels in the token. Each
//! token is redeemable once per proxy instance: its salt is remembered until the token
//! expires, in a bounded set. When the set is full of unexpired salts, those expiring
//! soonest are forgotten rather than refusing every solution (which would let anyone who
//! fills it lock every browser out); a token replayed after that only earns another
//! cookie for the same address and browser, which its first cookie already cleared.
//! Several tabs each get their own token and every cookie they earn is valid, so they
//! never send each other back to the puzzle.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use arc_swap::ArcSwap;
use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};

/// The reserved path solutions are posted to (and fallback links point at).
pub const CHALLENGE_PATH: &str = "/.esper/challenge";
/// The clearance cookie's name.
pub const COOKIE_NAME: &str = "esper_clearance";
/// Difficulty is capped here whatever the mitigation asks: 2^24 hashes already take a
/// browser minutes.
pub const MAX_DIFFICULTY: u8 = esper_protocol::MAX_CHALLENGE_DIFFICULTY;
/// How long a puzzle stays solvable.
pub const TOKEN_TTL: Duration = Duration::from_secs(300);
/// Redeemed tokens remembered at most (see the module documentation for what happens
/// when more are unexpired).
pub const REPLAY_CAPACITY: usize = 100_000;
/// The difficulty a new puzzle gets when nothing says otherwise (a refused solution
/// whose token cannot be trusted); the policies' default.
pub const DEFAULT_DIFFICULTY: u8 = 16;
/// Up to this difficulty the no-script path waits the configured delay; each bit above
/// doubles it.
pub const FALLBACK_BASE_DIFFICULTY: u8 = 16;
/// The no-script wait never exceeds this.
pub const MAX_FALLBACK_WAIT: Duration = Duration::from_secs(3600);
/// MAC bytes kept in tokens and cookies (128 bits).
const MAC_LEN: usize = 16;
/// Longest nonce accepted (decimal digits).
const MAX_NONCE_LEN: usize = 20;

type HmacSha256 = Hmac<Sha256>;

/// Why a token, solution or cookie was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("malformed")]
    Malformed,
    #[error("bad signature (forged, or for another address or browser)")]
    BadSignature,
    #[error("expired")]
    Expired,
    #[error("too early")]
    TooEarly,
    #[error("the proof of work is wrong")]
    WrongWork,
    #[error("already redeemed")]
    Replayed,
}

/// A freshly issued puzzle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Puzzle {
    pub token: String,
    pub difficulty: u8,
    /// Token for the no-JavaScript path, redeemable after `fallback_wait`.
    pub fallback: String,
    /// How long the no-JavaScript path waits at this difficulty.
    pub fallback_wait: Duration,
}

/// A cookie earned by a solution.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Clearance {
    pub value: String,
    pub max_age: Duration,
}

/// The signing keys: new tokens and cookies are signed with `current`; those signed
/// with the key before it are still honoured, so a change of key (a new
/// `challenge_secret`, or the control plane's key replacing a start-up one) does not send
/// every cleared browser back to the puzzle.
struct Keys {
    current: Vec<u8>,
    previous: Option<Vec<u8>>,
}

/// Issues and checks puzzles and cookies with one key (and the one before it).
pub struct Challenger {
    keys: ArcSwap<Keys>,
    clearance_ttl: Duration,
    fallback_delay: Duration,
    /// salt -> expiry (unix seconds) of redeemed tokens.
    used: Mutex<HashMap<u64, u64>>,
}

/// The part of the address a cookie is bound to: all of IPv4, the /64 of IPv6.
fn binding(ip: IpAddr) -> [u8; 9] {
    let mut out = [0u8; 9];
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            out[0] = 4;
            out[1..5].copy_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            out[0] = 6;
            out[1..9].copy_from_slice(&v6.octets()[..8]);
        }
    }
    out
}

/// Leading zero bits of a digest.
pub fn leading_zero_bits(digest: &[u8]) -> u32 {
    let mut bits = 0;
    for b in digest {
        if *b == 0 {
            bits += 8;
        } else {
            return bits + b.leading_zeros();
        }
    }
    bits
}

/// Does `nonce` solve `token` at `difficulty`?
pub fn solves(token: &str, nonce: &str, difficulty: u8) -> bool {
    let mut h = Sha256::new();
    h.update(token.as_bytes());
    h.update(b":");
    h.update(nonce.as_bytes());
    leading_zero_bits(&h.finalize()) >= u32::from(difficulty)
}

/// The MAC of a token or cookie's fields under `key`, bound to the client's address and
/// User-Agent.
fn mac_with(key: &[u8], kind: &[u8], fields: &[&[u8]], ip: IpAddr, ua: &str) -> [u8; MAC_LEN] {
    // Hmac accepts keys of any length; the error arm cannot happen.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return [0; MAC_LEN],
    };
    // Length-prefixed fields, so no two field lists hash alike.
    let bind = binding(ip);
    for field in [kind]
        .iter()
        .chain(fields)
        .chain([&&bind[..], &ua.as_bytes()])
    {
        mac.update(&(field.len() as u32).to_be_bytes());
        mac.update(field);
    }
    let full = mac.finalize().into_bytes();
    let mut out = [0u8; MAC_LEN];
    out.copy_from_slice(&full[..MAC_LEN]);
    out
}

impl Challenger {
    /// A challenger signing with `key`; cookies last `clearance_ttl`, the no-script path
    /// waits `fallback_delay`.
    pub fn new(key: &[u8], clearance_ttl: Duration, fallback_delay: Duration) -> Challenger {
        Challenger {
            keys: ArcSwap::from_pointee(Keys {
                current: key.to_vec(),
                previous: None,
            }),
            clearance_ttl,
            fallback_delay,
            used: Mutex::new(HashMap::new()),
        }
    }

    /// How long the no-script path waits at `difficulty`: the configured delay up to
    /// [`FALLBACK_BASE_DIFFICULTY`], doubled for every bit above it.
    pub fn fallback_wait(&self, difficulty: u8) -> Duration {
        let doublings = u32::from(difficulty.min(MAX_DIFFICULTY))
            .saturating_sub(u32::from(FALLBACK_BASE_DIFFICULTY));
        self.fallback_delay
            .saturating_mul(1 << doublings)
            .min(MAX_FALLBACK_WAIT)
    }

    /// Signs with `key` from now on; the key in use until now is still honoured (the
    /// one before it no longer is). `false` when `key` is already the one in use.
    pub fn set_key(&self, key: &[u8]) -> bool {
        let keys = self.keys.load();
        if keys.current == key {
            return false;
        }
        self.keys.store(std::sync::Arc::new(Keys {
            current: key.to_vec(),
            previous: Some(keys.current.clone()),
        }));
        true
    }

    /// Signs with `current` from now on and honours, besides it, `previous` only: as the
    /// control plane tells after a rotation, which may refuse every key before.
    /// `false` when nothing changed.
    pub fn set_keys(&self, current: &[u8], previous: Option<&[u8]>) -> bool {
        let keys = self.keys.load();
        if keys.current == current && keys.previous.as_deref() == previous {
            return false;
        }
        self.keys.store(std::sync::Arc::new(Keys {
            current: current.to_vec(),
            previous: previous.map(<[u8]>::to_vec),
        }));
        true
    }

    fn mac(&self, kind: &[u8], fields: &[&[u8]], ip: IpAddr, ua: &str) -> [u8; MAC_LEN] {
        mac_with(&self.keys.load().current, kind, fields, ip, ua)
    }

    fn check_mac(
        &self,
        kind: &[u8],
        fields: &[&[u8]],
        ip: IpAddr,
        ua: &str,
        given: &str,
    ) -> Result<(), Refusal> {
        let given = hex::decode(given).map_err(|_| Refusal::Malformed)?;
        if given.len() != MAC_LEN {
            return Err(Refusal::Malformed);
        }
        let keys = self.keys.load();
        let matches = |key: &[u8]| {
            let expected = mac_with(key, kind, fields, ip, ua);
            // Constant-time comparison.
            expected
                .iter()
                .zip(&given)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
        };
        if matches(&keys.current) || keys.previous.as_deref().is_some_and(matches) {
            Ok(())
        } else {
            Err(Refusal::BadSignature)
        }
    }

    /// A new puzzle for a client at `ip` with `ua`, at unix time `now`.
    pub fn issue(&self, ip: IpAddr, ua: &str, difficulty: u8, now: u64) -> Puzzle {
        // A zero-bit puzzle is solved by any nonce: a challenge must cost something.
        let difficulty = difficulty.clamp(1, MAX_DIFFICULTY);
        let exp = now.saturating_add(TOKEN_TTL.as_secs()).to_string();
        let d = difficulty.to_string();
        let salt = format!("{:016x}", rand::random::<u64>());
        let mac = hex::encode(self.mac(
            b"p",
            &[exp.as_bytes(), d.as_bytes(), salt.as_bytes()],
            ip,
            ua,
        ));
        let token = format!("p.{exp}.{d}.{salt}.{mac}");
        // The fallback stays redeemable for a whole token lifetime after its wait.
        let fallback_wait = self.fallback_wait(difficulty);
        let not_before = now.saturating_add(fallback_wait.as_secs());
        let fexp = not_before.saturating_add(TOKEN_TTL.as_secs()).to_string();
        let not_before = not_before.to_string();
        let fsalt = format!("{:016x}", rand::random::<u64>());
        let fmac = hex::encode(self.mac(
            b"f",
            &[
                not_before.as_bytes(),
                fexp.as_bytes(),
                d.as_bytes(),
                fsalt.as_bytes(),
            ],
            ip,
            ua,
        ));
        Puzzle {
            token,
            difficulty,
            fallback: format!("f.{not_before}.{fexp}.{d}.{fsalt}.{fmac}"),
            fallback_wait,
        }
    }

    /// The difficulty a puzzle or fallback token was issued at, if its signature holds
    /// for this client (expired or spent tokens included): what a refused client is asked
    /// again, without trusting a number it made up.
    pub fn token_difficulty(&self, token: &str, ip: IpAddr, ua: &str) -> Option<u8> {
        let parts: Vec<&str> = token.split('.').collect();
        let (kind, fields, d, mac): (&[u8], Vec<&[u8]>, &str, &str) = match parts[..] {
            ["p", exp, d, salt, mac] => (
                b"p",
                vec![exp.as_bytes(), d.as_bytes(), salt.as_bytes()],
                d,
                mac,
            ),
            ["f", not_before, exp, d, salt, mac] => (
                b"f",
                vec![
                    not_before.as_bytes(),
                    exp.as_bytes(),
                    d.as_bytes(),
                    salt.as_bytes(),
                ],
                d,
                mac,
            ),
            _ => return None,
        };
        self.check_mac(kind, &fields, ip, ua, mac).ok()?;
        d.parse().ok()
    }

    /// Checks a posted solution; on success the token is spent and a cookie issued.
    pub fn redeem_solution(
        &self,
        token: &str,
        nonce: &str,
        ip: IpAddr,
        ua: &str,
        now: u64,
    ) -> Result<Clearance, Refusal> {
        let parts: Vec<&str> = token.split('.').collect();
        let ["p", exp, d, salt, mac] = parts[..] else {
            return Err(Refusal::Malformed);
        };
        self.check_mac(
            b"p",
            &[exp.as_bytes(), d.as_bytes(), salt.as_bytes()],
            ip,
            ua,
            mac,
        )?;
        let exp: u64 = exp.parse().map_err(|_| Refusal::Malformed)?;
        let difficulty: u8 = d.parse().map_err(|_| Refusal::Malformed)?;
        if now >= exp {
            return Err(Refusal::Expired);
        }
        if nonce.is_empty()
            || nonce.len() > MAX_NONCE_LEN
            || !nonce.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(Refusal::Malformed);
        }
        if !solves(token, nonce, difficulty) {
            return Err(Refusal::WrongWork);
        }
        self.spend(salt, exp, now)?;
        Ok(self.mint_cookie(difficulty, salt, ip, ua, now))
    }

    /// Checks a fallback token (no JavaScript); on success it is spent and a cookie issued.
    pub fn redeem_fallback(
        &self,
        token: &str,
        ip: IpAddr,
        ua: &str,
        now: u64,
    ) -> Result<Clearance, Refusal> {
        let parts: Vec<&str> = token.split('.').collect();
        let ["f", not_before, exp, d, salt, mac] = parts[..] else {
            return Err(Refusal::Malformed);
        };
        self.check_mac(
            b"f",
            &[
                not_before.as_bytes(),
                exp.as_bytes(),
                d.as_bytes(),
                salt.as_bytes(),
            ],
            ip,
            ua,
            mac,
        )?;
        let not_before: u64 = not_before.parse().map_err(|_| Refusal::Malformed)?;
        let exp: u64 = exp.parse().map_err(|_| Refusal::Malformed)?;
        let difficulty: u8 = d.parse().map_err(|_| Refusal::Malformed)?;
        if now >= exp {
            return Err(Refusal::Expired);
        }
        if now < not_before {
            return Err(Refusal::TooEarly);
        }
        self.spend(salt, exp, now)?;
        Ok(self.mint_cookie(difficulty, salt, ip, ua, now))
    }

    /// Remembers a redeemed salt until its token's expiry.
    fn spend(&self, salt: &str, exp: u64, now: u64) -> Result<(), Refusal> {
        let salt = u64::from_str_radix(salt, 16).map_err(|_| Refusal::Malformed)?;
        let mut used = self.used.lock();
        if used.contains_key(&salt) {
            return Err(Refusal::Replayed);
        }
        if used.len() >= REPLAY_CAPACITY {
            used.retain(|_, e| *e > now);
            if used.len() >= REPLAY_CAPACITY {
                forget_soonest(&mut used, REPLAY_CAPACITY / 2);
                tracing::warn!(
                    capacity = REPLAY_CAPACITY,
                    "more unexpired challenge solutions than remembered; the half expiring \
                     soonest were forgotten (a replay of one earns only another cookie for \
                     the same client)"
                );
            }
        }
        used.insert(salt, exp);
        Ok(())
    }

    fn mint_cookie(&self, difficulty: u8, salt: &str, ip: IpAddr, ua: &str, now: u64) -> Clearance {
        let exp = now.saturating_add(self.clearance_ttl.as_secs()).to_string();
        let d = difficulty.to_string();
        let mac = hex::encode(self.mac(
            b"c",
            &[exp.as_bytes(), d.as_bytes(), salt.as_bytes()],
            ip,
            ua,
        ));
        Clearance {
            value: format!("{exp}.{d}.{salt}.{mac}"),
            max_age: self.clearance_ttl,
        }
    }

    /// The difficulty `cookie` was earned at, if it is a valid clearance for this client
    /// at `now`.
    pub fn check_cookie(
        &self,
        cookie: &str,
        ip: IpAddr,
        ua: &str,
        now: u64,
    ) -> Result<u8, Refusal> {
        let mut parts = cookie.split('.');
        let (Some(exp), Some(d), Some(salt), Some(mac), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(Refusal::Malformed);
        };
        self.check_mac(
            b"c",
            &[exp.as_bytes(), d.as_bytes(), salt.as_bytes()],
            ip,
            ua,
            mac,
        )?;
        let exp: u64 = exp.parse().map_err(|_| Refusal::Malformed)?;
        let difficulty: u8 = d.parse().map_err(|_| Refusal::Malformed)?;
        if now >= exp {
            return Err(Refusal::Expired);
        }
        Ok(difficulty)
    }

    /// The difficulty up to which `cookie` clears challenges for this client at `now`,
    /// if it is valid: every difficulty for one earned at the cap, since harder
    /// challenges are issued at the cap.
    pub fn clearance(&self, cookie: &str, ip: IpAddr, ua: &str, now: u64) -> Option<u8> {
        let earned = self.check_cookie(cookie, ip, ua, now).ok()?;
        Some(if earned >= MAX_DIFFICULTY {
            u8::MAX
        } else {
            earned
        })
    }
}

/// Keeps the `keep` entries of `used` that expire last (ties broken by salt, so exactly
/// `keep` stay even when many share a second).
fn forget_soonest(used: &mut HashMap<u64, u64>, keep: usize) {
    let mut entries: Vec<(u64, u64)> = used.iter().map(|(salt, exp)| (*exp, *salt)).collect();
    let cut = entries.len().saturating_sub(keep);
    if cut == 0 {
        return;
    }
    entries.select_nth_unstable(cut - 1);
    for (_, salt) in &entries[..cut] {
        used.remove(salt);
    }
}

/// The clearance cookie's value among a request's `Cookie` headers.
pub fn find_cookie(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == COOKIE_NAME).then_some(v.trim_matches('"'))
        })
}

/// A path the challenge may send the client back to: local only (no `//host`), printable.
pub fn safe_return(path: &str) -> &str {
    let ok = path.starts_with('/')
        && !path.starts_with("//")
        && !path.starts_with("/\\")
        && path.len() <= 2048
        && path.bytes().all(|b| b.is_ascii_graphic());
    if ok { path } else { "/" }
}

/// Decodes `application/x-www-form-urlencoded` pairs (also query strings).
pub fn form_pairs(body: &str) -> impl Iterator<Item = (String, String)> + '_ {
    body.split('&').filter(|s| !s.is_empty()).map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k), percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |at: usize| bytes.get(at).and_then(|b| char::from(*b).to_digit(16));
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match (hex(i + 1), hex(i + 2)) {
                (Some(hi), Some(lo)) => {
                    // Two hex digits always fit a byte.
                    out.push(u8::try_from(hi * 16 + lo).unwrap_or(b'?'));
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Percent-encodes everything but unreserved characters and `/`.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const UA: &str = "Mozilla/5.0 test";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn challenger() -> Challenger {
        Challenger::new(KEY, Duration::from_secs(3600), Duration::from_secs(5))
    }

    fn solve(token: &str, difficulty: u8) -> String {
        (0u64..)
            .map(|n| n.to_string())
            .find(|n| solves(token, n, difficulty))
            .unwrap()
    }

    #[test]
    fn a_solved_puzzle_earns_a_cookie_once() {
        let c = challenger();
        let now = 1_700_000_000;
        let p = c.issue(ip("192.0.2.1"), UA, 8, now);
        let nonce = solve(&p.token, 8);
        let wrong = (0u64..)
            .map(|n| n.to_string())
            .find(|n| !solves(&p.token, n, 8))
            .unwrap();
        assert_eq!(
            c.redeem_solution(&p.token, &wrong, ip("192.0.2.1"), UA, now),
            Err(Refusal::WrongWork)
        );
        let cookie = c
            .redeem_solution(&p.token, &nonce, ip("192.0.2.1"), UA, now + 1)
            .unwrap();
        assert_eq!(
            c.redeem_solution(&p.token, &nonce, ip("192.0.2.1"), UA, now + 2),
            Err(Refusal::Replayed)
        );
        c.check_cookie(&cookie.value, ip("192.0.2.1"), UA, now + 10)
            .unwrap();
        // Another instance with the same key honours it.
        challenger()
            .check_cookie(&cookie.value, ip("192.0.2.1"), UA, now + 10)
            .unwrap();
    }

    #[test]
    fn a_new_key_signs_and_the_one_before_is_still_honoured() {
        let c = challenger();
        let now = 1_700_000_000;
        let client = ip("192.0.2.1");
        let p = c.issue(client, UA, 4, now);
        let cookie = c
            .redeem_solution(&p.token, &solve(&p.token, 4), client, UA, now)
            .unwrap();
        let pending = c.issue(client, UA, 4, now);
        assert!(!c.set_key(KEY), "the same key changes nothing");
        assert!(c.set_key(b"the deployment's key, from now on"));
        // Signed before the change: still good here.
        c.check_cookie(&cookie.value, client, UA, now + 1).unwrap();
        let fresh = c
            .redeem_solution(
                &pending.token,
                &solve(&pending.token, 4),
                client,
                UA,
                now + 1,
            )
            .unwrap();
        // Signed after: with the new key only.
        assert_eq!(
            challenger().check_cookie(&fresh.value, client, UA, now + 2),
            Err(Refusal::BadSignature)
        );
        let peer = Challenger::new(
            b"the deployment's key, from now on",
            Duration::from_secs(3600),
            Duration::ZERO,
        );
        peer.check_cookie(&fresh.value, client, UA, now + 2)
            .unwrap();
        // Two changes on, the first key is forgotten.
        assert!(c.set_key(b"and then another"));
        assert_eq!(
            c.check_cookie(&cookie.value, client, UA, now + 3),
            Err(Refusal::BadSignature)
        );
        c.check_cookie(&fresh.value, client, UA, now + 3).unwrap();
    }

    #[test]
    fn cookies_are_bound_to_address_browser_and_time() {
        let c = challenger();
        let now = 1_700_000_000;
        let p = c.issue(ip("2001:db8:1:2:aaaa::1"), UA, 1, now);
        let nonce = solve(&p.token, 1);
        let cookie = c
            .redeem_solution(&p.token, &nonce, ip("2001:db8:1:2:aaaa::1"), UA, now)
            .unwrap()
            .value;
        let check = |addr: &str, ua: &str, t: u64| c.check_cookie(&cookie, ip(addr), ua, t);
        // The same /64 keeps it; another /64, another browser, or later than its expiry
        // does not.
        assert_eq!(check("2001:db8:1:2:bbbb::9", UA, now + 1), Ok(1));
        assert_eq!(
            check("2001:db8:1:3::1", UA, now + 1),
            Err(Refusal::BadSignature)
        );
        assert_eq!(
            check("2001:db8:1:2:aaaa::1", "curl/8", now + 1),
            Err(Refusal::BadSignature)
        );
        assert_eq!(
            check("2001:db8:1:2:aaaa::1", UA, now + 3600),
            Err(Refusal::Expired)
        );
        // IPv4 is bound to the full address.
        let p = c.issue(ip("192.0.2.1"), UA, 1, now);
        let v4 = c
            .redeem_solution(&p.token, &solve(&p.token, 1), ip("192.0.2.1"), UA, now)
            .unwrap()
            .value;
        assert_eq!(
            c.check_cookie(&v4, ip("192.0.2.2"), UA, now),
            Err(Refusal::BadSignature)
        );
    }

    #[test]
    fn forged_cookies_and_tokens_are_refused() {
        let c = challenger();
        let now = 1_700_000_000;
        let p = c.issue(ip("192.0.2.1"), UA, 4, now);
        let cookie = c
            .redeem_solution(&p.token, &solve(&p.token, 4), ip("192.0.2.1"), UA, now)
            .unwrap()
            .value;
        // Extending the expiry breaks the signature.
        let (exp, rest) = cookie.split_once('.').unwrap();
        let later = format!("{}.{rest}", exp.parse::<u64>().unwrap() + 86_400);
        assert_eq!(
            c.check_cookie(&later, ip("192.0.2.1"), UA, now),
            Err(Refusal::BadSignature)
        );
        // So does raising the difficulty it was earned at.
        let (d, rest) = rest.split_once('.').unwrap();
        assert_eq!(d, "4");
        let harder = format!("{exp}.24.{rest}");
        assert_eq!(
            c.check_cookie(&harder, ip("192.0.2.1"), UA, now),
            Err(Refusal::BadSignature)
        );
        // A cookie signed with another key.
        let other = Challenger::new(b"another key", Duration::from_secs(3600), Duration::ZERO);
        // Asked for 0 bits, a puzzle still costs one: no nonce solves it for nothing.
        let p2 = other.issue(ip("192.0.2.1"), UA, 0, now);
        assert_eq!(p2.difficulty, 1);
        let foreign = other
            .redeem_solution(&p2.token, &solve(&p2.token, 1), ip("192.0.2.1"), UA, now)
            .unwrap()
            .value;
        assert_eq!(
            c.check_cookie(&foreign, ip("192.0.2.1"), UA, now),
            Err(Refusal::BadSignature)
        );
        for junk in ["", "a.b", "1.2.3.4", "99999999999.00.zz", "1.2.3.4.5"] {
            assert!(c.check_cookie(junk, ip("192.0.2.1"), UA, now).is_err());
        }
        // Lowering a token's difficulty breaks its signature.
        let easier = p.token.replacen(".4.", ".0.", 1);
        assert_eq!(
            c.redeem_solution(&easier, "0", ip("192.0.2.1"), UA, now),
            Err(Refusal::BadSignature)
        );
        // Expired puzzles cannot be redeemed.
        let p = c.issue(ip("192.0.2.1"), UA, 1, now);
        assert_eq!(
            c.redeem_solution(
                &p.token,
                &solve(&p.token, 1),
                ip("192.0.2.1"),
                UA,
                now + TOKEN_TTL.as_secs()
            ),
            Err(Refusal::Expired)
        );
    }

    #[test]
    fn a_cookie_clears_challenges_up_to_the_difficulty_it_was_earned_at() {
        let c = challenger();
        let now = 1_700_000_000;
        let client = ip("192.0.2.1");
        let p = c.issue(client, UA, 6, now);
        let cookie = c
            .redeem_solution(&p.token, &solve(&p.token, 6), client, UA, now)
            .unwrap()
            .value;
        assert_eq!(c.clearance(&cookie, client, UA, now), Some(6));
        assert_eq!(c.clearance(&cookie, ip("192.0.2.2"), UA, now), None);
        // One earned at the cap clears any difficulty (harder ones are issued at the cap).
        let hardest = c
            .mint_cookie(MAX_DIFFICULTY, "0123456789abcdef", client, UA, now)
            .value;
        assert_eq!(c.clearance(&hardest, client, UA, now), Some(u8::MAX));
        // The fallback earns its puzzle's difficulty.
        let f = c
            .redeem_fallback(&p.fallback, client, UA, now + 5)
            .unwrap()
            .value;
        assert_eq!(c.check_cookie(&f, client, UA, now + 5), Ok(6));
    }

    #[test]
    fn a_refused_client_is_asked_again_at_a_difficulty_it_cannot_lower() {
        let c = challenger();
        let client = ip("192.0.2.1");
        let p = c.issue(client, UA, 20, 1_700_000_000);
        assert_eq!(c.token_difficulty(&p.token, client, UA), Some(20));
        assert_eq!(c.token_difficulty(&p.fallback, client, UA), Some(20));
        // A token with its difficulty edited, made up, or issued to someone else.
        let easier = p.token.replacen(".20.", ".0.", 1);
        assert_eq!(c.token_difficulty(&easier, client, UA), None);
        assert_eq!(c.token_difficulty("p.1.0.x.y", client, UA), None);
        assert_eq!(c.token_difficulty(&p.token, ip("192.0.2.9"), UA), None);
        assert_eq!(c.token_difficulty("", client, UA), None);
    }

    #[test]
    fn the_fallback_waits_longer_the_harder_the_puzzle() {
        let c = challenger();
        assert_eq!(c.fallback_wait(1), Duration::from_secs(5));
        assert_eq!(
            c.fallback_wait(FALLBACK_BASE_DIFFICULTY),
            Duration::from_secs(5)
        );
        assert_eq!(c.fallback_wait(18), Duration::from_secs(20));
        assert_eq!(c.fallback_wait(24), Duration::from_secs(5 * 256));
        assert_eq!(c.fallback_wait(200), c.fallback_wait(MAX_DIFFICULTY));
        let slow = Challenger::new(b"k", Duration::from_secs(3600), Duration::from_secs(60));
        assert_eq!(slow.fallback_wait(24), MAX_FALLBACK_WAIT);
        let now = 1_700_000_000;
        let client = ip("192.0.2.1");
        let p = c.issue(client, UA, 18, now);
        assert_eq!(p.fallback_wait, Duration::from_secs(20));
        assert_eq!(
            c.redeem_fallback(&p.fallback, client, UA, now + 19),
            Err(Refusal::TooEarly)
        );
        // Still redeemable after the puzzle's own lifetime, as the wait may exceed it.
        let late = now + 20 + TOKEN_TTL.as_secs() - 1;
        assert_eq!(
            c.redeem_fallback(&p.fallback, client, UA, late).map(|_| ()),
            Ok(())
        );
    }

    #[test]
    fn a_full_replay_set_forgets_the_soonest_expiring_instead_of_refusing() {
        let c = challenger();
        let now = 1_700_000_000;
        {
            let mut used = c.used.lock();
            for i in 0..REPLAY_CAPACITY as u64 {
                used.insert(i, now + 10 + i % 100);
            }
        }
        let client = ip("192.0.2.1");
        let p = c.issue(client, UA, 1, now);
        let nonce = solve(&p.token, 1);
        assert!(c.redeem_solution(&p.token, &nonce, client, UA, now).is_ok());
        let used = c.used.lock();
        assert_eq!(used.len(), REPLAY_CAPACITY / 2 + 1);
        // The ones kept are those expiring last, and the new one is remembered.
        assert!(used.values().all(|e| *e >= now + 59));
        drop(used);
        assert_eq!(
            c.redeem_solution(&p.token, &nonce, client, UA, now),
            Err(Refusal::Replayed)
        );
    }

    #[test]
    fn forgetting_keeps_exactly_as_many_when_expiries_tie() {
        let mut used: HashMap<u64, u64> = (0..1000).map(|salt| (salt, 42)).collect();
        forget_soonest(&mut used, 300);
        assert_eq!(used.len(), 300);
    }

    #[test]
    fn the_fallback_waits_then_clears_once() {
        let c = challenger();
        let now = 1_700_000_000;
        let p = c.issue(ip("192.0.2.1"), UA, 16, now);
        assert_eq!(
            c.redeem_fallback(&p.fallback, ip("192.0.2.1"), UA, now + 1),
            Err(Refusal::TooEarly)
        );
        let cookie = c
            .redeem_fallback(&p.fallback, ip("192.0.2.1"), UA, now + 5)
            .unwrap();
        c.check_cookie(&cookie.value, ip("192.0.2.1"), UA, now + 6)
            .unwrap();
        assert_eq!(
            c.redeem_fallback(&p.fallback, ip("192.0.2.1"), UA, now + 6),
            Err(Refusal::Replayed)
        );
        // A puzzle token is not a fallback token.
        assert_eq!(
            c.redeem_fallback(&p.token, ip("192.0.2.1"), UA, now + 6),
            Err(Refusal::Malformed)
        );
    }

    #[test]
    fn difficulty_is_capped() {
        let p = challenger().issue(ip("192.0.2.1"), UA, 200, 0);
        assert_eq!(p.difficulty, MAX_DIFFICULTY);
    }

    #[test]
    fn helpers() {
        assert_eq!(leading_zero_bits(&[0, 0x1f, 0xff]), 11);
        assert_eq!(safe_return("/a?b=1"), "/a?b=1");
        assert_eq!(safe_return("//evil.example/"), "/");
        assert_eq!(safe_return("https://evil.example/"), "/");
        let pairs: Vec<_> = form_pairs("token=p.1&nonce=42&return=%2Fa%3Fb%3D1+2&x").collect();
        assert_eq!(pairs[2], ("return".into(), "/a?b=1 2".into()));
        assert_eq!(pairs[3], ("x".into(), String::new()));
        assert_eq!(percent_encode("/a?b=1"), "/a%3Fb%3D1");
        let mut h = http::HeaderMap::new();
        h.insert("cookie", "a=1; esper_clearance=v.1.2; b=2".parse().unwrap());
        assert_eq!(find_cookie(&h), Some("v.1.2"));
    }

    proptest::proptest! {
        // Tokens, nonces, cookies, forms and return paths all come from the client.
        #[test]
        fn made_up_tokens_and_cookies_are_refused_without_panicking(
            token in "[pfc0-9a-zA-Z._\\-]{0,120}",
            nonce in "\\PC{0,40}",
            cookie in "[0-9a-zA-Z._\\-]{0,120}",
            now in 0u64..u64::MAX,
        ) {
            let c = challenger();
            let client = ip("192.0.2.1");
            proptest::prop_assert!(c.redeem_solution(&token, &nonce, client, UA, now).is_err());
            proptest::prop_assert!(c.redeem_fallback(&token, client, UA, now).is_err());
            proptest::prop_assert!(c.check_cookie(&cookie, client, UA, now).is_err());
        }

        #[test]
        fn return_paths_stay_on_this_site(path in "\\PC{0,60}") {
            let back = safe_return(&path);
            proptest::prop_assert!(back == path || back == "/");
            proptest::prop_assert!(back.starts_with('/'));
            proptest::prop_assert!(!back.starts_with("//") && !back.starts_with("/\\"));
            proptest::prop_assert!(back.bytes().all(|b| b.is_ascii_graphic()));
        }

        #[test]
        fn form_values_survive_encoding(key in "[a-z]{1,8}", value in "\\PC{0,40}", junk in "\\PC{0,40}") {
            let body = format!("{key}={}", percent_encode(&value));
            let pairs: Vec<_> = form_pairs(&body).collect();
            proptest::prop_assert_eq!(pairs, vec![(key, value)]);
            // Anything else decodes to something, never a panic.
            let _ = form_pairs(&junk).count();
        }
    }
}
