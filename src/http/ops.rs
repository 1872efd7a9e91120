//! Operator endpoints: `/healthz`, `/readyz`, `/metrics`, `/_ociedge/status`.

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use super::body::{self, Body};
use crate::app::App;

fn text(status: StatusCode, ctype: &'static str, body: String) -> Response<Body> {
    let mut r = Response::new(body::full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

pub fn healthz() -> Response<Body> {
    text(StatusCode::OK, "text/plain", "ok\n".into())
}

/// Ready when the local engine answers a probe within 2 s: GeoDNS moves clients away otherwise.
pub async fn readyz(app: &Arc<App>) -> Response<Body> {
    let probe =
        tokio::time::timeout(Duration::from_secs(2), app.puller.engines().local().probe()).await;
    match probe {
        Ok(Ok(())) => text(StatusCode::OK, "text/plain", "ready\n".into()),
        Ok(Err(e)) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("local engine unavailable: {e}\n"),
        ),
        Err(_) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "local engine probe timed out\n".into(),
        ),
    }
}

pub fn metrics(app: &Arc<App>) -> Response<Body> {
    text(
        StatusCode::OK,
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        app.metrics.encode(),
    )
}

pub fn status(app: &Arc<App>) -> Response<Body> {
    let engines = app.puller.engines();
    let fills: Vec<_> = app
        .puller
        .fills()
        .snapshot()
        .into_iter()
        .map(|(d, p)| serde_json::json!({ "digest": d.as_str(), "size": p.size, "written": p.written, "source": p.source.as_deref() }))
        .collect();
    let upstreams: Vec<_> = engines
        .upstreams()
        .iter()
        .map(|u| serde_json::json!({ "id": u.name, "kind": "registry" }))
        .collect();
    let body = serde_json::json!({
        "region": app.config.region,
        "local_engine": engines.local().id(),
        "engines": upstreams,
        "fills_in_flight": fills,
        "replication_backlog": 0,
    });
    text(StatusCode::OK, "application/json", body.to_string())
}
