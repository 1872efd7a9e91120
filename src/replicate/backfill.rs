//! `ociedge backfill --to ENGINE [--from ENGINE] [--repo GLOB]`: copy everything the target
//! lacks, repository by repository, in the replication order (blobs, manifests, tags). Idempotent,
//! so an interrupted run is resumed by running it again, and a second run copies nothing.

use std::sync::Arc;
use std::time::Duration;

use object_store::path::Path;

use super::copy::{Copied, Copier};
use crate::engine::storage::StorageEngine;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::oci::{Digest, RepoName, Tag};

const REPOS: &str = "docker/registry/v2/repositories";

/// What a backfill did.
#[derive(Debug, Default)]
pub struct Summary {
    pub repositories: usize,
    pub tags: usize,
    pub copied: Copied,
    pub failures: Vec<String>,
}

/// Every repository in a storage engine: directories under `repositories/` that hold
/// `_manifests` (found by listing, never by reading blobs).
pub async fn repositories(engine: &StorageEngine) -> Result<Vec<RepoName>> {
    let mut out = Vec::new();
    let mut stack = vec![Path::from(REPOS)];
    while let Some(dir) = stack.pop() {
        let children = engine.list_dirs(&dir).await?;
        let mut is_repo = false;
        for c in &children {
            match c.filename() {
                Some("_manifests") => is_repo = true,
                Some(n) if n.starts_with('_') => {}
                Some(_) => stack.push(c.clone()),
                None => {}
            }
        }
        if is_repo {
            let name = dir
                .as_ref()
                .strip_prefix(REPOS)
                .unwrap_or("")
                .trim_start_matches('/');
            if let Ok(r) = name.parse() {
                out.push(r);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The manifest digests a repository has revisions for: where the revision's `link` exists (a
/// filesystem keeps the emptied directory of a deleted one, which must not bring it back).
pub async fn revisions(engine: &StorageEngine, repo: &RepoName) -> Result<Vec<Digest>> {
    let mut out = Vec::new();
    for alg in ["sha256", "sha512"] {
        let dir = Path::from(format!("{REPOS}/{repo}/_manifests/revisions/{alg}"));
        let prefix = format!("{}/", dir.as_ref());
        for (p, _) in engine.list_objects(&dir).await? {
            let Some(hex) = p
                .as_ref()
                .strip_prefix(&prefix)
                .and_then(|r| r.strip_suffix("/link"))
            else {
                continue;
            };
            if let Ok(digest) = format!("{alg}:{hex}").parse::<Digest>() {
                out.push(digest);
            }
        }
    }
    Ok(out)
}

/// A `**`/`*` glob on repository names (`*` stays within a path component).
pub fn glob_match(glob: &str, name: &str) -> bool {
    globset::GlobBuilder::new(glob)
        .literal_separator(true)
        .build()
        .map(|g| g.compile_matcher().is_match(name))
        .unwrap_or(false)
}

/// Copies what `to` lacks from `from`. `progress` is told about each repository as it starts.
pub async fn run(
    from: &Arc<StorageEngine>,
    to: &Arc<dyn Engine>,
    repo_glob: Option<&str>,
    copier: &Copier,
    mut progress: impl FnMut(usize, usize, Option<&RepoName>, &Copied),
) -> Result<Summary> {
    let src: Arc<dyn Engine> = from.clone();
    let mut repos = repositories(from).await?;
    if let Some(g) = repo_glob {
        repos.retain(|r| glob_match(g, r.as_str()));
    }
    let mut summary = Summary {
        repositories: repos.len(),
        ..Default::default()
    };
    let total = repos.len();
    for (i, repo) in repos.iter().enumerate() {
        progress(i, total, Some(repo), &summary.copied);
        // Untagged manifests first, then tags (each tag re-checks its manifest: cheap).
        for d in revisions(from, repo).await? {
            match with_retry(|| copier.manifest(&src, to, repo, &d)).await {
                Ok(c) => summary.copied += c,
                Err(e) => summary.failures.push(format!("{repo}@{d}: {e}")),
            }
        }
        for tag in src.list_tags(repo).await?.unwrap_or_default() {
            let Ok(tag) = tag.parse::<Tag>() else {
                continue;
            };
            let Some(link) = src.tag_link(repo, &tag).await? else {
                continue;
            };
            summary.tags += 1;
            match with_retry(|| copier.tag(&src, to, repo, &tag, &link.digest)).await {
                Ok(c) => summary.copied += c,
                Err(e) => summary.failures.push(format!("{repo}:{tag}: {e}")),
            }
        }
    }
    progress(total, total, None, &summary.copied);
    Ok(summary)
}

async fn with_retry<F, Fut>(mut f: F) -> Result<Copied>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Copied>>,
{
    let mut last = None;
    for attempt in 0..3u32 {
        match f().await {
            Ok(c) => return Ok(c),
            // Only what may pass is tried again.
            Err(e) if !(e.is_transient() || matches!(e, Error::DigestMismatch { .. })) => {
                return Err(e)
            }
            Err(e) => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(200 * (1 << attempt))).await;
            }
        }
    }
    Err(last.unwrap_or_else(|| Error::transient("backfill", "retries exhausted")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineExt;

    #[tokio::test]
    async fn a_deleted_manifest_is_no_revision_on_a_directory() {
        use crate::engine::Manifest;
        let dir = tempfile::tempdir().unwrap();
        let e = StorageEngine::open(
            "f",
            &format!("file://{}", dir.path().display()),
            &Default::default(),
        )
        .unwrap();
        let repo: RepoName = "team/app".parse().unwrap();
        let mk = |b: &'static [u8]| Manifest {
            digest: Digest::sha256_of(b),
            media_type: crate::oci::media::OCI_MANIFEST.to_string(),
            bytes: bytes::Bytes::from_static(b),
        };
        let (a, b) = (mk(b"{\"a\":1}"), mk(b"{\"b\":2}"));
        e.put_manifest(&repo, &a).await.unwrap();
        e.put_manifest(&repo, &b).await.unwrap();
        assert!(e.delete_manifest(&repo, &a.digest).await.unwrap());
        assert_eq!(revisions(&e, &repo).await.unwrap(), vec![b.digest]);
    }

    #[test]
    fn globs() {
        use super::glob_match;
        assert!(glob_match("team/**", "team/app/x"));
        assert!(glob_match("team/*", "team/app"));
        assert!(!glob_match("team/*", "team/app/x"));
        assert!(glob_match("**", "a/b"));
        assert!(!glob_match("library/*", "team/app"));
    }
}
