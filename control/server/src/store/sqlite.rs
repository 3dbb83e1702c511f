//! The SQLite control store (the embedded default): how it opens, migrates and takes
//! turns writing; its statements are those of [`super::sql`], shared with PostgreSQL.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteQueryResult, SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};
use tokio::sync::MutexGuard;

use super::StoreError;
use super::sql::{Backend, Cols, READ_REVISION_SQL};

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
}

#[async_trait]
impl Backend for SqliteStore {
    type Db = Sqlite;

    const KIND: &'static str = "sqlite";

    fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    async fn migrate(&self) -> Result<Vec<String>, StoreError> {
        let pending = Backend::pending_migrations(self).await?;
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

    async fn close(&self) {
        self.pool.close().await;
    }

    async fn turn(&self) -> Option<MutexGuard<'_, ()>> {
        Some(self.write.lock().await)
    }

    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        Ok(self.pool.begin().await?)
    }

    async fn begin_snapshot(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        // A SQLite transaction reads one snapshot already.
        Ok(self.pool.begin().await?)
    }

    async fn announce(&self, _: &mut SqliteConnection, _: i64) -> Result<(), StoreError> {
        // A SQLite store serves one control-plane instance: nobody else to tell.
        Ok(())
    }

    fn committed(&self, _: i64) {}

    async fn revision(&self) -> Result<i64, StoreError> {
        sqlx::query(READ_REVISION_SQL)
            .fetch_one(&self.pool)
            .await?
            .int("value")
    }

    fn rows_affected(result: &SqliteQueryResult) -> u64 {
        result.rows_affected()
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
