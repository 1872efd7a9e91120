//! The replication worker: for each target engine, runs the queued jobs (oldest first), retries
//! failures with backoff, moves jobs that can never succeed to the dead-letter prefix, and
//! reports the backlog. Jobs are idempotent and copy the source's state when they run, so a job
//! interrupted by a kill simply runs again after the restart, and a retried job cannot undo a
//! newer one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Notify;
use tracing::Instrument;

use super::copy::{Copied, Copier};
use super::queue::{Queue, Queued};
use super::task::{Job, Parsed};
use crate::engine::Engine;
use crate::engine::EngineExt;
use crate::error::{EngineError, Error, Result};
use crate::metrics::Metrics;
use crate::oci::{Digest, RepoName};

/// How often queues are re-read when nothing woke the worker (jobs queued by other processes).
const POLL: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The backlog of one target.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Backlog {
    pub jobs: usize,
    pub oldest_age_seconds: f64,
    pub failing: usize,
    pub last_error: Option<String>,
}

pub struct Replicator {
    pub queue: Queue,
    /// Per-repository rules: (glob, targets); the first match wins.
    rules: Vec<(String, Vec<String>)>,
    /// Targets of repositories no rule matches.
    defaults: Vec<String>,
    source: Arc<dyn Engine>,
    targets: Vec<(String, Arc<dyn Engine>)>,
    copier: Copier,
    wake: Notify,
    metrics: Metrics,
    backlog: Mutex<HashMap<String, Backlog>>,
}

impl Replicator {
    /// `targets` are every engine any job may go to; `defaults` those of repositories that no
    /// rule matches.
    pub fn new(
        queue: Queue,
        source: Arc<dyn Engine>,
        targets: Vec<(String, Arc<dyn Engine>)>,
        defaults: Vec<String>,
        rules: Vec<(String, Vec<String>)>,
        copier: Copier,
        metrics: Metrics,
    ) -> Replicator {
        Replicator {
            queue,
            rules,
            defaults,
            source,
            targets,
            copier,
            wake: Notify::new(),
            metrics,
            backlog: Mutex::new(HashMap::new()),
        }
    }

    /// The replication locations of a repository.
    pub fn targets_for(&self, repo: &str) -> Vec<String> {
        match self
            .rules
            .iter()
            .find(|(g, _)| super::backfill::glob_match(g, repo))
        {
            Some((_, to)) => to.clone(),
            None => self.defaults.clone(),
        }
    }

    pub fn target_ids(&self) -> Vec<String> {
        self.targets.iter().map(|(id, _)| id.clone()).collect()
    }

    /// Queues `job` for every target (durably), then wakes the workers.
    pub async fn enqueue(&self, job: Job) -> Result<()> {
        let targets = self.targets_for(job.repo());
        if targets.is_empty() {
            return Ok(());
        }
        self.queue.enqueue(&job, &targets).await?;
        self.wake.notify_waiters();
        Ok(())
    }

    pub fn backlog(&self) -> HashMap<String, Backlog> {
        self.backlog.lock().map(|b| b.clone()).unwrap_or_default()
    }

    /// Runs one worker per target, forever (spawn it).
    pub async fn run(self: Arc<Self>) {
        let workers = self.targets.clone().into_iter().map(|(id, engine)| {
            let me = self.clone();
            tokio::spawn(async move { me.work(id, engine).await })
        });
        futures::future::join_all(workers).await;
    }

    async fn work(&self, target: String, engine: Arc<dyn Engine>) {
        // Per-job retry state: attempts and when the next try is due.
        let mut retry: HashMap<String, (u32, Instant)> = HashMap::new();
        loop {
            let woken = self.wake.notified();
            let pending = match self.queue.pending(&target).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(target = %target, error = %e, "cannot read the replication queue");
                    Vec::new()
                }
            };
            self.report(&target, &pending, &retry, None);
            let mut last_error = None;
            for q in &pending {
                let key = q.path.to_string();
                if retry.get(&key).is_some_and(|(_, at)| Instant::now() < *at) {
                    continue;
                }
                let span = tracing::info_span!("replicate", target = %target, kind = q.job.kind());
                match self.execute(&engine, &q.job).instrument(span).await {
                    Err(Failure::Dead(reason)) => {
                        retry.remove(&key);
                        if let Err(e) = self.queue.dead(&target, q, &reason).await {
                            tracing::warn!(target = %target, error = %e, "cannot move a dead job aside; it will be tried again");
                        }
                    }
                    Ok(c) => {
                        retry.remove(&key);
                        self.metrics.replicated(&target, c.bytes);
                        if let Err(e) = self.queue.done(q).await {
                            tracing::warn!(target = %target, error = %e, "job done but not removed; it will run again");
                        }
                    }
                    Err(Failure::Retry(e)) => {
                        let attempts = retry.get(&key).map_or(1, |(a, _)| a + 1);
                        let backoff =
                            Duration::from_millis(200u64.saturating_mul(1 << attempts.min(8)))
                                .min(MAX_BACKOFF);
                        tracing::warn!(target = %target, job = ?q.job, attempts, error = %e, "replication job failed; will retry");
                        self.metrics.replication_failure(&target);
                        retry.insert(key, (attempts, Instant::now() + backoff));
                        last_error = Some(e.to_string());
                    }
                }
            }
            let left = self.queue.pending(&target).await.unwrap_or_default();
            retry.retain(|k, _| left.iter().any(|q| q.path.as_ref() == k));
            self.report(&target, &left, &retry, last_error);
            if left.is_empty() || left.iter().all(|q| retry.contains_key(q.path.as_ref())) {
                let _ = tokio::time::timeout(POLL, woken).await;
            }
        }
    }

    fn report(
        &self,
        target: &str,
        pending: &[Queued],
        retry: &HashMap<String, (u32, Instant)>,
        last_error: Option<String>,
    ) {
        let oldest = pending
            .iter()
            .map(|q| {
                SystemTime::now()
                    .duration_since(q.queued_at)
                    .unwrap_or_default()
                    .as_secs_f64()
            })
            .fold(0.0, f64::max);
        self.metrics
            .replication_backlog(target, pending.len(), oldest);
        if let Ok(mut b) = self.backlog.lock() {
            let entry = b.entry(target.to_string()).or_default();
            entry.jobs = pending.len();
            entry.oldest_age_seconds = oldest;
            entry.failing = retry.len();
            if last_error.is_some() || pending.is_empty() {
                entry.last_error = last_error;
            }
        }
    }

    /// Makes `target` match the source's current state of the item `job` names.
    async fn execute(&self, target: &Arc<dyn Engine>, job: &Job) -> Result<Copied, Failure> {
        let parsed = job
            .parse()
            .ok_or_else(|| Failure::Dead("a name, tag or digest does not validate".into()))?;
        let src = &self.source;
        match parsed {
            Parsed::Blob(repo, d) => {
                if !src.links(&repo, &d, false).await? {
                    return self.gone(&repo, &d, "blob").await;
                }
                Ok(self.copier.blob(src, target, &repo, &d).await?)
            }
            Parsed::Manifest(repo, d) => {
                if !src.links(&repo, &d, true).await? {
                    return self.gone(&repo, &d, "manifest").await;
                }
                Ok(self.copier.manifest(src, target, &repo, &d).await?)
            }
            // A tag job copies the tag's value at the source now, not the one it was queued
            // with: an older job run after a newer one (retried) cannot move the tag back.
            Parsed::Tag(repo, tag, _) | Parsed::Untag(repo, tag) => {
                match src.tag_link(&repo, &tag).await? {
                    Some(now) => Ok(self
                        .copier
                        .tag(src, target, &repo, &tag, &now.digest)
                        .await?),
                    None => {
                        target.delete_tag(&repo, &tag).await?;
                        Ok(Copied::default())
                    }
                }
            }
            // A delete removes only what the source no longer has: pushed again since, it stays.
            Parsed::DeleteManifest(repo, d) => {
                if !src.links(&repo, &d, true).await? {
                    target.delete_manifest(&repo, &d).await?;
                }
                Ok(Copied::default())
            }
            Parsed::DeleteBlob(repo, d) => {
                if !src.links(&repo, &d, false).await? {
                    target.delete_blob(&repo, &d).await?;
                }
                Ok(Copied::default())
            }
        }
    }

    /// A blob or manifest job whose item the source no longer links: deleted since (its delete
    /// job follows; nothing to copy), or never there at all (the job can never succeed).
    async fn gone(&self, repo: &RepoName, d: &Digest, what: &str) -> Result<Copied, Failure> {
        if self.source.stat_blob(repo, d).await?.is_some() {
            return Ok(Copied::default());
        }
        Err(Failure::Dead(format!(
            "{what} {d} of {repo} does not exist in the source {}",
            self.source.id()
        )))
    }
}

/// Why a job did not finish.
#[derive(Debug)]
enum Failure {
    /// A failure that may pass (a transient engine failure, local I/O, bytes that did not match:
    /// a read cut short looks the same): the job is retried with backoff.
    Retry(Error),
    /// The job can never succeed (names that do not validate, content the source does not
    /// have, a manifest that does not parse, an engine's permanent failure or refusal, a
    /// conditional write that lost): it is moved to the dead-letter prefix.
    Dead(String),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        match e {
            // Decided, not broken: content absent from the source, a manifest (verified against
            // its digest) that does not parse. No retry changes them.
            Error::Client(e) => Failure::Dead(e.message),
            Error::Engine { ref error, .. } => match error {
                EngineError::Transient(_)
                | EngineError::RateLimited(_)
                | EngineError::Backoff(_) => Failure::Retry(e),
                // A create that found the object there: the next run's check sees it done.
                EngineError::AlreadyExists => Failure::Retry(e),
                EngineError::NotFound
                | EngineError::Precondition
                | EngineError::Unsupported(_)
                | EngineError::RangeInvalid(_)
                | EngineError::Denied(_)
                | EngineError::Permanent(_) => Failure::Dead(e.to_string()),
            },
            Error::Config(m) => Failure::Dead(m),
            e @ (Error::Io(_) | Error::DigestMismatch { .. }) => Failure::Retry(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::engine::storage::StorageEngine;
    use crate::engine::{BlobHit, Change, EngineKind, Lookup, Manifest, ManifestMeta};
    use crate::oci::Reference;

    /// A target whose blob writes fail with `fail` the first `failures` times, then go to
    /// `inner`.
    #[derive(Debug)]
    struct Failing {
        id: &'static str,
        inner: Arc<StorageEngine>,
        fail: fn() -> EngineError,
        failures: u32,
        tries: AtomicU32,
    }

    #[async_trait::async_trait]
    impl Engine for Failing {
        fn id(&self) -> &str {
            self.id
        }
        fn kind(&self) -> EngineKind {
            EngineKind::Storage
        }
        async fn open_blob(
            &self,
            repo: &RepoName,
            d: &Digest,
            want: Lookup,
        ) -> Result<Option<BlobHit>> {
            self.inner.open_blob(repo, d, want).await
        }
        async fn get_manifest(
            &self,
            repo: &RepoName,
            r: &Reference,
            a: &[String],
        ) -> Result<Option<Manifest>> {
            self.inner.get_manifest(repo, r, a).await
        }
        async fn head_manifest(
            &self,
            repo: &RepoName,
            r: &Reference,
            a: &[String],
        ) -> Result<Option<ManifestMeta>> {
            self.inner.head_manifest(repo, r, a).await
        }
        async fn list_tags(&self, repo: &RepoName) -> Result<Option<Vec<String>>> {
            self.inner.list_tags(repo).await
        }
        async fn put_blob_file(&self, d: &Digest, file: &std::path::Path, size: u64) -> Result<()> {
            if self.tries.fetch_add(1, Ordering::SeqCst) < self.failures {
                return Err(Error::engine(self.id, (self.fail)()));
            }
            self.inner.put_blob_file(d, file, size).await
        }
        async fn update(&self, repo: &RepoName, change: &Change) -> Result<bool> {
            self.inner.update(repo, change).await
        }
        async fn probe(&self) -> Result<()> {
            Ok(())
        }
    }

    fn memory(id: &str) -> Arc<StorageEngine> {
        Arc::new(StorageEngine::open(id, "memory://", &Default::default()).unwrap())
    }

    /// Polls `cond` until it holds or `deadline` passes.
    async fn until<F, Fut>(deadline: Duration, mut cond: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let end = Instant::now() + deadline;
        while Instant::now() < end {
            if cond().await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    #[tokio::test]
    async fn transient_failures_are_retried_permanent_ones_dead_lettered_existing_objects_done() {
        let dir = tempfile::tempdir().unwrap();
        let source = memory("src");
        let repo: RepoName = "team/app".parse().unwrap();
        let data = b"layer bytes".to_vec();
        let digest = Digest::sha256_of(&data);
        let file = dir.path().join("blob");
        std::fs::write(&file, &data).unwrap();
        source
            .put_blob_file(&digest, &file, data.len() as u64)
            .await
            .unwrap();
        source.link_blob(&repo, &digest).await.unwrap();

        let flaky = Arc::new(Failing {
            id: "flaky",
            inner: memory("flaky"),
            fail: || EngineError::transient("503 from the bucket"),
            failures: 2,
            tries: AtomicU32::new(0),
        });
        let broken = Arc::new(Failing {
            id: "broken",
            inner: memory("broken"),
            fail: || EngineError::permanent("the bucket refuses this object"),
            failures: u32::MAX,
            tries: AtomicU32::new(0),
        });
        // A blob write that finds the blob there (written by another process since the check):
        // an idempotent write, done.
        let there = Arc::new(Failing {
            id: "there",
            inner: memory("there"),
            fail: || EngineError::AlreadyExists,
            failures: u32::MAX,
            tries: AtomicU32::new(0),
        });
        let metrics = Metrics::new();
        let queue = Queue::new(source.clone()).with_metrics(metrics.clone());
        let targets: Vec<(String, Arc<dyn Engine>)> = vec![
            ("flaky".into(), flaky.clone()),
            ("broken".into(), broken.clone()),
            ("there".into(), there.clone()),
        ];
        let replicator = Arc::new(Replicator::new(
            queue,
            source.clone(),
            targets,
            vec!["flaky".into(), "broken".into(), "there".into()],
            Vec::new(),
            Copier {
                spool_dir: dir.path().join("spool"),
            },
            metrics,
        ));
        replicator
            .enqueue(Job::Blob {
                repo: repo.to_string(),
                digest: digest.to_string(),
            })
            .await
            .unwrap();
        let worker = tokio::spawn(replicator.clone().run());

        // The transient failure: tried again (with backoff) until the blob is there.
        let copied = until(Duration::from_secs(20), || async {
            flaky
                .inner
                .stat_blob(&repo, &digest)
                .await
                .ok()
                .flatten()
                .is_some()
                && replicator.queue.pending("flaky").await.unwrap().is_empty()
        })
        .await;
        assert!(copied, "the transient failure was not retried to success");
        assert_eq!(flaky.tries.load(Ordering::SeqCst), 3);
        assert_eq!(replicator.queue.dead_letters("flaky").await.unwrap(), 0);

        // The permanent failure: moved to the dead letters after one try, never retried.
        let dead = until(Duration::from_secs(20), || async {
            replicator.queue.dead_letters("broken").await.unwrap() == 1
                && replicator.queue.pending("broken").await.unwrap().is_empty()
        })
        .await;
        assert!(dead, "the permanent failure was not dead-lettered");
        assert_eq!(broken.tries.load(Ordering::SeqCst), 1);

        let done = until(Duration::from_secs(20), || async {
            replicator.queue.pending("there").await.unwrap().is_empty()
        })
        .await;
        assert!(
            done,
            "an idempotent write that found its object was not success"
        );
        assert_eq!(there.tries.load(Ordering::SeqCst), 1);
        assert_eq!(replicator.queue.dead_letters("there").await.unwrap(), 0);
        worker.abort();
    }
}
