//! The time a worker evaluates by.
//!
//! Workers sharing a Redis or PostgreSQL state compare times they each wrote there:
//! window heads, cooldowns, a batch's lease, an entity's last touch. Their own clocks
//! may disagree by seconds (a host without time sync, a VM resumed from a pause), and
//! then a worker behind counts its events as late, or one ahead sweeps the others'
//! batches before their leases end. So a worker over shared state counts time by the
//! store's clock: the last reading, carried forward by this host's monotonic clock (so a
//! step of the host's wall clock between readings changes nothing). A state of one
//! process alone has no other clock to agree with, and the host's wall clock is used.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use parking_lot::Mutex;

use super::{StateBackend, StateError};

/// A reading whose round trip took longer than this says too little about the time.
const MAX_ROUND_TRIP: Duration = Duration::from_secs(1);

/// What a [`StateClock::sync`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reading {
    /// The state has no clock of its own: the host's is used.
    Local,
    /// The store's clock, this many milliseconds ahead of the host's (behind if
    /// negative); it is used from now on.
    Offset(i64),
    /// The round trip took this long: the reading was not used (the last one stays).
    Slow(Duration),
}

/// The store's clock as last read: `ms` at the host's monotonic `at`.
#[derive(Clone, Copy)]
struct Anchor {
    at: Instant,
    ms: i64,
    offset_ms: i64,
}

/// The shared store's clock, or the host's.
pub struct StateClock {
    host: fn() -> DateTime<Utc>,
    anchor: Mutex<Option<Anchor>>,
}

impl Default for StateClock {
    fn default() -> Self {
        StateClock::with_host_clock(Utc::now)
    }
}

impl StateClock {
    /// A clock over `host` instead of the system's wall clock (to test a skewed host).
    pub fn with_host_clock(host: fn() -> DateTime<Utc>) -> Self {
        StateClock {
            host,
            anchor: Mutex::new(None),
        }
    }

    /// Now, by the store's clock once read, else by the host's.
    pub fn now(&self) -> DateTime<Utc> {
        let Some(a) = *self.anchor.lock() else {
            return (self.host)();
        };
        let elapsed = i64::try_from(a.at.elapsed().as_millis()).unwrap_or(i64::MAX);
        DateTime::from_timestamp_millis(a.ms.saturating_add(elapsed)).unwrap_or_else(self.host)
    }

    /// How far the store's clock was ahead of the host's at the last reading, in
    /// milliseconds (0 before any).
    pub fn offset_ms(&self) -> i64 {
        self.anchor.lock().map_or(0, |a| a.offset_ms)
    }

    /// Reads the store's clock, taken to be the time at the middle of the query's round
    /// trip.
    pub async fn sync(&self, state: &dyn StateBackend) -> Result<Reading, StateError> {
        let Some(t) = state.clock().await? else {
            return Ok(Reading::Local);
        };
        let round_trip = t.received.saturating_duration_since(t.sent);
        if round_trip > MAX_ROUND_TRIP {
            return Ok(Reading::Slow(round_trip));
        }
        let at = t.sent + round_trip / 2;
        let host_then =
            (self.host)().timestamp_millis() - i64::try_from(at.elapsed().as_millis()).unwrap_or(0);
        let offset_ms = t.ms.saturating_sub(host_then);
        *self.anchor.lock() = Some(Anchor {
            at,
            ms: t.ms,
            offset_ms,
        });
        Ok(Reading::Offset(offset_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::MemoryState;

    fn behind() -> DateTime<Utc> {
        Utc::now() - chrono::Duration::minutes(5)
    }

    #[tokio::test]
    async fn a_state_of_this_process_keeps_the_host_clock() {
        let clock = StateClock::with_host_clock(behind);
        let state = MemoryState::new(Duration::from_secs(60), 1000);
        assert_eq!(clock.sync(&state).await.unwrap(), Reading::Local);
        assert_eq!(clock.offset_ms(), 0);
        let lag = Utc::now() - clock.now();
        assert!(lag > chrono::Duration::minutes(4), "{lag}");
    }
}
