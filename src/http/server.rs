//! The listener: HTTP/1.1 and HTTP/2 (prior knowledge) on one port, a span and metrics per
//! request, OCI error bodies, graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tracing::Instrument;

use super::body::{self, Body};
use super::headers as h;
use super::route::{self, Route};
use super::{access, ops, pull, push, token};
use crate::app::App;
use crate::error::{Error, Result};
use crate::oci::ErrorCode;

/// How long in-flight responses may take to finish after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Serves until `shutdown` resolves, then drains connections for up to [`SHUTDOWN_GRACE`].
pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .max_buf_size(64 * 1024);
    builder.http2().max_concurrent_streams(256);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let app = app.clone();
                let svc = hyper::service::service_fn(move |req| {
                    let app = app.clone();
                    async move { Ok::<_, Infallible>(handle(app, req).await) }
                });
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                let conn = graceful.watch(conn.into_owned());
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down: draining connections");
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the grace period");
    }
    Ok(())
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

/// One request: route, handle, map errors to OCI bodies, stamp the common headers.
pub async fn handle(app: Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()));
    let span = tracing::info_span!("request", id = %id, method = %req.method(), path = %req.uri().path(), status = tracing::field::Empty);
    async move {
        let mlabel = method_label(req.method());
        let parsed = route::parse(req.uri().path());
        let label = parsed.as_ref().map(Route::label).unwrap_or("invalid");
        let is_v2 = req.uri().path().starts_with("/v2");
        let mut resp = match parsed {
            Ok(r) => {
                let (parts, body) = req.into_parts();
                let resp = dispatch(&app, r, &parts, body).await;
                resp.unwrap_or_else(|e| error_response(&e))
            }
            Err(e) => error_response(&e),
        };
        let hs = resp.headers_mut();
        hs.insert(h::X_REGION, app.region.clone());
        hs.insert("x-request-id", h::value(&id));
        if is_v2 {
            hs.insert(h::API_VERSION, HeaderValue::from_static("registry/2.0"));
        }
        let status = resp.status().as_u16();
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

async fn dispatch(
    app: &Arc<App>,
    route: Route,
    parts: &http::request::Parts,
    body: Incoming,
) -> Result<Response<Body>> {
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
        Route::Token => token::token(app, parts, body).await,
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
    if oci.status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    r
}
