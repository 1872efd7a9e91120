//! A registry that is also a mirror (`push.engine` and `upstreams:` together): a repository
//! pushed through ociedge is decided by the preferred engine (its tags list, deletes by digest),
//! a mirrored one by its upstream (a moved tag is seen after `tag_ttl`), even though both live
//! in the same local engine.

mod common;

use std::time::Duration;

use common::*;

async fn status(method: reqwest::Method, url: String) -> u16 {
    client()
        .request(method, url)
        .send()
        .await
        .expect("request")
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, skopeo"]
async fn pushed_content_is_decided_by_the_preferred_engine_beside_an_upstream() {
    let origin = Origin::start();
    origin.seed();
    let p = Proxy::start(&mirror_config(
        &origin.url(),
        "push: { engine: eu }\ncache: { tag_ttl: 1s }\n",
    ));
    // Pushed through the API (skopeo's blob-info cache, shared by every test on the machine,
    // can name another test's repository on a reused port as a mount source and so make the
    // push depend on what ran before).
    let config = push_blob(&p.url(""), "team/pushed", b"{}".to_vec()).await;
    let layer = push_blob(&p.url(""), "team/pushed", random_bytes(4096, 7)).await;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2 },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": 4096 }],
    })
    .to_string();
    let app = format!("sha256:{}", sha256_hex(manifest.as_bytes()));
    let r = client()
        .put(p.url("/v2/team/pushed/manifests/v1"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "push");
    // Without `auth:` every repository is readable, and a client told by a HEAD (answered by
    // digest, as a mirror answers) that a blob exists skips its upload: a manifest referencing a
    // stored blob of another repository is accepted, the blob linked into its repository.
    // (Under `auth:` it is refused: tests/access.rs.)
    let other = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2 },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": 4096 }],
    })
    .to_string();
    let r = client()
        .put(p.url("/v2/team/other/manifests/v1"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(other)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        201,
        "a stored blob of another repository, without auth:"
    );
    // The tags list of the pushed repository (the upstream does not know it).
    let r = client()
        .get(p.url("/v2/team/pushed/tags/list"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "tags/list of a pushed repository");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!(["v1"]));
    // A delete by digest of its manifest and of a blob is seen by the next GET.
    let manifest_url = p.url(&format!("/v2/team/pushed/manifests/{app}"));
    let blob_url = p.url(&format!("/v2/team/pushed/blobs/{layer}"));
    assert_eq!(status(reqwest::Method::GET, blob_url.clone()).await, 200);
    assert_eq!(status(reqwest::Method::DELETE, blob_url.clone()).await, 202);
    assert_eq!(
        status(reqwest::Method::DELETE, manifest_url.clone()).await,
        202
    );
    for _ in 0..2 {
        assert_eq!(
            status(reqwest::Method::GET, manifest_url.clone()).await,
            404
        );
        assert_eq!(
            status(reqwest::Method::HEAD, manifest_url.clone()).await,
            404
        );
        assert_eq!(status(reqwest::Method::GET, blob_url.clone()).await, 404);
        assert_eq!(status(reqwest::Method::HEAD, blob_url.clone()).await, 404);
    }
    let r = client()
        .get(p.url("/v2/team/pushed/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "the tag went with its manifest");

    // A mirrored repository in the same local engine: its upstream stays the authority. Pull
    // the tag, move it upstream, and it is seen once tag_ttl has passed.
    let tag_url = p.url("/v2/library/small/manifests/1.0");
    let digest = |r: reqwest::Response| {
        r.headers()["docker-content-digest"]
            .to_str()
            .unwrap()
            .to_string()
    };
    let r = client().get(tag_url.clone()).send().await.unwrap();
    assert_eq!(digest(r), SMALL);
    origin.push(&[("small-1.1", "library/small:1.0", false)]);
    let moved = eventually(Duration::from_secs(20), async || {
        let r = client().get(tag_url.clone()).send().await.unwrap();
        digest(r) == SMALL_1_1
    })
    .await;
    assert!(moved, "a mirrored tag moved upstream was never revalidated");
    // Its tags list is the upstream's.
    let r = client()
        .get(p.url("/v2/library/small/tags/list"))
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!(["1.0", "1.1"]), "{v}");
}
