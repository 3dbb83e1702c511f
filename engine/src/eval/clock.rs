//! The time a worker evaluates by.
//!
//! Workers sharing a Redis or PostgreSQL state compare times they each wrote there:
//! window heads, cooldowns, a batch's lease, an entity's last touch. Their own clocks
//! may disagree by seconds (a host without time sync, a VM resumed from a pause), and
//! then a worker behind counts its events as late, or one ahead sweeps the others'
//! batches before their leases end. So a worker over shared state counts time by the
//! store's clock: the host's, moved by the offset read at the last [`StateClock::sync`].
//! A state of one process alone has no other clock to agree with.

use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, Utc};

use super::{StateBackend, StateError};

/// A reading whose round trip took longer than this says too little about the offset.
const MAX_ROUND_TRIP_MS: i64 = 1_000;

/// The host's clock moved by the shared store's offset.
pub struct StateClock {
    offset_ms: AtomicI64,
    host: fn() -> DateTime<Utc>,
}

impl Default for StateClock {
    fn default() -> Self {
        StateClock::with_host_clock(Utc::now)
    }
}

impl StateClock {
    /// A clock over `host` instead of the system clock (to test a skewed host).
    pub fn with_host_clock(host: fn() -> DateTime<Utc>) -> Self {
        StateClock {
            offset_ms: AtomicI64::new(0),
            host,
        }
    }

    /// Now, by the store's clock as last read.
    pub fn now(&self) -> DateTime<Utc> {
        let offset = chrono::Duration::milliseconds(self.offset_ms.load(Ordering::Relaxed));
        let host = (self.host)();
        host.checked_add_signed(offset).unwrap_or(host)
    }

    /// How far the store's clock is ahead of the host's, in milliseconds.
    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::Relaxed)
    }

    /// Reads the store's clock and keeps its offset from the host's, measured against
    /// the middle of the round trip. Returns the offset, or `None` when the state has no
    /// clock of its own, or the reading took too long to trust (the last offset stays).
    pub async fn sync(&self, state: &dyn StateBackend) -> Result<Option<i64>, StateError> {
        let before = (self.host)().timestamp_millis();
        let Some(store) = state.clock_ms().await? else {
            return Ok(None);
        };
        let after = (self.host)().timestamp_millis();
        let round_trip = after.saturating_sub(before);
        if !(0..=MAX_ROUND_TRIP_MS).contains(&round_trip) {
            return Ok(None);
        }
        let offset = store.saturating_sub(before + round_trip / 2);
        self.offset_ms.store(offset, Ordering::Relaxed);
        Ok(Some(offset))
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
        let state = MemoryState::new(std::time::Duration::from_secs(60), 1000);
        assert_eq!(clock.sync(&state).await.unwrap(), None);
        assert_eq!(clock.offset_ms(), 0);
        let lag = Utc::now() - clock.now();
        assert!(lag > chrono::Duration::minutes(4), "{lag}");
    }
}
