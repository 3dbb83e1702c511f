//! Keeps the mitigation cache fresh: long-polls the mitigation broker's delta stream,
//! applies snapshots and deltas, and resumes from its cursor after an outage (the cache
//! is kept meanwhile; expiry still applies). Also the periodic expiry sweep.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use esper_common::Shutdown;
use esper_protocol::{ClientError, MitigationClient};

use crate::cache::MitigationCache;
use crate::metrics::Metrics;
use crate::status::Status;

/// First delay after a failed poll; doubles up to `MAX_BACKOFF`.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often expired mitigations are freed (lookups ignore them already).
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Follows the delta stream into `cache` until shutdown.
pub async fn follow(
    client: MitigationClient,
    cache: Arc<MitigationCache>,
    metrics: Arc<Metrics>,
    status: Arc<Status>,
    wait: Duration,
    shutdown: Shutdown,
) {
    let mut cursor: Option<String> = None;
    let mut backoff = MIN_BACKOFF;
    let mut failures: u32 = 0;
    loop {
        let polled = tokio::select! {
            r = client.stream(cursor.as_deref(), wait) => r,
            _ = shutdown.wait() => break,
        };
        match polled {
            Ok(page) => {
                let n = page.changes.len() as u64;
                if page.snapshot {
                    cache.replace(page.changes, Utc::now());
                } else {
                    cache.apply(page.changes, Utc::now());
                }
                cursor = Some(page.cursor);
                metrics.deltas_applied.inc_by(n);
                metrics.cache_entries.set(cache.len() as i64);
                metrics.stream_connected.set(1);
                status.stream_result(Ok(()));
                if failures > 0 {
                    tracing::info!(url = client.url(), "following the mitigation stream again");
                }
                failures = 0;
                backoff = MIN_BACKOFF;
            }
            Err(e) => {
                metrics.stream_connected.set(0);
                status.stream_result(Err(e.to_string()));
                if failures == 0 {
                    tracing::warn!(error = %e, cached = cache.len(), "mitigation stream lost; enforcing the cached mitigations");
                } else {
                    tracing::debug!(error = %e, "mitigation stream still unavailable");
                }
                failures = failures.saturating_add(1);
                // A refused cursor (a 4xx) will not get better: start over from a snapshot.
                if matches!(e, ClientError::Api { status, .. } if (400..500).contains(&status)) {
                    cursor = None;
                }
                if shutdown.sleep(backoff).await {
                    break;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    metrics.stream_connected.set(0);
}

/// Frees expired mitigations every `SWEEP_INTERVAL` until shutdown.
pub async fn sweep(cache: Arc<MitigationCache>, metrics: Arc<Metrics>, shutdown: Shutdown) {
    while !shutdown.sleep(SWEEP_INTERVAL).await {
        let freed = cache.sweep(Utc::now());
        if freed > 0 {
            tracing::debug!(freed, "expired mitigations freed");
        }
        metrics.cache_entries.set(cache.len() as i64);
    }
}
