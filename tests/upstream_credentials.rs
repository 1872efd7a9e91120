//! Upstream credentials go only where they belong (issue 15, section 3): a hostile upstream on
//! loopback answers `401` with a token realm on another origin, and a token server there records
//! whether it was sent `Authorization`. It never is, unless its origin is listed in
//! `upstreams[].auth.realms`; blob downloads redirected to another host carry no credentials.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use common::config::{Auth, Config, Upstream};
use common::fake::{full, Body};
use common::{assert_oci_error, client, eventually, sha256_hex, Proxy};

fn resp(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r
}

/// [`common::fake::serve_on`] with an answer made at once: serves `handler` on `ip`:0 until the
/// test's runtime ends; returns the port.
async fn serve<F>(ip: &str, handler: F) -> u16
where
    F: Fn(Request<Incoming>) -> Response<Body> + Clone + Send + Sync + 'static,
{
    common::fake::serve_on(ip, move |req| std::future::ready(handler(req))).await
}

/// A mirror of the upstream on `port` with the credentials `bot:s3cret`, which may go to the
/// token services of `realms`; `access: public`.
fn bot(port: u16, realms: &[&str]) -> Config {
    Config::mirror_of(
        Upstream::new("docker.io", &format!("http://127.0.0.1:{port}"))
            .credentials("bot", "s3cret")
            .realms(realms)
            .access("public"),
    )
}

/// What a recording server saw: each request's path and `Authorization` header.
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

fn record(seen: &Seen, req: &Request<Incoming>) {
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    seen.lock()
        .expect("lock")
        .push((req.uri().path().to_string(), auth));
}

/// A token server on `ip`: records every request and hands out the token `good` to requests
/// with credentials, `anonymous` to the others.
async fn token_server(ip: &str) -> (u16, Seen) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let port = serve(ip, move |req| {
        record(&s, &req);
        let token = if req.headers().contains_key("authorization") {
            "good"
        } else {
            "anonymous"
        };
        resp(
            StatusCode::OK,
            format!(r#"{{"token":"{token}","expires_in":300}}"#),
        )
    })
    .await;
    (port, seen)
}

/// An upstream registry that demands the Bearer token `good` from `realm`. With it, a blob GET
/// is redirected to `cdn` (`{cdn}/<digest>`), everything else is `404`.
async fn upstream(realm: String, cdn: Option<String>) -> u16 {
    serve("127.0.0.1", move |req| {
        let authed = req
            .headers()
            .get("authorization")
            .is_some_and(|v| v == "Bearer good");
        if !authed {
            let mut r = resp(
                StatusCode::UNAUTHORIZED,
                r#"{"errors":[{"code":"UNAUTHORIZED","message":"token required"}]}"#,
            );
            let ch = format!(r#"Bearer realm="{realm}",service="hostile""#);
            r.headers_mut()
                .insert("www-authenticate", ch.parse().expect("hv"));
            return r;
        }
        let path = req.uri().path();
        match (&cdn, path.rfind("/blobs/")) {
            (Some(cdn), Some(i)) => {
                let mut r = resp(StatusCode::TEMPORARY_REDIRECT, "");
                let to = format!("{cdn}/{}", &path[i + 7..]);
                r.headers_mut().insert("location", to.parse().expect("hv"));
                r
            }
            _ => resp(
                StatusCode::NOT_FOUND,
                r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"x"}]}"#,
            ),
        }
    })
    .await
}

fn basic(user_pass: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(user_pass)
    )
}

/// Pulls a manifest through `p`, then waits until the token server saw a request.
async fn pull_until_token_asked(p: &Proxy, path: &str, creds: Option<&str>, seen: &Seen) {
    let asked = eventually(Duration::from_secs(20), async || {
        let mut rb = client().get(p.url(path));
        if let Some(c) = creds {
            rb = rb.header("authorization", basic(c));
        }
        let _ = rb.send().await;
        !seen.lock().expect("lock").is_empty()
    })
    .await;
    assert!(asked, "the token server was never asked: {}", p.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_realm_on_another_origin_never_gets_the_upstreams_credentials() {
    let (tport, seen) = token_server("127.0.0.1").await;
    let up = upstream(format!("http://127.0.0.1:{tport}/token"), None).await;
    let p = Proxy::start(&bot(up, &[]).render());
    pull_until_token_asked(&p, "/v2/library/app/manifests/1", None, &seen).await;
    // Another repository, another scope: still no credentials; the refusal says why.
    let r = client()
        .get(p.url("/v2/library/other/manifests/2"))
        .send()
        .await
        .expect("GET");
    let v = assert_oci_error(r, 403, "DENIED").await;
    assert!(v.to_string().contains("upstreams[].auth.realms"), "{v}");
    let seen = seen.lock().expect("lock").clone();
    assert!(
        seen.iter().all(|(_, a)| a.is_none()),
        "the foreign realm received credentials: {seen:?}"
    );
    assert!(
        p.log().contains("anonymous token"),
        "the refusal is logged: {}",
        p.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_realm_gets_the_upstreams_credentials() {
    let (tport, seen) = token_server("127.0.0.1").await;
    let up = upstream(format!("http://127.0.0.1:{tport}/token"), None).await;
    let p = Proxy::start(&bot(up, &[&format!("http://127.0.0.1:{tport}")]).render());
    pull_until_token_asked(&p, "/v2/library/app/manifests/1", None, &seen).await;
    let seen = seen.lock().expect("lock").clone();
    assert!(
        seen.iter()
            .all(|(_, a)| a.as_deref() == Some(basic("bot:s3cret").as_str())),
        "a listed realm gets the credentials: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passthrough_clients_password_never_goes_to_a_foreign_realm() {
    let (tport, seen) = token_server("127.0.0.1").await;
    let up = upstream(format!("http://127.0.0.1:{tport}/token"), None).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let key = rcgen::KeyPair::generate().expect("key");
    let key_path = dir.path().join("token.pem");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    let cfg = Config::mirror_of(
        Upstream::new("docker.io", &format!("http://127.0.0.1:{up}")).access("passthrough"),
    )
    .auth(
        Auth::new()
            .signing_key(&key_path)
            .rule(r#"{ repos: "**", pull: [anonymous] }"#),
    );
    let p = Proxy::start_in(&cfg.render(), dir);
    pull_until_token_asked(
        &p,
        "/v2/library/app/manifests/1",
        Some("alice:alices-password"),
        &seen,
    )
    .await;
    let seen = seen.lock().expect("lock").clone();
    assert!(
        seen.iter().all(|(_, a)| a.is_none()),
        "the foreign realm received the client's credentials: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_another_host_carries_no_credentials() {
    // The blob's bytes live on a "CDN" at another loopback address.
    let data = common::random_bytes(200_000, 7);
    let digest = format!("sha256:{}", sha256_hex(&data));
    let cdn_seen: Seen = Arc::default();
    let cdn = {
        let seen = cdn_seen.clone();
        let data = Bytes::from(data.clone());
        serve("127.0.0.2", move |req| {
            record(&seen, &req);
            let body = if req.method() == http::Method::HEAD {
                Bytes::new()
            } else {
                data.clone()
            };
            let mut r = resp(StatusCode::OK, body);
            r.headers_mut().insert("content-length", data.len().into());
            r
        })
        .await
    };
    // The token service is a listed realm: the credentials go there, and the token to the
    // upstream, but neither to the CDN.
    let (tport, token_seen) = token_server("127.0.0.1").await;
    let realm = format!("http://127.0.0.1:{tport}/token");
    let up_port = upstream(realm, Some(format!("http://127.0.0.2:{cdn}/cdn"))).await;
    let p = Proxy::start(&bot(up_port, &[&format!("http://127.0.0.1:{tport}")]).render());
    let r = client()
        .get(p.url(&format!("/v2/library/app/blobs/{digest}")))
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 200, "{}", p.log());
    let body = r.bytes().await.expect("body");
    assert_eq!(sha256_hex(&body), digest.trim_start_matches("sha256:"));
    let token_seen = token_seen.lock().expect("lock").clone();
    assert!(
        token_seen.iter().any(|(_, a)| a.is_some()),
        "the listed realm got the credentials: {token_seen:?}"
    );
    let cdn_seen = cdn_seen.lock().expect("lock").clone();
    assert!(!cdn_seen.is_empty(), "the redirect was followed");
    assert!(
        cdn_seen.iter().all(|(_, a)| a.is_none()),
        "the other host received credentials: {cdn_seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifests_foreign_urls_are_never_followed() {
    // A layer that lives elsewhere ("foreign", Windows base layers): its `urls` point at a
    // recording server on another host. ociedge fetches blobs from the upstream only.
    let elsewhere: Seen = Arc::default();
    let cdn = {
        let seen = elsewhere.clone();
        serve("127.0.0.2", move |req| {
            record(&seen, &req);
            resp(StatusCode::OK, "layer")
        })
        .await
    };
    let layer = format!("sha256:{}", sha256_hex(b"layer"));
    let config = format!("sha256:{}", sha256_hex(b"{}"));
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"{config}","size":2}},"layers":[{{"mediaType":"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip","digest":"{layer}","size":5,"urls":["http://127.0.0.2:{cdn}/layer"]}}]}}"#
    );
    let digest = format!("sha256:{}", sha256_hex(manifest.as_bytes()));
    let up = {
        let (manifest, digest) = (manifest.clone(), digest.clone());
        serve("127.0.0.1", move |req| {
            // Basic auth, as some registries ask: the configured credentials are in play.
            if req.headers().get("authorization").map(|v| v.as_bytes())
                != Some(basic("bot:s3cret").as_bytes())
            {
                let mut r = resp(StatusCode::UNAUTHORIZED, "");
                r.headers_mut().insert(
                    "www-authenticate",
                    r#"Basic realm="x""#.parse().expect("hv"),
                );
                return r;
            }
            if req.uri().path().contains("/manifests/") {
                let mut r = resp(StatusCode::OK, manifest.clone());
                let h = r.headers_mut();
                h.insert(
                    "content-type",
                    "application/vnd.docker.distribution.manifest.v2+json"
                        .parse()
                        .expect("hv"),
                );
                h.insert("docker-content-digest", digest.parse().expect("hv"));
                return r;
            }
            resp(
                StatusCode::NOT_FOUND,
                r#"{"errors":[{"code":"BLOB_UNKNOWN","message":"x"}]}"#,
            )
        })
        .await
    };
    let p = Proxy::start(&bot(up, &[]).render());
    let r = client()
        .get(p.url("/v2/library/app/manifests/1"))
        .header(
            "accept",
            "application/vnd.docker.distribution.manifest.v2+json",
        )
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 200, "{}", p.log());
    for method in [reqwest::Method::HEAD, reqwest::Method::GET] {
        let r = client()
            .request(
                method.clone(),
                p.url(&format!("/v2/library/app/blobs/{layer}")),
            )
            .send()
            .await
            .expect("blob");
        assert_eq!(r.status(), 404, "{method} of a foreign layer");
    }
    let seen = elsewhere.lock().expect("lock").clone();
    assert!(seen.is_empty(), "a foreign url was followed: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_push_never_sends_clients_to_the_upstreams_realm() {
    // Pushes go to an upstream registry; with an auth: section the client's credentials are
    // ociedge's and are not forwarded. The upstream's 401 names its own token service: passed
    // on, it would have the client send its ociedge password there.
    let (tport, seen) = token_server("127.0.0.1").await;
    let up = upstream(format!("http://127.0.0.1:{tport}/token"), None).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let key = rcgen::KeyPair::generate().expect("key");
    std::fs::write(dir.path().join("token.pem"), key.serialize_pem()).expect("key file");
    let hash = bcrypt::hash("pw", 4).expect("bcrypt");
    std::fs::write(dir.path().join("htpasswd"), format!("alice:{hash}\n")).expect("htpasswd");
    let cfg = Config::mirror_of(
        Upstream::new("docker.io", &format!("http://127.0.0.1:{up}")).access("public"),
    )
    .push("docker.io")
    .auth(
        Auth::new()
            .htpasswd(Path::new("{DIR}/htpasswd"))
            .signing_key(Path::new("{DIR}/token.pem"))
            .rule(r#"{ repos: "**", pull: [alice], push: [alice] }"#),
    );
    let p = Proxy::start_in(&cfg.render(), dir);
    let r = client()
        .post(p.url("/v2/library/app/blobs/uploads/"))
        .header("authorization", basic("alice:pw"))
        .send()
        .await
        .expect("POST");
    let challenge = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().expect("ascii").to_string());
    assert!(
        challenge
            .as_deref()
            .is_none_or(|c| !c.contains(&tport.to_string())),
        "the upstream's realm reached the client: {challenge:?}"
    );
    assert_oci_error(r, 403, "DENIED").await;
    assert!(seen.lock().expect("lock").is_empty());
}
