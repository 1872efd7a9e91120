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
    let _ = crate::push::manifest::parse(data, None);
    let _ = crate::push::manifest::parse(data, Some(crate::oci::media::OCI_INDEX));
    let _ = crate::oci::media::sniff_manifest(data);
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
];

/// Request heads as the plain HTTP/1.1 front reads them off a socket.
pub fn request_head(data: &[u8]) {
    crate::http::fast::fuzz_parse(data);
}
