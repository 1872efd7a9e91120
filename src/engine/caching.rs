//! `CachingEngine`: an [`Engine`] around another that owns every memo of the read path — blob
//! sizes and absences, manifests by digest, the links a repository holds, tag links — so that
//! freshness has one owner instead of being every caller's job.
//!
//! # What keeps it exact
//! Every write of this process to an engine goes through that engine's `CachingEngine` (the app
//! wraps each engine once and hands the same wrapper to the pull path, the push path and the
//! replication worker). A write changes the store, then moves the process's [`Generation`],
//! then updates or forgets exactly the memos it changed. A read that fills a memo records the
//! generation before asking the store and drops what it kept if the generation moved meanwhile,
//! so an answer read before a write is never kept after it. The plain front's answer memo keys
//! on the same generation: the very next request after a write sees it.
//!
//! # What another process's writes cost
//! Writes through another process sharing the storage (another ociedge, Distribution, an
//! eviction of the local engine, `ociedge verify`) are not seen by the generation. They are
//! seen within the memo's bound, stated by its [`Freshness`]: a blob size within `present`, an
//! absence within `absent`, a link or tag within `answers` (the `tag_ttl`), a manifest or tag an
//! upstream said it does not have within `negative` (`cache.negative_ttl`; any write of this
//! process forgets every such answer). Manifests are kept by digest: their bytes never change,
//! and whether a repository holds one is a link.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use moka::sync::Cache;

use super::{
    BlobHit, Change, Content, Engine, EngineKind, Lookup, Manifest, ManifestMeta, TagLink,
};
use crate::error::Result;
use crate::oci::{Digest, Reference, RepoName, Tag};

/// The count of writes made through the caching engines of one process.
#[derive(Clone, Debug, Default)]
pub struct Generation(Arc<AtomicU64>);

impl Generation {
    /// The count now: read it before looking, record it with what was seen.
    pub fn now(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// Moves the count: for a write this process makes around its caching engines (a push
    /// forwarded to an upstream registry), so that nothing remembered before it is used after.
    pub fn bump(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}

/// How long each kind of answer is trusted without asking the store again.
#[derive(Clone, Copy, Debug)]
pub struct Freshness {
    /// A blob's size (its presence).
    pub present: Duration,
    /// A blob's absence (also forgotten at the next write of this process).
    pub absent: Duration,
    /// A link a repository holds, a tag's link.
    pub answers: Duration,
    /// Bytes of manifests kept by digest (0: none).
    pub manifest_bytes: u64,
    /// A manifest or tag the engine said it does not have (0: not remembered). Forgotten at the
    /// next write of this process, whatever it wrote.
    pub negative: Duration,
}

impl Freshness {
    /// The local engine: an eviction (of another process too) is seen within a second.
    pub fn local(tag_ttl: Duration) -> Freshness {
        Freshness {
            present: Duration::from_secs(1),
            absent: Duration::from_secs(1),
            answers: tag_ttl,
            manifest_bytes: 64 << 20,
            negative: Duration::ZERO,
        }
    }

    /// A remote engine: digests are immutable, so a `HEAD` storm for content not cached yet
    /// costs the remote one request per digest for ten minutes, not one per request.
    pub fn remote(tag_ttl: Duration) -> Freshness {
        Freshness {
            present: Duration::from_secs(600),
            absent: Duration::from_secs(1),
            answers: tag_ttl,
            manifest_bytes: 0,
            negative: Duration::ZERO,
        }
    }

    /// An upstream registry: as a remote engine, and its "no such manifest or tag" is
    /// remembered for `negative` (`cache.negative_ttl`), so clients probing names that do not
    /// exist (containerd's `_default` host, a CI loop on a missing tag) do not reach it each time.
    pub fn upstream(tag_ttl: Duration, negative: Duration) -> Freshness {
        Freshness {
            negative,
            ..Freshness::remote(tag_ttl)
        }
    }
}

/// Blobs of a storage engine are stored once for all repositories; a registry answers per
/// repository, so its answers are kept per repository.
type BlobKey = (Option<RepoName>, Digest);

#[derive(Debug)]
pub struct CachingEngine {
    inner: Arc<dyn Engine>,
    generation: Generation,
    per_repo: bool,
    present: Cache<BlobKey, u64>,
    /// Absences, with the generation they were seen under.
    absent: Cache<BlobKey, u64>,
    /// Links known to be there (`is_linked` answered `true`, or this process wrote them).
    linked: Option<Cache<(RepoName, Content), ()>>,
    /// Links this process wrote or found, so a hit links its repository once
    /// ([`CachingEngine::ensure_linked`]).
    written: Cache<(RepoName, Content), ()>,
    tags: Option<Cache<(RepoName, Tag), TagLink>>,
    manifests: Option<Cache<Digest, Manifest>>,
    /// Manifests and tags found absent, by (repository, reference, `Accept`), with the generation
    /// they were seen under.
    negative: Option<Cache<NegativeKey, u64>>,
    /// Counts the answers `negative` gives (`cache{kind="manifest",result="negative"}`).
    metrics: Option<crate::metrics::Metrics>,
}

/// (repository, reference, `Accept`).
type NegativeKey = (RepoName, String, String);

impl CachingEngine {
    pub fn new(inner: Arc<dyn Engine>, generation: Generation, f: Freshness) -> CachingEngine {
        let ttl = |d: Duration| d.max(Duration::from_millis(1));
        let answers = (!f.answers.is_zero()).then_some(ttl(f.answers));
        CachingEngine {
            per_repo: inner.kind() == EngineKind::Registry,
            inner,
            generation,
            present: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ttl(f.present))
                .build(),
            absent: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ttl(f.absent))
                .build(),
            linked: answers.map(|t| {
                Cache::builder()
                    .max_capacity(100_000)
                    .time_to_live(t)
                    .build()
            }),
            written: Cache::new(1_000_000),
            tags: answers.map(|t| {
                Cache::builder()
                    .max_capacity(100_000)
                    .time_to_live(t)
                    .support_invalidation_closures()
                    .build()
            }),
            negative: (!f.negative.is_zero()).then(|| {
                Cache::builder()
                    .max_capacity(100_000)
                    .time_to_live(f.negative)
                    .build()
            }),
            metrics: None,
            manifests: (f.manifest_bytes > 0).then(|| {
                Cache::builder()
                    .max_capacity(f.manifest_bytes)
                    .weigher(|_k: &Digest, m: &Manifest| {
                        u32::try_from(m.bytes.len() + 256).unwrap_or(u32::MAX)
                    })
                    .build()
            }),
        }
    }

    /// Counts the answers given from the negative memo.
    pub fn with_metrics(mut self, metrics: crate::metrics::Metrics) -> CachingEngine {
        self.metrics = Some(metrics);
        self
    }

    /// `ask`'s answer for the manifest `reference`, unless the engine said moments ago (no
    /// write of this process since) that it has none; a new "none" is remembered.
    async fn unless_absent<T>(
        &self,
        repo: &RepoName,
        reference: &Reference,
        accept: &[String],
        ask: impl std::future::Future<Output = Result<Option<T>>>,
    ) -> Result<Option<T>> {
        let Some(memo) = &self.negative else {
            return ask.await;
        };
        let key = (repo.clone(), reference.to_string(), accept.join(","));
        let seen = self.generation.now();
        if memo.get(&key) == Some(seen) {
            if let Some(m) = &self.metrics {
                m.cache("manifest", "negative");
            }
            return Ok(None);
        }
        let found = ask.await?;
        if found.is_none() {
            self.keep(memo, key, seen, seen);
        }
        Ok(found)
    }

    /// The engine this one wraps.
    pub fn inner(&self) -> &Arc<dyn Engine> {
        &self.inner
    }

    pub fn generation(&self) -> &Generation {
        &self.generation
    }

    /// Makes sure `repo` holds `content` (a hit served under a repository it was not linked
    /// into yet, which Distribution needs to serve it there): written in the background, once
    /// per process unless a write of this process removes it.
    pub fn ensure_linked(self: &Arc<Self>, repo: &RepoName, content: Content) {
        let key = (repo.clone(), content);
        if self.written.contains_key(&key) {
            return;
        }
        self.written.insert(key.clone(), ());
        let this = self.clone();
        tokio::spawn(async move {
            let (repo, content) = &key;
            if let Err(e) = this.update(repo, &Change::Link(content.clone())).await {
                tracing::warn!(error = %e, %repo, digest = %content.digest(), "could not link content into the repository");
                this.written.invalidate(&key);
            }
        });
    }

    /// The manifest if it is held in memory (what is served while the store is down).
    pub fn remembered_manifest(&self, digest: &Digest) -> Option<Manifest> {
        self.manifests.as_ref()?.get(digest)
    }

    /// Whether this process wrote or ensured the link already (what is recorded once per
    /// repository and content, e.g. by the evictor, checks this before `ensure_linked`).
    pub fn knows_linked(&self, repo: &RepoName, content: &Content) -> bool {
        self.written.contains_key(&(repo.clone(), content.clone()))
    }

    fn blob_key(&self, repo: &RepoName, digest: &Digest) -> BlobKey {
        (self.per_repo.then(|| repo.clone()), digest.clone())
    }

    /// Keeps `value` under `key` in `cache` unless a write happened since `seen` (the
    /// generation read before the store was asked); see the module doc.
    fn keep<K, V>(&self, cache: &Cache<K, V>, key: K, value: V, seen: u64)
    where
        K: std::hash::Hash + Eq + Send + Sync + Clone + 'static,
        V: Clone + Send + Sync + 'static,
    {
        if self.generation.now() != seen {
            return;
        }
        cache.insert(key.clone(), value);
        if self.generation.now() != seen {
            cache.invalidate(&key);
        }
    }
}

#[async_trait]
impl Engine for CachingEngine {
    fn id(&self) -> &str {
        self.inner.id()
    }

    fn kind(&self) -> EngineKind {
        self.inner.kind()
    }

    async fn open_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        want: Lookup,
    ) -> Result<Option<BlobHit>> {
        let key = self.blob_key(repo, digest);
        let seen = self.generation.now();
        if !want.body {
            if let Some(size) = self.present.get(&key) {
                let range = want.range.map(|r| r.resolve(size)).transpose()?;
                return Ok(Some(BlobHit {
                    size,
                    range,
                    body: None,
                }));
            }
            if self.absent.get(&key) == Some(seen) {
                return Ok(None);
            }
        }
        let found = self.inner.open_blob(repo, digest, want).await?;
        // Only sizes are remembered (what a `HEAD` asks): a read opens the blob anyway, and
        // keeping nothing for it keeps the hot path of hits free of memo writes.
        match &found {
            Some(hit) if !want.body => self.keep(&self.present, key, hit.size, seen),
            None => self.keep(&self.absent, key, seen, seen),
            Some(_) => {}
        }
        Ok(found)
    }

    async fn put_blob_file(
        &self,
        digest: &Digest,
        file: &std::path::Path,
        size: u64,
    ) -> Result<()> {
        let res = self.inner.put_blob_file(digest, file, size).await;
        self.generation.bump();
        // Storage blobs are global: every repository's absence of it is gone.
        self.absent.invalidate(&(None, digest.clone()));
        if res.is_ok() && !self.per_repo {
            self.present.insert((None, digest.clone()), size);
        }
        res
    }

    async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        accept: &[String],
    ) -> Result<Option<Manifest>> {
        let ask = self.inner.get_manifest(repo, reference, accept);
        let (Some(memo), Reference::Digest(d)) = (&self.manifests, reference) else {
            return self.unless_absent(repo, reference, accept, ask).await;
        };
        if let Some(m) = memo.get(d) {
            return Ok(Some(m));
        }
        let found = self.unless_absent(repo, reference, accept, ask).await?;
        if let Some(m) = &found {
            // Content by digest never changes: no generation check.
            memo.insert(d.clone(), m.clone());
        }
        Ok(found)
    }

    async fn head_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        accept: &[String],
    ) -> Result<Option<ManifestMeta>> {
        if let (Some(memo), Reference::Digest(d)) = (&self.manifests, reference) {
            if let Some(m) = memo.get(d) {
                return Ok(Some(ManifestMeta {
                    digest: m.digest,
                    size: m.bytes.len() as u64,
                    media_type: m.media_type,
                }));
            }
        }
        let ask = self.inner.head_manifest(repo, reference, accept);
        self.unless_absent(repo, reference, accept, ask).await
    }

    async fn put_manifest(&self, repo: &RepoName, manifest: &Manifest) -> Result<()> {
        let res = self.inner.put_manifest(repo, manifest).await;
        self.generation.bump();
        if res.is_ok() {
            let content = Content::Manifest(manifest.digest.clone());
            self.written.insert((repo.clone(), content.clone()), ());
            if let Some(linked) = &self.linked {
                linked.insert((repo.clone(), content), ());
            }
            if let Some(memo) = &self.manifests {
                memo.insert(manifest.digest.clone(), manifest.clone());
            }
        }
        res
    }

    async fn tag_link(&self, repo: &RepoName, tag: &Tag) -> Result<Option<TagLink>> {
        let Some(memo) = &self.tags else {
            return self.inner.tag_link(repo, tag).await;
        };
        let key = (repo.clone(), tag.clone());
        if let Some(link) = memo.get(&key) {
            return Ok(Some(link));
        }
        let seen = self.generation.now();
        let found = self.inner.tag_link(repo, tag).await?;
        if let Some(link) = &found {
            self.keep(memo, key, link.clone(), seen);
        }
        Ok(found)
    }

    async fn list_tags(&self, repo: &RepoName) -> Result<Option<Vec<String>>> {
        self.inner.list_tags(repo).await
    }

    async fn referrers(
        &self,
        repo: &RepoName,
        digest: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Option<(Bytes, bool)>> {
        self.inner.referrers(repo, digest, artifact_type).await
    }

    async fn is_linked(&self, repo: &RepoName, content: &Content) -> Result<bool> {
        let Some(memo) = &self.linked else {
            return self.inner.is_linked(repo, content).await;
        };
        let key = (repo.clone(), content.clone());
        if memo.contains_key(&key) {
            return Ok(true);
        }
        let seen = self.generation.now();
        let linked = self.inner.is_linked(repo, content).await?;
        if linked {
            self.keep(memo, key, (), seen);
        }
        Ok(linked)
    }

    async fn update(&self, repo: &RepoName, change: &Change) -> Result<bool> {
        let res = self.inner.update(repo, change).await;
        self.generation.bump();
        match change {
            Change::Link(c) => {
                if res.is_ok() {
                    self.written.insert((repo.clone(), c.clone()), ());
                    if let Some(linked) = &self.linked {
                        linked.insert((repo.clone(), c.clone()), ());
                    }
                }
            }
            Change::Unlink(c) => {
                let key = (repo.clone(), c.clone());
                self.written.invalidate(&key);
                if let Some(linked) = &self.linked {
                    linked.invalidate(&key);
                }
                // The tags pointing at a deleted manifest went with it.
                if let (Content::Manifest(_), Some(tags)) = (c, &self.tags) {
                    let repo = repo.clone();
                    let _ = tags.invalidate_entries_if(move |(r, _), _| *r == repo);
                }
            }
            Change::Tag(tag, digest) => {
                if let Some(tags) = &self.tags {
                    let key = (repo.clone(), tag.clone());
                    match &res {
                        Ok(_) => tags.insert(
                            key,
                            TagLink {
                                digest: digest.clone(),
                                modified: Some(SystemTime::now()),
                            },
                        ),
                        Err(_) => tags.invalidate(&key),
                    }
                }
            }
            Change::Untag(tag) => {
                if let Some(tags) = &self.tags {
                    tags.invalidate(&(repo.clone(), tag.clone()));
                }
            }
        }
        res
    }

    async fn probe(&self) -> Result<()> {
        self.inner.probe().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::storage::StorageEngine;
    use crate::engine::EngineExt;
    use object_store::memory::InMemory;

    fn setup() -> (Arc<StorageEngine>, Arc<CachingEngine>) {
        let store = Arc::new(StorageEngine::from_store("eu", Arc::new(InMemory::new())));
        let cached = Arc::new(CachingEngine::new(
            store.clone(),
            Generation::default(),
            Freshness::local(Duration::from_secs(60)),
        ));
        (store, cached)
    }

    async fn put(e: &dyn Engine, data: &[u8]) -> Digest {
        let d = Digest::sha256_of(data);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("blob");
        std::fs::write(&f, data).unwrap();
        e.put_blob_file(&d, &f, data.len() as u64).await.unwrap();
        d
    }

    fn repo() -> RepoName {
        "team/app".parse().unwrap()
    }

    /// An absence it remembered is forgotten by its own write at once (not after `absent`).
    #[tokio::test]
    async fn its_own_writes_are_seen_at_once() {
        let (_, cached) = setup();
        let data = b"layer";
        let d = Digest::sha256_of(data);
        let g0 = cached.generation().now();
        assert!(cached.stat_blob(&repo(), &d).await.unwrap().is_none());
        put(cached.as_ref(), data).await;
        assert!(
            cached.generation().now() > g0,
            "a write moves the generation"
        );
        assert_eq!(
            cached.stat_blob(&repo(), &d).await.unwrap().unwrap().size,
            5
        );

        // Links and tags: remembered, and changed by its own writes exactly.
        assert!(!cached.links(&repo(), &d, false).await.unwrap());
        cached.link_blob(&repo(), &d).await.unwrap();
        assert!(cached.links(&repo(), &d, false).await.unwrap());
        assert!(cached.delete_blob(&repo(), &d).await.unwrap());
        assert!(!cached.links(&repo(), &d, false).await.unwrap());
        let tag: Tag = "v1".parse().unwrap();
        cached.put_tag(&repo(), &tag, &d).await.unwrap();
        assert_eq!(
            cached
                .tag_link(&repo(), &tag)
                .await
                .unwrap()
                .unwrap()
                .digest,
            d
        );
        assert!(cached.delete_tag(&repo(), &tag).await.unwrap());
        assert!(cached.tag_link(&repo(), &tag).await.unwrap().is_none());
    }

    /// Writes made around it (another process sharing the store) are seen within the bounds its
    /// doc states: an absence within `absent`, a link and a tag within `answers`.
    #[tokio::test]
    async fn writes_around_it_are_seen_within_the_stated_bound() {
        let store = Arc::new(StorageEngine::from_store("eu", Arc::new(InMemory::new())));
        let f = Freshness {
            present: Duration::from_millis(200),
            absent: Duration::from_millis(200),
            answers: Duration::from_millis(200),
            manifest_bytes: 0,
            negative: Duration::ZERO,
        };
        let cached = CachingEngine::new(store.clone(), Generation::default(), f);
        let data = b"other";
        let d = Digest::sha256_of(data);
        let tag: Tag = "v1".parse().unwrap();
        assert!(cached.stat_blob(&repo(), &d).await.unwrap().is_none());
        put(store.as_ref(), data).await;
        store.link_blob(&repo(), &d).await.unwrap();
        store.put_tag(&repo(), &tag, &d).await.unwrap();
        // Remembered: still absent right after (this is what a memo is for)...
        assert!(cached.stat_blob(&repo(), &d).await.unwrap().is_none());
        assert!(cached.links(&repo(), &d, false).await.unwrap());
        assert!(cached.tag_link(&repo(), &tag).await.unwrap().is_some());
        store.delete_blob(&repo(), &d).await.unwrap();
        store.delete_tag(&repo(), &tag).await.unwrap();
        // ...and seen once the bound has passed.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            cached.stat_blob(&repo(), &d).await.unwrap().unwrap().size,
            5
        );
        assert!(!cached.links(&repo(), &d, false).await.unwrap());
        assert!(cached.tag_link(&repo(), &tag).await.unwrap().is_none());
    }

    /// A read that began before a write and ends after it is not remembered: the next read asks
    /// the store (a memo never outlives the write it missed).
    #[tokio::test]
    async fn a_read_overtaken_by_a_write_is_not_kept() {
        let (store, cached) = setup();
        let data = b"raced";
        let d = Digest::sha256_of(data);
        let seen = cached.generation().now();
        // The store answered "absent" under `seen`; a write lands before the answer is kept.
        put(cached.as_ref(), b"anything else").await;
        put(store.as_ref(), data).await;
        cached.keep(&cached.absent, (None, d.clone()), seen, seen);
        assert_eq!(
            cached.stat_blob(&repo(), &d).await.unwrap().unwrap().size,
            5
        );
    }

    /// "No such manifest" is remembered for `negative`, and forgotten by any write of the
    /// process (a push forwarded to the upstream moves the generation too).
    #[tokio::test]
    async fn a_missing_manifest_is_remembered_until_a_write() {
        let store = Arc::new(StorageEngine::from_store("up", Arc::new(InMemory::new())));
        let generation = Generation::default();
        let f = Freshness {
            negative: Duration::from_secs(60),
            ..Freshness::remote(Duration::from_secs(60))
        };
        let cached = CachingEngine::new(store.clone(), generation.clone(), f);
        let bytes = Bytes::from_static(br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#);
        let m = Manifest {
            digest: Digest::sha256_of(&bytes),
            media_type: crate::oci::media::OCI_MANIFEST.into(),
            bytes,
        };
        let tag: Tag = "v1".parse().unwrap();
        let by_tag = Reference::Tag(tag.clone());
        assert!(cached
            .head_manifest(&repo(), &by_tag, &[])
            .await
            .unwrap()
            .is_none());
        // Written around it: still "absent" from memory...
        store.put_manifest(&repo(), &m).await.unwrap();
        store.put_tag(&repo(), &tag, &m.digest).await.unwrap();
        assert!(cached
            .head_manifest(&repo(), &by_tag, &[])
            .await
            .unwrap()
            .is_none());
        // ...until any write of the process.
        generation.bump();
        let found = cached.head_manifest(&repo(), &by_tag, &[]).await.unwrap();
        assert_eq!(found.map(|f| f.digest), Some(m.digest));
    }

    /// A manifest by digest is answered from memory; its bytes never change.
    #[tokio::test]
    async fn manifests_by_digest_are_remembered() {
        let (store, cached) = setup();
        let bytes = Bytes::from_static(br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#);
        let m = Manifest {
            digest: Digest::sha256_of(&bytes),
            media_type: crate::oci::media::OCI_MANIFEST.into(),
            bytes,
        };
        cached.put_manifest(&repo(), &m).await.unwrap();
        let by = Reference::Digest(m.digest.clone());
        // Gone from the store (an eviction): still answered, as the same bytes.
        store.delete_manifest(&repo(), &m.digest).await.unwrap();
        use object_store::ObjectStoreExt;
        let _ = store
            .store()
            .delete(&crate::engine::layout::blob_data(&m.digest))
            .await;
        let got = cached
            .get_manifest(&repo(), &by, &[])
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.bytes, m.bytes);
        assert!(cached.remembered_manifest(&m.digest).is_some());
    }
}
