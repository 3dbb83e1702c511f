//! The in-memory queue: the embedded default (`esper dev`, single-node deployments).
//! Items live in one mutex-guarded state; waiting claims sleep on a `Notify` that every
//! enqueue wakes, or until the next lease expires.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use esper_protocol::RequestEvent;
use esper_protocol::ingestion::{ClaimedItem, ConsumerStatus, ItemInfo, ItemState, QueueStatus};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{ClaimSpec, Enqueued, QueueStore, Refusal, StoreError};

/// Consumers with nothing leased are forgotten after this long without a claim or ack.
const CONSUMER_FORGET_AFTER: Duration = Duration::from_secs(600);
/// Most dead letters kept; the oldest go first.
const DEAD_LETTER_CAP: usize = 10_000;

/// A bounded FIFO work queue with leases, held in memory.
pub struct MemoryQueue {
    capacity: usize,
    max_attempts: u32,
    state: Mutex<State>,
    /// Woken on every enqueue, so long-polling claims see new items at once.
    arrivals: Notify,
}

struct Entry {
    seq: u64,
    event: RequestEvent,
    enqueued_at: DateTime<Utc>,
    attempts: u32,
}

struct Lease {
    entry: Entry,
    consumer: String,
    expires: Instant,
    expires_at: DateTime<Utc>,
}

struct DeadLetter {
    entry: Entry,
    consumer: String,
}

struct Consumer {
    leased: u64,
    last_seen: DateTime<Utc>,
    seen: Instant,
}

#[derive(Default)]
struct State {
    next_seq: u64,
    /// Waiting items by sequence number: the first key is the oldest.
    pending: BTreeMap<u64, Entry>,
    leased: BTreeMap<u64, Lease>,
    /// Items whose lease expired after their last allowed attempt, oldest id first.
    dead: BTreeMap<u64, DeadLetter>,
    /// Lease expiry index, earliest first.
    expiries: BTreeSet<(Instant, u64)>,
    /// Leases that ran out, by sequence: still their consumers' (in `leased`) until a
    /// claim hands them out again, oldest first, as the Redis queue does.
    lapsed: BTreeSet<u64>,
    consumers: HashMap<String, Consumer>,
    paused: bool,
    ingested_total: u64,
    acked_total: u64,
    reclaimed_total: u64,
    rejected_total: u64,
    dead_lettered_total: u64,
}

impl MemoryQueue {
    /// An empty queue holding at most `capacity` items (waiting and leased), moving
    /// items to the dead-letter list after [`DEFAULT_MAX_ATTEMPTS`](crate::config::DEFAULT_MAX_ATTEMPTS) claims.
    pub fn new(capacity: usize) -> MemoryQueue {
        MemoryQueue::with_max_attempts(capacity, crate::config::DEFAULT_MAX_ATTEMPTS)
    }

    /// Like [`new`](MemoryQueue::new): an item whose lease expires after its
    /// `max_attempts`-th claim goes to the dead-letter list instead of back to the queue.
    pub fn with_max_attempts(capacity: usize, max_attempts: u32) -> MemoryQueue {
        MemoryQueue {
            capacity,
            max_attempts: max_attempts.max(1),
            state: Mutex::new(State::default()),
            arrivals: Notify::new(),
        }
    }
}

fn to_chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

fn item_id(seq: u64) -> String {
    seq.to_string()
}

fn parse_id(id: &str) -> Option<u64> {
    id.parse().ok()
}

impl State {
    fn held(&self) -> usize {
        self.pending.len() + self.leased.len()
    }

    /// Marks every expired lease lapsed, or moves it to the dead-letter list once it
    /// has had `max_attempts` claims.
    fn lapse_expired(&mut self, now: Instant, max_attempts: u32) {
        while let Some(&(expires, seq)) = self.expiries.first() {
            if expires > now {
                break;
            }
            self.expiries.pop_first();
            let spent = self
                .leased
                .get(&seq)
                .is_some_and(|l| l.entry.attempts >= max_attempts);
            if !spent {
                if self.leased.contains_key(&seq) {
                    self.lapsed.insert(seq);
                }
                continue;
            }
            if let Some(lease) = self.leased.remove(&seq) {
                self.release(&lease.consumer);
                self.dead.insert(
                    seq,
                    DeadLetter {
                        entry: lease.entry,
                        consumer: lease.consumer,
                    },
                );
                self.dead_lettered_total += 1;
                while self.dead.len() > DEAD_LETTER_CAP {
                    self.dead.pop_first();
                }
            }
        }
    }

    /// Items a claim can take: waiting ones and lapsed leases.
    fn available(&self) -> usize {
        self.pending.len() + self.lapsed.len()
    }

    /// The next item to hand out: the oldest lapsed lease (taken from its consumer),
    /// else the oldest waiting item. Lapsed leases are older than every waiting item,
    /// since items are handed out in order.
    fn next_to_hand_out(&mut self) -> Option<(u64, Entry)> {
        while let Some(seq) = self.lapsed.pop_first() {
            if let Some(lease) = self.leased.remove(&seq) {
                self.release(&lease.consumer);
                self.reclaimed_total += 1;
                return Some((seq, lease.entry));
            }
        }
        self.pending.pop_first()
    }

    fn next_expiry(&self) -> Option<Instant> {
        self.expiries.first().map(|(t, _)| *t)
    }

    fn release(&mut self, consumer: &str) {
        if let Some(c) = self.consumers.get_mut(consumer) {
            c.leased = c.leased.saturating_sub(1);
        }
    }

    fn touch(&mut self, consumer: &str, now: Instant) -> &mut Consumer {
        let c = self
            .consumers
            .entry(consumer.to_string())
            .or_insert_with(|| Consumer {
                leased: 0,
                last_seen: Utc::now(),
                seen: now,
            });
        c.last_seen = Utc::now();
        c.seen = now;
        c
    }

    fn forget_idle_consumers(&mut self, now: Instant) {
        self.consumers
            .retain(|_, c| c.leased > 0 || now.duration_since(c.seen) < CONSUMER_FORGET_AFTER);
    }

    fn lease(&mut self, spec: &ClaimSpec, now: Instant) -> Vec<ClaimedItem> {
        let expires = now + spec.lease;
        let expires_at = Utc::now()
            .checked_add_signed(to_chrono(spec.lease))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        let mut out = Vec::with_capacity(spec.max.min(self.available()));
        while out.len() < spec.max {
            let Some((seq, mut entry)) = self.next_to_hand_out() else {
                break;
            };
            entry.attempts = entry.attempts.saturating_add(1);
            out.push(ClaimedItem {
                item_id: item_id(seq),
                attempts: entry.attempts,
                event: entry.event.clone(),
            });
            self.expiries.insert((expires, seq));
            self.leased.insert(
                seq,
                Lease {
                    entry,
                    consumer: spec.consumer.clone(),
                    expires,
                    expires_at,
                },
            );
        }
        self.touch(&spec.consumer, now).leased += out.len() as u64;
        out
    }

    fn pending_info(entry: &Entry) -> ItemInfo {
        ItemInfo {
            item_id: item_id(entry.seq),
            state: ItemState::Pending,
            attempts: entry.attempts,
            enqueued_at: entry.enqueued_at,
            consumer: None,
            lease_expires_at: None,
            event: entry.event.clone(),
        }
    }

    fn dead_info(dead: &DeadLetter) -> ItemInfo {
        ItemInfo {
            item_id: item_id(dead.entry.seq),
            state: ItemState::DeadLetter,
            attempts: dead.entry.attempts,
            enqueued_at: dead.entry.enqueued_at,
            consumer: Some(dead.consumer.clone()),
            lease_expires_at: None,
            event: dead.entry.event.clone(),
        }
    }

    fn leased_info(lease: &Lease) -> ItemInfo {
        ItemInfo {
            item_id: item_id(lease.entry.seq),
            state: ItemState::Leased,
            attempts: lease.entry.attempts,
            enqueued_at: lease.entry.enqueued_at,
            consumer: Some(lease.consumer.clone()),
            lease_expires_at: Some(lease.expires_at),
            event: lease.entry.event.clone(),
        }
    }
}

#[async_trait::async_trait]
impl QueueStore for MemoryQueue {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn capacity(&self) -> u64 {
        self.capacity as u64
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn enqueue(&self, events: Vec<RequestEvent>) -> Result<Enqueued, StoreError> {
        if events.is_empty() {
            let depth = self.state.lock().pending.len() as u64;
            return Ok(Enqueued::Accepted { depth });
        }
        let n = events.len();
        let mut st = self.state.lock();
        let held = st.held();
        let refusal = if st.paused {
            Some(Refusal::Paused)
        } else if n > self.capacity {
            Some(Refusal::TooLarge)
        } else if held + n > self.capacity {
            Some(Refusal::Full)
        } else {
            None
        };
        if let Some(reason) = refusal {
            st.rejected_total += n as u64;
            return Ok(Enqueued::Refused {
                reason,
                held: held as u64,
                capacity: self.capacity as u64,
            });
        }
        let now = Utc::now();
        for event in events {
            let seq = st.next_seq;
            st.next_seq += 1;
            st.pending.insert(
                seq,
                Entry {
                    seq,
                    event,
                    enqueued_at: now,
                    attempts: 0,
                },
            );
        }
        st.ingested_total += n as u64;
        let depth = st.pending.len() as u64;
        drop(st);
        self.arrivals.notify_waiters();
        Ok(Enqueued::Accepted { depth })
    }

    async fn claim(&self, spec: &ClaimSpec) -> Result<Vec<ClaimedItem>, StoreError> {
        let deadline = Instant::now() + spec.wait;
        let mut linger_until: Option<Instant> = None;
        loop {
            // Registered before looking at the queue, so an enqueue between the look and
            // the sleep still wakes us.
            let arrival = self.arrivals.notified();
            tokio::pin!(arrival);
            arrival.as_mut().enable();
            let wake = {
                let mut st = self.state.lock();
                let now = Instant::now();
                st.lapse_expired(now, self.max_attempts);
                st.touch(&spec.consumer, now);
                let available = st.available();
                if available > 0 && linger_until.is_none() {
                    linger_until = Some((now + spec.linger).min(deadline));
                }
                if available >= spec.max
                    || now >= deadline
                    || linger_until.is_some_and(|t| now >= t)
                {
                    let leased = st.lease(spec, now);
                    drop(st);
                    if !leased.is_empty() {
                        // A claim asleep until a later time must learn of these leases:
                        // it takes them over if they lapse first.
                        self.arrivals.notify_waiters();
                    }
                    return Ok(leased);
                }
                let wake = linger_until.unwrap_or(deadline);
                st.next_expiry().map_or(wake, |t| t.min(wake))
            };
            let _ = tokio::time::timeout_at(wake, arrival).await;
        }
    }

    async fn ack(&self, consumer: &str, item_ids: &[String]) -> Result<usize, StoreError> {
        let mut st = self.state.lock();
        let mut acked = 0;
        for seq in item_ids.iter().filter_map(|id| parse_id(id)) {
            let owned = st.leased.get(&seq).is_some_and(|l| l.consumer == consumer);
            if !owned {
                continue;
            }
            if let Some(lease) = st.leased.remove(&seq) {
                st.expiries.remove(&(lease.expires, seq));
                st.lapsed.remove(&seq);
                st.release(consumer);
                acked += 1;
            }
        }
        st.acked_total += acked as u64;
        st.touch(consumer, Instant::now());
        Ok(acked)
    }

    async fn status(&self) -> Result<QueueStatus, StoreError> {
        let mut st = self.state.lock();
        st.forget_idle_consumers(Instant::now());
        let mut consumers: Vec<ConsumerStatus> = st
            .consumers
            .iter()
            .map(|(name, c)| ConsumerStatus {
                consumer: name.clone(),
                leased: c.leased,
                last_seen: c.last_seen,
            })
            .collect();
        consumers.sort_by(|a, b| a.consumer.cmp(&b.consumer));
        Ok(QueueStatus {
            depth: st.pending.len() as u64,
            leased: st.leased.len() as u64,
            max_size: self.capacity as u64,
            paused: st.paused,
            ingested_total: st.ingested_total,
            acked_total: st.acked_total,
            reclaimed_total: st.reclaimed_total,
            rejected_total: st.rejected_total,
            dead_letter: st.dead.len() as u64,
            dead_lettered_total: st.dead_lettered_total,
            consumers,
        })
    }

    async fn set_paused(&self, paused: bool) -> Result<(), StoreError> {
        self.state.lock().paused = paused;
        Ok(())
    }

    async fn items(
        &self,
        state: Option<ItemState>,
        limit: usize,
    ) -> Result<Vec<ItemInfo>, StoreError> {
        let st = self.state.lock();
        let pending = st.pending.values().map(|e| (e.seq, State::pending_info(e)));
        let leased = st
            .leased
            .values()
            .map(|l| (l.entry.seq, State::leased_info(l)));
        let dead = st.dead.values().map(|d| (d.entry.seq, State::dead_info(d)));
        let items: Vec<(u64, ItemInfo)> = match state {
            Some(ItemState::Pending) => pending.take(limit).collect(),
            Some(ItemState::Leased) => leased.take(limit).collect(),
            Some(ItemState::DeadLetter) => dead.take(limit).collect(),
            None => {
                // Every map is in sequence order, so the first `limit` of each suffice.
                let mut all: Vec<_> = pending
                    .take(limit)
                    .chain(leased.take(limit))
                    .chain(dead.take(limit))
                    .collect();
                all.sort_by_key(|(seq, _)| *seq);
                all.truncate(limit);
                all
            }
        };
        Ok(items.into_iter().map(|(_, info)| info).collect())
    }

    async fn item(&self, item_id: &str) -> Result<Option<ItemInfo>, StoreError> {
        let Some(seq) = parse_id(item_id) else {
            return Ok(None);
        };
        let st = self.state.lock();
        if let Some(e) = st.pending.get(&seq) {
            return Ok(Some(State::pending_info(e)));
        }
        if let Some(l) = st.leased.get(&seq) {
            return Ok(Some(State::leased_info(l)));
        }
        Ok(st.dead.get(&seq).map(State::dead_info))
    }

    async fn purge(&self) -> Result<u64, StoreError> {
        let mut st = self.state.lock();
        let n = (st.pending.len() + st.dead.len()) as u64;
        st.pending.clear();
        st.dead.clear();
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(consumer: &str, max: usize) -> ClaimSpec {
        ClaimSpec {
            consumer: consumer.into(),
            max,
            lease: Duration::from_secs(60),
            wait: Duration::ZERO,
            linger: Duration::ZERO,
        }
    }

    #[tokio::test]
    async fn idle_consumers_are_forgotten_but_busy_ones_stay() {
        let q = MemoryQueue::new(10);
        q.enqueue(vec![RequestEvent::new([127, 0, 0, 1].into(), "GET", "/")])
            .await
            .unwrap();
        assert_eq!(q.claim(&spec("busy", 1)).await.unwrap().len(), 1);
        assert!(q.claim(&spec("idle", 1)).await.unwrap().is_empty());
        assert_eq!(q.status().await.unwrap().consumers.len(), 2);
        let later = Instant::now() + CONSUMER_FORGET_AFTER + Duration::from_secs(1);
        let mut st = q.state.lock();
        st.forget_idle_consumers(later);
        // "busy" still holds a lease (expired or not, it is its until reclaimed).
        let names: Vec<&String> = st.consumers.keys().collect();
        assert_eq!(names, vec!["busy"]);
    }

    #[test]
    fn foreign_item_ids_are_unknown() {
        assert_eq!(parse_id("12"), Some(12));
        assert_eq!(parse_id("1712-0"), None);
        assert_eq!(parse_id(""), None);
    }
}
