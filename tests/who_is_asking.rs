//! Who is asking (issue 15, section 4): the token realm clients are sent to never comes from the
//! request's `Host`; HTTP/1.1 requests with a missing or repeated `Host` are refused, on the plain
//! fast front and on hyper's; repeated wrong passwords are throttled per address and per user
//! (`429` with `Retry-After`) while others are still served.
//!
//! Users are bcrypt entries written with the `bcrypt` crate (cost 4, as `htpasswd -B -C 4`
//! would), and the token key is made with rcgen: nothing outside the test is needed.

mod common;

use std::net::IpAddr;
use std::path::Path;

use common::config::{Auth, Config, Upstream};
use common::Proxy;

/// An `auth:` section with `users` and a fresh signing key.
fn auth_section(dir: &Path, users: &[(&str, &str)]) -> Auth {
    let ht = dir.join("htpasswd");
    let lines: Vec<String> = users
        .iter()
        .map(|(u, p)| format!("{u}:{}", bcrypt::hash(p, 4).expect("bcrypt")))
        .collect();
    std::fs::write(&ht, lines.join("\n") + "\n").expect("htpasswd");
    let key = dir.join("token.pem");
    let pair = rcgen::KeyPair::generate().expect("key");
    std::fs::write(&key, pair.serialize_pem()).expect("key file");
    Auth::new()
        .htpasswd(&ht)
        .signing_key(&key)
        .rule(r#"{ repos: "library/**", pull: [authenticated] }"#)
}

/// A mirror of nothing (port 9) with `users`; `realm` is `auth.token.realm`.
fn proxy(users: &[(&str, &str)], realm: Option<&str>) -> Proxy {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut auth = auth_section(dir.path(), users);
    if let Some(r) = realm {
        auth = auth.token("realm", &format!("\"{r}\""));
    }
    let cfg = Config::mirror("http://127.0.0.1:9").auth(auth);
    Proxy::start_in(&cfg.render(), dir)
}

/// Sends `head` (and nothing else) on a fresh connection; the whole answer as text.
async fn raw(host: &str, head: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(host).await.expect("connect");
    s.write_all(head.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(20), s.read_to_end(&mut buf))
        .await
        .expect("an answer in time");
    String::from_utf8_lossy(&buf).into_owned()
}

fn status(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    let head = answer.split("\r\n\r\n").next()?;
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn basic(user: &str, pw: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_host_does_not_change_the_realm() {
    let p = proxy(&[("alice", "pw")], None);
    let ours = format!(r#"realm="http://{}/token""#, p.host());
    // The plain fast front (a GET) and hyper's (a request with a body), with a forged Host and
    // a forged X-Forwarded-Proto.
    for head in [
        "GET /v2/ HTTP/1.1\r\nHost: evil.example\r\nX-Forwarded-Proto: https\r\nConnection: close\r\n\r\n".to_string(),
        "GET /v2/library/app/manifests/1 HTTP/1.1\r\nHost: evil.example:443\r\nConnection: close\r\n\r\n".to_string(),
        "PUT /v2/library/app/manifests/1 HTTP/1.1\r\nHost: evil.example\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}".to_string(),
    ] {
        let a = raw(&p.host(), &head).await;
        assert_eq!(status(&a), 401, "{a}");
        let ch = header(&a, "www-authenticate").expect("a challenge");
        assert!(ch.contains(&ours), "{ch} for {head:?}");
        assert!(!ch.contains("evil"), "{ch}");
    }
    // A configured realm is the realm, whatever the Host.
    let p = proxy(&[("alice", "pw")], Some("https://registry.example/token"));
    let a = raw(
        &p.host(),
        "GET /v2/ HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    let ch = header(&a, "www-authenticate").expect("a challenge");
    assert!(
        ch.starts_with(r#"Bearer realm="https://registry.example/token","#),
        "{ch}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_repeated_host_is_a_bad_request() {
    let p = proxy(&[("alice", "pw")], None);
    let host = p.host();
    for (head, want) in [
        // The fast front: bodiless GET and HEAD.
        ("GET /v2/ HTTP/1.1\r\nConnection: close\r\n\r\n".to_string(), 400),
        ("GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n".to_string(), 400),
        (format!("HEAD /v2/library/app/manifests/1 HTTP/1.1\r\nHost: {host}\r\nHost: evil.example\r\nConnection: close\r\n\r\n"), 400),
        (format!("GET /v2/ HTTP/1.0\r\nHost: {host}\r\nHost: {host}\r\n\r\n"), 400),
        // hyper's front: requests with a body.
        ("PUT /v2/library/app/manifests/1 HTTP/1.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}".to_string(), 400),
        (format!("POST /token HTTP/1.1\r\nHost: {host}\r\nHost: evil.example\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"), 400),
        // What is fine: one Host, or none on HTTP/1.0.
        ("GET /v2/ HTTP/1.0\r\n\r\n".to_string(), 401),
        (format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"), 200),
        (format!("PUT /v2/library/app/manifests/1 HTTP/1.1\r\nHost: {host}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"), 401),
    ] {
        let a = raw(&host, &head).await;
        assert_eq!(status(&a), want, "{head:?}: {a}");
        if want == 400 && !head.starts_with("HEAD") {
            assert!(a.contains(r#""errors""#), "an OCI error body: {a}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passwords_are_throttled_and_others_are_still_served() {
    let p = proxy(&[("alice", "pw"), ("bob", "bobpw")], None);
    let here = common::client();
    let get = |c: &reqwest::Client, path: &str, auth: String| {
        c.get(p.url(path)).header("authorization", auth).send()
    };
    // Guessing alice's password from 127.0.0.1: refused with 401 at first, then 429.
    let mut refused = None;
    for i in 0..50 {
        let r = get(&here, "/v2/", basic("alice", &format!("guess{i}")))
            .await
            .expect("GET");
        match r.status().as_u16() {
            401 => continue,
            429 => {
                refused = Some((i, r));
                break;
            }
            s => panic!("unexpected {s}"),
        }
    }
    let (tries, r) = refused.expect("guessing is throttled");
    assert!(tries <= 10, "throttled after {tries} wrong passwords");
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry), "Retry-After: {retry}");
    common::assert_oci_error(r, 429, "TOOMANYREQUESTS").await;
    // The token endpoint counts the same failures.
    let r = get(&here, "/token?service=ociedge", basic("alice", "again"))
        .await
        .expect("GET");
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    // From another address, bob and alice herself are served.
    let there = reqwest::Client::builder()
        .no_proxy()
        .local_address("127.0.0.2".parse::<IpAddr>().expect("ip"))
        .build()
        .expect("client");
    for (user, pw) in [("bob", "bobpw"), ("alice", "pw")] {
        let r = get(&there, "/v2/", basic(user, pw)).await.expect("GET");
        assert_eq!(r.status(), 200, "{user} from another address");
        let r = get(
            &there,
            "/token?service=ociedge&scope=repository:library/app:pull",
            basic(user, pw),
        )
        .await
        .expect("GET");
        assert_eq!(r.status(), 200, "{user} gets a token from another address");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_an_upstream_vouches_for_are_not_throttled() {
    // carol is no local user: a passthrough upstream (a token gate in front of a fake registry)
    // accepts her password. Her logins fail the local check each time, and must not count.
    let backend = common::fake::FakeUpstream::default().start().await;
    let gate =
        common::fake::TokenGate::new(format!("http://127.0.0.1:{backend}"), Some("carol:cpw"))
            .start()
            .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let auth = auth_section(dir.path(), &[("alice", "pw")]);
    let cfg = Config::mirror_of(
        Upstream::new("docker.io", &format!("http://127.0.0.1:{gate}")).access("passthrough"),
    )
    .auth(auth)
    .render();
    let p = Proxy::start_in(&cfg, dir);
    let c = common::client();
    for i in 0..25 {
        for path in ["/v2/", "/token?service=ociedge"] {
            let r = c
                .get(p.url(path))
                .header("authorization", basic("carol", "cpw"))
                .send()
                .await
                .expect("GET");
            assert_eq!(r.status(), 200, "{path} #{i}: {}", p.log());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_and_http2_the_realm_is_https_at_the_listener_whatever_the_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("cert");
    std::fs::write(dir.path().join("tls.crt"), cert.cert.pem()).expect("crt");
    std::fs::write(dir.path().join("tls.key"), cert.signing_key.serialize_pem()).expect("key");
    let cfg = Config::mirror("http://127.0.0.1:9")
        .tls("{DIR}/tls.crt", "{DIR}/tls.key")
        .auth(auth_section(dir.path(), &[("alice", "pw")]));
    let p = Proxy::start_in(&cfg.render(), dir);
    let url = format!("https://{}/v2/", p.host());
    let ours = format!(r#"Bearer realm="https://{}/token","#, p.host());
    for h2 in [false, true] {
        let mut b = reqwest::Client::builder()
            .no_proxy()
            .danger_accept_invalid_certs(true);
        b = if h2 {
            b.http2_prior_knowledge()
        } else {
            b.http1_only()
        };
        let c = b.build().expect("client");
        let r = c
            .get(&url)
            .header("host", "evil.example")
            .header("x-forwarded-proto", "http")
            .send()
            .await
            .expect("GET");
        assert_eq!(r.status(), 401, "h2={h2}");
        assert_eq!(r.version() == reqwest::Version::HTTP_2, h2);
        let ch = r.headers()["www-authenticate"].to_str().expect("ascii");
        assert!(ch.starts_with(&ours), "h2={h2}: {ch}");
    }
}

/// A client bound to `ip` (another loopback address: another client address).
fn client_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .local_address(ip.parse::<IpAddr>().expect("ip"))
        .build()
        .expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_an_upstreams_passwords_through_a_passthrough_gate_is_throttled() {
    // No local users: the passthrough upstream judges every password. ociedge must not become
    // a fast oracle for guessing them (nor get its own address locked out upstream).
    let backend = common::fake::FakeUpstream::default().start().await;
    let gate =
        common::fake::TokenGate::new(format!("http://127.0.0.1:{backend}"), Some("carol:cpw"))
            .start()
            .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("token.pem");
    std::fs::write(
        &key,
        rcgen::KeyPair::generate().expect("key").serialize_pem(),
    )
    .expect("key");
    let cfg = Config::mirror_of(
        Upstream::new("docker.io", &format!("http://127.0.0.1:{gate}")).access("passthrough"),
    )
    .auth(
        Auth::new()
            .signing_key(&key)
            .rule(r#"{ repos: "**", pull: [anonymous] }"#),
    );
    let p = Proxy::start_in(&cfg.render(), dir);
    for (from, user, path) in [
        ("127.0.0.1", "carol", "/v2/library/app/manifests/1"),
        ("127.0.0.3", "dave", "/v2/"),
    ] {
        let c = client_from(from);
        let mut throttled = None;
        for i in 0..30 {
            let r = c
                .get(p.url(path))
                .header("authorization", basic(user, &format!("guess{i}")))
                .send()
                .await
                .expect("GET");
            if r.status() == 429 {
                assert!(r.headers().contains_key("retry-after"));
                throttled = Some(i);
                break;
            }
            assert_eq!(r.status(), 401, "{path} guess {i}");
        }
        let tries = throttled.expect("guessing is throttled");
        assert!(tries <= 10, "{path}: throttled after {tries} guesses");
    }
    // carol herself, from elsewhere, is let in (her name has failed less than its limit).
    let r = client_from("127.0.0.2")
        .get(p.url("/v2/"))
        .header("authorization", basic("carol", "cpw"))
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 200);
}
