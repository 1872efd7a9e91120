//! An authenticated `/v2/` client for one upstream registry: sends a request, answers a `401`
//! challenge once (Bearer token or Basic), and caches tokens per scope.
//!
//! Credentials go only to the upstream's own origin and to the token realms its [`RealmPolicy`]
//! allows; a realm elsewhere is asked for an anonymous token. Redirects (blob downloads are
//! redirected to a CDN) are followed by reqwest, which drops `Authorization` when the next URL
//! has another scheme, host or port (`reqwest::redirect::remove_sensitive_headers`).

use std::sync::{Arc, RwLock};
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method, StatusCode};
use reqwest::{Client, RequestBuilder, Response};

use super::auth::{parse_challenge, Challenge, RealmPolicy, TokenCache, TokenResponse};
use super::health::{Health, Settings, ANONYMOUS};
use crate::error::{BoxError, EngineError, Error, Result};

pub const USER_AGENT: &str = concat!("ociedge/", env!("CARGO_PKG_VERSION"));

#[derive(Debug)]
pub struct RegistryClient {
    id: String,
    base: url::Url,
    http: Client,
    basic: Option<(String, String)>,
    /// Which token realms `basic` may be sent to.
    realms: RealmPolicy,
    /// Whether the last token was asked for without `basic`, the realm not being allowed: a
    /// refusal then says why.
    withheld: std::sync::atomic::AtomicBool,
    /// The last challenge seen, so that requests for a new scope fetch a token up front instead of
    /// paying a `401` round trip first.
    challenge: RwLock<Option<Challenge>>,
    tokens: TokenCache,
    /// Requests by kind (see `ratelimit.rs`).
    metrics: Option<crate::metrics::Metrics>,
    /// Back-off, circuit breaker and quota (see `health.rs`): asked before every request.
    health: Arc<Health>,
}

/// The URL the breaker's background probe asks: the upstream's `/v2/`.
fn probe_url(base: &url::Url) -> String {
    format!("{}/v2/", base.as_str().trim_end_matches('/'))
}

/// Builds the shared HTTP client: rustls with the system roots, hickory DNS, pooled keep-alive.
pub fn http_client() -> Result<Client> {
    client_builder()
        .build()
        .map_err(|e| Error::Config(format!("cannot build HTTP client: {e}")))
}

/// A client like [`http_client`] that also trusts the CA certificates of the PEM file `ca_file`
/// (an upstream with a private CA). The system roots stay trusted: adding a CA must not turn
/// off verification of the public ones. A client of its own, as rustls roots are per client.
pub fn http_client_with_ca(ca_file: &std::path::Path) -> Result<Client> {
    let bad = |e: &dyn std::fmt::Display| Error::Config(format!("{}: {e}", ca_file.display()));
    let pem = std::fs::read(ca_file).map_err(|e| bad(&e))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| bad(&e))?;
    if certs.is_empty() {
        return Err(bad(&"no PEM certificate in the file"));
    }
    client_builder()
        .tls_certs_merge(certs)
        .build()
        .map_err(|e| bad(&e))
}

fn client_builder() -> reqwest::ClientBuilder {
    Client::builder()
        .user_agent(USER_AGENT)
        .hickory_dns(true)
        .connect_timeout(Duration::from_secs(10))
        // A stalled upstream fails the read (and the fill moves on) instead of hanging it.
        .read_timeout(Duration::from_secs(30))
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
}

impl RegistryClient {
    pub fn new(
        id: &str,
        base: url::Url,
        http: Client,
        basic: Option<(String, String)>,
    ) -> RegistryClient {
        let health = Arc::new(Health::new(id, Settings::default()));
        health.set_probe(http.clone(), probe_url(&base));
        RegistryClient {
            health,
            id: id.into(),
            realms: RealmPolicy::new(id, &base, None),
            withheld: Default::default(),
            base,
            http,
            basic,
            challenge: RwLock::new(None),
            tokens: TokenCache::default(),
            metrics: None,
        }
    }

    /// Replaces the default realm policy (the upstream's own origin; Docker Hub's token service
    /// for `docker.io`) with the configured one.
    pub fn with_realms(mut self, realms: RealmPolicy) -> RegistryClient {
        self.realms = realms;
        self
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Replaces the default health (breaker settings, metrics) with `health`.
    pub fn with_health(mut self, health: Arc<Health>) -> RegistryClient {
        health.set_probe(self.http.clone(), probe_url(&self.base));
        self.health = health;
        self
    }

    /// The upstream's back-off, breaker and quota.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// The credential scoped requests are made with, as a label: the configured user name, or
    /// `anonymous` (none configured, or withheld from the token realm).
    pub fn credential(&self) -> &str {
        match &self.basic {
            Some((user, _)) if !self.credentials_withheld() => user,
            _ => ANONYMOUS,
        }
    }

    /// A request got no answer (or none in time): counts towards opening the breaker.
    pub fn failed(&self, e: &Error) {
        if e.is_transient() && !matches!(e.engine_error(), Some(EngineError::Backoff(_))) {
            self.health.failed(&e.to_string());
        }
    }

    /// Whether the upstream's credentials were last kept from its token realm (not an allowed
    /// origin): its refusals are then explained by that.
    pub fn credentials_withheld(&self) -> bool {
        self.withheld.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `base` + `path` (path starts with `/v2/`).
    pub fn url(&self, path_and_query: &str) -> String {
        let base = self.base.as_str().trim_end_matches('/');
        format!("{base}{path_and_query}")
    }

    /// A failure of this upstream, of the kind `e`.
    pub fn err(&self, e: EngineError) -> Error {
        Error::engine(&self.id, e)
    }

    /// A protocol violation or an answer we cannot use: asking again will not help.
    pub fn permanent(&self, e: impl Into<BoxError>) -> Error {
        Error::permanent(&self.id, e)
    }

    /// A failure that may pass: a timeout, a dropped connection, a 5xx.
    pub fn transient(&self, e: impl Into<BoxError>) -> Error {
        Error::transient(&self.id, e)
    }

    /// A transport failure, classified.
    pub fn reqwest(&self, e: reqwest::Error) -> Error {
        Error::reqwest(&self.id, e)
    }

    /// Sends `method url` for `scope` (e.g. `repository:library/alpine:pull`), with `headers`,
    /// authenticating as the upstream asks. Network errors are `Error::Engine`, by kind.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        scope: Option<&str>,
        headers: HeaderMap,
    ) -> Result<Response> {
        // Backing off (Retry-After) or breaker open: not asked at all.
        self.health.admit().map_err(|e| self.err(e))?;
        let url = self.url(path);
        let build = |auth: Option<HeaderValue>| -> RequestBuilder {
            let mut rb = self
                .http
                .request(method.clone(), &url)
                .headers(headers.clone());
            if let Some(a) = auth {
                rb = rb.header(http::header::AUTHORIZATION, a);
            }
            rb
        };
        // Unscoped requests (probes) go without credentials: any answer proves reachability.
        let known = match scope {
            Some(_) => self.challenge.read().ok().and_then(|c| c.clone()),
            None => None,
        };
        let first_auth = match &known {
            Some(c) => self.authorization(c, scope, false).await?,
            None => None,
        };
        let resp = self.sent(build(first_auth).send().await)?;
        self.account(&method, path, scope, &resp);
        if resp.status() != StatusCode::UNAUTHORIZED || scope.is_none() {
            return Ok(resp);
        }
        let Some(ch) = resp
            .headers()
            .get(http::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_challenge)
        else {
            return Ok(resp);
        };
        if let Ok(mut c) = self.challenge.write() {
            *c = Some(ch.clone());
        }
        let auth = self.authorization(&ch, scope, true).await?;
        if auth.is_none() {
            return Ok(resp);
        }
        let resp = self.sent(build(auth).send().await)?;
        self.account(&method, path, scope, &resp);
        Ok(resp)
    }

    /// A request's outcome, a transport failure told to the breaker.
    fn sent(&self, r: reqwest::Result<Response>) -> Result<Response> {
        r.map_err(|e| {
            let e = self.reqwest(e);
            self.failed(&e);
            e
        })
    }

    /// Counts a request by what it costs (a manifest `GET` is a pull to a rate-limited
    /// registry; a `HEAD` is not) and tells the upstream's health its answer (quota per
    /// credential, `Retry-After`, a 5xx).
    fn account(&self, method: &Method, path: &str, scope: Option<&str>, resp: &Response) {
        // Unscoped requests (probes) go without credentials.
        let credential = match scope {
            Some(_) => self.credential(),
            None => ANONYMOUS,
        };
        self.health
            .answered(resp.status(), resp.headers(), credential);
        let Some(m) = &self.metrics else {
            return;
        };
        let kind = match *method {
            Method::GET if path.contains("/manifests/") => "pull",
            Method::HEAD => "head",
            _ => "other",
        };
        m.upstream_request(&self.id, kind);
    }

    /// Counts requests and records announced quotas in `metrics`.
    pub fn with_metrics(mut self, metrics: crate::metrics::Metrics) -> RegistryClient {
        self.metrics = Some(metrics);
        self
    }

    /// The `Authorization` value for a challenge: a cached or fresh Bearer token, or Basic.
    async fn authorization(
        &self,
        ch: &Challenge,
        scope: Option<&str>,
        refresh: bool,
    ) -> Result<Option<HeaderValue>> {
        match ch {
            Challenge::Basic => Ok(self.basic_header()),
            Challenge::Bearer { realm, service } => {
                let key = scope.unwrap_or("");
                if !refresh {
                    if let Some(t) = self.tokens.get(key) {
                        return Ok(HeaderValue::from_str(&format!("Bearer {t}")).ok());
                    }
                }
                let token = self.fetch_token(realm, service.as_deref(), scope).await?;
                Ok(token.and_then(|t| HeaderValue::from_str(&format!("Bearer {t}")).ok()))
            }
        }
    }

    fn basic_header(&self) -> Option<HeaderValue> {
        use base64::Engine as _;
        let (u, p) = self.basic.as_ref()?;
        let enc = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        HeaderValue::from_str(&format!("Basic {enc}")).ok()
    }

    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: Option<&str>,
    ) -> Result<Option<String>> {
        let mut rb = self.http.get(realm);
        let mut q: Vec<(&str, &str)> = Vec::new();
        if let Some(s) = service {
            q.push(("service", s));
        }
        if let Some(s) = scope {
            q.push(("scope", s));
        }
        rb = rb.query(&q);
        if let Some(b) = self.basic_header() {
            let allowed = self.realms.allows(realm);
            self.withheld
                .store(!allowed, std::sync::atomic::Ordering::Relaxed);
            if allowed {
                rb = rb.header(http::header::AUTHORIZATION, b);
            } else {
                // A realm elsewhere may be anyone's: it gets no credentials, and the upstream
                // decides what an anonymous token opens.
                tracing::warn!(
                    engine = %self.id,
                    realm,
                    "the upstream's token realm is neither its own origin nor listed in upstreams[].auth.realms (or is plain http for an https upstream): asking it for an anonymous token, without our credentials"
                );
            }
        }
        let resp = rb.send().await.map_err(|e| self.reqwest(e))?;
        if !resp.status().is_success() {
            // Wrong credentials or a denied scope: the request goes on without a token and the
            // upstream's own 401/403 reaches the caller.
            tracing::warn!(engine = %self.id, status = %resp.status(), "token request refused");
            return Ok(None);
        }
        let body = super::limit::read_body(resp, super::limit::MAX_TOKEN, "token response")
            .await
            .map_err(|e| self.err(e))?;
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| self.permanent(format!("token endpoint answered garbage: {e}")))?;
        let Some((token, ttl)) = parsed.into_token() else {
            return Ok(None);
        };
        self.tokens.put(scope.unwrap_or(""), token.clone(), ttl);
        Ok(Some(token))
    }
}
