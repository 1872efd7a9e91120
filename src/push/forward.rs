//! Pushes forwarded to an upstream registry (`push.engine` naming an upstream): requests go on
//! with their bodies streamed and the client's own credentials; `Location` headers come back
//! rewritten to point at this proxy, under the name the client used.

use futures::TryStreamExt;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Response, StatusCode};

use crate::engine::ByteStream;
use crate::error::{Error, Result};
use crate::oci::RepoName;

/// Hop-by-hop headers, never forwarded (RFC 9110 §7.6.1), plus `host`.
const HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

pub struct Forwarder {
    name: String,
    base: url::Url,
    http: reqwest::Client,
    /// Moved once the upstream answered a write: what the caching engines remember of the
    /// upstream (a tag found absent, say) is not used after it.
    generation: Option<crate::engine::caching::Generation>,
}

impl Forwarder {
    pub fn new(name: &str, base: url::Url, http: reqwest::Client) -> Forwarder {
        Forwarder {
            name: name.into(),
            base,
            http,
            generation: None,
        }
    }

    /// Moves `generation` after each forwarded write.
    pub fn with_generation(mut self, generation: crate::engine::caching::Generation) -> Forwarder {
        self.generation = Some(generation);
        self
    }

    /// Forwards a write request. `client_name` is the repository as the client named it,
    /// `upstream_name` as the upstream knows it; `rest` is the path after `/v2/<name>/`. The
    /// answer's body is the upstream's, streamed (`http/` makes it a response body).
    pub async fn forward(
        &self,
        parts: &Parts,
        body: ByteStream,
        client_name: &RepoName,
        upstream_name: &RepoName,
        rest: &str,
    ) -> Result<Response<ByteStream>> {
        let mut url = format!(
            "{}/v2/{upstream_name}/{rest}",
            self.base.as_str().trim_end_matches('/')
        );
        if let Some(q) = parts.uri.query() {
            // containerd's routing hint is ours, not the upstream's.
            let kept: Vec<&str> = q.split('&').filter(|kv| !kv.starts_with("ns=")).collect();
            if !kept.is_empty() {
                url.push('?');
                url.push_str(&kept.join("&"));
            }
        }
        let mut headers = HeaderMap::new();
        for (k, v) in &parts.headers {
            if !HOP.contains(&k.as_str()) {
                headers.append(k.clone(), v.clone());
            }
        }
        let has_body = parts.headers.contains_key(header::CONTENT_LENGTH)
            || parts.headers.contains_key(header::TRANSFER_ENCODING);
        let mut rb = self
            .http
            .request(parts.method.clone(), &url)
            .headers(headers);
        if has_body {
            rb = rb.body(reqwest::Body::wrap_stream(body));
        }
        let up = rb.send().await.map_err(|e| Error::reqwest(&self.name, e));
        if let Some(g) = &self.generation {
            g.bump();
        }
        let up = up?;
        let status = StatusCode::from_u16(up.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        let mut b = Response::builder().status(status);
        for (k, v) in up.headers() {
            if HOP.contains(&k.as_str()) {
                continue;
            }
            if k == header::LOCATION {
                if let Some(loc) = v
                    .to_str()
                    .ok()
                    .and_then(|l| self.rewrite_location(l, client_name, upstream_name))
                {
                    b = b.header(header::LOCATION, loc);
                    continue;
                }
            }
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(k.as_str().as_bytes()),
                HeaderValue::from_bytes(v.as_bytes()),
            ) {
                b = b.header(name, value);
            }
        }
        let stream = up.bytes_stream().map_err({
            let name = self.name.clone();
            move |e| Error::reqwest(&name, e)
        });
        let body: ByteStream = Box::pin(stream);
        b.body(body).map_err(|e| Error::permanent("http", e))
    }

    /// `http://upstream/v2/<upstream name>/blobs/uploads/x?_state=…` → `/v2/<client name>/…`.
    /// Locations elsewhere (a storage redirect) are passed through unchanged.
    fn rewrite_location(
        &self,
        loc: &str,
        client_name: &RepoName,
        upstream_name: &RepoName,
    ) -> Option<HeaderValue> {
        let path = if loc.starts_with('/') {
            loc.to_string()
        } else {
            let u = url::Url::parse(loc).ok()?;
            if u.host_str() != self.base.host_str()
                || u.port_or_known_default() != self.base.port_or_known_default()
            {
                return None;
            }
            match u.query() {
                Some(q) => format!("{}?{q}", u.path()),
                None => u.path().to_string(),
            }
        };
        let prefix = format!("/v2/{upstream_name}/");
        let rest = path.strip_prefix(&prefix)?;
        HeaderValue::from_str(&format!("/v2/{client_name}/{rest}")).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_are_rewritten_to_the_client_name() {
        let f = Forwarder::new(
            "up",
            url::Url::parse("http://127.0.0.1:5000").unwrap(),
            reqwest::Client::new(),
        );
        let c: RepoName = "ghcr.io/org/app".parse().unwrap();
        let u: RepoName = "org/app".parse().unwrap();
        assert_eq!(
            f.rewrite_location(
                "http://127.0.0.1:5000/v2/org/app/blobs/uploads/abc?_state=x",
                &c,
                &u
            )
            .unwrap(),
            "/v2/ghcr.io/org/app/blobs/uploads/abc?_state=x"
        );
        assert_eq!(
            f.rewrite_location("/v2/org/app/manifests/sha256:1", &c, &u)
                .unwrap(),
            "/v2/ghcr.io/org/app/manifests/sha256:1"
        );
        assert!(f
            .rewrite_location("https://s3.example/bucket/x", &c, &u)
            .is_none());
    }
}
