//! Engines: the named places that hold registry content. One trait, two implementations:
//! [`storage::StorageEngine`] (an object store in the Distribution layout) and
//! [`registry::RegistryEngine`] (an upstream registry over `/v2/`).
//!
//! Contract shared by every method: **absent is `Ok(None)`**, never an error, so the miss path can
//! tell "ask the next engine, it costs nothing" from "this engine is broken" (`Err(Error::Engine)`,
//! whose [`EngineError`] kind the engine decides where it sees the failure: callers decide by it).
//! A stream that ends early or fails yields an `Err` item; callers never treat a short stream as
//! complete. Writes commit whole objects only: a reader sees an object entirely or not at all.

pub mod caching;
pub mod dns;
pub mod layout;
pub mod nearness;
pub mod nofollow;
pub mod objects;
pub mod pushed;
pub mod registry;
pub mod scrub;
pub mod set;
pub mod storage;

use std::fmt::Debug;
use std::path::Path;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{EngineError, Error, Result};
use crate::fileio::FileSlice;
use crate::oci::{Digest, Reference, RepoName, Tag};

pub use crate::fileio::ByteStream;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    Storage,
    Registry,
}

/// What a blob stat tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobMeta {
    pub size: u64,
}

/// A byte range `start..end` (`end` exclusive; `None` = to the end of the blob).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ByteRange {
    pub start: u64,
    pub end: Option<u64>,
}

/// A client's `Range`, before the blob size is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeSpec {
    /// `bytes=a-` or `bytes=a-b` (`b` inclusive).
    From { start: u64, last: Option<u64> },
    /// `bytes=-n`: the last `n` bytes.
    Suffix(u64),
}

impl RangeSpec {
    /// The concrete range for a blob of `size` bytes, or `RANGE_INVALID` when unsatisfiable.
    pub fn resolve(self, size: u64) -> Result<ByteRange> {
        let bad = || {
            Error::engine(
                "range",
                EngineError::RangeInvalid(format!(
                    "range not satisfiable for a blob of {size} bytes"
                )),
            )
        };
        match self {
            RangeSpec::From { start, last } => {
                if start >= size || last.is_some_and(|l| l < start) {
                    return Err(bad());
                }
                Ok(ByteRange {
                    start,
                    end: Some(last.map_or(size, |l| (l + 1).min(size))),
                })
            }
            RangeSpec::Suffix(n) => {
                if n == 0 || size == 0 {
                    return Err(bad());
                }
                Ok(ByteRange {
                    start: size.saturating_sub(n),
                    end: Some(size),
                })
            }
        }
    }

    /// The spec of the concrete range `r` (what a resumed read asks for).
    pub fn of(r: ByteRange) -> RangeSpec {
        RangeSpec::From {
            start: r.start,
            last: r.end.map(|e| e.saturating_sub(1)),
        }
    }
}

/// What [`Engine::open_blob`] is asked for.
#[derive(Clone, Copy, Debug, Default)]
pub struct Lookup {
    /// Only these bytes (resolved against the blob's real size: a start past the end is
    /// `Error::Client(RANGE_INVALID)`).
    pub range: Option<RangeSpec>,
    /// The bytes too, not only the size (a `GET` rather than a `HEAD`).
    pub body: bool,
    /// A client may be sent to a presigned URL valid this long instead of the bytes (engines
    /// that cannot sign answer with the bytes).
    pub redirect: Option<Duration>,
}

impl Lookup {
    /// The first byte asked for, when it is known without the size (a read resumed there).
    pub fn start(&self) -> u64 {
        match self.range {
            Some(RangeSpec::From { start, .. }) => start,
            _ => 0,
        }
    }

    /// The size only.
    pub fn head() -> Lookup {
        Lookup::default()
    }

    /// The bytes of `range` (all of them for `None`).
    pub fn body(range: Option<RangeSpec>) -> Lookup {
        Lookup {
            range,
            body: true,
            redirect: None,
        }
    }
}

/// What a blob hit is: the engine says how its bytes are best sent, the front sends them
/// without knowing where they are kept.
pub struct BlobHit {
    /// The whole blob's size.
    pub size: u64,
    /// The range resolved against `size`, when one was asked for.
    pub range: Option<ByteRange>,
    /// `None` when only the size was asked for.
    pub body: Option<Hit>,
}

/// How the bytes of a blob hit are sent.
pub enum Hit {
    /// A local file (a `file://` engine): sent with `sendfile`, no copy.
    File(FileSlice),
    /// Bytes read from the store.
    Stream(ByteStream),
    /// The client fetches them itself from this URL (a presigned URL of a cloud store).
    Redirect(url::Url),
}

impl BlobHit {
    /// The hit of a stream read (what an engine that reads through a stream answers).
    pub fn streamed(read: BlobRead) -> BlobHit {
        let whole = read.offset == 0 && read.len == read.size;
        BlobHit {
            size: read.size,
            range: (!whole).then_some(ByteRange {
                start: read.offset,
                end: Some(read.offset + read.len),
            }),
            body: Some(Hit::Stream(read.stream)),
        }
    }

    /// `(offset, len)` of the bytes the hit covers.
    pub fn span(&self) -> (u64, u64) {
        match self.range {
            None => (0, self.size),
            Some(r) => {
                let end = r.end.unwrap_or(self.size).min(self.size);
                (r.start, end.saturating_sub(r.start))
            }
        }
    }
}

/// Options of [`EngineExt::get_blob`].
#[derive(Clone, Copy, Debug, Default)]
pub struct GetBlob {
    /// Only these bytes. The engine may not know the total size beforehand, so it is resolved
    /// against the real size: a start past the end is [`EngineError::RangeInvalid`].
    pub range: Option<ByteRange>,
}

/// An open blob read.
pub struct BlobRead {
    /// The whole blob's size.
    pub size: u64,
    /// Offset of the first byte of `stream` in the blob.
    pub offset: u64,
    /// Number of bytes `stream` will yield.
    pub len: u64,
    pub stream: ByteStream,
}

/// Manifest bytes with their digest and media type.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
}

/// What a manifest `HEAD` tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestMeta {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
}

/// A tag's current value in a storage engine, with when it was written (the age of the answer).
#[derive(Clone, Debug)]
pub struct TagLink {
    pub digest: Digest,
    pub modified: Option<SystemTime>,
}

/// Content a repository may hold: blobs are stored once for all repositories, and a repository
/// holds one by a link (Distribution's `_layers` and revision links).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Content {
    Blob(Digest),
    Manifest(Digest),
}

impl Content {
    pub fn digest(&self) -> &Digest {
        match self {
            Content::Blob(d) | Content::Manifest(d) => d,
        }
    }
}

/// A change to what a repository holds, made by [`Engine::update`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The repository holds the content (it is stored already). Idempotent.
    Link(Content),
    /// The repository no longer holds the content; for a manifest, the tags pointing at it go
    /// too. The bytes stay for other repositories.
    Unlink(Content),
    /// The tag points at the manifest.
    Tag(Tag, Digest),
    /// The tag is removed.
    Untag(Tag),
}

/// A named place that holds registry content. Object-safe; used as `Arc<dyn Engine>`.
///
/// Reads answer **absent as `Ok(None)`**; writes commit whole objects only. The conveniences
/// callers use (`stat_blob`, `get_blob`, `link_blob`, `delete_tag`, …) are [`EngineExt`]'s,
/// written once in terms of these.
#[async_trait]
pub trait Engine: Send + Sync + Debug {
    /// The location id (`eu`, `origin`) or upstream name (`docker.io`).
    fn id(&self) -> &str;

    fn kind(&self) -> EngineKind;

    /// The blob (its size, and with `want.body` its bytes as this engine serves them best), or
    /// `None` when this engine does not have it (for `repo`; storage engines hold blobs
    /// globally and ignore `repo`).
    async fn open_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        want: Lookup,
    ) -> Result<Option<BlobHit>>;

    /// Commits a verified blob from a local file. Idempotent: an existing blob is success.
    async fn put_blob_file(&self, _digest: &Digest, _file: &Path, _size: u64) -> Result<()> {
        Err(unsupported(self.id(), "blob writes"))
    }

    /// A manifest by tag or digest. `accept` is the client's `Accept` (registries negotiate on it;
    /// storage engines hold one form). `None` when absent.
    async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        accept: &[String],
    ) -> Result<Option<Manifest>>;

    /// Digest, media type and size of a manifest without its body: the cheap revalidation request.
    async fn head_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        accept: &[String],
    ) -> Result<Option<ManifestMeta>>;

    /// Stores a verified manifest and links it into `repo`.
    async fn put_manifest(&self, _repo: &RepoName, _manifest: &Manifest) -> Result<()> {
        Err(unsupported(self.id(), "manifest writes"))
    }

    /// The tag's current link in a storage engine (`None` for registries or when absent).
    async fn tag_link(&self, _repo: &RepoName, _tag: &Tag) -> Result<Option<TagLink>> {
        Ok(None)
    }

    /// All tags of the repository, sorted; `None` when the repository is unknown.
    async fn list_tags(&self, repo: &RepoName) -> Result<Option<Vec<String>>>;

    /// The referrers index of `digest` as JSON bytes, filtered by `artifact_type` if given and if
    /// the engine can (the bool says it did). `None` when the engine has no referrers API.
    async fn referrers(
        &self,
        _repo: &RepoName,
        _digest: &Digest,
        _artifact_type: Option<&str>,
    ) -> Result<Option<(Bytes, bool)>> {
        Ok(None)
    }

    /// Whether `repo` links `content`: access control serves content only under a repository
    /// that holds it. `false` for engines without links (registries answer `open_blob` and
    /// `head_manifest` per repository instead).
    async fn is_linked(&self, _repo: &RepoName, _content: &Content) -> Result<bool> {
        Ok(false)
    }

    /// Applies `change` to `repo`. Returns whether what an `Unlink` or `Untag` removes was there
    /// (removing what is absent is success); `true` for the others.
    async fn update(&self, _repo: &RepoName, change: &Change) -> Result<bool> {
        let what = match change {
            Change::Link(_) => "links",
            Change::Unlink(_) => "deletes",
            Change::Tag(..) | Change::Untag(_) => "tag writes",
        };
        Err(unsupported(self.id(), what))
    }

    /// A cheap request that proves the engine is reachable; its duration is the RTT sample.
    async fn probe(&self) -> Result<()>;
}

/// What callers say, in terms of [`Engine`]'s methods (as `object_store`'s `ObjectStoreExt`
/// is to `ObjectStore`): implemented for every engine, never overridden.
#[async_trait]
pub trait EngineExt: Engine {
    /// The blob's size, or `None` when absent.
    async fn stat_blob(&self, repo: &RepoName, digest: &Digest) -> Result<Option<BlobMeta>> {
        Ok(self
            .open_blob(repo, digest, Lookup::head())
            .await?
            .map(|h| BlobMeta { size: h.size }))
    }

    /// The blob (or a range of it) as a stream, whatever way the engine serves it.
    async fn get_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        opts: GetBlob,
    ) -> Result<Option<BlobRead>> {
        let want = Lookup::body(opts.range.map(RangeSpec::of));
        let Some(hit) = self.open_blob(repo, digest, want).await? else {
            return Ok(None);
        };
        let (offset, len) = hit.span();
        let stream = match hit.body {
            Some(Hit::Stream(s)) => s,
            Some(Hit::File(f)) => f.stream(),
            Some(Hit::Redirect(_)) | None => {
                return Err(Error::permanent(self.id(), "no bytes for a blob read"))
            }
        };
        Ok(Some(BlobRead {
            size: hit.size,
            offset,
            len,
            stream,
        }))
    }

    async fn link_blob(&self, repo: &RepoName, digest: &Digest) -> Result<()> {
        self.update(repo, &Change::Link(Content::Blob(digest.clone())))
            .await
            .map(drop)
    }

    async fn link_manifest(&self, repo: &RepoName, digest: &Digest) -> Result<()> {
        self.update(repo, &Change::Link(Content::Manifest(digest.clone())))
            .await
            .map(drop)
    }

    async fn put_tag(&self, repo: &RepoName, tag: &Tag, digest: &Digest) -> Result<()> {
        self.update(repo, &Change::Tag(tag.clone(), digest.clone()))
            .await
            .map(drop)
    }

    async fn delete_tag(&self, repo: &RepoName, tag: &Tag) -> Result<bool> {
        self.update(repo, &Change::Untag(tag.clone())).await
    }

    async fn delete_manifest(&self, repo: &RepoName, digest: &Digest) -> Result<bool> {
        self.update(repo, &Change::Unlink(Content::Manifest(digest.clone())))
            .await
    }

    async fn delete_blob(&self, repo: &RepoName, digest: &Digest) -> Result<bool> {
        self.update(repo, &Change::Unlink(Content::Blob(digest.clone())))
            .await
    }

    /// [`Engine::is_linked`] of a blob (`manifest: false`) or a manifest.
    async fn links(&self, repo: &RepoName, digest: &Digest, manifest: bool) -> Result<bool> {
        let c = if manifest {
            Content::Manifest(digest.clone())
        } else {
            Content::Blob(digest.clone())
        };
        self.is_linked(repo, &c).await
    }
}

impl<E: Engine + ?Sized> EngineExt for E {}

fn unsupported(engine: &str, what: &'static str) -> Error {
    Error::engine(engine, EngineError::Unsupported(what))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The contract stays one a reader takes in on one screen: what callers need beyond it is
    /// `EngineExt`'s, written once in terms of it.
    #[test]
    fn the_engine_contract_stays_small() {
        let src = include_str!("mod.rs");
        let start = src.find("pub trait Engine:").expect("the trait");
        let end = start + src[start..].find("\n}\n").expect("its end");
        let methods = src[start..end]
            .lines()
            .filter(|l| {
                let l = l.trim_start();
                l.starts_with("fn ") || l.starts_with("async fn ")
            })
            .count();
        assert!(methods < 14, "Engine has {methods} methods");
    }

    #[test]
    fn ranges_resolve() {
        let f = |s, l| RangeSpec::From { start: s, last: l };
        let r = |start, end| ByteRange {
            start,
            end: Some(end),
        };
        assert_eq!(f(0, Some(9)).resolve(100).unwrap(), r(0, 10));
        assert_eq!(f(90, None).resolve(100).unwrap(), r(90, 100));
        assert_eq!(f(90, Some(500)).resolve(100).unwrap(), r(90, 100));
        assert_eq!(RangeSpec::Suffix(10).resolve(100).unwrap(), r(90, 100));
        assert_eq!(RangeSpec::Suffix(1000).resolve(100).unwrap(), r(0, 100));
        assert!(f(100, None).resolve(100).is_err());
        assert!(f(5, Some(4)).resolve(100).is_err());
        assert!(RangeSpec::Suffix(0).resolve(100).is_err());
    }
}
