//! The PostgreSQL key store (§11): one database shared by every replica and the CLI.
//!
//! - The URL comes from the environment variable `store.postgres.url_env` names, and is never
//!   written anywhere: errors say which variable, not what it holds.
//! - Migrations are versioned `.sql` files applied in one transaction under an advisory lock,
//!   so replicas starting together against an empty database take turns.
//! - Every call is bounded here as well as on the server (`statement_timeout`): a black-holed
//!   connection answers nothing, and the server's own timeout never fires. A lookup is bounded
//!   by `connect_timeout` alone, the time §11 gives a request whose key is not cached.
//! - Changes are pushed with LISTEN/NOTIFY (a trigger notifies at commit) on a connection of
//!   its own, probed with `SELECT 1` when quiet, since a half-open socket otherwise waits
//!   forever; after a lost connection the feed says `Gap` and the poll catches up. The poll's
//!   cursor is a transaction id (`pg_snapshot_xmin`), not a time: a change whose transaction
//!   began before a poll and committed after it has an id at or above the xmin that poll saw.

use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::Row;
use tokio::sync::mpsc;

use super::rows::{bind_key, event, record, stored_key, KEY_COLUMNS};
use super::{
    copy, Change, CopyReport, Cursor, Export, KeyAdmin, KeyCopy, KeyLookup, KeyUpkeep, Pushed, StoreError,
    StoredKey,
};
use crate::config;
use crate::keys::record::{AuditEvent, KeyRecord};

/// Each file moves the schema one version forward; applied in order, once. Never edit one
/// that has shipped: add the next.
const MIGRATIONS: &[&str] = &[include_str!("migrations/postgres/0001_init.sql")];

/// The advisory lock migrations hold (any constant unlikely to clash with another user's).
const MIGRATION_LOCK: i64 = 0x746f_6c6c_6761_7465; // "tollgate"

/// The advisory lock an import holds: two imports side by side would each find an event
/// missing and both add it.
const IMPORT_LOCK: i64 = 0x746f_6c6c_636f_7079; // "tollcopy"

/// The channel the trigger notifies.
const CHANNEL: &str = "tollgate_keys";

/// A quiet listener is probed this often, and given this long to answer.
const PROBE_EVERY: Duration = Duration::from_secs(3);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Reconnection back-off of the listener: short, because a change must reach this replica
/// within a second of the database being reachable again.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_millis(500);

pub struct PostgresStore {
    pool: PgPool,
    /// For the listener: a connection of its own (never one of `pool_size`), from a pool of one
    /// made afresh for each attempt — a pool kept would hand back the dead connection it
    /// holds, and its liveness check on a half-open socket never returns.
    listen: (PgConnectOptions, Duration),
    /// The bound on a lookup (`connect_timeout`) and on every other call (plus
    /// `statement_timeout`).
    lookup_bound: Duration,
    bound: Duration,
    /// The push feed, started by the first `subscribe`.
    feed_started: Mutex<bool>,
}

fn unavailable(e: sqlx::Error) -> StoreError {
    StoreError::Unavailable(match e {
        sqlx::Error::PoolTimedOut => "no connection to PostgreSQL within connect_timeout".into(),
        other => other.to_string(),
    })
}

/// `fut` within `limit`, or the store is unavailable.
async fn within<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(StoreError::Unavailable(format!("no answer from PostgreSQL within {limit:?}"))),
    }
}

impl PostgresStore {
    pub async fn open(cfg: &config::Postgres) -> Result<PostgresStore, StoreError> {
        let url = std::env::var(&cfg.url_env).map_err(|_| {
            StoreError::Unavailable(format!(
                "the environment variable {} (store.postgres.url_env) is not set",
                cfg.url_env
            ))
        })?;
        PostgresStore::open_url(&url, cfg).await
    }

    /// Opens the database at `url` (the value of `url_env`).
    pub async fn open_url(url: &str, cfg: &config::Postgres) -> Result<PostgresStore, StoreError> {
        // Not the parser's message: it may quote the URL, password included.
        let opts = PgConnectOptions::from_str(url).map_err(|_| {
            StoreError::Unavailable(format!(
                "${} is not a valid postgres:// URL (postgres://user:password@host:5432/database)",
                cfg.url_env
            ))
        })?;
        let statement_ms = cfg.statement_timeout.as_millis();
        let opts =
            opts.application_name("tollgate").options([("statement_timeout", format!("{statement_ms}ms"))]);
        let pool = PgPoolOptions::new()
            .max_connections(cfg.pool_size)
            .acquire_timeout(cfg.connect_timeout)
            .connect_lazy_with(opts.clone());
        let store = PostgresStore {
            pool,
            listen: (opts, cfg.connect_timeout),
            lookup_bound: cfg.connect_timeout,
            bound: cfg.connect_timeout + cfg.statement_timeout,
            feed_started: Mutex::new(false),
        };
        within(store.bound, store.migrate()).await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        // First, before anything is created: concurrent `CREATE TABLE IF NOT EXISTS` can still
        // collide in the catalog.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
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
            sqlx::query("INSERT INTO schema_version (version) VALUES ($1)")
                .bind(i64::try_from(i + 1).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        tx.commit().await.map_err(unavailable)
    }
}

const INSERT_AUDIT: &str =
    "INSERT INTO audit (key_id, org, action, actor, at, detail) VALUES ($1, $2, $3, $4, $5, $6)";

async fn append(conn: &mut sqlx::PgConnection, e: &AuditEvent) -> Result<(), sqlx::Error> {
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

/// Inserts a key record as it is, with the stamp of its latest change. The trigger stamps the
/// transaction and notifies the replicas.
async fn insert_key(
    conn: &mut sqlx::PgConnection,
    r: &KeyRecord,
    updated_at: i64,
) -> Result<(), sqlx::Error> {
    let sql = format!("INSERT INTO keys ({KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)");
    bind_key(sqlx::query(&sql), r, updated_at).execute(conn).await.map(|_| ())
}

/// Every key and every audit event (oldest first), as `conn` sees them.
async fn read_all(conn: &mut sqlx::PgConnection) -> Result<Export, sqlx::Error> {
    let keys = sqlx::query("SELECT * FROM keys ORDER BY created_at, id").fetch_all(&mut *conn).await?;
    let events = sqlx::query("SELECT * FROM audit ORDER BY seq").fetch_all(&mut *conn).await?;
    Ok(Export {
        keys: keys.iter().map(stored_key).collect::<Result<_, _>>()?,
        events: events.iter().map(event).collect::<Result<_, _>>()?,
    })
}

#[async_trait::async_trait]
impl KeyLookup for PostgresStore {
    async fn get(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        within(self.lookup_bound, async {
            let row = sqlx::query("SELECT * FROM keys WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(unavailable)?;
            row.as_ref().map(record).transpose().map_err(unavailable)
        })
        .await
    }
}

#[async_trait::async_trait]
impl KeyAdmin for PostgresStore {
    async fn list(&self, org: Option<&str>) -> Result<Vec<KeyRecord>, StoreError> {
        within(self.bound, async {
            let rows = match org {
                Some(org) => {
                    sqlx::query("SELECT * FROM keys WHERE org = $1 ORDER BY created_at, id").bind(org)
                }
                None => sqlx::query("SELECT * FROM keys ORDER BY org, created_at, id"),
            }
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
            rows.iter().map(record).collect::<Result<_, _>>().map_err(unavailable)
        })
        .await
    }

    async fn insert(&self, r: &KeyRecord, e: &AuditEvent) -> Result<(), StoreError> {
        within(self.bound, async {
            let mut tx = self.pool.begin().await.map_err(unavailable)?;
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
        })
        .await
    }

    async fn set_revoked(
        &self,
        id: &str,
        revoked: Option<(i64, &str)>,
        e: &AuditEvent,
    ) -> Result<bool, StoreError> {
        within(self.bound, async {
            let mut tx = self.pool.begin().await.map_err(unavailable)?;
            let done = sqlx::query(
                "UPDATE keys SET revoked_at = $1, revoked_by = $2, updated_at = $3 WHERE id = $4",
            )
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
        })
        .await
    }

    async fn audit(&self, id: &str) -> Result<Vec<AuditEvent>, StoreError> {
        within(self.bound, async {
            let rows = sqlx::query("SELECT * FROM audit WHERE key_id = $1 ORDER BY seq")
                .bind(id)
                .fetch_all(&self.pool)
                .await
                .map_err(unavailable)?;
            rows.iter().map(event).collect::<Result<_, _>>().map_err(unavailable)
        })
        .await
    }

    async fn record(&self, e: &AuditEvent) -> Result<(), StoreError> {
        within(self.bound, async {
            let mut conn = self.pool.acquire().await.map_err(unavailable)?;
            append(&mut conn, e).await.map_err(unavailable)
        })
        .await
    }
}

#[async_trait::async_trait]
impl KeyUpkeep for PostgresStore {
    fn subscribe(&self) -> Option<mpsc::Receiver<Pushed>> {
        let mut started = self.feed_started.lock().unwrap_or_else(|e| e.into_inner());
        if *started {
            return None;
        }
        *started = true;
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(feed(self.listen.clone(), tx));
        Some(rx)
    }

    async fn changes(&self, after: Option<Cursor>) -> Result<(Vec<Change>, Cursor), StoreError> {
        within(self.bound, async {
            // One snapshot for both statements: every change it does not show belongs to a
            // transaction at or above its xmin, which is where the next poll starts.
            let mut tx = self
                .pool
                .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await
                .map_err(unavailable)?;
            let xmin: String = sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
                .fetch_one(&mut *tx)
                .await
                .map_err(unavailable)?;
            let next: Cursor = xmin
                .parse()
                .map_err(|_| StoreError::Unavailable(format!("unexpected transaction id `{xmin}`")))?;
            let Some(after) = after else {
                tx.commit().await.map_err(unavailable)?;
                return Ok((Vec::new(), next));
            };
            let rows =
                sqlx::query("SELECT id, updated_at, created_at FROM keys WHERE change_xid >= $1::text::xid8")
                    .bind(after.to_string())
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(unavailable)?;
            tx.commit().await.map_err(unavailable)?;
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
        })
        .await
    }

    async fn touch(&self, used: &[(String, i64)]) -> Result<(), StoreError> {
        if used.is_empty() {
            return Ok(());
        }
        let (ids, ats): (Vec<&str>, Vec<i64>) = used.iter().map(|(id, at)| (id.as_str(), *at)).unzip();
        within(self.bound, async {
            // One statement for the batch. Not `updated_at`: a use is not a change other
            // replicas must react to (the trigger neither stamps nor notifies it).
            sqlx::query(
                "UPDATE keys AS k SET last_used_at = u.at \
                 FROM UNNEST($1::text[], $2::bigint[]) AS u(id, at) \
                 WHERE k.id = u.id AND (k.last_used_at IS NULL OR k.last_used_at < u.at)",
            )
            .bind(&ids)
            .bind(&ats)
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(unavailable)
        })
        .await
    }

    async fn purge(&self, before_ms: i64, now_ms: i64) -> Result<Vec<String>, StoreError> {
        within(self.bound, async {
            let mut tx = self.pool.begin().await.map_err(unavailable)?;
            // A replica purging at the same time blocks on the same rows and, once this commits,
            // finds them gone: only the rows this statement deleted are returned and audited.
            let rows = sqlx::query(
                "DELETE FROM keys WHERE revoked_at IS NOT NULL AND revoked_at < $1 RETURNING id, org",
            )
            .bind(before_ms)
            .fetch_all(&mut *tx)
            .await
            .map_err(unavailable)?;
            let mut ids = Vec::with_capacity(rows.len());
            for row in rows {
                let id: String = row.try_get("id").map_err(unavailable)?;
                let e = AuditEvent {
                    key_id: id.clone(),
                    org: row.try_get("org").map_err(unavailable)?,
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
        })
        .await
    }
}

#[async_trait::async_trait]
impl KeyCopy for PostgresStore {
    // A whole store may take longer than one call's bound: each statement is bounded instead
    // (a black-holed connection still fails within `bound`), the whole is not.
    async fn export(&self) -> Result<Export, StoreError> {
        let b = self.bound;
        // One snapshot for both reads: a key changed between them would not match its trail.
        let mut tx = within(b, async {
            self.pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await.map_err(unavailable)
        })
        .await?;
        let all = within(b, async { read_all(&mut tx).await.map_err(unavailable) }).await?;
        within(b, async { tx.commit().await.map_err(unavailable) }).await?;
        Ok(all)
    }

    async fn import(&self, keys: &[StoredKey], events: &[AuditEvent]) -> Result<CopyReport, StoreError> {
        let b = self.bound;
        let mut tx = within(b, async { self.pool.begin().await.map_err(unavailable) }).await?;
        within(b, async {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(IMPORT_LOCK)
                .execute(&mut *tx)
                .await
                .map(|_| ())
                .map_err(unavailable)
        })
        .await?;
        // Read after the lock: at READ COMMITTED each statement sees what committed before it
        // began, so an import that held the lock before is seen whole.
        let have = within(b, async { read_all(&mut tx).await.map_err(unavailable) }).await?;
        let plan = copy::plan(&have.keys, &have.events, keys, events);
        for k in &plan.keys {
            // A key created by a replica with the same id meanwhile fails the whole import,
            // which then changes nothing and can be run again.
            within(b, async {
                insert_key(&mut tx, &k.record, k.updated_at).await.map_err(|err| match err.as_database_error() {
                    Some(d) if d.is_unique_violation() => StoreError::Conflict(format!(
                        "key id {} was created in the target during the copy; nothing was copied, run it again",
                        k.record.id
                    )),
                    _ => unavailable(err),
                })
            })
            .await?;
        }
        for e in &plan.events {
            within(b, async { append(&mut tx, e).await.map_err(unavailable) }).await?;
        }
        within(b, async { tx.commit().await.map_err(unavailable) }).await?;
        Ok(plan.report)
    }
}

/// A notification's payload, "id updated_at created" (see the trigger).
fn parse(payload: &str) -> Option<Change> {
    let mut parts = payload.split(' ');
    let id = parts.next()?.to_string();
    let at = parts.next()?.parse().ok()?;
    let created = parts.next()? == "1";
    Some(Change { id, at, created })
}

/// The push feed: listens, forwards each change, probes a quiet connection, and on any failure
/// reconnects with back-off and says `Gap`. Ends when nobody receives any more.
async fn feed((opts, connect_timeout): (PgConnectOptions, Duration), tx: mpsc::Sender<Pushed>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(connect_timeout)
            .test_before_acquire(false)
            .connect_lazy_with(opts.clone());
        match listen(&pool, &tx, &mut backoff).await {
            // The receiver is gone.
            Ok(()) => return,
            Err(why) => {
                tracing::warn!(error = %why, retry_in = ?backoff, "lost the PostgreSQL change feed; polling catches up");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
        if tx.is_closed() {
            return;
        }
    }
}

/// One connection's life: `Ok` when the receiver is gone, `Err` when the connection is.
async fn listen(pool: &PgPool, tx: &mpsc::Sender<Pushed>, backoff: &mut Duration) -> Result<(), String> {
    let mut listener = tokio::time::timeout(PROBE_TIMEOUT * 2, async {
        let mut l = PgListener::connect_with(pool).await?;
        // A lost connection is ours to handle (back-off, then `Gap`), not silently replaced.
        l.eager_reconnect(false);
        l.listen(CHANNEL).await?;
        Ok::<_, sqlx::Error>(l)
    })
    .await
    .map_err(|_| "no answer while connecting".to_string())?
    .map_err(|e| e.to_string())?;
    *backoff = BACKOFF_MIN;
    tracing::debug!("listening for key changes (PostgreSQL NOTIFY)");
    // Anything may have changed while no one listened (or before the first LISTEN).
    if tx.send(Pushed::Gap).await.is_err() {
        return Ok(());
    }
    loop {
        match tokio::time::timeout(PROBE_EVERY, listener.try_recv()).await {
            Ok(Ok(Some(n))) => {
                let Some(change) = parse(n.payload()) else {
                    tracing::warn!(payload = n.payload(), "ignoring a malformed key change notification");
                    continue;
                };
                if tx.send(Pushed::Change(change)).await.is_err() {
                    return Ok(());
                }
            }
            Ok(Ok(None)) => return Err("connection closed".into()),
            Ok(Err(e)) => return Err(e.to_string()),
            // Quiet: make sure the connection is still there. Notifications arriving meanwhile
            // are buffered by the listener.
            Err(_) => {
                match tokio::time::timeout(PROBE_TIMEOUT, sqlx::query("SELECT 1").execute(&mut listener))
                    .await
                {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(format!("probe failed: {e}")),
                    Err(_) => return Err(format!("probe unanswered within {PROBE_TIMEOUT:?}")),
                }
            }
        }
        if tx.is_closed() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_notifications() {
        assert_eq!(parse("k1 1700 1"), Some(Change { id: "k1".into(), at: 1700, created: true }));
        assert_eq!(parse("k1 1700 0"), Some(Change { id: "k1".into(), at: 1700, created: false }));
        assert_eq!(parse("k1 x 0"), None);
        assert_eq!(parse("k1"), None);
    }
}
