//! Live heap bytes per entry of the proxy's mitigation cache, and its lookup time.
//!
//! A counting global allocator (around the system allocator) gives the heap in use
//! exactly, without the allocator's retained pages that an RSS figure includes. The
//! program fills a `MitigationCache` with 1,000,000 address mitigations (distinct IPv4
//! addresses, block, global, uuid ids and a policy reason as the engine makes them), then
//! separately with 100,000 /24 network mitigations, each once as a snapshot (`replace`)
//! and once as delta pages (`apply`, 1,000 changes a page), and prints the heap held per
//! entry once the input changes are dropped, then the time of a lookup that finds a
//! mitigation and of one that finds none.
//!
//! Usage: `cargo run --release -p esper-bench-proxy --bin cache-memory [ADDRESSES [RANGES]]`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use esper_protocol::{Action, Change, EntityKey, Mitigation, Origin, Reason};
use esper_proxy::MitigationCache;
use http::HeaderMap;

/// Counts every byte allocated and freed through it.
struct Counting;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);
static FREED: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; only counters are
// added.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        FREED.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED.fetch_add(new_size, Ordering::Relaxed);
        FREED.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Heap bytes in use now.
fn live() -> usize {
    ALLOCATED
        .load(Ordering::Relaxed)
        .saturating_sub(FREED.load(Ordering::Relaxed))
}

const TTL: Duration = Duration::from_secs(3600);
const PAGE: usize = 1_000;
const LOOKUPS: u32 = 2_000_000;

/// A block as a policy publishes it: a fresh uuid id and a one-line reason.
fn block(entity: EntityKey) -> Mitigation {
    Mitigation::new(
        entity,
        Action::Block,
        TTL,
        Origin::Policy,
        Reason {
            policy_id: Some("login-after-failures".into()),
            summary: "12 weighted events >= 10 in 60s (POST /login 401)".into(),
        },
    )
}

/// The `i`-th address of 10.0.0.0/8 onwards.
fn addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000u32.wrapping_add(i))
}

/// The `i`-th /24 network of 100.0.0.0 onwards, as an address of it.
fn net(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x6400_0000u32.wrapping_add(i << 8))
}

fn addresses(n: u32) -> Vec<Change> {
    (0..n)
        .map(|i| Change::Upsert {
            mitigation: block(EntityKey::Ip(addr(i).into())),
        })
        .collect()
}

fn ranges(n: u32) -> Vec<Change> {
    (0..n)
        .filter_map(|i| format!("{}/24", net(i)).parse().ok())
        .map(|cidr| Change::Upsert {
            mitigation: block(EntityKey::Cidr(cidr)),
        })
        .collect()
}

/// Heap held by a cache filled with what `make` returns, per entry: as one snapshot
/// when `snapshot`, else as delta pages. Counted from before the input is made to after
/// it is consumed, so only the cache remains. The cache is returned for the lookups.
fn fill(make: impl Fn() -> Vec<Change>, snapshot: bool) -> (MitigationCache, f64) {
    let before = live();
    let cache = MitigationCache::new();
    let changes = make();
    let n = changes.len();
    let now = Utc::now();
    if snapshot {
        cache.replace(changes, now);
    } else {
        let mut changes = changes.into_iter();
        loop {
            let page: Vec<Change> = changes.by_ref().take(PAGE).collect();
            if page.is_empty() {
                break;
            }
            cache.apply(page, now);
        }
    }
    let held = live().saturating_sub(before);
    assert_eq!(cache.len(), n, "every mitigation is cached");
    (cache, held as f64 / n as f64)
}

/// Input changes' own heap (mitigations included), for reference.
fn input_bytes(make: impl FnOnce() -> Vec<Change>) -> (Vec<Change>, usize) {
    let before = live();
    let changes = make();
    let bytes = live() - before;
    (changes, bytes)
}

/// Mean time of one lookup over `LOOKUPS` addresses drawn by `pick`, and how many hit.
fn time_lookups(cache: &MitigationCache, pick: impl Fn(u32) -> IpAddr) -> (f64, u32) {
    let headers = HeaderMap::new();
    let now = Utc::now();
    // A fixed pseudo-random order, so consecutive lookups do not share cache lines.
    let mut x: u32 = 0x9e37_79b9;
    let mut hits = 0;
    let start = Instant::now();
    for _ in 0..LOOKUPS {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let ip = pick(x);
        if black_box(cache.lookup("default", black_box(ip), &headers, now)).is_some() {
            hits += 1;
        }
    }
    let ns = start.elapsed().as_nanos() as f64 / f64::from(LOOKUPS);
    (ns, hits)
}

fn report(label: &str, n: u32, make: impl Fn() -> Vec<Change>, hit: impl Fn(u32) -> IpAddr) {
    let (changes, input) = input_bytes(&make);
    drop(changes);
    println!(
        "{label}: {n} entries; the input changes alone take {:.0} B per entry",
        input as f64 / f64::from(n)
    );
    let (cache, snapshot) = fill(&make, true);
    println!("  snapshot (replace): {snapshot:.1} B per entry");
    drop(cache);
    let (cache, deltas) = fill(&make, false);
    println!("  delta pages of {PAGE} (apply): {deltas:.1} B per entry");
    let (hit_ns, hits) = time_lookups(&cache, &hit);
    assert_eq!(hits, LOOKUPS, "every hit lookup finds its mitigation");
    let (miss_ns, misses_found) = time_lookups(&cache, |x| {
        IpAddr::V4(Ipv4Addr::from(0xc000_0000 | (x & 0x00ff_ffff)))
    });
    assert_eq!(misses_found, 0, "no miss lookup finds a mitigation");
    println!("  lookup: hit {hit_ns:.0} ns, miss {miss_ns:.0} ns ({LOOKUPS} lookups each)");
}

fn main() {
    let arg = |i: usize, default: u32| {
        std::env::args()
            .nth(i)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (n_addr, n_ranges) = (arg(1, 1_000_000).max(1), arg(2, 100_000).max(1));
    report(
        "addresses",
        n_addr,
        || addresses(n_addr),
        |x| IpAddr::V4(addr(x % n_addr)),
    );
    report(
        "/24 networks",
        n_ranges,
        || ranges(n_ranges),
        |x| IpAddr::V4(Ipv4Addr::from(u32::from(net(x % n_ranges)) | (x >> 24))),
    );
}
