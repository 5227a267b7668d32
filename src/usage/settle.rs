//! The end of an LLM response settles what its request held (§12): the reported usage
//! replaces the token reservation; without usage the estimate stands (counted in
//! `tollgate_usage_unreported_total{reason}`); an upstream that failed before any byte is
//! refunded; a client that left mid-stream is charged at least its reservation. The
//! concurrency slot goes back at the same moment, exactly once (the hold is consumed).
//!
//! Two shapes: an observer of the response body (the meter only looks, the hold settles at
//! once: this replica's), or a body that settles in its own end — when tollgate asked for the
//! usage the client did not (it drops the usage-only chunk), or when the fleet settles (in
//! Redis: the last bytes wait until it has, so the client's next request sees it).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame};
use prometheus::IntCounterVec;

use super::meter::{Meter, Usage};
use crate::body::{Body, BodyError, End, Observer};
use crate::limits::{Hold, Settling};
use crate::metrics::TierMetrics;

/// The metrics a settlement writes.
#[derive(Clone)]
pub struct Counters {
    /// The tier's `tollgate_tokens_total` series.
    pub tier: Arc<TierMetrics>,
    pub unreported: IntCounterVec,
}

/// Settles `hold` for a body that ended so (`bytes` sent to the client); returns what a shared
/// backend still has to apply.
fn settle(hold: Hold, usage: Option<Usage>, bytes: u64, end: &End, c: &Counters) -> Option<Settling> {
    if !hold.counts_tokens() {
        return hold.release();
    }
    let reserved = hold.reserved();
    match (usage, end) {
        (Some(u), End::ClientGone) => {
            count(c, u);
            hold.settle(u.total().max(reserved))
        }
        (Some(u), _) => {
            count(c, u);
            hold.settle(u.total())
        }
        // The upstream failed before any byte: nothing was produced, nothing is charged.
        (None, End::Stopped(_)) if bytes == 0 => hold.release(),
        (None, end) => {
            let reason = match end {
                End::Complete => "missing",
                End::ClientGone => "client_gone",
                End::Stopped(_) => "stopped",
            };
            c.unreported.with_label_values(&[reason]).inc();
            hold.settle(reserved)
        }
    }
}

fn count(c: &Counters, u: Usage) {
    c.tier.prompt_tokens.inc_by(u.prompt);
    c.tier.completion_tokens.inc_by(u.completion);
}

/// The observer shape: looks at every frame, settles at the end (a hold of this replica's).
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
            // This replica's hold: settled now, nothing to wait for.
            let _ = settle(hold, usage, bytes, &end, &self.counters);
        }
    }
}

/// The body shape: the upstream's body, without the usage-only chunk when stripping, whose
/// last bytes wait for a shared backend's settlement (`Settling`).
pub struct Metered {
    inner: Body,
    state: Option<Strip>,
    /// The settlement the last frames wait for.
    settling: Option<Settling>,
    /// The last frames, once the settlement is applied.
    last: VecDeque<Frame<Bytes>>,
}

struct Strip {
    meter: Meter,
    hold: Hold,
    counters: Counters,
    sent: u64,
}

impl Metered {
    pub fn new(inner: Body, hold: Hold, meter: Meter, counters: Counters) -> Metered {
        Metered {
            inner,
            state: Some(Strip { meter, hold, counters, sent: 0 }),
            settling: None,
            last: VecDeque::new(),
        }
    }

    /// Settles; returns what the meter still held (an event without its final blank line).
    fn end(&mut self, end: End) -> Option<Bytes> {
        let mut s = self.state.take()?;
        let (usage, rest) = s.meter.finish();
        self.settling = settle(s.hold, usage, s.sent, &end, &s.counters);
        rest.filter(|r| !r.is_empty())
    }

    /// The body ended completely after `frame`: settled, and `frame` and what the meter held
    /// wait for the settlement.
    fn complete(&mut self, frame: Option<Frame<Bytes>>, cx: &mut Context<'_>) -> Poll<Option<Frame<Bytes>>> {
        let rest = self.end(End::Complete).map(Frame::data);
        match frame {
            // Trailers stay last.
            Some(f) if !f.is_data() => self.last.extend(rest.into_iter().chain([f])),
            f => self.last.extend(f.into_iter().chain(rest)),
        }
        self.release(cx)
    }

    /// The last frames, one per poll, once the settlement is applied.
    fn release(&mut self, cx: &mut Context<'_>) -> Poll<Option<Frame<Bytes>>> {
        if let Some(settling) = &mut self.settling {
            ready!(settling.as_mut().poll(cx));
            self.settling = None;
        }
        Poll::Ready(self.last.pop_front())
    }
}

impl HttpBody for Metered {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if this.state.is_none() {
            if this.settling.is_some() || !this.last.is_empty() {
                return this.release(cx).map(|f| f.map(Ok));
            }
            return Pin::new(&mut this.inner).poll_frame(cx);
        }
        loop {
            let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => {
                    let _ = this.end(End::Stopped(e.0));
                    return Poll::Ready(Some(Err(e)));
                }
                None => return this.complete(None, cx).map(|f| f.map(Ok)),
            };
            let ended = this.inner.is_end_stream();
            let frame = match (frame.into_data(), this.state.as_mut()) {
                (Ok(data), Some(s)) => {
                    // Fed to the meter; when stripping, what the client gets of it.
                    let out = s.meter.feed(&data).unwrap_or(data);
                    s.sent += out.len() as u64;
                    // Held (half an event) or dropped (the usage-only chunk).
                    (!out.is_empty()).then(|| Frame::data(out))
                }
                (Ok(data), None) => Some(Frame::data(data)),
                (Err(other), _) => Some(other),
            };
            if ended {
                // A body of known length ends with its last frame: that frame waits.
                return this.complete(frame, cx).map(|f| f.map(Ok));
            }
            if let Some(frame) = frame {
                return Poll::Ready(Some(Ok(frame)));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state.is_none() && self.settling.is_none() && self.last.is_empty() && self.inner.is_end_stream()
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        // Dropped before its end: the client left (nobody waits for the settlement).
        let _ = self.end(End::ClientGone);
    }
}
