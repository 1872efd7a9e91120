//! Request header parsing (`Range`, `If-None-Match`, `If-Range`, `Accept`) and the response
//! headers that mirrors and CDNs rely on.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::error::{Error, Result};
use crate::oci::{Digest, ErrorCode};
use crate::pull::RangeSpec;

pub const X_REGION: HeaderName = HeaderName::from_static("x-ociedge-region");
pub const X_SOURCE: HeaderName = HeaderName::from_static("x-ociedge-source");
pub const DOCKER_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");
pub const API_VERSION: HeaderName = HeaderName::from_static("docker-distribution-api-version");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const NOSNIFF: HeaderValue = HeaderValue::from_static("nosniff");
pub const CSP_NONE: HeaderValue =
    HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'");
pub const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// Parses a single-range `Range: bytes=…` header. `Ok(None)` when absent, for another unit than
/// `bytes` (ignored, RFC 9110 §14.2), or for a multi-range request (answered with the whole blob,
/// as HTTP allows); a malformed one is `RANGE_INVALID`.
pub fn parse_range(headers: &HeaderMap) -> Result<Option<RangeSpec>> {
    let Some(v) = headers.get(header::RANGE) else {
        return Ok(None);
    };
    let bad = || {
        Error::client(
            ErrorCode::RangeInvalid,
            "malformed Range header; expected bytes=START-[END] or bytes=-SUFFIX",
        )
    };
    let s = v.to_str().map_err(|_| bad())?.trim();
    let (unit, spec) = s.split_once('=').ok_or_else(bad)?;
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return Ok(None);
    }
    let spec = spec.trim();
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or_else(bad)?;
    let (a, b) = (a.trim(), b.trim());
    let num = |x: &str| -> Result<u64> {
        if x.is_empty() || x.len() > 19 || !x.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        x.parse().map_err(|_| bad())
    };
    if a.is_empty() {
        return Ok(Some(RangeSpec::Suffix(num(b)?)));
    }
    let start = num(a)?;
    let last = if b.is_empty() { None } else { Some(num(b)?) };
    if last.is_some_and(|l| l < start) {
        return Err(bad());
    }
    Ok(Some(RangeSpec::From { start, last }))
}

/// The strong ETag of digest-addressed content.
pub fn etag(d: &Digest) -> String {
    let mut s = String::with_capacity(d.as_str().len() + 2);
    s.push('"');
    s.push_str(d.as_str());
    s.push('"');
    s
}

/// The ETag as a header value, built without a second copy.
pub fn etag_value(d: &Digest) -> HeaderValue {
    owned_value(etag(d))
}

/// A header value that takes `s` as it is (a digest, an id: already valid header text).
pub fn owned_value(s: String) -> HeaderValue {
    HeaderValue::try_from(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// Whether `If-None-Match` names this ETag itself (not `*`): `304` without looking the content up,
/// as digest-addressed content never changes.
pub fn none_match_tag(headers: &HeaderMap, d: &Digest) -> bool {
    if !headers.contains_key(header::IF_NONE_MATCH) {
        return false;
    }
    let tag = etag(d);
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .map(str::trim)
                .any(|t| t.trim_start_matches("W/") == tag)
        })
}

/// Whether `If-None-Match` matches the ETag or is `*` (so the answer is `304` for content that
/// exists: check that first).
pub fn none_match(headers: &HeaderMap, d: &Digest) -> bool {
    if !headers.contains_key(header::IF_NONE_MATCH) {
        return false;
    }
    let tag = etag(d);
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .map(str::trim)
                .any(|t| t == "*" || t.trim_start_matches("W/") == tag)
        })
}

/// Whether a `Range` may be honoured: no `If-Range`, or one naming this content.
pub fn if_range_allows(headers: &HeaderMap, d: &Digest) -> bool {
    match headers.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(v) => v.trim() == etag(d),
    }
}

/// The client's `Accept` values.
pub fn accept(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::to_string)
        .collect()
}

pub fn value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(v: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(header::RANGE, HeaderValue::from_str(v).unwrap());
        m
    }

    #[test]
    fn ranges() {
        assert_eq!(
            parse_range(&h("bytes=0-9")).unwrap(),
            Some(RangeSpec::From {
                start: 0,
                last: Some(9)
            })
        );
        assert_eq!(
            parse_range(&h("bytes=5-")).unwrap(),
            Some(RangeSpec::From {
                start: 5,
                last: None
            })
        );
        assert_eq!(
            parse_range(&h("bytes=-7")).unwrap(),
            Some(RangeSpec::Suffix(7))
        );
        assert_eq!(parse_range(&h("bytes=0-1,4-5")).unwrap(), None);
        for bad in [
            "bytes=",
            "bytes=-",
            "bytes=a-b",
            "bytes 0-1",
            "bytes=9-3",
            "bytes=99999999999999999999-",
            "bytes=1",
        ] {
            assert!(parse_range(&h(bad)).is_err(), "{bad}");
        }
        assert_eq!(parse_range(&HeaderMap::new()).unwrap(), None);
        // Another unit is ignored, not refused; the unit's case does not matter.
        assert_eq!(parse_range(&h("items=0-1")).unwrap(), None);
        assert!(parse_range(&h("Bytes=0-1")).unwrap().is_some());
    }

    #[test]
    fn etags() {
        let d = Digest::sha256_of(b"x");
        let mut m = HeaderMap::new();
        m.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_str(&format!("\"a\", {}", etag(&d))).unwrap(),
        );
        assert!(none_match(&m, &d));
        assert!(!none_match(&HeaderMap::new(), &d));
    }
}
