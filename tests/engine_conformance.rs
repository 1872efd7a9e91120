//! The `Engine` contract (`src/engine/mod.rs`), checked the same way on every engine kind, as
//! object_store's `integration.rs` runs one suite on every backend: `memory://`, `file://` (a
//! temporary directory), S3 (moto on loopback) and the registry engine (a CNCF Distribution
//! `docker-registry`, its content pushed through its own API).
//!
//! Every engine is built through the library API as `src/app.rs` builds it. The tests call the
//! engine only through the small adapter below (`stat_blob`, `read_blob`, `link`, …): when the
//! trait changes, only the adapter changes.
//!
//! The S3 and registry suites need moto and docker-registry: `#[ignore]`d for a bare
//! `cargo test`, run by the README's test command, and failing (never skipping) when the program
//! is missing.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ociedge::engine::Engine;
use ociedge::error::Error;
use ociedge::oci::{Digest, RepoName};

// ---------------------------------------------------------------------------------------------
// The adapter: the only code here that calls `Engine` methods. Adapt these when the trait moves.
// ---------------------------------------------------------------------------------------------

mod adapter {
    use std::path::Path;

    use bytes::Bytes;
    use futures::StreamExt;
    use ociedge::engine::{ByteRange, Engine, EngineExt, EngineKind, GetBlob, Manifest};
    use ociedge::error::{Error, Result};
    use ociedge::oci::{media, Digest, Reference, RepoName, Tag};

    /// What a whole read of a blob (or of a range of it) gave.
    #[derive(Debug, PartialEq, Eq)]
    pub struct Read {
        /// The whole blob's size.
        pub size: u64,
        /// Where `bytes` start in the blob.
        pub offset: u64,
        pub bytes: Vec<u8>,
    }

    /// A manifest as `get` returns it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Got {
        pub digest: Digest,
        pub media_type: String,
        pub bytes: Bytes,
    }

    /// A manifest as `head` tells it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Headed {
        pub digest: Digest,
        pub media_type: String,
        pub size: u64,
    }

    /// What a client sends as `Accept`: every manifest type.
    fn accept() -> Vec<String> {
        media::ALL_MANIFESTS.iter().map(|s| s.to_string()).collect()
    }

    fn reference(r: &str) -> Reference {
        Reference::parse(r).unwrap_or_else(|| panic!("bad reference {r}"))
    }

    fn tag(t: &str) -> Tag {
        t.parse().unwrap_or_else(|_| panic!("bad tag {t}"))
    }

    pub fn is_storage(e: &dyn Engine) -> bool {
        e.kind() == EngineKind::Storage
    }

    /// The OCI error code a client is answered with for `e` (engine failures are mapped by
    /// kind, in `Error::to_oci`).
    pub fn error_code(e: &Error) -> Option<&'static str> {
        Some(e.to_oci().code.as_str())
    }

    pub async fn stat_blob(e: &dyn Engine, repo: &RepoName, d: &Digest) -> Result<Option<u64>> {
        Ok(e.stat_blob(repo, d).await?.map(|m| m.size))
    }

    /// Opens the blob (`range` is `start..end`, `end` exclusive) and reads it whole. The engine
    /// must yield exactly the bytes it announced: a short stream is an `Err`.
    pub async fn read_blob(
        e: &dyn Engine,
        repo: &RepoName,
        d: &Digest,
        range: Option<(u64, Option<u64>)>,
    ) -> Result<Option<Read>> {
        read_blob_then(e, repo, d, range, || {}).await
    }

    /// [`read_blob`], running `between` once the blob is open and before its bytes are read.
    pub async fn read_blob_then(
        e: &dyn Engine,
        repo: &RepoName,
        d: &Digest,
        range: Option<(u64, Option<u64>)>,
        between: impl FnOnce(),
    ) -> Result<Option<Read>> {
        let opts = GetBlob {
            range: range.map(|(start, end)| ByteRange { start, end }),
        };
        let Some(mut r) = e.get_blob(repo, d, opts).await? else {
            return Ok(None);
        };
        between();
        let mut bytes = Vec::new();
        while let Some(chunk) = r.stream.next().await {
            bytes.extend_from_slice(&chunk?);
            assert!(
                bytes.len() as u64 <= r.len,
                "{}: the stream yields more than the {} bytes announced",
                e.id(),
                r.len
            );
        }
        assert_eq!(
            bytes.len() as u64,
            r.len,
            "{}: a stream that ended short yielded no error",
            e.id()
        );
        Ok(Some(Read {
            size: r.size,
            offset: r.offset,
            bytes,
        }))
    }

    pub async fn get_manifest(e: &dyn Engine, repo: &RepoName, r: &str) -> Result<Option<Got>> {
        Ok(e.get_manifest(repo, &reference(r), &accept())
            .await?
            .map(|m| Got {
                digest: m.digest,
                media_type: m.media_type,
                bytes: m.bytes,
            }))
    }

    pub async fn head_manifest(e: &dyn Engine, repo: &RepoName, r: &str) -> Result<Option<Headed>> {
        Ok(e.head_manifest(repo, &reference(r), &accept())
            .await?
            .map(|m| Headed {
                digest: m.digest,
                media_type: m.media_type,
                size: m.size,
            }))
    }

    pub async fn list_tags(e: &dyn Engine, repo: &RepoName) -> Result<Option<Vec<String>>> {
        e.list_tags(repo).await
    }

    pub async fn probe(e: &dyn Engine) -> Result<()> {
        e.probe().await
    }

    /// Commits `data` as the blob `d` (from a file in `spool`, as the fill does).
    pub async fn put_blob(e: &dyn Engine, spool: &Path, d: &Digest, data: &[u8]) -> Result<()> {
        let file = spool.join(format!("put-{}-{}", d.hex(), rand_suffix()));
        std::fs::write(&file, data).map_err(Error::Io)?;
        let res = e.put_blob_file(d, &file, data.len() as u64).await;
        let _ = std::fs::remove_file(&file);
        res
    }

    /// Links blob (or, with `manifest`, manifest) `d` into `repo`.
    pub async fn link(e: &dyn Engine, repo: &RepoName, d: &Digest, manifest: bool) -> Result<()> {
        if manifest {
            e.link_manifest(repo, d).await
        } else {
            e.link_blob(repo, d).await
        }
    }

    pub async fn is_linked(
        e: &dyn Engine,
        repo: &RepoName,
        d: &Digest,
        manifest: bool,
    ) -> Result<bool> {
        e.links(repo, d, manifest).await
    }

    /// Stores a manifest (its bytes and media type) and links it into `repo`.
    pub async fn put_manifest(
        e: &dyn Engine,
        repo: &RepoName,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<Digest> {
        let m = Manifest {
            digest: Digest::sha256_of(bytes),
            media_type: media_type.to_string(),
            bytes: Bytes::copy_from_slice(bytes),
        };
        e.put_manifest(repo, &m).await?;
        Ok(m.digest)
    }

    pub async fn put_tag(e: &dyn Engine, repo: &RepoName, t: &str, d: &Digest) -> Result<()> {
        e.put_tag(repo, &tag(t), d).await
    }

    /// Removes a tag. Absent is success.
    pub async fn delete_tag(e: &dyn Engine, repo: &RepoName, t: &str) -> Result<()> {
        e.delete_tag(repo, &tag(t)).await.map(drop)
    }

    /// Removes a manifest from `repo`; whether it was there.
    pub async fn delete_manifest(e: &dyn Engine, repo: &RepoName, d: &Digest) -> Result<bool> {
        e.delete_manifest(repo, d).await
    }

    /// Removes a blob from `repo`; whether it was linked.
    pub async fn delete_blob(e: &dyn Engine, repo: &RepoName, d: &Digest) -> Result<bool> {
        e.delete_blob(repo, d).await
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::SeqCst)
    }
}

use adapter::*;

// ---------------------------------------------------------------------------------------------
// The engines under test.
// ---------------------------------------------------------------------------------------------

/// An engine with what keeps it alive (its directory, its server).
struct Backend {
    engine: Arc<dyn Engine>,
    /// Where put_blob writes its source files.
    spool: tempfile::TempDir,
    /// The directory of a `file://` engine.
    root: Option<PathBuf>,
    /// The registry's URL, for a registry engine (content is pushed through its API).
    registry: Option<String>,
    _keep: Vec<Box<dyn std::any::Any + Send + Sync>>,
}

fn storage(id: &str, url: &str, options: &[(&str, &str)]) -> Arc<dyn Engine> {
    let options = options
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let e = ociedge::engine::storage::StorageEngine::open(id, url, &options)
        .unwrap_or_else(|e| panic!("open {url}: {e}"));
    Arc::new(e)
}

/// An S3 engine on bucket `registry` at `endpoint`, with the harness's credentials.
fn s3_engine(endpoint: &str) -> Arc<dyn Engine> {
    storage(
        "s3",
        "s3://registry",
        &[
            ("endpoint", endpoint),
            ("region", "us-east-1"),
            ("access_key_id", "harness"),
            ("secret_access_key", "harness-secret"),
            ("allow_http", "true"),
        ],
    )
}

impl Backend {
    fn with(engine: Arc<dyn Engine>) -> Backend {
        Backend {
            engine,
            spool: tempfile::tempdir().expect("tempdir"),
            root: None,
            registry: None,
            _keep: Vec::new(),
        }
    }

    async fn memory() -> Backend {
        Backend::with(storage("mem", "memory://", &[]))
    }

    async fn file() -> Backend {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("file://{}", dir.path().display());
        let mut b = Backend::with(storage("disk", &url, &[]));
        b.root = Some(dir.path().canonicalize().expect("canonical"));
        b._keep.push(Box::new(dir));
        b
    }

    /// `inner` in the caching engine the app wraps every engine in: it must keep the contract.
    fn cached(mut inner: Backend) -> Backend {
        use ociedge::engine::caching::{CachingEngine, Freshness, Generation};
        let f = Freshness::local(Duration::from_secs(30));
        inner.engine = Arc::new(CachingEngine::new(inner.engine, Generation::default(), f));
        inner
    }

    async fn cached_memory() -> Backend {
        Backend::cached(Backend::memory().await)
    }

    async fn cached_file() -> Backend {
        Backend::cached(Backend::file().await)
    }

    async fn s3() -> Backend {
        let moto = tokio::task::spawn_blocking(|| common::regions::Moto::start(None, "127.0.0.1"))
            .await
            .expect("moto");
        let engine = s3_engine(&moto.endpoint());
        let mut b = Backend::with(engine);
        b._keep.push(Box::new(moto));
        b
    }

    async fn registry() -> Backend {
        use ociedge::engine::registry::{client, RegistryClient, RegistryEngine};
        let origin = tokio::task::spawn_blocking(common::Origin::start)
            .await
            .expect("docker-registry");
        let base = url::Url::parse(&origin.url()).expect("url");
        let http = client::http_client().expect("http client");
        let engine = RegistryEngine::new(RegistryClient::new("origin", base, http, None));
        let mut b = Backend::with(Arc::new(engine));
        b.registry = Some(origin.url());
        b._keep.push(Box::new(origin));
        b
    }

    fn e(&self) -> &dyn Engine {
        self.engine.as_ref()
    }

    /// Stores `image` in `repo`: through the engine's writes for a storage engine, through the
    /// registry's push API for a registry engine.
    async fn seed(&self, repo: &RepoName, image: &Image) {
        match &self.registry {
            Some(url) => seed_registry(url, repo, image).await,
            None => {
                let e = self.e();
                for (d, data) in image.blobs() {
                    put_blob(e, self.spool.path(), &d, data)
                        .await
                        .expect("put blob");
                    link(e, repo, &d, false).await.expect("link blob");
                }
                for (m, _) in &image.manifests {
                    let d = put_manifest(e, repo, OCI_MANIFEST, m)
                        .await
                        .expect("put manifest");
                    assert_eq!(d, Digest::sha256_of(m));
                }
                for (t, i) in &image.tags {
                    let d = Digest::sha256_of(&image.manifests[*i].0);
                    put_tag(e, repo, t, &d).await.expect("put tag");
                }
            }
        }
    }

    /// Path of a blob's data file in a `file://` engine.
    fn blob_file(&self, d: &Digest) -> PathBuf {
        let root = self.root.as_ref().expect("a file:// engine");
        let hex = d.hex();
        root.join(format!(
            "docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2]
        ))
    }
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Test content: two image manifests sharing a config, each with its own layer, and tags pushed
/// out of order (`v2`, `latest` → the second manifest, `v1` → the first).
struct Image {
    config: Vec<u8>,
    layers: Vec<Vec<u8>>,
    /// Manifest bytes, with the index of their layer.
    manifests: Vec<(Vec<u8>, usize)>,
    tags: Vec<(&'static str, usize)>,
}

fn sha(data: &[u8]) -> Digest {
    Digest::sha256_of(data)
}

impl Image {
    fn new(seed: u64) -> Image {
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":[]}},"seed":{seed}}}"#
        )
        .into_bytes();
        let layers = vec![
            common::random_bytes(300 * 1024 + 7, seed * 10 + 1),
            common::random_bytes(70 * 1024 + 3, seed * 10 + 2),
        ];
        let manifests = layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let m = serde_json::json!({
                    "schemaVersion": 2,
                    "mediaType": OCI_MANIFEST,
                    "config": {
                        "mediaType": "application/vnd.oci.image.config.v1+json",
                        "digest": sha(&config).to_string(),
                        "size": config.len(),
                    },
                    "layers": [{
                        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": sha(l).to_string(),
                        "size": l.len(),
                    }],
                });
                (serde_json::to_vec(&m).expect("json"), i)
            })
            .collect();
        Image {
            config,
            layers,
            manifests,
            tags: vec![("v2", 1), ("latest", 1), ("v1", 0)],
        }
    }

    fn blobs(&self) -> Vec<(Digest, &[u8])> {
        std::iter::once(self.config.as_slice())
            .chain(self.layers.iter().map(Vec::as_slice))
            .map(|b| (sha(b), b))
            .collect()
    }

    fn manifest_digest(&self, i: usize) -> Digest {
        sha(&self.manifests[i].0)
    }

    fn layer_digest(&self, i: usize) -> Digest {
        sha(&self.layers[i])
    }
}

/// Pushes `image` into `repo` of the registry at `url` with the distribution API.
async fn seed_registry(url: &str, repo: &RepoName, image: &Image) {
    for (_, data) in image.blobs() {
        common::push_blob(url, repo.as_str(), data.to_vec()).await;
    }
    let c = common::client();
    let put = async |reference: &str, bytes: &[u8]| {
        let r = c
            .put(format!("{url}/v2/{repo}/manifests/{reference}"))
            .header("content-type", OCI_MANIFEST)
            .body(bytes.to_vec())
            .send()
            .await
            .expect("PUT manifest");
        assert_eq!(r.status(), 201, "PUT manifest {reference}");
    };
    for (m, _) in &image.manifests {
        put(&sha(m).to_string(), m).await;
    }
    for (t, i) in &image.tags {
        put(t, &image.manifests[*i].0).await;
    }
}

fn repo(s: &str) -> RepoName {
    s.parse().expect("repo name")
}

/// A digest nothing stores.
fn absent_digest() -> Digest {
    sha(b"no engine holds this")
}

// ---------------------------------------------------------------------------------------------
// The read side: every engine.
// ---------------------------------------------------------------------------------------------

async fn absent_is_none_never_an_error(b: Backend) {
    let e = b.e();
    let r = repo("conformance/app");
    b.seed(&r, &Image::new(1)).await;
    let d = absent_digest();
    let id = e.id().to_string();
    assert_eq!(stat_blob(e, &r, &d).await.expect("stat"), None, "{id}");
    assert!(read_blob(e, &r, &d, None).await.expect("read").is_none());
    assert!(read_blob(e, &r, &d, Some((10, Some(20))))
        .await
        .expect("ranged read")
        .is_none());
    assert!(read_blob(e, &r, &d, Some((1 << 40, None)))
        .await
        .expect("ranged read past any end")
        .is_none());
    assert!(get_manifest(e, &r, d.as_str())
        .await
        .expect("get")
        .is_none());
    assert!(head_manifest(e, &r, d.as_str())
        .await
        .expect("head")
        .is_none());
    assert!(get_manifest(e, &r, "nosuchtag")
        .await
        .expect("get tag")
        .is_none());
    assert!(head_manifest(e, &r, "nosuchtag")
        .await
        .expect("head tag")
        .is_none());
}

async fn unknown_repository_is_none(b: Backend) {
    let e = b.e();
    let image = Image::new(2);
    b.seed(&repo("conformance/app"), &image).await;
    let other = repo("conformance/nobody");
    assert_eq!(list_tags(e, &other).await.expect("tags"), None);
    assert!(get_manifest(e, &other, "latest")
        .await
        .expect("get")
        .is_none());
    assert!(head_manifest(e, &other, "v1")
        .await
        .expect("head")
        .is_none());
    if !is_storage(e) {
        // A registry answers per repository; a storage engine holds blobs (and manifest bytes)
        // once for all repositories, and access control asks `is_linked`.
        let l = image.layer_digest(0);
        assert_eq!(stat_blob(e, &other, &l).await.expect("stat"), None);
        assert!(read_blob(e, &other, &l, None)
            .await
            .expect("read")
            .is_none());
        let m = image.manifest_digest(0);
        assert!(get_manifest(e, &other, m.as_str())
            .await
            .expect("get by digest")
            .is_none());
    }
}

async fn blobs_stat_and_read_whole(b: Backend) {
    let e = b.e();
    let r = repo("conformance/app");
    let image = Image::new(3);
    b.seed(&r, &image).await;
    for (d, data) in image.blobs() {
        assert_eq!(
            stat_blob(e, &r, &d).await.expect("stat"),
            Some(data.len() as u64),
            "stat of {d}"
        );
        let got = read_blob(e, &r, &d, None)
            .await
            .expect("read")
            .expect("present");
        assert_eq!(got.size, data.len() as u64);
        assert_eq!(got.offset, 0);
        assert!(got.bytes == data, "the bytes of {d}");
    }
}

async fn blob_ranges(b: Backend) {
    let e = b.e();
    let r = repo("conformance/app");
    let image = Image::new(4);
    b.seed(&r, &image).await;
    let data = &image.layers[0];
    let d = image.layer_digest(0);
    let len = data.len() as u64;
    for (start, end) in [
        (0, None),
        (0, Some(1)),
        (10, Some(20)),
        (100_000, None),
        (len - 1, None),
        (len - 5, Some(len)),
    ] {
        let got = read_blob(e, &r, &d, Some((start, end)))
            .await
            .unwrap_or_else(|err| panic!("{start}..{end:?}: {err}"))
            .expect("present");
        let want = &data[start as usize..end.unwrap_or(len) as usize];
        assert_eq!(got.size, len, "{start}..{end:?}: the whole blob's size");
        assert_eq!(got.offset, start, "{start}..{end:?}: the offset");
        assert!(
            got.bytes == want,
            "{start}..{end:?}: {} bytes, want {}",
            got.bytes.len(),
            want.len()
        );
    }
    for start in [len, len + 1, len * 10] {
        match read_blob(e, &r, &d, Some((start, None))).await {
            Err(err) => assert_eq!(
                error_code(&err),
                Some("RANGE_INVALID"),
                "{}: a start at {start} of a {len}-byte blob: {err}",
                e.id()
            ),
            Ok(got) => panic!(
                "{}: a start at {start} of a {len}-byte blob answered {:?}",
                e.id(),
                got.map(|g| (g.size, g.offset, g.bytes.len()))
            ),
        }
    }
}

async fn manifests_by_digest_and_tag(b: Backend) {
    let e = b.e();
    let r = repo("conformance/app");
    let image = Image::new(5);
    b.seed(&r, &image).await;
    let refs: Vec<(String, usize)> = (0..image.manifests.len())
        .map(|i| (image.manifest_digest(i).to_string(), i))
        .chain(image.tags.iter().map(|(t, i)| (t.to_string(), *i)))
        .collect();
    for (reference, i) in refs {
        let want = &image.manifests[i].0;
        let got = get_manifest(e, &r, &reference)
            .await
            .expect("get")
            .unwrap_or_else(|| panic!("{reference} present"));
        let head = head_manifest(e, &r, &reference)
            .await
            .expect("head")
            .unwrap_or_else(|| panic!("{reference} present on HEAD"));
        assert_eq!(
            got.bytes.as_ref(),
            want.as_slice(),
            "{reference}: the bytes"
        );
        assert_eq!(got.digest, sha(want), "{reference}: the digest");
        assert_eq!(got.media_type, OCI_MANIFEST, "{reference}: the type");
        assert_eq!(
            head,
            Headed {
                digest: got.digest.clone(),
                media_type: got.media_type.clone(),
                size: got.bytes.len() as u64,
            },
            "{reference}: GET and HEAD agree"
        );
    }
    // A layer is no manifest. (Asked of a registry, docker-registry 2.8 answers 500, which the
    // engine rightly reports as an engine error: checked on storage engines only.)
    if is_storage(e) {
        let l = image.layer_digest(1);
        assert!(get_manifest(e, &r, l.as_str())
            .await
            .expect("get a layer as a manifest")
            .is_none());
    }
}

async fn tags_listed_sorted(b: Backend) {
    let e = b.e();
    let r = repo("conformance/app");
    b.seed(&r, &Image::new(6)).await;
    assert_eq!(
        list_tags(e, &r).await.expect("tags"),
        Some(vec!["latest".to_string(), "v1".into(), "v2".into()])
    );
    // Nested names are names like any other.
    let nested = repo("conformance/team/deep/app");
    b.seed(&nested, &Image::new(7)).await;
    assert_eq!(
        list_tags(e, &nested).await.expect("tags"),
        Some(vec!["latest".to_string(), "v1".into(), "v2".into()])
    );
}

async fn probe_succeeds(b: Backend) {
    probe(b.e()).await.expect("probe");
}

// ---------------------------------------------------------------------------------------------
// Writes: storage engines.
// ---------------------------------------------------------------------------------------------

async fn put_blob_is_idempotent(b: Backend) {
    let e = b.e();
    let r = repo("conformance/app");
    let data = common::random_bytes(200 * 1024, 40);
    let d = sha(&data);
    for round in 0..3 {
        put_blob(e, b.spool.path(), &d, &data)
            .await
            .unwrap_or_else(|err| panic!("put #{round}: {err}"));
        let got = read_blob(e, &r, &d, None)
            .await
            .expect("read")
            .expect("present");
        assert!(got.bytes == data, "round {round}: the bytes");
        assert_eq!(stat_blob(e, &r, &d).await.expect("stat"), Some(200 * 1024));
    }
}

/// Two writers committing the same blob at once (two processes filling one miss): both succeed,
/// and the blob is whole.
async fn racing_puts_of_one_blob_both_succeed(b: Backend) {
    let r = repo("conformance/app");
    let data = common::random_bytes(1 << 20, 46);
    let d = sha(&data);
    let (e, spool) = (b.e(), b.spool.path());
    let (one, two) = tokio::join!(put_blob(e, spool, &d, &data), put_blob(e, spool, &d, &data));
    one.expect("the first writer");
    two.expect("the second writer");
    let got = read_blob(e, &r, &d, None)
        .await
        .expect("read")
        .expect("present");
    assert!(got.bytes == data, "the blob is whole");
}

async fn links_are_per_repository(b: Backend) {
    let e = b.e();
    let (one, two) = (repo("conformance/one"), repo("conformance/two"));
    let data = common::random_bytes(10 * 1024, 41);
    let d = sha(&data);
    put_blob(e, b.spool.path(), &d, &data).await.expect("put");
    assert!(!is_linked(e, &one, &d, false).await.expect("linked?"));
    link(e, &one, &d, false).await.expect("link");
    link(e, &one, &d, false).await.expect("link again");
    assert!(is_linked(e, &one, &d, false).await.expect("linked?"));
    assert!(
        !is_linked(e, &two, &d, false).await.expect("linked?"),
        "a link is for its repository only"
    );
    assert!(
        !is_linked(e, &one, &d, true).await.expect("linked?"),
        "a blob link is no manifest link"
    );
    link(e, &two, &d, true).await.expect("link as manifest");
    assert!(is_linked(e, &two, &d, true).await.expect("linked?"));
    assert!(!is_linked(e, &two, &d, false).await.expect("linked?"));
}

async fn put_manifest_and_tag(b: Backend) {
    let e = b.e();
    let r = repo("conformance/app");
    let image = Image::new(42);
    let (m0, m1) = (&image.manifests[0].0, &image.manifests[1].0);
    let d0 = put_manifest(e, &r, OCI_MANIFEST, m0).await.expect("put");
    assert_eq!(d0, sha(m0));
    assert!(is_linked(e, &r, &d0, true).await.expect("linked?"));
    let got = get_manifest(e, &r, d0.as_str())
        .await
        .expect("get")
        .expect("present");
    assert_eq!(got.bytes.as_ref(), m0.as_slice());
    assert_eq!(got.media_type, OCI_MANIFEST);
    // Idempotent.
    put_manifest(e, &r, OCI_MANIFEST, m0).await.expect("again");

    put_tag(e, &r, "stable", &d0).await.expect("tag");
    let h = head_manifest(e, &r, "stable")
        .await
        .expect("head")
        .expect("tagged");
    assert_eq!(h.digest, d0);
    // A tag moves.
    let d1 = put_manifest(e, &r, OCI_MANIFEST, m1).await.expect("put");
    put_tag(e, &r, "stable", &d1).await.expect("move tag");
    put_tag(e, &r, "alpha", &d0).await.expect("tag");
    let got = get_manifest(e, &r, "stable")
        .await
        .expect("get")
        .expect("tagged");
    assert_eq!(got.digest, d1, "the tag moved");
    assert_eq!(
        list_tags(e, &r).await.expect("tags"),
        Some(vec!["alpha".to_string(), "stable".into()])
    );
}

async fn deletes_say_whether_it_was_there(b: Backend) {
    let e = b.e();
    let (r, other) = (repo("conformance/app"), repo("conformance/other"));
    let image = Image::new(43);
    b.seed(&r, &image).await;
    b.seed(&other, &image).await;
    let (m0, m1) = (image.manifest_digest(0), image.manifest_digest(1));

    // Tags: absent is success, in a known repository and in an unknown one.
    delete_tag(e, &r, "v1").await.expect("delete tag");
    assert!(get_manifest(e, &r, "v1").await.expect("get").is_none());
    assert_eq!(
        list_tags(e, &r).await.expect("tags"),
        Some(vec!["latest".to_string(), "v2".into()])
    );
    assert!(
        get_manifest(e, &r, m0.as_str())
            .await
            .expect("get")
            .is_some(),
        "deleting a tag keeps its manifest"
    );
    delete_tag(e, &r, "v1").await.expect("delete an absent tag");
    delete_tag(e, &repo("conformance/nobody"), "v1")
        .await
        .expect("delete a tag of an unknown repository");

    // Manifests: the revision link and every tag pointing at it go; other repositories keep it.
    assert!(delete_manifest(e, &r, &m1).await.expect("delete manifest"));
    assert!(!is_linked(e, &r, &m1, true).await.expect("linked?"));
    assert!(get_manifest(e, &r, "latest").await.expect("get").is_none());
    assert!(get_manifest(e, &r, "v2").await.expect("get").is_none());
    assert!(
        !delete_manifest(e, &r, &m1).await.expect("delete again"),
        "a second delete says it was not there"
    );
    assert!(!delete_manifest(e, &repo("conformance/nobody"), &m1)
        .await
        .expect("delete in an unknown repository"));
    assert!(is_linked(e, &other, &m1, true).await.expect("linked?"));
    let kept = get_manifest(e, &other, "latest")
        .await
        .expect("get")
        .expect("the other repository keeps its tag");
    assert_eq!(kept.digest, m1);

    // Blobs: the layer link goes; the bytes stay for the other repository.
    let l = image.layer_digest(0);
    assert!(delete_blob(e, &r, &l).await.expect("delete blob"));
    assert!(!is_linked(e, &r, &l, false).await.expect("linked?"));
    assert!(!delete_blob(e, &r, &l).await.expect("delete again"));
    assert!(!delete_blob(e, &repo("conformance/nobody"), &l)
        .await
        .expect("delete in an unknown repository"));
    assert!(is_linked(e, &other, &l, false).await.expect("linked?"));
    let got = read_blob(e, &other, &l, None)
        .await
        .expect("read")
        .expect("the bytes stay");
    assert!(got.bytes == image.layers[0]);
}

/// Readers racing a writer see an object whole or not at all: a blob, a manifest, a moved tag.
async fn readers_never_see_a_partial_object(b: Backend) {
    let b = Arc::new(b);
    let r = repo("conformance/app");
    let data = Arc::new(common::random_bytes(4 << 20, 44));
    let d = sha(&data);
    let image = Image::new(45);
    let (m0, m1) = (image.manifests[0].0.clone(), image.manifests[1].0.clone());
    let (d0, d1) = (sha(&m0), sha(&m1));
    put_manifest(b.e(), &r, OCI_MANIFEST, &m0)
        .await
        .expect("put");
    put_tag(b.e(), &r, "moving", &d0).await.expect("tag");

    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (b, r, d, data, done) = (b.clone(), r.clone(), d.clone(), data.clone(), done.clone());
        let (d0, d1) = (d0.clone(), d1.clone());
        tokio::spawn(async move {
            let e = b.e();
            let mut seen = (0, 0);
            loop {
                let last = done.load(std::sync::atomic::Ordering::SeqCst);
                match read_blob(e, &r, &d, None).await.expect("read") {
                    None => seen.0 += 1,
                    Some(got) => {
                        assert_eq!(got.size, data.len() as u64, "a partial blob's size");
                        assert!(got.bytes == *data, "a partial blob's bytes");
                        seen.1 += 1;
                    }
                }
                if let Some(m) = get_manifest(e, &r, d1.as_str()).await.expect("get") {
                    assert_eq!(sha(&m.bytes), d1, "a partial manifest");
                }
                let t = get_manifest(e, &r, "moving")
                    .await
                    .expect("get by tag")
                    .expect("the tag is always there");
                assert!(t.digest == d0 || t.digest == d1, "a tag read halfway");
                if last {
                    return seen;
                }
                tokio::task::yield_now().await;
            }
        })
    };
    let e = b.e();
    put_blob(e, b.spool.path(), &d, &data).await.expect("put");
    put_manifest(e, &r, OCI_MANIFEST, &m1).await.expect("put");
    put_tag(e, &r, "moving", &d1).await.expect("move tag");
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = tokio::time::timeout(Duration::from_secs(120), reader)
        .await
        .expect("the reader finishes")
        .expect("the reader saw whole objects only");
    assert!(seen.1 >= 1, "the last read sees the blob: {seen:?}");
}

// ---------------------------------------------------------------------------------------------
// The suites.
// ---------------------------------------------------------------------------------------------

macro_rules! read_suite {
    ($make:path $(, #[$attr:meta])?) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])?
        async fn absent_is_none_never_an_error() {
            super::absent_is_none_never_an_error($make().await).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])?
        async fn unknown_repository_is_none() {
            super::unknown_repository_is_none($make().await).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])?
        async fn blobs_stat_and_read_whole() {
            super::blobs_stat_and_read_whole($make().await).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])?
        async fn blob_ranges() {
            super::blob_ranges($make().await).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])?
        async fn manifests_by_digest_and_tag() {
            super::manifests_by_digest_and_tag($make().await).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])?
        async fn tags_listed_sorted() {
            super::tags_listed_sorted($make().await).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])?
        async fn probe_succeeds() {
            super::probe_succeeds($make().await).await
        }
    };
}

macro_rules! write_suite {
    ($make:path $(, #[$attr:meta])?) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])?
        async fn put_blob_is_idempotent() {
            super::put_blob_is_idempotent($make().await).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])?
        async fn links_are_per_repository() {
            super::links_are_per_repository($make().await).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])?
        async fn racing_puts_of_one_blob_both_succeed() {
            super::racing_puts_of_one_blob_both_succeed($make().await).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])?
        async fn put_manifest_and_tag() {
            super::put_manifest_and_tag($make().await).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])?
        async fn deletes_say_whether_it_was_there() {
            super::deletes_say_whether_it_was_there($make().await).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])?
        async fn readers_never_see_a_partial_object() {
            super::readers_never_see_a_partial_object($make().await).await
        }
    };
}

mod memory {
    read_suite!(super::Backend::memory);
    write_suite!(super::Backend::memory);
}

mod cached_memory {
    read_suite!(super::Backend::cached_memory);
    write_suite!(super::Backend::cached_memory);
}

mod cached_file {
    read_suite!(super::Backend::cached_file);
    write_suite!(super::Backend::cached_file);
}

mod file {
    read_suite!(super::Backend::file);
    write_suite!(super::Backend::file);

    /// A blob file that ends before its size while it is read: an error, not a complete read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_short_stream_is_an_error() {
        use super::*;
        let b = Backend::file().await;
        let r = repo("conformance/app");
        let image = Image::new(8);
        b.seed(&r, &image).await;
        let d = image.layer_digest(0);
        let path = b.blob_file(&d);
        let res = read_blob_then(b.e(), &r, &d, None, || truncate(&path, 1000)).await;
        assert!(
            res.is_err(),
            "a cut file read as {:?}",
            res.map(|o| o.map(|g| g.bytes.len()))
        );
    }
}

mod s3 {
    read_suite!(super::Backend::s3, #[ignore = "needs moto"]);
    write_suite!(super::Backend::s3, #[ignore = "needs moto"]);

    /// A store whose every answer for the blob breaks off after 1000 bytes: the read is an
    /// error (after the client's retries), never a short complete read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs moto"]
    async fn a_short_stream_is_an_error() {
        use super::*;
        use common::faults::{Fault, FaultProxy};
        let moto = tokio::task::spawn_blocking(|| common::regions::Moto::start(None, "127.0.0.1"))
            .await
            .expect("moto");
        let faults = FaultProxy::start(&moto.endpoint()).await;
        let engine = s3_engine(&faults.url());
        let b = Backend::with(engine);
        let r = repo("conformance/app");
        let image = Image::new(10);
        b.seed(&r, &image).await;
        let d = image.layer_digest(0);
        faults.inject(d.hex(), Fault::Reset(1000), 1000);
        let res = tokio::time::timeout(Duration::from_secs(60), read_blob(b.e(), &r, &d, None))
            .await
            .expect("the read ends");
        assert!(
            res.is_err(),
            "a broken-off blob read as {:?}",
            res.map(|o| o.map(|g| g.bytes.len()))
        );
        drop(moto);
    }
}

mod registry {
    read_suite!(super::Backend::registry, #[ignore = "needs docker-registry"]);

    /// A registry engine does not write: every write is an error (`UNSUPPORTED`), never a panic.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs docker-registry"]
    async fn writes_are_unsupported() {
        use super::*;
        let b = Backend::registry().await;
        let e = b.e();
        let r = repo("conformance/app");
        let data = b"some bytes".to_vec();
        let d = sha(&data);
        let image = Image::new(9);
        let results: Vec<(&str, Result<(), Error>)> = vec![
            ("put_blob", put_blob(e, b.spool.path(), &d, &data).await),
            ("link blob", link(e, &r, &d, false).await),
            ("link manifest", link(e, &r, &d, true).await),
            (
                "put_manifest",
                put_manifest(e, &r, OCI_MANIFEST, &image.manifests[0].0)
                    .await
                    .map(|_| ()),
            ),
            ("put_tag", put_tag(e, &r, "v1", &d).await),
            ("delete_tag", delete_tag(e, &r, "v1").await),
            (
                "delete_manifest",
                delete_manifest(e, &r, &d).await.map(|_| ()),
            ),
            ("delete_blob", delete_blob(e, &r, &d).await.map(|_| ())),
        ];
        for (what, res) in results {
            let err = res.expect_err(what);
            assert_eq!(error_code(&err), Some("UNSUPPORTED"), "{what}: {err}");
        }
    }

    /// An upstream that announces more bytes than it sends, then closes: the read is an error.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_short_stream_is_an_error() {
        use super::*;
        use ociedge::engine::registry::{client, RegistryClient, RegistryEngine};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let data = common::random_bytes(64 * 1024, 50);
        let d = sha(&data);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nDocker-Content-Digest: {d}\r\n\r\n",
            data.len()
        );
        let half = data[..data.len() / 2].to_vec();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let (head, half) = (head.clone(), half.clone());
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = s.write_all(&half).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        let base = url::Url::parse(&format!("http://127.0.0.1:{port}")).expect("url");
        let http = client::http_client().expect("http client");
        let b = Backend::with(Arc::new(RegistryEngine::new(RegistryClient::new(
            "liar", base, http, None,
        ))));
        let mut opened = false;
        let res = read_blob_then(b.e(), &repo("conformance/app"), &d, None, || opened = true).await;
        assert!(opened, "the blob opened: {:?}", res.as_ref().err());
        assert!(
            res.is_err(),
            "half a blob read as {:?}",
            res.map(|o| o.map(|g| g.bytes.len()))
        );
    }
}

fn truncate(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open")
        .set_len(len)
        .expect("truncate");
}
