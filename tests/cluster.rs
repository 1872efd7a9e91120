//! A region of several ociedge processes on one local engine (`cluster:`) is one cache: one
//! upstream fetch per digest whoever asks, a lease holder killed mid-fill is taken over at the
//! byte reached, and eviction spares what any process reads while the cap holds with the
//! defaults.

mod common;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fake::{self, Body};
use common::regions::Moto;
use common::*;
use futures::StreamExt;
use http_body_util::{BodyExt, StreamBody};

const SECRET_ENV: &str = "OCIEDGE_CLUSTER_SECRET";
const MIB: u64 = 1 << 20;

/// Blob GETs a forwarder in front of the real registry passed on, and the body bytes it sent.
#[derive(Default)]
struct Upstream {
    blob_gets: AtomicUsize,
    sent: AtomicU64,
}

/// A loopback forwarder to `backend` that counts blob GETs and streams bodies at `rate`
/// bytes per second at most (`None`: as fast as the registry).
async fn counting_upstream(backend: &str, rate: Option<u64>) -> (u16, Arc<Upstream>) {
    let counts = Arc::new(Upstream::default());
    let backend = backend.to_string();
    let c = counts.clone();
    let port = fake::serve(move |req: http::Request<hyper::body::Incoming>| {
        let (backend, counts) = (backend.clone(), c.clone());
        async move {
            let path = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_default();
            if req.method() == http::Method::GET && path.contains("/blobs/sha256:") {
                counts.blob_gets.fetch_add(1, Ordering::SeqCst);
            }
            let mut rb =
                reqwest::Client::new().request(req.method().clone(), format!("{backend}{path}"));
            for (k, v) in req.headers() {
                if k != "host" {
                    rb = rb.header(k, v);
                }
            }
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let Ok(up) = rb.body(body).send().await else {
                let mut r = http::Response::new(fake::full(""));
                *r.status_mut() = http::StatusCode::BAD_GATEWAY;
                return r;
            };
            let mut r = http::Response::builder().status(up.status());
            for (k, v) in up.headers() {
                r = r.header(k, v);
            }
            let start = Instant::now();
            let mut done = 0u64;
            let stream = up.bytes_stream().then(move |item| {
                let counts = counts.clone();
                // Counted in the closure, which lives as long as the body (an `async move` block
                // would count on its own copy, and nothing would be paced).
                done += item.as_ref().map_or(0, |c| c.len() as u64);
                async move {
                    let chunk =
                        item.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
                    if let Some(rate) = rate {
                        let due = Duration::from_secs_f64(done as f64 / rate as f64);
                        if let Some(wait) = due.checked_sub(start.elapsed()) {
                            tokio::time::sleep(wait).await;
                        }
                    }
                    counts.sent.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper::body::Frame::data(
                        chunk,
                    ))
                }
            });
            let body: Body = BodyExt::boxed(StreamBody::new(stream));
            r.body(body).expect("response")
        }
    })
    .await;
    (port, counts)
}

/// A config of one process of the region: `engine` (YAML) is the shared local engine.
fn region_config(engine: &str, upstream_port: u16, extra: &str) -> String {
    format!(
        "listen: 127.0.0.1:{{PORT}}\nstorage:\n  preference: shared\n  engines:\n    shared: {engine}\nupstreams:\n  - {{ name: docker.io, url: \"http://127.0.0.1:{upstream_port}\" }}\ncluster: {{ secret_env: {SECRET_ENV} }}\n{extra}"
    )
}

fn start_region(cfg: &str, n: usize) -> Vec<Proxy> {
    std::env::set_var(SECRET_ENV, "region-secret");
    (0..n).map(|_| Proxy::start(cfg)).collect()
}

fn dir_engine(dir: &std::path::Path) -> String {
    format!("{{ url: \"file://{}\" }}", dir.display())
}

/// `clients` concurrent cold GETs of `digest` spread over `proxies`: every body is correct.
async fn herd(proxies: &[Proxy], repo: &str, digest: &str, clients: usize) {
    let mut tasks = Vec::new();
    for i in 0..clients {
        let url = proxies[i % proxies.len()].url(&format!("/v2/{repo}/blobs/{digest}"));
        let want = digest.to_string();
        tasks.push(tokio::spawn(async move {
            let r = client().get(&url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let body = r.bytes().await.unwrap();
            assert_eq!(
                format!("sha256:{}", sha256_hex(&body)),
                want,
                "a correct body"
            );
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

async fn one_upstream_get_for_the_region(engine: impl Fn(&std::path::Path) -> String) {
    let origin = Origin::start();
    let digest = push_blob(&origin.url(), "region/herd", random_bytes(64 << 20, 1900)).await;
    let (port, upstream) = counting_upstream(&origin.url(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = region_config(&engine(dir.path()), port, "");
    let proxies = start_region(&cfg, 3);
    herd(&proxies, "region/herd", &digest, 12).await;
    for p in &proxies {
        assert!(fills_settled(p).await, "fills ended");
    }
    assert_eq!(
        upstream.blob_gets.load(Ordering::SeqCst),
        1,
        "one upstream GET for the whole region"
    );
    let mut from_peers = 0.0;
    for p in &proxies {
        from_peers += metric(p, "ociedge_cluster_peer_fills_total")
            .await
            .unwrap_or(0.0);
    }
    assert!(
        from_peers >= 1.0,
        "the others streamed from the lease holder"
    );
    // The status page lists the region's processes, seen through their leases and lists.
    assert!(
        eventually(Duration::from_secs(15), async || {
            let v: serde_json::Value =
                serde_json::from_str(&get_text(proxies[0].url("/_ociedge/status")).await)
                    .unwrap_or_default();
            v["cluster"]["processes"].as_array().map(Vec::len) == Some(3)
        })
        .await,
        "the status lists the 3 processes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry"]
async fn three_processes_on_one_directory_fetch_a_blob_once() {
    one_upstream_get_for_the_region(|dir| dir_engine(&dir.join("data"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, moto"]
async fn three_processes_on_one_bucket_fetch_a_blob_once() {
    let s3 = Moto::start(None, "127.0.0.1");
    one_upstream_get_for_the_region(|_| s3.engine_yaml(None)).await;
}

/// The holder of the fill lease killed at about half of the fill: every client gets correct
/// bytes or a broken response, a retry gets correct bytes, the region asked upstream at most
/// twice, and nothing wrong was committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry"]
async fn the_lease_holder_killed_mid_fill_is_taken_over() {
    let origin = Origin::start();
    let size = 256 * MIB;
    let data = random_bytes(size as usize, 1901);
    let digest = push_blob(&origin.url(), "region/kill", data).await;
    // Slow enough to be killed in the middle of it.
    let (port, upstream) = counting_upstream(&origin.url(), Some(24 * MIB)).await;
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let cfg = region_config(&dir_engine(&data_dir), port, "");
    let mut proxies = start_region(&cfg, 3);
    let path = format!("/v2/region/kill/blobs/{digest}");
    let mut clients = Vec::new();
    for i in 0..6 {
        let url = proxies[i % 3].url(&path);
        let want = digest.clone();
        clients.push(tokio::spawn(async move {
            let r = client().get(&url).send().await.map_err(|e| e.to_string())?;
            if r.status() != 200 {
                return Err(format!("status {}", r.status()));
            }
            let body = r.bytes().await.map_err(|e| e.to_string())?;
            // A clean answer is a correct one.
            assert_eq!(
                format!("sha256:{}", sha256_hex(&body)),
                want,
                "a clean wrong body"
            );
            Ok(())
        }));
    }
    // The lease holder, read from the lease object.
    let hex = digest.trim_start_matches("sha256:");
    let lease = data_dir.join(format!("_ociedge/fills/sha256/{hex}"));
    let mut holder = None;
    assert!(
        eventually(Duration::from_secs(20), async || {
            let Ok(b) = std::fs::read(&lease) else {
                return false;
            };
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b) else {
                return false;
            };
            let addr = v["addr"].as_str().unwrap_or_default().to_string();
            holder = proxies
                .iter()
                .position(|p| addr.ends_with(&format!(":{}", p.port)));
            holder.is_some()
        })
        .await,
        "a process holds the fill lease"
    );
    assert!(
        eventually(Duration::from_secs(60), async || {
            upstream.sent.load(Ordering::SeqCst) >= size / 2
        })
        .await,
        "the fill reached half"
    );
    let killed = proxies.remove(holder.unwrap());
    let _ = killed.restart();
    let mut broken = 0;
    for c in clients {
        if c.await.unwrap().is_err() {
            broken += 1;
        }
    }
    assert!(
        broken <= 2,
        "only the killed process's clients broke: {broken}"
    );
    // A retry gets correct bytes, from whichever survivor.
    herd(&proxies, "region/kill", &digest, 2).await;
    for p in &proxies {
        assert!(fills_settled(p).await, "fills ended");
    }
    let gets = upstream.blob_gets.load(Ordering::SeqCst);
    assert!(gets <= 2, "at most 2 upstream GETs, got {gets}");
    let mut took = 0.0;
    for p in &proxies {
        took += metric(p, "ociedge_cluster_leases_taken_over_total")
            .await
            .unwrap_or(0.0);
    }
    assert!(took >= 1.0, "a survivor took the lease over");
    let blob = data_dir.join(format!(
        "docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    let stored = std::fs::read(&blob).expect("committed");
    assert_eq!(sha256_hex(&stored), hex, "what was committed is whole");
}

/// Bytes of blob data in a local engine directory.
fn usage(data: &std::path::Path) -> u64 {
    fn walk(p: &std::path::Path) -> u64 {
        let Ok(rd) = std::fs::read_dir(p) else {
            return 0;
        };
        rd.flatten()
            .map(|e| {
                let Ok(m) = e.metadata() else { return 0 };
                if m.is_dir() {
                    walk(&e.path())
                } else {
                    m.len()
                }
            })
            .sum()
    }
    walk(&data.join("docker/registry/v2/blobs"))
}

/// 300 MB of 20 MB blobs pulled as fast as possible through `n` processes with only
/// `max_size` set: usage never passes the cap by more than the blobs in flight, and settles
/// under the low-water mark.
async fn the_cap_holds_by_default(n: usize) {
    let origin = Origin::start();
    let mut blobs = Vec::new();
    for i in 0..15u64 {
        blobs.push(
            push_blob(
                &origin.url(),
                "region/cap",
                random_bytes(20_000_000, 1910 + i),
            )
            .await,
        );
    }
    let (port, _) = counting_upstream(&origin.url(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let cap = 100 * MIB;
    let cfg = region_config(
        &dir_engine(&data_dir),
        port,
        "cache: { max_size: 100MiB }\n",
    );
    let proxies = start_region(&cfg, n);
    let peak = Arc::new(AtomicU64::new(0));
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let (peak, watching, data_dir) = (peak.clone(), watching.clone(), data_dir.clone());
        std::thread::spawn(move || {
            while watching.load(Ordering::SeqCst) {
                peak.fetch_max(usage(&data_dir), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // Three clients at a time, spread over the processes.
    let concurrency = 3;
    let urls: Vec<(String, String)> = blobs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            (
                proxies[i % n].url(&format!("/v2/region/cap/blobs/{d}")),
                d.clone(),
            )
        })
        .collect();
    futures::stream::iter(urls)
        .for_each_concurrent(concurrency, |(url, want)| async move {
            let body = client()
                .get(&url)
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            assert_eq!(format!("sha256:{}", sha256_hex(&body)), want);
        })
        .await;
    for p in &proxies {
        assert!(fills_settled(p).await, "fills ended");
    }
    let settled = eventually(Duration::from_secs(20), async || {
        usage(&data_dir) as f64 <= cap as f64 * 0.9
    })
    .await;
    watching.store(false, Ordering::SeqCst);
    watcher.join().unwrap();
    let peak = peak.load(Ordering::SeqCst);
    // In flight: the blobs being filled at once, and the one just committed before its pass.
    let in_flight = (concurrency as u64 + 1) * 20_000_000;
    assert!(
        peak <= cap + in_flight,
        "usage peaked at {} MiB, over the cap + in flight ({} MiB)",
        peak / MIB,
        (cap + in_flight) / MIB
    );
    assert!(
        settled,
        "usage settled at {} MiB, over low water",
        usage(&data_dir) / MIB
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry"]
async fn the_cap_holds_by_default_on_one_process() {
    the_cap_holds_by_default(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry"]
async fn the_cap_holds_by_default_on_three_processes() {
    the_cap_holds_by_default(3).await;
}

/// A blob read slowly through B is never deleted while A evicts to make room.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry"]
async fn a_blob_read_through_another_process_is_not_evicted() {
    let origin = Origin::start();
    let slow = push_blob(&origin.url(), "region/read", random_bytes(40 << 20, 1930)).await;
    let mut others = Vec::new();
    for i in 0..8u64 {
        others.push(
            push_blob(
                &origin.url(),
                "region/read",
                random_bytes(20_000_000, 1931 + i),
            )
            .await,
        );
    }
    let (port, _) = counting_upstream(&origin.url(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let cfg = region_config(&dir_engine(&data_dir), port, "cache: { max_size: 64MiB }\n");
    let proxies = start_region(&cfg, 2);
    let (a, b) = (&proxies[0], &proxies[1]);
    // The blob is in the shared engine, then read through B slowly (a hit there).
    let url = b.url(&format!("/v2/region/read/blobs/{slow}"));
    client()
        .get(&url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(fills_settled(b).await);
    let hex = slow.trim_start_matches("sha256:").to_string();
    let blob = data_dir.join(format!(
        "docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    assert!(blob.exists());
    let mut r = client().get(&url).send().await.unwrap();
    assert_eq!(r.headers()["x-ociedge-source"], "local");
    let first = r.chunk().await.unwrap().expect("a first chunk");
    let mut got = first.len();
    // A fills 160 MB, 2.5 times its cap, with B's reader idle; the slow blob is the least
    // recently used and stays as long as B reads it.
    for d in &others {
        let body = client()
            .get(a.url(&format!("/v2/region/read/blobs/{d}")))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(&format!("sha256:{}", sha256_hex(&body)), d);
        assert!(blob.exists(), "the blob B is reading was deleted");
    }
    assert!(fills_settled(a).await);
    // A did evict (others' blobs), and still not the one B reads.
    assert!(
        eventually(Duration::from_secs(20), async || usage(&data_dir)
            <= 64 * MIB + 40 * MIB)
        .await,
        "A evicted down to its cap (plus the blob B reads): {} MiB",
        usage(&data_dir) / MIB
    );
    assert!(blob.exists(), "the blob B is reading was deleted");
    let mut body = first.to_vec();
    while let Some(c) = r.chunk().await.unwrap() {
        got += c.len();
        body.extend_from_slice(&c);
    }
    assert_eq!(got, 40 << 20);
    assert_eq!(format!("sha256:{}", sha256_hex(&body)), slow);
}

/// The internal route wants the region's secret, and does not exist without `cluster:`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_peer_route_needs_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = region_config(&dir_engine(&dir.path().join("data")), 9, "");
    let proxies = start_region(&cfg, 1);
    let path = format!("/_ociedge/cluster/fills/sha256/{}", "a".repeat(64));
    let r = client().get(proxies[0].url(&path)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = client()
        .get(proxies[0].url(&path))
        .header("x-ociedge-cluster-secret", "wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = client()
        .get(proxies[0].url(&path))
        .header("x-ociedge-cluster-secret", "region-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "no fill of it runs");
    let alone = Proxy::start(&mirror_config("http://127.0.0.1:9", ""));
    let r = client()
        .get(alone.url(&path))
        .header("x-ociedge-cluster-secret", "region-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}
