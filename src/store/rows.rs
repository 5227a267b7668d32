//! Rows → records, shared by every SQL backend: both schemas name their columns alike.

use sqlx::query::Query;
use sqlx::{ColumnIndex, Database, Decode, Encode, Row, Type};

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

/// The columns of an inserted key, in the order `bind_key` binds them (each backend writes its
/// own placeholders after them).
pub(super) const KEY_COLUMNS: &str = "id, name, org, workspace, tier, scopes, secret_hash, created_at, \
     expires_at, last_used_at, revoked_at, revoked_by, rotated_from, updated_at";

/// Binds a key record's fields (`KEY_COLUMNS`, in order) to an INSERT of any backend.
pub(super) fn bind_key<'q, DB>(
    q: Query<'q, DB, <DB as Database>::Arguments<'q>>,
    r: &'q KeyRecord,
    updated_at: i64,
) -> Query<'q, DB, <DB as Database>::Arguments<'q>>
where
    DB: Database,
    &'q str: Encode<'q, DB> + Type<DB>,
    String: Encode<'q, DB> + Type<DB>,
    i64: Encode<'q, DB> + Type<DB>,
    Option<i64>: Encode<'q, DB> + Type<DB>,
    Option<&'q str>: Encode<'q, DB> + Type<DB>,
{
    q.bind(r.id.as_str())
        .bind(r.name.as_str())
        .bind(r.org.as_str())
        .bind(r.workspace.as_str())
        .bind(r.tier.as_str())
        .bind(r.scopes.join(" "))
        .bind(r.secret_hash.as_str())
        .bind(r.created_at)
        .bind(r.expires_at)
        .bind(r.last_used_at)
        .bind(r.revoked_at)
        .bind(r.revoked_by.as_deref())
        .bind(r.rotated_from.as_deref())
        .bind(updated_at)
}
