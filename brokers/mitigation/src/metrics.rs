//! The mitigation broker's Prometheus metrics, in a registry of its own so several
//! brokers can live in one process (tests, `esper dev`).

use std::collections::BTreeMap;

use esper_common::metrics::{HttpMetrics, register};
use prometheus::{IntCounter, IntGauge, IntGaugeVec, Opts, Registry};

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
                "Delta-stream answers that were full snapshots",
            )?,
            changes_sent: counter(
                "esper_stream_changes_sent_total",
                "Changes sent to followers in incremental pages",
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
