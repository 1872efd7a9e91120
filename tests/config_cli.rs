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
