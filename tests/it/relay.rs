//! A TCP relay of the test's own between tollgate and a shared server (PostgreSQL), to inject
//! faults without touching the server other tests use: pass, cut every connection, refuse new
//! ones (the port closed), black-hole (connections accepted, nothing relayed either way), or
//! freeze the connections open now (half-open: silent forever, never closed) while new ones
//! pass; and delay what goes to the server (a slow network on the way there).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    /// The port is closed: connecting is refused.
    Refuse,
    /// Connections are accepted and kept, but no byte goes through in either direction.
    BlackHole,
}

pub struct Relay {
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
    /// Connections are numbered as accepted; those numbered below this are closed.
    cut_below: watch::Sender<u64>,
    /// … and those below this relay nothing more, ever, but stay open.
    frozen_below: watch::Sender<u64>,
    /// How long each chunk toward the server is held before it is sent on.
    delay: watch::Sender<Duration>,
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct Controls {
    mode: watch::Receiver<Mode>,
    cut_below: watch::Receiver<u64>,
    frozen_below: watch::Receiver<u64>,
    delay: watch::Receiver<Duration>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, mode_rx) = watch::channel(Mode::Pass);
        let (cut_below, cut_rx) = watch::channel(0u64);
        let (frozen_below, frozen_rx) = watch::channel(0u64);
        let (delay, delay_rx) = watch::channel(Duration::ZERO);
        let accepted = Arc::new(AtomicU64::new(0));
        let controls =
            Controls { mode: mode_rx, cut_below: cut_rx, frozen_below: frozen_rx, delay: delay_rx };
        let task = tokio::spawn(accept(listener, addr, target, controls, accepted.clone()));
        Relay { addr, mode, cut_below, frozen_below, delay, accepted, task }
    }

    /// A `postgres://` URL through this relay to the database `name` on the server.
    pub fn postgres_url(&self, name: &str) -> String {
        format!("postgres://postgres@{}/{name}", self.addr)
    }

    /// Holds every chunk sent toward the server for `d` (in order) from now on.
    pub fn delay_to_server(&self, d: Duration) {
        self.delay.send_replace(d);
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Closes every connection relayed until now (new ones follow the mode).
    pub fn cut(&self) {
        self.cut_below.send_replace(self.accepted.load(Ordering::SeqCst));
    }

    /// Makes every connection open now half-open: nothing more goes through it, and neither
    /// end is told. New connections follow the mode.
    pub fn freeze(&self) {
        self.frozen_below.send_replace(self.accepted.load(Ordering::SeqCst));
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

async fn accept(
    mut listener: TcpListener,
    addr: SocketAddr,
    target: SocketAddr,
    mut controls: Controls,
    accepted: Arc<AtomicU64>,
) {
    loop {
        if *controls.mode.borrow_and_update() == Mode::Refuse {
            drop(listener);
            while *controls.mode.borrow_and_update() == Mode::Refuse {
                if controls.mode.changed().await.is_err() {
                    return;
                }
            }
            // The same port again (std sets SO_REUSEADDR on Unix).
            listener = loop {
                match TcpListener::bind(addr).await {
                    Ok(l) => break l,
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            };
        }
        tokio::select! {
            conn = listener.accept() => {
                let Ok((client, _)) = conn else { continue };
                let id = accepted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(relay(client, target, id, controls.clone()));
            }
            _ = controls.mode.changed() => {}
        }
    }
}

/// Resolves once `rx` has passed `id`.
async fn passes(mut rx: watch::Receiver<u64>, id: u64) {
    while *rx.borrow_and_update() <= id {
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// One connection, both directions, until either side closes or it is cut.
async fn relay(client: TcpStream, target: SocketAddr, id: u64, controls: Controls) {
    let Ok(server) = TcpStream::connect(target).await else { return };
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pipe(cr, sw, id, true, controls.clone());
    let down = pipe(sr, cw, id, false, controls.clone());
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = passes(controls.cut_below.clone(), id) => {}
    }
    // Dropping both halves closes both sockets.
}

/// Copies `from` → `to`, holding every chunk while the relay is a black hole, and everything
/// for good once this connection is frozen; `toward_server`, each chunk for the delay.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    id: u64,
    toward_server: bool,
    mut controls: Controls,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let frozen = passes(controls.frozen_below.clone(), id);
    tokio::pin!(frozen);
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = &mut frozen => return std::future::pending().await,
        };
        while *controls.mode.borrow_and_update() == Mode::BlackHole {
            if controls.mode.changed().await.is_err() {
                return;
            }
        }
        if *controls.frozen_below.borrow() > id {
            return std::future::pending().await;
        }
        let delay = *controls.delay.borrow();
        if toward_server && !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
