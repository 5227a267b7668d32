//! API keys (§2): the format `{prefix}_{id}_{secret}{checksum}`, generation from the OS CSPRNG,
//! strict parsing with the CRC32 checksum checked before any lookup, Argon2id hashing, the
//! stored `KeyRecord`, scope presets, and the narrow `KeyStore` trait the stores implement.
//!
//! A `Token` is the secret: its `Debug` is redacted and it is never logged or rendered.

use std::fmt;

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

/// Length of the public id, in base62 characters (~71 bits: collisions are not a concern).
pub const ID_LEN: usize = 12;
/// Length of the secret: 32 base62 characters ≈ 190 bits, above the 160 the contract asks for.
pub const SECRET_LEN: usize = 32;
/// Length of the checksum: 6 base62 characters hold any CRC32 (62⁶ > 2³²).
pub const CHECKSUM_LEN: usize = 6;
/// No well-formed key is longer: refuse longer tokens before looking at them.
pub const MAX_TOKEN_LEN: usize = 16 + 1 + ID_LEN + 1 + SECRET_LEN + CHECKSUM_LEN;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A presented or generated key. The whole string is the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// The plaintext, for the one place it is shown: the output of `create` / `rotate`.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// A token that passed the format and checksum checks: its id can be looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed<'a> {
    pub id: &'a str,
    secret: &'a str,
}

impl Parsed<'_> {
    pub fn secret(&self) -> &str {
        self.secret
    }
}

/// Why a string is not a key. Checked without any I/O or hashing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    Shape,
    Checksum,
}

fn is_base62(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Whether `s` has the shape of one of our keys — `{prefix}_`, a base62 id, `_`, and a long
/// base62 tail — whatever its checksum (a mistyped key pasted into a URL is still a secret).
/// Strict enough that a model named `tg_llama` is not taken for a key.
pub fn looks_like_key(prefix: &str, s: &str) -> bool {
    let Some(rest) = s.strip_prefix(prefix).and_then(|r| r.strip_prefix('_')) else {
        return false;
    };
    let Some((id, tail)) = rest.split_at_checked(ID_LEN) else {
        return false;
    };
    let tail = tail.strip_prefix('_').unwrap_or("");
    is_base62(id) && tail.len() >= SECRET_LEN / 2 && is_base62(tail)
}

/// Parses `{prefix}_{id}_{secret}{checksum}` strictly: exact prefix, exact lengths, base62 only,
/// and a matching checksum.
pub fn parse<'a>(prefix: &str, token: &'a str) -> Result<Parsed<'a>, Malformed> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(Malformed::Shape);
    }
    let rest = token.strip_prefix(prefix).and_then(|r| r.strip_prefix('_')).ok_or(Malformed::Shape)?;
    let (id, tail) = rest.split_at_checked(ID_LEN).ok_or(Malformed::Shape)?;
    let tail = tail.strip_prefix('_').ok_or(Malformed::Shape)?;
    if tail.len() != SECRET_LEN + CHECKSUM_LEN || !is_base62(id) || !is_base62(tail) {
        return Err(Malformed::Shape);
    }
    let (secret, checksum) = tail.split_at(SECRET_LEN);
    let body = &token[..token.len() - CHECKSUM_LEN];
    if checksum_of(body) != checksum {
        return Err(Malformed::Checksum);
    }
    Ok(Parsed { id, secret })
}

/// CRC32 of everything before the checksum, as 6 zero-padded base62 digits.
fn checksum_of(body: &str) -> String {
    let mut n = crc32fast::hash(body.as_bytes());
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Builds the token string for given parts, checksum included. Public so that tests and tools
/// can build well-formed keys with chosen ids (a wrong secret for a real id, say).
pub fn assemble(prefix: &str, id: &str, secret: &str) -> String {
    let body = format!("{prefix}_{id}_{secret}");
    let checksum = checksum_of(&body);
    body + &checksum
}

/// `n` uniformly random base62 characters from the OS CSPRNG (rejection sampling: bytes ≥ 248
/// are dropped so that every character is equally likely).
fn random_base62(n: usize) -> Result<String, String> {
    let mut out = String::with_capacity(n);
    let mut buf = [0u8; 64];
    while out.len() < n {
        getrandom::fill(&mut buf).map_err(|e| format!("the OS random generator failed: {e}"))?;
        for b in buf {
            if b < 248 && out.len() < n {
                out.push(BASE62[(b % 62) as usize] as char);
            }
        }
    }
    Ok(out)
}

/// A fresh key: its public id, the plaintext token, and the secret part to hash.
pub struct NewKey {
    pub id: String,
    pub token: Token,
}

impl NewKey {
    pub fn generate(prefix: &str) -> Result<NewKey, String> {
        let id = random_base62(ID_LEN)?;
        let secret = random_base62(SECRET_LEN)?;
        let token = assemble(prefix, &id, &secret);
        Ok(NewKey { id, token: Token(token) })
    }

    pub fn secret(&self) -> &str {
        // The token was built from this layout just above; the slice is always in bounds.
        let t = &self.token.0;
        &t[t.len() - CHECKSUM_LEN - SECRET_LEN..t.len() - CHECKSUM_LEN]
    }
}

/// Argon2id parameters (§2: default m=19456 KiB, t=2, p=1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for HashParams {
    fn default() -> Self {
        HashParams { memory_kib: 19_456, iterations: 2, parallelism: 1 }
    }
}

/// The most work one verification may cost, whatever a stored hash claims: a tampered or
/// absurd record must not be able to stall the verifier pool.
const MAX_MEMORY_KIB: u32 = 256 * 1024;
const MAX_ITERATIONS: u32 = 16;
const MAX_PARALLELISM: u32 = 8;

impl HashParams {
    fn argon2(&self) -> Result<Argon2<'static>, String> {
        let p = Params::new(self.memory_kib, self.iterations, self.parallelism, None)
            .map_err(|e| format!("invalid Argon2id parameters: {e}"))?;
        Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, p))
    }

    /// The PHC string of `secret`, with a fresh random salt.
    pub fn hash(&self, secret: &str) -> Result<String, String> {
        let mut salt = [0u8; 16];
        getrandom::fill(&mut salt).map_err(|e| format!("the OS random generator failed: {e}"))?;
        let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
        Ok(self
            .argon2()?
            .hash_password(secret.as_bytes(), &salt)
            .map_err(|e| format!("cannot hash: {e}"))?
            .to_string())
    }
}

/// The outcome of one Argon2id verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    Match,
    Mismatch,
    /// The stored hash is unreadable, not Argon2id, or over the work bounds.
    Unusable,
}

/// Verifies `secret` against a PHC string in constant time (`password_hash::Output` compares
/// digests with `subtle`). CPU-heavy: call it off the async threads. Allocates its own memory;
/// the proxy's verifier threads use `verify_with` to reuse theirs.
pub fn verify(phc: &str, secret: &str) -> Verified {
    verify_with(phc, secret, &mut Vec::new())
}

/// `verify`, with the Argon2 working memory (`m` KiB) taken from — and left in — `blocks`, so
/// that a verifier thread does not allocate and free 19 MiB per verification.
pub fn verify_with(phc: &str, secret: &str, blocks: &mut Vec<argon2::Block>) -> Verified {
    let Ok(hash) = PasswordHash::new(phc) else {
        return Verified::Unusable;
    };
    let (Ok(params), Some(expected), Some(salt)) = (Params::try_from(&hash), hash.hash, hash.salt) else {
        return Verified::Unusable;
    };
    if hash.algorithm.as_str() != "argon2id"
        || params.m_cost() > MAX_MEMORY_KIB
        || params.t_cost() > MAX_ITERATIONS
        || params.p_cost() > MAX_PARALLELISM
    {
        return Verified::Unusable;
    }
    let version = match hash.version.map(Version::try_from) {
        None => Version::V0x13,
        Some(Ok(v)) => v,
        Some(Err(_)) => return Verified::Unusable,
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return Verified::Unusable;
    };
    let Ok(params) = Params::new(params.m_cost(), params.t_cost(), params.p_cost(), Some(expected.len()))
    else {
        return Verified::Unusable;
    };
    let argon2 = Argon2::new(Algorithm::Argon2id, version, params);
    let needed = argon2.params().block_count();
    if blocks.capacity() < needed {
        // At least 33 MiB reserved: glibc then serves the buffer with an mmap of its own (its
        // dynamic mmap threshold stops at 32 MiB) and unmaps it when the verifier lets it go.
        // A smaller buffer, once freed, raises that threshold, and the next one stays in the
        // thread's heap for good (+19 MiB RSS after every idle period). Only `needed` blocks are
        // ever touched, so only they are resident.
        let floor = (33 << 20) / std::mem::size_of::<argon2::Block>();
        *blocks = Vec::with_capacity(needed.max(floor));
    }
    if blocks.len() < needed {
        blocks.resize(needed, argon2::Block::default());
    }
    let mut out = [0u8; 64];
    let out = &mut out[..expected.len()];
    if argon2.hash_password_into_with_memory(secret.as_bytes(), salt, out, &mut blocks[..needed]).is_err() {
        return Verified::Unusable;
    }
    match argon2::password_hash::Output::new(out) {
        Ok(actual) if actual == expected => Verified::Match,
        Ok(_) => Verified::Mismatch,
        Err(_) => Verified::Unusable,
    }
}

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

/// One audit record: who did what to which key, when.
#[derive(Debug, Clone, PartialEq, Eq)]
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

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key store unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Conflict(String),
}

/// The narrow storage interface: everything the proxy, the CLI and the HTTP API need, with
/// portable SQL behind it (SQLite now; a shared PostgreSQL store can implement the same).
#[async_trait::async_trait]
pub trait KeyStore: Send + Sync {
    /// Whether the store can still be used (for SQLite: the file at the configured path is still
    /// the one opened). Called by the maintenance loop; `Err` makes the server unready.
    async fn check(&self) -> Result<(), StoreError> {
        Ok(())
    }
    async fn get(&self, id: &str) -> Result<Option<KeyRecord>, StoreError>;
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
    /// Writes a batch of last-used timestamps.
    async fn touch(&self, used: &[(String, i64)]) -> Result<(), StoreError>;
    /// Keys whose record changed at or after `since_ms` (revocations made elsewhere), with the
    /// time of their latest change: `(id, updated_at)`.
    async fn changed_since(&self, since_ms: i64) -> Result<Vec<(String, i64)>, StoreError>;
    /// Deletes keys revoked before `before_ms`, with a `purge` audit event each. Returns their ids.
    async fn purge(&self, before_ms: i64, now_ms: i64) -> Result<Vec<String>, StoreError>;
    async fn audit(&self, id: &str) -> Result<Vec<AuditEvent>, StoreError>;
    /// Appends an audit event that goes with no other change.
    async fn record(&self, event: &AuditEvent) -> Result<(), StoreError>;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_carry_enough_entropy() {
        let k = NewKey::generate("tg").unwrap();
        let t = k.token.expose();
        assert!(t.starts_with("tg_"));
        assert_eq!(t.len(), 3 + ID_LEN + 1 + SECRET_LEN + CHECKSUM_LEN);
        let p = parse("tg", t).unwrap();
        assert_eq!(p.id, k.id);
        assert_eq!(p.secret(), k.secret());
        // 32 base62 characters: log2(62) * 32 ≈ 190.5 bits ≥ 160.
        assert!((SECRET_LEN as f64) * 62f64.log2() >= 160.0);
        assert_ne!(NewKey::generate("tg").unwrap().token, k.token);
        assert_eq!(format!("{:?}", k.token), "Token(<redacted>)");
    }

    #[test]
    fn typos_and_random_strings_are_rejected_before_lookup() {
        let k = NewKey::generate("tg").unwrap();
        let t = k.token.expose().to_string();
        // Change one character of the secret: the checksum catches it.
        let mut typo = t.clone().into_bytes();
        typo[20] = if typo[20] == b'a' { b'b' } else { b'a' };
        assert_eq!(parse("tg", std::str::from_utf8(&typo).unwrap()), Err(Malformed::Checksum));
        for bad in [
            "",
            "tg",
            "tg_",
            "sk-abcdef",
            &t[..t.len() - 1],
            &format!("{t}x"),
            &t.replacen("tg_", "xx_", 1),
            &t.replacen("tg_", "tg-", 1),
            &format!(" {t}"),
        ] {
            assert!(parse("tg", bad).is_err(), "{bad}");
        }
        assert!(parse("other", &t).is_err());
    }

    #[test]
    fn hashes_verify_and_bounds_hold() {
        let params = HashParams { memory_kib: 64, iterations: 1, parallelism: 1 };
        let phc = params.hash("s3cret").unwrap();
        assert!(phc.starts_with("$argon2id$"));
        assert_eq!(verify(&phc, "s3cret"), Verified::Match);
        assert_eq!(verify(&phc, "s3cres"), Verified::Mismatch);
        assert_eq!(verify("not a hash", "x"), Verified::Unusable);
        let greedy = phc.replace("m=64", "m=4194304");
        assert_eq!(verify(&greedy, "s3cret"), Verified::Unusable);
        // Reused memory gives the same answers, whatever it held before.
        let mut blocks = Vec::new();
        let other = HashParams { memory_kib: 128, ..params }.hash("other").unwrap();
        for _ in 0..2 {
            assert_eq!(verify_with(&other, "other", &mut blocks), Verified::Match);
            assert_eq!(verify_with(&phc, "s3cret", &mut blocks), Verified::Match);
            assert_eq!(verify_with(&phc, "s3cres", &mut blocks), Verified::Mismatch);
        }
        // A hash made by the argon2 crate's own PasswordHasher verifies with its verifier too.
        use argon2::password_hash::PasswordVerifier;
        let parsed = PasswordHash::new(&phc).unwrap();
        assert!(Argon2::default().verify_password(b"s3cret", &parsed).is_ok());
    }

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
