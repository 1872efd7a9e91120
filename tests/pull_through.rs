//! The pull-through core against real components: docker-registry as the upstream, skopeo,
//! podman and containerd as clients.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;

const NEEDS: &str = "needs docker-registry, skopeo (the README test command runs it)";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, skopeo"]
async fn skopeo_pulls_through_equal_direct_pulls() {
    let _ = NEEDS;
    let origin = Origin::start();
    origin.seed();
    let proxy = Proxy::start(&mirror_config(&origin.url(), ""));
    for (image, digest) in [
        ("library/small:1.0", SMALL),
        ("library/small-docker:1.0", SMALL_DOCKER),
        ("library/multi:1.0", MULTI),
        ("org/team/app:v1", APP),
    ] {
        assert!(
            verify_pull(&origin.host(), image, digest),
            "direct pull of {image}"
        );
        assert!(
            verify_pull(&proxy.host(), image, digest),
            "pull of {image} through ociedge (cold)"
        );
        assert!(
            verify_pull(&proxy.host(), image, digest),
            "pull of {image} through ociedge (warm)"
        );
    }
    // The second pull was served from the local engine.
    let c = client();
    let r = c
        .get(proxy.url(&format!("/v2/library/small/manifests/{SMALL}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-ociedge-source"], "local");
    assert_eq!(r.headers()["x-ociedge-region"], "eu");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, skopeo, podman, containerd"]
async fn podman_and_containerd_pull_through_the_mirror() {
    let origin = Origin::start();
    origin.seed();
    // client-pull.sh names the registry `upstream.local:5000` (containerd then sends
    // `?ns=upstream.local:5000`) or `docker.io` with --prefix.
    let cfg = format!(
        "listen: 127.0.0.1:{{PORT}}\nregion: eu\nstorage:\n  preference: eu\n  engines:\n    eu: {{ url: \"file://{{DIR}}/data\" }}\nupstreams:\n  - {{ name: docker.io, url: \"{0}\" }}\n  - {{ name: \"upstream.local:5000\", url: \"{0}\" }}\n",
        origin.url()
    );
    let proxy = Proxy::start(&cfg);
    let state = tempfile::tempdir().unwrap();
    let pull = |args: &[&str]| {
        std::process::Command::new("bash")
            .arg(harness().join("client-pull.sh"))
            .args(args)
            .env("HARNESS_STATE", state.path())
            .status()
            .expect("client-pull.sh")
            .success()
    };
    let host = proxy.host();
    assert!(
        pull(&["podman", &host, "library/small:1.0", SMALL]),
        "podman"
    );
    assert!(
        pull(&[
            "podman",
            &host,
            "library/small-docker:1.0",
            SMALL_DOCKER,
            "--prefix",
            "docker.io"
        ]),
        "podman docker.io"
    );
    assert!(
        pull(&[
            "ctr",
            &host,
            "library/multi:1.0",
            MULTI,
            "--platform",
            "linux/arm64"
        ]),
        "containerd ns=upstream.local:5000"
    );
    assert!(
        pull(&[
            "ctr",
            &host,
            "library/small-docker:1.0",
            SMALL_DOCKER,
            "--prefix",
            "docker.io"
        ]),
        "containerd ns=docker.io"
    );
    let _ = std::process::Command::new("bash")
        .arg(harness().join("client-pull.sh"))
        .arg("ctr-stop")
        .env("HARNESS_STATE", state.path())
        .status();
    // The names do not resolve, so the pulls can only have gone through ociedge; its metrics agree.
    let metrics = get_text(proxy.url("/metrics")).await;
    assert!(metrics.contains("route=\"manifest_tag\""), "{metrics}");
    assert!(
        metrics.contains("ociedge_fills_total{result=\"done\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry"]
async fn sixteen_cold_gets_make_one_upstream_fetch() {
    let origin = Origin::start();
    let data = random_bytes(64 << 20, 16);
    let digest = push_blob(&origin.url(), "herd/blob", data).await;
    let proxy = Proxy::start(&mirror_config(&origin.url(), ""));
    let url = proxy.url(&format!("/v2/herd/blob/blobs/{digest}"));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let r = client().get(&url).send().await.unwrap();
                assert_eq!(r.status(), 200);
                let body = r.bytes().await.unwrap();
                format!("sha256:{}", sha256_hex(&body))
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), digest);
    }
    let log = origin.log();
    let gets = log
        .lines()
        .filter(|l| l.contains(&format!("\"GET /v2/herd/blob/blobs/{digest}")))
        .count();
    assert_eq!(gets, 1, "upstream access log:\n{log}");
    assert!(proxy.blob_path(&digest).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry"]
async fn a_client_that_disconnects_does_not_cancel_the_fill() {
    let origin = Origin::start();
    let data = random_bytes(48 << 20, 7);
    let digest = push_blob(&origin.url(), "gone/client", data).await;
    let proxy = Proxy::start(&mirror_config(&origin.url(), ""));
    let url = proxy.url(&format!("/v2/gone/client/blobs/{digest}"));
    {
        let r = client().get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let mut s = r.bytes_stream();
        let mut got = 0;
        while got < (1 << 20) {
            got += s.next().await.unwrap().unwrap().len();
        }
        // Dropping the stream closes the connection mid-body.
    }
    let path = proxy.blob_path(&digest);
    assert!(
        eventually(Duration::from_secs(30), async || path.exists()).await,
        "fill completed"
    );
    let r = client().get(&url).send().await.unwrap();
    assert_eq!(r.headers()["x-ociedge-source"], "local");
    let body = r.bytes().await.unwrap();
    assert_eq!(format!("sha256:{}", sha256_hex(&body)), digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_sending_wrong_bytes_breaks_the_response_and_stores_nothing() {
    let fake = common::fake::FakeUpstream::default();
    let data = bytes::Bytes::from(random_bytes(3 << 20, 3));
    let digest = format!("sha256:{}", sha256_hex(&data));
    fake.blobs
        .lock()
        .unwrap()
        .insert(digest.clone(), data.clone());
    fake.corrupt
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let port = fake.clone().start().await;
    let proxy = Proxy::start(&mirror_config(&format!("http://127.0.0.1:{port}"), ""));
    let url = proxy.url(&format!("/v2/bad/bytes/blobs/{digest}"));

    let r = client().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200, "headers go out before the verdict");
    let body = r.bytes().await;
    assert!(body.is_err(), "the body must end broken, never cleanly");
    assert!(fills_settled(&proxy).await, "the fill ended");
    assert!(
        !proxy.blob_path(&digest).exists(),
        "nothing stored under the digest"
    );
    let spool = proxy.data().join("_ociedge/spool");
    assert_eq!(
        std::fs::read_dir(&spool).map(|d| d.count()).unwrap_or(0),
        0,
        "no spool left"
    );
    assert!(proxy.log().contains("digest mismatch"));

    // The upstream heals: the next pull fills and serves the right bytes.
    fake.corrupt
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let r = client().get(&url).send().await.unwrap();
    let body = r.bytes().await.unwrap();
    assert_eq!(body, data);
    assert!(
        eventually(Duration::from_secs(5), async || proxy
            .blob_path(&digest)
            .exists())
        .await
    );
    // The process is unharmed.
    assert_eq!(
        client()
            .get(proxy.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, skopeo"]
async fn with_the_upstream_stopped_cached_content_is_served_until_max_stale() {
    let origin = Origin::start();
    origin.seed();
    let proxy = Proxy::start(&mirror_config(
        &origin.url(),
        "cache: { tag_ttl: 1s, max_stale: 10s }\n",
    ));
    assert!(verify_pull(&proxy.host(), "library/small:1.0", SMALL));
    origin.stop();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let c = client();
    // Digests: served from the local engine.
    let r = c
        .get(proxy.url(&format!("/v2/library/small/manifests/{SMALL}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        verify_pull(&proxy.host(), &format!("library/small@{SMALL}"), SMALL),
        "pull by digest with the upstream down"
    );
    // The tag is past tag_ttl: revalidation fails, the stale answer is served with its age.
    let r = c
        .get(proxy.url("/v2/library/small/manifests/1.0"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], SMALL);
    assert!(r.headers().contains_key("age"));
    // Past max_stale: a clean OCI error.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let r = c
        .get(proxy.url("/v2/library/small/manifests/1.0"))
        .send()
        .await
        .unwrap();
    assert_oci_error(r, 503, "UNAVAILABLE").await;
    // An uncached tag fails cleanly too.
    let r = c
        .get(proxy.url("/v2/library/small/manifests/1.1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, skopeo"]
async fn storage_layout_interop_with_docker_registry_both_ways() {
    // docker-registry wrote it; ociedge serves it with no upstream at all.
    let origin = Origin::start();
    origin.seed();
    let cfg = format!(
        "listen: 127.0.0.1:{{PORT}}\nstorage:\n  preference: r\n  engines:\n    r: {{ url: \"file://{}\" }}\n",
        origin.data_dir().display()
    );
    let reader = Proxy::start(&cfg);
    for (image, digest) in [
        ("library/small:1.0", SMALL),
        ("library/multi:1.0", MULTI),
        ("library/small-docker:1.0", SMALL_DOCKER),
        ("org/team/app:v1", APP),
    ] {
        assert!(
            verify_pull(&reader.host(), image, digest),
            "ociedge serving docker-registry's {image}"
        );
    }
    let r = client()
        .get(reader.url("/v2/library/small/tags/list"))
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!(["1.0", "1.1"]));

    // ociedge filled it; docker-registry serves it.
    let proxy = Proxy::start(&mirror_config(&origin.url(), ""));
    for (image, digest) in [
        ("library/small:1.0", SMALL),
        ("library/small-docker:1.0", SMALL_DOCKER),
        ("library/multi:1.0", MULTI),
    ] {
        assert!(verify_pull(&proxy.host(), image, digest));
    }
    let reg = DirRegistry::start(&proxy.data());
    let host = reg.host();
    // The links of shared layers are written in the background: wait for them.
    let ok = eventually(Duration::from_secs(60), async || {
        verify_pull(&host, "library/small:1.0", SMALL)
            && verify_pull(&host, "library/small-docker:1.0", SMALL_DOCKER)
            && verify_pull(&host, "library/multi:1.0", MULTI)
    })
    .await;
    assert!(ok, "docker-registry serving what ociedge filled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, skopeo"]
async fn names_route_to_their_upstream() {
    let origin = Origin::start();
    origin.seed();
    let other = Origin::start();
    other.push(&[("app-v1", "org/app:v1", false)]);
    let cfg = format!(
        "listen: 127.0.0.1:{{PORT}}\nstorage:\n  preference: eu\n  engines:\n    eu: {{ url: \"file://{{DIR}}/data\" }}\nupstreams:\n  - {{ name: docker.io, url: \"{}\" }}\n  - {{ name: ghcr.io, url: \"{}\" }}\n",
        origin.url(),
        other.url()
    );
    let proxy = Proxy::start(&cfg);
    let c = client();
    let get = async |path: &str| c.get(proxy.url(path)).send().await.unwrap();
    // Docker Hub short names.
    let r = get("/v2/small/manifests/1.0").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], SMALL);
    // containerd's ?ns= and a path prefix.
    assert_eq!(
        get("/v2/library/small/manifests/1.0?ns=docker.io")
            .await
            .status(),
        200
    );
    assert_eq!(
        get("/v2/docker.io/library/small/manifests/1.0")
            .await
            .status(),
        200
    );
    assert_eq!(
        get("/v2/org/app/manifests/v1?ns=ghcr.io").await.headers()["docker-content-digest"],
        APP
    );
    assert!(verify_pull(&proxy.host(), "ghcr.io/org/app:v1", APP));
    // The same name on the default upstream is another repository.
    assert_eq!(get("/v2/org/app/manifests/v1").await.status(), 404);
    // An unknown registry: 404, so a containerd mirror falls back.
    let r = get("/v2/library/small/manifests/1.0?ns=quay.io").await;
    assert_eq!(r.status(), 404);
    // Content of the second upstream is stored under its registry name.
    assert!(proxy
        .data()
        .join("docker/registry/v2/repositories/ghcr.io/org/app")
        .exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, skopeo"]
async fn upstream_bearer_tokens_anonymous_and_with_credentials() {
    let origin = Origin::start();
    origin.seed();
    for creds in [None, Some("bot:s3cret")] {
        let gate = common::fake::TokenGate::new(origin.url(), creds);
        let port = gate.clone().start().await;
        let auth = match creds {
            Some(_) => ", auth: { username: bot, password: s3cret }, access: public",
            None => "",
        };
        let cfg = format!(
            "listen: 127.0.0.1:{{PORT}}\nstorage:\n  preference: eu\n  engines:\n    eu: {{ url: \"file://{{DIR}}/data\" }}\nupstreams:\n  - {{ name: docker.io, url: \"http://127.0.0.1:{port}\"{auth} }}\n"
        );
        let proxy = Proxy::start(&cfg);
        assert!(
            verify_pull(&proxy.host(), "library/small:1.0", SMALL),
            "pull through a token-auth upstream ({creds:?})"
        );
        assert!(verify_pull(&proxy.host(), "library/multi:1.0", MULTI));
        let issued = gate.tokens_issued.load(std::sync::atomic::Ordering::SeqCst);
        // One token per repository scope, reused across its manifests and blobs.
        assert!((2..=4).contains(&issued), "tokens issued: {issued}");
        let scopes = gate.scopes.lock().unwrap().clone();
        assert!(
            scopes.contains(&"repository:library/small:pull".to_string()),
            "{scopes:?}"
        );
    }
    // Wrong credentials: a clean error, not a crash.
    let gate = common::fake::TokenGate::new(origin.url(), Some("bot:s3cret"));
    let port = gate.clone().start().await;
    let cfg = format!(
        "listen: 127.0.0.1:{{PORT}}\nstorage:\n  preference: eu\n  engines:\n    eu: {{ url: \"file://{{DIR}}/data\" }}\nupstreams:\n  - {{ name: docker.io, url: \"http://127.0.0.1:{port}\", auth: {{ username: bot, password: wrong }}, access: public }}\n"
    );
    let proxy = Proxy::start(&cfg);
    let r = client()
        .get(proxy.url("/v2/library/small/manifests/1.0"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}
