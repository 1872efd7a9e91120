//! What a second region ends with: deletes replicated, the newest tag value winning, jobs that
//! can never succeed moved aside, and pulls served from whichever engine has the content before
//! replication reaches the local one. Pushed over the HTTP API (no external programs); a
//! replication target is "down" while a file stands where its `docker/` directory belongs.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::config::two_regions;
use common::*;

/// Takes the `file://` engine at `dir` down (every write and read under `docker/` fails).
fn engine_down(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let _ = std::fs::remove_dir_all(dir.join("docker"));
    std::fs::write(dir.join("docker"), b"down").unwrap();
}

fn engine_up(dir: &Path) {
    let _ = std::fs::remove_file(dir.join("docker"));
}

fn repo_dir(engine: &Path, repo: &str) -> PathBuf {
    engine.join(format!("docker/registry/v2/repositories/{repo}"))
}

fn hex(digest: &str) -> &str {
    digest.trim_start_matches("sha256:")
}

fn tag_value(engine: &Path, repo: &str, tag: &str) -> Option<String> {
    std::fs::read_to_string(
        repo_dir(engine, repo).join(format!("_manifests/tags/{tag}/current/link")),
    )
    .ok()
    .map(|s| s.trim().to_string())
}

fn manifest_linked(engine: &Path, repo: &str, digest: &str) -> bool {
    repo_dir(engine, repo)
        .join(format!("_manifests/revisions/sha256/{}/link", hex(digest)))
        .exists()
}

fn blob_linked(engine: &Path, repo: &str, digest: &str) -> bool {
    repo_dir(engine, repo)
        .join(format!("_layers/sha256/{}/link", hex(digest)))
        .exists()
}

async fn backlog(proxy: &Proxy) -> Option<u64> {
    let s: serde_json::Value = client()
        .get(proxy.url("/_ociedge/status"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    s["replication_backlog"]["us"]["jobs"].as_u64()
}

async fn drained(proxy: &Proxy) -> bool {
    eventually(Duration::from_secs(60), async || {
        backlog(proxy).await == Some(0)
    })
    .await
}

/// A pushed image: its manifest digest and its layer.
struct Image {
    manifest: String,
    layer: String,
}

/// Pushes a one-layer image (`seed` makes it distinct) to `repo:tag`.
async fn push_image(proxy: &Proxy, repo: &str, tag: &str, seed: u64) -> Image {
    let base = proxy.url("");
    let layer_bytes = random_bytes(20_000, seed);
    let layer = push_blob(&base, repo, layer_bytes.clone()).await;
    let config = format!(r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#).into_bytes();
    let config_digest = push_blob(&base, repo, config.clone()).await;
    let m = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len() },
        "layers": [ { "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": layer_bytes.len() } ]
    })
    .to_string();
    let r = client()
        .put(proxy.url(&format!("/v2/{repo}/manifests/{tag}")))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(m.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "manifest push");
    Image {
        manifest: format!("sha256:{}", sha256_hex(m.as_bytes())),
        layer,
    }
}

async fn delete(proxy: &Proxy, path: &str) -> u16 {
    client()
        .delete(proxy.url(path))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn failures(proxy: &Proxy) -> f64 {
    metric(proxy, "ociedge_replication_failures_total{engine=\"us\"}")
        .await
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deletes_are_replicated_to_every_engine() {
    let root = tempfile::tempdir().unwrap();
    let (eu_cfg, us_cfg) = two_regions(root.path());
    let eu = Proxy::start(&eu_cfg);
    // The other region's process (pushes and deletes through it go to eu's engine too).
    let us_proxy = Proxy::start(&us_cfg);
    let us = root.path().join("us");
    let a = push_image(&eu, "del/app", "1.0", 1).await;
    let r = client()
        .put(eu.url("/v2/del/app/manifests/keep"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(
            client()
                .get(eu.url(&format!("/v2/del/app/manifests/{}", a.manifest)))
                .header("accept", "application/vnd.oci.image.manifest.v1+json")
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert!(drained(&eu).await, "replicated");
    assert_eq!(
        tag_value(&us, "del/app", "1.0").as_deref(),
        Some(a.manifest.as_str())
    );
    assert!(manifest_linked(&us, "del/app", &a.manifest));
    assert!(blob_linked(&us, "del/app", &a.layer));

    // By tag: the tag goes in us too, the other tag and the manifest stay.
    assert_eq!(delete(&eu, "/v2/del/app/manifests/1.0").await, 202);
    assert!(
        eventually(Duration::from_secs(60), async || tag_value(
            &us, "del/app", "1.0"
        )
        .is_none())
        .await,
        "the tag delete reached us"
    );
    assert!(tag_value(&us, "del/app", "keep").is_some());
    // By digest: the manifest and the tags pointing at it go in us too.
    assert_eq!(
        delete(&eu, &format!("/v2/del/app/manifests/{}", a.manifest)).await,
        202
    );
    assert!(
        eventually(Duration::from_secs(60), async || !manifest_linked(
            &us,
            "del/app",
            &a.manifest
        ))
        .await,
        "the manifest delete reached us"
    );
    assert!(
        tag_value(&us, "del/app", "keep").is_none(),
        "no tag left on a deleted manifest"
    );
    // A blob, deleted through the other region: its link goes in us too.
    assert_eq!(
        delete(&us_proxy, &format!("/v2/del/app/blobs/{}", a.layer)).await,
        202
    );
    assert!(
        eventually(Duration::from_secs(60), async || !blob_linked(
            &us, "del/app", &a.layer
        ))
        .await,
        "the blob delete reached us"
    );
    assert!(drained(&eu).await);
    assert!(
        common::layout::tags(&us).is_empty(),
        "{:?}",
        common::layout::tags(&us)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_newest_tag_value_wins_after_the_replica_returns() {
    let root = tempfile::tempdir().unwrap();
    let (eu_cfg, _) = two_regions(root.path());
    let us = root.path().join("us");
    engine_down(&us);
    let eu = Proxy::start(&eu_cfg);
    let a = push_image(&eu, "tags/app", "prod", 10).await;
    // A's jobs fail several times, so they wait in a long backoff…
    assert!(
        eventually(Duration::from_secs(60), async || failures(&eu).await
            >= 12.0)
        .await,
        "replication to the stopped target failed"
    );
    // …while B's fail once and are retried sooner.
    let b = push_image(&eu, "tags/app", "prod", 11).await;
    assert_ne!(a.manifest, b.manifest);
    let before = failures(&eu).await;
    assert!(
        eventually(Duration::from_secs(60), async || failures(&eu).await
            >= before + 4.0)
        .await,
        "B's jobs failed too"
    );
    engine_up(&us);
    assert!(drained(&eu).await, "replication drained");
    assert_eq!(
        tag_value(&root.path().join("eu"), "tags/app", "prod").as_deref(),
        Some(b.manifest.as_str())
    );
    assert_eq!(
        tag_value(&us, "tags/app", "prod").as_deref(),
        Some(b.manifest.as_str()),
        "the replica ends on the newest value"
    );
    common::layout::assert_no_dangling_tags(&us);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_pushes_of_one_tag_end_on_one_value_everywhere() {
    let root = tempfile::tempdir().unwrap();
    let (eu_cfg, _) = two_regions(root.path());
    let eu = Proxy::start(&eu_cfg);
    // The images first, then 16 concurrent PUTs of one tag, each naming another of them.
    let mut manifests = Vec::new();
    for i in 0..16u64 {
        let img = push_image(&eu, "race/app", &format!("v{i}"), 100 + i).await;
        let body = client()
            .get(eu.url(&format!("/v2/race/app/manifests/{}", img.manifest)))
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        manifests.push(body);
    }
    // Rounds of 16 concurrent PUTs of one tag (a tag per round).
    let mut stored = Vec::new();
    for round in 0..8 {
        let tag = format!("prod{round}");
        let puts = manifests.iter().map(|body| {
            let url = eu.url(&format!("/v2/race/app/manifests/{tag}"));
            let body = body.clone();
            async move {
                client()
                    .put(url)
                    .header("content-type", "application/vnd.oci.image.manifest.v1+json")
                    .body(body)
                    .send()
                    .await
                    .unwrap()
                    .status()
            }
        });
        for st in futures::future::join_all(puts).await {
            assert_eq!(st, 201);
        }
        let value = tag_value(&root.path().join("eu"), "race/app", &tag).unwrap();
        let served = client()
            .head(eu.url(&format!("/v2/race/app/manifests/{tag}")))
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .await
            .unwrap();
        assert_eq!(
            served.headers()["docker-content-digest"].to_str().unwrap(),
            value,
            "round {round}: the answer by tag is the stored value"
        );
        stored.push((tag, value));
    }
    assert!(drained(&eu).await);
    for (tag, value) in stored {
        assert_eq!(
            tag_value(&root.path().join("us"), "race/app", &tag),
            Some(value),
            "{tag}: the replica ends on the stored value"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_that_can_never_succeed_are_moved_aside() {
    let root = tempfile::tempdir().unwrap();
    let (eu_cfg, _) = two_regions(root.path());
    let eu = Proxy::start(&eu_cfg);
    // Records another program (or an older version) left in the queue.
    let queue = root.path().join("eu/_ociedge/replication/us");
    std::fs::create_dir_all(&queue).unwrap();
    let missing = format!("sha256:{}", "7".repeat(64));
    let records = [
        serde_json::json!({"kind": "tag", "repo": "ok/repo", "tag": ".bad", "digest": missing}),
        serde_json::json!({"kind": "manifest", "repo": "Not/Valid", "digest": missing}),
        serde_json::json!({"kind": "manifest", "repo": "ok/repo", "digest": missing}),
        serde_json::json!({"kind": "blob", "repo": "ok/repo", "digest": missing}),
        serde_json::json!({"kind": "what"}),
    ];
    for (i, r) in records.iter().enumerate() {
        std::fs::write(
            queue.join(format!("{:024}-{i:016x}.json", 1)),
            r.to_string(),
        )
        .unwrap();
    }
    // The worker keeps going: a push behind them is replicated.
    let a = push_image(&eu, "ok/after", "1.0", 5).await;
    assert!(drained(&eu).await, "the backlog drains");
    assert_eq!(
        tag_value(&root.path().join("us"), "ok/after", "1.0").as_deref(),
        Some(a.manifest.as_str())
    );
    let dead = std::fs::read_dir(root.path().join("eu/_ociedge/replication-dead/us"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(dead, records.len(), "every such job is kept aside");
    assert_eq!(
        metric(&eu, "ociedge_replication_dead_letters_total{engine=\"us\"}").await,
        Some(records.len() as f64)
    );
    assert!(eu.log().contains("can never succeed"), "{}", eu.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pull_in_another_region_before_replication_is_served_from_the_engine_that_has_it() {
    let root = tempfile::tempdir().unwrap();
    let (eu_cfg, us_cfg) = two_regions(root.path());
    let us_dir = root.path().join("us");
    engine_down(&us_dir);
    let eu = Proxy::start(&eu_cfg);
    let us = Proxy::start(&us_cfg);
    let a = push_image(&eu, "geo/app", "1.0", 20).await;
    // Replication cannot reach us; region us serves the image from eu.
    assert!(backlog(&eu).await.unwrap_or(0) > 0);
    let c = client();
    let r = c
        .get(us.url("/v2/geo/app/manifests/1.0"))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", us.log());
    assert_eq!(r.headers()["docker-content-digest"], a.manifest.as_str());
    let r = c
        .get(us.url(&format!("/v2/geo/app/blobs/{}", a.layer)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ociedge-source"], "eu");
    let body = r.bytes().await.unwrap();
    assert_eq!(format!("sha256:{}", sha256_hex(&body)), a.layer);
    // The target comes back: replication completes, and us serves from its own engine.
    engine_up(&us_dir);
    assert!(drained(&eu).await, "replication drained");
    assert!(
        eventually(Duration::from_secs(60), async || {
            let r = client()
                .get(us.url(&format!("/v2/geo/app/blobs/{}", a.layer)))
                .send()
                .await
                .unwrap();
            r.status() == 200 && r.headers()["x-ociedge-source"] == "local"
        })
        .await,
        "served from the local engine once replicated"
    );
}
