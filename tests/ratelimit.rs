//! Rate-limit accounting: the quota an upstream announces (Docker Hub's `ratelimit-limit` /
//! `ratelimit-remaining`) is exported per upstream, requests are counted by what they cost (a
//! manifest `GET` is a pull, a `HEAD` is not), and a warm cache revalidating its tags costs no
//! pulls. Against a real docker-registry behind a loopback forwarder that adds Docker Hub's
//! headers, one pull fewer on each manifest `GET`.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::config::{Config, Upstream};
use common::{client, eventually, get_manifest, metric, Origin, Proxy};

const LIMIT: u64 = 100;

/// docker-registry behind a forwarder announcing a quota of [`LIMIT`] pulls; `pulls` counts the
/// manifest `GET`s that reached it.
struct Hub {
    _origin: Origin,
    origin_url: String,
    url: String,
    pulls: Arc<AtomicU64>,
}

async fn hub() -> Hub {
    let origin = tokio::task::spawn_blocking(Origin::start)
        .await
        .expect("docker-registry");
    let origin_url = origin.url();
    let pulls = Arc::new(AtomicU64::new(0));
    let count = pulls.clone();
    let port = common::fake::forwarding(&origin_url, move |method, path, resp| {
        let used = if method == http::Method::GET && path.contains("/manifests/") {
            count.fetch_add(1, Ordering::SeqCst) + 1
        } else {
            count.load(Ordering::SeqCst)
        };
        let h = resp.headers_mut();
        h.insert(
            "ratelimit-limit",
            format!("{LIMIT};w=21600").parse().expect("hv"),
        );
        h.insert(
            "ratelimit-remaining",
            format!("{};w=21600", LIMIT.saturating_sub(used))
                .parse()
                .expect("hv"),
        );
    })
    .await;
    Hub {
        _origin: origin,
        origin_url,
        url: format!("http://127.0.0.1:{port}"),
        pulls,
    }
}

async fn series(proxy: &Proxy, name: &str, labels: &str) -> Option<f64> {
    metric(proxy, &format!("ociedge_{name}{{{labels}}}")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry"]
async fn the_quota_is_exported_and_a_warm_cache_costs_no_pulls() {
    let hub = hub().await;
    let digest = common::push_image(&hub.origin_url, "library/app", "1.0").await;
    let proxy = Proxy::start(&Config::mirror(&hub.url).cache("tag_ttl", "1s").render());
    let up = r#"upstream="docker.io""#;
    let quota = r#"upstream="docker.io",credential="anonymous""#;

    // From the first scrape: the request counters of the configured upstream, at 0.
    let pulls_at_start = series(
        &proxy,
        "upstream_requests_total",
        &format!(r#"{up},kind="pull""#),
    )
    .await;
    assert_eq!(pulls_at_start, Some(0.0), "preset pull counter");

    let r = get_manifest(&proxy, "library/app", "1.0").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], digest.as_str());
    let pulled = hub.pulls.load(Ordering::SeqCst);
    assert!(pulled >= 1, "the cold tag was pulled from the upstream");
    assert_eq!(
        series(
            &proxy,
            "upstream_requests_total",
            &format!(r#"{up},kind="pull""#)
        )
        .await,
        Some(pulled as f64),
        "pulls counted as the upstream saw them"
    );
    assert_eq!(
        series(&proxy, "upstream_ratelimit_limit", quota).await,
        Some(LIMIT as f64)
    );
    assert_eq!(
        series(&proxy, "upstream_ratelimit_remaining", quota).await,
        Some((LIMIT - pulled) as f64),
        "the quota the upstream announced last"
    );

    let status: serde_json::Value = client()
        .get(proxy.url("/_ociedge/status"))
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("status JSON");
    assert_eq!(
        status["upstream_quota"]["docker.io"],
        serde_json::json!({
            "limit": LIMIT,
            "remaining": LIMIT - pulled,
            "credential": "anonymous",
            "credentials": { "anonymous": { "limit": LIMIT, "remaining": LIMIT - pulled } },
        }),
        "the status page's quota: {status}"
    );

    // Warm: the tag is revalidated with HEADs once its TTL has passed, and no pull is spent.
    let heads_before = series(
        &proxy,
        "upstream_requests_total",
        &format!(r#"{up},kind="head""#),
    )
    .await
    .unwrap_or(0.0);
    let revalidated = eventually(Duration::from_secs(15), async || {
        let r = get_manifest(&proxy, "library/app", "1.0").await;
        assert_eq!(r.status(), 200);
        series(
            &proxy,
            "upstream_requests_total",
            &format!(r#"{up},kind="head""#),
        )
        .await
        .unwrap_or(0.0)
            > heads_before
    })
    .await;
    assert!(revalidated, "the tag was never revalidated");
    for _ in 0..5 {
        assert_eq!(
            get_manifest(&proxy, "library/app", "1.0").await.status(),
            200
        );
    }
    assert_eq!(
        hub.pulls.load(Ordering::SeqCst),
        pulled,
        "revalidating a warm tag spent pulls"
    );
}

/// The quota is per credential: requests made with the configured credential are accounted
/// under its user name (never its password), apart from anonymous ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry"]
async fn the_quota_is_accounted_per_credential() {
    let hub = hub().await;
    common::push_image(&hub.origin_url, "library/app", "1.0").await;
    // A token gate that wants bot's credentials in front of the quota-announcing forwarder.
    let gate = common::fake::TokenGate::new(hub.url.clone(), Some("bot:s3cret"));
    let port = gate.start().await;
    let up = Upstream::new("docker.io", &format!("http://127.0.0.1:{port}"))
        .credentials("bot", "s3cret")
        .access("public");
    let proxy = Proxy::start(&Config::mirror_of(up).render());
    assert_eq!(
        series(
            &proxy,
            "upstream_ratelimit_remaining",
            r#"upstream="docker.io",credential="bot""#
        )
        .await,
        Some(0.0),
        "preset under the configured user"
    );
    let r = get_manifest(&proxy, "library/app", "1.0").await;
    assert_eq!(r.status(), 200);
    let pulled = hub.pulls.load(Ordering::SeqCst);
    assert_eq!(
        series(
            &proxy,
            "upstream_ratelimit_remaining",
            r#"upstream="docker.io",credential="bot""#
        )
        .await,
        Some((LIMIT - pulled) as f64)
    );
    let text = common::get_text(proxy.url("/metrics")).await;
    assert!(!text.contains("s3cret"), "a secret in /metrics");
    assert!(
        !text.contains(r#"credential="anonymous""#),
        "no anonymous request was made: {text}"
    );
    let status: serde_json::Value = client()
        .get(proxy.url("/_ociedge/status"))
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("status JSON");
    assert_eq!(status["upstream_quota"]["docker.io"]["credential"], "bot");
    assert_eq!(
        status["upstreams"][0]["quota"]["bot"]["remaining"],
        LIMIT - pulled,
        "{status}"
    );
}
