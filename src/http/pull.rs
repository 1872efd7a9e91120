//! Thin handlers of the read side: parse what the route table left, call the `Puller`, set the
//! headers mirrors and CDNs rely on.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};

use super::body::{self, Body};
use super::headers::{self as h, value};
use crate::app::App;
use crate::engine::set::Routed;
use crate::error::{Error, Result};
use crate::oci::{media, Digest, ErrorCode, Reference, RepoName};
use crate::pull::BlobBody;

fn routed(app: &App, name: &RepoName, ns: Option<&str>) -> Result<Routed> {
    app.puller.engines().route(name, ns)
}

fn builder(status: StatusCode) -> http::response::Builder {
    Response::builder().status(status)
}

fn finish(b: http::response::Builder, body: Body) -> Result<Response<Body>> {
    b.body(body).map_err(|e| Error::permanent("http", e))
}

fn immutable(b: http::response::Builder, d: &Digest) -> http::response::Builder {
    b.header(header::CACHE_CONTROL, IMMUTABLE_VALUE.clone())
        .header(header::ETAG, h::etag_value(d))
        .header(h::DOCKER_DIGEST, value(d.as_str()))
}

static IMMUTABLE_VALUE: HeaderValue = HeaderValue::from_static(h::IMMUTABLE);

/// Tells the bytes-served counter of `source` what goes out.
fn served(app: &Arc<App>, source: &Arc<str>) -> impl Fn(u64) + Send + 'static {
    let metrics = app.metrics.clone();
    let source = source.clone();
    move |n| metrics.bytes_served(&source, n)
}

/// Counts body bytes by source as they are sent.
fn counted(app: &Arc<App>, source: &Arc<str>, s: crate::engine::ByteStream) -> Body {
    let sent = served(app, source);
    body::stream(Box::pin(s.inspect(move |r| {
        if let Ok(b) = r {
            sent(b.len() as u64);
        }
    })))
}

pub async fn blob(
    app: &Arc<App>,
    method: &Method,
    headers: &HeaderMap,
    name: &RepoName,
    digest: &Digest,
    ns: Option<&str>,
) -> Result<Response<Body>> {
    let r = routed(app, name, ns)?;
    let not_modified = || {
        finish(
            immutable(builder(StatusCode::NOT_MODIFIED), digest),
            body::empty(),
        )
    };
    if h::none_match_tag(headers, digest) {
        return not_modified();
    }
    if h::none_match(headers, digest) {
        // `*`: only for a blob that exists (an unknown one is answered as without the header).
        app.puller.blob(&r, digest, None, true).await?;
        return not_modified();
    }
    let range = if h::if_range_allows(headers, digest) {
        h::parse_range(headers)?
    } else {
        None
    };
    let head = method == Method::HEAD;
    let ans = app.puller.blob(&r, digest, range, head).await?;
    if let Some(url) = &ans.redirect {
        // The presigned URL expires: a CDN must not keep the redirect.
        let b = builder(StatusCode::TEMPORARY_REDIRECT)
            .header(header::LOCATION, value(url.as_str()))
            .header(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))
            .header(h::DOCKER_DIGEST, value(digest.as_str()))
            .header(h::X_SOURCE, value(&ans.source))
            .header(header::CONTENT_LENGTH, 0);
        return finish(b, body::empty());
    }
    let (status, len) = match ans.range {
        Some(rg) => (
            StatusCode::PARTIAL_CONTENT,
            rg.end.unwrap_or(ans.size) - rg.start,
        ),
        None => (StatusCode::OK, ans.size),
    };
    let mut b = immutable(builder(status), digest)
        .header(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        )
        .header(header::CONTENT_LENGTH, len)
        .header(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"))
        .header(h::X_SOURCE, value(&ans.source));
    if let Some(rg) = ans.range {
        let end = rg.end.unwrap_or(ans.size);
        b = b.header(
            header::CONTENT_RANGE,
            value(&format!("bytes {}-{}/{}", rg.start, end - 1, ans.size)),
        );
    }
    let body = match ans.body {
        Some(BlobBody::Stream(s)) if !head => counted(app, &ans.source, s),
        Some(BlobBody::Fill(r)) if !head => body::fill(r, len, served(app, &ans.source)),
        Some(BlobBody::File(f)) if !head => body::file(f, served(app, &ans.source)),
        _ => body::empty(),
    };
    finish(b, body)
}

pub async fn manifest(
    app: &Arc<App>,
    method: &Method,
    headers: &HeaderMap,
    name: &RepoName,
    reference: &Reference,
    ns: Option<&str>,
) -> Result<Response<Body>> {
    let r = routed(app, name, ns)?;
    if let Reference::Digest(d) = reference {
        // (`*` is answered below, once the manifest is known to exist)
        if h::none_match_tag(headers, d) {
            return finish(
                immutable(builder(StatusCode::NOT_MODIFIED), d),
                body::empty(),
            );
        }
    }
    let accept = h::accept(headers);
    let ans = app.puller.manifest(&r, reference, &accept).await?;
    let m = &ans.manifest;
    // Every engine refuses other types; this is the last line, where the type becomes a
    // `Content-Type` on the registry's origin.
    if !crate::oci::media::is_manifest_type(&m.media_type) {
        return Err(Error::client(
            ErrorCode::ManifestUnknown,
            format!("{} is not a manifest", m.digest),
        ));
    }
    let not_modified = h::none_match(headers, &m.digest);
    let status = if not_modified {
        StatusCode::NOT_MODIFIED
    } else {
        StatusCode::OK
    };
    let mut b = builder(status)
        .header(header::CONTENT_TYPE, value(&m.media_type))
        .header(header::ETAG, h::etag_value(&m.digest))
        .header(h::DOCKER_DIGEST, value(m.digest.as_str()))
        .header(h::X_SOURCE, value(&ans.source));
    b = match reference {
        Reference::Digest(_) => b.header(header::CACHE_CONTROL, IMMUTABLE_VALUE.clone()),
        Reference::Tag(_) => {
            let b = b
                .header(header::CACHE_CONTROL, app.tag_cache_control.clone())
                .header(header::VARY, HeaderValue::from_static("Accept"));
            match ans.stale_age {
                Some(age) => b.header(header::AGE, age.as_secs()),
                None => b,
            }
        }
    };
    if not_modified {
        return finish(b, body::empty());
    }
    b = b.header(header::CONTENT_LENGTH, m.bytes.len());
    if method == Method::HEAD {
        return finish(b, body::empty());
    }
    app.metrics.bytes_served(&ans.source, m.bytes.len() as u64);
    finish(b, body::full(m.bytes.clone()))
}

pub async fn tags(
    app: &Arc<App>,
    name: &RepoName,
    query: &[(String, String)],
    ns: Option<&str>,
) -> Result<Response<Body>> {
    let r = routed(app, name, ns)?;
    let n = match query.iter().find(|(k, _)| k == "n") {
        Some((_, v)) => Some(v.parse::<usize>().map_err(|_| {
            Error::client(
                ErrorCode::PaginationNumberInvalid,
                "n must be a non-negative integer",
            )
        })?),
        None => None,
    };
    let last = query
        .iter()
        .find(|(k, _)| k == "last")
        .map(|(_, v)| v.as_str());
    let all = app.puller.tags(&r).await?;
    let mut page: Vec<&String> = all
        .iter()
        .filter(|t| last.is_none_or(|l| t.as_str() > l))
        .collect();
    let more = n.is_some_and(|n| page.len() > n);
    if let Some(n) = n {
        page.truncate(n);
    }
    let body = serde_json::json!({ "name": name.as_str(), "tags": page }).to_string();
    let mut b = builder(StatusCode::OK).header(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let (true, Some(n), Some(l)) = (more, n, page.last()) {
        let link = format!(
            "</v2/{name}/tags/list?n={n}&last={}>; rel=\"next\"",
            url::form_urlencoded::byte_serialize(l.as_bytes()).collect::<String>()
        );
        b = b.header(header::LINK, value(&link));
    }
    finish(b, body::full(body))
}

pub async fn referrers(
    app: &Arc<App>,
    name: &RepoName,
    digest: &Digest,
    query: &[(String, String)],
    ns: Option<&str>,
) -> Result<Response<Body>> {
    let r = routed(app, name, ns)?;
    let artifact_type = query
        .iter()
        .find(|(k, _)| k == "artifactType")
        .map(|(_, v)| v.as_str());
    let pushed = match &app.pusher {
        Some(p) => p.referrers(&r.storage_repo, digest, artifact_type).await?,
        None => None,
    };
    let (bytes, filtered): (Bytes, bool) = match pushed {
        Some(index) => (index, true),
        None => app.puller.referrers(&r, digest, artifact_type).await?,
    };
    let mut b = builder(StatusCode::OK).header(
        header::CONTENT_TYPE,
        HeaderValue::from_static(media::OCI_INDEX),
    );
    if filtered && artifact_type.is_some() {
        b = b.header(
            "oci-filters-applied",
            HeaderValue::from_static("artifactType"),
        );
    }
    finish(b, body::full(bytes))
}
