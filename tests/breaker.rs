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
