//! Listeners: binding, the accept loops (with back-off on accept errors such as EMFILE), TLS
//! handshakes, and the shutdown sequence of §8 — readiness 503 at once, keep accepting for
//! `drain_delay`, then refuse new connections and give in-flight requests and streams
//! `shutdown.timeout` to finish.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::net::server;
use crate::net::Peer;
use crate::proxy::Proxy;
use crate::state::State;

/// Both bound sockets. Binding happens before anything is served, so a port conflict is a
/// startup error, not a half-started process.
pub struct Listeners {
    pub public: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    pub async fn bind(public: SocketAddr, admin: SocketAddr) -> Result<Listeners, String> {
        let bind = |addr: SocketAddr, what: &'static str| async move {
            TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr} ({what}): {e}"))
        };
        Ok(Listeners { public: bind(public, "listen").await?, admin: bind(admin, "admin_listen").await? })
    }
}

/// Runs both listeners until `shutdown` resolves, then drains and returns.
pub async fn serve(
    state: Arc<State>,
    listeners: Listeners,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let public = tokio::spawn(accept_public(listeners.public, state.clone(), tls, stop_rx.clone()));
    let admin = tokio::spawn(accept_admin(listeners.admin, state.clone(), stop_rx));

    shutdown.await;
    let snap = state.snapshot();
    let (drain_delay, timeout) = (snap.config.shutdown.drain_delay, snap.config.shutdown.timeout);
    drop(snap);
    state.start_draining();
    tracing::info!(
        drain_delay = ?drain_delay,
        timeout = ?timeout,
        "shutdown requested: readiness is now 503; still accepting while endpoints update"
    );
    tokio::time::sleep(drain_delay).await;

    // Stop accepting: the accept loops return their connection trackers.
    let _ = stop_tx.send(true);
    let public = public.await.ok();
    tracing::info!(
        connections = public.as_ref().map_or(0, |g| g.count()),
        "no longer accepting; waiting for in-flight requests and streams"
    );
    if let Some(graceful) = public {
        if tokio::time::timeout(timeout, graceful.shutdown()).await.is_err() {
            tracing::warn!("shutdown.timeout reached with requests still in flight; closing them");
        }
    }
    if let Ok(graceful) = admin.await {
        let _ = tokio::time::timeout(Duration::from_secs(1), graceful.shutdown()).await;
    }
    tracing::info!("shutdown complete");
}

/// Accept errors (EMFILE, ENFILE, ECONNABORTED) are transient: back off instead of spinning.
async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(conn) => return conn,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed; retrying in 100ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn accept_public(
    listener: TcpListener,
    state: Arc<State>,
    tls: Option<TlsAcceptor>,
    mut stop: watch::Receiver<bool>,
) -> GracefulShutdown {
    let graceful = GracefulShutdown::new();
    let proxy = Proxy::new(state.clone());
    // `limits.max_connections`, read at start: past it, new connections wait in the kernel's
    // listen backlog until one closes, rather than costing memory here.
    let max = state.snapshot().config.limits.max_connections;
    let slots = Arc::new(Semaphore::new(max));
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                tracing::warn!(max, "limits.max_connections client connections open; new ones wait");
                tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => return graceful,
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => return graceful,
                    },
                }
            }
        };
        let (tcp, addr) = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return graceful,
            conn = accept(&listener) => conn,
        };
        // Small requests and SSE events must not wait for Nagle.
        let _ = tcp.set_nodelay(true);
        let watcher = graceful.watcher();
        let proxy = proxy.clone();
        let limits = state.snapshot().config.limits.clone();
        match &tls {
            None => {
                let peer = Peer::new(addr, false);
                tokio::spawn(async move {
                    server::serve_public(tcp, peer, proxy, limits, watcher).await;
                    drop(slot);
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    // The handshake gets the same budget as request headers (slowloris).
                    match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(io)) => {
                            let peer = Peer::new(addr, true);
                            server::serve_public(io, peer, proxy, limits, watcher).await;
                        }
                        Ok(Err(e)) => tracing::debug!(peer = %addr, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(peer = %addr, "TLS handshake timed out"),
                    }
                });
            }
        }
    }
}

async fn accept_admin(
    listener: TcpListener,
    state: Arc<State>,
    mut stop: watch::Receiver<bool>,
) -> GracefulShutdown {
    let graceful = GracefulShutdown::new();
    loop {
        let (tcp, _) = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return graceful,
            conn = accept(&listener) => conn,
        };
        tokio::spawn(super::admin::serve_admin(tcp, state.clone(), graceful.watcher()));
    }
}
