//! Key lifecycle (§6): create, revoke, restore, rotate — each validated, stored, and written
//! to the audit trail with its actor in the same transaction. Shared by the CLI (actor `cli`)
//! and the HTTP API (actor: the calling key, confined to its organisation and to what it holds).

use std::time::Duration;

use crate::clock;
use crate::config::Config;
use crate::keys::record::{self as keys, AuditEvent, KeyRecord};
use crate::keys::token::{NewKey, Token};
use crate::store::{KeyStore, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    #[error("no key with id `{0}`")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    /// The server's own failure; the message is for the log, not the caller.
    #[error("internal error: {0}")]
    Internal(String),
    /// The actor would hand out a scope it does not hold.
    #[error("a key can only issue keys with scopes it holds itself; `{scope}` is not one of them")]
    ScopeNotHeld { scope: String, held: Vec<String> },
    /// The key's tier does not allow one of its scopes (`tiers.X.scopes`). The same words as
    /// the API's 403, so that the CLI's message matches it.
    #[error("Keys of tier `{tier}` cannot carry the `{scope}` scope; this tier allows: {}.", allowed.join(", "))]
    ScopeNotAllowed { scope: String, tier: String, allowed: Vec<String> },
    /// The actor would bring back a key that expires after the actor itself.
    #[error("a key can only restore keys that expire no later than itself")]
    OutlivesActor,
    /// The actor would hand out a tier other than its own.
    #[error("a key can only issue keys of its own tier `{held}`, not `{tier}`")]
    TierNotHeld { tier: String, held: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Who performs a lifecycle action. The operator's CLI acts on any organisation without bounds;
/// an API key acts on its own organisation only, and every action that yields a working key
/// (create, rotate, restore) yields one no stronger than the caller: its scopes a subset of the
/// caller's, its tier the caller's, and no expiry later than the caller's own. Revoking only
/// takes privilege away, so any key of the organisation may be revoked.
#[derive(Debug, Clone, Copy)]
pub enum Actor<'a> {
    Cli,
    Key { id: &'a str, org: &'a str, tier: &'a str, scopes: &'a [String], expires_at: Option<i64> },
}

impl Actor<'_> {
    /// The name written to the audit trail.
    pub fn name(&self) -> &str {
        match self {
            Actor::Cli => "cli",
            Actor::Key { id, .. } => id,
        }
    }

    /// The organisation the actor is confined to (`None`: all of them).
    pub fn org(&self) -> Option<&str> {
        match self {
            Actor::Cli => None,
            Actor::Key { org, .. } => Some(org),
        }
    }

    /// Refuses a key of `tier` with `scopes` that the actor could not hold itself.
    fn may_issue(&self, tier: &str, scopes: &[String]) -> Result<(), ManageError> {
        let Actor::Key { tier: held_tier, scopes: held, .. } = self else {
            return Ok(());
        };
        if let Some(missing) = scopes.iter().find(|s| !held.contains(s)) {
            return Err(ManageError::ScopeNotHeld { scope: missing.clone(), held: held.to_vec() });
        }
        if tier != *held_tier {
            return Err(ManageError::TierNotHeld { tier: tier.to_string(), held: held_tier.to_string() });
        }
        Ok(())
    }

    /// The latest expiry a key issued by this actor may have.
    fn not_after(&self) -> Option<i64> {
        match self {
            Actor::Cli => None,
            Actor::Key { expires_at, .. } => *expires_at,
        }
    }
}

/// What a new key is for. `org` and `tier` are checked against the config.
#[derive(Debug, Clone)]
pub struct NewKeySpec {
    pub org: String,
    pub tier: String,
    /// Empty: the config's `default_scopes`.
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
    actor: &Actor<'_>,
    rotated_from: Option<&str>,
) -> Result<(KeyRecord, Token), ManageError> {
    check_name("organisation", &spec.org)?;
    if actor.org().is_some_and(|o| o != spec.org) {
        return Err(ManageError::Invalid("keys can only be issued for the caller's own organisation".into()));
    }
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
    let scopes = if spec.scopes.is_empty() {
        config.default_scopes.clone()
    } else {
        keys::normalize_scopes(spec.scopes.iter().map(String::as_str)).map_err(ManageError::Invalid)?
    };
    // The tier's rule binds everyone, the operator's CLI included; the actor's own bounds
    // come after it.
    allowed_by_tier(config, &spec.tier, &scopes)?;
    actor.may_issue(&spec.tier, &scopes)?;
    let name = spec.name.unwrap_or_default();
    if name.len() > 128 || name.chars().any(char::is_control) {
        return Err(ManageError::Invalid(
            "invalid name: at most 128 characters, no control characters".into(),
        ));
    }
    // Neither failure is the caller's: the OS random generator, the hasher's thread.
    let new = NewKey::generate(&config.auth.key_prefix).map_err(ManageError::Internal)?;
    let (params, secret) = (config.auth.argon2, new.secret().to_string());
    let secret_hash = tokio::task::spawn_blocking(move || params.hash(&secret))
        .await
        .map_err(|e| ManageError::Internal(e.to_string()))?
        .map_err(ManageError::Internal)?;
    let now = clock::now_ms();
    let requested =
        spec.expires_in.map(|d| now.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)));
    // A key never outlives the key that issued it.
    let expires_at = match (requested, actor.not_after()) {
        (Some(r), Some(cap)) => Some(r.min(cap)),
        (r, cap) => r.or(cap),
    };
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
    store.insert(&record, &audit(&record, "create", actor.name(), now, detail)).await?;
    Ok((record, new.token))
}

/// Refuses scopes outside the tier's `tiers.X.scopes` (no list: any scope).
pub fn allowed_by_tier(config: &Config, tier: &str, scopes: &[String]) -> Result<(), ManageError> {
    let Some(allowed) = config.tier_scopes.get(tier) else {
        return Ok(());
    };
    match scopes.iter().find(|s| !allowed.contains(s)) {
        None => Ok(()),
        Some(s) => Err(ManageError::ScopeNotAllowed {
            scope: s.clone(),
            tier: tier.to_string(),
            allowed: allowed.clone(),
        }),
    }
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
/// no-op that returns the record unchanged. Returns the record and, when something changed, the
/// change's time in the store (`Authenticator::apply_change`).
pub async fn revoke(
    store: &dyn KeyStore,
    id: &str,
    actor: &Actor<'_>,
) -> Result<(KeyRecord, Option<i64>), ManageError> {
    let mut r = fetch(store, id, actor.org()).await?;
    if r.revoked_at.is_some() {
        return Ok((r, None));
    }
    let now = clock::now_ms();
    let e = audit(&r, "revoke", actor.name(), now, None);
    if !store.set_revoked(id, Some((now, actor.name())), &e).await? {
        return Err(ManageError::NotFound(id.to_string()));
    }
    r.revoked_at = Some(now);
    r.revoked_by = Some(actor.name().to_string());
    Ok((r, Some(now)))
}

/// Restores a revoked key within `auth.revocation_retention` of its revocation. Restoring
/// makes a key work again, so the actor must be able to issue it. Returns the record and the
/// change's time in the store.
pub async fn restore(
    store: &dyn KeyStore,
    config: &Config,
    id: &str,
    actor: &Actor<'_>,
) -> Result<(KeyRecord, i64), ManageError> {
    let mut r = fetch(store, id, actor.org()).await?;
    actor.may_issue(&r.tier, &r.scopes)?;
    // Restoring makes a key work again: like one it creates, it must not outlive the caller.
    if let Some(cap) = actor.not_after() {
        if r.expires_at.is_none_or(|e| e > cap) {
            return Err(ManageError::OutlivesActor);
        }
    }
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
    let e = audit(&r, "restore", actor.name(), now, None);
    if !store.set_revoked(id, None, &e).await? {
        return Err(ManageError::NotFound(id.to_string()));
    }
    r.revoked_at = None;
    r.revoked_by = None;
    Ok((r, now))
}

/// Creates a new key with the same organisation, workspace, tier and scopes — or `scopes`,
/// when given (the seeds' "inherits scope set from the predecessor unless you specify
/// otherwise"). The old key stays valid, so the new one can be deployed before the old one is
/// revoked (zero-downtime rotation). The new key is issued by `actor`, under the same rules as
/// `create`.
pub async fn rotate(
    store: &dyn KeyStore,
    config: &Config,
    id: &str,
    actor: &Actor<'_>,
    scopes: Option<Vec<String>>,
) -> Result<(KeyRecord, Token), ManageError> {
    let old = fetch(store, id, actor.org()).await?;
    let scopes = match scopes {
        // Asked for explicitly, an empty list is a mistake, not "the defaults".
        Some(s) => keys::normalize_scopes(s.iter().map(String::as_str)).map_err(ManageError::Invalid)?,
        None => old.scopes.clone(),
    };
    let remaining =
        old.expires_at.map(|e| Duration::from_millis(u64::try_from(e - clock::now_ms()).unwrap_or(0)));
    let spec = NewKeySpec {
        org: old.org.clone(),
        tier: old.tier.clone(),
        scopes,
        name: Some(old.name.clone()),
        workspace: Some(old.workspace.clone()),
        expires_in: remaining,
    };
    let (new, token) = create(store, config, spec, actor, Some(&old.id)).await?;
    // The old key's trail says where it went.
    store
        .record(&audit(&old, "rotate", actor.name(), new.created_at, Some(format!("rotated to {}", new.id))))
        .await?;
    Ok((new, token))
}
