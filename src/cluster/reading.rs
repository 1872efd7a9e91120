//! Reads in flight, published for the region: one object per process,
//! `_ociedge/reading/<process>.json`, listing the digests its clients are reading from the shared
//! engine right now. It is written at once when the list changes and every [`super::REFRESH`]
//! while it is not empty; eviction in every process skips the digests of the lists still alive
//! (changing, on the reader's clock: [`super::DEAD`]), and ignores the others.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::ObjectStoreExt;
use serde::{Deserialize, Serialize};

use super::{now_secs, Cluster, Liveness};
use crate::error::{Error, Result};
use crate::oci::Digest;

const READING: &str = "_ociedge/reading";
/// A reading list is small; anything larger than this is skipped.
const MAX_LIST: u64 = 4 << 20;
/// A list not written for this long is a dead process's, and is removed.
const FORGET: u64 = 24 * 3600;

#[derive(Serialize, Deserialize)]
struct Reading {
    holder: String,
    addr: String,
    seq: u64,
    at: u64,
    digests: Vec<String>,
}

/// What this process knows of the others' reading lists.
#[derive(Default)]
pub struct Readers {
    liveness: Mutex<HashMap<String, Liveness>>,
}

impl Cluster {
    /// Publishes the digests this process is reading (`seq` moves at every publication).
    pub async fn publish_reading(&self, seq: u64, digests: &[Digest]) -> Result<()> {
        let r = Reading {
            holder: self.id.clone(),
            addr: self.advertise.clone(),
            seq,
            at: now_secs(),
            digests: digests.iter().map(|d| d.to_string()).collect(),
        };
        let body = Bytes::from(serde_json::to_vec(&r).unwrap_or_default());
        self.store()
            .put(
                &Path::from(format!("{READING}/{}.json", self.id)),
                body.into(),
            )
            .await
            .map(|_| ())
            .map_err(|e| Error::object_store("cluster", e))
    }

    /// The digests the other processes of the region are reading now (their live lists).
    pub async fn region_reading(&self, readers: &Readers) -> Result<HashSet<Digest>> {
        let list: Vec<object_store::ObjectMeta> = self
            .store()
            .list(Some(&Path::from(READING)))
            .try_collect()
            .await
            .map_err(|e| Error::object_store("cluster", e))?;
        let mut out = HashSet::new();
        let mut alive = HashSet::new();
        for m in list {
            if m.size > MAX_LIST || m.location.as_ref().ends_with(&format!("/{}.json", self.id)) {
                continue;
            }
            let bytes = match self.store().get(&m.location).await {
                Ok(r) => r
                    .bytes()
                    .await
                    .map_err(|e| Error::object_store("cluster", e))?,
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) => return Err(Error::object_store("cluster", e)),
            };
            let Ok(r) = serde_json::from_slice::<Reading>(&bytes) else {
                continue;
            };
            let age = now_secs().saturating_sub(r.at);
            if age > FORGET {
                // A process gone long ago (killed before it could remove its list).
                let _ = self.store().delete(&m.location).await;
                continue;
            }
            if age < 60 {
                self.saw(&r.holder, &r.addr);
            }
            alive.insert(r.holder.clone());
            let live = readers
                .liveness
                .lock()
                .map(|mut l| {
                    l.entry(r.holder.clone())
                        .or_default()
                        .live(r.seq.to_string(), r.at)
                })
                .unwrap_or(true);
            if !live {
                continue;
            }
            out.extend(r.digests.iter().filter_map(|d| d.parse::<Digest>().ok()));
        }
        if let Ok(mut l) = readers.liveness.lock() {
            l.retain(|k, _| alive.contains(k));
        }
        Ok(out)
    }
}
