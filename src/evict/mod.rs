//! Eviction: keeps the local engine under `cache.max_size` by deleting the least recently used
//! cached content, with the manifests and tag links that need it (so a later pull simply misses
//! and refills, and docker-registry reading the same directory never sees a dangling tag).
//!
//! Never evicted: content whose only copy may be here (pushed to this engine as the preferred
//! one, or written by another program), content waiting for replication, content being read
//! or filled right now by this process or, with `cluster:`, by any process of the region (each
//! publishes what it reads, `cluster::reading`), and anything accessed within `min_idle` (a
//! couple of seconds: what a read that began just before a pass needs to be published, and any
//! clock skew between the processes whose access times are merged). Each process also publishes
//! its access times in a sidecar object that the others merge; with `cluster:` it also learns
//! the blobs the others filled from a listing of the engine, so every process sees the region's
//! usage.

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

use crate::cluster::reading::Readers;
use crate::cluster::Cluster;
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
/// With `cluster:`, how often a pass lists the engine (per thousand blobs indexed) to learn the
/// blobs the region's other processes filled or evicted.
const LIST_EVERY: Duration = Duration::from_secs(2);
/// With `cluster:`, how soon (per thousand blobs indexed) a pass may list again after this
/// process committed a new blob: what a process knows of the region's usage is its own commits
/// and the last listing, and a region filling fast would otherwise pass the cap by what all its
/// processes fill in [`LIST_EVERY`]. A listing is one `LIST` request per thousand blobs.
const LIST_SOON: Duration = Duration::from_millis(50);

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
    /// The region, with `cluster:`: what its processes read is never evicted.
    cluster: std::sync::OnceLock<Arc<Cluster>>,
    readers: Readers,
    /// Told when a digest is pinned that was not (published to the region at once).
    pinned: Notify,
    /// The digests this process is filling (they are committed at the end of the fill).
    filling: std::sync::OnceLock<Box<dyn Fn() -> Vec<Digest> + Send + Sync>>,
    /// When the engine was last listed to learn the region's usage.
    listed: Mutex<Option<std::time::Instant>>,
    /// This process committed a new blob since the last listing (see [`LIST_SOON`]).
    committed: std::sync::atomic::AtomicBool,
    /// Blobs learned from a listing, whose provenance the sidecars tell.
    learned: Mutex<HashSet<Digest>>,
    /// In a region, the last pass evicted: the next one goes on down to the low-water mark even
    /// under the cap, with the listing it makes (what the others filled meanwhile).
    draining: std::sync::atomic::AtomicBool,
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
            cluster: std::sync::OnceLock::new(),
            readers: Readers::default(),
            pinned: Notify::new(),
            filling: std::sync::OnceLock::new(),
            listed: Mutex::new(None),
            committed: std::sync::atomic::AtomicBool::new(false),
            learned: Mutex::new(HashSet::new()),
            draining: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Eviction spares what the region's processes read, and counts what they filled.
    pub fn set_cluster(&self, c: Arc<Cluster>) {
        let _ = self.cluster.set(c);
    }

    /// `f` lists the digests this process is filling (spared, and published with the reads).
    pub fn set_filling(&self, f: Box<dyn Fn() -> Vec<Digest> + Send + Sync>) {
        let _ = self.filling.set(f);
    }

    /// The digests this process reads or fills now.
    fn in_use(&self) -> Vec<Digest> {
        let mut v: Vec<Digest> = lock(&self.pins).keys().cloned().collect();
        if let Some(f) = self.filling.get() {
            v.extend(f());
        }
        v.sort();
        v.dedup();
        v
    }

    /// Publishes what this process reads, at once when it changes and every
    /// [`crate::cluster::REFRESH`] while it is not empty (a heartbeat otherwise).
    async fn publish_reads(self: Arc<Self>, c: Arc<Cluster>) {
        let mut seq = 0u64;
        let mut last: Option<Vec<Digest>> = None;
        let mut put_at = std::time::Instant::now();
        loop {
            let _ = tokio::time::timeout(crate::cluster::REFRESH, self.pinned.notified()).await;
            let now = self.in_use();
            let due = match &last {
                None => true,
                Some(l) => {
                    *l != now
                        || (!now.is_empty() && put_at.elapsed() >= crate::cluster::REFRESH)
                        || put_at.elapsed() >= Duration::from_secs(10)
                }
            };
            if !due {
                continue;
            }
            seq += 1;
            match c.publish_reading(seq, &now).await {
                Ok(()) => {
                    last = Some(now);
                    put_at = std::time::Instant::now();
                }
                Err(e) => tracing::warn!(error = %e, "cluster: cannot publish the reads in flight"),
            }
        }
    }

    /// Adds the blobs other processes of the region filled (from a listing of the engine) and
    /// drops those they evicted, at most once per `LIST_EVERY` per thousand blobs; `true` when
    /// it listed.
    async fn learn_region(&self) -> bool {
        let pages = (lock(&self.index).entries.len() / 1000).max(1) as u32;
        let soon = self.committed.load(std::sync::atomic::Ordering::Relaxed);
        let every = if soon { LIST_SOON } else { LIST_EVERY };
        {
            let mut l = lock(&self.listed);
            if l.is_some_and(|t| t.elapsed() < every * pages) {
                return false;
            }
            *l = Some(std::time::Instant::now());
        }
        self.committed
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let started = now_secs();
        let listing: Vec<object_store::ObjectMeta> = match self
            .local
            .store()
            .list(Some(&Path::from("docker/registry/v2/blobs")))
            .try_collect()
            .await
        {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the local engine");
                return false;
            }
        };
        let mut present = HashSet::new();
        let mut i = lock(&self.index);
        for m in listing {
            let Some(d) = blob_of(&m) else { continue };
            present.insert(d.clone());
            if !i.entries.contains_key(&d) {
                let last = m.last_modified.timestamp().max(0) as u64;
                i.touch(&d, m.size, Some(self.limits.all_cached));
                if let Some(e) = i.entries.get_mut(&d) {
                    e.last_access = last;
                }
                // Its provenance comes from the filler's sidecar.
                lock(&self.learned).insert(d.clone());
            }
        }
        // Gone from the engine (evicted by another process), unless touched since the listing.
        let gone: Vec<Digest> = i
            .entries
            .iter()
            .filter(|(d, e)| !present.contains(*d) && e.last_access + 2 < started)
            .map(|(d, _)| d.clone())
            .collect();
        for d in gone {
            i.remove(&d);
            lock(&self.learned).remove(&d);
        }
        self.metrics.cache_usage(i.total, i.entries.len());
        true
    }

    /// Content waiting in this replicator's queue is protected.
    pub fn set_replicator(&self, r: Arc<Replicator>) {
        *lock(&self.replicator) = Some(r);
    }

    /// Records a read or a write of `digest`. `cached`: `Some(true)` for a fill or replica,
    /// `Some(false)` for pushed content, `None` to keep what is known.
    pub fn touch(&self, digest: &Digest, size: u64, cached: Option<bool>) {
        let (over, new) = {
            let mut i = lock(&self.index);
            let new = !i.entries.contains_key(digest);
            i.touch(digest, size, cached);
            self.metrics.cache_usage(i.total, i.entries.len());
            (self.limits.max_size.is_some_and(|m| i.total > m), new)
        };
        // In a region, what this process knows of the usage is its own commits and the last
        // listing: a new blob asks for a pass with a fresh listing soon (the others are likely
        // committing too).
        let region = self.cluster.get().is_some() && self.limits.max_size.is_some();
        if region && new {
            self.committed
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        if over || (region && new) {
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
        let first = {
            let mut p = lock(&self.pins);
            let n = p.entry(digest.clone()).or_default();
            *n += 1;
            *n == 1
        };
        if first && self.cluster.get().is_some() {
            self.pinned.notify_one();
        }
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
            let Some(d) = blob_of(&m) else { continue };
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
                    if provenance || lock(&self.learned).contains(&d) {
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
        let cluster = self.cluster.get().cloned();
        let draining =
            cluster.is_some() && self.draining.load(std::sync::atomic::Ordering::Relaxed);
        let listed = cluster.is_some() && self.learn_region().await;
        let low = (max as f64 * self.limits.low_water) as u64;
        let total = lock(&self.index).total;
        // With no fill of its own in flight, a process brings usage down to the low-water mark:
        // the cap's hysteresis (evict only once over `max_size`, then down to `low_water`) would
        // otherwise leave usage anywhere between the two after the last fill, and the headroom
        // for the next burst would depend on the order of the last commits.
        let idle = self.filling.get().is_none_or(|f| f().is_empty());
        if total <= max && !((draining || idle) && total > low) {
            // Done draining only once a fresh listing says so.
            if listed && total <= low {
                self.draining
                    .store(false, std::sync::atomic::Ordering::Relaxed);
            }
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
        let mut protected = self.protected().await;
        protected.extend(self.in_use());
        if let Some(c) = &cluster {
            match c.region_reading(&self.readers).await {
                Ok(reading) => protected.extend(reading),
                Err(e) => {
                    // Without the region's reads, nothing is safe to delete this time.
                    tracing::warn!(error = %e, "cluster: cannot read what the region reads; eviction waits");
                    return Ok(());
                }
            }
        }
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
            match self.evict(&d).await {
                Ok(()) => {
                    if cluster.is_some() {
                        self.draining
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                Err(e) => tracing::warn!(digest = %d, error = %e, "eviction failed"),
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
        // In a region, the others' fills count too: a pass (with its listing) runs often.
        let pass_every = match self.cluster.get() {
            Some(c) => {
                tokio::spawn(self.clone().publish_reads(c.clone()));
                LIST_EVERY
            }
            None => PASS_EVERY,
        };
        loop {
            // Woken for a pass when over the cap; otherwise every SAVE_EVERY, so the access
            // times are published on their own clock, not only after a pass.
            let woken = tokio::time::timeout(pass_every.min(SAVE_EVERY), self.wake.notified())
                .await
                .is_ok();
            if woken || last_pass.elapsed() >= pass_every {
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

/// The digest of a blob's data object (`docker/registry/v2/blobs/<alg>/<xx>/<hex>/data`).
fn blob_of(m: &object_store::ObjectMeta) -> Option<Digest> {
    let parts: Vec<&str> = m.location.as_ref().split('/').collect();
    if parts.len() != 8 || parts[7] != "data" {
        return None;
    }
    format!("{}:{}", parts[4], parts[6]).parse::<Digest>().ok()
}

fn chrono_cutoff(age: Duration) -> i64 {
    (now_secs().saturating_sub(age.as_secs())) as i64
}
