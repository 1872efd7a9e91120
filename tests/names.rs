//! Names are trust boundaries: no spelling of a name (`?ns=`, a path prefix, `library/`) reaches
//! another upstream's content. Two real docker-registry upstreams, one holding a repository
//! whose name looks like the other registry's (`ghcr.example/org/app` on the default upstream),
//! as an attacker would publish it on Docker Hub.

mod common;

use common::*;

/// `(status, Docker-Content-Digest, error code)` of a manifest GET.
async fn manifest(proxy: &Proxy, path: &str) -> (u16, String, String) {
    let r = client()
        .get(proxy.url(path))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .expect("GET manifest");
    let status = r.status().as_u16();
    let digest = r
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let v: serde_json::Value = r.json().await.unwrap_or_default();
    let code = v["errors"][0]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    (status, digest, code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, skopeo"]
async fn a_default_upstream_name_never_fills_another_upstreams_storage_name() {
    // The default upstream holds an attacker's image under a name that spells the other
    // upstream's storage name; the other upstream holds the real `org/app:1`.
    let hub = Origin::start();
    hub.push(&[("small-1.1", "ghcr.example/org/app:1", false)]);
    let ghcr = Origin::start();
    ghcr.push(&[("small-1.0", "org/app:1", false)]);
    let cfg = format!(
        "listen: 127.0.0.1:{{PORT}}\nstorage:\n  preference: eu\n  engines:\n    eu: {{ url: \"file://{{DIR}}/data\" }}\nupstreams:\n  - {{ name: docker.io, url: \"{}\" }}\n  - {{ name: ghcr.example, url: \"{}\" }}\n",
        hub.url(),
        ghcr.url()
    );
    let p = Proxy::start(&cfg);
    let hub_log_before = hub.log().len();
    // Every default-upstream spelling of the look-alike name is refused: it is not a Docker Hub
    // name, and it may not be stored where `ghcr.example`'s content lives.
    for path in [
        "/v2/docker.io/ghcr.example/org/app/manifests/1",
        "/v2/index.docker.io/ghcr.example/org/app/manifests/1",
        "/v2/ghcr.example/org/app/manifests/1?ns=docker.io",
    ] {
        let (status, digest, code) = manifest(&p, path).await;
        assert_eq!(
            (status, code.as_str()),
            (404, "NAME_UNKNOWN"),
            "{path} answered {digest}"
        );
    }
    assert!(
        !hub.log()[hub_log_before..].contains("ghcr.example/org/app"),
        "the default upstream was asked for the look-alike name"
    );
    // The real repository is served, under every spelling, with its own content.
    for path in [
        "/v2/ghcr.example/org/app/manifests/1",
        "/v2/org/app/manifests/1?ns=ghcr.example",
    ] {
        let (status, digest, _) = manifest(&p, path).await;
        assert_eq!((status, digest.as_str()), (200, SMALL), "{path}");
    }
    // The look-alike spelling stays refused once the real one is cached.
    let (status, _, code) = manifest(&p, "/v2/docker.io/ghcr.example/org/app/manifests/1").await;
    assert_eq!((status, code.as_str()), (404, "NAME_UNKNOWN"));
    // A one-component name is never a registry host.
    let (status, _, code) = manifest(&p, "/v2/ghcr.example/manifests/1").await;
    assert_ne!(status, 200, "{code}");
}
