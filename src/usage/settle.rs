//! The end of an LLM response settles what its request held (§12): the reported usage
//! replaces the token reservation; without usage the estimate stands (counted in
//! `tollgate_usage_unreported_total{reason}`); an upstream that failed before any byte is
//! refunded; a client that left mid-stream is charged at least its reservation. The
//! concurrency slot goes back at the same moment, exactly once (the hold is consumed).
//!
//! Two shapes: an observer of the response body (the meter only looks), or — when tollgate
//! asked for the usage the client did not — a body that drops the usage-only chunk, and
//! settles in its own end.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame};
use prometheus::IntCounterVec;

use super::meter::{Meter, Usage};
use crate::body::{Body, BodyError, End, Observer};
use crate::limits::Hold;

/// The metrics a settlement writes.
#[derive(Clone)]
pub struct Counters {
    pub tokens: IntCounterVec,
    pub unreported: IntCounterVec,
    pub tier: Arc<str>,
}

/// Settles `hold` for a body that ended so (`bytes` sent to the client).
fn settle(hold: Hold, usage: Option<Usage>, bytes: u64, end: &End, c: &Counters) {
    if !hold.counts_tokens() {
        return drop(hold);
    }
    let reserved = hold.reserved();
    match (usage, end) {
        (Some(u), End::ClientGone) => {
            count(c, u);
            hold.settle(u.total().max(reserved));
        }
        (Some(u), _) => {
            count(c, u);
            hold.settle(u.total());
        }
        // The upstream failed before any byte: nothing was produced, nothing is charged.
        (None, End::Stopped(_)) if bytes == 0 => drop(hold),
        (None, end) => {
            let reason = match end {
                End::Complete => "missing",
                End::ClientGone => "client_gone",
                End::Stopped(_) => "stopped",
            };
            c.unreported.with_label_values(&[reason]).inc();
            hold.settle(reserved);
        }
    }
}

fn count(c: &Counters, u: Usage) {
    c.tokens.with_label_values(&[&c.tier, "prompt"]).inc_by(u.prompt);
    c.tokens.with_label_values(&[&c.tier, "completion"]).inc_by(u.completion);
}

/// The observer shape: looks at every frame, settles at the end.
pub struct Settle {
    hold: Option<Hold>,
    meter: Meter,
    counters: Counters,
}

impl Settle {
    pub fn new(hold: Hold, meter: Meter, counters: Counters) -> Settle {
        Settle { hold: Some(hold), meter, counters }
    }
}

impl Observer for Settle {
    fn on_data(&mut self, data: &Bytes) {
        self.meter.feed(data);
    }

    fn on_end(mut self: Box<Self>, bytes: u64, end: End) {
        let (usage, _) = self.meter.finish();
        if let Some(hold) = self.hold.take() {
            settle(hold, usage, bytes, &end, &self.counters);
        }
    }
}

/// The stripping shape: the upstream's SSE body without the usage-only chunk.
pub struct Stripped {
    inner: Body,
    state: Arc<Mutex<Option<Strip>>>,
}

struct Strip {
    meter: Meter,
    hold: Hold,
    counters: Counters,
    sent: u64,
}

impl Stripped {
    pub fn new(inner: Body, hold: Hold, meter: Meter, counters: Counters) -> Stripped {
        Stripped { inner, state: Arc::new(Mutex::new(Some(Strip { meter, hold, counters, sent: 0 }))) }
    }

    fn end(&self, end: End) -> Option<Bytes> {
        let taken = self.state.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut s = taken?;
        let (usage, rest) = s.meter.finish();
        settle(s.hold, usage, s.sent, &end, &s.counters);
        rest.filter(|r| !r.is_empty())
    }
}

impl HttpBody for Stripped {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => {
                    let frame = match frame.into_data() {
                        Ok(data) => {
                            let mut guard = this.state.lock().unwrap_or_else(|e| e.into_inner());
                            let Some(s) = guard.as_mut() else {
                                return Poll::Ready(Some(Ok(Frame::data(data))));
                            };
                            let out = s.meter.feed(&data).unwrap_or(data);
                            if out.is_empty() {
                                // Held (half an event) or dropped (the usage-only chunk).
                                continue;
                            }
                            s.sent += out.len() as u64;
                            Frame::data(out)
                        }
                        Err(other) => other,
                    };
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(Some(Err(e))) => {
                    let _ = this.end(End::Stopped(e.0));
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    return Poll::Ready(this.end(End::Complete).map(|rest| Ok(Frame::data(rest))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream() && self.state.lock().map_or(true, |s| s.is_none())
    }
}

impl Drop for Stripped {
    fn drop(&mut self) {
        // Dropped before its end: the client left.
        let _ = self.end(End::ClientGone);
    }
}
