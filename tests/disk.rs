//! What is on disk is checked before it is served or loaded: a blob file replaced by a symbolic
//! link (to a secret) is never read through it, a blob file of the wrong size is never served
//! with the wrong length and is repaired by the next fill, `ociedge verify` re-hashes the local
//! engine and removes what does not match (on the plain front and the TLS front alike), and a
//! certificate path naming a FIFO or `/dev/zero` neither blocks the reload watcher nor grows
//! memory.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use common::fake::FakeUpstream;
use common::*;

/// A fake upstream holding `blobs`; returns it with its URL.
async fn upstream(blobs: &[&[u8]]) -> (FakeUpstream, String, Vec<String>) {
    let up = FakeUpstream::default();
    let mut digests = Vec::new();
    for b in blobs {
        let d = format!("sha256:{}", sha256_hex(b));
        up.blobs
            .lock()
            .expect("lock")
            .insert(d.clone(), Bytes::copy_from_slice(b));
        digests.push(d);
    }
    let port = up.clone().start().await;
    (up, format!("http://127.0.0.1:{port}"), digests)
}

/// The `tls:` section and a client for it: a self-signed certificate written into `dir`.
fn tls_in(dir: &Path) -> String {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("cert");
    std::fs::write(dir.join("tls.crt"), cert.cert.pem()).expect("tls.crt");
    std::fs::write(dir.join("tls.key"), cert.signing_key.serialize_pem()).expect("tls.key");
    "tls: { cert: \"{DIR}/tls.crt\", key: \"{DIR}/tls.key\" }\n".to_string()
}

fn tls_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .danger_accept_invalid_certs(true)
        .build()
        .expect("client")
}

/// GETs a blob; the status and the body (empty when the body broke off).
async fn get_blob(client: &reqwest::Client, base: &str, digest: &str) -> (u16, Vec<u8>) {
    let r = client
        .get(format!("{base}/v2/library/test/blobs/{digest}"))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    let body = r.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
    (status, body)
}

/// Waits until the proxy's local copy of `digest` is a regular file holding `want`, and the fill
/// has ended: the file is in place a moment before the fill lets go of it (a request in that
/// moment still follows the fill, reading the same inode), so a test that damaged the file as
/// soon as it appeared would damage what that request reads (seen once in CI).
async fn wait_whole(p: &Proxy, base: &str, digest: &str, want: &[u8]) -> bool {
    let path = p.blob_path(digest);
    let whole = eventually(Duration::from_secs(20), async || {
        std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_file())
            && std::fs::read(&path).is_ok_and(|b| b == want)
    })
    .await;
    let c = tls_client();
    whole
        && eventually(Duration::from_secs(20), async || {
            let Ok(r) = c.get(format!("{base}/metrics")).send().await else {
                return false;
            };
            let text = r.text().await.unwrap_or_default();
            metric_in(&text, "ociedge_fills_in_flight") == Some(0.0)
        })
        .await
}

async fn symlinked_blob_is_never_served(tls: bool) {
    let blob = random_bytes(300 * 1024, 11);
    let (_up, url, digests) = upstream(&[&blob]).await;
    let digest = &digests[0];
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("secret.key");
    std::fs::write(&secret, b"-----BEGIN PRIVATE KEY----- the crown jewels").expect("secret");
    let (extra, client, scheme) = if tls {
        (tls_in(dir.path()), tls_client(), "https")
    } else {
        (String::new(), client(), "http")
    };
    let p = Proxy::start_in(&mirror_config(&url, &extra), dir);
    let base = format!("{scheme}://{}", p.host());
    let (status, body) = get_blob(&client, &base, digest).await;
    assert_eq!(status, 200);
    assert!(body == blob, "first pull gets the blob");
    assert!(
        wait_whole(&p, &base, digest, &blob).await,
        "the blob was filled"
    );

    // Another writer on the storage replaces the blob file by a link to a secret.
    let data = p.blob_path(digest);
    std::fs::remove_file(&data).expect("rm");
    std::os::unix::fs::symlink(&secret, &data).expect("symlink");
    for _ in 0..3 {
        let (status, body) = get_blob(&client, &base, digest).await;
        assert!(
            !body.windows(16).any(|w| w == b"the crown jewels"),
            "the link's target was served ({status})"
        );
        assert!(status != 200 || body == blob, "a 200 carries the blob");
        let head = client
            .head(format!("{base}/v2/library/test/blobs/{digest}"))
            .send()
            .await
            .expect("head");
        if head.status() == 200 {
            assert_eq!(
                head.headers()["content-length"].to_str().ok(),
                Some(blob.len().to_string().as_str()),
                "HEAD tells the blob's size, not the link target's"
            );
        }
    }
    // The refill replaced the link by the blob itself.
    assert!(
        wait_whole(&p, &base, digest, &blob).await,
        "the link was replaced by the blob"
    );
    assert_eq!(
        std::fs::read(&secret).expect("secret"),
        b"-----BEGIN PRIVATE KEY----- the crown jewels",
        "the link's target is untouched"
    );
    let (status, body) = get_blob(&client, &base, digest).await;
    assert_eq!(status, 200);
    assert!(body == blob);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_file_replaced_by_a_symlink_is_never_served_plain() {
    symlinked_blob_is_never_served(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_file_replaced_by_a_symlink_is_never_served_tls() {
    symlinked_blob_is_never_served(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlinked_blob_directory_is_not_followed() {
    let blob = random_bytes(64 * 1024, 12);
    let (_up, url, digests) = upstream(&[&blob]).await;
    let digest = &digests[0];
    let outside = tempfile::tempdir().expect("tempdir");
    std::fs::write(outside.path().join("data"), b"outside the store").expect("write");
    let p = Proxy::start(&mirror_config(&url, ""));
    let base = format!("http://{}", p.host());
    let c = client();
    assert_eq!(get_blob(&c, &base, digest).await.1, blob);
    assert!(wait_whole(&p, &base, digest, &blob).await);
    // The blob's directory becomes a link to a directory outside the store.
    let data = p.blob_path(digest);
    let dir = data.parent().expect("dir");
    std::fs::remove_dir_all(dir).expect("rm");
    std::os::unix::fs::symlink(outside.path(), dir).expect("symlink");
    let (status, body) = get_blob(&c, &base, digest).await;
    assert!(
        body != b"outside the store",
        "read through a linked directory"
    );
    assert!(status != 200 || body == blob);
    // The refill replaced the link by a directory of the store, and wrote nothing through it.
    assert!(
        wait_whole(&p, &base, digest, &blob).await,
        "the blob is back in a real directory"
    );
    assert!(
        !std::fs::symlink_metadata(dir)
            .expect("dir")
            .file_type()
            .is_symlink(),
        "the link is gone"
    );
    let outside_files: Vec<_> = std::fs::read_dir(outside.path())
        .expect("outside")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(outside_files, vec![std::ffi::OsString::from("data")]);
    assert_eq!(
        std::fs::read(outside.path().join("data")).expect("outside"),
        b"outside the store",
        "nothing written outside the store"
    );
    assert_eq!(get_blob(&c, &base, digest).await.1, blob);
}

async fn wrong_size_is_refilled(tls: bool, grow: bool) {
    let blob = random_bytes(700 * 1024 + 17, 13);
    let (up, url, digests) = upstream(&[&blob]).await;
    let digest = &digests[0];
    let dir = tempfile::tempdir().expect("tempdir");
    let (extra, client, scheme) = if tls {
        (tls_in(dir.path()), tls_client(), "https")
    } else {
        (String::new(), client(), "http")
    };
    let p = Proxy::start_in(&mirror_config(&url, &extra), dir);
    let base = format!("{scheme}://{}", p.host());
    assert_eq!(get_blob(&client, &base, digest).await.1, blob);
    assert!(
        wait_whole(&p, &base, digest, &blob).await,
        "the blob was filled"
    );
    let gets = up.blob_gets.load(std::sync::atomic::Ordering::SeqCst);

    // The file is truncated (or grown) in place: same inode, other length.
    let data = p.blob_path(digest);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .expect("open");
    let len = if grow {
        blob.len() + 4096
    } else {
        blob.len() / 3
    };
    f.set_len(len as u64).expect("set_len");
    drop(f);

    let head = client
        .head(format!("{base}/v2/library/test/blobs/{digest}"))
        .send()
        .await
        .expect("head");
    assert_eq!(head.status(), 200);
    assert_eq!(
        head.headers()["content-length"].to_str().ok(),
        Some(blob.len().to_string().as_str()),
        "HEAD tells the blob's size"
    );
    let (status, body) = get_blob(&client, &base, digest).await;
    assert_eq!(status, 200);
    assert_eq!(body.len(), blob.len(), "served with the blob's length");
    assert!(body == blob, "the right bytes");
    assert!(
        up.blob_gets.load(std::sync::atomic::Ordering::SeqCst) > gets,
        "fetched again from upstream"
    );
    assert!(
        wait_whole(&p, &base, digest, &blob).await,
        "the bad copy was replaced: {} bytes on disk",
        std::fs::metadata(&data).map(|m| m.len()).unwrap_or(0)
    );
    let (status, body) = get_blob(&client, &base, digest).await;
    assert_eq!(status, 200);
    assert!(body == blob);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_blob_file_is_refilled_and_repaired_plain() {
    wrong_size_is_refilled(false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_blob_file_is_refilled_and_repaired_tls() {
    wrong_size_is_refilled(true, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grown_blob_file_is_refilled_and_repaired() {
    wrong_size_is_refilled(false, true).await;
}
/// Runs `ociedge verify` on the config in `dir`.
fn verify(dir: &Path) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ociedge"))
        .args(["verify", "--config"])
        .arg(dir.join("ociedge.yaml"))
        .output()
        .expect("run ociedge verify");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_removes_what_does_not_match_and_keeps_the_rest() {
    let blobs: Vec<Vec<u8>> = (0..3).map(|i| random_bytes(200 * 1024, 20 + i)).collect();
    let refs: Vec<&[u8]> = blobs.iter().map(|b| b.as_slice()).collect();
    let (_up, url, digests) = upstream(&refs).await;
    let p = Proxy::start(&mirror_config(&url, ""));
    let base = format!("http://{}", p.host());
    let c = client();
    for (b, d) in blobs.iter().zip(&digests) {
        assert!(get_blob(&c, &base, d).await.1 == *b);
        assert!(wait_whole(&p, &base, d, b).await);
    }
    let dir = p.restart();

    // A clean store verifies clean.
    let (code, out, err) = verify(dir.path());
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("3 blobs"), "summary line: {out}");

    // One blob's bytes flipped in place (same size), one replaced by a link.
    let path = |d: &str| {
        let hex = d.trim_start_matches("sha256:");
        dir.path().join(format!(
            "data/docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2]
        ))
    };
    let bad = path(&digests[0]);
    let mut bytes = std::fs::read(&bad).expect("read");
    bytes[1000] ^= 0xff;
    std::fs::write(&bad, &bytes).expect("write");
    let linked = path(&digests[1]);
    let secret = dir.path().join("secret");
    std::fs::write(&secret, b"secret").expect("secret");
    std::fs::remove_file(&linked).expect("rm");
    std::os::unix::fs::symlink(&secret, &linked).expect("symlink");
    let good = path(&digests[2]);
    let good_ino = std::fs::metadata(&good).expect("good").ino();

    let (code, out, err) = verify(dir.path());
    assert_eq!(code, Some(1), "bad blobs found: exit 1\n{out}{err}");
    assert!(out.contains("3 blobs"), "summary line: {out}");
    assert!(out.contains("2 removed"), "summary line: {out}");
    assert!(
        format!("{out}{err}").contains(&digests[0]),
        "the bad blob is named: {out}{err}"
    );
    assert!(!bad.exists(), "the corrupt blob was removed");
    assert!(
        std::fs::symlink_metadata(&linked).is_err(),
        "the link was removed"
    );
    assert_eq!(std::fs::read(&secret).expect("secret"), b"secret");
    assert_eq!(std::fs::read(&good).expect("good"), blobs[2], "kept");
    assert_eq!(std::fs::metadata(&good).expect("good").ino(), good_ino);

    // And it is clean again.
    let (code, out, err) = verify(dir.path());
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("1 blobs"), "summary line: {out}");
}

/// The leaf certificate a fresh TLS connection to `p` is shown, if it answers `/healthz`.
async fn served_cert(p: &Proxy) -> Option<Vec<u8>> {
    let c = reqwest::Client::builder()
        .no_proxy()
        .danger_accept_invalid_certs(true)
        .tls_info(true)
        .build()
        .expect("client");
    let r = c
        .get(format!("https://{}/healthz", p.host()))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    if r.status() != 200 {
        return None;
    }
    r.extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|t| t.peer_certificate())
        .map(|c| c.to_vec())
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_or_dev_zero_as_certificate_keeps_the_old_one_and_the_watcher() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("cert");
    std::fs::write(dir.path().join("tls.crt"), first.cert.pem()).expect("tls.crt");
    std::fs::write(
        dir.path().join("tls.key"),
        first.signing_key.serialize_pem(),
    )
    .expect("key");
    let cert = dir.path().join("tls.crt");
    let tls = "tls: { cert: \"{DIR}/tls.crt\", key: \"{DIR}/tls.key\", reload_interval: 100ms }\n";
    let p = Proxy::start_in(&mirror_config("http://127.0.0.1:9", tls), dir);
    assert_eq!(served_cert(&p).await, Some(first.cert.der().to_vec()));
    let before = rss_kib(p.child.id());

    // A FIFO nobody writes to, then a link to /dev/zero, each for several reload intervals.
    std::fs::remove_file(&cert).expect("rm");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &cert,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .expect("mkfifo");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        served_cert(&p).await,
        Some(first.cert.der().to_vec()),
        "the previous certificate stays in service"
    );
    std::fs::remove_file(&cert).expect("rm");
    std::os::unix::fs::symlink("/dev/zero", &cert).expect("symlink");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        served_cert(&p).await,
        Some(first.cert.der().to_vec()),
        "the previous certificate stays in service"
    );
    let grown = rss_kib(p.child.id()).saturating_sub(before);
    assert!(grown < 64 * 1024, "RSS grew by {grown} KiB");

    // The watcher is still alive: a good certificate is picked up.
    let second = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("cert");
    std::fs::write(
        p.dir.path().join("tls.key"),
        second.signing_key.serialize_pem(),
    )
    .expect("key");
    std::fs::remove_file(&cert).expect("rm");
    std::fs::write(&cert, second.cert.pem()).expect("tls.crt");
    let want = second.cert.der().to_vec();
    assert!(
        eventually(Duration::from_secs(10), async || served_cert(&p)
            .await
            .as_ref()
            == Some(&want))
        .await,
        "the new certificate is served"
    );
    assert!(p.log().contains("not reloaded"), "the failures are logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs moto"]
async fn verify_scrubs_an_s3_local_engine() {
    use object_store::ObjectStoreExt;
    let moto = common::regions::Moto::start(None, "127.0.0.1");
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = format!(
        "storage:\n  preference: eu\n  engines:\n    eu: {}\n",
        moto.engine_yaml(None)
    );
    std::fs::write(dir.path().join("ociedge.yaml"), yaml).expect("config");
    let cfg = ociedge::config::Config::load(Some(&dir.path().join("ociedge.yaml"))).expect("cfg");
    let ec = &cfg.storage.engines["eu"];
    let engine =
        ociedge::engine::storage::StorageEngine::open("eu", &ec.url, &ec.options).expect("engine");
    let key = |d: &str| {
        let hex = d.trim_start_matches("sha256:");
        object_store::path::Path::from(format!(
            "docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2]
        ))
    };
    let good = random_bytes(100 * 1024, 31);
    let good_d = format!("sha256:{}", sha256_hex(&good));
    let bad = random_bytes(100 * 1024, 32);
    let bad_d = format!("sha256:{}", sha256_hex(&bad));
    let mut wrong = bad.clone();
    wrong[7] ^= 1;
    engine
        .store()
        .put(&key(&good_d), good.clone().into())
        .await
        .expect("put");
    engine
        .store()
        .put(&key(&bad_d), wrong.into())
        .await
        .expect("put");

    let (code, out, err) = verify(dir.path());
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        out.contains("2 blobs") && out.contains("1 removed"),
        "{out}"
    );
    assert!(out.contains(&bad_d[7..]), "the bad blob is named: {out}");
    assert!(engine.store().head(&key(&bad_d)).await.is_err(), "removed");
    assert!(engine.store().head(&key(&good_d)).await.is_ok(), "kept");
    let (code, out, err) = verify(dir.path());
    assert_eq!(code, Some(0), "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry, skopeo"]
async fn a_truncated_manifest_file_is_refetched_and_repaired() {
    let origin = Origin::start();
    origin.seed();
    let cfg = mirror_config(&origin.url(), "");
    let p = Proxy::start(&cfg);
    let c = client();
    let url = |p: &Proxy| p.url(&format!("/v2/library/small/manifests/{SMALL}"));
    let accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json";
    let want = c
        .get(url(&p))
        .header("accept", accept)
        .send()
        .await
        .expect("get")
        .bytes()
        .await
        .expect("body");
    assert_eq!(format!("sha256:{}", sha256_hex(&want)), SMALL);
    let path = p.blob_path(SMALL);
    assert!(
        eventually(Duration::from_secs(20), async || std::fs::read(&path)
            .is_ok_and(|b| b == want))
        .await,
        "the manifest was stored"
    );
    // A new process (nothing in memory), and the stored manifest cut short.
    let dir = p.restart();
    let p = Proxy::start_in(&cfg, dir);
    let path = p.blob_path(SMALL);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    f.set_len(want.len() as u64 / 2).expect("truncate");
    drop(f);
    let r = c
        .get(url(&p))
        .header("accept", accept)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.expect("body"), want, "the right manifest");
    assert!(
        eventually(Duration::from_secs(20), async || std::fs::read(&path)
            .is_ok_and(|b| b == want))
        .await,
        "the stored manifest was repaired"
    );
}
