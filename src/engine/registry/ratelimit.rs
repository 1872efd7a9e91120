//! An upstream's pull quota, as it announces it on its answers: Docker Hub's `ratelimit-limit`
//! and `ratelimit-remaining` headers (`N;w=SECONDS`, the IETF RateLimit draft's form). What a
//! cache in front of a rate-limited registry must be able to tell its operator: how much of the
//! limit is left.

use http::HeaderMap;

/// A quota announced on one answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    /// Pulls allowed per window.
    pub limit: u64,
    /// Pulls left in the current window.
    pub remaining: u64,
    /// The window, in seconds, when given.
    pub window: Option<u64>,
}

/// The quota of an answer, when it carries both headers with values that parse.
pub fn quota(headers: &HeaderMap) -> Option<Quota> {
    let (limit, window) = field(headers, "ratelimit-limit")?;
    let (remaining, w2) = field(headers, "ratelimit-remaining")?;
    Some(Quota {
        limit,
        remaining: remaining.min(limit),
        window: window.or(w2),
    })
}

/// `N` or `N;w=SECONDS` (other parameters ignored).
fn field(headers: &HeaderMap, name: &str) -> Option<(u64, Option<u64>)> {
    let v = headers.get(name)?.to_str().ok()?;
    let mut parts = v.split(';').map(str::trim);
    let n = parts.next()?.parse().ok()?;
    let window = parts
        .filter_map(|p| p.strip_prefix("w="))
        .find_map(|w| w.parse().ok());
    Some((n, window))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn docker_hub_headers_parse() {
        let h = headers(&[
            ("ratelimit-limit", "100;w=21600"),
            ("ratelimit-remaining", "76;w=21600"),
        ]);
        assert_eq!(
            quota(&h),
            Some(Quota {
                limit: 100,
                remaining: 76,
                window: Some(21600)
            })
        );
        let plain = headers(&[("ratelimit-limit", "200"), ("ratelimit-remaining", "3")]);
        assert_eq!(
            quota(&plain).map(|q| (q.limit, q.remaining)),
            Some((200, 3))
        );
    }

    #[test]
    fn partial_or_bad_headers_are_no_quota() {
        assert_eq!(quota(&headers(&[("ratelimit-limit", "100;w=21600")])), None);
        let bad = headers(&[("ratelimit-limit", "lots"), ("ratelimit-remaining", "1")]);
        assert_eq!(quota(&bad), None);
        // A remaining count above the limit is clamped, not trusted.
        let over = headers(&[("ratelimit-limit", "10"), ("ratelimit-remaining", "99")]);
        assert_eq!(quota(&over).map(|q| q.remaining), Some(10));
    }
}
