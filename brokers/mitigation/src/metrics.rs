//! The mitigation broker's Prometheus metrics, in a registry of its own so several
//! brokers can live in one process (tests, `esper dev`).

use std::collections::BTreeMap;

use esper_common::metrics::{HttpMetrics, register};
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// Action names, so every `esper_mitigations_active{action}` series exists from the start.
const ACTIONS: [&str; 4] = ["block", "throttle", "tarpit", "log"];

/// Every metric the mitigation broker exports.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub http: HttpMetrics,
    active: IntGaugeVec,
    pub published: IntCounter,
    pub revoked: IntCounter,
    pub expired: IntCounter,
    pub clears: IntCounter,
    pub followers: IntGauge,
    pub snapshots: IntCounter,
    pub changes_sent: IntCounter,
    /// Decisions and revocations waiting for the control plane's decision log.
    pub persistence_pending: IntGauge,
    pub persistence_sent: IntCounter,
    /// Publishes and revokes refused with 503 because the outbox was full.
    pub persistence_rejected: IntCounter,
    /// Entries left out of the durable copy, by reason (`full`, `refused`).
    pub persistence_dropped: IntCounterVec,
    pub persistence_errors: IntCounter,
    pub persistence_restored: IntCounter,
}

impl Metrics {
    /// Creates and registers the metrics in a fresh registry.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            register(&registry, &c);
            Ok(c)
        };
        let active = IntGaugeVec::new(
            Opts::new(
                "esper_mitigations_active",
                "Mitigations in force, by action",
            ),
            &["action"],
        )?;
        register(&registry, &active);
        for action in ACTIONS {
            active.with_label_values(&[action]).set(0);
        }
        let followers = IntGauge::new(
            "esper_stream_followers",
            "Delta-stream requests waiting for a change right now",
        )?;
        register(&registry, &followers);
        let persistence_pending = IntGauge::new(
            "esper_persistence_pending",
            "Decisions and revocations waiting for the control plane's decision log",
        )?;
        register(&registry, &persistence_pending);
        let persistence_dropped = IntCounterVec::new(
            Opts::new(
                "esper_persistence_dropped_total",
                "Entries left out of the durable copy: outbox full (drop_oldest), refused by the control plane, or unreadable",
            ),
            &["reason"],
        )?;
        register(&registry, &persistence_dropped);
        for reason in ["full", "refused", "unreadable"] {
            persistence_dropped.with_label_values(&[reason]).reset();
        }
        Ok(Metrics {
            http: HttpMetrics::new(&registry)?,
            active,
            published: counter(
                "esper_mitigations_published_total",
                "Mitigations accepted by publish",
            )?,
            revoked: counter(
                "esper_mitigations_revoked_total",
                "Active mitigations revoked (by id or entity)",
            )?,
            expired: counter(
                "esper_mitigations_expired_total",
                "Expired mitigations dropped by the sweeper",
            )?,
            clears: counter("esper_cache_clears_total", "Cache clears")?,
            followers,
            snapshots: counter(
                "esper_stream_snapshots_total",
                "Delta-stream snapshots begun (first pages; a snapshot arrives in pages)",
            )?,
            changes_sent: counter(
                "esper_stream_changes_sent_total",
                "Changes sent to followers in incremental pages",
            )?,
            persistence_pending,
            persistence_sent: counter(
                "esper_persistence_sent_total",
                "Decisions and revocations delivered to the control plane's decision log",
            )?,
            persistence_rejected: counter(
                "esper_persistence_rejected_total",
                "Publishes and revokes refused with 503 because the persistence outbox was full",
            )?,
            persistence_dropped,
            persistence_errors: counter(
                "esper_persistence_errors_total",
                "Failed deliveries to or restores from the decision log (retried)",
            )?,
            persistence_restored: counter(
                "esper_persistence_restored_total",
                "Mitigations published again from the decision log at start-up",
            )?,
            registry,
        })
    }

    /// Sets the active gauges from the store's counts.
    pub fn observe_counts(&self, counts: &BTreeMap<&'static str, u64>) {
        for action in ACTIONS {
            let n = counts.get(action).copied().unwrap_or(0);
            self.active
                .with_label_values(&[action])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Counts one waiting follower until the guard is dropped (answer or disconnect).
    pub fn follower(&self) -> FollowerGuard {
        self.followers.inc();
        FollowerGuard(self.followers.clone())
    }
}

/// Decrements `esper_stream_followers` when dropped.
pub struct FollowerGuard(IntGauge);

impl Drop for FollowerGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
