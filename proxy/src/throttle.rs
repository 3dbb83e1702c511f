//! Token buckets for throttle mitigations: one bucket per mitigation (so per throttled
//! entity), refilled at the mitigation's rate up to its burst, in a bounded map.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Retry-After for a throttle whose rate is zero: the bucket never refills.
const NO_REFILL_RETRY: Duration = Duration::from_secs(60);
/// The longest Retry-After: a rate too small to refill within it (published as any
/// positive number) waits this long, rather than a time no client would honour.
const MAX_RETRY: Duration = Duration::from_secs(86_400);

struct Bucket {
    tokens: f64,
    last: Instant,
    rate: f64,
    burst: f64,
}

impl Bucket {
    /// Would the bucket be full by `now`? Then dropping it changes nothing.
    fn refilled(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * self.rate >= self.burst
    }

    /// Refills for the time since it was last used and takes a token: `Ok` when there
    /// was one, otherwise `Err(retry_after)`.
    fn take(&mut self, rate: f64, burst: f64, now: Instant) -> Result<(), Duration> {
        // The mitigation may have been republished with other parameters.
        self.rate = rate;
        self.burst = burst;
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        if rate == 0.0 {
            return Err(NO_REFILL_RETRY);
        }
        let wait = Duration::try_from_secs_f64((1.0 - self.tokens) / rate).unwrap_or(MAX_RETRY);
        Err(wait.min(MAX_RETRY))
    }
}

/// Per-entity token buckets, at most `capacity` of them.
pub struct Throttles {
    buckets: Mutex<HashMap<String, Bucket>>,
    capacity: usize,
}

impl Throttles {
    /// Buckets for at most `capacity` entities.
    pub fn new(capacity: usize) -> Throttles {
        Throttles {
            buckets: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    /// Takes a token from `key`'s bucket (`rate` per second, holding up to `burst`):
    /// `Ok` when there was one, otherwise `Err(retry_after)`.
    pub fn take(&self, key: &str, rate: f64, burst: u32, now: Instant) -> Result<(), Duration> {
        let rate = if rate.is_finite() && rate > 0.0 {
            rate
        } else {
            0.0
        };
        let burst = f64::from(burst.max(1));
        let mut buckets = self.buckets.lock();
        // Looked up by `&str`, so only a new bucket allocates its key.
        if let Some(bucket) = buckets.get_mut(key) {
            return bucket.take(rate, burst, now);
        }
        if buckets.len() >= self.capacity {
            evict(&mut buckets, self.capacity, now);
        }
        let mut bucket = Bucket {
            tokens: burst,
            last: now,
            rate,
            burst,
        };
        let taken = bucket.take(rate, burst, now);
        buckets.insert(key.to_string(), bucket);
        taken
    }

    /// Buckets held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.buckets.lock().len()
    }
}

/// Makes room: drops buckets that would be full again by now (they would start full
/// anyway), and if that frees nothing, drops them all, which at worst grants every
/// throttled entity one more burst.
fn evict(buckets: &mut HashMap<String, Bucket>, capacity: usize, now: Instant) {
    buckets.retain(|_, b| !b.refilled(now));
    if buckets.len() >= capacity {
        tracing::warn!(
            held = buckets.len(),
            "throttle bucket limit reached; resetting all buckets"
        );
        buckets.clear();
    }
}

/// Whole seconds for a `Retry-After` header: rounded up, at least 1.
pub fn retry_after_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_refills_at_the_rate() {
        let t = Throttles::new(10);
        let start = Instant::now();
        for _ in 0..3 {
            assert!(t.take("m1", 2.0, 3, start).is_ok());
        }
        let wait = t.take("m1", 2.0, 3, start).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        assert_eq!(retry_after_secs(wait), 1);
        // Half a second later one token is back, and only one.
        let later = start + Duration::from_millis(500);
        assert!(t.take("m1", 2.0, 3, later).is_ok());
        assert!(t.take("m1", 2.0, 3, later).is_err());
        // Other entities have their own bucket.
        assert!(t.take("m2", 2.0, 3, later).is_ok());
    }

    #[test]
    fn zero_rate_never_refills() {
        let t = Throttles::new(10);
        let now = Instant::now();
        assert!(t.take("m", 0.0, 1, now).is_ok());
        let wait = t
            .take("m", 0.0, 1, now + Duration::from_secs(3600))
            .unwrap_err();
        assert_eq!(wait, NO_REFILL_RETRY);
    }

    #[test]
    fn a_vanishing_rate_waits_at_most_a_day() {
        let t = Throttles::new(10);
        let now = Instant::now();
        for rate in [1e-30, f64::MIN_POSITIVE, 1e-6] {
            let key = format!("m{rate}");
            assert!(t.take(&key, rate, 1, now).is_ok());
            assert_eq!(t.take(&key, rate, 1, now).unwrap_err(), MAX_RETRY);
        }
    }

    #[test]
    fn the_map_stays_bounded() {
        let t = Throttles::new(4);
        let now = Instant::now();
        for i in 0..100 {
            let _ = t.take(&format!("m{i}"), 1.0, 1, now + Duration::from_secs(i));
            assert!(t.len() <= 4, "{} buckets", t.len());
        }
    }
}
