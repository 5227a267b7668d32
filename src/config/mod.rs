//! Configuration: YAML → `RawConfig` (serde, every field optional) → `Config` (validated, typed).
//!
//! Two stages, so that `tollgate check` can report *every* problem with the path of the field
//! that caused it: serde only reports the first type error, but unknown fields are collected by
//! `serde_ignored` and all semantic checks run in `validate`, which never stops at the first one.
//! Sits before everything else: `serve` and `reload` both go through `Config::from_yaml`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod raw;
#[cfg(test)]
mod tests;
mod units;
mod validate;

use raw::RawConfig;
pub use units::{parse_duration, parse_size};
use validate::Validator;

/// One problem found in a config file: the dotted path of the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem of a rejected config. Never seen by clients: printed by `check`, logged by a
/// failed reload, or printed before any port is bound by `serve`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub source_name: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid config {}:", self.source_name)?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------------------------------------
// Stage 2: the validated config the rest of the program uses.
// ---------------------------------------------------------------------------------------------

/// A validated configuration generation. Cheap to clone; held by `Snapshot`.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub upstream: Upstream,
    pub tls: Option<TlsFiles>,
    pub limits: Limits,
    pub shutdown: Shutdown,
    pub log: Log,
    pub store: Store,
    pub auth: Auth,
    pub rate_limits: RateLimits,
    pub tiers: BTreeMap<String, Tier>,
    pub routes: RouteSpec,
    pub default_scope: Option<String>,
    /// The scopes of a key created without any (§6), normalised.
    pub default_scopes: Vec<String>,
    /// `tiers.X.scopes`: the only scopes keys of tier X may carry (normalised). A tier that is
    /// absent here has no restriction. Kept beside the tiers rather than in `Tier`, which holds
    /// the rate limits alone (and is copied, compared and divided as such by `limits`).
    pub tier_scopes: BTreeMap<String, Vec<String>>,
    pub dashboard: Dashboard,
    /// Peers whose `x-forwarded-for` is believed for the client's address (`client_addr.rs`).
    pub trusted_proxies: crate::net::client_addr::TrustedProxies,
}

/// `dashboard` (§13): the key dashboard on the public listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dashboard {
    pub enabled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `http://host:port`, no path: the request path is appended unchanged.
    pub url: http::Uri,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub api_key_env: Option<String>,
    /// Upstream connections open at once, at most (each carries one request at a time).
    pub max_connections: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_body_bytes: u64,
    pub header_read_timeout: Duration,
    pub stream_idle_timeout: Duration,
    /// Client connections open at once, at most; past it, new ones wait in the listen backlog.
    pub max_connections: usize,
    /// HTTP/2 streams per client connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_concurrent_streams: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shutdown {
    pub drain_delay: Duration,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log {
    pub format: LogFormat,
    pub level: String,
}

/// Where keys and their audit trail live (§11): one SQLite file (the embedded, single-replica
/// default) or a PostgreSQL database shared by every replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Store {
    Sqlite(PathBuf),
    Postgres(Postgres),
}

/// `store.postgres`. The URL (with its password) is never in the file: only the name of the
/// environment variable that holds it, read when the store is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Postgres {
    pub url_env: String,
    pub pool_size: u32,
    /// Bounds every wait for a connection, and so the answer to a request whose key is not
    /// cached while the database is unreachable.
    pub connect_timeout: Duration,
    /// Set on the server (`statement_timeout`) and, with `connect_timeout`, as an outer bound
    /// on every store call here.
    pub statement_timeout: Duration,
}

impl Store {
    /// The configuration key that names this store, for messages.
    pub fn describe(&self) -> String {
        match self {
            Store::Sqlite(path) => format!("store.sqlite ({})", path.display()),
            Store::Postgres(p) => format!("store.postgres (URL from ${})", p.url_env),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    pub key_prefix: String,
    pub workspace: Option<String>,
    pub cache_ttl: Duration,
    pub cache_capacity: u64,
    /// How long a failed verification is remembered (a wrong secret costs Argon2 work once).
    pub negative_cache_ttl: Duration,
    /// How often revocations made elsewhere (CLI, other replicas) are picked up.
    pub revocation_poll: Duration,
    /// How long a revoked key can be restored before it is purged.
    pub revocation_retention: Duration,
    /// How long past `cache_ttl` a verified key stays usable while the store is unreachable.
    pub stale_if_unavailable: Duration,
    pub argon2: crate::keys::HashParams,
    /// Failed authentications allowed per source address: a steady rate and a burst.
    pub failed_auth_per_second: u32,
    pub failed_auth_burst: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitPer {
    Org,
    Key,
}

/// Where rate-limit state lives (§4, §11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitBackend {
    /// In this process: one replica's limits.
    Local,
    /// In Redis, shared by every replica: one limit for the fleet.
    Redis(Redis),
}

/// `rate_limits.redis`. Like `store.postgres`, the URL only ever comes from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redis {
    pub url_env: String,
    pub key_prefix: String,
    /// The longest a decision waits for Redis; then `on_error` decides.
    pub timeout: Duration,
    pub on_error: OnError,
    /// PEM certificates trusted for `rediss://` instead of the public roots (a private CA).
    pub ca_file: Option<PathBuf>,
    /// How long a concurrency slot in Redis outlives its replica: each running request's lease
    /// is renewed every third of it, so a replica that dies gives its slots back after this.
    pub concurrency_lease: Duration,
    /// The debited lease (0: off): a replica takes up to this many requests of an entity's
    /// request limits in one decision and admits them itself within `debit_within`.
    pub debit_requests: u32,
    pub debit_within: Duration,
}

/// What a decision does when Redis fails or is slower than its timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// The tier enforced by this replica, each limit divided by the live replicas last seen.
    Local,
    /// Admitted.
    Open,
    /// 503 `unavailable`.
    Closed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimits {
    pub per: LimitPer,
    pub backend: LimitBackend,
    /// Negotiated limits for one organisation, replacing its keys' tier limits.
    pub org_overrides: BTreeMap<String, Tier>,
    /// Negotiated limits for one key (by id), replacing its tier and organisation limits.
    pub key_overrides: BTreeMap<String, Tier>,
    /// `tiers.X.on_store_error`: a tier's own answer when Redis fails.
    pub tier_on_error: BTreeMap<String, OnError>,
    /// `rate_limits.tokens.inject_stream_usage`: ask the upstream for usage on streams whose
    /// client did not (and hide it from them).
    pub inject_stream_usage: bool,
}

/// One tier. `None` means unlimited in that dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tier {
    pub requests_per_second: Option<u32>,
    /// Defaults to `requests_per_second` (one second's worth) when only the rate is given.
    pub burst: Option<u32>,
    pub daily_requests: Option<u64>,
    /// Tokens (prompt + completion, as the upstream reports them) per minute, refilled
    /// continuously; also the bucket's capacity (§12).
    pub tokens_per_minute: Option<u64>,
    pub daily_tokens: Option<u64>,
    /// Requests in flight at once, streams included, until their body ends.
    pub max_concurrent_requests: Option<u32>,
    /// The output a request without `max_tokens` is assumed to produce, for its reservation.
    pub default_output_tokens: Option<u64>,
}

impl Tier {
    /// Whether requests need a token estimate (and their usage read).
    pub fn counts_tokens(&self) -> bool {
        self.tokens_per_minute.is_some() || self.daily_tokens.is_some()
    }
}

/// Which route table is in force (§3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteSpec {
    /// The built-in OpenAI-compatible table.
    OpenAi,
    /// The read / write / admin REST table.
    Rest,
    /// An explicit list; first match wins.
    List(Vec<RouteRule>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteRule {
    /// `None` matches any method.
    pub method: Option<http::Method>,
    pub path: String,
    /// The scope a key needs; `None` for a public route (`public: true`), which needs no key.
    pub scope: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        // The embedded defaults of SPEC §9. Validating an empty mapping is the single source of
        // truth for them, so `Default` can never drift from what `{}` in a file means.
        match Config::from_yaml("{}", "<embedded defaults>") {
            Ok(c) => c,
            // An empty document has no fields that can be wrong; reaching this is a bug in the
            // defaults below, caught by the `defaults_are_valid` test.
            Err(e) => panic!("embedded defaults are invalid: {e}"),
        }
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: name.clone(),
            problems: vec![Problem { path: String::new(), message: format!("cannot read file: {e}") }],
        })?;
        Config::from_yaml(&text, &name)
    }

    /// Parses and validates YAML text. `source_name` is only used in the error.
    pub fn from_yaml(text: &str, source_name: &str) -> Result<Config, ConfigError> {
        let fail = |problems| ConfigError { source_name: source_name.to_string(), problems };
        // An empty (or comments-only) file is an error, not the embedded defaults: it is what a
        // reload sees when it catches a file being rewritten, or an operator's mistake, and as
        // the defaults it would drop every custom tier and upstream. `{}` asks for the defaults.
        let is_empty = text.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'));
        if is_empty {
            return Err(fail(vec![Problem {
                path: String::new(),
                message: "the file is empty; write `{}` for the embedded defaults, or run without --config"
                    .into(),
            }]));
        }
        let mut unknown = Vec::new();
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let raw: RawConfig = serde_ignored::deserialize(de, |path| {
            // serde_ignored marks `Option` layers with a `?` segment; users never see them.
            let path = path.to_string();
            let path = path.split('.').filter(|s| *s != "?").collect::<Vec<_>>().join(".");
            unknown.push(Problem { path, message: "unknown field".into() })
        })
        .map_err(|e| fail(vec![Problem { path: String::new(), message: e.to_string() }]))?;
        let mut v = Validator { problems: unknown };
        let config = v.config(raw);
        if v.problems.is_empty() {
            Ok(config)
        } else {
            Err(fail(v.problems))
        }
    }
}
