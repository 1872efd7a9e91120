//! The plain-HTTP/1.1 front: GET and HEAD requests without a body, the bulk of a cache's traffic,
//! are parsed and answered here instead of by hyper, for two reasons hyper cannot serve:
//!
//! * a local file is sent with `sendfile(2)`: the bytes go from the page cache to the socket
//!   without passing through user space (hyper writes buffers, so every byte would be read into
//!   memory and copied out again);
//! * a small answer goes out in one `write` with its head, and the head is written straight from
//!   the header map (no intermediate `Response` encoding).
//!
//! Anything else (a request with a body, an upgrade, `Expect`, HTTP/2 prior knowledge, a head that
//! does not parse or is too large) hands the connection, with the bytes already read, to hyper,
//! which keeps it to the end: the rules for the hard cases stay in one well-tested place. TLS
//! connections never come here (the bytes are encrypted in user space anyway).
//!
//! Timeouts follow [`super::conn`]: `header_read_timeout` for a head (counted from its first
//! byte, or from the connection's start for the first one), `idle_timeout` between requests. At
//! shutdown a connection finishes the response in progress and closes.

use std::io::{self, IoSlice};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::{Buf, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::answers::{Answer, AnswerMemo};
use super::body::{Body, FileBody, RequestBody};
use super::conn::{self, ConnSettings};
use super::rewind::Rewind;
use crate::app::App;
use crate::pull::fill::{FillReader, Piece};

/// Most header lines a request handled here may have; more goes to hyper (which allows 100).
const MAX_HEADERS: usize = 64;

/// `sendfile` progress is added to the byte counters every this many bytes.
const COUNT_STEP: u64 = 64 << 20;

/// A full body up to this size is copied behind the head and sent in one `write`.
const COALESCE: usize = 16 * 1024;

/// Serves a plain TCP connection until the client closes it, it idles out, or shutdown.
/// `info` goes into each request's extensions (see [`conn::ConnInfo`]).
pub async fn serve(
    app: Arc<App>,
    mut stream: TcpStream,
    settings: &ConnSettings,
    info: Option<conn::ConnInfo>,
) {
    let max_head = usize::try_from(app.config.limits.max_header_size.0)
        .unwrap_or(usize::MAX)
        .max(8192);
    let peer = stream
        .peer_addr()
        .map(|a| a.ip())
        .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
    let mut buf = BytesMut::with_capacity(8192);
    let mut out = Vec::with_capacity(1024);
    let mut key = Vec::with_capacity(256);
    let mut deadline = Instant::now() + settings.header_read_timeout;
    // Armed once and moved only when it fires early: moving a timer for every request costs
    // more than the rest of a small answer.
    let timer = tokio::time::sleep_until(deadline);
    tokio::pin!(timer);
    // Registered once: a fresh wait per request takes the token's lock twice.
    let stopped = settings.stop.cancelled();
    tokio::pin!(stopped);
    loop {
        // An answer kept in memory needs no request object: looked up straight off the buffer.
        let mut memo = false;
        let probed = if buf.is_empty() || settings.ops_only.is_some() {
            None
        } else {
            probe(&buf, max_head, &settings.answers, &mut key)
        };
        if let Some(p) = probed {
            if let Some(a) = settings.answers.get(&key) {
                let start = Instant::now();
                let how = How {
                    keep_alive: p.how.keep_alive && !settings.is_stopping(),
                    ..p.how
                };
                let id = p.id.as_ref().map(|(a, n)| &a[..*n]);
                let sent = send_answer(&mut stream, &mut out, &a, id, how).await;
                buf.advance(p.head_len);
                replay(&app, &a, how, start);
                if !carry_on(&mut stream, sent.map(|_| how.keep_alive)).await {
                    return;
                }
                deadline = start + settings.idle_timeout;
                continue;
            }
            memo = true;
        }
        let mut next = match parse(&buf, max_head) {
            Parsed::Request(r) => *r,
            Parsed::Partial => {
                let was_empty = buf.is_empty();
                if buf.capacity() - buf.len() < 4096 {
                    buf.reserve(8192);
                }
                let read = tokio::select! {
                    // In this order, without drawing a random one per wait.
                    biased;
                    r = stream.read_buf(&mut buf) => r,
                    _ = timer.as_mut() => {
                        if Instant::now() < deadline {
                            timer.as_mut().reset(deadline);
                            continue;
                        }
                        tracing::debug!("no complete request head in time; closing");
                        return;
                    }
                    _ = &mut stopped, if was_empty => return,
                };
                match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                if was_empty {
                    // The first byte of a head: from here the head must come within the limit.
                    deadline = deadline.min(Instant::now() + settings.header_read_timeout);
                    if deadline < timer.deadline() {
                        timer.as_mut().reset(deadline);
                    }
                }
                continue;
            }
            Parsed::HandOff => {
                let io = Rewind::new(buf.freeze(), stream);
                return conn::drive(app, TokioIo::new(io), settings, info, peer).await;
            }
        };
        buf.advance(next.head_len);
        if let Some(i) = info {
            next.req.extensions_mut().insert(i);
        }
        let mut how = How {
            head_only: next.req.method() == Method::HEAD,
            keep_alive: next.keep_alive && !settings.is_stopping() && settings.ops_only.is_none(),
            http10: next.req.version() == Version::HTTP_10,
        };
        // On a connection of the ops reserve, anything but health waits for a regular slot,
        // held until the response is sent.
        let _slot = match &settings.ops_only {
            Some(slots) if !super::server::is_ops_path(next.req.uri().path()) => {
                slots.clone().acquire_owned().await.ok()
            }
            _ => None,
        };
        // A request the memo may answer (it did not hold the answer): the answer is kept when it
        // is one to keep, and sent as kept.
        let writes = settings.answers.generation();
        let memo_req = memo.then(|| (next.req.method().clone(), next.req.uri().clone()));
        let mut req = next.req;
        req.extensions_mut().insert(conn::ClientAddr(peer));
        let resp = super::server::handle(app.clone(), req).await;
        how.keep_alive = how.keep_alive && !settings.is_stopping();
        let kept = memo_req.and_then(|(method, uri)| {
            settings
                .answers
                .put(&key, &method, uri.path(), &resp, writes)
        });
        let sent = match kept {
            Some(a) => {
                let id = resp.headers().get(super::headers::X_REQUEST_ID);
                send_answer(&mut stream, &mut out, &a, id.map(|v| v.as_bytes()), how).await
            }
            None => send(&mut stream, &mut out, resp, how).await,
        };
        if !carry_on(&mut stream, sent.map(|reusable| reusable && how.keep_alive)).await {
            return;
        }
        deadline = Instant::now() + settings.idle_timeout;
    }
}

/// After a response (`sent`: whether the connection may carry another, or why it failed):
/// `true` when it takes another request; otherwise it is closed, cleanly after a complete
/// response, at once after a failed one.
async fn carry_on(stream: &mut TcpStream, sent: io::Result<bool>) -> bool {
    match sent {
        Ok(true) => true,
        Ok(false) => {
            let _ = stream.shutdown().await;
            false
        }
        Err(e) => {
            tracing::debug!(error = %e, "response aborted");
            false
        }
    }
}

/// How a response goes out: decided by the request, and by shutdown.
#[derive(Clone, Copy)]
struct How {
    head_only: bool,
    keep_alive: bool,
    http10: bool,
}

/// Records for an answer from the memo what the request path records for it.
fn replay(app: &App, a: &Answer, how: How, start: Instant) {
    let m = &app.metrics;
    for (kind, result) in a.events {
        m.cache(kind, result);
    }
    if !how.head_only && !a.body.is_empty() {
        m.bytes_served(&a.source, a.body.len() as u64);
    }
    let method = if how.head_only { "HEAD" } else { "GET" };
    m.request(a.route, method, 200, start.elapsed().as_secs_f64());
}

/// Writes a kept answer with this response's own `x-request-id`, `date` and `connection`.
async fn send_answer(
    stream: &mut TcpStream,
    out: &mut Vec<u8>,
    a: &Answer,
    request_id: Option<&[u8]>,
    how: How,
) -> io::Result<bool> {
    out.clear();
    out.extend_from_slice(&a.head);
    match request_id {
        Some(id) => line(out, b"x-request-id", id),
        None => line(out, b"x-request-id", &super::server::new_request_id()),
    }
    date(out);
    if !how.keep_alive {
        line(out, b"connection", b"close");
    } else if how.http10 {
        line(out, b"connection", b"keep-alive");
    }
    out.extend_from_slice(b"\r\n");
    if how.head_only || a.body.is_empty() {
        stream.write_all(out).await?;
    } else if a.body.len() <= COALESCE {
        out.extend_from_slice(&a.body);
        stream.write_all(out).await?;
    } else {
        write_two(stream, out, &a.body).await?;
    }
    Ok(true)
}

struct Next {
    req: Request<RequestBody>,
    head_len: usize,
    keep_alive: bool,
}

enum Parsed {
    Request(Box<Next>),
    Partial,
    HandOff,
}

/// A request head as `httparse` read it, checked to be one this front answers: GET or HEAD,
/// HTTP/1.0 or 1.1, an origin-form path, no body, no upgrade.
struct RawHead<'b, 'h> {
    method: Method,
    version: Version,
    path: &'b str,
    headers: &'h [httparse::Header<'b>],
    head_len: usize,
    keep_alive: bool,
    /// `Host` header lines: exactly one on HTTP/1.1, at most one on HTTP/1.0, or the request
    /// is refused (by [`super::server::handle`], so never from the memo).
    hosts: usize,
}

fn raw_head<'b, 'h>(
    buf: &'b [u8],
    max_head: usize,
    headers: &'h mut [httparse::Header<'b>],
) -> Result<RawHead<'b, 'h>, Parsed> {
    if buf.is_empty() {
        return Err(Parsed::Partial);
    }
    let mut parsed = httparse::Request::new(headers);
    let head_len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= max_head => n,
        Ok(httparse::Status::Partial) if buf.len() < max_head => return Err(Parsed::Partial),
        _ => return Err(Parsed::HandOff),
    };
    let method = match parsed.method {
        Some("GET") => Method::GET,
        Some("HEAD") => Method::HEAD,
        _ => return Err(Parsed::HandOff),
    };
    let version = match parsed.version {
        Some(1) => Version::HTTP_11,
        Some(0) => Version::HTTP_10,
        _ => return Err(Parsed::HandOff),
    };
    let Some(path) = parsed.path.filter(|p| p.starts_with('/')) else {
        return Err(Parsed::HandOff);
    };
    let mut keep_alive = version == Version::HTTP_11;
    let mut hosts = 0;
    let headers = parsed.headers;
    for h in headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && version == Version::HTTP_10 {
                    keep_alive = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    return Err(Parsed::HandOff);
                }
            }
        }
        let bodiless = if name.eq_ignore_ascii_case(b"content-length") {
            h.value == b"0"
        } else {
            !(name.eq_ignore_ascii_case(b"transfer-encoding")
                || name.eq_ignore_ascii_case(b"expect")
                || name.eq_ignore_ascii_case(b"upgrade"))
        };
        if !bodiless {
            return Err(Parsed::HandOff);
        }
    }
    Ok(RawHead {
        method,
        version,
        path,
        headers,
        head_len,
        keep_alive,
        hosts,
    })
}

fn parse(buf: &[u8], max_head: usize) -> Parsed {
    if buf.is_empty() {
        return Parsed::Partial;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let raw = match raw_head(buf, max_head, &mut headers) {
        Ok(raw) => raw,
        Err(p) => return p,
    };
    let Ok(uri) = raw.path.parse::<http::Uri>() else {
        return Parsed::HandOff;
    };
    let mut map = HeaderMap::with_capacity(raw.headers.len());
    for h in raw.headers {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return Parsed::HandOff;
        };
        map.append(name, value);
    }
    let mut req = Request::new(RequestBody::Empty);
    *req.method_mut() = raw.method;
    *req.uri_mut() = uri;
    *req.version_mut() = raw.version;
    *req.headers_mut() = map;
    Parsed::Request(Box::new(Next {
        req,
        head_len: raw.head_len,
        keep_alive: raw.keep_alive,
    }))
}

/// A request the answer memo may answer, read straight off the buffer (no header map, no URI):
/// its key is in the caller's buffer.
struct Probe {
    head_len: usize,
    how: How,
    /// The client's `x-request-id`, when one we can repeat.
    id: Option<([u8; 64], usize)>,
}

/// Reads the head at the start of `buf` as a memo request; `None` when it is not one (or not
/// complete): then [`parse`] decides.
fn probe(buf: &[u8], max_head: usize, memo: &AnswerMemo, key: &mut Vec<u8>) -> Option<Probe> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let raw = raw_head(buf, max_head, &mut headers).ok()?;
    if raw.hosts > 1 || (raw.hosts == 0 && raw.version == Version::HTTP_11) {
        return None;
    }
    // Only heads [`parse`] takes too: a plain path (what a URI never refuses) and header values
    // a header map accepts.
    let plain = |b: u8| b.is_ascii_alphanumeric() || b"/:._~%=&?+-@,".contains(&b);
    let valid = |b: u8| (b >= 0x20 && b != 0x7f) || b == b'\t';
    if !raw.path.bytes().all(plain)
        || !raw
            .headers
            .iter()
            .all(|h| h.value.iter().all(|&b| valid(b)))
    {
        return None;
    }
    let named = |h: &&httparse::Header<'_>, n: &str| h.name.eq_ignore_ascii_case(n);
    let accept = raw
        .headers
        .iter()
        .filter(|h| named(h, "accept"))
        .map(|h| h.value);
    let conditional = raw
        .headers
        .iter()
        .any(|h| named(&h, "range") || named(&h, "if-range") || named(&h, "if-none-match"));
    if !memo.key(&raw.method, raw.path, accept, conditional, key) {
        return None;
    }
    let id = raw
        .headers
        .iter()
        .find(|h| named(h, "x-request-id"))
        .map(|h| h.value)
        .filter(|v| v.len() <= 64 && v.iter().all(u8::is_ascii_graphic))
        .map(|v| {
            let mut a = [0u8; 64];
            a[..v.len()].copy_from_slice(v);
            (a, v.len())
        });
    Some(Probe {
        head_len: raw.head_len,
        how: How {
            head_only: raw.method == Method::HEAD,
            keep_alive: raw.keep_alive,
            http10: raw.version == Version::HTTP_10,
        },
        id,
    })
}

/// Writes `resp`; `Ok(false)` when the connection cannot carry another request (the body's end
/// was marked by closing it).
async fn send(
    stream: &mut TcpStream,
    out: &mut Vec<u8>,
    resp: Response<Body>,
    how: How,
) -> io::Result<bool> {
    let How {
        head_only,
        keep_alive,
        http10,
    } = how;
    let (parts, body) = resp.into_parts();
    let status = parts.status;
    let no_body = head_only
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let exact = hyper::body::Body::size_hint(&body).exact();
    // How the end of the body is marked: a length, chunks, or (HTTP/1.0) closing the connection.
    let length = declared.or(exact);
    let chunked = !no_body && length.is_none() && !http10;
    let reusable = no_body || length.is_some() || chunked;

    out.clear();
    head_lines(out, status, &parts.headers, &[]);
    if !parts.headers.contains_key(header::DATE) {
        date(out);
    }
    // (a 304 carries no length at all, as under hyper: RFC 9110 §8.6 allows only the 200's)
    if declared.is_none()
        && !status.is_informational()
        && status != StatusCode::NO_CONTENT
        && status != StatusCode::NOT_MODIFIED
    {
        match exact {
            Some(n) if !(head_only && n == 0) => line(
                out,
                b"content-length",
                itoa::Buffer::new().format(n).as_bytes(),
            ),
            _ if chunked => line(out, b"transfer-encoding", b"chunked"),
            _ => {}
        }
    }
    if !keep_alive || !reusable {
        line(out, b"connection", b"close");
    } else if http10 {
        line(out, b"connection", b"keep-alive");
    }
    out.extend_from_slice(b"\r\n");

    if no_body {
        stream.write_all(out).await?;
        return Ok(reusable);
    }
    let sent = match body {
        Body::Empty | Body::Full(None) => {
            stream.write_all(out).await?;
            0
        }
        Body::Full(Some(b)) => {
            let n = b.len() as u64;
            if chunked {
                let mut framed = format!("{:x}\r\n", b.len()).into_bytes();
                framed.extend_from_slice(&b);
                framed.extend_from_slice(b"\r\n0\r\n\r\n");
                write_two(stream, out, &framed).await?;
            } else if b.len() <= COALESCE {
                out.extend_from_slice(&b);
                stream.write_all(out).await?;
            } else {
                write_two(stream, out, &b).await?;
            }
            n
        }
        Body::File(f) => send_file(stream, out, f).await?,
        Body::Fill(mut f) => match f.reader.take() {
            Some(reader) => send_fill(stream, out, reader, &mut *f.sent).await?,
            None => {
                stream.write_all(out).await?;
                0
            }
        },
        Body::Stream(mut s) => {
            stream.write_all(out).await?;
            let mut n = 0u64;
            while let Some(frame) = s.frame().await {
                let frame = frame.map_err(io::Error::other)?;
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                n += data.len() as u64;
                if length.is_some_and(|want| n > want) {
                    // More than promised would be read as the start of the next response.
                    return Err(io::Error::other("body longer than its content-length"));
                }
                if chunked {
                    let size = format!("{:x}\r\n", data.len());
                    write_two(stream, size.as_bytes(), &data).await?;
                    stream.write_all(b"\r\n").await?;
                } else {
                    stream.write_all(&data).await?;
                }
            }
            if chunked {
                stream.write_all(b"0\r\n\r\n").await?;
            }
            n
        }
    };
    if let Some(want) = length {
        if sent != want {
            // The client was promised `want` bytes: closing without them is how it learns.
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("body ended at {sent} of {want} bytes"),
            ));
        }
    }
    Ok(reusable)
}

/// Appends the status line and the lines of `headers`, but those named in `skip`.
pub(super) fn head_lines(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    skip: &[HeaderName],
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        if !skip.contains(name) {
            line(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
}

fn line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The `date` line, formatted once a second per thread.
fn date(out: &mut Vec<u8>) {
    thread_local! {
        static CACHED: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHED.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs || c.1.is_empty() {
            *c = (secs, httpdate::fmt_http_date(now));
        }
        line(out, b"date", c.1.as_bytes());
    });
}

/// Writes `a` then `b` with as few system calls as the socket allows.
async fn write_two(stream: &mut TcpStream, a: &[u8], b: &[u8]) -> io::Result<()> {
    let (mut a, mut b) = (a, b);
    while !a.is_empty() {
        let n = stream
            .write_vectored(&[IoSlice::new(a), IoSlice::new(b)])
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        if n < a.len() {
            a = &a[n..];
        } else {
            b = &b[n - a.len()..];
            a = &[];
        }
    }
    stream.write_all(b).await
}

/// The head (held back with `MSG_MORE` so it leaves in the first packet of data), then the
/// file by `sendfile`. The socket is non-blocking: each call moves what the send buffer takes.
/// A page-cache miss blocks this worker thread on the disk read inside `sendfile`, as it does
/// nginx's without `aio threads`; the file is marked sequential so the kernel reads ahead.
async fn send_file(stream: &mut TcpStream, head: &[u8], mut f: FileBody) -> io::Result<u64> {
    send_head(stream, head).await?;
    let slice = &f.slice;
    let _ = rustix::fs::fadvise(
        slice.file.as_fd(),
        slice.offset,
        std::num::NonZeroU64::new(slice.len),
        rustix::fs::Advice::Sequential,
    );
    send_range(stream, &slice.file, slice.offset, slice.len, &mut *f.sent).await
}

/// Sends a fill's bytes as it brings them: what is in its spool file by `sendfile`, what is
/// only in its memory window by `write`.
async fn send_fill(
    stream: &mut TcpStream,
    head: &[u8],
    mut reader: FillReader,
    sent: &mut (dyn Fn(u64) + Send),
) -> io::Result<u64> {
    send_head(stream, head).await?;
    let mut total = 0u64;
    while let Some(piece) = reader.next_piece(true).await.map_err(io::Error::other)? {
        total += match piece {
            Piece::Bytes(b) => {
                stream.write_all(&b).await?;
                sent(b.len() as u64);
                b.len() as u64
            }
            Piece::File { file, offset, len } => {
                send_range(stream, &file, offset, len, sent).await?
            }
        };
    }
    Ok(total)
}

/// Writes a response head, telling the kernel more follows (so it goes out with the body).
async fn send_head(stream: &mut TcpStream, mut head: &[u8]) -> io::Result<()> {
    while !head.is_empty() {
        stream.writable().await?;
        match stream.try_io(Interest::WRITABLE, || {
            rustix::net::send(stream.as_fd(), head, rustix::net::SendFlags::MORE)
                .map_err(io::Error::from)
        }) {
            Ok(n) => head = &head[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends `len` bytes of `file` from `offset` with `sendfile`; `sent` hears of them in steps.
async fn send_range(
    stream: &mut TcpStream,
    file: &std::fs::File,
    offset: u64,
    len: u64,
    sent: &mut (dyn Fn(u64) + Send),
) -> io::Result<u64> {
    let end = offset + len;
    let mut pos = offset;
    // Counted in steps, so a long download shows on the graphs while it runs.
    let mut counted = pos;
    let result = loop {
        if pos - counted >= COUNT_STEP {
            sent(pos - counted);
            counted = pos;
        }
        if pos >= end {
            break Ok(());
        }
        // Linux moves at most 0x7ffff000 bytes per call.
        let want = usize::try_from(end - pos)
            .unwrap_or(usize::MAX)
            .min(0x7fff_f000);
        if let Err(e) = stream.writable().await {
            break Err(e);
        }
        match stream.try_io(Interest::WRITABLE, || {
            rustix::fs::sendfile(stream.as_fd(), file.as_fd(), Some(&mut pos), want)
                .map_err(io::Error::from)
        }) {
            Ok(0) => {
                break Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file ended before its recorded size",
                ))
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => break Err(e),
        }
    };
    sent(pos - counted);
    result.map(|()| pos - offset)
}

/// For the `request_head` fuzz target: whatever the bytes, `parse` returns, and what it takes
/// for itself is a bodiless GET or HEAD with an origin-form path inside the bytes it was given;
/// the answer memo's `probe` takes nothing `parse` would not.
pub fn fuzz_parse(data: &[u8]) {
    // The memo's look at a head agrees with the full parse on the head's length.
    let mut key = Vec::new();
    let memo = AnswerMemo::new(std::time::Duration::from_secs(1), true, Default::default());
    let probed = probe(data, 8192, &memo, &mut key);
    let Parsed::Request(n) = parse(data, 8192) else {
        assert!(probed.is_none(), "the memo took a head the parse refuses");
        return;
    };
    if let Some(p) = probed {
        // A request the front must refuse for its Host never comes from the memo.
        let hosts = n.req.headers().get_all(header::HOST).iter().count();
        assert!(hosts == 1 || (hosts == 0 && n.req.version() == Version::HTTP_10));
        assert_eq!(p.head_len, n.head_len);
        assert_eq!(p.how.head_only, n.req.method() == Method::HEAD);
        assert!(p.id.is_none_or(|(_, len)| len <= 64));
    }
    assert!(n.head_len <= data.len() && n.head_len <= 8192);
    assert!(matches!(*n.req.method(), Method::GET | Method::HEAD));
    assert!(n.req.uri().path().starts_with('/'));
    let h = n.req.headers();
    assert!(!h.contains_key(header::TRANSFER_ENCODING));
    assert!(!h.contains_key(header::EXPECT) && !h.contains_key(header::UPGRADE));
    assert!(h.get_all(header::CONTENT_LENGTH).iter().all(|v| v == "0"));
    let _ = super::route::parse(n.req.uri().path());
    let _ = super::route::query(n.req.uri().query());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(s: &str) -> Parsed {
        parse(s.as_bytes(), 8192)
    }

    #[test]
    fn bodiless_requests_are_ours_the_rest_is_hyper_s() {
        let Parsed::Request(n) = req("GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\nGET") else {
            panic!("a GET is handled here");
        };
        assert_eq!(n.head_len, 30);
        assert!(n.keep_alive);
        let Parsed::Request(n) = req("HEAD /v2/ HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n") else {
            panic!("a HEAD is handled here");
        };
        assert!(n.keep_alive, "HTTP/1.0 keep-alive when asked");
        let Parsed::Request(n) = req("GET / HTTP/1.0\r\n\r\n") else {
            panic!()
        };
        assert!(!n.keep_alive, "HTTP/1.0 closes by default");
        let Parsed::Request(n) = req("GET / HTTP/1.1\r\nConnection: close\r\n\r\n") else {
            panic!()
        };
        assert!(!n.keep_alive);
        assert!(matches!(
            req("GET / HTTP/1.1\r\nHost: x\r\n"),
            Parsed::Partial
        ));
        for other in [
            "PUT /v2/a/manifests/t HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
            "GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
            "GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
            "GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET http://example.com/ HTTP/1.1\r\n\r\n",
            "GARBAGE\r\n\r\n",
        ] {
            assert!(matches!(req(other), Parsed::HandOff), "{other:?}");
        }
        // Over the head limit: hyper answers it (431).
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9000));
        assert!(matches!(req(&big), Parsed::HandOff));
        assert!(matches!(req(&big[..8500]), Parsed::HandOff));
    }

    #[test]
    fn the_memo_never_answers_a_request_with_a_missing_or_repeated_host() {
        let memo = AnswerMemo::new(std::time::Duration::from_secs(1), true, Default::default());
        let mut key = Vec::new();
        let probe = |s: &str, key: &mut Vec<u8>| probe(s.as_bytes(), 8192, &memo, key).is_some();
        assert!(probe(
            "GET /v2/a/manifests/t HTTP/1.1\r\nHost: x\r\n\r\n",
            &mut key
        ));
        assert!(probe("GET /v2/a/manifests/t HTTP/1.0\r\n\r\n", &mut key));
        for bad in [
            "GET /v2/a/manifests/t HTTP/1.1\r\n\r\n",
            "GET /v2/a/manifests/t HTTP/1.1\r\nHost: x\r\nhost: y\r\n\r\n",
            "GET /v2/a/manifests/t HTTP/1.0\r\nHost: x\r\nHost: x\r\n\r\n",
        ] {
            assert!(!probe(bad, &mut key), "{bad:?}");
            // The full parse takes it, and the request path answers 400.
            assert!(matches!(req(bad), Parsed::Request(_)), "{bad:?}");
        }
    }
}
