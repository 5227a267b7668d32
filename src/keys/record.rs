//! The stored key (`KeyRecord`), its audit events, and scope presets (§2, §3, §6).

/// Expands `--scope` values: the presets of §3 or a literal scope.
pub fn expand_scope(s: &str) -> Result<Vec<String>, String> {
    let s = s.trim();
    Ok(match s {
        "read-only" => vec!["read".into()],
        "read-write" => vec!["read".into(), "write".into()],
        "admin" => vec!["read".into(), "write".into(), "admin:keys".into()],
        _ if s.is_empty() || s.len() > 64 || !s.bytes().all(|b| b.is_ascii_graphic()) => {
            return Err(format!("invalid scope `{s}`: 1 to 64 visible ASCII characters, no spaces"))
        }
        _ => vec![s.to_string()],
    })
}

/// Sorted, deduplicated scopes from `--scope` values or a JSON list.
pub fn normalize_scopes<'a>(given: impl IntoIterator<Item = &'a str>) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for s in given {
        out.extend(expand_scope(s)?);
    }
    out.sort();
    out.dedup();
    if out.is_empty() {
        return Err("at least one scope is required".into());
    }
    Ok(out)
}

/// A stored key. Times are Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: String,
    pub name: String,
    pub org: String,
    pub workspace: String,
    pub tier: String,
    pub scopes: Vec<String>,
    /// The Argon2id PHC string of the secret. Never leaves the store layer in output.
    pub secret_hash: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub revoked_by: Option<String>,
    pub rotated_from: Option<String>,
}

impl KeyRecord {
    /// The public view (no hash), as the CLI's `--json` and the HTTP API render it.
    pub fn to_json(&self) -> serde_json::Value {
        let t = |ms: Option<i64>| ms.map(crate::clock::rfc3339);
        serde_json::json!({
            "id": self.id,
            "name": self.name,
            "org": self.org,
            "workspace": self.workspace,
            "tier": self.tier,
            "scopes": self.scopes,
            "created_at": crate::clock::rfc3339(self.created_at),
            "expires_at": t(self.expires_at),
            "last_used_at": t(self.last_used_at),
            "revoked_at": t(self.revoked_at),
            "revoked_by": self.revoked_by,
            "rotated_from": self.rotated_from,
            "status": self.status(crate::clock::now_ms()),
        })
    }

    /// Until when a revoked key can be restored (`auth.revocation_retention` after its
    /// revocation); `None` for a key that is not revoked.
    pub fn restorable_until(&self, retention: std::time::Duration) -> Option<i64> {
        let window = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        self.revoked_at.map(|at| at.saturating_add(window))
    }

    /// `to_json` with `restorable_until` (RFC 3339, `null` unless revoked), as the HTTP API
    /// and the dashboard show it.
    pub fn to_json_with(&self, retention: std::time::Duration) -> serde_json::Value {
        let mut v = self.to_json();
        v["restorable_until"] =
            serde_json::json!(self.restorable_until(retention).map(crate::clock::rfc3339));
        v
    }

    pub fn status(&self, now_ms: i64) -> &'static str {
        if self.revoked_at.is_some() {
            "revoked"
        } else if self.expires_at.is_some_and(|e| e <= now_ms) {
            "expired"
        } else {
            "active"
        }
    }
}

/// One audit record: who did what to which key, when. `Hash`: a copy counts events alike in
/// every field (`store::copy`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AuditEvent {
    pub key_id: String,
    pub org: String,
    /// `create`, `revoke`, `restore`, `rotate`, `purge`.
    pub action: String,
    /// A key id, `cli`, or `system` (purge).
    pub actor: String,
    pub at: i64,
    /// For `rotate`: the new key's id.
    pub detail: Option<String>,
}

impl AuditEvent {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "key_id": self.key_id,
            "org": self.org,
            "action": self.action,
            "actor": self.actor,
            "at": crate::clock::rfc3339(self.at),
            "detail": self.detail,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn scope_presets() {
        assert_eq!(normalize_scopes(["admin"]).unwrap(), ["admin:keys", "read", "write"]);
        assert_eq!(normalize_scopes(["read-only", "read"]).unwrap(), ["read"]);
        assert_eq!(
            normalize_scopes(["inference:write", "inference:read"]).unwrap(),
            ["inference:read", "inference:write"]
        );
        assert!(normalize_scopes(["has space"]).is_err());
        assert!(normalize_scopes([]).is_err());
    }
}
