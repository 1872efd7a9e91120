//! A region of several processes sharing one local engine is one cache (`cluster:` in the
//! config). They coordinate through the engine they share, not through a membership protocol:
//!
//! - **Fill leases** (`_ociedge/fills/<alg>/<hex>`): the process that starts the fill of a digest
//!   creates the lease object only if it is absent (`PutMode::Create`: `O_EXCL`-like on
//!   `file://`, `If-None-Match: *` on S3, preconditions on GCS and Azure, in-memory too), with its
//!   advertise address, refreshes it every [`REFRESH`] while the fill runs, and deletes it at the
//!   end. A process that misses the digest and finds a live lease streams the blob from the
//!   holder's fill ([`peer::ClusterSource`], the first source of its own fill: its fill still
//!   hashes and verifies before committing). A lease not seen to change for [`DEAD`] is dead and
//!   taken over.
//! - **Reads in flight** (`_ociedge/reading/<process>.json`): each process publishes the digests
//!   its clients are reading from the local engine; eviction in every process skips them.
//!
//! Liveness is judged on the observer's own clock (a lease or reading list is live while its
//! content keeps changing), so clock skew between processes does not matter; the timestamp
//! inside only lets a lease left long ago by a killed process be taken over at once.
//!
//! Races that remain, all harmless because every fill verifies the digest before committing and
//! commits are idempotent (a blob already there with its size is success):
//! - Takeover on stores without compare-and-swap (`file://`: object_store has no conditional
//!   update there) goes through a take-over right, an object created only if absent and named
//!   after the dead lease: one process wins it and replaces the lease (delete, then create);
//!   the others look again. What is left is a taker stalled between re-reading the dead lease
//!   and deleting it for longer than the winner's whole fill: the digest is fetched twice.
//! - A holder paused longer than [`DEAD`] (a stop-the-world stall) may find its lease taken over;
//!   it stops refreshing and finishes its fill: the digest is fetched twice, never wrong.
//! - A process that misses a blob committed and unleased a moment before re-checks the local
//!   engine after it takes the lease, so it does not fetch what is there already.

pub mod peer;
pub mod reading;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::{Deserialize, Serialize};

use crate::engine::BlobRead;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::oci::Digest;

/// How often a holder refreshes its lease (and a process its reading list while it reads).
pub const REFRESH: Duration = Duration::from_secs(1);
/// A lease or reading list not seen to change for this long is dead.
pub const DEAD: Duration = Duration::from_secs(3);
/// A lease whose own timestamp is older than this is dead at first sight (a process killed long
/// ago); far above any clock skew between hosts kept by NTP.
const STALE_AT: u64 = 30;
/// Lease objects are tiny; anything larger is not one.
const MAX_LEASE: u64 = 4 << 10;
/// How long a peer may take to answer with the head of its fill (it waits for its source).
const PEER_HEADERS: Duration = Duration::from_secs(30);

const FILLS: &str = "_ociedge/fills";

/// The header the shared secret travels in.
pub const SECRET_HEADER: &str = "x-ociedge-cluster-secret";
/// The header a peer states the blob's whole size in.
pub const SIZE_HEADER: &str = "x-ociedge-blob-size";

/// What a fill lease holds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Lease {
    /// The holder's process id.
    pub holder: String,
    /// Where the holder's fill is streamed from (`http://10.0.0.5:5000`).
    pub addr: String,
    /// Moves at every refresh: what observers judge liveness by.
    pub seq: u64,
    /// Unix seconds of the last refresh, on the holder's clock.
    pub at: u64,
}

/// This process in its region.
pub struct Cluster {
    store: Arc<dyn ObjectStore>,
    /// This process's id (random per start).
    pub id: String,
    /// Where the others reach this process.
    pub advertise: String,
    secret: String,
    /// Leases work on this engine (create-if-absent is supported); otherwise fills are per
    /// process, as without `cluster:`.
    coordinated: std::sync::atomic::AtomicBool,
    http: reqwest::Client,
    metrics: Metrics,
    /// Processes seen through their leases and reading lists: id → (address, when seen).
    seen: Mutex<HashMap<String, (String, Instant)>>,
    /// The take-over rights this process won (see [`Cluster::take_over`]), by lease: deleted
    /// with the lease.
    rights: Mutex<HashMap<Path, Path>>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn lease_path(d: &Digest) -> Path {
    Path::from(format!("{FILLS}/{}/{}", d.algorithm(), d.hex()))
}

/// The right to replace one dead lease of `d` (see [`Cluster::take_over`]): beside the lease,
/// named after the dead holder and its last refresh, so it is won once per dead lease.
fn takeover_path(d: &Digest, dead: &Lease) -> Path {
    let holder: String = dead
        .holder
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(32)
        .collect();
    Path::from(format!(
        "{FILLS}/{}/{}.over.{holder}.{}",
        d.algorithm(),
        d.hex(),
        dead.seq
    ))
}

/// Equal secrets, compared in constant time (on their hashes, so the length leaks nothing either).
pub fn secret_matches(given: &[u8], secret: &[u8]) -> bool {
    use sha2::Digest as _;
    let a = sha2::Sha256::digest(given);
    let b = sha2::Sha256::digest(secret);
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

impl Cluster {
    /// `store` is the local engine's object store (shared by the region).
    pub fn new(
        store: Arc<dyn ObjectStore>,
        advertise: &str,
        secret: String,
        metrics: Metrics,
    ) -> Result<Cluster> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| Error::Config(format!("cluster: http client: {e}")))?;
        Ok(Cluster {
            store,
            id: format!("{:016x}", rand::random::<u64>()),
            advertise: advertise.trim_end_matches('/').to_string(),
            secret,
            coordinated: std::sync::atomic::AtomicBool::new(true),
            http,
            metrics,
            seen: Mutex::new(HashMap::new()),
            rights: Mutex::new(HashMap::new()),
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Whether fills are coordinated through leases.
    pub fn coordinated(&self) -> bool {
        self.coordinated.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether `given` is the region's secret.
    pub fn authorized(&self, given: &[u8]) -> bool {
        secret_matches(given, self.secret.as_bytes())
    }

    /// Checks once, at start, that the engine can create an object only if it is absent; without
    /// that (an S3-compatible store with conditional writes disabled, or one that ignores
    /// `If-None-Match`), fills stay per process, and this is logged once.
    pub async fn probe(&self) {
        let path = Path::from(format!("{FILLS}/probe/{}", self.id));
        let create = || PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let first = self
            .store
            .put_opts(&path, PutPayload::from_static(b"probe"), create())
            .await;
        let second = self
            .store
            .put_opts(&path, PutPayload::from_static(b"probe"), create())
            .await;
        let _ = self.store.delete(&path).await;
        let ok = first.is_ok() && matches!(second, Err(object_store::Error::AlreadyExists { .. }));
        if ok {
            tracing::info!(id = %self.id, advertise = %self.advertise, "cluster: fills coordinated through leases in the local engine");
        } else {
            tracing::warn!(first = ?first.err(), second = ?second.err().map(|e| e.to_string()), "cluster: the local engine cannot create an object only if absent; fills stay per process");
        }
        self.coordinated
            .store(ok, std::sync::atomic::Ordering::Relaxed);
    }

    fn lease_bytes(&self, seq: u64) -> Bytes {
        let l = Lease {
            holder: self.id.clone(),
            addr: self.advertise.clone(),
            seq,
            at: now_secs(),
        };
        Bytes::from(serde_json::to_vec(&l).unwrap_or_default())
    }

    /// Records a process seen through an object it keeps fresh (for the status page).
    pub(crate) fn saw(&self, id: &str, addr: &str) {
        if id == self.id {
            return;
        }
        if let Ok(mut s) = self.seen.lock() {
            s.insert(id.to_string(), (addr.to_string(), Instant::now()));
            s.retain(|_, (_, t)| t.elapsed() < Duration::from_secs(600));
        }
    }

    /// The region's processes seen lately: (id, address, seconds since seen), this one first.
    pub fn processes(&self) -> Vec<(String, String, u64)> {
        let mut out = vec![(self.id.clone(), self.advertise.clone(), 0)];
        if let Ok(s) = self.seen.lock() {
            let mut others: Vec<_> = s
                .iter()
                .map(|(id, (addr, t))| (id.clone(), addr.clone(), t.elapsed().as_secs()))
                .collect();
            others.sort();
            out.extend(others);
        }
        out
    }

    /// The lease of `d` and the version to replace it by, if there is one.
    pub async fn read_lease(&self, d: &Digest) -> Result<Option<(Lease, UpdateVersion)>> {
        let path = lease_path(d);
        let r = match self.store.get(&path).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(Error::object_store("cluster", e)),
        };
        let version = UpdateVersion {
            e_tag: r.meta.e_tag.clone(),
            version: r.meta.version.clone(),
        };
        if r.meta.size > MAX_LEASE {
            return Err(Error::permanent("cluster", format!("{path}: not a lease")));
        }
        let bytes = r
            .bytes()
            .await
            .map_err(|e| Error::object_store("cluster", e))?;
        // A lease cut short or garbled (a store without atomic writes): a dead holder.
        let lease = serde_json::from_slice::<Lease>(&bytes).unwrap_or(Lease {
            holder: String::new(),
            addr: String::new(),
            seq: 0,
            at: 0,
        });
        if !lease.holder.is_empty() {
            self.saw(&lease.holder, &lease.addr);
        }
        Ok(Some((lease, version)))
    }

    /// Creates the lease of `d` if there is none: `true` when this process holds it now.
    pub async fn create(&self, d: &Digest) -> Result<bool> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&lease_path(d), self.lease_bytes(0).into(), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(Error::object_store("cluster", e)),
        }
    }

    /// Takes over the dead lease `dead` of `d`, read at `version`: a compare-and-swap where the
    /// store has one. Where it has none (`file://`), the right to replace `dead` is itself an
    /// object created only if absent, named after the dead lease (its holder and refresh
    /// count), so of the processes that judged that lease dead exactly one goes on to replace
    /// it; the others find the new lease at their next look. `true` when this process holds the
    /// lease now.
    pub async fn take_over(
        &self,
        d: &Digest,
        dead: &Lease,
        version: UpdateVersion,
    ) -> Result<bool> {
        let path = lease_path(d);
        if version.e_tag.is_some() || version.version.is_some() {
            let opts = PutOptions {
                mode: PutMode::Update(version),
                ..Default::default()
            };
            match self
                .store
                .put_opts(&path, self.lease_bytes(0).into(), opts)
                .await
            {
                Ok(_) => {
                    self.metrics.cluster_lease_taken_over();
                    return Ok(true);
                }
                Err(object_store::Error::Precondition { .. })
                | Err(object_store::Error::AlreadyExists { .. })
                | Err(object_store::Error::NotFound { .. }) => return Ok(false),
                Err(object_store::Error::NotImplemented { .. })
                | Err(object_store::Error::NotSupported { .. }) => {}
                Err(e) => return Err(Error::object_store("cluster", e)),
            }
        }
        let right = takeover_path(d, dead);
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&right, self.lease_bytes(0).into(), opts)
            .await
        {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => return Ok(false),
            Err(e) => return Err(Error::object_store("cluster", e)),
        }
        // The right is ours; the lease must still be the dead one (not already replaced by a
        // taker that won the right, finished and released it, and a new fill's lease).
        match self.read_lease(d).await? {
            Some((now, _)) if now.holder == dead.holder && now.seq == dead.seq => {
                match self.store.delete(&path).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(Error::object_store("cluster", e)),
                }
            }
            Some(_) => return Ok(false),
            None => {}
        }
        let took = self.create(d).await?;
        if took {
            self.metrics.cluster_lease_taken_over();
            if let Ok(mut r) = self.rights.lock() {
                r.insert(path, right);
            }
        } else {
            let _ = self.store.delete(&right).await;
        }
        Ok(took)
    }

    /// Keeps the lease of `d` fresh until `ended` resolves (the fill's outcome), then deletes
    /// it. Stops refreshing, and leaves the lease alone, if another process took it over.
    pub fn hold(
        self: &Arc<Self>,
        d: &Digest,
        ended: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let me = self.clone();
        let d = d.clone();
        tokio::spawn(async move {
            tokio::pin!(ended);
            let mut seq = 0u64;
            let mut ours = true;
            loop {
                tokio::select! {
                    _ = &mut ended => break,
                    _ = tokio::time::sleep(REFRESH), if ours => {
                        seq += 1;
                        ours = me.refresh(&d, seq).await;
                    }
                }
            }
            if ours {
                me.release(&d).await;
            }
        });
    }

    /// One refresh; `false` once the lease is another process's.
    async fn refresh(&self, d: &Digest, seq: u64) -> bool {
        match self.read_lease(d).await {
            Ok(Some((l, _))) if l.holder != self.id => {
                tracing::warn!(digest = %d, holder = %l.holder, "cluster: fill lease taken over by another process; finishing the fill anyway");
                return false;
            }
            Err(e) => {
                // A store hiccup: try again at the next refresh.
                tracing::debug!(digest = %d, error = %e, "cluster: lease refresh read failed");
                return true;
            }
            _ => {}
        }
        let path = lease_path(d);
        if let Err(e) = self.store.put(&path, self.lease_bytes(seq).into()).await {
            tracing::debug!(digest = %d, error = %e, "cluster: lease refresh failed");
        }
        true
    }

    /// Deletes the lease of `d` if it is still ours, and the take-over right it was won by.
    async fn release(&self, d: &Digest) {
        let path = lease_path(d);
        if let Ok(Some((l, _))) = self.read_lease(d).await {
            if l.holder == self.id {
                let _ = self.store.delete(&path).await;
            }
        }
        let right = self.rights.lock().ok().and_then(|mut r| r.remove(&path));
        if let Some(right) = right {
            let _ = self.store.delete(&right).await;
        }
    }

    /// The fill of `d` from byte `from` as `addr` streams it; `None` when that process has no
    /// fill of it running. Stream failures are transient (the fill resumes at the byte reached).
    pub async fn fetch(&self, addr: &str, d: &Digest, from: u64) -> Result<Option<BlobRead>> {
        let url = format!(
            "{addr}/_ociedge/cluster/fills/{}/{}?from={from}",
            d.algorithm(),
            d.hex()
        );
        let send = self
            .http
            .get(&url)
            .header(SECRET_HEADER, &self.secret)
            .send();
        let resp = match tokio::time::timeout(PEER_HEADERS, send).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(Error::transient("cluster", e)),
            Err(_) => return Err(Error::transient("cluster", "peer did not answer in time")),
        };
        match resp.status().as_u16() {
            200 => {}
            404 => return Ok(None),
            s @ (401 | 403) => {
                return Err(Error::permanent(
                    "cluster",
                    format!(
                        "peer {addr} refused our secret ({s}): check secret_env on every process"
                    ),
                ))
            }
            s => {
                return Err(Error::transient(
                    "cluster",
                    format!("peer {addr} answered {s}"),
                ))
            }
        }
        let size = resp
            .headers()
            .get(SIZE_HEADER)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .ok_or_else(|| Error::permanent("cluster", "peer answer without the blob size"))?;
        if from > size || resp.content_length() != Some(size - from) {
            return Err(Error::permanent(
                "cluster",
                "peer answer of the wrong length",
            ));
        }
        let metrics = self.metrics.clone();
        let stream = resp.bytes_stream().map(move |item| match item {
            Ok(b) => {
                metrics.cluster_peer_bytes(b.len() as u64);
                Ok(b)
            }
            Err(e) => Err(Error::transient("cluster", e)),
        });
        Ok(Some(BlobRead {
            size,
            offset: from,
            len: size - from,
            stream: Box::pin(stream),
        }))
    }

    /// Keeps the list of the region's processes fresh (every few seconds, from their reading
    /// lists); `heartbeat`: also publish this process's (empty) list, when no evictor does.
    pub fn spawn_presence(self: &Arc<Self>, heartbeat: bool) {
        let me = self.clone();
        tokio::spawn(async move {
            let readers = reading::Readers::default();
            let mut seq = 0u64;
            loop {
                if heartbeat {
                    seq += 1;
                    if let Err(e) = me.publish_reading(seq, &[]).await {
                        tracing::debug!(error = %e, "cluster: heartbeat failed");
                    }
                }
                if let Err(e) = me.region_reading(&readers).await {
                    tracing::debug!(error = %e, "cluster: cannot list the region's processes");
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
    }

    pub(crate) fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }
}

/// Tracks whether an object another process keeps fresh is still alive, on this process's clock:
/// alive while what it holds keeps changing.
#[derive(Default)]
pub(crate) struct Liveness {
    last: Option<(String, Instant)>,
}

impl Liveness {
    /// `key` is what changes at every refresh; `at` the writer's own timestamp.
    pub(crate) fn live(&mut self, key: String, at: u64) -> bool {
        if now_secs().saturating_sub(at) > STALE_AT {
            return false;
        }
        match &self.last {
            Some((k, t)) if *k == key => t.elapsed() < DEAD,
            _ => {
                self.last = Some((key, Instant::now()));
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(store: Arc<dyn ObjectStore>) -> Arc<Cluster> {
        Arc::new(
            Cluster::new(store, "http://127.0.0.1:1", "s3cret".into(), Metrics::new()).unwrap(),
        )
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(secret_matches(b"abc", b"abc"));
        assert!(!secret_matches(b"abd", b"abc"));
        assert!(!secret_matches(b"ab", b"abc"));
        assert!(!secret_matches(b"", b"abc"));
    }

    /// A store with compare-and-swap (in memory) and one without (a directory in `dir`).
    fn stores(dir: &tempfile::TempDir) -> Vec<Arc<dyn ObjectStore>> {
        vec![
            Arc::new(object_store::memory::InMemory::new()),
            Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap()),
        ]
    }

    /// One process creates the lease; another cannot, and can take it over only at the version
    /// it read (in memory: compare-and-swap; in a directory: through the take-over right).
    #[tokio::test]
    async fn a_lease_is_created_once_and_taken_over_once() {
        let dir = tempfile::tempdir().unwrap();
        for store in stores(&dir) {
            let (a, b) = (cluster(store.clone()), cluster(store.clone()));
            a.probe().await;
            assert!(a.coordinated());
            let d = Digest::sha256_of(b"lease");
            assert!(a.create(&d).await.unwrap());
            assert!(!b.create(&d).await.unwrap());
            let (l, v) = b.read_lease(&d).await.unwrap().unwrap();
            assert_eq!(l.holder, a.id);
            assert!(b.take_over(&d, &l, v).await.unwrap());
            let (l, _) = a.read_lease(&d).await.unwrap().unwrap();
            assert_eq!(l.holder, b.id);
            // A holder that lost its lease neither refreshes nor deletes it.
            assert!(!a.refresh(&d, 1).await);
            a.release(&d).await;
            assert!(a.read_lease(&d).await.unwrap().is_some());
            b.release(&d).await;
            assert!(a.read_lease(&d).await.unwrap().is_none());
        }
    }

    /// Two processes that both judged one lease dead race to take it over: exactly one holds it
    /// after, on every store (a directory has no compare-and-swap), however the two interleave.
    #[tokio::test]
    async fn two_takers_of_one_dead_lease_one_wins() {
        let dir = tempfile::tempdir().unwrap();
        for store in stores(&dir) {
            for concurrent in [false, true] {
                let dead = cluster(store.clone());
                let (a, b) = (cluster(store.clone()), cluster(store.clone()));
                let d = Digest::sha256_of(format!("race {concurrent}").as_bytes());
                assert!(dead.create(&d).await.unwrap());
                let (la, va) = a.read_lease(&d).await.unwrap().unwrap();
                let (lb, vb) = b.read_lease(&d).await.unwrap().unwrap();
                let (ta, tb) = if concurrent {
                    tokio::join!(a.take_over(&d, &la, va), b.take_over(&d, &lb, vb))
                } else {
                    let ta = a.take_over(&d, &la, va).await;
                    (ta, b.take_over(&d, &lb, vb).await)
                };
                let (ta, tb) = (ta.unwrap(), tb.unwrap());
                assert!(ta ^ tb, "exactly one taker wins: {ta} {tb}");
                let (l, _) = a.read_lease(&d).await.unwrap().unwrap();
                let winner = if ta { &a.id } else { &b.id };
                assert_eq!(&l.holder, winner, "the lease is the winner's");
            }
        }
    }

    #[tokio::test]
    async fn a_held_lease_is_refreshed_then_deleted_when_the_fill_ends() {
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let a = cluster(store);
        let d = Digest::sha256_of(b"held");
        assert!(a.create(&d).await.unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        a.hold(&d, async move {
            let _ = rx.await;
        });
        tokio::time::sleep(REFRESH * 2 + Duration::from_millis(300)).await;
        let (l, _) = a.read_lease(&d).await.unwrap().unwrap();
        assert!(l.seq >= 1, "refreshed: {l:?}");
        tx.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while a.read_lease(&d).await.unwrap().is_some() {
            assert!(Instant::now() < deadline, "the lease outlived its fill");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
