//! `RegistryEngine`: an upstream registry reached over the OCI distribution API.

pub mod auth;
pub mod client;
pub mod health;
pub mod limit;
pub mod ratelimit;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use reqwest::Response;

use super::{
    BlobHit, BlobMeta, BlobRead, ByteRange, ByteStream, Engine, EngineKind, GetBlob, Hit, Lookup,
    Manifest, ManifestMeta, RangeSpec,
};
use crate::error::{EngineError, Error, Result};
use crate::oci::{media, Digest, Reference, RepoName};
pub use client::RegistryClient;

/// Manifests larger than this are refused (the spec's bound, and Distribution's; the push side's).
pub const MAX_MANIFEST: usize = crate::oci::manifest::MAX_MANIFEST;

/// The overall deadline of a small upstream request (manifest, tags list, referrers, blob
/// `HEAD`, the head of a blob `GET`), token fetches included: a whole answer or an engine error.
pub const SMALL_DEADLINE: std::time::Duration = std::time::Duration::from_secs(20);

#[derive(Debug)]
pub struct RegistryEngine {
    client: RegistryClient,
}

impl RegistryEngine {
    /// A blob GET (of a range, with a `Range` header): the head within the deadline; the body
    /// is a stream the fill holds to a minimum rate.
    async fn read_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        opts: GetBlob,
    ) -> Result<Option<BlobRead>> {
        let mut headers = HeaderMap::new();
        if let Some(r) = opts.range {
            let v = match r.end {
                Some(end) => format!("bytes={}-{}", r.start, end.saturating_sub(1)),
                None => format!("bytes={}-", r.start),
            };
            if let Ok(v) = HeaderValue::from_str(&v) {
                headers.insert(http::header::RANGE, v);
            }
        }
        // The head within the deadline; the body is a stream the fill holds to a minimum rate.
        let path = format!("/v2/{repo}/blobs/{digest}");
        let resp = self
            .within("blob GET", self.get(Method::GET, repo, &path, headers))
            .await?;
        let status = resp.status();
        // A 200 to a range from byte 0 is the whole blob: only the asked bytes are read of it.
        let mut cut = None;
        let (size, offset, len) = match status {
            StatusCode::OK => {
                let len = resp
                    .content_length()
                    .ok_or_else(|| self.client.permanent("blob GET without Content-Length"))?;
                if opts.range.is_some_and(|r| r.start > 0) {
                    // The upstream ignored our Range; a resume from the wrong offset would corrupt
                    // the fill, so treat this engine as unable to resume.
                    return Err(self.client.permanent("upstream ignored a Range request"));
                }
                match opts.range.and_then(|r| r.end).filter(|&e| e < len) {
                    Some(end) => {
                        cut = Some(end);
                        (len, 0, end)
                    }
                    None => (len, 0, len),
                }
            }
            StatusCode::PARTIAL_CONTENT => {
                let (a, b, total) = header_str(&resp, http::header::CONTENT_RANGE)
                    .and_then(parse_content_range)
                    .ok_or_else(|| self.client.permanent("206 without a valid Content-Range"))?;
                // Exactly the bytes asked (the end clamped to the blob), or the answer is wrong:
                // a shorter or longer range would be served as the one asked.
                let asked_end = opts.range.map(|r| r.end.map_or(total, |e| e.min(total)));
                if Some(a) != opts.range.map(|r| r.start)
                    || Some(b) != asked_end
                    || a >= b
                    || b > total
                    || resp.content_length().is_some_and(|n| n != b - a)
                {
                    return Err(self
                        .client
                        .permanent("upstream answered another range than asked"));
                }
                (total, a, b - a)
            }
            StatusCode::NOT_FOUND => return Ok(None),
            StatusCode::RANGE_NOT_SATISFIABLE => {
                return Err(self
                    .client
                    .err(EngineError::RangeInvalid("range not satisfiable".into())))
            }
            s => return Err(self.status_error("blob", s)),
        };
        let id = self.client.id().to_string();
        let mut stream: ByteStream =
            Box::pin(resp.bytes_stream().map_err(move |e| Error::reqwest(&id, e)));
        if let Some(end) = cut {
            stream = first_bytes(stream, end);
        }
        Ok(Some(BlobRead {
            size,
            offset,
            len,
            stream,
        }))
    }

    pub fn new(client: RegistryClient) -> RegistryEngine {
        RegistryEngine { client }
    }

    fn scope(repo: &RepoName) -> String {
        format!("repository:{repo}:pull")
    }

    async fn get(
        &self,
        method: Method,
        repo: &RepoName,
        path: &str,
        headers: HeaderMap,
    ) -> Result<Response> {
        self.client
            .send(method, path, Some(&Self::scope(repo)), headers)
            .await
    }

    /// An error for an upstream status other than success or 404.
    /// `GET` or `HEAD` of a manifest with the client's `Accept`: the `200` response, `None` for
    /// a `404`, an error for anything else.
    async fn manifest_request(
        &self,
        method: Method,
        repo: &RepoName,
        reference: &Reference,
        accept: &[String],
    ) -> Result<Option<reqwest::Response>> {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::ACCEPT, accept_header(accept));
        let path = format!("/v2/{repo}/manifests/{reference}");
        let resp = self.get(method, repo, &path, headers).await?;
        match resp.status() {
            StatusCode::OK => Ok(Some(resp)),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(self.status_error("manifest", s)),
        }
    }

    /// The path and query of a tags-list `Link: <…>; rel="next"` target, if it is the tags list
    /// of `repo` on this upstream (relative, or absolute with this upstream's origin); another
    /// repository's or host's list is never followed.
    fn next_page(&self, repo: &RepoName, link: &str) -> Option<String> {
        let start = link.find('<')? + 1;
        let end = link[start..].find('>')? + start;
        let base = url::Url::parse(&self.client.url("/")).ok()?;
        let target = base.join(&link[start..end]).ok()?;
        if target.origin() != base.origin() || target.path() != format!("/v2/{repo}/tags/list") {
            tracing::warn!(engine = %self.client.id(), link, "tags-list Link outside the repository ignored");
            return None;
        }
        Some(match target.query() {
            Some(q) => format!("{}?{q}", target.path()),
            None => target.path().to_string(),
        })
    }

    /// `fut` (a small upstream request: its answer is read whole), given up with an engine error
    /// when it has not finished within [`SMALL_DEADLINE`]: an upstream that trickles cannot hold
    /// it open.
    async fn within<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(SMALL_DEADLINE, fut).await {
            Ok(r) => r,
            Err(_) => {
                let e = self.client.transient(format!(
                    "{what}: no whole answer within {}s",
                    SMALL_DEADLINE.as_secs()
                ));
                self.client.failed(&e);
                Err(e)
            }
        }
    }

    async fn stat_blob_now(&self, repo: &RepoName, digest: &Digest) -> Result<Option<BlobMeta>> {
        let resp = self
            .get(
                Method::HEAD,
                repo,
                &format!("/v2/{repo}/blobs/{digest}"),
                HeaderMap::new(),
            )
            .await?;
        match resp.status() {
            s if s.is_success() => {
                let size =
                    header_str(&resp, http::header::CONTENT_LENGTH).and_then(|v| v.parse().ok());
                // (the header, not reqwest's body size hint, which is 0 for a HEAD)
                let size =
                    size.ok_or_else(|| self.client.permanent("blob HEAD without Content-Length"))?;
                Ok(Some(BlobMeta { size }))
            }
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(self.status_error("blob", s)),
        }
    }

    async fn get_manifest_now(
        &self,
        repo: &RepoName,
        reference: &Reference,
        accept: &[String],
    ) -> Result<Option<Manifest>> {
        let Some(resp) = self
            .manifest_request(Method::GET, repo, reference, accept)
            .await?
        else {
            return Ok(None);
        };
        let media_type = header_str(&resp, http::header::CONTENT_TYPE)
            .map(|s| s.split(';').next().unwrap_or(s).trim().to_string());
        let header_digest: Option<Digest> = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse().ok());
        let bytes = limit::read_body(resp, MAX_MANIFEST, "manifest")
            .await
            .map_err(|e| self.client.err(e))?;
        // The name we will store and serve it under must be what the bytes hash to.
        let expected = match reference {
            Reference::Digest(d) => Some(d.clone()),
            Reference::Tag(_) => header_digest,
        };
        let digest = match expected {
            Some(d) => {
                let actual = d.same_algorithm_of(&bytes);
                if actual != d {
                    return Err(Error::DigestMismatch {
                        expected: d.to_string(),
                        actual: actual.to_string(),
                    });
                }
                d
            }
            None => Digest::sha256_of(&bytes),
        };
        // Right bytes for the digest, but no manifest (a layer or config answered as one).
        if !media::is_manifest(&bytes) {
            return Err(self
                .client
                .permanent("upstream answered a manifest request with a non-manifest"));
        }
        // An upstream's word for the type is taken only when it is a manifest type; otherwise
        // the bytes must declare one (a "manifest" served as `text/html` is refused, never
        // passed on with its type).
        let media_type = match media_type {
            Some(m) if media::is_manifest_type(&m) => m,
            _ => media::sniff_manifest(&bytes).ok_or_else(|| {
                self.client.permanent(format!(
                    "{repo}:{reference} is not a manifest (no manifest media type)"
                ))
            })?,
        };
        Ok(Some(Manifest {
            digest,
            media_type,
            bytes,
        }))
    }

    async fn head_manifest_now(
        &self,
        repo: &RepoName,
        reference: &Reference,
        accept: &[String],
    ) -> Result<Option<ManifestMeta>> {
        let Some(resp) = self
            .manifest_request(Method::HEAD, repo, reference, accept)
            .await?
        else {
            return Ok(None);
        };
        let digest: Option<Digest> = header_str(
            &resp,
            http::HeaderName::from_static("docker-content-digest"),
        )
        .and_then(|s| s.parse().ok());
        let media_type = header_str(&resp, http::header::CONTENT_TYPE)
            .map(|s| s.split(';').next().unwrap_or(s).trim().to_string());
        let size = header_str(&resp, http::header::CONTENT_LENGTH).and_then(|v| v.parse().ok());
        let media_type = media_type.filter(|m| media::is_manifest_type(m));
        match (digest, media_type, size) {
            (Some(digest), Some(media_type), Some(size)) => Ok(Some(ManifestMeta {
                digest,
                media_type,
                size,
            })),
            // An upstream that does not say the digest on HEAD: fall back to a GET.
            _ => Ok(self
                .get_manifest_now(repo, reference, accept)
                .await?
                .map(|m| ManifestMeta {
                    size: m.bytes.len() as u64,
                    digest: m.digest,
                    media_type: m.media_type,
                })),
        }
    }

    async fn list_tags_now(&self, repo: &RepoName) -> Result<Option<Vec<String>>> {
        #[derive(serde::Deserialize)]
        struct TagList {
            tags: Option<Vec<String>>,
        }
        let mut all = Vec::new();
        let mut path = format!("/v2/{repo}/tags/list");
        // Follow `Link: <...>; rel="next"` pagination, bounded, and only within this repository
        // of this upstream.
        for _ in 0..100 {
            // Each page within its deadline (a long list is many pages).
            let page = self.within("tags list page", async {
                let resp = self.get(Method::GET, repo, &path, HeaderMap::new()).await?;
                match resp.status() {
                    StatusCode::OK => {}
                    StatusCode::NOT_FOUND => return Ok(None),
                    s => return Err(self.status_error("tags", s)),
                }
                let next =
                    header_str(&resp, http::header::LINK).and_then(|l| self.next_page(repo, l));
                let body = limit::read_body(resp, limit::MAX_TAGS_PAGE, "tags list page")
                    .await
                    .map_err(|e| self.client.err(e))?;
                Ok(Some((body, next)))
            });
            let Some((body, next)) = page.await? else {
                return Ok(None);
            };
            let list: TagList = serde_json::from_slice(&body)
                .map_err(|e| self.client.permanent(format!("tags list: {e}")))?;
            drop(body);
            all.extend(list.tags.unwrap_or_default());
            if all.len() > limit::MAX_TAGS {
                return Err(self
                    .client
                    .permanent(format!("tags list longer than {} tags", limit::MAX_TAGS)));
            }
            match next {
                Some(n) => path = n,
                None => break,
            }
        }
        all.sort();
        all.dedup();
        Ok(Some(all))
    }

    async fn referrers_now(
        &self,
        repo: &RepoName,
        digest: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Option<(Bytes, bool)>> {
        let mut path = format!("/v2/{repo}/referrers/{digest}");
        if let Some(t) = artifact_type {
            path.push_str("?artifactType=");
            path.push_str(&url::form_urlencoded::byte_serialize(t.as_bytes()).collect::<String>());
        }
        let resp = self.get(Method::GET, repo, &path, HeaderMap::new()).await?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            s => return Err(self.status_error("referrers", s)),
        }
        let filtered = resp.headers().contains_key("oci-filters-applied");
        let body = limit::read_body(resp, MAX_MANIFEST, "referrers index")
            .await
            .map_err(|e| self.client.err(e))?;
        Ok(Some((body, filtered)))
    }

    /// An answer with an unexpected status, by its kind (refused, rate limited, transient,
    /// permanent).
    fn status_error(&self, what: &str, status: StatusCode) -> Error {
        // A 429 or 503 that said when to come back (or opened the breaker): that refusal, with
        // its `Retry-After`.
        if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
            if let Err(e) = self.client.health().admit() {
                return self.client.err(e);
            }
        }
        let message = match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                if self.client.credentials_withheld() {
                    format!(
                        "upstream {} refused access to {what}: its token realm is not an origin its credentials may go to (upstreams[].auth.realms), so none were sent",
                        self.client.id()
                    )
                } else {
                    format!("upstream {} refused access to {what}", self.client.id())
                }
            }
            StatusCode::TOO_MANY_REQUESTS => {
                format!("upstream {} is rate limiting", self.client.id())
            }
            s => format!("{what}: upstream answered {s}"),
        };
        self.client.err(EngineError::from_status(status, message))
    }
}

fn accept_header(accept: &[String]) -> HeaderValue {
    let joined = if accept.is_empty() || accept.iter().all(|a| a.trim() == "*/*") {
        media::ALL_MANIFESTS.join(", ")
    } else {
        accept.join(", ")
    };
    HeaderValue::from_str(&joined).unwrap_or_else(|_| HeaderValue::from_static(media::OCI_MANIFEST))
}

/// The first `n` bytes of `s` (the rest is not read: dropping the stream drops the response).
fn first_bytes(s: ByteStream, n: u64) -> ByteStream {
    Box::pin(futures::stream::unfold(
        (s, n),
        |(mut s, left)| async move {
            if left == 0 {
                return None;
            }
            match s.next().await? {
                Ok(mut b) => {
                    if b.len() as u64 > left {
                        b.truncate(left as usize);
                    }
                    let left = left - b.len() as u64;
                    Some((Ok(b), (s, left)))
                }
                Err(e) => Some((Err(e), (s, 0))),
            }
        },
    ))
}

fn header_str(r: &Response, name: http::header::HeaderName) -> Option<&str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

/// `bytes a-b/total` → (a, b + 1, total).
fn parse_content_range(v: &str) -> Option<(u64, u64, u64)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    Some((
        a.parse().ok()?,
        b.parse::<u64>().ok()? + 1,
        total.parse().ok()?,
    ))
}

#[async_trait]
impl Engine for RegistryEngine {
    fn id(&self) -> &str {
        self.client.id()
    }

    fn kind(&self) -> EngineKind {
        EngineKind::Registry
    }

    async fn open_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        want: Lookup,
    ) -> Result<Option<BlobHit>> {
        // A HEAD, and a suffix range, need the size first; any other read is one GET.
        let needs_size = !want.body || matches!(want.range, Some(RangeSpec::Suffix(_)));
        let range = if needs_size {
            let Some(meta) = self
                .within("blob HEAD", self.stat_blob_now(repo, digest))
                .await?
            else {
                return Ok(None);
            };
            let range = want.range.map(|s| s.resolve(meta.size)).transpose()?;
            if !want.body {
                return Ok(Some(BlobHit {
                    size: meta.size,
                    range,
                    body: None,
                }));
            }
            range
        } else {
            match want.range {
                Some(RangeSpec::From { start, last }) => Some(ByteRange {
                    start,
                    end: last.map(|l| l.saturating_add(1)),
                }),
                _ => None,
            }
        };
        let Some(read) = self.read_blob(repo, digest, GetBlob { range }).await? else {
            return Ok(None);
        };
        let range = range.map(|_| ByteRange {
            start: read.offset,
            end: Some(read.offset + read.len),
        });
        Ok(Some(BlobHit {
            size: read.size,
            range,
            body: Some(Hit::Stream(read.stream)),
        }))
    }

    async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        accept: &[String],
    ) -> Result<Option<Manifest>> {
        self.within("manifest", self.get_manifest_now(repo, reference, accept))
            .await
    }

    async fn head_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        accept: &[String],
    ) -> Result<Option<ManifestMeta>> {
        self.within(
            "manifest HEAD",
            self.head_manifest_now(repo, reference, accept),
        )
        .await
    }

    async fn list_tags(&self, repo: &RepoName) -> Result<Option<Vec<String>>> {
        self.list_tags_now(repo).await
    }

    async fn referrers(
        &self,
        repo: &RepoName,
        digest: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Option<(Bytes, bool)>> {
        self.within("referrers", self.referrers_now(repo, digest, artifact_type))
            .await
    }

    async fn probe(&self) -> Result<()> {
        // Any HTTP answer (200, or 401 from a registry that wants auth) proves reachability.
        let resp = self
            .client
            .send(Method::GET, "/v2/", None, HeaderMap::new())
            .await?;
        if resp.status().is_server_error() {
            return Err(self
                .client
                .transient(format!("/v2/ answered {}", resp.status())));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range() {
        assert_eq!(parse_content_range("bytes 0-9/100"), Some((0, 10, 100)));
        assert_eq!(parse_content_range("bytes */100"), None);
    }
}
