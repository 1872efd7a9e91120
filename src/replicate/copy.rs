//! Copying content between engines, idempotently and in dependency order: blobs, then the
//! manifests that name them, then tags. Shared by the replication worker and `backfill`.
//! Every byte is verified against its digest before it is committed in the target.

use std::path::PathBuf;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::FutureExt;

use crate::engine::EngineExt;
use crate::engine::{Engine, GetBlob};
use crate::error::{idempotent, EngineError, Error, Result};
use crate::oci::manifest;
use crate::oci::{Digest, Reference, RepoName, Tag};

/// What one copy did.
#[derive(Default, Debug, Clone, Copy)]
pub struct Copied {
    pub blobs: u64,
    pub manifests: u64,
    pub bytes: u64,
}

impl std::ops::AddAssign for Copied {
    fn add_assign(&mut self, o: Copied) {
        self.blobs += o.blobs;
        self.manifests += o.manifests;
        self.bytes += o.bytes;
    }
}

#[derive(Clone)]
pub struct Copier {
    pub spool_dir: PathBuf,
}

impl Copier {
    /// Makes `dst` hold the blob (linked into `repo`). A blob already there costs one stat.
    pub async fn blob(
        &self,
        src: &Arc<dyn Engine>,
        dst: &Arc<dyn Engine>,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Copied> {
        if dst.stat_blob(repo, digest).await?.is_some() {
            dst.link_blob(repo, digest).await?;
            return Ok(Copied::default());
        }
        let read = src
            .get_blob(repo, digest, GetBlob::default())
            .await?
            // Absent, not broken: no retry will find it (the worker dead-letters the kind).
            .ok_or_else(|| Error::engine(src.id(), EngineError::NotFound))?;
        let spool =
            crate::fileio::spool_hashed(&self.spool_dir, "copy", digest, read.stream).await?;
        if &spool.actual != digest || spool.size != read.size {
            return Err(Error::DigestMismatch {
                expected: digest.to_string(),
                actual: spool.actual.to_string(),
            });
        }
        idempotent(dst.put_blob_file(digest, &spool.path, spool.size).await)?;
        idempotent(dst.link_blob(repo, digest).await)?;
        Ok(Copied {
            blobs: 1,
            manifests: 0,
            bytes: spool.size,
        })
    }

    /// Makes `dst` hold the manifest, after every blob and child manifest it references.
    pub fn manifest<'a>(
        &'a self,
        src: &'a Arc<dyn Engine>,
        dst: &'a Arc<dyn Engine>,
        repo: &'a RepoName,
        digest: &'a Digest,
    ) -> BoxFuture<'a, Result<Copied>> {
        async move {
            let by_digest = Reference::Digest(digest.clone());
            if dst.get_manifest(repo, &by_digest, &[]).await?.is_some() {
                // Present means its children are too: manifests are only written after them.
                dst.link_manifest(repo, digest).await?;
                return Ok(Copied::default());
            }
            let m = src
                .get_manifest(repo, &by_digest, &[])
                .await?
                .ok_or_else(|| Error::engine(src.id(), EngineError::NotFound))?;
            let parsed = manifest::parse(&m.bytes, Some(&m.media_type)).map_err(Error::Client)?;
            let mut copied = Copied::default();
            for b in &parsed.blobs {
                copied += self.blob(src, dst, repo, b).await?;
            }
            for child in &parsed.manifests {
                copied += self.manifest(src, dst, repo, child).await?;
            }
            idempotent(dst.put_manifest(repo, &m).await)?;
            copied.manifests += 1;
            copied.bytes += m.bytes.len() as u64;
            Ok(copied)
        }
        .boxed()
    }

    /// Points `tag` at `digest` in `dst`, after making sure the manifest is there.
    pub async fn tag(
        &self,
        src: &Arc<dyn Engine>,
        dst: &Arc<dyn Engine>,
        repo: &RepoName,
        tag: &Tag,
        digest: &Digest,
    ) -> Result<Copied> {
        let copied = self.manifest(src, dst, repo, digest).await?;
        let current = dst.tag_link(repo, tag).await?;
        if current.as_ref().map(|l| &l.digest) != Some(digest) {
            dst.put_tag(repo, tag, digest).await?;
        }
        Ok(copied)
    }
}
