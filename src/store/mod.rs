//! Key stores. The traits are split by caller: `KeyLookup` for the request path, `KeyAdmin`
//! for the CLI and the HTTP API, `KeyUpkeep` for the background loop (changes made elsewhere,
//! last-used batches, purge, health). A store implements all three and is used as a
//! `KeyStore`. Backends: `sqlite` (the embedded default) and `postgres` (shared by every
//! replica, §11); their schema migrations are versioned `.sql` files under `migrations/`.
//! `observed` wraps either with the store metrics.

mod copy;
pub mod observed;
pub mod postgres;
mod rows;
pub mod sqlite;

use std::sync::Arc;

use crate::config::Store;
use crate::keys::record::{AuditEvent, KeyRecord};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key store unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Conflict(String),
}

/// A change of one key made anywhere (another replica, the CLI): its id and the store's stamp of
/// the change (`updated_at`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub id: String,
    pub at: i64,
    /// The change is the key's creation: nothing cached can be stale (no token of it existed).
    pub created: bool,
}

/// A position in the store's history of changes, from which the next poll reads on. What it
/// counts is the backend's business (SQLite: a time in milliseconds; PostgreSQL: a
/// transaction id); 0 is the beginning for every backend.
pub type Cursor = i64;

/// What a backend pushes (`KeyUpkeep::subscribe`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pushed {
    Change(Change),
    /// The feed lost its connection and is back: changes may have been missed meanwhile, so
    /// poll now rather than at the next `revocation_poll`.
    Gap,
}

/// The request path: a key by id, to verify a presented token against.
#[async_trait::async_trait]
pub trait KeyLookup: Send + Sync {
    async fn get(&self, id: &str) -> Result<Option<KeyRecord>, StoreError>;
}

/// Key management (§6), for the CLI and the HTTP API. Every change goes with its audit event in
/// one transaction.
#[async_trait::async_trait]
pub trait KeyAdmin: Send + Sync {
    async fn list(&self, org: Option<&str>) -> Result<Vec<KeyRecord>, StoreError>;
    /// Inserts a new record and its audit event in one transaction.
    async fn insert(&self, record: &KeyRecord, event: &AuditEvent) -> Result<(), StoreError>;
    /// Sets or clears `revoked_at` / `revoked_by` and appends the event, in one transaction.
    /// Returns false when the key does not exist.
    async fn set_revoked(
        &self,
        id: &str,
        revoked: Option<(i64, &str)>,
        event: &AuditEvent,
    ) -> Result<bool, StoreError>;
    async fn audit(&self, id: &str) -> Result<Vec<AuditEvent>, StoreError>;
    /// Appends an audit event that goes with no other change.
    async fn record(&self, event: &AuditEvent) -> Result<(), StoreError>;
}

/// Background upkeep, run by every replica.
#[async_trait::async_trait]
pub trait KeyUpkeep: Send + Sync {
    /// Whether the store can still be used (for SQLite: the file at the configured path is still
    /// the one opened). `Err` makes the server unready.
    async fn check(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Changes pushed by the backend as they happen (PostgreSQL's LISTEN/NOTIFY, say), if it
    /// can; `None`: changes are only polled with `changed_since`. Polling stays the safety net
    /// either way.
    fn subscribe(&self) -> Option<tokio::sync::mpsc::Receiver<Pushed>> {
        None
    }
    /// Keys changed since `after` (each with the stamp of its latest change, possibly one
    /// reported before), and the cursor of the next poll. `None`: from now on (nothing
    /// changed yet for a cache that is empty). A change committed after this call returns is
    /// never behind the cursor, however long its transaction ran.
    async fn changes(&self, after: Option<Cursor>) -> Result<(Vec<Change>, Cursor), StoreError>;
    /// Writes a batch of last-used timestamps.
    async fn touch(&self, used: &[(String, i64)]) -> Result<(), StoreError>;
    /// Deletes keys revoked before `before_ms`, with one `purge` audit event each, and returns
    /// their ids. Idempotent across replicas: a key another replica purged first is neither
    /// deleted nor audited again.
    async fn purge(&self, before_ms: i64, now_ms: i64) -> Result<Vec<String>, StoreError>;
}

/// A key as stored: its record and the stamp of its latest change (`updated_at`), which a copy
/// carries over with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    pub record: KeyRecord,
    pub updated_at: i64,
}

/// Everything a store holds, as one consistent snapshot: every key, and every audit event in
/// the order it was written (those of purged keys too).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Export {
    pub keys: Vec<StoredKey>,
    pub events: Vec<AuditEvent>,
}

/// What one `KeyCopy::import` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyReport {
    pub keys_copied: usize,
    /// Already in the target, the same record.
    pub keys_present: usize,
    /// Already in the target with a different record: left as it is.
    pub conflicts: Vec<KeyConflict>,
    pub events_copied: usize,
    pub events_present: usize,
}

impl CopyReport {
    /// Events of conflicting keys that were not copied (see `copy::plan`).
    pub fn events_skipped(&self) -> usize {
        self.conflicts.iter().map(|c| c.events_skipped).sum()
    }
}

/// A key whose id the target already has, with another record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyConflict {
    pub id: String,
    /// The fields that differ (names only, never values: one may be the hash).
    pub fields: Vec<&'static str>,
    /// The key's audit events the target lacks, not copied.
    pub events_skipped: usize,
}

/// Moving a whole store into another (`tollgate store copy`, typically SQLite → PostgreSQL).
#[async_trait::async_trait]
pub trait KeyCopy: Send + Sync {
    /// Every key and every audit event, read in one transaction.
    async fn export(&self) -> Result<Export, StoreError>;
    /// Adds what this store lacks of `keys` and `events` (events oldest first), in one
    /// transaction that no other import runs beside, so that importing the same twice adds
    /// nothing the second time. Keys are inserted as any new key is, so running replicas hear
    /// of them as of any other change. What counts as already present: `copy::plan`.
    async fn import(&self, keys: &[StoredKey], events: &[AuditEvent]) -> Result<CopyReport, StoreError>;
}

/// A whole store.
pub trait KeyStore: KeyLookup + KeyAdmin + KeyUpkeep + KeyCopy {}

impl<T: KeyLookup + KeyAdmin + KeyUpkeep + KeyCopy> KeyStore for T {}

/// Opens the configured store and applies its schema migrations. Errors name the store
/// (never its URL).
pub async fn open(config: &Store) -> Result<Arc<dyn KeyStore>, StoreError> {
    let opened: Result<Arc<dyn KeyStore>, StoreError> = match config {
        Store::Sqlite(path) => sqlite::SqliteStore::open(path).await.map(|s| Arc::new(s) as _),
        Store::Postgres(pg) => postgres::PostgresStore::open(pg).await.map(|s| Arc::new(s) as _),
    };
    opened.map_err(|e| match e {
        StoreError::Unavailable(m) => StoreError::Unavailable(format!("{}: {m}", config.describe())),
        other => other,
    })
}
