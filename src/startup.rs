//! Why `serve` could not start: reported before any port serves a request, never seen by
//! clients (the request path's errors are `error::Error`).

use crate::config::ConfigError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The config, or what it names in the environment (`upstream.api_key_env`).
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// Opening the key store (the message names it).
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The certificate or key files of `tls`.
    #[error("{0}")]
    Tls(String),
    /// Binding `listen` or `admin_listen`.
    #[error("{0}")]
    Listen(String),
    #[error("metrics: {0}")]
    Metrics(String),
    /// The operating system refused a resource (random numbers, threads, the runtime).
    #[error("{0}")]
    System(String),
}
