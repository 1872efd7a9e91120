//! The plain HTTP/1.1 front: bodiless GET/HEAD answered without hyper (local blobs by
//! `sendfile`), pipelined requests answered in order, HTTP/1.0 keep-alive rules, and the hand-off
//! to hyper (a request with a body, HTTP/2 prior knowledge) on the same connection.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One response read off a raw connection: status, lower-cased headers, body.
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// See [`common::assert_oci_error`].
    fn assert_oci_error(&self, status: u16, code: &str, what: &str) -> serde_json::Value {
        assert_oci_error_parts(
            self.status,
            self.header("content-type"),
            &self.body,
            status,
            code,
            what,
        )
    }
}

/// Reads one response from `s` (`buf` keeps what was read past it). Bodies are delimited by
/// `content-length` (none for `head`).
async fn read_resp(s: &mut TcpStream, buf: &mut Vec<u8>, head: bool) -> Resp {
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 65536];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("response in time")
            .expect("read");
        assert!(n > 0, "connection closed before a response head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let text = String::from_utf8(buf[..end].to_vec()).expect("ascii head");
    let mut lines = text.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
        .collect();
    buf.drain(..end);
    let len: usize = if head {
        0
    } else {
        headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .map(|(_, v)| v.parse().expect("length"))
            .unwrap_or(0)
    };
    while buf.len() < len {
        let mut chunk = vec![0u8; 1 << 20];
        let n = s.read(&mut chunk).await.expect("read body");
        assert!(n > 0, "connection closed inside a body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf.drain(..len).collect();
    Resp {
        status,
        headers,
        body,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, skopeo"]
async fn plain_http1_front_pipelines_sends_files_and_hands_off_to_hyper() {
    let origin = Origin::start();
    origin.push(&[("small-1.0", "library/small:1.0", false)]);
    let proxy = Proxy::start(&mirror_config(&origin.url(), ""));
    let c = client();
    let (digest, size) = largest_layer(&proxy, "library/small", SMALL).await;
    let size = size as usize;
    // Fill the local engine, then every read below is a local file hit.
    let full = c
        .get(proxy.url(&format!("/v2/library/small/blobs/{digest}")))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(format!("sha256:{}", sha256_hex(&full)), digest);
    let path = proxy.blob_path(&digest);
    assert!(
        eventually(Duration::from_secs(10), async || path.exists()).await,
        "blob committed"
    );

    // Three pipelined requests in one write: a range, a HEAD, the whole blob.
    let mut s = TcpStream::connect(proxy.host()).await.unwrap();
    let blob = format!("/v2/library/small/blobs/{digest}");
    let reqs = format!(
        "GET {blob} HTTP/1.1\r\nHost: x\r\nRange: bytes=10-19\r\n\r\n\
         HEAD {blob} HTTP/1.1\r\nHost: x\r\n\r\n\
         GET {blob} HTTP/1.1\r\nHost: x\r\n\r\n"
    );
    s.write_all(reqs.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let r = read_resp(&mut s, &mut buf, false).await;
    assert_eq!(r.status, 206);
    assert_eq!(r.body, full[10..20]);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes 10-19/{size}").as_str())
    );
    assert_eq!(r.header("x-ociedge-source"), Some("local"));
    let r = read_resp(&mut s, &mut buf, true).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some(size.to_string().as_str()));
    assert!(r.header("date").is_some(), "a date on every answer");
    let r = read_resp(&mut s, &mut buf, false).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), size);
    assert!(r.body == full, "sendfile sent the blob's bytes");

    // A request with a body on the same connection goes to hyper, and the connection stays
    // usable (hyper now serves it).
    s.write_all(
        b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n\
          Content-Length: 5\r\n\r\na=b&c",
    )
    .await
    .unwrap();
    let r = read_resp(&mut s, &mut buf, false).await;
    r.assert_oci_error(404, "UNSUPPORTED", "no auth: section, no token endpoint");
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let r = read_resp(&mut s, &mut buf, false).await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"{}"[..]));

    // HTTP/1.0: closed after the answer unless keep-alive is asked for.
    let mut s = TcpStream::connect(proxy.host()).await.unwrap();
    s.write_all(b"GET /v2/ HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let r = read_resp(&mut s, &mut buf, false).await;
    assert_eq!(r.header("connection"), Some("keep-alive"));
    s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n").await.unwrap();
    let r = read_resp(&mut s, &mut buf, false).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .unwrap();
    assert_eq!(n, 0, "nothing after the answer, then EOF");

    // An error answer keeps its OCI body and the connection.
    let mut s = TcpStream::connect(proxy.host()).await.unwrap();
    s.write_all(b"GET /v2/library/small/blobs/sha256:abc HTTP/1.1\r\nHost: x\r\n\r\nGET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let r = read_resp(&mut s, &mut buf, false).await;
    r.assert_oci_error(400, "DIGEST_INVALID", "a bad digest");
    assert_eq!(read_resp(&mut s, &mut buf, false).await.status, 200);

    // HTTP/2 prior knowledge on the plain port: hyper's, file bodies read in chunks.
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2.get(proxy.url(&blob)).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap() == full);

    // Bytes sent by sendfile are counted like the others: three whole blobs and a range here,
    // two whole blobs and the range outside the fill.
    let metrics = get_text(proxy.url("/metrics")).await;
    let local: u64 = metrics
        .lines()
        .find(|l| l.starts_with("ociedge_bytes_served_total{source=\"local\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("bytes served from local");
    assert!(
        local >= (2 * size + 10) as u64,
        "{local} bytes counted for two local blobs and a range"
    );
}

/// A pushable proxy with no upstream: a `file://` engine that takes pushes.
fn push_only_config(root: &std::path::Path) -> String {
    common::config::Config::local("eu", &format!("file://{}/eu", root.display()))
        .push("eu")
        .render()
}

/// Pushes an OCI image manifest of `config` and `layer` under `reference`: its digest.
async fn put_manifest(
    base: &str,
    repo: &str,
    reference: &str,
    config: &str,
    layer: &str,
) -> String {
    let m = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2 },
        "layers": [ { "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": 5000 } ],
    })
    .to_string();
    let r = client()
        .put(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(m.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "manifest pushed");
    format!("sha256:{}", sha256_hex(m.as_bytes()))
}

/// The value of the `ociedge_http_requests_total` series of `route`, `method`, `status`.
async fn requests_counted(proxy: &Proxy, route: &str, method: &str, status: u16) -> u64 {
    let want = format!(
        "ociedge_http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} "
    );
    get_text(proxy.url("/metrics"))
        .await
        .lines()
        .find_map(|l| l.strip_prefix(want.as_str()))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Small answers (blob HEADs, manifests) are kept in memory for a tenth of a second: repeated
/// requests get the same answer with their own request id and date, every one is counted, and
/// a write (a tag pushed again, a tag, a manifest or a blob deleted) is seen by the very next
/// request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn small_answers_come_from_memory_and_a_write_is_seen_at_once() {
    let root = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&push_only_config(root.path()));
    let base = proxy.url("");
    let config = push_blob(&base, "t/app", b"{}".to_vec()).await;
    let layer = push_blob(&base, "t/app", random_bytes(5000, 3)).await;
    let other = push_blob(&base, "t/app", random_bytes(5000, 4)).await;
    let first = put_manifest(&base, "t/app", "v1", &config, &layer).await;

    let mut s = TcpStream::connect(proxy.host()).await.unwrap();
    let mut buf = Vec::new();
    let accept = "Accept: application/vnd.oci.image.manifest.v1+json\r\n";
    // Pipelined, so the later ones come from memory: two HEADs of a blob, three GETs by tag
    // (one with the client's request id), one GET by digest with If-None-Match.
    let blob = format!("/v2/t/app/blobs/{layer}");
    let tag = "/v2/t/app/manifests/v1";
    let reqs = format!(
        "HEAD {blob} HTTP/1.1\r\nHost: x\r\n\r\n\
         HEAD {blob} HTTP/1.1\r\nHost: x\r\n\r\n\
         GET {tag} HTTP/1.1\r\nHost: x\r\n{accept}\r\n\
         GET {tag} HTTP/1.1\r\nHost: x\r\n{accept}\r\n\
         GET {tag} HTTP/1.1\r\nHost: x\r\n{accept}X-Request-Id: mine-1\r\n\r\n\
         GET /v2/t/app/manifests/{first} HTTP/1.1\r\nHost: x\r\n{accept}If-None-Match: \"{first}\"\r\n\r\n"
    );
    s.write_all(reqs.as_bytes()).await.unwrap();
    let same = |a: &Resp, b: &Resp| {
        let strip = |r: &Resp| {
            r.headers
                .iter()
                .filter(|(k, _)| k != "x-request-id" && k != "date")
                .cloned()
                .collect::<Vec<_>>()
        };
        a.status == b.status && strip(a) == strip(b) && a.body == b.body
    };
    let h1 = read_resp(&mut s, &mut buf, true).await;
    let h2 = read_resp(&mut s, &mut buf, true).await;
    assert_eq!(h1.status, 200);
    assert_eq!(h1.header("content-length"), Some("5000"));
    assert_eq!(h1.header("docker-content-digest"), Some(layer.as_str()));
    assert!(same(&h1, &h2), "{:?} / {:?}", h1.headers, h2.headers);
    assert_ne!(h1.header("x-request-id"), h2.header("x-request-id"));
    assert!(h2.header("date").is_some());
    let g1 = read_resp(&mut s, &mut buf, false).await;
    let g2 = read_resp(&mut s, &mut buf, false).await;
    let g3 = read_resp(&mut s, &mut buf, false).await;
    assert_eq!(g1.status, 200);
    assert_eq!(g1.header("docker-content-digest"), Some(first.as_str()));
    assert_eq!(format!("sha256:{}", sha256_hex(&g1.body)), first);
    assert!(same(&g1, &g2) && same(&g1, &g3));
    assert_eq!(g3.header("x-request-id"), Some("mine-1"));
    let conditional = read_resp(&mut s, &mut buf, true).await;
    assert_eq!(
        conditional.status, 304,
        "If-None-Match is never answered from memory"
    );

    // The tag moves: the next request sees it, on the same connection, at once.
    let second = put_manifest(&base, "t/app", "v1", &config, &other).await;
    s.write_all(format!("GET {tag} HTTP/1.1\r\nHost: x\r\n{accept}\r\n").as_bytes())
        .await
        .unwrap();
    let moved = read_resp(&mut s, &mut buf, false).await;
    assert_eq!(moved.header("docker-content-digest"), Some(second.as_str()));

    // Answers by digest come from memory too; the tag, deleted, is unknown at the next request.
    let by_digest = format!("GET /v2/t/app/manifests/{second} HTTP/1.1\r\nHost: x\r\n{accept}\r\n");
    s.write_all(by_digest.repeat(2).as_bytes()).await.unwrap();
    let d1 = read_resp(&mut s, &mut buf, false).await;
    let d2 = read_resp(&mut s, &mut buf, false).await;
    assert_eq!(d1.status, 200);
    assert!(same(&d1, &d2));
    let r = client().delete(proxy.url(tag)).send().await.unwrap();
    assert_eq!(r.status(), 202);
    s.write_all(format!("GET {tag} HTTP/1.1\r\nHost: x\r\n{accept}\r\n").as_bytes())
        .await
        .unwrap();
    let gone = read_resp(&mut s, &mut buf, false).await;
    assert_eq!(gone.status, 404, "a deleted tag is not served from memory");

    // Deleted by digest, a manifest and a blob are unknown in the repository at once (their
    // bytes may stay in the store), whether their answers were in memory or not.
    let r = client()
        .delete(proxy.url(&format!("/v2/t/app/manifests/{second}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let head_other = format!("HEAD /v2/t/app/blobs/{other} HTTP/1.1\r\nHost: x\r\n\r\n");
    s.write_all(format!("{by_digest}{head_other}{head_other}").as_bytes())
        .await
        .unwrap();
    let gone = read_resp(&mut s, &mut buf, false).await;
    assert_eq!(gone.status, 404, "a manifest deleted by digest is unknown");
    for _ in 0..2 {
        assert_eq!(read_resp(&mut s, &mut buf, true).await.status, 200);
    }
    let r = client()
        .delete(proxy.url(&format!("/v2/t/app/blobs/{other}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    s.write_all(head_other.as_bytes()).await.unwrap();
    assert_eq!(
        read_resp(&mut s, &mut buf, true).await.status,
        404,
        "a deleted blob is unknown"
    );

    // Every answer was counted, from memory or not: four GETs by tag, four HEADs of blobs.
    assert_eq!(
        requests_counted(&proxy, "manifest_tag", "GET", 200).await,
        4
    );
    assert_eq!(requests_counted(&proxy, "blob", "HEAD", 200).await, 4);
    assert_eq!(
        requests_counted(&proxy, "manifest_digest", "GET", 200).await,
        2
    );
}
