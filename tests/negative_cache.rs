//! The negative cache: an upstream's "no such manifest or tag" is remembered for
//! `cache.negative_ttl`, so clients probing names that do not exist do not reach the upstream
//! each time; a write through ociedge forgets it at once. Against a real docker-registry behind a
//! loopback forwarder that counts the manifest requests reaching it.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::config::Config;
use common::{assert_oci_error, eventually, get_manifest, metric, Origin, Proxy};

/// A docker-registry behind a forwarder; `manifests` counts the manifest requests it sees.
struct Upstream {
    _origin: Origin,
    origin_url: String,
    url: String,
    manifests: Arc<AtomicUsize>,
}

async fn upstream() -> Upstream {
    let origin = tokio::task::spawn_blocking(Origin::start)
        .await
        .expect("docker-registry");
    let origin_url = origin.url();
    let manifests = Arc::new(AtomicUsize::new(0));
    let count = manifests.clone();
    let port = common::fake::forwarding(&origin_url, move |_, path, _| {
        if path.contains("/manifests/") {
            count.fetch_add(1, Ordering::SeqCst);
        }
    })
    .await;
    Upstream {
        _origin: origin,
        origin_url,
        url: format!("http://127.0.0.1:{port}"),
        manifests,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry"]
async fn a_missing_tag_is_answered_from_memory_until_negative_ttl() {
    let up = upstream().await;
    let proxy = Proxy::start(&Config::mirror(&up.url).cache("negative_ttl", "3s").render());
    assert_oci_error(
        get_manifest(&proxy, "library/ghost", "v1").await,
        404,
        "MANIFEST_UNKNOWN",
    )
    .await;
    let asked = up.manifests.load(Ordering::SeqCst);
    assert!(asked >= 1, "the first probe reached the upstream");
    for _ in 0..10 {
        assert_oci_error(
            get_manifest(&proxy, "library/ghost", "v1").await,
            404,
            "MANIFEST_UNKNOWN",
        )
        .await;
    }
    assert_eq!(
        up.manifests.load(Ordering::SeqCst),
        asked,
        "repeated probes of a missing tag reached the upstream"
    );
    let negative = metric(
        &proxy,
        r#"ociedge_cache_requests_total{kind="manifest",result="negative"}"#,
    )
    .await;
    assert!(
        negative >= Some(10.0),
        "negative answers counted: {negative:?}"
    );

    // Pushed straight to the upstream (around ociedge): seen once `negative_ttl` has passed.
    let digest = common::push_image(&up.origin_url, "library/ghost", "v1").await;
    let served = eventually(Duration::from_secs(15), async || {
        let r = get_manifest(&proxy, "library/ghost", "v1").await;
        r.status() == 200
            && r.headers()
                .get("docker-content-digest")
                .is_some_and(|d| d.to_str().ok() == Some(digest.as_str()))
    })
    .await;
    assert!(served, "the tag pushed upstream was never served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry"]
async fn a_push_through_ociedge_forgets_it_at_once() {
    let up = upstream().await;
    // Pushes are forwarded to the upstream; the negative answer is an hour long.
    let cfg = Config::mirror(&up.url)
        .cache("negative_ttl", "1h")
        .push("docker.io");
    let proxy = Proxy::start(&cfg.render());
    assert_oci_error(
        get_manifest(&proxy, "library/later", "v1").await,
        404,
        "MANIFEST_UNKNOWN",
    )
    .await;
    assert_oci_error(
        get_manifest(&proxy, "library/later", "v1").await,
        404,
        "MANIFEST_UNKNOWN",
    )
    .await;
    let digest = common::push_image(&proxy.url(""), "library/later", "v1").await;
    let r = get_manifest(&proxy, "library/later", "v1").await;
    assert_eq!(r.status(), 200, "the tag just pushed through ociedge");
    assert_eq!(r.headers()["docker-content-digest"], digest.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry"]
async fn negative_ttl_0s_asks_the_upstream_each_time() {
    let up = upstream().await;
    let proxy = Proxy::start(&Config::mirror(&up.url).cache("negative_ttl", "0s").render());
    assert_oci_error(
        get_manifest(&proxy, "library/ghost", "v1").await,
        404,
        "MANIFEST_UNKNOWN",
    )
    .await;
    let asked = up.manifests.load(Ordering::SeqCst);
    for _ in 0..3 {
        assert_oci_error(
            get_manifest(&proxy, "library/ghost", "v1").await,
            404,
            "MANIFEST_UNKNOWN",
        )
        .await;
    }
    assert!(
        up.manifests.load(Ordering::SeqCst) >= asked + 3,
        "with negative_ttl 0s every probe asks the upstream"
    );
}
