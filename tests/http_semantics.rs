//! HTTP as mirrors and CDNs use it: caching headers, conditional requests, ranges, HEAD, and bad
//! input answered with the spec's error codes while the process stays unharmed.

mod common;

use common::*;

async fn started() -> (Origin, Proxy) {
    let origin = Origin::start();
    origin.push(&[("small-1.0", "library/small:1.0", false)]);
    let proxy = Proxy::start(&mirror_config(
        &origin.url(),
        "cache: { tag_ttl: 30s, max_stale: 1h }\n",
    ));
    (origin, proxy)
}

/// The largest layer of library/small:1.0 (3 MiB).
async fn a_layer(proxy: &Proxy) -> (String, u64) {
    largest_layer(proxy, "library/small", SMALL).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, skopeo"]
async fn caching_headers_conditional_requests_and_ranges() {
    let (_origin, proxy) = started().await;
    let c = client();
    // Tag-addressed: short-lived, varies on Accept.
    let r = c
        .get(proxy.url("/v2/library/small/manifests/1.0"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers();
    assert_eq!(h["cache-control"], "public, max-age=30");
    assert_eq!(h["vary"], "Accept");
    assert_eq!(h["etag"], format!("\"{SMALL}\""));
    assert_eq!(
        h["content-type"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(h["docker-content-digest"], SMALL);
    assert_eq!(h["x-ociedge-region"], "eu");
    assert_eq!(h["x-ociedge-source"], "docker.io");
    let body = r.bytes().await.unwrap();
    assert_eq!(
        format!("sha256:{}", sha256_hex(&body)),
        SMALL,
        "upstream bytes served unchanged"
    );
    // Digest-addressed: immutable.
    let r = c
        .get(proxy.url(&format!("/v2/library/small/manifests/{SMALL}")))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["cache-control"],
        "public, max-age=31536000, immutable"
    );
    assert_eq!(r.headers()["x-ociedge-source"], "local");
    // If-None-Match: 304 for tags and digests.
    for path in [
        "/v2/library/small/manifests/1.0".to_string(),
        format!("/v2/library/small/manifests/{SMALL}"),
    ] {
        let r = c
            .get(proxy.url(&path))
            .header("if-none-match", format!("\"{SMALL}\""))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 304, "{path}");
    }
    // HEAD of a manifest: headers, no body.
    let r = c
        .head(proxy.url("/v2/library/small/manifests/1.0"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], body.len().to_string());

    let (layer, size) = a_layer(&proxy).await;
    let url = proxy.url(&format!("/v2/library/small/blobs/{layer}"));
    // HEAD of a blob on a miss: no fill, the size from the upstream.
    let r = c.head(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], size.to_string());
    assert_eq!(r.headers()["x-ociedge-source"], "docker.io");
    // A range on a miss.
    let r = c
        .get(&url)
        .header("range", "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes 100-199/{size}")
    );
    let part = r.bytes().await.unwrap();
    assert_eq!(part.len(), 100);
    let full = c.get(&url).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(format!("sha256:{}", sha256_hex(&full)), layer);
    assert_eq!(&full[100..200], &part[..]);
    // Ranges on a hit.
    let r = c
        .get(&url)
        .header("range", "bytes=-10")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["x-ociedge-source"], "local");
    assert_eq!(r.bytes().await.unwrap(), full.slice(full.len() - 10..));
    let r = c
        .get(&url)
        .header("range", format!("bytes={}-", size - 5))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().len(), 5);
    let r = c
        .get(&url)
        .header("range", format!("bytes={size}-"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    // If-Range with another validator: the whole blob.
    let r = c
        .get(&url)
        .header("range", "bytes=0-9")
        .header("if-range", "\"other\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // HEAD on a hit, and If-None-Match on a blob.
    let r = c.head(&url).send().await.unwrap();
    assert_eq!(r.headers()["x-ociedge-source"], "local");
    assert_eq!(r.headers()["accept-ranges"], "bytes");
    assert_eq!(r.headers()["etag"], format!("\"{layer}\""));
    let r = c
        .get(&url)
        .header("if-none-match", format!("\"{layer}\""))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    // Unknown content.
    let missing = format!("sha256:{}", "0".repeat(64));
    let r = c
        .get(proxy.url(&format!("/v2/library/small/blobs/{missing}")))
        .send()
        .await
        .unwrap();
    assert_oci_error(r, 404, "BLOB_UNKNOWN").await;
    let r = c
        .get(proxy.url("/v2/library/small/manifests/nope"))
        .send()
        .await
        .unwrap();
    assert_oci_error(r, 404, "MANIFEST_UNKNOWN").await;
    // Tags list with n/last, and referrers (an empty index when the upstream has none).
    let r = c
        .get(proxy.url("/v2/library/small/tags/list?n=5"))
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!(["1.0"]));
    let r = c
        .get(proxy.url(&format!("/v2/library/small/referrers/{SMALL}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"],
        "application/vnd.oci.image.index.v1+json"
    );
    // Metrics saw it all.
    let m = c
        .get(proxy.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "ociedge_http_requests_total{",
        "ociedge_bytes_served_total{source=\"local\"}",
        "ociedge_cache_requests_total{kind=\"blob\",result=\"hit\"}",
        "ociedge_fills_in_flight",
    ] {
        assert!(m.contains(needle), "{needle} in\n{m}");
    }
    assert_eq!(
        c.get(proxy.url("/readyz")).send().await.unwrap().status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, skopeo"]
async fn bad_input_gets_precise_errors_and_harms_nothing() {
    let (origin, proxy) = started().await;
    let c = client();
    let d = format!("sha256:{}", "a".repeat(64));
    let long = "a".repeat(256);
    let cases: Vec<(String, u16, &str)> = vec![
        (
            "/v2/Library/small/manifests/1.0".into(),
            400,
            "NAME_INVALID",
        ),
        (
            "/v2/library/../small/manifests/1.0".into(),
            400,
            "NAME_INVALID",
        ),
        (
            "/v2/library//small/manifests/1.0".into(),
            400,
            "NAME_INVALID",
        ),
        (
            "/v2/library/small-/manifests/1.0".into(),
            400,
            "NAME_INVALID",
        ),
        (format!("/v2/{long}/manifests/1.0"), 400, "NAME_INVALID"),
        (format!("/v2/{long}/blobs/{d}"), 400, "NAME_INVALID"),
        (
            "/v2/library/small/blobs/sha256:1234".into(),
            400,
            "DIGEST_INVALID",
        ),
        (
            "/v2/library/small/blobs/md5:d41d8cd98f00b204e9800998ecf8427e".into(),
            400,
            "DIGEST_INVALID",
        ),
        (
            format!("/v2/library/small/blobs/sha256:{}", "A".repeat(64)),
            400,
            "DIGEST_INVALID",
        ),
        // A manifest reference that is neither a tag nor a digest names no manifest.
        (
            "/v2/library/small/manifests/sha256:zz".into(),
            404,
            "MANIFEST_UNKNOWN",
        ),
        (
            "/v2/library/small/manifests/.hidden".into(),
            404,
            "MANIFEST_UNKNOWN",
        ),
        (
            "/v2/library/small/tags/list?n=-1".into(),
            400,
            "PAGINATION_NUMBER_INVALID",
        ),
    ];
    for (path, status, code) in &cases {
        let (got, body) = raw_get(&proxy.host(), path, "").await;
        assert_eq!(got, *status, "{path}: {body}");
        let v: serde_json::Value =
            serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        assert_eq!(v["errors"][0]["code"], *code, "{path}");
    }
    // Malformed ranges.
    let (layer, _) = a_layer(&proxy).await;
    for range in [
        "bytes=x-y",
        "bytes=5-2",
        "bytes=",
        "bytes=99999999999999999999-",
    ] {
        let r = c
            .get(proxy.url(&format!("/v2/library/small/blobs/{layer}")))
            .header("range", range)
            .send()
            .await
            .unwrap();
        assert_oci_error(r, 416, "RANGE_INVALID").await;
    }
    // A range in another unit is ignored (RFC 9110 §14.2): the whole blob.
    let r = c
        .get(proxy.url(&format!("/v2/library/small/blobs/{layer}")))
        .header("range", "chars=0-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "chars=0-1");
    // Writes without push.engine.
    let r = c
        .post(proxy.url("/v2/library/small/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let r = c
        .delete(proxy.url(&format!("/v2/library/small/manifests/{SMALL}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    // Nothing written for any of it, and the process is unharmed.
    let repos = proxy.data().join("docker/registry/v2/repositories");
    let names: Vec<_> = std::fs::read_dir(repos.join("library"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("small")]);
    assert_eq!(
        c.get(proxy.url("/healthz")).send().await.unwrap().status(),
        200
    );
    assert!(verify_pull(&proxy.host(), "library/small:1.0", SMALL));
    drop(origin);
}

/// A client that accepts only OCI manifests asks for a tag whose answer is Docker schema 2: the
/// authority has nothing else (Distribution answers 400), so the fresh answer is served as it is,
/// and the authority is not asked again for each such request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, skopeo"]
async fn a_tag_the_client_cannot_negotiate_is_not_revalidated_per_request() {
    let origin = Origin::start();
    origin.push(&[("small-1.0", "library/v2s2:1.0", true)]);
    let proxy = Proxy::start(&mirror_config(&origin.url(), "cache: { tag_ttl: 60s }\n"));
    let c = client();
    let docker = "application/vnd.docker.distribution.manifest.v2+json";
    let oci = "application/vnd.oci.image.manifest.v1+json";
    let r = c
        .get(proxy.url("/v2/library/v2s2/manifests/1.0"))
        .header("accept", format!("{oci}, {docker}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], docker);
    let asked = |log: &str| {
        log.lines()
            .filter(|l| {
                l.contains("/v2/library/v2s2/manifests/1.0") && l.contains("response completed")
            })
            .count()
    };
    let before = asked(&origin.log());
    for _ in 0..20 {
        let r = c
            .get(proxy.url("/v2/library/v2s2/manifests/1.0"))
            .header("accept", oci)
            .send()
            .await
            .unwrap();
        if r.status() != 200 {
            eprintln!("{}\n{}", proxy.log(), origin.log());
        }
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], docker);
        assert!(r.headers().get("age").is_none(), "fresh, not stale");
    }
    let after = asked(&origin.log());
    assert!(
        after - before <= 1,
        "the authority was asked {} times for 20 requests",
        after - before
    );
}
