//! Access control (`auth:`), end to end: skopeo against ociedge in front of docker-registry.
//! Public pulls with and without an `auth:` section; pushes and pulls with credentials through
//! the Bearer challenge and `/token`; DENIED and the anonymous challenge; tokens shared between
//! regions, and refused when signed by an unknown key or expired; private upstreams behind a
//! token gate with `access: passthrough` (local hits included) and `access: gated`.
//!
//! Keys come from `openssl` and users from `htpasswd -B` (apache2-utils), as an operator would
//! make them.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::config::{Auth, Config, Upstream};
use common::{client, images, mirror_config, Origin, Proxy, APP, SMALL};

/// Makes an ECDSA P-256 key pair with openssl: (private key PEM path, public key PEM path).
fn keypair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{name}.pem"));
    let public = dir.join(format!("{name}.pub"));
    let ok = Command::new("openssl")
        .args([
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
        ])
        .arg(&key)
        .status()
        .expect("openssl (apt-get install openssl)")
        .success();
    assert!(ok, "openssl ecparam");
    let ok = Command::new("openssl")
        .args(["ec", "-pubout", "-in"])
        .arg(&key)
        .arg("-out")
        .arg(&public)
        .stderr(Stdio::null())
        .status()
        .expect("openssl")
        .success();
    assert!(ok, "openssl ec -pubout");
    (key, public)
}

/// An htpasswd file with bcrypt entries, made by `htpasswd -B`.
fn htpasswd(dir: &Path, users: &[(&str, &str)]) -> PathBuf {
    let f = dir.join("htpasswd");
    for (i, (u, p)) in users.iter().enumerate() {
        let mut cmd = Command::new("htpasswd");
        cmd.arg("-bB");
        if i == 0 {
            cmd.arg("-c");
        }
        let ok = cmd
            .arg(&f)
            .args([u, p])
            .stderr(Stdio::null())
            .status()
            .expect("htpasswd (apt-get install apache2-utils)")
            .success();
        assert!(ok, "htpasswd -B");
    }
    f
}

/// The upstream `docker.io` on `port` with the proxy's own account `svc:svcpw`.
fn svc(port: u16) -> Upstream {
    Upstream::new("docker.io", &format!("http://127.0.0.1:{port}")).credentials("svc", "svcpw")
}

/// An `auth:` section: tokens signed with `key`, also accepted when `verify` keys sign them.
fn auth_yaml(htpasswd: &Path, key: &Path, verify: &[&Path], rules: &[&str]) -> Auth {
    rules.iter().fold(
        Auth::new()
            .htpasswd(htpasswd)
            .signing_key(key)
            .verify_keys(verify)
            .token("ttl", "5m"),
        |a, r| a.rule(r),
    )
}

/// skopeo pulls `image` through `host` (with `creds` if given) into a directory; the top
/// manifest's digest, or `None` when skopeo failed.
fn pull(host: &str, image: &str, creds: Option<&str>) -> Option<String> {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new("skopeo");
    cmd.args(["copy", "--all", "--quiet", "--src-tls-verify=false"]);
    match creds {
        Some(c) => cmd.args(["--src-creds", c]),
        None => cmd.arg("--src-no-creds"),
    };
    let ok = cmd
        .arg(format!("docker://{host}/{image}"))
        .arg(format!("dir:{}", tmp.path().display()))
        .stderr(Stdio::null())
        .status()
        .expect("skopeo")
        .success();
    if !ok {
        return None;
    }
    let m = std::fs::read(tmp.path().join("manifest.json")).expect("manifest.json");
    Some(format!("sha256:{}", common::sha256_hex(&m)))
}

/// skopeo pushes the standard layout's `layout_tag` to `host/dest` with `creds`.
fn push(host: &str, layout_tag: &str, dest: &str, creds: &str) -> bool {
    Command::new("skopeo")
        .args(["copy", "--all", "--quiet", "--preserve-digests"])
        .args(["--dest-tls-verify=false", "--dest-creds", creds])
        .arg(format!("oci:{}:{layout_tag}", images().display()))
        .arg(format!("docker://{host}/{dest}"))
        .stderr(Stdio::null())
        .status()
        .expect("skopeo")
        .success()
}

fn basic(user: &str, pw: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
    )
}

/// A token from `/token` (GET, Basic credentials if given) for `scope`.
async fn token(proxy: &Proxy, creds: Option<(&str, &str)>, scope: &str) -> (u16, String) {
    let mut rb = client()
        .get(proxy.url("/token"))
        .query(&[("service", "ociedge"), ("scope", scope)]);
    if let Some((u, p)) = creds {
        rb = rb.header("authorization", basic(u, p));
    }
    let r = rb.send().await.expect("GET /token");
    let status = r.status().as_u16();
    let v: serde_json::Value = r.json().await.unwrap_or_default();
    (status, v["token"].as_str().unwrap_or_default().to_string())
}

/// `(status, error code, WWW-Authenticate)` of a GET with an optional `Authorization`.
async fn get(proxy: &Proxy, path: &str, authz: Option<&str>) -> (u16, String, String) {
    let mut rb = client().get(proxy.url(path));
    if let Some(a) = authz {
        rb = rb.header("authorization", a);
    }
    let r = rb.send().await.expect("GET");
    let status = r.status().as_u16();
    let challenge = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap_or_default().to_string())
        .unwrap_or_default();
    let v: serde_json::Value = r.json().await.unwrap_or_default();
    let code = v["errors"][0]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    (status, code, challenge)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, skopeo, openssl, htpasswd"]
async fn public_pulls_without_auth_and_with_an_anonymous_rule() {
    let origin = Origin::start();
    origin.seed();
    // No auth: section: exactly as before.
    let open = Proxy::start(&mirror_config(&origin.url(), ""));
    assert_eq!(
        pull(&open.host(), "library/small:1.0", None).as_deref(),
        Some(SMALL)
    );
    assert_eq!(get(&open, "/v2/", None).await.0, 200);
    assert_eq!(get(&open, "/token", None).await.0, 404);

    let d = tempfile::tempdir().unwrap();
    let (key, _) = keypair(d.path(), "eu");
    let ht = htpasswd(d.path(), &[("alice", "pw")]);
    let auth = auth_yaml(
        &ht,
        &key,
        &[],
        &[
            r#"{ repos: "library/**", pull: [anonymous] }"#,
            r#"{ repos: "org/**", pull: [alice] }"#,
        ],
    );
    let p = Proxy::start(&Config::mirror(&origin.url()).auth(auth).render());
    // Login-less: skopeo follows the challenge to an anonymous token.
    assert_eq!(
        pull(&p.host(), "library/small:1.0", None).as_deref(),
        Some(SMALL)
    );
    // Docker Hub's short name is the same repository for the rules.
    assert_eq!(pull(&p.host(), "small:1.0", None).as_deref(), Some(SMALL));
    // A plain client without the token dance, too.
    assert_eq!(
        get(&p, "/v2/library/small/manifests/1.0", None).await.0,
        200
    );
    // Not covered by an anonymous rule: refused, and opened by alice's credentials.
    assert_eq!(pull(&p.host(), "org/team/app:v1", None), None);
    assert_eq!(
        pull(&p.host(), "org/team/app:v1", Some("alice:pw")).as_deref(),
        Some(APP)
    );
    assert_eq!(pull(&p.host(), "org/team/app:v1", Some("alice:nope")), None);
    // alice's image is now stored locally; its digests must not open it under a repository
    // anonymous clients may read (storage keeps one copy of a blob for all repositories).
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p.blob_path(APP)).unwrap()).unwrap();
    let layer = m["layers"][0]["digest"].as_str().unwrap().to_string();
    assert!(p.blob_path(&layer).exists());
    let (status, code, _) = get(&p, &format!("/v2/library/small/blobs/{layer}"), None).await;
    assert_eq!((status, code.as_str()), (404, "BLOB_UNKNOWN"));
    let (status, code, _) = get(&p, &format!("/v2/library/small/manifests/{APP}"), None).await;
    assert_eq!((status, code.as_str()), (404, "MANIFEST_UNKNOWN"));
    let alice = basic("alice", "pw");
    let (status, _, _) = get(&p, &format!("/v2/org/team/app/blobs/{layer}"), Some(&alice)).await;
    assert_eq!(status, 200);
    // No rule at all for this one: denied by default, even to a known user.
    let (status, code, _) = get(
        &p,
        "/v2/other/app/manifests/1.0",
        Some(&basic("alice", "pw")),
    )
    .await;
    assert_eq!((status, code.as_str()), (403, "DENIED"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, skopeo, openssl, htpasswd"]
async fn push_and_pull_with_credentials_denied_and_challenged() {
    let origin = Origin::start();
    let d = tempfile::tempdir().unwrap();
    let (key, _) = keypair(d.path(), "eu");
    let ht = htpasswd(d.path(), &[("alice", "pw"), ("bob", "bobpw")]);
    let auth = auth_yaml(
        &ht,
        &key,
        &[],
        &[r#"{ repos: "team/**", pull: [authenticated], push: [alice], delete: [alice] }"#],
    );
    let p = Proxy::start(&Config::mirror(&origin.url()).push("eu").auth(auth).render());
    let host = p.host();
    assert!(
        push(&host, "app-v1", "team/app:v1", "alice:pw"),
        "alice pushes"
    );
    assert_eq!(
        pull(&host, "team/app:v1", Some("alice:pw")).as_deref(),
        Some(APP)
    );
    assert_eq!(
        pull(&host, "team/app:v1", Some("bob:bobpw")).as_deref(),
        Some(APP)
    );
    // Cross-repository mounts: from a repository alice may read that holds the blob, a mount;
    // from one she may not read, a plain upload session.
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p.blob_path(APP)).unwrap()).unwrap();
    let layer = m["layers"][0]["digest"].as_str().unwrap().to_string();
    for (from, status) in [
        ("team/app", 201),
        ("secret/app", 202),
        ("team/nothing", 202),
    ] {
        let r = client()
            .post(p.url(&format!(
                "/v2/team/copy/blobs/uploads/?mount={layer}&from={from}"
            )))
            .header("authorization", basic("alice", "pw"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "mount from {from}");
    }
    // bob may pull but not push: skopeo fails, and the registry says DENIED.
    assert!(!push(&host, "small-1.0", "team/other:1", "bob:bobpw"));
    let r = client()
        .post(p.url("/v2/team/other/blobs/uploads/"))
        .header("authorization", basic("bob", "bobpw"))
        .send()
        .await
        .unwrap();
    common::assert_oci_error(r, 403, "DENIED").await;
    // bob's token does not grant push; the rules refuse it, so it is DENIED, not a new challenge.
    let (_, bob_token) = token(
        &p,
        Some(("bob", "bobpw")),
        "repository:team/other:pull,push",
    )
    .await;
    let r = client()
        .post(p.url("/v2/team/other/blobs/uploads/"))
        .bearer_auth(&bob_token)
        .send()
        .await
        .unwrap();
    common::assert_oci_error(r, 403, "DENIED").await;
    let r = client()
        .delete(p.url(&format!("/v2/team/app/manifests/{APP}")))
        .header("authorization", basic("bob", "bobpw"))
        .send()
        .await
        .unwrap();
    // bob may not delete.
    common::assert_oci_error(r, 403, "DENIED").await;
    // Anonymous: a challenge naming this proxy's realm and the scope, with the spec's body.
    let (status, code, challenge) = get(&p, "/v2/team/app/manifests/v1", None).await;
    assert_eq!((status, code.as_str()), (401, "UNAUTHORIZED"));
    assert_eq!(
        challenge,
        format!(
            r#"Bearer realm="http://{host}/token",service="ociedge",scope="repository:team/app:pull""#
        )
    );
    let r = client()
        .put(p.url("/v2/team/app/manifests/v2"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .ends_with(r#"scope="repository:team/app:pull,push""#));
    // /v2/: a challenge for anonymous clients, 200 with good credentials, 401 with bad ones.
    let (status, _, challenge) = get(&p, "/v2/", None).await;
    assert_eq!(status, 401);
    assert_eq!(
        challenge,
        format!(r#"Bearer realm="http://{host}/token",service="ociedge""#)
    );
    assert_eq!(get(&p, "/v2/", Some(&basic("alice", "pw"))).await.0, 200);
    assert_eq!(get(&p, "/v2/", Some(&basic("alice", "x"))).await.0, 401);
    // Wrong credentials at /token are a 401, not an empty token.
    assert_eq!(
        token(&p, Some(("alice", "x")), "repository:team/app:pull")
            .await
            .0,
        401
    );
    // OAuth2 form (containerd, docker): grant_type=password.
    let r = client()
        .post(p.url("/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(
            url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs([
                    ("grant_type", "password"),
                    ("username", "alice"),
                    ("password", "pw"),
                    ("service", "ociedge"),
                    ("scope", "repository:team/app:pull,push"),
                    ("client_id", "test"),
                ])
                .finish(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["scope"], "repository:team/app:pull,push");
    let t = v["access_token"].as_str().unwrap();
    let (status, _, _) = get(
        &p,
        "/v2/team/app/manifests/v1",
        Some(&format!("Bearer {t}")),
    )
    .await;
    assert_eq!(status, 200);
    // alice deletes with her credentials.
    let r = client()
        .delete(p.url(&format!("/v2/team/app/manifests/{APP}")))
        .header("authorization", basic("alice", "pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, skopeo, openssl, htpasswd"]
async fn tokens_cross_regions_and_unknown_or_expired_ones_are_refused() {
    let origin = Origin::start();
    origin.seed();
    let d = tempfile::tempdir().unwrap();
    let (key_a, pub_a) = keypair(d.path(), "a");
    let (key_b, _) = keypair(d.path(), "b");
    let (key_x, _) = keypair(d.path(), "stranger");
    let ht = htpasswd(d.path(), &[("alice", "pw")]);
    let rules = [r#"{ repos: "library/**", pull: [alice] }"#];
    let a = Proxy::start(
        &Config::mirror(&origin.url())
            .auth(auth_yaml(&ht, &key_a, &[], &rules))
            .render(),
    );
    let b = Proxy::start(
        &Config::mirror(&origin.url())
            .auth(auth_yaml(&ht, &key_b, &[&pub_a], &rules))
            .render(),
    );
    let manifest = "/v2/library/small/manifests/1.0";
    let (status, t) = token(&a, Some(("alice", "pw")), "repository:library/small:pull").await;
    assert_eq!(status, 200);
    let bearer = format!("Bearer {t}");
    assert_eq!(get(&a, manifest, Some(&bearer)).await.0, 200);
    assert_eq!(
        get(&b, manifest, Some(&bearer)).await.0,
        200,
        "B accepts A's token"
    );
    // B's tokens are not accepted by A (A does not have B's key).
    let (_, tb) = token(&b, Some(("alice", "pw")), "repository:library/small:pull").await;
    let (status, code, challenge) = get(&a, manifest, Some(&format!("Bearer {tb}"))).await;
    assert_eq!((status, code.as_str()), (401, "UNAUTHORIZED"));
    assert!(
        challenge.contains(r#"error="invalid_token""#),
        "{challenge}"
    );
    // Signed by a key no region knows, with every claim right.
    let load = |k: &Path| {
        ociedge::auth::token::Keys::load(&ociedge::config::auth::TokenConfig {
            signing_key: k.display().to_string(),
            verify_keys: vec![],
            ttl: ociedge::config::HumanDuration(std::time::Duration::from_secs(300)),
            realm: None,
        })
        .unwrap()
    };
    let entry = ociedge::auth::token::AccessEntry {
        kind: "repository".into(),
        name: "library/small".into(),
        actions: vec!["pull".into()],
    };
    let forged = load(&key_x)
        .issue("alice", Some("htpasswd"), vec![entry.clone()])
        .unwrap();
    assert_eq!(
        get(&b, manifest, Some(&format!("Bearer {forged}"))).await.0,
        401
    );
    // Expired: A's own key, a minute past its expiry (beyond the clock-skew leeway).
    let now = ociedge::auth::token::now_secs();
    let expired = load(&key_a)
        .sign(&ociedge::auth::token::Claims {
            iss: "ociedge".into(),
            sub: "alice".into(),
            aud: "ociedge".into(),
            exp: now - 60,
            nbf: now - 400,
            iat: now - 400,
            jti: "x".into(),
            access: vec![entry],
            idp: Some("htpasswd".into()),
        })
        .unwrap();
    assert_eq!(
        get(&a, manifest, Some(&format!("Bearer {expired}")))
            .await
            .0,
        401
    );
    assert_eq!(
        get(&b, manifest, Some(&format!("Bearer {expired}")))
            .await
            .0,
        401
    );
    // A token for another repository opens nothing here.
    let (_, other) = token(&a, Some(("alice", "pw")), "repository:library/multi:pull").await;
    let (status, _, challenge) = get(&b, manifest, Some(&format!("Bearer {other}"))).await;
    assert_eq!(status, 401);
    assert!(challenge.contains("insufficient_scope"), "{challenge}");
}

/// An upstream that needs credentials: a Bearer token gate in front of docker-registry, which
/// knows ociedge's service account (`svc`) and one client (`bob`).
async fn private_upstream(origin: &Origin) -> u16 {
    common::fake::TokenGate::new(origin.url(), Some("svc:svcpw"))
        .also_accept("bob:bobpw")
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, skopeo, openssl, htpasswd"]
async fn passthrough_serves_only_clients_the_upstream_lets_in_local_hits_included() {
    let origin = Origin::start();
    origin.seed();
    let port = private_upstream(&origin).await;
    let d = tempfile::tempdir().unwrap();
    let (key, _) = keypair(d.path(), "eu");
    // alice is a local user; the upstream does not know her.
    let ht = htpasswd(d.path(), &[("alice", "pw")]);
    let auth = auth_yaml(&ht, &key, &[], &[r#"{ repos: "**", pull: [anonymous] }"#]);
    let cfg = Config::local("eu", "file://{DIR}/data")
        .upstream(svc(port).access("passthrough"))
        .auth(auth)
        .render();
    let p = Proxy::start(&cfg);
    let host = p.host();
    // Nobody is served before the upstream vouches: not anonymous, not wrong credentials, not a
    // local user whose credentials mean nothing upstream.
    assert_eq!(pull(&host, "library/small:1.0", None), None);
    assert_eq!(pull(&host, "library/small:1.0", Some("bob:wrong")), None);
    assert_eq!(pull(&host, "library/small:1.0", Some("alice:pw")), None);
    let stored = p
        .data()
        .join("docker/registry/v2/repositories/library/small");
    assert!(!stored.exists(), "nothing fetched for refused clients");
    // bob's own upstream credentials open it.
    assert_eq!(
        pull(&host, "library/small:1.0", Some("bob:bobpw")).as_deref(),
        Some(SMALL)
    );
    // Now a local hit: still refused to those the upstream does not let in.
    let manifest = format!("/v2/library/small/manifests/{SMALL}");
    assert!(stored.exists());
    assert_eq!(pull(&host, "library/small:1.0", None), None);
    assert_eq!(pull(&host, "library/small:1.0", Some("bob:wrong")), None);
    let (status, code, challenge) = get(&p, &manifest, None).await;
    assert_eq!((status, code.as_str()), (401, "UNAUTHORIZED"));
    assert!(challenge.contains(r#"scope="repository:library/small:pull""#));
    assert_eq!(
        get(&p, &manifest, Some(&basic("bob", "wrong"))).await.0,
        401
    );
    assert_eq!(get(&p, &manifest, Some(&basic("alice", "pw"))).await.0, 401);
    // Direct Basic credentials work as well as the token flow.
    assert_eq!(
        get(&p, &manifest, Some(&basic("bob", "bobpw"))).await.0,
        200
    );
    assert_eq!(
        pull(&host, "library/small:1.0", Some("bob:bobpw")).as_deref(),
        Some(SMALL)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, skopeo, openssl, htpasswd"]
async fn gated_upstream_is_decided_by_the_rules() {
    let origin = Origin::start();
    origin.seed();
    let port = private_upstream(&origin).await;
    let d = tempfile::tempdir().unwrap();
    let (key, _) = keypair(d.path(), "eu");
    let ht = htpasswd(d.path(), &[("alice", "pw"), ("carol", "cpw")]);
    let auth = auth_yaml(
        &ht,
        &key,
        &[],
        &[r#"{ repos: "library/**", pull: [alice] }"#],
    );
    // access defaults to gated for an upstream with credentials.
    let cfg = Config::local("eu", "file://{DIR}/data")
        .upstream(svc(port))
        .auth(auth)
        .render();
    let p = Proxy::start(&cfg);
    let host = p.host();
    assert_eq!(
        pull(&host, "library/small:1.0", Some("alice:pw")).as_deref(),
        Some(SMALL)
    );
    // bob's upstream account means nothing here; carol is known but not in the rule.
    assert_eq!(pull(&host, "library/small:1.0", Some("bob:bobpw")), None);
    assert_eq!(pull(&host, "library/small:1.0", Some("carol:cpw")), None);
    assert_eq!(pull(&host, "library/small:1.0", None), None);
    let manifest = "/v2/library/small/manifests/1.0";
    let (status, code, _) = get(&p, manifest, Some(&basic("carol", "cpw"))).await;
    assert_eq!((status, code.as_str()), (403, "DENIED"));
    assert_eq!(get(&p, manifest, None).await.0, 401);
    assert_eq!(get(&p, manifest, Some(&basic("alice", "pw"))).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, skopeo, openssl, htpasswd"]
async fn over_tls_the_challenge_points_at_https() {
    let origin = Origin::start();
    origin.seed();
    let d = tempfile::tempdir().unwrap();
    let (key, _) = keypair(d.path(), "eu");
    let ht = htpasswd(d.path(), &[("alice", "pw")]);
    let auth = auth_yaml(
        &ht,
        &key,
        &[],
        &[r#"{ repos: "library/**", pull: [alice] }"#],
    );
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    std::fs::write(dir.path().join("tls.crt"), cert.cert.pem()).unwrap();
    std::fs::write(dir.path().join("tls.key"), cert.signing_key.serialize_pem()).unwrap();
    let cfg = Config::mirror(&origin.url())
        .tls("{DIR}/tls.crt", "{DIR}/tls.key")
        .auth(auth);
    let p = Proxy::start_in(&cfg.render(), dir);
    // skopeo follows the realm: an http:// realm on this port would fail the token request.
    let tmp = tempfile::tempdir().unwrap();
    let ok = Command::new("skopeo")
        .args(["copy", "--all", "--quiet", "--src-tls-verify=false"])
        .args(["--src-creds", "alice:pw"])
        .arg(format!("docker://{}/library/small:1.0", p.host()))
        .arg(format!("dir:{}", tmp.path().display()))
        .status()
        .expect("skopeo")
        .success();
    assert!(ok, "pull over TLS with credentials");
    let m = std::fs::read(tmp.path().join("manifest.json")).unwrap();
    assert_eq!(format!("sha256:{}", common::sha256_hex(&m)), SMALL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs openssl, htpasswd"]
async fn the_status_page_obeys_the_rules() {
    let d = tempfile::tempdir().unwrap();
    let (key, _) = keypair(d.path(), "eu");
    let ht = htpasswd(d.path(), &[("alice", "pw"), ("bob", "pw")]);
    let auth = auth_yaml(
        &ht,
        &key,
        &[],
        &[
            r#"{ repos: "_ociedge", pull: [alice] }"#,
            r#"{ repos: "library/**", pull: [anonymous] }"#,
        ],
    );
    let p = Proxy::start(&Config::mirror("http://127.0.0.1:9").auth(auth).render());
    for path in ["/_ociedge/status", "/_ociedge/"] {
        assert_eq!(get(&p, path, None).await.0, 401, "{path} anonymous");
        assert_eq!(
            get(&p, path, Some(&basic("bob", "pw"))).await.0,
            403,
            "{path} bob"
        );
        assert_eq!(
            get(&p, path, Some(&basic("alice", "pw"))).await.0,
            200,
            "{path} alice"
        );
    }
    // Health and readiness stay open for load balancers.
    assert_eq!(get(&p, "/healthz", None).await.0, 200);
}

/// The token scope and the path of a default-upstream spelling (`docker.io/priv.example/...`)
/// once named the same storage name as the passthrough upstream `priv.example`'s repository:
/// an anonymous token for it opened the private repository. Access is decided on the
/// (upstream, repository) pair, whatever the spelling.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, skopeo, openssl, htpasswd"]
async fn a_default_upstream_spelling_never_opens_a_passthrough_upstream() {
    let hub = Origin::start();
    let private = Origin::start();
    private.seed();
    let port = private_upstream(&private).await;
    let d = tempfile::tempdir().unwrap();
    let (key, _) = keypair(d.path(), "eu");
    let ht = htpasswd(d.path(), &[("alice", "pw")]);
    // The README's own rules for a passthrough upstream, and an open default upstream.
    let auth = auth_yaml(
        &ht,
        &key,
        &[],
        &[
            r#"{ repos: "priv.example/**", pull: [anonymous] }"#,
            r#"{ repos: "**", pull: [anonymous] }"#,
        ],
    );
    let cfg = Config::local("eu", "file://{DIR}/data")
        .upstream(Upstream::new("docker.io", &hub.url()))
        .upstream(
            Upstream::new("priv.example", &format!("http://127.0.0.1:{port}"))
                .credentials("svc", "svcpw")
                .access("passthrough"),
        )
        .auth(auth)
        .render();
    let p = Proxy::start(&cfg);
    let private_manifest = "/v2/priv.example/library/small/manifests/1.0";
    // Anonymous tokens asked for with every default-upstream spelling of the scope.
    for scope in [
        "repository:docker.io/priv.example/library/small:pull",
        "repository:index.docker.io/priv.example/library/small:pull",
        "repository:priv.example/library/small:pull",
    ] {
        let (status, tok) = token(&p, None, scope).await;
        assert_eq!(status, 200, "{scope}");
        let (status, code, _) = get(&p, private_manifest, Some(&format!("Bearer {tok}"))).await;
        assert_eq!(
            (status, code.as_str()),
            (401, "UNAUTHORIZED"),
            "a token for {scope} opened the passthrough repository"
        );
    }
    // The default-upstream spellings themselves name nothing.
    for path in [
        "/v2/docker.io/priv.example/library/small/manifests/1.0",
        "/v2/priv.example/library/small/manifests/1.0?ns=docker.io",
        &format!("/v2/docker.io/priv.example/library/small/blobs/{SMALL}"),
    ] {
        let (status, code, _) = get(&p, path, None).await;
        assert_ne!(status, 200, "{path} ({code})");
    }
    let stored = p
        .data()
        .join("docker/registry/v2/repositories/priv.example");
    assert!(!stored.exists(), "nothing fetched for anonymous clients");
    // The upstream's own client is let in.
    assert_eq!(
        get(&p, private_manifest, Some(&basic("bob", "bobpw")))
            .await
            .0,
        200
    );
}

/// Manifest pushes are checked per repository: bob, who may push `bobs/**` only, cannot commit
/// a manifest whose layers are alice's private blobs (nor a child manifest of hers), and the
/// answer for a blob he does not hold is the same whether or not it exists elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, skopeo, openssl, htpasswd"]
async fn a_manifest_push_references_only_what_its_repository_holds() {
    let origin = Origin::start();
    let d = tempfile::tempdir().unwrap();
    let (key, _) = keypair(d.path(), "eu");
    let ht = htpasswd(d.path(), &[("alice", "pw"), ("bob", "bobpw")]);
    let auth = auth_yaml(
        &ht,
        &key,
        &[],
        &[
            r#"{ repos: "team/a/**", pull: [alice], push: [alice] }"#,
            r#"{ repos: "team/a", pull: [alice], push: [alice] }"#,
            r#"{ repos: "bobs/**", pull: [bob], push: [bob] }"#,
        ],
    );
    let p = Proxy::start(&Config::mirror(&origin.url()).push("eu").auth(auth).render());
    let host = p.host();
    assert!(
        push(&host, "app-v1", "team/a:v1", "alice:pw"),
        "alice pushes"
    );
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p.blob_path(APP)).unwrap()).unwrap();
    let put = |body: serde_json::Value, media: &'static str| {
        let url = p.url("/v2/bobs/x/manifests/stolen");
        async move {
            let r = client()
                .put(url)
                .header("authorization", basic("bob", "bobpw"))
                .header("content-type", media)
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let v: serde_json::Value = r.json().await.unwrap_or_default();
            (
                status,
                v["errors"][0]["code"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        }
    };
    // alice's manifest as it is (her config and layers), pushed into bob's repository.
    let image = "application/vnd.oci.image.manifest.v1+json";
    assert_eq!(
        put(m.clone(), image).await,
        (400, "MANIFEST_BLOB_UNKNOWN".into()),
        "bob committed a manifest of alice's private blobs"
    );
    // A blob nobody has answers exactly the same.
    let mut unknown = m.clone();
    unknown["layers"][0]["digest"] = format!("sha256:{}", "0".repeat(64)).into();
    assert_eq!(
        put(unknown, image).await,
        (400, "MANIFEST_BLOB_UNKNOWN".into())
    );
    // An index naming alice's manifest as its child.
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{ "mediaType": image, "digest": APP, "size": 1 }],
    });
    assert_eq!(
        put(index, "application/vnd.oci.image.index.v1+json").await,
        (400, "MANIFEST_BLOB_UNKNOWN".into())
    );
    assert!(
        !p.data()
            .join("docker/registry/v2/repositories/bobs/x/_manifests/tags/stolen")
            .exists(),
        "nothing tagged"
    );
    // alice's own repository: an index of her manifest is fine, an index whose child is a layer
    // is not.
    let put_alice = |body: serde_json::Value| {
        let url = p.url("/v2/team/a/manifests/idx");
        async move {
            client()
                .put(url)
                .header("authorization", basic("alice", "pw"))
                .header("content-type", "application/vnd.oci.image.index.v1+json")
                .body(body.to_string())
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let ok = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{ "mediaType": image, "digest": APP, "size": 1 }],
    });
    assert_eq!(put_alice(ok).await, 201);
    let layer = m["layers"][0]["digest"].as_str().unwrap();
    let bad = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{ "mediaType": image, "digest": layer, "size": 1 }],
    });
    assert_eq!(put_alice(bad).await, 400);
}
