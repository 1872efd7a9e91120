//! Thin handlers of the push side: upload sessions, manifest puts, deletes. They parse headers
//! and queries, call the `Pusher`, and answer with the spec's status codes and `Location`s.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use http::header::{self, HeaderMap, HeaderName};
use http::request::Parts;
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, BodyStream, Limited};

use super::body::{self, Body, RequestBody};
use super::headers::{self as h, value};
use crate::app::App;
use crate::engine::ByteStream;
use crate::error::{Error, Result};
use crate::oci::manifest::MAX_MANIFEST;
use crate::oci::{Digest, ErrorCode, OciError, Reference, RepoName};
use crate::pull::rate::{self, MinRate};
use crate::push::Pusher;

fn pusher(app: &App) -> Result<&Pusher> {
    app.pusher.as_deref().ok_or_else(|| {
        Error::client(
            ErrorCode::Unsupported,
            "this ociedge does not accept pushes (push.engine is not set)",
        )
    })
}

/// A request body as a byte stream (for blobs: never buffered whole), held to the minimum rate
/// of [`MinRate::default`]: a body that never ends, or trickles, fails the request.
pub fn stream(body: RequestBody) -> ByteStream {
    let s: ByteStream = Box::pin(BodyStream::new(body).filter_map(|frame| async move {
        match frame {
            Ok(f) => f.into_data().ok().map(Ok),
            Err(e) => Some(Err(Error::Io(std::io::Error::other(e)))),
        }
    }));
    rate::guard_with(s, MinRate::default(), |m| {
        Error::client(ErrorCode::BlobUploadInvalid, format!("request body {m}"))
    })
}

/// The longest a manifest body (at most 4 MiB) may take to arrive.
const MANIFEST_BODY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

const UPLOAD_UUID: HeaderName = HeaderName::from_static("docker-upload-uuid");
const OCI_SUBJECT: HeaderName = HeaderName::from_static("oci-subject");

fn respond(status: StatusCode, headers: &[(HeaderName, String)]) -> Result<Response<Body>> {
    let mut b = Response::builder()
        .status(status)
        .header(header::CONTENT_LENGTH, 0);
    for (k, v) in headers {
        b = b.header(k, value(v));
    }
    b.body(body::empty())
        .map_err(|e| Error::permanent("http", e))
}

fn storage_name(app: &App, name: &RepoName, ns: Option<&str>) -> Result<RepoName> {
    Ok(app.puller.engines().route(name, ns)?.storage_repo)
}

fn query_digest(query: &[(String, String)]) -> Result<Option<Digest>> {
    match query.iter().find(|(k, _)| k == "digest") {
        Some((_, d)) => d
            .parse()
            .map(Some)
            .map_err(|e| Error::client(ErrorCode::DigestInvalid, format!("invalid digest: {e}"))),
        None => Ok(None),
    }
}

/// `Content-Range: <start>-<end>` of a chunk (inclusive; `bytes ` prefix tolerated).
pub fn content_range(headers: &HeaderMap) -> Result<Option<(u64, u64)>> {
    let Some(v) = headers.get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let bad = || {
        Error::Client(
            OciError::new(
                ErrorCode::BlobUploadInvalid,
                "Content-Range must be <start>-<end>",
            )
            .with_status(StatusCode::RANGE_NOT_SATISFIABLE),
        )
    };
    let s = v.to_str().map_err(|_| bad())?.trim();
    let s = s.strip_prefix("bytes ").unwrap_or(s);
    let s = s.split('/').next().unwrap_or(s);
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let (a, b): (u64, u64) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if b < a {
        return Err(bad());
    }
    Ok(Some((a, b)))
}

fn upload_location(name: &RepoName, id: &str) -> String {
    format!("/v2/{name}/blobs/uploads/{id}")
}

fn range_header(offset: u64) -> String {
    // An empty upload reports 0-0, as Distribution does.
    format!("0-{}", offset.saturating_sub(1))
}

/// `/v2/<name>/blobs/uploads/[<id>]`.
pub async fn upload(
    app: &Arc<App>,
    parts: &Parts,
    body: RequestBody,
    name: &RepoName,
    id: Option<&str>,
    query: &[(String, String)],
    ns: Option<&str>,
) -> Result<Response<Body>> {
    let p = pusher(app)?;
    let repo = storage_name(app, name, ns)?;
    match (&parts.method, id) {
        (&Method::POST, None) => {
            let digest = query_digest(query)?;
            if let Some((_, m)) = query.iter().find(|(k, _)| k == "mount") {
                let mount: Digest = m.parse().map_err(|e| {
                    Error::client(
                        ErrorCode::DigestInvalid,
                        format!("invalid mount digest: {e}"),
                    )
                })?;
                let from = match query.iter().find(|(k, _)| k == "from") {
                    Some((_, f)) => Some(storage_name(
                        app,
                        &f.parse().map_err(|e: crate::oci::name::NameError| {
                            Error::client(ErrorCode::NameInvalid, e.to_string())
                        })?,
                        ns,
                    )?),
                    None => None,
                };
                if p.mount(&repo, &mount, from.as_ref()).await? {
                    return respond(
                        StatusCode::CREATED,
                        &[
                            (header::LOCATION, format!("/v2/{name}/blobs/{mount}")),
                            (h::DOCKER_DIGEST, mount.to_string()),
                        ],
                    );
                }
            } else if let Some(d) = digest {
                p.monolithic(&repo, &d, stream(body)).await?;
                return respond(
                    StatusCode::CREATED,
                    &[
                        (header::LOCATION, format!("/v2/{name}/blobs/{d}")),
                        (h::DOCKER_DIGEST, d.to_string()),
                    ],
                );
            }
            let client = parts
                .extensions
                .get::<super::conn::ClientAddr>()
                .map(|c| c.0.to_string());
            let id = p.start_upload(&repo, client.as_deref()).await?;
            respond(
                StatusCode::ACCEPTED,
                &[
                    (header::LOCATION, upload_location(name, &id)),
                    (UPLOAD_UUID, id.clone()),
                    (header::RANGE, "0-0".into()),
                ],
            )
        }
        (&Method::PATCH, Some(id)) => {
            let range = content_range(&parts.headers)?;
            let offset = p.patch(&repo, id, range, stream(body)).await?;
            respond(
                StatusCode::ACCEPTED,
                &[
                    (header::LOCATION, upload_location(name, id)),
                    (UPLOAD_UUID, id.to_string()),
                    (header::RANGE, range_header(offset)),
                ],
            )
        }
        (&Method::PUT, Some(id)) => {
            let d = query_digest(query)?
                .ok_or_else(|| Error::client(ErrorCode::DigestInvalid, "PUT needs ?digest="))?;
            p.finish(&repo, id, &d, stream(body)).await?;
            respond(
                StatusCode::CREATED,
                &[
                    (header::LOCATION, format!("/v2/{name}/blobs/{d}")),
                    (h::DOCKER_DIGEST, d.to_string()),
                ],
            )
        }
        (&Method::GET, Some(id)) => {
            let offset = p.upload_offset(&repo, id).await?;
            respond(
                StatusCode::NO_CONTENT,
                &[
                    (header::LOCATION, upload_location(name, id)),
                    (UPLOAD_UUID, id.to_string()),
                    (header::RANGE, range_header(offset)),
                ],
            )
        }
        (&Method::DELETE, Some(id)) => {
            p.cancel(&repo, id).await?;
            respond(StatusCode::NO_CONTENT, &[])
        }
        _ => Err(Error::client(
            ErrorCode::Unsupported,
            format!("{} is not allowed here", parts.method),
        )),
    }
}

/// Any write when pushes are forwarded to an upstream registry (`push.engine` names one).
pub async fn forward(
    app: &Arc<App>,
    parts: &Parts,
    body: RequestBody,
    name: &RepoName,
    ns: Option<&str>,
) -> Result<Response<Body>> {
    let Some(f) = &app.forwarder else {
        return Err(Error::client(
            ErrorCode::Unsupported,
            "pushes are not forwarded",
        ));
    };
    let routed = app.puller.engines().route(name, ns)?;
    let rest = parts
        .uri
        .path()
        .strip_prefix(&format!("/v2/{name}/"))
        .ok_or_else(|| Error::client(ErrorCode::NameInvalid, "unexpected path"))?;
    if app.auth.is_some() {
        // With an auth: section the client's credentials are ours (an htpasswd password or a
        // token we signed): they must never reach the upstream.
        let mut own = parts.clone();
        own.headers.remove(header::AUTHORIZATION);
        let mut resp = f
            .forward(&own, stream(body), name, &routed.upstream_repo, rest)
            .await?
            .map(body::stream);
        // Nor may the upstream's challenge reach the client: it would send the client (whose
        // stored credentials for this host are ociedge's) to the upstream's token service.
        resp.headers_mut().remove(header::WWW_AUTHENTICATE);
        if resp.status() == StatusCode::UNAUTHORIZED {
            return Err(Error::client(
                ErrorCode::Denied,
                format!(
                    "the upstream {} refused the push (pushes are forwarded without the client's credentials when ociedge has an auth: section)",
                    app.config.push.engine.as_deref().unwrap_or("registry")
                ),
            ));
        }
        return Ok(resp);
    }
    Ok(
        f.forward(parts, stream(body), name, &routed.upstream_repo, rest)
            .await?
            .map(body::stream),
    )
}

/// `PUT /v2/<name>/manifests/<reference>`.
pub async fn put_manifest(
    app: &Arc<App>,
    parts: &Parts,
    body: RequestBody,
    name: &RepoName,
    reference: &Reference,
    ns: Option<&str>,
) -> Result<Response<Body>> {
    let p = pusher(app)?;
    let repo = storage_name(app, name, ns)?;
    let too_big = || {
        Error::Client(
            OciError::new(ErrorCode::ManifestInvalid, "manifest larger than 4 MiB")
                .with_status(StatusCode::PAYLOAD_TOO_LARGE),
        )
    };
    if parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|l| l > MAX_MANIFEST as u64)
    {
        return Err(too_big());
    }
    let read = tokio::time::timeout(
        MANIFEST_BODY_DEADLINE,
        Limited::new(body, MAX_MANIFEST).collect(),
    );
    let bytes: Bytes = match read.await {
        Ok(Ok(c)) => c.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return Err(too_big()),
        Ok(Err(e)) => return Err(Error::Io(std::io::Error::other(e))),
        Err(_) => {
            return Err(Error::client(
                ErrorCode::ManifestInvalid,
                "the manifest body did not arrive within 60s",
            ))
        }
    };
    let ct = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let pushed = p.put_manifest(&repo, reference, ct, bytes).await?;
    let mut hs = vec![
        (
            header::LOCATION,
            format!("/v2/{name}/manifests/{}", pushed.digest),
        ),
        (h::DOCKER_DIGEST, pushed.digest.to_string()),
    ];
    if let Some(s) = pushed.subject {
        hs.push((OCI_SUBJECT, s.to_string()));
    }
    respond(StatusCode::CREATED, &hs)
}

/// `DELETE /v2/<name>/manifests/<reference>`.
pub async fn delete_manifest(
    app: &Arc<App>,
    name: &RepoName,
    reference: &Reference,
    ns: Option<&str>,
) -> Result<Response<Body>> {
    let p = pusher(app)?;
    p.delete_manifest(&storage_name(app, name, ns)?, reference)
        .await?;
    respond(StatusCode::ACCEPTED, &[])
}

/// `DELETE /v2/<name>/blobs/<digest>`.
pub async fn delete_blob(
    app: &Arc<App>,
    name: &RepoName,
    digest: &Digest,
    ns: Option<&str>,
) -> Result<Response<Body>> {
    let p = pusher(app)?;
    p.delete_blob(&storage_name(app, name, ns)?, digest).await?;
    respond(StatusCode::ACCEPTED, &[])
}
