//! The PostgreSQL control store: the same schema and statements as SQLite (its own
//! migrations directory only because integer widths differ), for several control-plane
//! instances over one database.
//!
//! Migrations run under sqlx's advisory lock, so instances starting together apply them
//! once. Writes take a transaction-scoped advisory lock, so versions and the revision
//! stay consecutive whichever instance writes. Every revision bump sends
//! `NOTIFY esper_revision`; each instance LISTENs and keeps the revision in memory, so
//! the revision that workers poll costs no query and moves on every instance as soon as
//! any of them commits. While the listening connection is down, reads go to the table.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use esper_protocol::{Decision, DecisionMode, ProxyConfigDoc};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, PgConnection, Postgres, Row, Transaction};
use tokio::task::AbortHandle;

use super::{
    ActiveSnapshot, BROKER_COPY, ControlStore, DecisionQuery, GET_PROXY_CONFIG_SQL, ListRecord,
    LoggedDecision, PROXY_CONFIG_NAME, PUT_PROXY_CONFIG_SQL, PolicyRecord, PolicyVersionRecord,
    PolicyWrite, PutOutcome, RevokeTarget, Secret, StoreError, parse_ts, proxy_config_row,
    redact_url, ts, write_secret,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations-postgres");

/// The channel revision bumps are announced on; the payload is the new revision.
pub const REVISION_CHANNEL: &str = "esper_revision";
/// The advisory lock every write transaction holds (an arbitrary constant: "esper" in
/// ASCII), so writers through different instances take turns.
const WRITE_LOCK: i64 = 0x65_7370_6572;
/// The advisory lock `migrate` holds, so only one instance migrates at a time.
const MIGRATE_LOCK: i64 = 0x65_7370_6573;
/// How long to wait before listening again after the listening connection failed.
const RELISTEN_AFTER: Duration = Duration::from_secs(1);

/// The revision as last announced, valid while `live` (the listener is connected and
/// caught up).
#[derive(Default)]
struct RevisionCache {
    value: AtomicI64,
    live: AtomicBool,
}

impl RevisionCache {
    fn raise(&self, rev: i64) {
        self.value.fetch_max(rev, Ordering::SeqCst);
    }
}

/// The PostgreSQL implementation of [`ControlStore`].
pub struct PostgresStore {
    pool: PgPool,
    revision: Arc<RevisionCache>,
    listener: AbortHandle,
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user:password@host:port/db`). The database must
    /// exist; the schema is created by [`migrate`](ControlStore::migrate).
    pub async fn connect(url: &str, max_connections: u32) -> Result<PostgresStore, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            url: redact_url(url),
            reason,
        };
        let opts: PgConnectOptions = url
            .parse()
            .map_err(|e: sqlx::Error| open_err(e.to_string()))?;
        // One plain attempt first: an unreachable server is one clear error at once,
        // where the pool would keep retrying until its acquire timeout.
        PgConnection::connect_with(&opts)
            .await
            .map_err(|e| open_err(e.to_string()))?
            .close()
            .await
            .map_err(|e| open_err(e.to_string()))?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(opts.clone())
            .await
            .map_err(|e| open_err(e.to_string()))?;
        // LISTEN holds its connection for good: give it its own, outside the pool.
        let listen_pool = PgPoolOptions::new()
            .max_connections(1)
            .max_lifetime(None)
            .idle_timeout(None)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(opts);
        let revision = Arc::new(RevisionCache::default());
        let listener = tokio::spawn(follow_revisions(
            pool.clone(),
            listen_pool,
            revision.clone(),
        ))
        .abort_handle();
        Ok(PostgresStore {
            pool,
            revision,
            listener,
        })
    }

    async fn begin(&self) -> Result<Transaction<'_, Postgres>, StoreError> {
        Ok(self.pool.begin().await?)
    }

    /// A write transaction: the writers' advisory lock is held until it ends.
    async fn begin_write(&self) -> Result<Transaction<'_, Postgres>, StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(WRITE_LOCK)
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    /// True while the revision is kept current by the LISTEN connection (reads of it
    /// cost no query); false while that connection is down or catching up.
    pub fn listening(&self) -> bool {
        self.revision.live.load(Ordering::SeqCst)
    }

    async fn read_revision(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT value FROM counters WHERE name = 'revision'")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("value")?)
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// Migrations not applied yet on this database (no table yet means none applied).
async fn pending_on(conn: &mut PgConnection) -> Vec<String> {
    let applied: Vec<i64> =
        sqlx::query("SELECT version FROM _sqlx_migrations WHERE success = TRUE")
            .fetch_all(&mut *conn)
            .await
            .map(|rows| rows.iter().filter_map(|r| r.try_get(0).ok()).collect())
            .unwrap_or_default();
    MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration() && !applied.contains(&m.version))
        .map(|m| format!("{} {}", m.version, m.description))
        .collect()
}

/// Keeps `cache` at the newest announced revision. After (re)connecting it reads the
/// table once, since announcements made while it was away are lost.
async fn follow_revisions(pool: PgPool, listen_pool: PgPool, cache: Arc<RevisionCache>) {
    loop {
        if pool.is_closed() {
            listen_pool.close().await;
            return;
        }
        match PgListener::connect_with(&listen_pool).await {
            Ok(mut listener) => {
                if listener.listen(REVISION_CHANNEL).await.is_ok() {
                    if let Ok(row) =
                        sqlx::query("SELECT value FROM counters WHERE name = 'revision'")
                            .fetch_one(&pool)
                            .await
                        && let Ok(rev) = row.try_get::<i64, _>("value")
                    {
                        cache.raise(rev);
                        cache.live.store(true, Ordering::SeqCst);
                    }
                    // `try_recv` answers `None` when the connection dropped; start over
                    // (and catch up) rather than trusting what follows.
                    while let Ok(Some(n)) = listener.try_recv().await {
                        if let Ok(rev) = n.payload().parse::<i64>() {
                            cache.raise(rev);
                        }
                    }
                }
                cache.live.store(false, Ordering::SeqCst);
            }
            Err(e) => {
                cache.live.store(false, Ordering::SeqCst);
                tracing::debug!(error = %e, "cannot listen for revision changes yet");
            }
        }
        tokio::time::sleep(RELISTEN_AFTER).await;
    }
}

fn json_col(row: &PgRow, col: &str) -> Result<serde_json::Value, StoreError> {
    let text: String = row.try_get(col)?;
    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("{col}: {e}")))
}

fn ts_col(row: &PgRow, col: &str) -> Result<DateTime<Utc>, StoreError> {
    let text: String = row.try_get(col)?;
    parse_ts(&text)
}

fn policy_row(row: &PgRow) -> Result<PolicyRecord, StoreError> {
    Ok(PolicyRecord {
        id: row.try_get("id")?,
        version: row.try_get("version")?,
        enabled: row.try_get::<i64, _>("enabled")? != 0,
        mode: row.try_get("mode")?,
        spec: json_col(row, "spec")?,
        created_at: ts_col(row, "created_at")?,
        updated_at: ts_col(row, "updated_at")?,
    })
}

fn list_row(row: &PgRow) -> Result<ListRecord, StoreError> {
    let items: String = row.try_get("items")?;
    Ok(ListRecord {
        name: row.try_get("name")?,
        kind: row.try_get("kind")?,
        items: serde_json::from_str(&items)
            .map_err(|e| StoreError::Corrupt(format!("list items: {e}")))?,
        updated_at: ts_col(row, "updated_at")?,
    })
}

fn decision_row(row: &PgRow) -> Result<LoggedDecision, StoreError> {
    let body: String = row.try_get("body")?;
    let revoked_at: Option<String> = row.try_get("revoked_at")?;
    Ok(LoggedDecision {
        decision: serde_json::from_str(&body)
            .map_err(|e| StoreError::Corrupt(format!("decision body: {e}")))?,
        recorded_at: ts_col(row, "recorded_at")?,
        revoked_at: revoked_at.as_deref().map(parse_ts).transpose()?,
        revoked_by: row.try_get("revoked_by")?,
    })
}

fn mode_name(mode: DecisionMode) -> &'static str {
    match mode {
        DecisionMode::Enforce => "enforce",
        DecisionMode::Shadow => "shadow",
    }
}

const POLICY_COLS: &str = "id, version, enabled, mode, spec, created_at, updated_at";

/// Bumps the revision and announces it (delivered when the transaction commits).
async fn bump_revision(tx: &mut Transaction<'_, Postgres>) -> Result<i64, StoreError> {
    let rev: i64 = sqlx::query(
        "UPDATE counters SET value = value + 1 WHERE name = 'revision' RETURNING value",
    )
    .fetch_one(&mut **tx)
    .await?
    .try_get("value")?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(REVISION_CHANNEL)
        .bind(rev.to_string())
        .execute(&mut **tx)
        .await?;
    Ok(rev)
}

async fn next_version(tx: &mut Transaction<'_, Postgres>, id: &str) -> Result<i64, StoreError> {
    // From the history, so a policy deleted and applied again keeps counting up.
    let row = sqlx::query("SELECT MAX(version) AS v FROM policy_versions WHERE policy_id = $1")
        .bind(id)
        .fetch_one(&mut **tx)
        .await?;
    let max: Option<i64> = row.try_get("v")?;
    Ok(max.unwrap_or(0) + 1)
}

async fn insert_version(
    tx: &mut Transaction<'_, Postgres>,
    id: &str,
    version: i64,
    change: &str,
    spec: &str,
    by: &str,
    now: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO policy_versions (policy_id, version, change, spec, changed_by, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id)
    .bind(version)
    .bind(change)
    .bind(spec)
    .bind(by)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[async_trait]
impl ControlStore for PostgresStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    async fn migrate(&self) -> Result<Vec<String>, StoreError> {
        // One connection for the lock, the look and the run: instances starting together
        // take turns, and each reports only what it applied itself.
        let mut conn = self.pool.acquire().await?;
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(MIGRATE_LOCK)
            .execute(&mut *conn)
            .await?;
        let pending = pending_on(&mut conn).await;
        let ran = MIGRATOR.run_direct(&mut *conn).await;
        let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(MIGRATE_LOCK)
            .execute(&mut *conn)
            .await;
        drop(conn);
        ran.map_err(|e| StoreError::Migrate(e.to_string()))?;
        unlocked?;
        if let Ok(rev) = self.read_revision().await {
            self.revision.raise(rev);
        }
        Ok(pending)
    }

    async fn pending_migrations(&self) -> Result<Vec<String>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        Ok(pending_on(&mut conn).await)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        self.listener.abort();
        self.pool.close().await;
    }

    async fn list_policies(&self) -> Result<Vec<PolicyRecord>, StoreError> {
        sqlx::query(&format!("SELECT {POLICY_COLS} FROM policies ORDER BY id"))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(policy_row)
            .collect()
    }

    async fn get_policy(&self, id: &str) -> Result<Option<PolicyRecord>, StoreError> {
        sqlx::query(&format!("SELECT {POLICY_COLS} FROM policies WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(policy_row)
            .transpose()
    }

    async fn put_policies(&self, writes: Vec<PolicyWrite>) -> Result<Vec<PutOutcome>, StoreError> {
        let mut tx = self.begin_write().await?;
        let now = ts(Utc::now());
        let mut outcomes = Vec::with_capacity(writes.len());
        let mut changed_any = false;
        for w in writes {
            let current = sqlx::query(&format!("SELECT {POLICY_COLS} FROM policies WHERE id = $1"))
                .bind(&w.id)
                .fetch_optional(&mut *tx)
                .await?
                .as_ref()
                .map(policy_row)
                .transpose()?;
            if let Some(cur) = &current
                && cur.spec == w.spec
            {
                outcomes.push(PutOutcome {
                    id: w.id,
                    version: cur.version,
                    changed: false,
                });
                continue;
            }
            let version = next_version(&mut tx, &w.id).await?;
            let spec = w.spec.to_string();
            sqlx::query(
                "INSERT INTO policies (id, version, enabled, mode, spec, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $6) \
                 ON CONFLICT (id) DO UPDATE SET version = excluded.version, \
                 enabled = excluded.enabled, mode = excluded.mode, spec = excluded.spec, \
                 updated_at = excluded.updated_at",
            )
            .bind(&w.id)
            .bind(version)
            .bind(i64::from(w.enabled))
            .bind(&w.mode)
            .bind(&spec)
            .bind(&now)
            .execute(&mut *tx)
            .await?;
            insert_version(
                &mut tx,
                &w.id,
                version,
                &w.change,
                &spec,
                &w.changed_by,
                &now,
            )
            .await?;
            changed_any = true;
            outcomes.push(PutOutcome {
                id: w.id,
                version,
                changed: true,
            });
        }
        let bumped = if changed_any {
            Some(bump_revision(&mut tx).await?)
        } else {
            None
        };
        tx.commit().await?;
        if let Some(rev) = bumped {
            self.revision.raise(rev);
        }
        Ok(outcomes)
    }

    async fn delete_policy(&self, id: &str, by: &str) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        let Some(row) = sqlx::query("SELECT spec FROM policies WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(false);
        };
        let spec: String = row.try_get("spec")?;
        sqlx::query("DELETE FROM policies WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let version = next_version(&mut tx, id).await?;
        insert_version(&mut tx, id, version, "delete", &spec, by, &ts(Utc::now())).await?;
        let rev = bump_revision(&mut tx).await?;
        tx.commit().await?;
        self.revision.raise(rev);
        Ok(true)
    }

    async fn policy_versions(&self, id: &str) -> Result<Vec<PolicyVersionRecord>, StoreError> {
        sqlx::query(
            "SELECT policy_id, version, change, spec, changed_by, created_at \
             FROM policy_versions WHERE policy_id = $1 ORDER BY version",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| {
            Ok(PolicyVersionRecord {
                id: row.try_get("policy_id")?,
                version: row.try_get("version")?,
                change: row.try_get("change")?,
                spec: json_col(row, "spec")?,
                changed_by: row.try_get("changed_by")?,
                created_at: ts_col(row, "created_at")?,
            })
        })
        .collect()
    }

    async fn list_lists(&self) -> Result<Vec<ListRecord>, StoreError> {
        sqlx::query("SELECT name, kind, items, updated_at FROM lists ORDER BY name")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(list_row)
            .collect()
    }

    async fn get_list(&self, name: &str) -> Result<Option<ListRecord>, StoreError> {
        sqlx::query("SELECT name, kind, items, updated_at FROM lists WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(list_row)
            .transpose()
    }

    async fn put_list(
        &self,
        name: &str,
        kind: &str,
        items: Vec<String>,
    ) -> Result<ListRecord, StoreError> {
        let mut tx = self.begin_write().await?;
        let current =
            sqlx::query("SELECT name, kind, items, updated_at FROM lists WHERE name = $1")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?
                .as_ref()
                .map(list_row)
                .transpose()?;
        if let Some(cur) = current
            && cur.kind == kind
            && cur.items == items
        {
            return Ok(cur);
        }
        let now = Utc::now();
        let items_json =
            serde_json::to_string(&items).map_err(|e| StoreError::Query(e.to_string()))?;
        sqlx::query(
            "INSERT INTO lists (name, kind, items, updated_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (name) DO UPDATE SET kind = excluded.kind, items = excluded.items, \
             updated_at = excluded.updated_at",
        )
        .bind(name)
        .bind(kind)
        .bind(&items_json)
        .bind(ts(now))
        .execute(&mut *tx)
        .await?;
        let rev = bump_revision(&mut tx).await?;
        tx.commit().await?;
        self.revision.raise(rev);
        Ok(ListRecord {
            name: name.to_string(),
            kind: kind.to_string(),
            items,
            // Read back at the stored precision.
            updated_at: parse_ts(&ts(now))?,
        })
    }

    async fn delete_list(&self, name: &str) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query("DELETE FROM lists WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            > 0;
        let bumped = if done {
            Some(bump_revision(&mut tx).await?)
        } else {
            None
        };
        tx.commit().await?;
        if let Some(rev) = bumped {
            self.revision.raise(rev);
        }
        Ok(done)
    }

    async fn revision(&self) -> Result<i64, StoreError> {
        if self.revision.live.load(Ordering::SeqCst) {
            return Ok(self.revision.value.load(Ordering::SeqCst));
        }
        let rev = self.read_revision().await?;
        self.revision.raise(rev);
        Ok(rev)
    }

    async fn active_snapshot(&self) -> Result<ActiveSnapshot, StoreError> {
        let mut tx = self.begin().await?;
        // One snapshot for the three reads (the default isolation takes one per statement).
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await?;
        let revision: i64 = sqlx::query("SELECT value FROM counters WHERE name = 'revision'")
            .fetch_one(&mut *tx)
            .await?
            .try_get("value")?;
        let policies = sqlx::query(&format!(
            "SELECT {POLICY_COLS} FROM policies WHERE enabled = 1 ORDER BY id"
        ))
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(policy_row)
        .collect::<Result<Vec<_>, _>>()?;
        let lists = sqlx::query("SELECT name, kind, items, updated_at FROM lists ORDER BY name")
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(list_row)
            .collect::<Result<Vec<_>, _>>()?;
        tx.commit().await?;
        Ok(ActiveSnapshot {
            revision,
            policies,
            lists,
        })
    }

    async fn record_decisions(&self, decisions: &[Decision]) -> Result<usize, StoreError> {
        if decisions.is_empty() {
            return Ok(0);
        }
        let mut tx = self.begin_write().await?;
        let now = ts(Utc::now());
        let mut inserted = 0;
        for d in decisions {
            let body = serde_json::to_string(d).map_err(|e| StoreError::Query(e.to_string()))?;
            let policy = d
                .policy_id
                .clone()
                .or_else(|| d.mitigation.reason.policy_id.clone());
            inserted += sqlx::query(
                "INSERT INTO decisions (id, entity, policy_id, mode, action, origin, decided_by, \
                 decided_at, expires_at, body, recorded_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
                 ON CONFLICT (id) DO UPDATE SET policy_id = excluded.policy_id, \
                 decided_by = excluded.decided_by, body = excluded.body \
                 WHERE decisions.decided_by = $12 AND excluded.decided_by <> $12",
            )
            .bind(&d.id)
            .bind(d.mitigation.entity.to_string())
            .bind(policy)
            .bind(mode_name(d.mode))
            .bind(d.mitigation.action.name())
            .bind(d.mitigation.origin.to_string())
            .bind(&d.decided_by)
            .bind(ts(d.decided_at))
            .bind(ts(d.mitigation.expires_at))
            .bind(body)
            .bind(&now)
            .bind(BROKER_COPY)
            .execute(&mut *tx)
            .await?
            .rows_affected() as usize;
        }
        tx.commit().await?;
        Ok(inserted)
    }

    async fn query_decisions(&self, q: &DecisionQuery) -> Result<Vec<LoggedDecision>, StoreError> {
        let mut sql = String::from(
            "SELECT body, recorded_at, revoked_at, revoked_by FROM decisions WHERE 1 = 1",
        );
        let mut args: Vec<String> = Vec::new();
        if let Some(id) = &q.id {
            args.push(id.clone());
            sql.push_str(&format!(" AND id = ${}", args.len()));
        }
        if let Some(e) = &q.entity {
            args.push(e.to_string());
            sql.push_str(&format!(" AND entity = ${}", args.len()));
        }
        if let Some(p) = &q.policy {
            args.push(p.clone());
            sql.push_str(&format!(" AND policy_id = ${}", args.len()));
        }
        if let Some(m) = q.mode {
            args.push(mode_name(m).to_string());
            sql.push_str(&format!(" AND mode = ${}", args.len()));
        }
        if q.active {
            args.push(ts(Utc::now()));
            sql.push_str(&format!(
                " AND mode = 'enforce' AND revoked_at IS NULL AND expires_at > ${}",
                args.len()
            ));
        }
        if let Some(mark) = &q.before {
            args.push(ts(mark.decided_at));
            args.push(mark.id.clone());
            let (at, id) = (args.len() - 1, args.len());
            sql.push_str(&format!(
                " AND (decided_at < ${at} OR (decided_at = ${at} AND id < ${id}))"
            ));
        }
        sql.push_str(&format!(
            " ORDER BY decided_at DESC, id DESC LIMIT {}",
            q.limit.max(1)
        ));
        let mut query = sqlx::query(&sql);
        for a in &args {
            query = query.bind(a);
        }
        query
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(decision_row)
            .collect()
    }

    async fn mark_revoked(
        &self,
        target: &RevokeTarget,
        by: &str,
        at: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let (col, value) = match target {
            RevokeTarget::Id(id) => ("id", id.clone()),
            RevokeTarget::Entity(e) => ("entity", e.to_string()),
            // `$3 = $3` keeps one statement shape for every target.
            RevokeTarget::All => ("$3", String::new()),
        };
        // Only decisions that were in force can be revoked.
        let sql = format!(
            "UPDATE decisions SET revoked_at = $1, revoked_by = $2 \
             WHERE {col} = $3 AND revoked_at IS NULL AND mode = 'enforce' AND expires_at > $1"
        );
        Ok(sqlx::query(&sql)
            .bind(ts(at))
            .bind(by)
            .bind(value)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    async fn token_count(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM tokens")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?;
        Ok(n.max(0) as u64)
    }

    async fn add_token(&self, name: &str, hash: &str) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO tokens (name, hash, created_at) VALUES ($1, $2, $3)")
            .bind(name)
            .bind(hash)
            .bind(ts(Utc::now()))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn token_name(&self, hash: &str) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query("SELECT name FROM tokens WHERE hash = $1")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| r.try_get("name"))
            .transpose()?)
    }
    async fn proxy_config(&self) -> Result<Option<ProxyConfigDoc>, StoreError> {
        sqlx::query(GET_PROXY_CONFIG_SQL)
            .bind(PROXY_CONFIG_NAME)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(proxy_config_row)
            .transpose()
    }

    async fn put_proxy_config(&self, config: &str, by: &str) -> Result<ProxyConfigDoc, StoreError> {
        let changed = sqlx::query(PUT_PROXY_CONFIG_SQL)
            .bind(PROXY_CONFIG_NAME)
            .bind(config)
            .bind(by)
            .bind(ts(Utc::now()))
            .fetch_optional(&self.pool)
            .await?;
        match changed {
            Some(row) => proxy_config_row(&row),
            None => self
                .proxy_config()
                .await?
                .ok_or_else(|| StoreError::Query("proxy configuration vanished".into())),
        }
    }

    async fn secret(&self, name: &str, fresh: &str) -> Result<Secret, StoreError> {
        write_secret(&self.pool, name, fresh, None).await
    }

    async fn rotate_secret(
        &self,
        name: &str,
        fresh: &str,
        keep_previous: bool,
    ) -> Result<Secret, StoreError> {
        write_secret(&self.pool, name, fresh, Some(keep_previous)).await
    }
}
