//! Care for a failing upstream (issue 21): a rate-limited (`429`) or failing upstream never costs
//! a client a tag ociedge can serve stale; `Retry-After` is honoured (no request reaches the
//! upstream until then); below the quota reserve tags are served stale without asking; and a
//! circuit breaker stops calling an upstream that keeps failing, answers misses at once, and
//! closes when a background probe finds it back.
//!
//! A real docker-registry behind a loopback forwarder ([`Hub`]) that announces Docker Hub's quota
//! headers and can be told to answer `429` / `5xx` instead of forwarding.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::config::{Config, Engine, Upstream};
use common::fake::{self, Body};
use common::{assert_oci_error, client, eventually, get_manifest, metric, Origin, Proxy};

const LIMIT: u64 = 100;

/// What the forwarder does with the next requests.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// Forward to docker-registry.
    Pass,
    /// Answer this status, with `Retry-After: <secs>` when given.
    Fail(u16, Option<u64>),
}

/// docker-registry behind a forwarder that can fail on command. `requests` counts every request
/// that reached the forwarder except `GET /v2/` (the probes), `probes` those.
struct Hub {
    _origin: Origin,
    origin_url: String,
    url: String,
    mode: Arc<Mutex<Mode>>,
    requests: Arc<AtomicU64>,
    probes: Arc<AtomicU64>,
    /// What `ratelimit-remaining` announces (of [`LIMIT`]).
    remaining: Arc<AtomicU64>,
}

impl Hub {
    async fn start() -> Hub {
        let origin = tokio::task::spawn_blocking(Origin::start)
            .await
            .expect("docker-registry");
        let origin_url = origin.url();
        let mode = Arc::new(Mutex::new(Mode::Pass));
        let (requests, probes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let remaining = Arc::new(AtomicU64::new(LIMIT));
        let (m, rq, pr, rem, backend) = (
            mode.clone(),
            requests.clone(),
            probes.clone(),
            remaining.clone(),
            origin_url.clone(),
        );
        let port = fake::serve(move |req: http::Request<hyper::body::Incoming>| {
            let (m, rq, pr, rem, backend) = (
                m.clone(),
                rq.clone(),
                pr.clone(),
                rem.clone(),
                backend.clone(),
            );
            async move {
                if req.uri().path() == "/v2/" {
                    pr.fetch_add(1, Ordering::SeqCst);
                } else {
                    rq.fetch_add(1, Ordering::SeqCst);
                }
                let mode = *m.lock().expect("lock");
                let mut resp: http::Response<Body> = match mode {
                    Mode::Pass => fake::forward(&backend, req).await,
                    Mode::Fail(status, retry_after) => {
                        let code = if status == 429 {
                            "TOOMANYREQUESTS"
                        } else {
                            "UNAVAILABLE"
                        };
                        let mut r = http::Response::new(fake::full(format!(
                            r#"{{"errors":[{{"code":"{code}","message":"told to fail"}}]}}"#
                        )));
                        *r.status_mut() = http::StatusCode::from_u16(status).expect("status");
                        if let Some(s) = retry_after {
                            r.headers_mut()
                                .insert("retry-after", s.to_string().parse().expect("hv"));
                        }
                        r
                    }
                };
                let h = resp.headers_mut();
                h.insert(
                    "ratelimit-limit",
                    format!("{LIMIT};w=21600").parse().expect("hv"),
                );
                h.insert(
                    "ratelimit-remaining",
                    format!("{};w=21600", rem.load(Ordering::SeqCst))
                        .parse()
                        .expect("hv"),
                );
                resp
            }
        })
        .await;
        Hub {
            _origin: origin,
            origin_url,
            url: format!("http://127.0.0.1:{port}"),
            mode,
            requests,
            probes,
            remaining,
        }
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().expect("lock") = mode;
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

/// A proxy mirroring `hub` with a 1s tag TTL (so tags go stale fast) and `max_stale` 1h; `keys`
/// are more keys of the upstream's entry (`("down_after", "3")`).
fn proxy(hub: &Hub, keys: &[(&str, &str)]) -> Proxy {
    let mut up = Upstream::new("docker.io", &hub.url);
    for (k, v) in keys {
        up = up.option(k, v);
    }
    let cfg = Config::mirror_of(up)
        .cache("tag_ttl", "1s")
        .cache("max_stale", "1h")
        .render();
    Proxy::start(&cfg)
}

/// Waits until the tag TTL (1s) has passed for everything fetched so far.
async fn past_ttl() {
    tokio::time::sleep(Duration::from_millis(1200)).await;
}

async fn digest_of(r: reqwest::Response) -> String {
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    r.headers()["docker-content-digest"]
        .to_str()
        .expect("digest")
        .to_string()
}

const MISSING: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry"]
async fn a_rate_limited_or_failing_upstream_gets_the_stale_tag_served() {
    let hub = Hub::start().await;
    let digest = common::push_image(&hub.origin_url, "library/app", "1.0").await;
    let proxy = proxy(&hub, &[]);
    assert_eq!(
        digest_of(get_manifest(&proxy, "library/app", "1.0").await).await,
        digest
    );

    // 429 (no Retry-After), then 500, then 502: the stale answer each time.
    for status in [429, 500, 502] {
        hub.set(Mode::Fail(status, None));
        past_ttl().await;
        let r = get_manifest(&proxy, "library/app", "1.0").await;
        assert_eq!(
            r.status(),
            200,
            "upstream answering {status}: the stale tag"
        );
        assert_eq!(r.headers()["docker-content-digest"], digest.as_str());
    }
}

/// `GET` of a blob through `proxy`.
async fn get_blob(proxy: &Proxy, repo: &str, digest: &str) -> reqwest::Response {
    client()
        .get(proxy.url(&format!("/v2/{repo}/blobs/{digest}")))
        .send()
        .await
        .expect("GET blob")
}

/// The `Retry-After` of an answer, in seconds.
fn retry_after(r: &reqwest::Response) -> u64 {
    r.headers()
        .get("retry-after")
        .unwrap_or_else(|| panic!("no Retry-After on a {} answer", r.status()))
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds")
}

async fn series(proxy: &Proxy, name: &str) -> Option<f64> {
    metric(proxy, &format!("ociedge_{name}")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry"]
async fn retry_after_keeps_every_request_from_the_upstream_until_then() {
    let hub = Hub::start().await;
    let digest = common::push_image(&hub.origin_url, "library/app", "1.0").await;
    let proxy = proxy(&hub, &[]);
    assert_eq!(
        digest_of(get_manifest(&proxy, "library/app", "1.0").await).await,
        digest
    );

    for (status, code) in [(429, "TOOMANYREQUESTS"), (503, "UNAVAILABLE")] {
        hub.set(Mode::Fail(status, Some(4)));
        past_ttl().await;
        // The revalidation's HEAD meets the refusal: the stale tag is served.
        let before = hub.requests();
        let r = get_manifest(&proxy, "library/app", "1.0").await;
        assert_eq!(digest_of(r).await, digest, "{status}: the stale tag");
        assert_eq!(hub.requests(), before + 1, "{status}: one HEAD");

        // Until Retry-After: nothing reaches the upstream; tags are served stale and misses are
        // refused at once, saying when to come back.
        let before = hub.requests();
        let t = Instant::now();
        let r = get_manifest(&proxy, "library/app", "1.0").await;
        assert_eq!(digest_of(r).await, digest, "{status}: still stale");
        let r = get_manifest(&proxy, "library/app", MISSING).await;
        assert!((1..=4).contains(&retry_after(&r)), "{status}: Retry-After");
        assert_oci_error(r, status, code).await;
        let r = get_blob(&proxy, "library/app", MISSING).await;
        assert!(
            (1..=4).contains(&retry_after(&r)),
            "{status}: blob Retry-After"
        );
        assert_oci_error(r, status, code).await;
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "{status}: answered at once, not {:?}",
            t.elapsed()
        );
        assert_eq!(
            hub.requests(),
            before,
            "{status}: a request reached the upstream while it said to wait"
        );

        // After it: the upstream is asked again.
        hub.set(Mode::Pass);
        let asked = eventually(Duration::from_secs(10), async || {
            let r = get_manifest(&proxy, "library/app", "1.0").await;
            assert_eq!(r.status(), 200);
            hub.requests() > before
        })
        .await;
        assert!(asked, "{status}: the upstream was never asked again");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry"]
async fn under_the_quota_reserve_tags_are_served_stale_without_asking() {
    let hub = Hub::start().await;
    let d1 = common::push_image(&hub.origin_url, "library/app", "1.0").await;
    let proxy = proxy(&hub, &[("ratelimit_reserve", "\"20%\"")]);
    hub.remaining.store(50, Ordering::SeqCst);
    assert_eq!(
        digest_of(get_manifest(&proxy, "library/app", "1.0").await).await,
        d1
    );
    // The quota falls under the reserve; a tag nobody has is still fetched.
    hub.remaining.store(10, Ordering::SeqCst);
    let d2 = common::push_image(&hub.origin_url, "library/other", "2.0").await;
    assert_eq!(
        digest_of(get_manifest(&proxy, "library/other", "2.0").await).await,
        d2
    );
    assert_eq!(
        series(
            &proxy,
            r#"upstream_ratelimit_remaining{upstream="docker.io",credential="anonymous"}"#
        )
        .await,
        Some(10.0)
    );

    // Stale tags are served without a HEAD or a GET.
    past_ttl().await;
    let before = hub.requests();
    for _ in 0..3 {
        let r = get_manifest(&proxy, "library/app", "1.0").await;
        assert_eq!(digest_of(r).await, d1);
        let r = get_manifest(&proxy, "library/other", "2.0").await;
        assert_eq!(digest_of(r).await, d2);
    }
    assert_eq!(
        hub.requests(),
        before,
        "a tag was revalidated under the reserve"
    );
    let status: serde_json::Value = client()
        .get(proxy.url("/_ociedge/status"))
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("JSON");
    assert_eq!(status["upstreams"][0]["quota_low"], true, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry"]
async fn under_the_quota_reserve_prewarming_waits() {
    let hub = Hub::start().await;
    let d1 = common::push_image(&hub.origin_url, "library/app", "1.0").await;
    common::push_image(&hub.origin_url, "library/later", "1.0").await;
    let proxy = proxy(&hub, &[("ratelimit_reserve", "\"20%\"")]);
    // One answer announces a quota under the reserve.
    hub.remaining.store(10, Ordering::SeqCst);
    assert_eq!(
        digest_of(get_manifest(&proxy, "library/app", "1.0").await).await,
        d1
    );
    let before = hub.requests();
    let r = client()
        .post(proxy.url("/_ociedge/prewarm"))
        .header("content-type", "application/json")
        .body(r#"{"images": ["library/later:1.0"]}"#)
        .send()
        .await
        .expect("POST prewarm");
    assert_eq!(r.status().as_u16(), 202);
    let id = r.json::<serde_json::Value>().await.expect("JSON")["id"]
        .as_str()
        .expect("id")
        .to_string();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let job: serde_json::Value = client()
        .get(proxy.url(&format!("/_ociedge/prewarm/{id}")))
        .send()
        .await
        .expect("GET job")
        .json()
        .await
        .expect("JSON");
    assert_eq!(job["finished"], false, "{job}");
    assert_eq!(
        hub.requests(),
        before,
        "prewarm asked the upstream under the reserve: {job}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry"]
async fn the_breaker_opens_answers_misses_at_once_and_closes_when_the_upstream_is_back() {
    let hub = Hub::start().await;
    let digest = common::push_image(&hub.origin_url, "library/app", "1.0").await;
    // Another storage engine holds a blob the upstream never had.
    let other = tokio::task::spawn_blocking(Origin::start)
        .await
        .expect("docker-registry");
    let elsewhere = common::random_bytes(5000, 77);
    let elsewhere_digest = common::push_blob(&other.url(), "library/app", elsewhere.clone()).await;
    let up = Upstream::new("docker.io", &hub.url)
        .option("down_after", "3")
        .option("backoff_max", "2s");
    let cfg = Config::mirror_of(up)
        .engine(Engine::new(
            "us",
            &format!("file://{}", other.data_dir().display()),
        ))
        .cache("tag_ttl", "1s")
        .cache("max_stale", "1h")
        .render();
    let proxy = Proxy::start(&cfg);
    assert_eq!(
        digest_of(get_manifest(&proxy, "library/app", "1.0").await).await,
        digest
    );
    let state = r#"upstream_breaker_state{upstream="docker.io"}"#;
    assert_eq!(series(&proxy, state).await, Some(0.0));

    // The upstream fails: misses reach it until down_after failures open the breaker.
    hub.set(Mode::Fail(500, None));
    let mut n = 0u64;
    let opened = eventually(Duration::from_secs(10), async || {
        n += 1;
        let missing = format!("sha256:{}", common::sha256_hex(&n.to_le_bytes()));
        let _ = get_manifest(&proxy, "library/app", &missing).await;
        series(&proxy, state).await == Some(1.0)
    })
    .await;
    assert!(opened, "the breaker never opened");
    assert!(n <= 4, "opened after {n} failed misses, not down_after (3)");
    assert!(
        series(
            &proxy,
            r#"upstream_breaker_openings_total{upstream="docker.io"}"#
        )
        .await
        .unwrap_or(0.0)
            >= 1.0
    );

    // Open: no request reaches the upstream; misses answer 503 at once; stale tags are
    // served; content another engine has is served from it.
    past_ttl().await;
    let before = hub.requests();
    let (mut manifests, mut blobs) = (Vec::new(), Vec::new());
    for i in 0..5u64 {
        let missing = format!("sha256:{}", common::sha256_hex(&(1000 + i).to_le_bytes()));
        let t = Instant::now();
        let r = get_manifest(&proxy, "library/app", &missing).await;
        manifests.push(t.elapsed());
        assert!(retry_after(&r) >= 1);
        assert_oci_error(r, 503, "UNAVAILABLE").await;
        let t = Instant::now();
        let r = get_blob(&proxy, "library/app", &missing).await;
        blobs.push(t.elapsed());
        assert!(retry_after(&r) >= 1);
        assert_oci_error(r, 503, "UNAVAILABLE").await;
        let r = get_manifest(&proxy, "library/app", "1.0").await;
        assert_eq!(digest_of(r).await, digest, "the stale tag");
    }
    // Within 100 ms (the median: this machine is shared, and one answer may wait for a CPU),
    // and none waits for anything (the upstream's timeouts are 10 s and more).
    for (what, mut took) in [("manifest", manifests), ("blob", blobs)] {
        took.sort();
        assert!(
            took[2] < Duration::from_millis(100) && took[4] < Duration::from_secs(1),
            "{what} misses took {took:?}"
        );
    }
    let r = get_blob(&proxy, "library/app", &elsewhere_digest).await;
    assert_eq!(r.status(), 200, "a blob another engine has");
    assert_eq!(r.headers()["x-ociedge-source"], "us");
    assert_eq!(r.bytes().await.expect("body").as_ref(), &elsewhere[..]);
    assert_eq!(
        hub.requests(),
        before,
        "requests reached an upstream whose breaker is open"
    );
    let status: serde_json::Value = client()
        .get(proxy.url("/_ociedge/status"))
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("JSON");
    let b = &status["upstreams"][0];
    assert_eq!(b["name"], "docker.io");
    assert!(
        b["breaker"] == "open" || b["breaker"] == "half-open",
        "{status}"
    );

    // The upstream is back: a probe closes the breaker and requests flow again.
    hub.set(Mode::Pass);
    let closed = eventually(Duration::from_secs(15), async || {
        series(&proxy, state).await == Some(0.0)
    })
    .await;
    assert!(closed, "the breaker never closed: {}", proxy.log());
    assert!(hub.probes.load(Ordering::SeqCst) >= 1, "no probe");
    past_ttl().await;
    let r = get_manifest(&proxy, "library/app", "1.0").await;
    assert_eq!(digest_of(r).await, digest);
    assert!(hub.requests() > before, "not revalidated after closing");
}

/// Refused connections are failures too: an upstream that is not there opens the breaker after
/// `down_after` tries, and misses then answer at once instead of trying to connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_open_the_breaker() {
    let dead = common::free_port();
    let up = Upstream::new("docker.io", &format!("http://127.0.0.1:{dead}"))
        .option("down_after", "2")
        .option("backoff_max", "30s");
    let proxy = Proxy::start(&Config::mirror_of(up).render());
    let state = r#"upstream_breaker_state{upstream="docker.io"}"#;
    let mut n = 0u64;
    let opened = eventually(Duration::from_secs(10), async || {
        n += 1;
        let missing = format!("sha256:{}", common::sha256_hex(&n.to_le_bytes()));
        let _ = get_manifest(&proxy, "library/app", &missing).await;
        series(&proxy, state).await == Some(1.0)
    })
    .await;
    assert!(opened, "the breaker never opened: {}", proxy.log());
    let mut took = Vec::new();
    for i in 0..5u64 {
        let missing = format!("sha256:{}", common::sha256_hex(&(100 + i).to_le_bytes()));
        let t = Instant::now();
        let r = get_blob(&proxy, "library/app", &missing).await;
        took.push(t.elapsed());
        assert!(retry_after(&r) >= 1);
        assert_oci_error(r, 503, "UNAVAILABLE").await;
    }
    // The median within 100 ms (a shared machine may delay one answer), none waiting.
    took.sort();
    assert!(
        took[2] < Duration::from_millis(100) && took[4] < Duration::from_secs(1),
        "blob misses took {took:?}"
    );
}

/// Timeouts are failures too: an upstream that accepts requests and never answers opens the
/// breaker after `down_after` of them time out (the 20 s deadline of a small request), and the
/// next misses answer at once instead of waiting out the deadline again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_answers_opens_the_breaker() {
    let asked = Arc::new(AtomicU64::new(0));
    let count = asked.clone();
    let port = fake::serve(move |req: http::Request<hyper::body::Incoming>| {
        // (Probes, `GET /v2/`, apart: the breaker's own probe may go while it is open.)
        if req.uri().path() != "/v2/" {
            count.fetch_add(1, Ordering::SeqCst);
        }
        async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            http::Response::new(fake::full(""))
        }
    })
    .await;
    let up = Upstream::new("docker.io", &format!("http://127.0.0.1:{port}"))
        .option("down_after", "2")
        .option("backoff_max", "30s");
    let proxy = Proxy::start(&Config::mirror_of(up).render());
    // Two misses at once: both wait out the deadline, and then the breaker is open.
    let t = Instant::now();
    let misses = (0..2u64).map(|i| {
        let proxy = &proxy;
        async move {
            let missing = format!("sha256:{}", common::sha256_hex(&(200 + i).to_le_bytes()));
            get_manifest(proxy, "library/app", &missing).await.status()
        }
    });
    let statuses = futures::future::join_all(misses).await;
    assert!(statuses.iter().all(|s| s.is_server_error()), "{statuses:?}");
    assert!(t.elapsed() < Duration::from_secs(40), "{:?}", t.elapsed());
    let opened = eventually(Duration::from_secs(5), async || {
        series(&proxy, r#"upstream_breaker_state{upstream="docker.io"}"#).await == Some(1.0)
    })
    .await;
    assert!(opened, "the breaker did not open: {}", proxy.log());
    let before = asked.load(Ordering::SeqCst);
    let t = Instant::now();
    let r = get_manifest(&proxy, "library/app", MISSING).await;
    assert_oci_error(r, 503, "UNAVAILABLE").await;
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(asked.load(Ordering::SeqCst), before, "asked while open");
}
