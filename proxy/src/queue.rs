//! The handoff between request threads and the forwarder: each request thread writes
//! its events, as JSON, straight into the body of the batch its own buffer is filling,
//! and the forwarder takes finished bodies. No event is held as a struct of owned
//! strings on its way out: the request's fields are borrowed while they are written, and
//! a batch's body is what the forwarder posts.
//!
//! The forwarder is woken once a buffer holds a batch's worth (or by its flush timer),
//! never once per event: waking another thread per request cost more than building the
//! event. The one exception is the first event after a quiet spell: a forwarder that
//! found nothing to send waits with no timer at all (an idle proxy spends nothing on
//! reporting), so that event wakes it. The buffers together hold at most the configured
//! capacity; an event that finds its thread's buffer full is refused, and the caller
//! counts it as dropped.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use esper_protocol::{EventView, INGEST_BODY_END, INGEST_BODY_START};
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

/// Events written as the body of one `POST /api/events`.
#[derive(Debug, Default)]
pub struct Batch {
    body: Vec<u8>,
    /// Where each event's JSON ends in `body`.
    ends: Vec<u32>,
}

impl Batch {
    /// A batch written into `body` (a recycled buffer, or a new one), with room for
    /// `bytes` and `events`.
    fn with_room(mut body: Vec<u8>, bytes: usize, events: usize) -> Batch {
        body.clear();
        body.reserve(bytes.max(INGEST_BODY_START.len() + 1));
        body.extend_from_slice(INGEST_BODY_START);
        Batch {
            body,
            ends: Vec::with_capacity(events),
        }
    }

    fn push(&mut self, event: &EventView<'_>) {
        if !self.ends.is_empty() {
            self.body.push(b',');
        }
        event.write_json(&mut self.body);
        // A batch is a few hundred kilobytes; an end beyond u32 would need 4 GiB.
        self.ends
            .push(u32::try_from(self.body.len()).unwrap_or(u32::MAX));
    }

    /// Appends `other`'s events.
    fn absorb(&mut self, other: &Batch) {
        for event in other.events() {
            if !self.ends.is_empty() {
                self.body.push(b',');
            }
            self.body.extend_from_slice(event);
            self.ends
                .push(u32::try_from(self.body.len()).unwrap_or(u32::MAX));
        }
    }

    /// Events in the batch.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Each event's JSON text, in order (for the event recorder).
    pub fn events(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(INGEST_BODY_START.len())
            .chain(self.ends.iter().map(|&e| e as usize + 1));
        starts
            .zip(self.ends.iter())
            .map(|(start, &end)| &self.body[start..end as usize])
    }

    /// The finished request body, `{"events":[...]}`.
    pub fn into_body(mut self) -> Bytes {
        self.body.extend_from_slice(INGEST_BODY_END);
        Bytes::from(self.body)
    }
}

/// One thread's buffer: the batch being filled and those filled since the forwarder's
/// last visit.
#[derive(Default)]
struct Buffer {
    open: Batch,
    full: Vec<Batch>,
    queued: usize,
    /// The last full batch's size in bytes: room for the next, so its body is rarely
    /// copied while it grows.
    room: usize,
}

/// One thread's buffer, on its own cache line so threads do not contend.
#[repr(align(64))]
struct Shard(Mutex<Buffer>);

/// Batch buffers the forwarder has sent, kept for new batches: a buffer the size of a
/// batch (a few hundred kilobytes) freed and allocated anew every batch would be
/// returned to the system in between and page-faulted back in by the request thread
/// writing the next batch.
const SPARE_BUFFERS_PER_SHARD: usize = 2;

/// Events on their way to the forwarder.
pub struct EventQueue {
    shards: Box<[Shard]>,
    spare: Mutex<Vec<Vec<u8>>>,
    per_shard: usize,
    handoff: usize,
    ready: Notify,
    closed: AtomicBool,
    /// The forwarder waits for the next event with no timer armed (see `park`).
    parked: AtomicBool,
}

/// Hands out buffer numbers to threads as they first report.
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed);
}

impl EventQueue {
    /// A queue holding at most `capacity` events in `shards` buffers (one per request
    /// thread), in batches of at most `handoff` events; the forwarder is woken when a
    /// batch is full.
    pub fn new(capacity: usize, shards: usize, handoff: usize) -> EventQueue {
        let shards = shards.max(1);
        let per_shard = capacity.div_ceil(shards).max(1);
        EventQueue {
            shards: (0..shards)
                .map(|_| Shard(Mutex::new(Buffer::default())))
                .collect(),
            spare: Mutex::new(Vec::new()),
            per_shard,
            handoff: handoff.clamp(1, per_shard),
            ready: Notify::new(),
            closed: AtomicBool::new(false),
            parked: AtomicBool::new(false),
        }
    }

    /// Writes `event` into the calling thread's buffer; never waits for the forwarder.
    pub fn push(&self, event: &EventView<'_>) -> Result<(), Refused> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Refused::Closed);
        }
        let shard = &self.shards[SHARD.with(|s| *s) % self.shards.len()];
        let mut buf = shard.0.lock();
        if buf.queued >= self.per_shard {
            return Err(Refused::Full);
        }
        if buf.open.body.capacity() == 0 {
            let body = self.spare.lock().pop().unwrap_or_default();
            buf.open = Batch::with_room(body, buf.room, self.handoff);
        }
        buf.open.push(event);
        buf.queued += 1;
        let wake = buf.open.len() >= self.handoff;
        if wake {
            let full = std::mem::take(&mut buf.open);
            buf.room = full.body.len() + full.body.len() / 8;
            buf.full.push(full);
        }
        drop(buf);
        // The load first: every request reads the flag, only the first after a quiet
        // spell writes it.
        if wake || (self.parked.load(Ordering::SeqCst) && self.parked.swap(false, Ordering::SeqCst))
        {
            // A stored permit if the forwarder is busy: the handoff is not lost.
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Moves every queued batch into `out`, each buffer's in the order written. The
    /// threads' unfinished batches go together into as few batches as the batch size
    /// allows: one client's requests served by two threads then reach the broker in one
    /// body, where a worker claims them together and puts them in time order (sequences
    /// follow that order), rather than in two bodies that two workers may take apart.
    pub fn drain_into(&self, out: &mut Vec<Batch>) {
        let mut open = Vec::new();
        for shard in self.shards.iter() {
            let mut buf = shard.0.lock();
            out.append(&mut buf.full);
            if !buf.open.is_empty() {
                open.push(std::mem::take(&mut buf.open));
            }
            buf.queued = 0;
        }
        let mut open = open.into_iter();
        let Some(mut joined) = open.next() else {
            return;
        };
        for batch in open {
            if joined.len() + batch.len() <= self.handoff {
                joined.absorb(&batch);
                self.recycle(batch.body);
            } else {
                out.push(std::mem::replace(&mut joined, batch));
            }
        }
        out.push(joined);
    }

    /// Takes back a sent batch's buffer for a later batch (beyond a few per thread it is
    /// simply freed).
    pub fn recycle(&self, body: Vec<u8>) {
        let mut spare = self.spare.lock();
        if spare.len() < self.shards.len() * SPARE_BUFFERS_PER_SHARD {
            spare.push(body);
        }
    }

    /// Events queued now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.0.lock().queued).sum()
    }

    /// Makes the next event wake the forwarder (by `ready`), unless events are queued
    /// already: then it returns false and the forwarder should drain them instead.
    pub fn park(&self) -> bool {
        self.parked.store(true, Ordering::SeqCst);
        // Checked after the flag is up, under each buffer's lock: an event pushed before
        // this look is seen here, one pushed after it sees the flag.
        let queued = self.shards.iter().any(|s| s.0.lock().queued > 0);
        if queued {
            self.parked.store(false, Ordering::SeqCst);
        }
        !queued
    }

    /// Waits until some buffer holds a batch's worth of events, or, once `park`ed, until
    /// the next event.
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

    use chrono::{DateTime, Utc};
    use esper_protocol::{EnforcedAction, RequestEvent};

    use super::*;

    fn view<'a>(id: &'a str, at: &'a DateTime<Utc>) -> EventView<'a> {
        EventView {
            id,
            timestamp: at,
            app: "shop",
            proxy_id: "p1",
            client_ip: "192.0.2.1".parse().unwrap(),
            method: "GET",
            host: "shop.example",
            path: "/",
            status: 200,
            latency_us: 10,
            bytes: 5,
            user_agent: None,
            headers: &[("accept", std::borrow::Cow::Borrowed("*/*"))],
            cookies: &[],
            tls: None,
            action: EnforcedAction::Allow,
            weight: 1.0,
        }
    }

    fn push(q: &EventQueue, n: u32) -> Result<(), Refused> {
        let at = Utc::now();
        q.push(&view(&format!("e{n}"), &at))
    }

    fn ids(batches: Vec<Batch>) -> Vec<String> {
        let mut ids = Vec::new();
        for b in batches {
            let body: esper_protocol::ingestion::IngestRequest =
                serde_json::from_slice(&b.into_body()).unwrap();
            ids.extend(body.events.into_iter().map(|e| e.id));
        }
        ids
    }

    #[test]
    fn bounded_and_drained_in_order_as_ingest_bodies() {
        let q = EventQueue::new(4, 1, 3);
        for n in 0..4 {
            push(&q, n).unwrap();
        }
        assert_eq!(push(&q, 9), Err(Refused::Full));
        assert_eq!(q.len(), 4);
        let mut out = Vec::new();
        q.drain_into(&mut out);
        assert_eq!(out.iter().map(Batch::len).collect::<Vec<_>>(), [3, 1]);
        assert_eq!(ids(out), ["e0", "e1", "e2", "e3"]);
        assert_eq!(q.len(), 0);
        push(&q, 5).unwrap();
        q.close();
        assert_eq!(push(&q, 6), Err(Refused::Closed));
        let mut out = Vec::new();
        q.drain_into(&mut out);
        assert_eq!(ids(out), ["e5"], "what was queued before closing is kept");
    }

    #[test]
    fn each_event_reads_back_as_written() {
        let q = EventQueue::new(10, 1, 10);
        let at = Utc::now();
        let mut events = Vec::new();
        for id in ["a", "b\"quoted\"", "c"] {
            q.push(&view(id, &at)).unwrap();
            events.push(id);
        }
        let mut out = Vec::new();
        q.drain_into(&mut out);
        let [batch] = <[Batch; 1]>::try_from(out).unwrap();
        let read: Vec<RequestEvent> = batch
            .events()
            .map(|text| serde_json::from_slice(text).unwrap())
            .collect();
        assert_eq!(read.len(), 3);
        for (ev, id) in read.iter().zip(events) {
            assert_eq!(ev.id, id);
            assert_eq!(ev.headers["accept"], "*/*");
            assert_eq!(ev.timestamp, at);
        }
        let whole = batch.events().count();
        assert_eq!(whole, 3);
    }

    #[test]
    fn sent_buffers_are_reused_for_new_batches() {
        let q = EventQueue::new(10, 1, 2);
        push(&q, 0).unwrap();
        push(&q, 1).unwrap();
        let mut out = Vec::new();
        q.drain_into(&mut out);
        let body = out.pop().unwrap().into_body();
        let mut sent = Vec::from(body.try_into_mut().unwrap());
        sent.reserve(64 * 1024);
        let room = sent.capacity();
        q.recycle(sent);
        push(&q, 2).unwrap();
        push(&q, 3).unwrap();
        q.drain_into(&mut out);
        let reused = out.pop().unwrap();
        assert_eq!(
            reused.body.capacity(),
            room,
            "the sent buffer was taken again"
        );
        assert_eq!(
            ids(vec![reused]),
            ["e2", "e3"],
            "and holds only the new batch"
        );
        for _ in 0..5 {
            q.recycle(Vec::with_capacity(16));
        }
        assert_eq!(q.spare.lock().len(), SPARE_BUFFERS_PER_SHARD);
    }

    #[tokio::test]
    async fn wakes_once_a_batch_is_buffered_not_per_event() {
        let q = Arc::new(EventQueue::new(100, 2, 3));
        push(&q, 0).unwrap();
        push(&q, 1).unwrap();
        let early = tokio::time::timeout(Duration::from_millis(50), q.ready()).await;
        assert!(early.is_err(), "woken before a batch was buffered");
        push(&q, 2).unwrap();
        tokio::time::timeout(Duration::from_secs(1), q.ready())
            .await
            .expect("woken when the batch is complete");
    }

    #[tokio::test]
    async fn a_parked_forwarder_is_woken_by_the_next_event_only() {
        let q = EventQueue::new(100, 1, 50);
        assert!(q.park(), "nothing queued: parks");
        push(&q, 0).unwrap();
        tokio::time::timeout(Duration::from_secs(1), q.ready())
            .await
            .expect("the first event wakes it");
        push(&q, 1).unwrap();
        let again = tokio::time::timeout(Duration::from_millis(50), q.ready()).await;
        assert!(again.is_err(), "later events leave it to its timer");

        assert!(!q.park(), "events queued: no parking");
        push(&q, 2).unwrap();
        let woken = tokio::time::timeout(Duration::from_millis(50), q.ready()).await;
        assert!(woken.is_err(), "a refused park leaves no wake-up behind");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_event_pushed_while_parking_is_never_stranded() {
        let q = Arc::new(EventQueue::new(100, 2, 50));
        let mut out = Vec::new();
        for n in 0..2000 {
            let pusher = {
                let q = q.clone();
                std::thread::spawn(move || push(&q, n).unwrap())
            };
            loop {
                q.drain_into(&mut out);
                if !out.is_empty() {
                    break;
                }
                if q.park() {
                    tokio::time::timeout(Duration::from_secs(5), q.ready())
                        .await
                        .unwrap_or_else(|_| panic!("event {n} queued with nobody woken"));
                }
            }
            assert_eq!(ids(std::mem::take(&mut out)), [format!("e{n}")]);
            pusher.join().unwrap();
        }
    }

    #[test]
    fn threads_fill_their_own_buffers() {
        let q = Arc::new(EventQueue::new(2000, 4, 10));
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let q = q.clone();
                std::thread::spawn(move || {
                    for n in 0..100 {
                        push(&q, t * 1000 + n).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let mut out = Vec::new();
        q.drain_into(&mut out);
        assert!(out.iter().all(|b| b.len() <= 10));
        assert_eq!(ids(out).len(), 400);
    }

    #[test]
    fn unfinished_batches_of_several_threads_leave_in_one_body() {
        let q = Arc::new(EventQueue::new(100, 3, 5));
        let from_thread = |first: u32, n: u32| {
            let q = q.clone();
            std::thread::spawn(move || {
                for i in first..first + n {
                    push(&q, i).unwrap();
                }
            })
            .join()
            .unwrap();
        };
        from_thread(0, 2);
        from_thread(10, 2);
        let mut out = Vec::new();
        q.drain_into(&mut out);
        assert_eq!(out.len(), 1, "two threads' unfinished batches, one body");
        let mut got = ids(std::mem::take(&mut out));
        got.sort();
        assert_eq!(got, ["e0", "e1", "e10", "e11"]);

        // Joined only as far as the batch size allows.
        from_thread(20, 3);
        from_thread(30, 3);
        from_thread(40, 1);
        q.drain_into(&mut out);
        let mut sizes: Vec<usize> = out.iter().map(Batch::len).collect();
        sizes.sort();
        assert_eq!(sizes, [3, 4]);
        assert_eq!(ids(out).len(), 7);
    }
}
