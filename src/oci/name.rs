//! Repository names, tags and references, validated to the OCI distribution grammar.

use std::fmt;
use std::str::FromStr;

use super::digest::Digest;

/// Longest repository name accepted (Distribution's limit, so names round-trip through its layout).
pub const MAX_NAME_LEN: usize = 255;

/// A validated repository name: `component(/component)*`, each component matching
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, at most [`MAX_NAME_LEN`] bytes.
///
/// Because of these rules a name can never contain `..`, empty components or upper case, and is safe
/// to join into storage paths.
///
/// ```
/// use ociedge::oci::RepoName;
/// assert!("library/alpine".parse::<RepoName>().is_ok());
/// assert!("ghcr.io/org/my_app--x".parse::<RepoName>().is_ok());
/// for bad in ["", "Alpine", "a//b", "a/../b", "-a", "a-", "a/", "a___b"] {
///     assert!(bad.parse::<RepoName>().is_err(), "{bad}");
/// }
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(Box<str>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("repository name is empty")]
    Empty,
    #[error("repository name is longer than {MAX_NAME_LEN} characters")]
    TooLong,
    #[error("repository name component {0:?} is invalid: lowercase letters, digits and single separators (., _, __, -) between them")]
    Component(String),
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or one or more "-".
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

impl RepoName {
    /// The pseudo-repository `_ociedge` that access rules name to open the status page and
    /// `/_ociedge/status` (it can never be a real repository: components cannot start with `_`).
    pub fn status_pseudo() -> RepoName {
        RepoName("_ociedge".into())
    }

    /// A valid name for calls whose engine ignores the repository (content-addressed reads).
    pub fn placeholder() -> RepoName {
        RepoName("x".into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first path component (`ghcr.io` in `ghcr.io/org/app`).
    pub fn first_component(&self) -> &str {
        self.0.split('/').next().unwrap_or(&self.0)
    }

    /// The name without its first component, if it has more than one.
    pub fn strip_first(&self) -> Option<RepoName> {
        self.0
            .split_once('/')
            .map(|(_, rest)| RepoName(rest.into()))
    }

    /// `prefix/self`, validated (the result may be too long).
    pub fn with_prefix(&self, prefix: &str) -> Result<RepoName, NameError> {
        format!("{prefix}/{}", self.0).parse()
    }

    /// Number of components.
    pub fn depth(&self) -> usize {
        self.0.split('/').count()
    }
}

/// The repository component a registry's content is stored under (`ghcr.io` → `ghcr.io`,
/// `upstream.local:5000` → `upstream.local-5000`): every character outside a name component's
/// alphabet becomes `-`. Configuration refuses two upstreams whose prefixes are equal, so the
/// prefix names one upstream.
pub fn registry_prefix(registry: &str) -> String {
    registry
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '.' | '-' | '_') => c,
            _ => '-',
        })
        .collect()
}

/// Whether a name's first component is a registry host in the Docker reference grammar
/// (`ghcr.io/org/app`, `localhost/app`, `host:5000/app`): such a name never means a repository
/// of Docker Hub, whatever registry a client sends it to.
pub fn is_registry_host(component: &str) -> bool {
    component.contains('.') || component.contains(':') || component == "localhost"
}

impl FromStr for RepoName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        for c in s.split('/') {
            if !valid_component(c) {
                return Err(NameError::Component(c.chars().take(64).collect()));
            }
        }
        Ok(RepoName(s.into()))
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(Box<str>);

impl Tag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        let first_ok = b
            .first()
            .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_');
        let rest_ok = b
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
        if first_ok && rest_ok && b.len() <= 128 {
            Ok(Tag(s.into()))
        } else {
            Err(())
        }
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a manifest request names: a tag (mutable, needs an authority) or a digest (immutable).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl Reference {
    /// Parses a reference: anything with a `:` must be a valid digest, anything else a valid tag.
    pub fn parse(s: &str) -> Option<Reference> {
        if s.contains(':') {
            s.parse().ok().map(Reference::Digest)
        } else {
            s.parse().ok().map(Reference::Tag)
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in [
            "a",
            "a/b/c",
            "a.b",
            "a_b",
            "a__b",
            "a---b",
            "0",
            "ghcr.io/x",
        ] {
            assert!(ok.parse::<RepoName>().is_ok(), "{ok}");
        }
        let long = "a".repeat(256);
        for bad in [
            "",
            "A",
            "a/",
            "/a",
            "a//b",
            "..",
            "a/../b",
            ".a",
            "a..b",
            "a_.b",
            long.as_str(),
        ] {
            assert!(bad.parse::<RepoName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn tags_and_references() {
        assert!("latest".parse::<Tag>().is_ok());
        assert!("_x.Y-1".parse::<Tag>().is_ok());
        assert!(".x".parse::<Tag>().is_err());
        assert!("a".repeat(129).parse::<Tag>().is_err());
        assert!(matches!(Reference::parse("1.0"), Some(Reference::Tag(_))));
        assert!(Reference::parse("sha256:abc").is_none());
        assert!(matches!(
            Reference::parse(&format!("sha256:{}", "0".repeat(64))),
            Some(Reference::Digest(_))
        ));
    }
}
