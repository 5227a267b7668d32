//! The body types' tests: observers, guards.
#![allow(clippy::unwrap_used)]

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};

use super::*;

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

/// An idle timeout too large to add to the clock waits instead of panicking (found by fuzzing
/// the config: `stream_idle_timeout: 18446744073709551615s` panicked every paused stream).
#[tokio::test]
async fn a_huge_idle_timeout_does_not_overflow_the_clock() {
    /// Pending, then one frame, then pending for good: the timer is armed, then re-armed.
    struct Pauses(u8);
    impl futures_core::Stream for Pauses {
        type Item = Result<Frame<Bytes>, std::convert::Infallible>;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.0 += 1;
            match self.0 {
                2 => Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x"))))),
                1 => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                _ => Poll::Pending,
            }
        }
    }
    let g = Guarded::new(StreamBody::new(Pauses(0)), Duration::MAX, None, None);
    let waited = tokio::time::timeout(Duration::from_millis(50), g.collect()).await;
    assert!(waited.is_err(), "the body should still be waiting");
}

/// hyper moves a response's `Body` by value several times per response: more observers must
/// not make every body larger (see `Body::observer`).
#[test]
fn a_body_stays_small() {
    assert!(std::mem::size_of::<Body>() <= 64, "Body is {} bytes", std::mem::size_of::<Body>());
}
