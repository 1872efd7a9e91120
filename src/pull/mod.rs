//! The pull path: hits from the local engine, misses from the nearest remote engine with a fill
//! of the local engine, tags from their authority.
//!
//! `blob.rs` answers blobs, `range.rs` ranges of blobs the local engine misses, `manifest.rs`
//! manifests and tag lists, `fill.rs` is the single-flight fill (`assembly.rs`: the bytes ranged reads lend it), `tags.rs` the answers of
//! upstream tag authorities. What the engines answered moments
//! ago is remembered by their [`CachingEngine`]s, not here: the pull path asks engines, and
//! freshness is the caching engine's.

mod assembly;
pub mod blob;
pub mod fill;
pub mod manifest;
mod range;
pub mod rate;
pub mod tags;

use std::sync::Arc;

use crate::engine::caching::CachingEngine;
use crate::engine::pushed::PushedRepos;
use crate::engine::set::{Engines, Routed};
use crate::engine::{Content, Engine, Manifest};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::oci::{Digest, ErrorCode, RepoName};
use fill::Fills;
use tags::TagCache;

pub use crate::engine::RangeSpec;
pub use blob::{BlobAnswer, BlobBody};
pub use manifest::ManifestAnswer;

pub use crate::metrics::LOCAL;

pub struct Puller {
    engines: Arc<Engines>,
    /// The local engine, as `engines` holds it (the caching engine links hits into the
    /// repository they were asked under).
    local: Arc<CachingEngine>,
    fills: Fills,
    tags: TagCache,
    metrics: Metrics,
    local_name: Arc<str>,
    /// Blob hits on a cloud local engine are redirected to presigned URLs valid this long.
    redirect: Option<std::time::Duration>,
    /// Told about every access to the local engine, when a size cap is set.
    evictor: Option<Arc<crate::evict::Evictor>>,
    /// The preferred (push) engine: the authority for the tags pushed to it.
    preferred: Option<Arc<dyn Engine>>,
    /// Which repositories were pushed (beside upstreams, what makes the preferred engine their
    /// authority rather than the upstream).
    pushed: Option<Arc<PushedRepos>>,
    /// A range of a cold blob also starts the whole-blob fill (`cache.fill_on_range`).
    fill_on_range: bool,
    /// The region this process fills with (`cluster:`).
    cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl Puller {
    /// `local` is the caching engine `engines` holds as its local engine.
    pub fn new(
        engines: Arc<Engines>,
        local: Arc<CachingEngine>,
        fills: Fills,
        tags: TagCache,
        metrics: Metrics,
    ) -> Puller {
        Puller {
            engines,
            local,
            fills,
            tags,
            metrics,
            local_name: LOCAL.into(),
            preferred: None,
            pushed: None,
            evictor: None,
            redirect: None,
            fill_on_range: true,
            cluster: None,
        }
    }

    /// Whether a range of a cold blob starts the whole-blob fill (`cache.fill_on_range`).
    pub fn set_fill_on_range(&mut self, on: bool) {
        self.fill_on_range = on;
    }

    /// Fills coordinate with the region's other processes through `c`.
    pub fn set_cluster(&mut self, c: Arc<crate::cluster::Cluster>) {
        self.cluster = Some(c);
    }

    pub fn cluster(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        self.cluster.as_ref()
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
    pub fn set_preferred(&mut self, engine: Arc<dyn Engine>, pushed: Arc<PushedRepos>) {
        self.preferred = Some(engine);
        self.pushed = Some(pushed);
    }

    pub fn engines(&self) -> &Arc<Engines> {
        &self.engines
    }

    pub fn fills(&self) -> &Fills {
        &self.fills
    }

    /// The count of writes of this process's engines (what memos of answers key on).
    pub fn generation(&self) -> &crate::engine::caching::Generation {
        self.local.generation()
    }

    /// The name a routed repository is stored under (for logs).
    pub fn storage_name<'a>(&self, r: &'a Routed) -> &'a RepoName {
        &r.storage_repo
    }

    /// The preferred engine when it is the authority for `r`: a repository no upstream owns, or
    /// one pushed through ociedge beside its upstream. A mirrored repository's tag links in the
    /// same engine are cached answers, never an authority.
    async fn push_authority(&self, r: &Routed) -> Option<Arc<dyn Engine>> {
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

    /// In a pushed repository (no upstream owns the name; a preferred engine takes pushes),
    /// content by digest exists only where the preferred engine links it: after a `DELETE` it is
    /// unknown, as in Distribution, though its bytes stay in the store (other repositories may
    /// share them). Elsewhere, and when the preferred engine cannot be asked, `Ok`.
    async fn check_pushed(&self, r: &Routed, content: Content) -> Result<()> {
        let Some(pref) = self.push_authority(r).await else {
            return Ok(());
        };
        match pref.is_linked(&r.storage_repo, &content).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(match content {
                Content::Manifest(d) => Error::client(
                    ErrorCode::ManifestUnknown,
                    format!("manifest {d} is not in {}", r.storage_repo),
                ),
                Content::Blob(d) => Error::client(
                    ErrorCode::BlobUnknown,
                    format!("blob {d} is not in {}", r.storage_repo),
                ),
            }),
            Err(e) => {
                self.metrics.upstream_error(pref.id());
                tracing::warn!(error = %e, digest = %content.digest(), "preferred engine unreachable; serving unchecked");
                Ok(())
            }
        }
    }

    /// A local hit is recorded: its repository links it, the evictor sees it used (and, the
    /// first time a manifest is served under a repository, what it references).
    fn local_hit(&self, r: &Routed, content: Content, size: u64, manifest: Option<&Manifest>) {
        if let Some(ev) = &self.evictor {
            match manifest {
                Some(m) if !self.local.knows_linked(&r.storage_repo, &content) => {
                    ev.manifest_seen(&r.storage_repo, m, None)
                }
                _ => ev.touch(content.digest(), size, None),
            }
        }
        self.local.ensure_linked(&r.storage_repo, content);
    }

    fn digest_unknown(digest: &Digest) -> Error {
        Error::client(ErrorCode::BlobUnknown, format!("blob {digest} is unknown"))
    }
}
