//! Which repositories were pushed through ociedge, as opposed to mirrored from an upstream.
//!
//! Beside upstreams, a pushed repository and a mirrored one look alike in the local engine (both
//! hold links and tag links), yet they have different authorities: the preferred engine decides
//! a pushed repository's tags, tags list and deletes, the upstream a mirrored one's. Deciding by
//! what storage happens to hold would let a cached mirror tag pin itself for ever (read back as a
//! "pushed" tag) and let a deleted pushed manifest live on (answered by the upstream check). So a
//! push leaves a marker object in the preferred engine, `_ociedge/pushed/<repo>/_pushed`, and
//! the read path asks for it. Answers are remembered for `ttl` (a push through another process
//! is seen within it; a push through this one at once).

use std::sync::Arc;
use std::time::Duration;

use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::layout;
use crate::error::{Error, Result};
use crate::oci::RepoName;

pub struct PushedRepos {
    id: String,
    store: Arc<dyn ObjectStore>,
    known: moka::sync::Cache<RepoName, bool>,
}

impl std::fmt::Debug for PushedRepos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushedRepos")
            .field("engine", &self.id)
            .finish()
    }
}

impl PushedRepos {
    /// Markers in `store` (the preferred engine `id`'s), answers remembered for `ttl`.
    pub fn new(id: &str, store: Arc<dyn ObjectStore>, ttl: Duration) -> PushedRepos {
        PushedRepos {
            id: id.to_string(),
            store,
            known: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ttl.max(Duration::from_millis(100)))
                .build(),
        }
    }

    /// Records that `repo` was pushed to (before the push is acknowledged).
    pub async fn mark(&self, repo: &RepoName) -> Result<()> {
        if self.known.get(repo) == Some(true) {
            return Ok(());
        }
        self.store
            .put(&layout::pushed_marker(repo), PutPayload::from_static(b"1"))
            .await
            .map_err(|e| Error::object_store(&self.id, e))?;
        self.known.insert(repo.clone(), true);
        Ok(())
    }

    /// Whether `repo` was pushed through ociedge.
    pub async fn contains(&self, repo: &RepoName) -> Result<bool> {
        if let Some(known) = self.known.get(repo) {
            return Ok(known);
        }
        let there = match self.store.head(&layout::pushed_marker(repo)).await {
            Ok(_) => true,
            Err(object_store::Error::NotFound { .. }) => false,
            Err(e) => return Err(Error::object_store(&self.id, e)),
        };
        self.known.insert(repo.clone(), there);
        Ok(there)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_mark_is_seen_at_once_and_by_another_process_after_the_ttl() {
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let a = PushedRepos::new("m", store.clone(), Duration::from_millis(200));
        let b = PushedRepos::new("m", store, Duration::from_millis(200));
        let repo: RepoName = "team/app".parse().unwrap();
        let nested: RepoName = "team/app/sub".parse().unwrap();
        assert!(!a.contains(&repo).await.unwrap());
        assert!(!b.contains(&repo).await.unwrap());
        a.mark(&repo).await.unwrap();
        a.mark(&nested).await.unwrap();
        assert!(a.contains(&repo).await.unwrap());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(b.contains(&repo).await.unwrap());
        assert!(b.contains(&nested).await.unwrap());
        assert!(!b.contains(&"team".parse().unwrap()).await.unwrap());
    }
}
