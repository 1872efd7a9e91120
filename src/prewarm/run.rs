//! The runner: each job in its own task, image after image, through the pull path; progress kept
//! in memory (for `GET /_ociedge/prewarm/<id>` and the status page) and written to the job's
//! record as it goes.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::job::{parse_image, Counts, Record, Spec};
use super::store::Store;
use crate::engine::set::Routed;
use crate::engine::storage::StorageEngine;
use crate::engine::{Engine, Manifest};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::oci::{manifest, media, Digest, Reference};
use crate::pull::Puller;
use crate::replicate::copy::Copier;

/// Jobs that transfer at the same time in one process.
const CONCURRENT_JOBS: usize = 2;
/// Unfinished jobs one process takes; beyond, a new one is refused (`429`) until some finish.
const MAX_UNFINISHED: usize = 256;
/// Finished jobs kept in memory for the status page (the store keeps them all).
const KEEP_FINISHED: usize = 20;
/// A running job's record is written at most this often between images.
const SAVE_EVERY: Duration = Duration::from_secs(2);
/// Tries of one item before its failure is recorded (only failures that may pass are retried).
const TRIES: u32 = 3;
/// While an upstream's quota is under the reserve, the job waits, checking this often…
const PAUSE_CHECK: Duration = Duration::from_secs(5);
/// …at most this long per image: the quota gauges only move with the upstream's answers, so a
/// job that never asks would otherwise wait on a stale reading for ever.
const PAUSE_MAX: Duration = Duration::from_secs(15 * 60);

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A job known to this process: its record as it progresses.
type Shared = Arc<Mutex<Record>>;

pub struct Prewarmer {
    puller: Arc<Puller>,
    copier: Copier,
    store: Store,
    /// The local engine as storage: pins are kept there, where eviction reads them.
    local: Arc<StorageEngine>,
    metrics: Metrics,
    jobs: Mutex<BTreeMap<String, Shared>>,
    running: Mutex<HashSet<String>>,
    /// Jobs that transfer at the same time; the others wait their turn.
    slots: tokio::sync::Semaphore,
}

/// Takes a job off the running set (and the gauge) however its task ends.
struct Running<'a> {
    p: &'a Prewarmer,
    id: String,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let n = {
            let mut r = lock(&self.p.running);
            r.remove(&self.id);
            r.len()
        };
        self.p.metrics.prewarm_running(n);
    }
}

impl Prewarmer {
    pub fn new(
        puller: Arc<Puller>,
        copier: Copier,
        store: Store,
        local: Arc<StorageEngine>,
        metrics: Metrics,
    ) -> Prewarmer {
        Prewarmer {
            puller,
            copier,
            store,
            local,
            metrics,
            jobs: Mutex::new(BTreeMap::new()),
            running: Mutex::new(HashSet::new()),
            slots: tokio::sync::Semaphore::new(CONCURRENT_JOBS),
        }
    }

    /// The pause point: whether the job may fetch from `upstream` now. False while the quota the
    /// upstream last announced for the credential in use is under its
    /// `upstreams[].ratelimit_reserve` (the same test that makes tag revalidation serve stale:
    /// [`crate::engine::set::Engines::quota_low`]); true when it announced none.
    pub fn may_fetch_from(&self, upstream: &str) -> bool {
        !self.puller.engines().quota_low(upstream)
    }

    /// Stores a new job and starts it; its id.
    pub async fn submit(self: &Arc<Self>, spec: Spec) -> Result<String> {
        let unfinished = lock(&self.jobs)
            .values()
            .filter(|j| !lock(j).finished)
            .count();
        if unfinished >= MAX_UNFINISHED {
            return Err(Error::client(
                crate::oci::ErrorCode::TooManyRequests,
                format!("{unfinished} prewarm jobs are unfinished; retry when some are done"),
            ));
        }
        let id = format!("{:032x}", rand::random::<u128>());
        let rec = Record::new(id.clone(), spec, now_secs());
        self.store.save(&rec).await?;
        self.remember(rec);
        let this = self.clone();
        let run_id = id.clone();
        tokio::spawn(async move {
            if let Err(e) = this.run(&run_id).await {
                tracing::warn!(job = %run_id, error = %e, "prewarm job stopped");
            }
        });
        Ok(id)
    }

    /// The job `id` with `spec`, stored if it is new (or asked something else before), else
    /// resumed as it was stored, with `spec`'s pin time (the CLI's jobs: a name made from what
    /// they ask, so running the same command again resumes it).
    pub async fn prepare(&self, id: &str, spec: Spec) -> Result<()> {
        let rec = match self.store.load(id).await? {
            Some(mut r) if r.spec.images == spec.images && r.spec.platforms == spec.platforms => {
                r.spec.replicate = spec.replicate;
                r.spec.pin_until = spec.pin_until;
                r
            }
            _ => Record::new(id.to_string(), spec, now_secs()),
        };
        self.store.save(&rec).await?;
        self.remember(rec);
        Ok(())
    }

    /// Resumes every unfinished job stored (at start; spawn it).
    pub async fn resume(self: Arc<Self>) {
        let ids = match self.store.ids().await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list prewarm jobs; none resumed");
                return;
            }
        };
        let mut finished = Vec::new();
        for id in ids {
            match self.store.load(&id).await {
                Ok(Some(r)) if r.finished => finished.push(r),
                Ok(Some(r)) => {
                    tracing::info!(job = %id, "resuming a prewarm job");
                    self.remember(r);
                    let this = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = this.run(&id).await {
                            tracing::warn!(job = %id, error = %e, "prewarm job stopped");
                        }
                    });
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(job = %id, error = %e, "cannot read a prewarm job"),
            }
        }
        finished.sort_by_key(|r| r.updated);
        for r in finished.into_iter().rev().take(KEEP_FINISHED) {
            self.remember(r);
        }
    }

    fn remember(&self, r: Record) {
        let mut jobs = lock(&self.jobs);
        if let Some(cur) = jobs.get(&r.id) {
            *lock(cur) = r;
        } else {
            jobs.insert(r.id.clone(), Arc::new(Mutex::new(r)));
        }
        let done: Vec<(u64, String)> = jobs
            .iter()
            .filter_map(|(id, j)| {
                let j = lock(j);
                j.finished.then(|| (j.updated, id.clone()))
            })
            .collect();
        if done.len() > KEEP_FINISHED {
            let mut done = done;
            done.sort();
            for (_, id) in done.iter().take(done.len() - KEEP_FINISHED) {
                jobs.remove(id);
            }
        }
    }

    /// The job's progress: as this process sees it, else as stored.
    pub async fn get(&self, id: &str) -> Result<Option<Record>> {
        let known = lock(&self.jobs).get(id).cloned();
        match known {
            Some(j) => Ok(Some(lock(&j).clone())),
            None => self.store.load(id).await,
        }
    }

    /// The jobs this process knows (running ones and the last finished), newest first.
    pub fn snapshot(&self) -> Vec<Record> {
        let mut out: Vec<Record> = lock(&self.jobs).values().map(|j| lock(j).clone()).collect();
        out.sort_by(|a, b| b.created.cmp(&a.created).then(b.id.cmp(&a.id)));
        out
    }

    /// Runs job `id` to its end and returns its final record. Content already present counts as
    /// done without a transfer, so a job run again (after a restart, or twice) is cheap. If the
    /// job already runs in this process, waits for that run instead.
    pub async fn run(&self, id: &str) -> Result<Record> {
        let first = {
            let mut r = lock(&self.running);
            let first = r.insert(id.to_string());
            self.metrics.prewarm_running(r.len());
            first
        };
        if !first {
            while lock(&self.running).contains(id) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            return self
                .get(id)
                .await?
                .ok_or_else(|| Error::transient("prewarm", "job record lost"));
        }
        let _running = Running {
            p: self,
            id: id.to_string(),
        };
        let known = lock(&self.jobs).get(id).cloned();
        let job: Shared = match known {
            Some(j) => j,
            None => {
                let r = self
                    .store
                    .load(id)
                    .await?
                    .ok_or_else(|| Error::transient("prewarm", format!("no job {id}")))?;
                self.remember(r);
                lock(&self.jobs)
                    .get(id)
                    .cloned()
                    .ok_or_else(|| Error::transient("prewarm", "job record lost"))?
            }
        };
        // Progress is counted afresh on each run: what is present counts as done.
        let (spec, snapshot) = {
            let mut r = lock(&job);
            let fresh = Record::new(r.id.clone(), r.spec.clone(), r.created);
            r.images = fresh.images;
            r.finished = false;
            r.runs += 1;
            r.updated = now_secs();
            (r.spec.clone(), r.clone())
        };
        self.store.save(&snapshot).await?;
        // What an earlier run pinned stays pinned while this one goes through the images again.
        let mut pins: Vec<Digest> = match spec.pin_until {
            Some(_) => crate::evict::pins::load(&self.local, id, now_secs())
                .await
                .unwrap_or_default(),
            None => Vec::new(),
        };
        // A few jobs at a time: each already runs its transfers one after another.
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| Error::transient("prewarm", "shutting down"))?;
        let mut last_save = Instant::now();
        for i in 0..spec.images.len() {
            self.image(&job, &spec, i, &mut pins, &mut last_save).await;
            let snapshot = {
                let mut r = lock(&job);
                if let Some(im) = r.images.get_mut(i) {
                    im.finished = true;
                }
                r.updated = now_secs();
                r.clone()
            };
            if let Err(e) = self.store.save(&snapshot).await {
                tracing::warn!(job = %id, error = %e, "cannot write the prewarm record");
            }
            last_save = Instant::now();
        }
        let done = {
            let mut r = lock(&job);
            r.finished = true;
            r.updated = now_secs();
            r.clone()
        };
        // The end is written or the job runs again after a restart (harmless: idempotent).
        self.store.save(&done).await?;
        self.remember(done.clone());
        tracing::info!(job = %id, state = done.state(), "prewarm job finished");
        Ok(done)
    }

    /// Writes the record if the last write is older than [`SAVE_EVERY`].
    async fn checkpoint(&self, job: &Shared, last_save: &mut Instant) {
        if last_save.elapsed() < SAVE_EVERY {
            return;
        }
        *last_save = Instant::now();
        let snapshot = {
            let mut r = lock(job);
            r.updated = now_secs();
            r.clone()
        };
        if let Err(e) = self.store.save(&snapshot).await {
            tracing::warn!(job = %snapshot.id, error = %e, "cannot write the prewarm record");
        }
    }

    /// Waits while `upstream`'s quota is under the reserve (at most [`PAUSE_MAX`]).
    async fn pause_for(&self, job: &Shared, routed: &Routed) {
        let Some(upstream) = self.puller.engines().upstream(routed) else {
            return;
        };
        let name = upstream.name.clone();
        let started = Instant::now();
        let mut said = false;
        while !self.may_fetch_from(&name) && started.elapsed() < PAUSE_MAX {
            if !said {
                tracing::info!(job = %lock(job).id, upstream = %name, "prewarm paused: the upstream's pull quota is under its reserve");
                said = true;
            }
            tokio::time::sleep(PAUSE_CHECK).await;
        }
    }

    /// One image: its manifests, then every blob into the local engine, then (with `replicate`)
    /// everything into every other storage engine. Failures are recorded, never returned.
    async fn image(
        &self,
        job: &Shared,
        spec: &Spec,
        i: usize,
        pins: &mut Vec<Digest>,
        last_save: &mut Instant,
    ) {
        let image_err = |e: String| {
            if let Some(im) = lock(job).images.get_mut(i) {
                im.error(e);
            }
        };
        let Some(image) = spec.images.get(i) else {
            return;
        };
        let (name, reference) = match parse_image(image) {
            Ok(x) => x,
            Err(e) => return image_err(e),
        };
        let engines = self.puller.engines().clone();
        let routed = match engines.route(&name, None) {
            Ok(r) => r,
            Err(e) => return image_err(e.to_string()),
        };
        let repo = routed.storage_repo.clone();
        if let Some(im) = lock(job).images.get_mut(i) {
            im.repository = Some(repo.to_string());
        }
        let accept: Vec<String> = media::MANIFEST_TYPES
            .iter()
            .map(|s| s.to_string())
            .collect();
        self.pause_for(job, &routed).await;
        let top = match retry(|| self.puller.manifest(&routed, &reference, &accept)).await {
            Ok(a) => a.manifest,
            Err(e) => return image_err(format!("{image}: {e}")),
        };
        if let Some(im) = lock(job).images.get_mut(i) {
            im.digest = Some(top.digest.to_string());
        }
        // The manifests to fetch: the image, or the index and its wanted children.
        let mut children: Vec<Manifest> = Vec::new();
        let parsed = match manifest::parse(&top.bytes, Some(&top.media_type)) {
            Ok(p) => p,
            Err(e) => return image_err(format!("{image}: {e}")),
        };
        for child in wanted_children(&top, &parsed, spec) {
            self.pause_for(job, &routed).await;
            let by = Reference::Digest(child.clone());
            match retry(|| self.puller.manifest(&routed, &by, &accept)).await {
                Ok(a) => children.push(a.manifest),
                Err(e) => image_err(format!("{image}: platform manifest {child}: {e}")),
            }
        }
        let mut blobs: Vec<Digest> = Vec::new();
        let image_manifests: Vec<&Manifest> = if parsed.manifests.is_empty() && children.is_empty()
        {
            vec![&top]
        } else {
            children.iter().collect()
        };
        for m in &image_manifests {
            match manifest::parse(&m.bytes, Some(&m.media_type)) {
                Ok(p) => {
                    for b in p.blobs {
                        if !blobs.contains(&b) {
                            blobs.push(b);
                        }
                    }
                }
                Err(e) => image_err(format!("{image}: manifest {}: {e}", m.digest)),
            }
        }
        let local_id = engines.local().id().to_string();
        {
            let mut r = lock(job);
            if let Some(im) = r.images.get_mut(i) {
                let c = im.engines.entry(local_id.clone()).or_default();
                c.blobs_total = blobs.len() as u64;
                c.manifests_done = 1 + children.len() as u64;
            }
        }
        // Pinned before the blobs are fetched: eviction never sees them unpinned.
        if let Some(until) = spec.pin_until {
            for d in std::iter::once(&top.digest)
                .chain(children.iter().map(|m| &m.digest))
                .chain(blobs.iter())
            {
                if !pins.contains(d) {
                    pins.push(d.clone());
                }
            }
            let id = lock(job).id.clone();
            if let Err(e) = crate::evict::pins::save(&self.local, &id, until, pins).await {
                image_err(format!("pins not written: {e}"));
            }
        }
        let update = |engine: &str, f: &dyn Fn(&mut Counts)| {
            if let Some(im) = lock(job).images.get_mut(i) {
                f(im.engines.entry(engine.to_string()).or_default());
            }
        };
        let mut sizes: std::collections::HashMap<&Digest, u64> = Default::default();
        for d in &blobs {
            match retry(|| self.puller.warm_blob(&routed, d)).await {
                Ok((size, fetched)) => {
                    sizes.insert(d, size);
                    let moved = if fetched { size } else { 0 };
                    self.metrics.prewarmed(&local_id, fetched, moved);
                    update(&local_id, &|c| {
                        c.blobs_done += 1;
                        c.bytes_done += size;
                        c.bytes_transferred += moved;
                    });
                }
                Err(e) => update(&local_id, &|c| c.error(format!("{d}: {e}"))),
            }
            self.checkpoint(job, last_save).await;
        }
        if !spec.replicate {
            return;
        }
        let src: Arc<dyn Engine> = engines.local().clone();
        let tag = match &reference {
            Reference::Tag(t) => Some(t.clone()),
            Reference::Digest(_) => None,
        };
        for dst in engines.storage().skip(1) {
            let eid = dst.id().to_string();
            update(&eid, &|c| c.blobs_total = blobs.len() as u64);
            for d in &blobs {
                match retry(|| self.copier.blob(&src, dst, &repo, d)).await {
                    Ok(copied) => {
                        // A blob already there was not read: its size is the local copy's.
                        let size = match copied.blobs {
                            0 => sizes.get(d).copied().unwrap_or(0),
                            _ => copied.bytes,
                        };
                        self.metrics.prewarmed(&eid, copied.blobs > 0, copied.bytes);
                        update(&eid, &|c| {
                            c.blobs_done += 1;
                            c.bytes_done += size;
                            c.bytes_transferred += copied.bytes;
                        });
                    }
                    Err(e) => update(&eid, &|c| c.error(format!("{d}: {e}"))),
                }
                self.checkpoint(job, last_save).await;
            }
            // Children before the index; with a platform list the index names children that
            // were not fetched, so it stays in the local engine alone.
            let mut tops: Vec<&Digest> = children.iter().map(|m| &m.digest).collect();
            let whole = parsed.manifests.is_empty() || spec.platforms.is_none();
            if whole {
                tops.push(&top.digest);
            }
            for d in tops {
                match retry(|| self.copier.manifest(&src, dst, &repo, d)).await {
                    Ok(_) => update(&eid, &|c| c.manifests_done += 1),
                    Err(e) => update(&eid, &|c| c.error(format!("manifest {d}: {e}"))),
                }
            }
            if let (Some(t), true) = (&tag, whole) {
                if let Err(e) = retry(|| self.copier.tag(&src, dst, &repo, t, &top.digest)).await {
                    update(&eid, &|c| c.error(format!("tag {t}: {e}")));
                }
            }
        }
    }
}

/// The children of an index the spec wants (by their descriptors' `platform`); none for an
/// image manifest.
fn wanted_children(top: &Manifest, parsed: &manifest::Parsed, spec: &Spec) -> Vec<Digest> {
    if parsed.manifests.is_empty() {
        return Vec::new();
    }
    if spec.platforms.is_none() {
        return parsed.manifests.clone();
    }
    let v: serde_json::Value = serde_json::from_slice(&top.bytes).unwrap_or_default();
    let mut out = Vec::new();
    for m in v["manifests"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let p = &m["platform"];
        let (Some(os), Some(arch)) = (p["os"].as_str(), p["architecture"].as_str()) else {
            continue;
        };
        if !spec.wants(os, arch, p["variant"].as_str()) {
            continue;
        }
        if let Some(d) = m["digest"].as_str().and_then(|d| d.parse::<Digest>().ok()) {
            if !out.contains(&d) {
                out.push(d);
            }
        }
    }
    out
}

/// `f` until it succeeds, [`TRIES`] times at most, again only after failures that may pass.
async fn retry<T, F, Fut>(mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match f().await {
            Ok(x) => return Ok(x),
            Err(e)
                if attempt < TRIES
                    && (e.is_transient() || matches!(e, Error::DigestMismatch { .. })) =>
            {
                tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
            }
            Err(e) => return Err(e),
        }
    }
}
