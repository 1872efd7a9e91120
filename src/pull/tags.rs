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
    /// Tags whose fresh answer is of a type some client did not accept and the authority had no
    /// other: served as they are until the TTL, instead of asking the authority per request.
    unnegotiable: moka::sync::Cache<(RepoName, Tag), ()>,
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
            unnegotiable: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(ttl.max(Duration::from_secs(1)))
                .build(),
            ttl,
            max_stale,
        }
    }

    /// Whether the tag's fresh answer is served as it is to every client (see `unnegotiable`).
    pub fn unnegotiable(&self, repo: &RepoName, tag: &Tag) -> bool {
        self.unnegotiable.contains_key(&(repo.clone(), tag.clone()))
    }

    pub fn set_unnegotiable(&self, repo: &RepoName, tag: &Tag) {
        self.unnegotiable.insert((repo.clone(), tag.clone()), ());
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
