//! Replication jobs as data: what to copy to which engine. Order is a property of execution, not
//! of the queue: a tag job first makes sure its manifest is there, a manifest job its blobs and
//! child manifests, so no engine ever shows a tag it cannot serve, whatever order jobs run in.
//! A job names an item, and running it makes the target match the source's state of that item
//! *when it runs* (a tag job copies the tag's current value, a delete job deletes only what the
//! source no longer has), so a job retried after newer ones cannot undo them.

use serde::{Deserialize, Serialize};

use crate::oci::{Digest, RepoName, Tag};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Job {
    /// A pushed blob (copied early, before its manifest arrives).
    Blob { repo: String, digest: String },
    /// A manifest and everything it references.
    Manifest { repo: String, digest: String },
    /// A tag, after its manifest and everything that references.
    Tag {
        repo: String,
        tag: String,
        digest: String,
    },
    /// A deleted tag: removed from the target too.
    Untag { repo: String, tag: String },
    /// A deleted manifest: its revision link (and the tags pointing at it) removed from the target.
    #[serde(rename = "delete_manifest")]
    DeleteManifest { repo: String, digest: String },
    /// A deleted blob: its link in the repository removed from the target.
    #[serde(rename = "delete_blob")]
    DeleteBlob { repo: String, digest: String },
}

/// A job with the validated names it carries.
pub enum Parsed {
    Blob(RepoName, Digest),
    Manifest(RepoName, Digest),
    Tag(RepoName, Tag, Digest),
    Untag(RepoName, Tag),
    DeleteManifest(RepoName, Digest),
    DeleteBlob(RepoName, Digest),
}

impl Job {
    pub fn kind(&self) -> &'static str {
        match self {
            Job::Blob { .. } => "blob",
            Job::Manifest { .. } => "manifest",
            Job::Tag { .. } => "tag",
            Job::Untag { .. } => "untag",
            Job::DeleteManifest { .. } => "delete_manifest",
            Job::DeleteBlob { .. } => "delete_blob",
        }
    }

    /// The repository the job is about (as written; [`Job::parse`] validates it).
    pub fn repo(&self) -> &str {
        match self {
            Job::Blob { repo, .. }
            | Job::Manifest { repo, .. }
            | Job::Tag { repo, .. }
            | Job::Untag { repo, .. }
            | Job::DeleteManifest { repo, .. }
            | Job::DeleteBlob { repo, .. } => repo,
        }
    }

    /// Validates the names again: job objects live in a bucket other processes write.
    pub fn parse(&self) -> Option<Parsed> {
        let repo = |r: &str| r.parse::<RepoName>().ok();
        let dig = |d: &str| d.parse::<Digest>().ok();
        Some(match self {
            Job::Blob { repo: r, digest } => Parsed::Blob(repo(r)?, dig(digest)?),
            Job::Manifest { repo: r, digest } => Parsed::Manifest(repo(r)?, dig(digest)?),
            Job::Tag {
                repo: r,
                tag,
                digest,
            } => Parsed::Tag(repo(r)?, tag.parse().ok()?, dig(digest)?),
            Job::Untag { repo: r, tag } => Parsed::Untag(repo(r)?, tag.parse().ok()?),
            Job::DeleteManifest { repo: r, digest } => {
                Parsed::DeleteManifest(repo(r)?, dig(digest)?)
            }
            Job::DeleteBlob { repo: r, digest } => Parsed::DeleteBlob(repo(r)?, dig(digest)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_that_do_not_validate_are_refused() {
        let d = format!("sha256:{}", "a".repeat(64));
        let bad = [
            Job::Tag {
                repo: "ok/repo".into(),
                tag: ".bad".into(),
                digest: d.clone(),
            },
            Job::Manifest {
                repo: "Bad/Repo".into(),
                digest: d.clone(),
            },
            Job::DeleteBlob {
                repo: "ok".into(),
                digest: "sha256:xyz".into(),
            },
        ];
        for j in bad {
            assert!(j.parse().is_none(), "{j:?}");
        }
        let ok = Job::DeleteManifest {
            repo: "ok/repo".into(),
            digest: d,
        };
        assert!(ok.parse().is_some());
        // The wire form of the new kinds.
        let text = serde_json::to_string(&ok).unwrap();
        assert!(text.contains("\"kind\":\"delete_manifest\""), "{text}");
        assert_eq!(serde_json::from_str::<Job>(&text).unwrap(), ok);
    }
}
