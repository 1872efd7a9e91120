//! The status page, `GET /_ociedge/`: one self-contained HTML file (`status.html`, compiled into
//! the binary) whose own script polls `/_ociedge/status` and draws it. Nothing is loaded from
//! anywhere else (no CDN, font or script), so the page works offline, on an air-gapped edge
//! machine, and the Content-Security-Policy below can forbid every other origin.
//!
//! It shows what the JSON shows and no more; the JSON never carries engine options or
//! credentials. The page is not access-controlled yet: when `auth:` lands it must sit behind the
//! same rules as `/_ociedge/status`.

use std::sync::LazyLock;

use base64::Engine as _;
use http::header::{self, HeaderValue};
use http::Response;
use sha2::Digest as _;

use super::body::{self, Body};

/// The page. Its single inline `<script>` is allowed by hash, not by `'unsafe-inline'`.
pub const STATUS_HTML: &str = include_str!("status.html");

/// `script-src` names the SHA-256 of the page's inline script, so an injected script (say, an
/// engine error message that slipped into the DOM as markup) would not run; `connect-src 'self'`
/// is the one fetch the page makes. Computed once from the embedded file, so editing the HTML
/// cannot leave a stale hash behind.
static CSP: LazyLock<HeaderValue> = LazyLock::new(|| {
    let script = inline_script(STATUS_HTML).unwrap_or_default();
    let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(script));
    let csp = format!(
        "default-src 'none'; script-src 'sha256-{hash}'; style-src 'unsafe-inline'; \
         connect-src 'self'; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'"
    );
    HeaderValue::from_str(&csp).unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'"))
});

/// The text between the page's `<script>` and `</script>`, as the browser hashes it.
fn inline_script(html: &str) -> Option<&str> {
    let start = html.find("<script>")? + "<script>".len();
    let len = html[start..].find("</script>")?;
    Some(&html[start..start + len])
}

pub fn status_page() -> Response<Body> {
    let mut r = Response::new(body::full(STATUS_HTML));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // The page is small and changes with the binary; an old copy polling a new JSON would
    // mislead more than a refetch costs.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::CONTENT_SECURITY_POLICY, CSP.clone());
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_inline_script_and_nothing_external() {
        let script = inline_script(STATUS_HTML).expect("an inline script");
        assert!(script.len() > 1000);
        assert_eq!(
            STATUS_HTML.matches("<script").count(),
            1,
            "one script, inline"
        );
        for external in [
            "src=\"http",
            "href=\"http",
            "src=\"//",
            "href=\"//",
            "@import",
            "url(http",
        ] {
            assert!(!STATUS_HTML.contains(external), "{external}");
        }
        let csp = CSP.to_str().expect("ascii");
        assert!(csp.contains("script-src 'sha256-"), "{csp}");
        assert!(
            !csp.contains("script-src 'sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU='"),
            "hash of an empty script"
        );
    }
}
