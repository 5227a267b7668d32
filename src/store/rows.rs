//! Rows → records, shared by every SQL backend: both schemas name their columns alike.

use sqlx::{ColumnIndex, Decode, Row, Type};

use super::StoredKey;
use crate::keys::record::{AuditEvent, KeyRecord};

/// A key record from a `SELECT * FROM keys` row.
pub(super) fn record<'r, R>(row: &'r R) -> Result<KeyRecord, sqlx::Error>
where
    R: Row,
    &'static str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
{
    let scopes: String = row.try_get("scopes")?;
    Ok(KeyRecord {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        org: row.try_get("org")?,
        workspace: row.try_get("workspace")?,
        tier: row.try_get("tier")?,
        scopes: scopes.split_whitespace().map(str::to_string).collect(),
        secret_hash: row.try_get("secret_hash")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        last_used_at: row.try_get("last_used_at")?,
        revoked_at: row.try_get("revoked_at")?,
        revoked_by: row.try_get("revoked_by")?,
        rotated_from: row.try_get("rotated_from")?,
    })
}

/// A key record and its `updated_at`, from a `SELECT * FROM keys` row.
pub(super) fn stored_key<'r, R>(row: &'r R) -> Result<StoredKey, sqlx::Error>
where
    R: Row,
    &'static str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(StoredKey { record: record(row)?, updated_at: row.try_get("updated_at")? })
}

/// An audit event from a `SELECT * FROM audit` row.
pub(super) fn event<'r, R>(row: &'r R) -> Result<AuditEvent, sqlx::Error>
where
    R: Row,
    &'static str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(AuditEvent {
        key_id: row.try_get("key_id")?,
        org: row.try_get("org")?,
        action: row.try_get("action")?,
        actor: row.try_get("actor")?,
        at: row.try_get("at")?,
        detail: row.try_get("detail")?,
    })
}
