//! The production front: TLS (skopeo over HTTPS, HTTP/2 by ALPN, a renewed certificate served
//! without a restart, podman and containerd as TLS mirror clients, an upstream with a private
//! CA), the Docker daemon's `registry-mirrors`, graceful shutdown during a large transfer and with
//! fills in flight, slow-loris connections and the connection cap, JSON logs that carry the
//! request id, and the Kubernetes example.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::config::{Config, Upstream};
use common::*;
use futures::StreamExt;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SerialNumber,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------------
// A test PKI: a CA generated per test, and server certificates it signs.

struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
    /// Holds `ca.crt`: a cert dir for skopeo and podman, a CA file for containerd and ociedge.
    dir: tempfile::TempDir,
}

/// A server certificate for 127.0.0.1 and localhost.
struct Issued {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

impl Pki {
    fn new() -> Pki {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, "ociedge test CA");
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(p, KeyPair::generate().expect("key")).expect("CA");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("ca.crt"), ca.pem()).expect("ca.crt");
        Pki { ca, dir }
    }

    fn ca_dir(&self) -> &Path {
        self.dir.path()
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    fn issue(&self, serial: u64) -> Issued {
        let mut p = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .expect("params");
        p.serial_number = Some(SerialNumber::from(serial));
        p.distinguished_name.push(DnType::CommonName, "ociedge");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &self.ca).expect("sign");
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    /// A client that trusts only this CA and reports the certificate it was shown.
    fn client(&self) -> reqwest::Client {
        let ca = reqwest::Certificate::from_pem(self.ca.pem().as_bytes()).expect("CA cert");
        reqwest::Client::builder()
            .no_proxy()
            .tls_certs_only([ca])
            .tls_info(true)
            .build()
            .expect("client")
    }
}

/// Replaces `dir/name` atomically, as cert-manager and certbot do.
fn replace(dir: &Path, name: &str, content: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, content).expect("write");
    std::fs::rename(&tmp, dir.join(name)).expect("rename");
}

impl Issued {
    fn install(&self, dir: &Path) {
        replace(dir, "tls.key", &self.key_pem);
        replace(dir, "tls.crt", &self.cert_pem);
    }
}

/// The `tls:` section for certificate files in the proxy's `{DIR}`.
fn tls_mirror(upstream: &str) -> Config {
    Config::mirror(upstream).tls("{DIR}/tls.crt", "{DIR}/tls.key")
}

/// Starts ociedge with `config` after installing a certificate with `serial` in its directory.
fn start_tls(pki: &Pki, serial: u64, config: &str) -> (Proxy, Issued) {
    let dir = tempfile::tempdir().expect("tempdir");
    let issued = pki.issue(serial);
    issued.install(dir.path());
    (Proxy::start_in(config, dir), issued)
}

/// The leaf certificate a fresh TLS connection to `port` is shown (a new client: no pooled
/// connection).
async fn served_cert(pki: &Pki, port: u16) -> Vec<u8> {
    let r = pki
        .client()
        .get(format!("https://127.0.0.1:{port}/healthz"))
        .send()
        .await
        .expect("https request");
    assert_eq!(r.status(), 200);
    r.extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|t| t.peer_certificate())
        .expect("peer certificate")
        .to_vec()
}

fn signal(proxy: &Proxy, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &proxy.child.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig}");
}

/// Waits for the proxy process to exit; `None` after `timeout`.
fn wait_exit(proxy: &mut Proxy, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(st) = proxy.child.try_wait().expect("try_wait") {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn sha256_file(p: &Path) -> String {
    sha256_hex(&std::fs::read(p).expect("read"))
}

/// Checks a `skopeo copy ... dir:` result: the top manifest is `want`, every blob hashes to its
/// name.
fn check_dir_image(dir: &Path, want: &str) {
    let top = format!("sha256:{}", sha256_file(&dir.join("manifest.json")));
    assert_eq!(top, want, "top manifest");
    let mut blobs = 0;
    for e in std::fs::read_dir(dir).expect("dir") {
        let p = e.expect("entry").path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name == "manifest.json" || name == "version" {
            continue;
        }
        let name = name.trim_end_matches(".manifest.json");
        assert_eq!(sha256_file(&p), name, "{} hashes to its name", p.display());
        blobs += 1;
    }
    assert!(blobs >= 4, "config and three layers");
}

// ---------------------------------------------------------------------------------------------
// TLS

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry, skopeo"]
async fn tls_serves_skopeo_and_http2_by_alpn() {
    let origin = Origin::start();
    origin.push(&[("small-1.0", "library/small:1.0", false)]);
    let pki = Pki::new();
    let plain = free_port();
    let cfg = tls_mirror(&origin.url())
        .tls_option("plain_listen", &format!("127.0.0.1:{plain}"))
        .render();
    let (proxy, _) = start_tls(&pki, 1, &cfg);
    let base = format!("https://127.0.0.1:{}", proxy.port);

    // HTTP/2 through ALPN (not prior knowledge): the client offers h2 and http/1.1.
    let r = pki
        .client()
        .get(format!("{base}/v2/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), http::Version::HTTP_2, "ALPN chose h2");
    let r = pki
        .client()
        .get(format!("{base}/v2/library/small/manifests/1.0"))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), http::Version::HTTP_2);
    assert_eq!(r.headers()["docker-content-digest"], SMALL);
    // A client that offers only http/1.1 gets it on the same port.
    let ca =
        reqwest::Certificate::from_pem(std::fs::read(pki.ca_file()).unwrap().as_slice()).unwrap();
    let h1 = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([ca])
        .http1_only()
        .build()
        .unwrap();
    let r = h1.get(format!("{base}/v2/")).send().await.unwrap();
    assert_eq!(
        (r.status().as_u16(), r.version()),
        (200, http::Version::HTTP_11)
    );
    // The plain listener beside it.
    let r = client()
        .get(format!("http://127.0.0.1:{plain}/v2/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // skopeo verifies the certificate against the CA in --src-cert-dir.
    let out = tempfile::tempdir().unwrap();
    let copy = |cert_dir: &Path, dest: &Path| {
        Command::new("skopeo")
            .args(["copy", "--all", "--quiet", "--src-cert-dir"])
            .arg(cert_dir)
            .arg(format!("docker://{}/library/small:1.0", proxy.host()))
            .arg(format!("dir:{}", dest.display()))
            .status()
            .expect("skopeo")
            .success()
    };
    let img = out.path().join("img");
    assert!(copy(pki.ca_dir(), &img), "skopeo copy over TLS");
    check_dir_image(&img, SMALL);
    // ... and refuses the server without the CA: the check above was a real verification.
    let empty = tempfile::tempdir().unwrap();
    assert!(
        !copy(empty.path(), &out.path().join("img2")),
        "skopeo must not trust the test CA without --src-cert-dir"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_without_restart() {
    let up_port = common::fake::FakeUpstream::default().start().await;
    let upstream = format!("http://127.0.0.1:{up_port}");
    let pki = Pki::new();

    // Polling: the files change, the next handshake gets the new certificate.
    let cfg = tls_mirror(&upstream)
        .tls_option("reload_interval", "300ms")
        .render();
    let (proxy, first) = start_tls(&pki, 1, &cfg);
    assert_eq!(served_cert(&pki, proxy.port).await, first.der);
    let second = pki.issue(2);
    second.install(proxy.dir.path());
    assert!(
        eventually(Duration::from_secs(10), async || served_cert(
            &pki, proxy.port
        )
        .await
            == second.der)
        .await,
        "renewed certificate (serial 2) not served: {}",
        proxy.log()
    );
    // A half-done rotation (new certificate, old key) keeps the previous certificate in
    // service; finishing it switches.
    let third = pki.issue(3);
    replace(proxy.dir.path(), "tls.crt", &third.cert_pem);
    assert!(
        eventually(Duration::from_secs(30), async || proxy
            .log()
            .contains("not reloaded"))
        .await,
        "the half-done rotation was seen and refused: {}",
        proxy.log()
    );
    assert_eq!(served_cert(&pki, proxy.port).await, second.der);
    replace(proxy.dir.path(), "tls.key", &third.key_pem);
    assert!(
        eventually(Duration::from_secs(10), async || served_cert(
            &pki, proxy.port
        )
        .await
            == third.der)
        .await,
        "serial 3 not served: {}",
        proxy.log()
    );

    // SIGHUP: with polling too slow to matter, the signal reloads at once.
    let cfg = tls_mirror(&upstream)
        .tls_option("reload_interval", "1h")
        .render();
    let (proxy, first) = start_tls(&pki, 10, &cfg);
    assert_eq!(served_cert(&pki, proxy.port).await, first.der);
    let next = pki.issue(11);
    next.install(proxy.dir.path());
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        served_cert(&pki, proxy.port).await,
        first.der,
        "no poll within the hour"
    );
    signal(&proxy, "-HUP");
    assert!(
        eventually(Duration::from_secs(10), async || served_cert(
            &pki, proxy.port
        )
        .await
            == next.der)
        .await,
        "SIGHUP did not reload: {}",
        proxy.log()
    );
}

/// An upstream reached over TLS with a private CA: trusted with `ca_file`, refused without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_with_a_private_ca_needs_its_ca_file() {
    let data = random_bytes(300_000, 7);
    let digest = format!("sha256:{}", sha256_hex(&data));
    let up = common::fake::FakeUpstream::default();
    up.blobs
        .lock()
        .unwrap()
        .insert(digest.clone(), Bytes::from(data.clone()));
    let up_port = up.start().await;
    let pki = Pki::new();
    // The "private registry": an ociedge serving TLS with the test CA.
    let (inner, _) = start_tls(
        &pki,
        1,
        &tls_mirror(&format!("http://127.0.0.1:{up_port}")).render(),
    );
    let inner_url = format!("https://127.0.0.1:{}", inner.port);
    let path = format!("/v2/library/x/blobs/{digest}");

    let trusting = Proxy::start(
        &Config::mirror_of(
            Upstream::new("docker.io", &inner_url).ca_file(&pki.ca_file().display().to_string()),
        )
        .render(),
    );
    let r = client().get(trusting.url(&path)).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", trusting.log());
    assert_eq!(r.bytes().await.unwrap().as_ref(), data.as_slice());

    let untrusting = Proxy::start(&mirror_config(&inner_url, ""));
    let r = client().get(untrusting.url(&path)).send().await.unwrap();
    assert!(
        !r.status().is_success(),
        "an unknown CA must not be trusted: {}",
        r.status()
    );
}

// ---------------------------------------------------------------------------------------------
// Real container clients over TLS, and the Docker daemon's registry-mirrors.

/// `podman pull` through the mirror over TLS, the CA given by `--cert-dir` (`None`: no CA).
/// Follows client-pull.sh's way of running podman as root here. Returns the pulled digest.
fn podman_pull_tls(mirror: &str, image: &str, cert_dir: Option<&Path>) -> Option<String> {
    // podman refuses a --runroot longer than 50 characters: a short directory under /tmp.
    let run = tempfile::Builder::new()
        .prefix("fx-podman.")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let conf = run.path().join("registries.conf");
    std::fs::write(
        &conf,
        format!(
            "unqualified-search-registries = []\n[[registry]]\nprefix = \"upstream.local:5000\"\nlocation = \"upstream.local:5000\"\n[[registry.mirror]]\nlocation = \"{mirror}\"\ninsecure = false\n"
        ),
    )
    .expect("registries.conf");
    std::fs::create_dir_all(run.path().join("tmp")).expect("tmp");
    let podman = |args: &[&str]| {
        let mut c = Command::new("podman");
        c.arg("--root")
            .arg(run.path().join("root"))
            .arg("--runroot")
            .arg(run.path().join("run"))
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
            ])
            .arg("--tmpdir")
            .arg(run.path().join("tmp"))
            .args(args)
            .env("CONTAINERS_REGISTRIES_CONF", &conf);
        c
    };
    let image = format!("upstream.local:5000/{image}");
    let mut pull = podman(&["pull", "-q"]);
    if let Some(d) = cert_dir {
        pull.arg("--cert-dir").arg(d);
    }
    let ok = pull.arg(&image).status().expect("podman").success();
    if !ok {
        return None;
    }
    let out = podman(&["image", "inspect", "--format", "{{.Digest}}", &image])
        .output()
        .expect("podman inspect");
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `ctr images pull` through the mirror over TLS with the CA in hosts.toml (`None`: no CA), on
/// the containerd that client-pull.sh started in `state`. Returns the pulled digest.
fn ctr_pull_tls(state: &Path, mirror: &str, image: &str, ca: Option<&Path>) -> Option<String> {
    let sock = state.join("containerd/containerd.sock");
    let hosts = tempfile::tempdir().expect("tempdir");
    let d = hosts.path().join("upstream.local:5000");
    std::fs::create_dir_all(&d).expect("hosts dir");
    std::fs::write(
        d.join("hosts.toml"),
        format!(
            "server = \"http://upstream.local:5000\"\n[host.\"https://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n{}",
            ca.map(|c| format!("  ca = \"{}\"\n", c.display()))
                .unwrap_or_default()
        ),
    )
    .expect("hosts.toml");
    let ctr = || {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(&sock)
            .args(["--namespace", "fronttls"]);
        c
    };
    let image = format!("upstream.local:5000/{image}");
    let ok = ctr()
        .args(["images", "pull", "--hosts-dir"])
        .arg(hosts.path())
        .args(["--snapshotter", "native", &image])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("ctr")
        .success();
    if !ok {
        return None;
    }
    let out = ctr()
        .args(["images", "ls"])
        .output()
        .expect("ctr images ls");
    let ls = String::from_utf8_lossy(&out.stdout).into_owned();
    let _ = ctr()
        .args(["images", "rm", "--sync", &image])
        .stdout(std::process::Stdio::null())
        .status();
    ls.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.first() == Some(&image.as_str()))
        .and_then(|f| f.get(2).map(|s| s.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry, skopeo, podman, containerd"]
async fn podman_and_containerd_pull_through_the_mirror_over_tls() {
    let origin = Origin::start();
    origin.seed();
    let pki = Pki::new();
    let plain = free_port();
    let cfg = tls_mirror(&origin.url())
        .upstream(Upstream::new("upstream.local:5000", &origin.url()))
        .tls_option("plain_listen", &format!("127.0.0.1:{plain}"))
        .render();
    let (proxy, _) = start_tls(&pki, 1, &cfg);
    let tls_host = proxy.host();
    let state = tempfile::tempdir().unwrap();
    let harness_pull = |args: &[&str]| {
        Command::new("bash")
            .arg(harness().join("client-pull.sh"))
            .args(args)
            .env("HARNESS_STATE", state.path())
            .status()
            .expect("client-pull.sh")
            .success()
    };

    // podman over TLS, verifying against the test CA; without it, the pull fails.
    assert_eq!(
        podman_pull_tls(&tls_host, "library/small:1.0", Some(pki.ca_dir())).as_deref(),
        Some(SMALL),
        "podman over TLS: {}",
        proxy.log()
    );
    assert_eq!(
        podman_pull_tls(&tls_host, "library/multi:1.0", None),
        None,
        "podman must not trust the test CA unless told to"
    );

    // The plain listener beside TLS, with the harness's own (plain HTTP) client setup; this also
    // starts the harness's containerd.
    let plain_host = format!("127.0.0.1:{plain}");
    assert!(
        harness_pull(&["ctr", &plain_host, "library/small:1.0", SMALL]),
        "containerd over the plain listener"
    );
    // containerd over TLS with `ca` in hosts.toml; without it, the pull fails.
    let got = ctr_pull_tls(
        state.path(),
        &tls_host,
        "library/multi:1.0",
        Some(&pki.ca_file()),
    );
    let untrusted = ctr_pull_tls(state.path(), &tls_host, "org/team/app:v1", None);
    let _ = Command::new("bash")
        .arg(harness().join("client-pull.sh"))
        .arg("ctr-stop")
        .env("HARNESS_STATE", state.path())
        .status();
    assert_eq!(
        got.as_deref(),
        Some(MULTI),
        "containerd over TLS: {}",
        proxy.log()
    );
    assert_eq!(
        untrusted, None,
        "containerd must not trust the test CA unless told to"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry, skopeo, docker.io (dockerd)"]
async fn docker_daemon_pulls_through_registry_mirrors() {
    let origin = Origin::start();
    origin.push(&[("small-1.0", "library/small:1.0", false)]);
    let proxy = Proxy::start(&mirror_config(&origin.url(), ""));
    let state = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new("bash")
            .arg(harness().join("client-pull.sh"))
            .args(args)
            .env("HARNESS_STATE", state.path())
            .status()
            .expect("client-pull.sh")
            .success()
    };
    // dockerd asks its mirror for `library/small` by Docker Hub name; with no internet here its
    // fall-back to Docker Hub fails, so success proves ociedge served the image.
    let ok = run(&["docker", &proxy.host(), "library/small:1.0", SMALL]);
    run(&["docker-stop"]);
    assert!(ok, "docker pull through registry-mirrors: {}", proxy.log());
    assert!(
        proxy.log().contains("/v2/library/small/manifests/1.0"),
        "the daemon asked ociedge"
    );
}

// ---------------------------------------------------------------------------------------------
// Graceful shutdown

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry"]
async fn sigterm_lets_a_large_transfer_finish() {
    const SIZE: usize = 256 << 20;
    let origin = Origin::start();
    let data = random_bytes(SIZE, 42);
    let want = sha256_hex(&data);
    let digest = push_blob(&origin.url(), "library/big", data).await;
    let mut proxy = Proxy::start(
        &Config::mirror(&origin.url())
            .limits("shutdown_grace", "60s")
            .render(),
    );
    let r = client()
        .get(proxy.url(&format!("/v2/library/big/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    let mut got = 0usize;
    let mut termed: Option<Instant> = None;
    let start = Instant::now();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.expect("the transfer completes after SIGTERM");
        sha2::Digest::update(&mut hasher, &chunk);
        got += chunk.len();
        // About 24 MB/s (11 s in all, longer than the fill): SIGTERM lands in the middle, and the
        // response outlives both the signal and the fill.
        let due = Duration::from_secs_f64(got as f64 / 24e6);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        if termed.is_none() && got >= SIZE / 4 {
            signal(&proxy, "-TERM");
            termed = Some(Instant::now());
            // New connections are refused once the signal is handled.
            let refused = eventually(Duration::from_secs(5), async || {
                std::net::TcpStream::connect(("127.0.0.1", proxy.port)).is_err()
            })
            .await;
            assert!(refused, "the listener closes on SIGTERM");
        }
    }
    let termed = termed.expect("SIGTERM sent");
    assert_eq!(got, SIZE);
    assert_eq!(hex::encode(sha2::Digest::finalize(hasher)), want);
    assert!(
        termed.elapsed() > Duration::from_secs(1),
        "the transfer outlived the signal"
    );
    let st = wait_exit(&mut proxy, Duration::from_secs(60) - termed.elapsed())
        .expect("ociedge exits before its deadline");
    assert!(st.success(), "exit status {st:?}: {}", proxy.log());
}

/// A blob upstream that sends `data` in `chunk`-byte pieces every `every`: a fill that takes
/// seconds.
async fn slow_upstream(data: Bytes, chunk: usize, every: Duration) -> u16 {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let data = data.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                    let data = data.clone();
                    async move {
                        type B = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;
                        let blob = req.uri().path().contains("/blobs/");
                        let status = if blob || req.uri().path() == "/v2/" {
                            200
                        } else {
                            404
                        };
                        let len = if blob { data.len() } else { 0 };
                        let body: B = if blob && req.method() == http::Method::GET {
                            let pieces: Vec<Bytes> = (0..data.len())
                                .step_by(chunk)
                                .map(|i| data.slice(i..(i + chunk).min(data.len())))
                                .collect();
                            let s = futures::stream::iter(pieces).then(move |p| async move {
                                tokio::time::sleep(every).await;
                                Ok::<_, std::io::Error>(Frame::data(p))
                            });
                            BodyExt::boxed(StreamBody::new(s))
                        } else {
                            http_body_util::Empty::new().map_err(|e| match e {}).boxed()
                        };
                        let r = http::Response::builder()
                            .status(status)
                            .header("content-length", len)
                            .body(body)
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                .await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_for_fills_in_flight() {
    // 8 MiB in 64 KiB pieces every 25 ms: a fill of about 3 s.
    let data = Bytes::from(random_bytes(8 << 20, 9));
    let digest = format!("sha256:{}", sha256_hex(&data));
    let up = slow_upstream(data.clone(), 64 << 10, Duration::from_millis(25)).await;
    let mut proxy = Proxy::start(
        &Config::mirror(&format!("http://127.0.0.1:{up}"))
            .limits("shutdown_grace", "30s")
            .render(),
    );
    let r = client()
        .get(proxy.url(&format!("/v2/library/x/blobs/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    body.next()
        .await
        .expect("first bytes")
        .expect("first bytes");
    // The client goes away; its fill goes on, detached.
    drop(body);
    let termed = Instant::now();
    signal(&proxy, "-TERM");
    let st = wait_exit(&mut proxy, Duration::from_secs(30)).expect("exits within the grace");
    assert!(st.success(), "exit status {st:?}: {}", proxy.log());
    assert!(
        termed.elapsed() > Duration::from_secs(1),
        "exited before the fill could finish ({:?})",
        termed.elapsed()
    );
    let blob = proxy.blob_path(&digest);
    assert!(
        blob.exists(),
        "the fill was committed before exit: {}",
        proxy.log()
    );
    assert_eq!(format!("sha256:{}", sha256_file(&blob)), digest);
}

// ---------------------------------------------------------------------------------------------
// Limits

/// Reads until the server closes (EOF or reset); the time that took, or `None` at `limit`.
async fn closed_after(mut s: tokio::net::TcpStream, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    let mut buf = [0u8; 4096];
    let r = tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    r.ok().map(|()| t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_loris_connections_are_closed_and_others_served() {
    let up = common::fake::FakeUpstream::default().start().await;
    let pki = Pki::new();
    let plain = free_port();
    let cfg = tls_mirror(&format!("http://127.0.0.1:{up}"))
        .tls_option("plain_listen", &format!("127.0.0.1:{plain}"))
        .limits("header_read_timeout", "3s")
        .limits("idle_timeout", "3s")
        .render();
    let (proxy, _) = start_tls(&pki, 1, &cfg);
    let mut idle = Vec::new();
    // 200 clients that send half a request head and stop.
    for _ in 0..200 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", plain))
            .await
            .unwrap();
        s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        idle.push(s);
    }
    // Connections to the TLS port that never finish a handshake: half a ClientHello, or nothing.
    for i in 0..20 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
            .await
            .unwrap();
        if i % 2 == 0 {
            s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
                .await
                .unwrap();
        }
        idle.push(s);
    }
    // An HTTP/2 client that sends its preface and settings and never a request.
    let mut h2 = tokio::net::TcpStream::connect(("127.0.0.1", plain))
        .await
        .unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    idle.push(h2);
    let opened = Instant::now();
    let watchers: Vec<_> = idle
        .into_iter()
        .map(|s| tokio::spawn(closed_after(s, Duration::from_secs(20))))
        .collect();

    // A normal client is served at once, over TLS and over the plain listener.
    let t = Instant::now();
    let r = pki
        .client()
        .get(format!("https://127.0.0.1:{}/v2/", proxy.port))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client()
        .get(format!("http://127.0.0.1:{plain}/v2/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "normal clients waited {:?}",
        t.elapsed()
    );
    assert!(
        watchers.iter().all(|w| !w.is_finished()),
        "no idle connection is closed before its timeout"
    );
    let mut latest = Duration::ZERO;
    for (i, w) in watchers.into_iter().enumerate() {
        let took = w
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("idle connection {i} still open after 20s"));
        latest = latest.max(took);
    }
    let since_open = opened.elapsed();
    assert!(
        since_open >= Duration::from_millis(2500),
        "closed before the 3s timeout ({since_open:?})"
    );
    // The header timeout (3s) plus, for HTTP/2, the wait for its GOAWAY to be honoured (3s).
    assert!(
        latest < Duration::from_secs(10),
        "slowest close took {latest:?}"
    );
    // Still serving.
    let r = client()
        .get(format!("http://127.0.0.1:{plain}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// HTTP/2 (prior knowledge, with hyper's own client, which honours GOAWAY): a download that
/// outlasts `idle_timeout` is not cut, and the connection is closed `idle_timeout` after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_connections_close_when_idle_not_while_busy() {
    use http_body_util::BodyExt;
    // 2 MiB in 64 KiB pieces every 120 ms: about 4 s, twice the idle timeout.
    let data = Bytes::from(random_bytes(2 << 20, 5));
    let digest = format!("sha256:{}", sha256_hex(&data));
    let up = slow_upstream(data, 64 << 10, Duration::from_millis(120)).await;
    let proxy = Proxy::start(
        &Config::mirror(&format!("http://127.0.0.1:{up}"))
            .limits("header_read_timeout", "1s")
            .limits("idle_timeout", "2s")
            .render(),
    );
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let closed = tokio::spawn(async move {
        let _ = conn.await;
        Instant::now()
    });
    let req = http::Request::get(proxy.url(&format!("/v2/library/x/blobs/{digest}")))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let started = Instant::now();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("not cut")
        .to_bytes();
    let done = Instant::now();
    assert_eq!(format!("sha256:{}", sha256_hex(&body)), digest);
    assert!(
        done - started > Duration::from_secs(3),
        "the download outlasted idle_timeout ({:?})",
        done - started
    );
    let closed_at = tokio::time::timeout(Duration::from_secs(15), closed)
        .await
        .expect("the idle connection is closed")
        .unwrap();
    let idle = closed_at - done;
    assert!(
        idle >= Duration::from_millis(1500) && idle < Duration::from_secs(6),
        "closed {idle:?} after the last response (idle_timeout 2s)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_queues_new_clients_until_a_slot_frees() {
    let up = common::fake::FakeUpstream::default().start().await;
    let proxy = Proxy::start(
        &Config::mirror(&format!("http://127.0.0.1:{up}"))
            .limits("max_connections", "3")
            .limits("header_read_timeout", "2s")
            .render(),
    );
    let mut hogs = Vec::new();
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
            .await
            .unwrap();
        s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        hogs.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    // (health checks are answered at once even at the cap: bounded.rs)
    let (status, _) = raw_get(&proxy.host(), "/v2/", "").await;
    let waited = t.elapsed();
    assert_eq!(status, 200);
    assert!(
        waited >= Duration::from_millis(1200),
        "a fourth connection was served beside three at max_connections: 3 ({waited:?})"
    );
    assert!(
        waited < Duration::from_secs(8),
        "the queued client waited {waited:?}"
    );
    assert!(proxy.log().contains("max_connections reached"));
    drop(hogs);
}

#[test]
fn a_request_head_over_the_limit_is_refused() {
    let proxy = Proxy::start(
        &Config::mirror("http://127.0.0.1:9")
            .limits("max_header_size", "16KiB")
            .render(),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let big = format!("X-Big: {}\r\n", "a".repeat(20 << 10));
    let (status, _) = rt.block_on(raw_get(&proxy.host(), "/healthz", &big));
    assert_eq!(status, 431);
    let small = format!("X-Big: {}\r\n", "a".repeat(8 << 10));
    let (status, _) = rt.block_on(raw_get(&proxy.host(), "/healthz", &small));
    assert_eq!(status, 200);
}

// ---------------------------------------------------------------------------------------------
// Logs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_request_id() {
    let data = random_bytes(200_000, 3);
    let digest = format!("sha256:{}", sha256_hex(&data));
    let up = common::fake::FakeUpstream::default();
    up.blobs
        .lock()
        .unwrap()
        .insert(digest.clone(), Bytes::from(data));
    let up_port = up.start().await;
    let proxy = Proxy::start_with(
        &mirror_config(&format!("http://127.0.0.1:{up_port}"), ""),
        tempfile::tempdir().unwrap(),
        &["--log-format", "json"],
    );
    let c = client();
    let get = |path: String, id: &'static str| {
        let c = c.clone();
        let url = proxy.url(&path);
        async move {
            let r = c.get(url).header("x-request-id", id).send().await.unwrap();
            assert_eq!(r.headers()["x-request-id"], id);
            let st = r.status().as_u16();
            let _ = r.bytes().await;
            st
        }
    };
    let blob = format!("/v2/library/x/blobs/{digest}");
    assert_eq!(get(blob.clone(), "t-miss").await, 200);
    assert!(
        eventually(Duration::from_secs(10), async || proxy
            .blob_path(&digest)
            .exists())
        .await
    );
    assert_eq!(get(blob, "t-hit").await, 200);
    let unknown = format!("/v2/library/x/blobs/sha256:{}", "0".repeat(64));
    assert_eq!(get(unknown, "t-unknown").await, 404);
    let bad = get("/v2/Bad..Name/blobs/x".into(), "t-bad").await;
    assert!((400..500).contains(&bad), "{bad}");
    // The last request's line is written once its response is sent.
    assert!(
        eventually(Duration::from_secs(30), async || proxy.log().lines().any(
            |l| l.contains("t-bad") && l.contains("\"message\":\"request\"")
        ))
        .await,
        "the last request was logged: {}",
        proxy.log()
    );

    let log = proxy.log();
    let mut seen = std::collections::HashSet::new();
    let mut request_lines = 0;
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let spans = v["spans"].as_array().cloned().unwrap_or_default();
        let id = spans
            .iter()
            .find(|s| s["name"] == "request")
            .and_then(|s| s["id"].as_str());
        let target = v["target"].as_str().unwrap_or_default();
        // Everything logged on the request path (the HTTP handlers, the pull path and the fill
        // a request started) carries the id of its request.
        let request_path = target.starts_with("ociedge::pull")
            || (target.starts_with("ociedge::http") && !target.starts_with("ociedge::http::tls"));
        let conn_level = spans.iter().any(|s| s["name"] == "conn") && id.is_none();
        if request_path && !conn_level {
            let id =
                id.unwrap_or_else(|| panic!("a request-path line without a request id: {line}"));
            seen.insert(id.to_string());
            request_lines += 1;
        } else if let Some(id) = id {
            seen.insert(id.to_string());
        }
    }
    for id in ["t-miss", "t-hit", "t-unknown", "t-bad"] {
        assert!(
            seen.contains(id),
            "no log line with request id {id}:\n{log}"
        );
    }
    assert!(request_lines >= 4, "{log}");
}

// ---------------------------------------------------------------------------------------------
// Config and deployment

fn check_config(yaml: &str) -> (bool, String) {
    check_config_env(yaml, &[])
}

/// [`check_config`] with these environment variables set.
fn check_config_env(yaml: &str, envs: &[(&str, &str)]) -> (bool, String) {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("c.yaml");
    std::fs::write(&f, yaml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ociedge"))
        .args(["check-config", "--config"])
        .arg(&f)
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn tls_limits_and_ca_file_are_typed_and_checked() {
    let base = "storage:\n  preference: a\n  engines:\n    a: { url: \"memory://\" }\n";
    let (ok, out) = check_config(&format!(
        "{base}tls: {{ cert: /c.pem, key: /k.pem, plain_listen: 127.0.0.1:5080 }}\nlimits: {{ max_connections: 100, idle_timeout: 2m }}\nupstreams:\n  - {{ name: r.example, url: \"https://r.example\", ca_file: /ca.pem }}\n"
    ));
    assert!(ok, "{out}");
    for want in [
        "cert: /c.pem",
        "plain_listen: 127.0.0.1:5080",
        "reload_interval: 5s",
        "max_connections: 100",
        "idle_timeout: 2m",
        "header_read_timeout: 10s",
        "ca_file: /ca.pem",
    ] {
        assert!(out.contains(want), "{want} in:\n{out}");
    }
    let cases = [
        ("tls: { cert: /c, key: /k, colour: red }\n", "tls"),
        ("tls: { cert: /c }\n", "tls"),
        (
            "tls: { cert: /c, key: /k, plain_listen: 0.0.0.0:5000 }\n",
            "tls.plain_listen",
        ),
        ("limits: { max_connections: 0 }\n", "limits.max_connections"),
        (
            "limits: { header_read_timeout: 0s }\n",
            "limits.header_read_timeout",
        ),
        (
            "limits: { max_header_size: 1KiB }\n",
            "limits.max_header_size",
        ),
        ("limits: { slowness: 1 }\n", "limits"),
    ];
    for (extra, key) in cases {
        let (ok, out) = check_config(&format!("{base}{extra}"));
        assert!(!ok, "accepted: {extra}");
        assert!(out.contains(key), "expected {key} in: {out}");
    }
    // Files are read when serving: a missing certificate stops the start with its key path.
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("c.yaml");
    std::fs::write(
        &f,
        format!("listen: 127.0.0.1:{}\n{base}tls: {{ cert: /nonexistent/c.pem, key: /nonexistent/k.pem }}\n", free_port()),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ociedge"))
        .args(["serve", "--config"])
        .arg(&f)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tls.cert: /nonexistent/c.pem"));
    // So is an upstream CA file.
    std::fs::write(
        &f,
        format!("listen: 127.0.0.1:{}\n{base}upstreams:\n  - {{ name: r.example, url: \"https://127.0.0.1:9\", ca_file: /nonexistent/ca.pem }}\n", free_port()),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ociedge"))
        .args(["serve", "--config"])
        .arg(&f)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ca_file: /nonexistent/ca.pem"), "{err}");
}

/// The Kubernetes example: its config is valid, its probes and ports agree with that config.
#[test]
fn the_kubernetes_example_is_consistent() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let mut docs: Vec<serde_json::Value> = Vec::new();
    for e in std::fs::read_dir(&dir).expect("deploy/kubernetes") {
        let p = e.unwrap().path();
        if p.extension().and_then(|x| x.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap();
        for d in serde_yaml_ng::Deserializer::from_str(&text) {
            let v: serde_json::Value = serde::Deserialize::deserialize(d)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            if !v.is_null() {
                docs.push(v);
            }
        }
    }
    let kind = |k: &str| {
        docs.iter()
            .find(|d| d["kind"] == k)
            .unwrap_or_else(|| panic!("no {k} in deploy/kubernetes"))
            .clone()
    };
    let cm = kind("ConfigMap");
    let config = cm["data"]["ociedge.yaml"]
        .as_str()
        .expect("ConfigMap data ociedge.yaml");
    let parsed: serde_json::Value = serde_yaml_ng::from_str(config).unwrap();
    // What the Deployment sets in the environment (the downward API's pod IP, the secret).
    let (ok, out) = check_config_env(
        config,
        &[
            ("OCIEDGE_CLUSTER_SECRET", "x"),
            ("OCIEDGE_CLUSTER_ADVERTISE", "http://10.0.0.5:5080"),
        ],
    );
    assert!(ok, "the ConfigMap's config: {out}");
    let port_of = |addr: &serde_json::Value| -> u64 {
        addr.as_str()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };

    let dep = kind("Deployment");
    let pod = &dep["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let ports: Vec<u64> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_u64().unwrap())
        .collect();
    assert!(
        ports.contains(&port_of(&parsed["listen"])),
        "listen port exposed"
    );
    let probe_port = |probe: &serde_json::Value| -> u64 {
        let p = &probe["httpGet"]["port"];
        p.as_u64().unwrap_or_else(|| {
            c["ports"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["name"] == *p)
                .and_then(|x| x["containerPort"].as_u64())
                .expect("named probe port")
        })
    };
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    for probe in [&c["readinessProbe"], &c["livenessProbe"]] {
        let port = probe_port(probe);
        assert!(
            ports.contains(&port),
            "probe port {port} is a container port"
        );
        let scheme = probe["httpGet"]["scheme"].as_str().unwrap_or("HTTP");
        let expect = if parsed["tls"].is_null() || port == port_of(&parsed["tls"]["plain_listen"]) {
            "HTTP"
        } else {
            "HTTPS"
        };
        assert_eq!(scheme, expect, "probe scheme for port {port}");
    }
    // The config comes from the ConfigMap, the data lives on a volume.
    let args: Vec<String> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let cfg_path = &args[args.iter().position(|a| a == "--config").unwrap() + 1];
    let mounts = c["volumeMounts"].as_array().unwrap();
    assert!(
        mounts
            .iter()
            .any(|m| cfg_path.starts_with(m["mountPath"].as_str().unwrap())),
        "the --config file is on a mounted volume"
    );
    let data_url = parsed["storage"]["engines"][parsed["storage"]["preference"].as_str().unwrap()]
        ["url"]
        .as_str()
        .unwrap()
        .to_string();
    if let Some(data_path) = data_url.strip_prefix("file://") {
        assert!(
            mounts
                .iter()
                .any(|m| data_path.starts_with(m["mountPath"].as_str().unwrap())),
            "the local engine {data_path} is on a mounted volume"
        );
    }
    // A region on one engine: every replica reaches the others at its pod IP, with the secret.
    if !parsed["cluster"].is_null() {
        let env = c["env"].as_array().expect("env");
        let named = |n: &str| env.iter().find(|e| e["name"] == n).cloned();
        let advertise = named("OCIEDGE_CLUSTER_ADVERTISE").expect("advertise from the env");
        assert!(advertise["value"].as_str().unwrap().contains("$(POD_IP)"));
        assert_eq!(
            named("POD_IP").expect("POD_IP")["valueFrom"]["fieldRef"]["fieldPath"],
            "status.podIP"
        );
        let secret_env = parsed["cluster"]["secret_env"].as_str().unwrap();
        assert!(named(secret_env).is_some(), "{secret_env} is set");
    }
    // SIGTERM grace: Kubernetes must wait at least as long as ociedge drains.
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
    let drain = parsed["limits"]["shutdown_grace"]
        .as_str()
        .map(|s| s.trim_end_matches('s').parse::<u64>().unwrap())
        .unwrap_or(30);
    assert!(
        grace > drain,
        "terminationGracePeriodSeconds {grace} <= shutdown_grace {drain}"
    );

    let svc = kind("Service");
    for p in svc["spec"]["ports"].as_array().unwrap() {
        let target = &p["targetPort"];
        let ok = match target.as_u64() {
            Some(n) => ports.contains(&n),
            None => c["ports"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["name"] == *target),
        };
        assert!(ok, "Service targetPort {target} is a container port");
    }
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    assert!(
        readme.contains("deploy/kubernetes"),
        "README mentions the example"
    );
}
