//! `Body`, the response body of every public-listener response, and its observers.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

use super::{BodyError, Guarded, Stop};
use crate::upstream::UpstreamBody;

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
    /// The upstream's response, the body of nearly every response: named rather than a `dyn`
    /// stream, so that its `poll_frame` is inlined into `Body::poll_frame` (measured with
    /// `benches/load/profile.sh h1`: ~220 of ~51,000 instructions per request). Still boxed: a
    /// `Body` this large moved by value through hyper costs more in copies than the allocation.
    Upstream(Pin<Box<Guarded<UpstreamBody>>>),
    Stream(BoxStream),
}

/// The response body of every public-listener response.
pub struct Body {
    inner: Inner,
    bytes: u64,
    /// The observers, as one: a second one is paired with the first (`Both`). A list would
    /// cost an allocation per response even for one, or, kept beside the first, 24 bytes more
    /// (88 instead of 64) of a `Body` that hyper moves by value several times per response.
    observer: Option<Box<dyn Observer>>,
}

/// Two observers told in turn, the earlier first: how a body carries more than one (rare).
struct Both(Box<dyn Observer>, Box<dyn Observer>);

impl Observer for Both {
    fn on_data(&mut self, data: &Bytes) {
        self.0.on_data(data);
        self.1.on_data(data);
    }

    fn on_end(self: Box<Self>, bytes: u64, end: End) {
        let Both(first, second) = *self;
        first.on_end(bytes, end);
        second.on_end(bytes, end);
    }
}

impl Body {
    pub fn full(bytes: impl Into<Bytes>) -> Body {
        Body { inner: Inner::Full(Some(bytes.into())), bytes: 0, observer: None }
    }

    pub fn empty() -> Body {
        Body { inner: Inner::Full(None), bytes: 0, observer: None }
    }

    /// The upstream's streamed response.
    pub fn upstream(body: Guarded<UpstreamBody>) -> Body {
        Body { inner: Inner::Upstream(Box::pin(body)), bytes: 0, observer: None }
    }

    /// A stream of any other source.
    pub fn stream(body: impl HttpBody<Data = Bytes, Error = BodyError> + Send + 'static) -> Body {
        Body { inner: Inner::Stream(Box::pin(body)), bytes: 0, observer: None }
    }

    /// Adds an observer. If the body is already empty, its end is reported when hyper polls
    /// the body or drops it.
    pub fn observe(&mut self, o: Box<dyn Observer>) {
        self.observer = Some(match self.observer.take() {
            None => o,
            Some(earlier) => Box::new(Both(earlier, o)),
        });
    }

    fn end(&mut self, end: End) {
        if let Some(o) = self.observer.take() {
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
            Inner::Upstream(s) => s.as_mut().poll_frame(cx),
            Inner::Stream(s) => s.as_mut().poll_frame(cx),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                    if let Some(o) = &mut this.observer {
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
            Inner::Upstream(s) => s.is_end_stream(),
            Inner::Stream(s) => s.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Inner::Full(None) => SizeHint::with_exact(0),
            Inner::Upstream(s) => s.size_hint(),
            Inner::Stream(s) => s.size_hint(),
        }
    }
}
