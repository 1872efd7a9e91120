//! The durable replication queue: one small JSON object per (job, target) in the preferred
//! engine, under `_ociedge/replication/<target>/`. It survives a kill -9 of any process, needs no
//! server of its own, and is shared by every process that pushes to the same engine (jobs are
//! idempotent, so two workers running one job is harmless).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use object_store::path::Path;

use super::task::Job;
use crate::engine::storage::StorageEngine;
use crate::error::Result;

const ROOT: &str = "_ociedge/replication";
/// Jobs that can never succeed, moved aside (kept for an operator to read; never run again).
pub const DEAD: &str = "_ociedge/replication-dead";
/// A job record is a few hundred bytes; a larger one is not ours and is not read.
const MAX_RECORD: u64 = 64 << 10;

/// A queued job: where its record lives, and when it was queued.
#[derive(Clone, Debug)]
pub struct Queued {
    pub path: Path,
    pub job: Job,
    pub queued_at: SystemTime,
}

#[derive(Debug)]
pub struct Queue {
    engine: Arc<StorageEngine>,
    /// Counts the jobs moved aside, when set.
    metrics: Option<crate::metrics::Metrics>,
}

impl Queue {
    pub fn new(engine: Arc<StorageEngine>) -> Queue {
        Queue {
            engine,
            metrics: None,
        }
    }

    /// Counts dead letters in `metrics`.
    pub fn with_metrics(mut self, metrics: crate::metrics::Metrics) -> Queue {
        self.metrics = Some(metrics);
        self
    }

    /// Records `job` for each target; returns once every record is durable.
    pub async fn enqueue(&self, job: &Job, targets: &[String]) -> Result<()> {
        let body = Bytes::from(serde_json::to_vec(job).unwrap_or_default());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        for t in targets {
            // Time-ordered names: listing returns jobs in the order they were queued.
            let name = format!("{ROOT}/{t}/{now:024}-{:016x}.json", rand::random::<u64>());
            self.engine
                .put_object(&Path::from(name), body.clone())
                .await?;
        }
        Ok(())
    }

    /// The jobs waiting for `target`, oldest first. Records that do not parse or validate are
    /// moved to the dead-letter prefix (logged, counted).
    pub async fn pending(&self, target: &str) -> Result<Vec<Queued>> {
        let mut out = Vec::new();
        for (path, size) in self
            .engine
            .list_objects(&Path::from(format!("{ROOT}/{target}")))
            .await?
        {
            if size > MAX_RECORD {
                self.bury(target, &path, b"", &format!("a record of {size} bytes"))
                    .await?;
                continue;
            }
            let Some(bytes) = self.engine.get_object(&path).await? else {
                continue;
            };
            match serde_json::from_slice::<Job>(&bytes) {
                // Validated like a request: the record lives in a bucket other programs write.
                Ok(job) if job.parse().is_none() => {
                    self.bury(
                        target,
                        &path,
                        &bytes,
                        "a name, tag or digest does not validate",
                    )
                    .await?;
                }
                Ok(job) => {
                    let nanos: u128 = path
                        .filename()
                        .and_then(|f| f.split('-').next())
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                    let queued_at =
                        UNIX_EPOCH + Duration::from_nanos(u64::try_from(nanos).unwrap_or(0));
                    out.push(Queued {
                        path,
                        job,
                        queued_at,
                    });
                }
                Err(e) => {
                    self.bury(target, &path, &bytes, &format!("unreadable: {e}"))
                        .await?;
                }
            }
        }
        Ok(out)
    }

    /// Moves a job record that can never succeed to the dead-letter prefix, with the reason.
    pub async fn dead(&self, target: &str, q: &Queued, reason: &str) -> Result<()> {
        let body = serde_json::to_vec(&q.job).unwrap_or_default();
        self.bury(target, &q.path, &body, reason).await
    }

    async fn bury(&self, target: &str, path: &Path, record: &[u8], reason: &str) -> Result<()> {
        tracing::error!(target = %target, path = %path, reason, "replication job can never succeed; moved to {DEAD}");
        if let Some(m) = &self.metrics {
            m.replication_dead_letter(target);
        }
        let name = path.filename().unwrap_or("job.json");
        let body = serde_json::json!({
            "record": String::from_utf8_lossy(record),
            "reason": reason,
        });
        self.engine
            .put_object(
                &Path::from(format!("{DEAD}/{target}/{name}")),
                Bytes::from(body.to_string()),
            )
            .await?;
        self.engine.delete_object(path).await
    }

    /// The records moved aside for `target`.
    pub async fn dead_letters(&self, target: &str) -> Result<usize> {
        Ok(self
            .engine
            .list_objects(&Path::from(format!("{DEAD}/{target}")))
            .await?
            .len())
    }

    /// Removes a finished job.
    pub async fn done(&self, q: &Queued) -> Result<()> {
        self.engine.delete_object(&q.path).await
    }
}
