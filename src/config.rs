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

use serde::Deserialize;

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
// Stage 1: the raw shape of the file. Durations and sizes are kept as YAML values so that a bad
// one is reported by `validate` together with all other problems instead of aborting serde.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawConfig {
    listen: Option<String>,
    admin_listen: Option<String>,
    upstream: RawUpstream,
    tls: Option<RawTls>,
    limits: RawLimits,
    shutdown: RawShutdown,
    log: RawLog,
    store: RawStore,
    auth: RawAuth,
    rate_limits: RawRateLimits,
    tiers: Option<BTreeMap<String, RawTier>>,
    routes: Option<serde_yaml_ng::Value>,
    default_scope: Option<String>,
    trusted_proxies: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawUpstream {
    url: Option<String>,
    connect_timeout: Option<serde_yaml_ng::Value>,
    timeout: Option<serde_yaml_ng::Value>,
    api_key_env: Option<String>,
    max_connections: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Deserialize)]
struct RawTls {
    cert: Option<String>,
    key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawLimits {
    max_header_bytes: Option<serde_yaml_ng::Value>,
    max_body_bytes: Option<serde_yaml_ng::Value>,
    header_read_timeout: Option<serde_yaml_ng::Value>,
    stream_idle_timeout: Option<serde_yaml_ng::Value>,
    max_connections: Option<serde_yaml_ng::Value>,
    max_concurrent_streams: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawShutdown {
    drain_delay: Option<serde_yaml_ng::Value>,
    timeout: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawLog {
    format: Option<String>,
    level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawStore {
    sqlite: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawAuth {
    key_prefix: Option<String>,
    workspace: Option<String>,
    cache_ttl: Option<serde_yaml_ng::Value>,
    cache_capacity: Option<serde_yaml_ng::Value>,
    negative_cache_ttl: Option<serde_yaml_ng::Value>,
    revocation_poll: Option<serde_yaml_ng::Value>,
    revocation_retention: Option<serde_yaml_ng::Value>,
    argon2: RawArgon2,
    failed_auth: RawFailedAuth,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawArgon2 {
    memory_kib: Option<serde_yaml_ng::Value>,
    iterations: Option<serde_yaml_ng::Value>,
    parallelism: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawFailedAuth {
    per_second: Option<serde_yaml_ng::Value>,
    burst: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawRateLimits {
    per: Option<String>,
    backend: Option<String>,
    overrides: RawOverrides,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawOverrides {
    orgs: BTreeMap<String, RawTier>,
    keys: BTreeMap<String, RawTier>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawTier {
    requests_per_second: Option<serde_yaml_ng::Value>,
    burst: Option<serde_yaml_ng::Value>,
    daily_requests: Option<serde_yaml_ng::Value>,
}

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
    /// Peers whose `x-forwarded-for` is believed for the client's address (`client_addr.rs`).
    pub trusted_proxies: crate::net::client_addr::TrustedProxies,
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Store {
    pub sqlite: PathBuf,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitBackend {
    Local,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimits {
    pub per: LimitPer,
    pub backend: LimitBackend,
    /// Negotiated limits for one organisation, replacing its keys' tier limits.
    pub org_overrides: BTreeMap<String, Tier>,
    /// Negotiated limits for one key (by id), replacing its tier and organisation limits.
    pub key_overrides: BTreeMap<String, Tier>,
}

/// One tier. `None` means unlimited in that dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tier {
    pub requests_per_second: Option<u32>,
    /// Defaults to `requests_per_second` (one second's worth) when only the rate is given.
    pub burst: Option<u32>,
    pub daily_requests: Option<u64>,
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

struct Validator {
    problems: Vec<Problem>,
}

impl Validator {
    fn problem(&mut self, path: &str, message: impl Into<String>) {
        self.problems.push(Problem { path: path.to_string(), message: message.into() });
    }

    fn duration(&mut self, path: &str, v: Option<serde_yaml_ng::Value>, default: Duration) -> Duration {
        match v {
            None | Some(serde_yaml_ng::Value::Null) => default,
            Some(serde_yaml_ng::Value::String(s)) => match parse_duration(&s) {
                Ok(d) => d,
                Err(e) => {
                    self.problem(path, e);
                    default
                }
            },
            Some(other) => {
                self.problem(
                    path,
                    format!("expected a duration such as `500ms`, `2s`, `5m` or `90d`, got {}", show(&other)),
                );
                default
            }
        }
    }

    fn size(&mut self, path: &str, v: Option<serde_yaml_ng::Value>, default: u64) -> u64 {
        match v {
            None | Some(serde_yaml_ng::Value::Null) => default,
            Some(serde_yaml_ng::Value::Number(n)) if n.as_u64().is_some() => n.as_u64().unwrap_or(default),
            Some(serde_yaml_ng::Value::String(s)) => match parse_size(&s) {
                Ok(n) => n,
                Err(e) => {
                    self.problem(path, e);
                    default
                }
            },
            Some(other) => {
                self.problem(
                    path,
                    format!("expected a size such as `16KiB` or `10MiB`, got {}", show(&other)),
                );
                default
            }
        }
    }

    /// A positive integer no larger than `max`, or `default` when absent.
    fn bounded(&mut self, path: &str, v: Option<serde_yaml_ng::Value>, default: usize, max: u64) -> usize {
        if matches!(&v, Some(serde_yaml_ng::Value::Number(n)) if n.as_u64() == Some(0)) {
            self.problem(
                path,
                format!("must be from 1 to {max} (omit the field for the default, {default})"),
            );
            return default;
        }
        self.count(path, v, max).map_or(default, |n| usize::try_from(n).unwrap_or(default))
    }

    /// A positive integer no larger than `max`, or `None` when absent.
    fn count(&mut self, path: &str, v: Option<serde_yaml_ng::Value>, max: u64) -> Option<u64> {
        match v {
            None | Some(serde_yaml_ng::Value::Null) => None,
            Some(serde_yaml_ng::Value::Number(n)) => match n.as_u64() {
                Some(0) => {
                    self.problem(path, "must be at least 1 (omit the field for unlimited)");
                    None
                }
                Some(x) if x <= max => Some(x),
                _ => {
                    self.problem(path, format!("expected a whole number from 1 to {max}, got {n}"));
                    None
                }
            },
            Some(other) => {
                self.problem(path, format!("expected a whole number, got {}", show(&other)));
                None
            }
        }
    }

    fn addr(&mut self, path: &str, v: Option<String>, default: &str) -> SocketAddr {
        let fallback = || SocketAddr::from(([0, 0, 0, 0], 0));
        let s = v.unwrap_or_else(|| default.to_string());
        match s.parse() {
            Ok(a) => a,
            Err(_) => {
                self.problem(path, format!("expected an address such as `0.0.0.0:8080`, got `{s}`"));
                default.parse().unwrap_or_else(|_| fallback())
            }
        }
    }

    fn nonempty(&mut self, path: &str, v: Option<String>) -> Option<String> {
        match v {
            Some(s) if s.trim().is_empty() => {
                self.problem(path, "must not be empty");
                None
            }
            other => other,
        }
    }

    fn config(&mut self, raw: RawConfig) -> Config {
        let listen = self.addr("listen", raw.listen, "0.0.0.0:8080");
        let admin_listen = self.addr("admin_listen", raw.admin_listen, "0.0.0.0:9090");
        if listen == admin_listen && listen.port() != 0 {
            self.problem("admin_listen", "must differ from `listen`");
        }
        let upstream = self.upstream(raw.upstream);
        let tls = raw.tls.map(|t| {
            let cert = self.nonempty("tls.cert", t.cert);
            let key = self.nonempty("tls.key", t.key);
            if cert.is_none() {
                self.problem("tls.cert", "required when `tls` is set (a PEM certificate chain file)");
            }
            if key.is_none() {
                self.problem("tls.key", "required when `tls` is set (a PEM private key file)");
            }
            TlsFiles {
                cert: PathBuf::from(cert.unwrap_or_default()),
                key: PathBuf::from(key.unwrap_or_default()),
            }
        });
        let limits = self.limits(raw.limits);
        let shutdown = Shutdown {
            drain_delay: self.duration(
                "shutdown.drain_delay",
                raw.shutdown.drain_delay,
                Duration::from_secs(5),
            ),
            timeout: self.duration("shutdown.timeout", raw.shutdown.timeout, Duration::from_secs(60)),
        };
        let log = self.log(raw.log);
        let store = Store {
            sqlite: PathBuf::from(
                self.nonempty("store.sqlite", raw.store.sqlite).unwrap_or_else(|| "./tollgate.db".into()),
            ),
        };
        let auth = self.auth(raw.auth);
        let rate_limits = self.rate_limits(raw.rate_limits);
        let tiers = self.tiers(raw.tiers);
        let routes = self.routes(raw.routes);
        let default_scope = self.nonempty("default_scope", raw.default_scope);
        let mut trusted = Vec::new();
        for (i, s) in raw.trusted_proxies.unwrap_or_default().iter().enumerate() {
            match s.parse() {
                Ok(c) => trusted.push(c),
                Err(e) => self.problem(&format!("trusted_proxies[{i}]"), e),
            }
        }
        Config {
            listen,
            admin_listen,
            upstream,
            tls,
            limits,
            shutdown,
            log,
            store,
            auth,
            rate_limits,
            tiers,
            routes,
            default_scope,
            trusted_proxies: crate::net::client_addr::TrustedProxies(trusted),
        }
    }

    fn upstream(&mut self, raw: RawUpstream) -> Upstream {
        let default_url = http::Uri::from_static("http://127.0.0.1:8000");
        let url = match raw.url {
            None => default_url,
            Some(s) => match s.parse::<http::Uri>() {
                Ok(u) if u.scheme_str() != Some("http") => {
                    self.problem("upstream.url", format!("only `http://` upstreams are supported (the model server is in the same pod), got `{s}`"));
                    default_url
                }
                Ok(u) if u.authority().is_none() => {
                    self.problem("upstream.url", format!("expected `http://host:port`, got `{s}`"));
                    default_url
                }
                Ok(u) if !matches!(u.path(), "" | "/") || u.query().is_some() => {
                    self.problem("upstream.url", format!("must not have a path or query (request paths are forwarded unchanged), got `{s}`"));
                    default_url
                }
                Ok(u) => u,
                Err(e) => {
                    self.problem("upstream.url", format!("not a URL (`{s}`): {e}"));
                    default_url
                }
            },
        };
        let api_key_env = self.nonempty("upstream.api_key_env", raw.api_key_env);
        Upstream {
            url,
            connect_timeout: self.duration(
                "upstream.connect_timeout",
                raw.connect_timeout,
                Duration::from_secs(2),
            ),
            timeout: self.duration("upstream.timeout", raw.timeout, Duration::from_secs(600)),
            api_key_env,
            max_connections: self.bounded("upstream.max_connections", raw.max_connections, 512, 100_000),
        }
    }

    fn limits(&mut self, raw: RawLimits) -> Limits {
        let max_header_bytes = self.size("limits.max_header_bytes", raw.max_header_bytes, 16 * 1024);
        if !(1024..=1024 * 1024).contains(&max_header_bytes) {
            self.problem("limits.max_header_bytes", "must be between 1KiB and 1MiB");
        }
        Limits {
            max_header_bytes: usize::try_from(max_header_bytes.clamp(1024, 1024 * 1024)).unwrap_or(16 * 1024),
            max_body_bytes: self.size("limits.max_body_bytes", raw.max_body_bytes, 10 * 1024 * 1024),
            header_read_timeout: self.duration(
                "limits.header_read_timeout",
                raw.header_read_timeout,
                Duration::from_secs(10),
            ),
            stream_idle_timeout: self.duration(
                "limits.stream_idle_timeout",
                raw.stream_idle_timeout,
                Duration::from_secs(300),
            ),
            // About 20 KB each was measured: 4,096 fit the chart's 256 MiB limit beside the key
            // cache and the Argon2id buffers.
            max_connections: self.bounded("limits.max_connections", raw.max_connections, 4096, 1_000_000),
            max_concurrent_streams: u32::try_from(self.bounded(
                "limits.max_concurrent_streams",
                raw.max_concurrent_streams,
                100,
                10_000,
            ))
            .unwrap_or(100),
        }
    }

    fn log(&mut self, raw: RawLog) -> Log {
        let format = match raw.format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                self.problem("log.format", format!("expected `text` or `json`, got `{other}`"));
                LogFormat::Text
            }
        };
        let level = raw.level.unwrap_or_else(|| "info".into());
        if tracing_subscriber::EnvFilter::builder().parse(&level).is_err() {
            self.problem("log.level", format!("expected a level (`error`, `warn`, `info`, `debug`, `trace`) or a filter such as `info,tollgate=debug`, got `{level}`"));
        }
        Log { format, level }
    }

    fn auth(&mut self, raw: RawAuth) -> Auth {
        let key_prefix = raw.key_prefix.unwrap_or_else(|| "tg".into());
        if key_prefix.is_empty()
            || key_prefix.len() > 16
            || !key_prefix.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            self.problem(
                "auth.key_prefix",
                format!("expected 1 to 16 ASCII letters or digits, got `{key_prefix}`"),
            );
        }
        let cache_capacity =
            self.count("auth.cache_capacity", raw.cache_capacity, 100_000_000).unwrap_or(100_000);
        let d = crate::keys::HashParams::default();
        let mut param = |name: &str, v, default: u32, max: u64| {
            self.count(&format!("auth.argon2.{name}"), v, max)
                .map_or(default, |x| u32::try_from(x).unwrap_or(default))
        };
        let argon2 = crate::keys::HashParams {
            memory_kib: param("memory_kib", raw.argon2.memory_kib, d.memory_kib, 256 * 1024),
            iterations: param("iterations", raw.argon2.iterations, d.iterations, 16),
            parallelism: param("parallelism", raw.argon2.parallelism, d.parallelism, 8),
        };
        if argon2.memory_kib < 8 * argon2.parallelism {
            self.problem("auth.argon2.memory_kib", "must be at least 8 × parallelism");
        }
        let per_second = self.count("auth.failed_auth.per_second", raw.failed_auth.per_second, 1_000_000);
        let burst = self.count("auth.failed_auth.burst", raw.failed_auth.burst, 1_000_000);
        let cache_ttl = self.duration("auth.cache_ttl", raw.cache_ttl, Duration::from_secs(300));
        let negative_cache_ttl =
            self.duration("auth.negative_cache_ttl", raw.negative_cache_ttl, Duration::from_secs(10));
        let revocation_poll =
            self.duration("auth.revocation_poll", raw.revocation_poll, Duration::from_secs(1));
        if revocation_poll.is_zero() {
            self.problem("auth.revocation_poll", "must be more than 0");
        }
        Auth {
            key_prefix,
            workspace: self.nonempty("auth.workspace", raw.workspace),
            cache_ttl,
            cache_capacity,
            negative_cache_ttl,
            revocation_poll: revocation_poll.max(Duration::from_millis(10)),
            revocation_retention: self.duration(
                "auth.revocation_retention",
                raw.revocation_retention,
                Duration::from_secs(90 * 86_400),
            ),
            argon2,
            failed_auth_per_second: per_second.map_or(1, |x| u32::try_from(x).unwrap_or(1)),
            failed_auth_burst: burst.map_or(20, |x| u32::try_from(x).unwrap_or(20)),
        }
    }

    fn rate_limits(&mut self, raw: RawRateLimits) -> RateLimits {
        let per = match raw.per.as_deref() {
            None | Some("org") => LimitPer::Org,
            Some("key") => LimitPer::Key,
            Some(other) => {
                self.problem("rate_limits.per", format!("expected `org` or `key`, got `{other}`"));
                LimitPer::Org
            }
        };
        let backend = match raw.backend.as_deref() {
            None | Some("local") => LimitBackend::Local,
            Some(other) => {
                self.problem(
                    "rate_limits.backend",
                    format!("expected `local` (the only backend in this version), got `{other}`"),
                );
                LimitBackend::Local
            }
        };
        let org_overrides = self.tier_map("rate_limits.overrides.orgs", raw.overrides.orgs);
        let key_overrides = self.tier_map("rate_limits.overrides.keys", raw.overrides.keys);
        RateLimits { per, backend, org_overrides, key_overrides }
    }

    fn tiers(&mut self, raw: Option<BTreeMap<String, RawTier>>) -> BTreeMap<String, Tier> {
        match raw {
            None => default_tiers(),
            Some(raw) => self.tier_map("tiers", raw),
        }
    }

    /// A map of named limits: the tiers, or the overrides (names are then org names or key ids).
    fn tier_map(&mut self, at: &str, raw: BTreeMap<String, RawTier>) -> BTreeMap<String, Tier> {
        let mut tiers = BTreeMap::new();
        for (name, t) in raw {
            let base = format!("{at}.{name}");
            let ok = |b: u8| b.is_ascii_alphanumeric() || b"-_.:@".contains(&b);
            if name.is_empty() || name.len() > 64 || !name.bytes().all(ok) {
                self.problem(&base, "names use 1 to 64 ASCII letters, digits or `-_.:@`");
            }
            let rps = self.count(
                &format!("{base}.requests_per_second"),
                t.requests_per_second,
                u64::from(u32::MAX),
            );
            let burst = self.count(&format!("{base}.burst"), t.burst, u64::from(u32::MAX));
            let daily = self.count(&format!("{base}.daily_requests"), t.daily_requests, u64::MAX);
            if burst.is_some() && rps.is_none() {
                self.problem(&format!("{base}.burst"), "a burst needs `requests_per_second`");
            }
            let as_u32 = |x: u64| u32::try_from(x).unwrap_or(u32::MAX);
            tiers.insert(
                name,
                Tier {
                    requests_per_second: rps.map(as_u32),
                    burst: burst.or(rps).map(as_u32),
                    daily_requests: daily,
                },
            );
        }
        tiers
    }

    fn routes(&mut self, raw: Option<serde_yaml_ng::Value>) -> RouteSpec {
        use serde_yaml_ng::Value;
        match raw {
            None | Some(Value::Null) => RouteSpec::OpenAi,
            Some(Value::String(s)) if s == "rest" => RouteSpec::Rest,
            Some(Value::String(s)) if s == "openai" => RouteSpec::OpenAi,
            Some(Value::Sequence(items)) => {
                let mut rules = Vec::new();
                for (i, item) in items.into_iter().enumerate() {
                    let base = format!("routes[{i}]");
                    match serde_yaml_ng::from_value::<RawRoute>(item) {
                        Ok(r) => {
                            if let Some(rule) = self.route(&base, r) {
                                rules.push(rule);
                            }
                        }
                        Err(e) => {
                            self.problem(&base, format!("expected `{{ method, path, scope | public }}`: {e}"))
                        }
                    }
                }
                if rules.is_empty() && self.problems.iter().all(|p| !p.path.starts_with("routes")) {
                    self.problem("routes", "an explicit route list must not be empty");
                }
                RouteSpec::List(rules)
            }
            Some(other) => {
                self.problem(
                    "routes",
                    format!("expected null, `rest`, `openai` or a list of routes, got {}", show(&other)),
                );
                RouteSpec::OpenAi
            }
        }
    }

    fn route(&mut self, base: &str, r: RawRoute) -> Option<RouteRule> {
        let before = self.problems.len();
        let method = match r.method.as_deref() {
            None | Some("*") | Some("ANY") | Some("any") => None,
            Some(m) => match http::Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
                Ok(m) => Some(m),
                Err(_) => {
                    self.problem(&format!("{base}.method"), format!("not an HTTP method: `{m}`"));
                    None
                }
            },
        };
        if let Err(e) = check_pattern(&r.path) {
            self.problem(&format!("{base}.path"), e);
        }
        let scope = match (r.scope, r.public) {
            (Some(s), false) if s.trim().is_empty() => {
                self.problem(&format!("{base}.scope"), "must not be empty");
                None
            }
            (Some(s), false) => Some(s),
            (None, true) => None,
            (Some(_), true) => {
                self.problem(
                    &format!("{base}.public"),
                    "a public route needs no key, so it takes no `scope`",
                );
                None
            }
            (None, false) => {
                self.problem(
                    &format!("{base}.scope"),
                    "required (or `public: true` for a route that needs no key)",
                );
                None
            }
        };
        (self.problems.len() == before).then_some(RouteRule { method, path: r.path, scope })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    method: Option<String>,
    path: String,
    scope: Option<String>,
    #[serde(default)]
    public: bool,
}

/// A route pattern is an absolute path, optionally ending in `/*` (one or more further segments).
fn check_pattern(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!("must start with `/`, got `{p}`"));
    }
    let body = p.strip_suffix("/*").unwrap_or(p);
    if body.contains('*') {
        return Err(format!("`*` is only allowed as a final `/*` segment, got `{p}`"));
    }
    if body.len() > 1 && body.split('/').skip(1).any(|s| s.is_empty() || s == "." || s == "..") {
        return Err(format!("must not contain empty, `.` or `..` segments, got `{p}`"));
    }
    Ok(())
}

fn default_tiers() -> BTreeMap<String, Tier> {
    let tier = |rps, burst, daily| Tier {
        requests_per_second: Some(rps),
        burst: Some(burst),
        daily_requests: daily,
    };
    BTreeMap::from([
        ("audit".to_string(), tier(50, 200, Some(100_000))),
        ("audit-plus".to_string(), tier(200, 800, Some(400_000))),
        ("enterprise".to_string(), tier(1000, 4000, None)),
    ])
}

fn show(v: &serde_yaml_ng::Value) -> String {
    match serde_yaml_ng::to_string(v) {
        Ok(s) => format!("`{}`", s.trim_end()),
        Err(_) => "an unsupported value".into(),
    }
}

/// Parses `500ms`, `2s`, `5m`, `1h`, `90d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("expected a duration such as `500ms`, `2s`, `5m` or `90d`, got `{s}`");
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| err())?;
    let secs = |k: u64| n.checked_mul(k).map(Duration::from_secs).ok_or_else(err);
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86_400),
        _ => Err(err()),
    }
}

/// Parses `512`, `512B`, `16KiB`, `10MiB`, `1GiB` (and the decimal `KB`, `MB`, `GB`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let err = || format!("expected a size such as `16KiB` or `10MiB`, got `{s}`");
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| err())?;
    let k: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(err()),
    };
    n.checked_mul(k).ok_or_else(err)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_is_an_error_not_the_defaults() {
        for text in ["", "\n  \n", "# only a comment\n"] {
            let e = Config::from_yaml(text, "t").unwrap_err();
            assert!(e.to_string().contains("the file is empty"), "{text:?}: {e}");
        }
    }

    #[test]
    fn defaults_are_valid_and_match_the_contract() {
        let c = Config::from_yaml("{}", "t").unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.admin_listen.to_string(), "0.0.0.0:9090");
        assert_eq!(c.upstream.url.to_string(), "http://127.0.0.1:8000/");
        assert_eq!(c.upstream.connect_timeout, Duration::from_secs(2));
        assert_eq!(c.upstream.timeout, Duration::from_secs(600));
        assert_eq!(c.limits.max_header_bytes, 16 * 1024);
        assert_eq!(c.limits.max_body_bytes, 10 * 1024 * 1024);
        assert_eq!(c.shutdown.drain_delay, Duration::from_secs(5));
        assert_eq!(c.store.sqlite, PathBuf::from("./tollgate.db"));
        assert_eq!(c.auth.key_prefix, "tg");
        assert_eq!(c.auth.cache_capacity, 100_000);
        assert_eq!(c.routes, RouteSpec::OpenAi);
        assert_eq!(c.tiers["audit"].requests_per_second, Some(50));
        assert_eq!(c.tiers["audit"].burst, Some(200));
        assert_eq!(c.tiers["audit"].daily_requests, Some(100_000));
        assert_eq!(c.tiers["audit-plus"].burst, Some(800));
        assert_eq!(c.tiers["enterprise"].daily_requests, None);
        assert_eq!(Config::default(), c);
    }

    #[test]
    fn overrides_are_validated_like_tiers() {
        let c = Config::from_yaml(
            "rate_limits:\n  overrides:\n    orgs: { acme: { requests_per_second: 500, burst: 2000 } }\n    keys: { abc: { daily_requests: 10 } }\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.rate_limits.org_overrides["acme"].burst, Some(2000));
        assert_eq!(c.rate_limits.key_overrides["abc"].daily_requests, Some(10));
        let e = Config::from_yaml("rate_limits: { overrides: { orgs: { acme: { burst: 5 } } } }\n", "t")
            .unwrap_err();
        assert_eq!(e.problems[0].path, "rate_limits.overrides.orgs.acme.burst");
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let yaml = "
listen: nowhere
upstream:
  url: https://x
  timeout: 10 parsecs
  bogus: 1
limits:
  max_body_bytes: lots
tiers:
  gold: { requests_per_second: 0, burst: 5, extra: true }
log: { format: xml }
";
        let e = Config::from_yaml(yaml, "t.yaml").unwrap_err();
        let paths: Vec<&str> = e.problems.iter().map(|p| p.path.as_str()).collect();
        for want in [
            "listen",
            "upstream.url",
            "upstream.timeout",
            "upstream.bogus",
            "limits.max_body_bytes",
            "tiers.gold.requests_per_second",
            "tiers.gold.burst",
            "tiers.gold.extra",
            "log.format",
        ] {
            assert!(paths.contains(&want), "missing {want} in {paths:?}");
        }
        assert_eq!(paths.len(), 9, "{e}");
    }

    #[test]
    fn a_given_tiers_map_replaces_the_defaults() {
        let c = Config::from_yaml("tiers:\n  free: { requests_per_second: 2 }\n", "t").unwrap();
        assert_eq!(c.tiers.len(), 1);
        assert_eq!(
            c.tiers["free"],
            Tier { requests_per_second: Some(2), burst: Some(2), daily_requests: None }
        );
    }

    #[test]
    fn routes_forms() {
        let c = Config::from_yaml("routes: rest\n", "t").unwrap();
        assert_eq!(c.routes, RouteSpec::Rest);
        let c = Config::from_yaml(
            "routes:\n  - { method: post, path: /v1/x, scope: w }\n  - { path: \"/v1/y/*\", scope: r }\n",
            "t",
        )
        .unwrap();
        let RouteSpec::List(rules) = c.routes else { panic!("expected a list") };
        assert_eq!(rules[0].method, Some(http::Method::POST));
        assert_eq!(rules[1].method, None);
        let e = Config::from_yaml("routes:\n  - { path: \"/v1/*/x\", scope: r }\n", "t").unwrap_err();
        assert_eq!(e.problems[0].path, "routes[0].path");

        // Public routes: `public: true` instead of a scope, never both, never neither.
        let c =
            Config::from_yaml("routes:\n  - { method: GET, path: /health, public: true }\n", "t").unwrap();
        let RouteSpec::List(rules) = c.routes else { panic!("expected a list") };
        assert_eq!(rules[0].scope, None);
        let e = Config::from_yaml(
            "routes:\n  - { path: /a, scope: r, public: true }\n  - { path: /b }\n  - { path: /c, public: false }\n",
            "t",
        )
        .unwrap_err();
        let paths: Vec<&str> = e.problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["routes[0].public", "routes[1].scope", "routes[2].scope"]);
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("90d").unwrap(), Duration::from_secs(90 * 86_400));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("-5s").is_err());
        assert!(parse_duration("5 s").is_err());
        assert_eq!(parse_size("16KiB").unwrap(), 16_384);
        assert_eq!(parse_size("10MiB").unwrap(), 10 << 20);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert!(parse_size("1TiB").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }

    #[test]
    fn type_errors_name_their_field() {
        let e = Config::from_yaml("upstream: { url: [1, 2] }\n", "t").unwrap_err();
        assert!(e.problems[0].message.contains("upstream.url"), "{e}");
    }
}
