//! Durable pins: digests eviction keeps until a time, whatever their last access. One small JSON
//! object per pin set (a prewarm job pins what it fetched) under `_ociedge/pins/` in the local
//! engine, beside the access times of `_ociedge/lru/`, so a restart and every process sharing
//! the engine see them. Expired sets are removed by the eviction pass that finds them.

use std::collections::HashSet;

use bytes::Bytes;
use object_store::path::Path;
use serde::{Deserialize, Serialize};

use crate::engine::storage::StorageEngine;
use crate::error::Result;
use crate::oci::Digest;

const PINS: &str = "_ociedge/pins";
/// A pin set larger than this is not ours and is not read (a digest is ~75 bytes: 50 000 of
/// them fit).
const MAX_RECORD: u64 = 4 << 20;

#[derive(Serialize, Deserialize)]
struct PinSet {
    /// Unix seconds.
    until: u64,
    digests: Vec<String>,
}

/// The object a pin set named `name` (a job id: `[0-9a-z-]`) is stored under.
fn path(name: &str) -> Path {
    Path::from(format!("{PINS}/{name}.json"))
}

/// Records that `digests` stay until `until` (unix seconds), replacing the set `name` had.
pub async fn save(
    engine: &StorageEngine,
    name: &str,
    until: u64,
    digests: &[Digest],
) -> Result<()> {
    let set = PinSet {
        until,
        digests: digests.iter().map(|d| d.to_string()).collect(),
    };
    let body = serde_json::to_vec(&set).unwrap_or_default();
    engine.put_object(&path(name), Bytes::from(body)).await
}

/// The digests of the set `name` while it holds (empty when it does not exist, has expired or
/// does not read): a job run again adds to what its first run pinned.
pub async fn load(engine: &StorageEngine, name: &str, now: u64) -> Result<Vec<Digest>> {
    let Some(bytes) = engine.get_object(&path(name)).await? else {
        return Ok(Vec::new());
    };
    if bytes.len() as u64 > MAX_RECORD {
        return Ok(Vec::new());
    }
    Ok(match serde_json::from_slice::<PinSet>(&bytes) {
        Ok(set) if set.until > now => set
            .digests
            .iter()
            .filter_map(|d| d.parse::<Digest>().ok())
            .collect(),
        _ => Vec::new(),
    })
}

/// Every digest pinned now (sets whose time has passed are deleted). A set that cannot be read
/// pins nothing and is logged; a listing that fails is an error (the pass then keeps
/// everything: nothing is evicted on an unknown pin state).
pub async fn active(engine: &StorageEngine, now: u64) -> Result<HashSet<Digest>> {
    let mut out = HashSet::new();
    for (p, size) in engine.list_objects(&Path::from(PINS)).await? {
        if size > MAX_RECORD {
            tracing::warn!(path = %p, size, "pin set too large; ignored");
            continue;
        }
        let Some(bytes) = engine.get_object(&p).await? else {
            continue;
        };
        let Ok(set) = serde_json::from_slice::<PinSet>(&bytes) else {
            tracing::warn!(path = %p, "unreadable pin set; ignored");
            continue;
        };
        if set.until <= now {
            if let Err(e) = engine.delete_object(&p).await {
                tracing::warn!(path = %p, error = %e, "cannot remove an expired pin set");
            }
            continue;
        }
        out.extend(set.digests.iter().filter_map(|d| d.parse::<Digest>().ok()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pins_expire() {
        let dir = tempfile::tempdir().unwrap();
        let e = StorageEngine::open(
            "f",
            &format!("file://{}", dir.path().display()),
            &Default::default(),
        )
        .unwrap();
        let a = Digest::sha256_of(b"a");
        let b = Digest::sha256_of(b"b");
        save(&e, "job-1", 100, std::slice::from_ref(&a))
            .await
            .unwrap();
        save(&e, "job-2", 50, std::slice::from_ref(&b))
            .await
            .unwrap();
        assert_eq!(load(&e, "job-1", 60).await.unwrap(), vec![a.clone()]);
        assert!(load(&e, "job-2", 60).await.unwrap().is_empty(), "expired");
        assert!(load(&e, "job-3", 60).await.unwrap().is_empty(), "absent");
        let now = active(&e, 60).await.unwrap();
        assert!(now.contains(&a) && !now.contains(&b));
        // The expired set is gone for good.
        assert!(!active(&e, 10).await.unwrap().contains(&b));
        assert!(active(&e, 100).await.unwrap().is_empty());
    }
}
