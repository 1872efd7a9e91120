//! The in-memory index of the local engine: size, last access and provenance of every blob, and
//! which manifests reference which blobs (so evicting a blob takes the manifests and tags that
//! need it along). Rebuilt on start from a listing plus the last-access sidecars.

use std::collections::{HashMap, HashSet};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::oci::{Digest, RepoName};

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    pub size: u64,
    /// Unix seconds of the last read or write.
    pub last_access: u64,
    /// Content that another engine also holds (a fill, a replica): may be evicted. Pushed
    /// content whose only copy may be here is not.
    pub cached: bool,
    /// The order of accesses within this process: `last_access` has a one-second grain, and
    /// blobs read in the same second are still evicted least recent first. Not stored (after a
    /// restart, ties within a second go by digest).
    #[serde(skip)]
    pub seq: u64,
}

#[derive(Default)]
pub struct Index {
    pub entries: HashMap<Digest, Entry>,
    pub total: u64,
    /// blob or child manifest → the manifests that reference it.
    pub parents: HashMap<Digest, HashSet<Digest>>,
    /// manifest → the repositories it is linked in.
    pub repos: HashMap<Digest, HashSet<RepoName>>,
    /// Set when something changed since the sidecar was written.
    pub dirty: bool,
    /// The last `Entry::seq` given.
    seq: u64,
}

impl Index {
    /// Records an access (and the entry, if new).
    pub fn touch(&mut self, d: &Digest, size: u64, cached: Option<bool>) {
        let now = now_secs();
        self.seq += 1;
        let seq = self.seq;
        match self.entries.get_mut(d) {
            Some(e) => {
                e.last_access = now;
                e.seq = seq;
                if let Some(c) = cached {
                    e.cached = c;
                }
            }
            None => {
                self.entries.insert(
                    d.clone(),
                    Entry {
                        size,
                        last_access: now,
                        cached: cached.unwrap_or(false),
                        seq,
                    },
                );
                self.total += size;
            }
        }
        self.dirty = true;
    }

    /// Records a manifest's references and a repository it is linked in.
    pub fn link_manifest(
        &mut self,
        manifest: &Digest,
        repo: &RepoName,
        children: impl IntoIterator<Item = Digest>,
    ) {
        for c in children {
            self.parents.entry(c).or_default().insert(manifest.clone());
        }
        self.repos
            .entry(manifest.clone())
            .or_default()
            .insert(repo.clone());
    }

    pub fn remove(&mut self, d: &Digest) -> Option<Entry> {
        let e = self.entries.remove(d)?;
        self.total = self.total.saturating_sub(e.size);
        self.dirty = true;
        Some(e)
    }

    /// Least recently used first.
    pub fn lru_order(&self) -> Vec<(Digest, Entry)> {
        let mut v: Vec<(Digest, Entry)> =
            self.entries.iter().map(|(d, e)| (d.clone(), *e)).collect();
        v.sort_by_key(|(d, e)| (e.last_access, e.seq, d.clone()));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_and_order() {
        let mut i = Index::default();
        let a = Digest::sha256_of(b"a");
        let b = Digest::sha256_of(b"b");
        i.touch(&a, 10, Some(true));
        i.touch(&b, 5, Some(true));
        i.touch(&a, 10, None);
        assert_eq!(i.total, 15);
        i.entries.get_mut(&b).unwrap().last_access = 1;
        assert_eq!(i.lru_order()[0].0, b);
        i.remove(&b);
        assert_eq!(i.total, 10);
    }

    #[test]
    fn within_one_second_the_order_of_accesses_decides() {
        let mut i = Index::default();
        let d: Vec<Digest> = (0..4u8).map(|n| Digest::sha256_of(&[n])).collect();
        for x in &d {
            i.touch(x, 1, Some(true));
        }
        i.touch(&d[0], 1, None);
        // Same second (pinned here), whatever the digests' order.
        for e in i.entries.values_mut() {
            e.last_access = 7;
        }
        let order: Vec<Digest> = i.lru_order().into_iter().map(|(d, _)| d).collect();
        assert_eq!(
            order,
            vec![d[1].clone(), d[2].clone(), d[3].clone(), d[0].clone()]
        );
    }
}
