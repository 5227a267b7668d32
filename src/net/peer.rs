//! What a connection knows about its client: shared by every request on it.

use std::net::SocketAddr;

use http::HeaderValue;

/// What the connection knows about the client.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub tls: bool,
    /// The client's address for this request: the peer's, or what a trusted proxy in front
    /// recorded (`client_addr.rs`). Set per request by the pipeline.
    pub client: std::net::IpAddr,
    /// The client's address as `x-forwarded-for` carries it, rendered once per connection
    /// rather than once per request.
    pub(crate) ip: HeaderValue,
}

impl Peer {
    pub fn new(addr: SocketAddr, tls: bool) -> Peer {
        let ip = HeaderValue::from_str(&addr.ip().to_canonical().to_string())
            .unwrap_or(HeaderValue::from_static("unknown"));
        Peer { addr, tls, client: addr.ip(), ip }
    }
}
