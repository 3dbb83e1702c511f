//! A sliding window of weighted counts in event time, kept as sparse sub-buckets.
//!
//! Precision: the window is cut into `buckets` sub-buckets of `bucket_ms` each (about
//! 1/30 of the window). The count at any moment is the sum of the sub-buckets no older
//! than `buckets - 1` before the newest one seen, so it covers between
//! `window - bucket_ms` and `window` of event time: an event drops out of the count up to
//! one sub-bucket (~3%) early, never late. Only non-empty sub-buckets are stored, so an
//! entity seen once costs one entry.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

/// How many sub-buckets a window is cut into.
pub const SUB_BUCKETS: u64 = 30;

/// The shape of one policy's windows and what firing means.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WindowParams {
    /// Width of one sub-bucket, milliseconds (at least 1).
    pub bucket_ms: i64,
    /// Sub-buckets per window.
    pub buckets: i64,
    /// The policy fires when the count reaches this.
    pub threshold: f64,
    /// How long a decision stands; no new decision for the same entity until then.
    pub cooldown_ms: i64,
}

impl WindowParams {
    /// Parameters for a window, a threshold and a mitigation ttl.
    pub fn new(window: Duration, threshold: f64, ttl: Duration) -> WindowParams {
        let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX).max(1);
        let bucket_ms = (window_ms / SUB_BUCKETS as i64).max(1);
        WindowParams {
            bucket_ms,
            // Rounded down, so the sub-buckets never span more than the window (a 10s
            // window is 30 of 333 ms, not 31).
            buckets: (window_ms / bucket_ms).max(1),
            threshold,
            cooldown_ms: i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX),
        }
    }

    /// The window's length in milliseconds.
    pub fn window_ms(&self) -> i64 {
        self.bucket_ms.saturating_mul(self.buckets)
    }

    /// The sub-bucket an event time falls in.
    pub fn bucket_of(&self, at_ms: i64) -> i64 {
        at_ms.div_euclid(self.bucket_ms)
    }

    /// Has `count` reached the threshold? (Tolerates float rounding of weighted sums.)
    pub fn reached(&self, count: f64) -> bool {
        reached(count, self.threshold)
    }
}

/// Has `value` reached `threshold`, allowing for float rounding of weighted sums?
pub fn reached(value: f64, threshold: f64) -> bool {
    value >= threshold - 1e-9 * threshold.max(1.0)
}

/// Most distinct values one entity's [`DistinctWindow`] holds.
pub const DISTINCT_CAP: usize = crate::policy::MAX_DISTINCT;

/// Up to this many values a [`DistinctWindow`] is a plain list searched in order
/// (faster than hashing at that size, and half the memory); beyond, a hash map.
const SMALL_DISTINCT: usize = 32;

/// Value fingerprint -> newest sub-bucket it was seen in.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
enum Seen {
    Small(Vec<(u64, i64)>),
    Large(HashMap<u64, i64, foldhash::fast::RandomState>),
}

impl Default for Seen {
    fn default() -> Seen {
        Seen::Small(Vec::new())
    }
}

impl Seen {
    fn get(&self, value: u64) -> Option<i64> {
        match self {
            Seen::Small(v) => v.iter().find(|(x, _)| *x == value).map(|(_, b)| *b),
            Seen::Large(m) => m.get(&value).copied(),
        }
    }

    fn insert(&mut self, value: u64, bucket: i64) {
        match self {
            Seen::Small(v) => match v.iter().position(|(x, _)| *x == value) {
                Some(i) => v[i].1 = bucket,
                None if v.len() < SMALL_DISTINCT => v.push((value, bucket)),
                None => {
                    let mut m: HashMap<u64, i64, _> = v.drain(..).collect();
                    m.insert(value, bucket);
                    *self = Seen::Large(m);
                }
            },
            Seen::Large(m) => {
                m.insert(value, bucket);
            }
        }
    }

    fn remove(&mut self, value: u64) {
        match self {
            Seen::Small(v) => {
                if let Some(i) = v.iter().position(|(x, _)| *x == value) {
                    v.swap_remove(i);
                }
            }
            Seen::Large(m) => {
                m.remove(&value);
            }
        }
    }

    fn retain(&mut self, keep: impl Fn(i64) -> bool) {
        match self {
            Seen::Small(v) => v.retain(|(_, b)| keep(*b)),
            Seen::Large(m) => m.retain(|_, b| keep(*b)),
        }
    }

    /// How many values were seen after sub-bucket `after`.
    fn count_after(&self, after: i64) -> usize {
        match self {
            Seen::Small(v) => v.iter().filter(|(_, b)| *b > after).count(),
            Seen::Large(m) => m.values().filter(|b| **b > after).count(),
        }
    }

    /// The value seen longest ago, other than `except`.
    fn oldest_except(&self, except: u64) -> Option<u64> {
        let pick = |it: &mut dyn Iterator<Item = (u64, i64)>| {
            it.filter(|(v, _)| *v != except)
                .min_by_key(|(_, b)| *b)
                .map(|(v, _)| v)
        };
        match self {
            Seen::Small(v) => pick(&mut v.iter().copied()),
            Seen::Large(m) => pick(&mut m.iter().map(|(v, b)| (*v, *b))),
        }
    }

    fn len(&self) -> usize {
        match self {
            Seen::Small(v) => v.len(),
            Seen::Large(m) => m.len(),
        }
    }
}

/// The distinct values of a field seen in one entity's window: value fingerprint ->
/// newest sub-bucket it was seen in.
///
/// Precision: exact (up to 64-bit fingerprint collisions, about one in 10^15 pairs) up
/// to [`DISTINCT_CAP`] values, with the same sub-bucket edge as [`Window`]. Beyond the
/// cap the oldest value is forgotten, so the count stays at the cap; thresholds above
/// the cap are refused, so a policy still fires. Memory: 16 bytes per value up to 32
/// values, about 24 beyond.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DistinctWindow {
    seen: Seen,
    head: Option<i64>,
}

impl DistinctWindow {
    /// Records `value` in sub-bucket `bucket`. Returns the distinct count after it and
    /// the value's previous bucket (to undo), or `None` for a late event.
    pub fn add(&mut self, value: u64, bucket: i64, p: &WindowParams) -> Option<(f64, Option<i64>)> {
        let head = self.head.map_or(bucket, |h| h.max(bucket));
        if bucket <= head - p.buckets {
            return None;
        }
        if self.head.is_some_and(|h| h < head) {
            self.seen.retain(|b| b > head - p.buckets);
        }
        self.head = Some(head);
        let prev = self.seen.get(value);
        self.seen
            .insert(value, prev.map_or(bucket, |b| b.max(bucket)));
        if self.seen.len() > DISTINCT_CAP {
            // Only reached with a large map: at most once per added value.
            if let Some(v) = self.seen.oldest_except(value) {
                self.seen.remove(v);
            }
        }
        Some((self.count(), prev))
    }

    /// Takes back an [`add`](Self::add): restores the value's previous bucket.
    pub fn undo(&mut self, value: u64, prev: Option<i64>) {
        match prev {
            Some(b) => self.seen.insert(value, b),
            None => self.seen.remove(value),
        }
    }

    pub fn count(&self) -> f64 {
        self.seen.len() as f64
    }

    /// The distinct count as of sub-bucket `bucket` (or the newest seen, if later).
    pub fn count_at(&self, bucket: i64, p: &WindowParams) -> f64 {
        let head = self.head.map_or(bucket, |h| h.max(bucket));
        self.seen.count_after(head - p.buckets) as f64
    }

    pub fn is_empty(&self) -> bool {
        self.seen.len() == 0
    }
}

/// One entity's window: `(sub-bucket index, weight)` pairs, oldest first.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Window {
    /// Stored with each weight's bits, so that a stored window reads back exactly (a
    /// decimal form can come back one unit in the last place off).
    #[serde(with = "exact_weights")]
    buckets: VecDeque<(i64, f64)>,
}

mod exact_weights {
    use std::collections::VecDeque;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &VecDeque<(i64, f64)>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(b.iter().map(|(k, w)| (*k, w.to_bits())))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<VecDeque<(i64, f64)>, D::Error> {
        let v = Vec::<(i64, u64)>::deserialize(d)?;
        Ok(v.into_iter().map(|(k, w)| (k, f64::from_bits(w))).collect())
    }
}

impl Window {
    /// Adds `weight` to sub-bucket `bucket`; the count in the window after that, or
    /// `None` when the bucket is already older than the window (a late event).
    pub fn add(&mut self, bucket: i64, weight: f64, p: &WindowParams) -> Option<f64> {
        let head = self.head().map_or(bucket, |h| h.max(bucket));
        if bucket <= head - p.buckets {
            return None;
        }
        match self.buckets.binary_search_by_key(&bucket, |(b, _)| *b) {
            Ok(i) => self.buckets[i].1 += weight,
            Err(i) => self.buckets.insert(i, (bucket, weight)),
        }
        while self
            .buckets
            .front()
            .is_some_and(|(b, _)| *b <= head - p.buckets)
        {
            self.buckets.pop_front();
        }
        Some(self.count())
    }

    /// Takes back a weight added earlier (a batch that was rolled back). A bucket that
    /// has since left the window is already gone, which is the same result.
    pub fn remove(&mut self, bucket: i64, weight: f64) {
        if let Ok(i) = self.buckets.binary_search_by_key(&bucket, |(b, _)| *b) {
            self.buckets[i].1 -= weight;
            if self.buckets[i].1 <= 1e-9 {
                self.buckets.remove(i);
            }
        }
    }

    /// The weighted count in the window as of sub-bucket `bucket` (or the newest seen,
    /// if later), without adding anything.
    pub fn count_at(&self, bucket: i64, p: &WindowParams) -> f64 {
        let head = self.head().map_or(bucket, |h| h.max(bucket));
        self.buckets
            .iter()
            .filter(|(b, _)| *b > head - p.buckets)
            .map(|(_, w)| w)
            .sum()
    }

    /// The weighted count in the window.
    pub fn count(&self) -> f64 {
        self.buckets.iter().map(|(_, w)| w).sum()
    }

    /// The newest sub-bucket seen.
    pub fn head(&self) -> Option<i64> {
        self.buckets.back().map(|(b, _)| *b)
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> WindowParams {
        WindowParams::new(Duration::from_secs(60), 10.0, Duration::from_secs(300))
    }

    fn add(w: &mut Window, p: &WindowParams, at_ms: i64, weight: f64) -> Option<f64> {
        w.add(p.bucket_of(at_ms), weight, p)
    }

    #[test]
    fn sixty_seconds_are_thirty_buckets_of_two() {
        let p = params();
        assert_eq!((p.bucket_ms, p.buckets, p.window_ms()), (2000, 30, 60_000));
        let odd = WindowParams::new(Duration::from_millis(1001), 1.0, Duration::from_secs(1));
        // Never late: the sub-buckets span no more than the window.
        assert_eq!((odd.bucket_ms, odd.buckets), (33, 30));
        assert!(odd.window_ms() <= 1001 && odd.window_ms() > 1001 - 2 * 33);
        let ten = WindowParams::new(Duration::from_secs(10), 1.0, Duration::from_secs(1));
        assert_eq!(
            (ten.bucket_ms, ten.buckets, ten.window_ms()),
            (333, 30, 9990)
        );
    }

    #[test]
    fn counts_inside_the_window_and_forgets_after_it() {
        let p = params();
        let mut w = Window::default();
        let t0 = 1_000_000_000;
        for i in 0..5 {
            assert_eq!(add(&mut w, &p, t0 + i * 10_000, 1.0), Some(i as f64 + 1.0));
        }
        // 59s after the first event it still counts; a minute later it has expired.
        assert_eq!(add(&mut w, &p, t0 + 59_000, 1.0), Some(6.0));
        assert_eq!(add(&mut w, &p, t0 + 60_000, 1.0), Some(6.0));
        assert_eq!(add(&mut w, &p, t0 + 200_000, 1.0), Some(1.0));
        assert_eq!(w.buckets.len(), 1);
    }

    #[test]
    fn bucket_edges_and_late_events() {
        let p = params();
        let mut w = Window::default();
        let t0 = 1_000_000_000; // a multiple of the bucket width
        add(&mut w, &p, t0, 1.0);
        add(&mut w, &p, t0 + 1_999, 1.0); // same sub-bucket
        assert_eq!(w.buckets.len(), 1);
        // 29 buckets later the first bucket is still inside, 30 later it is out.
        assert_eq!(add(&mut w, &p, t0 + 29 * 2_000, 1.0), Some(3.0));
        assert_eq!(add(&mut w, &p, t0 + 30 * 2_000, 1.0), Some(2.0));
        // An event older than the window is ignored; one inside it counts.
        assert_eq!(add(&mut w, &p, t0, 1.0), None);
        assert_eq!(add(&mut w, &p, t0 + 10_000, 1.0), Some(3.0));
    }

    #[test]
    fn weights_add_and_can_be_taken_back() {
        let p = params();
        let mut w = Window::default();
        let b = p.bucket_of(5_000);
        assert_eq!(w.add(b, 4.0, &p), Some(4.0));
        assert_eq!(w.add(b, 0.5, &p), Some(4.5));
        w.remove(b, 4.5);
        assert!(w.is_empty());
        assert!(p.reached(10.0) && !p.reached(9.99));
        let tenths = (0..100).map(|_| 0.1).sum::<f64>();
        assert!(p.reached(tenths), "{tenths}");
    }
}
