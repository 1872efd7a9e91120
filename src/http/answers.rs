//! The answer memo of the plain HTTP/1.1 front: a small answer (a blob `HEAD`, a manifest `GET`
//! or `HEAD`, by digest or by tag) is kept, ready to write, for a tenth of a second, so that a
//! storm of identical requests (a fleet pulling one image, a CDN revalidating, a mirror client
//! probing a layer) costs one pass through the request path per tenth of a second and thread,
//! not one per request. Measured: the request path is about 40% of the work of a small answer;
//! the parse, the syscalls and the write are the rest.
//!
//! What keeps it exact:
//!
//! * the key is everything the answer depends on: the method, the path with its query (`ns`),
//!   and the `Accept` values; a request with `Range`, `If-Range` or `If-None-Match` is not
//!   answered from here, nor is any request when `auth:` is configured (who may see what is
//!   decided per request);
//! * only `200` answers with a complete, small body are kept, never a stale tag (`Age`);
//! * every write through the app's engines (a push, a tag move, a delete, a fill's commit)
//!   moves the [`Generation`] of their caching engines once it is made, and an answer is used
//!   only while the generation is the one read before it was made: a write is seen by the very
//!   next request;
//! * a tag answer is kept at most `tag_ttl` when that is shorter than the memo's tenth of a
//!   second.
//!
//! What it does not repeat: the eviction index's recency touch and the repository link check
//! of a local hit happen once per tenth of a second instead of per request (both only need to
//! have happened recently). A write through another process sharing the storage is seen within
//! the tenth of a second (a blob it stores meanwhile is named by its old source: same size, same
//! bytes). An answer from here gets no request
//! span; the request counter, its latency histogram, the hit/miss counters and the bytes served
//! are recorded for every answer.
//!
//! The memo is per thread (no lock, no shared cache line on the hot path) and bounded: at most
//! `MAX_ENTRIES` answers and `MAX_BYTES` of them per thread.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header;
use http::{Method, Response, StatusCode};

use super::body::Body;
use super::headers as h;
use super::route::{self, Route};
use crate::engine::caching::Generation;
use crate::oci::Reference;

/// How long an answer is reused.
const TTL: Duration = Duration::from_millis(100);
/// Answers kept per thread.
const MAX_ENTRIES: usize = 256;
/// Bytes of answers (heads and bodies) kept per thread (a runtime has a thread per core: this
/// times the cores bounds the memo).
const MAX_BYTES: usize = 512 << 10;
/// A larger body is not kept (a manifest list of hundreds of platforms is rare and not hot).
const MAX_BODY: usize = 64 << 10;

/// Tells apart the apps of one process (tests run several).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// One app's view of the per-thread memo.
pub struct AnswerMemo {
    id: u64,
    /// The count of writes of the app's engines: an answer is used only under the count it
    /// was made under.
    generation: Generation,
    /// Tag answers are kept no longer than this.
    tag_ttl: Duration,
    enabled: bool,
}

/// The hit/miss counters an answer records each time it is used: what the request path records
/// for a fresh answer of this kind from this source (a blob `HEAD` that no local copy answers is
/// a miss each time; a manifest is kept only once it is local).
type Events = &'static [(&'static str, &'static str)];

/// A ready answer.
pub struct Answer {
    /// Status line and headers, without `date`, `x-request-id`, `connection` and the blank line.
    pub head: Bytes,
    /// Empty for `HEAD`.
    pub body: Bytes,
    /// The route label of the request metrics.
    pub route: &'static str,
    pub events: Events,
    pub source: Arc<str>,
    expires: Instant,
    writes: u64,
}

struct Memo {
    map: HashMap<Box<[u8]>, Arc<Answer>>,
    bytes: usize,
}

thread_local! {
    static MEMO: RefCell<Memo> = RefCell::new(Memo { map: HashMap::new(), bytes: 0 });
}

impl AnswerMemo {
    pub fn new(tag_ttl: Duration, enabled: bool, generation: Generation) -> AnswerMemo {
        AnswerMemo {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            generation,
            tag_ttl,
            enabled,
        }
    }

    /// The count of writes now: read before a request is handled, given to [`AnswerMemo::put`].
    pub fn generation(&self) -> u64 {
        self.generation.now()
    }

    /// Writes the memo key of a request into `key`; `false` when its answer may not come from
    /// the memo (nor go into it). `conditional`: the request has `Range`, `If-Range` or
    /// `If-None-Match`.
    pub fn key<'a>(
        &self,
        method: &Method,
        path_and_query: &str,
        accept: impl Iterator<Item = &'a [u8]>,
        conditional: bool,
        key: &mut Vec<u8>,
    ) -> bool {
        let method = match *method {
            Method::GET => b'G',
            Method::HEAD => b'H',
            _ => return false,
        };
        if !self.enabled || conditional || !path_and_query.starts_with("/v2/") {
            return false;
        }
        key.clear();
        key.extend_from_slice(&self.id.to_le_bytes());
        key.push(method);
        key.extend_from_slice(path_and_query.as_bytes());
        for v in accept {
            key.push(b'\n');
            key.extend_from_slice(v);
        }
        true
    }

    /// The answer kept under `key`, if it is still good.
    pub fn get(&self, key: &[u8]) -> Option<Arc<Answer>> {
        MEMO.with(|m| {
            let mut m = m.borrow_mut();
            let a = m.map.get(key)?;
            if a.writes == self.generation.now() && Instant::now() < a.expires {
                return Some(a.clone());
            }
            let size = a.head.len() + a.body.len();
            m.map.remove(key);
            m.bytes -= size;
            None
        })
    }

    /// Makes an answer of `resp` (the answer to `method` on `path`, handled while the write count
    /// was `writes_before`) and keeps it under `key`; `None` when it is not one to keep.
    pub fn put(
        &self,
        key: &[u8],
        method: &Method,
        path: &str,
        resp: &Response<Body>,
        writes_before: u64,
    ) -> Option<Arc<Answer>> {
        let answer = Arc::new(self.answer(method, path, resp, writes_before)?);
        let size = answer.head.len() + answer.body.len();
        MEMO.with(|m| {
            let mut m = m.borrow_mut();
            if m.map.len() >= MAX_ENTRIES || m.bytes + size > MAX_BYTES {
                let now = Instant::now();
                let current = self.generation.now();
                m.map.retain(|_, a| a.writes == current && now < a.expires);
                m.bytes = m.map.values().map(|a| a.head.len() + a.body.len()).sum();
                if m.map.len() >= MAX_ENTRIES || m.bytes + size > MAX_BYTES {
                    m.map.clear();
                    m.bytes = 0;
                }
            }
            if let Some(old) = m.map.insert(key.into(), answer.clone()) {
                m.bytes -= old.head.len() + old.body.len();
            }
            m.bytes += size;
        });
        Some(answer)
    }

    fn answer(
        &self,
        method: &Method,
        path: &str,
        resp: &Response<Body>,
        writes_before: u64,
    ) -> Option<Answer> {
        let head_only = method == Method::HEAD;
        let headers = resp.headers();
        if resp.status() != StatusCode::OK || headers.contains_key(header::AGE) {
            return None;
        }
        let source: Arc<str> = headers.get(h::X_SOURCE)?.to_str().ok()?.into();
        let local = &*source == crate::pull::LOCAL;
        let (route, events, ttl) = match route::parse(path).ok()? {
            Route::Blob { .. } if head_only => {
                ("blob", if local { BLOB_HIT } else { BLOB_MISS }, TTL)
            }
            // A manifest fetched from a remote is local from the next request on: that one
            // makes the answer to keep.
            Route::Manifest { .. } if !local => return None,
            Route::Manifest {
                reference: Reference::Digest(_),
                ..
            } => ("manifest_digest", MANIFEST_HIT, TTL),
            Route::Manifest {
                reference: Reference::Tag(_),
                ..
            } => ("manifest_tag", TAG_HIT, TTL.min(self.tag_ttl)),
            _ => return None,
        };
        let body = match resp.body() {
            Body::Empty | Body::Full(None) => Bytes::new(),
            Body::Full(Some(b)) if !head_only && b.len() <= MAX_BODY => b.clone(),
            _ => return None,
        };
        let length: u64 = headers
            .get(header::CONTENT_LENGTH)?
            .to_str()
            .ok()?
            .parse()
            .ok()?;
        if !head_only && length != body.len() as u64 {
            return None;
        }
        Some(Answer {
            head: {
                // Without the headers that differ per response.
                let mut out = Vec::with_capacity(512);
                let skip = [h::X_REQUEST_ID, header::DATE, header::CONNECTION];
                super::fast::head_lines(&mut out, resp.status(), headers, &skip);
                Bytes::from(out)
            },
            body,
            route,
            events,
            source,
            expires: Instant::now() + ttl,
            writes: writes_before,
        })
    }
}

const BLOB_HIT: Events = &[("blob", "hit")];
const BLOB_MISS: Events = &[("blob", "miss")];
const MANIFEST_HIT: Events = &[("manifest", "hit")];
const TAG_HIT: Events = &[("tag", "hit"), ("manifest", "hit")];
