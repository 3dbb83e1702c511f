//! The Redis state backend: windows, cooldowns and processed event ids shared by every
//! worker that uses the same Redis and key prefix.
//!
//! Each step (`apply`, `commit`, `rollback`, `retain`, `cleanup`) is one Lua script run
//! (`EVALSHA`, loading the script when Redis does not know it yet), so a batch costs one
//! round trip per step and every step is atomic. The script runs the memory backend's
//! algorithm on the entities the batch touches; `tests/state.rs` holds both to the same
//! results.
//!
//! A worker that dies between `apply` and `commit` leaves a receipt behind: its in-flight
//! marks and an undo log. The receipt expires with the ingestion lease (`lease` after
//! `apply`); the next script that runs after that undoes it, so the redelivered events
//! count once. A `commit` after its receipt expired fails, and the batch is redelivered.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};

use super::state::{
    BatchInput, BatchOutcome, Claim, CleanupReport, Crossing, LogAppend, Logged, PolicyKey,
    Receipt, Revoked, StateBackend, StateError, StateStats, StoreTime,
};
use super::window::DISTINCT_CAP;

const SCRIPT: &str = include_str!("redis_state.lua");
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where and how the Redis backend keeps its state.
#[derive(Clone, Debug, PartialEq)]
pub struct RedisStateConfig {
    /// `redis://[user:password@]host:port/db`.
    pub url: String,
    /// Prefix of every key (workers sharing state use the same one).
    pub prefix: String,
    /// How long processed event ids and offense histories are remembered.
    pub ttl: Duration,
    /// The ingestion lease: a batch not committed by then is undone.
    pub lease: Duration,
    /// Most tracked (policy, entity) pairs, and most remembered event ids.
    pub capacity: usize,
}

/// The shared state backend.
pub struct RedisState {
    conn: ConnectionManager,
    script: Arc<Script>,
    config: RedisStateConfig,
    ttl_ms: i64,
    lease_ms: i64,
    stats: Mutex<StateStats>,
}

fn unavailable(e: redis::RedisError) -> StateError {
    StateError::Unavailable(format!("Redis: {e}"))
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The key of one policy's state: its id and spec fingerprint.
pub(crate) fn policy_key(k: &PolicyKey) -> String {
    format!("{}#{:016x}", k.id, k.fingerprint)
}

#[derive(Serialize)]
struct PolicyArg<'a> {
    k: String,
    nb: i64,
    win: i64,
    th: f64,
    cd: i64,
    dist: bool,
    sc: f64,
    seq: &'a [u32],
    lad: Vec<(u32, f64, i64)>,
    gr: f64,
    tm: i64,
}

#[derive(Serialize)]
struct EventArg<'a> {
    id: &'a str,
    /// (policy, entity, at_ms, sub-bucket, weight, distinct value or "", step mask)
    h: Vec<(usize, String, i64, i64, f64, String, u32)>,
}

#[derive(Serialize)]
struct ApplyArg<'a> {
    op: &'static str,
    now: i64,
    ttl: i64,
    lease: i64,
    cap: usize,
    cap_distinct: usize,
    policies: Vec<PolicyArg<'a>>,
    events: Vec<EventArg<'a>>,
}

#[derive(Serialize)]
struct StepArg<'a> {
    op: &'static str,
    now: i64,
    ttl: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    rid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cap: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    keep: Option<Vec<String>>,
    /// (policy, entity, decided at) of revoked decisions.
    #[serde(skip_serializing_if = "Option::is_none")]
    rev: Option<Vec<(String, String, i64)>>,
    /// Records a commit appends to the outbox, and the outbox's capacity.
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    log: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    logcap: Option<usize>,
}

/// The arguments of the outbox's steps.
#[derive(Serialize)]
struct LogArg<'a> {
    op: &'static str,
    now: i64,
    owner: &'a str,
    lease: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<usize>,
    /// The numbers of the records delivered, as text (the records' own).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    nums: Vec<String>,
}

#[derive(Deserialize, Default)]
struct StatsReply {
    #[serde(default)]
    ents: u64,
    #[serde(default)]
    ids: u64,
    #[serde(default)]
    ev: u64,
    #[serde(default)]
    iev: u64,
}

#[derive(Deserialize)]
struct ApplyReply {
    rid: String,
    dup: String,
    busy: String,
    late: usize,
    x: String,
    st: StatsReply,
}

#[derive(Deserialize)]
struct StepReply {
    #[serde(default)]
    expired: bool,
    #[serde(default)]
    ents: usize,
    #[serde(default)]
    ids: usize,
    #[serde(default)]
    forgiven: usize,
    #[serde(default)]
    dropped: usize,
    #[serde(default)]
    pending: usize,
    #[serde(default)]
    st: StatsReply,
}

fn bad_reply(what: impl std::fmt::Display) -> StateError {
    StateError::Unavailable(format!(
        "unexpected answer from the Redis state script: {what}"
    ))
}

/// Parses `event,hit,counted,level,offense,ttl;...`.
fn crossings(text: &str) -> Result<Vec<Crossing>, StateError> {
    text.split(';')
        .filter(|s| !s.is_empty())
        .map(|c| {
            let f: Vec<&str> = c.split(',').collect();
            let [event, hit, counted, level, offense, ttl] = f.as_slice() else {
                return Err(bad_reply(c));
            };
            Ok(Crossing {
                event: event.parse().map_err(bad_reply)?,
                hit: hit.parse().map_err(bad_reply)?,
                counted: counted.parse().map_err(bad_reply)?,
                level: level.parse().map_err(bad_reply)?,
                offense: offense.parse().map_err(bad_reply)?,
                ttl_ms: ttl.parse::<f64>().map_err(bad_reply)? as i64,
            })
        })
        .collect()
}

impl RedisState {
    /// Connects (bounded by a 5s timeout); the connection reconnects on its own later.
    pub async fn connect(config: RedisStateConfig) -> Result<RedisState, StateError> {
        let client = redis::Client::open(config.url.as_str())
            .map_err(|e| StateError::Unavailable(format!("invalid Redis URL: {e}")))?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(CONNECT_TIMEOUT)
            .set_response_timeout(RESPONSE_TIMEOUT)
            .set_number_of_retries(0);
        let conn = ConnectionManager::new_with_config(client, manager)
            .await
            .map_err(|e| StateError::Unavailable(format!("cannot reach Redis: {e}")))?;
        Ok(RedisState {
            conn,
            script: Arc::new(Script::new(&format!(
                "{}{SCRIPT}",
                esper_protocol::outbox::LUA
            ))),
            ttl_ms: millis(config.ttl).max(1),
            lease_ms: millis(config.lease).max(1),
            config,
            stats: Mutex::new(StateStats::default()),
        })
    }

    async fn call<A: Serialize>(&self, arg: &A) -> Result<String, StateError> {
        self.invoke(arg).await
    }

    async fn invoke<A: Serialize, T: redis::FromRedisValue>(
        &self,
        arg: &A,
    ) -> Result<T, StateError> {
        let json = serde_json::to_string(arg).map_err(|e| bad_reply(e.to_string()))?;
        let mut conn = self.conn.clone();
        self.script
            .arg(&self.config.prefix)
            .arg(json)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    fn note(&self, st: &StatsReply) {
        *self.stats.lock() = StateStats {
            entities: st.ents,
            event_ids: st.ids,
            evictions_total: st.ev,
            event_id_evictions_total: st.iev,
        };
    }

    async fn step(&self, arg: StepArg<'_>) -> Result<StepReply, StateError> {
        let text = self.call(&arg).await?;
        let reply: StepReply = serde_json::from_str(&text).map_err(bad_reply)?;
        self.note(&reply.st);
        Ok(reply)
    }

    fn step_arg(&self, op: &'static str, now_ms: i64) -> StepArg<'static> {
        StepArg {
            op,
            now: now_ms,
            ttl: self.ttl_ms,
            rid: None,
            cap: None,
            keep: None,
            rev: None,
            log: &[],
            logcap: None,
        }
    }

    fn log_arg<'a>(&self, op: &'static str, owner: &'a str, lease: Duration) -> LogArg<'a> {
        LogArg {
            op,
            now: chrono::Utc::now().timestamp_millis(),
            owner,
            lease: millis(lease).max(1),
            limit: None,
            nums: Vec::new(),
        }
    }

    /// Reads the figures for [`StateBackend::stats`] now (they are otherwise those of
    /// the last call).
    pub async fn refresh_stats(&self) -> Result<StateStats, StateError> {
        let now = chrono::Utc::now().timestamp_millis();
        self.step(self.step_arg("stats", now)).await?;
        Ok(self.stats())
    }
}

#[async_trait::async_trait]
impl StateBackend for RedisState {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn clock(&self) -> Result<Option<StoreTime>, StateError> {
        let mut conn = self.conn.clone();
        let sent = std::time::Instant::now();
        let (secs, micros): (i64, i64) = redis::cmd("TIME")
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(Some(StoreTime {
            ms: secs * 1000 + micros / 1000,
            sent,
            received: std::time::Instant::now(),
        }))
    }

    async fn apply(&self, batch: &BatchInput, now_ms: i64) -> Result<BatchOutcome, StateError> {
        let arg = ApplyArg {
            op: "apply",
            now: now_ms,
            ttl: self.ttl_ms,
            lease: self.lease_ms,
            cap: self.config.capacity.max(1),
            cap_distinct: DISTINCT_CAP,
            policies: batch
                .policies
                .iter()
                .map(|p| PolicyArg {
                    k: policy_key(&p.key),
                    nb: p.params.buckets,
                    win: p.params.window_ms(),
                    th: p.params.threshold,
                    cd: p.params.cooldown_ms,
                    dist: p.rules.distinct,
                    sc: p.rules.scale,
                    seq: &p.rules.sequence,
                    lad: p
                        .rules
                        .ladder
                        .iter()
                        .map(|r| (r.repeat, r.threshold, r.ttl_ms))
                        .collect(),
                    gr: p.rules.growth,
                    tm: p.rules.ttl_max_ms,
                })
                .collect(),
            events: batch
                .events
                .iter()
                .map(|e| EventArg {
                    id: &e.id,
                    h: e.hits
                        .iter()
                        .filter_map(|h| {
                            let p = batch.policies.get(h.policy)?;
                            Some((
                                h.policy,
                                h.entity.to_string(),
                                h.at_ms,
                                p.params.bucket_of(h.at_ms),
                                h.weight,
                                h.distinct.map(|v| format!("{v:x}")).unwrap_or_default(),
                                h.steps,
                            ))
                        })
                        .collect(),
                })
                .collect(),
        };
        let text = self.call(&arg).await?;
        let reply: ApplyReply = serde_json::from_str(&text).map_err(bad_reply)?;
        self.note(&reply.st);
        let flags = |s: &str| -> Vec<bool> { s.bytes().map(|b| b == b'1').collect() };
        let (duplicate, busy) = (flags(&reply.dup), flags(&reply.busy));
        if duplicate.len() != batch.events.len() || busy.len() != batch.events.len() {
            return Err(bad_reply("per-event flags do not match the batch"));
        }
        Ok(BatchOutcome {
            duplicate,
            busy,
            late: reply.late,
            crossings: crossings(&reply.x)?,
            receipt: Receipt {
                id: reply.rid.parse().map_err(bad_reply)?,
                ..Receipt::default()
            },
        })
    }

    async fn commit_with(
        &self,
        receipt: &Receipt,
        log: LogAppend<'_>,
        now_ms: i64,
    ) -> Result<Logged, StateError> {
        if receipt.id == 0 && log.entries.is_empty() {
            return Ok(Logged::default());
        }
        let reply = self
            .step(StepArg {
                rid: Some(receipt.id.to_string()),
                cap: Some(self.config.capacity.max(1)),
                log: log.entries,
                logcap: Some(log.capacity.max(1)),
                ..self.step_arg("commit", now_ms)
            })
            .await?;
        if reply.expired {
            return Err(StateError::Unavailable(
                "the batch outlived its lease and was undone; it will be redelivered".into(),
            ));
        }
        Ok(Logged {
            dropped: reply.dropped,
            pending: reply.pending,
        })
    }

    async fn claim_log(
        &self,
        owner: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Claim, StateError> {
        let answer: Vec<String> = self
            .invoke(&LogArg {
                limit: Some(limit.max(1)),
                ..self.log_arg("log_claim", owner, lease)
            })
            .await?;
        esper_protocol::outbox::parse_claim(answer).map_err(bad_reply)
    }

    async fn ack_log(
        &self,
        owner: &str,
        delivered: &[u64],
        lease: Duration,
    ) -> Result<(bool, usize), StateError> {
        let answer: (String, String) = self
            .invoke(&LogArg {
                nums: delivered.iter().map(u64::to_string).collect(),
                ..self.log_arg("log_ack", owner, lease)
            })
            .await?;
        esper_protocol::outbox::parse_ack(answer).map_err(bad_reply)
    }

    async fn release_log(&self, owner: &str) -> Result<(), StateError> {
        let _: i64 = self
            .invoke(&self.log_arg("log_release", owner, Duration::ZERO))
            .await?;
        Ok(())
    }

    async fn rollback(&self, receipt: &Receipt) -> Result<(), StateError> {
        if receipt.id == 0 {
            return Ok(());
        }
        let now = chrono::Utc::now().timestamp_millis();
        self.step(StepArg {
            rid: Some(receipt.id.to_string()),
            ..self.step_arg("rollback", now)
        })
        .await?;
        Ok(())
    }

    async fn forgive(&self, revoked: &[Revoked], now_ms: i64) -> Result<usize, StateError> {
        if revoked.is_empty() {
            return Ok(0);
        }
        let rev = revoked
            .iter()
            .map(|r| (policy_key(&r.policy), r.entity.to_string(), r.decided_at_ms))
            .collect();
        let reply = self
            .step(StepArg {
                rev: Some(rev),
                ..self.step_arg("forgive", now_ms)
            })
            .await?;
        Ok(reply.forgiven)
    }

    async fn retain(&self, keep: &[PolicyKey]) -> Result<(), StateError> {
        let now = chrono::Utc::now().timestamp_millis();
        self.step(StepArg {
            keep: Some(keep.iter().map(policy_key).collect()),
            ..self.step_arg("retain", now)
        })
        .await?;
        Ok(())
    }

    async fn cleanup(&self, now_ms: i64) -> Result<CleanupReport, StateError> {
        let reply = self.step(self.step_arg("cleanup", now_ms)).await?;
        Ok(CleanupReport {
            entities: reply.ents,
            event_ids: reply.ids,
        })
    }

    fn stats(&self) -> StateStats {
        *self.stats.lock()
    }
}
