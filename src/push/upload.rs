//! Upload sessions staged in the preferred engine, so they survive a restart of the proxy: an
//! `info` record and one object per accepted chunk (`part-<offset>`), under
//! `_ociedge/uploads/<id>/`. The session's offset is read back from the listing; nothing of an
//! upload is visible under a digest until it is finished and verified.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path;

use crate::engine::storage::StorageEngine;
use crate::engine::ByteStream;
use crate::error::{Error, Result};
use crate::oci::{ErrorCode, RepoName};

const ROOT: &str = "_ociedge/uploads";

#[derive(serde::Serialize, serde::Deserialize)]
struct Info {
    repo: String,
    created: u64,
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
        Uploads {
            engine,
            locks: Mutex::new(HashMap::new()),
        }
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

    pub async fn start(&self, repo: &RepoName) -> Result<String> {
        let id = format!(
            "{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        );
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let info = serde_json::to_vec(&Info {
            repo: repo.to_string(),
            created,
        })
        .unwrap_or_default();
        self.engine
            .put_object(&Path::from(format!("{ROOT}/{id}/info")), Bytes::from(info))
            .await?;
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
            .await
    }
}
