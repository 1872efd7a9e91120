//! Bounded reads of upstream bodies: whatever an upstream sends, what is kept in memory for one
//! response has a size bound, checked on the declared length first and on the bytes as they come.

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use reqwest::Response;

use crate::error::EngineError;

/// A tags-list page (Distribution pages them; a registry that sends all tags in one page still
/// fits: 4 MiB is some 100 000 tags).
pub const MAX_TAGS_PAGE: usize = 4 << 20;
/// Tags kept for one list, over all pages.
pub const MAX_TAGS: usize = 200_000;
/// A token endpoint's answer (a JWT with its claims is a few KiB).
pub const MAX_TOKEN: usize = 256 << 10;

/// The body of `resp`, or a permanent error once it is known to exceed `max` bytes (before
/// reading anything when the upstream declares its length; else as soon as the bytes pass it);
/// a body cut short is a transient error.
pub async fn read_body(resp: Response, max: usize, what: &str) -> Result<Bytes, EngineError> {
    let too_large = || EngineError::permanent(format!("{what} larger than {max} bytes"));
    if resp.content_length().is_some_and(|l| l > max as u64) {
        return Err(too_large());
    }
    let cap = resp.content_length().unwrap_or(0).min(max as u64) as usize;
    let mut body = BytesMut::with_capacity(cap);
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(EngineError::from_reqwest)?;
        if body.len() + chunk.len() > max {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}
