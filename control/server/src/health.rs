//! The control plane's health: the store is required; the brokers, workers and proxies
//! are reported, and their absence only makes the server degraded, not unready.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use esper_common::health::{ComponentHealth, HealthCheck, HealthReport};

use crate::state::AppState;
use crate::store::StoreError;

const STORE_TIMEOUT: Duration = Duration::from_secs(3);

/// Health of one control-plane instance.
pub struct ControlHealth {
    pub state: AppState,
}

#[async_trait]
impl HealthCheck for ControlHealth {
    async fn report(&self) -> HealthReport {
        let s = &self.state;
        let (store, ingestion, mitigation) = tokio::join!(
            tokio::time::timeout(STORE_TIMEOUT, s.store.ping()),
            s.ingestion.ready(),
            s.mitigation.ready(),
        );
        let store_ok = matches!(store, Ok(Ok(())));
        let store = match store {
            Ok(Ok(())) => ComponentHealth::new("store", true, true, s.store.kind()),
            Ok(Err(e)) => ComponentHealth::new("store", false, true, e.to_string()),
            Err(_) => ComponentHealth::new("store", false, true, "no answer within 3s"),
        };
        let broker = |name: &str, url: &str, ok: bool, extra: String| {
            let detail = if ok {
                format!("{url} ready{extra}")
            } else {
                format!("{url} not reachable or not ready")
            };
            ComponentHealth::new(name, ok, false, detail)
        };
        let mirror = if s.mirror.synced() {
            format!("; {} active mitigations mirrored", s.mirror.len())
        } else {
            "; mirror not synced".to_string()
        };
        // Counted in the store, so only when it answers (the store's own line says
        // when it does not).
        let (workers, proxies) = match store_ok {
            true => tokio::join!(
                alive_within(s.heartbeats.workers.alive()),
                alive_within(s.heartbeats.proxies.alive()),
            ),
            false => (None, None),
        };
        // Not counted is not none: "0 alive" would send an operator after workers that
        // are running.
        let alive = |n: Option<u64>| match n {
            Some(n) => format!("{n} alive"),
            None => "unknown: the control store cannot be read".to_string(),
        };
        HealthReport::new(
            "esper-server",
            vec![
                store,
                broker(
                    "ingestion_broker",
                    &s.ingestion.url(),
                    ingestion,
                    String::new(),
                ),
                broker("mitigation_broker", &s.mitigation.url(), mitigation, mirror),
                ComponentHealth::new(
                    "workers",
                    workers.is_some_and(|n| n > 0),
                    false,
                    alive(workers),
                ),
                ComponentHealth::new("proxies", true, false, alive(proxies)),
            ],
        )
    }
}

async fn alive_within(count: impl Future<Output = Result<u64, StoreError>>) -> Option<u64> {
    match tokio::time::timeout(STORE_TIMEOUT, count).await {
        Ok(Ok(n)) => Some(n),
        _ => None,
    }
}
