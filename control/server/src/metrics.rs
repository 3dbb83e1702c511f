//! The control plane's own Prometheus metrics, in a per-instance registry (HTTP request
//! counts and latency come from `esper_common::metrics::HttpMetrics`).

use esper_common::metrics::{HttpMetrics, register};
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Every metric of one control-plane instance.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub http: HttpMetrics,
    pub decisions_logged: IntCounter,
    pub policies_total: IntGauge,
    pub policies_enabled: IntGauge,
    pub policy_revision: IntGauge,
    pub manual_mitigations: IntCounter,
    pub revocations: IntCounter,
    pub analyze: IntCounterVec,
    pub analyze_not_enqueued: IntCounter,
    pub broker_errors: IntCounterVec,
    pub store_errors: IntCounter,
    pub workers_alive: IntGauge,
    pub proxies_alive: IntGauge,
    pub mirrored_mitigations: IntGauge,
}

fn counter(registry: &Registry, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
    let c = IntCounter::new(name, help)?;
    register(registry, &c);
    Ok(c)
}

fn gauge(registry: &Registry, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
    let g = IntGauge::new(name, help)?;
    register(registry, &g);
    Ok(g)
}

fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, prometheus::Error> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    register(registry, &c);
    Ok(c)
}

impl Metrics {
    /// Creates and registers every metric in a new registry.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let r = Registry::new();
        Ok(Metrics {
            http: HttpMetrics::new(&r)?,
            decisions_logged: counter(
                &r,
                "esper_decisions_logged_total",
                "Decisions newly written to the durable decision log",
            )?,
            policies_total: gauge(&r, "esper_policies_total", "Stored policies")?,
            policies_enabled: gauge(&r, "esper_policies_enabled", "Enabled policies")?,
            policy_revision: gauge(
                &r,
                "esper_policy_revision",
                "Revision of policies and lists that workers evaluate",
            )?,
            manual_mitigations: counter(
                &r,
                "esper_manual_mitigations_total",
                "Manual mitigations published through the API",
            )?,
            revocations: counter(
                &r,
                "esper_revocations_total",
                "Mitigations revoked through the API",
            )?,
            analyze: counter_vec(
                &r,
                "esper_analyze_total",
                "Analyze API answers by action",
                &["action"],
            )?,
            analyze_not_enqueued: counter(
                &r,
                "esper_analyze_not_enqueued_total",
                "Analyze API events the ingestion broker refused or could not take",
            )?,
            broker_errors: counter_vec(
                &r,
                "esper_broker_errors_total",
                "Failed calls to a broker",
                &["broker"],
            )?,
            store_errors: counter(
                &r,
                "esper_store_errors_total",
                "Failed control store operations",
            )?,
            workers_alive: gauge(
                &r,
                "esper_workers_alive",
                "Engine workers heard from recently",
            )?,
            proxies_alive: gauge(&r, "esper_proxies_alive", "Proxies heard from recently")?,
            mirrored_mitigations: gauge(
                &r,
                "esper_control_mitigations_mirrored",
                "Active mitigations mirrored from the mitigation broker for the analyze API",
            )?,
            registry: r,
        })
    }
}
