//! Test fixtures: real components on loopback, started per test and stopped on drop.
//!
//! - [`Origin`]: CNCF Distribution (`docker-registry`) started by `../shared/harness/registry.sh`,
//!   filled with the harness's deterministic images (built once by `mkimage.py`, pushed by skopeo).
//! - [`Proxy`]: the `ociedge` binary with a given config.
//!
//! A missing program fails the test; nothing here skips.
#![allow(dead_code)]

pub mod config;
pub mod fake;
pub mod faults;
pub mod hostile;
pub mod layout;
pub mod regions;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SMALL: &str = "sha256:a29318a1a32c0e4c464ae7b87c3c3ffb8b3e34b78416c3c832d4294303a72259";
pub const SMALL_1_1: &str =
    "sha256:9167fc7a0e041374cf04fd89e20dba10a4e7ff02e71f591da4f8fd785c7a8b05";
pub const SMALL_DOCKER: &str =
    "sha256:97244fc6f8f206043389a43037ecd5d15186ea9848dc5bf62d9091a81643c68f";
pub const MULTI: &str = "sha256:aebbd7aedd461ec8042584e999ab2e25ffe611da15821c53395dbfce10a31acf";
pub const APP: &str = "sha256:3dafe9950994947919d18dbf9a5a672ebe09d956e2675310d275efb32ae356d4";

pub fn harness() -> PathBuf {
    let dir = std::env::var_os("OCIEDGE_HARNESS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/harness"));
    assert!(
        dir.join("registry.sh").exists(),
        "harness scripts not found at {} (set OCIEDGE_HARNESS)",
        dir.display()
    );
    dir
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The standard images of the harness, built once into a shared OCI layout (under a file lock,
/// so parallel tests and test binaries build it once). Returns the layout directory.
pub fn images() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("harness-images");
    std::fs::create_dir_all(&dir).expect("images dir");
    let lock = std::fs::File::create(dir.with_extension("lock")).expect("lock file");
    lock.lock().expect("lock");
    let mk = harness().join("mkimage.py");
    let specs: &[(&str, &str, &[&str])] = &[
        ("small-1.0", "3M,1.5M,512K", &[]),
        ("small-1.1", "3M,1.5M,512K", &[]),
        ("multi-1.0", "2M,1M", &["--multiarch"]),
        ("app-v1", "1M,256K", &[]),
    ];
    for (tag, sizes, extra) in specs {
        let marker = dir.join(format!(".built-{tag}"));
        if marker.exists() {
            continue;
        }
        run(Command::new("python3")
            .arg(&mk)
            .arg(&dir)
            .args([tag, tag, sizes])
            .args(*extra)
            .arg("--quiet"));
        std::fs::write(&marker, b"").expect("marker");
    }
    drop(lock);
    dir
}

/// A docker-registry on loopback.
pub struct Origin {
    state: tempfile::TempDir,
    pub port: u16,
    name: String,
}

impl Origin {
    pub fn start() -> Origin {
        let state = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let o = Origin {
            state,
            port,
            name: "origin".into(),
        };
        o.script(&["start", &o.name, &port.to_string()]);
        o
    }

    /// A docker-registry storing in S3 bucket `registry` at `endpoint` (its S3 driver writes the
    /// same layout).
    pub fn start_s3(endpoint: &str) -> Origin {
        let state = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let o = Origin {
            state,
            port,
            name: "origin".into(),
        };
        o.script(&[
            "start",
            &o.name,
            &port.to_string(),
            "--s3",
            endpoint,
            "registry",
        ]);
        o
    }

    fn script(&self, args: &[&str]) -> String {
        run(Command::new("bash")
            .arg(harness().join("registry.sh"))
            .args(args)
            .env("HARNESS_STATE", self.state.path()))
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.state
            .path()
            .join("registry")
            .join(&self.name)
            .join("data")
    }

    /// The access log (count upstream requests by grepping it).
    pub fn log(&self) -> String {
        std::fs::read_to_string(
            self.state
                .path()
                .join("registry")
                .join(&self.name)
                .join("registry.log"),
        )
        .unwrap_or_default()
    }

    /// Pushes images of the standard layout: `(layout_tag, "repo:tag", docker_schema2)`.
    pub fn push(&self, items: &[(&str, &str, bool)]) {
        let layout = images();
        for (lt, dest, v2s2) in items {
            let mut cmd = Command::new("skopeo");
            cmd.args(["copy", "--all", "--quiet", "--dest-tls-verify=false"]);
            if *v2s2 {
                cmd.args(["--format", "v2s2"]);
            } else {
                cmd.arg("--preserve-digests");
            }
            cmd.arg(format!("oci:{}:{lt}", layout.display()))
                .arg(format!("docker://{}/{dest}", self.host()));
            run(&mut cmd);
        }
    }

    /// The standard set used by most tests.
    pub fn seed(&self) {
        self.push(&[
            ("small-1.0", "library/small:1.0", false),
            ("small-1.1", "library/small:1.1", false),
            ("small-1.0", "library/small-docker:1.0", true),
            ("multi-1.0", "library/multi:1.0", false),
            ("app-v1", "org/team/app:v1", false),
        ]);
    }

    pub fn stop(&self) {
        self.script(&["stop", &self.name]);
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(harness().join("registry.sh"))
            .args(["stop", &self.name])
            .env("HARNESS_STATE", self.state.path())
            .stderr(Stdio::null())
            .status();
    }
}

/// skopeo pushes an image of the standard layout to `host` (a registry or ociedge); `true` when
/// skopeo reported success (the push was acknowledged).
pub fn skopeo_push(host: &str, layout_tag: &str, dest: &str) -> bool {
    let layout = images();
    Command::new("skopeo")
        .args([
            "copy",
            "--all",
            "--quiet",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ])
        .arg(format!("oci:{}:{layout_tag}", layout.display()))
        .arg(format!("docker://{host}/{dest}"))
        .stderr(Stdio::null())
        .status()
        .expect("skopeo")
        .success()
}

/// `verify-pull.sh`: skopeo pulls `repo:tag` through `host` and checks every digest.
pub fn verify_pull(host: &str, image: &str, digest: &str) -> bool {
    Command::new("bash")
        .arg(harness().join("verify-pull.sh"))
        .args([host, image, digest])
        .stdout(Stdio::null())
        .status()
        .expect("verify-pull.sh")
        .success()
}

/// A running `ociedge serve`.
pub struct Proxy {
    /// The `ociedge serve` process (signal it by `child.id()`).
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub port: u16,
}

impl Proxy {
    /// Starts ociedge with `config`, where `{PORT}` and `{DIR}` are replaced by the listen port
    /// and a fresh directory; waits until `/healthz` answers.
    pub fn start(config: &str) -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        Proxy::start_in(config, dir)
    }

    pub fn start_in(config: &str, dir: tempfile::TempDir) -> Proxy {
        Proxy::start_with(config, dir, &[])
    }

    /// [`Proxy::start_in`] with more `serve` arguments (`--log-format json`).
    pub fn start_with(config: &str, mut dir: tempfile::TempDir, args: &[&str]) -> Proxy {
        // A port from `free_port` is free when picked, not when ociedge binds it: another test's
        // socket may take it in between. Ready means *this* process logged that it serves, which
        // it does once every listener is bound (a TCP connect could reach another process, or
        // loop back to the connecting socket itself; and a probe connection would hold one of
        // the connection slots some tests count); a process that exits because the port was
        // taken is started again elsewhere.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = free_port();
            let cfg = config
                .replace("{PORT}", &port.to_string())
                .replace("{DIR}", &dir.path().display().to_string());
            let path = dir.path().join("ociedge.yaml");
            std::fs::write(&path, cfg).expect("write config");
            let log = std::fs::File::create(dir.path().join("ociedge.log")).expect("log");
            let child = Command::new(env!("CARGO_BIN_EXE_ociedge"))
                .args(["serve", "--config"])
                .arg(&path)
                .args(args)
                .env("OCIEDGE_LOG", "info,ociedge=debug")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn ociedge");
            let mut p = Proxy { child, dir, port };
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if p.log().contains("ociedge serving") {
                    return p;
                }
                if let Ok(Some(_)) = p.child.try_wait() {
                    let log = p.log();
                    if attempt < 5 && log.contains("in use") {
                        break;
                    }
                    panic!("ociedge exited at start: {log}");
                }
                assert!(
                    Instant::now() < deadline,
                    "ociedge did not start: {}",
                    p.log()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            dir = p.restart();
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the proxy with SIGKILL and hands back its directory (to start it again there).
    pub fn restart(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = tempfile::tempdir().expect("tempdir");
        std::mem::replace(&mut self.dir, dir)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ociedge.log")).unwrap_or_default()
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Path of a blob in the local engine's Distribution layout.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.data().join(format!(
            "docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2]
        ))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- ociedge log ---\n{}", self.log());
        }
    }
}

/// A config with one docker.io upstream at `origin` and a `file://` local engine in `{DIR}/data`,
/// then `extra` (YAML) as it is. [`config::Config::mirror`] builds the same config.
pub fn mirror_config(upstream_url: &str, extra: &str) -> String {
    format!(
        "listen: 127.0.0.1:{{PORT}}\nregion: eu\nstorage:\n  preference: eu\n  engines:\n    eu: {{ url: \"file://{{DIR}}/data\" }}\nupstreams:\n  - name: docker.io\n    url: {upstream_url}\n{extra}"
    )
}

/// Checks an OCI error answer: its status, a JSON content type, and `code` among its
/// `errors[].code`. Returns the parsed body.
pub async fn assert_oci_error(
    resp: reqwest::Response,
    status: impl TryInto<reqwest::StatusCode, Error: std::fmt::Debug>,
    code: &str,
) -> serde_json::Value {
    let status = status.try_into().expect("a status code");
    let got = resp.status();
    let content_type = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or_default().to_string());
    let url = resp.url().clone();
    let body = resp.bytes().await.expect("the error body");
    assert_oci_error_parts(
        got.as_u16(),
        content_type.as_deref(),
        &body,
        status.as_u16(),
        code,
        url.as_str(),
    )
}

/// [`assert_oci_error`] on an answer read some other way (raw sockets): `what` names it in
/// failure messages.
pub fn assert_oci_error_parts(
    got_status: u16,
    content_type: Option<&str>,
    body: &[u8],
    status: u16,
    code: &str,
    what: &str,
) -> serde_json::Value {
    let text = String::from_utf8_lossy(body);
    assert_eq!(got_status, status, "{what}: status (body {text})");
    assert!(
        content_type
            .is_some_and(|t| t.split(';').next().unwrap_or("").trim() == "application/json"),
        "{what}: an OCI error is JSON, not {content_type:?} (body {text})"
    );
    let v: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{what}: an OCI error body is JSON ({e}): {text}"));
    let codes: Vec<&str> = v["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: no errors[] in {text}"))
        .iter()
        .filter_map(|e| e["code"].as_str())
        .collect();
    assert!(
        codes.contains(&code),
        "{what}: errors[].code {codes:?}, want {code}"
    );
    v
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        // Shorter than ociedge's idle-connection limits, so a pooled connection is never reused
        // just as the server closes it (the keep-alive race every HTTP client must live with).
        .pool_idle_timeout(std::time::Duration::from_secs(4))
        .build()
        .expect("client")
}

/// The body of a GET as text (`/metrics`, pages): the test fails if it cannot be had.
pub async fn get_text(url: impl reqwest::IntoUrl) -> String {
    client()
        .get(url)
        .send()
        .await
        .expect("GET")
        .text()
        .await
        .expect("body")
}

/// The largest layer (digest, size) of the manifest `reference` of `repo`, read through
/// `proxy`.
pub async fn largest_layer(proxy: &Proxy, repo: &str, reference: &str) -> (String, u64) {
    let m: serde_json::Value = client()
        .get(proxy.url(&format!("/v2/{repo}/manifests/{reference}")))
        .send()
        .await
        .expect("GET manifest")
        .json()
        .await
        .expect("manifest JSON");
    let l = m["layers"]
        .as_array()
        .and_then(|ls| ls.iter().max_by_key(|l| l["size"].as_u64()))
        .expect("a layer")
        .clone();
    (
        l["digest"].as_str().expect("digest").to_string(),
        l["size"].as_u64().expect("size"),
    )
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(data))
}

/// Pushes a blob to a registry with the monolithic upload (POST, then PUT ?digest=).
pub async fn push_blob(registry_url: &str, repo: &str, data: Vec<u8>) -> String {
    let digest = format!("sha256:{}", sha256_hex(&data));
    let c = client();
    let r = c
        .post(format!("{registry_url}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .expect("POST upload");
    assert_eq!(r.status(), 202, "upload start");
    let loc = r.headers()["location"]
        .to_str()
        .expect("location")
        .to_string();
    let loc = if loc.starts_with("http") {
        loc
    } else {
        format!("{registry_url}{loc}")
    };
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = c
        .put(format!("{loc}{sep}digest={digest}"))
        .header("content-type", "application/octet-stream")
        .body(data)
        .send()
        .await
        .expect("PUT upload");
    assert_eq!(r.status(), 201, "upload finish");
    digest
}

/// The OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// Pushes a one-layer image as `repo:tag` to the registry at `base`; returns its digest.
pub async fn push_image(base: &str, repo: &str, tag: &str) -> String {
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let layer = random_bytes(4096, 11);
    let (config_len, layer_len) = (config.len(), layer.len());
    let config_digest = push_blob(base, repo, config).await;
    let layer_digest = push_blob(base, repo, layer).await;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_len},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_len}],
    })
    .to_string();
    let r = client()
        .put(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("content-type", OCI_MANIFEST)
        .body(manifest.clone())
        .send()
        .await
        .expect("PUT manifest");
    assert_eq!(r.status(), 201, "manifest push to {base}");
    format!("sha256:{}", sha256_hex(manifest.as_bytes()))
}

/// `GET` of a manifest through `proxy`, accepting an OCI image manifest.
pub async fn get_manifest(proxy: &Proxy, repo: &str, reference: &str) -> reqwest::Response {
    client()
        .get(proxy.url(&format!("/v2/{repo}/manifests/{reference}")))
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .expect("GET manifest")
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Polls `f` until it is true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// The value of one series of `/metrics` (`name` or `name{labels}`, as exposed); `None` when the
/// series is absent or the scrape fails.
pub async fn metric(proxy: &Proxy, series: &str) -> Option<f64> {
    let text = client()
        .get(proxy.url("/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    metric_in(&text, series)
}

/// [`metric`] on a scrape already made.
pub fn metric_in(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == series).then(|| v.parse().ok()).flatten()
    })
}

/// Waits until no fill runs in `proxy` (a fill's verdict, commit or discard, is final then).
pub async fn fills_settled(proxy: &Proxy) -> bool {
    eventually(Duration::from_secs(60), async || {
        metric(proxy, "ociedge_fills_in_flight").await == Some(0.0)
    })
    .await
}

/// A GET sent byte for byte (no client-side path normalisation): `(status, body)`.
pub async fn raw_get(host: &str, path: &str, extra_headers: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(host).await.expect("connect");
    let req =
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra_headers}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// docker-registry serving an existing directory in the Distribution layout (to check that what
/// ociedge wrote there is what Distribution reads); stopped on drop.
pub struct DirRegistry {
    child: Child,
    _state: tempfile::TempDir,
    pub port: u16,
}

impl DirRegistry {
    pub fn start(root: &Path) -> DirRegistry {
        let state = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let cfg = state.path().join("config.yml");
        let yaml = format!(
            "version: 0.1\nstorage:\n  filesystem: {{ rootdirectory: {} }}\nhttp: {{ addr: \"127.0.0.1:{port}\" }}\n",
            root.display()
        );
        std::fs::write(&cfg, yaml).expect("registry config");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry");
        let r = DirRegistry {
            child,
            _state: state,
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not start on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for DirRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
