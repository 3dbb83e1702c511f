//! The ingestion broker's Prometheus metrics, in a registry of its own so several brokers
//! can live in one process (tests, `esper dev`).

use esper_common::metrics::{HttpMetrics, register};
use esper_protocol::ingestion::QueueStatus;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Every metric the ingestion broker exports.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub http: HttpMetrics,
    depth: IntGauge,
    leased: IntGauge,
    capacity: IntGauge,
    paused: IntGauge,
    consumers: IntGauge,
    dead_letter: IntGauge,
    pub ingested: IntCounter,
    pub claimed: IntCounter,
    pub acked: IntCounter,
    reclaimed: IntCounter,
    pub rejected: IntCounterVec,
}

fn queue_opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).const_label("queue", "ingestion")
}

impl Metrics {
    /// Creates and registers the metrics in a fresh registry.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::with_opts(queue_opts(name, help))?;
            register(&registry, &g);
            Ok(g)
        };
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::with_opts(queue_opts(name, help))?;
            register(&registry, &c);
            Ok(c)
        };
        let rejected = IntCounterVec::new(
            queue_opts(
                "esper_rejected_events_total",
                "Events refused at ingest, by reason (full, too_large, paused)",
            ),
            &["reason"],
        )?;
        register(&registry, &rejected);
        Ok(Metrics {
            http: HttpMetrics::new(&registry)?,
            depth: gauge("esper_queue_depth", "Items waiting to be claimed")?,
            leased: gauge("esper_queue_leased", "Items claimed and not yet acked")?,
            capacity: gauge("esper_queue_capacity", "Items the queue holds at most")?,
            paused: gauge("esper_queue_paused", "1 while ingest is paused")?,
            consumers: gauge("esper_queue_consumers", "Consumers seen recently")?,
            dead_letter: gauge(
                "esper_queue_dead_letter",
                "Items in the dead-letter list (claimed max_attempts times without an ack)",
            )?,
            ingested: counter("esper_ingested_events_total", "Events accepted")?,
            claimed: counter("esper_claimed_events_total", "Items handed out by claims")?,
            acked: counter("esper_acked_events_total", "Items acked")?,
            reclaimed: counter(
                "esper_reclaimed_events_total",
                "Leases that expired and went back to the queue",
            )?,
            rejected,
            registry,
        })
    }

    /// Brings the gauges (and the store-side reclaim count) up to date before a scrape.
    pub fn observe(&self, status: &QueueStatus) {
        self.depth.set(clamp(status.depth));
        self.leased.set(clamp(status.leased));
        self.capacity.set(clamp(status.max_size));
        self.paused.set(i64::from(status.paused));
        self.consumers.set(clamp(status.consumers.len() as u64));
        self.dead_letter.set(clamp(status.dead_letter));
        // Reclaims happen inside the store; the counter follows the store's total.
        let seen = self.reclaimed.get();
        if status.reclaimed_total > seen {
            self.reclaimed.inc_by(status.reclaimed_total - seen);
        }
    }
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
