//! The in-memory mitigation cache the request path reads: exact-key maps for IPs,
//! header values and cookie hashes, and one map per CIDR prefix length present, so a
//! lookup masks the client address once per length (O(lengths), no allocation on a miss).
//! Path templates and TLS fingerprints are looked up only while the cache holds entries
//! of that kind, so they cost nothing otherwise.
//!
//! Readers take a `parking_lot` read lock for the length of a few hash lookups; writers
//! (the delta stream, the expiry sweep) hold the write lock only for bounded chunks of
//! work, and a snapshot is built outside the lock and swapped in.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use esper_protocol::{Action, Change, EntityKey, Mitigation, hash_cookie_value, path_template};
use http::HeaderMap;
use ipnet::IpNet;
use parking_lot::RwLock;

/// Changes applied per write-lock acquisition, so a long page of deltas cannot stall
/// request handling.
const WRITE_CHUNK: usize = 256;

type Slot = Vec<Arc<Mitigation>>;

/// Active mitigations indexed for lookup by request.
#[derive(Default)]
pub struct MitigationCache {
    index: RwLock<Index>,
}

#[derive(Default)]
struct Index {
    by_id: HashMap<String, EntityKey>,
    ips: HashMap<IpAddr, Slot>,
    /// (prefix length, masked network -> mitigations), only for lengths present.
    v4: Vec<(u8, HashMap<u32, Slot>)>,
    v6: Vec<(u8, HashMap<u128, Slot>)>,
    /// header name -> value -> mitigations.
    headers: HashMap<String, HashMap<String, Slot>>,
    /// cookie name -> hashed value -> mitigations.
    cookies: HashMap<String, HashMap<String, Slot>>,
    /// Path template -> mitigations.
    paths: HashMap<String, Slot>,
    /// JA4 fingerprint -> mitigations.
    ja4s: HashMap<String, Slot>,
    /// Tuple mitigations with an address part, by that address; the others.
    tuples_by_ip: HashMap<IpAddr, Slot>,
    tuples: Slot,
}

/// What a request is looked up by.
#[derive(Clone, Copy, Debug)]
pub struct RequestKeys<'a> {
    pub app: &'a str,
    pub ip: IpAddr,
    pub headers: &'a HeaderMap,
    /// The request path (the template is computed only when needed).
    pub path: &'a str,
    /// The JA4 fingerprint of the TLS connection, if any.
    pub ja4: Option<&'a str>,
}

/// The address part of a tuple, by which it is indexed.
fn tuple_ip(parts: &[EntityKey]) -> Option<IpAddr> {
    parts.iter().find_map(|p| match p {
        EntityKey::Ip(ip) => Some(ip.to_canonical()),
        _ => None,
    })
}

/// Does a request match one part of a tuple?
fn part_matches(part: &EntityKey, req: &RequestKeys<'_>) -> bool {
    let (ip, headers) = (req.ip, req.headers);
    match part {
        EntityKey::Ip(_) | EntityKey::Cidr(_) => part.covers_ip(ip),
        EntityKey::Path(template) => !req.path.is_empty() && path_template(req.path) == *template,
        EntityKey::Ja4(fp) => req.ja4 == Some(fp.as_str()),
        EntityKey::Header { name, value } => headers
            .get_all(name.as_str())
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v == value)),
        EntityKey::Cookie { name, value } => headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|h| h.to_str().ok())
            .flat_map(cookie_pairs)
            .any(|(n, v)| n.eq_ignore_ascii_case(name) && hash_cookie_value(v) == *value),
        EntityKey::Tuple(_) => false,
    }
}

/// Keeps the strictest tuple mitigation of `slot` whose every part the request matches.
fn consider_tuples<'a>(
    best: &mut Option<&'a Arc<Mitigation>>,
    slot: &'a Slot,
    req: &RequestKeys<'_>,
    now: DateTime<Utc>,
) {
    for m in slot {
        let EntityKey::Tuple(parts) = &m.entity else {
            continue;
        };
        if parts.iter().all(|p| part_matches(p, req)) {
            consider(best, std::slice::from_ref(m), req.app, now);
        }
    }
}

fn mask_v4(addr: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        addr & (u32::MAX << (32 - u32::from(len)))
    }
}

fn mask_v6(addr: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        addr & (u128::MAX << (128 - u32::from(len)))
    }
}

/// Is `a` a stricter choice than `b` for the same request?
fn outranks(a: &Mitigation, b: &Mitigation) -> bool {
    match a.action.severity().cmp(&b.action.severity()) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Less => false,
        std::cmp::Ordering::Equal => match (&a.action, &b.action) {
            (Action::Throttle { rate: ra, .. }, Action::Throttle { rate: rb, .. }) => ra < rb,
            (Action::Tarpit { delay_ms: da }, Action::Tarpit { delay_ms: db }) => da > db,
            (Action::Challenge { difficulty: da }, Action::Challenge { difficulty: db }) => da > db,
            _ => false,
        },
    }
}

/// Keeps the strictest mitigation of `slot` that is in force for `app` at `now`.
fn consider<'a>(
    best: &mut Option<&'a Arc<Mitigation>>,
    slot: &'a [Arc<Mitigation>],
    app: &str,
    now: DateTime<Utc>,
) {
    for m in slot {
        if m.expires_at > now && m.scope.applies_to(app) && best.is_none_or(|b| outranks(m, b)) {
            *best = Some(m);
        }
    }
}

fn remove_from(slot: &mut Slot, id: &str) {
    slot.retain(|m| m.id != id);
}

impl Index {
    fn insert(&mut self, m: Mitigation) {
        if self.by_id.contains_key(&m.id) {
            let id = m.id.clone();
            self.remove(&id);
        }
        let key = m.entity.clone();
        let m = Arc::new(m);
        self.by_id.insert(m.id.clone(), key.clone());
        match key {
            EntityKey::Ip(ip) => self.ips.entry(ip.to_canonical()).or_default().push(m),
            EntityKey::Cidr(IpNet::V4(net)) => {
                let len = net.prefix_len();
                let map = length_map(&mut self.v4, len);
                map.entry(mask_v4(u32::from(net.addr()), len))
                    .or_default()
                    .push(m);
            }
            EntityKey::Cidr(IpNet::V6(net)) => {
                let len = net.prefix_len();
                let map = length_map(&mut self.v6, len);
                map.entry(mask_v6(u128::from(net.addr()), len))
                    .or_default()
                    .push(m);
            }
            EntityKey::Header { name, value } => self
                .headers
                .entry(name)
                .or_default()
                .entry(value)
                .or_default()
                .push(m),
            EntityKey::Cookie { name, value } => self
                .cookies
                .entry(name)
                .or_default()
                .entry(value)
                .or_default()
                .push(m),
            EntityKey::Path(template) => self.paths.entry(template).or_default().push(m),
            EntityKey::Ja4(fp) => self.ja4s.entry(fp).or_default().push(m),
            EntityKey::Tuple(parts) => match tuple_ip(&parts) {
                Some(ip) => self.tuples_by_ip.entry(ip).or_default().push(m),
                None => self.tuples.push(m),
            },
        }
    }

    fn remove(&mut self, id: &str) -> bool {
        let Some(key) = self.by_id.remove(id) else {
            return false;
        };
        match key {
            EntityKey::Ip(ip) => {
                let ip = ip.to_canonical();
                if let Some(slot) = self.ips.get_mut(&ip) {
                    remove_from(slot, id);
                    if slot.is_empty() {
                        self.ips.remove(&ip);
                    }
                }
            }
            EntityKey::Cidr(IpNet::V4(net)) => {
                let len = net.prefix_len();
                remove_net(&mut self.v4, len, mask_v4(u32::from(net.addr()), len), id);
            }
            EntityKey::Cidr(IpNet::V6(net)) => {
                let len = net.prefix_len();
                remove_net(&mut self.v6, len, mask_v6(u128::from(net.addr()), len), id);
            }
            EntityKey::Header { name, value } => remove_named(&mut self.headers, &name, &value, id),
            EntityKey::Cookie { name, value } => remove_named(&mut self.cookies, &name, &value, id),
            EntityKey::Path(template) => remove_keyed(&mut self.paths, &template, id),
            EntityKey::Ja4(fp) => remove_keyed(&mut self.ja4s, &fp, id),
            EntityKey::Tuple(parts) => match tuple_ip(&parts) {
                Some(ip) => {
                    if let Some(slot) = self.tuples_by_ip.get_mut(&ip) {
                        remove_from(slot, id);
                        if slot.is_empty() {
                            self.tuples_by_ip.remove(&ip);
                        }
                    }
                }
                None => remove_from(&mut self.tuples, id),
            },
        }
        true
    }

    fn lookup(&self, req: &RequestKeys<'_>, now: DateTime<Utc>) -> Option<Arc<Mitigation>> {
        let ip = req.ip.to_canonical();
        let req = &RequestKeys { ip, ..*req };
        let (app, headers) = (req.app, req.headers);
        let mut best: Option<&Arc<Mitigation>> = None;
        if let Some(slot) = self.ips.get(&ip) {
            consider(&mut best, slot, app, now);
        }
        match ip {
            IpAddr::V4(v4) => {
                let addr = u32::from(v4);
                for (len, map) in &self.v4 {
                    if let Some(slot) = map.get(&mask_v4(addr, *len)) {
                        consider(&mut best, slot, app, now);
                    }
                }
            }
            IpAddr::V6(v6) => {
                let addr = u128::from(v6);
                for (len, map) in &self.v6 {
                    if let Some(slot) = map.get(&mask_v6(addr, *len)) {
                        consider(&mut best, slot, app, now);
                    }
                }
            }
        }
        for (name, values) in &self.headers {
            for value in headers.get_all(name.as_str()) {
                if let Some(slot) = value.to_str().ok().and_then(|v| values.get(v)) {
                    consider(&mut best, slot, app, now);
                }
            }
        }
        if !self.cookies.is_empty() {
            for header in headers.get_all(http::header::COOKIE) {
                let Ok(text) = header.to_str() else { continue };
                for (name, value) in cookie_pairs(text) {
                    // Entity keys hold lower-cased names; most cookie names already are.
                    let values = if name.bytes().any(|b| b.is_ascii_uppercase()) {
                        self.cookies.get(&name.to_ascii_lowercase())
                    } else {
                        self.cookies.get(name)
                    };
                    if let Some(values) = values {
                        if let Some(slot) = values.get(&hash_cookie_value(value)) {
                            consider(&mut best, slot, app, now);
                        }
                    }
                }
            }
        }
        if !self.paths.is_empty() && !req.path.is_empty() {
            if let Some(slot) = self.paths.get(&path_template(req.path)) {
                consider(&mut best, slot, app, now);
            }
        }
        if let Some(slot) = req
            .ja4
            .filter(|_| !self.ja4s.is_empty())
            .and_then(|fp| self.ja4s.get(fp))
        {
            consider(&mut best, slot, app, now);
        }
        if let Some(slot) = self.tuples_by_ip.get(&ip) {
            consider_tuples(&mut best, slot, req, now);
        }
        consider_tuples(&mut best, &self.tuples, req, now);
        best.cloned()
    }

    fn expired(&self, now: DateTime<Utc>) -> Vec<String> {
        let mut out = Vec::new();
        let mut collect = |slot: &Slot| {
            out.extend(
                slot.iter()
                    .filter(|m| m.expires_at <= now)
                    .map(|m| m.id.clone()),
            );
        };
        self.ips.values().for_each(&mut collect);
        self.v4
            .iter()
            .flat_map(|(_, m)| m.values())
            .for_each(&mut collect);
        self.v6
            .iter()
            .flat_map(|(_, m)| m.values())
            .for_each(&mut collect);
        self.headers
            .values()
            .flat_map(|m| m.values())
            .for_each(&mut collect);
        self.cookies
            .values()
            .flat_map(|m| m.values())
            .for_each(&mut collect);
        self.paths.values().for_each(&mut collect);
        self.ja4s.values().for_each(&mut collect);
        self.tuples_by_ip.values().for_each(&mut collect);
        collect(&self.tuples);
        out
    }
}

fn length_map<K>(maps: &mut Vec<(u8, HashMap<K, Slot>)>, len: u8) -> &mut HashMap<K, Slot> {
    let pos = match maps.binary_search_by_key(&len, |(l, _)| *l) {
        Ok(pos) => pos,
        Err(pos) => {
            maps.insert(pos, (len, HashMap::new()));
            pos
        }
    };
    &mut maps[pos].1
}

fn remove_net<K: std::hash::Hash + Eq>(
    maps: &mut Vec<(u8, HashMap<K, Slot>)>,
    len: u8,
    key: K,
    id: &str,
) {
    let Ok(pos) = maps.binary_search_by_key(&len, |(l, _)| *l) else {
        return;
    };
    let map = &mut maps[pos].1;
    if let Some(slot) = map.get_mut(&key) {
        remove_from(slot, id);
        if slot.is_empty() {
            map.remove(&key);
        }
    }
    if map.is_empty() {
        maps.remove(pos);
    }
}

fn remove_keyed(map: &mut HashMap<String, Slot>, key: &str, id: &str) {
    if let Some(slot) = map.get_mut(key) {
        remove_from(slot, id);
        if slot.is_empty() {
            map.remove(key);
        }
    }
}

fn remove_named(
    maps: &mut HashMap<String, HashMap<String, Slot>>,
    name: &str,
    value: &str,
    id: &str,
) {
    let Some(values) = maps.get_mut(name) else {
        return;
    };
    if let Some(slot) = values.get_mut(value) {
        remove_from(slot, id);
        if slot.is_empty() {
            values.remove(value);
        }
    }
    if values.is_empty() {
        maps.remove(name);
    }
}

/// The `name=value` pairs of a `Cookie` header, names as written.
pub fn cookie_pairs(header: &str) -> impl Iterator<Item = (&str, &str)> {
    header.split(';').filter_map(|pair| {
        let (name, value) = pair.trim().split_once('=')?;
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        Some((name.trim(), value))
    })
}

impl MitigationCache {
    /// An empty cache.
    pub fn new() -> MitigationCache {
        MitigationCache::default()
    }

    /// The strictest mitigation in force for a request for `app` from `ip` with `headers`
    /// (header values and cookie hashes are matched only for names the cache holds).
    pub fn lookup(
        &self,
        app: &str,
        ip: IpAddr,
        headers: &HeaderMap,
        now: DateTime<Utc>,
    ) -> Option<Arc<Mitigation>> {
        self.lookup_request(
            &RequestKeys {
                app,
                ip,
                headers,
                path: "",
                ja4: None,
            },
            now,
        )
    }

    /// [`lookup`](Self::lookup) by every key of a request, path template and TLS
    /// fingerprint included.
    pub fn lookup_request(
        &self,
        req: &RequestKeys<'_>,
        now: DateTime<Utc>,
    ) -> Option<Arc<Mitigation>> {
        self.index.read().lookup(req, now)
    }

    /// Adds or replaces (same id) one mitigation.
    pub fn upsert(&self, m: Mitigation) {
        self.index.write().insert(m);
    }

    /// Removes a mitigation by id; `true` when it was present.
    pub fn remove(&self, id: &str) -> bool {
        self.index.write().remove(id)
    }

    /// Applies a page of deltas, a bounded chunk per write lock. Mitigations that have
    /// already expired are not added.
    pub fn apply(&self, changes: Vec<Change>, now: DateTime<Utc>) {
        let mut changes = changes.into_iter().peekable();
        while changes.peek().is_some() {
            let mut index = self.index.write();
            for change in changes.by_ref().take(WRITE_CHUNK) {
                match change {
                    Change::Upsert { mitigation } if mitigation.is_active(now) => {
                        index.insert(mitigation)
                    }
                    Change::Upsert { mitigation } => {
                        index.remove(&mitigation.id);
                    }
                    Change::Remove { id } => {
                        index.remove(&id);
                    }
                }
            }
        }
    }

    /// Replaces the whole content with a snapshot; the new index is built before the
    /// lock is taken, and the old one is freed after it is released.
    pub fn replace(&self, changes: Vec<Change>, now: DateTime<Utc>) {
        let mut fresh = Index::default();
        for change in changes {
            if let Change::Upsert { mitigation } = change {
                if mitigation.is_active(now) {
                    fresh.insert(mitigation);
                }
            }
        }
        let old = std::mem::replace(&mut *self.index.write(), fresh);
        drop(old);
    }

    /// Frees expired entries (lookups already ignore them); returns how many.
    pub fn sweep(&self, now: DateTime<Utc>) -> usize {
        let expired = self.index.read().expired(now);
        for chunk in expired.chunks(WRITE_CHUNK) {
            let mut index = self.index.write();
            for id in chunk {
                index.remove(id);
            }
        }
        expired.len()
    }

    /// Mitigations held (expired ones included until the next sweep).
    pub fn len(&self) -> usize {
        self.index.read().by_id.len()
    }

    /// True when the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use esper_protocol::{Origin, Reason, Scope};
    use http::HeaderValue;

    use super::*;

    fn mitigation(key: &str, action: Action) -> Mitigation {
        Mitigation::new(
            key.parse().unwrap(),
            action,
            Duration::from_secs(60),
            Origin::Manual,
            Reason::default(),
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn find(cache: &MitigationCache, app: &str, addr: &str, headers: &HeaderMap) -> Option<Action> {
        cache
            .lookup(app, ip(addr), headers, Utc::now())
            .map(|m| m.action.clone())
    }

    fn none() -> HeaderMap {
        HeaderMap::new()
    }

    #[test]
    fn path_templates_and_fingerprints_match_their_requests() {
        let cache = MitigationCache::new();
        let h = none();
        let keys = |path: &'static str, ja4: Option<&'static str>| RequestKeys {
            app: "a",
            ip: ip("10.0.0.1"),
            headers: &h,
            path,
            ja4,
        };
        let find = |k: RequestKeys<'_>| {
            cache
                .lookup_request(&k, Utc::now())
                .map(|m| m.action.clone())
        };
        let orders = mitigation("path:/users/{id}/orders", Action::Block);
        let fp = mitigation("ja4:t13d1516h2_8daaf6152771_b0da82dd1658", Action::Log);
        let both = mitigation(
            "tuple:ip:10.0.0.1+path:/cart+ja4:t13d1516h2_8daaf6152771_b0da82dd1658",
            Action::Challenge { difficulty: 4 },
        );
        cache.upsert(orders.clone());
        cache.upsert(fp.clone());
        cache.upsert(both);
        assert_eq!(find(keys("/users/9/orders?x=1", None)), Some(Action::Block));
        assert_eq!(find(keys("/users/9/profile", None)), None);
        assert_eq!(
            find(keys("/", Some("t13d1516h2_8daaf6152771_b0da82dd1658"))),
            Some(Action::Log)
        );
        assert_eq!(
            find(keys("/cart", Some("t13d1516h2_8daaf6152771_b0da82dd1658"))),
            Some(Action::Challenge { difficulty: 4 })
        );
        assert_eq!(
            find(keys("/cart", None)),
            None,
            "every part of a tuple must match"
        );
        // A lookup without a path does not match templates.
        assert_eq!(cache.lookup("a", ip("10.0.0.1"), &h, Utc::now()), None);
        assert!(cache.remove(&orders.id) && cache.remove(&fp.id));
        assert_eq!(find(keys("/users/9/orders", None)), None);
        assert!(cache.index.read().paths.is_empty() && cache.index.read().ja4s.is_empty());
    }

    #[test]
    fn exact_ip_matches_only_that_address() {
        let cache = MitigationCache::new();
        cache.upsert(mitigation("ip:127.0.0.2", Action::Block));
        assert_eq!(find(&cache, "a", "127.0.0.2", &none()), Some(Action::Block));
        assert_eq!(find(&cache, "a", "127.0.0.3", &none()), None);
        // An IPv4 client seen through a dual-stack socket is the same client.
        assert_eq!(
            find(&cache, "a", "::ffff:127.0.0.2", &none()),
            Some(Action::Block)
        );
    }

    #[test]
    fn cidr_v4_and_v6_match_by_prefix() {
        let cache = MitigationCache::new();
        cache.upsert(mitigation("cidr:10.1.2.0/24", Action::Block));
        cache.upsert(mitigation("cidr:10.0.0.0/8", Action::Log));
        cache.upsert(mitigation("cidr:2001:db8:1::/48", Action::Block));
        assert_eq!(
            find(&cache, "a", "10.1.2.200", &none()),
            Some(Action::Block)
        );
        assert_eq!(find(&cache, "a", "10.9.9.9", &none()), Some(Action::Log));
        assert_eq!(find(&cache, "a", "11.1.2.3", &none()), None);
        assert_eq!(
            find(&cache, "a", "2001:db8:1:ffff::1", &none()),
            Some(Action::Block)
        );
        assert_eq!(find(&cache, "a", "2001:db8:2::1", &none()), None);
        let all = mitigation("cidr:0.0.0.0/0", Action::Log);
        cache.upsert(all);
        assert_eq!(find(&cache, "a", "192.0.2.1", &none()), Some(Action::Log));
    }

    #[test]
    fn header_and_cookie_keys_match_request_values() {
        let cache = MitigationCache::new();
        cache.upsert(mitigation("header:x-api-key=k1", Action::Block));
        let hashed = hash_cookie_value("s3cret");
        cache.upsert(mitigation(
            &format!("cookie:session={hashed}"),
            Action::Tarpit { delay_ms: 5 },
        ));
        let mut h = HeaderMap::new();
        h.insert("X-Api-Key", HeaderValue::from_static("k1"));
        assert_eq!(find(&cache, "a", "192.0.2.1", &h), Some(Action::Block));
        h.insert("X-Api-Key", HeaderValue::from_static("k2"));
        assert_eq!(find(&cache, "a", "192.0.2.1", &h), None);
        h.insert(
            http::header::COOKIE,
            HeaderValue::from_static("theme=dark; session=s3cret"),
        );
        assert_eq!(
            find(&cache, "a", "192.0.2.1", &h),
            Some(Action::Tarpit { delay_ms: 5 })
        );
        h.insert(
            http::header::COOKIE,
            HeaderValue::from_static("session=other"),
        );
        assert_eq!(find(&cache, "a", "192.0.2.1", &h), None);
    }

    #[test]
    fn tuple_keys_need_every_part() {
        let cache = MitigationCache::new();
        cache.upsert(mitigation(
            "tuple:ip:192.0.2.1+header:user-agent=curl/8",
            Action::Block,
        ));
        let hashed = hash_cookie_value("s3cret");
        let net_cookie = mitigation(
            &format!("tuple:cidr:10.0.0.0/8+cookie:session={hashed}"),
            Action::Log,
        );
        let net_cookie_id = net_cookie.id.clone();
        cache.upsert(net_cookie);
        let mut curl = HeaderMap::new();
        curl.insert("User-Agent", HeaderValue::from_static("curl/8"));
        assert_eq!(find(&cache, "a", "192.0.2.1", &curl), Some(Action::Block));
        assert_eq!(find(&cache, "a", "192.0.2.2", &curl), None, "other address");
        assert_eq!(find(&cache, "a", "192.0.2.1", &none()), None, "no agent");
        let mut c = HeaderMap::new();
        c.insert(
            http::header::COOKIE,
            HeaderValue::from_static("session=s3cret"),
        );
        assert_eq!(find(&cache, "a", "10.2.3.4", &c), Some(Action::Log));
        assert_eq!(find(&cache, "a", "11.2.3.4", &c), None);
        assert!(cache.remove(&net_cookie_id));
        assert_eq!(find(&cache, "a", "10.2.3.4", &c), None);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.sweep(Utc::now() + chrono::Duration::hours(1)), 1);
        assert!(cache.is_empty());
    }

    #[test]
    fn expired_entries_are_ignored_then_swept() {
        let cache = MitigationCache::new();
        let mut m = mitigation("ip:192.0.2.1", Action::Block);
        m.expires_at = Utc::now() + chrono::Duration::milliseconds(50);
        cache.upsert(m);
        let later = Utc::now() + chrono::Duration::seconds(1);
        assert!(
            cache
                .lookup("a", ip("192.0.2.1"), &none(), Utc::now())
                .is_some()
        );
        assert!(cache.lookup("a", ip("192.0.2.1"), &none(), later).is_none());
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.sweep(later), 1);
        assert!(cache.is_empty());
    }

    #[test]
    fn the_most_severe_mitigation_wins() {
        let cache = MitigationCache::new();
        cache.upsert(mitigation("ip:192.0.2.1", Action::Log));
        cache.upsert(mitigation(
            "cidr:192.0.2.0/24",
            Action::Throttle {
                rate: 5.0,
                burst: 5,
            },
        ));
        cache.upsert(mitigation(
            "cidr:192.0.0.0/16",
            Action::Throttle {
                rate: 1.0,
                burst: 1,
            },
        ));
        assert_eq!(
            find(&cache, "a", "192.0.2.1", &none()),
            Some(Action::Throttle {
                rate: 1.0,
                burst: 1
            })
        );
        let block = mitigation("cidr:192.0.2.0/30", Action::Block);
        let block_id = block.id.clone();
        cache.upsert(block);
        assert_eq!(find(&cache, "a", "192.0.2.1", &none()), Some(Action::Block));
        assert!(cache.remove(&block_id));
        assert!(!cache.remove(&block_id));
        assert_eq!(
            find(&cache, "a", "192.0.2.1", &none()),
            Some(Action::Throttle {
                rate: 1.0,
                burst: 1
            })
        );
    }

    #[test]
    fn app_scope_limits_where_a_mitigation_applies() {
        let cache = MitigationCache::new();
        let mut m = mitigation("ip:192.0.2.1", Action::Block);
        m.scope = Scope::App("shop".into());
        cache.upsert(m);
        assert_eq!(
            find(&cache, "shop", "192.0.2.1", &none()),
            Some(Action::Block)
        );
        assert_eq!(find(&cache, "blog", "192.0.2.1", &none()), None);
    }

    #[test]
    fn snapshot_replaces_and_deltas_apply() {
        let cache = MitigationCache::new();
        cache.upsert(mitigation("ip:192.0.2.1", Action::Block));
        let kept = mitigation("cidr:198.51.100.0/24", Action::Block);
        let kept_id = kept.id.clone();
        let mut stale = mitigation("ip:192.0.2.9", Action::Block);
        stale.expires_at = Utc::now() - chrono::Duration::seconds(1);
        cache.replace(
            vec![
                Change::Upsert { mitigation: kept },
                Change::Upsert { mitigation: stale },
            ],
            Utc::now(),
        );
        assert_eq!(cache.len(), 1);
        assert_eq!(find(&cache, "a", "192.0.2.1", &none()), None);
        assert_eq!(
            find(&cache, "a", "198.51.100.7", &none()),
            Some(Action::Block)
        );

        // Same id published again with another action replaces the entry.
        let mut changed = mitigation("cidr:198.51.100.0/24", Action::Log);
        changed.id = kept_id.clone();
        cache.apply(
            vec![Change::Upsert {
                mitigation: changed,
            }],
            Utc::now(),
        );
        assert_eq!(cache.len(), 1);
        assert_eq!(
            find(&cache, "a", "198.51.100.7", &none()),
            Some(Action::Log)
        );
        cache.apply(vec![Change::Remove { id: kept_id }], Utc::now());
        assert!(cache.is_empty());
        assert_eq!(find(&cache, "a", "198.51.100.7", &none()), None);
    }

    #[test]
    fn cookie_pairs_parse_loosely() {
        let pairs: Vec<_> = cookie_pairs(" a=1;b = \"2\" ;broken; c=").collect();
        assert_eq!(pairs, vec![("a", "1"), ("b", "2"), ("c", "")]);
    }
}
