//! The SQLite control store (the embedded default). Statements use the portable subset
//! (`$N` placeholders, `ON CONFLICT`, TEXT timestamps) so PostgreSQL can reuse them.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use esper_protocol::{Decision, DecisionMode, ProxyConfigDoc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};

use super::{
    ActiveSnapshot, BROKER_COPY, ControlStore, DecisionQuery, GET_PROXY_CONFIG_SQL, ListRecord,
    LoggedDecision, PROXY_CONFIG_NAME, PUT_PROXY_CONFIG_SQL, PolicyRecord, PolicyVersionRecord,
    PolicyWrite, PutOutcome, RevokeTarget, Secret, StoreError, parse_ts, proxy_config_row, ts,
    write_secret,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The SQLite implementation of [`ControlStore`].
pub struct SqliteStore {
    pool: SqlitePool,
    /// SQLite allows one writer; taking turns here avoids `database is locked` errors
    /// when a read transaction would have to upgrade to a write.
    write: tokio::sync::Mutex<()>,
}

impl SqliteStore {
    /// Opens (creating when missing, with its directory) the database at `url`, e.g.
    /// `sqlite://./.esper/esper.db?mode=rwc` or `sqlite::memory:`.
    pub async fn connect(url: &str, max_connections: u32) -> Result<SqliteStore, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            url: url.to_string(),
            reason,
        };
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let mut opts = SqliteConnectOptions::from_str(url)
            .map_err(|e| open_err(e.to_string()))?
            .create_if_missing(true)
            .busy_timeout(Duration::from_secs(10));
        let mut pool = SqlitePoolOptions::new().max_connections(max_connections.max(1));
        if in_memory {
            // Each connection would otherwise see its own empty database.
            pool = pool
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None);
        } else {
            if let Some(dir) = opts.get_filename().parent()
                && !dir.as_os_str().is_empty()
            {
                std::fs::create_dir_all(dir).map_err(|e| {
                    open_err(format!("cannot create directory {}: {e}", dir.display()))
                })?;
            }
            opts = opts
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal);
        }
        let pool = pool
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await
            .map_err(|e| open_err(e.to_string()))?;
        Ok(SqliteStore {
            pool,
            write: tokio::sync::Mutex::new(()),
        })
    }

    async fn begin(&self) -> Result<Transaction<'_, Sqlite>, StoreError> {
        Ok(self.pool.begin().await?)
    }
}

fn json_col(row: &SqliteRow, col: &str) -> Result<serde_json::Value, StoreError> {
    let text: String = row.try_get(col)?;
    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("{col}: {e}")))
}

fn ts_col(row: &SqliteRow, col: &str) -> Result<DateTime<Utc>, StoreError> {
    let text: String = row.try_get(col)?;
    parse_ts(&text)
}

fn policy_row(row: &SqliteRow) -> Result<PolicyRecord, StoreError> {
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

fn list_row(row: &SqliteRow) -> Result<ListRecord, StoreError> {
    let items: String = row.try_get("items")?;
    Ok(ListRecord {
        name: row.try_get("name")?,
        kind: row.try_get("kind")?,
        items: serde_json::from_str(&items)
            .map_err(|e| StoreError::Corrupt(format!("list items: {e}")))?,
        updated_at: ts_col(row, "updated_at")?,
    })
}

fn decision_row(row: &SqliteRow) -> Result<LoggedDecision, StoreError> {
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

async fn bump_revision(tx: &mut Transaction<'_, Sqlite>) -> Result<(), StoreError> {
    sqlx::query("UPDATE counters SET value = value + 1 WHERE name = 'revision'")
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn next_version(tx: &mut Transaction<'_, Sqlite>, id: &str) -> Result<i64, StoreError> {
    // From the history, so a policy deleted and applied again keeps counting up.
    let row = sqlx::query("SELECT MAX(version) AS v FROM policy_versions WHERE policy_id = $1")
        .bind(id)
        .fetch_one(&mut **tx)
        .await?;
    let max: Option<i64> = row.try_get("v")?;
    Ok(max.unwrap_or(0) + 1)
}

async fn insert_version(
    tx: &mut Transaction<'_, Sqlite>,
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
impl ControlStore for SqliteStore {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    async fn migrate(&self) -> Result<Vec<String>, StoreError> {
        let pending = self.pending_migrations().await?;
        let _w = self.write.lock().await;
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Migrate(e.to_string()))?;
        Ok(pending)
    }

    async fn pending_migrations(&self) -> Result<Vec<String>, StoreError> {
        // No table yet means nothing applied.
        let applied: Vec<i64> =
            sqlx::query("SELECT version FROM _sqlx_migrations WHERE success = TRUE")
                .fetch_all(&self.pool)
                .await
                .map(|rows| rows.iter().filter_map(|r| r.try_get(0).ok()).collect())
                .unwrap_or_default();
        Ok(MIGRATOR
            .iter()
            .filter(|m| !m.migration_type.is_down_migration() && !applied.contains(&m.version))
            .map(|m| format!("{} {}", m.version, m.description))
            .collect())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
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
        let _w = self.write.lock().await;
        let mut tx = self.begin().await?;
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
        if changed_any {
            bump_revision(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(outcomes)
    }

    async fn delete_policy(&self, id: &str, by: &str) -> Result<bool, StoreError> {
        let _w = self.write.lock().await;
        let mut tx = self.begin().await?;
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
        bump_revision(&mut tx).await?;
        tx.commit().await?;
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
        let _w = self.write.lock().await;
        let mut tx = self.begin().await?;
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
        bump_revision(&mut tx).await?;
        tx.commit().await?;
        Ok(ListRecord {
            name: name.to_string(),
            kind: kind.to_string(),
            items,
            // Read back at the stored precision.
            updated_at: parse_ts(&ts(now))?,
        })
    }

    async fn delete_list(&self, name: &str) -> Result<bool, StoreError> {
        let _w = self.write.lock().await;
        let mut tx = self.begin().await?;
        let done = sqlx::query("DELETE FROM lists WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            > 0;
        if done {
            bump_revision(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(done)
    }

    async fn revision(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT value FROM counters WHERE name = 'revision'")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("value")?)
    }

    async fn active_snapshot(&self) -> Result<ActiveSnapshot, StoreError> {
        let mut tx = self.begin().await?;
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
        let _w = self.write.lock().await;
        let mut tx = self.begin().await?;
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
        let _w = self.write.lock().await;
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
        let _w = self.write.lock().await;
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
        let _w = self.write.lock().await;
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
        let _w = self.write.lock().await;
        write_secret(&self.pool, name, fresh, None).await
    }

    async fn rotate_secret(
        &self,
        name: &str,
        fresh: &str,
        keep_previous: bool,
    ) -> Result<Secret, StoreError> {
        let _w = self.write.lock().await;
        write_secret(&self.pool, name, fresh, Some(keep_previous)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_url_names_a_file_under_dot_esper() {
        let opts = SqliteConnectOptions::from_str(crate::config::DEFAULT_DATABASE_URL).unwrap();
        assert_eq!(
            opts.get_filename(),
            std::path::Path::new("./.esper/esper.db")
        );
    }
}
