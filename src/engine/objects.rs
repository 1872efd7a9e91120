//! ociedge's own objects in a storage engine, beside the Distribution layout: upload parts,
//! replication jobs, referrer records. Small typed helpers over the object store.

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};

use super::storage::StorageEngine;
use super::Engine;
use crate::error::{Error, Result};

/// Multipart chunk size for streamed writes (S3's minimum part size is 5 MiB).
const PART: usize = 8 << 20;

impl StorageEngine {
    fn obj_err(&self, e: object_store::Error) -> Error {
        Error::object_store(self.id(), e)
    }

    /// Writes a small object whole (overwriting).
    pub async fn put_object(&self, path: &Path, bytes: Bytes) -> Result<()> {
        self.store()
            .put(path, PutPayload::from_bytes(bytes))
            .await
            .map(|_| ())
            .map_err(|e| self.obj_err(e))
    }

    /// Writes a small object only if it does not exist; `false` when it did.
    pub async fn create_object(&self, path: &Path, bytes: Bytes) -> Result<bool> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store()
            .put_opts(path, PutPayload::from_bytes(bytes), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.obj_err(e)),
        }
    }

    /// Reads a small object; `None` when absent.
    pub async fn get_object(&self, path: &Path) -> Result<Option<Bytes>> {
        match self.store().get(path).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(|e| self.obj_err(e))?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.obj_err(e)),
        }
    }

    /// Streams an object; `None` when absent.
    pub async fn stream_object(&self, path: &Path) -> Result<Option<super::ByteStream>> {
        match self.store().get(path).await {
            Ok(r) => {
                let id = self.id().to_string();
                Ok(Some(Box::pin(
                    r.into_stream()
                        .map_err(move |e| Error::object_store(&id, e)),
                )))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.obj_err(e)),
        }
    }

    /// Deletes an object; absent is fine.
    pub async fn delete_object(&self, path: &Path) -> Result<()> {
        match self.store().delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.obj_err(e)),
        }
    }

    /// Every object under `prefix` (recursive), with sizes, sorted by path.
    pub async fn list_objects(&self, prefix: &Path) -> Result<Vec<(Path, u64)>> {
        let mut out: Vec<(Path, u64)> = self
            .store()
            .list(Some(prefix))
            .map_ok(|m| (m.location, m.size))
            .try_collect()
            .await
            .map_err(|e| self.obj_err(e))?;
        out.sort();
        Ok(out)
    }

    /// The immediate children (directories) of `prefix`.
    pub async fn list_dirs(&self, prefix: &Path) -> Result<Vec<Path>> {
        let l = self
            .store()
            .list_with_delimiter(Some(prefix))
            .await
            .map_err(|e| self.obj_err(e))?;
        Ok(l.common_prefixes)
    }

    /// Deletes everything under `prefix`.
    pub async fn delete_prefix(&self, prefix: &Path) -> Result<()> {
        for (p, _) in self.list_objects(prefix).await? {
            self.delete_object(&p).await?;
        }
        Ok(())
    }

    /// Streams `body` into a new object at `path` (multipart: memory stays bounded by the part
    /// size). Returns the bytes written. On error the partial upload is aborted: nothing appears.
    pub async fn put_stream<S>(&self, path: &Path, mut body: S) -> Result<u64>
    where
        S: Stream<Item = Result<Bytes>> + Unpin + Send,
    {
        let upload = self
            .store()
            .put_multipart(path)
            .await
            .map_err(|e| self.obj_err(e))?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut n: u64 = 0;
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(c) => {
                    n += c.len() as u64;
                    if let Err(e) = w.wait_for_capacity(2).await {
                        return Err(self.obj_err(e));
                    }
                    w.put(c);
                }
                Err(e) => {
                    let _ = w.abort().await;
                    return Err(e);
                }
            }
        }
        w.finish().await.map_err(|e| self.obj_err(e))?;
        Ok(n)
    }
}
