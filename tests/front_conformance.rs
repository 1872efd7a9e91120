//! The two fronts answer alike: the plain HTTP/1.1 front (`fast.rs`, with its own head writer)
//! and the TLS front (hyper) get the same raw requests — heads, conditionals, ranges, malformed
//! heads — and must answer with the same status and the same headers (date and request id
//! aside). Also what HTTP says of the cases where they differed: a `304` carries no
//! `Content-Length`, `If-None-Match: *` is `304` only for content that exists, a `Range` in
//! another unit than `bytes` is ignored.

mod common;

use std::sync::Arc;

use common::fake::FakeUpstream;
use common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Status and headers (lower-case names, sorted; `date` and `x-request-id` left out).
type Head = (u16, Vec<(String, String)>);

async fn head_of<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, req: &str) -> Head {
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    resp.parse(&buf).expect("a response head");
    let status = resp.code.expect("status");
    let mut hs: Vec<(String, String)> = resp
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .filter(|(n, _)| n != "date" && n != "x-request-id")
        .collect();
    hs.sort();
    (status, hs)
}

struct Fronts {
    plain: u16,
    tls: u16,
    connector: tokio_rustls::TlsConnector,
}

impl Fronts {
    async fn plain(&self, req: &str) -> Head {
        let s = tokio::net::TcpStream::connect(("127.0.0.1", self.plain))
            .await
            .expect("connect");
        head_of(s, req).await
    }

    async fn tls(&self, req: &str) -> Head {
        let s = tokio::net::TcpStream::connect(("127.0.0.1", self.tls))
            .await
            .expect("connect");
        let name =
            rustls::pki_types::ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into());
        let s = self.connector.connect(name, s).await.expect("TLS");
        head_of(s, req).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_plain_and_tls_fronts_answer_alike() {
    let up = FakeUpstream::default();
    let data = random_bytes(100_000, 1606);
    let digest = format!("sha256:{}", sha256_hex(&data));
    up.blobs
        .lock()
        .unwrap()
        .insert(digest.clone(), data.clone().into());
    let port = up.start().await;

    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    std::fs::write(dir.path().join("tls.crt"), cert.cert.pem()).unwrap();
    std::fs::write(dir.path().join("tls.key"), cert.signing_key.serialize_pem()).unwrap();
    let plain = free_port();
    let tls = format!(
        "tls: {{ cert: \"{{DIR}}/tls.crt\", key: \"{{DIR}}/tls.key\", plain_listen: 127.0.0.1:{plain} }}\n"
    );
    let proxy = Proxy::start_in(
        &mirror_config(&format!("http://127.0.0.1:{port}"), &tls),
        dir,
    );
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let fronts = Fronts {
        plain,
        tls: proxy.port,
        connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
    };
    let ready = eventually(std::time::Duration::from_secs(20), async || {
        std::net::TcpStream::connect(("127.0.0.1", plain)).is_ok()
    })
    .await;
    assert!(ready, "plain listener");

    // The blob is local first (both fronts answer from the local engine).
    let path = format!("/v2/library/conf/blobs/{digest}");
    let (status, _) = fronts
        .plain(&format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        ))
        .await;
    assert_eq!(status, 200);
    let stored = proxy.blob_path(&digest);
    assert!(
        eventually(std::time::Duration::from_secs(20), async || stored.exists()).await,
        "blob stored"
    );

    let unknown = format!("sha256:{}", "cd".repeat(32));
    let etag = format!("\"{digest}\"");
    let cases: Vec<(&str, String, String, Option<u16>)> = vec![
        // (what, request line, extra headers, the status HTTP asks for, where it matters)
        ("HEAD", format!("HEAD {path}"), String::new(), Some(200)),
        ("GET", format!("GET {path}"), String::new(), Some(200)),
        (
            "If-None-Match etag",
            format!("GET {path}"),
            format!("If-None-Match: {etag}\r\n"),
            Some(304),
        ),
        (
            "If-None-Match * (exists)",
            format!("GET {path}"),
            "If-None-Match: *\r\n".into(),
            Some(304),
        ),
        (
            "If-None-Match * (unknown)",
            format!("GET /v2/library/conf/blobs/{unknown}"),
            "If-None-Match: *\r\n".into(),
            Some(404),
        ),
        (
            "HEAD If-None-Match etag",
            format!("HEAD {path}"),
            format!("If-None-Match: {etag}\r\n"),
            Some(304),
        ),
        (
            "Range",
            format!("GET {path}"),
            "Range: bytes=10-19\r\n".into(),
            Some(206),
        ),
        (
            "Range suffix",
            format!("GET {path}"),
            "Range: bytes=-5\r\n".into(),
            Some(206),
        ),
        (
            "Range other unit",
            format!("GET {path}"),
            "Range: items=0-9\r\n".into(),
            Some(200),
        ),
        (
            "Range past the end",
            format!("GET {path}"),
            "Range: bytes=999999-\r\n".into(),
            Some(416),
        ),
        (
            "Range malformed",
            format!("GET {path}"),
            "Range: bytes=x-y\r\n".into(),
            Some(416),
        ),
        (
            "If-Range other",
            format!("GET {path}"),
            "Range: bytes=0-9\r\nIf-Range: \"sha256:other\"\r\n".into(),
            Some(200),
        ),
        (
            "HEAD unknown",
            format!("HEAD /v2/library/conf/blobs/{unknown}"),
            String::new(),
            Some(404),
        ),
        (
            "bad digest",
            "GET /v2/library/conf/blobs/sha256:zz".into(),
            String::new(),
            None,
        ),
        (
            "bad name",
            format!("GET /v2/Library/../conf/blobs/{digest}"),
            String::new(),
            None,
        ),
        ("base", "GET /v2/".into(), String::new(), Some(200)),
        ("healthz", "GET /healthz".into(), String::new(), Some(200)),
        (
            "HEAD healthz",
            "HEAD /healthz".into(),
            String::new(),
            Some(200),
        ),
    ];
    let mut wrong = Vec::new();
    for (what, line, extra, want) in &cases {
        let req = format!("{line} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n");
        let p = fronts.plain(&req).await;
        let t = fronts.tls(&req).await;
        if p != t {
            wrong.push(format!("{what}: plain {p:?}\n  tls {t:?}"));
        }
        if let Some(w) = want {
            if p.0 != *w || t.0 != *w {
                wrong.push(format!("{what}: want {w}, plain {} tls {}", p.0, t.0));
            }
        }
        if p.0 == 304
            && p.1
                .iter()
                .chain(&t.1)
                .any(|(n, _)| n == "content-length" || n == "transfer-encoding")
        {
            wrong.push(format!("{what}: a 304 with a length: {p:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
