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
}

impl Queue {
    pub fn new(engine: Arc<StorageEngine>) -> Queue {
        Queue { engine }
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

    /// The jobs waiting for `target`, oldest first. Unreadable records are dropped (logged).
    pub async fn pending(&self, target: &str) -> Result<Vec<Queued>> {
        let mut out = Vec::new();
        for (path, _) in self
            .engine
            .list_objects(&Path::from(format!("{ROOT}/{target}")))
            .await?
        {
            let Some(bytes) = self.engine.get_object(&path).await? else {
                continue;
            };
            match serde_json::from_slice::<Job>(&bytes) {
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
                    tracing::error!(path = %path, error = %e, "dropping an unreadable replication job");
                    self.engine.delete_object(&path).await?;
                }
            }
        }
        Ok(out)
    }

    /// Removes a finished job.
    pub async fn done(&self, q: &Queued) -> Result<()> {
        self.engine.delete_object(&q.path).await
    }
}
