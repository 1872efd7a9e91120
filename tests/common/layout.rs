//! Checks a directory in the Distribution layout: no tag whose manifest or blobs are missing.

use std::path::{Path, PathBuf};

fn blob(root: &Path, digest: &str) -> PathBuf {
    let (alg, hex) = digest.split_once(':').expect("digest");
    root.join(format!(
        "docker/registry/v2/blobs/{alg}/{}/{hex}/data",
        &hex[..2]
    ))
}

/// Every (repo, tag, digest) in the layout.
pub fn tags(root: &Path) -> Vec<(String, String, String)> {
    let repos = root.join("docker/registry/v2/repositories");
    let mut out = Vec::new();
    let mut stack = vec![repos.clone()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name == "_manifests" {
                let repo = dir
                    .strip_prefix(&repos)
                    .unwrap()
                    .to_string_lossy()
                    .to_string();
                let Ok(tags) = std::fs::read_dir(e.path().join("tags")) else {
                    continue;
                };
                for t in tags.flatten() {
                    let link = t.path().join("current/link");
                    // A tag link is written whole (rename), so it is either there or not.
                    if let Ok(d) = std::fs::read_to_string(&link) {
                        out.push((
                            repo.clone(),
                            t.file_name().to_string_lossy().to_string(),
                            d.trim().to_string(),
                        ));
                    }
                }
            } else if !name.starts_with('_') && e.path().is_dir() {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// Whether the manifest `digest` and everything it references are present (recursively).
pub fn complete(root: &Path, digest: &str) -> Result<(), String> {
    let data =
        std::fs::read(blob(root, digest)).map_err(|_| format!("manifest {digest} missing"))?;
    let v: serde_json::Value =
        serde_json::from_slice(&data).map_err(|e| format!("manifest {digest}: {e}"))?;
    if let Some(ms) = v["manifests"].as_array() {
        for m in ms {
            complete(root, m["digest"].as_str().unwrap_or(""))?;
        }
    }
    let mut blobs: Vec<&str> = v["layers"]
        .as_array()
        .map(|l| l.iter().filter_map(|d| d["digest"].as_str()).collect())
        .unwrap_or_default();
    if let Some(c) = v["config"]["digest"].as_str() {
        blobs.push(c);
    }
    for b in blobs {
        if !blob(root, b).exists() {
            return Err(format!("blob {b} of {digest} missing"));
        }
    }
    Ok(())
}

/// Panics if any tag in the layout points at incomplete content.
pub fn assert_no_dangling_tags(root: &Path) {
    for (repo, tag, digest) in tags(root) {
        if let Err(e) = complete(root, &digest) {
            panic!("{}: {repo}:{tag} -> {e}", root.display());
        }
    }
}
