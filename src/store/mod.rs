//! Key stores: `sqlite` (the embedded default). Opened from `store` config; the proxy, the CLI
//! and the HTTP API all go through the `KeyStore` trait of `keys.rs`.

pub mod sqlite;

use std::sync::Arc;

use crate::config::Store;
use crate::keys::{KeyStore, StoreError};

/// Opens the configured store and applies its schema migrations.
pub async fn open(config: &Store) -> Result<Arc<dyn KeyStore>, StoreError> {
    Ok(Arc::new(sqlite::SqliteStore::open(&config.sqlite).await?))
}
