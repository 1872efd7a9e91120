//! Nothing ociedge serves runs as a page on its origin: only manifest media types are accepted,
//! stored and served as manifests (from a push, an upstream or storage written by another
//! process), and every API response says `nosniff` with a `Content-Security-Policy` of none.

mod common;

use bytes::Bytes;
use common::fake::{full, serve, Body};
use common::*;

const HTML_MANIFEST: &str = r#"{"schemaVersion":2,"mediaType":"text/html","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[],"annotations":{"x":"<script>alert(document.domain)</script>"}}"#;

fn registry_config() -> String {
    "listen: 127.0.0.1:{PORT}\nstorage:\n  preference: eu\n  engines:\n    eu: { url: \"file://{DIR}/data\" }\npush: { engine: eu }\n".to_string()
}

fn assert_not_a_page(r: &reqwest::Response, what: &str) {
    let h = r.headers();
    assert_eq!(h["x-content-type-options"], "nosniff", "{what}");
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'"), "{what}: {csp}");
    let ct = h
        .get("content-type")
        .map(|v| v.to_str().unwrap_or_default())
        .unwrap_or_default();
    assert!(!ct.contains("html"), "{what}: served as {ct}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pushed_manifest_of_another_type_is_refused() {
    let p = Proxy::start(&registry_config());
    let c = client();
    for (ct, body) in [
        ("text/html", HTML_MANIFEST.to_string()),
        (
            "text/html",
            HTML_MANIFEST.replace(r#""mediaType":"text/html","#, ""),
        ),
        (
            "application/vnd.oci.image.manifest.v1+json",
            HTML_MANIFEST.replace(
                "text/html",
                "application/vnd.oci.image.manifest.v1+json\",\"x\":\"",
            ),
        ),
    ] {
        let r = c
            .put(p.url("/v2/site/page/manifests/x"))
            .header("content-type", ct)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        assert_not_a_page(&r, "push refusal");
        let v: serde_json::Value = r.json().await.unwrap_or_default();
        // The third is a valid type whose config blob is missing: refused for that instead.
        assert_eq!(status, 400, "{ct} {body}");
        let code = v["errors"][0]["code"].as_str().unwrap_or_default();
        assert!(
            code == "MANIFEST_INVALID" || code == "MANIFEST_BLOB_UNKNOWN",
            "{code}"
        );
    }
    // Every API response, the base and the errors included, on both visits (the second may be
    // answered from the plain front's memo).
    for path in [
        "/v2/",
        "/v2/site/page/manifests/x",
        "/v2/site/page/tags/list",
        "/healthz",
    ] {
        for _ in 0..2 {
            let r = c.get(p.url(path)).send().await.unwrap();
            assert_not_a_page(&r, path);
        }
    }
}

/// An upstream that answers manifests as `text/html`: with a manifest type in the body (the
/// type is taken from the body) and with `text/html` in the body too (refused).
async fn html_upstream() -> u16 {
    serve(|req: http::Request<hyper::body::Incoming>| async move {
        let path = req.uri().path().to_string();
        let ok_body =
            HTML_MANIFEST.replace("text/html", "application/vnd.oci.image.manifest.v1+json");
        let body = if path == "/v2/" {
            "{}".to_string()
        } else if path.contains("/evil/manifests/") {
            HTML_MANIFEST.to_string()
        } else if path.contains("/typed/manifests/") {
            ok_body
        } else {
            let mut r = http::Response::new(full(Bytes::new()));
            *r.status_mut() = http::StatusCode::NOT_FOUND;
            return r;
        };
        let digest = format!("sha256:{}", sha256_hex(body.as_bytes()));
        let len = body.len();
        let mut r: http::Response<Body> = http::Response::new(full(body));
        let h = r.headers_mut();
        h.insert("content-type", "text/html".parse().unwrap());
        h.insert("docker-content-digest", digest.parse().unwrap());
        h.insert("content-length", len.into());
        r
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_manifest_served_as_a_page_is_not_passed_on() {
    let port = html_upstream().await;
    let p = Proxy::start(&mirror_config(&format!("http://127.0.0.1:{port}"), ""));
    let c = client();
    for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
        let r = c
            .request(method.clone(), p.url("/v2/lib/evil/manifests/1"))
            .send()
            .await
            .unwrap();
        assert_not_a_page(&r, "evil");
        assert_ne!(r.status(), 200, "{method}");
        let r = c
            .request(method.clone(), p.url("/v2/lib/typed/manifests/1"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{method}");
        assert_eq!(
            r.headers()["content-type"],
            "application/vnd.oci.image.manifest.v1+json"
        );
        assert_not_a_page(&r, "typed");
    }
}

/// Another writer on the storage left a "manifest" of type `text/html` (and a layer's digest
/// names no manifest): neither is answered as a manifest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stored_content_of_another_type_is_not_answered_as_a_manifest() {
    let p = Proxy::start(&registry_config());
    let hex = sha256_hex(HTML_MANIFEST.as_bytes());
    let v2 = p.data().join("docker/registry/v2");
    let blob = v2.join(format!("blobs/sha256/{}/{hex}/data", &hex[..2]));
    std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
    std::fs::write(&blob, HTML_MANIFEST).unwrap();
    let link = v2.join(format!(
        "repositories/site/page/_manifests/revisions/sha256/{hex}/link"
    ));
    std::fs::create_dir_all(link.parent().unwrap()).unwrap();
    std::fs::write(&link, format!("sha256:{hex}")).unwrap();
    let tag = v2.join("repositories/site/page/_manifests/tags/x/current/link");
    std::fs::create_dir_all(tag.parent().unwrap()).unwrap();
    std::fs::write(&tag, format!("sha256:{hex}")).unwrap();
    let c = client();
    for path in [
        format!("/v2/site/page/manifests/sha256:{hex}"),
        "/v2/site/page/manifests/x".to_string(),
    ] {
        let r = c.get(p.url(&path)).send().await.unwrap();
        assert_not_a_page(&r, &path);
        assert_eq!(r.status(), 404, "{path}");
    }
}
