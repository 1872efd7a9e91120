//! The one route table. The `/v2/` grammar is parsed by hand, splitting from the right on the
//! endpoint markers, so repository names with any number of slashes work; names, digests and
//! references are validated here, before any I/O.

use http::Method;

use crate::error::{Error, Result};
use crate::oci::{Digest, ErrorCode, Reference, RepoName};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /v2/`
    Base,
    Manifest {
        name: RepoName,
        reference: Reference,
    },
    Blob {
        name: RepoName,
        digest: Digest,
    },
    /// `/v2/<name>/blobs/uploads/` (`id` None) or `/v2/<name>/blobs/uploads/<id>`.
    Upload {
        name: RepoName,
        id: Option<String>,
    },
    Tags {
        name: RepoName,
    },
    Referrers {
        name: RepoName,
        digest: Digest,
    },
    Catalog,
    /// `/token`: the token endpoint of the `auth:` section.
    Token,
    Healthz,
    Readyz,
    Metrics,
    Status,
    /// `/_ociedge/`: the HTML status page drawn from `Status`.
    StatusPage,
    /// `POST /_ociedge/prewarm` (`id` None) or `GET /_ociedge/prewarm/<id>`.
    Prewarm {
        id: Option<String>,
    },
}

impl Route {
    /// A stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Route::Base => "base",
            Route::Manifest {
                reference: Reference::Tag(_),
                ..
            } => "manifest_tag",
            Route::Manifest {
                reference: Reference::Digest(_),
                ..
            } => "manifest_digest",
            Route::Blob { .. } => "blob",
            Route::Upload { .. } => "upload",
            Route::Tags { .. } => "tags",
            Route::Referrers { .. } => "referrers",
            Route::Catalog => "catalog",
            Route::Token => "token",
            Route::Healthz => "healthz",
            Route::Readyz => "readyz",
            Route::Metrics => "metrics",
            Route::Status => "status",
            Route::StatusPage => "status_page",
            Route::Prewarm { .. } => "prewarm",
        }
    }
}

fn name(s: &str) -> Result<RepoName> {
    s.parse::<RepoName>().map_err(|e| {
        Error::client(
            ErrorCode::NameInvalid,
            format!("invalid repository name: {e}"),
        )
    })
}

fn digest(s: &str) -> Result<Digest> {
    s.parse::<Digest>()
        .map_err(|e| Error::client(ErrorCode::DigestInvalid, format!("invalid digest: {e}")))
}

fn not_found() -> Error {
    Error::Client(
        crate::oci::OciError::new(ErrorCode::Unsupported, "no such endpoint")
            .with_status(http::StatusCode::NOT_FOUND),
    )
}

/// Parses a request path (without the query), as a write would: a manifest reference that is
/// neither a tag nor a digest is refused as invalid input.
pub fn parse(path: &str) -> Result<Route> {
    parse_as(false, path)
}

/// Parses the path of a request by `method`. For `GET`, `HEAD` and `DELETE`, a manifest reference
/// that is neither a valid tag nor a valid digest names no manifest: `404 MANIFEST_UNKNOWN`, as
/// the distribution-spec lists for those routes (a `PUT` of one is `400`).
pub fn parse_request(method: &Method, path: &str) -> Result<Route> {
    let names = is_read(method) || method == Method::DELETE;
    parse_as(names, path)
}

fn parse_as(names_only: bool, path: &str) -> Result<Route> {
    match path {
        "/v2" | "/v2/" => return Ok(Route::Base),
        "/healthz" => return Ok(Route::Healthz),
        "/readyz" => return Ok(Route::Readyz),
        "/metrics" => return Ok(Route::Metrics),
        "/_ociedge/status" | "/status" => return Ok(Route::Status),
        "/_ociedge/" | "/_ociedge" => return Ok(Route::StatusPage),
        "/v2/_catalog" => return Ok(Route::Catalog),
        "/token" => return Ok(Route::Token),
        "/_ociedge/prewarm" | "/_ociedge/prewarm/" => return Ok(Route::Prewarm { id: None }),
        _ => {}
    }
    if let Some(id) = path.strip_prefix("/_ociedge/prewarm/") {
        // Job ids are ours: lower-case letters, digits and `-`; anything else is no job.
        if crate::prewarm::store::valid_id(id) {
            return Ok(Route::Prewarm {
                id: Some(id.to_string()),
            });
        }
        return Err(not_found());
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Err(not_found());
    };
    if rest.len() > 4096 {
        return Err(Error::client(
            ErrorCode::NameInvalid,
            "request path too long",
        ));
    }
    if let Some(n) = rest.strip_suffix("/tags/list") {
        return Ok(Route::Tags { name: name(n)? });
    }
    if let Some(i) = rest.find("/blobs/uploads") {
        let tail = &rest[i + "/blobs/uploads".len()..];
        if tail.is_empty() || tail == "/" {
            return Ok(Route::Upload {
                name: name(&rest[..i])?,
                id: None,
            });
        }
        if let Some(id) = tail.strip_prefix('/') {
            if !id.contains('/') {
                // Our own ids are 32 hex characters; a forwarded upstream's may be UUIDs. Anything
                // outside a plain token alphabet is refused before any I/O.
                let plain =
                    |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'=');
                if id.is_empty() || id.len() > 128 || !id.bytes().all(plain) || id.starts_with('.')
                {
                    return Err(Error::client(
                        ErrorCode::BlobUploadUnknown,
                        format!("upload {:?} is unknown", trunc(id)),
                    ));
                }
                return Ok(Route::Upload {
                    name: name(&rest[..i])?,
                    id: Some(id.to_string()),
                });
            }
        }
    }
    for (marker, kind) in [("/manifests/", 0), ("/blobs/", 1), ("/referrers/", 2)] {
        if let Some(i) = rest.rfind(marker) {
            let (n, last) = (&rest[..i], &rest[i + marker.len()..]);
            if last.is_empty() || last.contains('/') {
                continue;
            }
            let name = name(n)?;
            return match kind {
                0 => {
                    let reference = Reference::parse(last).ok_or_else(|| {
                        if names_only {
                            Error::client(
                                ErrorCode::ManifestUnknown,
                                format!("no manifest {:?} in {name}", trunc(last)),
                            )
                        } else if last.contains(':') {
                            Error::client(
                                ErrorCode::DigestInvalid,
                                format!("invalid digest {:?}", trunc(last)),
                            )
                        } else {
                            Error::client(
                                ErrorCode::ManifestInvalid,
                                format!("invalid tag {:?}", trunc(last)),
                            )
                        }
                    })?;
                    Ok(Route::Manifest { name, reference })
                }
                1 => Ok(Route::Blob {
                    name,
                    digest: digest(last)?,
                }),
                _ => Ok(Route::Referrers {
                    name,
                    digest: digest(last)?,
                }),
            };
        }
    }
    Err(not_found())
}

fn trunc(s: &str) -> String {
    s.chars().take(80).collect()
}

/// Whether `method` is allowed on a read route (pushes are answered separately).
pub fn is_read(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

/// Query parameters, decoded.
pub fn query(q: Option<&str>) -> Vec<(String, String)> {
    q.map(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .into_owned()
            .collect()
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(p: &str) -> &'static str {
        match parse(p) {
            Err(Error::Client(e)) => e.code.as_str(),
            other => panic!("{p}: {other:?}"),
        }
    }

    #[test]
    fn routes() {
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(parse("/v2/").unwrap(), Route::Base);
        assert!(
            matches!(parse("/v2/a/b/c/manifests/latest").unwrap(), Route::Manifest { name, .. } if name.as_str() == "a/b/c")
        );
        assert!(matches!(
            parse(&format!("/v2/x/blobs/{d}")).unwrap(),
            Route::Blob { .. }
        ));
        assert!(matches!(
            parse("/v2/x/y/tags/list").unwrap(),
            Route::Tags { .. }
        ));
        assert!(matches!(
            parse(&format!("/v2/x/referrers/{d}")).unwrap(),
            Route::Referrers { .. }
        ));
        assert!(matches!(
            parse("/v2/x/blobs/uploads/").unwrap(),
            Route::Upload { .. }
        ));
        let id = "0123456789abcdef0123456789abcdef";
        assert!(matches!(
            parse(&format!("/v2/x/blobs/uploads/{id}")).unwrap(),
            Route::Upload { id: Some(_), .. }
        ));
        assert!(parse("/v2/x/blobs/uploads/d1289-uuid").is_ok());
        assert!(parse("/v2/x/blobs/uploads/..").is_err());
        assert_eq!(parse("/_ociedge/").unwrap(), Route::StatusPage);
        assert_eq!(parse("/_ociedge").unwrap(), Route::StatusPage);
        assert_eq!(parse("/_ociedge/status").unwrap(), Route::Status);
        assert_eq!(
            parse("/_ociedge/prewarm").unwrap(),
            Route::Prewarm { id: None }
        );
        assert_eq!(
            parse("/_ociedge/prewarm/0af3").unwrap(),
            Route::Prewarm {
                id: Some("0af3".into())
            }
        );
        assert!(parse("/_ociedge/prewarm/../status").is_err());
        assert!(parse("/_ociedge/prewarm/A").is_err());
        assert!(parse("/v2/x/blobs/uploads/a%2fb").is_err());
        // A repository may be called "manifests" or "blobs".
        assert!(
            matches!(parse("/v2/manifests/manifests/1").unwrap(), Route::Manifest { name, .. } if name.as_str() == "manifests")
        );
    }

    #[test]
    fn bad_input() {
        assert_eq!(code("/v2/UPPER/manifests/latest"), "NAME_INVALID");
        assert_eq!(code("/v2/a/../b/manifests/latest"), "NAME_INVALID");
        assert_eq!(code("/v2/a//b/manifests/latest"), "NAME_INVALID");
        assert_eq!(
            code(&format!("/v2/{}/manifests/latest", "a".repeat(300))),
            "NAME_INVALID"
        );
        assert_eq!(code("/v2/a/blobs/sha256:abc"), "DIGEST_INVALID");
        assert_eq!(code("/v2/a/manifests/sha256:xyz"), "DIGEST_INVALID");
        assert_eq!(code("/v2/a/manifests/-bad"), "MANIFEST_INVALID");
        assert_eq!(code("/nope"), "UNSUPPORTED");
    }

    #[test]
    fn a_reference_that_is_no_tag_nor_digest_names_no_manifest() {
        for p in [
            "/v2/a/manifests/.hidden",
            "/v2/a/manifests/-bad",
            "/v2/a/manifests/sha256:xyz",
        ] {
            for m in [Method::GET, Method::HEAD, Method::DELETE] {
                match parse_request(&m, p) {
                    Err(Error::Client(e)) => {
                        assert_eq!(e.code.as_str(), "MANIFEST_UNKNOWN", "{m} {p}");
                        assert_eq!(e.status, http::StatusCode::NOT_FOUND, "{m} {p}");
                    }
                    other => panic!("{m} {p}: {other:?}"),
                }
            }
            assert!(parse_request(&Method::PUT, p).is_err());
        }
        // Bad names stay bad names.
        match parse_request(&Method::GET, "/v2/A/manifests/.x") {
            Err(Error::Client(e)) => assert_eq!(e.code.as_str(), "NAME_INVALID"),
            other => panic!("{other:?}"),
        }
    }
}
