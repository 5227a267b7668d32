//! The key format (§2): `{prefix}_{id}_{secret}{checksum}`, generated from the OS CSPRNG and
//! parsed strictly, the CRC32 checksum checked before any lookup. A `Token` is the secret: its
//! `Debug` is redacted and it is never logged or rendered.

use std::fmt;

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
}
