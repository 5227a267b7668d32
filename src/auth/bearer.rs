//! The `Authorization` header, read strictly, and why a token is refused (`Reason`).

use http::{header, HeaderMap};

use crate::error::Error;
use crate::keys;

/// Why a token was refused; the `reason` label of `tollgate_auth_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Missing,
    Malformed,
    Format,
    Checksum,
    Unknown,
    Mismatch,
    Revoked,
    Expired,
    Workspace,
    Unusable,
    RateLimited,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::Missing => "missing",
            Reason::Malformed => "malformed",
            Reason::Format => "format",
            Reason::Checksum => "checksum",
            Reason::Unknown => "unknown",
            Reason::Mismatch => "mismatch",
            Reason::Revoked => "revoked",
            Reason::Expired => "expired",
            Reason::Workspace => "workspace",
            Reason::Unusable => "unusable",
            Reason::RateLimited => "rate_limited",
        }
    }

    pub(super) fn error(self) -> Error {
        let message = match self {
            Reason::Missing => "Missing API key. Send it in the Authorization header as `Bearer <key>`.",
            Reason::Malformed => {
                "Invalid Authorization header: expected exactly one `Authorization: Bearer <key>`."
            }
            Reason::Format | Reason::Checksum => {
                "Invalid API key: it is not a well-formed key (check it for truncation or typos)."
            }
            // Only once the secret has verified may the message say more (§5).
            Reason::Revoked => "This API key has been revoked.",
            Reason::Expired => "This API key has expired.",
            _ => "Invalid API key. Include a valid Bearer token in the Authorization header.",
        };
        Error::Unauthorized { message: message.into(), reason: self.label() }
    }
}

/// Extracts the token of exactly one `Authorization: Bearer <token>` header, strictly: one
/// header, the scheme (case-insensitive), one space, and a token of visible ASCII no longer than
/// any well-formed key.
pub fn bearer(headers: &HeaderMap) -> Result<&str, Reason> {
    let mut all = headers.get_all(header::AUTHORIZATION).iter();
    let value = all.next().ok_or(Reason::Missing)?;
    if all.next().is_some() {
        return Err(Reason::Malformed);
    }
    let bytes = value.as_bytes();
    if bytes.len() < 7 || !bytes[..7].eq_ignore_ascii_case(b"bearer ") {
        return Err(Reason::Malformed);
    }
    let token = &bytes[7..];
    // Checked without an early exit, so that the loop is vectorised (a key is some 60 bytes,
    // checked on every request).
    let graphic = token.iter().fold(true, |ok, b| ok & b.is_ascii_graphic());
    if token.is_empty() || token.len() > keys::MAX_TOKEN_LEN || !graphic {
        return Err(Reason::Malformed);
    }
    std::str::from_utf8(token).map_err(|_| Reason::Malformed)
}
