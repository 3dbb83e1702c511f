//! Keeps the mitigation cache fresh: long-polls the mitigation broker's delta stream,
//! applies snapshots and deltas, and resumes from its cursor after an outage (the cache
//! is kept meanwhile; expiry still applies). Also the periodic expiry sweep.
//!
//! A snapshot arrives in pages. They are assembled into a fresh index while the cache
//! keeps enforcing what it holds, and the whole is swapped in once the last page is in;
//! then the deltas after the snapshot's cursor bring it up to date. When a page fails,
//! the partial snapshot is dropped and the next attempt starts it over.
//!
//! The proxy may know several broker instances (`mitigation_url` as a comma-separated
//! list). It follows one; when that one fails it moves on to the next at once, with the
//! same cursor: instances over one Redis share the change stream, so the cursor is valid
//! on each and the proxy resumes without a snapshot. (An instance that does not know the
//! cursor answers with a snapshot, so a cursor is never trusted where it means nothing.)
//! Only when every instance has failed in a row does it back off.
//!
//! A reload may name other instances: the poll in flight is left, and the proxy follows
//! the first of the new list with its cursor (a broker that does not know it answers
//! with a snapshot).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use esper_common::Shutdown;
use esper_protocol::{ClientError, Endpoints, Instances, MitigationClient, Token};

use crate::cache::{MitigationCache, Overflow, SnapshotBuilder};
use crate::metrics::Metrics;
use crate::status::Status;

/// First delay after a failed poll; doubles up to `MAX_BACKOFF`.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often expired mitigations are freed (lookups ignore them already).
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// Least time between the starts of two long polls that bring nothing: a broker that
/// answers at once with no change must not make the proxy spin.
const MIN_EMPTY_POLL_SPACING: Duration = Duration::from_millis(250);
/// Least time between two snapshots taken because the full cache has room again: when
/// the broker holds more than the cache can, every snapshot fills it again and room
/// comes back with every expiry.
const ROOM_RELOAD_SPACING: Duration = Duration::from_secs(60);

/// A snapshot whose pages are arriving.
struct Pending {
    /// The cursor every page of this snapshot carries.
    cursor: String,
    /// The last page's continuation.
    more: String,
    /// `None` for a snapshot taken while the broker restores, whose pages are added to
    /// the cache as they come (see `DeltaPage::restoring`).
    snapshot: Option<SnapshotBuilder>,
}

/// One client per broker instance, all sending `token`.
pub fn clients(instances: &Instances, token: &Token) -> Vec<MitigationClient> {
    instances
        .urls()
        .iter()
        .map(|u| MitigationClient::new(u, None).with_token(token.clone()))
        .collect()
}

/// The broker URLs of a `mitigation_url` setting.
pub fn broker_urls(urls: &str) -> impl Iterator<Item = &str> {
    urls.split(',').map(str::trim).filter(|u| !u.is_empty())
}

/// Follows the delta stream of one of the instances of `brokers` into `cache` until
/// shutdown.
pub async fn follow(
    brokers: Endpoints,
    token: Token,
    cache: Arc<MitigationCache>,
    metrics: Arc<Metrics>,
    status: Arc<Status>,
    wait: Duration,
    shutdown: Shutdown,
) {
    let mut moved = brokers.subscribe();
    let mut clients = clients(&moved.borrow_and_update(), &token);
    let mut current = 0;
    let mut cursor: Option<String> = None;
    let mut backoff = MIN_BACKOFF;
    let mut failures: u32 = 0;
    let mut pending: Option<Pending> = None;
    // New mitigations are being refused for the cache's limit (warned once per episode).
    let mut full = false;
    let mut room_reloaded: Option<tokio::time::Instant> = None;
    // A reload named other instances (seen while polling or backing off).
    let mut relocated = false;
    loop {
        if relocated {
            relocated = false;
            clients = self::clients(&moved.borrow_and_update(), &token);
            tracing::info!(url = %brokers.given(), "following the mitigation broker at its new address");
            current = 0;
            pending = None;
            failures = 0;
            backoff = MIN_BACKOFF;
        }
        let asked = tokio::time::Instant::now();
        let client = &clients[current];
        let request = async {
            match &pending {
                Some(p) => client.snapshot_next(&p.cursor, &p.more).await,
                None => client.stream(cursor.as_deref(), wait).await,
            }
        };
        let polled = tokio::select! {
            r = request => Some(r),
            Ok(()) = moved.changed() => None,
            _ = shutdown.wait() => break,
        };
        let Some(polled) = polled else {
            relocated = true;
            continue;
        };
        match polled {
            Ok(page) => {
                let n = page.changes.len() as u64;
                let mut overflow = Overflow::default();
                if page.snapshot {
                    // A broker restoring from the decision log (its store empty at
                    // start, or lost) has not got back all that is in force: what the
                    // cache holds stays enforced, and the snapshot is added to it.
                    let whole = !page.restoring;
                    let mut snapshot = match pending.take() {
                        Some(p) if p.cursor == page.cursor => p.snapshot,
                        Some(_) => {
                            tracing::info!(
                                "the mitigation snapshot could not be continued; starting it over"
                            );
                            whole.then(|| cache.begin_snapshot())
                        }
                        None => whole.then(|| cache.begin_snapshot()),
                    };
                    match snapshot.as_mut() {
                        Some(s) => {
                            overflow += s.add(page.changes, Utc::now());
                            // Sized only when more pages follow: a snapshot that fit one
                            // page is already whole.
                            if let (Some(total), Some(_)) = (page.total, &page.more) {
                                s.expect(total);
                            }
                        }
                        None => overflow += cache.apply(page.changes, Utc::now()),
                    }
                    match page.more {
                        Some(more) => {
                            pending = Some(Pending {
                                cursor: page.cursor,
                                more,
                                snapshot,
                            });
                        }
                        None => {
                            metrics.stream_snapshots.inc();
                            match snapshot {
                                Some(s) => cache.install(s),
                                None => tracing::warn!(
                                    cached = cache.len(),
                                    "the mitigation broker is restoring from the decision log: \
                                     its snapshot was added to the cached mitigations, which \
                                     stay enforced until they expire or are revoked"
                                ),
                            }
                            cursor = Some(page.cursor);
                        }
                    }
                } else if pending.take().is_some() {
                    // Deltas cannot answer a snapshot page request; ask afresh.
                    tracing::warn!(
                        url = client.url(),
                        "the mitigation broker answered a snapshot page with deltas; starting over"
                    );
                    cursor = None;
                } else {
                    overflow += cache.apply(page.changes, Utc::now());
                    cursor = Some(page.cursor);
                }
                if !overflow.is_empty() {
                    metrics.cache_refused.inc_by(overflow.refused);
                    metrics.cache_evicted.inc_by(overflow.evicted);
                    if !full {
                        tracing::warn!(
                            limit = cache.limit(),
                            refused = overflow.refused,
                            evicted = overflow.evicted,
                            "the mitigation cache is full (cache_max_entries): new mitigations \
                             take the place of less severe ones, or are refused when none is \
                             held; what is left out is not enforced until others expire or \
                             are revoked and a fresh snapshot brings it in"
                        );
                    }
                    full = true;
                } else if full
                    && cache.len() < cache.limit()
                    && room_reloaded.is_none_or(|t| t.elapsed() >= ROOM_RELOAD_SPACING)
                {
                    // What was refused went past with the cursor: a snapshot brings it in.
                    tracing::info!("the mitigation cache has room again; reloading the snapshot");
                    full = false;
                    cursor = None;
                    room_reloaded = Some(tokio::time::Instant::now());
                }
                let idle = n == 0 && !page.snapshot && pending.is_none();
                if idle
                    && let Some(rest) = MIN_EMPTY_POLL_SPACING.checked_sub(asked.elapsed())
                    && shutdown.sleep(rest).await
                {
                    break;
                }
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
                // A partial snapshot is dropped: the next attempt starts it over.
                pending = None;
                metrics.stream_connected.set(0);
                status.stream_result(Err(e.to_string()));
                if failures == 0 {
                    tracing::warn!(error = %e, url = client.url(), cached = cache.len(), "mitigation stream lost; enforcing the cached mitigations");
                } else {
                    tracing::debug!(error = %e, url = client.url(), "mitigation stream still unavailable");
                }
                failures = failures.saturating_add(1);
                // A refused cursor (a 4xx) will not get better: start over from a snapshot.
                if matches!(e, ClientError::Api { status, .. } if (400..500).contains(&status)) {
                    cursor = None;
                }
                if clients.len() > 1 {
                    current = (current + 1) % clients.len();
                    metrics.stream_failovers.inc();
                    tracing::info!(
                        url = clients[current].url(),
                        "following the next mitigation broker"
                    );
                }
                // Back off only once every instance has failed in a row.
                if (failures as usize).is_multiple_of(clients.len()) {
                    tokio::select! {
                        stop = shutdown.sleep(backoff) => if stop {
                            break;
                        },
                        // The usual reason to move: the old address is down.
                        Ok(()) = moved.changed() => {
                            relocated = true;
                            continue;
                        }
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn one_url_or_a_comma_separated_list() {
        let urls: Vec<_> = broker_urls("http://a:8083").collect();
        assert_eq!(urls, ["http://a:8083"]);
        let list = " http://a:8083 , http://b:8083/,, ";
        let urls: Vec<_> = clients(&Endpoints::new(list).load(), &Token::default())
            .iter()
            .map(|c| c.url().to_string())
            .collect();
        assert_eq!(urls, ["http://a:8083", "http://b:8083"]);
    }

    #[test]
    fn every_listed_url_is_checked() {
        let mut cfg = Config {
            mitigation_url: "http://a:8083,http://b:8083".into(),
            upstream: "127.0.0.1:3000".into(),
            ..Config::default()
        };
        cfg.validate().unwrap();
        cfg.mitigation_url = "http://a:8083,b:8083".into();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("invalid mitigation_url = `b:8083`"), "{err}");
        cfg.mitigation_url = " , ".into();
        assert!(cfg.validate().is_err());
    }
}
