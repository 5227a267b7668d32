//! Stage 1: the raw shape of the file (serde, every field optional). Durations and sizes are
//! kept as YAML values so that a bad one is reported by `validate` together with all other
//! problems instead of aborting serde.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawConfig {
    pub(super) listen: Option<String>,
    pub(super) admin_listen: Option<String>,
    pub(super) upstream: RawUpstream,
    pub(super) tls: Option<RawTls>,
    pub(super) limits: RawLimits,
    pub(super) shutdown: RawShutdown,
    pub(super) log: RawLog,
    pub(super) store: RawStore,
    pub(super) auth: RawAuth,
    pub(super) rate_limits: RawRateLimits,
    pub(super) tiers: Option<BTreeMap<String, RawTier>>,
    pub(super) routes: Option<serde_yaml_ng::Value>,
    pub(super) default_scope: Option<String>,
    pub(super) default_scopes: Option<Vec<String>>,
    pub(super) trusted_proxies: Option<Vec<String>>,
    pub(super) dashboard: RawDashboard,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawDashboard {
    pub(super) enabled: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawUpstream {
    pub(super) url: Option<String>,
    pub(super) connect_timeout: Option<serde_yaml_ng::Value>,
    pub(super) timeout: Option<serde_yaml_ng::Value>,
    pub(super) api_key_env: Option<String>,
    pub(super) max_connections: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Deserialize)]
pub(super) struct RawTls {
    pub(super) cert: Option<String>,
    pub(super) key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawLimits {
    pub(super) max_header_bytes: Option<serde_yaml_ng::Value>,
    pub(super) max_body_bytes: Option<serde_yaml_ng::Value>,
    pub(super) header_read_timeout: Option<serde_yaml_ng::Value>,
    pub(super) stream_idle_timeout: Option<serde_yaml_ng::Value>,
    pub(super) max_connections: Option<serde_yaml_ng::Value>,
    pub(super) max_concurrent_streams: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawShutdown {
    pub(super) drain_delay: Option<serde_yaml_ng::Value>,
    pub(super) timeout: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawLog {
    pub(super) format: Option<String>,
    pub(super) level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawStore {
    pub(super) sqlite: Option<String>,
    pub(super) postgres: Option<RawPostgres>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawPostgres {
    pub(super) url_env: Option<String>,
    pub(super) pool_size: Option<serde_yaml_ng::Value>,
    pub(super) connect_timeout: Option<serde_yaml_ng::Value>,
    pub(super) statement_timeout: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawAuth {
    pub(super) key_prefix: Option<String>,
    pub(super) workspace: Option<String>,
    pub(super) cache_ttl: Option<serde_yaml_ng::Value>,
    pub(super) cache_capacity: Option<serde_yaml_ng::Value>,
    pub(super) negative_cache_ttl: Option<serde_yaml_ng::Value>,
    pub(super) revocation_poll: Option<serde_yaml_ng::Value>,
    pub(super) revocation_retention: Option<serde_yaml_ng::Value>,
    pub(super) stale_if_unavailable: Option<serde_yaml_ng::Value>,
    pub(super) argon2: RawArgon2,
    pub(super) failed_auth: RawFailedAuth,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawArgon2 {
    pub(super) memory_kib: Option<serde_yaml_ng::Value>,
    pub(super) iterations: Option<serde_yaml_ng::Value>,
    pub(super) parallelism: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawFailedAuth {
    pub(super) per_second: Option<serde_yaml_ng::Value>,
    pub(super) burst: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawRateLimits {
    pub(super) per: Option<String>,
    pub(super) backend: Option<String>,
    pub(super) redis: Option<RawRedis>,
    pub(super) overrides: RawOverrides,
    pub(super) tokens: RawTokens,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawTokens {
    pub(super) inject_stream_usage: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawRedis {
    pub(super) url_env: Option<String>,
    pub(super) key_prefix: Option<String>,
    pub(super) timeout: Option<serde_yaml_ng::Value>,
    pub(super) on_error: Option<String>,
    pub(super) ca_file: Option<String>,
    pub(super) concurrency_lease: Option<serde_yaml_ng::Value>,
    pub(super) debit_requests: Option<serde_yaml_ng::Value>,
    pub(super) debit_within: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawOverrides {
    pub(super) orgs: BTreeMap<String, RawTier>,
    pub(super) keys: BTreeMap<String, RawTier>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawTier {
    pub(super) requests_per_second: Option<serde_yaml_ng::Value>,
    pub(super) burst: Option<serde_yaml_ng::Value>,
    pub(super) daily_requests: Option<serde_yaml_ng::Value>,
    pub(super) tokens_per_minute: Option<serde_yaml_ng::Value>,
    pub(super) daily_tokens: Option<serde_yaml_ng::Value>,
    pub(super) max_concurrent_requests: Option<serde_yaml_ng::Value>,
    pub(super) default_output_tokens: Option<serde_yaml_ng::Value>,
    pub(super) on_store_error: Option<String>,
    /// Tiers only: the scopes its keys may carry (into `Config::tier_scopes`, not `Tier`).
    pub(super) scopes: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub(super) method: Option<String>,
    pub(super) path: String,
    pub(super) scope: Option<String>,
    #[serde(default)]
    pub(super) public: bool,
}
