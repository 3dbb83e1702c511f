//! The in-memory mitigation cache the request path reads: exact-key maps for IPs,
//! header values and cookie hashes, and one map per CIDR prefix length present, so a
//! lookup masks the client address once per length (O(lengths), no allocation).
//! Path templates and TLS fingerprints are looked up only while the cache holds entries
//! of that kind, so they cost nothing otherwise; a path is templated into a per-thread
//! buffer and a cookie value hashed on the stack, so those lookups do not allocate
//! either (a cookie name with upper-case letters is lower-cased into a new string, and
//! a path that needs normalising is normalised into one). Tuples without an address part
//! are checked one by one on every request; policies make few of them.
//!
//! An entry keeps only what enforcement reads (id, action, scope, expiry), inline in its
//! map's value: the entity is where the entry sits, the reason and origin stay with the
//! brokers. Ids as the brokers make them (uuids) take 16 bytes, no allocation.
//!
//! Readers take a `parking_lot` read lock for the length of a few hash lookups; writers
//! (the delta stream, the expiry sweep) hold the write lock only for bounded chunks of
//! work, and a snapshot is built outside the lock (page by page, in a
//! [`SnapshotBuilder`], while the old content keeps being enforced) and swapped in.

use std::cell::RefCell;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use esper_protocol::{
    Action, Change, EntityKey, Mitigation, Scope, cookie_hash, path_template, write_path_template,
};
use http::HeaderMap;
use ipnet::IpNet;
use parking_lot::{Mutex, RwLock};

/// Changes applied per write-lock acquisition, so a long page of deltas cannot stall
/// request handling.
const WRITE_CHUNK: usize = 256;

// Maps hashed with foldhash (seeded per process): a lookup hashes the client address once
// per map, on every request, and SipHash would cost several times more.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// Action severities (`Action::severity`, 1 to 5) index arrays of this length.
const SEVERITIES: usize = 6;

/// What a full cache did with new mitigations: refused them (nothing less severe was
/// held), or admitted them by evicting a less severe one each. Both are lost from
/// enforcement until a snapshot brings them in again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Overflow {
    pub refused: u64,
    pub evicted: u64,
}

impl std::ops::AddAssign for Overflow {
    fn add_assign(&mut self, other: Overflow) {
        self.refused += other.refused;
        self.evicted += other.evicted;
    }
}

impl Overflow {
    /// Nothing was refused or evicted.
    pub fn is_empty(&self) -> bool {
        self.refused == 0 && self.evicted == 0
    }

    fn count(&mut self, admitted: Admitted) {
        match admitted {
            Admitted::Held => {}
            Admitted::Evicted => self.evicted += 1,
            Admitted::Refused => self.refused += 1,
        }
    }
}

/// What became of one change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Admitted {
    Held,
    /// Held in place of a less severe mitigation, evicted for it.
    Evicted,
    /// New, and refused: the cache is full of mitigations at least as severe.
    Refused,
}

/// Largest snapshot size hint [`SnapshotBuilder::expect`] sizes the index for.
pub const MAX_SNAPSHOT_HINT: usize = 20_000_000;

/// A mitigation's id: the 16 bytes of a uuid in its canonical text form (lower case,
/// hyphenated: what the brokers make), any other id as its text.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MitigationId {
    Uuid([u8; 16]),
    Text(Arc<str>),
}

impl MitigationId {
    /// The id of text `id`; the same text always gives the same id.
    pub fn new(id: &str) -> MitigationId {
        if let Ok(u) = uuid::Uuid::try_parse(id) {
            // Only the canonical form, so that `text` gives back exactly `id`.
            if *u.hyphenated().encode_lower(&mut [0; 36]) == *id {
                return MitigationId::Uuid(u.into_bytes());
            }
        }
        MitigationId::Text(id.into())
    }

    /// The id as text (the block page's reference), without allocating.
    pub fn text(&self) -> IdText {
        match self {
            MitigationId::Uuid(bytes) => {
                let mut buf = [0; 36];
                uuid::Uuid::from_bytes(*bytes)
                    .hyphenated()
                    .encode_lower(&mut buf);
                IdText::Uuid(buf)
            }
            MitigationId::Text(text) => IdText::Text(text.clone()),
        }
    }
}

impl fmt::Display for MitigationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

/// A mitigation id's text, on the stack for a uuid.
#[derive(Clone, Debug)]
pub enum IdText {
    Uuid([u8; 36]),
    Text(Arc<str>),
}

impl std::ops::Deref for IdText {
    type Target = str;

    fn deref(&self) -> &str {
        match self {
            // Always ASCII hex and hyphens, as encoded by `MitigationId::text`.
            IdText::Uuid(buf) => std::str::from_utf8(buf).unwrap_or_default(),
            IdText::Text(text) => text,
        }
    }
}

/// The strictest mitigation a request matched: what enforcement and the answer need.
#[derive(Clone, Debug, PartialEq)]
pub struct Hit {
    pub id: MitigationId,
    pub action: Action,
}

/// One cached mitigation, as the request path reads it.
#[derive(Debug)]
struct Entry {
    id: MitigationId,
    /// Expiry in nanoseconds since the Unix epoch (saturated outside 1677..2262), so a
    /// lookup compares one integer and the comparison is exact.
    expires: i64,
    action: Action,
    /// `None` for global; the app's name, shared by its entries, otherwise.
    scope: Option<Arc<str>>,
}

/// A timestamp as `Entry::expires` holds it.
fn nanos(t: DateTime<Utc>) -> i64 {
    t.timestamp_nanos_opt().unwrap_or(if t.timestamp() < 0 {
        i64::MIN
    } else {
        i64::MAX
    })
}

/// A lookup's `now`, converted to `Entry::expires`'s unit on first use: a lookup that
/// finds no candidate (most requests) never pays for the conversion. And the difficulty
/// up to which challenges are passed over (the client cleared them).
struct Now {
    at: DateTime<Utc>,
    nanos: std::cell::OnceCell<i64>,
    cleared: Option<u8>,
}

impl Now {
    fn new(at: DateTime<Utc>, cleared: Option<u8>) -> Now {
        Now {
            at,
            nanos: std::cell::OnceCell::new(),
            cleared,
        }
    }

    /// Is `action` a challenge the client has cleared?
    fn passes(&self, action: &Action) -> bool {
        matches!((action, self.cleared), (Action::Challenge { difficulty }, Some(earned)) if *difficulty <= earned)
    }

    fn nanos(&self) -> i64 {
        *self.nanos.get_or_init(|| nanos(self.at))
    }
}

/// The mitigations of one key; nearly always exactly one, held inline.
#[derive(Debug)]
enum Slot {
    One(Entry),
    Many(Vec<Entry>),
}

impl Slot {
    fn entries(&self) -> &[Entry] {
        match self {
            Slot::One(e) => std::slice::from_ref(e),
            Slot::Many(v) => v,
        }
    }

    fn push(&mut self, entry: Entry) {
        match self {
            Slot::Many(v) => v.push(entry),
            Slot::One(_) => {
                if let Slot::One(first) = std::mem::replace(self, Slot::Many(Vec::new())) {
                    *self = Slot::Many(vec![first, entry]);
                }
            }
        }
    }

    /// Takes out the entry `id`; the slot is left empty (`Many` of none) when it was the
    /// last, and goes back to `One` when one remains.
    fn take(&mut self, id: &MitigationId) -> Option<Entry> {
        match self {
            Slot::One(e) if e.id == *id => match std::mem::replace(self, Slot::Many(Vec::new())) {
                Slot::One(e) => Some(e),
                Slot::Many(_) => None,
            },
            Slot::One(_) => None,
            Slot::Many(v) => {
                let pos = v.iter().position(|e| e.id == *id)?;
                // `remove`, not `swap_remove`: among equally strict entries the first
                // inserted is the one reported, as before the removal.
                let taken = v.remove(pos);
                if v.len() == 1
                    && let Some(last) = v.pop()
                {
                    *self = Slot::One(last);
                }
                Some(taken)
            }
        }
    }

    fn is_empty(&self) -> bool {
        matches!(self, Slot::Many(v) if v.is_empty())
    }
}

/// A tuple mitigation: its parts, all of which a request must match.
#[derive(Debug)]
struct TupleEntry {
    parts: Box<[EntityKey]>,
    entry: Entry,
}

/// Where the entry of an id lives, for removal by id.
#[derive(Debug)]
enum Loc {
    Ip4(Ipv4Addr),
    Ip6(Ipv6Addr),
    Net4(u8, Ipv4Addr),
    Net6(u8, Ipv6Addr),
    /// Keys other than addresses and networks are rare enough to keep whole.
    Other(Box<EntityKey>),
}

/// Active mitigations indexed for lookup by request.
pub struct MitigationCache {
    index: RwLock<Index>,
    /// Taken by every writer before the index's write lock, and by the sweep for the
    /// whole of its scan (which holds a read lock for as long as a million entries take
    /// to read). A writer therefore waits here, not on the index: parking_lot's fair
    /// lock queues new readers behind a writer waiting on it, so a delta arriving during
    /// a scan would otherwise hold up every request until the scan ended.
    writers: Mutex<()>,
    /// Most mitigations held.
    limit: usize,
}

impl Default for MitigationCache {
    fn default() -> Self {
        MitigationCache::new()
    }
}

/// The most mitigations an index holds; further new ones are refused, so a runaway
/// policy cannot take the proxy's memory. Unlimited unless set.
#[derive(Clone, Copy, Debug)]
struct Limit(usize);

impl Default for Limit {
    fn default() -> Self {
        Limit(usize::MAX)
    }
}

/// A snapshot being assembled from its pages, not yet visible to lookups: from
/// [`MitigationCache::begin_snapshot`], into [`MitigationCache::install`]. Dropping it
/// (a page failed) leaves the cache as it was.
pub struct SnapshotBuilder {
    index: Index,
}

impl SnapshotBuilder {
    /// Adds a page of the snapshot (upserts; mitigations already expired are skipped).
    /// Returns what the cache's limit cost.
    pub fn add(&mut self, changes: Vec<Change>, now: DateTime<Utc>) -> Overflow {
        let mut overflow = Overflow::default();
        for change in changes {
            overflow.count(self.index.apply_gathering(change, now));
        }
        overflow
    }

    /// Sizes the index for a snapshot of `total` mitigations (the first page's hint),
    /// in the proportions of the kinds added so far: pages come ordered by id, and ids
    /// are random, so the first page is a fair sample. Without it the maps double as the
    /// pages arrive, each time holding the old and the new table at once, and that
    /// doubling is most of a start-up's peak memory. A hint beyond
    /// [`MAX_SNAPSHOT_HINT`] is not trusted for sizing.
    pub fn expect(&mut self, total: u64) {
        let held = self.index.by_id.len();
        let Ok(total) = usize::try_from(total) else {
            return;
        };
        // No room beyond what the cache may hold.
        let total = total.min(self.index.limit.0);
        if held == 0 || total <= held || total > MAX_SNAPSHOT_HINT {
            return;
        }
        /// Room for `map`'s share of `total`, a little over the estimate so sampling
        /// error does not cost a last doubling. A failed reservation only means the
        /// map grows as it would have.
        fn grow<K: Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>, total: usize, held: usize) {
            // In u64: a page's length times the hint overflows a 32-bit usize.
            let expected = (map.len() as u64 * total as u64 / held as u64) as usize;
            let want = expected + expected / 32;
            let _ = map.try_reserve(want.saturating_sub(map.len()));
        }
        let index = &mut self.index;
        grow(&mut index.by_id, total, held);
        grow(&mut index.ips4, total, held);
        grow(&mut index.ips6, total, held);
        for (_, map) in &mut index.v4 {
            grow(map, total, held);
        }
        for (_, map) in &mut index.v6 {
            grow(map, total, held);
        }
    }

    /// Mitigations assembled so far.
    pub fn len(&self) -> usize {
        self.index.by_id.len()
    }

    /// True when nothing has been assembled yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Default)]
struct Index {
    by_id: HashMap<MitigationId, Loc>,
    /// App names of app-scoped entries, each allocated once.
    apps: HashSet<Arc<str>>,
    ips4: HashMap<u32, Slot>,
    ips6: HashMap<u128, Slot>,
    /// (prefix length, masked network -> mitigations), only for lengths present.
    v4: Vec<(u8, HashMap<u32, Slot>)>,
    v6: Vec<(u8, HashMap<u128, Slot>)>,
    /// header name -> value -> mitigations.
    headers: HashMap<String, HashMap<String, Slot>>,
    /// cookie name -> hashed value -> mitigations.
    cookies: HashMap<String, HashMap<String, Slot>>,
    /// Path template -> mitigations.
    paths: HashMap<String, Slot>,
    limit: Limit,
    /// JA4 fingerprint -> mitigations.
    ja4s: HashMap<String, Slot>,
    /// Tuple mitigations with an address part, by that address; the others.
    tuples_by_ip: HashMap<IpAddr, Vec<TupleEntry>>,
    tuples: Vec<TupleEntry>,
    /// Entries held, by their action's severity: whether a full index holds something
    /// less severe than a newcomer, without a scan.
    held: [usize; SEVERITIES],
    /// What a full index makes room with next.
    victims: Victims,
}

/// Ids a full index makes room with, gathered by one scan ([`Index::gather`]): entries
/// already expired but not swept yet, and, per severity, those expiring soonest, the
/// soonest last (taken first). Each is checked again when taken, as it may have gone,
/// changed or been renewed since.
struct Victims {
    expired: Vec<MitigationId>,
    by_severity: [Vec<(i64, MitigationId)>; SEVERITIES],
    /// When the scan ran, and the soonest expiry of what it found in force: once that
    /// has passed, entries expired since wait unswept and the victims are stale.
    gathered_at: i64,
    next_expiry: i64,
    /// More had expired than a batch holds: the next scan is worth it at once.
    more_expired: bool,
}

impl Default for Victims {
    /// None gathered yet: stale at once.
    fn default() -> Victims {
        Victims {
            expired: Vec::new(),
            by_severity: Default::default(),
            gathered_at: i64::MIN,
            next_expiry: i64::MIN,
            more_expired: false,
        }
    }
}

/// Shortest time between two scans for entries expired since the last one: a flood
/// into a full cache costs at most a few scans a second, each catching every entry
/// expired meanwhile.
const REGATHER_AFTER: i64 = 250_000_000;

impl Victims {
    /// Has an entry expired since the scan, which a new scan would drop before
    /// evicting anything in force or refusing?
    fn stale(&self, now: i64) -> bool {
        self.more_expired
            || (now >= self.next_expiry && now.saturating_sub(self.gathered_at) >= REGATHER_AFTER)
    }
}

/// How a full index made room for a newcomer.
enum Room {
    /// An expired entry, not swept yet, was dropped: nothing in force was lost.
    Freed,
    /// A less severe entry was evicted.
    Evicted,
    /// Nothing less severe is held.
    None,
    /// The victims gathered are used up: gather again for severities below this one.
    Gather(usize),
}

fn severity(action: &Action) -> usize {
    usize::from(action.severity()).min(SEVERITIES - 1)
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

thread_local! {
    /// The buffer request paths are templated into, so a lookup does not allocate.
    static TEMPLATE: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Calls `f` with the template of `path` ([`path_template`]).
fn with_template<R>(path: &str, f: impl FnOnce(&str) -> R) -> R {
    TEMPLATE.with(|buf| match buf.try_borrow_mut() {
        Ok(mut buf) => {
            write_path_template(path, &mut buf);
            f(&buf)
        }
        // Only if `f` itself templated a path; then a buffer of its own.
        Err(_) => f(&path_template(path)),
    })
}

/// Does a request match one part of a tuple?
fn part_matches(part: &EntityKey, req: &RequestKeys<'_>) -> bool {
    let (ip, headers) = (req.ip, req.headers);
    match part {
        EntityKey::Ip(_) | EntityKey::Cidr(_) => part.covers_ip(ip),
        EntityKey::Path(template) => {
            !req.path.is_empty() && with_template(req.path, |t| t == template.as_str())
        }
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
            .any(|(n, v)| n.eq_ignore_ascii_case(name) && cookie_hash(v).as_str() == value),
        EntityKey::Tuple(_) => false,
    }
}

/// Keeps the strictest tuple mitigation of `tuples` whose every part the request matches.
fn consider_tuples<'a>(
    best: &mut Option<&'a Entry>,
    tuples: &'a [TupleEntry],
    req: &RequestKeys<'_>,
    now: &Now,
) {
    for t in tuples {
        if t.parts.iter().all(|p| part_matches(p, req)) {
            consider(best, std::slice::from_ref(&t.entry), req.app, now);
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
fn outranks(a: &Action, b: &Action) -> bool {
    match a.severity().cmp(&b.severity()) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Less => false,
        std::cmp::Ordering::Equal => match (a, b) {
            (Action::Throttle { rate: ra, .. }, Action::Throttle { rate: rb, .. }) => ra < rb,
            (Action::Tarpit { delay_ms: da }, Action::Tarpit { delay_ms: db }) => da > db,
            (Action::Challenge { difficulty: da }, Action::Challenge { difficulty: db }) => da > db,
            _ => false,
        },
    }
}

/// Keeps the strictest entry of `entries` that is in force for `app` at `now`.
fn consider<'a>(best: &mut Option<&'a Entry>, entries: &'a [Entry], app: &str, now: &Now) {
    for e in entries {
        if e.expires > now.nanos()
            && e.scope.as_deref().is_none_or(|a| a == app)
            && !now.passes(&e.action)
            && best.is_none_or(|b| outranks(&e.action, &b.action))
        {
            *best = Some(e);
        }
    }
}

/// Adds `entry` under `key` of `map`.
fn put<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Slot>, key: K, entry: Entry) {
    match map.entry(key) {
        std::collections::hash_map::Entry::Occupied(mut o) => o.get_mut().push(entry),
        std::collections::hash_map::Entry::Vacant(v) => {
            v.insert(Slot::One(entry));
        }
    }
}

/// Takes entry `id` out of `key`'s slot of `map`, dropping the slot when it empties.
fn take<K, Q>(map: &mut HashMap<K, Slot>, key: &Q, id: &MitigationId) -> Option<Entry>
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: std::hash::Hash + Eq + ?Sized,
{
    let slot = map.get_mut(key)?;
    let taken = slot.take(id);
    if slot.is_empty() {
        map.remove(key);
    }
    taken
}

fn take_tuple(tuples: &mut Vec<TupleEntry>, id: &MitigationId) -> Option<Entry> {
    let pos = tuples.iter().position(|t| t.entry.id == *id)?;
    Some(tuples.remove(pos).entry)
}

impl Index {
    /// The shared name of `app`.
    fn intern(&mut self, app: String) -> Arc<str> {
        if let Some(shared) = self.apps.get(app.as_str()) {
            return shared.clone();
        }
        let shared: Arc<str> = app.into();
        self.apps.insert(shared.clone());
        shared
    }

    /// Adds or replaces `m`. When it is new and the index full, an expired entry not
    /// swept yet, or else a less severe one (of the least severe kind held, one of
    /// those expiring soonest), makes room for it; without one it is refused. Gives
    /// `m` back when the victims must be gathered first ([`Index::gather`]).
    fn insert(&mut self, m: Mitigation, now: i64) -> Result<Admitted, Box<(Mitigation, usize)>> {
        let id = MitigationId::new(&m.id);
        let mut admitted = Admitted::Held;
        if self.by_id.contains_key(&id) {
            self.remove(&id);
        } else if self.by_id.len() >= self.limit.0 {
            match self.make_room(severity(&m.action), now) {
                Room::Freed => {}
                Room::Evicted => admitted = Admitted::Evicted,
                Room::None => return Ok(Admitted::Refused),
                Room::Gather(below) => return Err(Box::new((m, below))),
            }
        }
        self.held[severity(&m.action)] += 1;
        let scope = match m.scope {
            Scope::Global => None,
            Scope::App(app) => Some(self.intern(app)),
        };
        let entry = Entry {
            id: id.clone(),
            expires: nanos(m.expires_at),
            action: m.action,
            scope,
        };
        let loc = match m.entity {
            EntityKey::Ip(ip) => match ip.to_canonical() {
                IpAddr::V4(a) => {
                    put(&mut self.ips4, u32::from(a), entry);
                    Loc::Ip4(a)
                }
                IpAddr::V6(a) => {
                    put(&mut self.ips6, u128::from(a), entry);
                    Loc::Ip6(a)
                }
            },
            EntityKey::Cidr(IpNet::V4(net)) => {
                let len = net.prefix_len();
                let masked = mask_v4(u32::from(net.addr()), len);
                put(length_map(&mut self.v4, len), masked, entry);
                Loc::Net4(len, Ipv4Addr::from(masked))
            }
            EntityKey::Cidr(IpNet::V6(net)) => {
                let len = net.prefix_len();
                let masked = mask_v6(u128::from(net.addr()), len);
                put(length_map(&mut self.v6, len), masked, entry);
                Loc::Net6(len, Ipv6Addr::from(masked))
            }
            EntityKey::Header { name, value } => {
                let values = self.headers.entry(name.clone()).or_default();
                put(values, value.clone(), entry);
                Loc::Other(Box::new(EntityKey::Header { name, value }))
            }
            EntityKey::Cookie { name, value } => {
                let values = self.cookies.entry(name.clone()).or_default();
                put(values, value.clone(), entry);
                Loc::Other(Box::new(EntityKey::Cookie { name, value }))
            }
            EntityKey::Path(template) => {
                put(&mut self.paths, template.clone(), entry);
                Loc::Other(Box::new(EntityKey::Path(template)))
            }
            EntityKey::Ja4(fp) => {
                put(&mut self.ja4s, fp.clone(), entry);
                Loc::Other(Box::new(EntityKey::Ja4(fp)))
            }
            EntityKey::Tuple(parts) => {
                let ip = tuple_ip(&parts);
                let tuple = TupleEntry {
                    parts: parts.clone().into_boxed_slice(),
                    entry,
                };
                match ip {
                    Some(ip) => self.tuples_by_ip.entry(ip).or_default().push(tuple),
                    None => self.tuples.push(tuple),
                }
                Loc::Other(Box::new(EntityKey::Tuple(parts)))
            }
        };
        self.by_id.insert(id, loc);
        Ok(admitted)
    }

    /// Drops an expired entry, or evicts one less severe than `severity`, from the
    /// victims gathered.
    fn make_room(&mut self, severity: usize, now: i64) -> Room {
        while let Some(id) = self.victims.expired.pop() {
            if self.entry(&id).is_some_and(|e| e.expires <= now) {
                self.remove(&id);
                return Room::Freed;
            }
        }
        // Entries that expired after the scan wait for the sweep: one more scan finds
        // them, rather than evicting a mitigation in force or refusing the newcomer.
        if self.victims.stale(now) {
            return Room::Gather(severity);
        }
        let Some(low) = (0..severity).find(|&s| self.held[s] > 0) else {
            return Room::None;
        };
        while let Some((expires, id)) = self.victims.by_severity[low].pop() {
            let unchanged = self
                .entry(&id)
                .is_some_and(|e| e.expires == expires && self::severity(&e.action) == low);
            if unchanged {
                self.remove(&id);
                return Room::Evicted;
            }
        }
        Room::Gather(severity)
    }

    /// Scans every entry for victims: up to a batch of those already expired and, for
    /// each severity below `below`, of those expiring soonest. A batch is a small share
    /// of the limit, so a flood of stricter mitigations into a full cache costs a scan
    /// per batch, not one per mitigation. Read-only: a live cache gathers under the read
    /// lock, with lookups going on.
    fn gather(&self, below: usize, now: i64) -> Victims {
        let batch = (self.limit.0 / 64).clamp(256, 16_384);
        let mut victims = Victims {
            gathered_at: now,
            next_expiry: i64::MAX,
            ..Victims::default()
        };
        // Max-heaps by expiry (then id) of the `batch` soonest seen so far, per severity.
        let mut soonest: [std::collections::BinaryHeap<(i64, MitigationId)>; SEVERITIES] =
            Default::default();
        self.for_each_entry(|e| {
            if e.expires <= now {
                if victims.expired.len() < batch {
                    victims.expired.push(e.id.clone());
                } else {
                    victims.more_expired = true;
                }
                return;
            }
            victims.next_expiry = victims.next_expiry.min(e.expires);
            let s = severity(&e.action);
            if s >= below {
                return;
            }
            let heap = &mut soonest[s];
            if heap.len() < batch {
                heap.push((e.expires, e.id.clone()));
            } else if heap.peek().is_some_and(|top| e.expires < top.0) {
                heap.pop();
                heap.push((e.expires, e.id.clone()));
            }
        });
        for (heap, out) in soonest.into_iter().zip(&mut victims.by_severity) {
            // Ascending by expiry; taken from the end, so reversed.
            *out = heap.into_sorted_vec().into_iter().rev().collect();
        }
        victims
    }

    /// Entry `id`, found where `by_id` says it is.
    fn entry(&self, id: &MitigationId) -> Option<&Entry> {
        fn net<'a, K: std::hash::Hash + Eq>(
            maps: &'a [(u8, HashMap<K, Slot>)],
            len: u8,
            key: &K,
        ) -> Option<&'a Slot> {
            let pos = maps.binary_search_by_key(&len, |(l, _)| *l).ok()?;
            maps[pos].1.get(key)
        }
        let slot = match self.by_id.get(id)? {
            Loc::Ip4(a) => self.ips4.get(&u32::from(*a))?,
            Loc::Ip6(a) => self.ips6.get(&u128::from(*a))?,
            Loc::Net4(len, a) => net(&self.v4, *len, &u32::from(*a))?,
            Loc::Net6(len, a) => net(&self.v6, *len, &u128::from(*a))?,
            Loc::Other(key) => match &**key {
                EntityKey::Header { name, value } => self.headers.get(name)?.get(value)?,
                EntityKey::Cookie { name, value } => self.cookies.get(name)?.get(value)?,
                EntityKey::Path(template) => self.paths.get(template)?,
                EntityKey::Ja4(fp) => self.ja4s.get(fp)?,
                EntityKey::Tuple(parts) => {
                    let tuples = match tuple_ip(parts) {
                        Some(ip) => self.tuples_by_ip.get(&ip)?,
                        None => &self.tuples,
                    };
                    return tuples.iter().map(|t| &t.entry).find(|e| e.id == *id);
                }
                EntityKey::Ip(_) | EntityKey::Cidr(_) => return None,
            },
        };
        slot.entries().iter().find(|e| e.id == *id)
    }

    /// One change of a delta page or snapshot page; an expired upsert removes. Gives
    /// the change back when victims must be gathered first, for severities below the
    /// one returned.
    fn apply(
        &mut self,
        change: Change,
        now: DateTime<Utc>,
    ) -> Result<Admitted, Box<(Change, usize)>> {
        match change {
            Change::Upsert { mitigation } if mitigation.is_active(now) => {
                return self.insert(mitigation, nanos(now)).map_err(|back| {
                    let (mitigation, below) = *back;
                    Box::new((Change::Upsert { mitigation }, below))
                });
            }
            Change::Upsert { mitigation } => {
                self.remove(&MitigationId::new(&mitigation.id));
            }
            Change::Remove { id } => {
                self.remove(&MitigationId::new(&id));
            }
        }
        Ok(Admitted::Held)
    }

    /// [`apply`](Self::apply), gathering victims in place when needed: for an index
    /// no lookup sees yet (a snapshot being assembled).
    fn apply_gathering(&mut self, change: Change, now: DateTime<Utc>) -> Admitted {
        match self.apply(change, now) {
            Ok(admitted) => admitted,
            Err(back) => {
                let (change, below) = *back;
                self.victims = self.gather(below, nanos(now));
                // Victims just gathered all fail only if the counts are wrong: refuse
                // rather than gather forever.
                self.apply(change, now).unwrap_or(Admitted::Refused)
            }
        }
    }

    fn remove(&mut self, id: &MitigationId) -> bool {
        let Some(loc) = self.by_id.remove(id) else {
            return false;
        };
        let taken = match loc {
            Loc::Ip4(a) => take(&mut self.ips4, &u32::from(a), id),
            Loc::Ip6(a) => take(&mut self.ips6, &u128::from(a), id),
            Loc::Net4(len, net) => take_net(&mut self.v4, len, u32::from(net), id),
            Loc::Net6(len, net) => take_net(&mut self.v6, len, u128::from(net), id),
            Loc::Other(key) => match *key {
                EntityKey::Header { name, value } => {
                    take_named(&mut self.headers, &name, &value, id)
                }
                EntityKey::Cookie { name, value } => {
                    take_named(&mut self.cookies, &name, &value, id)
                }
                EntityKey::Path(template) => take(&mut self.paths, template.as_str(), id),
                EntityKey::Ja4(fp) => take(&mut self.ja4s, fp.as_str(), id),
                EntityKey::Tuple(parts) => match tuple_ip(&parts) {
                    Some(ip) => {
                        let tuples = self.tuples_by_ip.get_mut(&ip);
                        let taken = tuples.and_then(|t| take_tuple(t, id));
                        if self.tuples_by_ip.get(&ip).is_some_and(Vec::is_empty) {
                            self.tuples_by_ip.remove(&ip);
                        }
                        taken
                    }
                    None => take_tuple(&mut self.tuples, id),
                },
                EntityKey::Ip(_) | EntityKey::Cidr(_) => None,
            },
        };
        if let Some(e) = &taken {
            let held = &mut self.held[severity(&e.action)];
            *held = held.saturating_sub(1);
        }
        if let Some(app) = taken.and_then(|e| e.scope) {
            // This entry and the set held the last two references: forget the name.
            if Arc::strong_count(&app) == 2 {
                self.apps.remove(&app);
            }
        }
        true
    }

    fn lookup(
        &self,
        req: &RequestKeys<'_>,
        now: DateTime<Utc>,
        cleared: Option<u8>,
    ) -> Option<Hit> {
        let now = &Now::new(now, cleared);
        let ip = req.ip.to_canonical();
        let req = &RequestKeys { ip, ..*req };
        let (app, headers) = (req.app, req.headers);
        let mut best: Option<&Entry> = None;
        match ip {
            IpAddr::V4(v4) => {
                let addr = u32::from(v4);
                if let Some(slot) = self.ips4.get(&addr) {
                    consider(&mut best, slot.entries(), app, now);
                }
                for (len, map) in &self.v4 {
                    if let Some(slot) = map.get(&mask_v4(addr, *len)) {
                        consider(&mut best, slot.entries(), app, now);
                    }
                }
            }
            IpAddr::V6(v6) => {
                let addr = u128::from(v6);
                if let Some(slot) = self.ips6.get(&addr) {
                    consider(&mut best, slot.entries(), app, now);
                }
                for (len, map) in &self.v6 {
                    if let Some(slot) = map.get(&mask_v6(addr, *len)) {
                        consider(&mut best, slot.entries(), app, now);
                    }
                }
            }
        }
        for (name, values) in &self.headers {
            for value in headers.get_all(name.as_str()) {
                if let Some(slot) = value.to_str().ok().and_then(|v| values.get(v)) {
                    consider(&mut best, slot.entries(), app, now);
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
                    if let Some(values) = values
                        && let Some(slot) = values.get(cookie_hash(value).as_str())
                    {
                        consider(&mut best, slot.entries(), app, now);
                    }
                }
            }
        }
        if !self.paths.is_empty()
            && !req.path.is_empty()
            && let Some(slot) = with_template(req.path, |t| self.paths.get(t))
        {
            consider(&mut best, slot.entries(), app, now);
        }
        if let Some(slot) = req
            .ja4
            .filter(|_| !self.ja4s.is_empty())
            .and_then(|fp| self.ja4s.get(fp))
        {
            consider(&mut best, slot.entries(), app, now);
        }
        if let Some(tuples) = self.tuples_by_ip.get(&ip) {
            consider_tuples(&mut best, tuples, req, now);
        }
        consider_tuples(&mut best, &self.tuples, req, now);
        best.map(|e| Hit {
            id: e.id.clone(),
            action: e.action.clone(),
        })
    }

    fn expired(&self, now: DateTime<Utc>) -> Vec<MitigationId> {
        let now = nanos(now);
        let mut out = Vec::new();
        self.for_each_entry(|e| {
            if e.expires <= now {
                out.push(e.id.clone());
            }
        });
        out
    }

    /// Visits every entry held.
    fn for_each_entry<'a>(&'a self, mut f: impl FnMut(&'a Entry)) {
        let slots = self
            .ips4
            .values()
            .chain(self.ips6.values())
            .chain(self.v4.iter().flat_map(|(_, m)| m.values()))
            .chain(self.v6.iter().flat_map(|(_, m)| m.values()))
            .chain(self.headers.values().flat_map(|m| m.values()))
            .chain(self.cookies.values().flat_map(|m| m.values()))
            .chain(self.paths.values())
            .chain(self.ja4s.values());
        for slot in slots {
            slot.entries().iter().for_each(&mut f);
        }
        for t in self.tuples_by_ip.values().flatten().chain(&self.tuples) {
            f(&t.entry);
        }
    }
}

fn length_map<K>(maps: &mut Vec<(u8, HashMap<K, Slot>)>, len: u8) -> &mut HashMap<K, Slot> {
    let pos = match maps.binary_search_by_key(&len, |(l, _)| *l) {
        Ok(pos) => pos,
        Err(pos) => {
            maps.insert(pos, (len, HashMap::default()));
            pos
        }
    };
    &mut maps[pos].1
}

fn take_net<K: std::hash::Hash + Eq>(
    maps: &mut Vec<(u8, HashMap<K, Slot>)>,
    len: u8,
    key: K,
    id: &MitigationId,
) -> Option<Entry> {
    let pos = maps.binary_search_by_key(&len, |(l, _)| *l).ok()?;
    let map = &mut maps[pos].1;
    let taken = take(map, &key, id);
    if map.is_empty() {
        maps.remove(pos);
    }
    taken
}

fn take_named(
    maps: &mut HashMap<String, HashMap<String, Slot>>,
    name: &str,
    value: &str,
    id: &MitigationId,
) -> Option<Entry> {
    let values = maps.get_mut(name)?;
    let taken = take(values, value, id);
    if values.is_empty() {
        maps.remove(name);
    }
    taken
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
    /// An empty cache without a limit.
    pub fn new() -> MitigationCache {
        MitigationCache::with_limit(usize::MAX)
    }

    /// An empty cache holding at most `limit` mitigations: past it, a new one takes the
    /// place of one expired but not swept yet, or of a less severe one (of the least
    /// severe kind held, one of those expiring soonest), or, when none is held, is
    /// refused; [`apply`](Self::apply) and
    /// [`SnapshotBuilder::add`] count both. Those held are still updated and removed.
    pub fn with_limit(limit: usize) -> MitigationCache {
        MitigationCache {
            index: RwLock::new(Index {
                limit: Limit(limit),
                ..Index::default()
            }),
            writers: Mutex::new(()),
            limit,
        }
    }

    /// The most mitigations this cache holds.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The strictest mitigation in force for a request for `app` from `ip` with `headers`
    /// (header values and cookie hashes are matched only for names the cache holds).
    pub fn lookup(
        &self,
        app: &str,
        ip: IpAddr,
        headers: &HeaderMap,
        now: DateTime<Utc>,
    ) -> Option<Hit> {
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
    pub fn lookup_request(&self, req: &RequestKeys<'_>, now: DateTime<Utc>) -> Option<Hit> {
        self.index.read().lookup(req, now, None)
    }

    /// [`lookup_request`](Self::lookup_request) for a client holding a clearance up to
    /// difficulty `earned`: the strictest mitigation other than a challenge it cleared.
    pub fn lookup_cleared(
        &self,
        req: &RequestKeys<'_>,
        now: DateTime<Utc>,
        earned: u8,
    ) -> Option<Hit> {
        self.index.read().lookup(req, now, Some(earned))
    }

    /// Adds or replaces (same id) one mitigation. `false` when it is new and the cache
    /// is full of mitigations at least as severe; a less severe one is evicted for it
    /// otherwise.
    pub fn upsert(&self, m: Mitigation) -> bool {
        let change = Change::Upsert { mitigation: m };
        self.apply(vec![change], Utc::now()).refused == 0
    }

    /// Removes a mitigation by id; `true` when it was present.
    pub fn remove(&self, id: &str) -> bool {
        let id = MitigationId::new(id);
        let _writer = self.writers.lock();
        self.index.write().remove(&id)
    }

    /// Applies a page of deltas, a bounded chunk per write lock. Mitigations that have
    /// already expired are not added. Returns what the cache's limit cost.
    pub fn apply(&self, changes: Vec<Change>, now: DateTime<Utc>) -> Overflow {
        let mut overflow = Overflow::default();
        let _writer = self.writers.lock();
        let mut changes = changes.into_iter();
        // A change given back until victims are gathered, and whether they just were.
        let mut held_back: Option<(Change, bool)> = None;
        loop {
            let mut gather = None;
            {
                let mut index = self.index.write();
                for _ in 0..WRITE_CHUNK {
                    let (change, gathered) = match held_back.take() {
                        Some(back) => back,
                        None => match changes.next() {
                            Some(change) => (change, false),
                            None => break,
                        },
                    };
                    match index.apply(change, now) {
                        Ok(admitted) => overflow.count(admitted),
                        // Victims just gathered all fail only if the counts are wrong:
                        // refuse rather than gather forever.
                        Err(_) if gathered => overflow.count(Admitted::Refused),
                        Err(back) => {
                            let (change, below) = *back;
                            held_back = Some((change, true));
                            gather = Some(below);
                            break;
                        }
                    }
                }
            }
            match gather {
                // The scan of every entry runs under the read lock, with lookups going
                // on, not under the write lock; no other writer runs meanwhile.
                Some(below) => {
                    let victims = self.index.read().gather(below, nanos(now));
                    self.index.write().victims = victims;
                }
                None if changes.len() == 0 => break,
                None => {}
            }
        }
        overflow
    }

    /// An empty index to assemble a snapshot in, page by page, apart from this cache
    /// (which keeps serving lookups); [`install`](Self::install) swaps it in.
    pub fn begin_snapshot(&self) -> SnapshotBuilder {
        SnapshotBuilder {
            index: Index {
                limit: Limit(self.limit),
                ..Index::default()
            },
        }
    }

    /// Replaces the whole content with an assembled snapshot at once; the old index is
    /// freed after the lock is released.
    pub fn install(&self, snapshot: SnapshotBuilder) {
        let old = {
            let _writer = self.writers.lock();
            std::mem::replace(&mut *self.index.write(), snapshot.index)
        };
        drop(old);
    }

    /// Replaces the whole content with a snapshot that came in one piece; the new index
    /// is built before the lock is taken.
    pub fn replace(&self, changes: Vec<Change>, now: DateTime<Utc>) -> Overflow {
        let mut snapshot = self.begin_snapshot();
        let overflow = snapshot.add(changes, now);
        self.install(snapshot);
        overflow
    }

    /// Frees expired entries (lookups already ignore them); returns how many.
    pub fn sweep(&self, now: DateTime<Utc>) -> usize {
        let _writer = self.writers.lock();
        let expired = self.index.read().expired(now);
        for chunk in expired.chunks(WRITE_CHUNK) {
            let mut index = self.index.write();
            for id in chunk {
                index.remove(id);
            }
        }
        if !expired.is_empty() {
            // The victims gathered expire soonest: most are gone now.
            self.index.write().victims = Victims::default();
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

    use esper_protocol::{Origin, Reason, Scope, hash_cookie_value};
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
    fn a_writer_during_a_sweep_does_not_hold_up_lookups() {
        let cache = Arc::new(MitigationCache::new());
        cache.upsert(mitigation("ip:192.0.2.1", Action::Block));
        // What a sweep holds while it scans: the writers' turn and a read lock.
        let turn = cache.writers.lock();
        let scan = cache.index.read();
        let writer = {
            let cache = cache.clone();
            std::thread::spawn(move || cache.upsert(mitigation("ip:192.0.2.2", Action::Block)))
        };
        std::thread::sleep(Duration::from_millis(100));
        // A writer waiting on the index itself would make this fail until the scan ends.
        assert!(
            cache.index.try_read().is_some(),
            "a lookup is not queued behind the waiting writer"
        );
        assert!(!writer.is_finished());
        drop(scan);
        drop(turn);
        writer.join().unwrap();
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn a_cleared_client_is_looked_up_past_its_challenges() {
        let cache = MitigationCache::new();
        let h = none();
        let keys = RequestKeys {
            app: "a",
            ip: ip("192.0.2.1"),
            headers: &h,
            path: "/",
            ja4: None,
        };
        cache.upsert(mitigation(
            "ip:192.0.2.1",
            Action::Challenge { difficulty: 8 },
        ));
        cache.upsert(mitigation(
            "cidr:192.0.2.0/24",
            Action::Tarpit { delay_ms: 10 },
        ));
        let now = Utc::now();
        let action = |hit: Option<Hit>| hit.map(|h| h.action);
        assert_eq!(
            action(cache.lookup_request(&keys, now)),
            Some(Action::Challenge { difficulty: 8 })
        );
        assert_eq!(
            action(cache.lookup_cleared(&keys, now, 8)),
            Some(Action::Tarpit { delay_ms: 10 })
        );
        // A harder challenge is not cleared by an easier cookie.
        assert_eq!(
            action(cache.lookup_cleared(&keys, now, 7)),
            Some(Action::Challenge { difficulty: 8 })
        );
        cache.upsert(mitigation("cidr:192.0.2.0/25", Action::Block));
        assert_eq!(
            action(cache.lookup_cleared(&keys, now, 8)),
            Some(Action::Block)
        );
        let other = RequestKeys {
            ip: ip("198.51.100.1"),
            ..keys
        };
        assert_eq!(action(cache.lookup_cleared(&other, now, 8)), None);
    }

    #[test]
    fn a_full_cache_refuses_new_mitigations_and_keeps_updating_the_rest() {
        let cache = MitigationCache::with_limit(2);
        assert!(cache.upsert(mitigation("ip:192.0.2.1", Action::Block)));
        let mut second = mitigation("ip:192.0.2.2", Action::Log);
        assert!(cache.upsert(second.clone()));
        second.action = Action::Block;
        assert!(
            cache.upsert(second.clone()),
            "one held is replaced in place"
        );
        // Nothing less severe than a block is held: a new one is refused.
        assert!(!cache.upsert(mitigation("ip:192.0.2.3", Action::Block)));
        assert_eq!(cache.len(), 2);
        let changes = vec![
            Change::Upsert {
                mitigation: second.clone(),
            },
            Change::Upsert {
                mitigation: mitigation("ip:192.0.2.4", Action::Block),
            },
        ];
        let refused = Overflow {
            refused: 1,
            evicted: 0,
        };
        assert_eq!(cache.apply(changes, Utc::now()), refused);
        assert_eq!(action(find_ip(&cache, "192.0.2.2")), Some(Action::Block));
        assert_eq!(action(find_ip(&cache, "192.0.2.4")), None);
        // Room made by a removal is used again; snapshots keep the limit too.
        assert!(cache.remove(&second.id));
        assert!(cache.upsert(mitigation("ip:192.0.2.5", Action::Log)));
        let snapshot: Vec<Change> = (1..=4)
            .map(|i| Change::Upsert {
                mitigation: mitigation(&format!("ip:198.51.100.{i}"), Action::Log),
            })
            .collect();
        let refused = Overflow {
            refused: 2,
            evicted: 0,
        };
        assert_eq!(cache.replace(snapshot, Utc::now()), refused);
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn a_full_cache_drops_what_expired_since_its_last_scan_before_evicting_or_refusing() {
        let cache = MitigationCache::with_limit(3);
        let t0 = Utc::now();
        let later = t0 + chrono::Duration::seconds(5);
        let block = |key: &str, secs| Change::Upsert {
            mitigation: expiring(key, Action::Block, secs),
        };
        let changes = vec![
            Change::Upsert {
                mitigation: expiring("ip:192.0.2.1", Action::Log, 3600),
            },
            Change::Upsert {
                mitigation: expiring("ip:192.0.2.2", Action::Log, 3600),
            },
            block("ip:192.0.2.3", 1),
        ];
        assert_eq!(cache.apply(changes, t0), Overflow::default());
        // Full: a block evicts a log, from a scan in which nothing had expired yet.
        let evicted = Overflow {
            refused: 0,
            evicted: 1,
        };
        assert_eq!(cache.apply(vec![block("ip:192.0.2.4", 3600)], t0), evicted);
        // Once the short block has expired (no sweep yet), the next block takes its
        // place: the log left in force stays.
        assert_eq!(
            cache.apply(vec![block("ip:192.0.2.5", 3600)], later),
            Overflow::default()
        );
        let at = |addr: &str| action(cache.lookup("a", ip(addr), &none(), later));
        assert_eq!(
            [at("192.0.2.1"), at("192.0.2.2")]
                .iter()
                .filter(|a| **a == Some(Action::Log))
                .count(),
            1,
            "the log not evicted before is still held"
        );
        assert_eq!(at("192.0.2.5"), Some(Action::Block));

        // Full of blocks only: one that expired since the last scan makes room too,
        // where the newcomer used to be refused until the sweep.
        let blocks = MitigationCache::with_limit(2);
        let changes = vec![block("ip:198.51.100.1", 1), block("ip:198.51.100.2", 3600)];
        assert_eq!(blocks.apply(changes, t0), Overflow::default());
        let refused = Overflow {
            refused: 1,
            evicted: 0,
        };
        assert_eq!(
            blocks.apply(vec![block("ip:198.51.100.3", 3600)], t0),
            refused
        );
        assert_eq!(
            blocks.apply(vec![block("ip:198.51.100.4", 3600)], later),
            Overflow::default()
        );
        assert_eq!(blocks.len(), 2);
    }

    fn find_ip(cache: &MitigationCache, addr: &str) -> Option<Hit> {
        cache.lookup("a", ip(addr), &none(), Utc::now())
    }

    fn action(hit: Option<Hit>) -> Option<Action> {
        hit.map(|h| h.action)
    }

    fn expiring(key: &str, action: Action, secs: u64) -> Mitigation {
        let mut m = mitigation(key, action);
        m.expires_at = Utc::now() + Duration::from_secs(secs);
        m
    }

    #[test]
    fn a_full_cache_evicts_the_least_severe_for_a_stricter_newcomer() {
        let cache = MitigationCache::with_limit(4);
        // Held: two logs (one expiring sooner), a throttle, a block.
        let throttle = Action::Throttle {
            rate: 1.0,
            burst: 1,
        };
        for m in [
            expiring("ip:192.0.2.1", Action::Log, 600),
            expiring("ip:192.0.2.2", Action::Log, 60),
            expiring("ip:192.0.2.3", throttle.clone(), 30),
            expiring("ip:192.0.2.4", Action::Block, 600),
        ] {
            assert!(cache.upsert(m));
        }
        // A log finds nothing less severe than itself.
        assert!(!cache.upsert(mitigation("ip:192.0.2.9", Action::Log)));
        // A block takes the place of the log that expires first, then of the other.
        let changes = vec![
            Change::Upsert {
                mitigation: mitigation("ip:192.0.2.10", Action::Block),
            },
            Change::Upsert {
                mitigation: mitigation("ip:192.0.2.11", Action::Tarpit { delay_ms: 5 }),
            },
        ];
        let evicted = Overflow {
            refused: 0,
            evicted: 2,
        };
        assert_eq!(cache.apply(changes, Utc::now()), evicted);
        assert_eq!(action(find_ip(&cache, "192.0.2.2")), None);
        assert_eq!(action(find_ip(&cache, "192.0.2.1")), None);
        assert_eq!(action(find_ip(&cache, "192.0.2.10")), Some(Action::Block));
        // Then the throttle, although it expires sooner than anything else held.
        assert!(cache.upsert(mitigation(
            "ip:192.0.2.12",
            Action::Challenge { difficulty: 16 }
        )));
        assert_eq!(action(find_ip(&cache, "192.0.2.3")), None);
        // A tarpit now finds nothing less severe: refused.
        assert!(!cache.upsert(mitigation("ip:192.0.2.13", Action::Tarpit { delay_ms: 5 })));
        assert_eq!(cache.len(), 4);
        for kept in ["192.0.2.4", "192.0.2.10", "192.0.2.11", "192.0.2.12"] {
            assert!(find_ip(&cache, kept).is_some(), "{kept}");
        }
    }

    #[test]
    fn an_eviction_candidate_that_changed_is_passed_over() {
        let cache = MitigationCache::with_limit(3);
        let mut logs: Vec<Mitigation> = (1..=3)
            .map(|i| expiring(&format!("ip:192.0.2.{i}"), Action::Log, 60 * i))
            .collect();
        for m in &logs {
            assert!(cache.upsert(m.clone()));
        }
        // The first eviction gathers every log as a candidate, the soonest first.
        assert!(cache.upsert(mitigation("ip:198.51.100.1", Action::Block)));
        assert_eq!(action(find_ip(&cache, "192.0.2.1")), None);
        // The next candidate becomes a block before its turn, the one after is revoked
        // and published again with the same id as a log: it is the one evicted.
        logs[1].action = Action::Block;
        assert!(cache.upsert(logs[1].clone()));
        assert!(cache.remove(&logs[2].id));
        assert!(cache.upsert(logs[2].clone()));
        assert!(cache.upsert(mitigation("ip:198.51.100.2", Action::Block)));
        assert_eq!(action(find_ip(&cache, "192.0.2.2")), Some(Action::Block));
        assert_eq!(action(find_ip(&cache, "192.0.2.3")), None);
        // Only blocks are left.
        assert!(!cache.upsert(mitigation("ip:198.51.100.3", Action::Block)));
    }

    #[test]
    fn a_renewed_candidate_is_passed_over_and_an_expired_one_goes_first() {
        let cache = MitigationCache::with_limit(4);
        let mut logs: Vec<Mitigation> = (1..=3)
            .map(|i| expiring(&format!("ip:192.0.2.{i}"), Action::Log, 60 * i))
            .collect();
        for m in &logs {
            assert!(cache.upsert(m.clone()));
        }
        let mut blocks = [expiring("ip:192.0.2.9", Action::Block, 600)];
        assert!(cache.upsert(blocks[0].clone()));
        // The first eviction gathers the three logs and takes the soonest to expire.
        assert!(cache.upsert(mitigation("ip:198.51.100.1", Action::Block)));
        assert_eq!(action(find_ip(&cache, "192.0.2.1")), None);
        // The next candidate is renewed for an hour before its turn: passed over, the
        // one after it (now the sooner to expire) goes instead.
        logs[1].expires_at = Utc::now() + Duration::from_secs(3600);
        assert!(cache.upsert(logs[1].clone()));
        let evicted = Overflow {
            refused: 0,
            evicted: 1,
        };
        let next = Change::Upsert {
            mitigation: mitigation("ip:198.51.100.2", Action::Block),
        };
        assert_eq!(cache.apply(vec![next], Utc::now()), evicted);
        assert_eq!(action(find_ip(&cache, "192.0.2.2")), Some(Action::Log));
        assert_eq!(action(find_ip(&cache, "192.0.2.3")), None);
        let renewed = find_ip(&cache, "192.0.2.2").unwrap().id;
        assert!(cache.remove(&renewed.text()));
        // A log and three blocks, one of them expired but not swept: a new block takes
        // the expired one's place, the log stays, and nothing in force was lost.
        assert!(cache.upsert(mitigation("ip:192.0.2.5", Action::Log)));
        blocks[0].expires_at = Utc::now() + Duration::from_millis(50);
        assert!(cache.upsert(blocks[0].clone()));
        std::thread::sleep(Duration::from_millis(60));
        let late = Change::Upsert {
            mitigation: mitigation("ip:198.51.100.3", Action::Block),
        };
        assert_eq!(cache.apply(vec![late], Utc::now()), Overflow::default());
        assert_eq!(cache.len(), 4);
        assert_eq!(action(find_ip(&cache, "198.51.100.3")), Some(Action::Block));
        assert_eq!(action(find_ip(&cache, "192.0.2.5")), Some(Action::Log));
        assert!(
            !cache.remove(&blocks[0].id),
            "the expired block was dropped"
        );
    }

    #[test]
    fn entries_of_every_kind_can_be_evicted() {
        let keys = [
            "ip:192.0.2.1",
            "ip:2001:db8::1",
            "cidr:10.0.0.0/8",
            "cidr:2001:db8:1::/48",
            "header:x-api-key=k1",
            "cookie:session=0123456789abcdef",
            "path:/users/{id}/orders",
            "ja4:t13d1516h2_8daaf6152771_b0da82dd1658",
            "tuple:ip:10.0.0.1+path:/cart",
            "tuple:header:user-agent=curl/8+path:/cart",
        ];
        let cache = MitigationCache::with_limit(keys.len());
        let logs: Vec<Mitigation> = keys.iter().map(|k| mitigation(k, Action::Log)).collect();
        for m in &logs {
            assert!(cache.upsert(m.clone()), "{}", m.id);
        }
        let blocks: Vec<Change> = (1..=keys.len())
            .map(|i| Change::Upsert {
                mitigation: mitigation(&format!("ip:198.51.100.{i}"), Action::Block),
            })
            .collect();
        let all = Overflow {
            refused: 0,
            evicted: keys.len() as u64,
        };
        assert_eq!(cache.apply(blocks, Utc::now()), all);
        assert_eq!(cache.len(), keys.len());
        for m in &logs {
            assert!(!cache.remove(&m.id), "{} was evicted", m.id);
        }
        assert!(!cache.upsert(mitigation("ip:198.51.100.200", Action::Block)));
    }

    #[test]
    fn a_snapshot_larger_than_the_limit_keeps_the_most_severe() {
        let cache = MitigationCache::with_limit(100);
        let page: Vec<Change> = (0..400u32)
            .map(|i| {
                let action = if i % 4 == 0 {
                    Action::Block
                } else {
                    Action::Log
                };
                Change::Upsert {
                    mitigation: mitigation(&format!("ip:10.0.{}.{}", i / 256, i % 256), action),
                }
            })
            .collect();
        let overflow = cache.replace(page, Utc::now());
        assert_eq!(overflow.refused + overflow.evicted, 300);
        assert_eq!(cache.len(), 100);
        for i in (0..400u32).step_by(4) {
            let addr = format!("10.0.{}.{}", i / 256, i % 256);
            assert_eq!(
                action(find_ip(&cache, &addr)),
                Some(Action::Block),
                "{addr}"
            );
        }
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
    fn a_snapshot_is_assembled_apart_and_installed_at_once() {
        let cache = MitigationCache::new();
        cache.upsert(mitigation("ip:192.0.2.1", Action::Block));
        let mut snapshot = cache.begin_snapshot();
        let pages = [
            vec![mitigation("ip:198.51.100.1", Action::Block)],
            vec![mitigation("cidr:203.0.113.0/24", Action::Block)],
        ];
        for page in pages {
            let changes = page
                .into_iter()
                .map(|m| Change::Upsert { mitigation: m })
                .collect();
            snapshot.add(changes, Utc::now());
            // The live content is untouched while pages arrive.
            assert_eq!(find(&cache, "a", "192.0.2.1", &none()), Some(Action::Block));
            assert_eq!(find(&cache, "a", "198.51.100.1", &none()), None);
            assert_eq!(cache.len(), 1);
        }
        assert_eq!(snapshot.len(), 2);
        cache.install(snapshot);
        assert_eq!(find(&cache, "a", "192.0.2.1", &none()), None);
        assert_eq!(
            find(&cache, "a", "198.51.100.1", &none()),
            Some(Action::Block)
        );
        assert_eq!(
            find(&cache, "a", "203.0.113.7", &none()),
            Some(Action::Block)
        );
        assert_eq!(cache.len(), 2);

        // An abandoned snapshot leaves the cache as it was.
        let mut abandoned = cache.begin_snapshot();
        abandoned.add(
            vec![Change::Upsert {
                mitigation: mitigation("ip:192.0.2.50", Action::Block),
            }],
            Utc::now(),
        );
        drop(abandoned);
        assert_eq!(cache.len(), 2);
        assert_eq!(find(&cache, "a", "192.0.2.50", &none()), None);
    }

    /// 60% IPv4 addresses, 30% IPv6 addresses, 10% /24 networks, as a snapshot's pages.
    fn mixed_page(from: usize, to: usize) -> Vec<Change> {
        (from..to)
            .map(|i| {
                let key = match i % 10 {
                    0..=5 => format!("ip:10.{}.{}.{}", i >> 16 & 255, i >> 8 & 255, i & 255),
                    6..=8 => format!("ip:2001:db8::{:x}", i),
                    _ => format!("cidr:172.{}.{}.0/24", i >> 8 & 255, i & 255),
                };
                Change::Upsert {
                    mitigation: mitigation(&key, Action::Block),
                }
            })
            .collect()
    }

    #[test]
    fn a_snapshot_is_sized_from_its_first_page() {
        let cache = MitigationCache::new();
        let mut snapshot = cache.begin_snapshot();
        snapshot.add(mixed_page(0, 500), Utc::now());
        snapshot.expect(20_000);
        let index = &snapshot.index;
        assert!(
            index.by_id.capacity() >= 20_000,
            "{}",
            index.by_id.capacity()
        );
        assert!(index.ips4.capacity() >= 12_000, "{}", index.ips4.capacity());
        assert!(index.ips6.capacity() >= 6_000, "{}", index.ips6.capacity());
        let before = (
            index.by_id.capacity(),
            index.ips4.capacity(),
            index.ips6.capacity(),
        );
        // The rest arrives without any map growing again.
        for from in (500..20_000).step_by(500) {
            snapshot.add(mixed_page(from, from + 500), Utc::now());
        }
        let index = &snapshot.index;
        assert_eq!(index.by_id.len(), 20_000);
        assert_eq!(
            (
                index.by_id.capacity(),
                index.ips4.capacity(),
                index.ips6.capacity()
            ),
            before
        );
        cache.install(snapshot);
        assert_eq!(find(&cache, "a", "10.0.5.0", &none()), Some(Action::Block));
        assert_eq!(
            find(&cache, "a", "172.0.9.77", &none()),
            Some(Action::Block)
        );

        // A hint that is no larger than what came, or absurd, sizes nothing.
        for hint in [0, 10, MAX_SNAPSHOT_HINT as u64 + 1, u64::MAX] {
            let mut snapshot = cache.begin_snapshot();
            snapshot.add(mixed_page(0, 100), Utc::now());
            let capacity = snapshot.index.by_id.capacity();
            snapshot.expect(hint);
            assert_eq!(snapshot.index.by_id.capacity(), capacity, "{hint}");
        }
    }

    #[test]
    fn a_slot_grows_from_one_to_many_and_back() {
        let cache = MitigationCache::new();
        let log = mitigation("ip:192.0.2.1", Action::Log);
        let block = mitigation("ip:192.0.2.1", Action::Block);
        let tarpit = mitigation("ip:192.0.2.1", Action::Tarpit { delay_ms: 5 });
        let (log_id, block_id, tarpit_id) = (log.id.clone(), block.id.clone(), tarpit.id.clone());
        let slot_len = |cache: &MitigationCache| {
            let index = cache.index.read();
            let slot = index.ips4.get(&u32::from(Ipv4Addr::new(192, 0, 2, 1)));
            slot.map(|s| (matches!(s, Slot::One(_)), s.entries().len()))
        };
        cache.upsert(log);
        assert_eq!(slot_len(&cache), Some((true, 1)));
        cache.upsert(block);
        cache.upsert(tarpit);
        assert_eq!(slot_len(&cache), Some((false, 3)));
        assert_eq!(find(&cache, "a", "192.0.2.1", &none()), Some(Action::Block));
        assert!(cache.remove(&block_id));
        assert_eq!(slot_len(&cache), Some((false, 2)));
        assert_eq!(
            find(&cache, "a", "192.0.2.1", &none()),
            Some(Action::Tarpit { delay_ms: 5 })
        );
        assert!(cache.remove(&tarpit_id));
        assert_eq!(slot_len(&cache), Some((true, 1)), "back to one, inline");
        assert_eq!(find(&cache, "a", "192.0.2.1", &none()), Some(Action::Log));
        assert!(cache.remove(&log_id));
        assert_eq!(slot_len(&cache), None, "an empty slot is dropped");
        assert!(cache.is_empty());
    }

    #[test]
    fn the_same_id_under_another_key_moves_the_entry() {
        let cache = MitigationCache::new();
        let first = mitigation("ip:192.0.2.1", Action::Block);
        let id = first.id.clone();
        cache.upsert(first);
        let mut moved = mitigation("cidr:198.51.100.0/24", Action::Tarpit { delay_ms: 9 });
        moved.id = id.clone();
        cache.upsert(moved);
        assert_eq!(cache.len(), 1);
        assert_eq!(
            find(&cache, "a", "192.0.2.1", &none()),
            None,
            "old key freed"
        );
        let hit = cache.lookup("a", ip("198.51.100.3"), &none(), Utc::now());
        assert_eq!(
            hit,
            Some(Hit {
                id: MitigationId::new(&id),
                action: Action::Tarpit { delay_ms: 9 }
            })
        );
        // And to a header, then back to an address: every kind of key is left clean.
        let mut header = mitigation("header:x-api-key=k1", Action::Log);
        header.id = id.clone();
        cache.upsert(header);
        assert!(cache.index.read().v4.is_empty());
        let mut back = mitigation("ip:2001:db8::1", Action::Block);
        back.id = id.clone();
        cache.apply(vec![Change::Upsert { mitigation: back }], Utc::now());
        assert!(cache.index.read().headers.is_empty());
        assert_eq!(cache.len(), 1);
        assert_eq!(
            find(&cache, "a", "2001:db8::1", &none()),
            Some(Action::Block)
        );
        assert!(cache.remove(&id));
        assert!(cache.index.read().ips6.is_empty() && cache.is_empty());
    }

    #[test]
    fn ipv4_mapped_ipv6_addresses_are_the_ipv4_client() {
        let cache = MitigationCache::new();
        // Published in the mapped form, found by the plain address and the other way.
        let mapped = mitigation("ip:::ffff:192.0.2.7", Action::Block);
        let mapped_id = mapped.id.clone();
        cache.upsert(mapped);
        cache.upsert(mitigation("ip:192.0.2.8", Action::Log));
        cache.upsert(mitigation("cidr:198.51.100.0/24", Action::Block));
        assert_eq!(find(&cache, "a", "192.0.2.7", &none()), Some(Action::Block));
        assert_eq!(
            find(&cache, "a", "::ffff:192.0.2.8", &none()),
            Some(Action::Log)
        );
        assert_eq!(
            find(&cache, "a", "::ffff:198.51.100.9", &none()),
            Some(Action::Block)
        );
        assert!(cache.index.read().ips6.is_empty(), "kept as IPv4");
        assert!(cache.remove(&mapped_id));
        assert_eq!(find(&cache, "a", "192.0.2.7", &none()), None);
    }

    #[test]
    fn expiry_is_exact_at_the_boundary() {
        let cache = MitigationCache::new();
        let at = Utc::now() + chrono::Duration::seconds(30);
        let mut m = mitigation("cidr:192.0.2.0/24", Action::Block);
        m.expires_at = at;
        cache.upsert(m);
        let found = |now| cache.lookup("a", ip("192.0.2.1"), &none(), now).is_some();
        assert!(found(at - chrono::Duration::nanoseconds(1)));
        assert!(!found(at), "not in force at its expiry");
        assert!(!found(at + chrono::Duration::nanoseconds(1)));
        assert_eq!(cache.sweep(at - chrono::Duration::nanoseconds(1)), 0);
        assert_eq!(cache.sweep(at), 1);
        // Beyond the nanosecond range: saturated, so still compared the right way.
        let mut far = mitigation("ip:192.0.2.2", Action::Block);
        far.expires_at = DateTime::<Utc>::MAX_UTC;
        cache.upsert(far);
        assert!(
            cache
                .lookup("a", ip("192.0.2.2"), &none(), Utc::now())
                .is_some()
        );
        assert_eq!(cache.sweep(Utc::now()), 0);
    }

    #[test]
    fn ids_keep_their_text() {
        let uuid = "7c9e6679-7425-40de-944b-e07fc1f90ae7";
        let id = MitigationId::new(uuid);
        assert!(matches!(id, MitigationId::Uuid(_)));
        assert_eq!(&*id.text(), uuid);
        assert_eq!(id.to_string(), uuid);
        // Any other form stays text, so the reference printed is the id as published.
        for other in [
            "7C9E6679-7425-40DE-944B-E07FC1F90AE7",
            "7c9e6679742540de944be07fc1f90ae7",
            "manual-1",
            "",
        ] {
            let id = MitigationId::new(other);
            assert!(matches!(id, MitigationId::Text(_)), "{other}");
            assert_eq!(&*id.text(), other);
        }
        assert_ne!(
            MitigationId::new(uuid),
            MitigationId::new(&uuid.to_uppercase())
        );

        let cache = MitigationCache::new();
        let mut m = mitigation("ip:192.0.2.1", Action::Block);
        m.id = "list:tor-exits:1".into();
        cache.upsert(m);
        let hit = cache.lookup("a", ip("192.0.2.1"), &none(), Utc::now());
        assert_eq!(
            hit.map(|h| h.id.to_string()).as_deref(),
            Some("list:tor-exits:1")
        );
        assert!(cache.remove("list:tor-exits:1") && cache.is_empty());
    }

    #[test]
    fn app_names_are_shared_and_forgotten_with_their_last_entry() {
        let cache = MitigationCache::new();
        let scoped = |key: &str| {
            let mut m = mitigation(key, Action::Block);
            m.scope = Scope::App("shop".into());
            m
        };
        let (a, b) = (scoped("ip:192.0.2.1"), scoped("ip:192.0.2.2"));
        let (a_id, b_id) = (a.id.clone(), b.id.clone());
        cache.upsert(a);
        cache.upsert(b);
        assert_eq!(cache.index.read().apps.len(), 1);
        assert!(cache.remove(&a_id));
        assert_eq!(cache.index.read().apps.len(), 1, "still used by the other");
        assert_eq!(
            find(&cache, "shop", "192.0.2.2", &none()),
            Some(Action::Block)
        );
        assert!(cache.remove(&b_id));
        assert!(cache.index.read().apps.is_empty());
    }

    #[cfg(target_pointer_width = "64")]
    #[test]
    fn entries_stay_small() {
        // What a million address mitigations cost is mostly these, per hash bucket.
        assert_eq!(std::mem::size_of::<Entry>(), 64);
        assert_eq!(std::mem::size_of::<Slot>(), 64, "`Many` fits beside `One`");
        assert_eq!(std::mem::size_of::<Loc>(), 24);
        assert_eq!(std::mem::size_of::<MitigationId>(), 24);
    }

    #[test]
    fn cookie_pairs_parse_loosely() {
        let pairs: Vec<_> = cookie_pairs(" a=1;b = \"2\" ;broken; c=").collect();
        assert_eq!(pairs, vec![("a", "1"), ("b", "2"), ("c", "")]);
    }
}
