//! The handoff between request threads and the forwarder: each request thread appends
//! its events to its own buffer, and the forwarder takes them a batch at a time. The
//! forwarder is woken once a buffer holds a batch's worth (or by its flush timer), never
//! once per event: waking another thread per request cost more than building the event.
//!
//! The buffers together hold at most the configured capacity; an event that finds its
//! thread's buffer full is refused, and the caller counts it as dropped.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use esper_protocol::RequestEvent;
use parking_lot::Mutex;
use tokio::sync::Notify;

/// Why an event was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The thread's buffer is full (the forwarder is behind).
    Full,
    /// The queue is closed (shutting down).
    Closed,
}

/// One thread's buffer, on its own cache line so threads do not contend.
#[repr(align(64))]
struct Shard(Mutex<Vec<RequestEvent>>);

/// Events on their way to the forwarder.
pub struct EventQueue {
    shards: Box<[Shard]>,
    per_shard: usize,
    handoff: usize,
    ready: Notify,
    closed: AtomicBool,
}

/// Hands out buffer numbers to threads as they first report.
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed);
}

impl EventQueue {
    /// A queue holding at most `capacity` events in `shards` buffers (one per request
    /// thread), waking the forwarder when a buffer reaches `handoff` events.
    pub fn new(capacity: usize, shards: usize, handoff: usize) -> EventQueue {
        let shards = shards.max(1);
        let per_shard = capacity.div_ceil(shards).max(1);
        EventQueue {
            shards: (0..shards).map(|_| Shard(Mutex::new(Vec::new()))).collect(),
            per_shard,
            handoff: handoff.clamp(1, per_shard),
            ready: Notify::new(),
            closed: AtomicBool::new(false),
        }
    }

    /// Appends `event` to the calling thread's buffer; never waits for the forwarder.
    pub fn push(&self, event: RequestEvent) -> Result<(), Refused> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Refused::Closed);
        }
        let shard = &self.shards[SHARD.with(|s| *s) % self.shards.len()];
        let mut buf = shard.0.lock();
        if buf.len() >= self.per_shard {
            return Err(Refused::Full);
        }
        if buf.capacity() == 0 {
            buf.reserve(self.handoff);
        }
        buf.push(event);
        let wake = buf.len() == self.handoff;
        drop(buf);
        if wake {
            // A stored permit if the forwarder is busy: the handoff is not lost.
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Moves every queued event into `out`, oldest buffer contents first.
    pub fn drain_into(&self, out: &mut Vec<RequestEvent>) {
        for shard in self.shards.iter() {
            let mut buf = shard.0.lock();
            out.append(&mut buf);
        }
    }

    /// Events queued now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.0.lock().len()).sum()
    }

    /// Waits until some buffer holds a batch's worth of events.
    pub async fn ready(&self) {
        self.ready.notified().await;
    }

    /// Refuses further events (what is queued stays, to be drained).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    fn event(n: u32) -> RequestEvent {
        serde_json::from_value(serde_json::json!({
            "id": format!("e{n}"),
            "timestamp": "2026-01-01T00:00:00Z",
            "client_ip": "192.0.2.1",
            "method": "GET",
            "path": "/",
            "status": 200,
        }))
        .unwrap()
    }

    #[test]
    fn bounded_and_drained_in_order() {
        let q = EventQueue::new(4, 1, 2);
        for n in 0..4 {
            q.push(event(n)).unwrap();
        }
        assert_eq!(q.push(event(9)), Err(Refused::Full));
        assert_eq!(q.len(), 4);
        let mut out = Vec::new();
        q.drain_into(&mut out);
        let ids: Vec<_> = out.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["e0", "e1", "e2", "e3"]);
        assert_eq!(q.len(), 0);
        q.push(event(5)).unwrap();
        q.close();
        assert_eq!(q.push(event(6)), Err(Refused::Closed));
        out.clear();
        q.drain_into(&mut out);
        assert_eq!(out.len(), 1, "what was queued before closing is kept");
    }

    #[tokio::test]
    async fn wakes_once_a_batch_is_buffered_not_per_event() {
        let q = Arc::new(EventQueue::new(100, 2, 3));
        q.push(event(0)).unwrap();
        q.push(event(1)).unwrap();
        let early = tokio::time::timeout(Duration::from_millis(50), q.ready()).await;
        assert!(early.is_err(), "woken before a batch was buffered");
        q.push(event(2)).unwrap();
        tokio::time::timeout(Duration::from_secs(1), q.ready())
            .await
            .expect("woken when the batch is complete");
    }

    #[test]
    fn threads_fill_their_own_buffers() {
        let q = Arc::new(EventQueue::new(2000, 4, 10));
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let q = q.clone();
                std::thread::spawn(move || {
                    for n in 0..100 {
                        q.push(event(t * 1000 + n)).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let mut out = Vec::new();
        q.drain_into(&mut out);
        assert_eq!(out.len(), 400);
    }
}
