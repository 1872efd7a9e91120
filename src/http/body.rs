//! The body types. Responses are an enum rather than one boxed stream so that the plain HTTP/1.1
//! front ([`super::fast`]) can see what it is sending: a local file slice goes out with
//! `sendfile` and a small buffer in the same write as the head, where hyper would copy both
//! through user space. Under hyper (TLS, HTTP/2) every variant is an ordinary body. A stream that
//! fails mid-way makes the sender abort the response (no clean end), which is how a client learns
//! its bytes were bad.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::{Stream, TryStreamExt};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, StreamBody};
use hyper::body::{Frame, Incoming, SizeHint};

use crate::engine::ByteStream;
use crate::error::BoxError;
use crate::fileio::FileSlice;
use crate::pull::fill::FillReader;

/// A response body.
pub enum Body {
    Empty,
    /// Taken (left `None`) once sent.
    Full(Option<Bytes>),
    File(FileBody),
    /// A blob as its fill brings it.
    Fill(FillBody),
    Stream(UnsyncBoxBody<Bytes, BoxError>),
}

pub fn full(b: impl Into<Bytes>) -> Body {
    let b = b.into();
    if b.is_empty() {
        Body::Empty
    } else {
        Body::Full(Some(b))
    }
}

pub fn empty() -> Body {
    Body::Empty
}

pub fn stream(s: ByteStream) -> Body {
    Body::Stream(
        StreamBody::new(
            s.map_ok(Frame::data)
                .map_err(|e| -> BoxError { Box::new(e) }),
        )
        .boxed_unsync(),
    )
}

/// `len` bytes of a fill in progress; `sent` is told the size of each piece that goes out.
pub fn fill(reader: FillReader, len: u64, sent: impl Fn(u64) + Send + 'static) -> Body {
    Body::Fill(FillBody {
        reader: Some(reader),
        len,
        sent: Box::new(sent),
        stream: None,
    })
}

/// A slice of a local file; `sent` is told the size of each piece that goes out (metrics).
pub fn file(slice: FileSlice, sent: impl Fn(u64) + Send + 'static) -> Body {
    Body::File(FileBody {
        slice,
        sent: Box::new(sent),
        reader: None,
    })
}

/// A file slice, with what a sender needs either way: the file for `sendfile`, or a chunked
/// reader created at the first poll (a `sendfile` sender never polls it).
pub struct FileBody {
    pub slice: FileSlice,
    pub sent: Box<dyn Fn(u64) + Send>,
    reader: Option<ByteStream>,
}

/// A fill's bytes: pieces for a sender that can take file ranges, or a stream of chunks made at
/// the first poll.
pub struct FillBody {
    /// Taken by the plain front, or turned into `stream` at the first poll.
    pub reader: Option<FillReader>,
    pub len: u64,
    pub sent: Box<dyn Fn(u64) + Send>,
    stream: Option<ByteStream>,
}

/// The next chunk of `s` as a frame, told to `sent` as it goes.
fn poll_counted(
    s: &mut ByteStream,
    sent: &(dyn Fn(u64) + Send),
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    match Pin::new(s).poll_next(cx) {
        Poll::Ready(Some(Ok(b))) => {
            sent(b.len() as u64);
            Poll::Ready(Some(Ok(Frame::data(b))))
        }
        Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
        Poll::Ready(None) => Poll::Ready(None),
        Poll::Pending => Poll::Pending,
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream(s) => Pin::new(s).poll_frame(cx),
            Body::Fill(f) => {
                if f.stream.is_none() {
                    f.stream = f.reader.take().map(FillReader::into_stream);
                }
                match f.stream.as_mut() {
                    Some(stream) => poll_counted(stream, &*f.sent, cx),
                    None => Poll::Ready(None),
                }
            }
            Body::File(f) => {
                let reader = f.reader.get_or_insert_with(|| f.slice.stream());
                poll_counted(reader, &*f.sent, cx)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(b) => b.is_none(),
            Body::Stream(s) => s.is_end_stream(),
            Body::File(f) => f.slice.len == 0,
            Body::Fill(f) => f.len == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Stream(s) => s.size_hint(),
            Body::File(f) => SizeHint::with_exact(f.slice.len),
            Body::Fill(f) => SizeHint::with_exact(f.len),
        }
    }
}

/// A request body: hyper's, or none (requests the plain HTTP/1.1 front handles itself have no
/// body).
pub enum RequestBody {
    Hyper(Incoming),
    Empty,
}

impl hyper::body::Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Hyper(b) => Pin::new(b).poll_frame(cx),
            RequestBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Hyper(b) => b.is_end_stream(),
            RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Hyper(b) => b.size_hint(),
            RequestBody::Empty => SizeHint::with_exact(0),
        }
    }
}
