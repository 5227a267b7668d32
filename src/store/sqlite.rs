//! The SQLite key store: one file, WAL mode so that the CLI can write while a server reads,
//! schema migrations applied at open.
//!
//! The file is watched (`check`): once it has been replaced or deleted under a running server,
//! the server would go on reading the unlinked file while the CLI writes the new one, so the
//! store refuses every further use and reports itself unavailable (readiness 503) until
//! tollgate is restarted. It does not reopen the new file itself: the old file's `-wal` and
//! `-shm` companions, which SQLite finds by name, would be applied to the new one.
//!
//! Changes made elsewhere (the CLI) are polled by `updated_at`, with an overlap: the stamps
//! come from the writers' clocks and a write may commit just after a poll read past its stamp.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::Row;

use super::rows::{bind_key, event, record, stored_key, KEY_COLUMNS};
use super::{
    copy, Change, CopyReport, Cursor, Export, KeyAdmin, KeyCopy, KeyLookup, KeyUpkeep, StoreError, StoredKey,
};
use crate::keys::record::{AuditEvent, KeyRecord};

/// Each file moves the schema one version forward; applied in order, once, in a transaction.
/// Never edit one that has shipped: add the next.
const MIGRATIONS: &[&str] = &[include_str!("migrations/sqlite/0001_init.sql")];

pub struct SqliteStore {
    pool: SqlitePool,
    path: PathBuf,
    /// The (device, inode) of the file opened.
    file: Option<(u64, u64)>,
    /// Why the store can no longer be used, once the file was replaced or deleted.
    lost: OnceLock<String>,
}

/// The identity of the file at `path` now, if there is one.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

fn unavailable(e: sqlx::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl SqliteStore {
    pub async fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let url = format!("sqlite://{}", path.display());
        let opts = SqliteConnectOptions::from_str(&url)
            .map_err(unavailable)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            // The CLI and the server share the file: wait for a writer instead of failing.
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await
            .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        let store =
            SqliteStore { pool, path: path.to_path_buf(), file: file_id(path), lost: OnceLock::new() };
        store.migrate().await?;
        Ok(store)
    }

    /// The pool, unless the file it has open is no longer the store's file.
    fn pool(&self) -> Result<&SqlitePool, StoreError> {
        match self.lost.get() {
            None => Ok(&self.pool),
            Some(why) => Err(StoreError::Unavailable(why.clone())),
        }
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self.pool()?.begin().await.map_err(unavailable)?;
        sqlx::query("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        let current: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM schema_version")
            .fetch_one(&mut *tx)
            .await
            .map_err(unavailable)?;
        let current = usize::try_from(current.unwrap_or(0)).unwrap_or(0);
        if current > MIGRATIONS.len() {
            return Err(StoreError::Unavailable(format!(
                "the store's schema (version {current}) is newer than this tollgate (version {})",
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
            sqlx::raw_sql(sql).execute(&mut *tx).await.map_err(unavailable)?;
            sqlx::query("INSERT INTO schema_version (version) VALUES (?)")
                .bind(i64::try_from(i + 1).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)
    }
}

/// How far back each poll reads (the cursor is a time, `updated_at` in milliseconds).
const CHANGE_OVERLAP_MS: i64 = 2_000;

const INSERT_AUDIT: &str =
    "INSERT INTO audit (key_id, org, action, actor, at, detail) VALUES (?, ?, ?, ?, ?, ?)";

async fn append(conn: &mut sqlx::SqliteConnection, e: &AuditEvent) -> Result<(), sqlx::Error> {
    sqlx::query(INSERT_AUDIT)
        .bind(&e.key_id)
        .bind(&e.org)
        .bind(&e.action)
        .bind(&e.actor)
        .bind(e.at)
        .bind(&e.detail)
        .execute(conn)
        .await
        .map(|_| ())
}

/// Inserts a key record as it is, with the stamp of its latest change.
async fn insert_key(
    conn: &mut sqlx::SqliteConnection,
    r: &KeyRecord,
    updated_at: i64,
) -> Result<(), sqlx::Error> {
    let sql = format!("INSERT INTO keys ({KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)");
    bind_key(sqlx::query(&sql), r, updated_at).execute(conn).await.map(|_| ())
}

/// Every key and every audit event (oldest first), as `conn` sees them.
async fn read_all(conn: &mut sqlx::SqliteConnection) -> Result<Export, sqlx::Error> {
    let keys = sqlx::query("SELECT * FROM keys ORDER BY created_at, id").fetch_all(&mut *conn).await?;
    let events = sqlx::query("SELECT * FROM audit ORDER BY seq").fetch_all(&mut *conn).await?;
    Ok(Export {
        keys: keys.iter().map(stored_key).collect::<Result<_, _>>()?,
        events: events.iter().map(event).collect::<Result<_, _>>()?,
    })
}

#[async_trait::async_trait]
impl KeyLookup for SqliteStore {
    async fn get(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let row = sqlx::query("SELECT * FROM keys WHERE id = ?")
            .bind(id)
            .fetch_optional(self.pool()?)
            .await
            .map_err(unavailable)?;
        row.as_ref().map(record).transpose().map_err(unavailable)
    }
}

#[async_trait::async_trait]
impl KeyAdmin for SqliteStore {
    async fn list(&self, org: Option<&str>) -> Result<Vec<KeyRecord>, StoreError> {
        let rows = match org {
            Some(org) => sqlx::query("SELECT * FROM keys WHERE org = ? ORDER BY created_at, id").bind(org),
            None => sqlx::query("SELECT * FROM keys ORDER BY org, created_at, id"),
        }
        .fetch_all(self.pool()?)
        .await
        .map_err(unavailable)?;
        rows.iter().map(record).collect::<Result<_, _>>().map_err(unavailable)
    }

    async fn insert(&self, r: &KeyRecord, e: &AuditEvent) -> Result<(), StoreError> {
        let mut tx = self.pool()?.begin().await.map_err(unavailable)?;
        let inserted = insert_key(&mut tx, r, r.created_at).await;
        if let Err(err) = inserted {
            return Err(match err.as_database_error() {
                Some(d) if d.is_unique_violation() => {
                    StoreError::Conflict(format!("key id {} already exists", r.id))
                }
                _ => unavailable(err),
            });
        }
        append(&mut tx, e).await.map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)
    }

    async fn set_revoked(
        &self,
        id: &str,
        revoked: Option<(i64, &str)>,
        e: &AuditEvent,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool()?.begin().await.map_err(unavailable)?;
        let done = sqlx::query("UPDATE keys SET revoked_at = ?, revoked_by = ?, updated_at = ? WHERE id = ?")
            .bind(revoked.map(|r| r.0))
            .bind(revoked.map(|r| r.1))
            .bind(e.at)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        append(&mut tx, e).await.map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(true)
    }

    async fn audit(&self, id: &str) -> Result<Vec<AuditEvent>, StoreError> {
        let rows = sqlx::query("SELECT * FROM audit WHERE key_id = ? ORDER BY seq")
            .bind(id)
            .fetch_all(self.pool()?)
            .await
            .map_err(unavailable)?;
        rows.iter().map(event).collect::<Result<_, _>>().map_err(unavailable)
    }

    async fn record(&self, e: &AuditEvent) -> Result<(), StoreError> {
        let mut conn = self.pool()?.acquire().await.map_err(unavailable)?;
        append(&mut conn, e).await.map_err(unavailable)
    }
}

#[async_trait::async_trait]
impl KeyUpkeep for SqliteStore {
    async fn check(&self) -> Result<(), StoreError> {
        if self.lost.get().is_none() {
            let what = match std::fs::metadata(&self.path) {
                Ok(m) if Some((m.dev(), m.ino())) == self.file => return Ok(()),
                Ok(_) => "replaced",
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => "deleted",
                // Anything else (EACCES, EIO, a stale NFS handle) may pass: say so, and look
                // again next time rather than give up on the store for good.
                Err(e) => {
                    return Err(StoreError::Unavailable(format!(
                        "cannot check the key store file {}: {e}",
                        self.path.display()
                    )))
                }
            };
            let _ = self.lost.set(format!(
                "the key store file {} was {what} while tollgate had it open; restart tollgate to use \
                 the file now at that path (keys created or revoked with the CLI are in that file)",
                self.path.display()
            ));
        }
        self.pool().map(|_| ())
    }

    async fn changes(&self, after: Option<Cursor>) -> Result<(Vec<Change>, Cursor), StoreError> {
        let next = crate::clock::now_ms() - CHANGE_OVERLAP_MS;
        let Some(since_ms) = after else {
            return Ok((Vec::new(), next));
        };
        let rows = sqlx::query("SELECT id, updated_at, created_at FROM keys WHERE updated_at >= ?")
            .bind(since_ms)
            .fetch_all(self.pool()?)
            .await
            .map_err(unavailable)?;
        let changes = rows
            .iter()
            .map(|r| {
                let at: i64 = r.try_get("updated_at")?;
                let created: i64 = r.try_get("created_at")?;
                Ok(Change { id: r.try_get("id")?, at, created: at == created })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(unavailable)?;
        Ok((changes, next))
    }

    async fn touch(&self, used: &[(String, i64)]) -> Result<(), StoreError> {
        if used.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool()?.begin().await.map_err(unavailable)?;
        for (id, at) in used {
            // Not `updated_at`: a use is not a change other instances must react to.
            sqlx::query("UPDATE keys SET last_used_at = ? WHERE id = ? AND (last_used_at IS NULL OR last_used_at < ?)")
                .bind(at)
                .bind(id)
                .bind(at)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)
    }

    async fn purge(&self, before_ms: i64, now_ms: i64) -> Result<Vec<String>, StoreError> {
        // IMMEDIATE: the transaction reads before it writes, and two deferred ones (the CLI's
        // and a server's, say) would deadlock upgrading their read locks (SQLITE_BUSY at once,
        // the busy timeout never consulted). This one waits for the write lock up front.
        let mut tx = self.pool()?.begin_with("BEGIN IMMEDIATE").await.map_err(unavailable)?;
        let rows = sqlx::query("SELECT id, org FROM keys WHERE revoked_at IS NOT NULL AND revoked_at < ?")
            .bind(before_ms)
            .fetch_all(&mut *tx)
            .await
            .map_err(unavailable)?;
        let mut ids = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = row.try_get("id").map_err(unavailable)?;
            let org: String = row.try_get("org").map_err(unavailable)?;
            // The condition again, and only a row this statement deleted is audited: a replica
            // that purged it first (or a restore since the SELECT) leaves nothing to delete.
            let deleted =
                sqlx::query("DELETE FROM keys WHERE id = ? AND revoked_at IS NOT NULL AND revoked_at < ?")
                    .bind(&id)
                    .bind(before_ms)
                    .execute(&mut *tx)
                    .await
                    .map_err(unavailable)?;
            if deleted.rows_affected() != 1 {
                continue;
            }
            let e = AuditEvent {
                key_id: id.clone(),
                org,
                action: "purge".into(),
                actor: "system".into(),
                at: now_ms,
                detail: None,
            };
            append(&mut tx, &e).await.map_err(unavailable)?;
            ids.push(id);
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(ids)
    }
}

#[async_trait::async_trait]
impl KeyCopy for SqliteStore {
    async fn export(&self) -> Result<Export, StoreError> {
        // One read transaction: in WAL mode it sees one snapshot, however long the reads take
        // and whatever the server writes meanwhile.
        let mut tx = self.pool()?.begin().await.map_err(unavailable)?;
        let all = read_all(&mut tx).await.map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(all)
    }

    async fn import(&self, keys: &[StoredKey], events: &[AuditEvent]) -> Result<CopyReport, StoreError> {
        // IMMEDIATE: the write lock from the start, so that what was read as present is still
        // all there is when the inserts commit (another import, or the CLI, waits its turn).
        let mut tx = self.pool()?.begin_with("BEGIN IMMEDIATE").await.map_err(unavailable)?;
        let have = read_all(&mut tx).await.map_err(unavailable)?;
        let plan = copy::plan(&have.keys, &have.events, keys, events);
        for k in &plan.keys {
            insert_key(&mut tx, &k.record, k.updated_at).await.map_err(unavailable)?;
        }
        for e in &plan.events {
            append(&mut tx, e).await.map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)?;
        Ok(plan.report)
    }
}
