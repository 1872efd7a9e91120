//! The listeners: HTTPS (rustls; HTTP/2 or HTTP/1.1 by ALPN) or plain HTTP (HTTP/1.1 and HTTP/2
//! prior knowledge) on `listen`, an optional plain listener beside TLS, a cap on connections,
//! a span and metrics per request, OCI error bodies, and a graceful shutdown that lets responses
//! and fills in progress finish.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::answers::AnswerMemo;
use super::body::{self, Body, RequestBody};
use super::conn::{self, ConnSettings};
use super::headers as h;
use super::route::{self, Route};
use super::tls::Tls;
use super::{access, ops, page, prewarm, pull, push, token};
use crate::app::App;
use crate::config::{Config, LimitsConfig};
use crate::error::{Error, Result};
use crate::oci::ErrorCode;

/// HTTP/2 keep-alive pings: a peer that stops answering them is gone, and its connection is
/// closed instead of held until the idle timeout.
const H2_KEEPALIVE: Duration = Duration::from_secs(20);

/// The bound sockets, and the TLS side when `tls` is configured.
pub struct Front {
    /// `listen`: TLS when `tls` is set, plain HTTP otherwise.
    pub main: TcpListener,
    pub tls: Option<Arc<Tls>>,
    /// `tls.plain_listen`: plain HTTP beside TLS.
    pub plain: Option<TcpListener>,
}

impl Front {
    /// Loads the certificate (a bad one is a startup error) and binds the listeners.
    pub async fn bind(cfg: &Config) -> Result<Front> {
        let tls = match &cfg.tls {
            Some(t) => Some(Arc::new(Tls::new(t)?)),
            None => None,
        };
        let main = bind(cfg.listen, "listen").await?;
        let plain = match cfg.tls.as_ref().and_then(|t| t.plain_listen) {
            Some(addr) => Some(bind(addr, "tls.plain_listen").await?),
            None => None,
        };
        Ok(Front { main, tls, plain })
    }

    /// The addresses bound, with their scheme, for the startup log.
    pub fn describe(&self) -> String {
        let addr = |l: &TcpListener| {
            l.local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into())
        };
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut s = format!("{scheme}://{}", addr(&self.main));
        if let Some(p) = &self.plain {
            s.push_str(&format!(" http://{}", addr(p)));
        }
        s
    }
}

async fn bind(addr: SocketAddr, key: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Config(format!("{key}: cannot listen on {addr}: {e}")))
}

/// The HTTP settings every connection shares, from `limits`.
fn http_builder(limits: &LimitsConfig) -> auto::Builder<TokioExecutor> {
    let header_max = usize::try_from(limits.max_header_size.0).unwrap_or(usize::MAX);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Also bounds the wait for the next request on a kept-alive connection (hyper starts
        // the timer whenever it waits for a request head).
        .header_read_timeout(limits.header_read_timeout.0)
        // The read buffer bounds the request head: a larger one is answered 431.
        .max_buf_size(header_max.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(u32::try_from(limits.max_header_size.0).unwrap_or(u32::MAX))
        .keep_alive_interval(H2_KEEPALIVE)
        .keep_alive_timeout(H2_KEEPALIVE);
    builder
}

/// Serves until `shutdown` resolves. Then: no new connections, every open connection finishes
/// the responses it has in progress and closes, and fills in progress complete, all within
/// `limits.shutdown_grace`; the certificate watcher stops.
pub async fn serve(
    app: Arc<App>,
    front: Front,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let limits = app.config.limits.clone();
    let stop = CancellationToken::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let settings = ConnSettings {
        builder: Arc::new(http_builder(&limits)),
        header_read_timeout: limits.header_read_timeout.0,
        idle_timeout: limits.idle_timeout.0,
        send_timeout: limits.send_timeout.0,
        stop: stop.clone(),
        stopping: Arc::default(),
        ops_only: None,
        answers: Arc::new(AnswerMemo::new(
            app.config.cache.tag_ttl.0,
            app.auth.is_none(),
            app.puller.generation().clone(),
        )),
    };
    if let Some(tls) = &front.tls {
        tokio::spawn(tls.clone().watch(stop.clone()));
    }
    let mut loops = tokio::task::JoinSet::new();
    loops.spawn(accept_loop(
        app.clone(),
        front.main,
        front.tls.clone(),
        settings.clone(),
        slots.clone(),
    ));
    if let Some(plain) = front.plain {
        loops.spawn(accept_loop(
            app.clone(),
            plain,
            None,
            settings.clone(),
            slots.clone(),
        ));
    }
    shutdown.await;
    tracing::info!("shutting down: no new connections; finishing responses and fills in progress");
    settings.begin_stop();
    // The loops drop their listeners as they end: new connections are refused from here on.
    while loops.join_next().await.is_some() {}
    let grace = limits.shutdown_grace.0;
    let deadline = tokio::time::Instant::now() + grace;
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let connections = tokio::time::timeout_at(deadline, slots.acquire_many(all)).await;
    // Fills are detached from connections (a vanished client does not cancel its fill): wait
    // for them too, or a blob being fetched would be lost and fetched again after the restart.
    let fills = app.puller.fills();
    while fills.in_flight() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The last accesses are published, so a restart keeps the eviction order (the timer
    // publishes every few seconds; this covers the accesses since).
    if let Some(ev) = &app.evictor {
        let left = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .max(Duration::from_secs(2));
        match tokio::time::timeout(left, ev.save_sidecar()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot publish the access times"),
            Err(_) => tracing::warn!("publishing the access times timed out"),
        }
    }
    match (connections.is_ok(), fills.in_flight()) {
        (true, 0) => tracing::info!("shutdown complete"),
        (closed, left) => tracing::warn!(
            connections_closed = closed,
            fills_in_flight = left,
            grace = %humantime::format_duration(grace),
            "shutdown grace period over with work still in progress"
        ),
    }
    Ok(())
}

/// Accepts connections on `listener` until `settings.stop`, each in its own task and under a
/// slot of `slots`. At the cap, the loop stops accepting until a slot frees: further clients
/// wait in the kernel's queue instead of being served badly.
async fn accept_loop(
    app: Arc<App>,
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    settings: ConnSettings,
    slots: Arc<Semaphore>,
) {
    let stop = settings.stop.clone();
    let ops_reserve = Arc::new(Semaphore::new(OPS_RESERVE));
    let ops_settings = ConnSettings {
        ops_only: Some(slots.clone()),
        ..settings.clone()
    };
    let send_timeout_ms =
        u32::try_from(app.config.limits.send_timeout.0.as_millis()).unwrap_or(u32::MAX);
    // At the cap, say so at most every 10s: a flood must not also flood the logs.
    let mut last_warned: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let mut conn_settings = &settings;
        let free = slots.clone().try_acquire_owned();
        if free.is_err() && last_warned.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            last_warned = Some(Instant::now());
            tracing::warn!("limits.max_connections reached: new connections wait for a free slot");
        }
        let reserve = match free {
            Ok(_) => None,
            Err(_) => ops_reserve.clone().try_acquire_owned().ok(),
        };
        let permit = match (free, reserve) {
            (Ok(p), _) => p,
            // At the cap, health checks are still answered at once, from the reserve; other
            // requests on such a connection wait for a slot there.
            (Err(_), Some(p)) => {
                conn_settings = &ops_settings;
                p
            }
            (Err(_), None) => {
                tokio::select! {
                    p = slots.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                    _ = stop.cancelled() => return,
                }
            }
        };
        let _ = stream.set_nodelay(true);
        // A client that takes none of our bytes for this long (its window stays closed) is cut
        // off by the kernel, whatever the connection is doing: a slot is never held for ever.
        let _ = rustix::net::sockopt::set_tcp_user_timeout(&stream, send_timeout_ms);
        let span = tracing::debug_span!("conn", %peer);
        tokio::spawn(
            conn::serve_conn(
                app.clone(),
                stream,
                peer,
                tls.clone(),
                conn_settings.clone(),
                permit,
            )
            .instrument(span),
        );
    }
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        _ => "OTHER",
    }
}

/// 16 random hex digits (without `format!`: this runs for every request).
pub(super) fn new_request_id() -> [u8; 16] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n = rand::random::<u64>();
    let mut s = [0u8; 16];
    for c in &mut s {
        *c = HEX[(n >> 60) as usize];
        n <<= 4;
    }
    s
}

/// The client's `x-request-id`, when it is one we can repeat (short, printable).
pub(super) fn client_request_id(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get(h::X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic()))
}

/// Request bodies larger than this, refused, get `Connection: close` on HTTP/1 (see `handle`).
const UNDRAINED_BODY: u64 = 8 << 10;

/// Connections accepted beyond `limits.max_connections` for health checks only.
const OPS_RESERVE: usize = 32;

/// Whether a path is one a load balancer or scraper must reach even at the connection cap.
pub(super) fn is_ops_path(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics")
}

/// [`handle`] on a connection of the ops reserve: health, readiness and metrics at once;
/// anything else first waits for a regular slot of `slots` (returned, to be held until the
/// response is sent). The connection closes after the response.
pub async fn handle_ops_only(
    app: Arc<App>,
    req: Request<RequestBody>,
    slots: &Arc<Semaphore>,
) -> (Response<Body>, Option<tokio::sync::OwnedSemaphorePermit>) {
    let slot = if is_ops_path(req.uri().path()) {
        None
    } else {
        slots.clone().acquire_owned().await.ok()
    };
    let mut resp = handle(app, req).await;
    resp.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    (resp, slot)
}

/// One request: route, handle, map errors to OCI bodies, stamp the common headers.
pub async fn handle(app: Arc<App>, req: Request<RequestBody>) -> Response<Body> {
    let start = Instant::now();
    let id = match client_request_id(req.headers()) {
        Some(id) => id.to_string(),
        None => String::from_utf8_lossy(&new_request_id()).into_owned(),
    };
    let span = tracing::info_span!("request", id = %id, method = %req.method(), path = %req.uri().path(), status = tracing::field::Empty);
    async move {
        let mlabel = method_label(req.method());
        // An HTTP/1 request body that a refusal may leave unread, and that hyper cannot drain
        // from what it has buffered: hyper then closes the connection. (A small body arrives
        // with the head and is drained; the connection stays usable.)
        let sent_body = req.version() < http::Version::HTTP_2
            && (req.headers().contains_key(header::TRANSFER_ENCODING)
                || req
                    .headers()
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                    .is_some_and(|n| n > UNDRAINED_BODY));
        let parsed = route::parse_request(req.method(), req.uri().path());
        // The region's internal route (`cluster:`), outside the `/v2/` table and its auth.
        let peer = super::cluster::parse(req.uri().path());
        let label = match (&peer, &parsed) {
            (Some(_), _) => "cluster_fill",
            (None, p) => p.as_ref().map(Route::label).unwrap_or("invalid"),
        };
        let is_v2 = req.uri().path().starts_with("/v2");
        let mut resp = match (peer, parsed) {
            (Some(d), _) if req.method() == Method::GET => {
                let (parts, _) = req.into_parts();
                super::cluster::fill(&app, &parts, d)
                    .await
                    .unwrap_or_else(|e| error_response(&e))
            }
            (Some(_), _) => error_response(&Error::client(
                ErrorCode::Unsupported,
                "only GET is allowed on this endpoint",
            )),
            (None, Ok(r)) => {
                let (parts, body) = req.into_parts();
                let resp = dispatch(&app, r, &parts, body).await;
                resp.unwrap_or_else(|e| error_response(&e))
            }
            (None, Err(e)) => error_response(&e),
        };
        let hs = resp.headers_mut();
        hs.insert(h::X_REGION, app.region.clone());
        hs.insert(h::X_REQUEST_ID, h::owned_value(id));
        // Nothing the API serves is a page: browsers neither sniff a type nor run anything
        // (the status page sets its own, narrower policy).
        hs.insert(header::X_CONTENT_TYPE_OPTIONS, h::NOSNIFF.clone());
        if !hs.contains_key(header::CONTENT_SECURITY_POLICY) {
            hs.insert(header::CONTENT_SECURITY_POLICY, h::CSP_NONE.clone());
        }
        if is_v2 {
            hs.insert(h::API_VERSION, HeaderValue::from_static("registry/2.0"));
        }
        let status = resp.status().as_u16();
        if sent_body && status >= 400 {
            // Said in the response, so a client does not send its next request on a
            // connection that closes (hyper closes it when the body was not read).
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        tracing::Span::current().record("status", status);
        let secs = start.elapsed().as_secs_f64();
        app.metrics.request(label, mlabel, status, secs);
        if status >= 500 {
            tracing::warn!(status, ms = secs * 1e3, "request failed");
        } else {
            tracing::debug!(status, ms = secs * 1e3, "request");
        }
        resp
    }
    .instrument(span)
    .await
}

/// RFC 9112 §3.2: an HTTP/1.1 request without a `Host`, or any request with more than one, is
/// answered `400`. (Nothing is decided on the `Host` a client writes, but two front ends reading
/// two different ones is how requests get past one of them.) HTTP/2 carries `:authority`.
fn host_check(req: &http::request::Parts) -> Result<()> {
    let mut hosts = req.headers.get_all(header::HOST).iter();
    let first = hosts.next();
    let problem = if hosts.next().is_some() {
        "more than one Host header"
    } else if first.is_none() && req.version == http::Version::HTTP_11 {
        "an HTTP/1.1 request needs a Host header"
    } else {
        return Ok(());
    };
    Err(Error::Client(
        crate::oci::OciError::new(ErrorCode::Unsupported, problem)
            .with_status(StatusCode::BAD_REQUEST),
    ))
}

async fn dispatch(
    app: &Arc<App>,
    route: Route,
    parts: &http::request::Parts,
    body: RequestBody,
) -> Result<Response<Body>> {
    host_check(parts)?;
    let method = &parts.method;
    let headers = &parts.headers;
    let mut query = route::query(parts.uri.query());
    if let Some(auth) = &app.auth {
        if let Some(refused) = access::check(app, auth, &route, parts, &mut query).await? {
            return Ok(refused);
        }
    }
    let ns = query
        .iter()
        .find(|(k, _)| k == "ns")
        .map(|(_, v)| v.as_str());
    let not_allowed = || -> Error {
        Error::client(
            ErrorCode::Unsupported,
            format!("{method} is not allowed on this endpoint"),
        )
    };
    let read = route::is_read(method);
    match route {
        Route::Healthz => Ok(ops::healthz()),
        Route::Readyz => Ok(ops::readyz(app).await),
        Route::Metrics => Ok(ops::metrics(app)),
        Route::Status => Ok(ops::status(app)),
        Route::StatusPage if read => Ok(page::status_page()),
        Route::Token => token::token(app, parts, body).await,
        Route::Prewarm { id } => prewarm::handle(app, parts, body, id.as_deref()).await,
        Route::Base if read => {
            let mut r = Response::new(body::full("{}"));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            Ok(r)
        }
        Route::Catalog => Err(Error::client(
            ErrorCode::Unsupported,
            "the catalog is not served by a pull-through cache",
        )),
        Route::Upload { name, .. } if app.forwarder.is_some() => {
            push::forward(app, parts, body, &name, ns).await
        }
        Route::Manifest { name, .. } | Route::Blob { name, .. }
            if !read && app.forwarder.is_some() =>
        {
            push::forward(app, parts, body, &name, ns).await
        }
        Route::Upload { name, id } => {
            push::upload(app, parts, body, &name, id.as_deref(), &query, ns).await
        }
        Route::Blob { name, digest } if read => {
            pull::blob(app, method, headers, &name, &digest, ns).await
        }
        Route::Blob { name, digest } if method == Method::DELETE => {
            push::delete_blob(app, &name, &digest, ns).await
        }
        Route::Manifest { name, reference } if read => {
            pull::manifest(app, method, headers, &name, &reference, ns).await
        }
        Route::Manifest { name, reference } if method == Method::PUT => {
            push::put_manifest(app, parts, body, &name, &reference, ns).await
        }
        Route::Manifest { name, reference } if method == Method::DELETE => {
            push::delete_manifest(app, &name, &reference, ns).await
        }
        Route::Tags { name } if read => pull::tags(app, &name, &query, ns).await,
        Route::Referrers { name, digest } if read => {
            pull::referrers(app, &name, &digest, &query, ns).await
        }
        _ => Err(not_allowed()),
    }
}

/// The OCI JSON error response for `e`.
pub fn error_response(e: &Error) -> Response<Body> {
    let oci = e.to_oci();
    if oci.status.is_server_error() {
        tracing::warn!(error = %e, "error response");
    }
    let mut r = Response::new(body::full(oci.body()));
    *r.status_mut() = oci.status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(secs) = oci.retry_after {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    } else if oci.status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    r
}
