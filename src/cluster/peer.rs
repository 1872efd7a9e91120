//! The first source of every fill in a cluster: the fill of the process holding the digest's
//! lease, streamed from it; or, when this process takes the lease, nothing (the fill goes on to
//! the remote engines) unless the blob appeared in the shared engine meanwhile.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{Cluster, Liveness};
use crate::engine::{BlobHit, Engine, EngineKind, Lookup, Manifest, ManifestMeta};
use crate::error::Result;
use crate::oci::{Digest, Reference, RepoName};

/// The id fills and metrics name this source by.
pub const PEER: &str = "cluster";

/// How long one ask may wait for a lease to be decided (a holder refreshing but unreachable,
/// contention); after that the fill goes on to the remote engines.
const DECIDE: Duration = Duration::from_secs(10);
/// Pause between looks at a lease whose holder cannot be reached yet.
const RETRY: Duration = Duration::from_millis(250);

/// The region as a source of one fill (see the module).
pub struct ClusterSource {
    cluster: Arc<Cluster>,
    /// The shared engine, looked at again once this process takes the lease.
    local: Arc<dyn Engine>,
    /// Resolves when the fill ends: the lease this source takes is held until then.
    ended: Mutex<Option<futures::future::BoxFuture<'static, ()>>>,
    /// This process holds the lease.
    held: std::sync::atomic::AtomicBool,
    liveness: Mutex<Liveness>,
}

impl std::fmt::Debug for ClusterSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSource")
    }
}

impl ClusterSource {
    /// `ended` resolves when the fill this source serves has its outcome.
    pub fn new(
        cluster: Arc<Cluster>,
        local: Arc<dyn Engine>,
        ended: futures::future::BoxFuture<'static, ()>,
    ) -> ClusterSource {
        ClusterSource {
            cluster,
            local,
            ended: Mutex::new(Some(ended)),
            held: std::sync::atomic::AtomicBool::new(false),
            liveness: Mutex::new(Liveness::default()),
        }
    }

    fn held(&self) -> bool {
        self.held.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// This process holds the lease of `d` from now until the fill ends.
    fn hold(&self, d: &Digest) {
        self.held.store(true, std::sync::atomic::Ordering::Relaxed);
        let ended = self.ended.lock().ok().and_then(|mut e| e.take());
        if let Some(ended) = ended {
            self.cluster.hold(d, ended);
        }
    }

    /// With the lease just taken: the blob from the shared engine if another process committed
    /// it meanwhile, else nothing (the fill asks the next source).
    async fn after_taking(
        &self,
        repo: &RepoName,
        d: &Digest,
        want: Lookup,
    ) -> Result<Option<BlobHit>> {
        self.hold(d);
        match self.local.open_blob(repo, d, want).await {
            Ok(Some(hit)) => {
                tracing::info!(digest = %d, "cluster: committed by another process meanwhile");
                Ok(Some(hit))
            }
            _ => Ok(None),
        }
    }
}

#[async_trait]
impl Engine for ClusterSource {
    fn id(&self) -> &str {
        PEER
    }

    fn kind(&self) -> EngineKind {
        EngineKind::Registry
    }

    async fn open_blob(
        &self,
        repo: &RepoName,
        d: &Digest,
        want: Lookup,
    ) -> Result<Option<BlobHit>> {
        if !want.body || self.held() || !self.cluster.coordinated() {
            return Ok(None);
        }
        let from = want.start();
        let deadline = Instant::now() + DECIDE;
        while Instant::now() < deadline {
            let lease = match self.cluster.read_lease(d).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(digest = %d, error = %e, "cluster: cannot read the fill lease; filling alone");
                    return Ok(None);
                }
            };
            let Some((lease, version)) = lease else {
                match self.cluster.create(d).await {
                    Ok(true) => return self.after_taking(repo, d, want).await,
                    // Another process was first: look at its lease.
                    Ok(false) => continue,
                    Err(e) => {
                        tracing::warn!(digest = %d, error = %e, "cluster: cannot create the fill lease; filling alone");
                        return Ok(None);
                    }
                }
            };
            let live = lease.holder != self.cluster.id
                && !lease.addr.is_empty()
                && self
                    .liveness
                    .lock()
                    .map(|mut l| l.live(format!("{}/{}", lease.holder, lease.seq), lease.at))
                    .unwrap_or(false);
            if !live {
                match self.cluster.take_over(d, &lease, version).await {
                    Ok(true) => {
                        tracing::info!(digest = %d, dead = %lease.holder, "cluster: took over a dead fill lease");
                        return self.after_taking(repo, d, want).await;
                    }
                    // Another process won it: its new lease shows at the next look.
                    Ok(false) => {
                        tokio::time::sleep(RETRY / 5).await;
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(digest = %d, error = %e, "cluster: cannot take over the fill lease; filling alone");
                        return Ok(None);
                    }
                }
            }
            match self.cluster.fetch(&lease.addr, d, from).await {
                Ok(Some(read)) => {
                    tracing::info!(digest = %d, peer = %lease.addr, from, "cluster: streaming from the lease holder");
                    self.cluster.metrics().cluster_peer_fill();
                    return Ok(Some(BlobHit::streamed(read)));
                }
                // The holder's fill ended (committed or failed): its lease goes next.
                Ok(None) => tokio::time::sleep(RETRY).await,
                // Refused (another secret): a misconfigured region, said loudly; go on alone.
                Err(e) if !e.is_transient() => {
                    tracing::warn!(digest = %d, peer = %lease.addr, error = %e, "cluster: the lease holder refused or answered wrongly; filling alone");
                    return Ok(None);
                }
                // Unreachable for now: until the lease is refreshed again or dead.
                Err(e) => {
                    tracing::debug!(digest = %d, peer = %lease.addr, error = %e, "cluster: lease holder not reachable");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
        tracing::warn!(digest = %d, "cluster: the fill lease stayed undecided; filling alone");
        Ok(None)
    }

    async fn get_manifest(
        &self,
        _: &RepoName,
        _: &Reference,
        _: &[String],
    ) -> Result<Option<Manifest>> {
        Ok(None)
    }

    async fn head_manifest(
        &self,
        _: &RepoName,
        _: &Reference,
        _: &[String],
    ) -> Result<Option<ManifestMeta>> {
        Ok(None)
    }

    async fn list_tags(&self, _: &RepoName) -> Result<Option<Vec<String>>> {
        Ok(None)
    }

    async fn probe(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{DEAD, REFRESH};
    use super::*;
    use crate::engine::storage::StorageEngine;
    use crate::metrics::Metrics;
    use object_store::ObjectStore;

    fn member(store: &Arc<dyn ObjectStore>, addr: &str) -> Arc<Cluster> {
        Arc::new(Cluster::new(store.clone(), addr, "s".into(), Metrics::new()).unwrap())
    }

    /// A holder that stops refreshing (killed) and cannot be reached: its lease is taken over
    /// once it has not changed for `DEAD`, and the taker holds it until its fill ends.
    #[tokio::test]
    async fn a_dead_holders_lease_is_taken_over() {
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let dead = member(&store, "http://127.0.0.1:1");
        let me = member(&store, "http://127.0.0.1:2");
        let d = Digest::sha256_of(b"taken over");
        assert!(dead.create(&d).await.unwrap());
        let local: Arc<dyn Engine> = Arc::new(StorageEngine::from_store("local", store.clone()));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let source = ClusterSource::new(
            me.clone(),
            local,
            Box::pin(async move {
                let _ = rx.await;
            }),
        );
        let repo: RepoName = "a/b".parse().unwrap();
        let started = Instant::now();
        let got = source
            .open_blob(&repo, &d, Lookup::body(None))
            .await
            .unwrap();
        assert!(
            got.is_none(),
            "nothing to stream: the fill goes on to the next source"
        );
        assert!(started.elapsed() >= DEAD, "taken over before it was dead");
        let (lease, _) = me.read_lease(&d).await.unwrap().unwrap();
        assert_eq!(lease.holder, me.id);
        assert_eq!(me.metrics().cluster_counts().1, 1);
        // Held while the fill runs, gone when it ends.
        tokio::time::sleep(REFRESH + Duration::from_millis(200)).await;
        assert!(me.read_lease(&d).await.unwrap().is_some());
        tx.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while me.read_lease(&d).await.unwrap().is_some() {
            assert!(Instant::now() < deadline, "the lease outlived the fill");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Taking the lease, a process looks at the shared engine again: a blob committed (and its
    /// lease released) by another process a moment before is read there, not fetched again.
    #[tokio::test]
    async fn a_blob_committed_meanwhile_is_read_from_the_shared_engine() {
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let me = member(&store, "http://127.0.0.1:2");
        let local = Arc::new(StorageEngine::from_store("local", store.clone()));
        let data = b"committed by another process".to_vec();
        let d = Digest::sha256_of(&data);
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), &data).unwrap();
        use crate::engine::EngineExt as _;
        local
            .put_blob_file(&d, f.path(), data.len() as u64)
            .await
            .unwrap();
        let source = ClusterSource::new(me, local.clone(), Box::pin(async {}));
        let repo: RepoName = "a/b".parse().unwrap();
        let read = source
            .get_blob(&repo, &d, Default::default())
            .await
            .unwrap()
            .expect("read from the shared engine");
        assert_eq!(read.size, data.len() as u64);
    }
}
