//! What the background loops report about themselves, read by `/readyz` detail and the
//! heartbeat: is traffic being served, is the delta stream followed, how did the last
//! batch of events fare.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use parking_lot::Mutex;

/// The outcome of the latest attempt of a background loop.
#[derive(Clone, Debug, Default)]
pub enum Outcome {
    /// Nothing tried yet.
    #[default]
    Idle,
    /// The last attempt worked, at this time.
    Ok(Instant),
    /// The last attempt failed, at this time, with this error.
    Failed(Instant, String),
}

/// Shared status of the proxy's parts.
#[derive(Debug, Default)]
pub struct Status {
    serving: AtomicBool,
    stream_connected: AtomicBool,
    stream: Mutex<Outcome>,
    ingest: Mutex<Outcome>,
    control: Mutex<Outcome>,
}

impl Status {
    /// Marks the traffic listener as serving (or not).
    pub fn set_serving(&self, on: bool) {
        self.serving.store(on, Ordering::Release);
    }

    /// Is client traffic being served?
    pub fn serving(&self) -> bool {
        self.serving.load(Ordering::Acquire)
    }

    /// Records the outcome of a delta-stream poll.
    pub fn stream_result(&self, result: Result<(), String>) {
        self.stream_connected
            .store(result.is_ok(), Ordering::Release);
        *self.stream.lock() = outcome(result);
    }

    /// Is the delta stream followed right now?
    pub fn stream_connected(&self) -> bool {
        self.stream_connected.load(Ordering::Acquire)
    }

    /// The latest delta-stream outcome.
    pub fn stream(&self) -> Outcome {
        self.stream.lock().clone()
    }

    /// Records the outcome of sending a batch of events.
    pub fn ingest_result(&self, result: Result<(), String>) {
        *self.ingest.lock() = outcome(result);
    }

    /// The latest outcome of sending events.
    pub fn ingest(&self) -> Outcome {
        self.ingest.lock().clone()
    }

    /// Records the outcome of a call to the control plane (the proxy configuration or
    /// the challenge key).
    pub fn control_result(&self, result: Result<(), String>) {
        *self.control.lock() = outcome(result);
    }

    /// The latest outcome of a call to the control plane.
    pub fn control(&self) -> Outcome {
        self.control.lock().clone()
    }
}

fn outcome(result: Result<(), String>) -> Outcome {
    match result {
        Ok(()) => Outcome::Ok(Instant::now()),
        Err(e) => Outcome::Failed(Instant::now(), e),
    }
}
