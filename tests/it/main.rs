//! One integration-test binary: tollgate runs as a real process against a real upstream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;
mod upstream;

mod auth;
mod cli;
mod connections;
mod dashboard;
mod fleet;
mod fleet_limits;
mod fleet_tokens;
mod keys;
mod lifecycle;
mod observability;
mod pg;
mod proxy;
mod ratelimit;
mod redis_server;
mod relay;
mod sdk;
mod store;
mod store_copy;
mod streaming;
mod tls;
mod tokens;
