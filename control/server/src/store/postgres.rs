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
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgQueryResult};
use sqlx::{Connection, PgConnection, Postgres, Row, Transaction};
use tokio::sync::MutexGuard;
use tokio::task::AbortHandle;

use super::sql::{Backend, Cols, READ_REVISION_SQL};
use super::{StoreError, redact_url};

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
/// How often the revision is read from the table besides the announcements: a listening
/// connection a NAT or firewall forgot says nothing (no TCP keepalive), and an instance
/// trusting it alone would serve a stale revision for ever.
const CATCH_UP_EVERY: Duration = Duration::from_secs(10);

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
    /// For a connection of its own when the pool cannot say why it has none.
    opts: PgConnectOptions,
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
            .connect_lazy_with(opts.clone());
        let revision = Arc::new(RevisionCache::default());
        let (follow, catch_up) = (
            follow_revisions(pool.clone(), listen_pool, revision.clone()),
            catch_up_revisions(pool.clone(), revision.clone()),
        );
        let listener = tokio::spawn(async move {
            tokio::join!(follow, catch_up);
        })
        .abort_handle();
        Ok(PostgresStore {
            pool,
            opts,
            revision,
            listener,
        })
    }

    /// True while the revision is kept current by the LISTEN connection (reads of it
    /// cost no query); false while that connection is down or catching up.
    pub fn listening(&self) -> bool {
        self.revision.live.load(Ordering::SeqCst)
    }

    async fn read_revision(&self) -> Result<i64, StoreError> {
        sqlx::query(READ_REVISION_SQL)
            .fetch_one(&self.pool)
            .await?
            .int("value")
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
                    if let Ok(row) = sqlx::query(READ_REVISION_SQL).fetch_one(&pool).await
                        && let Ok(rev) = row.int("value")
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

/// Raises `cache` to the table's revision every [`CATCH_UP_EVERY`] until the pool closes.
async fn catch_up_revisions(pool: PgPool, cache: Arc<RevisionCache>) {
    while !pool.is_closed() {
        tokio::time::sleep(CATCH_UP_EVERY).await;
        if let Ok(row) = sqlx::query(READ_REVISION_SQL).fetch_one(&pool).await
            && let Ok(rev) = row.int("value")
        {
            cache.raise(rev);
        }
    }
}

#[async_trait]
impl Backend for PostgresStore {
    type Db = Postgres;

    const KIND: &'static str = "postgres";

    fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn unreachable_because(&self) -> Option<String> {
        match tokio::time::timeout(
            Duration::from_millis(800),
            PgConnection::connect_with(&self.opts),
        )
        .await
        {
            Ok(Ok(conn)) => {
                let _ = conn.close().await;
                None
            }
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("no answer to a new connection within 0.8s".into()),
        }
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

    async fn close(&self) {
        self.listener.abort();
        self.pool.close().await;
    }

    async fn turn(&self) -> Option<MutexGuard<'_, ()>> {
        // Single statements need no turn; transactions take the advisory lock.
        None
    }

    /// The writers' advisory lock is held until the transaction ends.
    async fn begin_write(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(WRITE_LOCK)
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    async fn begin_snapshot(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        let mut tx = self.pool.begin().await?;
        // The default isolation takes a snapshot per statement.
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    /// Delivered to every instance's listener when the transaction commits.
    async fn announce(&self, tx: &mut PgConnection, revision: i64) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(REVISION_CHANNEL)
            .bind(revision.to_string())
            .execute(&mut *tx)
            .await?;
        Ok(())
    }

    fn committed(&self, revision: i64) {
        self.revision.raise(revision);
    }

    async fn revision(&self) -> Result<i64, StoreError> {
        if self.revision.live.load(Ordering::SeqCst) {
            return Ok(self.revision.value.load(Ordering::SeqCst));
        }
        let rev = self.read_revision().await?;
        self.revision.raise(rev);
        Ok(rev)
    }

    fn rows_affected(result: &PgQueryResult) -> u64 {
        result.rows_affected()
    }
}
