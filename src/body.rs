//! Body types of both directions: `Guarded` streams a hyper body frame by frame with an idle
//! timeout and an optional size limit, and `Body` is the one response type (a JSON body or a
//! stream) that tells each of its observers of every data frame and of its end — bytes sent,
//! how it ended — exactly once.
//!
//! Nothing here buffers: every frame is passed on as soon as it is polled, so a server-sent
//! event leaves tollgate when it arrives.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

/// Why a body stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// No frame for `stream_idle_timeout`.
    Idle = 1,
    /// The byte limit was passed (request bodies only).
    TooLarge = 2,
    /// The peer reset or closed the stream mid-body.
    Broken = 3,
}

/// The error a guarded body yields; hyper aborts the stream (h1: close, h2: RST_STREAM).
#[derive(Debug)]
pub struct BodyError(pub Stop);

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Stop::Idle => f.write_str("body stream idle for too long"),
            Stop::TooLarge => f.write_str("body exceeds the size limit"),
            Stop::Broken => f.write_str("body stream broken by the peer"),
        }
    }
}

impl std::error::Error for BodyError {}

/// Records, for the request side, why the body stopped — the upstream client only reports that
/// sending failed, and the pipeline must answer 413 rather than 502 when the client's body was
/// too large.
#[derive(Debug, Clone, Default)]
pub struct StopFlag(Arc<AtomicU8>);

impl StopFlag {
    fn set(&self, stop: Stop) {
        self.0.store(stop as u8, Ordering::Relaxed);
    }

    pub fn get(&self) -> Option<Stop> {
        match self.0.load(Ordering::Relaxed) {
            1 => Some(Stop::Idle),
            2 => Some(Stop::TooLarge),
            3 => Some(Stop::Broken),
            _ => None,
        }
    }
}

pin_project! {
    /// A body passed through frame by frame, with an idle timeout between frames and an optional
    /// byte limit.
    ///
    /// The idle timer is armed only when the inner body has nothing to give: most bodies (a
    /// small JSON request or response) are read without ever waiting, and then cost no timer at
    /// all. Frames that arrive back to back only mark the timer stale; it is re-armed when the
    /// body next waits.
    pub struct Guarded<B> {
        #[pin]
        inner: B,
        idle: Duration,
        timer: Option<Pin<Box<Sleep>>>,
        stale: bool,
        limit: Option<u64>,
        seen: u64,
        flag: Option<StopFlag>,
    }
}

impl<B> Guarded<B> {
    pub fn new(inner: B, idle: Duration, limit: Option<u64>, flag: Option<StopFlag>) -> Self {
        Guarded { inner, idle, timer: None, stale: false, limit, seen: 0, flag }
    }
}

impl<B> HttpBody for Guarded<B>
where
    B: HttpBody<Data = Bytes>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.project();
        let stop = |this_flag: &Option<StopFlag>, s: Stop| {
            if let Some(f) = this_flag {
                f.set(s);
            }
            Poll::Ready(Some(Err(BodyError(s))))
        };
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    *this.seen += data.len() as u64;
                    if this.limit.is_some_and(|l| *this.seen > l) {
                        return stop(this.flag, Stop::TooLarge);
                    }
                }
                *this.stale = true;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(_))) => stop(this.flag, Stop::Broken),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let timer = match this.timer {
                    Some(t) => {
                        if std::mem::take(this.stale) {
                            t.as_mut().reset(Instant::now() + *this.idle);
                        }
                        t
                    }
                    None => this.timer.insert(Box::pin(tokio::time::sleep(*this.idle))),
                };
                ready!(timer.as_mut().poll(cx));
                stop(this.flag, Stop::Idle)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body on its way upstream: the client's, streamed as it arrives, or one tollgate
/// rewrote (a JSON body with a field added) and sends whole. `forward::rewrite_body` sets the
/// matching `content-length`.
pub enum Outgoing {
    Client(hyper::body::Incoming),
    Rewritten(Option<Bytes>),
}

impl HttpBody for Outgoing {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Outgoing::Client(b) => Pin::new(b).poll_frame(cx),
            Outgoing::Rewritten(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Outgoing::Client(b) => b.is_end_stream(),
            Outgoing::Rewritten(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Outgoing::Client(b) => b.size_hint(),
            Outgoing::Rewritten(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Outgoing::Rewritten(None) => SizeHint::with_exact(0),
        }
    }
}

/// How a response body ended, reported once to each observer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Every byte was handed to hyper.
    Complete,
    /// The stream stopped early (idle timeout, upstream broke it).
    Stopped(Stop),
    /// The client went away before the end (the body was dropped unfinished).
    ClientGone,
}

/// Watches one response body: told of each data frame as it passes, in order, and of the end
/// exactly once, however the body ends. A body carries several (the access log and request
/// metrics, a usage meter, a concurrency permit); none can displace another.
pub trait Observer: Send + 'static {
    /// A data frame, before it is handed to hyper.
    fn on_data(&mut self, _data: &Bytes) {}
    /// The end: `bytes` of body were handed to hyper, and how it ended.
    fn on_end(self: Box<Self>, bytes: u64, end: End);
}

/// A streamed response body of any source (the upstream's, or one tollgate builds).
pub type BoxStream = Pin<Box<dyn HttpBody<Data = Bytes, Error = BodyError> + Send>>;

enum Inner {
    Full(Option<Bytes>),
    Stream(BoxStream),
}

/// The response body of every public-listener response.
pub struct Body {
    inner: Inner,
    bytes: u64,
    observers: Vec<Box<dyn Observer>>,
}

impl Body {
    pub fn full(bytes: impl Into<Bytes>) -> Body {
        Body { inner: Inner::Full(Some(bytes.into())), bytes: 0, observers: Vec::new() }
    }

    pub fn empty() -> Body {
        Body { inner: Inner::Full(None), bytes: 0, observers: Vec::new() }
    }

    pub fn stream(body: impl HttpBody<Data = Bytes, Error = BodyError> + Send + 'static) -> Body {
        Body { inner: Inner::Stream(Box::pin(body)), bytes: 0, observers: Vec::new() }
    }

    /// Adds an observer. If the body is already empty, its end is reported when hyper polls
    /// the body or drops it.
    pub fn observe(&mut self, o: Box<dyn Observer>) {
        self.observers.push(o);
    }

    fn end(&mut self, end: End) {
        for o in self.observers.drain(..) {
            o.on_end(self.bytes, end);
        }
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        // Dropped with observers still attached: hyper never saw the end of the body, which
        // means the client went away (or the connection was torn down at shutdown).
        let end = if self.is_end_stream() { End::Complete } else { End::ClientGone };
        self.end(end);
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let polled = match &mut this.inner {
            Inner::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Inner::Stream(s) => s.as_mut().poll_frame(cx),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                    for o in &mut this.observers {
                        o.on_data(d);
                    }
                }
                if this.is_end_stream() {
                    this.end(End::Complete);
                }
            }
            Poll::Ready(Some(Err(e))) => this.end(End::Stopped(e.0)),
            Poll::Ready(None) => this.end(End::Complete),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full(b) => b.is_none(),
            Inner::Stream(s) => s.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Inner::Full(None) => SizeHint::with_exact(0),
            Inner::Stream(s) => s.size_hint(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<(u64, End)>>>);
    impl Observer for Seen {
        fn on_end(self: Box<Self>, bytes: u64, end: End) {
            self.0.lock().unwrap().push((bytes, end));
        }
    }

    /// Records every frame it is told of, and its end, under its own name.
    #[derive(Clone)]
    struct Watcher {
        name: &'static str,
        log: Arc<Mutex<Vec<String>>>,
    }
    impl Observer for Watcher {
        fn on_data(&mut self, data: &Bytes) {
            self.log.lock().unwrap().push(format!("{} data {}", self.name, String::from_utf8_lossy(data)));
        }
        fn on_end(self: Box<Self>, bytes: u64, end: End) {
            self.log.lock().unwrap().push(format!("{} end {bytes} {end:?}", self.name));
        }
    }

    fn watched(body: &mut Body) -> Arc<Mutex<Vec<String>>> {
        let log = Arc::new(Mutex::new(Vec::new()));
        for name in ["a", "b", "c"] {
            body.observe(Box::new(Watcher { name, log: log.clone() }));
        }
        log
    }

    fn stream_of(items: Vec<Result<&'static str, Stop>>) -> Body {
        let frames: Vec<Result<Frame<Bytes>, BodyError>> = items
            .into_iter()
            .map(|i| i.map(|s| Frame::data(Bytes::from_static(s.as_bytes()))).map_err(BodyError))
            .collect();
        Body::stream(StreamBody::new(futures_stream(frames)))
    }

    #[tokio::test]
    async fn every_observer_sees_every_frame_and_one_end() {
        let mut b = stream_of(vec![Ok("he"), Ok("llo")]);
        let log = watched(&mut b);
        let out = b.collect().await.unwrap().to_bytes();
        assert_eq!(out, "hello");
        let log = log.lock().unwrap().clone();
        for name in ["a", "b", "c"] {
            let mine: Vec<&String> = log.iter().filter(|l| l.starts_with(name)).collect();
            assert_eq!(
                mine,
                [&format!("{name} data he"), &format!("{name} data llo"), &format!("{name} end 5 Complete")]
            );
        }
    }

    #[tokio::test]
    async fn observers_see_a_stopped_stream_end_once() {
        let mut b = stream_of(vec![Ok("he"), Err(Stop::Broken), Ok("never")]);
        let log = watched(&mut b);
        assert!(b.collect().await.is_err());
        let log = log.lock().unwrap().clone();
        let ends: Vec<&String> = log.iter().filter(|l| l.contains(" end ")).collect();
        assert_eq!(ends, ["a end 2 Stopped(Broken)", "b end 2 Stopped(Broken)", "c end 2 Stopped(Broken)"]);
    }

    #[tokio::test]
    async fn observers_see_the_client_leave_mid_stream_once() {
        let mut b = stream_of(vec![Ok("he"), Ok("llo")]);
        let log = watched(&mut b);
        let first = b.frame().await.unwrap().unwrap();
        assert_eq!(first.data_ref().unwrap(), "he");
        drop(b);
        let log = log.lock().unwrap().clone();
        assert_eq!(
            log,
            [
                "a data he",
                "b data he",
                "c data he",
                "a end 2 ClientGone",
                "b end 2 ClientGone",
                "c end 2 ClientGone"
            ]
        );
    }

    #[tokio::test]
    async fn full_body_reports_complete_once() {
        let seen = Seen::default();
        let mut b = Body::full("hello");
        b.observe(Box::new(seen.clone()));
        let out = b.collect().await.unwrap().to_bytes();
        assert_eq!(out, "hello");
        assert_eq!(*seen.0.lock().unwrap(), vec![(5, End::Complete)]);
    }

    #[tokio::test]
    async fn dropped_unfinished_body_reports_client_gone() {
        let seen = Seen::default();
        let mut b = Body::full("hello");
        b.observe(Box::new(seen.clone()));
        drop(b);
        assert_eq!(*seen.0.lock().unwrap(), vec![(0, End::ClientGone)]);
    }

    #[tokio::test(start_paused = true)]
    async fn guarded_limits_and_times_out() {
        let chunks = vec![Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"12345")))];
        let flag = StopFlag::default();
        let g = Guarded::new(
            StreamBody::new(futures_stream(chunks)),
            Duration::from_secs(1),
            Some(4),
            Some(flag.clone()),
        );
        let err = g.collect().await.err().unwrap();
        assert_eq!(err.0, Stop::TooLarge);
        assert_eq!(flag.get(), Some(Stop::TooLarge));

        let pending = http_body_util::StreamBody::new(PendingStream);
        let g = Guarded::new(pending, Duration::from_secs(3), None, None);
        let err = g.collect().await.err().unwrap();
        assert_eq!(err.0, Stop::Idle);
    }

    fn futures_stream<T: Unpin>(items: Vec<T>) -> Iter<std::vec::IntoIter<T>> {
        Iter(items.into_iter())
    }

    struct Iter<I>(I);
    impl<I: Iterator + Unpin> futures_core::Stream for Iter<I> {
        type Item = I::Item;
        fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<I::Item>> {
            Poll::Ready(self.0.next())
        }
    }

    struct PendingStream;
    impl futures_core::Stream for PendingStream {
        type Item = Result<Frame<Bytes>, std::convert::Infallible>;
        fn poll_next(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            Poll::Pending
        }
    }
}
