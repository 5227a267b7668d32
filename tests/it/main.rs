//! One integration-test binary: tollgate runs as a real process against a real upstream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;
mod upstream;

mod auth;
mod cli;
mod connections;
mod keys;
mod lifecycle;
mod observability;
mod proxy;
mod ratelimit;
mod sdk;
mod streaming;
mod tls;
