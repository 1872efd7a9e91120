//! Upload sessions staged in the preferred engine, so they survive a restart of the proxy: an
//! `info` record and one object per accepted chunk (`part-<offset>`), under
//! `_ociedge/uploads/<id>/`. The session's offset is read back from the listing; nothing of an
//! upload is visible under a digest until it is finished and verified.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;

use crate::engine::storage::StorageEngine;
use crate::engine::{ByteStream, Engine};
use crate::error::{Error, Result};
use crate::oci::{ErrorCode, RepoName};

const ROOT: &str = "_ociedge/uploads";

#[derive(serde::Serialize, serde::Deserialize)]
struct Info {
    repo: String,
    created: u64,
    /// Who opened it (the client's address), for the per-client cap.
    #[serde(default)]
    client: Option<String>,
}

/// A session's state, read from the engine.
pub struct Session {
    pub id: String,
    /// Bytes accepted so far.
    pub offset: u64,
    parts: Vec<(Path, u64)>,
}

pub struct Uploads {
    engine: Arc<StorageEngine>,
    /// One writer per session at a time, so chunk offsets cannot race.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    limits: UploadLimits,
    /// The open sessions, read from the engine at first use and kept up to date by this
    /// process, so the caps cost no listing per request.
    open: tokio::sync::OnceCell<Mutex<HashMap<String, Open>>>,
}

/// An open session as the caps see it.
#[derive(Default)]
struct Open {
    repo: String,
    client: Option<String>,
    staged: u64,
}

/// Caps on upload sessions, so abandoned ones cannot pile up without end.
#[derive(Clone, Copy, Debug)]
pub struct UploadLimits {
    /// Open sessions per repository.
    pub per_repo: usize,
    /// Open sessions per client.
    pub per_client: usize,
    /// Open sessions in all.
    pub total: usize,
    /// Bytes staged in all open sessions.
    pub staged: u64,
}

impl Default for UploadLimits {
    fn default() -> UploadLimits {
        UploadLimits {
            per_repo: 64,
            per_client: 64,
            total: 4096,
            staged: 64 << 30,
        }
    }
}

fn too_many(msg: String) -> Error {
    Error::client(ErrorCode::TooManyRequests, msg)
}

fn unknown(id: &str) -> Error {
    Error::client(
        ErrorCode::BlobUploadUnknown,
        format!("upload {id:?} is unknown"),
    )
}

/// Upload ids are 32 lowercase hex characters; anything else is refused before any I/O.
pub fn valid_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Uploads {
    pub fn new(engine: Arc<StorageEngine>) -> Uploads {
        Uploads::with_limits(engine, UploadLimits::default())
    }

    pub fn with_limits(engine: Arc<StorageEngine>, limits: UploadLimits) -> Uploads {
        Uploads {
            engine,
            locks: Mutex::new(HashMap::new()),
            limits,
            open: tokio::sync::OnceCell::new(),
        }
    }

    /// The table of open sessions, read from the engine the first time.
    async fn open(&self) -> Result<&Mutex<HashMap<String, Open>>> {
        self.open
            .get_or_try_init(|| async {
                let mut table: HashMap<String, Open> = HashMap::new();
                for (p, size) in self.engine.list_objects(&Path::from(ROOT)).await? {
                    let mut parts = p.as_ref().split('/').skip(2);
                    let (Some(id), Some(file)) = (parts.next(), parts.next()) else {
                        continue;
                    };
                    let e = table.entry(id.to_string()).or_default();
                    if file == "info" {
                        if let Some(Ok(info)) = self
                            .engine
                            .get_object(&p)
                            .await
                            .ok()
                            .flatten()
                            .map(|b| serde_json::from_slice::<Info>(&b))
                        {
                            e.repo = info.repo;
                            e.client = info.client;
                        }
                    } else {
                        e.staged += size;
                    }
                }
                Ok::<_, Error>(Mutex::new(table))
            })
            .await
    }

    fn with_table<T>(
        table: &Mutex<HashMap<String, Open>>,
        f: impl FnOnce(&mut HashMap<String, Open>) -> T,
    ) -> T {
        let mut t = match table.lock() {
            Ok(t) => t,
            Err(p) => p.into_inner(),
        };
        f(&mut t)
    }

    /// Bytes staged in all open sessions, and the number of sessions.
    pub async fn usage(&self) -> Result<(u64, usize)> {
        let table = self.open().await?;
        Ok(Self::with_table(table, |t| {
            (t.values().map(|o| o.staged).sum(), t.len())
        }))
    }

    /// Serialises writers of one session.
    pub fn lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = match self.locks.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if m.len() > 10_000 {
            m.retain(|_, l| Arc::strong_count(l) > 1);
        }
        m.entry(id.to_string()).or_default().clone()
    }

    /// Opens a session in `repo` for `client` (its address; `None` when unknown).
    pub async fn start(&self, repo: &RepoName, client: Option<&str>) -> Result<String> {
        let id = format!(
            "{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        );
        let table = self.open().await?;
        let limits = self.limits;
        Self::with_table(table, |t| {
            if t.len() >= limits.total {
                return Err(too_many(format!(
                    "{} upload sessions are open; finish or cancel some",
                    t.len()
                )));
            }
            let here = t.values().filter(|o| o.repo == repo.as_str()).count();
            if here >= limits.per_repo {
                return Err(too_many(format!(
                    "{here} upload sessions are open for {repo}; finish or cancel some"
                )));
            }
            if let Some(c) = client {
                let mine = t
                    .values()
                    .filter(|o| o.client.as_deref() == Some(c))
                    .count();
                if mine >= limits.per_client {
                    return Err(too_many(format!(
                        "{mine} upload sessions are open for this client; finish or cancel some"
                    )));
                }
            }
            t.insert(
                id.clone(),
                Open {
                    repo: repo.to_string(),
                    client: client.map(str::to_string),
                    staged: 0,
                },
            );
            Ok(())
        })?;
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let info = serde_json::to_vec(&Info {
            repo: repo.to_string(),
            created,
            client: client.map(str::to_string),
        })
        .unwrap_or_default();
        let put = self
            .engine
            .put_object(&Path::from(format!("{ROOT}/{id}/info")), Bytes::from(info))
            .await;
        if let Err(e) = put {
            Self::with_table(table, |t| t.remove(&id));
            return Err(e);
        }
        Ok(id)
    }

    /// The session, if it exists and belongs to `repo`.
    pub async fn session(&self, repo: &RepoName, id: &str) -> Result<Session> {
        if !valid_id(id) {
            return Err(unknown(id));
        }
        let info = self
            .engine
            .get_object(&Path::from(format!("{ROOT}/{id}/info")))
            .await?
            .ok_or_else(|| unknown(id))?;
        let info: Info = serde_json::from_slice(&info).map_err(|_| unknown(id))?;
        if info.repo != repo.as_str() {
            return Err(unknown(id));
        }
        let mut parts = Vec::new();
        let mut offset = 0;
        for (p, size) in self
            .engine
            .list_objects(&Path::from(format!("{ROOT}/{id}")))
            .await?
        {
            let Some(start) = p
                .filename()
                .and_then(|f| f.strip_prefix("part-"))
                .and_then(|o| o.parse::<u64>().ok())
            else {
                continue;
            };
            // Parts are contiguous by construction; a gap means a torn write we cannot use.
            if start != offset {
                return Err(Error::client(
                    ErrorCode::BlobUploadInvalid,
                    format!("upload {id} is corrupt (gap at {offset})"),
                ));
            }
            offset += size;
            parts.push((p, size));
        }
        Ok(Session {
            id: id.to_string(),
            offset,
            parts,
        })
    }

    /// Appends `body` at `session.offset` as a new part; returns the new offset. `expected_len`
    /// (from `Content-Range`) must match what arrives, or nothing is kept.
    pub async fn append(
        &self,
        session: &Session,
        body: ByteStream,
        expected_len: Option<u64>,
    ) -> Result<u64> {
        let table = self.open().await?;
        let staged: u64 = Self::with_table(table, |t| t.values().map(|o| o.staged).sum());
        if staged >= self.limits.staged {
            return Err(too_many(format!(
                "upload sessions hold {staged} bytes already; finish or cancel some"
            )));
        }
        let path = Path::from(format!("{ROOT}/{}/part-{:020}", session.id, session.offset));
        let n = self.engine.put_stream(&path, body).await?;
        if n == 0 {
            self.engine.delete_object(&path).await?;
        }
        if expected_len.is_some_and(|e| e != n) {
            self.engine.delete_object(&path).await?;
            return Err(Error::client(
                ErrorCode::BlobUploadInvalid,
                format!("Content-Range announced {expected_len:?} bytes, the body had {n}"),
            ));
        }
        Self::with_table(table, |t| {
            if let Some(e) = t.get_mut(&session.id) {
                e.staged += n;
            }
        });
        Ok(session.offset + n)
    }

    /// The session's bytes, in order.
    pub async fn read(&self, session: &Session) -> Result<ByteStream> {
        let mut streams = Vec::new();
        for (p, _) in &session.parts {
            let s = self
                .engine
                .stream_object(p)
                .await?
                .ok_or_else(|| unknown(&session.id))?;
            streams.push(s);
        }
        Ok(Box::pin(futures::stream::iter(streams).flatten()))
    }

    pub async fn remove(&self, id: &str) -> Result<()> {
        if !valid_id(id) {
            return Err(unknown(id));
        }
        self.engine
            .delete_prefix(&Path::from(format!("{ROOT}/{id}")))
            .await?;
        if let Ok(table) = self.open().await {
            Self::with_table(table, |t| t.remove(id));
        }
        Ok(())
    }

    /// Removes the sessions nothing was written to for `max_age`; returns how many.
    pub async fn clean_stale(&self, max_age: std::time::Duration) -> Result<usize> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let cutoff = now.saturating_sub(max_age).as_secs() as i64;
        let mut newest: HashMap<String, i64> = HashMap::new();
        let listing: Vec<object_store::ObjectMeta> = self
            .engine
            .store()
            .list(Some(&Path::from(ROOT)))
            .try_collect()
            .await
            .map_err(|e| Error::object_store(self.engine.id(), e))?;
        for m in listing {
            if let Some(id) = m.location.as_ref().split('/').nth(2) {
                let t = m.last_modified.timestamp();
                let e = newest.entry(id.to_string()).or_insert(t);
                *e = (*e).max(t);
            }
        }
        // Sessions gone from the engine (removed by another process) leave the table too.
        if let Ok(table) = self.open().await {
            Self::with_table(table, |t| t.retain(|id, _| newest.contains_key(id)));
        }
        let mut removed = 0;
        for (id, last) in newest {
            if last < cutoff && valid_id(&id) {
                self.remove(&id).await?;
                tracing::info!(upload = %id, "removed a stale upload session");
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Removes stale sessions every so often, whatever the cache settings (spawn it).
    pub async fn run_cleanup(self: Arc<Self>, max_age: std::time::Duration) {
        let every = (max_age / 2).clamp(
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(600),
        );
        loop {
            if let Err(e) = self.clean_stale(max_age).await {
                tracing::warn!(error = %e, "cannot clean stale upload sessions");
            }
            tokio::time::sleep(every).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn body(n: usize) -> ByteStream {
        Box::pin(futures::stream::iter([Ok(Bytes::from(vec![1u8; n]))]))
    }

    fn uploads(limits: UploadLimits) -> Uploads {
        let store = Arc::new(object_store::memory::InMemory::new());
        Uploads::with_limits(Arc::new(StorageEngine::from_store("eu", store)), limits)
    }

    #[tokio::test]
    async fn sessions_are_capped_per_repository_and_in_all() {
        let u = uploads(UploadLimits {
            per_repo: 2,
            per_client: 10,
            total: 3,
            staged: 1 << 20,
        });
        let (a, b): (RepoName, RepoName) = ("a/x".parse().unwrap(), "b/x".parse().unwrap());
        let first = u.start(&a, None).await.unwrap();
        u.start(&a, None).await.unwrap();
        let e = u.start(&a, None).await.unwrap_err();
        assert!(e.to_string().contains("upload sessions are open"), "{e}");
        u.start(&b, None).await.unwrap();
        assert!(u.start(&b, None).await.is_err(), "the total cap");
        // A removed session frees its place.
        u.remove(&first).await.unwrap();
        u.start(&a, None).await.unwrap();
    }

    #[tokio::test]
    async fn staged_bytes_are_capped_and_counted_from_the_engine() {
        let limits = UploadLimits {
            per_repo: 10,
            per_client: 10,
            total: 10,
            staged: 1000,
        };
        let u = uploads(limits);
        let repo: RepoName = "a/x".parse().unwrap();
        let id = u.start(&repo, None).await.unwrap();
        let s = u.session(&repo, &id).await.unwrap();
        assert_eq!(u.append(&s, body(1200), None).await.unwrap(), 1200);
        let s = u.session(&repo, &id).await.unwrap();
        assert!(u.append(&s, body(10), None).await.is_err(), "over the cap");
        // Another process (or a restart) sees what is staged.
        let again = Uploads::with_limits(u.engine.clone(), limits);
        assert_eq!(again.usage().await.unwrap(), (1200, 1));
        assert!(again.append(&s, body(10), None).await.is_err());
        again.remove(&id).await.unwrap();
        assert_eq!(again.usage().await.unwrap(), (0, 0));
    }

    #[tokio::test]
    async fn sessions_are_capped_per_client_across_repositories() {
        let u = uploads(UploadLimits {
            per_client: 2,
            ..UploadLimits::default()
        });
        let (a, b): (RepoName, RepoName) = ("a/x".parse().unwrap(), "b/x".parse().unwrap());
        u.start(&a, Some("10.0.0.1")).await.unwrap();
        u.start(&b, Some("10.0.0.1")).await.unwrap();
        assert!(u.start(&a, Some("10.0.0.1")).await.is_err());
        u.start(&a, Some("10.0.0.2")).await.unwrap();
        // Counted from the engine too (a restart keeps who opened what).
        let again = Uploads::with_limits(u.engine.clone(), u.limits);
        assert!(again.start(&b, Some("10.0.0.1")).await.is_err());
    }

    #[tokio::test]
    async fn stale_sessions_are_removed() {
        let u = uploads(UploadLimits::default());
        let repo: RepoName = "a/x".parse().unwrap();
        let id = u.start(&repo, None).await.unwrap();
        assert_eq!(u.clean_stale(Duration::from_secs(3600)).await.unwrap(), 0);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(u.clean_stale(Duration::ZERO).await.unwrap(), 1);
        assert!(u.session(&repo, &id).await.is_err());
        assert_eq!(u.usage().await.unwrap(), (0, 0));
    }
}
