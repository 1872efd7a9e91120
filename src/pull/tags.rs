//! The tag cache: tag → digest answers from the authority, trusted for `tag_ttl`, kept (as a
//! fallback while the authority is down) up to `max_stale`.

use std::time::{Duration, Instant};

use moka::future::Cache;

use crate::oci::{Digest, RepoName, Tag};

#[derive(Clone, Debug)]
pub struct TagEntry {
    pub digest: Digest,
    pub media_type: String,
    pub fetched: Instant,
}

#[derive(Clone)]
pub struct TagCache {
    entries: Cache<(RepoName, Tag), TagEntry>,
    ttl: Duration,
    max_stale: Duration,
}

impl TagCache {
    pub fn new(ttl: Duration, max_stale: Duration) -> TagCache {
        let keep = ttl.max(max_stale).max(Duration::from_secs(1));
        TagCache {
            entries: Cache::builder()
                .max_capacity(200_000)
                .time_to_live(keep)
                .build(),
            ttl,
            max_stale,
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn max_stale(&self) -> Duration {
        self.max_stale
    }

    /// The entry if it is still fresh.
    pub async fn fresh(&self, repo: &RepoName, tag: &Tag) -> Option<TagEntry> {
        let e = self.entries.get(&(repo.clone(), tag.clone())).await?;
        (e.fetched.elapsed() < self.ttl).then_some(e)
    }

    /// The entry if it may still be served stale.
    pub async fn stale(&self, repo: &RepoName, tag: &Tag) -> Option<TagEntry> {
        let e = self.entries.get(&(repo.clone(), tag.clone())).await?;
        (e.fetched.elapsed() < self.max_stale).then_some(e)
    }

    /// Records a fresh answer; returns the digest it replaced, if any.
    pub async fn insert(
        &self,
        repo: &RepoName,
        tag: &Tag,
        digest: Digest,
        media_type: String,
    ) -> Option<Digest> {
        let key = (repo.clone(), tag.clone());
        let old = self.entries.get(&key).await.map(|e| e.digest);
        self.entries
            .insert(
                key,
                TagEntry {
                    digest,
                    media_type,
                    fetched: Instant::now(),
                },
            )
            .await;
        old
    }

    pub async fn forget(&self, repo: &RepoName, tag: &Tag) {
        self.entries.invalidate(&(repo.clone(), tag.clone())).await;
    }
}
