//! The upstream connection pool: keep-alive HTTP/1.1 connections to the one upstream of a
//! config generation, reused last-in first-out.
//!
//! tollgate talks to exactly one upstream, so the pool is one stack of idle connections rather
//! than hyper-util's general client (a map of pools keyed by scheme and authority, a checkout
//! race between connecting and waiting, and a spawned task per response to return the
//! connection): that machinery cost about a sixth of tollgate's per-request CPU in the load
//! benchmark. What it did that matters is kept: connect timeout, TCP_NODELAY and keep-alive,
//! an idle timeout, and a retry on another connection when a pooled one turns out to be closed
//! before the request was written.
//!
//! A connection goes back to the pool when its response body has been read to the end; one
//! whose response was abandoned (client gone, timeout, error) is dropped, and hyper closes it.
//!
//! Connections in use are bounded (`upstream.max_connections`): each request holds a slot until
//! its response ends, and idle connections are taken before a new one is opened, so no more
//! than that many are open. A request that finds no slot free within the connect timeout is
//! refused (`SendError::PoolFull`) rather than queued without end: one client multiplexing
//! hundreds of HTTP/2 streams cannot open hundreds of upstream connections.

use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use pin_project_lite::pin_project;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Idle connections kept at most; more are closed when they come back.
const MAX_IDLE: usize = 1024;
/// How often idle connections past their timeout are closed.
const REAP_EVERY: Duration = Duration::from_secs(15);

/// Why no response came.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be opened (refused, unreachable, connect timeout).
    Connect(String),
    /// The connection failed after the request was handed to it.
    Failed(hyper::Error),
    /// Every connection slot stayed in use for the connect timeout.
    PoolFull { max: usize },
}

/// A pooled client for one upstream address. Cheap to clone; clones share the pool.
pub struct Client<B> {
    pool: Arc<Pool<B>>,
}

impl<B> Clone for Client<B> {
    fn clone(&self) -> Self {
        Client { pool: self.pool.clone() }
    }
}

struct Pool<B> {
    /// `host:port` as configured; resolved on each new connection (a Service name may move).
    address: String,
    connect_timeout: Duration,
    idle_timeout: Duration,
    idle: Mutex<Vec<Idle<B>>>,
    /// One permit per connection in use.
    slots: Arc<Semaphore>,
    max_connections: usize,
}

struct Idle<B> {
    sender: http1::SendRequest<B>,
    since: Instant,
}

impl<B> Pool<B> {
    fn put(&self, sender: http1::SendRequest<B>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(Idle { sender, since: Instant::now() });
        }
    }

    /// The most recently used open connection, if any: the warmest, and the least likely to have
    /// been closed by the upstream's own keep-alive timeout.
    fn take(&self) -> Option<http1::SendRequest<B>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(c) = idle.pop() {
            if !c.sender.is_closed() && c.since.elapsed() < self.idle_timeout {
                return Some(c.sender);
            }
        }
        None
    }

    /// Closes connections idle for longer than the idle timeout (and forgets closed ones).
    fn reap(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|c| !c.sender.is_closed() && c.since.elapsed() < self.idle_timeout);
    }

    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl<B> Client<B>
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// A client for `address` (`host:port`) with at most `max_connections` in use. Spawns the
    /// idle reaper when called inside a runtime.
    pub fn new(
        address: String,
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_connections: usize,
    ) -> Client<B> {
        let max_connections = max_connections.clamp(1, Semaphore::MAX_PERMITS);
        let pool = Arc::new(Pool {
            address,
            connect_timeout,
            idle_timeout,
            idle: Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(max_connections)),
            max_connections,
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(reaper(Arc::downgrade(&pool)));
        }
        Client { pool }
    }

    /// Sends `req` (origin-form URI, `Host` set) on a pooled connection, or a new one. The
    /// response body holds the connection and returns it to the pool when read to the end.
    pub async fn request(&self, mut req: Request<B>) -> Result<Response<Pooled<Incoming, B>>, SendError> {
        let p = &self.pool;
        let full = || SendError::PoolFull { max: p.max_connections };
        let slot = match p.slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => tokio::time::timeout(p.connect_timeout, p.slots.clone().acquire_owned())
                .await
                .map_err(|_| full())?
                .map_err(|_| full())?,
        };
        let mut slot = Some(slot);
        loop {
            let (mut sender, pooled) = match self.pool.take() {
                Some(s) => (s, true),
                None => (self.connect().await?, false),
            };
            // A pooled connection becomes ready as soon as its previous exchange is wound up;
            // an error means it closed meanwhile.
            if let Err(e) = sender.ready().await {
                if pooled {
                    continue;
                }
                return Err(SendError::Failed(e));
            }
            match sender.try_send_request(req).await {
                Ok(rsp) => {
                    let lease = Lease {
                        sender: Some(sender),
                        pool: Arc::downgrade(&self.pool),
                        done: false,
                        _slot: slot.take(),
                    };
                    return Ok(rsp.map(|body| Pooled::new(body, lease)));
                }
                Err(mut e) => match e.take_message() {
                    // Never written: the connection closed under us; another one may do.
                    Some(r) if pooled => req = r,
                    _ => return Err(SendError::Failed(e.into_error())),
                },
            }
        }
    }

    async fn connect(&self) -> Result<http1::SendRequest<B>, SendError> {
        let p = &self.pool;
        let tcp = match tokio::time::timeout(p.connect_timeout, TcpStream::connect(p.address.as_str())).await
        {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(SendError::Connect(e.to_string())),
            Err(_) => {
                return Err(SendError::Connect(format!("no connection within {:?}", p.connect_timeout)))
            }
        };
        // Small requests and SSE events must leave at once; keep-alive probes find dead peers.
        let _ = tcp.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
        let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
        let (sender, conn) =
            http1::handshake(TokioIo::new(tcp)).await.map_err(|e| SendError::Connect(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}

async fn reaper<B>(pool: Weak<Pool<B>>) {
    loop {
        tokio::time::sleep(REAP_EVERY).await;
        match pool.upgrade() {
            Some(p) => p.reap(),
            None => return,
        }
    }
}

/// A connection lent to one response; back to the pool on drop if the response was complete.
struct Lease<B> {
    sender: Option<http1::SendRequest<B>>,
    pool: Weak<Pool<B>>,
    done: bool,
    /// The connection slot, freed with the lease: after the connection went back to the pool
    /// (the field drops after `drop` ran) or was closed.
    _slot: Option<OwnedSemaphorePermit>,
}

impl<B> Drop for Lease<B> {
    fn drop(&mut self) {
        if let (true, Some(sender), Some(pool)) = (self.done, self.sender.take(), self.pool.upgrade()) {
            pool.put(sender);
        }
    }
}

pin_project! {
    /// A response body that returns its connection to the pool once read to the end.
    pub struct Pooled<R, B> {
        #[pin]
        inner: R,
        lease: Lease<B>,
    }
}

impl<R: HttpBody, B> Pooled<R, B> {
    fn new(inner: R, mut lease: Lease<B>) -> Self {
        // A body that is empty from the start (204, HEAD, `content-length: 0`) may never be
        // polled at all.
        lease.done = inner.is_end_stream();
        Pooled { inner, lease }
    }
}

impl<R: HttpBody, B> HttpBody for Pooled<R, B> {
    type Data = R::Data;
    type Error = R::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<R::Data>, R::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.lease.done = true,
            Poll::Ready(Some(Ok(_))) => this.lease.done = this.inner.is_end_stream(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A raw TCP server that counts connections and hands each to `serve`.
    async fn listen<F, Fut>(serve: F) -> (String, Arc<AtomicUsize>)
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(s));
            }
        });
        (addr, accepted)
    }

    /// A raw HTTP/1.1 server that counts connections and answers every request with `answer`.
    async fn server(answer: &'static [u8]) -> (String, Arc<AtomicUsize>) {
        listen(move |mut s| async move {
            let mut buf = vec![0u8; 4096];
            let mut seen = Vec::new();
            loop {
                let n = match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                seen.extend_from_slice(&buf[..n]);
                while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                    seen.drain(..end + 4);
                    if s.write_all(answer).await.is_err() {
                        return;
                    }
                    if answer.windows(17).any(|w| w.eq_ignore_ascii_case(b"connection: close")) {
                        return;
                    }
                }
            }
        })
        .await
    }

    fn get() -> Request<Full<Bytes>> {
        Request::get("/").header("host", "upstream").body(Full::new(Bytes::new())).unwrap()
    }

    fn client(addr: String) -> Client<Full<Bytes>> {
        Client::new(addr, Duration::from_secs(1), Duration::from_secs(90), 64)
    }

    #[tokio::test]
    async fn a_connection_read_to_the_end_is_reused() {
        let (addr, accepted) = server(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        let c = client(addr);
        for _ in 0..5 {
            let rsp = c.request(get()).await.unwrap();
            assert_eq!(rsp.into_body().collect().await.unwrap().to_bytes(), "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(c.pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn an_abandoned_response_does_not_return_its_connection() {
        let (addr, accepted) = server(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        let c = client(addr);
        drop(c.request(get()).await.unwrap());
        assert_eq!(c.pool.idle_count(), 0);
        let rsp = c.request(get()).await.unwrap();
        assert_eq!(rsp.into_body().collect().await.unwrap().to_bytes(), "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_empty_body_returns_the_connection_without_being_polled() {
        let (addr, accepted) = server(b"HTTP/1.1 204 No Content\r\n\r\n").await;
        let c = client(addr);
        for _ in 0..3 {
            let rsp = c.request(get()).await.unwrap();
            assert_eq!(rsp.status(), 204);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn connections_the_upstream_closes_are_replaced() {
        let (addr, accepted) =
            server(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok").await;
        let c = client(addr);
        for _ in 0..3 {
            let rsp = c.request(get()).await.unwrap();
            assert_eq!(rsp.into_body().collect().await.unwrap().to_bytes(), "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    /// The upstream closes a kept-alive connection after its own idle timeout, unannounced: the
    /// pool must not hand the dead connection out, or must take the request back from it.
    #[tokio::test]
    async fn a_connection_closed_while_idle_is_replaced() {
        let (addr, accepted) = listen(|mut s| async move {
            let mut buf = vec![0u8; 4096];
            if s.read(&mut buf).await.unwrap_or(0) > 0 {
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Dropped: closed without `Connection: close`.
        })
        .await;
        let c = client(addr);
        for _ in 0..3 {
            let rsp = c.request(get()).await.unwrap();
            assert_eq!(rsp.into_body().collect().await.unwrap().to_bytes(), "ok");
            assert_eq!(c.pool.idle_count(), 1, "a complete exchange returns its connection");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn idle_connections_expire() {
        let (addr, accepted) = server(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        let c: Client<Full<Bytes>> = Client::new(addr, Duration::from_secs(1), Duration::from_millis(1), 64);
        for _ in 0..2 {
            let rsp = c.request(get()).await.unwrap();
            assert_eq!(rsp.into_body().collect().await.unwrap().to_bytes(), "ok");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        c.pool.reap();
        assert_eq!(c.pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        match client(addr).request(get()).await {
            Err(SendError::Connect(_)) => {}
            Err(e) => panic!("expected a connect error, got {e:?}"),
            Ok(_) => panic!("a closed port answered"),
        }
    }
}
