//! The CNCF Distribution storage layout, as pure path functions, so a bucket written by
//! docker-registry is served by ociedge as it is, and the other way round.
//!
//! ```text
//! docker/registry/v2/blobs/<alg>/<hex[0..2]>/<hex>/data
//! docker/registry/v2/repositories/<name>/_layers/<alg>/<hex>/link
//! docker/registry/v2/repositories/<name>/_manifests/revisions/<alg>/<hex>/link
//! docker/registry/v2/repositories/<name>/_manifests/tags/<tag>/current/link
//! docker/registry/v2/repositories/<name>/_manifests/tags/<tag>/index/<alg>/<hex>/link
//! ```
//! Link files hold the digest string. ociedge's own state lives beside, under `_ociedge/`, which
//! Distribution never reads.

use object_store::path::Path;

use crate::oci::{Digest, RepoName, Tag};

const ROOT: &str = "docker/registry/v2";

fn p(s: String) -> Path {
    // Names, tags and digests are validated: no empty segments, no `.`/`..`, nothing to escape.
    Path::from(s)
}

pub fn blob_data(d: &Digest) -> Path {
    p(format!(
        "{ROOT}/blobs/{}/{}/{}/data",
        d.algorithm(),
        &d.hex()[..2],
        d.hex()
    ))
}

pub fn layer_link(repo: &RepoName, d: &Digest) -> Path {
    p(format!(
        "{ROOT}/repositories/{repo}/_layers/{}/{}/link",
        d.algorithm(),
        d.hex()
    ))
}

pub fn revision_link(repo: &RepoName, d: &Digest) -> Path {
    p(format!(
        "{ROOT}/repositories/{repo}/_manifests/revisions/{}/{}/link",
        d.algorithm(),
        d.hex()
    ))
}

pub fn tag_current(repo: &RepoName, tag: &Tag) -> Path {
    p(format!(
        "{ROOT}/repositories/{repo}/_manifests/tags/{tag}/current/link"
    ))
}

pub fn tag_index(repo: &RepoName, tag: &Tag, d: &Digest) -> Path {
    p(format!(
        "{ROOT}/repositories/{repo}/_manifests/tags/{tag}/index/{}/{}/link",
        d.algorithm(),
        d.hex()
    ))
}

/// The directory whose children are the repository's tags.
pub fn tags_dir(repo: &RepoName) -> Path {
    p(format!("{ROOT}/repositories/{repo}/_manifests/tags"))
}

/// Where ociedge writes a probe object (never read by Distribution).
pub fn probe_object() -> Path {
    Path::from("_ociedge/probe")
}

/// The marker of a repository pushed through ociedge (kept in the preferred engine). Name
/// components never start with `_`, so a marker never collides with a nested repository's.
pub fn pushed_marker(repo: &RepoName) -> Path {
    p(format!("_ociedge/pushed/{repo}/_pushed"))
}

/// Parses a link file's content.
pub fn parse_link(bytes: &[u8]) -> Option<Digest> {
    std::str::from_utf8(bytes).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_match_distribution() {
        let d: Digest = format!("sha256:ab{}", "0".repeat(62)).parse().unwrap();
        let r: RepoName = "library/alpine".parse().unwrap();
        let t: Tag = "3.19".parse().unwrap();
        assert_eq!(
            blob_data(&d).as_ref(),
            format!(
                "docker/registry/v2/blobs/sha256/ab/ab{}/data",
                "0".repeat(62)
            )
        );
        assert_eq!(
            tag_current(&r, &t).as_ref(),
            "docker/registry/v2/repositories/library/alpine/_manifests/tags/3.19/current/link"
        );
        assert!(layer_link(&r, &d).as_ref().contains("/_layers/sha256/"));
        assert!(revision_link(&r, &d)
            .as_ref()
            .contains("/_manifests/revisions/sha256/"));
        assert_eq!(parse_link(format!("{d}\n").as_bytes()), Some(d));
    }
}
