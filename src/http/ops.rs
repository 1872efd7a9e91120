//! Operator endpoints: `/healthz`, `/readyz`, `/metrics`, `/_ociedge/status` (the JSON the
//! status page at `/_ociedge/`, `page.rs`, is drawn from).

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
    let kinds: std::collections::HashMap<String, &'static str> = engines
        .storage()
        .map(|e| (e.id().to_string(), "storage"))
        .chain(
            engines
                .upstreams()
                .iter()
                .map(|u| (u.engine.id().to_string(), "registry")),
        )
        .collect();
    let local_id = engines.local().id().to_string();
    let ranked: Vec<_> = engines
        .nearness()
        .ranking()
        .into_iter()
        .filter(|(id, _)| *id != local_id)
        .enumerate()
        .map(|(i, (id, h))| {
            serde_json::json!({
                "id": id,
                "kind": kinds.get(&id).copied().unwrap_or("storage"),
                "rank": i + 1,
                "rtt_ms": h.rtt.map(|r| (r * 1e5).round() / 100.0),
                "up": h.up,
                "consecutive_failures": h.consecutive_failures,
                "priority": h.priority,
                "last_error": h.last_error,
            })
        })
        .collect();
    let local_health = engines.nearness().health(&local_id);
    let body = serde_json::json!({
        "region": app.config.region,
        "local_engine": {
            "id": local_id,
            "up": engines.local_usable(),
            "rtt_ms": local_health.and_then(|h| h.rtt).map(|r| (r * 1e5).round() / 100.0),
        },
        "engines": ranked,
        "fills_in_flight": fills,
        "history": history(app),
        "local_engine_usage": app.evictor.as_ref().map(|e| {
            let (bytes, entries) = e.usage();
            serde_json::json!({ "bytes": bytes, "entries": entries, "max_size": app.config.cache.max_size.map(|m| m.0) })
        }),
        "prewarm": app.prewarmer.snapshot().iter().map(|r| r.summary()).collect::<Vec<_>>(),
        "upstream_quota": upstream_quota(app),
        "upstreams": engines.upstreams().iter().map(|u| {
            let mut v = u.health.as_ref().map(|h| h.snapshot()).unwrap_or_else(|| serde_json::json!({}));
            v["name"] = serde_json::json!(u.name);
            v
        }).collect::<Vec<_>>(),
        "cluster": app.cluster.as_ref().map(|c| {
            let (peer_fills, taken_over, peer_bytes) = app.metrics.cluster_counts();
            serde_json::json!({
                "id": c.id,
                "advertise": c.advertise,
                "coordinated": c.coordinated(),
                "processes": c.processes().into_iter().map(|(id, addr, ago)| serde_json::json!({ "id": id, "addr": addr, "seen_s_ago": ago })).collect::<Vec<_>>(),
                "peer_fills": peer_fills,
                "leases_taken_over": taken_over,
                "peer_bytes": peer_bytes,
            })
        }),
        "replication_backlog": app.pusher.as_ref().map(|p| serde_json::to_value(p.replicator().backlog()).unwrap_or_default()).unwrap_or_else(|| serde_json::json!({})),
    });
    text(StatusCode::OK, "application/json", body.to_string())
}

/// Per upstream, the quota its last answer announced for the credential in use (the
/// configured user, else anonymous), with that credential; and every credential's under
/// `credentials`.
fn upstream_quota(app: &Arc<App>) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    let in_use = |u: &str| {
        app.puller
            .engines()
            .upstreams()
            .iter()
            .find(|x| x.name == u)
            .and_then(|x| x.health.as_ref())
            .and_then(|h| h.snapshot()["credential"].as_str().map(str::to_string))
    };
    for (u, credential, limit, remaining) in app.metrics.upstream_quotas() {
        let q = serde_json::json!({ "limit": limit, "remaining": remaining });
        let entry = out
            .entry(u.to_string())
            .or_insert_with(|| serde_json::json!({ "credentials": {} }));
        entry["credentials"][credential.as_ref()] = q.clone();
        if in_use(&u).as_deref() == Some(credential.as_ref()) || entry.get("limit").is_none() {
            entry["limit"] = q["limit"].clone();
            entry["remaining"] = q["remaining"].clone();
            entry["credential"] = serde_json::json!(credential.as_ref());
        }
    }
    serde_json::Value::Object(out)
}

/// The in-memory last hour, with the live interval read from the counters now.
fn history(app: &Arc<App>) -> serde_json::Value {
    let live =
        crate::history::Totals::read(&app.metrics, &app.history_sources, &app.history_engines);
    serde_json::to_value(app.history.view(Some(live))).unwrap_or_default()
}
