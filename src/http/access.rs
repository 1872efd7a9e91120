//! The access check of the route table: which action a route needs, the call into
//! [`crate::auth::Auth`], and refusals as registries send them (`401` with a Bearer challenge
//! pointing at this proxy's `/token`, or `403 DENIED`).

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Method, Response};

use super::body::Body;
use super::conn::ConnInfo;
use super::route::{self, Route};
use super::server::error_response;
use crate::app::App;
use crate::auth::{self, Action, Auth, Refusal, Target};
use crate::engine::set::Routed;
use crate::engine::EngineExt;
use crate::error::{Error, Result};
use crate::oci::{ErrorCode, OciError, Reference, RepoName};

/// The action `route` needs with `method`; `None` for routes outside access control (health,
/// metrics, status, the token endpoint itself) and for `/v2/`, which [`check`] answers apart.
pub fn action<'a>(route: &'a Route, method: &Method) -> Option<(&'a RepoName, Action)> {
    let read = route::is_read(method);
    match route {
        Route::Manifest { name, .. } | Route::Blob { name, .. } => Some((
            name,
            if read {
                Action::Pull
            } else if method == Method::DELETE {
                Action::Delete
            } else {
                Action::Push
            },
        )),
        Route::Upload { name, .. } => Some((name, Action::Push)),
        Route::Tags { name } | Route::Referrers { name, .. } => Some((name, Action::Pull)),
        _ => None,
    }
}

/// The client's address, when the connection's is known (`auth:` configured).
pub fn client_addr(parts: &Parts) -> Option<std::net::IpAddr> {
    parts.extensions.get::<ConnInfo>().map(|i| i.peer.ip())
}

/// The credentials of a request, with the client's address on Basic ones.
pub fn presented(parts: &Parts) -> auth::Presented {
    let mut p = auth::presented(&parts.headers);
    if let auth::Presented::Basic(c) = &mut p {
        c.from = client_addr(parts);
    }
    p
}

/// Checks one request before it is handled: `Ok(None)` to go on, `Ok(Some(refusal))` to answer.
/// A cross-repository mount needs pull on its `from` repository; without it the mount is dropped
/// from `query` and the client gets a plain upload session, as Distribution answers.
pub async fn check(
    app: &Arc<App>,
    auth: &Auth,
    route: &Route,
    parts: &Parts,
    query: &mut Vec<(String, String)>,
) -> Result<Option<Response<Body>>> {
    let presented = presented(parts);
    if *route == Route::Base {
        return Ok(auth
            .base(&presented)
            .await
            .err()
            .map(|r| refusal(app, parts, r)));
    }
    if matches!(route, Route::Status | Route::StatusPage) {
        // The operator's view: open to whoever a rule gives `pull` on `_ociedge` (an admin rule
        // on `**` included), never to everyone by default.
        return Ok(check_operator(app, auth, parts).await);
    }
    // Prewarm jobs name their repositories in the body: `http/prewarm.rs` checks them there.
    let Some((name, action)) = action(route, &parts.method) else {
        return Ok(None);
    };
    let ns = query
        .iter()
        .find(|(k, _)| k == "ns")
        .map(|(_, v)| v.clone());
    let engines = app.puller.engines();
    let r = engines.route(name, ns.as_deref())?;
    let t = Target {
        repo: &r.storage_repo,
        upstream: r.upstream,
        upstream_repo: &r.upstream_repo,
    };
    if let Err(refused) = auth.authorize(&presented, &t, action).await {
        tracing::debug!(repo = %r.storage_repo, action = action.as_str(), ?refused, "access refused");
        return Ok(Some(refusal(app, parts, refused)));
    }
    if action == Action::Pull {
        member_or_unknown(app, route, &r).await?;
    }
    if matches!(route, Route::Upload { id: None, .. }) && query.iter().any(|(k, _)| k == "mount") {
        let from = query
            .iter()
            .find(|(k, _)| k == "from")
            .and_then(|(_, f)| f.parse::<RepoName>().ok());
        let mount = query
            .iter()
            .find(|(k, _)| k == "mount")
            .and_then(|(_, d)| d.parse::<crate::oci::Digest>().ok());
        // Storage holds blobs once for all repositories: a mount without a readable `from`
        // would hand out any blob whose digest the client knows.
        // The blob must also be in `from`, not merely somewhere in storage.
        let readable = match (from, mount) {
            (Some(f), Some(digest)) => match engines.route(&f, ns.as_deref()) {
                Ok(fr) => {
                    let ft = Target {
                        repo: &fr.storage_repo,
                        upstream: fr.upstream,
                        upstream_repo: &fr.upstream_repo,
                    };
                    let blob = Route::Blob { name: f, digest };
                    auth.authorize(&presented, &ft, Action::Pull).await.is_ok()
                        && member_or_unknown(app, &blob, &fr).await.is_ok()
                }
                Err(_) => false,
            },
            _ => false,
        };
        if !readable {
            query.retain(|(k, _)| k != "mount" && k != "from");
        }
    }
    Ok(None)
}

/// The operator's view (status, the page, prewarm jobs): `pull` on the pseudo-repository
/// `_ociedge`. `None` to go on, else the refusal.
pub async fn check_operator(app: &App, auth: &Auth, parts: &Parts) -> Option<Response<Body>> {
    let status = RepoName::status_pseudo();
    let t = Target {
        repo: &status,
        upstream: None,
        upstream_repo: &status,
    };
    auth.authorize(&presented(parts), &t, Action::Pull)
        .await
        .err()
        .map(|r| refusal(app, parts, r))
}

/// `action` on every repository of `routed` (decided on their storage names, as for every
/// route): `None` to go on, else the refusal of the first one refused.
pub async fn check_all(
    app: &App,
    auth: &Auth,
    parts: &Parts,
    routed: &[Routed],
    action: Action,
) -> Option<Response<Body>> {
    let presented = presented(parts);
    for r in routed {
        let t = Target {
            repo: &r.storage_repo,
            upstream: r.upstream,
            upstream_repo: &r.upstream_repo,
        };
        if let Err(refused) = auth.authorize(&presented, &t, action).await {
            tracing::debug!(repo = %r.storage_repo, action = action.as_str(), ?refused, "access refused");
            return Some(refusal(app, parts, refused));
        }
    }
    None
}

/// Content by digest is served only under a repository that holds it. Storage keeps one copy of
/// each blob for all repositories, so without this a client allowed one repository could read
/// another's private content by naming its digest there. A repository holds a digest when a
/// storage engine links it there (fills, hits, pushes and replication link what they serve), or
/// when the repository's upstream has it under that name (checked with a HEAD; the pull then
/// links it). Otherwise the answer is the spec's "unknown", as Distribution gives.
async fn member_or_unknown(app: &App, route: &Route, r: &Routed) -> Result<()> {
    let (digest, manifest) = match route {
        Route::Blob { digest, .. } => (digest, false),
        Route::Manifest {
            reference: Reference::Digest(d),
            ..
        } => (d, true),
        _ => return Ok(()),
    };
    let engines = app.puller.engines();
    for e in engines.storage() {
        match e.links(&r.storage_repo, digest, manifest).await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            // An engine that cannot answer proves nothing; the next one may.
            Err(err) => tracing::warn!(engine = e.id(), error = %err, "link check failed"),
        }
    }
    if let Some(u) = engines.upstream(r) {
        let there = if manifest {
            u.engine
                .head_manifest(&r.upstream_repo, &Reference::Digest(digest.clone()), &[])
                .await?
                .is_some()
        } else {
            u.engine
                .stat_blob(&r.upstream_repo, digest)
                .await?
                .is_some()
        };
        if there {
            return Ok(());
        }
    }
    let (code, what) = if manifest {
        (ErrorCode::ManifestUnknown, "manifest")
    } else {
        (ErrorCode::BlobUnknown, "blob")
    };
    Err(Error::client(
        code,
        format!(
            "{what} {digest} is unknown to repository {}",
            r.storage_repo
        ),
    ))
}

/// The realm clients fetch tokens from: `auth.token.realm`, else `/token` at the address and
/// scheme of the listener the client reached. Never the request's `Host` (nor a
/// `X-Forwarded-Proto`): those are the client's words, and a challenge built from them sends
/// passwords wherever a forged request (or a cache that kept its answer) says.
pub fn realm(app: &App, parts: &Parts) -> String {
    if let Some(r) = app
        .config
        .auth
        .as_ref()
        .and_then(|a| a.token.realm.as_deref())
    {
        return r.to_string();
    }
    let info = parts.extensions.get::<ConnInfo>();
    let tls = info.map_or(app.config.tls.is_some(), |i| i.tls);
    let scheme = if tls { "https" } else { "http" };
    let mut addr = info.map_or(app.config.listen, |i| i.local);
    // An IPv4 client of a dual-stack listener reached an IPv4 address.
    if let std::net::IpAddr::V6(v6) = addr.ip() {
        if let Some(v4) = v6.to_ipv4_mapped() {
            addr.set_ip(v4.into());
        }
    }
    format!("{scheme}://{addr}/token")
}

/// The response for a refusal.
pub fn refusal(app: &App, parts: &Parts, r: Refusal) -> Response<Body> {
    match r {
        Refusal::Failed(e) => error_response(&e),
        Refusal::Throttled { retry_after } => {
            let secs = retry_after.as_secs().max(1);
            let mut resp = error_response(&Error::Client(OciError::new(
                ErrorCode::TooManyRequests,
                format!(
                    "too many failed logins from this address or for this user, or too many logins at once; retry in {secs}s"
                ),
            )));
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            resp
        }
        Refusal::Denied { message } => {
            error_response(&Error::Client(OciError::new(ErrorCode::Denied, message)))
        }
        Refusal::Unauthorized {
            message,
            scope,
            error,
        } => {
            let mut oci = OciError::new(ErrorCode::Unauthorized, message);
            let mut ch = format!(
                r#"Bearer realm="{}",service="{}""#,
                realm(app, parts),
                auth::token::SERVICE
            );
            if let Some(s) = &scope {
                ch.push_str(&format!(r#",scope="{s}""#));
                // Distribution's detail: what was asked for.
                if let Some((name, actions)) = s
                    .strip_prefix("repository:")
                    .and_then(|r| r.rsplit_once(':'))
                {
                    let detail: Vec<_> = actions
                        .split(',')
                        .map(|a| serde_json::json!({"Type": "repository", "Name": name, "Action": a}))
                        .collect();
                    oci = oci.with_detail(serde_json::Value::Array(detail));
                }
            }
            if let Some(e) = error {
                ch.push_str(&format!(r#",error="{e}""#));
            }
            let mut resp = error_response(&Error::Client(oci));
            if let Ok(v) = HeaderValue::from_str(&ch) {
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
            resp
        }
    }
}
