//! A `file://` engine's object store that never reads through a symbolic link.
//!
//! object_store's `LocalFileSystem` follows links, out of the root included: a blob file replaced
//! by a link to the TLS key would be read as that blob. Every read (`get`, `head`, ranges) goes
//! through [`NoFollow`]: the file is first opened with [`crate::fileio::open_beneath`] (no link
//! anywhere below the root, a regular file only), and the file `LocalFileSystem` then opens must be
//! that same file (device and inode), so a swap between the two opens is refused too. A link or a
//! special file reads as absent: the miss path fetches the object again and the commit replaces
//! it. Before a write (put, copy, rename) the object's directory is made free of links (a link in
//! the way is removed), and a delete whose path passes through a link is refused, so no write or
//! delete lands outside the store. Listings are `LocalFileSystem`'s (they follow links; what they
//! list is still read, written and deleted only as above).

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
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

/// The object's directory, relative to the root.
fn parent_of(inner: &LocalFileSystem, root: &std::path::Path, location: &Path) -> Result<String> {
    let full = inner.path_to_filesystem(location)?;
    let rel = full
        .strip_prefix(root)
        .ok()
        .and_then(|r| r.to_str())
        .ok_or_else(|| object_store::Error::Generic {
            store: "NoFollow",
            source: format!("{} is outside the store", full.display()).into(),
        })?;
    Ok(rel
        .rsplit_once('/')
        .map(|(d, _)| d)
        .unwrap_or("")
        .to_string())
}

/// Makes sure no link is in the way of `location`'s directory: `make` makes it (removing a link
/// in the way), otherwise a link is an error and a missing directory is fine.
async fn clear_path(
    inner: Arc<LocalFileSystem>,
    root: PathBuf,
    location: Path,
    make: bool,
) -> Result<()> {
    let generic = |e: Box<dyn std::error::Error + Send + Sync>| object_store::Error::Generic {
        store: "NoFollow",
        source: e,
    };
    tokio::task::spawn_blocking(move || {
        let dir = parent_of(&inner, &root, &location)?;
        let res = if make {
            crate::fileio::dir_beneath(&root, &dir)
        } else {
            crate::fileio::dir_nofollow(&root, &dir)
        };
        match res {
            Ok(_) => Ok(()),
            Err(e) if !make && e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(generic(Box::new(e))),
        }
    })
    .await
    .map_err(|e| generic(Box::new(e)))?
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
        clear_path(
            self.inner.clone(),
            self.root.clone(),
            location.clone(),
            true,
        )
        .await?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        clear_path(
            self.inner.clone(),
            self.root.clone(),
            location.clone(),
            true,
        )
        .await?;
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
        let (inner, root) = (self.inner.clone(), self.root.clone());
        let checked = locations
            .then(move |loc| {
                let (inner, root) = (inner.clone(), root.clone());
                async move {
                    let loc = loc?;
                    clear_path(inner, root, loc.clone(), false).await?;
                    Ok(loc)
                }
            })
            .boxed();
        self.inner.delete_stream(checked)
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
        clear_path(self.inner.clone(), self.root.clone(), from.clone(), false).await?;
        clear_path(self.inner.clone(), self.root.clone(), to.clone(), true).await?;
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        clear_path(self.inner.clone(), self.root.clone(), from.clone(), false).await?;
        clear_path(self.inner.clone(), self.root.clone(), to.clone(), true).await?;
        self.inner.rename_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::ObjectStoreExt;

    fn store(root: &std::path::Path) -> NoFollow {
        let root = root.canonicalize().expect("canonical");
        NoFollow::new(
            LocalFileSystem::new_with_prefix(&root).expect("store"),
            root,
        )
    }

    #[tokio::test]
    async fn nothing_is_read_written_or_deleted_through_a_link() {
        let root = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::write(outside.path().join("x"), b"outside").expect("write");
        let s = store(root.path());

        // Reads: a linked file and a linked directory read as absent.
        std::os::unix::fs::symlink(outside.path().join("x"), root.path().join("f"))
            .expect("symlink");
        std::os::unix::fs::symlink(outside.path(), root.path().join("d")).expect("symlink");
        for p in ["f", "d/x"] {
            match s.get(&Path::from(p)).await {
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => panic!("{p}: {e}"),
                Ok(_) => panic!("{p} was read through a link"),
            }
            assert!(s.head(&Path::from(p)).await.is_err(), "{p}");
        }
        // A FIFO reads as absent, without blocking.
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.path().join("fifo"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .expect("mkfifo");
        assert!(s.get(&Path::from("fifo")).await.is_err());

        // Deletes: refused through a linked directory.
        assert!(s.delete(&Path::from("d/x")).await.is_err());
        assert_eq!(
            std::fs::read(outside.path().join("x")).expect("x"),
            b"outside"
        );

        // Writes: the link in the way is replaced by a directory of the store.
        s.put(&Path::from("d/y"), PutPayload::from_static(b"mine"))
            .await
            .expect("put");
        assert!(!outside.path().join("y").exists(), "written outside");
        assert!(root
            .path()
            .join("d")
            .symlink_metadata()
            .expect("d")
            .is_dir());
        assert_eq!(
            s.get(&Path::from("d/y"))
                .await
                .expect("get")
                .bytes()
                .await
                .expect("bytes"),
            &b"mine"[..]
        );
        // Plain objects work as before.
        s.put(&Path::from("a/b/c"), PutPayload::from_static(b"abc"))
            .await
            .expect("put");
        assert_eq!(s.head(&Path::from("a/b/c")).await.expect("head").size, 3);
        s.delete(&Path::from("a/b/c")).await.expect("delete");
        assert!(s.head(&Path::from("a/b/c")).await.is_err());
    }
}
