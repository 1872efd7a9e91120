//! `StorageEngine`: an `object_store` store holding content in the Distribution layout.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::signer::Signer;
use object_store::{BackoffConfig, ClientOptions, RetryConfig};
use object_store::{
    GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
};
use std::collections::BTreeMap;
use std::time::Duration;

use super::layout;
use super::{
    BlobHit, BlobRead, ByteStream, Change, Content, Engine, EngineKind, GetBlob, Hit, Lookup,
    Manifest, ManifestMeta, TagLink,
};
use crate::config::urls::check_storage_url as check_url;
use crate::error::{EngineError, Error, Result};
use crate::oci::manifest::MAX_MANIFEST;
use crate::oci::{media, Digest, Reference, RepoName, Tag};

/// Blobs smaller than this are committed with one conditional `put`; larger ones stream through a
/// multipart upload.
const SINGLE_PUT_MAX: u64 = 16 << 20;

#[derive(Debug)]
pub struct StorageEngine {
    id: String,
    store: Arc<dyn ObjectStore>,
    /// The directory of a `file://` engine: lets hits read files directly and commits hard-link
    /// spool files into place (an atomic create-if-absent, no copy).
    local_root: Option<PathBuf>,
    /// Signs URLs of a cloud store (and the key prefix the store's paths are under), for blob
    /// GETs redirected to the store.
    signer: Option<(Arc<dyn Signer>, Path)>,
    /// Sizes of the blobs this process committed to a `file://` engine: with the size recorded
    /// on the file itself (an extended attribute, where the filesystem has them), what a hit
    /// checks the file's length against, so a file another writer replaced by one of another
    /// length is caught too.
    committed: moka::sync::Cache<Digest, u64>,
}

fn committed_sizes() -> moka::sync::Cache<Digest, u64> {
    moka::sync::Cache::builder().max_capacity(100_000).build()
}

/// A blob's file in a `file://` engine, checked (see [`StorageEngine::open_local_file`]).
pub(crate) struct LocalFile {
    pub file: std::fs::File,
    pub size: u64,
}

/// Links and other small objects of the layout are read whole only up to this size.
const MAX_LINK: usize = 4 << 10;

/// A bounded read of a small object.
enum Small {
    Absent,
    /// Larger than the bound: nothing was kept.
    TooLarge,
    Read(Bytes, object_store::ObjectMeta),
}

/// Retries inside object_store are kept short: a failing engine is better replaced by the next
/// one (the miss path does that) than waited for.
fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
            base: 2.0,
        },
        max_retries: 2,
        retry_timeout: Duration::from_secs(5),
    }
}

fn client_options() -> ClientOptions {
    let mut o = ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        // Whole-request bound: a blob stream is re-requested from its offset by the fill when
        // it fails, so this only has to stop a stalled transfer, not a slow big one.
        .with_timeout(Duration::from_secs(300))
        .with_pool_idle_timeout(Duration::from_secs(60));
    if let Some(dns) = super::dns::shared() {
        o = o.with_dns_resolver(dns);
    }
    o
}

/// Builds an S3, GCS or Azure store from its URL and object_store configuration keys (applied
/// after our defaults, so the user's `options` win). Credentials also come from the environment,
/// as object_store's `from_env` reads them.
type Cloud = (Arc<dyn ObjectStore>, Option<(Arc<dyn Signer>, Path)>);

fn cloud_store(url: &url::Url, options: &BTreeMap<String, String>) -> Result<Cloud, String> {
    let bad = |k: &str, e: &dyn std::fmt::Display| format!("option {k:?}: {e}");
    let (store, signer, prefix): (Arc<dyn ObjectStore>, Arc<dyn Signer>, Path) = match url.scheme()
    {
        "s3" | "s3a" => {
            let mut b = AmazonS3Builder::from_env()
                .with_url(url.as_str())
                .with_retry(retry_config())
                .with_client_options(client_options());
            for (k, v) in options {
                let key: AmazonS3ConfigKey = k.parse().map_err(|e| bad(k, &e))?;
                b = b.with_config(key, v);
            }
            let s = Arc::new(b.build().map_err(|e| e.to_string())?);
            (s.clone(), s, url_prefix(url, false))
        }
        "gs" => {
            let mut b = GoogleCloudStorageBuilder::from_env()
                .with_url(url.as_str())
                .with_retry(retry_config())
                .with_client_options(client_options());
            for (k, v) in options {
                let key: GoogleConfigKey = k.parse().map_err(|e| bad(k, &e))?;
                b = b.with_config(key, v);
            }
            let s = Arc::new(b.build().map_err(|e| e.to_string())?);
            (s.clone(), s, url_prefix(url, false))
        }
        _ => {
            let mut b = MicrosoftAzureBuilder::from_env()
                .with_url(url.as_str())
                .with_retry(retry_config())
                .with_client_options(client_options());
            for (k, v) in options {
                let key: AzureConfigKey = k.parse().map_err(|e| bad(k, &e))?;
                b = b.with_config(key, v);
            }
            let abfs = matches!(url.scheme(), "abfs" | "abfss");
            let s = Arc::new(b.build().map_err(|e| e.to_string())?);
            (s.clone(), s, url_prefix(url, abfs))
        }
    };
    let store: Arc<dyn ObjectStore> = if prefix.as_ref().is_empty() {
        store
    } else {
        Arc::new(PrefixStore::new(store, prefix.clone()))
    };
    Ok((store, Some((signer, prefix))))
}

/// The key prefix a bucket URL names (`s3://bucket/registry` → `registry`). For `az://` and
/// `abfs://` URLs object_store takes the container from the host or user part, so the path is the
/// prefix there too.
fn url_prefix(url: &url::Url, _abfs: bool) -> Path {
    Path::from(url.path().trim_matches('/'))
}

impl StorageEngine {
    /// Puts a spooled blob under its digest: a hard link on a `file://` engine, an upload
    /// otherwise. A copy already there counts only if it is whole: a file of another size, a link
    /// or a special file in its place is replaced (never taken as "already exists, done").
    async fn put_blob_data(&self, digest: &Digest, file: &FsPath, size: u64) -> Result<()> {
        let dest = layout::blob_data(digest);
        if let Some(root) = &self.local_root {
            match self.link_local(root, digest, &dest, file, size).await {
                Ok(true) => return Ok(()),
                // Another filesystem: the store's own (staged, renamed) upload below.
                Ok(false) => {}
                Err(e) => return Err(Error::engine(&self.id, EngineError::from_io(e))),
            }
        }
        let replace = match self.store.head(&dest).await {
            Ok(m) if m.size == size => return Ok(()),
            Ok(_) => true,
            _ => false,
        };
        self.upload_file(&dest, file, size, replace).await?;
        if let Some(root) = &self.local_root {
            if let Ok((f, _)) = crate::fileio::open_beneath(root, dest.as_ref()) {
                crate::fileio::record_size(&f, size);
            }
        }
        Ok(())
    }

    /// Commits a spool file to a `file://` engine by hard links made inside a directory opened
    /// without following links (so no write lands outside the store). A hard link is an atomic
    /// create-if-absent: the blob appears whole or not at all, and a concurrent commit of the same
    /// digest simply finds it there. A copy already there that is not whole (another size, a
    /// link, a special file) is replaced by a link beside it renamed over it: readers see the old
    /// file or the new one, never a partial one. `Ok(false)`: the spool is on another filesystem.
    async fn link_local(
        &self,
        root: &FsPath,
        digest: &Digest,
        dest: &Path,
        file: &FsPath,
        size: u64,
    ) -> std::io::Result<bool> {
        use rustix::fs::AtFlags;
        // The committed size, recorded on the inode the link shares: a hit checks it.
        if let Ok(f) = std::fs::File::open(file) {
            crate::fileio::record_size(&f, size);
        }
        let rel = dest.as_ref();
        let (dir_rel, name) = rel.rsplit_once('/').unwrap_or(("", rel));
        let (root2, dir_rel2, name2, spool) = (
            root.to_path_buf(),
            dir_rel.to_string(),
            name.to_string(),
            file.to_path_buf(),
        );
        let linked =
            tokio::task::spawn_blocking(move || -> std::io::Result<Option<rustix::fd::OwnedFd>> {
                let dir = crate::fileio::dir_beneath(&root2, &dir_rel2)?;
                match rustix::fs::linkat(
                    rustix::fs::CWD,
                    &spool,
                    &dir,
                    name2.as_str(),
                    AtFlags::empty(),
                ) {
                    Ok(()) => Ok(None),
                    Err(rustix::io::Errno::EXIST) => Ok(Some(dir)),
                    // Another filesystem, or one without hard links: upload instead.
                    Err(
                        rustix::io::Errno::XDEV
                        | rustix::io::Errno::PERM
                        | rustix::io::Errno::OPNOTSUPP
                        | rustix::io::Errno::MLINK,
                    ) => Err(std::io::ErrorKind::CrossesDevices.into()),
                    Err(e) => Err(e.into()),
                }
            })
            .await
            .map_err(std::io::Error::other)?;
        let dir = match linked {
            Ok(None) => return Ok(true),
            Ok(Some(dir)) => dir,
            Err(e) if e.kind() == std::io::ErrorKind::CrossesDevices => {
                // The store's upload replaces whatever is there only if told to: drop a bad copy.
                if !self.local_whole(digest, size).await {
                    if let Ok(d) = crate::fileio::dir_beneath(root, dir_rel) {
                        let _ = rustix::fs::unlinkat(&d, name, AtFlags::empty());
                    }
                }
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        if self.local_whole(digest, size).await {
            return Ok(true);
        }
        tracing::warn!(engine = %self.id, %digest, "replacing a bad local copy");
        let (name, spool) = (name.to_string(), file.to_path_buf());
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let tmp = format!("{name}.{:016x}.tmp", rand::random::<u64>());
            rustix::fs::linkat(
                rustix::fs::CWD,
                &spool,
                &dir,
                tmp.as_str(),
                AtFlags::empty(),
            )?;
            if let Err(e) = rustix::fs::renameat(&dir, tmp.as_str(), &dir, name.as_str()) {
                let _ = rustix::fs::unlinkat(&dir, tmp.as_str(), AtFlags::empty());
                return Err(e.into());
            }
            Ok(())
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(true)
    }

    /// Whether the local file of `digest` is a regular file of `size` bytes (a hit would serve it).
    async fn local_whole(&self, digest: &Digest, size: u64) -> bool {
        matches!(self.open_local_file(digest).await, Ok(Some(lf)) if lf.size == size)
    }

    /// A URL a client can fetch the blob from directly, valid for `expires_in` (cloud stores).
    async fn presigned_get(
        &self,
        digest: &Digest,
        expires_in: Duration,
    ) -> Result<Option<url::Url>> {
        let Some((signer, prefix)) = &self.signer else {
            return Ok(None);
        };
        let key = layout::blob_data(digest);
        let full = if prefix.as_ref().is_empty() {
            key
        } else {
            Path::from(format!("{prefix}/{key}"))
        };
        signer
            .signed_url(http::Method::GET, &full, expires_in)
            .await
            .map(Some)
            .map_err(|e| self.fail(e))
    }

    /// A read of the store's object of the blob (or a range of it): one request.
    async fn read_blob(&self, digest: &Digest, opts: GetBlob) -> Result<Option<BlobRead>> {
        // One request: a miss that asks this engine pays a single GET, "not found" included.
        let path = layout::blob_data(digest);
        let range = opts.range.map(|r| match r.end {
            Some(end) => GetRange::Bounded(r.start..end),
            None => GetRange::Offset(r.start),
        });
        let gopts = GetOptions {
            range,
            ..Default::default()
        };
        let res = match self.store.get_opts(&path, gopts).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.fail(e)),
        };
        let size = res.meta.size;
        let (offset, len) = (res.range.start, res.range.end - res.range.start);
        if opts.range.is_some_and(|r| r.start != offset) {
            return Err(Error::permanent(
                &self.id,
                format!("asked for offset {:?}, got {offset}", opts.range),
            ));
        }
        let stream: ByteStream = match res.payload {
            // A local directory used as a remote engine: large reads, not 8 KiB ones.
            object_store::GetResultPayload::File(file, _) => {
                crate::fileio::stream_range(Arc::new(file), offset, len)
            }
            object_store::GetResultPayload::Stream(s) => {
                let id = self.id.clone();
                Box::pin(s.map_err(move |e| Error::object_store(&id, e)))
            }
        };
        Ok(Some(BlobRead {
            size,
            offset,
            len,
            stream,
        }))
    }

    /// The blob's file, opened without following any link below the engine's directory; only a
    /// regular file whose length is the size recorded at its commit (when one was recorded) is
    /// served. Anything else (a link, a FIFO, a truncated or overwritten file) reads as absent: the
    /// miss path fetches the blob again and its commit replaces the bad copy.
    pub(crate) async fn open_local_file(&self, digest: &Digest) -> Result<Option<LocalFile>> {
        let Some(root) = &self.local_root else {
            return Ok(None);
        };
        let rel = layout::blob_data(digest);
        match crate::fileio::open_beneath(root, rel.as_ref()) {
            Ok((file, size)) => {
                match crate::fileio::recorded_size(&file).or_else(|| self.committed.get(digest)) {
                    Some(recorded) if recorded != size => {
                        tracing::warn!(engine = %self.id, %digest, size, recorded,
                        "local blob file has another size than was committed; not served");
                        Ok(None)
                    }
                    _ => Ok(Some(LocalFile { file, size })),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                tracing::warn!(engine = %self.id, %digest, error = %e, "local blob file not served");
                Ok(None)
            }
            Err(e) => Err(Error::engine(&self.id, EngineError::from_io(e))),
        }
    }

    /// Builds the store for `url`; `options` are object_store configuration keys.
    pub fn open(
        id: &str,
        url: &str,
        options: &std::collections::BTreeMap<String, String>,
    ) -> Result<StorageEngine> {
        let cfg_err = |m: String| Error::Config(format!("storage.engines.{id}.url: {m}"));
        check_url(url, options).map_err(cfg_err)?;
        if let Some(rest) = url.strip_prefix("file://") {
            let dir = PathBuf::from(rest);
            let dir = if dir.is_absolute() {
                dir
            } else {
                std::env::current_dir()?.join(dir)
            };
            std::fs::create_dir_all(&dir)
                .map_err(|e| cfg_err(format!("cannot create {}: {e}", dir.display())))?;
            let dir = dir.canonicalize()?;
            let store =
                LocalFileSystem::new_with_prefix(&dir).map_err(|e| cfg_err(e.to_string()))?;
            let store = super::nofollow::NoFollow::new(store, dir.clone());
            return Ok(StorageEngine {
                id: id.into(),
                store: Arc::new(store),
                local_root: Some(dir),
                signer: None,
                committed: committed_sizes(),
            });
        }
        let parsed = url::Url::parse(url).map_err(|e| cfg_err(e.to_string()))?;
        if parsed.scheme() == "memory" {
            return Ok(StorageEngine::from_store(id, Arc::new(InMemory::new())));
        }
        let (store, signer) = cloud_store(&parsed, options).map_err(cfg_err)?;
        let mut e = StorageEngine::from_store(id, store);
        e.signer = signer;
        Ok(e)
    }

    /// Wraps any store (tests use this with fault-injecting wrappers).
    pub fn from_store(id: &str, store: Arc<dyn ObjectStore>) -> StorageEngine {
        StorageEngine {
            id: id.into(),
            store,
            local_root: None,
            signer: None,
            committed: committed_sizes(),
        }
    }

    /// The object store under the engine (ociedge's own state objects live under `_ociedge/`).
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub fn local_root(&self) -> Option<&FsPath> {
        self.local_root.as_deref()
    }

    /// An object store failure of this engine, by kind.
    fn fail(&self, e: object_store::Error) -> Error {
        Error::object_store(&self.id, e)
    }

    /// Reads a small object whole, never more than `max` bytes into memory (the size the store
    /// reports is checked before any byte is read, and the bytes as they come).
    async fn read_bounded(&self, path: &Path, max: usize) -> Result<Small> {
        let r = match self.store.get(path).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(Small::Absent),
            Err(e) => return Err(self.fail(e)),
        };
        let meta = r.meta.clone();
        if meta.size > max as u64 {
            return Ok(Small::TooLarge);
        }
        let mut body = BytesMut::with_capacity(meta.size as usize);
        let mut stream = r.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.fail(e))?;
            if body.len() + chunk.len() > max {
                return Ok(Small::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Small::Read(body.freeze(), meta))
    }

    /// Reads a link or other small object whole; `None` when absent. One larger than
    /// [`MAX_LINK`] is not a link: an engine error.
    async fn read_small(&self, path: &Path) -> Result<Option<(Bytes, object_store::ObjectMeta)>> {
        match self.read_bounded(path, MAX_LINK).await? {
            Small::Absent => Ok(None),
            Small::Read(bytes, meta) => Ok(Some((bytes, meta))),
            Small::TooLarge => Err(Error::permanent(
                &self.id,
                format!("{path}: larger than {MAX_LINK} bytes, not a link"),
            )),
        }
    }

    /// Writes a content-addressed object unless it is there (`replace`: write it anyway, over a
    /// copy known to be bad).
    async fn put_if_absent(&self, path: &Path, bytes: Bytes, replace: bool) -> Result<()> {
        let opts = PutOptions {
            mode: if replace {
                PutMode::Overwrite
            } else {
                PutMode::Create
            },
            ..Default::default()
        };
        match self
            .store
            .put_opts(path, PutPayload::from_bytes(bytes), opts)
            .await
        {
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
            // Stores without conditional create: content-addressed, so an overwrite is harmless.
            Err(object_store::Error::NotImplemented { .. }) => Ok(()),
            Err(e) => Err(self.fail(e)),
        }
    }

    async fn put_link(&self, path: &Path, digest: &Digest) -> Result<()> {
        self.store
            .put(path, PutPayload::from(digest.to_string().into_bytes()))
            .await
            .map(|_| ())
            .map_err(|e| self.fail(e))
    }

    /// Points a link at `digest` with a compare-and-swap where the store has one
    /// (`PutMode::Create` when absent, `PutMode::Update` on the version read): two processes
    /// moving one tag at once never interleave, and each write is decided against the value it
    /// replaced. Losing to a writer of the same digest is success; losing to another digest is
    /// retried (the latest push wins, as in Distribution). Stores without conditional updates
    /// (the local filesystem) fall back to a plain overwrite, which is atomic there (rename).
    async fn swap_link(&self, path: &Path, digest: &Digest) -> Result<()> {
        let body = || PutPayload::from(digest.to_string().into_bytes());
        for _ in 0..5 {
            let mode = match self.store.get(path).await {
                Ok(r) => {
                    let version = object_store::UpdateVersion {
                        e_tag: r.meta.e_tag.clone(),
                        version: r.meta.version.clone(),
                    };
                    let current = r.bytes().await.map_err(|e| self.fail(e))?;
                    if layout::parse_link(&current).as_ref() == Some(digest) {
                        return Ok(());
                    }
                    if version.e_tag.is_none() && version.version.is_none() {
                        break;
                    }
                    PutMode::Update(version)
                }
                Err(object_store::Error::NotFound { .. }) => PutMode::Create,
                Err(e) => return Err(self.fail(e)),
            };
            let opts = PutOptions {
                mode,
                ..Default::default()
            };
            match self.store.put_opts(path, body(), opts).await {
                Ok(_) => return Ok(()),
                // Someone else wrote first: look again.
                Err(object_store::Error::Precondition { .. })
                | Err(object_store::Error::AlreadyExists { .. }) => continue,
                Err(object_store::Error::NotImplemented { .. })
                | Err(object_store::Error::NotSupported { .. }) => break,
                Err(e) => return Err(self.fail(e)),
            }
        }
        self.put_link(path, digest).await
    }

    /// Stores manifest bytes under their digest; a copy already there that does not hash to it
    /// (truncated, overwritten) is replaced rather than taken as "already exists".
    async fn put_manifest_bytes(&self, digest: &Digest, bytes: Bytes) -> Result<()> {
        let path = layout::blob_data(digest);
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&path, PutPayload::from_bytes(bytes.clone()), opts)
            .await
        {
            Ok(_) | Err(object_store::Error::NotImplemented { .. }) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => {
                let whole = matches!(self.read_small(&path).await,
                    Ok(Some((have, _))) if digest.same_algorithm_of(&have) == *digest);
                if whole {
                    return Ok(());
                }
                tracing::warn!(engine = %self.id, %digest, "replacing a bad stored manifest");
                self.put_if_absent(&path, bytes, true).await
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Streams a verified local file into the store.
    async fn upload_file(
        &self,
        dest: &Path,
        file: &FsPath,
        size: u64,
        replace: bool,
    ) -> Result<()> {
        let f = Arc::new(std::fs::File::open(file)?);
        if size <= SINGLE_PUT_MAX {
            let bytes = crate::fileio::read_at(f, 0, size as usize).await?;
            return self.put_if_absent(dest, bytes, replace).await;
        }
        let upload = self
            .store
            .put_multipart(dest)
            .await
            .map_err(|e| self.fail(e))?;
        let mut writer = object_store::WriteMultipart::new(upload);
        let mut chunks = crate::fileio::stream_range(f, 0, size);
        while let Some(chunk) = chunks.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    writer.abort().await.ok();
                    return Err(e);
                }
            };
            writer
                .wait_for_capacity(4)
                .await
                .map_err(|e| self.fail(e))?;
            writer.put(chunk);
        }
        writer.finish().await.map(|_| ()).map_err(|e| self.fail(e))
    }
}

#[async_trait]
impl Engine for StorageEngine {
    fn id(&self) -> &str {
        &self.id
    }

    fn kind(&self) -> EngineKind {
        EngineKind::Storage
    }

    async fn open_blob(
        &self,
        _repo: &RepoName,
        digest: &Digest,
        want: Lookup,
    ) -> Result<Option<BlobHit>> {
        if self.local_root.is_some() {
            // Absent, or a copy that is not served (see `open_local_file`).
            let Some(lf) = self.open_local_file(digest).await? else {
                return Ok(None);
            };
            let range = want.range.map(|r| r.resolve(lf.size)).transpose()?;
            let mut hit = BlobHit {
                size: lf.size,
                range,
                body: None,
            };
            if want.body {
                let (offset, len) = hit.span();
                hit.body = Some(Hit::File(crate::fileio::FileSlice {
                    file: Arc::new(lf.file),
                    offset,
                    len,
                    keep: None,
                }));
            }
            return Ok(Some(hit));
        }
        // A whole read: one request, "not found" included (what a miss asking this engine pays).
        if want.body && want.range.is_none() && want.redirect.is_none() {
            return Ok(self
                .read_blob(digest, GetBlob::default())
                .await?
                .map(|read| BlobHit {
                    size: read.size,
                    range: None,
                    body: Some(Hit::Stream(read.stream)),
                }));
        }
        // Ranges are resolved against the size, so it is asked first.
        let size = match self.store.head(&layout::blob_data(digest)).await {
            Ok(m) => m.size,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.fail(e)),
        };
        let range = want.range.map(|r| r.resolve(size)).transpose()?;
        let mut hit = BlobHit {
            size,
            range,
            body: None,
        };
        if !want.body {
            return Ok(Some(hit));
        }
        if let Some(expiry) = want.redirect {
            match self.presigned_get(digest, expiry).await {
                Ok(Some(url)) => {
                    hit.body = Some(Hit::Redirect(url));
                    return Ok(Some(hit));
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "cannot presign; serving the bytes"),
            }
        }
        let Some(read) = self.read_blob(digest, GetBlob { range }).await? else {
            return Ok(None);
        };
        hit.body = Some(Hit::Stream(read.stream));
        Ok(Some(hit))
    }

    async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        _accept: &[String],
    ) -> Result<Option<Manifest>> {
        let digest = match reference {
            Reference::Digest(d) => d.clone(),
            Reference::Tag(t) => match self.tag_link(repo, t).await? {
                Some(link) => link.digest,
                None => return Ok(None),
            },
        };
        // Blobs and manifests share one store: content larger than a manifest can be, or that
        // is not a manifest (a layer, an image config), is no manifest here, and is never read
        // into memory beyond the bound.
        let bytes = match self
            .read_bounded(&layout::blob_data(&digest), MAX_MANIFEST)
            .await?
        {
            Small::Read(bytes, _) => bytes,
            Small::Absent | Small::TooLarge => return Ok(None),
        };
        // Never serve bytes that do not hash to the name they are served under.
        let actual = digest.same_algorithm_of(&bytes);
        if actual != digest {
            return Err(Error::DigestMismatch {
                expected: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        // Only what is a manifest is answered as one (a layer's digest names no manifest, nor
        // does a JSON blob declaring another media type).
        if !media::is_manifest(&bytes) {
            return Ok(None);
        }
        let Some(media_type) = media::sniff_manifest(&bytes) else {
            tracing::debug!(%digest, "stored content is not of a manifest media type");
            return Ok(None);
        };
        Ok(Some(Manifest {
            digest,
            media_type,
            bytes,
        }))
    }

    async fn head_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        accept: &[String],
    ) -> Result<Option<ManifestMeta>> {
        Ok(self
            .get_manifest(repo, reference, accept)
            .await?
            .map(|m| ManifestMeta {
                size: m.bytes.len() as u64,
                digest: m.digest,
                media_type: m.media_type,
            }))
    }

    async fn tag_link(&self, repo: &RepoName, tag: &Tag) -> Result<Option<TagLink>> {
        let Some((bytes, meta)) = self.read_small(&layout::tag_current(repo, tag)).await? else {
            return Ok(None);
        };
        let digest = layout::parse_link(&bytes).ok_or_else(|| {
            Error::permanent(&self.id, format!("corrupt tag link for {repo}:{tag}"))
        })?;
        Ok(Some(TagLink {
            digest,
            modified: Some(meta.last_modified.into()),
        }))
    }

    /// The tags whose `current/link` exists. A directory alone is no tag: a filesystem keeps the
    /// emptied directories of a deleted tag, and Distribution may leave an `index/` behind.
    async fn list_tags(&self, repo: &RepoName) -> Result<Option<Vec<String>>> {
        let dir = layout::tags_dir(repo);
        let prefix = format!("{}/", dir.as_ref());
        let listing: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(|e| self.fail(e))?;
        let mut tags: Vec<String> = listing
            .iter()
            .filter_map(|m| {
                let rest = m.location.as_ref().strip_prefix(&prefix)?;
                let tag = rest.strip_suffix("/current/link")?;
                (!tag.contains('/')).then(|| tag.to_string())
            })
            .collect();
        if tags.is_empty() {
            return Ok(None);
        }
        tags.sort();
        tags.dedup();
        Ok(Some(tags))
    }

    async fn put_blob_file(&self, digest: &Digest, file: &FsPath, size: u64) -> Result<()> {
        let res = self.put_blob_data(digest, file, size).await;
        if res.is_ok() && self.local_root.is_some() {
            self.committed.insert(digest.clone(), size);
        }
        res
    }

    async fn put_manifest(&self, repo: &RepoName, manifest: &Manifest) -> Result<()> {
        self.put_manifest_bytes(&manifest.digest, manifest.bytes.clone())
            .await?;
        self.put_link(
            &layout::revision_link(repo, &manifest.digest),
            &manifest.digest,
        )
        .await
    }

    async fn is_linked(&self, repo: &RepoName, content: &Content) -> Result<bool> {
        match self.store.head(&content_link(repo, content)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.fail(e)),
        }
    }

    async fn update(&self, repo: &RepoName, change: &Change) -> Result<bool> {
        match change {
            Change::Link(c) => {
                self.put_link(&content_link(repo, c), c.digest()).await?;
                Ok(true)
            }
            Change::Tag(tag, digest) => {
                self.put_link(&layout::tag_index(repo, tag, digest), digest)
                    .await?;
                self.swap_link(&layout::tag_current(repo, tag), digest)
                    .await?;
                Ok(true)
            }
            Change::Untag(tag) => {
                let present = self
                    .read_small(&layout::tag_current(repo, tag))
                    .await?
                    .is_some();
                let dir = Path::from(format!("{}/{tag}", layout::tags_dir(repo)));
                self.delete_prefix(&dir).await?;
                Ok(present)
            }
            Change::Unlink(c @ Content::Manifest(digest)) => {
                let link = content_link(repo, c);
                let present = self.read_small(&link).await?.is_some();
                for tag in self.list_tags(repo).await?.unwrap_or_default() {
                    let Ok(tag) = tag.parse::<Tag>() else {
                        continue;
                    };
                    if self
                        .tag_link(repo, &tag)
                        .await?
                        .is_some_and(|l| &l.digest == digest)
                    {
                        self.update(repo, &Change::Untag(tag)).await?;
                    }
                }
                self.delete_object(&link).await?;
                Ok(present)
            }
            Change::Unlink(c @ Content::Blob(_)) => {
                let link = content_link(repo, c);
                let present = self.read_small(&link).await?.is_some();
                self.delete_object(&link).await?;
                Ok(present)
            }
        }
    }

    async fn probe(&self) -> Result<()> {
        match self.store.head(&layout::probe_object()).await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.fail(e)),
        }
    }
}

/// The link object by which `repo` holds `content`.
fn content_link(repo: &RepoName, content: &Content) -> Path {
    match content {
        Content::Blob(d) => layout::layer_link(repo, d),
        Content::Manifest(d) => layout::revision_link(repo, d),
    }
}

/// Resolves an optional range against the blob size into `(offset, len)`.
pub fn resolve_range(opts: GetBlob, size: u64) -> Result<(u64, u64)> {
    match opts.range {
        None => Ok((0, size)),
        Some(r) => {
            let end = r.end.unwrap_or(size).min(size);
            if r.start >= size || r.start >= end {
                return Err(Error::engine(
                    "range",
                    EngineError::RangeInvalid(format!(
                        "range starts at {} but the blob has {size} bytes",
                        r.start
                    )),
                ));
            }
            Ok((r.start, end - r.start))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Engine, EngineExt};

    async fn race(engine: Arc<StorageEngine>) {
        let repo: RepoName = "team/app".parse().unwrap();
        let tag: Tag = "latest".parse().unwrap();
        let digests: Vec<Digest> = (0..8u8).map(|i| Digest::sha256_of(&[i])).collect();
        let writes = digests.iter().map(|d| {
            let (e, r, t, d) = (engine.clone(), repo.clone(), tag.clone(), d.clone());
            tokio::spawn(async move { e.put_tag(&r, &t, &d).await })
        });
        for w in futures::future::join_all(writes).await {
            w.unwrap().unwrap();
        }
        let link = engine.tag_link(&repo, &tag).await.unwrap().unwrap();
        assert!(
            digests.contains(&link.digest),
            "the tag ends on one of the written digests"
        );
        // Writing the current value again is a no-op success.
        engine.put_tag(&repo, &tag, &link.digest).await.unwrap();
    }

    /// A deleted tag leaves no trace in the listing, on every kind of store (a filesystem keeps
    /// the emptied directories).
    async fn deleted_tag_is_not_listed(engine: StorageEngine) {
        let repo: RepoName = "team/app".parse().unwrap();
        let m = Manifest {
            digest: Digest::sha256_of(b"{}"),
            media_type: media::OCI_MANIFEST.to_string(),
            bytes: Bytes::from_static(b"{}"),
        };
        engine.put_manifest(&repo, &m).await.unwrap();
        for t in ["a", "b"] {
            engine
                .put_tag(&repo, &t.parse().unwrap(), &m.digest)
                .await
                .unwrap();
        }
        engine
            .delete_tag(&repo, &"a".parse().unwrap())
            .await
            .unwrap();
        assert_eq!(
            engine.list_tags(&repo).await.unwrap(),
            Some(vec!["b".to_string()])
        );
        engine
            .delete_tag(&repo, &"b".parse().unwrap())
            .await
            .unwrap();
        assert_eq!(engine.list_tags(&repo).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_deleted_tag_is_not_listed_on_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let e = StorageEngine::open(
            "f",
            &format!("file://{}", dir.path().display()),
            &Default::default(),
        )
        .unwrap();
        deleted_tag_is_not_listed(e).await;
    }

    #[tokio::test]
    async fn a_deleted_tag_is_not_listed_in_memory() {
        deleted_tag_is_not_listed(StorageEngine::from_store("m", Arc::new(InMemory::new()))).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_tag_writes_compare_and_swap() {
        // InMemory supports PutMode::Update: the compare-and-swap path.
        race(Arc::new(StorageEngine::from_store(
            "m",
            Arc::new(InMemory::new()),
        )))
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_tag_writes_fall_back_on_a_directory() {
        // The local filesystem has no conditional update: the documented overwrite fallback.
        let dir = tempfile::tempdir().unwrap();
        let e = StorageEngine::open(
            "f",
            &format!("file://{}", dir.path().display()),
            &Default::default(),
        )
        .unwrap();
        race(Arc::new(e)).await;
    }
}
