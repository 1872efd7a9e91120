//! One client connection: the TLS handshake (bounded in time), HTTP/1.1 or HTTP/2 on top, and
//! the rules that keep a client from holding it for nothing. Plain connections start in
//! [`super::fast`], which hands them here (`drive`) at their first request it does not serve.
//!
//! A connection is *idle* when no request is in progress on it. Before its first request an idle
//! connection gets `header_read_timeout` (a client that connects and sends nothing, half a TLS
//! hello or only the HTTP/2 preface is a slow-loris, not a customer); after that, `idle_timeout`
//! between requests. An idle connection is closed gracefully (HTTP/2: `GOAWAY`), and dropped if
//! the client does not let it close. A request is in progress from the moment its head is parsed
//! until its response body is finished or dropped, so a slow download or upload is never cut.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::answers::AnswerMemo;
use super::body::{Body, RequestBody};
use super::tls::Tls;
use crate::app::App;
use crate::error::BoxError;

/// The connection a request came on, put in the request's extensions when `auth:` is configured:
/// the access checks read the client's address (failed passwords are counted against it) and
/// the address and scheme the client reached (the default token realm; never the request's
/// `Host`, which the client writes).
#[derive(Clone, Copy, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub tls: bool,
}

/// The client's address, as a request extension (per-client caps).
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub std::net::IpAddr);

/// What a connection needs besides its socket.
#[derive(Clone)]
pub struct ConnSettings {
    pub builder: Arc<auto::Builder<TokioExecutor>>,
    /// Time for the TLS handshake, and for the first request's head.
    pub header_read_timeout: Duration,
    /// Time with no request in progress after the first one.
    pub idle_timeout: Duration,
    /// A response whose client has taken nothing of what it was handed for this long (an
    /// HTTP/2 stream whose window stays closed) ends its connection.
    pub send_timeout: Duration,
    /// Cancelled at shutdown: finish what is in progress, accept no new request.
    pub stop: CancellationToken,
    /// Set with `stop`, for the per-request check: the token's own `is_cancelled` takes a lock
    /// that every connection shares.
    pub stopping: Arc<AtomicBool>,
    /// Set on a connection taken beyond `limits.max_connections` from the small reserve kept
    /// for health checks: `/healthz`, `/readyz` and `/metrics` are answered at once, anything
    /// else waits for one of these regular slots (as a new connection would), and the
    /// connection closes after one response.
    pub ops_only: Option<Arc<tokio::sync::Semaphore>>,
    /// Small answers kept ready for the plain front (off under `auth:`).
    pub answers: Arc<AnswerMemo>,
}

impl ConnSettings {
    /// Whether shutdown has begun (no new request is to be read).
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Begins shutdown for every connection sharing these settings.
    pub fn begin_stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.stop.cancel();
    }
}

/// Serves one accepted connection to its end. `_permit` is this connection's slot under
/// `limits.max_connections`, given back when the connection is gone.
pub async fn serve_conn(
    app: Arc<App>,
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<Arc<Tls>>,
    settings: ConnSettings,
    _permit: OwnedSemaphorePermit,
) {
    let info = app.auth.is_some().then(|| ConnInfo {
        peer,
        local: stream.local_addr().unwrap_or(app.config.listen),
        tls: tls.is_some(),
    });
    let Some(tls) = tls else {
        return super::fast::serve(app, stream, &settings, info).await;
    };
    let handshake =
        tokio::time::timeout(settings.header_read_timeout, tls.acceptor().accept(stream));
    let stream = tokio::select! {
        r = handshake => r,
        _ = settings.stop.cancelled() => return,
    };
    match stream {
        Ok(Ok(s)) => drive(app, TokioIo::new(s), &settings, info, peer.ip()).await,
        // Scanners, clients that do not trust our certificate, plain HTTP sent to the TLS
        // port: the client's problem, and frequent; debug, not warn.
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
}

/// Runs HTTP on `io` until the client closes, the connection goes idle, or shutdown.
pub(super) async fn drive<I>(
    app: Arc<App>,
    io: I,
    settings: &ConnSettings,
    info: Option<ConnInfo>,
    peer: std::net::IpAddr,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    // What this connection's response bodies may hold of file reads (see fileio's budgets).
    let budget = crate::fileio::connection_budget();
    let svc = {
        let activity = activity.clone();
        hyper::service::service_fn(move |mut req: Request<Incoming>| {
            let budget = budget.clone();
            req.extensions_mut().insert(ClientAddr(peer));
            if let Some(i) = info {
                req.extensions_mut().insert(i);
            }
            let app = app.clone();
            let guard = activity.begin();
            let progress = activity.track();
            let ops_only = settings.ops_only.clone();
            async move {
                let handled = async move {
                    match ops_only {
                        Some(slots) => {
                            super::server::handle_ops_only(app, req.map(RequestBody::Hyper), &slots)
                                .await
                        }
                        None => (
                            super::server::handle(app, req.map(RequestBody::Hyper)).await,
                            None,
                        ),
                    }
                };
                let (resp, slot) = crate::fileio::with_connection_budget(budget, handled).await;
                Ok::<_, Infallible>(resp.map(|body| Guarded {
                    inner: body,
                    _guard: guard,
                    _slot: slot,
                    progress,
                }))
            }
        })
    };
    let conn = settings.builder.serve_connection_with_upgrades(io, svc);
    tokio::pin!(conn);
    // Once a close is asked for, by shutdown or idleness.
    let mut closing = false;
    // Set when the close is for idleness: nothing is in progress, so a client that does not
    // let the connection close (an HTTP/2 peer ignoring GOAWAY) is dropped after this.
    let mut hard_deadline: Option<Instant> = None;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection closed with an error");
                }
                return;
            }
            _ = settings.stop.cancelled(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = activity.idle(settings.header_read_timeout, settings.idle_timeout), if !closing => {
                tracing::debug!("closing an idle connection");
                conn.as_mut().graceful_shutdown();
                closing = true;
                hard_deadline = Some(Instant::now() + settings.header_read_timeout);
            }
            _ = sleep_until(hard_deadline) => {
                tracing::debug!("idle connection did not close; dropping it");
                return;
            }
            _ = activity.stalled(settings.send_timeout) => {
                tracing::debug!("a response's client took nothing for limits.send_timeout; dropping the connection");
                return;
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Requests in progress on one connection, and when the last one ended.
struct Activity {
    /// The responses of this connection, for [`Activity::stalled`].
    sending: Mutex<Vec<Weak<SendProgress>>>,
    epoch: Instant,
    active: AtomicUsize,
    /// Whether any request has been seen (switches the idle limit from the header timeout to
    /// the idle timeout).
    seen: AtomicBool,
    last_end: Mutex<Instant>,
    changed: Notify,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            sending: Mutex::new(Vec::new()),
            epoch: Instant::now(),
            active: AtomicUsize::new(0),
            seen: AtomicBool::new(false),
            last_end: Mutex::new(Instant::now()),
            changed: Notify::new(),
        }
    }

    /// The progress record of a new response.
    fn track(&self) -> Arc<SendProgress> {
        let p = Arc::new(SendProgress {
            epoch: self.epoch,
            handed_at: AtomicU64::new(0),
        });
        let mut v = self.sending.lock().unwrap_or_else(|e| e.into_inner());
        v.retain(|w| w.strong_count() > 0);
        v.push(Arc::downgrade(&p));
        p
    }

    /// Resolves once some response has waited on its client for longer than `limit`.
    async fn stalled(&self, limit: Duration) {
        let every = (limit / 4).max(Duration::from_millis(100));
        loop {
            tokio::time::sleep(every).await;
            let v = self.sending.lock().unwrap_or_else(|e| e.into_inner());
            if v.iter().filter_map(Weak::upgrade).any(|p| p.stalled(limit)) {
                return;
            }
        }
    }

    /// A request began; it ends when the returned guard is dropped.
    fn begin(self: &Arc<Self>) -> RequestGuard {
        self.seen.store(true, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_waiters();
        RequestGuard(self.clone())
    }

    /// Resolves once no request has been in progress for the applicable limit.
    async fn idle(&self, before_first: Duration, between: Duration) {
        loop {
            // Registered before the state is read, so a change in between is not missed.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.active.load(Ordering::Acquire) > 0 {
                changed.await;
                continue;
            }
            let limit = if self.seen.load(Ordering::Relaxed) {
                between
            } else {
                before_first
            };
            let since = *self.last_end.lock().unwrap_or_else(|p| p.into_inner());
            let deadline = since + limit;
            if Instant::now() >= deadline {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {}
                _ = changed => {}
            }
        }
    }
}

struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        *self.0.last_end.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.0.active.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }
}

/// A response body that keeps its request "in progress" until hyper is done with it (sent to
/// the end, or dropped because the client went away).
struct Guarded {
    inner: Body,
    _guard: RequestGuard,
    /// The regular slot a request on an ops-reserve connection waited for, held to its end.
    _slot: Option<OwnedSemaphorePermit>,
    progress: Arc<SendProgress>,
}

/// Whether a response waits on its client: set when a chunk was handed to hyper, cleared when
/// hyper asks for the next one (the client took the last) or the body itself waits (a fill).
struct SendProgress {
    epoch: Instant,
    /// Milliseconds since `epoch` when a chunk was handed over and not asked past yet; 0 when
    /// not waiting on the client.
    handed_at: AtomicU64,
}

impl SendProgress {
    fn now_ms(&self) -> u64 {
        (self.epoch.elapsed().as_millis() as u64).max(1)
    }

    /// Whether the client has taken nothing for longer than `limit`.
    fn stalled(&self, limit: Duration) -> bool {
        let at = self.handed_at.load(Ordering::Relaxed);
        at != 0 && self.now_ms().saturating_sub(at) > limit.as_millis() as u64
    }
}

impl hyper::body::Body for Guarded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let handed = match &polled {
            Poll::Ready(Some(Ok(f))) if f.is_data() => self.progress.now_ms(),
            _ => 0,
        };
        self.progress.handed_at.store(handed, Ordering::Relaxed);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_waits_for_requests_to_end() {
        let (first, between) = (Duration::from_millis(100), Duration::from_millis(300));
        let a = Arc::new(Activity::new());
        let t0 = Instant::now();
        // Before any request: the first-request limit.
        a.idle(first, between).await;
        assert!(
            t0.elapsed() >= first && t0.elapsed() < between,
            "{:?}",
            t0.elapsed()
        );
        let g = a.begin();
        let a2 = a.clone();
        let waiter = tokio::spawn(async move {
            a2.idle(first, between).await;
            Instant::now()
        });
        tokio::time::sleep(3 * between).await;
        assert!(!waiter.is_finished(), "a request in progress is not idle");
        let ended = Instant::now();
        drop(g);
        let idle_at = waiter.await.expect("waiter");
        // After a request: the between-requests limit, counted from its end.
        assert!(idle_at - ended >= between, "{:?}", idle_at - ended);
        assert!(idle_at - ended < 3 * between, "{:?}", idle_at - ended);
    }
}
