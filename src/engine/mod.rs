//! Engines: the named places that hold registry content. One trait, two implementations:
//! [`storage::StorageEngine`] (an object store in the Distribution layout) and
//! [`registry::RegistryEngine`] (an upstream registry over `/v2/`).
//!
//! Contract shared by every method: **absent is `Ok(None)`**, never an error, so the miss path can
//! tell "ask the next engine, it costs nothing" from "this engine is broken" (`Err(Error::Engine)`,
//! whose [`EngineError`] kind the engine decides where it sees the failure: callers decide by it).
//! A stream that ends early or fails yields an `Err` item; callers never treat a short stream as
//! complete. Writes commit whole objects only: a reader sees an object entirely or not at all.

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
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

use crate::error::{EngineError, Error, Result};
use crate::oci::{Digest, Reference, RepoName, Tag};

/// A stream of body bytes from an engine.
pub type ByteStream = BoxStream<'static, Result<Bytes>>;

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

/// Options of [`Engine::get_blob`].
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

/// A file the engine can serve from directly (a `file://` engine's hit), for zero-copy paths.
pub struct LocalFile {
    pub file: std::fs::File,
    pub size: u64,
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

/// A named place that holds registry content. Object-safe; used as `Arc<dyn Engine>`.
#[async_trait]
pub trait Engine: Send + Sync + Debug {
    /// The location id (`eu`, `origin`) or upstream name (`docker.io`).
    fn id(&self) -> &str;

    fn kind(&self) -> EngineKind;

    /// The blob's size, or `None` when this engine does not have it (for `repo`; storage engines
    /// hold blobs globally and ignore `repo`).
    async fn stat_blob(&self, repo: &RepoName, digest: &Digest) -> Result<Option<BlobMeta>>;

    /// Opens the blob (or a range of it). `None` when absent.
    async fn get_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        opts: GetBlob,
    ) -> Result<Option<BlobRead>>;

    /// A time-limited URL a client can fetch the blob from directly (S3, GCS, Azure engines);
    /// `None` for engines that cannot sign.
    async fn presigned_get(
        &self,
        _digest: &Digest,
        _expires_in: std::time::Duration,
    ) -> Result<Option<url::Url>> {
        Ok(None)
    }

    /// The directory of a `file://` engine (hits are read from it directly).
    fn local_dir(&self) -> Option<&Path> {
        None
    }

    /// An open file for the blob when the engine is a local directory; `None` otherwise or when
    /// absent. The hot hit path uses it to skip object_store's small-buffer reads.
    async fn open_local_file(&self, _digest: &Digest) -> Result<Option<LocalFile>> {
        Ok(None)
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

    /// Commits a verified blob from a local file. Idempotent: an existing blob is success.
    async fn put_blob_file(&self, _digest: &Digest, _file: &Path, _size: u64) -> Result<()> {
        Err(unsupported(self.id(), "blob writes"))
    }

    /// Records that `repo` contains the blob (Distribution's `_layers` link).
    async fn link_blob(&self, _repo: &RepoName, _digest: &Digest) -> Result<()> {
        Err(unsupported(self.id(), "blob links"))
    }

    /// Records that `repo` contains the manifest (Distribution's revision link).
    async fn link_manifest(&self, _repo: &RepoName, _digest: &Digest) -> Result<()> {
        Err(unsupported(self.id(), "manifest links"))
    }

    /// Whether `repo` links the blob (or, with `manifest`, the manifest) `digest`: blobs are
    /// stored once for all repositories, and access control serves content only under a
    /// repository that holds it. `false` for engines without links (registries answer
    /// `stat_blob`/`head_manifest` per repository instead).
    async fn is_linked(&self, _repo: &RepoName, _digest: &Digest, _manifest: bool) -> Result<bool> {
        Ok(false)
    }

    /// Stores a verified manifest and links it into `repo`.
    async fn put_manifest(&self, _repo: &RepoName, _manifest: &Manifest) -> Result<()> {
        Err(unsupported(self.id(), "manifest writes"))
    }

    /// Points `tag` at `digest`.
    async fn put_tag(&self, _repo: &RepoName, _tag: &Tag, _digest: &Digest) -> Result<()> {
        Err(unsupported(self.id(), "tag writes"))
    }

    /// Removes a tag (its current link). Absent is success.
    async fn delete_tag(&self, _repo: &RepoName, _tag: &Tag) -> Result<()> {
        Err(unsupported(self.id(), "tag deletes"))
    }

    /// Removes a manifest from `repo` (its revision link, and every tag pointing at it).
    /// Returns whether it was there. The manifest's bytes stay for other repositories.
    async fn delete_manifest(&self, _repo: &RepoName, _digest: &Digest) -> Result<bool> {
        Err(unsupported(self.id(), "manifest deletes"))
    }

    /// Removes a blob from `repo` (its layer link). Returns whether it was linked.
    async fn delete_blob(&self, _repo: &RepoName, _digest: &Digest) -> Result<bool> {
        Err(unsupported(self.id(), "blob deletes"))
    }

    /// A cheap request that proves the engine is reachable; its duration is the RTT sample.
    async fn probe(&self) -> Result<()>;
}

fn unsupported(engine: &str, what: &'static str) -> Error {
    Error::engine(engine, EngineError::Unsupported(what))
}
