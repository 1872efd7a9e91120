//! Entry points for the fuzz targets in `fuzz/` (and the corpus replay test): every parser that
//! reads untrusted input, driven with arbitrary bytes. Each must return, never panic, and keep
//! its invariants (what it accepts it prints back the same way).

use crate::oci::{Digest, Reference, RepoName, Tag};

/// The `/v2/` route table and the query parser.
pub fn route(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let (path, query) = s.split_once('?').unwrap_or((s, ""));
    let _ = crate::http::route::parse(path);
    let _ = crate::http::route::query(Some(query));
}

/// Names, tags, references and digests: accepted values round-trip through `Display`.
pub fn names(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(n) = s.parse::<RepoName>() {
        assert_eq!(n.to_string(), s);
        assert!(
            !s.contains("..") && !s.contains("//") && s.len() <= crate::oci::name::MAX_NAME_LEN
        );
    }
    if let Ok(t) = s.parse::<Tag>() {
        assert_eq!(t.to_string(), s);
    }
    if let Ok(d) = s.parse::<Digest>() {
        assert_eq!(d.to_string(), s);
        assert_eq!(d.to_string().parse::<Digest>().ok(), Some(d.clone()));
        let _ = crate::engine::layout::blob_data(&d);
    }
    if let Some(r) = Reference::parse(s) {
        assert_eq!(r.to_string(), s);
    }
}

/// Request headers: `Range`, `If-None-Match`, `If-Range`, a chunk's `Content-Range`.
pub fn headers(data: &[u8]) {
    let Ok(v) = http::HeaderValue::from_bytes(data) else {
        return;
    };
    let mut h = http::HeaderMap::new();
    h.insert(http::header::RANGE, v.clone());
    h.insert(http::header::IF_NONE_MATCH, v.clone());
    h.insert(http::header::IF_RANGE, v.clone());
    h.insert(http::header::CONTENT_RANGE, v);
    if let Ok(Some(spec)) = crate::http::headers::parse_range(&h) {
        for size in [0u64, 1, 100, u64::MAX] {
            if let Ok(r) = spec.resolve(size) {
                assert!(r.start < size && r.end.is_some_and(|e| e <= size && e > r.start));
            }
        }
    }
    let d = Digest::sha256_of(b"");
    let _ = crate::http::headers::none_match(&h, &d);
    let _ = crate::http::headers::if_range_allows(&h, &d);
    let _ = crate::http::push::content_range(&h);
}

/// Manifest and index JSON, as a push and replication read them.
pub fn manifest(data: &[u8]) {
    let _ = crate::oci::manifest::parse(data, None);
    let _ = crate::oci::manifest::parse(data, Some(crate::oci::media::OCI_INDEX));
    if let Some(t) = crate::oci::media::sniff_manifest(data) {
        assert!(crate::oci::media::is_manifest_type(&t));
    }
    if let Ok(p) = crate::oci::manifest::parse(data, None) {
        assert!(crate::oci::media::is_manifest_type(&p.media_type));
    }
}

/// The config file: parse and validate never panic.
pub fn config(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = crate::config::Config::parse(s) {
        let _ = c.validate();
        let _ = c.to_masked_yaml();
    }
}

/// `WWW-Authenticate` challenges from upstream registries.
pub fn www_authenticate(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = crate::engine::registry::auth::parse_challenge(s);
}

/// A fuzz entry point.
pub type Target = fn(&[u8]);

/// All targets by name (for the corpus replay).
pub const TARGETS: &[(&str, Target)] = &[
    ("route", route),
    ("names", names),
    ("headers", headers),
    ("manifest", manifest),
    ("config", config),
    ("www_authenticate", www_authenticate),
    ("request_head", request_head),
    ("storage_names", storage_names),
];

/// Request heads as the plain HTTP/1.1 front reads them off a socket.
pub fn request_head(data: &[u8]) {
    crate::http::fast::fuzz_parse(data);
}

/// Routing of requested names to storage names: the first byte picks a set of upstreams, the
/// rest is `ns\nname`. Whatever is accepted maps back to the same (upstream, repository) pair,
/// so no two pairs share a storage name.
pub fn storage_names(data: &[u8]) {
    use std::sync::OnceLock;
    static SETS: OnceLock<Vec<crate::engine::set::Engines>> = OnceLock::new();
    let sets = SETS.get_or_init(|| {
        [
            &[
                "docker.io",
                "ghcr.io",
                "upstream.local:5000",
                "priv.example",
            ][..],
            &["registry.corp", "myreg", "localhost:5000", "docker.io"][..],
            &["myreg", "a"][..],
            &[][..],
        ]
        .iter()
        .map(|names| crate::engine::set::Engines::for_routing(names))
        .collect()
    });
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let Ok(s) = std::str::from_utf8(rest) else {
        return;
    };
    let (ns, name) = s.split_once('\n').unwrap_or(("", s));
    let Ok(name) = name.parse::<RepoName>() else {
        return;
    };
    let e = &sets[pick as usize % sets.len()];
    if let Ok(r) = e.route(&name, Some(ns)) {
        assert_eq!(
            e.owner(&r.storage_repo),
            Some((r.upstream, r.upstream_repo.clone())),
            "{name} ns={ns:?}"
        );
    }
}
