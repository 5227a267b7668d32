//! Argon2id (§2): hashing new secrets, verifying presented ones with bounded work and reusable
//! memory.

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
}
