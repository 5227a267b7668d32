//! A store seen by the metrics (§11): `tollgate_store_up` follows the outcome of the latest
//! call, `tollgate_store_errors_total{op}` counts the failed ones. Wraps any backend, so the
//! backends stay free of metrics and the CLI uses them bare.

use prometheus::{IntCounterVec, IntGauge};

use super::{
    Change, CopyReport, Cursor, Export, KeyAdmin, KeyCopy, KeyLookup, KeyStore, KeyUpkeep, Pushed,
    StoreError, StoredKey,
};
use crate::keys::record::{AuditEvent, KeyRecord};

pub struct Observed {
    inner: std::sync::Arc<dyn KeyStore>,
    up: IntGauge,
    errors: IntCounterVec,
}

impl Observed {
    pub fn new(inner: std::sync::Arc<dyn KeyStore>, up: IntGauge, errors: IntCounterVec) -> Observed {
        up.set(1);
        Observed { inner, up, errors }
    }

    /// Notes the outcome of one call. A conflict is the caller's mistake, not the store's.
    fn note<T>(&self, op: &str, r: Result<T, StoreError>) -> Result<T, StoreError> {
        match &r {
            Err(StoreError::Unavailable(_)) => {
                self.up.set(0);
                self.errors.with_label_values(&[op]).inc();
            }
            _ => self.up.set(1),
        }
        r
    }
}

#[async_trait::async_trait]
impl KeyLookup for Observed {
    async fn get(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.note("get", self.inner.get(id).await)
    }
}

#[async_trait::async_trait]
impl KeyAdmin for Observed {
    async fn list(&self, org: Option<&str>) -> Result<Vec<KeyRecord>, StoreError> {
        self.note("list", self.inner.list(org).await)
    }
    async fn insert(&self, record: &KeyRecord, event: &AuditEvent) -> Result<(), StoreError> {
        self.note("insert", self.inner.insert(record, event).await)
    }
    async fn set_revoked(
        &self,
        id: &str,
        revoked: Option<(i64, &str)>,
        event: &AuditEvent,
    ) -> Result<bool, StoreError> {
        self.note("set_revoked", self.inner.set_revoked(id, revoked, event).await)
    }
    async fn audit(&self, id: &str) -> Result<Vec<AuditEvent>, StoreError> {
        self.note("audit", self.inner.audit(id).await)
    }
    async fn record(&self, event: &AuditEvent) -> Result<(), StoreError> {
        self.note("record", self.inner.record(event).await)
    }
}

#[async_trait::async_trait]
impl KeyUpkeep for Observed {
    async fn check(&self) -> Result<(), StoreError> {
        self.inner.check().await
    }
    fn subscribe(&self) -> Option<tokio::sync::mpsc::Receiver<Pushed>> {
        self.inner.subscribe()
    }
    async fn changes(&self, after: Option<Cursor>) -> Result<(Vec<Change>, Cursor), StoreError> {
        self.note("changes", self.inner.changes(after).await)
    }
    async fn touch(&self, used: &[(String, i64)]) -> Result<(), StoreError> {
        self.note("touch", self.inner.touch(used).await)
    }
    async fn purge(&self, before_ms: i64, now_ms: i64) -> Result<Vec<String>, StoreError> {
        self.note("purge", self.inner.purge(before_ms, now_ms).await)
    }
}

#[async_trait::async_trait]
impl KeyCopy for Observed {
    async fn export(&self) -> Result<Export, StoreError> {
        self.note("export", self.inner.export().await)
    }
    async fn import(&self, keys: &[StoredKey], events: &[AuditEvent]) -> Result<CopyReport, StoreError> {
        self.note("import", self.inner.import(keys, events).await)
    }
}
