//! The PostgreSQL state backend: windows, cooldowns and processed event ids shared by
//! every worker that uses the same database, and durable across restarts.
//!
//! Each (policy, entity) state is one row holding the memory backend's state for it,
//! serialized. Each step (`apply`, `commit`, `rollback`, `retain`, `cleanup`) is one
//! transaction: it locks the rows it touches (claiming event ids, then entities, each
//! in key order, so that workers over one database do not deadlock; a deadlock or
//! serialization failure that still happens is retried), loads the entities into a
//! scratch memory state, runs the memory backend's algorithm on them and writes them
//! back. `tests/state.rs` holds this backend to the same results as the others.
//!
//! A worker that dies between `apply` and `commit` leaves a receipt row behind: its
//! undo log, with its event ids marked in flight. The receipt expires with the
//! ingestion lease; the next `apply`, `commit` or `cleanup` after that undoes it, so
//! the redelivered events count once. A `commit` after its receipt expired fails.
//!
//! Entity rows carry the time they become idle and event ids the time they are
//! forgotten; `cleanup` deletes what has expired. A counters row keeps the figures for
//! [`StateBackend::stats`] and the capacity checks without counting rows.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use esper_protocol::EntityKey;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Postgres, Row, Transaction};

use super::memory::scratch::{Scratch, UndoRecord};
use super::redis::policy_key;
use super::state::{
    BatchInput, BatchOutcome, Claim, CleanupReport, DecisionState, LogAppend, Logged, PolicyKey,
    Receipt, Revoked, SeqProgress, StateBackend, StateError, StateStats, StoreTime, Undo,
};

/// The layout version of this backend's tables.
pub const SCHEMA_VERSION: i64 = 2;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a step is retried after a deadlock or serialization failure.
const RETRIES: usize = 8;

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS esper_state_meta (
        name text PRIMARY KEY, value bigint NOT NULL)",
    "CREATE TABLE IF NOT EXISTS esper_state_entity (
        policy text COLLATE \"C\" NOT NULL,
        entity text COLLATE \"C\" NOT NULL,
        window_ms bigint NOT NULL,
        state bytea,
        expires_at bigint NOT NULL,
        cooldown_until bigint NOT NULL,
        last_touch bigint NOT NULL,
        PRIMARY KEY (policy, entity))",
    "CREATE INDEX IF NOT EXISTS esper_state_entity_expiry ON esper_state_entity (expires_at)",
    "CREATE TABLE IF NOT EXISTS esper_state_event (
        id text COLLATE \"C\" PRIMARY KEY,
        receipt bigint,
        expires_at bigint NOT NULL)",
    "CREATE INDEX IF NOT EXISTS esper_state_event_receipt ON esper_state_event (receipt)
        WHERE receipt IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS esper_state_event_expiry ON esper_state_event (expires_at)
        WHERE receipt IS NULL",
    "CREATE TABLE IF NOT EXISTS esper_state_receipt (
        id bigint PRIMARY KEY, expires_at bigint NOT NULL, undo bytea NOT NULL)",
    "CREATE SEQUENCE IF NOT EXISTS esper_state_receipt_id",
    "CREATE TABLE IF NOT EXISTS esper_state_counters (
        one boolean PRIMARY KEY DEFAULT true CHECK (one),
        entities bigint NOT NULL DEFAULT 0,
        ids bigint NOT NULL DEFAULT 0,
        done bigint NOT NULL DEFAULT 0,
        evictions bigint NOT NULL DEFAULT 0,
        id_evictions bigint NOT NULL DEFAULT 0)",
    "INSERT INTO esper_state_counters (one) VALUES (true) ON CONFLICT DO NOTHING",
];

/// Version 2: the decision log's outbox, appended by commits, and who delivers it. New
/// tables only, so a version-1 database takes them while version-1 workers run.
const SCHEMA_2: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS esper_state_outbox (
        seq bigserial PRIMARY KEY, entry text NOT NULL)",
    "CREATE TABLE IF NOT EXISTS esper_state_outbox_lease (
        one boolean PRIMARY KEY DEFAULT true CHECK (one),
        holder text NOT NULL,
        until_ms bigint NOT NULL)",
];

/// The database's clock in epoch milliseconds: leases are judged by one clock for
/// every worker.
const NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// Where and how the PostgreSQL backend keeps its state.
#[derive(Clone, Debug, PartialEq)]
pub struct PostgresStateConfig {
    /// `postgres://[user[:password]@]host[:port]/database`.
    pub url: String,
    /// Connections in the pool (one per batch step in progress).
    pub pool_size: u32,
    /// How long processed event ids and offense histories are remembered.
    pub ttl: Duration,
    /// The ingestion lease: a batch not committed by then is undone.
    pub lease: Duration,
    /// Most tracked (policy, entity) pairs, and most remembered event ids.
    pub capacity: usize,
}

/// The durable shared state backend.
pub struct PostgresState {
    pool: PgPool,
    ttl_ms: i64,
    lease_ms: i64,
    capacity: i64,
    stats: Mutex<StateStats>,
}

fn db(e: sqlx::Error) -> StateError {
    StateError::Unavailable(format!("PostgreSQL: {e}"))
}

fn corrupt(what: impl std::fmt::Display) -> StateError {
    StateError::Unavailable(format!("unreadable PostgreSQL state row: {what}"))
}

fn newer_schema(found: i64) -> StateError {
    StateError::Unavailable(format!(
        "the PostgreSQL state has schema version {found}; this build knows {SCHEMA_VERSION}"
    ))
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Is this a failure that running the step again resolves?
fn retryable(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "40P01" || c == "40001")
}

/// The inverse of [`policy_key`].
fn parse_policy(text: &str) -> Result<PolicyKey, StateError> {
    let (id, fp) = text.rsplit_once('#').ok_or_else(|| corrupt(text))?;
    Ok(PolicyKey {
        id: Arc::from(id),
        fingerprint: u64::from_str_radix(fp, 16).map_err(|_| corrupt(text))?,
    })
}

fn parse_entity(text: &str) -> Result<EntityKey, StateError> {
    text.parse().map_err(|_| corrupt(text))
}

/// Loads an entity row (policy, entity, window_ms, state) into `scratch`; returns its
/// key, or nothing for a placeholder row without a state.
fn load_row(
    row: &sqlx::postgres::PgRow,
    scratch: &Scratch,
) -> Result<Option<(String, String, i64)>, StepError> {
    let state: Option<Vec<u8>> = row.try_get("state")?;
    let Some(state) = state else { return Ok(None) };
    let policy: String = row.try_get("policy")?;
    let entity: String = row.try_get("entity")?;
    let window_ms: i64 = row.try_get("window_ms")?;
    scratch
        .load_entity(
            &parse_policy(&policy)?,
            window_ms,
            parse_entity(&entity)?,
            &state,
        )
        .map_err(corrupt)?;
    Ok(Some((policy, entity, window_ms)))
}

/// A receipt's undo log as stored.
#[derive(Serialize, Deserialize, Default)]
struct UndoLog {
    /// (policy, entity, change) in the order they were made.
    inc: Vec<(String, String, UndoRec)>,
    /// (policy, entity, decision state replaced).
    cd: Vec<(String, String, StoredDecision)>,
    /// The replaced decision states' prior offenses, in the order of `cd`; a separate
    /// list so that versions without it read the same logs. Empty in their logs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    cp: Vec<i64>,
}

/// cooldown until, cooldown by, level, offenses, last offense.
type StoredDecision = (i64, u64, usize, u32, i64);

#[derive(Serialize, Deserialize)]
enum UndoRec {
    /// Sub-bucket and the bits of the weight (read back exactly).
    W(i64, u64),
    D(u64, Option<i64>),
    /// A sequence's progress to restore (logs of versions before `Q`).
    S(Option<(u8, u32, i64)>),
    /// The partial sequences an event added to a sequence, as (step, start), and what
    /// its completion consumed ([`Undo::SequenceSteps`]).
    Q(Vec<(u8, i64)>, Option<Vec<Vec<(i64, u32)>>>),
}

impl UndoLog {
    /// A receipt's log from its changes (as the scratch state recorded them) and the
    /// decisions it replaced.
    fn of(changes: &[UndoRecord], receipt: &Receipt) -> UndoLog {
        UndoLog {
            inc: changes
                .iter()
                .map(|(policy, entity, undo)| {
                    let undo = match undo {
                        Undo::Weight { bucket, weight } => UndoRec::W(*bucket, weight.to_bits()),
                        Undo::Distinct { value, prev } => UndoRec::D(*value, *prev),
                        // Only read from older logs, so only in the older form.
                        Undo::Sequence { prev } => {
                            UndoRec::S(prev.as_ref().and_then(SeqProgress::legacy))
                        }
                        Undo::SequenceSteps { added, consumed } => {
                            UndoRec::Q(added.clone(), consumed.clone())
                        }
                    };
                    (policy_key(policy), entity.to_string(), undo)
                })
                .collect(),
            cd: receipt
                .cooldowns
                .iter()
                .map(|(p, e, d)| {
                    let c = (
                        d.cooldown_until,
                        d.cooldown_by,
                        d.level,
                        d.offenses,
                        d.last_offense_ms,
                    );
                    (policy_key(p), e.to_string(), c)
                })
                .collect(),
            cp: receipt
                .cooldowns
                .iter()
                .map(|(_, _, d)| d.prior_offense_ms)
                .collect(),
        }
    }

    /// The entities the log touches.
    fn keys(&self) -> impl Iterator<Item = (&String, &String)> {
        self.inc
            .iter()
            .map(|(p, e, _)| (p, e))
            .chain(self.cd.iter().map(|(p, e, _)| (p, e)))
    }

    /// The receipt (its decisions) and changes that [`Scratch::rollback`] takes back.
    fn receipt(&self, id: u64) -> Result<(Receipt, Vec<UndoRecord>), StateError> {
        let mut r = Receipt {
            id,
            ..Receipt::default()
        };
        let mut changes = Vec::with_capacity(self.inc.len());
        for (p, e, u) in &self.inc {
            changes.push((
                parse_policy(p)?,
                parse_entity(e)?,
                match *u {
                    UndoRec::W(bucket, weight) => Undo::Weight {
                        bucket,
                        weight: f64::from_bits(weight),
                    },
                    UndoRec::D(value, prev) => Undo::Distinct { value, prev },
                    UndoRec::S(prev) => Undo::Sequence {
                        prev: prev.map(legacy),
                    },
                    UndoRec::Q(ref added, ref consumed) => Undo::SequenceSteps {
                        added: added.clone(),
                        consumed: consumed.clone(),
                    },
                },
            ));
        }
        for (i, (p, e, c)) in self.cd.iter().enumerate() {
            let (cooldown_until, cooldown_by, level, offenses, last_offense_ms) = *c;
            r.cooldowns.push((
                parse_policy(p)?,
                parse_entity(e)?,
                DecisionState {
                    cooldown_until,
                    cooldown_by,
                    level,
                    offenses,
                    last_offense_ms,
                    prior_offense_ms: self.cp.get(i).copied().unwrap_or(0),
                },
            ));
        }
        Ok((r, changes))
    }
}

fn legacy((step, matched, started_ms): (u8, u32, i64)) -> SeqProgress {
    SeqProgress::Legacy {
        step,
        matched,
        started_ms,
    }
}

/// Changes to the counters row made by one step.
#[derive(Default)]
struct Deltas {
    entities: i64,
    ids: i64,
    done: i64,
    evictions: i64,
    id_evictions: i64,
}

/// Receipts past their lease, taken out of the tables, with their logs.
type Expired = Vec<(u64, UndoLog)>;

type Tx = Transaction<'static, Postgres>;

impl PostgresState {
    /// Connects (bounded by a 5s timeout) and creates the tables when missing.
    pub async fn connect(config: PostgresStateConfig) -> Result<PostgresState, StateError> {
        let options: PgConnectOptions = config
            .url
            .parse()
            .map_err(|e| StateError::Unavailable(format!("invalid PostgreSQL URL: {e}")))?;
        let pool = PgPoolOptions::new()
            .max_connections(config.pool_size.max(1))
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(|e| StateError::Unavailable(format!("cannot reach PostgreSQL: {e}")))?;
        let state = PostgresState {
            pool,
            ttl_ms: millis(config.ttl).max(1),
            lease_ms: millis(config.lease).max(1),
            capacity: i64::try_from(config.capacity.max(1)).unwrap_or(i64::MAX),
            stats: Mutex::new(StateStats::default()),
        };
        state.migrate().await?;
        state.refresh_stats().await?;
        Ok(state)
    }

    /// Creates the tables under an advisory lock (workers may start together) and
    /// records the schema version; refuses a database of a newer layout. A database
    /// already at this version gets no DDL: `CREATE INDEX IF NOT EXISTS` still locks
    /// its table, and against workers already running steps (event rows, then entity
    /// rows) that deadlocks.
    async fn migrate(&self) -> Result<(), StateError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        sqlx::query("SELECT pg_advisory_xact_lock(7402555431)")
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let exists: bool = sqlx::query_scalar("SELECT to_regclass('esper_state_meta') IS NOT NULL")
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
        let current: Option<i64> = if exists {
            sqlx::query_scalar("SELECT value FROM esper_state_meta WHERE name = 'schema_version'")
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?
        } else {
            None
        };
        let steps: Vec<&str> = match current {
            Some(SCHEMA_VERSION) => return tx.commit().await.map_err(db),
            Some(newer) if newer > SCHEMA_VERSION => return Err(newer_schema(newer)),
            // Only what version 1 lacks: the whole schema would lock the tables that
            // running workers lock in the other order (see above).
            Some(1) => SCHEMA_2.to_vec(),
            _ => SCHEMA.iter().chain(SCHEMA_2).copied().collect(),
        };
        for stmt in steps {
            sqlx::query(stmt).execute(&mut *tx).await.map_err(db)?;
        }
        let found: i64 = sqlx::query_scalar(
            "INSERT INTO esper_state_meta (name, value) VALUES ('schema_version', $1)
             ON CONFLICT (name) DO UPDATE
                SET value = GREATEST(esper_state_meta.value, EXCLUDED.value)
             RETURNING value",
        )
        .bind(SCHEMA_VERSION)
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        if found > SCHEMA_VERSION {
            return Err(newer_schema(found));
        }
        tx.commit().await.map_err(db)
    }

    /// Reads the figures for [`StateBackend::stats`] now.
    pub async fn refresh_stats(&self) -> Result<StateStats, StateError> {
        let mut conn = self.pool.acquire().await.map_err(db)?;
        let row =
            sqlx::query("SELECT entities, ids, evictions, id_evictions FROM esper_state_counters")
                .fetch_one(&mut *conn)
                .await
                .map_err(db)?;
        self.note(&row)?;
        Ok(self.stats())
    }

    fn note(&self, row: &sqlx::postgres::PgRow) -> Result<(), StateError> {
        let get = |c: &str| -> Result<u64, StateError> {
            let v: i64 = row.try_get(c).map_err(db)?;
            Ok(u64::try_from(v).unwrap_or(0))
        };
        *self.stats.lock() = StateStats {
            entities: get("entities")?,
            event_ids: get("ids")?,
            evictions_total: get("evictions")?,
            event_id_evictions_total: get("id_evictions")?,
        };
        Ok(())
    }

    /// Ends a step's transaction: `None` when it should run again (a deadlock or
    /// serialization failure, at most [`RETRIES`] times).
    async fn finish<T>(
        &self,
        tx: Tx,
        result: Result<T, StepError>,
        attempt: &mut usize,
    ) -> Option<Result<T, StateError>> {
        let result = match result {
            Ok(v) => tx.commit().await.map(|()| v).map_err(StepError::Db),
            Err(e) => Err(e),
        };
        match result {
            Ok(v) => Some(Ok(v)),
            Err(StepError::Db(e)) if retryable(&e) && *attempt < RETRIES => {
                *attempt += 1;
                tokio::time::sleep(Duration::from_millis(2 << (*attempt).min(6))).await;
                None
            }
            Err(StepError::Db(e)) => Some(Err(db(e))),
            Err(StepError::State(e)) => Some(Err(e)),
        }
    }

    async fn begin(&self) -> Result<Tx, StateError> {
        self.pool.begin().await.map_err(db)
    }

    /// Takes the receipts whose lease ran out at `now_ms` (those no other step holds)
    /// and their in-flight marks out of the tables; their logs are undone by the caller.
    async fn take_expired(
        &self,
        tx: &mut Tx,
        now_ms: i64,
        d: &mut Deltas,
    ) -> Result<Expired, StepError> {
        let rows = sqlx::query(
            "DELETE FROM esper_state_receipt WHERE id IN (
                SELECT id FROM esper_state_receipt WHERE expires_at <= $1
                ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED)
             RETURNING id, undo",
        )
        .bind(now_ms)
        .fetch_all(&mut **tx)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let id: i64 = row.try_get("id")?;
            let undo: Vec<u8> = row.try_get("undo")?;
            let log: UndoLog = serde_json::from_slice(&undo).map_err(corrupt)?;
            out.push((u64::try_from(id).unwrap_or(0), log));
        }
        // Newest first, as a batch's own changes are undone: a restore an older batch's
        // log holds must not outlive a newer batch's undo of what it built on it.
        out.sort_by_key(|(id, _)| std::cmp::Reverse(*id));
        if !out.is_empty() {
            let ids: Vec<i64> = out.iter().map(|(id, _)| *id as i64).collect();
            d.ids -= self.drop_marks(tx, &ids).await?;
        }
        Ok(out)
    }

    /// Forgets the in-flight marks of receipts `ids`.
    async fn drop_marks(&self, tx: &mut Tx, ids: &[i64]) -> Result<i64, StepError> {
        let n = sqlx::query("DELETE FROM esper_state_event WHERE receipt = ANY($1)")
            .bind(ids)
            .execute(&mut **tx)
            .await?
            .rows_affected();
        Ok(n as i64)
    }

    /// Locks the rows of `keys` (policy, entity, window for a new row), in key order,
    /// creating missing ones, and loads the existing states into `scratch`. Returns the
    /// keys that held a state.
    async fn lock_entities(
        &self,
        tx: &mut Tx,
        keys: &BTreeSet<(String, String, i64)>,
        scratch: &Scratch,
    ) -> Result<BTreeSet<(String, String)>, StepError> {
        let mut existed = BTreeSet::new();
        if keys.is_empty() {
            return Ok(existed);
        }
        let (mut ps, mut es, mut ws) = (Vec::new(), Vec::new(), Vec::new());
        for (p, e, w) in keys {
            ps.push(p.as_str());
            es.push(e.as_str());
            ws.push(*w);
        }
        let rows = sqlx::query(
            "INSERT INTO esper_state_entity
                (policy, entity, window_ms, state, expires_at, cooldown_until, last_touch)
             SELECT p, e, w, NULL, 0, 0, 0
             FROM unnest($1::text[], $2::text[], $3::bigint[]) AS t(p, e, w)
             ORDER BY p COLLATE \"C\", e COLLATE \"C\"
             ON CONFLICT (policy, entity) DO UPDATE SET last_touch = esper_state_entity.last_touch
             RETURNING policy, entity, window_ms, state",
        )
        .bind(&ps)
        .bind(&es)
        .bind(&ws)
        .fetch_all(&mut **tx)
        .await?;
        for row in rows {
            match load_row(&row, scratch) {
                Ok(Some((policy, entity, _))) => {
                    existed.insert((policy, entity));
                }
                Ok(None) => {}
                // Its entity starts afresh (the row is overwritten by this step): kept,
                // the row would fail every batch with a hit on that entity, for good.
                Err(StepError::State(e)) => {
                    let policy: String = row.try_get("policy")?;
                    let entity: String = row.try_get("entity")?;
                    tracing::error!(%policy, %entity, error = %e, "an unreadable state row starts afresh");
                    existed.insert((policy, entity));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(existed)
    }

    /// Writes back every entity `scratch` holds and removes the locked rows it does not
    /// (placeholders for hits that tracked nothing).
    async fn save_entities(
        &self,
        tx: &mut Tx,
        scratch: &Scratch,
        keys: &BTreeSet<(String, String, i64)>,
        existed: &BTreeSet<(String, String)>,
        d: &mut Deltas,
    ) -> Result<(), StepError> {
        if keys.is_empty() {
            return Ok(());
        }
        let saved = scratch.saved()?;
        let mut kept = BTreeSet::new();
        let (mut ps, mut es, mut ss, mut xs, mut cs, mut ls, mut ws) =
            (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
        for s in saved {
            let key = (policy_key(&s.policy), s.entity.to_string());
            if !existed.contains(&key) {
                d.entities += 1;
            }
            ps.push(key.0.clone());
            es.push(key.1.clone());
            kept.insert(key);
            ss.push(s.state);
            xs.push(s.expires_at);
            cs.push(s.cooldown_until);
            ls.push(s.last_touch);
            ws.push(s.window_ms);
        }
        if !ps.is_empty() {
            sqlx::query(
                "UPDATE esper_state_entity AS t
                 SET state = u.s, expires_at = u.x, cooldown_until = u.c, last_touch = u.l,
                     window_ms = u.w
                 FROM unnest($1::text[], $2::text[], $3::bytea[], $4::bigint[], $5::bigint[],
                             $6::bigint[], $7::bigint[]) AS u(p, e, s, x, c, l, w)
                 WHERE t.policy = u.p AND t.entity = u.e",
            )
            .bind(&ps)
            .bind(&es)
            .bind(&ss)
            .bind(&xs)
            .bind(&cs)
            .bind(&ls)
            .bind(&ws)
            .execute(&mut **tx)
            .await?;
        }
        let (mut dp, mut de) = (vec![], vec![]);
        for (p, e, _) in keys {
            let key = (p.clone(), e.clone());
            if !kept.contains(&key) {
                if existed.contains(&key) {
                    d.entities -= 1;
                }
                dp.push(key.0);
                de.push(key.1);
            }
        }
        if !dp.is_empty() {
            sqlx::query(
                "DELETE FROM esper_state_entity AS t
                 USING unnest($1::text[], $2::text[]) AS u(p, e)
                 WHERE t.policy = u.p AND t.entity = u.e",
            )
            .bind(&dp)
            .bind(&de)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }

    /// Undoes `expired` receipts' logs (and locks `extra` entities too, for the caller).
    async fn undo_in(
        &self,
        tx: &mut Tx,
        expired: &Expired,
        keys: &mut BTreeSet<(String, String, i64)>,
        scratch: &Scratch,
    ) -> Result<BTreeSet<(String, String)>, StepError> {
        for (_, log) in expired {
            for (p, e) in log.keys() {
                keys.insert((p.clone(), e.clone(), 0));
            }
        }
        // A key both in the batch (with its window) and in a log (with 0) is locked once.
        let mut seen = BTreeSet::new();
        keys.retain(|(p, e, _)| seen.insert((p.clone(), e.clone())));
        let existed = self.lock_entities(tx, keys, scratch).await?;
        for (id, log) in expired {
            let (receipt, changes) = log.receipt(*id)?;
            scratch.rollback(&receipt, changes).await?;
        }
        Ok(existed)
    }

    /// Applies deltas to the counters row and notes the figures.
    async fn count(&self, tx: &mut Tx, d: &Deltas) -> Result<(i64, i64), StepError> {
        let row = sqlx::query(
            "UPDATE esper_state_counters SET entities = entities + $1, ids = ids + $2,
                done = done + $3, evictions = evictions + $4, id_evictions = id_evictions + $5
             RETURNING entities, ids, done, evictions, id_evictions",
        )
        .bind(d.entities)
        .bind(d.ids)
        .bind(d.done)
        .bind(d.evictions)
        .bind(d.id_evictions)
        .fetch_one(&mut **tx)
        .await?;
        self.note(&row)?;
        Ok((row.try_get("entities")?, row.try_get("done")?))
    }

    async fn apply_tx(
        &self,
        tx: &mut Tx,
        batch: &BatchInput,
        now_ms: i64,
    ) -> Result<BatchOutcome, StepError> {
        let mut d = Deltas::default();
        let rid: i64 = sqlx::query_scalar("SELECT nextval('esper_state_receipt_id')")
            .fetch_one(&mut **tx)
            .await?;
        let expired = self.take_expired(tx, now_ms, &mut d).await?;
        let scratch = Scratch::new(self.ttl_ms, u64::try_from(rid).unwrap_or(0));
        // Claim the batch's event ids, in id order.
        let ids: Vec<&str> = batch
            .events
            .iter()
            .filter(|e| !e.hits.is_empty())
            .map(|e| e.id.as_str())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let lease_end = now_ms.saturating_add(self.lease_ms);
        if !ids.is_empty() {
            let rows = sqlx::query(
                "INSERT INTO esper_state_event (id, receipt, expires_at)
                 SELECT id, $2, $3 FROM unnest($1::text[]) AS t(id) ORDER BY id COLLATE \"C\"
                 ON CONFLICT (id) DO UPDATE SET
                   receipt = CASE WHEN esper_state_event.receipt IS NULL
                       AND esper_state_event.expires_at <= $4
                     THEN EXCLUDED.receipt ELSE esper_state_event.receipt END,
                   expires_at = CASE WHEN esper_state_event.receipt IS NULL
                       AND esper_state_event.expires_at <= $4
                     THEN EXCLUDED.expires_at ELSE esper_state_event.expires_at END
                 RETURNING id, receipt, (xmax = 0) AS inserted",
            )
            .bind(&ids)
            .bind(rid)
            .bind(lease_end)
            .bind(now_ms)
            .fetch_all(&mut **tx)
            .await?;
            for row in rows {
                let receipt: Option<i64> = row.try_get("receipt")?;
                let inserted: bool = row.try_get("inserted")?;
                match receipt {
                    Some(r) if r == rid && inserted => d.ids += 1,
                    // A processed id past its ttl that cleanup has not removed yet.
                    Some(r) if r == rid => d.done -= 1,
                    Some(_) => scratch.mark_seen(row.try_get("id")?, true),
                    None => scratch.mark_seen(row.try_get("id")?, false),
                }
            }
        }
        let mut keys = BTreeSet::new();
        for e in batch.events.iter().filter(|e| !e.hits.is_empty()) {
            for h in &e.hits {
                if let Some(p) = batch.policies.get(h.policy) {
                    keys.insert((
                        policy_key(&p.key),
                        h.entity.to_string(),
                        p.params.window_ms(),
                    ));
                }
            }
        }
        let existed = self.undo_in(tx, &expired, &mut keys, &scratch).await?;
        let mut out = scratch.apply(batch, now_ms);
        self.save_entities(tx, &scratch, &keys, &existed, &mut d)
            .await?;
        let receipt = &out.receipt;
        let changes = scratch.undo_log(receipt.id)?;
        if receipt.event_ids.is_empty() && changes.is_empty() && receipt.cooldowns.is_empty() {
            out.receipt = Receipt::default();
        } else {
            let undo = serde_json::to_vec(&UndoLog::of(&changes, receipt)).map_err(corrupt)?;
            sqlx::query(
                "INSERT INTO esper_state_receipt (id, expires_at, undo) VALUES ($1, $2, $3)",
            )
            .bind(rid)
            .bind(lease_end)
            .bind(undo)
            .execute(&mut **tx)
            .await?;
            out.receipt = Receipt {
                id: u64::try_from(rid).unwrap_or(0),
                ..Receipt::default()
            };
        }
        let (entities, _) = self.count(tx, &d).await?;
        if entities > self.capacity {
            // Down to 1% below capacity, so that evictions come in occasional sweeps;
            // those without a standing decision and touched longest ago go first.
            let excess = entities - (self.capacity - self.capacity / 100);
            let n = sqlx::query(
                "DELETE FROM esper_state_entity WHERE (policy, entity) IN (
                    SELECT policy, entity FROM esper_state_entity WHERE state IS NOT NULL
                    ORDER BY cooldown_until > $1, last_touch
                    LIMIT $2 FOR UPDATE SKIP LOCKED)",
            )
            .bind(now_ms)
            .bind(excess)
            .execute(&mut **tx)
            .await?
            .rows_affected() as i64;
            self.count(
                tx,
                &Deltas {
                    entities: -n,
                    evictions: n,
                    ..Deltas::default()
                },
            )
            .await?;
        }
        Ok(out)
    }

    /// Undoes the receipts whose lease ran out at `now_ms`.
    async fn sweep(&self, tx: &mut Tx, now_ms: i64, d: &mut Deltas) -> Result<usize, StepError> {
        let expired = self.take_expired(tx, now_ms, d).await?;
        if expired.is_empty() {
            return Ok(0);
        }
        let scratch = Scratch::new(self.ttl_ms, 0);
        let mut keys = BTreeSet::new();
        let existed = self.undo_in(tx, &expired, &mut keys, &scratch).await?;
        self.save_entities(tx, &scratch, &keys, &existed, d).await?;
        Ok(expired.len())
    }

    /// `None` when the receipt outlived its lease and was undone.
    async fn commit_tx(
        &self,
        tx: &mut Tx,
        rid: i64,
        log: LogAppend<'_>,
        now_ms: i64,
    ) -> Result<Option<Logged>, StepError> {
        let mut d = Deltas::default();
        self.sweep(tx, now_ms, &mut d).await?;
        if rid == 0 {
            // Nothing was marked in flight: only the records are committed.
            self.count(tx, &d).await?;
            return self.append_log(tx, log).await.map(Some);
        }
        let found = sqlx::query("DELETE FROM esper_state_receipt WHERE id = $1")
            .bind(rid)
            .execute(&mut **tx)
            .await?
            .rows_affected();
        if found == 0 {
            self.count(tx, &d).await?;
            return Ok(None);
        }
        d.done += sqlx::query(
            "UPDATE esper_state_event SET receipt = NULL, expires_at = $2 WHERE receipt = $1",
        )
        .bind(rid)
        .bind(now_ms.saturating_add(self.ttl_ms))
        .execute(&mut **tx)
        .await?
        .rows_affected() as i64;
        let (_, done) = self.count(tx, &d).await?;
        if done > self.capacity {
            let n = sqlx::query(
                "DELETE FROM esper_state_event WHERE id IN (
                    SELECT id FROM esper_state_event WHERE receipt IS NULL
                    ORDER BY expires_at, id LIMIT $1 FOR UPDATE SKIP LOCKED)",
            )
            .bind(done - self.capacity)
            .execute(&mut **tx)
            .await?
            .rows_affected() as i64;
            self.count(
                tx,
                &Deltas {
                    ids: -n,
                    done: -n,
                    id_evictions: n,
                    ..Deltas::default()
                },
            )
            .await?;
        }
        self.append_log(tx, log).await.map(Some)
    }

    async fn append_log(&self, tx: &mut Tx, log: LogAppend<'_>) -> Result<Logged, StepError> {
        if log.entries.is_empty() {
            return Ok(Logged::default());
        }
        sqlx::query(
            "INSERT INTO esper_state_outbox (entry)
             SELECT e FROM UNNEST($1::text[]) WITH ORDINALITY AS t(e, n) ORDER BY n",
        )
        .bind(log.entries)
        .execute(&mut **tx)
        .await?;
        // One statement: counted apart, a delivery acknowledged in between would leave
        // the count stale and the trim would take undelivered records.
        let dropped = sqlx::query(
            "DELETE FROM esper_state_outbox WHERE seq <= (
                SELECT seq FROM esper_state_outbox ORDER BY seq DESC OFFSET $1 LIMIT 1)",
        )
        .bind(i64::try_from(log.capacity.max(1)).unwrap_or(i64::MAX))
        .execute(&mut **tx)
        .await?
        .rows_affected() as usize;
        Ok(Logged {
            dropped,
            pending: self.log_len(tx).await?,
        })
    }

    async fn claim_log_tx(
        &self,
        tx: &mut Tx,
        owner: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Claim, StepError> {
        // Every worker looks once a second: an empty outbox costs them no write.
        let pending = self.log_len(tx).await?;
        if pending == 0 {
            return Ok(Claim::Mine {
                pending,
                entries: Vec::new(),
            });
        }
        let took: Option<String> = sqlx::query_scalar(&format!(
            "INSERT INTO esper_state_outbox_lease (one, holder, until_ms)
             VALUES (true, $1, {NOW_MS} + $2)
             ON CONFLICT (one) DO UPDATE SET holder = EXCLUDED.holder, until_ms = EXCLUDED.until_ms
             WHERE esper_state_outbox_lease.holder = EXCLUDED.holder
                OR esper_state_outbox_lease.until_ms <= {NOW_MS}
             RETURNING holder"
        ))
        .bind(owner)
        .bind(millis(lease).max(1))
        .fetch_optional(&mut **tx)
        .await?;
        if took.is_none() {
            let by: String = sqlx::query_scalar("SELECT holder FROM esper_state_outbox_lease")
                .fetch_one(&mut **tx)
                .await?;
            return Ok(Claim::Held { by, pending });
        }
        let rows: Vec<(i64, String)> =
            sqlx::query_as("SELECT seq, entry FROM esper_state_outbox ORDER BY seq LIMIT $1")
                .bind(i64::try_from(limit.max(1)).unwrap_or(i64::MAX))
                .fetch_all(&mut **tx)
                .await?;
        let entries = rows
            .into_iter()
            .map(|(n, e)| Ok((u64::try_from(n).map_err(corrupt)?, e)))
            .collect::<Result<_, StateError>>()?;
        Ok(Claim::Mine { pending, entries })
    }

    async fn ack_log_tx(
        &self,
        tx: &mut Tx,
        owner: &str,
        delivered: &[u64],
        lease: Duration,
    ) -> Result<(bool, usize), StepError> {
        let mine = sqlx::query(&format!(
            "UPDATE esper_state_outbox_lease SET until_ms = {NOW_MS} + $2
             WHERE holder = $1 AND until_ms > {NOW_MS}"
        ))
        .bind(owner)
        .bind(millis(lease).max(1))
        .execute(&mut **tx)
        .await?
        .rows_affected()
            == 1;
        if mine {
            // Exactly these: numbers are drawn when a commit inserts, not when it ends, so
            // a lower one may have become visible since the claim, undelivered.
            let numbers: Vec<i64> = delivered
                .iter()
                .filter_map(|n| i64::try_from(*n).ok())
                .collect();
            sqlx::query("DELETE FROM esper_state_outbox WHERE seq = ANY($1)")
                .bind(numbers)
                .execute(&mut **tx)
                .await?;
        }
        Ok((mine, self.log_len(tx).await?))
    }

    async fn log_len(&self, tx: &mut Tx) -> Result<usize, StepError> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM esper_state_outbox")
            .fetch_one(&mut **tx)
            .await?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    async fn rollback_tx(&self, tx: &mut Tx, rid: i64) -> Result<(), StepError> {
        let mut d = Deltas::default();
        let undo: Option<Vec<u8>> =
            sqlx::query_scalar("DELETE FROM esper_state_receipt WHERE id = $1 RETURNING undo")
                .bind(rid)
                .fetch_optional(&mut **tx)
                .await?;
        let Some(undo) = undo else {
            // Already undone (its lease ran out) or committed.
            return Ok(());
        };
        let log: UndoLog = serde_json::from_slice(&undo).map_err(corrupt)?;
        d.ids -= self.drop_marks(tx, &[rid]).await?;
        let expired = vec![(u64::try_from(rid).unwrap_or(0), log)];
        let scratch = Scratch::new(self.ttl_ms, 0);
        let mut keys = BTreeSet::new();
        let existed = self.undo_in(tx, &expired, &mut keys, &scratch).await?;
        self.save_entities(tx, &scratch, &keys, &existed, &mut d)
            .await?;
        self.count(tx, &d).await?;
        Ok(())
    }

    async fn forgive_tx(
        &self,
        tx: &mut Tx,
        revoked: &[Revoked],
        now_ms: i64,
    ) -> Result<usize, StepError> {
        let (mut ps, mut es) = (Vec::new(), Vec::new());
        for r in revoked {
            ps.push(policy_key(&r.policy));
            es.push(r.entity.to_string());
        }
        // Only entities under a standing decision can be forgiven; locked in key order,
        // as every other step locks them.
        let rows = sqlx::query(
            "SELECT t.policy, t.entity, t.window_ms, t.state FROM esper_state_entity AS t
             JOIN unnest($1::text[], $2::text[]) AS u(p, e) ON t.policy = u.p AND t.entity = u.e
             WHERE t.state IS NOT NULL AND t.cooldown_until > $3
             ORDER BY t.policy COLLATE \"C\", t.entity COLLATE \"C\"
             FOR UPDATE OF t",
        )
        .bind(&ps)
        .bind(&es)
        .bind(now_ms)
        .fetch_all(&mut **tx)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let scratch = Scratch::new(self.ttl_ms, 0);
        let mut keys = BTreeSet::new();
        for row in rows {
            match load_row(&row, &scratch) {
                Ok(key) => keys.extend(key),
                // One unreadable row must not hold up every revocation after it.
                Err(StepError::State(e)) => {
                    tracing::warn!(error = %e, "a revocation skips an unreadable state row");
                }
                Err(e) => return Err(e),
            }
        }
        let forgiven = scratch.forgive(revoked, now_ms).await?;
        let existed = keys
            .iter()
            .map(|(p, e, _)| (p.clone(), e.clone()))
            .collect();
        self.save_entities(tx, &scratch, &keys, &existed, &mut Deltas::default())
            .await?;
        Ok(forgiven)
    }

    async fn retain_tx(&self, tx: &mut Tx, keep: &[String]) -> Result<(), StepError> {
        let n = sqlx::query(
            "DELETE FROM esper_state_entity WHERE state IS NOT NULL AND NOT (policy = ANY($1))",
        )
        .bind(keep)
        .execute(&mut **tx)
        .await?
        .rows_affected() as i64;
        self.count(
            tx,
            &Deltas {
                entities: -n,
                ..Deltas::default()
            },
        )
        .await?;
        Ok(())
    }

    async fn cleanup_tx(&self, tx: &mut Tx, now_ms: i64) -> Result<CleanupReport, StepError> {
        let mut d = Deltas::default();
        self.sweep(tx, now_ms, &mut d).await?;
        let entities = sqlx::query(
            "DELETE FROM esper_state_entity WHERE expires_at <= $1 AND state IS NOT NULL",
        )
        .bind(now_ms)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        let event_ids =
            sqlx::query("DELETE FROM esper_state_event WHERE receipt IS NULL AND expires_at <= $1")
                .bind(now_ms)
                .execute(&mut **tx)
                .await?
                .rows_affected();
        d.entities -= entities as i64;
        d.ids -= event_ids as i64;
        d.done -= event_ids as i64;
        self.count(tx, &d).await?;
        Ok(CleanupReport {
            entities: entities as usize,
            event_ids: event_ids as usize,
        })
    }
}

/// Why a step's transaction failed.
enum StepError {
    Db(sqlx::Error),
    State(StateError),
}

impl From<sqlx::Error> for StepError {
    fn from(e: sqlx::Error) -> StepError {
        StepError::Db(e)
    }
}

impl From<StateError> for StepError {
    fn from(e: StateError) -> StepError {
        StepError::State(e)
    }
}

/// Runs `$step` (an expression using `tx`) in a transaction until it commits or fails
/// for good.
macro_rules! transact {
    ($self:ident, |$tx:ident| $step:expr) => {{
        let mut attempt = 0;
        loop {
            let mut $tx = $self.begin().await?;
            let result = $step;
            if let Some(done) = $self.finish($tx, result, &mut attempt).await {
                break done;
            }
        }
    }};
}

#[async_trait::async_trait]
impl StateBackend for PostgresState {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn clock(&self) -> Result<Option<StoreTime>, StateError> {
        let mut conn = self.pool.acquire().await.map_err(db)?;
        let sent = std::time::Instant::now();
        // clock_timestamp(), not now(): the latter is the transaction's start.
        let ms: i64 = sqlx::query_scalar(&format!("SELECT {NOW_MS}"))
            .fetch_one(&mut *conn)
            .await
            .map_err(db)?;
        Ok(Some(StoreTime {
            ms,
            sent,
            received: std::time::Instant::now(),
        }))
    }

    async fn apply(&self, batch: &BatchInput, now_ms: i64) -> Result<BatchOutcome, StateError> {
        transact!(self, |tx| self.apply_tx(&mut tx, batch, now_ms).await)
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
        let rid = i64::try_from(receipt.id).map_err(corrupt)?;
        let committed = transact!(self, |tx| self.commit_tx(&mut tx, rid, log, now_ms).await)?;
        committed.ok_or_else(|| {
            StateError::Unavailable(
                "the batch outlived its lease and was undone; it will be redelivered".into(),
            )
        })
    }

    async fn claim_log(
        &self,
        owner: &str,
        lease: Duration,
        limit: usize,
    ) -> Result<Claim, StateError> {
        transact!(self, |tx| self
            .claim_log_tx(&mut tx, owner, lease, limit)
            .await)
    }

    async fn ack_log(
        &self,
        owner: &str,
        delivered: &[u64],
        lease: Duration,
    ) -> Result<(bool, usize), StateError> {
        transact!(self, |tx| self
            .ack_log_tx(&mut tx, owner, delivered, lease)
            .await)
    }

    async fn release_log(&self, owner: &str) -> Result<(), StateError> {
        sqlx::query("DELETE FROM esper_state_outbox_lease WHERE holder = $1")
            .bind(owner)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn rollback(&self, receipt: &Receipt) -> Result<(), StateError> {
        if receipt.id == 0 {
            return Ok(());
        }
        let rid = i64::try_from(receipt.id).map_err(corrupt)?;
        transact!(self, |tx| self.rollback_tx(&mut tx, rid).await)
    }

    async fn forgive(&self, revoked: &[Revoked], now_ms: i64) -> Result<usize, StateError> {
        if revoked.is_empty() {
            return Ok(0);
        }
        transact!(self, |tx| self.forgive_tx(&mut tx, revoked, now_ms).await)
    }

    async fn retain(&self, keep: &[PolicyKey]) -> Result<(), StateError> {
        let keep: Vec<String> = keep.iter().map(policy_key).collect();
        transact!(self, |tx| self.retain_tx(&mut tx, &keep).await)
    }

    async fn cleanup(&self, now_ms: i64) -> Result<CleanupReport, StateError> {
        transact!(self, |tx| self.cleanup_tx(&mut tx, now_ms).await)
    }

    fn stats(&self) -> StateStats {
        *self.stats.lock()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_undos_round_trip_and_older_logs_still_read() {
        let policy = parse_policy("p#0000000000000001").unwrap();
        let entity = parse_entity("ip:10.0.0.1").unwrap();
        for consumed in [None, Some(vec![vec![(33, 2), (34, 1)], vec![]])] {
            let undo = Undo::SequenceSteps {
                added: vec![(0, 35), (1, 33)],
                consumed,
            };
            let change = (policy.clone(), entity.clone(), undo.clone());
            let text = serde_json::to_string(&UndoLog::of(&[change], &Receipt::default())).unwrap();
            let (_, changes) = serde_json::from_str::<UndoLog>(&text)
                .unwrap()
                .receipt(42)
                .unwrap();
            assert_eq!(changes[0].2, undo);
        }
        // A log written before: the progress to restore, in the one-sequence form.
        let older = r#"{"inc":[["p#0000000000000001","ip:10.0.0.1",{"S":[0,2,1000]}]],"cd":[]}"#;
        let (_, changes) = serde_json::from_str::<UndoLog>(older)
            .unwrap()
            .receipt(42)
            .unwrap();
        assert_eq!(
            changes[0].2,
            Undo::Sequence {
                prev: Some(SeqProgress::Legacy {
                    step: 0,
                    matched: 2,
                    started_ms: 1000,
                })
            }
        );
    }

    #[test]
    fn undo_logs_read_alike_with_and_without_prior_offenses() {
        let before = r#"{"inc":[],"cd":[["p#0000000000000001","ip:10.0.0.1",[5000,7,0,2,4000]]]}"#;
        let log: UndoLog = serde_json::from_str(before).unwrap();
        let (receipt, _) = log.receipt(7).unwrap();
        let d = receipt.cooldowns[0].2;
        assert_eq!(
            (d.offenses, d.last_offense_ms, d.prior_offense_ms),
            (2, 4000, 0)
        );

        let receipt = Receipt {
            cooldowns: vec![(
                parse_policy("p#0000000000000001").unwrap(),
                parse_entity("ip:10.0.0.1").unwrap(),
                DecisionState {
                    prior_offense_ms: 3000,
                    ..d
                },
            )],
            ..Receipt::default()
        };
        let text = serde_json::to_string(&UndoLog::of(&[], &receipt)).unwrap();
        let (back, _) = serde_json::from_str::<UndoLog>(&text)
            .unwrap()
            .receipt(7)
            .unwrap();
        assert_eq!(back.cooldowns[0].2.prior_offense_ms, 3000);
        // What versions without it read: the same log, the prior offense aside.
        let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let older = value.as_object_mut().unwrap();
        assert!(older.remove("cp").is_some());
        assert_eq!(
            serde_json::Value::from(older.clone()),
            serde_json::from_str::<serde_json::Value>(before).unwrap()
        );
    }
}
