//! Bounded reads against hostile peers (issue "Bounded"): whatever a client asks or an upstream
//! sends, what ociedge keeps in memory has a bound. Each test measures the proxy's peak RSS over
//! the idle process and keeps asking `/healthz` while the hostile peer does its worst.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::config::Config;
use common::hostile::*;
use common::*;
use futures::StreamExt;

/// An upstream that serves its blobs, and (while `lie` is set) answers a manifest request for
/// a blob's digest with the blob's bytes, the big ones without a length.
#[derive(Clone, Default)]
struct BlobsAsManifests {
    blobs: Arc<Mutex<HashMap<String, Bytes>>>,
    lie: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
}

impl BlobsAsManifests {
    fn add(&self, data: Vec<u8>) -> String {
        let d = format!("sha256:{}", sha256_hex(&data));
        self.blobs.lock().unwrap().insert(d.clone(), data.into());
        d
    }

    async fn start(&self) -> u16 {
        let me = self.clone();
        serve(move |req| {
            let me = me.clone();
            async move {
                let path = req.uri().path().to_string();
                if path == "/v2/" {
                    return respond(200, "{}");
                }
                let (kind, digest) = match (path.rfind("/blobs/"), path.rfind("/manifests/")) {
                    (Some(i), _) => ("blob", path[i + 7..].to_string()),
                    (_, Some(i)) => ("manifest", path[i + 11..].to_string()),
                    _ => return respond(404, ""),
                };
                let Some(data) = me.blobs.lock().unwrap().get(&digest).cloned() else {
                    return respond(404, r#"{"errors":[{"code":"BLOB_UNKNOWN"}]}"#);
                };
                if kind == "manifest" && !me.lie.load(Ordering::SeqCst) {
                    return respond(404, r#"{"errors":[{"code":"MANIFEST_UNKNOWN"}]}"#);
                }
                me.sent.fetch_add(data.len() as u64, Ordering::SeqCst);
                let len = data.len();
                let head = req.method() == http::Method::HEAD;
                let mut r = if kind == "manifest" && len > 1 << 20 {
                    // No length: only counting the bytes can stop a reader.
                    let chunks: Vec<_> =
                        data.chunks(64 << 10).map(Bytes::copy_from_slice).collect();
                    let s = futures::stream::iter(chunks).map(|b| {
                        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper::body::Frame::data(
                            b,
                        ))
                    });
                    let mut r = http::Response::new(http_body_util::BodyExt::boxed(
                        http_body_util::StreamBody::new(s),
                    ));
                    *r.status_mut() = http::StatusCode::OK;
                    r
                } else {
                    let mut r = respond(200, if head { Bytes::new() } else { data });
                    r.headers_mut()
                        .insert(http::header::CONTENT_LENGTH, len.into());
                    r
                };
                if kind == "manifest" {
                    r.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        "application/vnd.oci.image.manifest.v1+json"
                            .parse()
                            .unwrap(),
                    );
                }
                r.headers_mut()
                    .insert("docker-content-digest", digest.parse().unwrap());
                r
            }
        })
        .await
    }
}

/// A manifest GET by the digest of a blob (a 40 MB layer) neither reads the layer into memory nor
/// answers it as a manifest: not from the local engine (8 requests at once), and not from an
/// upstream that answers the manifest request with the blob's bytes (a small binary blob, whose
/// bytes do match the digest, included).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn manifest_reads_of_blobs_are_bounded_and_refused() {
    let up = BlobsAsManifests::default();
    let big = up.add(random_bytes(40 << 20, 1601));
    let small = up.add(random_bytes(1000, 1602));
    let config = up.add(br#"{"architecture":"amd64","os":"linux","config":{}}"#.to_vec());
    let port = up.start().await;
    let proxy = Proxy::start(&mirror_config(&format!("http://127.0.0.1:{port}"), ""));
    let pid = proxy.child.id();
    let c = client();
    // Fill the local engine with the blobs.
    for d in [&big, &small, &config] {
        let r = c
            .get(proxy.url(&format!("/v2/library/layers/blobs/{d}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        let path = proxy.blob_path(d);
        assert!(
            eventually(Duration::from_secs(30), async || path.exists()).await,
            "blob {d} never stored"
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle = rss_mib(pid);
    let health = HealthWatch::start(proxy.url("/healthz"));

    // Local engine: eight at once by the big blob's digest, then the small ones.
    let reqs = (0..8).map(|_| {
        let c = c.clone();
        let url = proxy.url(&format!("/v2/library/layers/manifests/{big}"));
        async move {
            let r = c.get(url).send().await.unwrap();
            let status = r.status().as_u16();
            // (the body only of an error: a layer answered as a manifest is not read)
            let body = match status {
                404 => r.text().await.unwrap_or_default(),
                _ => String::new(),
            };
            (status, body)
        }
    });
    for (status, body) in futures::future::join_all(reqs).await {
        assert_eq!(status, 404, "a layer answered as a manifest: {status}");
        assert!(body.contains("MANIFEST_UNKNOWN"), "{body}");
    }
    assert_peak_within_budget(pid, idle, "8 manifest GETs by a 40 MB layer's digest");
    for d in [&small, &config] {
        let r = c
            .get(proxy.url(&format!("/v2/library/layers/manifests/{d}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "blob {d} answered as a manifest");
    }

    // An upstream that answers manifest requests with blob bytes (right digest, no manifest).
    up.lie.store(true, Ordering::SeqCst);
    let big2 = up.add(random_bytes(40 << 20, 1603));
    let small2 = up.add(random_bytes(1000, 1604));
    let reqs = (0..8).map(|_| {
        let c = c.clone();
        let url = proxy.url(&format!("/v2/library/remote/manifests/{big2}"));
        async move { c.get(url).send().await.unwrap().status().as_u16() }
    });
    for status in futures::future::join_all(reqs).await {
        assert_ne!(status, 200, "an upstream's layer answered as a manifest");
    }
    for d in [&small2, &small] {
        let r = c
            .get(proxy.url(&format!("/v2/library/remote/manifests/{d}")))
            .send()
            .await
            .unwrap();
        assert_ne!(
            r.status(),
            200,
            "an upstream's blob {d} answered as a manifest"
        );
    }
    assert_peak_within_budget(pid, idle, "manifest GETs answered with layers upstream");
    health.assert_answered_in_time().await;
}

/// A hostile upstream's tags list: a 100 MB page is not read whole (the proxy stops at its bound
/// and fails the request), and a `Link` to another repository (or host) is not followed, while a
/// `Link` to the next page of the same repository is. A token endpoint that floods is bounded too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_tags_lists_and_tokens_are_bounded() {
    let sent = Arc::new(AtomicU64::new(0));
    let asked: Arc<Mutex<Vec<String>>> = Arc::default();
    let port_cell: Arc<Mutex<u16>> = Arc::default();
    let (s2, a2, p2) = (sent.clone(), asked.clone(), port_cell.clone());
    let port = serve(move |req| {
        let (sent, asked, port) = (s2.clone(), a2.clone(), p2.clone());
        async move {
            let pq = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_default();
            asked.lock().unwrap().push(pq.clone());
            let port = *port.lock().unwrap();
            let path = req.uri().path();
            let authed = req.headers().contains_key("authorization");
            match path {
                "/v2/" => respond(200, "{}"),
                "/v2/library/flood/tags/list" => {
                    let mut r = respond(200, "");
                    *r.body_mut() = flood(
                        r#"{"name":"library/flood","tags":["#,
                        r#""t0123456789abcdef","#,
                        r#""end"]}"#,
                        100 << 20,
                        sent,
                    );
                    r
                }
                "/v2/library/paged/tags/list" => {
                    let (body, link) = match req.uri().query() {
                        None => (
                            r#"{"tags":["a","b"]}"#,
                            "</v2/library/paged/tags/list?last=b&n=2>; rel=\"next\"".to_string(),
                        ),
                        Some("last=b&n=2") => (
                            r#"{"tags":["c"]}"#,
                            "</v2/library/secret/tags/list>; rel=\"next\"".to_string(),
                        ),
                        _ => (r#"{"tags":["unexpected"]}"#, String::new()),
                    };
                    let mut r = respond(200, body);
                    if !link.is_empty() {
                        r.headers_mut().insert("link", link.parse().unwrap());
                    }
                    r
                }
                "/v2/library/elsewhere/tags/list" => {
                    let mut r = respond(200, r#"{"tags":["x"]}"#);
                    let link = format!(
                        "<http://localhost:{port}/v2/library/elsewhere/tags/list?last=x>; rel=\"next\""
                    );
                    r.headers_mut().insert("link", link.parse().unwrap());
                    r
                }
                "/v2/library/secret/tags/list" => respond(200, r#"{"tags":["secret"]}"#),
                "/v2/library/tokenflood/tags/list" if !authed => {
                    let mut r = respond(401, r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#);
                    let ch = format!(
                        r#"Bearer realm="http://127.0.0.1:{port}/token",service="hostile""#
                    );
                    r.headers_mut()
                        .insert("www-authenticate", ch.parse().unwrap());
                    r
                }
                "/v2/library/tokenflood/tags/list" => respond(200, r#"{"tags":["ok"]}"#),
                "/token" => {
                    let mut r = respond(200, "");
                    *r.body_mut() = flood(r#"{"token":""#, "A", r#""}"#, 100 << 20, sent);
                    r
                }
                _ => respond(404, ""),
            }
        }
    })
    .await;
    *port_cell.lock().unwrap() = port;
    let proxy = Proxy::start(&mirror_config(&format!("http://127.0.0.1:{port}"), ""));
    let pid = proxy.child.id();
    let c = client();
    assert_eq!(c.get(proxy.url("/v2/")).send().await.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle = rss_mib(pid);
    let health = HealthWatch::start(proxy.url("/healthz"));

    // Pages of one repository are followed; another repository's or host's are not.
    let tags = |name: &'static str| {
        let c = c.clone();
        let url = proxy.url(&format!("/v2/library/{name}/tags/list"));
        async move {
            let r = c.get(url).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.text().await.unwrap_or_default())
        }
    };
    let (status, body) = tags("paged").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["tags"], serde_json::json!(["a", "b", "c"]), "{body}");
    let (status, body) = tags("elsewhere").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["tags"], serde_json::json!(["x"]), "{body}");
    let seen = asked.lock().unwrap().clone();
    assert!(
        !seen.iter().any(|p| p.contains("/secret/")),
        "another repository's tags list was fetched: {seen:?}"
    );

    // A 100 MB tags list: refused once past the bound, and not read to its end.
    let (status, body) = tags("flood").await;
    assert_ne!(
        status,
        200,
        "a 100 MB tags list was answered: {}",
        body.len()
    );
    assert!(
        sent.load(Ordering::SeqCst) < 48 << 20,
        "the proxy read {} bytes of a flooding tags list",
        sent.load(Ordering::SeqCst)
    );
    assert_peak_within_budget(pid, idle, "a 100 MB tags list upstream");

    // A token endpoint that floods: the request fails, the flood is not read.
    sent.store(0, Ordering::SeqCst);
    let (status, _) = tags("tokenflood").await;
    assert_ne!(status, 200);
    assert!(
        sent.load(Ordering::SeqCst) < 48 << 20,
        "the proxy read {} bytes of a flooding token response",
        sent.load(Ordering::SeqCst)
    );
    assert_peak_within_budget(pid, idle, "a 100 MB token response upstream");
    health.assert_answered_in_time().await;
}

/// An upstream that trickles one byte a second: a manifest and a tags list are given up after
/// the small-request deadline (an error, not an open request), and a blob below the minimum rate
/// fails the fill (no other engine has it here), so the client's response ends broken instead of
/// hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_trickling_upstream_is_given_up() {
    static SLOW: [u8; 4096] = [b' '; 4096];
    let blob = random_bytes(4 << 20, 1605);
    let blob_digest = format!("sha256:{}", sha256_hex(&blob));
    let blob = Bytes::from(blob);
    let port = serve(move |req| {
        let blob = blob.clone();
        async move {
            let path = req.uri().path().to_string();
            if path == "/v2/" {
                return respond(200, "{}");
            }
            if path.contains("/blobs/") {
                // 1 KiB every 200 ms: 5 KiB/s.
                let chunks: Vec<Bytes> = blob.chunks(1024).map(Bytes::copy_from_slice).collect();
                let len = blob.len();
                let s = futures::stream::iter(chunks).then(|c| async move {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper::body::Frame::data(c))
                });
                let mut r = http::Response::new(http_body_util::BodyExt::boxed(
                    http_body_util::StreamBody::new(s),
                ));
                r.headers_mut()
                    .insert(http::header::CONTENT_LENGTH, len.into());
                return r;
            }
            let mut r = respond(200, "");
            *r.body_mut() = trickle(&SLOW, Duration::from_secs(1));
            r.headers_mut()
                .insert(http::header::CONTENT_LENGTH, SLOW.len().into());
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                "application/vnd.oci.image.manifest.v1+json"
                    .parse()
                    .unwrap(),
            );
            r
        }
    })
    .await;
    let proxy = Proxy::start(&mirror_config(&format!("http://127.0.0.1:{port}"), ""));
    let health = HealthWatch::start(proxy.url("/healthz"));
    let c = client();
    let timed = |path: String| {
        let c = c.clone();
        let url = proxy.url(&path);
        async move {
            let t = std::time::Instant::now();
            // Given up at a minute (before the fix, these hung for over an hour).
            let r = tokio::time::timeout(Duration::from_secs(60), async {
                let r = c.get(url).send().await.ok()?;
                let status = r.status().as_u16();
                Some((status, r.bytes().await.is_ok()))
            })
            .await;
            let (status, whole) = r.ok().flatten().unwrap_or((0, false));
            (status, whole, t.elapsed())
        }
    };
    let digest = format!("sha256:{}", "ab".repeat(32));
    let (manifest, tags, blob) = tokio::join!(
        timed(format!("/v2/library/slow/manifests/{digest}")),
        timed("/v2/library/slow/tags/list".into()),
        timed(format!("/v2/library/slow/blobs/{blob_digest}")),
    );
    let bound = Duration::from_secs(40);
    assert!(
        manifest.0 >= 500 && manifest.2 < bound,
        "manifest: {manifest:?}"
    );
    assert!(tags.0 != 200 && tags.2 < bound, "tags list: {tags:?}");
    assert!(
        !(blob.0 == 200 && blob.1) && blob.2 < bound,
        "blob: {blob:?}"
    );
    health.assert_answered_in_time().await;
}

/// Upload sessions: a repository holds at most 64 open sessions (the next `POST` is `429
/// TOOMANYREQUESTS`), and sessions idle for `cache.stale_uploads` are removed even without
/// `cache.max_size`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upload_sessions_are_capped_and_stale_ones_removed() {
    let proxy = Proxy::start(&pushable().cache("stale_uploads", "2s").render());
    let c = client();
    let start = |repo: &'static str| {
        let c = c.clone();
        let url = proxy.url(&format!("/v2/{repo}/blobs/uploads/"));
        async move {
            let r = c.post(url).send().await.unwrap();
            let status = r.status().as_u16();
            let loc = r
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            (status, loc)
        }
    };
    let (status, loc) = start("team/stale").await;
    assert_eq!(status, 202);
    let r = c
        .patch(proxy.url(&loc))
        .header("content-type", "application/octet-stream")
        .body(vec![7u8; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let gone = eventually(Duration::from_secs(30), async || {
        c.get(proxy.url(&loc))
            .send()
            .await
            .is_ok_and(|r| r.status() == 404)
    })
    .await;
    assert!(gone, "a stale upload session stayed");

    drop(proxy);

    // The caps, on a proxy that cleans nothing meanwhile.
    let proxy = Proxy::start(&pushable().cache("stale_uploads", "24h").render());
    let start = |repo: &'static str| {
        let c = c.clone();
        let url = proxy.url(&format!("/v2/{repo}/blobs/uploads/"));
        async move {
            let r = c.post(url).send().await.unwrap();
            let loc = r
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            (r.status().as_u16(), loc)
        }
    };
    let mut statuses = Vec::new();
    let mut locations = Vec::new();
    for _ in 0..65 {
        let (status, loc) = start("team/many").await;
        statuses.push(status);
        locations.push(loc);
    }
    assert!(statuses[..64].iter().all(|s| *s == 202), "{statuses:?}");
    assert_eq!(statuses[64], 429, "the 65th session of one repository");
    // The same client is at its own cap in another repository too, until it cancels one.
    assert_eq!(
        start("team/other").await.0,
        429,
        "the client's 65th session"
    );
    let r = c.delete(proxy.url(&locations[0])).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(start("team/other").await.0, 202);
}

/// HTTP/2 clients that open their streams with `SETTINGS_INITIAL_WINDOW_SIZE=0` and never send
/// `WINDOW_UPDATE` (while answering pings): 4 connections × 256 streams of a 40 MB local blob on
/// the plain port's h2 must not pin read-ahead per stalled stream, and the connections are
/// dropped after `limits.send_timeout` (the requests are in progress: no idle timeout fires).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http2_clients_with_closed_windows_pin_no_memory() {
    let up = BlobsAsManifests::default();
    let big = up.add(random_bytes(40 << 20, 1607));
    let port = up.start().await;
    let proxy = Proxy::start(
        &Config::mirror(&format!("http://127.0.0.1:{port}"))
            .limits("send_timeout", "4s")
            .render(),
    );
    let pid = proxy.child.id();
    let c = client();
    let path = format!("/v2/library/h2/blobs/{big}");
    let r = c.get(proxy.url(&path)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let stored = proxy.blob_path(&big);
    assert!(eventually(Duration::from_secs(30), async || stored.exists()).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle = rss_mib(pid);
    let health = HealthWatch::start(proxy.url("/healthz"));

    let mut held = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..4 {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
            .await
            .unwrap();
        let (mut h2c, conn) = h2::client::Builder::new()
            .initial_window_size(0)
            .handshake::<_, Bytes>(tcp)
            .await
            .expect("h2 handshake");
        conns.push(tokio::spawn(conn));
        let mut streams = Vec::new();
        for _ in 0..256 {
            let req = http::Request::get(format!("http://127.0.0.1:{}{path}", proxy.port))
                .body(())
                .unwrap();
            let Ok(ready) = h2c.clone().ready().await else {
                break;
            };
            h2c = ready;
            match h2c.send_request(req, true) {
                Ok((resp, _)) => streams.push(resp),
                Err(_) => break,
            }
        }
        held.push((h2c, streams));
    }
    // Let the server do whatever read-ahead it does.
    let mut peak = 0;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss_mib(pid));
    }
    let opened: usize = held.iter().map(|(_, s)| s.len()).sum();
    assert!(opened >= 256, "only {opened} streams opened");
    assert_peak_within_budget(pid, idle, "HTTP/2 streams with closed windows");
    health.assert_answered_in_time().await;
    let closed =
        tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(conns)).await;
    assert!(
        closed.is_ok(),
        "stalled HTTP/2 connections stayed open past send_timeout"
    );
    drop(held);
    eprintln!("peak RSS while stalled: {peak} MiB (idle {idle} MiB)");
}

/// A client that stops reading a 40 MB blob (plain front, and plain-port HTTP/2 alike) loses
/// its connection after `limits.send_timeout`: asked to read again later, it gets far less than
/// the blob, where it used to get all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_stops_reading_loses_its_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = BlobsAsManifests::default();
    let big = up.add(random_bytes(40 << 20, 1608));
    let port = up.start().await;
    let proxy = Proxy::start(
        &Config::mirror(&format!("http://127.0.0.1:{port}"))
            .limits("send_timeout", "2s")
            .render(),
    );
    let c = client();
    let path = format!("/v2/library/slowreader/blobs/{big}");
    let r = c.get(proxy.url(&path)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    let stored = proxy.blob_path(&big);
    assert!(eventually(Duration::from_secs(30), async || stored.exists()).await);
    let health = HealthWatch::start(proxy.url("/healthz"));

    // Small receive buffer, so that the window closes early.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(64 << 10).unwrap();
    let mut s = sock
        .connect(format!("127.0.0.1:{}", proxy.port).parse().unwrap())
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let mut got = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let read_all = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n as u64,
            }
        }
    })
    .await;
    assert!(
        read_all.is_ok(),
        "the connection was still open after a minute"
    );
    assert!(
        got < 40 << 20,
        "a client that stopped reading for 8s got the whole blob ({got} bytes)"
    );
    health.assert_answered_in_time().await;
}

/// A push whose body never ends (it trickles a byte every 200 ms) fails once below the minimum
/// rate, instead of holding its connection and upload session for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_that_never_ends_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let proxy = Proxy::start(&pushable().render());
    let c = client();
    let r = c
        .post(proxy.url("/v2/team/trickle/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .unwrap();
    s.write_all(
        format!(
            "PATCH {loc} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: 10000000\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let t = std::time::Instant::now();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            tokio::select! {
                r = s.read(&mut buf) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        answer.extend_from_slice(&buf[..n]);
                        if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                },
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    if s.write_all(b"x").await.is_err() {
                        break;
                    }
                }
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "a trickled body held the request for a minute"
    );
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 4"),
        "answered: {text}"
    );
    assert!(t.elapsed() < Duration::from_secs(40), "{:?}", t.elapsed());
}

/// With every slot of `limits.max_connections` held, `/healthz`, `/readyz` and `/metrics` still
/// answer at once (a load balancer must not take a healthy node out), while other requests wait
/// for a slot as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_answers_at_the_connection_cap() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let proxy = Proxy::start(
        &Config::mirror("http://127.0.0.1:9")
            .limits("max_connections", "4")
            .render(),
    );
    // Four kept-alive connections, idle after one request each: every slot is held.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
            .await
            .unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }
    let quick = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    for path in ["/healthz", "/readyz", "/metrics", "/healthz"] {
        let t = std::time::Instant::now();
        let r = quick.get(proxy.url(path)).send().await;
        assert!(
            r.as_ref().is_ok_and(|r| r.status().is_success()),
            "{path} at the connection cap: {r:?}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "{path}: {:?}",
            t.elapsed()
        );
    }
    // Anything else waits for a slot, and gets one when a connection goes.
    let waiting = tokio::spawn({
        let url = proxy.url("/v2/");
        async move {
            let c = reqwest::Client::builder().no_proxy().build().unwrap();
            c.get(url).send().await.map(|r| r.status().as_u16())
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "a request was served beyond the cap"
    );
    drop(held.pop());
    let status = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("served once a slot was free")
        .unwrap()
        .unwrap();
    assert_eq!(status, 200);
}

/// A proxy that takes pushes into a `file://` engine, no upstream.
fn pushable() -> Config {
    Config::local("eu", "file://{DIR}/data")
        .region("eu")
        .push("eu")
}
