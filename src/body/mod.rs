//! Body types of both directions, streamed frame by frame and never buffered: every frame is
//! passed on as soon as it is polled, so a server-sent event leaves tollgate when it arrives.
//!
//! - `guard` — `Guarded`: a hyper body with an idle timeout and an optional size limit;
//! - `outgoing` — the request body sent upstream: the client's stream, or a rewritten one;
//! - `response` — `Body`, the one response type, and the `Observer`s it tells of every data
//!   frame and of its end (bytes sent, how it ended), exactly once each.

mod guard;
mod outgoing;
mod response;

pub use guard::{BodyError, Guarded, Stop, StopFlag};
pub use outgoing::Outgoing;
pub use response::{Body, BoxStream, End, Observer};

#[cfg(test)]
mod tests;
