//! The evaluator: matches a batch of events against the compiled policies, counts them
//! per (policy, entity) in sliding windows of event time, and turns threshold crossings
//! into decisions.
//!
//! - Windows run on event time (`event.timestamp`), so a replay gives the same counts;
//!   events stamped in the future (clock skew) count as "now", events older than an
//!   entity's window are ignored. See [`window`] for the precision.
//! - A policy fires for an entity when its weighted count reaches the threshold and no
//!   decision of that policy stands for the entity; the decision then stands (cooldown)
//!   for the policy's `ttl` in wall-clock time, as proxies enforce it.
//! - Shadow policies decide the same way, but their decisions are never published.
//! - Each batch is applied to the state, then committed once its effects are published,
//!   or rolled back (see [`state`]).

mod clock;
mod compile;
mod marks;
pub mod memory;
mod outbox;
pub mod postgres;
pub mod redis;
pub mod state;
pub mod window;

use std::borrow::Cow;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use esper_protocol::{
    Decision, DecisionMode, Mitigation, Origin, Reason, RequestEvent, RevokedDecision,
};
use prometheus::{CounterVec, IntCounter, IntCounterVec, Opts, Registry};

pub use clock::{Reading, StateClock};
pub use compile::{CompiledPolicy, PolicySet, policy_key};

use crate::policy::AggregateSpec;
pub use memory::MemoryState;
pub use postgres::{PostgresState, PostgresStateConfig};
pub use redis::{RedisState, RedisStateConfig};
pub use state::{
    Claim, LogAppend, Logged, PolicyKey, Receipt, StateBackend, StateError, StateStats, StoreTime,
};

use state::{BatchInput, BatchPolicy, EventHits, Hit, Revoked};

/// Largest weight one event may carry (a sample rate of one in a million).
const MAX_WEIGHT: f64 = 1e6;

/// The evaluator's Prometheus figures.
#[derive(Clone)]
struct Metrics {
    decisions: IntCounterVec,
    would_have: IntCounterVec,
    events: IntCounter,
    duplicates: IntCounter,
    late: IntCounter,
    rearmed: IntCounter,
    weighted: CounterVec,
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("metric definitions are valid")
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("metric definitions are valid")
}

impl Metrics {
    fn new(registry: &Registry) -> Metrics {
        let m = Metrics {
            decisions: counter_vec(
                "esper_decisions_total",
                "Decisions made, by policy and mode",
                &["policy", "mode"],
            ),
            would_have: counter_vec(
                "esper_would_have_mitigated_total",
                "Decisions of shadow policies, which are never enforced",
                &["policy"],
            ),
            events: counter(
                "esper_events_evaluated_total",
                "Events evaluated (duplicates excluded)",
            ),
            duplicates: counter(
                "esper_duplicate_events_total",
                "Events skipped because their id was already processed",
            ),
            late: counter(
                "esper_late_events_total",
                "Policy hits ignored because the event is older than the window",
            ),
            rearmed: counter(
                "esper_policies_rearmed_total",
                "(policy, entity) pairs whose standing decision was revoked and which \
                 decide again on the next threshold crossing",
            ),
            weighted: CounterVec::new(
                Opts::new(
                    "esper_policy_matches_weighted_total",
                    "Weighted events that matched each policy",
                ),
                &["policy"],
            )
            .expect("metric definitions are valid"),
        };
        for c in [&m.decisions, &m.would_have] {
            esper_common::metrics::register(registry, c);
        }
        for c in [&m.events, &m.duplicates, &m.late, &m.rearmed] {
            esper_common::metrics::register(registry, c);
        }
        esper_common::metrics::register(registry, &m.weighted);
        m
    }
}

/// The outcome of one batch, waiting to be committed or rolled back.
#[derive(Debug)]
pub struct Evaluation {
    /// Every decision, enforce and shadow.
    pub decisions: Vec<Decision>,
    /// Events counted (not duplicates).
    pub evaluated: usize,
    /// Events skipped as already processed.
    pub duplicates: usize,
    /// Per event: in flight in another batch; leave its item unacknowledged so it comes
    /// back if that batch fails.
    pub busy: Vec<bool>,
    /// Hits ignored as older than their window.
    pub late: usize,
    receipt: Receipt,
    /// (policy id, weight) per policy with counted hits, for metrics on commit.
    weighted: Vec<(Arc<str>, f64)>,
}

impl Evaluation {
    /// The mitigations to publish: those of enforce-mode decisions.
    pub fn mitigations(&self) -> Vec<Mitigation> {
        self.decisions
            .iter()
            .filter(|d| d.mode == DecisionMode::Enforce)
            .map(|d| d.mitigation.clone())
            .collect()
    }
}

/// Evaluates batches against a state backend.
#[derive(Clone)]
pub struct Evaluator {
    state: Arc<dyn StateBackend>,
    clock: Arc<StateClock>,
    decided_by: String,
    metrics: Metrics,
}

impl Evaluator {
    /// `decided_by` (the worker id) is recorded in every decision; metrics go to
    /// `registry`.
    pub fn new(state: Arc<dyn StateBackend>, decided_by: &str, registry: &Registry) -> Evaluator {
        Evaluator {
            state,
            clock: Arc::new(StateClock::default()),
            decided_by: decided_by.to_string(),
            metrics: Metrics::new(registry),
        }
    }

    pub fn state(&self) -> &Arc<dyn StateBackend> {
        &self.state
    }

    /// The time to evaluate by: the shared state's clock, once synced.
    pub fn clock(&self) -> &StateClock {
        &self.clock
    }

    /// Evaluates `events` with `policies` at wall-clock time `now`. The state is changed
    /// provisionally: [`Evaluator::commit`] or [`Evaluator::rollback`] must follow.
    pub async fn evaluate(
        &self,
        policies: &PolicySet,
        events: &[RequestEvent],
        now: DateTime<Utc>,
    ) -> Result<Evaluation, StateError> {
        let now_ms = now.timestamp_millis();
        let input = BatchInput {
            policies: policies
                .policies()
                .iter()
                .map(|p| BatchPolicy {
                    key: p.key.clone(),
                    params: p.params,
                    rules: p.rules.clone(),
                })
                .collect(),
            events: events
                .iter()
                .map(|ev| hits_of(policies, ev, now_ms))
                .collect(),
        };
        let outcome = self.state.apply(&input, now_ms).await?;
        // Summed per policy here, so that commit touches each metric once per batch.
        let mut sums = vec![0.0; policies.len()];
        for (ev, dup) in input.events.iter().zip(&outcome.duplicate) {
            if !dup {
                for hit in ev.hits.iter().filter(|h| h.weight > 0.0) {
                    if let Some(sum) = sums.get_mut(hit.policy) {
                        *sum += hit.weight;
                    }
                }
            }
        }
        let weighted = sums
            .iter()
            .zip(policies.policies())
            .filter(|(sum, _)| **sum > 0.0)
            .map(|(sum, p)| (p.key.id.clone(), *sum))
            .collect();
        let decisions = outcome
            .crossings
            .iter()
            .filter_map(|c| {
                let hit = input.events.get(c.event)?.hits.get(c.hit)?;
                let policy = policies.policies().get(hit.policy)?;
                let event = events.get(c.event)?;
                Some(self.decision(policy, event, hit, c, now))
            })
            .collect();
        let skipped = outcome.duplicate.iter().filter(|d| **d).count();
        let busy = outcome.busy.iter().filter(|b| **b).count();
        Ok(Evaluation {
            decisions,
            evaluated: events.len() - skipped,
            duplicates: skipped - busy,
            busy: outcome.busy,
            late: outcome.late,
            receipt: outcome.receipt,
            weighted,
        })
    }

    /// The evaluation's effects are published: make its state changes final.
    pub async fn commit(&self, eval: &Evaluation, now: DateTime<Utc>) -> Result<(), StateError> {
        self.commit_with(eval, LogAppend::default(), now)
            .await
            .map(|_| ())
    }

    /// [`Evaluator::commit`], appending `log`'s records to the state's outbox in the
    /// same step.
    pub async fn commit_with(
        &self,
        eval: &Evaluation,
        log: LogAppend<'_>,
        now: DateTime<Utc>,
    ) -> Result<Logged, StateError> {
        let logged = self
            .state
            .commit_with(&eval.receipt, log, now.timestamp_millis())
            .await?;
        let m = &self.metrics;
        m.events.inc_by(eval.evaluated as u64);
        m.duplicates.inc_by(eval.duplicates as u64);
        m.late.inc_by(eval.late as u64);
        for (policy, weight) in &eval.weighted {
            m.weighted
                .with_label_values(&[policy.as_ref()])
                .inc_by(*weight);
        }
        for d in &eval.decisions {
            let policy = d.policy_id.as_deref().unwrap_or("");
            let mode = match d.mode {
                DecisionMode::Enforce => "enforce",
                DecisionMode::Shadow => "shadow",
            };
            m.decisions.with_label_values(&[policy, mode]).inc();
            if d.mode == DecisionMode::Shadow {
                m.would_have.with_label_values(&[policy]).inc();
            }
        }
        Ok(logged)
    }

    /// The evaluation's effects could not be published: undo its state changes.
    pub async fn rollback(&self, eval: &Evaluation) -> Result<(), StateError> {
        self.state.rollback(&eval.receipt).await
    }

    /// Re-arms the policies of revoked decisions for their entities (see
    /// [`StateBackend::forgive`]); revocations of policies not in `policies` are skipped.
    /// Returns how many (policy, entity) pairs were re-armed.
    pub async fn forgive(
        &self,
        policies: &PolicySet,
        revoked: &[RevokedDecision],
        now: DateTime<Utc>,
    ) -> Result<usize, StateError> {
        let list: Vec<Revoked> = revoked
            .iter()
            .filter_map(|r| {
                let p = policies
                    .policies()
                    .iter()
                    .find(|p| *p.key.id == *r.policy_id)?;
                Some(Revoked {
                    policy: p.key.clone(),
                    entity: r.entity.clone(),
                    decided_at_ms: r.decided_at.timestamp_millis(),
                })
            })
            .collect();
        if list.is_empty() {
            return Ok(0);
        }
        let n = self.state.forgive(&list, now.timestamp_millis()).await?;
        self.metrics.rearmed.inc_by(n as u64);
        Ok(n)
    }

    /// Switches to `policies`: state of unchanged policies is kept, the rest dropped.
    pub async fn install(&self, policies: &PolicySet) -> Result<(), StateError> {
        self.state.retain(&policies.keys()).await
    }

    fn decision(
        &self,
        policy: &CompiledPolicy,
        event: &RequestEvent,
        hit: &Hit,
        crossing: &state::Crossing,
        now: DateTime<Utc>,
    ) -> Decision {
        let spec = &policy.spec;
        let threshold = crossing
            .level
            .checked_sub(1)
            .and_then(|i| spec.escalation.get(i))
            .and_then(|s| s.threshold)
            .unwrap_or(spec.threshold);
        let counted = crossing.counted;
        let measure = if policy.is_sequence() {
            "completed sequences".to_string()
        } else {
            match &spec.aggregate {
                AggregateSpec::Count => "weighted events".to_string(),
                AggregateSpec::Rate => "requests/s".to_string(),
                other => other.to_string(),
            }
        };
        let mut summary = format!(
            "{} {measure} >= {} in {}s ({} {}",
            number(counted),
            number(threshold),
            policy.window_secs(),
            event.method,
            event.path.split('?').next().unwrap_or(""),
        );
        if event.status != 0 {
            summary.push_str(&format!(" {}", event.status));
        }
        summary.push(')');
        if crossing.level > 0 || crossing.offense > 1 {
            summary.push_str(&format!(
                " escalation step {}, offense {}",
                crossing.level, crossing.offense
            ));
        }
        if !policy.condition.is_empty() {
            summary.push_str("; when ");
            summary.push_str(&policy.condition);
        }
        let ttl = chrono::Duration::milliseconds(crossing.ttl_ms);
        let action = policy
            .actions
            .get(crossing.level)
            .unwrap_or(&policy.action)
            .clone();
        let mitigation = Mitigation {
            id: uuid::Uuid::new_v4().to_string(),
            entity: hit.entity.clone(),
            action,
            scope: policy.scope.clone(),
            reason: Reason {
                policy_id: Some(spec.id.clone()),
                summary,
            },
            origin: Origin::Policy,
            created_at: now,
            expires_at: now
                .checked_add_signed(ttl)
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
        };
        Decision {
            id: mitigation.id.clone(),
            mitigation,
            mode: policy.mode,
            policy_id: Some(spec.id.clone()),
            policy_version: policy.version,
            counted: Some(counted),
            threshold: Some(threshold),
            window_secs: Some(policy.window_secs()),
            decided_by: self.decided_by.clone(),
            decided_at: now,
        }
    }
}

/// `ev` with its path in the form servers resolve it to (`//login`, `/./login`,
/// `/login;jsessionid=1` and `/%6Cogin` are all `/login`), so a policy's paths, prefixes
/// and `path` conditions see what the app sees and cannot be stepped around by writing
/// the path another way. Only an event whose path is not already normal is copied.
fn with_normal_path(ev: &RequestEvent) -> Cow<'_, RequestEvent> {
    let (path, query) = match ev.path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (ev.path.as_str(), None),
    };
    match esper_protocol::normalize_path(path) {
        Cow::Borrowed(_) => Cow::Borrowed(ev),
        Cow::Owned(normal) => {
            let mut copy = ev.clone();
            copy.path = match query {
                Some(q) => format!("{normal}?{q}"),
                None => normal,
            };
            Cow::Owned(copy)
        }
    }
}

/// The (policy, entity) hits of one event.
fn hits_of(policies: &PolicySet, ev: &RequestEvent, now_ms: i64) -> EventHits {
    let ev = &*with_normal_path(ev);
    // Future timestamps (clock skew) count as now; bad weights as one event.
    let at_ms = ev.timestamp.timestamp_millis().min(now_ms);
    let weight = if ev.weight.is_finite() && ev.weight > 0.0 {
        ev.weight.min(MAX_WEIGHT)
    } else {
        1.0
    };
    let ip = ev.client_ip.to_canonical();
    let mut hits = Vec::new();
    if policies.allowed(ip) {
        return EventHits {
            id: ev.id.clone(),
            hits,
        };
    }
    for (i, p) in policies.policies().iter().enumerate() {
        if !p.matches_ip(ev, ip) {
            continue;
        }
        let steps = if p.is_sequence() {
            p.step_mask(ev, ip)
        } else {
            0
        };
        if p.is_sequence() && steps == 0 {
            continue;
        }
        let Some(entity) = p.entity_of(ev) else {
            continue;
        };
        let counts = p.counts(ev, ip);
        hits.push(Hit {
            policy: i,
            entity,
            at_ms,
            weight: if counts { p.amount(ev, weight) } else { 0.0 },
            distinct: if counts { p.distinct_value(ev) } else { None },
            steps,
        });
    }
    // Only events with hits are deduplicated, so only they need their id.
    let id = if hits.is_empty() {
        String::new()
    } else {
        ev.id.clone()
    };
    EventHits { id, hits }
}

/// `12`, or `12.5` for fractional weighted counts.
fn number(v: f64) -> String {
    if v.fract().abs() < 1e-9 {
        format!("{}", v.round() as i64)
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod advanced_tests;

#[cfg(test)]
mod window_props;
