//! The request body sent upstream.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

/// rewrote (a JSON body with a field added) and sends whole. `upstream::rewrite_body` sets the
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

impl From<hyper::body::Incoming> for Outgoing {
    fn from(b: hyper::body::Incoming) -> Outgoing {
        Outgoing::Client(b)
    }
}
