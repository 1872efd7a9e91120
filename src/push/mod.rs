//! The push path: ociedge as the registry, writing to the preferred storage engine. Nothing is
//! acknowledged before it is durable there and its replication jobs are queued (durably).

pub mod forward;
pub mod upload;

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path;

use crate::engine::pushed::PushedRepos;
use crate::engine::storage::StorageEngine;
use crate::engine::EngineExt;
use crate::engine::{ByteStream, Engine, Manifest};
use crate::error::{idempotent, EngineError, Error, Result};
use crate::metrics::Metrics;
use crate::oci::{manifest, media, Digest, ErrorCode, Reference, RepoName};
use crate::replicate::{Job, Replicator};
use upload::{Session, Uploads};

pub struct Pusher {
    engine: Arc<StorageEngine>,
    /// Marks the repositories pushed to (the preferred engine is their authority).
    pushed: Arc<PushedRepos>,
    /// See [`Pusher::link_stored_blobs`].
    link_stored: bool,
    /// The same engine as the app's other paths see it: its caching engine, so that what a
    /// push writes is what the next read answers.
    content: Arc<dyn Engine>,
    uploads: Arc<Uploads>,
    spool_dir: PathBuf,
    replicator: Arc<Replicator>,
    metrics: Metrics,
    /// Set when the preferred engine is the local one: pushed content is recorded as not
    /// evictable (its only copy may be here).
    evictor: Option<Arc<crate::evict::Evictor>>,
    /// Writes of one tag (storage, in-process answer, replication job) are made under its
    /// stripe, so concurrent pushes of a tag are seen in one order everywhere in this process.
    tag_locks: Vec<tokio::sync::Mutex<()>>,
}

const TAG_STRIPES: usize = 64;

/// What a manifest push answers.
pub struct Pushed {
    pub digest: Digest,
    pub subject: Option<Digest>,
}

impl Pusher {
    pub fn new(
        engine: Arc<StorageEngine>,
        content: Arc<dyn Engine>,
        pushed: Arc<PushedRepos>,
        spool_dir: PathBuf,
        replicator: Arc<Replicator>,
        metrics: Metrics,
    ) -> Pusher {
        Pusher {
            uploads: Arc::new(Uploads::new(engine.clone())),
            engine,
            pushed,
            link_stored: false,
            content,
            spool_dir,
            replicator,
            metrics,
            evictor: None,
            tag_locks: (0..TAG_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }
    }

    /// The lock of `repo:tag`'s stripe.
    fn tag_lock(&self, repo: &RepoName, tag: &crate::oci::Tag) -> &tokio::sync::Mutex<()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (repo.as_str(), tag.as_str()).hash(&mut h);
        &self.tag_locks[(h.finish() as usize) % TAG_STRIPES]
    }

    /// Removes upload sessions idle for `max_age`, in the background, from now on.
    pub fn clean_uploads_after(&self, max_age: std::time::Duration) {
        tokio::spawn(self.uploads.clone().run_cleanup(max_age));
    }

    /// Without access control (no `auth:`), a manifest may also reference blobs stored for
    /// other repositories: they are linked into its repository. Every client may read every
    /// repository there, and beside upstreams a client's `HEAD` of a blob is answered by digest
    /// (a mirror's hit), so a client that skipped an upload it was told exists must not be
    /// refused. Under `auth:` a `HEAD` is checked per repository and this stays off.
    pub fn link_stored_blobs(&mut self) {
        self.link_stored = true;
    }

    pub fn set_evictor(&mut self, e: Arc<crate::evict::Evictor>) {
        self.evictor = Some(e);
    }

    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.content
    }

    pub fn replicator(&self) -> &Arc<Replicator> {
        &self.replicator
    }

    /// Opens an upload session for `client` (its address, for the per-client cap).
    pub async fn start_upload(&self, repo: &RepoName, client: Option<&str>) -> Result<String> {
        self.uploads.start(repo, client).await
    }

    pub async fn upload_offset(&self, repo: &RepoName, id: &str) -> Result<u64> {
        Ok(self.uploads.session(repo, id).await?.offset)
    }

    /// A chunk (`PATCH`). `range` is the `Content-Range` (`start`, inclusive `end`) if sent; a
    /// start other than the session's offset is `416`.
    pub async fn patch(
        &self,
        repo: &RepoName,
        id: &str,
        range: Option<(u64, u64)>,
        body: ByteStream,
    ) -> Result<u64> {
        let lock = self.uploads.lock(id);
        let _held = lock.lock().await;
        let session = self.uploads.session(repo, id).await?;
        if let Some((start, _)) = range {
            if start != session.offset {
                return Err(Error::Client(
                    crate::oci::OciError::new(
                        ErrorCode::BlobUploadInvalid,
                        format!(
                            "chunk starts at {start}, the upload is at {}",
                            session.offset
                        ),
                    )
                    .with_status(http::StatusCode::RANGE_NOT_SATISFIABLE),
                ));
            }
        }
        let expected = range.map(|(a, b)| b + 1 - a);
        self.uploads.append(&session, body, expected).await
    }

    /// Finishes an upload (`PUT ?digest=`), with an optional last chunk in `body`.
    pub async fn finish(
        &self,
        repo: &RepoName,
        id: &str,
        digest: &Digest,
        body: ByteStream,
    ) -> Result<()> {
        let lock = self.uploads.lock(id);
        let _held = lock.lock().await;
        let session: Session = self.uploads.session(repo, id).await?;
        let stream = self.uploads.read(&session).await?.chain(body);
        let result = self.commit_stream(repo, digest, Box::pin(stream)).await;
        match &result {
            // A wrong digest ends the session (as Distribution does); a failed engine keeps it for
            // a retry of the PUT.
            Ok(()) | Err(Error::Client(_)) | Err(Error::DigestMismatch { .. }) => {
                let _ = self.uploads.remove(id).await;
            }
            Err(_) => {}
        }
        result
    }

    /// A monolithic upload (`POST ?digest=` with the blob as body).
    pub async fn monolithic(
        &self,
        repo: &RepoName,
        digest: &Digest,
        body: ByteStream,
    ) -> Result<()> {
        self.commit_stream(repo, digest, body).await
    }

    pub async fn cancel(&self, repo: &RepoName, id: &str) -> Result<()> {
        self.uploads.session(repo, id).await?;
        self.uploads.remove(id).await
    }

    /// Cross-repository mount: `true` when the blob exists and is now linked into `repo`.
    pub async fn mount(
        &self,
        repo: &RepoName,
        digest: &Digest,
        from: Option<&RepoName>,
    ) -> Result<bool> {
        let from = from.unwrap_or(repo);
        // Only from a repository that holds the blob (storage keeps one copy for all).
        if !self.content.links(from, digest, false).await? {
            return Ok(false);
        }
        let Some(meta) = self.content.stat_blob(from, digest).await? else {
            return Ok(false);
        };
        self.pushed.mark(repo).await?;
        idempotent(self.content.link_blob(repo, digest).await)?;
        if let Some(ev) = &self.evictor {
            ev.touch(digest, meta.size, Some(false));
        }
        self.replicator
            .enqueue(Job::Blob {
                repo: repo.to_string(),
                digest: digest.to_string(),
            })
            .await?;
        self.metrics.push("blob", "mounted");
        Ok(true)
    }

    /// Spools `body` while hashing it, and commits it under `digest` only if it matches.
    async fn commit_stream(
        &self,
        repo: &RepoName,
        digest: &Digest,
        body: ByteStream,
    ) -> Result<()> {
        let spool = crate::fileio::spool_hashed(&self.spool_dir, "push", digest, body).await?;
        let (actual, size) = (&spool.actual, spool.size);
        if actual != digest {
            self.metrics.push("blob", "digest_invalid");
            return Err(Error::client(
                ErrorCode::DigestInvalid,
                format!("the upload hashes to {actual}, not {digest}"),
            ));
        }
        self.pushed.mark(repo).await?;
        idempotent(self.content.put_blob_file(digest, &spool.path, size).await)?;
        idempotent(self.content.link_blob(repo, digest).await)?;
        if let Some(ev) = &self.evictor {
            ev.touch(digest, size, Some(false));
        }
        self.replicator
            .enqueue(Job::Blob {
                repo: repo.to_string(),
                digest: digest.to_string(),
            })
            .await?;
        self.metrics.push("blob", "ok");
        tracing::info!(%repo, %digest, size, "blob pushed");
        Ok(())
    }

    /// A manifest push, by tag or digest: validated, its references checked, stored, tagged.
    pub async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        content_type: Option<&str>,
        bytes: Bytes,
    ) -> Result<Pushed> {
        let parsed = manifest::parse(&bytes, content_type).map_err(Error::Client)?;
        let digest = match reference {
            Reference::Digest(d) => {
                let actual = d.same_algorithm_of(&bytes);
                if &actual != d {
                    return Err(Error::client(
                        ErrorCode::DigestInvalid,
                        format!("the manifest hashes to {actual}, not {d}"),
                    ));
                }
                d.clone()
            }
            Reference::Tag(_) => Digest::sha256_of(&bytes),
        };
        // What a manifest references must be in this repository (uploaded or mounted into it:
        // a mount is checked against the pusher's pull rights), not merely somewhere in the
        // store: otherwise a manifest would expose another repository's private blobs under a
        // name its pusher controls, and the answer would tell who has what.
        for b in &parsed.blobs {
            if !self.linked_here(repo, b, false).await? {
                return Err(Error::client(
                    ErrorCode::ManifestBlobUnknown,
                    format!("blob {b} is not in {repo}"),
                )
                .with_detail(serde_json::json!({ "digest": b.to_string() })));
            }
        }
        for m in &parsed.manifests {
            if !self.linked_here(repo, m, true).await? {
                return Err(Error::client(
                    ErrorCode::ManifestBlobUnknown,
                    format!("manifest {m} is not in {repo}"),
                )
                .with_detail(serde_json::json!({ "digest": m.to_string() })));
            }
        }
        let m = Manifest {
            digest: digest.clone(),
            media_type: parsed.media_type.clone(),
            bytes: bytes.clone(),
        };
        self.pushed.mark(repo).await?;
        idempotent(self.content.put_manifest(repo, &m).await)?;
        if let Some(ev) = &self.evictor {
            ev.manifest_seen(repo, &m, Some(false));
        }
        if let Some(subject) = &parsed.subject {
            self.record_referrer(repo, subject, &digest, &parsed, bytes.len())
                .await?;
        }
        match reference {
            Reference::Tag(tag) => {
                // Storage, the in-process answer and the job in one order: the last writer of
                // the tag is the last everywhere (and the job copies the value current then).
                let _one = self.tag_lock(repo, tag).lock().await;
                match self.content.put_tag(repo, tag, &digest).await {
                    Ok(()) => {}
                    // The conditional write lost: a concurrent push moved the tag after this
                    // one was decided. Its value stands (as if this push came first); the
                    // caching engine forgot its answer, so the next read asks storage.
                    Err(Error::Engine {
                        error: EngineError::Precondition,
                        ..
                    }) => {
                        tracing::info!(%repo, %tag, %digest, "tag push lost a race to a concurrent push");
                    }
                    Err(e) => return Err(e),
                }
                self.replicator
                    .enqueue(Job::Tag {
                        repo: repo.to_string(),
                        tag: tag.to_string(),
                        digest: digest.to_string(),
                    })
                    .await?;
            }
            Reference::Digest(_) => {
                self.replicator
                    .enqueue(Job::Manifest {
                        repo: repo.to_string(),
                        digest: digest.to_string(),
                    })
                    .await?
            }
        }
        self.metrics.push("manifest", "ok");
        tracing::info!(%repo, %reference, %digest, "manifest pushed");
        Ok(Pushed {
            digest,
            subject: parsed.subject,
        })
    }

    /// Whether `digest` is linked into `repo` and its content is at hand: a blob's bytes, or for
    /// `manifest` a manifest (an index whose child is a layer is refused).
    async fn linked_here(&self, repo: &RepoName, digest: &Digest, manifest: bool) -> Result<bool> {
        if !self.content.links(repo, digest, manifest).await? {
            if manifest
                || !self.link_stored
                || self.content.stat_blob(repo, digest).await?.is_none()
            {
                return Ok(false);
            }
            self.content.link_blob(repo, digest).await?;
            return Ok(true);
        }
        Ok(if manifest {
            self.content
                .get_manifest(repo, &Reference::Digest(digest.clone()), &[])
                .await?
                .is_some()
        } else {
            self.content.stat_blob(repo, digest).await?.is_some()
        })
    }

    /// Deletes a tag, or a manifest (and the tags pointing at it) from the repository.
    pub async fn delete_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<()> {
        match reference {
            Reference::Tag(tag) => {
                let _one = self.tag_lock(repo, tag).lock().await;
                if self.content.tag_link(repo, tag).await?.is_none() {
                    return Err(Error::client(
                        ErrorCode::ManifestUnknown,
                        format!("{repo}:{tag} is unknown"),
                    ));
                }
                self.content.delete_tag(repo, tag).await?;
                self.replicator
                    .enqueue(Job::Untag {
                        repo: repo.to_string(),
                        tag: tag.to_string(),
                    })
                    .await?;
            }
            Reference::Digest(d) => {
                if !self.content.delete_manifest(repo, d).await? {
                    return Err(Error::client(
                        ErrorCode::ManifestUnknown,
                        format!("manifest {d} is not in {repo}"),
                    ));
                }
                // Replicated like pushes: every engine it was copied to drops it (and the tags
                // pointing at it) too.
                self.replicator
                    .enqueue(Job::DeleteManifest {
                        repo: repo.to_string(),
                        digest: d.to_string(),
                    })
                    .await?;
            }
        }
        Ok(())
    }

    pub async fn delete_blob(&self, repo: &RepoName, digest: &Digest) -> Result<()> {
        if !self.content.delete_blob(repo, digest).await? {
            return Err(Error::client(
                ErrorCode::BlobUnknown,
                format!("blob {digest} is not in {repo}"),
            ));
        }
        self.replicator
            .enqueue(Job::DeleteBlob {
                repo: repo.to_string(),
                digest: digest.to_string(),
            })
            .await?;
        Ok(())
    }

    fn referrers_dir(repo: &RepoName, subject: &Digest) -> String {
        format!(
            "_ociedge/referrers/{repo}/@{}-{}",
            subject.algorithm(),
            subject.hex()
        )
    }

    async fn record_referrer(
        &self,
        repo: &RepoName,
        subject: &Digest,
        digest: &Digest,
        parsed: &manifest::Parsed,
        size: usize,
    ) -> Result<()> {
        let mut desc = serde_json::json!({ "mediaType": parsed.media_type, "digest": digest.to_string(), "size": size });
        if let Some(t) = &parsed.artifact_type {
            desc["artifactType"] = serde_json::Value::String(t.clone());
        }
        if let Some(a) = &parsed.annotations {
            desc["annotations"] = a.clone();
        }
        let path = format!(
            "{}/{}-{}",
            Self::referrers_dir(repo, subject),
            digest.algorithm(),
            digest.hex()
        );
        self.engine
            .put_object(&Path::from(path), Bytes::from(desc.to_string()))
            .await
    }

    /// The referrers index of `subject` from what was pushed: `None` when nothing refers to it.
    pub async fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Option<Bytes>> {
        let dir = Path::from(Self::referrers_dir(repo, subject));
        let mut manifests = Vec::new();
        for (p, _) in self.engine.list_objects(&dir).await? {
            let Some(b) = self.engine.get_object(&p).await? else {
                continue;
            };
            let Ok(desc) = serde_json::from_slice::<serde_json::Value>(&b) else {
                continue;
            };
            // A referrer whose manifest was deleted is no longer listed.
            let Some(d) = desc["digest"]
                .as_str()
                .and_then(|d| d.parse::<Digest>().ok())
            else {
                continue;
            };
            if self
                .engine
                .get_manifest(repo, &Reference::Digest(d), &[])
                .await?
                .is_none()
            {
                continue;
            }
            if artifact_type.is_none_or(|t| desc["artifactType"].as_str() == Some(t)) {
                manifests.push(desc);
            }
        }
        if manifests.is_empty() && artifact_type.is_none() {
            return Ok(None);
        }
        let index = serde_json::json!({ "schemaVersion": 2, "mediaType": media::OCI_INDEX, "manifests": manifests });
        Ok(Some(Bytes::from(index.to_string())))
    }
}
