//! A minimum rate for blob streams from engines: a source that trickles (sends, but slower than
//! the rate) is treated like one whose stream was cut, so the fill moves to the next engine and
//! resumes at the byte reached. Only time spent waiting on the source counts: a fill held up by
//! its own disk is not the source's fault.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use tokio::time::{Instant, Sleep};

use crate::engine::ByteStream;
use crate::error::{EngineError, Error, Result};

/// The rate a blob stream must keep: at least `bytes` in each `window` of waiting on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MinRate {
    pub bytes: u64,
    pub window: Duration,
}

impl Default for MinRate {
    /// 32 KiB/s over 10 s: far below any link a registry is pulled over, far above a trickle.
    fn default() -> MinRate {
        MinRate {
            bytes: 320 << 10,
            window: Duration::from_secs(10),
        }
    }
}

/// The message of the error a too-slow stream ends with.
pub const TOO_SLOW: &str = "slower than the minimum rate";

/// Why a guarded engine stream failed: the source's own fault, transient (a later request may be
/// fast), but the fill does not ask the same source again at once.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TooSlow(String);

impl TooSlow {
    /// Whether `e` is the failure of a stream [`guard`] found too slow.
    pub fn is(e: &Error) -> bool {
        matches!(e.engine_error(), Some(EngineError::Transient(s)) if s.is::<TooSlow>())
    }
}

/// `inner`, failing with a transient [`TooSlow`] error of `engine` once a window of waiting
/// brought fewer bytes than the rate asks.
pub fn guard(inner: ByteStream, rate: MinRate, engine: &str) -> ByteStream {
    let engine = engine.to_string();
    guard_with(inner, rate, move |m| {
        Error::engine(&engine, EngineError::transient(TooSlow(m)))
    })
}

/// [`guard`] failing with the error `fail` makes of the message (a client's request body: a
/// client error).
pub fn guard_with(
    inner: ByteStream,
    rate: MinRate,
    fail: impl Fn(String) -> Error + Send + 'static,
) -> ByteStream {
    Box::pin(Guarded {
        inner,
        rate,
        fail: Box::new(fail),
        got: 0,
        waited: Duration::ZERO,
        pending_since: None,
        timer: Box::pin(tokio::time::sleep(rate.window)),
        failed: false,
    })
}

struct Guarded {
    inner: ByteStream,
    rate: MinRate,
    fail: Box<dyn Fn(String) -> Error + Send>,
    /// Bytes in the current window.
    got: u64,
    /// Time spent waiting on `inner` in the current window (not counting the current wait).
    waited: Duration,
    /// When the current wait began (the last `Pending`).
    pending_since: Option<Instant>,
    timer: Pin<Box<Sleep>>,
    failed: bool,
}

impl Guarded {
    /// Closes the window if it is over: `false` when it brought too few bytes.
    fn window_ok(&mut self, now: Instant) -> bool {
        let current = self.pending_since.map_or(Duration::ZERO, |t| now - t);
        if self.waited + current < self.rate.window {
            return true;
        }
        if self.got < self.rate.bytes {
            return false;
        }
        self.got = 0;
        self.waited = Duration::ZERO;
        self.pending_since = self.pending_since.map(|_| now);
        true
    }

    fn too_slow(&mut self) -> Poll<Option<Result<Bytes>>> {
        self.failed = true;
        let msg = format!(
            "{TOO_SLOW} ({} bytes in {:?})",
            self.rate.bytes, self.rate.window
        );
        Poll::Ready(Some(Err((self.fail)(msg))))
    }
}

impl Stream for Guarded {
    type Item = Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let me = &mut *self;
        if me.failed {
            return Poll::Ready(None);
        }
        let polled = me.inner.as_mut().poll_next(cx);
        let now = Instant::now();
        match polled {
            Poll::Ready(item) => {
                if let Some(t) = me.pending_since.take() {
                    me.waited += now - t;
                }
                if let Some(Ok(c)) = &item {
                    me.got += c.len() as u64;
                    if !me.window_ok(now) {
                        return me.too_slow();
                    }
                }
                Poll::Ready(item)
            }
            Poll::Pending => {
                let since = *me.pending_since.get_or_insert(now);
                loop {
                    if !me.window_ok(now) {
                        return me.too_slow();
                    }
                    let since = me.pending_since.unwrap_or(since);
                    let left = me.rate.window.saturating_sub(me.waited + (now - since));
                    me.timer.as_mut().reset(now + left);
                    if me.timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn rate() -> MinRate {
        MinRate {
            bytes: 1000,
            window: Duration::from_millis(300),
        }
    }

    fn chunks(n: usize, size: usize, every: Duration) -> ByteStream {
        Box::pin(futures::stream::iter(0..n).then(move |_| async move {
            tokio::time::sleep(every).await;
            Ok(Bytes::from(vec![7u8; size]))
        }))
    }

    async fn drain(mut s: ByteStream, pause: Duration) -> (u64, Option<String>) {
        let mut got = 0;
        while let Some(item) = s.next().await {
            match item {
                Ok(c) => got += c.len() as u64,
                Err(e) => return (got, Some(e.to_string())),
            }
            tokio::time::sleep(pause).await;
        }
        (got, None)
    }

    #[tokio::test]
    async fn a_trickle_fails_within_a_window_or_two() {
        let t = Instant::now();
        let s = guard(chunks(1000, 1, Duration::from_millis(20)), rate(), "up");
        let (got, err) = drain(s, Duration::ZERO).await;
        assert!(
            err.is_some_and(|e| e.contains(TOO_SLOW)),
            "a trickle passed"
        );
        assert!(got < 100, "{got}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    #[tokio::test]
    async fn a_stall_fails() {
        let s = guard(chunks(2, 10, Duration::from_secs(5)), rate(), "up");
        let t = Instant::now();
        let (_, err) = drain(s, Duration::ZERO).await;
        assert!(err.is_some());
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    #[tokio::test]
    async fn a_fast_source_passes() {
        let s = guard(chunks(50, 4000, Duration::from_millis(20)), rate(), "up");
        assert_eq!(drain(s, Duration::ZERO).await, (200_000, None));
    }

    #[tokio::test]
    async fn a_slow_reader_is_not_the_source_s_fault() {
        // Every chunk is ready at once; the reader takes 100 ms for each.
        let s = guard(chunks(10, 10, Duration::ZERO), rate(), "up");
        assert_eq!(drain(s, Duration::from_millis(100)).await, (100, None));
    }
}
