//! A `file://` engine's object store that never reads through a symbolic link.
//!
//! object_store's `LocalFileSystem` follows links, out of the root included: a blob file replaced
//! by a link to the TLS key would be read as that blob. Every read (`get`, `head`, ranges) goes
//! through [`NoFollow`]: the file is first opened with [`crate::fileio::open_beneath`] (no link
//! anywhere below the root, a regular file only), and the file `LocalFileSystem` then opens must be
//! that same file (device and inode), so a swap between the two opens is refused too. A link or a
//! special file reads as absent: the miss path fetches the object again and the commit replaces
//! it. Writes, listings and deletes are `LocalFileSystem`'s.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
};

#[derive(Debug)]
pub struct NoFollow {
    inner: Arc<LocalFileSystem>,
    /// The store's canonical root directory.
    root: PathBuf,
}

impl NoFollow {
    pub fn new(inner: LocalFileSystem, root: PathBuf) -> NoFollow {
        NoFollow {
            inner: Arc::new(inner),
            root,
        }
    }
}

/// Opens the object's file safely; returns its (device, inode).
fn check(inner: &LocalFileSystem, root: &std::path::Path, location: &Path) -> Result<(u64, u64)> {
    let full = inner.path_to_filesystem(location)?;
    let rel = full
        .strip_prefix(root)
        .ok()
        .and_then(|r| r.to_str())
        .ok_or_else(|| object_store::Error::Generic {
            store: "NoFollow",
            source: format!("{} is outside the store", full.display()).into(),
        })?;
    match crate::fileio::open_beneath(root, rel) {
        Ok((f, _)) => {
            let m = f.metadata().map_err(|e| object_store::Error::Generic {
                store: "NoFollow",
                source: Box::new(e),
            })?;
            Ok((m.dev(), m.ino()))
        }
        Err(e) => {
            if e.kind() == std::io::ErrorKind::InvalidData {
                tracing::warn!(path = %full.display(), error = %e, "not read: not a regular file of the store");
            }
            // Absent, or not a file of ours: either way nothing to read here.
            match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::InvalidData => {
                    Err(object_store::Error::NotFound {
                        path: location.to_string(),
                        source: Box::new(e),
                    })
                }
                _ => Err(object_store::Error::Generic {
                    store: "NoFollow",
                    source: Box::new(e),
                }),
            }
        }
    }
}

impl fmt::Display for NoFollow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NoFollow({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for NoFollow {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let (inner, root, loc) = (self.inner.clone(), self.root.clone(), location.clone());
        let want = tokio::task::spawn_blocking(move || check(&inner, &root, &loc))
            .await
            .map_err(|e| object_store::Error::Generic {
                store: "NoFollow",
                source: Box::new(e),
            })??;
        let res = self.inner.get_opts(location, options).await?;
        if let GetResultPayload::File(f, _) = &res.payload {
            let same = f
                .metadata()
                .map(|m| (m.dev(), m.ino()) == want)
                .unwrap_or(false);
            if !same {
                return Err(object_store::Error::NotFound {
                    path: location.to_string(),
                    source: "the file changed while it was opened".into(),
                });
            }
        }
        Ok(res)
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}
