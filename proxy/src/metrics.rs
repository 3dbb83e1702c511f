//! The proxy's Prometheus metrics, in a registry of its own so that several proxies can
//! live in one process. Label values used on the request path are resolved once here.

use esper_protocol::EnforcedAction;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Why an event was not delivered to the ingestion broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The queue to the forwarder was full.
    BufferFull,
    /// The broker could not be reached after retries.
    SendFailed,
    /// The broker kept answering that its queue is full or paused (503), after retries.
    Backpressure,
    /// The broker refused the batch for good (a 4xx other than backpressure).
    Rejected,
    /// Still queued when the proxy stopped and the final flush failed.
    Shutdown,
}

impl DropReason {
    const ALL: [DropReason; 5] = [
        DropReason::BufferFull,
        DropReason::SendFailed,
        DropReason::Backpressure,
        DropReason::Rejected,
        DropReason::Shutdown,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::BufferFull => "buffer_full",
            DropReason::SendFailed => "send_failed",
            DropReason::Backpressure => "backpressure",
            DropReason::Rejected => "rejected",
            DropReason::Shutdown => "shutdown",
        }
    }
}

const ACTIONS: [EnforcedAction; 6] = [
    EnforcedAction::Allow,
    EnforcedAction::Block,
    EnforcedAction::Throttle,
    EnforcedAction::Tarpit,
    EnforcedAction::Log,
    EnforcedAction::Challenge,
];

fn action_index(a: EnforcedAction) -> usize {
    match a {
        EnforcedAction::Allow => 0,
        EnforcedAction::Block => 1,
        EnforcedAction::Throttle => 2,
        EnforcedAction::Tarpit => 3,
        EnforcedAction::Log => 4,
        EnforcedAction::Challenge => 5,
    }
}

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    requests: Vec<IntCounter>,
    /// Time from request start to the end of the response.
    pub request_duration: Histogram,
    /// Mitigations in the cache.
    pub cache_entries: IntGauge,
    cache_hits: IntCounter,
    cache_misses: IntCounter,
    /// Events accepted by the ingestion broker.
    pub events_sent: IntCounter,
    dropped: Vec<IntCounter>,
    /// 1 while the delta stream is followed.
    pub stream_connected: IntGauge,
    /// Delta-stream changes applied (snapshot entries included).
    pub deltas_applied: IntCounter,
    /// Configurations from the control plane applied.
    pub remote_config_applied: IntCounter,
    /// Configurations from the control plane refused (the previous one kept).
    pub remote_config_refused: IntCounter,
    /// Revision of the control plane's configuration in force (0: none).
    pub remote_config_revision: IntGauge,
    /// Revision of the control plane's challenge key this proxy signs with (0: a key of
    /// its own).
    pub challenge_key_revision: IntGauge,
    /// Delta-stream answers that were full snapshots (cache replaced).
    pub stream_snapshots: IntCounter,
    /// New mitigations not cached because the cache was full (`cache_max_entries`) of
    /// mitigations at least as severe.
    pub cache_refused: IntCounter,
    /// Mitigations dropped from a full cache for a more severe new one.
    pub cache_evicted: IntCounter,
    /// Moves from a failed mitigation broker to the next in the list.
    pub stream_failovers: IntCounter,
    /// Connections to an upstream that failed (refused, timed out), by app; the request
    /// goes on to another upstream when it has tries left.
    pub upstream_connect_errors: IntCounterVec,
}

fn counter_vec(registry: &Registry, name: &str, help: &str, label: &str) -> IntCounterVec {
    let vec = IntCounterVec::new(Opts::new(name, help), &[label])
        .unwrap_or_else(|e| unreachable!("metric {name} is well-formed: {e}"));
    esper_common::metrics::register(registry, &vec);
    vec
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).unwrap_or_else(|e| unreachable!("metric {name}: {e}"));
    esper_common::metrics::register(registry, &c);
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).unwrap_or_else(|e| unreachable!("metric {name}: {e}"));
    esper_common::metrics::register(registry, &g);
    g
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests_vec = counter_vec(
            &registry,
            "esper_requests_total",
            "Requests handled by the proxy, by the action taken",
            "action",
        );
        let requests = ACTIONS
            .iter()
            .map(|a| requests_vec.with_label_values(&[a.as_str()]))
            .collect();
        let request_duration = Histogram::with_opts(
            HistogramOpts::new(
                "esper_proxy_request_duration_seconds",
                "Time from request start to the end of the response",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
        )
        .unwrap_or_else(|e| unreachable!("histogram is well-formed: {e}"));
        esper_common::metrics::register(&registry, &request_duration);
        let lookups = counter_vec(
            &registry,
            "esper_proxy_cache_lookups_total",
            "Mitigation cache lookups, by result (hit or miss)",
            "result",
        );
        let dropped_vec = counter_vec(
            &registry,
            "esper_proxy_events_dropped_total",
            "Request events not delivered to the ingestion broker, by reason",
            "reason",
        );
        let dropped = DropReason::ALL
            .iter()
            .map(|r| dropped_vec.with_label_values(&[r.label()]))
            .collect();
        let remote = counter_vec(
            &registry,
            "esper_proxy_remote_config_total",
            "Configurations from the control plane, by result (applied or refused)",
            "result",
        );
        Metrics {
            remote_config_applied: remote.with_label_values(&["applied"]),
            remote_config_refused: remote.with_label_values(&["refused"]),
            remote_config_revision: gauge(
                &registry,
                "esper_proxy_remote_config_revision",
                "Revision of the control plane's proxy configuration in force (0: none)",
            ),
            challenge_key_revision: gauge(
                &registry,
                "esper_proxy_challenge_key_revision",
                "Revision of the control plane's challenge key this proxy signs with (0: a key of its own, challenge_secret or the start-up key)",
            ),
            requests,
            request_duration,
            cache_entries: gauge(
                &registry,
                "esper_proxy_cache_entries",
                "Mitigations in the proxy's cache",
            ),
            cache_hits: lookups.with_label_values(&["hit"]),
            cache_misses: lookups.with_label_values(&["miss"]),
            events_sent: counter(
                &registry,
                "esper_proxy_events_sent_total",
                "Request events accepted by the ingestion broker",
            ),
            dropped,
            stream_connected: gauge(
                &registry,
                "esper_proxy_stream_connected",
                "1 while the proxy follows the mitigation broker's delta stream",
            ),
            deltas_applied: counter(
                &registry,
                "esper_proxy_deltas_applied_total",
                "Delta-stream changes applied to the cache, snapshot entries included",
            ),
            stream_snapshots: counter(
                &registry,
                "esper_proxy_stream_snapshots_total",
                "Snapshots installed (all their pages in, the cache was replaced at once)",
            ),
            cache_refused: counter(
                &registry,
                "esper_proxy_cache_refused_total",
                "New mitigations not cached because the cache held cache_max_entries at least as severe",
            ),
            cache_evicted: counter(
                &registry,
                "esper_proxy_cache_evicted_total",
                "Mitigations dropped from a full cache (cache_max_entries) for a more severe new one",
            ),
            upstream_connect_errors: counter_vec(
                &registry,
                "esper_proxy_upstream_connect_errors_total",
                "Connections to an upstream that failed, by app (the request is tried on another while it has tries left)",
                "app",
            ),
            stream_failovers: counter(
                &registry,
                "esper_proxy_stream_failovers_total",
                "Moves from a failed mitigation broker to the next one in mitigation_url",
            ),
            registry,
        }
    }

    /// The registry to render on `/metrics`.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Counts a handled request.
    pub fn request(&self, action: EnforcedAction) {
        self.requests[action_index(action)].inc();
    }

    /// Requests handled so far, every action together.
    pub fn requests_total(&self) -> u64 {
        self.requests.iter().map(|c| c.get()).sum()
    }

    /// Counts a cache lookup.
    pub fn lookup(&self, hit: bool) {
        if hit {
            self.cache_hits.inc()
        } else {
            self.cache_misses.inc()
        }
    }

    /// Counts `n` events dropped for `reason`.
    pub fn drop_events(&self, reason: DropReason, n: u64) {
        if let Some(c) = DropReason::ALL
            .iter()
            .position(|r| *r == reason)
            .and_then(|i| self.dropped.get(i))
        {
            c.inc_by(n);
        }
    }

    /// Events dropped so far, every reason together.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().map(|c| c.get()).sum()
    }

    /// Events dropped for one reason.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        DropReason::ALL
            .iter()
            .position(|r| *r == reason)
            .and_then(|i| self.dropped.get(i))
            .map_or(0, |c| c.get())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_metric_is_exported() {
        let m = Metrics::new();
        m.request(EnforcedAction::Block);
        m.lookup(true);
        m.drop_events(DropReason::BufferFull, 3);
        let text = esper_common::metrics::render(m.registry());
        for name in [
            "esper_requests_total{action=\"block\"} 1",
            "esper_proxy_request_duration_seconds",
            "esper_proxy_cache_entries",
            "esper_proxy_cache_lookups_total{result=\"hit\"} 1",
            "esper_proxy_events_sent_total",
            "esper_proxy_events_dropped_total{reason=\"buffer_full\"} 3",
            "esper_proxy_stream_connected",
            "esper_proxy_deltas_applied_total",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        assert_eq!(m.requests_total(), 1);
        assert_eq!(m.dropped_total(), 3);
    }
}
