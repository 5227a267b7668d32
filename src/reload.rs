//! Reload (§8): SIGHUP, or a change of the config file or of the TLS files, builds a new
//! `Snapshot` and swaps it whole. An invalid config is rejected, logged with every problem and
//! counted in `tollgate_config_reloads_total{result="error"}`; the old one stays in force.
//!
//! Files are polled (content compared every `POLL`) rather than watched with inotify: Kubernetes
//! updates ConfigMap and Secret volumes by swapping a symlink, which inotify watches on the file
//! miss, and a one-second poll of two small files costs nothing.
//!
//! A changed config file is applied only once it has read the same on two consecutive polls: an
//! editor or `cp` caught mid-write leaves a truncated file that may still parse (a `tiers` map
//! cut short), and applying it would drop what was cut. SIGHUP applies at once: the operator
//! says the file is complete.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, TlsFiles};
use crate::net::tls::Certificates;
use crate::state::{Snapshot, State};

const POLL: Duration = Duration::from_secs(1);

/// Applies a new log filter (the `log.level` field is reloadable; `log.format` is not).
pub type LogLevelHook = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

pub struct Reloader {
    state: Arc<State>,
    certs: Option<Arc<Certificates>>,
    log_level: Option<LogLevelHook>,
    config_seen: Option<Vec<u8>>,
    /// A changed config file's content, waiting to read the same once more before it applies.
    config_settling: Option<Vec<u8>>,
    tls_seen: Option<(Vec<u8>, Vec<u8>)>,
}

impl Reloader {
    pub fn new(
        state: Arc<State>,
        certs: Option<Arc<Certificates>>,
        log_level: Option<LogLevelHook>,
    ) -> Reloader {
        let config_seen = state.config_path.as_deref().and_then(|p| std::fs::read(p).ok());
        let tls_seen = state.snapshot().config.tls.as_ref().and_then(read_tls);
        Reloader { state, certs, log_level, config_seen, config_settling: None, tls_seen }
    }

    /// Runs until the process ends.
    pub async fn run(mut self) {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reloading on file changes only");
                None
            }
        };
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let forced = tokio::select! {
                _ = tick.tick() => false,
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            };
            self.check(forced);
        }
    }

    /// Reloads the config if forced (SIGHUP) or if the file changed, then the TLS files if they
    /// changed. Returns whether a new snapshot was swapped in.
    pub fn check(&mut self, forced: bool) -> bool {
        let mut swapped = false;
        if let Some(path) = self.state.config_path.clone() {
            let now = std::fs::read(&path).ok();
            let changed = now.is_some() && now != self.config_seen;
            let settled = changed && now == self.config_settling;
            if forced || settled {
                self.config_settling = None;
                if now.is_some() {
                    self.config_seen = now;
                }
                swapped = self.reload_config(&path);
            } else {
                self.config_settling = if changed { now } else { None };
            }
        } else if forced {
            tracing::info!("SIGHUP ignored: running on the embedded defaults (no config file)");
        }
        self.reload_tls(forced);
        swapped
    }

    fn reload_config(&self, path: &Path) -> bool {
        let m = &self.state.metrics;
        let old = self.state.snapshot();
        let next = Config::load(path).and_then(|c| Snapshot::build(c, Some(&old)));
        match next {
            Err(e) => {
                m.config_reloads.with_label_values(&["error"]).inc();
                for p in &e.problems {
                    tracing::error!(file = %path.display(), field = %p.path, problem = %p.message, "config reload rejected");
                }
                tracing::error!(file = %path.display(), "config reload rejected; the previous config stays in force");
                false
            }
            Ok(next) => {
                warn_restart_only(&old.config, &next.config);
                if next.config.log.level != old.config.log.level {
                    if let Some(hook) = &self.log_level {
                        if let Err(e) = hook(&next.config.log.level) {
                            tracing::warn!(error = %e, "cannot apply the new log.level");
                        }
                    }
                }
                self.state.swap(next);
                m.config_reloads.with_label_values(&["success"]).inc();
                tracing::info!(file = %path.display(), "config reloaded");
                true
            }
        }
    }

    fn reload_tls(&mut self, forced: bool) {
        let (Some(certs), Some(files)) = (&self.certs, self.state.snapshot().config.tls.clone()) else {
            return;
        };
        let now = read_tls(&files);
        if !forced && (now.is_none() || now == self.tls_seen) {
            return;
        }
        // A half-written pair (new cert, old key) fails `keys_match` and is retried next tick.
        match certs.reload(&files) {
            Ok(()) => {
                self.tls_seen = now;
                tracing::info!(cert = %files.cert.display(), "TLS certificate reloaded");
            }
            Err(e) => {
                if forced || now != self.tls_seen {
                    tracing::error!(error = %e, "TLS reload rejected; the previous certificate stays in force");
                }
            }
        }
    }
}

fn read_tls(files: &TlsFiles) -> Option<(Vec<u8>, Vec<u8>)> {
    Some((std::fs::read(&files.cert).ok()?, std::fs::read(&files.key).ok()?))
}

/// Fields that are read once at start: a reload keeps running with the old value and says so.
fn warn_restart_only(old: &Config, new: &Config) {
    let changed: Vec<&str> = [
        ("listen", old.listen != new.listen),
        ("admin_listen", old.admin_listen != new.admin_listen),
        ("tls (enabling or disabling)", old.tls.is_some() != new.tls.is_some()),
        ("log.format", old.log.format != new.log.format),
        ("store", old.store != new.store),
        // The Redis connection and its settings are made once, at start.
        ("rate_limits.backend / rate_limits.redis", old.rate_limits.backend != new.rate_limits.backend),
        ("limits.max_connections", old.limits.max_connections != new.limits.max_connections),
        // The cache and the failure limiter are sized and built once (their state would be lost).
        ("auth.cache_capacity", old.auth.cache_capacity != new.auth.cache_capacity),
        (
            "auth.failed_auth",
            old.auth.failed_auth_per_second != new.auth.failed_auth_per_second
                || old.auth.failed_auth_burst != new.auth.failed_auth_burst,
        ),
    ]
    .into_iter()
    .filter_map(|(name, c)| c.then_some(name))
    .collect();
    if !changed.is_empty() {
        tracing::warn!(fields = ?changed, "these fields only take effect after a restart");
    }
}

/// The config file a reloader watches, for logs.
pub fn describe(path: Option<&PathBuf>) -> String {
    path.map_or_else(|| "<embedded defaults>".into(), |p| p.display().to_string())
}
