//! Ranges of cold blobs (issue 20): answered at once from a ranged read or the fill, whichever is
//! sooner, while one whole-blob fill runs; broken when the fill's verdict is a mismatch.
//!
//! The upstream is a real Distribution behind a throttling proxy written here (each response
//! paced to a rate, after a delay), which counts what it sends: whole-blob GETs apart from
//! ranged ones.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::fake::{self, Body};
use common::{client, eventually, metric, Origin, Proxy};
use futures::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};

const MIB: u64 = 1 << 20;
const REPO: &str = "library/big";

/// What the throttling proxy sent of blob GETs.
#[derive(Default)]
struct Counts {
    whole_gets: AtomicUsize,
    range_gets: AtomicUsize,
    whole_bytes: AtomicU64,
    range_bytes: AtomicU64,
}

/// How the throttling proxy treats blob GETs.
#[derive(Clone, Copy)]
struct Pace {
    /// Bytes per second of each response.
    rate: u64,
    /// Before each response.
    delay: Duration,
    /// Flip one byte of every whole-blob GET (ranged GETs are left alone).
    corrupt_whole: bool,
}

struct Throttle {
    port: u16,
    counts: Arc<Counts>,
}

impl Throttle {
    async fn start(origin: &str, pace: Pace) -> Throttle {
        let counts = Arc::new(Counts::default());
        let origin = origin.to_string();
        let c = counts.clone();
        let port = fake::serve(move |req| {
            let (origin, counts) = (origin.clone(), c.clone());
            async move { throttled(&origin, req, pace, counts).await }
        })
        .await;
        Throttle { port, counts }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// Forwards `req` to `origin`, the body of a blob `GET` paced to `pace` and counted.
async fn throttled(
    origin: &str,
    req: Request<Incoming>,
    pace: Pace,
    counts: Arc<Counts>,
) -> Response<Body> {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let blob_get = req.method() == http::Method::GET && path.contains("/blobs/");
    let ranged = req.headers().contains_key(http::header::RANGE);
    let mut rb = reqwest::Client::new().request(req.method().clone(), format!("{origin}{path}"));
    for (k, v) in req.headers() {
        if k != "host" {
            rb = rb.header(k, v);
        }
    }
    if blob_get {
        tokio::time::sleep(pace.delay).await;
    }
    let Ok(up) = rb.send().await else {
        return Response::builder()
            .status(StatusCode::BAD_GATEWAY)
            .body(fake::full(""))
            .expect("response");
    };
    let mut b = Response::builder().status(up.status().as_u16());
    for (k, v) in up.headers() {
        if k != "transfer-encoding" && k != "connection" {
            b = b.header(k.as_str(), v.as_bytes());
        }
    }
    if !blob_get || !up.status().is_success() {
        let body = up.bytes().await.unwrap_or_default();
        return b.body(fake::full(body)).expect("response");
    }
    if ranged {
        counts.range_gets.fetch_add(1, Ordering::SeqCst);
    } else {
        counts.whole_gets.fetch_add(1, Ordering::SeqCst);
    }
    let start = tokio::time::Instant::now();
    let mut sent = 0u64;
    let corrupt = pace.corrupt_whole && !ranged;
    let body = up.bytes_stream().then(move |chunk| {
        let counts = counts.clone();
        // Counted here, in the closure that lives as long as the body: an `async move` block
        // would count on its own copy (and every chunk would be due at once, unpaced).
        let at = sent;
        sent += chunk.as_ref().map_or(0, |c| c.len() as u64);
        let due = start + Duration::from_secs_f64(sent as f64 / pace.rate as f64);
        async move {
            let chunk =
                chunk.map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) })?;
            tokio::time::sleep_until(due).await;
            if ranged {
                counts
                    .range_bytes
                    .fetch_add(chunk.len() as u64, Ordering::SeqCst);
            } else {
                counts
                    .whole_bytes
                    .fetch_add(chunk.len() as u64, Ordering::SeqCst);
            }
            // Byte 1000 of the blob is wrong.
            let chunk = if corrupt && at <= 1000 && 1000 < sent {
                let mut v = chunk.to_vec();
                v[(1000 - at) as usize] ^= 0x5a;
                Bytes::from(v)
            } else {
                chunk
            };
            Ok(Frame::data(chunk))
        }
    });
    b.body(BodyExt::boxed(StreamBody::new(body)))
        .expect("response")
}

/// A blob of `len` pseudo-random bytes stored straight into the origin's Distribution layout
/// under `REPO` (a push of hundreds of MiB would take longer than the test). Returns
/// `(digest, bytes)`.
fn store_blob(origin: &Origin, len: u64, seed: u64) -> (String, Bytes) {
    let data = Bytes::from(common::random_bytes(len as usize, seed));
    let hex = common::sha256_hex(&data);
    let root = origin.data_dir().join("docker/registry/v2");
    let dir = root.join(format!("blobs/sha256/{}/{hex}", &hex[..2]));
    std::fs::create_dir_all(&dir).expect("blob dir");
    std::fs::write(dir.join("data"), &data).expect("blob data");
    let link = root.join(format!("repositories/{REPO}/_layers/sha256/{hex}"));
    std::fs::create_dir_all(&link).expect("link dir");
    std::fs::write(link.join("link"), format!("sha256:{hex}")).expect("link");
    (format!("sha256:{hex}"), data)
}

fn mirror(upstream: &str, extra: &str) -> Proxy {
    Proxy::start(&common::mirror_config(upstream, extra))
}

/// `GET` of `bytes=start-(start+len-1)` at `base`: `(status, body, seconds)`.
async fn get_range(base: &str, digest: &str, start: u64, len: u64) -> (u16, Bytes, f64) {
    let t = Instant::now();
    let r = client()
        .get(format!("{base}/v2/{REPO}/blobs/{digest}"))
        .header("range", format!("bytes={start}-{}", start + len - 1))
        .send()
        .await
        .expect("GET range");
    let status = r.status().as_u16();
    let body = r.bytes().await.expect("range body");
    (status, body, t.elapsed().as_secs_f64())
}

/// Waits until no fill runs in `proxy`. The deadline is generous: a debug build hashes a
/// 256 MiB blob slowly on a loaded machine, and only the end matters here, not its time.
async fn fills_done(proxy: &Proxy) -> bool {
    eventually(Duration::from_secs(300), async || {
        metric(proxy, "ociedge_fills_in_flight").await == Some(0.0)
    })
    .await
}

fn committed(proxy: &Proxy, digest: &str) -> bool {
    Path::new(&proxy.blob_path(digest)).exists()
}

/// A 1 MiB range at 90% of a cold 256 MiB blob is answered about as fast as the same ranged read
/// straight from the upstream, not after the whole blob; the fill goes on and commits the blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry"]
async fn a_range_far_into_a_cold_blob_is_answered_at_once() {
    let origin = Origin::start();
    let size = 256 * MIB;
    let (digest, data) = store_blob(&origin, size, 1);
    let pace = Pace {
        rate: 64 * MIB,
        delay: Duration::from_millis(20),
        corrupt_whole: false,
    };
    let up = Throttle::start(&origin.url(), pace).await;
    let start = size / 10 * 9;
    let want = data.slice(start as usize..(start + MIB) as usize);

    let (status, body, direct) = get_range(&up.url(), &digest, start, MIB).await;
    assert_eq!(
        (status, body.len() as u64),
        (206, MIB),
        "direct ranged read"
    );

    let proxy = mirror(&up.url(), "");
    let base = proxy.url("");
    let t = Instant::now();
    let (status, body, through) = get_range(base.trim_end_matches('/'), &digest, start, MIB).await;
    assert_eq!(status, 206);
    assert!(body == want, "the range's bytes differ");
    assert!(fills_done(&proxy).await, "the fill did not end");
    let whole = t.elapsed().as_secs_f64();
    eprintln!(
        "direct ranged read {direct:.3}s, through ociedge {through:.3}s, whole blob {whole:.3}s"
    );
    assert!(
        through < whole / 4.0,
        "the range took {through:.3}s, the whole blob {whole:.3}s (direct: {direct:.3}s)"
    );
    // The fill went on without the client: the blob is committed, and it is the right one.
    assert!(committed(&proxy, &digest), "the blob was not committed");
    let stored = std::fs::read(proxy.blob_path(&digest)).expect("stored blob");
    assert!(stored == data, "the committed blob differs");
    assert_eq!(up.counts.whole_gets.load(Ordering::SeqCst), 1);
    let fetched = metric(
        &proxy,
        "ociedge_range_fetch_bytes_total{engine=\"docker.io\"}",
    )
    .await
    .unwrap_or(0.0);
    assert!(
        fetched <= MIB as f64,
        "ranged reads fetched {fetched} bytes"
    );
}

/// containerd's multipart fetch: 16 parallel 8 MiB ranges covering a cold 128 MiB blob are all
/// right, start one fill, and cost the upstream far less than the blob twice: the ranges lend
/// their bytes to the fill, which fetches only what no range brought.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry"]
async fn parallel_ranges_of_a_cold_blob_start_one_fill() {
    let origin = Origin::start();
    let size = 128 * MIB;
    let (digest, data) = store_blob(&origin, size, 2);
    let pace = Pace {
        rate: 32 * MIB,
        delay: Duration::from_millis(20),
        corrupt_whole: false,
    };
    let up = Throttle::start(&origin.url(), pace).await;
    let proxy = mirror(&up.url(), "");
    let base = proxy.url("").trim_end_matches('/').to_string();
    let t = Instant::now();
    let parts = futures::future::join_all((0..16u64).map(|i| {
        let (base, digest) = (base.clone(), digest.clone());
        async move { get_range(&base, &digest, i * 8 * MIB, 8 * MIB).await }
    }))
    .await;
    let ranges = t.elapsed().as_secs_f64();
    for (i, (status, body, _)) in parts.iter().enumerate() {
        let at = i * 8 * MIB as usize;
        assert_eq!(*status, 206, "range {i}");
        assert!(
            *body == data.slice(at..at + 8 * MIB as usize),
            "range {i} has wrong bytes"
        );
    }
    assert!(fills_done(&proxy).await, "the fill did not end");
    let whole = t.elapsed().as_secs_f64();
    // One response at the upstream's pace takes size / rate (4 s): ranges that waited for one
    // stream of the blob would end after 3/4 of that (the last range starts at 15/16).
    let one_stream = (size / pace.rate) as f64;
    eprintln!(
        "16 ranges in {ranges:.3}s, the fill ended at {whole:.3}s (one stream: {one_stream:.1}s)"
    );
    assert!(
        ranges < one_stream * 0.75,
        "the ranges took {ranges:.3}s, one stream of the blob {one_stream:.1}s: they waited for the fill"
    );
    assert!(committed(&proxy, &digest), "the blob was not committed");
    let c = &up.counts;
    assert_eq!(c.whole_gets.load(Ordering::SeqCst), 1, "one whole-blob GET");
    let (whole_bytes, ranged) = (
        c.whole_bytes.load(Ordering::SeqCst),
        c.range_bytes.load(Ordering::SeqCst),
    );
    let lent = metric(&proxy, "ociedge_fill_lent_bytes_total")
        .await
        .unwrap_or(0.0);
    eprintln!("upstream: whole GET {whole_bytes} bytes, ranged GETs {ranged} bytes; lent to the fill {lent}");
    assert!(
        lent >= (size / 2) as f64,
        "the fill took only {lent} bytes from the ranges"
    );
    // Some bytes may be fetched twice (the fill's own stream runs on into a range before its
    // ranged read lends anything, more so on a loaded machine; ranges the fill was about to
    // reach follow it instead), never the blob twice: without lending this was 1.94×.
    assert!(
        whole_bytes + ranged <= size + size / 2,
        "the upstream sent {} bytes for a blob of {size}",
        whole_bytes + ranged
    );
    assert_eq!(
        metric(&proxy, "ociedge_fills_total{result=\"done\"}").await,
        Some(1.0),
        "one fill"
    );
}

/// A whole-blob GET that brings wrong bytes: the ranged responses still open when the fill's
/// verdict comes are broken (the client sees a body error, not a clean end), counted, and
/// nothing is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry"]
async fn a_mismatch_breaks_the_ranges_still_open() {
    let origin = Origin::start();
    let size = 96 * MIB;
    let (digest, _) = store_blob(&origin, size, 3);
    let pace = Pace {
        rate: 48 * MIB,
        delay: Duration::from_millis(20),
        corrupt_whole: true,
    };
    let up = Throttle::start(&origin.url(), pace).await;
    let proxy = mirror(&up.url(), "");
    let url = proxy.url(&format!("/v2/{REPO}/blobs/{digest}"));
    // Two 32 MiB ranges in the second and last thirds, more than socket buffers hold: the
    // client takes their heads and waits, so both are still open at the verdict.
    let mut open = Vec::new();
    for start in [32 * MIB, 64 * MIB] {
        let r = client()
            .get(&url)
            .header("range", format!("bytes={start}-{}", start + 32 * MIB - 1))
            .send()
            .await
            .expect("GET range");
        assert_eq!(r.status(), 206);
        open.push(r);
    }
    let mismatch = eventually(Duration::from_secs(300), async || {
        metric(
            &proxy,
            "ociedge_digest_mismatches_total{engine=\"docker.io\"}",
        )
        .await
        .is_some_and(|n| n >= 1.0)
    })
    .await;
    assert!(mismatch, "the fill's mismatch was not seen");
    for (i, r) in open.into_iter().enumerate() {
        let read = tokio::time::timeout(Duration::from_secs(60), r.bytes())
            .await
            .expect("the body neither ended nor broke");
        assert!(
            read.is_err(),
            "range {i} ended cleanly after the mismatch ({} bytes)",
            read.map(|b| b.len()).unwrap_or(0)
        );
    }
    let broken = metric(&proxy, "ociedge_range_responses_broken_total").await;
    assert_eq!(broken, Some(2.0), "broken ranged responses counted");
    assert!(fills_done(&proxy).await);
    assert!(!committed(&proxy, &digest), "a wrong blob was committed");
}

/// `cache.fill_on_range: false`: ranges of a cold blob are fetched as ranges, no whole-blob
/// fill starts, nothing is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry"]
async fn without_fill_on_range_only_the_ranges_are_fetched() {
    let origin = Origin::start();
    let size = 32 * MIB;
    let (digest, data) = store_blob(&origin, size, 4);
    let pace = Pace {
        rate: 64 * MIB,
        delay: Duration::from_millis(5),
        corrupt_whole: false,
    };
    let up = Throttle::start(&origin.url(), pace).await;
    let proxy = mirror(&up.url(), "cache:\n  fill_on_range: false\n");
    let base = proxy.url("").trim_end_matches('/').to_string();
    for start in [0, 10 * MIB, size - MIB] {
        let (status, body, _) = get_range(&base, &digest, start, MIB).await;
        assert_eq!(status, 206);
        assert!(
            body == data.slice(start as usize..(start + MIB) as usize),
            "range at {start} has wrong bytes"
        );
    }
    assert_eq!(up.counts.whole_gets.load(Ordering::SeqCst), 0, "a fill ran");
    assert_eq!(up.counts.range_bytes.load(Ordering::SeqCst), 3 * MIB);
    assert_eq!(metric(&proxy, "ociedge_fills_in_flight").await, Some(0.0));
    assert!(
        !committed(&proxy, &digest),
        "an unverified blob was committed"
    );
    assert_eq!(
        metric(
            &proxy,
            "ociedge_range_fetch_bytes_total{engine=\"docker.io\"}"
        )
        .await,
        Some((3 * MIB) as f64)
    );
}

/// A multi-range request (`bytes=0-99,200-299`) is answered `200` with the whole blob, cold
/// and warm.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry"]
async fn a_multi_range_request_gets_the_whole_blob() {
    let origin = Origin::start();
    let (digest, data) = store_blob(&origin, MIB, 5);
    let proxy = mirror(&origin.url(), "");
    let url = proxy.url(&format!("/v2/{REPO}/blobs/{digest}"));
    for round in ["cold", "warm"] {
        let r = client()
            .get(&url)
            .header("range", "bytes=0-99,200-299")
            .send()
            .await
            .expect("GET");
        assert_eq!(r.status(), 200, "{round}");
        assert!(r.headers().get("content-range").is_none(), "{round}");
        let body = r.bytes().await.expect("body");
        assert!(body == data, "{round}: not the whole blob");
        assert!(fills_done(&proxy).await);
    }
    // A single range of the now warm blob is still a 206 of those bytes.
    let (status, body, _) = get_range(proxy.url("").trim_end_matches('/'), &digest, 100, 50).await;
    assert_eq!(status, 206);
    assert!(body == data.slice(100..150));
}

/// An upstream that answers ranges wrongly: a `206` of fewer bytes than asked (`short`), or a
/// `200` with the whole blob (a registry ignoring `Range`); whole-blob GETs paced to ~6 MiB/s.
async fn lying_upstream(data: Bytes, short: bool) -> u16 {
    let digest = format!("sha256:{}", common::sha256_hex(&data));
    fake::serve(move |req: Request<Incoming>| {
        let (data, digest) = (data.clone(), digest.clone());
        async move {
            let path = req.uri().path().to_string();
            if path == "/v2/" {
                return Response::new(fake::full("{}"));
            }
            if !path.ends_with(&format!("/blobs/{digest}")) {
                return Response::builder()
                    .status(404)
                    .body(fake::full(""))
                    .expect("response");
            }
            let len = data.len() as u64;
            let range = req
                .headers()
                .get("range")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("bytes="))
                .and_then(|v| v.split_once('-'))
                .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok())));
            let head = Response::builder()
                .header("docker-content-digest", &digest)
                .header("content-type", "application/octet-stream");
            if req.method() == http::Method::HEAD {
                return head
                    .header("content-length", len)
                    .body(fake::full(""))
                    .expect("response");
            }
            match range {
                Some((a, b)) if short => {
                    let end = b.map_or(len, |b| (b + 1).min(len));
                    let lie = a + (end - a) / 2;
                    head.status(206)
                        .header("content-range", format!("bytes {a}-{}/{len}", lie - 1))
                        .header("content-length", lie - a)
                        .body(fake::full(data.slice(a as usize..lie as usize)))
                        .expect("response")
                }
                _ => {
                    let chunks: Vec<Bytes> = (0..data.len())
                        .step_by(64 << 10)
                        .map(|i| data.slice(i..(i + (64 << 10)).min(data.len())))
                        .collect();
                    let paced = futures::stream::iter(chunks).then(|c| async move {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(c))
                    });
                    head.status(200)
                        .header("content-length", len)
                        .body(BodyExt::boxed(StreamBody::new(paced)))
                        .expect("response")
                }
            }
        }
    })
    .await
}

/// Ranged reads must bring exactly the bytes asked: a `206` of other bytes is refused (the range
/// is served from the fill instead), a `200` to a range from byte 0 is cut at the range's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_answering_other_bytes_than_asked_is_not_believed() {
    let data = Bytes::from(common::random_bytes(8 << 20, 6));
    let digest = format!("sha256:{}", common::sha256_hex(&data));
    // A short 206: the ranged read is refused, the fill serves the range.
    let port = lying_upstream(data.clone(), true).await;
    let proxy = mirror(&format!("http://127.0.0.1:{port}"), "");
    let base = proxy.url("");
    let (status, body, _) = get_range(&base, &digest, 6 * MIB, MIB).await;
    assert_eq!(status, 206);
    assert!(
        body == data.slice(6 << 20..7 << 20),
        "short 206: wrong bytes"
    );
    assert!(fills_done(&proxy).await);
    // A 200 to a range from byte 0, with only ranged reads (no fill to fall back on).
    let port = lying_upstream(data.clone(), false).await;
    let proxy = mirror(
        &format!("http://127.0.0.1:{port}"),
        "cache:\n  fill_on_range: false\n",
    );
    let base = proxy.url("");
    let (status, body, _) = get_range(&base, &digest, 0, MIB).await;
    assert_eq!(status, 206);
    assert!(
        body == data.slice(..1 << 20),
        "200 for a range: wrong bytes"
    );
}
