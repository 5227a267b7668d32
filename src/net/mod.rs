//! The network edge: listeners and their accept loops (`listener.rs`), TLS (`tls.rs`), the
//! public HTTP server (`server.rs`), the admin endpoints (`admin.rs`), and what a connection
//! knows about its client (`peer.rs`, `client_addr.rs`).

pub mod admin;
pub mod client_addr;
pub mod listener;
mod peer;
pub mod server;
pub mod tls;

pub use peer::Peer;
