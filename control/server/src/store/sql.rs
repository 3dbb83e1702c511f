//! The control store's statements, written once for both databases. The schema keeps to
//! what SQLite and PostgreSQL share (`$N` placeholders, `ON CONFLICT`, `RETURNING`, TEXT
//! timestamps and JSON), so every query below runs unchanged on either; what differs
//! (opening, migrating, how writers take turns, how a new revision is announced) is the
//! [`Backend`] each store implements.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use esper_protocol::{
    Decision, DecisionMode, ProxyConfigDoc, RevocationMark, RevokedDecision, RevokedDecisions,
};
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Pool, Row, Type};
use tokio::sync::MutexGuard;

use super::{
    ActiveSnapshot, BROKER_COPY, ControlStore, DecisionQuery, DrainAsk, Heard, ListRecord,
    LoggedDecision, MemberBeat, MemberRecord, PolicyRecord, PolicyVersionRecord, PolicyWrite,
    PutOutcome, RevokeTarget, Secret, StoreError, TokenRecord, TokenRemoval, TokenRole, parse_ts,
    ts,
};

/// A database's connection: the parts of a control store that are not the same SQL.
#[async_trait]
pub(crate) trait Backend: Send + Sync + 'static {
    type Db: Database;

    /// A short name for status output.
    const KIND: &'static str;

    fn pool(&self) -> &Pool<Self::Db>;

    async fn migrate(&self) -> Result<Vec<String>, StoreError>;

    async fn pending_migrations(&self) -> Result<Vec<String>, StoreError>;

    async fn close(&self);

    /// Why the database cannot be reached, when the pool only says it waited for a
    /// connection in vain (the reason it could not open one stays inside the pool).
    async fn unreachable_because(&self) -> Option<String> {
        None
    }

    /// Held around every write: SQLite's writers take turns in this process (a read
    /// transaction that has to upgrade to a write would otherwise fail with
    /// `database is locked`); PostgreSQL needs none for a single statement.
    async fn turn(&self) -> Option<MutexGuard<'_, ()>>;

    /// A transaction that writes versions or the revision, which must stay consecutive
    /// whichever control-plane instance writes.
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, Self::Db>, StoreError>;

    /// A read-only transaction in which every statement sees the same snapshot.
    async fn begin_snapshot(&self) -> Result<sqlx::Transaction<'static, Self::Db>, StoreError>;

    /// Tells other instances about `revision`, inside the transaction that made it.
    async fn announce(
        &self,
        tx: &mut <Self::Db as Database>::Connection,
        revision: i64,
    ) -> Result<(), StoreError>;

    /// `revision` was committed by this instance.
    fn committed(&self, revision: i64);

    /// The revision counter (PostgreSQL answers it from what it heard announced).
    async fn revision(&self) -> Result<i64, StoreError>;

    fn rows_affected(result: &<Self::Db as Database>::QueryResult) -> u64;
}

/// Reads a row's columns by name, in either database.
pub(crate) trait Cols {
    fn text(&self, col: &str) -> Result<String, StoreError>;
    fn opt_text(&self, col: &str) -> Result<Option<String>, StoreError>;
    fn int(&self, col: &str) -> Result<i64, StoreError>;
}

impl<R> Cols for R
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
{
    fn text(&self, col: &str) -> Result<String, StoreError> {
        Ok(self.try_get(col)?)
    }
    fn opt_text(&self, col: &str) -> Result<Option<String>, StoreError> {
        Ok(self.try_get(col)?)
    }
    fn int(&self, col: &str) -> Result<i64, StoreError> {
        Ok(self.try_get(col)?)
    }
}

fn json_col(row: &impl Cols, col: &str) -> Result<serde_json::Value, StoreError> {
    serde_json::from_str(&row.text(col)?).map_err(|e| StoreError::Corrupt(format!("{col}: {e}")))
}

fn ts_col(row: &impl Cols, col: &str) -> Result<DateTime<Utc>, StoreError> {
    parse_ts(&row.text(col)?)
}

fn opt_ts_col(row: &impl Cols, col: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
    row.opt_text(col)?.as_deref().map(parse_ts).transpose()
}

const POLICY_COLS: &str = "id, version, enabled, mode, spec, created_at, updated_at";
const LIST_COLS: &str = "name, kind, items, updated_at";

fn policy_row(row: &impl Cols) -> Result<PolicyRecord, StoreError> {
    Ok(PolicyRecord {
        id: row.text("id")?,
        version: row.int("version")?,
        enabled: row.int("enabled")? != 0,
        mode: row.text("mode")?,
        spec: json_col(row, "spec")?,
        created_at: ts_col(row, "created_at")?,
        updated_at: ts_col(row, "updated_at")?,
    })
}

fn role_col(row: &impl Cols) -> Result<TokenRole, StoreError> {
    row.text("role")?
        .parse()
        .map_err(|e| StoreError::Corrupt(format!("token role: {e}")))
}

fn list_row(row: &impl Cols) -> Result<ListRecord, StoreError> {
    Ok(ListRecord {
        name: row.text("name")?,
        kind: row.text("kind")?,
        items: serde_json::from_str(&row.text("items")?)
            .map_err(|e| StoreError::Corrupt(format!("list items: {e}")))?,
        updated_at: ts_col(row, "updated_at")?,
    })
}

fn decision_row(row: &impl Cols) -> Result<LoggedDecision, StoreError> {
    Ok(LoggedDecision {
        decision: serde_json::from_str(&row.text("body")?)
            .map_err(|e| StoreError::Corrupt(format!("decision body: {e}")))?,
        recorded_at: ts_col(row, "recorded_at")?,
        revoked_at: opt_ts_col(row, "revoked_at")?,
        revoked_by: row.opt_text("revoked_by")?,
    })
}

fn version_row(row: &impl Cols) -> Result<PolicyVersionRecord, StoreError> {
    Ok(PolicyVersionRecord {
        id: row.text("policy_id")?,
        version: row.int("version")?,
        change: row.text("change")?,
        spec: json_col(row, "spec")?,
        changed_by: row.text("changed_by")?,
        created_at: ts_col(row, "created_at")?,
    })
}

fn secret_row(row: &impl Cols) -> Result<Secret, StoreError> {
    Ok(Secret {
        value: row.text("value")?,
        previous: row.opt_text("previous")?,
        revision: row.int("revision")?,
        rotated_at: opt_ts_col(row, "rotated_at")?,
    })
}

fn proxy_config_row(row: &impl Cols) -> Result<ProxyConfigDoc, StoreError> {
    Ok(ProxyConfigDoc {
        revision: row.int("revision")?,
        config: row.text("config")?,
        updated_by: row.text("updated_by")?,
        updated_at: ts_col(row, "updated_at")?,
    })
}

fn mode_name(mode: DecisionMode) -> &'static str {
    match mode {
        DecisionMode::Enforce => "enforce",
        DecisionMode::Shadow => "shadow",
    }
}

pub(crate) const READ_REVISION_SQL: &str = "SELECT value FROM counters WHERE name = 'revision'";

/// The one proxy configuration document's name in `proxy_configs`.
const PROXY_CONFIG_NAME: &str = "default";

/// Inserts or replaces the proxy configuration in one statement; no row comes back when
/// the text is unchanged.
const PUT_PROXY_CONFIG_SQL: &str = "INSERT INTO proxy_configs \
     (name, revision, config, updated_by, updated_at) VALUES ($1, 1, $2, $3, $4) \
     ON CONFLICT (name) DO UPDATE SET revision = proxy_configs.revision + 1, \
     config = excluded.config, updated_by = excluded.updated_by, \
     updated_at = excluded.updated_at WHERE proxy_configs.config <> excluded.config \
     RETURNING revision, config, updated_by, updated_at";

const GET_PROXY_CONFIG_SQL: &str =
    "SELECT revision, config, updated_by, updated_at FROM proxy_configs WHERE name = $1";

/// Stores a secret unless one of that name exists; [`GET_SECRET_SQL`] then reads
/// whichever won.
const ADD_SECRET_SQL: &str = "INSERT INTO secrets (name, value, created_at) \
     VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING";
const GET_SECRET_SQL: &str =
    "SELECT value, previous, revision, rotated_at FROM secrets WHERE name = $1";
/// Replaces a secret, or stores it when there is none: $4 says whether the value
/// replaced is kept.
const ROTATE_SECRET_SQL: &str = "INSERT INTO secrets (name, value, created_at) \
     VALUES ($1, $2, $3) ON CONFLICT (name) DO UPDATE SET \
     previous = CASE WHEN $4 THEN secrets.value ELSE NULL END, value = excluded.value, \
     revision = secrets.revision + 1, rotated_at = excluded.created_at \
     RETURNING value, previous, revision, rotated_at";

/// Grows the revision and has the backend announce it; returns the new revision.
async fn bump_revision<B>(
    db: &B,
    conn: &mut <B::Db as Database>::Connection,
) -> Result<i64, StoreError>
where
    B: Backend,
    for<'c> &'c mut <B::Db as Database>::Connection: Executor<'c, Database = B::Db>,
    for<'q> <B::Db as Database>::Arguments<'q>: IntoArguments<'q, B::Db>,
    for<'r> i64: Decode<'r, B::Db> + Type<B::Db>,
    for<'a> &'a str: ColumnIndex<<B::Db as Database>::Row>,
{
    let revision: i64 = sqlx::query(
        "UPDATE counters SET value = value + 1 WHERE name = 'revision' RETURNING value",
    )
    .fetch_one(&mut *conn)
    .await?
    .try_get("value")?;
    db.announce(conn, revision).await?;
    Ok(revision)
}

/// Inside a write transaction (writers take turns, so nothing changes the revision until
/// it ends): `Stale` unless the revision is `expected`, when one is given.
async fn still_at<DB>(conn: &mut DB::Connection, expected: Option<i64>) -> Result<(), StoreError>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'r> i64: Decode<'r, DB> + Type<DB>,
    for<'a> &'a str: ColumnIndex<DB::Row>,
{
    let Some(expected) = expected else {
        return Ok(());
    };
    let revision: i64 = sqlx::query(READ_REVISION_SQL)
        .fetch_one(&mut *conn)
        .await?
        .try_get("value")?;
    if revision != expected {
        return Err(StoreError::Stale(format!(
            "policies or lists changed while this change was checked (revision {expected}, \
             now {revision})"
        )));
    }
    Ok(())
}

/// Records the next version of policy `id` in its history (counted from the history,
/// so a policy deleted and applied again keeps counting up); returns its number.
async fn add_version<DB>(
    conn: &mut DB::Connection,
    id: &str,
    change: &str,
    spec: &str,
    by: &str,
    now: &str,
) -> Result<i64, StoreError>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'a> &'a str: ColumnIndex<DB::Row>,
{
    let max: Option<i64> =
        sqlx::query("SELECT MAX(version) AS v FROM policy_versions WHERE policy_id = $1")
            .bind(id)
            .fetch_one(&mut *conn)
            .await?
            .try_get("v")?;
    let version = max.unwrap_or(0) + 1;
    sqlx::query(
        "INSERT INTO policy_versions (policy_id, version, change, spec, changed_by, \
         created_at) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id)
    .bind(version)
    .bind(change)
    .bind(spec)
    .bind(by)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(version)
}

#[async_trait]
impl<B> ControlStore for B
where
    B: Backend,
    for<'c> &'c Pool<B::Db>: Executor<'c, Database = B::Db>,
    for<'c> &'c mut <B::Db as Database>::Connection: Executor<'c, Database = B::Db>,
    for<'q> <B::Db as Database>::Arguments<'q>: IntoArguments<'q, B::Db>,
    for<'q> &'q str: Encode<'q, B::Db> + Type<B::Db>,
    for<'q> String: Encode<'q, B::Db> + Decode<'q, B::Db> + Type<B::Db>,
    for<'q> Option<String>: Encode<'q, B::Db>,
    for<'q> i64: Encode<'q, B::Db> + Decode<'q, B::Db> + Type<B::Db>,
    for<'q> bool: Encode<'q, B::Db> + Type<B::Db>,
    for<'a> &'a str: ColumnIndex<<B::Db as Database>::Row>,
{
    fn kind(&self) -> &'static str {
        B::KIND
    }

    async fn migrate(&self) -> Result<Vec<String>, StoreError> {
        Backend::migrate(self).await
    }

    async fn pending_migrations(&self) -> Result<Vec<String>, StoreError> {
        Backend::pending_migrations(self).await
    }

    /// Answers within 3 s (readiness's bound): a pool with no connection to give waits
    /// out its acquire timeout, so after 2 s a connection of its own says why.
    async fn ping(&self) -> Result<(), StoreError> {
        let query = sqlx::query("SELECT 1").execute(self.pool());
        match tokio::time::timeout(std::time::Duration::from_secs(2), query).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if !matches!(e, sqlx::Error::PoolTimedOut) => Err(e.into()),
            _ => Err(StoreError::Query(
                match Backend::unreachable_because(self).await {
                    Some(reason) => format!("cannot connect to the database: {reason}"),
                    None => "the database did not answer within 2s".to_string(),
                },
            )),
        }
    }

    async fn close(&self) {
        Backend::close(self).await
    }

    async fn list_policies(&self) -> Result<Vec<PolicyRecord>, StoreError> {
        sqlx::query(&format!("SELECT {POLICY_COLS} FROM policies ORDER BY id"))
            .fetch_all(self.pool())
            .await?
            .iter()
            .map(policy_row)
            .collect()
    }

    async fn get_policy(&self, id: &str) -> Result<Option<PolicyRecord>, StoreError> {
        sqlx::query(&format!("SELECT {POLICY_COLS} FROM policies WHERE id = $1"))
            .bind(id)
            .fetch_optional(self.pool())
            .await?
            .as_ref()
            .map(policy_row)
            .transpose()
    }

    async fn put_policies(
        &self,
        writes: Vec<PolicyWrite>,
        expected_revision: Option<i64>,
    ) -> Result<Vec<PutOutcome>, StoreError> {
        let _turn = self.turn().await;
        let mut tx = self.begin_write().await?;
        still_at::<B::Db>(&mut tx, expected_revision).await?;
        let now = ts(Utc::now());
        let mut outcomes = Vec::with_capacity(writes.len());
        let mut changed_any = false;
        for w in writes {
            let current = sqlx::query(&format!("SELECT {POLICY_COLS} FROM policies WHERE id = $1"))
                .bind(w.id.as_str())
                .fetch_optional(&mut *tx)
                .await?
                .as_ref()
                .map(policy_row)
                .transpose()?;
            if let Some(expected) = w.expected_version
                && current.as_ref().map(|c| c.version) != Some(expected)
            {
                return Err(StoreError::Stale(format!(
                    "policy `{}` changed since version {expected} was read",
                    w.id
                )));
            }
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
            let spec = w.spec.to_string();
            let version =
                add_version::<B::Db>(&mut tx, &w.id, &w.change, &spec, &w.changed_by, &now).await?;
            sqlx::query(
                "INSERT INTO policies (id, version, enabled, mode, spec, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $6) \
                 ON CONFLICT (id) DO UPDATE SET version = excluded.version, \
                 enabled = excluded.enabled, mode = excluded.mode, spec = excluded.spec, \
                 updated_at = excluded.updated_at",
            )
            .bind(w.id.as_str())
            .bind(version)
            .bind(i64::from(w.enabled))
            .bind(w.mode.as_str())
            .bind(spec.as_str())
            .bind(now.as_str())
            .execute(&mut *tx)
            .await?;
            changed_any = true;
            outcomes.push(PutOutcome {
                id: w.id,
                version,
                changed: true,
            });
        }
        let bumped = if changed_any {
            Some(bump_revision(self, &mut tx).await?)
        } else {
            None
        };
        tx.commit().await?;
        if let Some(revision) = bumped {
            self.committed(revision);
        }
        Ok(outcomes)
    }

    async fn delete_policy(&self, id: &str, by: &str) -> Result<bool, StoreError> {
        let _turn = self.turn().await;
        let mut tx = self.begin_write().await?;
        let Some(row) = sqlx::query("SELECT spec FROM policies WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(false);
        };
        let spec = row.text("spec")?;
        sqlx::query("DELETE FROM policies WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        add_version::<B::Db>(&mut tx, id, "delete", &spec, by, &ts(Utc::now())).await?;
        let revision = bump_revision(self, &mut tx).await?;
        tx.commit().await?;
        self.committed(revision);
        Ok(true)
    }

    async fn policy_versions(&self, id: &str) -> Result<Vec<PolicyVersionRecord>, StoreError> {
        sqlx::query(
            "SELECT policy_id, version, change, spec, changed_by, created_at \
             FROM policy_versions WHERE policy_id = $1 ORDER BY version",
        )
        .bind(id)
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(version_row)
        .collect()
    }

    async fn list_lists(&self) -> Result<Vec<ListRecord>, StoreError> {
        sqlx::query(&format!("SELECT {LIST_COLS} FROM lists ORDER BY name"))
            .fetch_all(self.pool())
            .await?
            .iter()
            .map(list_row)
            .collect()
    }

    async fn get_list(&self, name: &str) -> Result<Option<ListRecord>, StoreError> {
        sqlx::query(&format!("SELECT {LIST_COLS} FROM lists WHERE name = $1"))
            .bind(name)
            .fetch_optional(self.pool())
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
        expected_revision: Option<i64>,
    ) -> Result<ListRecord, StoreError> {
        let _turn = self.turn().await;
        let mut tx = self.begin_write().await?;
        still_at::<B::Db>(&mut tx, expected_revision).await?;
        let current = sqlx::query(&format!("SELECT {LIST_COLS} FROM lists WHERE name = $1"))
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
        .bind(items_json)
        .bind(ts(now))
        .execute(&mut *tx)
        .await?;
        let revision = bump_revision(self, &mut tx).await?;
        tx.commit().await?;
        self.committed(revision);
        Ok(ListRecord {
            name: name.to_string(),
            kind: kind.to_string(),
            items,
            // Read back at the stored precision.
            updated_at: parse_ts(&ts(now))?,
        })
    }

    async fn delete_list(
        &self,
        name: &str,
        expected_revision: Option<i64>,
    ) -> Result<bool, StoreError> {
        let _turn = self.turn().await;
        let mut tx = self.begin_write().await?;
        still_at::<B::Db>(&mut tx, expected_revision).await?;
        let result = sqlx::query("DELETE FROM lists WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        let done = B::rows_affected(&result) > 0;
        let bumped = if done {
            Some(bump_revision(self, &mut tx).await?)
        } else {
            None
        };
        tx.commit().await?;
        if let Some(revision) = bumped {
            self.committed(revision);
        }
        Ok(done)
    }

    async fn revision(&self) -> Result<i64, StoreError> {
        Backend::revision(self).await
    }

    async fn stored_revision(&self) -> Result<i64, StoreError> {
        sqlx::query(READ_REVISION_SQL)
            .fetch_one(self.pool())
            .await?
            .int("value")
    }

    async fn active_snapshot(&self) -> Result<ActiveSnapshot, StoreError> {
        let mut tx = self.begin_snapshot().await?;
        let revision = sqlx::query(READ_REVISION_SQL)
            .fetch_one(&mut *tx)
            .await?
            .int("value")?;
        let policies = sqlx::query(&format!(
            "SELECT {POLICY_COLS} FROM policies WHERE enabled = 1 ORDER BY id"
        ))
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(policy_row)
        .collect::<Result<Vec<_>, _>>()?;
        let lists = sqlx::query(&format!("SELECT {LIST_COLS} FROM lists ORDER BY name"))
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

    async fn prune_decisions(&self, expired_before: DateTime<Utc>) -> Result<u64, StoreError> {
        let _turn = self.turn().await;
        let done = sqlx::query("DELETE FROM decisions WHERE expires_at < $1")
            .bind(ts(expired_before))
            .execute(self.pool())
            .await?;
        Ok(B::rows_affected(&done))
    }

    async fn record_decisions(&self, decisions: &[Decision]) -> Result<usize, StoreError> {
        if decisions.is_empty() {
            return Ok(0);
        }
        let _turn = self.turn().await;
        let mut tx = self.begin_write().await?;
        let now = ts(Utc::now());
        let mut inserted = 0;
        for d in decisions {
            let body = serde_json::to_string(d).map_err(|e| StoreError::Query(e.to_string()))?;
            let policy = d
                .policy_id
                .clone()
                .or_else(|| d.mitigation.reason.policy_id.clone());
            let result = sqlx::query(
                "INSERT INTO decisions (id, entity, policy_id, mode, action, origin, decided_by, \
                 decided_at, expires_at, body, recorded_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
                 ON CONFLICT (id) DO UPDATE SET entity = excluded.entity, \
                 policy_id = excluded.policy_id, mode = excluded.mode, \
                 action = excluded.action, origin = excluded.origin, \
                 decided_by = excluded.decided_by, decided_at = excluded.decided_at, \
                 expires_at = excluded.expires_at, body = excluded.body \
                 WHERE decisions.decided_by = $12 \
                 AND (excluded.decided_by <> $12 OR decisions.body <> excluded.body)",
            )
            .bind(d.id.as_str())
            .bind(d.mitigation.entity.to_string())
            .bind(policy)
            .bind(mode_name(d.mode))
            .bind(d.mitigation.action.name())
            .bind(d.mitigation.origin.to_string())
            .bind(d.decided_by.as_str())
            .bind(ts(d.decided_at))
            .bind(ts(d.mitigation.expires_at))
            .bind(body)
            .bind(now.as_str())
            .bind(BROKER_COPY)
            .execute(&mut *tx)
            .await?;
            inserted += B::rows_affected(&result) as usize;
        }
        tx.commit().await?;
        Ok(inserted)
    }

    async fn query_decisions(&self, q: &DecisionQuery) -> Result<Vec<LoggedDecision>, StoreError> {
        let mut sql = String::from(
            "SELECT id, decided_at, body, recorded_at, revoked_at, revoked_by FROM decisions \
             WHERE 1 = 1",
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
        // The mark as stored text: a page goes on from the last row read, readable or not.
        let mut mark = q.before.as_ref().map(|m| (ts(m.decided_at), m.id.clone()));
        let limit = q.limit.max(1);
        let mut out = Vec::new();
        loop {
            let want = limit - out.len();
            let mut page_sql = sql.clone();
            let mut page_args = args.clone();
            if let Some((at, id)) = &mark {
                page_args.push(at.clone());
                page_args.push(id.clone());
                let (at, id) = (page_args.len() - 1, page_args.len());
                page_sql.push_str(&format!(
                    " AND (decided_at < ${at} OR (decided_at = ${at} AND id < ${id}))"
                ));
            }
            page_sql.push_str(&format!(" ORDER BY decided_at DESC, id DESC LIMIT {want}"));
            let mut query = sqlx::query(&page_sql);
            for a in &page_args {
                query = query.bind(a.as_str());
            }
            let rows = query.fetch_all(self.pool()).await?;
            for row in &rows {
                // A row this version cannot read (written by a newer one over the same
                // database, or dated before times were checked) is skipped, and the page
                // filled from the rows after it: readers take a short page for the last.
                match decision_row(row) {
                    Ok(d) => out.push(d),
                    Err(e) => {
                        let id = row.text("id").unwrap_or_default();
                        tracing::warn!(%id, error = %e, "a logged decision cannot be read; skipped");
                    }
                }
            }
            match rows.last() {
                Some(last) if rows.len() >= want && out.len() < limit => {
                    mark = Some((last.text("decided_at")?, last.text("id")?));
                }
                _ => return Ok(out),
            }
        }
    }

    async fn revocations(
        &self,
        after: Option<&RevocationMark>,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<RevokedDecisions, StoreError> {
        // Writers number revocations in turn, so once the counter reads `last` every
        // revocation up to it is committed and readable.
        let last: i64 = sqlx::query("SELECT value FROM counters WHERE name = 'revocations'")
            .fetch_one(self.pool())
            .await?
            .try_get("value")?;
        let after = after
            .cloned()
            .unwrap_or(RevocationMark { seq: 0, id: None });
        let from = if after.id.is_some() {
            "(revoked_seq > $2 OR (revoked_seq = $2 AND id > $3))"
        } else {
            "revoked_seq > $2 AND $3 = $3"
        };
        let rows = sqlx::query(&format!(
            "SELECT revoked_seq, id, policy_id, entity, decided_at, revoked_at FROM decisions \
             WHERE revoked_seq IS NOT NULL AND {from} AND revoked_seq <= $4 \
             AND origin = 'policy' AND policy_id IS NOT NULL AND expires_at > $1 \
             ORDER BY revoked_seq, id LIMIT {}",
            limit.max(1)
        ))
        .bind(ts(now))
        .bind(after.seq)
        .bind(after.id.clone().unwrap_or_default())
        .bind(last)
        .fetch_all(self.pool())
        .await?;
        let full = rows.len() >= limit.max(1);
        let mut revocations = Vec::with_capacity(rows.len());
        for row in &rows {
            let entity = row.text("entity")?;
            // Written from a parsed key, so this does not happen; were it to, the rest
            // must still be served.
            let Ok(entity) = entity.parse() else {
                tracing::warn!(%entity, "a revoked decision's entity does not parse; skipped");
                continue;
            };
            // Nor may one unreadable time stop the workers' feed at it for good.
            let (Ok(decided_at), Ok(revoked_at)) =
                (ts_col(row, "decided_at"), ts_col(row, "revoked_at"))
            else {
                let id = row.text("id").unwrap_or_default();
                tracing::warn!(%id, "a revoked decision's times cannot be read; skipped");
                continue;
            };
            revocations.push(RevokedDecision {
                seq: row.int("revoked_seq")?,
                id: row.text("id")?,
                policy_id: row.text("policy_id")?,
                entity,
                decided_at,
                revoked_at,
            });
        }
        let next = match rows.last() {
            Some(row) if full => RevocationMark {
                seq: row.int("revoked_seq")?,
                id: Some(row.text("id")?),
            },
            _ => RevocationMark {
                seq: last.max(after.seq),
                id: None,
            },
        };
        Ok(RevokedDecisions { revocations, next })
    }

    async fn mark_revoked(
        &self,
        target: &RevokeTarget,
        by: &str,
        at: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let _turn = self.turn().await;
        let (col, value) = match target {
            RevokeTarget::Id(id) => ("id", id.clone()),
            RevokeTarget::Entity(e) => ("entity", e.to_string()),
            // `$3 = $3` keeps one statement shape for every target.
            RevokeTarget::All => ("$3", String::new()),
        };
        // An entity's or everything's revocation may reach the log after decisions made
        // since (a broker's outbox delivering late, or again after a crash): it marks only
        // what was decided by then. An id names one decision, whatever the clocks say.
        let decided_by_then = match target {
            RevokeTarget::Id(_) => "",
            RevokeTarget::Entity(_) | RevokeTarget::All => " AND decided_at <= $1",
        };
        // Writers take turns (`begin_write`), so revocation numbers commit in order.
        let mut tx = self.begin_write().await?;
        let seq: i64 = sqlx::query(
            "UPDATE counters SET value = value + 1 WHERE name = 'revocations' RETURNING value",
        )
        .fetch_one(&mut *tx)
        .await?
        .try_get("value")?;
        // Only decisions that were in force can be revoked.
        let sql = format!(
            "UPDATE decisions SET revoked_at = $1, revoked_by = $2, revoked_seq = $4 \
             WHERE {col} = $3 AND revoked_at IS NULL AND mode = 'enforce' AND expires_at > $1\
             {decided_by_then}"
        );
        let result = sqlx::query(&sql)
            .bind(ts(at))
            .bind(by)
            .bind(value)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(B::rows_affected(&result))
    }

    async fn admin_token_count(&self) -> Result<u64, StoreError> {
        let n = sqlx::query("SELECT COUNT(*) AS n FROM tokens WHERE role = 'admin'")
            .fetch_one(self.pool())
            .await?
            .int("n")?;
        Ok(n.max(0) as u64)
    }

    async fn add_token(
        &self,
        name: &str,
        role: TokenRole,
        hash: &str,
        by: &str,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        let _turn = self.turn().await;
        // Kept as stored (to the microsecond), so the answer and later listings agree.
        let at = chrono::SubsecRound::trunc_subsecs(Utc::now(), 6);
        let done = sqlx::query(
            "INSERT INTO tokens (name, hash, created_at, role, created_by) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(name)
        .bind(hash)
        .bind(ts(at))
        .bind(role.as_str())
        .bind(by)
        .execute(self.pool())
        .await?;
        Ok((B::rows_affected(&done) == 1).then_some(at))
    }

    async fn find_token(&self, hash: &str) -> Result<Option<(String, TokenRole)>, StoreError> {
        sqlx::query("SELECT name, role FROM tokens WHERE hash = $1")
            .bind(hash)
            .fetch_optional(self.pool())
            .await?
            .map(|r| Ok((r.text("name")?, role_col(&r)?)))
            .transpose()
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        sqlx::query(
            "SELECT name, role, created_at, created_by, last_used_at FROM tokens ORDER BY name",
        )
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(|r| {
            Ok(TokenRecord {
                name: r.text("name")?,
                role: role_col(r)?,
                created_at: ts_col(r, "created_at")?,
                created_by: r.text("created_by")?,
                last_used_at: opt_ts_col(r, "last_used_at")?,
            })
        })
        .collect()
    }

    async fn token_used(&self, name: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        let _turn = self.turn().await;
        // Timestamps are fixed-width text, so they compare as they order.
        sqlx::query(
            "UPDATE tokens SET last_used_at = $2 WHERE name = $1 \
             AND (last_used_at IS NULL OR last_used_at < $2)",
        )
        .bind(name)
        .bind(ts(at))
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn delete_token(
        &self,
        name: &str,
        keep_an_admin: bool,
    ) -> Result<TokenRemoval, StoreError> {
        let _turn = self.turn().await;
        // The write lock: two instances each deleting one of the last two admin tokens
        // would otherwise both see the other's still there.
        let mut tx = self.begin_write().await?;
        let result = sqlx::query("DELETE FROM tokens WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        if B::rows_affected(&result) == 0 {
            return Ok(TokenRemoval::NotFound);
        }
        if keep_an_admin {
            let admins = sqlx::query("SELECT COUNT(*) AS n FROM tokens WHERE role = 'admin'")
                .fetch_one(&mut *tx)
                .await?
                .int("n")?;
            if admins == 0 {
                tx.rollback().await?;
                return Ok(TokenRemoval::LastAdmin);
            }
        }
        tx.commit().await?;
        Ok(TokenRemoval::Deleted)
    }

    async fn proxy_config(&self) -> Result<Option<ProxyConfigDoc>, StoreError> {
        sqlx::query(GET_PROXY_CONFIG_SQL)
            .bind(PROXY_CONFIG_NAME)
            .fetch_optional(self.pool())
            .await?
            .as_ref()
            .map(proxy_config_row)
            .transpose()
    }

    async fn put_proxy_config(&self, config: &str, by: &str) -> Result<ProxyConfigDoc, StoreError> {
        let _turn = self.turn().await;
        let changed = sqlx::query(PUT_PROXY_CONFIG_SQL)
            .bind(PROXY_CONFIG_NAME)
            .bind(config)
            .bind(by)
            .bind(ts(Utc::now()))
            .fetch_optional(self.pool())
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
        // Read first: proxies' long-polls read the key every second, and a write (even
        // one that changes nothing) is a transaction SQLite serialises.
        if let Some(row) = sqlx::query(GET_SECRET_SQL)
            .bind(name)
            .fetch_optional(self.pool())
            .await?
        {
            return secret_row(&row);
        }
        let _turn = self.turn().await;
        sqlx::query(ADD_SECRET_SQL)
            .bind(name)
            .bind(fresh)
            .bind(ts(Utc::now()))
            .execute(self.pool())
            .await?;
        let row = sqlx::query(GET_SECRET_SQL)
            .bind(name)
            .fetch_one(self.pool())
            .await?;
        secret_row(&row)
    }

    async fn rotate_secret(
        &self,
        name: &str,
        fresh: &str,
        keep_previous: bool,
    ) -> Result<Secret, StoreError> {
        let _turn = self.turn().await;
        let row = sqlx::query(ROTATE_SECRET_SQL)
            .bind(name)
            .bind(fresh)
            .bind(ts(Utc::now()))
            .bind(keep_previous)
            .fetch_one(self.pool())
            .await?;
        secret_row(&row)
    }

    async fn member_beat(&self, beat: &MemberBeat<'_>) -> Result<Heard, StoreError> {
        let _turn = self.turn().await;
        // A drain stands for the run it was asked of, until that run says it stops.
        let standing = (!beat.stopping).then(|| ts(beat.run));
        let run = ts(beat.run);
        // While the member recorded is alive, a heartbeat replaces it only if it is of
        // the same run or a later one, and does not take back a stop that run announced:
        // heartbeats carry no time of sending, and one resent or delayed can arrive
        // after a newer one. Runs and times are fixed-width RFC 3339 text, so they
        // compare as text.
        // Twice at most: a member pruned (or another instance's delete) between the
        // upsert and the look at why it was left out is inserted by the second.
        for _ in 0..2 {
            let row = sqlx::query(
                "INSERT INTO members (kind, id, beat, run, seen_at, stopping) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (kind, id) DO UPDATE SET beat = excluded.beat, \
                 run = excluded.run, seen_at = excluded.seen_at, stopping = excluded.stopping, \
                 drain_run = CASE WHEN members.drain_run = $7 THEN members.drain_run END \
                 WHERE members.seen_at < $8 OR excluded.run > members.run \
                 OR (excluded.run = members.run AND (excluded.stopping OR NOT members.stopping)) \
                 RETURNING drain_run",
            )
            .bind(beat.kind)
            .bind(beat.id)
            .bind(beat.beat)
            .bind(&run)
            .bind(ts(beat.at))
            .bind(beat.stopping)
            .bind(&standing)
            .bind(ts(beat.alive_since))
            .fetch_optional(self.pool())
            .await?;
            if let Some(row) = row {
                return Ok(Heard::Recorded {
                    drain: row.opt_text("drain_run")?.is_some(),
                });
            }
            let recorded = sqlx::query("SELECT run FROM members WHERE kind = $1 AND id = $2")
                .bind(beat.kind)
                .bind(beat.id)
                .fetch_optional(self.pool())
                .await?;
            if let Some(recorded) = recorded {
                return Ok(if recorded.text("run")? > run {
                    Heard::EarlierRun
                } else {
                    Heard::AfterStopping
                });
            }
        }
        Err(StoreError::Query(format!(
            "the heartbeat of {} `{}` was neither recorded nor found recorded",
            beat.kind, beat.id
        )))
    }

    async fn members(
        &self,
        kind: &str,
        since: DateTime<Utc>,
    ) -> Result<Vec<MemberRecord>, StoreError> {
        sqlx::query(
            "SELECT beat, seen_at, drain_run FROM members WHERE kind = $1 AND seen_at >= $2 \
             ORDER BY id",
        )
        .bind(kind)
        .bind(ts(since))
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(|r| {
            Ok(MemberRecord {
                beat: r.text("beat")?,
                seen_at: ts_col(r, "seen_at")?,
                drain_asked: r.opt_text("drain_run")?.is_some(),
            })
        })
        .collect()
    }

    async fn members_seen(&self, kind: &str, since: DateTime<Utc>) -> Result<u64, StoreError> {
        let n = sqlx::query("SELECT COUNT(*) AS n FROM members WHERE kind = $1 AND seen_at >= $2")
            .bind(kind)
            .bind(ts(since))
            .fetch_one(self.pool())
            .await?
            .int("n")?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn ask_drain(
        &self,
        kind: &str,
        id: &str,
        known_since: DateTime<Utc>,
        alive_since: DateTime<Utc>,
    ) -> Result<DrainAsk, StoreError> {
        let _turn = self.turn().await;
        let asked = sqlx::query(
            "UPDATE members SET drain_run = run WHERE kind = $1 AND id = $2 AND seen_at >= $3",
        )
        .bind(kind)
        .bind(id)
        .bind(ts(alive_since))
        .execute(self.pool())
        .await?;
        if B::rows_affected(&asked) > 0 {
            return Ok(DrainAsk::Asked);
        }
        let known =
            sqlx::query("SELECT id FROM members WHERE kind = $1 AND id = $2 AND seen_at >= $3")
                .bind(kind)
                .bind(id)
                .bind(ts(known_since))
                .fetch_optional(self.pool())
                .await?;
        Ok(match known {
            Some(_) => DrainAsk::Silent,
            None => DrainAsk::Unknown,
        })
    }

    async fn prune_members(&self, before: DateTime<Utc>, keep: usize) -> Result<u64, StoreError> {
        let _turn = self.turn().await;
        let mut pruned = B::rows_affected(
            &sqlx::query("DELETE FROM members WHERE seen_at < $1")
                .bind(ts(before))
                .execute(self.pool())
                .await?,
        );
        let kinds = sqlx::query("SELECT DISTINCT kind FROM members")
            .fetch_all(self.pool())
            .await?;
        for kind in kinds {
            let kind = kind.text("kind")?;
            // The last of the `keep` heard from last sets the line (ties with it stay).
            let line = sqlx::query(
                "SELECT seen_at FROM members WHERE kind = $1 \
                 ORDER BY seen_at DESC LIMIT 1 OFFSET $2",
            )
            .bind(&kind)
            .bind(i64::try_from(keep.saturating_sub(1)).unwrap_or(i64::MAX))
            .fetch_optional(self.pool())
            .await?;
            let Some(line) = line else { continue };
            pruned += B::rows_affected(
                &sqlx::query("DELETE FROM members WHERE kind = $1 AND seen_at < $2")
                    .bind(&kind)
                    .bind(line.text("seen_at")?)
                    .execute(self.pool())
                    .await?,
            );
        }
        Ok(pruned)
    }
}
