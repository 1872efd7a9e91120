//! The pull path: hits from the local engine, misses from the nearest remote engine with a fill
//! of the local engine, tags from their authority.

pub mod fill;
pub mod rate;
pub mod tags;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use moka::future::Cache;

use crate::engine::pushed::PushedRepos;
use crate::engine::set::{Engines, Routed};
use crate::engine::storage::resolve_range;
use crate::engine::{ByteRange, ByteStream, GetBlob, Manifest};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::oci::{media, Digest, ErrorCode, Reference, RepoName, Tag};
use fill::{FillPlan, Fills};
use tags::TagCache;

/// The source name of content served from the local engine.
pub const LOCAL: &str = "local";

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
            Error::client(
                ErrorCode::RangeInvalid,
                format!("range not satisfiable for a blob of {size} bytes"),
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
}

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
    Stream(ByteStream),
    /// A local file (a `file://` engine's hit): the front may send it without copying it.
    File(crate::fileio::FileSlice),
    /// A fill in progress: the front may send what is in its spool file without copying it.
    Fill(fill::FillReader),
}

/// A manifest answer.
pub struct ManifestAnswer {
    pub manifest: Manifest,
    pub source: Arc<str>,
    /// How old a tag answer is when it was served stale (the authority was unreachable).
    pub stale_age: Option<Duration>,
}

pub struct Puller {
    engines: Arc<Engines>,
    fills: Fills,
    tags: TagCache,
    /// Hot manifests by digest: manifest hits are answered from memory.
    manifests: Cache<Digest, Manifest>,
    metrics: Metrics,
    local_name: Arc<str>,
    /// (repository, digest) pairs known to be linked in the local engine, so a hit links a blob
    /// or manifest into a new repository once (what Distribution needs to serve it there).
    linked: moka::sync::Cache<(RepoName, Digest), ()>,
    /// Remote answers to blob HEADs on a miss (size, engine): digests are immutable, so a HEAD
    /// storm for content not cached yet costs the upstream one request per digest, not one each.
    remote_sizes: Cache<Digest, (u64, Arc<str>)>,
    /// What a `stat` in a `file://` local engine found in the last second: a HEAD storm costs
    /// one `stat` a second per digest, hit or miss. Deletes through the API forget the entry at
    /// once; an eviction is seen within the second (a GET in between refetches, the bytes are
    /// the same); an absence is forgotten as soon as any blob is written.
    local_sizes: moka::sync::Cache<Digest, LocalSize>,
    /// (repository, digest, is a manifest) triples the preferred engine was seen to link into a
    /// pushed repository, with the count of writes then (see [`Puller::check_pushed`]): trusted
    /// for `tag_ttl` unless a write moves the count.
    pushed_links: moka::sync::Cache<(RepoName, Digest, bool), u64>,
    /// Tags whose fresh answer is of a type some client did not accept and the authority had no
    /// other: served as they are until the TTL, instead of asking the authority per request.
    unnegotiable: moka::sync::Cache<(RepoName, Tag), ()>,
    /// Blob hits on a cloud local engine are redirected to presigned URLs valid this long.
    redirect: Option<std::time::Duration>,
    /// Told about every access to the local engine, when a size cap is set.
    evictor: Option<Arc<crate::evict::Evictor>>,
    /// The preferred (push) engine: the authority for the tags pushed to it.
    preferred: Option<Arc<dyn crate::engine::Engine>>,
    /// Which repositories were pushed (beside upstreams, what makes the preferred engine their
    /// authority rather than the upstream).
    pushed: Option<Arc<PushedRepos>>,
}

/// A memo of the local `file://` engine's answer for one blob.
#[derive(Clone, Copy)]
enum LocalSize {
    Present(u64),
    /// Not there when the count of writes was this (see [`crate::writes`]).
    Absent(u64),
}

#[derive(Clone, Copy)]
enum LinkKind {
    Blob,
    Manifest,
}

impl Puller {
    pub fn new(engines: Arc<Engines>, fills: Fills, tags: TagCache, metrics: Metrics) -> Puller {
        let tag_ttl = tags.ttl();
        let manifests = Cache::builder()
            .max_capacity(64 << 20)
            .weigher(|_k: &Digest, m: &Manifest| {
                u32::try_from(m.bytes.len() + 256).unwrap_or(u32::MAX)
            })
            .build();
        Puller {
            engines,
            fills,
            tags,
            manifests,
            metrics,
            local_name: LOCAL.into(),
            linked: moka::sync::Cache::new(1_000_000),
            preferred: None,
            pushed: None,
            evictor: None,
            redirect: None,
            pushed_links: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(tag_ttl.max(std::time::Duration::from_millis(1)))
                .build(),
            unnegotiable: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(tag_ttl.max(std::time::Duration::from_secs(1)))
                .build(),
            local_sizes: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(std::time::Duration::from_secs(1))
                .build(),
            remote_sizes: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(std::time::Duration::from_secs(600))
                .build(),
        }
    }

    /// Makes sure a local hit is linked into the requesting repository, in the background.
    fn ensure_linked(&self, repo: &RepoName, digest: &Digest, kind: LinkKind) {
        let key = (repo.clone(), digest.clone());
        if self.linked.contains_key(&key) {
            return;
        }
        self.linked.insert(key.clone(), ());
        let local = self.engines.local().clone();
        let linked = self.linked.clone();
        tokio::spawn(async move {
            let (repo, digest) = &key;
            let res = match kind {
                LinkKind::Blob => local.link_blob(repo, digest).await,
                LinkKind::Manifest => local.link_manifest(repo, digest).await,
            };
            if let Err(e) = res {
                tracing::warn!(error = %e, %repo, %digest, "could not link content into the repository");
                linked.invalidate(&key);
            }
        });
    }

    /// In a pushed repository (no upstream owns the name; a preferred engine takes pushes),
    /// content by digest exists only where the preferred engine links it: after a `DELETE` it is
    /// unknown, as in Distribution, though its bytes stay in the store (other repositories may
    /// share them). Elsewhere, and when the preferred engine cannot be asked, `Ok`.
    async fn check_pushed(&self, r: &Routed, digest: &Digest, manifest: bool) -> Result<()> {
        let Some(pref) = self.push_authority(r).await else {
            return Ok(());
        };
        let writes = crate::writes::count();
        let key = (r.storage_repo.clone(), digest.clone(), manifest);
        if self.pushed_links.get(&key) == Some(writes) {
            return Ok(());
        }
        match pref.is_linked(&r.storage_repo, digest, manifest).await {
            Ok(true) => {
                self.pushed_links.insert(key, writes);
                Ok(())
            }
            Ok(false) if manifest => Err(Error::client(
                ErrorCode::ManifestUnknown,
                format!("manifest {digest} is not in {}", r.storage_repo),
            )),
            Ok(false) => Err(Error::client(
                ErrorCode::BlobUnknown,
                format!("blob {digest} is not in {}", r.storage_repo),
            )),
            Err(e) => {
                self.metrics.upstream_error(pref.id());
                tracing::warn!(error = %e, "preferred engine unreachable; serving {digest} unchecked");
                Ok(())
            }
        }
    }

    /// Redirects blob GET hits of a cloud local engine to presigned URLs valid for `d`.
    pub fn set_redirect(&mut self, d: std::time::Duration) {
        self.redirect = Some(d);
    }

    /// Reports accesses to `e` (and committed fills, through the fill table).
    pub fn set_evictor(&mut self, e: Arc<crate::evict::Evictor>) {
        self.fills.set_evictor(e.clone());
        self.evictor = Some(e);
    }

    /// Makes `engine` the authority for tags it holds (pushed repositories).
    pub fn set_preferred(
        &mut self,
        engine: Arc<dyn crate::engine::Engine>,
        pushed: Arc<PushedRepos>,
    ) {
        self.preferred = Some(engine);
        self.pushed = Some(pushed);
    }

    /// The preferred engine when it is the authority for `r`: a repository no upstream owns, or
    /// one pushed through ociedge beside its upstream. A mirrored repository's tag links in the
    /// same engine are cached answers, never an authority.
    async fn push_authority(&self, r: &Routed) -> Option<Arc<dyn crate::engine::Engine>> {
        let pref = self.preferred.as_ref()?;
        if self.engines.upstream(r).is_none() {
            return Some(pref.clone());
        }
        let pushed = self.pushed.as_ref()?;
        match pushed.contains(&r.storage_repo).await {
            Ok(true) => Some(pref.clone()),
            Ok(false) => None,
            Err(e) => {
                self.metrics.upstream_error(pref.id());
                tracing::warn!(error = %e, repo = %r.storage_repo, "cannot tell whether the repository was pushed; its upstream decides");
                None
            }
        }
    }

    /// The in-memory manifest cache (the push path invalidates deleted manifests in it).
    pub fn manifest_cache(&self) -> Cache<Digest, Manifest> {
        self.manifests.clone()
    }

    pub fn engines(&self) -> &Arc<Engines> {
        &self.engines
    }

    pub fn fills(&self) -> &Fills {
        &self.fills
    }

    /// A blob (or a range of it). `head` answers without a body and without starting a fill.
    pub async fn blob(
        &self,
        r: &Routed,
        digest: &Digest,
        range: Option<RangeSpec>,
        head: bool,
    ) -> Result<BlobAnswer> {
        self.check_pushed(r, digest, false).await?;
        let local = self.engines.local().clone();
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
        let fill = self.fills.join_or_start(digest).start_with(|| FillPlan {
            sources: self.engines.remotes_for(r),
            // With the local engine down, clients are still served; nothing is filled.
            target: local_ok.then(|| (local.clone(), r.storage_repo.clone())),
        });
        let (size, source) = fill.started().await?;
        let range = range.map(|s| s.resolve(size)).transpose()?;
        let (offset, len) = resolve_range(GetBlob { range }, size)?;
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

    /// A blob from the local engine, or `None` on a miss (or a local engine that fails).
    async fn blob_hit(
        &self,
        r: &Routed,
        digest: &Digest,
        range: Option<RangeSpec>,
        head: bool,
    ) -> Result<Option<BlobAnswer>> {
        let local = self.engines.local();
        let hit = |size: u64, range: Option<ByteRange>, body: Option<BlobBody>| {
            self.metrics.cache("blob", "hit");
            self.ensure_linked(&r.storage_repo, digest, LinkKind::Blob);
            let body = match &self.evictor {
                Some(ev) => {
                    ev.touch(digest, size, None);
                    body.map(|b| match b {
                        BlobBody::Stream(s) => BlobBody::Stream(ev.pinned_stream(digest, s)),
                        BlobBody::File(mut f) => {
                            f.keep = Some(Box::new(ev.pin(digest)));
                            BlobBody::File(f)
                        }
                        fill @ BlobBody::Fill(_) => fill,
                    })
                }
                None => body,
            };
            Some(BlobAnswer {
                size,
                range,
                source: self.local_name.clone(),
                body,
                redirect: None,
            })
        };
        // HEAD on a file:// engine: the file's checks (no link, a regular file of its recorded
        // size) as a GET makes them, remembered for a second.
        if head && local.local_dir().is_some() {
            let writes = crate::writes::count();
            let size = match self.local_sizes.get(digest) {
                Some(LocalSize::Present(size)) => size,
                Some(LocalSize::Absent(at)) if at == writes => return Ok(None),
                _ => {
                    let Ok(Some(lf)) = local.open_local_file(digest).await else {
                        self.local_sizes
                            .insert(digest.clone(), LocalSize::Absent(writes));
                        return Ok(None);
                    };
                    self.local_sizes
                        .insert(digest.clone(), LocalSize::Present(lf.size));
                    lf.size
                }
            };
            let range = range.map(|s| s.resolve(size)).transpose()?;
            return Ok(hit(size, range, None));
        }
        // Fast path: a file:// engine's file, read directly in large chunks.
        match local.open_local_file(digest).await {
            Ok(Some(lf)) => {
                let range = range.map(|s| s.resolve(lf.size)).transpose()?;
                let (offset, len) = resolve_range(GetBlob { range }, lf.size)?;
                let body = (!head).then(|| {
                    BlobBody::File(crate::fileio::FileSlice {
                        file: Arc::new(lf.file),
                        offset,
                        len,
                        keep: None,
                    })
                });
                return Ok(hit(lf.size, range, body));
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "local engine read failed; serving from remotes"),
        }
        if local.local_dir().is_some() {
            return Ok(None);
        }
        // Any other store: stat for the size (ranges are resolved against it), then read.
        let meta = match local.stat_blob(&r.storage_repo, digest).await {
            Ok(Some(meta)) => meta,
            Ok(None) => return Ok(None),
            Err(e) => {
                tracing::warn!(error = %e, "local engine stat failed; serving from remotes");
                return Ok(None);
            }
        };
        let range = range.map(|s| s.resolve(meta.size)).transpose()?;
        if head {
            return Ok(hit(meta.size, range, None));
        }
        if let Some(expiry) = self.redirect {
            match local.presigned_get(digest, expiry).await {
                Ok(Some(url)) => {
                    let mut ans = hit(meta.size, range, None);
                    if let Some(a) = ans.as_mut() {
                        a.redirect = Some(url);
                    }
                    return Ok(ans);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "cannot presign; serving the bytes"),
            }
        }
        match local
            .get_blob(&r.storage_repo, digest, GetBlob { range })
            .await
        {
            Ok(Some(read)) => Ok(hit(read.size, range, Some(BlobBody::Stream(read.stream)))),
            Ok(None) => Ok(None),
            Err(e) if e.is_answer() => Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "local engine read failed; serving from remotes");
                Ok(None)
            }
        }
    }

    /// A blob was deleted from the local engine through the API.
    pub fn forget_local(&self, digest: &Digest) {
        self.local_sizes.invalidate(digest);
    }

    async fn head_remote(
        &self,
        r: &Routed,
        digest: &Digest,
        range: Option<RangeSpec>,
    ) -> Result<BlobAnswer> {
        if let Some((size, source)) = self.remote_sizes.get(digest).await {
            let range = range.map(|s| s.resolve(size)).transpose()?;
            return Ok(BlobAnswer {
                size,
                range,
                source,
                body: None,
                redirect: None,
            });
        }
        let mut last_err = None;
        for (engine, repo) in self.engines.remotes_for(r) {
            match engine.stat_blob(&repo, digest).await {
                Ok(Some(meta)) => {
                    self.remote_sizes
                        .insert(digest.clone(), (meta.size, engine.id().into()))
                        .await;
                    let range = range.map(|s| s.resolve(meta.size)).transpose()?;
                    return Ok(BlobAnswer {
                        size: meta.size,
                        range,
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
        let unknown = || Error::client(ErrorCode::BlobUnknown, format!("blob {digest} is unknown"));
        match last_err {
            // A registry that takes pushes answers what it knows: clients HEAD a blob before
            // uploading it, and a remote engine being down must not fail their push.
            Some(e) if self.preferred.is_some() => {
                tracing::warn!(error = %e, "blob HEAD: a remote engine failed; answering unknown");
                Err(unknown())
            }
            Some(e) => Err(e),
            None => Err(unknown()),
        }
    }

    /// A manifest by tag or digest.
    pub async fn manifest(
        &self,
        r: &Routed,
        reference: &Reference,
        accept: &[String],
    ) -> Result<ManifestAnswer> {
        match reference {
            Reference::Digest(d) => {
                let (manifest, source) = self.manifest_by_digest(r, d, accept).await?;
                Ok(ManifestAnswer {
                    manifest,
                    source,
                    stale_age: None,
                })
            }
            Reference::Tag(t) => self.manifest_by_tag(r, t, accept).await,
        }
    }

    async fn manifest_by_digest(
        &self,
        r: &Routed,
        digest: &Digest,
        accept: &[String],
    ) -> Result<(Manifest, Arc<str>)> {
        self.check_pushed(r, digest, true).await?;
        if let Some(m) = self.manifests.get(digest).await {
            self.metrics.cache("manifest", "hit");
            self.ensure_linked(&r.storage_repo, digest, LinkKind::Manifest);
            if let Some(ev) = &self.evictor {
                ev.touch(digest, m.bytes.len() as u64, None);
            }
            return Ok((m, self.local_name.clone()));
        }
        let local = self.engines.local();
        let local_ok = self.engines.local_usable();
        let by_digest = Reference::Digest(digest.clone());
        let found = if local_ok {
            local
                .get_manifest(&r.storage_repo, &by_digest, accept)
                .await
        } else {
            Ok(None)
        };
        match found {
            Ok(Some(m)) => {
                self.metrics.cache("manifest", "hit");
                self.ensure_linked(&r.storage_repo, digest, LinkKind::Manifest);
                if let Some(ev) = &self.evictor {
                    ev.manifest_seen(&r.storage_repo, &m, None);
                }
                self.manifests.insert(digest.clone(), m.clone()).await;
                return Ok((m, self.local_name.clone()));
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "local engine manifest read failed"),
        }
        self.metrics.cache("manifest", "miss");
        let mut last_err = None;
        for (engine, repo) in self.engines.remotes_for(r) {
            self.metrics.engine_request(engine.id());
            match engine.get_manifest(&repo, &by_digest, accept).await {
                Ok(Some(m)) => {
                    // With the local engine down the manifest is served, not stored.
                    if !local_ok {
                    } else if let Err(e) = local.put_manifest(&r.storage_repo, &m).await {
                        tracing::warn!(error = %e, "manifest not stored in the local engine");
                    } else if let Some(ev) = &self.evictor {
                        ev.manifest_seen(&r.storage_repo, &m, Some(true));
                    }
                    self.manifests.insert(digest.clone(), m.clone()).await;
                    return Ok((m, engine.id().into()));
                }
                Ok(None) => {}
                Err(e) if e.is_answer() => return Err(e),
                Err(e) => {
                    self.metrics.upstream_error(engine.id());
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| {
            Error::client(
                ErrorCode::ManifestUnknown,
                format!("manifest {digest} is unknown"),
            )
        }))
    }

    async fn manifest_by_tag(
        &self,
        r: &Routed,
        tag: &Tag,
        accept: &[String],
    ) -> Result<ManifestAnswer> {
        let repo = &r.storage_repo;
        if let Some(pref) = self.push_authority(r).await {
            if let Some(ans) = self.pushed_tag(r, tag, accept, &pref).await? {
                return Ok(ans);
            }
        }
        let Some(upstream) = self.engines.upstream(r) else {
            return self.storage_tag(r, tag, accept).await;
        };
        let fresh = self.tags.fresh(repo, tag).await;
        if let Some(e) = &fresh {
            // The key is made only for the rare client the fresh type does not suit.
            if media::accepts(accept, &e.media_type)
                || self.unnegotiable.contains_key(&(repo.clone(), tag.clone()))
            {
                return self.tag_hit(r, &e.digest, accept).await;
            }
        }
        // Revalidate with the authority: a HEAD, which Docker Hub does not count as a pull.
        let by_tag = Reference::Tag(tag.clone());
        match upstream
            .engine
            .head_manifest(&r.upstream_repo, &by_tag, accept)
            .await
        {
            Ok(Some(meta)) => {
                self.metrics.cache("tag", "revalidated");
                // The manifest first: a tag answer is recorded only once its manifest is at hand
                // (an upstream rewriting for old clients names digests it cannot serve).
                let (manifest, source) =
                    match self.manifest_by_digest(r, &meta.digest, accept).await {
                        Ok(found) => found,
                        Err(e) => return self.serve_as_is(r, tag, fresh, accept, e).await,
                    };
                let old = self
                    .tags
                    .insert(repo, tag, meta.digest.clone(), meta.media_type.clone())
                    .await;
                if old.as_ref() != Some(&meta.digest) && self.engines.local_usable() {
                    // Persist the answer so it survives a restart as the stale fallback.
                    if let Err(e) = self.engines.local().put_tag(repo, tag, &meta.digest).await {
                        tracing::warn!(error = %e, "tag link not stored in the local engine");
                    }
                }
                Ok(ManifestAnswer {
                    manifest,
                    source,
                    stale_age: None,
                })
            }
            Ok(None) if fresh.is_some() => {
                let e = Error::client(
                    ErrorCode::ManifestUnknown,
                    "no manifest of an accepted type",
                );
                self.serve_as_is(r, tag, fresh, accept, e).await
            }
            Ok(None) => {
                self.tags.forget(repo, tag).await;
                Err(Error::client(
                    ErrorCode::ManifestUnknown,
                    format!("{}:{tag} is unknown upstream", r.upstream_repo),
                ))
            }
            Err(e) if e.is_answer() => Err(e),
            Err(e) if fresh.is_some() => self.serve_as_is(r, tag, fresh, accept, e).await,
            Err(e) => {
                self.metrics.upstream_error(upstream.engine.id());
                tracing::warn!(error = %e, "tag authority unreachable; trying a stale answer");
                self.stale_tag(r, tag, accept).await?.ok_or_else(|| {
                    Error::client(ErrorCode::Unavailable, format!("upstream {} is unreachable and no cached answer for {repo}:{tag} is younger than max_stale", upstream.name))
                })
            }
        }
    }

    /// The authority answered this tag moments ago (`fresh`) with a type this client does not
    /// accept, and now offers no other it can serve (Distribution rewrites to schema 1 for such
    /// clients, or refuses): serve the fresh answer as it is, as registries answer with the type
    /// they have, and do not ask again for each such request until the TTL. `why` is returned
    /// when there is no fresh answer after all.
    async fn serve_as_is(
        &self,
        r: &Routed,
        tag: &Tag,
        fresh: Option<tags::TagEntry>,
        accept: &[String],
        why: Error,
    ) -> Result<ManifestAnswer> {
        let Some(entry) = fresh else {
            return Err(why);
        };
        tracing::debug!(error = %why, "no other media type upstream; serving the fresh answer");
        self.unnegotiable
            .insert((r.storage_repo.clone(), tag.clone()), ());
        self.tag_hit(r, &entry.digest, accept).await
    }

    /// The answer for a tag whose fresh digest is known.
    async fn tag_hit(
        &self,
        r: &Routed,
        digest: &Digest,
        accept: &[String],
    ) -> Result<ManifestAnswer> {
        self.metrics.cache("tag", "hit");
        let (manifest, source) = self.manifest_by_digest(r, digest, accept).await?;
        Ok(ManifestAnswer {
            manifest,
            source,
            stale_age: None,
        })
    }

    /// A tag of a pushed repository: the preferred engine is its authority. `None` when the
    /// preferred engine does not have the tag (then the upstream, if any, decides).
    async fn pushed_tag(
        &self,
        r: &Routed,
        tag: &Tag,
        accept: &[String],
        pref: &Arc<dyn crate::engine::Engine>,
    ) -> Result<Option<ManifestAnswer>> {
        let repo = &r.storage_repo;
        if let Some(e) = self.tags.fresh(repo, tag).await {
            return self.tag_hit(r, &e.digest, accept).await.map(Some);
        }
        match pref.tag_link(repo, tag).await {
            Ok(Some(link)) => {
                self.metrics.cache("tag", "revalidated");
                let (manifest, source) = self.manifest_by_digest(r, &link.digest, accept).await?;
                self.tags
                    .insert(repo, tag, link.digest, manifest.media_type.clone())
                    .await;
                Ok(Some(ManifestAnswer {
                    manifest,
                    source,
                    stale_age: None,
                }))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                // The authority is unreachable: the replicated tag link of the local engine is
                // the last known answer.
                self.metrics.upstream_error(pref.id());
                tracing::warn!(error = %e, "preferred engine unreachable; trying a stale answer");
                self.stale_tag(r, tag, accept).await
            }
        }
    }

    /// A tag no upstream owns: stored content (written by ociedge or by docker-registry in some
    /// region). The local engine answers first, then the storage engines nearest first; an answer
    /// is trusted for `tag_ttl`.
    async fn storage_tag(
        &self,
        r: &Routed,
        tag: &Tag,
        accept: &[String],
    ) -> Result<ManifestAnswer> {
        let repo = &r.storage_repo;
        let (digest, cached) = match self.tags.fresh(repo, tag).await {
            Some(e) => {
                self.metrics.cache("tag", "hit");
                (e.digest, true)
            }
            None => {
                let mut engines: Vec<Arc<dyn crate::engine::Engine>> = Vec::new();
                if self.engines.local_usable() {
                    engines.push(self.engines.local().clone());
                }
                engines.extend(self.engines.remotes_for(r).into_iter().map(|(e, _)| e));
                let mut found = None;
                let mut last_err = None;
                for e in engines {
                    match e.tag_link(repo, tag).await {
                        Ok(Some(link)) => {
                            found = Some(link.digest);
                            break;
                        }
                        Ok(None) => {}
                        Err(err) => last_err = Some(err),
                    }
                }
                let Some(d) = found else {
                    return Err(last_err.unwrap_or_else(|| {
                        Error::client(
                            ErrorCode::ManifestUnknown,
                            format!("{repo}:{tag} is unknown"),
                        )
                    }));
                };
                self.metrics.cache("tag", "revalidated");
                (d, false)
            }
        };
        let (manifest, source) = self.manifest_by_digest(r, &digest, accept).await?;
        if !cached {
            self.tags
                .insert(repo, tag, digest, manifest.media_type.clone())
                .await;
        }
        Ok(ManifestAnswer {
            manifest,
            source,
            stale_age: None,
        })
    }

    /// The last known answer for a tag, if younger than `max_stale`: from memory, else from the
    /// local engine's tag link (which survives restarts).
    async fn stale_tag(
        &self,
        r: &Routed,
        tag: &Tag,
        accept: &[String],
    ) -> Result<Option<ManifestAnswer>> {
        let repo = &r.storage_repo;
        let (digest, age) = if let Some(e) = self.tags.stale(repo, tag).await {
            (e.digest, e.fetched.elapsed())
        } else {
            let link = if self.engines.local_usable() {
                self.engines.local().tag_link(repo, tag).await
            } else {
                Ok(None)
            };
            match link {
                Ok(Some(link)) => {
                    let age = link
                        .modified
                        .and_then(|m| SystemTime::now().duration_since(m).ok())
                        .unwrap_or(Duration::MAX);
                    if age >= self.tags.max_stale() {
                        return Ok(None);
                    }
                    (link.digest, age)
                }
                _ => return Ok(None),
            }
        };
        let Ok((manifest, source)) = self.manifest_by_digest(r, &digest, accept).await else {
            return Ok(None);
        };
        self.metrics.cache("tag", "stale");
        self.metrics.stale_tag();
        Ok(Some(ManifestAnswer {
            manifest,
            source,
            stale_age: Some(age),
        }))
    }

    /// All tags of a repository, from the authority (or the local engine while it is down).
    pub async fn tags(&self, r: &Routed) -> Result<Vec<String>> {
        let local = self.engines.local();
        if let Some(pref) = self.push_authority(r).await {
            // Pushed: the preferred engine's tags, with the upstream's where it knows the name
            // too (a tag not pushed here is still resolved upstream).
            let mut tags = pref.list_tags(&r.storage_repo).await?.unwrap_or_default();
            if let Some(u) = self.engines.upstream(r) {
                match u.engine.list_tags(&r.upstream_repo).await {
                    Ok(Some(t)) => tags.extend(t),
                    Ok(None) => {}
                    Err(e) if e.is_answer() => {}
                    Err(e) => {
                        self.metrics.upstream_error(u.engine.id());
                        tracing::warn!(error = %e, "tags list: upstream unreachable; pushed tags only");
                    }
                }
            }
            tags.sort();
            tags.dedup();
            return Ok(tags);
        }
        if let Some(u) = self.engines.upstream(r) {
            match u.engine.list_tags(&r.upstream_repo).await {
                Ok(Some(t)) => return Ok(t),
                Ok(None) => {
                    return Err(Error::client(
                        ErrorCode::NameUnknown,
                        format!("repository {} is unknown upstream", r.upstream_repo),
                    ))
                }
                Err(e) if e.is_answer() => return Err(e),
                Err(e) => {
                    self.metrics.upstream_error(u.engine.id());
                    tracing::warn!(error = %e, "tags list from the local engine: authority unreachable");
                }
            }
        }
        local.list_tags(&r.storage_repo).await?.ok_or_else(|| {
            Error::client(
                ErrorCode::NameUnknown,
                format!("repository {} is unknown", r.storage_repo),
            )
        })
    }

    /// The referrers index of a manifest, passed through from the upstream; an empty index when
    /// nobody has referrers for it.
    pub async fn referrers(
        &self,
        r: &Routed,
        digest: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<(Bytes, bool)> {
        if let Some(u) = self.engines.upstream(r) {
            if let Some(found) = u
                .engine
                .referrers(&r.upstream_repo, digest, artifact_type)
                .await?
            {
                return Ok(found);
            }
        }
        let empty = serde_json::json!({ "schemaVersion": 2, "mediaType": media::OCI_INDEX, "manifests": [] });
        Ok((Bytes::from(empty.to_string()), artifact_type.is_some()))
    }

    /// The name a routed repository is stored under (for logs).
    pub fn storage_name<'a>(&self, r: &'a Routed) -> &'a RepoName {
        &r.storage_repo
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_resolve() {
        let f = |s, l| RangeSpec::From { start: s, last: l };
        assert_eq!(
            f(0, Some(9)).resolve(100).unwrap(),
            ByteRange {
                start: 0,
                end: Some(10)
            }
        );
        assert_eq!(
            f(90, None).resolve(100).unwrap(),
            ByteRange {
                start: 90,
                end: Some(100)
            }
        );
        assert_eq!(
            f(90, Some(500)).resolve(100).unwrap(),
            ByteRange {
                start: 90,
                end: Some(100)
            }
        );
        assert_eq!(
            RangeSpec::Suffix(10).resolve(100).unwrap(),
            ByteRange {
                start: 90,
                end: Some(100)
            }
        );
        assert_eq!(
            RangeSpec::Suffix(1000).resolve(100).unwrap(),
            ByteRange {
                start: 0,
                end: Some(100)
            }
        );
        assert!(f(100, None).resolve(100).is_err());
        assert!(f(5, Some(4)).resolve(100).is_err());
        assert!(RangeSpec::Suffix(0).resolve(100).is_err());
    }
}
