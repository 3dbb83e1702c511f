//! The parts of a policy beyond "count matching requests": expressions, aggregates,
//! escalation ladders and sequences, with their validation.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::forms::{opt_duration, opt_number};
use super::spec::{
    ActionKind, FieldError, MAX_COUNT, MAX_TTL, MIN_TTL, PolicySpec, check_action, field,
};
use crate::expr::{Lists, ValueField, compile_filter, compile_value};

/// Most distinct values tracked exactly per entity; `distinct(...)` thresholds may not
/// exceed it (see [`crate::eval::window::DistinctWindow`]).
pub const MAX_DISTINCT: usize = 4096;
/// Most steps of an escalation ladder or a sequence.
pub const MAX_STEPS: usize = 16;
/// Largest `min` of a sequence step.
pub const MAX_REPEAT: u32 = 10_000;

/// What a policy measures over its window.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum AggregateSpec {
    /// The weighted count of counted requests.
    #[default]
    Count,
    /// The weighted count divided by the window in seconds: requests per second.
    Rate,
    /// The weighted sum of a numeric field (`sum(bytes)`).
    Sum(String),
    /// How many different values of a field (`distinct(path)`); weights do not apply.
    Distinct(String),
}

impl AggregateSpec {
    pub fn is_count(&self) -> bool {
        *self == AggregateSpec::Count
    }

    /// The field of `sum` and `distinct`.
    pub fn value_field(&self) -> Option<Result<ValueField, String>> {
        match self {
            AggregateSpec::Sum(f) | AggregateSpec::Distinct(f) => {
                Some(compile_value(f).map_err(|e| e.message))
            }
            _ => None,
        }
    }
}

impl FromStr for AggregateSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let inner = |name: &str| {
            s.strip_prefix(name)
                .and_then(|r| r.trim_start().strip_prefix('('))
                .and_then(|r| r.strip_suffix(')'))
                .map(|f| f.trim().to_string())
        };
        let agg = match s {
            "count" => return Ok(AggregateSpec::Count),
            "rate" => return Ok(AggregateSpec::Rate),
            _ => match (inner("sum"), inner("distinct")) {
                (Some(f), _) => AggregateSpec::Sum(f),
                (_, Some(f)) => AggregateSpec::Distinct(f),
                _ => {
                    return Err(format!(
                        "unknown aggregate \"{s}\" (expected count, rate, sum(FIELD) or distinct(FIELD))"
                    ));
                }
            },
        };
        match agg.value_field() {
            Some(Err(e)) => Err(format!("aggregate \"{s}\": {e}")),
            Some(Ok(ValueField::Str(_) | ValueField::ClientIp))
                if matches!(agg, AggregateSpec::Sum(_)) =>
            {
                Err(format!(
                    "aggregate \"{s}\": sum needs a number field (bytes, latency_us, status)"
                ))
            }
            _ => Ok(agg),
        }
    }
}

impl fmt::Display for AggregateSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AggregateSpec::Count => f.write_str("count"),
            AggregateSpec::Rate => f.write_str("rate"),
            AggregateSpec::Sum(x) => write!(f, "sum({x})"),
            AggregateSpec::Distinct(x) => write!(f, "distinct({x})"),
        }
    }
}

impl Serialize for AggregateSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for AggregateSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// One rung of an escalation ladder. It applies when all its conditions hold; the last
/// applicable rung wins, and the policy's own action is the rung below the first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EscalationStep {
    /// Applies from this offense on: 2 = the second decision against the same entity
    /// (remembered for the engine's state TTL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat: Option<u32>,
    /// Applies when the measured value reaches this; also escalates a standing decision.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "opt_number"
    )]
    pub threshold: Option<f64>,
    pub action: ActionKind,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "opt_number"
    )]
    pub rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "opt_duration"
    )]
    pub delay: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub difficulty: Option<u8>,
    /// Default: the policy's ttl.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "opt_duration"
    )]
    pub ttl: Option<Duration>,
}

/// One step of a sequence: a condition that must match `min` times (default 1), after
/// the previous step, before the next step can match.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SequenceStep {
    pub when: String,
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub min: u32,
}

fn one() -> u32 {
    1
}

fn is_one(v: &u32) -> bool {
    *v == 1
}

fn expr_error(key: String, e: crate::expr::ExprError) -> FieldError {
    FieldError {
        key,
        message: e.message,
        offset: Some(e.offset),
    }
}

impl PolicySpec {
    pub(super) fn check_advanced(&self) -> Result<(), FieldError> {
        for (key, src) in [("filter", &self.filter), ("count_if", &self.count_if)] {
            if let Some(src) = src {
                compile_filter(src, &mut Lists::new(None))
                    .map_err(|e| expr_error(key.to_string(), e))?;
            }
        }
        if let AggregateSpec::Distinct(_) = self.aggregate
            && self.threshold > MAX_DISTINCT as f64
        {
            return Err(field(
                "threshold",
                format!(
                    "a distinct count is exact up to {MAX_DISTINCT} values; threshold {} is above it",
                    self.threshold
                ),
            ));
        }
        if let Some(g) = self.ttl_growth
            && !(g.is_finite() && (1.0..=100.0).contains(&g))
        {
            return Err(field(
                "ttl_growth",
                format!("ttl_growth {g} must be 1 to 100"),
            ));
        }
        if let Some(max) = self.ttl_max
            && (max < self.ttl || max > MAX_TTL)
        {
            return Err(field(
                "ttl_max",
                format!(
                    "ttl_max {} must be at least ttl and at most 30days",
                    humantime::format_duration(max)
                ),
            ));
        }
        self.check_escalation()?;
        self.check_sequence()
    }

    fn check_escalation(&self) -> Result<(), FieldError> {
        if self.escalation.len() > MAX_STEPS {
            return Err(field(
                "escalation",
                format!("at most {MAX_STEPS} escalation steps"),
            ));
        }
        let (mut last_repeat, mut last_threshold) = (1, self.threshold);
        for (i, step) in self.escalation.iter().enumerate() {
            let key = |k: &str| format!("escalation.{i}.{k}");
            if step.repeat.is_none() && step.threshold.is_none() {
                return Err(field(
                    key("action"),
                    "an escalation step needs `repeat` (offense number) or `threshold`",
                ));
            }
            if let Some(r) = step.repeat {
                if r < last_repeat || r > MAX_REPEAT {
                    return Err(field(
                        key("repeat"),
                        format!(
                            "repeat {r} must be at least {last_repeat} (steps go up) and at most {MAX_REPEAT}"
                        ),
                    ));
                }
                last_repeat = r;
            }
            if let Some(t) = step.threshold {
                if !(t.is_finite() && t >= last_threshold && t <= MAX_COUNT) {
                    return Err(field(
                        key("threshold"),
                        format!(
                            "threshold {t} must be at least {last_threshold} (the threshold below it)"
                        ),
                    ));
                }
                // A distinct count stops at the cap: a step above it would never apply.
                if let AggregateSpec::Distinct(_) = self.aggregate
                    && t > MAX_DISTINCT as f64
                {
                    return Err(field(
                        key("threshold"),
                        format!(
                            "a distinct count is exact up to {MAX_DISTINCT} values; threshold {t} is above it"
                        ),
                    ));
                }
                last_threshold = t;
            }
            check_action(
                step.action,
                step.rate,
                step.burst,
                step.delay,
                step.difficulty,
                &format!("escalation.{i}."),
            )?;
            if let Some(ttl) = step.ttl
                && (ttl < MIN_TTL || ttl > MAX_TTL)
            {
                return Err(field(key("ttl"), "ttl is out of range (1s to 30days)"));
            }
        }
        Ok(())
    }

    fn check_sequence(&self) -> Result<(), FieldError> {
        if self.sequence.is_empty() {
            return Ok(());
        }
        if self.sequence.len() > MAX_STEPS {
            return Err(field(
                "sequence",
                format!("at most {MAX_STEPS} sequence steps"),
            ));
        }
        if !self.aggregate.is_count() {
            return Err(field(
                "aggregate",
                "a sequence policy counts completed sequences; it takes no aggregate",
            ));
        }
        if self.count_if.is_some() {
            return Err(field(
                "count_if",
                "count_if does not apply to a sequence policy (its steps say what counts)",
            ));
        }
        for (i, step) in self.sequence.iter().enumerate() {
            compile_filter(&step.when, &mut Lists::new(None))
                .map_err(|e| expr_error(format!("sequence.{i}.when"), e))?;
            if step.min == 0 || step.min > MAX_REPEAT {
                return Err(field(
                    format!("sequence.{i}.min"),
                    format!("min {} must be 1 to {MAX_REPEAT}", step.min),
                ));
            }
        }
        Ok(())
    }

    /// The policy's condition as written: its `match` table, filter, counting filter or
    /// sequence (`(a){5,} then (b)`).
    pub fn condition(&self) -> String {
        let mut parts = Vec::new();
        if !self.matches.is_empty() {
            let m = serde_json::to_string(&self.matches).unwrap_or_default();
            parts.push(format!("match {m}"));
        }
        if let Some(f) = &self.filter {
            parts.push(f.trim().to_string());
        }
        if let Some(c) = &self.count_if {
            parts.push(format!("counting {}", c.trim()));
        }
        if !self.sequence.is_empty() {
            let steps: Vec<String> = self
                .sequence
                .iter()
                .map(|s| {
                    if s.min > 1 {
                        format!("({}){{{},}}", s.when.trim(), s.min)
                    } else {
                        format!("({})", s.when.trim())
                    }
                })
                .collect();
            parts.push(steps.join(" then "));
        }
        if parts.is_empty() {
            "every request".to_string()
        } else {
            parts.join("; ")
        }
    }

    /// The ttl of a decision at escalation `level` (0 = the policy's own action) for
    /// offense number `offense` (1 = first), grown and capped.
    pub fn ttl_for(&self, level: usize, offense: u32) -> Duration {
        let base = level
            .checked_sub(1)
            .and_then(|i| self.escalation.get(i))
            .and_then(|s| s.ttl)
            .unwrap_or(self.ttl);
        let Some(growth) = self.ttl_growth else {
            return base;
        };
        let cap = self.ttl_max.unwrap_or(MAX_TTL).max(base);
        let factor = growth.powi(i32::try_from(offense.saturating_sub(1)).unwrap_or(i32::MAX));
        let grown = base.as_secs_f64() * factor;
        if grown.is_finite() && grown < cap.as_secs_f64() {
            Duration::from_secs_f64(grown)
        } else {
            cap
        }
    }
}
