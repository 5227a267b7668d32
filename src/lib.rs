//! tollgate — an auth and rate-limit sidecar for OpenAI-compatible inference APIs.
//!
//! The request path (SPEC §1), one folder per concern, in flow order:
//!
//! ```text
//! client ─► listener (TCP, optional TLS)          net/listener.rs, net/tls.rs
//!        ─► HTTP/1.1 + HTTP/2 server (hyper)       net/server.rs
//!        ─► THE PIPELINE                           proxy/mod.rs   ← read this first
//!             request context, client address      proxy/context.rs, net/client_addr.rs
//!             reject keys in the URL, bad targets  proxy/target.rs
//!             authenticate                         auth/, keys/, store/
//!             (key-management API, served here)    keys/api.rs, keys/lifecycle.rs
//!             (the key dashboard, no key needed)   dashboard/
//!             (GET /v1/limits, any valid key)      limits/report.rs
//!             route table ─► scope check           proxy/routes.rs
//!             token estimate (LLM tiers)           usage/mod.rs
//!             rate limit, tokens, concurrency      limits/ (Redis: limits/redis.rs)
//!             forward, streaming both ways         upstream/, body/
//!             usage settled when the body ends     usage/meter.rs, usage/settle.rs
//!        ─► response; metrics + access log         proxy/access_log.rs, metrics.rs
//! every failure → one JSON error body              error.rs
//! ```
//!
//! Around it: `config/` (YAML → validated `Config`), `state` (`State` and the swappable
//! `Snapshot`), `reload` (SIGHUP / file changes), `tasks` (every background loop), `cli/`,
//! `priority` (background threads below the request path).

pub mod auth;
pub mod body;
pub mod cli;
pub mod clock;
pub mod config;
pub mod dashboard;
pub mod error;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod net;
pub(crate) mod priority;
pub mod proxy;
pub mod reload;
pub mod state;
pub mod store;
pub(crate) mod tasks;
pub mod upstream;
pub mod usage;

mod startup;
pub use startup::StartupError;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use config::Config;

/// Starts serving `config` until `shutdown` resolves, then drains (§8). `log_level` applies a
/// reloaded `log.level`. Startup problems (ports, TLS files, environment) are returned before
/// anything is served.
pub async fn serve(
    config: Config,
    config_path: Option<PathBuf>,
    log_level: Option<reload::LogLevelHook>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartupError> {
    let metrics = metrics::Metrics::new().map_err(|e| StartupError::Metrics(e.to_string()))?;
    let snapshot = state::Snapshot::build(config, None)?;
    let certs = match &snapshot.config.tls {
        Some(files) => Some(Arc::new(net::tls::Certificates::load(files).map_err(StartupError::Tls)?)),
        None => None,
    };
    let acceptor = match &certs {
        Some(c) => Some(tokio_rustls::TlsAcceptor::from(
            net::tls::server_config(c.clone()).map_err(StartupError::Tls)?,
        )),
        None => None,
    };
    let store = store::open(&snapshot.config.store).await?;
    let store: Arc<dyn store::KeyStore> = Arc::new(store::observed::Observed::new(
        store,
        metrics.store_up.clone(),
        metrics.store_errors.clone(),
    ));
    let auth =
        Arc::new(auth::Authenticator::new(store, &snapshot.config.auth).map_err(StartupError::System)?);
    let listeners = net::listener::Listeners::bind(snapshot.config.listen, snapshot.config.admin_listen)
        .await
        .map_err(StartupError::Listen)?;
    let local = |l: &tokio::net::TcpListener| l.local_addr().map_err(|e| StartupError::Listen(e.to_string()));
    let (public, admin) = (local(&listeners.public)?, local(&listeners.admin)?);
    let fleet = match &snapshot.config.rate_limits.backend {
        config::LimitBackend::Local => None,
        config::LimitBackend::Redis(cfg) => {
            let m = limits::redis::FleetMetrics {
                up: metrics.ratelimit_backend_up.clone(),
                duration: metrics.ratelimit_backend_duration.clone(),
                decisions: metrics.ratelimit_decisions.clone(),
                settlements: metrics.ratelimit_settlements.clone(),
            };
            let fleet = limits::redis::Fleet::new(cfg, m).map_err(StartupError::System)?;
            fleet.warm_up(std::time::Duration::from_secs(2)).await;
            fleet.announce().await;
            Some(Arc::new(fleet))
        }
    };
    let mut state = state::State::new(snapshot, metrics, auth.clone(), config_path);
    state.fleet = fleet;
    let state = Arc::new(state);
    tracing::info!(
        public = %public,
        admin = %admin,
        tls = acceptor.is_some(),
        upstream = %state.snapshot().config.upstream.url,
        config = %reload::describe(state.config_path.as_ref()),
        version = env!("CARGO_PKG_VERSION"),
        "listening"
    );
    let reloader = reload::Reloader::new(state.clone(), certs, log_level);
    let reload_task = tokio::spawn(reloader.run());
    let auth_task = tokio::spawn(tasks::maintain_keys(auth.clone(), state.clone()));
    let limits_task = tokio::spawn(tasks::forget_idle_limits(state.clone()));
    let fleet_tasks = state.fleet.clone().map(|f| {
        [
            tokio::spawn(tasks::announce_replica(f.clone())),
            tokio::spawn(tasks::renew_leases(f.clone())),
            tokio::spawn(tasks::refund_debits(f)),
        ]
    });
    net::listener::serve(state, listeners, acceptor, shutdown).await;
    reload_task.abort();
    auth_task.abort();
    limits_task.abort();
    for t in fleet_tasks.into_iter().flatten() {
        t.abort();
    }
    // Last-used timestamps still in memory are written before exit.
    auth::flush_usage(&auth).await;
    Ok(())
}
