//! `Guarded`: a body passed through frame by frame with an idle timeout between frames and an
//! optional byte limit, and why it stopped (`Stop`, recorded in a `StopFlag`).

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
                            t.as_mut().reset(deadline(*this.idle));
                        }
                        t
                    }
                    None => this.timer.insert(Box::pin(tokio::time::sleep_until(deadline(*this.idle)))),
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

/// `idle` from now; a duration too large to add (a config of billions of years) waits
/// practically forever instead of panicking.
fn deadline(idle: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(idle).unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}
