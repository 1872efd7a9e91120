//! The response body type: a full buffer or a stream of chunks. A stream that fails mid-way makes
//! hyper abort the response (no clean end), which is how a client learns its bytes were bad.

use bytes::Bytes;
use futures::TryStreamExt;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;

use crate::engine::ByteStream;
use crate::error::BoxError;

pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed_unsync()
}

pub fn empty() -> Body {
    Empty::new().map_err(|e| match e {}).boxed_unsync()
}

pub fn stream(s: ByteStream) -> Body {
    StreamBody::new(
        s.map_ok(Frame::data)
            .map_err(|e| -> BoxError { Box::new(e) }),
    )
    .boxed_unsync()
}
