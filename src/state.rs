//! `State` lives as long as the process (metrics, readiness, the current snapshot); `Snapshot`
//! is one config generation with everything derived from it (route table, upstream target,
//! client). A reload builds a whole new `Snapshot` and swaps it in one atomic store: a request
//! sees one generation from start to end, and readers never lock.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::HeaderValue;

use crate::auth::Authenticator;
use crate::config::{Config, ConfigError, Problem};
use crate::limits::Limiter;
use crate::metrics::Metrics;
use crate::proxy::routes::RouteTable;
use crate::upstream;

/// One config generation, immutable once built.
pub struct Snapshot {
    pub config: Config,
    /// Rate-limit state; unchanged tiers keep theirs across reloads.
    pub limiter: Arc<Limiter>,
    pub routes: RouteTable,
    pub upstream: upstream::Upstream,
    pub client: upstream::Client,
}

impl Snapshot {
    /// Derives everything a request needs from a validated config. The upstream client (and so
    /// its pool of warm connections) is kept from `previous` unless the upstream changed.
    pub fn build(config: Config, previous: Option<&Snapshot>) -> Result<Snapshot, ConfigError> {
        let authorization = match &config.upstream.api_key_env {
            None => None,
            Some(var) => {
                let problem = |message: String| ConfigError {
                    source_name: "environment".into(),
                    problems: vec![Problem { path: "upstream.api_key_env".into(), message }],
                };
                let key = std::env::var(var)
                    .map_err(|_| problem(format!("environment variable `{var}` is not set")))?;
                let mut v = HeaderValue::from_str(&format!("Bearer {}", key.trim())).map_err(|_| {
                    problem(format!("environment variable `{var}` is not a valid header value"))
                })?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        let client = match previous {
            Some(p)
                if p.config.upstream.connect_timeout == config.upstream.connect_timeout
                    && p.config.upstream.url == config.upstream.url
                    && p.config.upstream.max_connections == config.upstream.max_connections =>
            {
                p.client.clone()
            }
            _ => upstream::client(&config.upstream),
        };
        Ok(Snapshot {
            limiter: Arc::new(Limiter::from_config(&config, previous.map(|p| p.limiter.as_ref()))),
            routes: RouteTable::from_config(&config),
            upstream: upstream::Upstream::new(&config.upstream, &config.limits, authorization),
            client,
            config,
        })
    }
}

pub struct State {
    pub metrics: Metrics,
    pub auth: Arc<Authenticator>,
    /// The shared rate limits (`rate_limits.backend: redis`), made at start; `None`: local.
    pub fleet: Option<Arc<crate::limits::redis::Fleet>>,
    snapshot: ArcSwap<Snapshot>,
    draining: AtomicBool,
    /// Whether the key store can be used (`KeyStore::check`, by the maintenance loop).
    store_ok: AtomicBool,
    /// The file `serve` was started with; `None` on the embedded defaults.
    pub config_path: Option<PathBuf>,
}

impl State {
    pub fn new(
        snapshot: Snapshot,
        metrics: Metrics,
        auth: Arc<Authenticator>,
        config_path: Option<PathBuf>,
    ) -> State {
        State {
            metrics,
            auth,
            fleet: None,
            snapshot: ArcSwap::from_pointee(snapshot),
            draining: AtomicBool::new(false),
            store_ok: AtomicBool::new(true),
            config_path,
        }
    }

    /// The current generation; hold it for the whole request.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    pub fn swap(&self, next: Snapshot) {
        self.snapshot.store(Arc::new(next));
    }

    /// Readiness turns 503 from here on; requests are still served until the drain ends.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Records whether the key store is usable; returns what it was.
    pub fn set_store_ok(&self, ok: bool) -> bool {
        self.store_ok.swap(ok, Ordering::SeqCst)
    }

    pub fn is_store_ok(&self) -> bool {
        self.store_ok.load(Ordering::SeqCst)
    }
}
