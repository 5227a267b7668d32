//! Stage 2: raw values → the typed `Config`, every problem collected with the path of its field
//! (the validator never stops at the first one).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::raw::*;
use super::units::{parse_duration, parse_size};
use super::*;

pub(super) struct Validator {
    pub(super) problems: Vec<Problem>,
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

    pub(super) fn config(&mut self, raw: RawConfig) -> Config {
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
        let store = self.store(raw.store);
        let auth = self.auth(raw.auth);
        let mut rate_limits = self.rate_limits(raw.rate_limits);
        let mut tier_scopes = BTreeMap::new();
        let tiers = self.tiers(raw.tiers, &mut rate_limits.tier_on_error, &mut tier_scopes);
        // SPEC §6's default: what every key of the built-in route table needs for inference,
        // and what keys had to be given explicitly before `default_scopes` existed.
        let default_scopes = self
            .scopes("default_scopes", raw.default_scopes)
            .unwrap_or_else(|| vec!["inference:read".into(), "inference:write".into()]);
        let dashboard = Dashboard { enabled: raw.dashboard.enabled.unwrap_or(true) };
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
            default_scopes,
            tier_scopes,
            dashboard,
            trusted_proxies: crate::net::client_addr::TrustedProxies(trusted),
        }
    }

    fn store(&mut self, raw: RawStore) -> Store {
        let sqlite = self.nonempty("store.sqlite", raw.sqlite);
        let Some(pg) = raw.postgres else {
            return Store::Sqlite(PathBuf::from(sqlite.unwrap_or_else(|| "./tollgate.db".into())));
        };
        if sqlite.is_some() {
            self.problem("store", "set either `sqlite` or `postgres`, not both");
        }
        let url_env = self.env_name("store.postgres.url_env", pg.url_env, "postgres://");
        let pool_size = self.bounded("store.postgres.pool_size", pg.pool_size, 8, 1000).max(1);
        Store::Postgres(Postgres {
            url_env,
            pool_size: u32::try_from(pool_size).unwrap_or(8),
            connect_timeout: self.positive("store.postgres.connect_timeout", pg.connect_timeout, 2),
            statement_timeout: self.positive("store.postgres.statement_timeout", pg.statement_timeout, 2),
        })
    }

    /// A duration that must be more than 0 (default in milliseconds).
    fn positive_ms(&mut self, path: &str, v: Option<serde_yaml_ng::Value>, default_ms: u64) -> Duration {
        let d = self.duration(path, v, Duration::from_millis(default_ms));
        if d.is_zero() {
            self.problem(path, "must be more than 0");
            return Duration::from_millis(default_ms);
        }
        d
    }

    /// A duration that must be more than 0 (default in seconds).
    fn positive(&mut self, path: &str, v: Option<serde_yaml_ng::Value>, default_secs: u64) -> Duration {
        let d = self.duration(path, v, Duration::from_secs(default_secs));
        if d.is_zero() {
            self.problem(path, "must be more than 0");
            return Duration::from_secs(default_secs);
        }
        d
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
            stale_if_unavailable: self.duration(
                "auth.stale_if_unavailable",
                raw.stale_if_unavailable,
                Duration::from_secs(3600),
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
            None | Some("local") => {
                if raw.redis.is_some() {
                    self.problem("rate_limits.redis", "set only with `backend: redis`");
                }
                LimitBackend::Local
            }
            Some("redis") => LimitBackend::Redis(self.redis(raw.redis.unwrap_or_default())),
            Some(other) => {
                self.problem("rate_limits.backend", format!("expected `local` or `redis`, got `{other}`"));
                LimitBackend::Local
            }
        };
        let org_overrides = self.tier_map("rate_limits.overrides.orgs", raw.overrides.orgs);
        let key_overrides = self.tier_map("rate_limits.overrides.keys", raw.overrides.keys);
        RateLimits {
            per,
            backend,
            org_overrides,
            key_overrides,
            tier_on_error: BTreeMap::new(),
            inject_stream_usage: raw.tokens.inject_stream_usage.unwrap_or(true),
        }
    }

    fn redis(&mut self, raw: RawRedis) -> Redis {
        let url_env = self.env_name("rate_limits.redis.url_env", raw.url_env, "redis://");
        let key_prefix = raw.key_prefix.unwrap_or_else(|| "tollgate:".into());
        if key_prefix.len() > 64
            || key_prefix.bytes().any(|b| !b.is_ascii_graphic() || b == b'{' || b == b'}')
        {
            self.problem(
                "rate_limits.redis.key_prefix",
                "up to 64 visible ASCII characters, no `{` or `}` (tollgate adds the hash tags)",
            );
        }
        let timeout = self.positive_ms("rate_limits.redis.timeout", raw.timeout, 20);
        let on_error =
            self.on_error("rate_limits.redis.on_error", raw.on_error.as_deref()).unwrap_or(OnError::Local);
        let ca_file = self.nonempty("rate_limits.redis.ca_file", raw.ca_file).map(PathBuf::from);
        let concurrency_lease =
            self.positive_ms("rate_limits.redis.concurrency_lease", raw.concurrency_lease, 30_000);
        if concurrency_lease < Duration::from_millis(300) {
            // Renewed every third of it: shorter would be renewals in a busy loop.
            self.problem("rate_limits.redis.concurrency_lease", "must be at least 300ms");
        }
        let debit_requests = match raw.debit_requests {
            Some(serde_yaml_ng::Value::Number(n)) if n.as_u64() == Some(0) => 0,
            v => self
                .count("rate_limits.redis.debit_requests", v, 10_000)
                .map_or(0, |n| u32::try_from(n).unwrap_or(0)),
        };
        let debit_within = self.positive_ms("rate_limits.redis.debit_within", raw.debit_within, 5);
        if debit_within > Duration::from_millis(1000) {
            // What a debit may admit beyond the limits grows with it (README, fleet limits).
            self.problem("rate_limits.redis.debit_within", "must be at most 1s");
        }
        Redis {
            url_env,
            key_prefix,
            timeout,
            on_error,
            ca_file,
            concurrency_lease,
            debit_requests,
            debit_within,
        }
    }

    fn on_error(&mut self, path: &str, v: Option<&str>) -> Option<OnError> {
        match v? {
            "local" => Some(OnError::Local),
            "open" => Some(OnError::Open),
            "closed" => Some(OnError::Closed),
            other => {
                self.problem(path, format!("expected `local`, `open` or `closed`, got `{other}`"));
                None
            }
        }
    }

    /// The name of an environment variable holding a secret URL (never the URL itself).
    fn env_name(&mut self, path: &str, v: Option<String>, scheme: &str) -> String {
        let name = self.nonempty(path, v).unwrap_or_else(|| {
            self.problem(
                path,
                format!("required: the name of the environment variable holding the {scheme} URL (the URL itself never goes in the file)"),
            );
            String::new()
        });
        if !name.is_empty() && !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            self.problem(
                path,
                "must be the name of an environment variable (letters, digits, `_`), not a URL",
            );
        }
        name
    }

    /// A list of scopes (presets expanded), sorted and deduplicated; `None` when absent or bad.
    fn scopes(&mut self, path: &str, v: Option<Vec<String>>) -> Option<Vec<String>> {
        let v = v?;
        match crate::keys::normalize_scopes(v.iter().map(String::as_str)) {
            Ok(s) => Some(s),
            Err(e) => {
                self.problem(path, e);
                None
            }
        }
    }

    /// The tiers, each one's `on_store_error` into `on_error` and `scopes` into `scopes`.
    fn tiers(
        &mut self,
        raw: Option<BTreeMap<String, RawTier>>,
        on_error: &mut BTreeMap<String, OnError>,
        scopes: &mut BTreeMap<String, Vec<String>>,
    ) -> BTreeMap<String, Tier> {
        let Some(mut raw) = raw else { return default_tiers() };
        for (name, t) in &mut raw {
            if let Some(e) =
                self.on_error(&format!("tiers.{name}.on_store_error"), t.on_store_error.take().as_deref())
            {
                on_error.insert(name.clone(), e);
            }
            if let Some(s) = self.scopes(&format!("tiers.{name}.scopes"), t.scopes.take()) {
                scopes.insert(name.clone(), s);
            }
        }
        self.tier_map("tiers", raw)
    }

    /// A map of named limits: the tiers, or the overrides (names are then org names or key ids).
    fn tier_map(&mut self, at: &str, raw: BTreeMap<String, RawTier>) -> BTreeMap<String, Tier> {
        let mut tiers = BTreeMap::new();
        for (name, t) in raw {
            let base = format!("{at}.{name}");
            if t.on_store_error.is_some() {
                self.problem(&format!("{base}.on_store_error"), "set on tiers only");
            }
            if t.scopes.is_some() {
                self.problem(&format!("{base}.scopes"), "set on tiers only");
            }
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
            let tpm = self.count(&format!("{base}.tokens_per_minute"), t.tokens_per_minute, 1 << 50);
            let daily_tokens = self.count(&format!("{base}.daily_tokens"), t.daily_tokens, 1 << 50);
            let concurrent =
                self.count(&format!("{base}.max_concurrent_requests"), t.max_concurrent_requests, 1_000_000);
            let output =
                self.count(&format!("{base}.default_output_tokens"), t.default_output_tokens, 10_000_000);
            let as_u32 = |x: u64| u32::try_from(x).unwrap_or(u32::MAX);
            tiers.insert(
                name,
                Tier {
                    requests_per_second: rps.map(as_u32),
                    burst: burst.or(rps).map(as_u32),
                    daily_requests: daily,
                    tokens_per_minute: tpm,
                    daily_tokens,
                    max_concurrent_requests: concurrent.map(as_u32),
                    default_output_tokens: output,
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
        ..Tier::default()
    };
    BTreeMap::from([
        ("audit".to_string(), tier(50, 200, Some(100_000))),
        ("audit-plus".to_string(), tier(200, 800, Some(400_000))),
        ("enterprise".to_string(), tier(1000, 4000, None)),
    ])
}

/// A YAML value as the user wrote it, for messages.
fn show(v: &serde_yaml_ng::Value) -> String {
    match serde_yaml_ng::to_string(v) {
        Ok(s) => format!("`{}`", s.trim_end()),
        Err(_) => "an unsupported value".into(),
    }
}
