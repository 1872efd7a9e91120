//! Durable job records: one JSON object per job under `_ociedge/prewarm/` in the preferred
//! engine (the local one when pushes go nowhere), as replication jobs are kept. A record is
//! rewritten as the job progresses; a process resumes every unfinished one at start.

use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path;
use object_store::ObjectStoreExt;

use super::job::Record;
use crate::engine::storage::StorageEngine;
use crate::error::Result;

const ROOT: &str = "_ociedge/prewarm";
/// A record is a few KiB per image; a larger one is not ours and is not read.
const MAX_RECORD: u64 = 16 << 20;

/// Whether `id` may name a record (ours are 32 hex digits; the CLI's `cli-` and 32 hex).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[derive(Clone, Debug)]
pub struct Store {
    engine: Arc<StorageEngine>,
}

impl Store {
    pub fn new(engine: Arc<StorageEngine>) -> Store {
        Store { engine }
    }

    fn path(id: &str) -> Path {
        Path::from(format!("{ROOT}/{id}.json"))
    }

    /// Writes `r` (replacing what was there).
    pub async fn save(&self, r: &Record) -> Result<()> {
        let body = serde_json::to_vec(r).unwrap_or_default();
        self.engine
            .put_object(&Self::path(&r.id), Bytes::from(body))
            .await
    }

    /// The record of `id`, if there is one that reads.
    pub async fn load(&self, id: &str) -> Result<Option<Record>> {
        if !valid_id(id) {
            return Ok(None);
        }
        let path = Self::path(id);
        let size = match self.engine.store().head(&path).await {
            Ok(m) => m.size,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(crate::error::Error::object_store("prewarm", e)),
        };
        if size > MAX_RECORD {
            tracing::warn!(%path, size, "prewarm record too large; ignored");
            return Ok(None);
        }
        let Some(bytes) = self.engine.get_object(&path).await? else {
            return Ok(None);
        };
        match serde_json::from_slice::<Record>(&bytes) {
            Ok(r) if r.id == id => Ok(Some(r)),
            Ok(_) | Err(_) => {
                tracing::warn!(%path, "unreadable prewarm record; ignored");
                Ok(None)
            }
        }
    }

    /// The ids of every stored record.
    pub async fn ids(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for (p, _) in self.engine.list_objects(&Path::from(ROOT)).await? {
            if let Some(id) = p.filename().and_then(|f| f.strip_suffix(".json")) {
                if valid_id(id) {
                    out.push(id.to_string());
                }
            }
        }
        Ok(out)
    }
}
