//! Blob answers: a hit from the local engine as the engine serves it best (a file, a stream, a
//! redirect); a miss from the fill of the local engine; a `HEAD` miss from the remote engines.

use std::sync::Arc;

use super::fill::FillPlan;
use super::{Puller, RangeSpec};
use crate::engine::set::Routed;
use crate::engine::{BlobHit, ByteRange, Content, Engine, EngineExt, Hit, Lookup};
use crate::error::Result;
use crate::oci::Digest;

/// A blob answer: what to send and where it came from.
pub struct BlobAnswer {
    pub size: u64,
    /// The range served, when the client asked for one.
    pub range: Option<ByteRange>,
    pub source: Arc<str>,
    /// `None` for `HEAD`.
    pub body: Option<BlobBody>,
    /// Where the client should fetch the bytes instead (a presigned URL of the local engine).
    pub redirect: Option<url::Url>,
}

/// The bytes of a blob answer.
pub enum BlobBody {
    Stream(crate::engine::ByteStream),
    /// A local file (a `file://` engine's hit): the front may send it without copying it.
    File(crate::fileio::FileSlice),
    /// A fill in progress: the front may send what is in its spool file without copying it.
    Fill(super::fill::FillReader),
}

impl Puller {
    /// A blob (or a range of it). `head` answers without a body and without starting a fill.
    pub async fn blob(
        &self,
        r: &Routed,
        digest: &Digest,
        range: Option<RangeSpec>,
        head: bool,
    ) -> Result<BlobAnswer> {
        self.check_pushed(r, Content::Blob(digest.clone())).await?;
        let local_ok = self.engines.local_usable();
        if local_ok {
            if let Some(hit) = self.blob_hit(r, digest, range, head).await? {
                return Ok(hit);
            }
        }
        self.metrics.cache("blob", "miss");
        if head {
            return self.head_remote(r, digest, range).await;
        }
        if let Some(spec) = range {
            return self.cold_range(r, digest, spec, local_ok).await;
        }
        let joined = self.fills.join_or_start(digest);
        let state = joined.state().clone();
        let fill = joined.start_with(|| FillPlan {
            sources: self.fill_sources(r, &state, local_ok),
            // With the local engine down, clients are still served; nothing is filled.
            target: local_ok.then(|| (self.engines.local().clone(), r.storage_repo.clone())),
            lazy: false,
        });
        let (size, source) = fill.started().await?;
        let range = range.map(|s| s.resolve(size)).transpose()?;
        let (offset, len) = BlobHit {
            size,
            range,
            body: None,
        }
        .span();
        let body = match fill.verified_spool() {
            Some(file) => BlobBody::File(crate::fileio::FileSlice {
                file,
                offset,
                len,
                keep: None,
            }),
            None => BlobBody::Fill(fill.follow(offset, len)),
        };
        Ok(BlobAnswer {
            size,
            range,
            source,
            body: Some(body),
            redirect: None,
        })
    }

    /// Makes the local engine hold `digest` (linked into `r`'s repository) the way a client's
    /// pull would: a local copy is only recorded as used; otherwise the caller joins the fill
    /// running for the digest, or starts it, and waits for its verdict (the digest is checked
    /// before anything is committed). `(size, fetched)`: `fetched` is false when the blob was
    /// already there and nothing was transferred.
    pub async fn warm_blob(&self, r: &Routed, digest: &Digest) -> Result<(u64, bool)> {
        self.check_pushed(r, Content::Blob(digest.clone())).await?;
        if !self.engines.local_usable() {
            return Err(crate::error::Error::transient(
                self.engines.local().id(),
                "the local engine is down: nothing can be filled",
            ));
        }
        match self.local.stat_blob(&r.storage_repo, digest).await {
            Ok(Some(meta)) => {
                self.local_hit(r, Content::Blob(digest.clone()), meta.size, None);
                return Ok((meta.size, false));
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "local engine stat failed; filling"),
        }
        let joined = self.fills.join_or_start(digest);
        let state = joined.state().clone();
        let fill = joined.start_with(|| FillPlan {
            sources: self.fill_sources(r, &state, true),
            target: Some((self.engines.local().clone(), r.storage_repo.clone())),
            lazy: false,
        });
        let size = fill.finished().await?;
        Ok((size, true))
    }

    /// The sources of a fill, in order: the remote engines, nearest first; in a cluster (with
    /// the local engine usable) first the region: the fill of the process holding the digest's
    /// lease, or the lease taken by this fill.
    pub(super) fn fill_sources(
        &self,
        r: &Routed,
        state: &Arc<super::fill::FillState>,
        local_ok: bool,
    ) -> Vec<(Arc<dyn Engine>, crate::oci::RepoName)> {
        let mut sources = self.engines.remotes_for(r);
        if let (Some(c), true) = (&self.cluster, local_ok) {
            let state = state.clone();
            let ended = Box::pin(async move {
                let _ = state.finished().await;
            });
            let peer = crate::cluster::peer::ClusterSource::new(
                c.clone(),
                self.engines.local().clone(),
                ended,
            );
            sources.insert(0, (Arc::new(peer), r.storage_repo.clone()));
        }
        sources
    }

    /// A blob from the local engine, or `None` on a miss (or a local engine that fails).
    async fn blob_hit(
        &self,
        r: &Routed,
        digest: &Digest,
        range: Option<RangeSpec>,
        head: bool,
    ) -> Result<Option<BlobAnswer>> {
        let want = Lookup {
            range,
            body: !head,
            redirect: self.redirect,
        };
        let hit = match self.local.open_blob(&r.storage_repo, digest, want).await {
            Ok(Some(hit)) => hit,
            Ok(None) => return Ok(None),
            Err(e) if e.is_answer() => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "local engine read failed; serving from remotes");
                return Ok(None);
            }
        };
        self.metrics.cache("blob", "hit");
        self.local_hit(r, Content::Blob(digest.clone()), hit.size, None);
        let mut answer = BlobAnswer {
            size: hit.size,
            range: hit.range,
            source: self.local_name.clone(),
            body: None,
            redirect: None,
        };
        match hit.body {
            None => {}
            Some(Hit::Redirect(url)) => answer.redirect = Some(url),
            Some(Hit::Stream(s)) => {
                answer.body = Some(BlobBody::Stream(match &self.evictor {
                    Some(ev) => ev.pinned_stream(digest, s),
                    None => s,
                }))
            }
            Some(Hit::File(mut f)) => {
                if let Some(ev) = &self.evictor {
                    f.keep = Some(Box::new(ev.pin(digest)));
                }
                answer.body = Some(BlobBody::File(f));
            }
        }
        Ok(Some(answer))
    }

    /// A `HEAD` the local engine cannot answer: the remote engines', nearest first (their
    /// caching engines remember what they answered).
    async fn head_remote(
        &self,
        r: &Routed,
        digest: &Digest,
        range: Option<RangeSpec>,
    ) -> Result<BlobAnswer> {
        let mut last_err = None;
        for (engine, repo) in self.engines.remotes_for(r) {
            let want = Lookup {
                range,
                ..Lookup::head()
            };
            match engine.open_blob(&repo, digest, want).await {
                Ok(Some(hit)) => {
                    return Ok(BlobAnswer {
                        size: hit.size,
                        range: hit.range,
                        source: engine.id().into(),
                        body: None,
                        redirect: None,
                    });
                }
                Ok(None) => {}
                Err(e) if e.is_answer() => return Err(e),
                Err(e) => {
                    self.metrics.upstream_error(engine.id());
                    last_err = Some(e);
                }
            }
        }
        match last_err {
            // A registry that takes pushes answers what it knows: clients HEAD a blob before
            // uploading it, and a remote engine being down must not fail their push.
            Some(e) if self.preferred.is_some() => {
                tracing::warn!(error = %e, "blob HEAD: a remote engine failed; answering unknown");
                Err(Self::digest_unknown(digest))
            }
            Some(e) => Err(e),
            None => Err(Self::digest_unknown(digest)),
        }
    }
}
