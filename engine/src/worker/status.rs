//! What the worker knows about itself: Prometheus metrics, the liveness of its
//! dependencies, and the health report built from them.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use chrono::Utc;
use esper_common::{ComponentHealth, HealthReport};
use parking_lot::Mutex;
use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

use super::policies::PolicyHandle;
use crate::eval::StateBackend;

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("metric definitions are valid")
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("metric definitions are valid")
}

/// The worker's Prometheus figures (the evaluator registers its own).
#[derive(Clone)]
pub(crate) struct Metrics {
    pub evaluation_duration: Histogram,
    pub utilization: Gauge,
    pub clock_offset: Gauge,
    pub claim_errors: IntCounter,
    pub publish_errors: IntCounter,
    pub ack_errors: IntCounter,
    pub evaluation_failures: IntCounterVec,
    pub published: IntCounter,
    pub batches: IntCounterVec,
    pub policies_loaded: IntGauge,
    pub policies_revision: IntGauge,
    pub policy_errors: IntCounter,
    pub decisions_dropped: IntCounter,
    pub decisions_pending: IntGauge,
    pub control_errors: IntCounter,
    pub state_entities: IntGauge,
    pub state_event_ids: IntGauge,
    pub state_evictions: IntCounter,
    pub state_cleaned: IntCounter,
    pub io_threads: IntGauge,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Metrics {
        let m = Metrics {
            evaluation_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "esper_evaluation_duration_seconds",
                    "Time to evaluate one batch against the policies and the state",
                )
                .buckets(vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0,
                ]),
            )
            .expect("metric definitions are valid"),
            utilization: Gauge::new(
                "esper_worker_utilization_ratio",
                "Share of the last interval the evaluation loops spent working, 0 to 1",
            )
            .expect("metric definitions are valid"),
            clock_offset: Gauge::new(
                "esper_worker_clock_offset_seconds",
                "How far the shared state's clock is ahead of this host's; the worker evaluates by the state's (0 over the memory state)",
            )
            .expect("metric definitions are valid"),
            claim_errors: counter("esper_claim_errors_total", "Failed claims"),
            publish_errors: counter(
                "esper_publish_errors_total",
                "Failed publishes to the mitigation broker",
            ),
            ack_errors: counter("esper_ack_errors_total", "Failed acknowledgements"),
            evaluation_failures: IntCounterVec::new(
                Opts::new(
                    "esper_evaluation_failures_total",
                    "Batches whose evaluation failed, by reason (timeout, state)",
                ),
                &["reason"],
            )
            .expect("metric definitions are valid"),
            published: counter(
                "esper_mitigations_published_total",
                "Mitigations published to the mitigation broker",
            ),
            batches: IntCounterVec::new(
                Opts::new(
                    "esper_batches_total",
                    "Claimed batches, by outcome (acked, retried)",
                ),
                &["outcome"],
            )
            .expect("metric definitions are valid"),
            policies_loaded: gauge("esper_policies_loaded", "Policies being evaluated"),
            policies_revision: gauge(
                "esper_policies_revision",
                "Revision of the policies being evaluated",
            ),
            policy_errors: counter(
                "esper_policy_load_errors_total",
                "Failed attempts to load policies",
            ),
            decisions_dropped: counter(
                "esper_decisions_dropped_total",
                "Decisions that could not be sent to the control plane's decision log",
            ),
            decisions_pending: gauge(
                "esper_decisions_pending",
                "Decisions in the state's outbox, waiting to be sent to the control plane (workers over one state share it)",
            ),
            control_errors: counter(
                "esper_control_errors_total",
                "Failed calls to the control plane",
            ),
            state_entities: gauge("esper_state_entities", "Tracked (policy, entity) pairs"),
            state_event_ids: gauge(
                "esper_state_event_ids",
                "Event ids remembered for deduplication",
            ),
            state_evictions: counter(
                "esper_state_evictions_total",
                "Entities evicted because the state cache was full",
            ),
            state_cleaned: counter(
                "esper_state_cleaned_total",
                "Idle entities and expired event ids removed by cleanup",
            ),
            io_threads: gauge(
                "esper_worker_io_threads",
                "Threads of the async runtime running the evaluation loops (io_threads)",
            ),
        };
        use esper_common::metrics::register;
        register(registry, &m.evaluation_duration);
        register(registry, &m.utilization);
        register(registry, &m.clock_offset);
        for c in [
            &m.claim_errors,
            &m.publish_errors,
            &m.ack_errors,
            &m.published,
            &m.policy_errors,
            &m.decisions_dropped,
            &m.control_errors,
            &m.state_evictions,
            &m.state_cleaned,
        ] {
            register(registry, c);
        }
        register(registry, &m.evaluation_failures);
        register(registry, &m.batches);
        for g in [
            &m.policies_loaded,
            &m.policies_revision,
            &m.decisions_pending,
            &m.state_entities,
            &m.state_event_ids,
            &m.io_threads,
        ] {
            register(registry, g);
        }
        m
    }

    /// Copies the state's figures into the gauges.
    pub fn observe_state(&self, state: &dyn StateBackend) {
        let s = state.stats();
        self.state_entities.set(s.entities as i64);
        self.state_event_ids.set(s.event_ids as i64);
        let seen = self.state_evictions.get();
        if s.evictions_total > seen {
            self.state_evictions.inc_by(s.evictions_total - seen);
        }
    }
}

/// When a dependency last answered well, and its last error.
#[derive(Default)]
pub(crate) struct Link {
    last_ok_ms: AtomicI64,
    last_error: Mutex<Option<String>>,
    /// True once any call was made.
    tried: AtomicU64,
}

impl Link {
    pub fn ok(&self) {
        self.tried.store(1, Ordering::Relaxed);
        self.last_ok_ms
            .store(Utc::now().timestamp_millis(), Ordering::Relaxed);
        *self.last_error.lock() = None;
    }

    pub fn failed(&self, error: impl ToString) {
        self.tried.store(1, Ordering::Relaxed);
        *self.last_error.lock() = Some(error.to_string());
    }

    /// The last call's error, if it failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().clone()
    }

    /// Healthy when the last call worked and was at most `fresh` ago.
    fn health(&self, name: &str, required: bool, fresh: Option<Duration>) -> ComponentHealth {
        if self.tried.load(Ordering::Relaxed) == 0 {
            let healthy = fresh.is_none();
            return ComponentHealth::new(name, healthy, required, "not contacted yet");
        }
        if let Some(e) = self.last_error.lock().clone() {
            return ComponentHealth::new(name, false, required, e);
        }
        let age_ms = Utc::now().timestamp_millis() - self.last_ok_ms.load(Ordering::Relaxed);
        let age = Duration::from_millis(u64::try_from(age_ms).unwrap_or(0));
        match fresh {
            Some(limit) if age > limit => ComponentHealth::new(
                name,
                false,
                required,
                format!("no successful call for {}s", age.as_secs()),
            ),
            _ => ComponentHealth::new(name, true, required, "ok"),
        }
    }
}

/// Shared status of one worker.
#[derive(Default)]
pub(crate) struct Status {
    pub ingestion: Link,
    pub mitigation: Link,
    pub control: Link,
    /// The state backend, as the last batch found it: only a batch that goes through
    /// clears a batch's failure (a store out of memory still answers a clock reading).
    pub state: Link,
    /// The state backend, as cleanups and clock readings find it (with no batches, the
    /// only calls made).
    pub state_check: Link,
    /// Nanoseconds the loops spent working (not waiting on claims).
    pub busy_ns: AtomicU64,
    pub events_total: AtomicU64,
    pub decisions_total: AtomicU64,
}

/// The health check behind `/readyz` and `/healthz/detailed`: ready when policies are
/// loaded and a claim succeeded recently.
pub(crate) struct WorkerHealth {
    pub status: Arc<Status>,
    pub policies: Arc<PolicyHandle>,
    pub state: Arc<dyn StateBackend>,
    pub claim_fresh: Duration,
    pub has_control: bool,
    pub memory: Option<Arc<super::memory::MemoryGuard>>,
}

#[async_trait::async_trait]
impl esper_common::health::HealthCheck for WorkerHealth {
    async fn report(&self) -> HealthReport {
        let policies = match self.policies.current() {
            Some(set) => ComponentHealth::new(
                "policies",
                true,
                true,
                format!("revision {}, {} policies", set.revision, set.len()),
            ),
            None => ComponentHealth::new("policies", false, true, "not loaded yet"),
        };
        let stats = self.state.stats();
        let mut components = vec![
            policies,
            self.status
                .ingestion
                .health("ingestion", true, Some(self.claim_fresh)),
            self.status.mitigation.health("mitigation", true, None),
            match self
                .status
                .state
                .last_error()
                .or_else(|| self.status.state_check.last_error())
            {
                // Every batch fails while the state is down: not ready.
                Some(e) => ComponentHealth::new("state", false, true, e),
                None => ComponentHealth::new(
                    "state",
                    true,
                    true,
                    format!(
                        "{}: {} entities, {} event ids",
                        self.state.name(),
                        stats.entities,
                        stats.event_ids
                    ),
                ),
            },
        ];
        if self.has_control {
            components.push(self.status.control.health("control", false, None));
        }
        if let Some(m) = &self.memory {
            // Paused intake is load shedding, not a fault: it does not make the worker
            // unready.
            components.push(ComponentHealth::new(
                "memory",
                !m.over(),
                false,
                m.describe(),
            ));
        }
        HealthReport::new("engine-worker", components)
    }
}
