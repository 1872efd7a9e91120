//! Pushes to the preferred engine, durable background replication, backfill; with skopeo as the
//! client, docker-registry reading what ociedge wrote, and kill -9 in the middle.

mod common;

use std::time::Duration;

use common::config::{two_regions, Config, Engine, Upstream};
use common::layout::{assert_no_dangling_tags, complete};
use common::*;

async fn backlog_empty(proxy: &Proxy) -> bool {
    let s: serde_json::Value = client()
        .get(proxy.url("/_ociedge/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    s["replication_backlog"]
        .as_object()
        .is_some_and(|m| m.values().all(|t| t["jobs"] == 0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs skopeo, docker-registry"]
async fn pushed_images_are_pulled_in_every_region_after_replication() {
    let root = tempfile::tempdir().unwrap();
    let (eu_cfg, us_cfg) = two_regions(root.path());
    let eu = Proxy::start(&eu_cfg);
    let us = Proxy::start(&us_cfg);
    assert!(
        skopeo_push(&eu.host(), "small-1.0", "team/app:1.0"),
        "single-arch push"
    );
    assert!(
        skopeo_push(&eu.host(), "multi-1.0", "team/multi:1.0"),
        "multi-arch push"
    );
    // At once from the region that took the push.
    assert!(verify_pull(&eu.host(), "team/app:1.0", SMALL));
    assert!(verify_pull(&eu.host(), "team/multi:1.0", MULTI));
    // Within seconds from the other region, from its own engine.
    assert!(
        eventually(Duration::from_secs(20), async || backlog_empty(&eu).await).await,
        "replication finished"
    );
    assert!(verify_pull(&us.host(), "team/app:1.0", SMALL));
    assert!(verify_pull(&us.host(), "team/multi:1.0", MULTI));
    let m: serde_json::Value = client()
        .get(us.url(&format!("/v2/team/app/manifests/{SMALL}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let layer = m["layers"][0]["digest"].as_str().unwrap();
    let r = client()
        .get(us.url(&format!("/v2/team/app/blobs/{layer}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-ociedge-source"], "local");
    // A push through the us region goes to the preferred engine (eu) and comes back replicated.
    assert!(skopeo_push(&us.host(), "app-v1", "team/other:v1"));
    assert!(complete(&root.path().join("eu"), APP).is_ok());
    assert!(
        eventually(Duration::from_secs(20), async || complete(
            &root.path().join("us"),
            APP
        )
        .is_ok())
        .await
    );
    for dir in ["eu", "us"] {
        assert_no_dangling_tags(&root.path().join(dir));
    }
    // docker-registry serves what ociedge wrote and replicated.
    let reg = DirRegistry::start(&root.path().join("us"));
    let host = reg.host();
    let ok = verify_pull(&host, "team/app:1.0", SMALL)
        && verify_pull(&host, "team/multi:1.0", MULTI)
        && verify_pull(&host, "team/other:v1", APP);
    assert!(ok, "docker-registry serving the replicated layout");
}

// The push and content-management API, run on every kind of storage engine alike (the way
// object_store runs one conformance suite on every backend).

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_push_api_validates_chunks_digests_and_manifests() {
    let root = tempfile::tempdir().unwrap();
    push_api_suite(
        Engine::new("eu", &format!("file://{}/eu", root.path().display())),
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_push_api_on_a_memory_engine() {
    push_api_suite(Engine::new("eu", "memory://"), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs moto"]
async fn the_push_api_on_an_s3_engine() {
    let s3 = common::regions::Moto::start(None, "127.0.0.1");
    push_api_suite(s3.engine("eu", None), true).await;
}

/// The tags `tags/list` answers for `repo` (none for a 404).
async fn listed_tags(base: &str, repo: &str) -> Vec<String> {
    let r = client()
        .get(format!("{base}/v2/{repo}/tags/list"))
        .send()
        .await
        .unwrap();
    if r.status() == 404 {
        return Vec::new();
    }
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    v["tags"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// `engine`: the preferred (and local) engine `eu`; `durable`: whether it outlives the process
/// (`memory://` does not).
async fn push_api_suite(engine: Engine, durable: bool) {
    let cfg = Config::new("eu").engine(engine).push("eu").render();
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start_in(&cfg, dir);
    let c = client();
    let base = proxy.url("");
    let data = random_bytes(300_000, 9);
    let digest = format!("sha256:{}", sha256_hex(&data));

    // Chunked upload: in order, out of order and repeated chunks.
    let r = c
        .post(format!("{base}/v2/t/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let patch = async |range: &str, body: &[u8]| {
        c.patch(format!("{base}{loc}"))
            .header("content-range", range)
            .header("content-type", "application/octet-stream")
            .body(body.to_vec())
            .send()
            .await
            .unwrap()
    };
    let r = patch("0-99999", &data[..100_000]).await;
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["range"], "0-99999");
    let r = patch("0-99999", &data[..100_000]).await;
    assert_eq!(r.status(), 416, "repeated chunk");
    // Its body was not read: the client is told not to reuse the connection.
    assert_eq!(r.headers()["connection"], "close");
    assert_eq!(
        patch("200000-299999", &data[200_000..]).await.status(),
        416,
        "out of order"
    );
    // The session survives a restart of the proxy (where the engine outlives the process).
    let proxy = if durable {
        let dir = Proxy::restart(proxy);
        Proxy::start_in(&cfg, dir)
    } else {
        proxy
    };
    let base = proxy.url("");
    let r = c.get(format!("{base}{loc}")).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["range"], "0-99999");
    let r = c
        .patch(format!("{base}{loc}"))
        .header("content-range", "100000-199999")
        .body(data[100_000..200_000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // Wrong digest: refused, nothing stored.
    let wrong = format!("sha256:{}", "1".repeat(64));
    let r = c
        .put(format!("{base}{loc}?digest={wrong}"))
        .body(data[200_000..].to_vec())
        .send()
        .await
        .unwrap();
    assert_oci_error(r, 400, "DIGEST_INVALID").await;
    let r = c
        .head(format!("{base}/v2/t/app/blobs/{wrong}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "nothing stored under the wrong digest");
    // Monolithic upload, then a mount into another repository.
    let r = c
        .post(format!("{base}/v2/t/app/blobs/uploads/?digest={digest}"))
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["docker-content-digest"], digest.as_str());
    let r = c
        .post(format!(
            "{base}/v2/t/other/blobs/uploads/?mount={digest}&from=t/app"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = c
        .head(format!("{base}/v2/t/other/blobs/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A mount of an unknown blob starts an upload instead.
    let r = c
        .post(format!(
            "{base}/v2/t/other/blobs/uploads/?mount={wrong}&from=t/app"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // Chunked upload to completion, with the last chunk in the PUT.
    let r = c
        .post(format!("{base}/v2/t/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let cfg_blob = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let cfg_digest = format!("sha256:{}", sha256_hex(&cfg_blob));
    let r = c
        .patch(format!("{base}{loc}"))
        .body(cfg_blob[..10].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let r = c
        .put(format!("{base}{loc}?digest={cfg_digest}"))
        .body(cfg_blob[10..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // Manifests: a missing blob is MANIFEST_BLOB_UNKNOWN; a good one is stored; a referrer too.
    let manifest = |layer: &str, subject: Option<&str>| {
        let mut m = serde_json::json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest, "size": cfg_blob.len() },
            "layers": [ { "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": data.len() } ]
        });
        if let Some(s) = subject {
            m["subject"] = serde_json::json!({ "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": s, "size": 1 });
            m["artifactType"] = serde_json::json!("application/vnd.example.sbom");
        }
        m.to_string()
    };
    let put = async |reference: &str, body: String| {
        c.put(format!("{base}/v2/t/app/manifests/{reference}"))
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .body(body)
            .send()
            .await
            .unwrap()
    };
    let r = put("bad", manifest(&wrong, None)).await;
    assert_oci_error(r, 400, "MANIFEST_BLOB_UNKNOWN").await;
    let r = put("1.0", "{not json".into()).await;
    assert_oci_error(r, 400, "MANIFEST_INVALID").await;
    // Too large: refused from its Content-Length, before the body is read.
    let (status, _) = raw_get(&proxy.host(), "/v2/t/app/manifests/big", "").await;
    assert_eq!(status, 404);
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(proxy.host()).await.unwrap();
        let req = format!("PUT /v2/t/app/manifests/big HTTP/1.1\r\nHost: x\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: {}\r\n\r\n", 5 << 20);
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        assert!(
            String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 413"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
    let body = manifest(&digest, None);
    let mdigest = format!("sha256:{}", sha256_hex(body.as_bytes()));
    let r = put("1.0", body.clone()).await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["docker-content-digest"], mdigest.as_str());
    let r = put(&format!("sha256:{}", "2".repeat(64)), body.clone()).await;
    // A digest reference must match the bytes.
    assert_oci_error(r, 400, "DIGEST_INVALID").await;
    let r = c
        .get(format!("{base}/v2/t/app/manifests/1.0"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), body);
    let sbom = manifest(&digest, Some(&mdigest));
    let r = put(
        &format!("sha256:{}", sha256_hex(sbom.as_bytes())),
        sbom.clone(),
    )
    .await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["oci-subject"], mdigest.as_str());
    let r = c
        .get(format!("{base}/v2/t/app/referrers/{mdigest}"))
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(
        v["manifests"][0]["artifactType"],
        "application/vnd.example.sbom"
    );
    let r = c
        .get(format!(
            "{base}/v2/t/app/referrers/{mdigest}?artifactType=other"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["oci-filters-applied"], "artifactType");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 0);
    // A reference that is neither a tag nor a digest names no manifest.
    for bad in [".hidden", "-x", "sha256:nothex"] {
        for m in [reqwest::Method::GET, reqwest::Method::HEAD] {
            let r = c
                .request(m.clone(), format!("{base}/v2/t/app/manifests/{bad}"))
                .send()
                .await
                .unwrap();
            if m == reqwest::Method::GET {
                assert_oci_error(r, 404, "MANIFEST_UNKNOWN").await;
            } else {
                assert_eq!(r.status(), 404, "{m} {bad}");
            }
        }
    }
    // Deletes. A deleted tag leaves tags/list (on every kind of engine).
    assert_eq!(put("2.0", body.clone()).await.status(), 201);
    assert_eq!(listed_tags(&base, "t/app").await, ["1.0", "2.0"]);
    assert_eq!(
        c.delete(format!("{base}/v2/t/app/manifests/1.0"))
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    let r = c
        .get(format!("{base}/v2/t/app/manifests/1.0"))
        .send()
        .await
        .unwrap();
    assert_oci_error(r, 404, "MANIFEST_UNKNOWN").await;
    assert_eq!(listed_tags(&base, "t/app").await, ["2.0"]);
    assert_eq!(
        c.delete(format!("{base}/v2/t/app/manifests/{mdigest}"))
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    // The manifest went with the tags pointing at it.
    assert_eq!(listed_tags(&base, "t/app").await, Vec::<String>::new());
    assert_eq!(
        c.delete(format!("{base}/v2/t/other/blobs/{digest}"))
            .send()
            .await
            .unwrap()
            .status(),
        202
    );
    let r = c
        .delete(format!("{base}/v2/t/other/blobs/{digest}"))
        .send()
        .await
        .unwrap();
    assert_oci_error(r, 404, "BLOB_UNKNOWN").await;
    // Bad upload ids are refused before any I/O.
    let r = c
        .get(format!("{base}/v2/t/app/blobs/uploads/..%2f.."))
        .send()
        .await
        .unwrap();
    assert_oci_error(r, 404, "BLOB_UPLOAD_UNKNOWN").await;
    assert_eq!(
        c.get(proxy.url("/healthz")).send().await.unwrap().status(),
        200
    );
}

/// A cheap pseudo-random number (no extra dependency for the tests).
fn jitter(max_ms: u64) -> u64 {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    (n.wrapping_mul(6364136223846793005) >> 33) % max_ms
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs skopeo"]
async fn kill_9_during_pushes_and_replication_loses_nothing_acknowledged() {
    let root = tempfile::tempdir().unwrap();
    let (eu_cfg, _) = two_regions(root.path());
    let images = [
        ("small-1.0", SMALL),
        ("multi-1.0", MULTI),
        ("app-v1", APP),
        ("small-1.1", SMALL_1_1),
    ];
    let mut acknowledged: Vec<(String, &str)> = Vec::new();
    let mut dir = tempfile::tempdir().unwrap();
    for round in 0..5 {
        let proxy = Proxy::start_in(&eu_cfg, dir);
        let host = proxy.host();
        let pushes = std::thread::spawn(move || {
            let mut ok = Vec::new();
            for i in 0..8 {
                let (lt, digest) = images[(round + i) % images.len()];
                let dest = format!("kill/r{round}:t{i}");
                if skopeo_push(&host, lt, &dest) {
                    ok.push((dest, digest));
                }
            }
            ok
        });
        tokio::time::sleep(Duration::from_millis(300 + jitter(1500))).await;
        dir = Proxy::restart(proxy); // SIGKILL
        acknowledged.extend(pushes.join().unwrap());
        // After every kill: no engine shows a tag it cannot serve.
        assert_no_dangling_tags(&root.path().join("eu"));
        assert_no_dangling_tags(&root.path().join("us"));
    }
    assert!(!acknowledged.is_empty(), "some pushes were acknowledged");
    // Restarted once more: the queue left by the kills drains, and every acknowledged push is
    // complete in every replication location.
    let proxy = Proxy::start_in(&eu_cfg, dir);
    assert!(
        eventually(Duration::from_secs(60), async || backlog_empty(&proxy)
            .await)
        .await,
        "replication drained"
    );
    for engine in ["eu", "us"] {
        let tags = common::layout::tags(&root.path().join(engine));
        for (dest, digest) in &acknowledged {
            let (repo, tag) = dest.split_once(':').unwrap();
            assert!(
                tags.iter()
                    .any(|(r, t, d)| r == repo && t == tag && d == digest),
                "{engine} lacks acknowledged push {dest}"
            );
            complete(&root.path().join(engine), digest).unwrap();
        }
        assert_no_dangling_tags(&root.path().join(engine));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs skopeo, moto"]
async fn replication_waits_for_a_target_that_is_down() {
    use common::regions::{DelayLine, Moto};
    let root = tempfile::tempdir().unwrap();
    let s3 = Moto::start(None, "127.0.0.1");
    let line_port = free_port();
    let line = DelayLine::start(line_port, s3.port, 1);
    let cfg = Config::new("eu")
        .probe("interval", "200ms")
        .engine(Engine::new(
            "eu",
            &format!("file://{}/eu", root.path().display()),
        ))
        .engine(
            s3.engine("us", Some(&format!("http://127.0.0.1:{line_port}")))
                .replicate_by_default(),
        )
        .push("eu")
        .render();
    let proxy = Proxy::start(&cfg);
    drop(line); // the target goes down
    assert!(
        skopeo_push(&proxy.host(), "small-1.0", "down/app:1.0"),
        "pushes do not wait for replication"
    );
    // The worker tried and failed (counted), and the jobs wait.
    assert!(
        eventually(Duration::from_secs(60), async || metric(
            &proxy,
            "ociedge_replication_failures_total{engine=\"us\"}"
        )
        .await
        .is_some_and(|n| n > 0.0))
        .await,
        "replication to the stopped target failed"
    );
    let s: serde_json::Value = client()
        .get(proxy.url("/_ociedge/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        s["replication_backlog"]["us"]["jobs"].as_u64().unwrap() > 0,
        "jobs wait: {s}"
    );
    let m = get_text(proxy.url("/metrics")).await;
    assert!(
        m.contains("ociedge_replication_failures_total{engine=\"us\"}"),
        "{m}"
    );
    let _line = DelayLine::start(line_port, s3.port, 1); // back
    assert!(
        eventually(Duration::from_secs(60), async || backlog_empty(&proxy)
            .await)
        .await,
        "jobs complete when it returns"
    );
    // A region whose only engine is the target serves the image: it was replicated.
    let us_only = Config::new("us").engine(s3.engine("us", None)).render();
    let us = Proxy::start(&us_only);
    assert!(verify_pull(&us.host(), "down/app:1.0", SMALL));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs skopeo"]
async fn backfill_is_resumable_and_idempotent() {
    let root = tempfile::tempdir().unwrap();
    let base = Config::local("eu", &format!("file://{}/eu", root.path().display()));
    let proxy = Proxy::start(&base.clone().push("eu").render());
    for i in 0..6 {
        let lt = ["small-1.0", "multi-1.0", "app-v1", "small-1.1"][i % 4];
        assert!(skopeo_push(
            &proxy.host(),
            lt,
            &format!("fill/repo{i}:v{i}")
        ));
    }
    let big = random_bytes(96 << 20, 96);
    let c = client();
    let r = c
        .post(proxy.url(&format!(
            "/v2/fill/big/blobs/uploads/?digest=sha256:{}",
            sha256_hex(&big)
        )))
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    drop(proxy);
    // A new engine "ap" is added to the config.
    let cfg_path = root.path().join("ociedge.yaml");
    let with_ap = base
        .listen("127.0.0.1:0")
        .engine(Engine::new(
            "ap",
            &format!("file://{}/ap", root.path().display()),
        ))
        .render();
    std::fs::write(&cfg_path, with_ap).unwrap();
    let backfill = || {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_ociedge"));
        c.args([
            "backfill",
            "--config",
            cfg_path.to_str().unwrap(),
            "--to",
            "ap",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
        c
    };
    // Interrupted half way.
    let mut child = backfill().spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    while let Some(Ok(l)) = lines.next() {
        if l.contains("[3/") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let partial = common::layout::tags(&root.path().join("ap")).len();
    let all = common::layout::tags(&root.path().join("eu"));
    assert!(
        partial < all.len(),
        "the first run was interrupted ({partial} of {} tags)",
        all.len()
    );
    // Run again: complete.
    let out = backfill().output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(common::layout::tags(&root.path().join("ap")), all);
    assert_no_dangling_tags(&root.path().join("ap"));
    // A third run copies nothing.
    let out = backfill().output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(" 0 blobs and 0 manifests copied"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, skopeo"]
async fn pushes_forwarded_to_an_upstream_registry() {
    let origin = Origin::start();
    let cfg = Config::local("eu", "file://{DIR}/data")
        .upstream(Upstream::new("docker.io", &origin.url()))
        .upstream(Upstream::new("ghcr.io", &origin.url()))
        .push("docker.io")
        .render();
    let proxy = Proxy::start(&cfg);
    assert!(
        skopeo_push(&proxy.host(), "small-1.0", "team/app:1.0"),
        "push forwarded"
    );
    assert!(skopeo_push(&proxy.host(), "multi-1.0", "team/multi:1.0"));
    // The upstream has it, byte for byte, and it pulls back through ociedge.
    assert!(verify_pull(&origin.host(), "team/app:1.0", SMALL));
    assert!(verify_pull(&origin.host(), "team/multi:1.0", MULTI));
    assert!(verify_pull(&proxy.host(), "team/app:1.0", SMALL));
    // Bodies were streamed through and Location headers pointed at the proxy.
    let log = origin.log();
    assert!(
        log.contains("PATCH /v2/team/app/blobs/uploads/")
            || log.contains("PUT /v2/team/app/blobs/uploads/"),
        "{log}"
    );
    let r = client()
        .post(proxy.url("/v2/team/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let loc = r.headers()["location"].to_str().unwrap();
    assert!(loc.starts_with("/v2/team/app/blobs/uploads/"), "{loc}");
    // Through a registry prefix, the client's name is kept in the Location.
    let r = client()
        .post(proxy.url("/v2/ghcr.io/team/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert!(r.headers()["location"]
        .to_str()
        .unwrap()
        .starts_with("/v2/ghcr.io/team/app/blobs/uploads/"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs skopeo"]
async fn per_repository_replication_rules() {
    let root = tempfile::tempdir().unwrap();
    let dir = |id: &str| format!("file://{}/{id}", root.path().display());
    let cfg = Config::local("eu", &dir("eu"))
        .engine(Engine::new("us", &dir("us")).replicate_by_default())
        .engine(Engine::new("ap", &dir("ap")))
        .push("eu")
        .replicate("private/**", &[])
        .replicate("asia/**", &["ap"])
        .render();
    let proxy = Proxy::start(&cfg);
    assert!(skopeo_push(&proxy.host(), "small-1.0", "private/x:1"));
    assert!(skopeo_push(&proxy.host(), "app-v1", "asia/y:1"));
    assert!(skopeo_push(&proxy.host(), "multi-1.0", "team/z:1"));
    assert!(
        eventually(Duration::from_secs(20), async || backlog_empty(&proxy)
            .await)
        .await
    );
    let names = |e: &str| {
        common::layout::tags(&root.path().join(e))
            .into_iter()
            .map(|(r, _, _)| r)
            .collect::<Vec<_>>()
    };
    assert_eq!(names("eu"), ["asia/y", "private/x", "team/z"]);
    assert_eq!(names("us"), ["team/z"]);
    assert_eq!(names("ap"), ["asia/y"]);
}
