//! Key lifecycle (§6): create, revoke, restore, rotate — each validated, stored, and written
//! to the audit trail with its actor in the same transaction. Shared by the CLI (actor `cli`)
//! and the HTTP API (actor: the calling key's id, confined to its organisation).

use std::time::Duration;

use crate::clock;
use crate::config::Config;
use crate::keys::{self, AuditEvent, KeyRecord, KeyStore, NewKey, StoreError, Token};

#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    #[error("no key with id `{0}`")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a new key is for. `org` and `tier` are checked against the config.
#[derive(Debug, Clone)]
pub struct NewKeySpec {
    pub org: String,
    pub tier: String,
    pub scopes: Vec<String>,
    pub name: Option<String>,
    pub workspace: Option<String>,
    pub expires_in: Option<Duration>,
}

/// Names that travel as identity headers and metric-free labels: short, visible ASCII.
fn check_name(what: &str, s: &str) -> Result<(), ManageError> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:@".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ManageError::Invalid(format!("invalid {what} `{s}`: 1 to 64 ASCII letters, digits or `-_.:@`")))
    }
}

fn audit(record: &KeyRecord, action: &str, actor: &str, at: i64, detail: Option<String>) -> AuditEvent {
    let e = AuditEvent {
        key_id: record.id.clone(),
        org: record.org.clone(),
        action: action.into(),
        actor: actor.into(),
        at,
        detail,
    };
    tracing::info!(target: "audit", action, key_id = %e.key_id, org = %e.org, actor, "key {action}");
    e
}

/// Creates a key; returns its record and the plaintext, which exists nowhere else.
pub async fn create(
    store: &dyn KeyStore,
    config: &Config,
    spec: NewKeySpec,
    actor: &str,
    rotated_from: Option<&str>,
) -> Result<(KeyRecord, Token), ManageError> {
    check_name("organisation", &spec.org)?;
    if !config.tiers.contains_key(&spec.tier) {
        let known: Vec<&str> = config.tiers.keys().map(String::as_str).collect();
        return Err(ManageError::Invalid(format!(
            "unknown tier `{}`; configured tiers: {}",
            spec.tier,
            known.join(", ")
        )));
    }
    let workspace =
        spec.workspace.or_else(|| config.auth.workspace.clone()).unwrap_or_else(|| "default".into());
    check_name("workspace", &workspace)?;
    let scopes =
        keys::normalize_scopes(spec.scopes.iter().map(String::as_str)).map_err(ManageError::Invalid)?;
    let name = spec.name.unwrap_or_default();
    if name.len() > 128 || name.chars().any(char::is_control) {
        return Err(ManageError::Invalid(
            "invalid name: at most 128 characters, no control characters".into(),
        ));
    }
    let new = NewKey::generate(&config.auth.key_prefix).map_err(ManageError::Invalid)?;
    let (params, secret) = (config.auth.argon2, new.secret().to_string());
    let secret_hash = tokio::task::spawn_blocking(move || params.hash(&secret))
        .await
        .map_err(|e| ManageError::Invalid(e.to_string()))?
        .map_err(ManageError::Invalid)?;
    let now = clock::now_ms();
    let expires_at =
        spec.expires_in.map(|d| now.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)));
    let record = KeyRecord {
        id: new.id.clone(),
        name,
        org: spec.org,
        workspace,
        tier: spec.tier,
        scopes,
        secret_hash,
        created_at: now,
        expires_at,
        last_used_at: None,
        revoked_at: None,
        revoked_by: None,
        rotated_from: rotated_from.map(str::to_string),
    };
    let detail = rotated_from.map(|old| format!("rotated from {old}"));
    store.insert(&record, &audit(&record, "create", actor, now, detail)).await?;
    Ok((record, new.token))
}

/// Fetches a key, as seen from `org` (`None`: any organisation, for the CLI). A key of another
/// organisation is reported as not found, so that ids of other organisations cannot be probed.
pub async fn fetch(store: &dyn KeyStore, id: &str, org: Option<&str>) -> Result<KeyRecord, ManageError> {
    match store.get(id).await? {
        Some(r) if org.is_none_or(|o| o == r.org) => Ok(r),
        _ => Err(ManageError::NotFound(id.to_string())),
    }
}

/// Revokes a key (reversible until the retention window ends). Revoking a revoked key is a
/// no-op that returns the record unchanged.
pub async fn revoke(
    store: &dyn KeyStore,
    id: &str,
    actor: &str,
    org: Option<&str>,
) -> Result<KeyRecord, ManageError> {
    let mut r = fetch(store, id, org).await?;
    if r.revoked_at.is_some() {
        return Ok(r);
    }
    let now = clock::now_ms();
    let e = audit(&r, "revoke", actor, now, None);
    if !store.set_revoked(id, Some((now, actor)), &e).await? {
        return Err(ManageError::NotFound(id.to_string()));
    }
    r.revoked_at = Some(now);
    r.revoked_by = Some(actor.to_string());
    Ok(r)
}

/// Restores a revoked key within `auth.revocation_retention` of its revocation.
pub async fn restore(
    store: &dyn KeyStore,
    config: &Config,
    id: &str,
    actor: &str,
    org: Option<&str>,
) -> Result<KeyRecord, ManageError> {
    let mut r = fetch(store, id, org).await?;
    let Some(revoked_at) = r.revoked_at else {
        return Err(ManageError::Invalid(format!("key `{id}` is not revoked")));
    };
    let now = clock::now_ms();
    let window = i64::try_from(config.auth.revocation_retention.as_millis()).unwrap_or(i64::MAX);
    if now.saturating_sub(revoked_at) > window {
        return Err(ManageError::Invalid(format!(
            "key `{id}` was revoked more than {}s ago and can no longer be restored",
            config.auth.revocation_retention.as_secs()
        )));
    }
    let e = audit(&r, "restore", actor, now, None);
    if !store.set_revoked(id, None, &e).await? {
        return Err(ManageError::NotFound(id.to_string()));
    }
    r.revoked_at = None;
    r.revoked_by = None;
    Ok(r)
}

/// Creates a new key with the same organisation, workspace, tier and scopes. The old key stays
/// valid, so the new one can be deployed before the old one is revoked (zero-downtime rotation).
pub async fn rotate(
    store: &dyn KeyStore,
    config: &Config,
    id: &str,
    actor: &str,
    org: Option<&str>,
) -> Result<(KeyRecord, Token), ManageError> {
    let old = fetch(store, id, org).await?;
    let remaining =
        old.expires_at.map(|e| Duration::from_millis(u64::try_from(e - clock::now_ms()).unwrap_or(0)));
    let spec = NewKeySpec {
        org: old.org.clone(),
        tier: old.tier.clone(),
        scopes: old.scopes.clone(),
        name: Some(old.name.clone()),
        workspace: Some(old.workspace.clone()),
        expires_in: remaining,
    };
    let (new, token) = create(store, config, spec, actor, Some(&old.id)).await?;
    // The old key's trail says where it went.
    store
        .record(&audit(&old, "rotate", actor, new.created_at, Some(format!("rotated to {}", new.id))))
        .await?;
    Ok((new, token))
}
