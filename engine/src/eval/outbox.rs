//! The memory backend's outbox for the decision log: in the process, like the state it
//! sits beside, with the same numbering and lease as the shared backends' so the worker
//! delivers every backend's outbox the same way.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::state::{Claim, LogAppend, Logged};

#[derive(Default)]
pub(crate) struct MemoryOutbox {
    entries: VecDeque<(u64, String)>,
    last: u64,
    lease: Option<(String, Instant)>,
}

impl MemoryOutbox {
    pub fn append(&mut self, log: LogAppend<'_>) -> Logged {
        if log.entries.is_empty() {
            return Logged::default();
        }
        for e in log.entries {
            self.last += 1;
            self.entries.push_back((self.last, e.clone()));
        }
        let dropped = self.entries.len().saturating_sub(log.capacity.max(1));
        self.entries.drain(..dropped);
        Logged {
            dropped,
            pending: self.entries.len(),
        }
    }

    /// The lease's holder, if it is someone other than `owner` and still running.
    fn held_by_other(&self, owner: &str) -> Option<&str> {
        match &self.lease {
            Some((holder, until)) if holder != owner && *until > Instant::now() => {
                Some(holder.as_str())
            }
            _ => None,
        }
    }

    pub fn claim(&mut self, owner: &str, lease: Duration, limit: usize) -> Claim {
        let pending = self.entries.len();
        if let Some(by) = self.held_by_other(owner) {
            return Claim::Held {
                by: by.to_string(),
                pending,
            };
        }
        self.lease = Some((owner.to_string(), Instant::now() + lease));
        Claim::Mine {
            pending,
            entries: self.entries.iter().take(limit).cloned().collect(),
        }
    }

    pub fn ack(&mut self, owner: &str, delivered: &[u64], lease: Duration) -> (bool, usize) {
        let mine = matches!(&self.lease, Some((holder, until)) if holder == owner && *until > Instant::now());
        if mine {
            self.lease = Some((owner.to_string(), Instant::now() + lease));
            // The delivered records are the head, as read (see `outbox_ack`).
            let mut delivered: HashSet<u64> = delivered.iter().copied().collect();
            while self
                .entries
                .front()
                .is_some_and(|(n, _)| delivered.remove(n))
            {
                self.entries.pop_front();
            }
        }
        (mine, self.entries.len())
    }

    pub fn release(&mut self, owner: &str) {
        if self
            .lease
            .as_ref()
            .is_some_and(|(holder, _)| holder == owner)
        {
            self.lease = None;
        }
    }
}
