//! Several ociedge processes on one local engine (one moto S3 bucket, one `file://` directory):
//! concurrent cold pulls spread across them fill it without corrupting each other.

mod common;

use std::sync::Arc;

use common::regions::Moto;
use common::*;
use futures::TryStreamExt;
use object_store::ObjectStoreExt;

async fn herd(proxies: &[Proxy], repo: &str, digests: &[String]) {
    let mut tasks = Vec::new();
    for i in 0..32 {
        let url = proxies[i % proxies.len()]
            .url(&format!("/v2/{repo}/blobs/{}", digests[i % digests.len()]));
        let want = digests[i % digests.len()].clone();
        tasks.push(tokio::spawn(async move {
            let r = client().get(&url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let body = r.bytes().await.unwrap();
            assert_eq!(
                format!("sha256:{}", sha256_hex(&body)),
                want,
                "every body correct"
            );
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Every blob object in the store hashes to its name.
async fn all_objects_whole(store: Arc<dyn object_store::ObjectStore>) -> usize {
    let list: Vec<object_store::ObjectMeta> = store
        .list(Some(&"docker/registry/v2/blobs".into()))
        .try_collect()
        .await
        .unwrap();
    let mut n = 0;
    for m in list {
        let parts: Vec<&str> = m.location.as_ref().split('/').collect();
        if parts.last() != Some(&"data") {
            continue;
        }
        let bytes = store.get(&m.location).await.unwrap().bytes().await.unwrap();
        assert_eq!(sha256_hex(&bytes), parts[6], "{} is whole", m.location);
        n += 1;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, moto"]
async fn three_processes_share_one_bucket() {
    let origin = Origin::start();
    let mut digests = Vec::new();
    for i in 0..4u64 {
        digests.push(
            push_blob(
                &origin.url(),
                "shared/bucket",
                random_bytes((8 + 6 * i as usize) << 20, 300 + i),
            )
            .await,
        );
    }
    let s3 = Moto::start(None, "127.0.0.1");
    let cfg = format!(
        "listen: 127.0.0.1:{{PORT}}\nstorage:\n  preference: shared\n  engines:\n    shared: {}\nupstreams:\n  - {{ name: docker.io, url: \"{}\" }}\n",
        s3.engine_yaml(None),
        origin.url()
    );
    let proxies: Vec<Proxy> = (0..3).map(|_| Proxy::start(&cfg)).collect();
    herd(&proxies, "shared/bucket", &digests).await;
    // Every process now serves every blob from the shared engine (once every fill committed).
    for p in &proxies {
        assert!(fills_settled(p).await, "fills ended");
    }
    for p in &proxies {
        for d in &digests {
            let r = client()
                .head(p.url(&format!("/v2/shared/bucket/blobs/{d}")))
                .send()
                .await
                .unwrap();
            assert_eq!(r.headers()["x-ociedge-source"], "local");
        }
    }
    let store = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name("registry")
        .with_endpoint(s3.endpoint())
        .with_region("us-east-1")
        .with_access_key_id("k")
        .with_secret_access_key("s")
        .with_allow_http(true)
        .build()
        .unwrap();
    assert_eq!(all_objects_whole(Arc::new(store)).await, digests.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, skopeo"]
async fn three_processes_share_one_directory() {
    let origin = Origin::start();
    origin.push(&[
        ("small-1.0", "library/small:1.0", false),
        ("multi-1.0", "library/multi:1.0", false),
    ]);
    let mut digests = Vec::new();
    for i in 0..4u64 {
        digests.push(push_blob(&origin.url(), "shared/dir", random_bytes(12 << 20, 400 + i)).await);
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = mirror_config(&origin.url(), "")
        .replace("{DIR}/data", &format!("{}/data", dir.path().display()));
    let proxies: Vec<Proxy> = (0..3).map(|_| Proxy::start(&cfg)).collect();
    herd(&proxies, "shared/dir", &digests).await;
    // Images pulled through different processes at once.
    let hosts: Vec<String> = proxies.iter().map(|p| p.host()).collect();
    let pulls: Vec<_> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let h = h.clone();
            std::thread::spawn(move || {
                let (img, d) = if i % 2 == 0 {
                    ("library/small:1.0", SMALL)
                } else {
                    ("library/multi:1.0", MULTI)
                };
                verify_pull(&h, img, d)
            })
        })
        .collect();
    for p in pulls {
        assert!(p.join().unwrap());
    }
    let store =
        object_store::local::LocalFileSystem::new_with_prefix(dir.path().join("data")).unwrap();
    assert!(all_objects_whole(Arc::new(store)).await >= digests.len());
    common::layout::assert_no_dangling_tags(&dir.path().join("data"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, moto"]
async fn blob_hits_on_a_bucket_can_redirect_to_presigned_urls() {
    let s3 = Moto::start(None, "127.0.0.1");
    let writer = Origin::start_s3(&s3.endpoint());
    let data = random_bytes(3 << 20, 31);
    let digest = push_blob(&writer.url(), "redirect/app", data).await;
    let cfg = format!(
        "listen: 127.0.0.1:{{PORT}}\nstorage:\n  preference: b\n  redirect_blobs: 15m\n  engines:\n    b: {}\n",
        s3.engine_yaml(None)
    );
    let proxy = Proxy::start(&cfg);
    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let url = proxy.url(&format!("/v2/redirect/app/blobs/{digest}"));
    let r = no_follow.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 307);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    assert!(
        loc.starts_with(&s3.endpoint()) && loc.contains("X-Amz-Signature"),
        "{loc}"
    );
    assert_eq!(r.headers()["cache-control"], "no-store");
    // A client following it gets the bytes from the store.
    let body = client()
        .get(&url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(format!("sha256:{}", sha256_hex(&body)), digest);
    // HEAD is answered directly.
    assert_eq!(no_follow.head(&url).send().await.unwrap().status(), 200);
    // Off by default: the same engine without the key serves the bytes itself.
    let plain = Proxy::start(&cfg.replace("  redirect_blobs: 15m\n", ""));
    assert_eq!(
        no_follow
            .get(plain.url(&format!("/v2/redirect/app/blobs/{digest}")))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}
