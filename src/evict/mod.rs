//! Eviction: keeps the local engine under `cache.max_size` by deleting the least recently used
//! cached content, with the manifests and tag links that need it (so a later pull simply misses
//! and refills, and docker-registry reading the same directory never sees a dangling tag).
//!
//! Never evicted: content whose only copy may be here (pushed to this engine as the preferred
//! one, or written by another program), content waiting for replication, content being read
//! right now, and anything accessed within `min_idle` (longer than any transfer, which is how
//! several processes sharing one bucket avoid deleting what another is reading; each process
//! also publishes its access times in a sidecar object that the others merge).

pub mod index;
pub mod pins;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, TryStreamExt};
use object_store::path::Path;
use tokio::sync::Notify;

use crate::engine::storage::StorageEngine;
use crate::engine::EngineExt;
use crate::engine::{layout, ByteStream, Engine, Manifest};
use crate::error::Result;
use crate::metrics::Metrics;
use crate::oci::{Digest, RepoName};
use crate::replicate::task::Parsed;
use crate::replicate::Replicator;
use index::{now_secs, Entry, Index};

const SIDECARS: &str = "_ociedge/lru";
const PASS_EVERY: Duration = Duration::from_secs(10);
const SAVE_EVERY: Duration = Duration::from_secs(5);

/// Settings from `cache:`.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_size: Option<u64>,
    pub low_water: f64,
    pub min_idle: Duration,
    pub stale_uploads: Duration,
    /// Every local copy also exists elsewhere (the local engine is not the preferred one).
    pub all_cached: bool,
}

pub struct Evictor {
    local: Arc<StorageEngine>,
    limits: Limits,
    index: Mutex<Index>,
    pins: Mutex<HashMap<Digest, usize>>,
    replicator: Mutex<Option<Arc<Replicator>>>,
    instance: String,
    wake: Notify,
    metrics: Metrics,
}

/// Keeps a digest from being evicted while it is read.
pub struct PinGuard {
    evictor: Arc<Evictor>,
    digest: Digest,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        if let Ok(mut p) = self.evictor.pins.lock() {
            if let Some(n) = p.get_mut(&self.digest) {
                *n -= 1;
                if *n == 0 {
                    p.remove(&self.digest);
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Evictor {
    pub fn new(local: Arc<StorageEngine>, limits: Limits, metrics: Metrics) -> Evictor {
        Evictor {
            local,
            limits,
            index: Mutex::new(Index::default()),
            pins: Mutex::new(HashMap::new()),
            replicator: Mutex::new(None),
            instance: format!("{:016x}", rand::random::<u64>()),
            wake: Notify::new(),
            metrics,
        }
    }

    /// Content waiting in this replicator's queue is protected.
    pub fn set_replicator(&self, r: Arc<Replicator>) {
        *lock(&self.replicator) = Some(r);
    }

    /// Records a read or a write of `digest`. `cached`: `Some(true)` for a fill or replica,
    /// `Some(false)` for pushed content, `None` to keep what is known.
    pub fn touch(&self, digest: &Digest, size: u64, cached: Option<bool>) {
        let over = {
            let mut i = lock(&self.index);
            i.touch(digest, size, cached);
            self.metrics.cache_usage(i.total, i.entries.len());
            self.limits.max_size.is_some_and(|m| i.total > m)
        };
        if over {
            self.wake.notify_one();
        }
    }

    /// Records a manifest linked in `repo` and what it references.
    pub fn manifest_seen(&self, repo: &RepoName, m: &Manifest, cached: Option<bool>) {
        self.touch(&m.digest, m.bytes.len() as u64, cached);
        let children = match crate::oci::manifest::parse(&m.bytes, Some(&m.media_type)) {
            Ok(p) => p.blobs.into_iter().chain(p.manifests).collect::<Vec<_>>(),
            Err(_) => Vec::new(),
        };
        lock(&self.index).link_manifest(&m.digest, repo, children);
    }

    /// Pins `digest` for as long as the guard lives.
    pub fn pin(self: &Arc<Self>, digest: &Digest) -> PinGuard {
        *lock(&self.pins).entry(digest.clone()).or_default() += 1;
        PinGuard {
            evictor: self.clone(),
            digest: digest.clone(),
        }
    }

    /// Wraps a response stream so the digest stays pinned until the stream is dropped.
    pub fn pinned_stream(self: &Arc<Self>, digest: &Digest, s: ByteStream) -> ByteStream {
        let guard = self.pin(digest);
        Box::pin(s.map(move |item| {
            let _keep = &guard;
            item
        }))
    }

    /// (bytes used, entries).
    pub fn usage(&self) -> (u64, usize) {
        let i = lock(&self.index);
        (i.total, i.entries.len())
    }

    /// Rebuilds the index from a listing of the engine, the sidecars, and the manifests.
    pub async fn rebuild(&self) -> Result<()> {
        let mut fresh = Index::default();
        let listing: Vec<object_store::ObjectMeta> = self
            .local
            .store()
            .list(Some(&Path::from("docker/registry/v2/blobs")))
            .try_collect()
            .await
            .map_err(|e| crate::error::Error::object_store(self.local.id(), e))?;
        for m in listing {
            let parts: Vec<&str> = m.location.as_ref().split('/').collect();
            // docker/registry/v2/blobs/<alg>/<xx>/<hex>/data
            if parts.len() != 8 || parts[7] != "data" {
                continue;
            }
            let Ok(d) = format!("{}:{}", parts[4], parts[6]).parse::<Digest>() else {
                continue;
            };
            let last = m.last_modified.timestamp().max(0) as u64;
            fresh.entries.insert(
                d,
                Entry {
                    size: m.size,
                    last_access: last,
                    cached: self.limits.all_cached,
                    seq: 0,
                },
            );
            fresh.total += m.size;
        }
        self.merge_sidecars(&mut fresh, true).await;
        // The reference graph: every manifest revision of every repository (small reads).
        for repo in crate::replicate::backfill::repositories(&self.local).await? {
            for d in crate::replicate::backfill::revisions(&self.local, &repo).await? {
                let by = crate::oci::Reference::Digest(d.clone());
                if let Ok(Some(m)) = self.local.get_manifest(&repo, &by, &[]).await {
                    let children = match crate::oci::manifest::parse(&m.bytes, Some(&m.media_type))
                    {
                        Ok(p) => p.blobs.into_iter().chain(p.manifests).collect::<Vec<_>>(),
                        Err(_) => Vec::new(),
                    };
                    fresh.link_manifest(&d, &repo, children);
                }
            }
        }
        // Accesses recorded while the rebuild ran are kept.
        let mut cur = lock(&self.index);
        for (d, e) in cur.entries.drain() {
            match fresh.entries.get_mut(&d) {
                Some(f) => {
                    f.last_access = f.last_access.max(e.last_access);
                    f.cached = e.cached;
                }
                None => {
                    fresh.total += e.size;
                    fresh.entries.insert(d, e);
                }
            }
        }
        for (d, ps) in cur.parents.drain() {
            fresh.parents.entry(d).or_default().extend(ps);
        }
        for (d, rs) in cur.repos.drain() {
            fresh.repos.entry(d).or_default().extend(rs);
        }
        fresh.dirty = true;
        self.metrics.cache_usage(fresh.total, fresh.entries.len());
        tracing::info!(
            entries = fresh.entries.len(),
            bytes = fresh.total,
            "local engine index rebuilt"
        );
        *cur = fresh;
        Ok(())
    }

    /// Merges every process's published access times (the latest wins). On the rebuild pass,
    /// provenance comes from them too.
    async fn merge_sidecars(&self, into: &mut Index, provenance: bool) {
        let Ok(list) = self.local.list_objects(&Path::from(SIDECARS)).await else {
            return;
        };
        for (p, _) in list {
            let Ok(Some(b)) = self.local.get_object(&p).await else {
                continue;
            };
            let Ok(map) = serde_json::from_slice::<HashMap<String, (u64, bool)>>(&b) else {
                continue;
            };
            for (k, (last, cached)) in map {
                let Ok(d) = k.parse::<Digest>() else { continue };
                if let Some(e) = into.entries.get_mut(&d) {
                    e.last_access = e.last_access.max(last);
                    if provenance {
                        e.cached = e.cached || cached;
                    }
                }
            }
        }
    }

    /// Publishes this process's access times and provenance.
    pub async fn save_sidecar(&self) -> Result<()> {
        let body = {
            let mut i = lock(&self.index);
            if !i.dirty {
                return Ok(());
            }
            i.dirty = false;
            let map: HashMap<String, (u64, bool)> = i
                .entries
                .iter()
                .map(|(d, e)| (d.to_string(), (e.last_access, e.cached)))
                .collect();
            serde_json::to_vec(&map).unwrap_or_default()
        };
        self.local
            .put_object(
                &Path::from(format!("{SIDECARS}/{}.json", self.instance)),
                Bytes::from(body),
            )
            .await
    }

    /// Digests that replication still needs here (when this engine is a replication source).
    async fn protected(&self) -> HashSet<Digest> {
        let mut out = HashSet::new();
        let Some(r) = lock(&self.replicator).clone() else {
            return out;
        };
        for target in r.target_ids() {
            let Ok(jobs) = r.queue.pending(&target).await else {
                continue;
            };
            for q in jobs {
                let d = match q.job.parse() {
                    Some(Parsed::Blob(_, d))
                    | Some(Parsed::Manifest(_, d))
                    | Some(Parsed::Tag(_, _, d)) => d,
                    _ => continue,
                };
                self.with_descendants(&d, &mut out).await;
            }
        }
        out
    }

    async fn with_descendants(&self, d: &Digest, out: &mut HashSet<Digest>) {
        let mut stack = vec![d.clone()];
        while let Some(d) = stack.pop() {
            if !out.insert(d.clone()) {
                continue;
            }
            let by = crate::oci::Reference::Digest(d.clone());
            if let Ok(Some(m)) = self
                .local
                .get_manifest(&RepoName::placeholder(), &by, &[])
                .await
            {
                if let Ok(p) = crate::oci::manifest::parse(&m.bytes, Some(&m.media_type)) {
                    stack.extend(p.blobs);
                    stack.extend(p.manifests);
                }
            }
        }
    }

    /// Whether `d` and every manifest that needs it are cached copies, none of them protected
    /// (evicting `d` takes the manifests that need it).
    fn evictable(&self, i: &Index, d: &Digest, protected: &HashSet<Digest>) -> bool {
        let mut stack = vec![d.clone()];
        let mut seen = HashSet::new();
        while let Some(x) = stack.pop() {
            if !seen.insert(x.clone()) {
                continue;
            }
            if !i.entries.get(&x).is_none_or(|e| e.cached) || protected.contains(&x) {
                return false;
            }
            if let Some(ps) = i.parents.get(&x) {
                stack.extend(ps.iter().cloned());
            }
        }
        true
    }

    /// One eviction pass: down to the low-water mark if over the cap.
    pub async fn pass(&self) -> Result<()> {
        let Some(max) = self.limits.max_size else {
            return Ok(());
        };
        if lock(&self.index).total <= max {
            return Ok(());
        }
        {
            let mut i = Index::default();
            std::mem::swap(&mut i, &mut lock(&self.index));
            self.merge_sidecars(&mut i, false).await;
            let mut cur = lock(&self.index);
            // Accesses that happened while merging are kept.
            for (d, e) in cur.entries.drain() {
                let x = i.entries.entry(d).or_insert(e);
                x.last_access = x.last_access.max(e.last_access);
            }
            i.total = i.entries.values().map(|e| e.size).sum();
            *cur = i;
        }
        let low = (max as f64 * self.limits.low_water) as u64;
        let mut protected = self.protected().await;
        let now = now_secs();
        // Pinned content (a prewarm's `pin_until`) stays whatever its last access; when the pins
        // cannot be read, nothing is evicted this pass.
        match pins::active(&self.local, now).await {
            Ok(p) => protected.extend(p),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the pins; no eviction this pass");
                return Ok(());
            }
        }
        let candidates = lock(&self.index).lru_order();
        for (d, seen) in candidates {
            if lock(&self.index).total <= low {
                break;
            }
            let ok = {
                let i = lock(&self.index);
                let current = i.entries.get(&d).copied();
                current == Some(seen)
                    && now.saturating_sub(seen.last_access) >= self.limits.min_idle.as_secs()
                    && !protected.contains(&d)
                    && !lock(&self.pins).contains_key(&d)
                    && self.evictable(&i, &d, &protected)
            };
            if !ok {
                continue;
            }
            if let Err(e) = self.evict(&d).await {
                tracing::warn!(digest = %d, error = %e, "eviction failed");
            }
        }
        let (total, n) = self.usage();
        self.metrics.cache_usage(total, n);
        Ok(())
    }

    /// Deletes `d` after the manifests that need it, with their links.
    fn evict<'a>(&'a self, d: &'a Digest) -> BoxFuture<'a, Result<()>> {
        async move {
            let (parents, repos) = {
                let i = lock(&self.index);
                (
                    i.parents.get(d).cloned().unwrap_or_default(),
                    i.repos.get(d).cloned().unwrap_or_default(),
                )
            };
            for p in &parents {
                self.evict(p).await?;
                let prepos = lock(&self.index).repos.get(p).cloned().unwrap_or_default();
                for repo in prepos {
                    self.local.delete_blob(&repo, d).await?;
                }
            }
            // A manifest: out of every repository, tags pointing at it included.
            for repo in &repos {
                self.local.delete_manifest(repo, d).await?;
            }
            self.local.delete_object(&layout::blob_data(d)).await?;
            let mut i = lock(&self.index);
            if let Some(e) = i.remove(d) {
                self.metrics.evicted(e.size);
                tracing::info!(digest = %d, size = e.size, "evicted");
            }
            i.parents.remove(d);
            i.repos.remove(d);
            for ps in i.parents.values_mut() {
                ps.remove(d);
            }
            Ok(())
        }
        .boxed()
    }

    /// Removes upload sessions and spool files older than `stale_uploads`.
    pub async fn clean_stale(&self, spool_dir: &std::path::Path) {
        let cutoff = chrono_cutoff(self.limits.stale_uploads);
        let uploads: Vec<object_store::ObjectMeta> = self
            .local
            .store()
            .list(Some(&Path::from("_ociedge/uploads")))
            .try_collect()
            .await
            .unwrap_or_default();
        let mut stale: HashSet<String> = HashSet::new();
        for m in uploads {
            if m.last_modified.timestamp() < cutoff {
                if let Some(id) = m.location.as_ref().split('/').nth(2) {
                    stale.insert(id.to_string());
                }
            }
        }
        for id in stale {
            let _ = self
                .local
                .delete_prefix(&Path::from(format!("_ociedge/uploads/{id}")))
                .await;
            tracing::info!(upload = %id, "removed a stale upload session");
        }
        if let Ok(rd) = std::fs::read_dir(spool_dir) {
            for e in rd.flatten() {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|m| m.elapsed().ok())
                    .is_some_and(|a| a > self.limits.stale_uploads);
                if old {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    /// Runs passes, sidecar saves and cleanups forever (spawn it).
    pub async fn run(self: Arc<Self>, spool_dir: std::path::PathBuf) {
        if let Err(e) = self.rebuild().await {
            tracing::error!(error = %e, "cannot index the local engine; eviction waits for the next try");
        }
        let mut last_save = std::time::Instant::now();
        let mut last_pass = std::time::Instant::now();
        let mut last_clean = std::time::Instant::now() - Duration::from_secs(3600);
        loop {
            // Woken for a pass when over the cap; otherwise every SAVE_EVERY, so the access
            // times are published on their own clock, not only after a pass.
            let woken = tokio::time::timeout(SAVE_EVERY, self.wake.notified())
                .await
                .is_ok();
            if woken || last_pass.elapsed() >= PASS_EVERY {
                if let Err(e) = self.pass().await {
                    tracing::warn!(error = %e, "eviction pass failed");
                }
                last_pass = std::time::Instant::now();
            }
            if last_save.elapsed() >= SAVE_EVERY {
                if let Err(e) = self.save_sidecar().await {
                    tracing::warn!(error = %e, "cannot save the access sidecar");
                }
                last_save = std::time::Instant::now();
            }
            if last_clean.elapsed() >= Duration::from_secs(600) {
                self.clean_stale(&spool_dir).await;
                last_clean = std::time::Instant::now();
            }
        }
    }
}

fn chrono_cutoff(age: Duration) -> i64 {
    (now_secs().saturating_sub(age.as_secs())) as i64
}
