//! The enforcement filter: looks the request's keys up in the mitigation cache and turns
//! the strictest mitigation found into a verdict (forward, block, throttle, tarpit).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use esper_protocol::{Action, EnforcedAction};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::cache::{Hit, MitigationCache, RequestKeys};
use crate::metrics::Metrics;
use crate::throttle::{Throttles, retry_after_secs};

/// What to do with one request.
#[derive(Debug)]
pub enum Verdict {
    /// Send it upstream, recording this action (`Allow`).
    Forward(EnforcedAction),
    /// Send it upstream, recording that this log-only mitigation matched.
    Logged(Hit),
    /// Answer 403.
    Block(Hit),
    /// Answer 429 with `Retry-After` (seconds).
    Throttled { retry_after: u64, mitigation: Hit },
    /// Hold it for `delay` (holding `permit`), then send it upstream.
    Tarpit {
        delay: Duration,
        permit: OwnedSemaphorePermit,
        mitigation: Hit,
    },
    /// A tarpit applies but every slot is taken: answer 429.
    TarpitFull(Hit),
    /// Let it through only with a valid clearance cookie; otherwise answer the puzzle.
    Challenge { difficulty: u8, mitigation: Hit },
}

/// Decides the verdict of each request from the cache.
pub struct Enforcer {
    cache: Arc<MitigationCache>,
    metrics: Arc<Metrics>,
    throttles: Throttles,
    tarpit_slots: Arc<Semaphore>,
    tarpit_max: Duration,
}

impl Enforcer {
    /// An enforcer reading `cache`.
    pub fn new(
        cache: Arc<MitigationCache>,
        metrics: Arc<Metrics>,
        throttle_entities: usize,
        tarpit_concurrency: usize,
        tarpit_max: Duration,
    ) -> Enforcer {
        Enforcer {
            cache,
            metrics,
            throttles: Throttles::new(throttle_entities),
            tarpit_slots: Arc::new(Semaphore::new(tarpit_concurrency)),
            tarpit_max,
        }
    }

    /// The verdict for a request for `app` from `ip` with `headers` (no path or TLS
    /// keys), arrived at `now`.
    #[cfg(test)]
    pub fn decide(
        &self,
        app: &str,
        ip: std::net::IpAddr,
        headers: &http::HeaderMap,
        now: DateTime<Utc>,
    ) -> Verdict {
        self.decide_request(
            &RequestKeys {
                app,
                ip,
                headers,
                path: "",
                ja4: None,
            },
            now,
        )
    }

    /// The verdict for a request by all its keys (path template and TLS fingerprint
    /// included), arrived at `now`. Never waits.
    pub fn decide_request(&self, req: &RequestKeys<'_>, now: DateTime<Utc>) -> Verdict {
        let found = self.cache.lookup_request(req, now);
        self.metrics.lookup(found.is_some());
        self.verdict(found)
    }

    /// The verdict for a client whose clearance cookie clears challenges up to difficulty
    /// `earned`: what else is in force for it (a tarpit, a throttle, a log, a harder
    /// challenge published since) still applies.
    pub fn decide_cleared(&self, req: &RequestKeys<'_>, now: DateTime<Utc>, earned: u8) -> Verdict {
        self.verdict(self.cache.lookup_cleared(req, now, earned))
    }

    fn verdict(&self, found: Option<Hit>) -> Verdict {
        let Some(m) = found else {
            return Verdict::Forward(EnforcedAction::Allow);
        };
        match m.action {
            Action::Block => Verdict::Block(m),
            Action::Challenge { difficulty } => Verdict::Challenge {
                difficulty,
                mitigation: m,
            },
            Action::Log => Verdict::Logged(m),
            Action::Throttle { rate, burst } => {
                match self
                    .throttles
                    .take(&m.id.text(), rate, burst, Instant::now())
                {
                    // Within its rate the request goes through as if unmitigated.
                    Ok(()) => Verdict::Forward(EnforcedAction::Allow),
                    Err(wait) => Verdict::Throttled {
                        retry_after: retry_after_secs(wait),
                        mitigation: m,
                    },
                }
            }
            Action::Tarpit { delay_ms } => match self.tarpit_slots.clone().try_acquire_owned() {
                Ok(permit) => Verdict::Tarpit {
                    delay: Duration::from_millis(delay_ms).min(self.tarpit_max),
                    permit,
                    mitigation: m,
                },
                Err(_) => Verdict::TarpitFull(m),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use esper_protocol::{Mitigation, Origin, Reason};
    use http::HeaderMap;

    use super::*;

    fn enforcer(action: Action, tarpit_slots: usize) -> Enforcer {
        let cache = Arc::new(MitigationCache::new());
        cache.upsert(Mitigation::new(
            "ip:192.0.2.1".parse().unwrap(),
            action,
            Duration::from_secs(60),
            Origin::Manual,
            Reason::default(),
        ));
        Enforcer::new(
            cache,
            Arc::new(Metrics::new()),
            100,
            tarpit_slots,
            Duration::from_secs(2),
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn verdicts_follow_the_action() {
        let h = HeaderMap::new();
        let e = enforcer(Action::Block, 1);
        assert!(matches!(
            e.decide("default", ip("192.0.2.1"), &h, Utc::now()),
            Verdict::Block(_)
        ));
        assert!(matches!(
            e.decide("default", ip("192.0.2.2"), &h, Utc::now()),
            Verdict::Forward(EnforcedAction::Allow)
        ));
        let e = enforcer(Action::Log, 1);
        assert!(matches!(
            e.decide("default", ip("192.0.2.1"), &h, Utc::now()),
            Verdict::Logged(_)
        ));
        let e = enforcer(
            Action::Throttle {
                rate: 1.0,
                burst: 2,
            },
            1,
        );
        for _ in 0..2 {
            assert!(matches!(
                e.decide("default", ip("192.0.2.1"), &h, Utc::now()),
                Verdict::Forward(_)
            ));
        }
        assert!(matches!(
            e.decide("default", ip("192.0.2.1"), &h, Utc::now()),
            Verdict::Throttled { retry_after: 1, .. }
        ));
    }

    #[test]
    fn tarpits_are_capped_and_bounded() {
        let h = HeaderMap::new();
        let e = enforcer(Action::Tarpit { delay_ms: 60_000 }, 1);
        let first = e.decide("default", ip("192.0.2.1"), &h, Utc::now());
        let Verdict::Tarpit { delay, .. } = &first else {
            panic!("expected a tarpit, got {first:?}")
        };
        assert_eq!(*delay, Duration::from_secs(2));
        assert!(matches!(
            e.decide("default", ip("192.0.2.1"), &h, Utc::now()),
            Verdict::TarpitFull(_)
        ));
        drop(first);
        assert!(matches!(
            e.decide("default", ip("192.0.2.1"), &h, Utc::now()),
            Verdict::Tarpit { .. }
        ));
    }
}
