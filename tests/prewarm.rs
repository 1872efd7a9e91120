//! Prewarming (`POST /_ociedge/prewarm`, `GET /_ociedge/prewarm/<id>`, `ociedge prewarm`): a
//! multi-platform image pulled through the pull path into the local engine and copied into two
//! S3 engines (moto), a `kill -9` half way resumed after the restart, pinned content kept by an
//! eviction pass that would have taken it, the CLI, bad requests, and access under `auth:`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::config::{Auth, Config, Upstream};
use common::regions::{DelayLine, Moto};
use common::*;
use serde_json::{json, Value};

const INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// What an image is made of, as the origin serves it: every manifest digest (index first) and
/// every blob digest, by platform (`os/arch`).
struct Image {
    index: String,
    manifests: Vec<String>,
    blobs: Vec<(String, String)>,
}

impl Image {
    fn blobs_of(&self, platform: Option<&str>) -> Vec<String> {
        let mut out: Vec<String> = self
            .blobs
            .iter()
            .filter(|(p, _)| platform.is_none_or(|x| x == p))
            .map(|(_, b)| b.clone())
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

async fn image_at(origin: &str, repo: &str, tag: &str) -> Image {
    let get = |reference: String| {
        let url = format!("{origin}/v2/{repo}/manifests/{reference}");
        async move {
            let r = client()
                .get(url)
                .header("accept", format!("{INDEX}, {OCI_MANIFEST}"))
                .send()
                .await
                .expect("GET manifest");
            assert_eq!(r.status(), 200);
            let b = r.bytes().await.expect("body");
            (
                format!("sha256:{}", sha256_hex(&b)),
                serde_json::from_slice::<Value>(&b).expect("json"),
            )
        }
    };
    let (index, idx) = get(tag.to_string()).await;
    let mut manifests = vec![index.clone()];
    let mut blobs = Vec::new();
    for m in idx["manifests"].as_array().expect("an index") {
        let d = m["digest"].as_str().expect("digest").to_string();
        let platform = format!(
            "{}/{}",
            m["platform"]["os"].as_str().unwrap_or("?"),
            m["platform"]["architecture"].as_str().unwrap_or("?")
        );
        let (_, man) = get(d.clone()).await;
        manifests.push(d);
        blobs.push((
            platform.clone(),
            man["config"]["digest"]
                .as_str()
                .expect("config")
                .to_string(),
        ));
        for l in man["layers"].as_array().expect("layers") {
            blobs.push((
                platform.clone(),
                l["digest"].as_str().expect("layer").to_string(),
            ));
        }
    }
    Image {
        index,
        manifests,
        blobs,
    }
}

/// The object of `digest` in a Distribution layout at `root` (a path or a bucket URL).
fn blob_key(digest: &str) -> String {
    let hex = digest.trim_start_matches("sha256:");
    format!("docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2])
}

/// Whether a region whose local engine is `s3` (its upstream unreachable) serves every blob and
/// manifest from that engine, with the right bytes.
async fn region_serves(s3: &Moto, id: &str, repo: &str, blobs: &[String], manifests: &[String]) {
    let cfg = Config::new(id)
        .region(id)
        .engine(s3.engine(id, None))
        .upstream(Upstream::new(
            "docker.io",
            &format!("http://127.0.0.1:{}", free_port()),
        ))
        .render();
    let region = Proxy::start(&cfg);
    for (d, kind) in blobs
        .iter()
        .map(|d| (d, "blobs"))
        .chain(manifests.iter().map(|d| (d, "manifests")))
    {
        let r = client()
            .get(region.url(&format!("/v2/{repo}/{kind}/{d}")))
            .header("accept", format!("{INDEX}, {OCI_MANIFEST}"))
            .send()
            .await
            .expect("GET");
        assert_eq!(r.status(), 200, "{d} in {id}: {}", s3_list(s3).await);
        assert_eq!(r.headers()["x-ociedge-source"], "local", "{d} in {id}");
        let b = r.bytes().await.expect("body");
        assert_eq!(&format!("sha256:{}", sha256_hex(&b)), d, "{id}");
    }
}

/// The bucket's listing (for failure messages).
async fn s3_list(s3: &Moto) -> String {
    get_text(format!("{}/registry?list-type=2", s3.endpoint())).await
}

/// Whether the local engine at `data` holds `digest` with the right bytes.
fn local_has(data: &Path, digest: &str) -> bool {
    std::fs::read(data.join(blob_key(digest)))
        .is_ok_and(|b| format!("sha256:{}", sha256_hex(&b)) == digest)
}

async fn post(proxy: &Proxy, body: &Value, authz: Option<&str>) -> (u16, Value) {
    let mut req = client()
        .post(proxy.url("/_ociedge/prewarm"))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(a) = authz {
        req = req.header("authorization", a);
    }
    let r = req.send().await.expect("POST prewarm");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn job(proxy: &Proxy, id: &str, authz: Option<&str>) -> (u16, Value) {
    let mut req = client().get(proxy.url(&format!("/_ociedge/prewarm/{id}")));
    if let Some(a) = authz {
        req = req.header("authorization", a);
    }
    match req.send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.json().await.unwrap_or(Value::Null))
        }
        Err(_) => (0, Value::Null),
    }
}

/// Polls the job until it is finished (or `timeout`); its last view.
async fn finished(proxy: &Proxy, id: &str, timeout: Duration) -> Value {
    let mut last = Value::Null;
    let done = eventually(timeout, async || {
        let (s, v) = job(proxy, id, None).await;
        let f = s == 200 && v["finished"] == json!(true);
        last = v;
        f
    })
    .await;
    assert!(done, "job {id} did not finish: {last:#}\n{}", proxy.log());
    last
}

fn engine_counts<'a>(view: &'a Value, engine: &str) -> &'a Value {
    &view["images"][0]["engines"][engine]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, skopeo, moto"]
async fn a_replicated_multi_platform_prewarm_fills_every_engine_and_survives_kill_9() {
    let origin = Origin::start();
    origin.push(&[("multi-1.0", "library/multi:1.0", false)]);
    let img = image_at(&origin.url(), "library/multi", "1.0").await;
    assert_eq!(img.index, MULTI);
    assert!(
        img.blobs_of(None).len() >= 4,
        "two platforms, config and layers each"
    );
    // A slow link to the upstream, so the job is still running when the process is killed.
    let line = DelayLine::start_limited(free_port(), origin.port, 0, Some(400 << 10));
    let (us, ap) = (
        Moto::start(None, "127.0.0.1"),
        Moto::start(None, "127.0.0.1"),
    );
    let cfg = Config::mirror(&format!("http://127.0.0.1:{}", line.port))
        .engine(us.engine("us", None))
        .engine(ap.engine("ap", None))
        .render();
    let proxy = Proxy::start(&cfg);
    let (status, v) = post(
        &proxy,
        &json!({"images": ["library/multi:1.0"], "platforms": "all", "replicate": true}),
        None,
    )
    .await;
    assert_eq!(status, 202, "{v}");
    let id = v["id"].as_str().expect("an id").to_string();
    // Half way: some blobs in the local engine, the job not finished.
    let mut seen = Value::Null;
    let half = eventually(Duration::from_secs(60), async || {
        let (_, v) = job(&proxy, &id, None).await;
        let done = engine_counts(&v, "eu")["blobs_done"].as_u64().unwrap_or(0);
        seen = v.clone();
        done >= 1 && v["finished"] == json!(false)
    })
    .await;
    assert!(half, "never caught half way: {seen:#}");
    let dir = proxy.restart(); // SIGKILL
    let proxy = Proxy::start_in(&cfg, dir);
    let v = finished(&proxy, &id, Duration::from_secs(180)).await;
    assert_eq!(v["state"], "done", "{v:#}");
    assert!(
        v["runs"].as_u64().unwrap_or(0) >= 2,
        "resumed after the restart: {v:#}"
    );
    let blobs = img.blobs_of(None);
    for engine in ["eu", "us", "ap"] {
        let c = engine_counts(&v, engine);
        assert_eq!(c["blobs_total"], json!(blobs.len()), "{engine}: {v:#}");
        assert_eq!(c["blobs_done"], json!(blobs.len()), "{engine}: {v:#}");
        assert_eq!(c["errors"], json!([]), "{engine}: {v:#}");
    }
    assert_eq!(v["images"][0]["digest"], MULTI);
    // Every blob and every manifest, with the right bytes, in all three engines.
    let data = proxy.data();
    for d in blobs.iter().chain(img.manifests.iter()) {
        assert!(local_has(&data, d), "{d} not in the local engine");
    }
    region_serves(&us, "us", "library/multi", &blobs, &img.manifests).await;
    region_serves(&ap, "ap", "library/multi", &blobs, &img.manifests).await;
    // Nothing wrong: a client pulls both platforms from the local engine, digests checked.
    assert!(verify_pull(&proxy.host(), "library/multi:1.0", MULTI));
    // Prewarmed again: already there, nothing transferred.
    let (status, v) = post(
        &proxy,
        &json!({"images": ["library/multi:1.0"], "replicate": true}),
        None,
    )
    .await;
    assert_eq!(status, 202);
    let id2 = v["id"].as_str().expect("an id").to_string();
    let v = finished(&proxy, &id2, Duration::from_secs(60)).await;
    for engine in ["eu", "us", "ap"] {
        let c = engine_counts(&v, engine);
        assert_eq!(c["blobs_done"], json!(blobs.len()), "{engine}: {v:#}");
        assert_eq!(c["bytes_transferred"], json!(0), "{engine}: {v:#}");
        // Present content counts its bytes as done.
        assert_eq!(
            c["bytes_done"],
            engine_counts(&v, "eu")["bytes_done"],
            "{v:#}"
        );
    }
    assert!(engine_counts(&v, "eu")["bytes_done"].as_u64().unwrap_or(0) > 3 << 20);
    // The status shows the jobs; the metrics count what was prewarmed.
    let status = get_text(proxy.url("/_ociedge/status")).await;
    assert!(status.contains(&id2), "{status}");
    assert!(metric(&proxy, "ociedge_prewarm_jobs_running")
        .await
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, skopeo"]
async fn pinned_blobs_outlive_an_eviction_pass_that_would_have_taken_them() {
    let origin = Origin::start();
    origin.push(&[
        ("small-1.0", "library/small:1.0", false),
        ("multi-1.0", "library/multi:1.0", false),
    ]);
    let mut big = Vec::new();
    for i in 0..2u64 {
        big.push(push_blob(&origin.url(), "evict/big", random_bytes(8 << 20, 500 + i)).await);
    }
    let multi = image_at(&origin.url(), "library/multi", "1.0").await;
    let proxy = Proxy::start(
        &Config::mirror(&origin.url())
            .cache("max_size", "16MiB")
            .cache("min_idle", "0s")
            .render(),
    );
    // Least recently used first: small, then the pinned multi, then the big blobs.
    assert!(verify_pull(&proxy.host(), "library/small:1.0", SMALL));
    let small_layer = largest_layer(&proxy, "library/small", "1.0").await.0;
    let (status, v) = post(
        &proxy,
        &json!({"images": ["library/multi:1.0"], "pin_until": "1h"}),
        None,
    )
    .await;
    assert_eq!(status, 202, "{v}");
    let id = v["id"].as_str().expect("an id").to_string();
    let v = finished(&proxy, &id, Duration::from_secs(60)).await;
    assert_eq!(v["state"], "done", "{v:#}");
    assert!(
        proxy
            .data()
            .join(format!("_ociedge/pins/{id}.json"))
            .exists(),
        "the pins are stored in the local engine"
    );
    for d in &big {
        let r = client()
            .get(proxy.url(&format!("/v2/evict/big/blobs/{d}")))
            .send()
            .await
            .expect("GET");
        assert_eq!(r.status(), 200);
        let b = r.bytes().await.expect("body");
        assert_eq!(&format!("sha256:{}", sha256_hex(&b)), d);
    }
    // A pass runs: it takes small and the first big blob, older than nothing pinned…
    let data = proxy.data();
    let evicted = eventually(Duration::from_secs(60), async || {
        !proxy.blob_path(&small_layer).exists() && !proxy.blob_path(&big[0]).exists()
    })
    .await;
    assert!(
        evicted,
        "no eviction pass took the unpinned content\n{}",
        proxy.log()
    );
    // …and the pinned blobs, less recently used than the big blob it took, are all still there.
    for d in multi.blobs_of(None).iter().chain(multi.manifests.iter()) {
        assert!(local_has(&data, d), "pinned {d} was evicted");
    }
    assert!(verify_pull(&proxy.host(), "library/multi:1.0", MULTI));
}

/// The config file the CLI reads: `Config::mirror` of `upstream` with its data in `dir`.
fn cli_config(dir: &Path, upstream: &str) -> PathBuf {
    let cfg = Config::mirror(upstream)
        .render()
        .replace("{PORT}", &free_port().to_string())
        .replace("{DIR}", &dir.display().to_string());
    let path = dir.join("ociedge.yaml");
    std::fs::write(&path, cfg).expect("config");
    path
}

fn cli(config: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ociedge"))
        .arg("prewarm")
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("ociedge prewarm");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry, skopeo"]
async fn the_cli_drives_a_job_to_completion_and_resumes_it_idempotently() {
    let origin = Origin::start();
    origin.push(&[("multi-1.0", "library/multi:1.0", false)]);
    let img = image_at(&origin.url(), "library/multi", "1.0").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = cli_config(dir.path(), &origin.url());
    let (ok, out) = cli(
        &config,
        &[
            "library/multi:1.0",
            "--platform",
            "linux/amd64",
            "--pin-until",
            "2h",
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains(": done"), "{out}");
    let data = dir.path().join("data");
    for d in img.blobs_of(Some("linux/amd64")) {
        assert!(local_has(&data, &d), "{d} not prewarmed\n{out}");
    }
    let others: Vec<String> = img
        .blobs_of(None)
        .into_iter()
        .filter(|d| !img.blobs_of(Some("linux/amd64")).contains(d))
        .collect();
    assert!(!others.is_empty());
    for d in &others {
        assert!(!local_has(&data, d), "{d} is of another platform\n{out}");
    }
    // The job's record is durable, under the id the command names.
    let n = img.blobs_of(Some("linux/amd64")).len();
    assert!(
        out.contains(&format!("eu: {n}/{n} blobs")),
        "every blob counted: {out}"
    );
    // The same command again: the same job, everything already there.
    let (ok, again) = cli(&config, &["library/multi:1.0", "--platform", "linux/amd64"]);
    assert!(ok, "{again}");
    assert!(again.contains(&format!("eu: {n}/{n} blobs")), "{again}");
    assert!(
        again.contains(" 0 transferred"),
        "nothing fetched again: {again}"
    );
    let records: Vec<_> = std::fs::read_dir(data.join("_ociedge/prewarm"))
        .expect("records")
        .flatten()
        .collect();
    assert_eq!(records.len(), 1, "one job, resumed");
    // A bad image name is refused before anything runs.
    let (ok, out) = cli(&config, &["Not/Valid"]);
    assert!(!ok && out.contains("images[0]"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_naming_the_field() {
    // No upstream answers: nothing is fetched by a refused request.
    let proxy =
        Proxy::start(&Config::mirror(&format!("http://127.0.0.1:{}", free_port())).render());
    for (body, status, field) in [
        (r#"{"images": []}"#, 400, "images"),
        (r#"{"platforms": "all"}"#, 400, "images"),
        (
            r#"{"images": ["library/ok:1", "Bad Name"]}"#,
            400,
            "images[1]",
        ),
        (
            r#"{"images": ["ok"], "platforms": ["linux"]}"#,
            400,
            "platforms[0]",
        ),
        (
            r#"{"images": ["ok"], "replicate": "yes"}"#,
            400,
            "replicate",
        ),
        (
            r#"{"images": ["ok"], "pin_until": "tomorrow"}"#,
            400,
            "pin_until",
        ),
        (r#"{"images": ["ok"], "priority": 1}"#, 400, "priority"),
        (r#"["ok"]"#, 400, "body"),
        ("not json", 400, "body"),
        // A name routed to no upstream is as unknown to prewarm as to a pull.
        (r#"{"images": ["ghcr.io/org/app:1"]}"#, 400, "images[0]"),
    ] {
        let r = client()
            .post(proxy.url("/_ociedge/prewarm"))
            .body(body)
            .send()
            .await
            .expect("POST");
        assert_eq!(r.status().as_u16(), status, "{body}");
        let v: Value = r.json().await.expect("an OCI error");
        assert_eq!(v["errors"][0]["detail"]["field"], field, "{body}: {v}");
        assert!(
            v["errors"][0]["message"]
                .as_str()
                .unwrap_or("")
                .starts_with(field),
            "{body}: {v}"
        );
    }
    let big = format!(r#"{{"images": ["{}"]}}"#, "a".repeat(1 << 20));
    let r = client()
        .post(proxy.url("/_ociedge/prewarm"))
        .body(big)
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 413);
    let r = client()
        .get(proxy.url("/_ociedge/prewarm/0123456789abcdef"))
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 404);
    let r = client()
        .put(proxy.url("/_ociedge/prewarm"))
        .send()
        .await
        .expect("PUT");
    assert_eq!(r.status(), 405);
}

/// An ES256 key pair made by openssl: (private, public).
fn keypair(dir: &Path) -> (PathBuf, PathBuf) {
    let key = dir.join("token.pem");
    let public = dir.join("token.pub");
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
        .expect("openssl")
        .success()
        && Command::new("openssl")
            .args(["ec", "-pubout", "-in"])
            .arg(&key)
            .arg("-out")
            .arg(&public)
            .stderr(Stdio::null())
            .status()
            .expect("openssl")
            .success();
    assert!(ok, "openssl");
    (key, public)
}

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
            .expect("htpasswd")
            .success();
        assert!(ok, "htpasswd");
    }
    f
}

fn basic(user: &str, pw: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry, skopeo, openssl, htpasswd"]
async fn under_auth_a_prewarm_needs_push_on_every_repository_named() {
    let origin = Origin::start();
    origin.push(&[
        ("small-1.0", "library/small:1.0", false),
        ("app-v1", "org/team/app:v1", false),
    ]);
    let d = tempfile::tempdir().expect("tempdir");
    let ht = htpasswd(
        d.path(),
        &[("alice", "pw"), ("bob", "bobpw"), ("ops", "opspw")],
    );
    let (key, public) = keypair(d.path());
    let auth = Auth::new()
        .htpasswd(&ht)
        .signing_key(&key)
        .verify_keys(&[&public])
        .rule(r#"{ repos: "_ociedge", pull: [ops] }"#)
        .rule(r#"{ repos: "library/**", pull: [anonymous], push: [alice, bob] }"#)
        .rule(r#"{ repos: "org/**", pull: [authenticated], push: [alice] }"#);
    let proxy = Proxy::start(&Config::mirror(&origin.url()).auth(auth).render());
    let body = json!({"images": ["library/small:1.0", "org/team/app:v1"]});
    // Anonymous: challenged.
    let r = client()
        .post(proxy.url("/_ociedge/prewarm"))
        .body(body.to_string())
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    // bob may push library/**, not org/**: refused, and nothing is fetched.
    let (status, v) = post(&proxy, &body, Some(&basic("bob", "bobpw"))).await;
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["errors"][0]["code"], "DENIED");
    // alice may push both.
    let (status, v) = post(&proxy, &body, Some(&basic("alice", "pw"))).await;
    assert_eq!(status, 202, "{v}");
    let id = v["id"].as_str().expect("an id").to_string();
    let alice = basic("alice", "pw");
    let done = eventually(Duration::from_secs(60), async || {
        job(&proxy, &id, Some(&alice)).await.1["finished"] == json!(true)
    })
    .await;
    assert!(done, "{}", proxy.log());
    let (_, v) = job(&proxy, &id, Some(&alice)).await;
    assert_eq!(v["state"], "done", "{v:#}");
    // The job is shown to the operator and to alice, not to bob nor to anonymous callers.
    assert_eq!(job(&proxy, &id, Some(&basic("ops", "opspw"))).await.0, 200);
    assert_eq!(job(&proxy, &id, Some(&basic("bob", "bobpw"))).await.0, 403);
    assert_eq!(job(&proxy, &id, None).await.0, 401);
    // bob's own job on what he may push runs.
    let (status, v) = post(
        &proxy,
        &json!({"images": ["library/small:1.0"]}),
        Some(&basic("bob", "bobpw")),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    assert!(origin.log().contains("/v2/org/team/app/manifests/v1"));
}
