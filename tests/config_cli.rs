//! The command line and the config file: check-config on the default and the examples, precise
//! errors, the storage preference override, and the Dockerfile building as the README says.

use std::process::Command;

fn ociedge(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ociedge"))
        .args(args)
        .output()
        .expect("run ociedge");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_prints_the_embedded_default() {
    let (ok, out, err) = ociedge(&["check-config"]);
    assert!(ok, "{err}");
    assert!(out.contains("listen: 0.0.0.0:5000"), "{out}");
    assert!(out.contains("file://./ociedge-data"));
    assert!(out.contains("https://registry-1.docker.io"));
}

#[test]
fn every_example_config_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut files: Vec<_> = std::fs::read_dir(dir.join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.push(dir.join("ociedge.yaml"));
    files.push(dir.join("container.yaml"));
    for f in files {
        let (ok, _, err) = ociedge(&["check-config", "--config", f.to_str().unwrap()]);
        assert!(ok, "{}: {err}", f.display());
    }
}

#[test]
fn errors_name_the_key_and_exit_1() {
    let d = tempfile::tempdir().unwrap();
    let cases = [
        ("storage:\n  preference: a\n  engines:\n    a: { url: \"memory://\" }\ncache: { tag_ttl: 60s, max_size: lots }\n", "cache.max_size"),
        ("storage:\n  preference: a\n  engines:\n    a: { url: \"memory://\", colour: blue }\n", "storage.engines.a"),
        ("listen: nowhere\nstorage:\n  preference: a\n  engines:\n    a: { url: \"memory://\" }\n", "listen"),
        ("storage:\n  preference: b\n  engines:\n    a: { url: \"memory://\" }\n", "storage.preference"),
        ("storage:\n  preference: a\n  engines:\n    a: { url: \"memory://\" }\nupstreams:\n  - { name: x, url: \"ftp://x\" }\n", "upstreams[0].url"),
        ("storage:\n  preference: a\n  engines:\n    a: { url: \"memory://\" }\nupstreams:\n  - { name: x, url: \"https://x\", auth: { username: u, password: p } }\n", "upstreams[0].access"),
    ];
    for (i, (yaml, key)) in cases.iter().enumerate() {
        let f = d.path().join(format!("c{i}.yaml"));
        std::fs::write(&f, yaml).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_ociedge"))
            .args(["check-config", "--config", f.to_str().unwrap()])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{yaml}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "expected {key} in: {err}");
    }
}

#[test]
fn storage_preference_comes_from_the_environment() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("c.yaml");
    std::fs::write(&f, "storage:\n  preference: eu\n  engines:\n    eu: { url: \"memory://\" }\n    us: { url: \"memory://\" }\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ociedge"))
        .args(["check-config", "--config", f.to_str().unwrap()])
        .env("OCIEDGE_STORAGE_PREFERENCE", "us")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("preference: us"));
    let out = Command::new(env!("CARGO_BIN_EXE_ociedge"))
        .args(["check-config", "--config", f.to_str().unwrap()])
        .env("OCIEDGE_STORAGE_PREFERENCE", "mars")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn the_dockerfile_builds_as_the_readme_says() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let build = dockerfile
        .lines()
        .find(|l| l.starts_with("RUN cargo build"))
        .expect("a RUN cargo build line");
    let cmd = build.trim_start_matches("RUN ").trim();
    assert_eq!(cmd, "cargo build --release --locked");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(
        readme.contains("cargo build --release --locked"),
        "README documents the build command"
    );
    assert!(dockerfile.contains("HEALTHCHECK") && dockerfile.contains("USER ociedge"));
}

/// Every duration at the largest value check-config accepts: `serve` starts and answers (a
/// duration check-config accepted used to panic at start or in every connection task).
#[test]
fn serve_runs_with_every_duration_at_its_bound() {
    use std::io::{Read, Write};
    let d = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let yaml = format!(
        "listen: 127.0.0.1:{port}\nstorage:\n  preference: a\n  engines:\n    a: {{ url: \"file://{dir}/data\" }}\n  probe: {{ interval: 10years, timeout: 10years }}\n  redirect_blobs: 10years\ncache: {{ tag_ttl: 10years, max_stale: 10years, min_idle: 10years, stale_uploads: 10years, max_size: 1024TiB }}\nlimits: {{ header_read_timeout: 10years, idle_timeout: 10years, shutdown_grace: 10years }}\n",
        dir = d.path().display()
    );
    let f = d.path().join("c.yaml");
    std::fs::write(&f, &yaml).unwrap();
    let (ok, _, err) = ociedge(&["check-config", "--config", f.to_str().unwrap()]);
    assert!(ok, "{err}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ociedge"))
        .args(["serve", "--config", f.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut answer = String::new();
    while std::time::Instant::now() < deadline {
        assert!(child.try_wait().unwrap().is_none(), "serve exited");
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .unwrap();
            let _ = s.read_to_string(&mut answer);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let alive = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(alive, "serve still runs after a request");
}

#[test]
fn an_endless_config_file_is_refused_quickly() {
    let started = std::time::Instant::now();
    let (ok, _, err) = ociedge(&["check-config", "--config", "/dev/zero"]);
    assert!(!ok);
    assert!(err.contains("/dev/zero"), "{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}
