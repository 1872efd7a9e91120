//! The local engine stays under `cache.max_size`: least recently used cached content goes first,
//! with the manifests and tags that need it; content being read, pushed content and the most
//! recently used content stay; the order survives a restart.

mod common;

use std::time::Duration;

use common::config::Config;
use common::layout::assert_no_dangling_tags;
use common::*;

/// Bytes of blob data in a local engine directory.
fn usage(data: &std::path::Path) -> u64 {
    fn walk(p: &std::path::Path) -> u64 {
        let Ok(rd) = std::fs::read_dir(p) else {
            return 0;
        };
        rd.flatten()
            .map(|e| {
                // An entry may be evicted while it is walked.
                let Ok(m) = e.metadata() else { return 0 };
                if m.is_dir() {
                    walk(&e.path())
                } else {
                    m.len()
                }
            })
            .sum()
    }
    walk(&data.join("docker/registry/v2/blobs"))
}

/// The latest access time of each digest over every published sidecar of `data`.
fn sidecar_access_times(data: &std::path::Path) -> std::collections::HashMap<String, u64> {
    let mut out = std::collections::HashMap::new();
    let Ok(rd) = std::fs::read_dir(data.join("_ociedge/lru")) else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(b) = std::fs::read(e.path()) else {
            continue;
        };
        let Ok(map) = serde_json::from_slice::<std::collections::HashMap<String, (u64, bool)>>(&b)
        else {
            continue;
        };
        for (d, (t, _)) in map {
            let x = out.entry(d).or_insert(t);
            *x = (*x).max(t);
        }
    }
    out
}

async fn get(proxy: &Proxy, repo: &str, digest: &str) -> (String, String) {
    let r = client()
        .get(proxy.url(&format!("/v2/{repo}/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let src = r.headers()["x-ociedge-source"]
        .to_str()
        .unwrap()
        .to_string();
    let body = r.bytes().await.unwrap();
    (src, format!("sha256:{}", sha256_hex(&body)))
}

async fn head_source(proxy: &Proxy, repo: &str, digest: &str) -> String {
    let r = client()
        .head(proxy.url(&format!("/v2/{repo}/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    r.headers()["x-ociedge-source"]
        .to_str()
        .unwrap()
        .to_string()
}

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, skopeo"]
async fn the_cap_holds_and_the_most_recent_content_stays() {
    let origin = Origin::start();
    origin.push(&[("small-1.0", "library/small:1.0", false)]);
    let mut blobs = Vec::new();
    for i in 0..30u64 {
        blobs.push(
            push_blob(
                &origin.url(),
                "evict/many",
                random_bytes(10 << 20, 1000 + i),
            )
            .await,
        );
    }
    let proxy = Proxy::start(
        &Config::mirror(&origin.url())
            .cache("max_size", "100MiB")
            .cache("min_idle", "0s")
            .render(),
    );
    assert!(verify_pull(&proxy.host(), "library/small:1.0", SMALL));
    let cap = 100 * MIB;
    for d in &blobs {
        let (_, got) = get(&proxy, "evict/many", d).await;
        assert_eq!(&got, d);
        // Above the cap for at most one eviction pass.
        let data = proxy.data();
        assert!(
            eventually(Duration::from_secs(5), async || usage(&data) <= cap).await,
            "usage {} over the cap",
            usage(&data)
        );
    }
    // The most recently pulled are still local; the first ones were evicted and refill.
    for d in &blobs[26..] {
        assert_eq!(head_source(&proxy, "evict/many", d).await, "local");
    }
    assert!(!proxy.blob_path(&blobs[0]).exists());
    let (src, got) = get(&proxy, "evict/many", &blobs[0]).await;
    assert_eq!(
        (src.as_str(), got.as_str()),
        ("docker.io", blobs[0].as_str())
    );
    // library/small's layers went, and its manifest and tag with them: nothing dangles, and the
    // image pulls again (refilled).
    assert_no_dangling_tags(&proxy.data());
    assert!(verify_pull(&proxy.host(), "library/small:1.0", SMALL));
    let m = get_text(proxy.url("/metrics")).await;
    assert!(m.contains("ociedge_evictions_total"), "{m}");
    assert!(m.contains("ociedge_local_engine_bytes"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry"]
async fn a_blob_being_read_is_not_evicted() {
    use futures::StreamExt;
    let origin = Origin::start();
    let a = push_blob(&origin.url(), "evict/pin", random_bytes(40 << 20, 1)).await;
    let b = push_blob(&origin.url(), "evict/pin", random_bytes(30 << 20, 2)).await;
    let c = push_blob(&origin.url(), "evict/pin", random_bytes(30 << 20, 3)).await;
    let proxy = Proxy::start(
        &Config::mirror(&origin.url())
            .cache("max_size", "64MiB")
            .cache("min_idle", "0s")
            .render(),
    );
    get(&proxy, "evict/pin", &a).await; // cached
                                        // A slow reader of a hit holds it.
    let r = client()
        .get(proxy.url(&format!("/v2/evict/pin/blobs/{a}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-ociedge-source"], "local");
    let mut stream = r.bytes_stream();
    let mut got = stream.next().await.unwrap().unwrap().to_vec();
    get(&proxy, "evict/pin", &b).await;
    get(&proxy, "evict/pin", &c).await;
    // Eviction ran (the engine is back under the cap) and left the pinned blob.
    let data = proxy.data();
    assert!(
        eventually(Duration::from_secs(30), async || usage(&data) <= 64 * MIB).await,
        "eviction brought the engine under the cap"
    );
    assert!(proxy.blob_path(&a).exists(), "the blob being read stays");
    while let Some(chunk) = stream.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(format!("sha256:{}", sha256_hex(&got)), a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, skopeo"]
async fn pushed_content_is_never_evicted() {
    let origin = Origin::start();
    let mut pulled = Vec::new();
    for i in 0..5u64 {
        pulled.push(push_blob(&origin.url(), "evict/other", random_bytes(20 << 20, 50 + i)).await);
    }
    let cfg = Config::mirror(&origin.url())
        .push("eu")
        .cache("max_size", "64MiB")
        .cache("min_idle", "0s")
        .render();
    let proxy = Proxy::start(&cfg);
    // Pushed here, to the preferred engine: its only copy may be here.
    assert!(skopeo_push(&proxy.host(), "small-1.0", "team/app:1.0"));
    let pushed = push_blob(&proxy.url(""), "team/big", random_bytes(30 << 20, 77)).await;
    for d in &pulled {
        get(&proxy, "evict/other", d).await;
    }
    // Pulled content goes, to make room (eviction ran)…
    assert!(
        eventually(Duration::from_secs(30), async || !proxy
            .blob_path(&pulled[0])
            .exists())
        .await,
        "the least recently used pulled blob was evicted"
    );
    // …and pushed content stays.
    assert!(proxy.blob_path(&pushed).exists(), "a pushed blob stays");
    assert_no_dangling_tags(&proxy.data());
    assert!(
        verify_pull(&proxy.host(), "team/app:1.0", SMALL),
        "the pushed image is whole"
    );
    // Pulled content did go, to make room.
    assert!(!proxy.blob_path(&pulled[0]).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry"]
async fn a_restart_keeps_the_eviction_order() {
    let origin = Origin::start();
    let mut d = Vec::new();
    for i in 0..4u64 {
        d.push(
            push_blob(
                &origin.url(),
                "evict/order",
                random_bytes(18 << 20, 200 + i),
            )
            .await,
        );
    }
    let cfg = Config::mirror(&origin.url())
        .cache("max_size", "64MiB")
        .cache("min_idle", "0s")
        .render();
    let proxy = Proxy::start(&cfg);
    // Access times have a one-second grain (ties go by digest): one second apart, so the order
    // is A, B, C whatever the speed of the fills.
    for x in &d[..3] {
        get(&proxy, "evict/order", x).await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    // A is used again: now the most recent, though its file is the oldest.
    get(&proxy, "evict/order", &d[0]).await;
    // The access times are published (SIGKILL below gives no chance to publish on shutdown):
    // the sidecar says A was used after C.
    let data = proxy.data();
    let (a, c) = (d[0].clone(), d[2].clone());
    assert!(
        eventually(Duration::from_secs(60), async || {
            let times = sidecar_access_times(&data);
            matches!((times.get(&a), times.get(&c)), (Some(ta), Some(tc)) if ta > tc)
        })
        .await,
        "the access times were published: {:?}",
        sidecar_access_times(&data)
    );
    let dir = Proxy::restart(proxy);
    let proxy = Proxy::start_in(&cfg, dir);
    // The index is rebuilt from the engine and the sidecar (three blobs, 54 MiB: under the
    // low-water mark, 57.6 MiB, which an idle process drains to).
    assert!(
        eventually(Duration::from_secs(60), async || metric(
            &proxy,
            "ociedge_local_engine_bytes"
        )
        .await
        .is_some_and(|b| b >= (54 * MIB) as f64))
        .await,
        "the index was rebuilt"
    );
    get(&proxy, "evict/order", &d[3]).await;
    let data = proxy.data();
    assert!(eventually(Duration::from_secs(15), async || usage(&data) <= 64 * MIB).await);
    assert!(
        proxy.blob_path(&d[0]).exists(),
        "the most recently used blob survived the restart"
    );
    assert!(
        !proxy.blob_path(&d[1]).exists(),
        "the least recently used went first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry"]
async fn access_times_are_published_on_shutdown() {
    let origin = Origin::start();
    let d = push_blob(&origin.url(), "evict/term", random_bytes(1 << 20, 400)).await;
    let cfg = Config::mirror(&origin.url())
        .cache("max_size", "64MiB")
        .cache("min_idle", "0s")
        .render();
    let mut proxy = Proxy::start(&cfg);
    get(&proxy, "evict/term", &d).await;
    // SIGTERM at once, before the publishing timer: the graceful shutdown publishes them.
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &proxy.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -TERM");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while proxy.child.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "ociedge did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let times = sidecar_access_times(&proxy.data());
    assert!(times.contains_key(&d), "{times:?}\n{}", proxy.log());
}
