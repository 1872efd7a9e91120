//! Replication jobs as data: what to copy to which engine. Order is a property of execution, not
//! of the queue: a tag job first makes sure its manifest is there, a manifest job its blobs and
//! child manifests, so no engine ever shows a tag it cannot serve, whatever order jobs run in.

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
}

/// A job with the validated names it carries.
pub enum Parsed {
    Blob(RepoName, Digest),
    Manifest(RepoName, Digest),
    Tag(RepoName, Tag, Digest),
    Untag(RepoName, Tag),
}

impl Job {
    pub fn kind(&self) -> &'static str {
        match self {
            Job::Blob { .. } => "blob",
            Job::Manifest { .. } => "manifest",
            Job::Tag { .. } => "tag",
            Job::Untag { .. } => "untag",
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
        })
    }
}
