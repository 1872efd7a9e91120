//! `access: passthrough`: before content of such an upstream is served, the client's own
//! credentials (or none, for an anonymous client) must open the repository at the upstream —
//! local hits included, so that one client's pull never makes a private image public, as it does
//! in Distribution's proxy mode. The check is a `GET /v2/<repo>/tags/list?n=1` with the client's
//! credentials, answered through the upstream's own challenge (Bearer token or Basic); registries
//! enforce the repository's pull permission on it, and it does not count as an image pull.
//! A positive answer is remembered per (credentials, upstream, repository) for [`CHECK_TTL`].

use std::time::Duration;

use http::{HeaderValue, StatusCode};
use moka::future::Cache;
use sha2::Digest as _;

use crate::engine::registry::auth::{parse_challenge, Challenge, RealmPolicy, TokenResponse};
use crate::error::{Error, Result};
use crate::oci::RepoName;

/// How long a positive upstream answer is trusted: the longest a client keeps access after
/// the upstream revoked it (besides tokens already issued, which live `auth.token.ttl`).
pub const CHECK_TTL: Duration = Duration::from_secs(60);

/// A whole check (challenge, token, request) slower than this fails as the upstream's fault.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Client credentials (from Basic auth or the token endpoint's form).
#[derive(Clone)]
pub struct Creds {
    pub user: String,
    pub password: String,
    /// The client's address, when known: failed passwords are counted against it.
    pub from: Option<std::net::IpAddr>,
}

impl std::fmt::Debug for Creds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Creds({:?}, ********)", self.user)
    }
}

impl Creds {
    fn basic(&self) -> Option<HeaderValue> {
        use base64::Engine as _;
        let enc = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", self.user, self.password));
        HeaderValue::from_str(&format!("Basic {enc}")).ok()
    }
}

/// A passthrough upstream: its name (for errors), API base URL, and the token realms the
/// client's credentials may be sent to (as for the upstream's own credentials).
#[derive(Clone, Debug)]
pub struct Gate {
    pub name: String,
    pub base: url::Url,
    pub realms: RealmPolicy,
}

pub struct Passthrough {
    http: reqwest::Client,
    /// Keys are salted hashes of (upstream, path, user, password): the cache never holds a
    /// password, and a wrong password never matches a right one's entry.
    opened: Cache<[u8; 32], ()>,
    salt: [u8; 32],
}

impl std::fmt::Debug for Passthrough {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passthrough")
    }
}

impl Passthrough {
    pub fn new(http: reqwest::Client) -> Passthrough {
        Passthrough {
            http,
            opened: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(CHECK_TTL)
                .build(),
            salt: rand::random(),
        }
    }

    fn key(&self, gate: &Gate, path: &str, creds: Option<&Creds>) -> [u8; 32] {
        let mut h = sha2::Sha256::new();
        h.update(self.salt);
        for part in [gate.name.as_str(), path] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        if let Some(c) = creds {
            h.update([1]);
            h.update(c.user.as_bytes());
            h.update([0]);
            h.update(c.password.as_bytes());
        }
        h.finalize().into()
    }

    /// Whether `creds` (or an anonymous client) may pull `repo` (the name as the upstream knows
    /// it) from the upstream. `Err` when the upstream cannot answer: nothing is served then.
    pub async fn opens(&self, gate: &Gate, repo: &RepoName, creds: Option<&Creds>) -> Result<bool> {
        let path = format!("/v2/{repo}/tags/list?n=1");
        let scope = format!("repository:{repo}:pull");
        self.cached(gate, &path, Some(&scope), creds).await
    }

    /// Whether `creds` opened `repo` within the last [`CHECK_TTL`] (no upstream request).
    pub fn known_to_open(&self, gate: &Gate, repo: &RepoName, creds: &Creds) -> bool {
        let path = format!("/v2/{repo}/tags/list?n=1");
        self.opened
            .contains_key(&self.key(gate, &path, Some(creds)))
    }

    /// Whether the upstream accepts `creds` at all (`docker login` against ociedge with
    /// credentials that only the upstream knows).
    pub async fn login(&self, gate: &Gate, creds: &Creds) -> Result<bool> {
        self.cached(gate, "/v2/", None, Some(creds)).await
    }

    async fn cached(
        &self,
        gate: &Gate,
        path: &str,
        scope: Option<&str>,
        creds: Option<&Creds>,
    ) -> Result<bool> {
        let key = self.key(gate, path, creds);
        if self.opened.contains_key(&key) {
            return Ok(true);
        }
        let ok = tokio::time::timeout(CHECK_TIMEOUT, self.ask(gate, path, scope, creds))
            .await
            .map_err(|_| Error::transient(&gate.name, "access check timed out"))??;
        if ok {
            self.opened.insert(key, ()).await;
        }
        tracing::debug!(upstream = %gate.name, path, ok, user = creds.map(|c| c.user.as_str()), "passthrough access check");
        Ok(ok)
    }

    /// One check: the request with the client's Basic credentials; on a Bearer challenge, a
    /// token from the upstream's realm with the same credentials, and the request again.
    async fn ask(
        &self,
        gate: &Gate,
        path: &str,
        scope: Option<&str>,
        creds: Option<&Creds>,
    ) -> Result<bool> {
        let url = format!("{}{path}", gate.base.as_str().trim_end_matches('/'));
        let fail = |e: reqwest::Error| Error::reqwest(&gate.name, e);
        let basic = creds.and_then(Creds::basic);
        let mut rb = self.http.get(&url);
        if let Some(b) = &basic {
            rb = rb.header(http::header::AUTHORIZATION, b.clone());
        }
        let first = rb.send().await.map_err(fail)?;
        let status = first.status();
        if status.is_success() {
            return Ok(true);
        }
        if status.is_server_error() {
            return Err(Error::transient(
                &gate.name,
                format!("access check answered {status}"),
            ));
        }
        if status != StatusCode::UNAUTHORIZED {
            return Ok(false);
        }
        let challenge = first
            .headers()
            .get(http::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_challenge);
        let Some(Challenge::Bearer { realm, service }) = challenge else {
            // Basic (already answered with the client's credentials) or nothing usable.
            return Ok(false);
        };
        let mut q: Vec<(&str, &str)> = Vec::new();
        if let Some(s) = service.as_deref() {
            q.push(("service", s));
        }
        if let Some(s) = scope {
            q.push(("scope", s));
        }
        let mut rb = self.http.get(&realm).query(&q);
        if let Some(b) = &basic {
            if gate.realms.allows(&realm) {
                rb = rb.header(http::header::AUTHORIZATION, b.clone());
            } else {
                // The client's password goes nowhere the upstream's own would not: an anonymous
                // token then opens only what anyone may pull.
                tracing::warn!(
                    upstream = %gate.name,
                    realm,
                    "the upstream's token realm is neither its own origin nor listed in upstreams[].auth.realms: the client's credentials are not sent there"
                );
            }
        }
        let tr = rb.send().await.map_err(fail)?;
        if tr.status().is_server_error() {
            return Err(Error::transient(
                &gate.name,
                format!("token endpoint answered {}", tr.status()),
            ));
        }
        if !tr.status().is_success() {
            return Ok(false);
        }
        let body = crate::engine::registry::limit::read_body(
            tr,
            crate::engine::registry::limit::MAX_TOKEN,
            "token response",
        )
        .await
        .map_err(|e| Error::engine(&gate.name, e))?;
        let Some((token, _)) = serde_json::from_slice::<TokenResponse>(&body)
            .ok()
            .and_then(TokenResponse::into_token)
        else {
            return Ok(false);
        };
        let second = self
            .http
            .get(&url)
            .bearer_auth(token)
            .send()
            .await
            .map_err(fail)?;
        if second.status().is_server_error() {
            return Err(Error::transient(
                &gate.name,
                format!("access check answered {}", second.status()),
            ));
        }
        Ok(second.status().is_success())
    }
}
