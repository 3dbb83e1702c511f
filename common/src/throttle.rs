//! Log lines for a failure that repeats on every request (a store down under load):
//! one a request would bury everything else in the log, none would hide the outage.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Lets one occurrence through per period and counts the others.
pub struct Throttled {
    period_secs: u64,
    /// When one was last let through, seconds since the epoch (0: never).
    last: AtomicU64,
    skipped: AtomicU64,
}

impl Throttled {
    pub const fn new(period: Duration) -> Throttled {
        Throttled {
            period_secs: period.as_secs(),
            last: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when this occurrence is to be logged, `n` being how many were not since
    /// the last one logged; `None` when it is one of those.
    pub fn admit(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last.load(Ordering::Relaxed);
        if last != 0 && now < last.saturating_add(self.period_secs) {
            self.skipped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        // One of several threads wins the period; the others count as skipped.
        if self
            .last
            .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            self.skipped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.skipped.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_per_period_with_the_count_of_the_rest() {
        let t = Throttled::new(Duration::from_secs(3600));
        assert_eq!(t.admit(), Some(0));
        for _ in 0..5 {
            assert_eq!(t.admit(), None);
        }
        // As if the period had passed.
        t.last.store(1, Ordering::Relaxed);
        assert_eq!(t.admit(), Some(5));
        assert_eq!(t.admit(), None);
    }
}
