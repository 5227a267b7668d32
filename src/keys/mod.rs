//! API keys (§2, §6): the token format (`token.rs`), Argon2id (`hash.rs`), the stored record
//! and scopes (`record.rs`), the lifecycle shared by the CLI and the HTTP API
//! (`lifecycle.rs`), and that API (`api.rs`).

pub mod api;
mod hash;
pub mod lifecycle;
pub mod record;
mod token;

pub use hash::{verify, verify_with, HashParams, Verified};
pub use record::{expand_scope, normalize_scopes, AuditEvent, KeyRecord};
pub use token::{
    assemble, looks_like_key, parse, Malformed, NewKey, Parsed, Token, CHECKSUM_LEN, ID_LEN, MAX_TOKEN_LEN,
    SECRET_LEN,
};
