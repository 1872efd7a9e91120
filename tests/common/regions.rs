//! Regions and object stores: network namespaces with real round-trip times
//! (`../shared/harness/regions.sh`), moto S3 servers inside them or on loopback, delay lines
//! (`delayproxy.py`), and docker-registry writing its layout into a bucket.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, harness};

fn tools_dir() -> PathBuf {
    std::env::var_os("HARNESS_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/ociedge-harness-tools")
        })
}

/// moto_server, installed into the harness's venv the first time (as `s3.sh --impl moto` does).
pub fn moto_bin() -> PathBuf {
    if let Ok(p) = which("moto_server") {
        return p;
    }
    let venv = tools_dir().join("venv-moto");
    let bin = venv.join("bin/moto_server");
    std::fs::create_dir_all(tools_dir()).expect("tools dir");
    let lock = std::fs::File::create(tools_dir().join("venv-moto.lock")).expect("lock");
    lock.lock().expect("lock");
    if !bin.exists() {
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 -m venv")
            .success()
            && Command::new(venv.join("bin/pip"))
                .args(["install", "-q", "moto[server]"])
                .status()
                .expect("pip")
                .success();
        assert!(ok, "could not install moto[server]");
    }
    bin
}

fn which(cmd: &str) -> Result<PathBuf, ()> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .output()
        .map_err(|_| ())?;
    if out.status.success() {
        Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    } else {
        Err(())
    }
}

fn wait_port(host: &str, port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect((host, port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start on {host}:{port}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Network namespaces `edge-NAME` with the given round-trip times; removed on drop. Only one test
/// may hold regions at a time (regions.sh removes regions it was not asked for).
pub struct Regions {
    state: tempfile::TempDir,
}

impl Regions {
    /// `specs` like `["near:10", "far:80:200mbit"]`.
    pub fn up(specs: &[&str]) -> Regions {
        let state = tempfile::tempdir().expect("tempdir");
        let ok = Command::new("bash")
            .arg(harness().join("regions.sh"))
            .arg("up")
            .args(specs)
            .env("HARNESS_STATE", state.path())
            .status()
            .expect("regions.sh")
            .success();
        assert!(
            ok,
            "regions.sh up {specs:?} failed (needs root and iptables)"
        );
        Regions { state }
    }

    /// The address of region `name` (`10.251.i.2`).
    pub fn ip(&self, name: &str) -> String {
        let out = Command::new("bash")
            .arg(harness().join("regions.sh"))
            .args(["ip", name])
            .env("HARNESS_STATE", self.state.path())
            .output()
            .expect("regions.sh ip");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Regions {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(harness().join("regions.sh"))
            .arg("down")
            .env("HARNESS_STATE", self.state.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A moto S3 server with a bucket `registry`, in a region's namespace or on loopback.
pub struct Moto {
    child: Option<Child>,
    pub host: String,
    pub port: u16,
}

impl Moto {
    /// On `ip` inside namespace `edge-<region>` (or on loopback when `region` is `None`).
    pub fn start(region: Option<&str>, ip: &str) -> Moto {
        let port = if region.is_some() { 9000 } else { free_port() };
        let bin = moto_bin();
        let mut cmd = match region {
            Some(r) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &format!("edge-{r}")]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let child = cmd
            .args(["-H", ip, "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server");
        let m = Moto {
            child: Some(child),
            host: ip.to_string(),
            port,
        };
        wait_port(ip, port, "moto");
        // moto accepts any credentials, and unsigned requests.
        let ok = Command::new("curl")
            .args([
                "-s",
                "-f",
                "-o",
                "/dev/null",
                "-X",
                "PUT",
                &format!("{}/registry", m.endpoint()),
            ])
            .status()
            .expect("curl")
            .success();
        assert!(ok, "bucket creation failed");
        m
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }

    /// The engine config line for ociedge, through `endpoint` (default: the server itself).
    pub fn engine_yaml(&self, endpoint: Option<&str>) -> String {
        let ep = endpoint
            .map(str::to_string)
            .unwrap_or_else(|| self.endpoint());
        format!("{{ url: \"s3://registry\", options: {{ endpoint: \"{ep}\", region: us-east-1, access_key_id: harness, secret_access_key: harness-secret, allow_http: \"true\" }} }}")
    }

    /// The engine `id` of ociedge's config for this bucket, through `endpoint` (default: the
    /// server itself).
    pub fn engine(&self, id: &str, endpoint: Option<&str>) -> super::config::Engine {
        let ep = endpoint
            .map(str::to_string)
            .unwrap_or_else(|| self.endpoint());
        super::config::Engine::s3(id, &ep)
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `delayproxy.py`: a loopback TCP delay line (each direction `delay_ms`) to `target_port`.
pub struct DelayLine {
    child: Child,
    pub port: u16,
}

impl DelayLine {
    pub fn start(port: u16, target_port: u16, delay_ms: u64) -> DelayLine {
        DelayLine::start_limited(port, target_port, delay_ms, None)
    }

    /// Like [`DelayLine::start`], each direction of each connection capped at `bytes_per_s`
    /// (a slow WAN link: fills through it stay in flight long enough to be watched).
    pub fn start_limited(
        port: u16,
        target_port: u16,
        delay_ms: u64,
        bytes_per_s: Option<u64>,
    ) -> DelayLine {
        let mut cmd = Command::new("python3");
        cmd.arg(harness().join("delayproxy.py")).args([
            port.to_string(),
            target_port.to_string(),
            delay_ms.to_string(),
        ]);
        if let Some(rate) = bytes_per_s {
            cmd.args(["--rate".to_string(), rate.to_string()]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("delayproxy.py");
        wait_port("127.0.0.1", port, "delayproxy");
        DelayLine { child, port }
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
