//! Upstream registry authentication: `WWW-Authenticate` challenges, the Bearer token flow
//! (anonymous or with basic credentials), a token cache keyed by scope, and the [`RealmPolicy`]
//! that decides which token realms may receive credentials.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// A parsed `WWW-Authenticate` challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

/// Parses `Bearer realm="…",service="…",scope="…"` (or `Basic realm="…"`). Quoted values may
/// contain commas; unknown parameters are ignored. `None` for anything unusable.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header
        .split_once(char::is_whitespace)
        .unwrap_or((header, ""));
    let params = parse_params(rest);
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let realm = params.get("realm")?.clone();
    let url = url::Url::parse(&realm).ok()?;
    if url.scheme() != "https" && url.scheme() != "http" {
        return None;
    }
    Some(Challenge::Bearer {
        realm,
        service: params.get("service").cloned(),
    })
}

fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && (b[i] == b',' || b[i].is_ascii_whitespace()) {
            i += 1;
        }
        let ks = i;
        while i < b.len() && b[i] != b'=' && b[i] != b',' {
            i += 1;
        }
        let key = s[ks..i].trim().to_ascii_lowercase();
        if i >= b.len() || b[i] != b'=' {
            continue;
        }
        i += 1;
        let mut val = String::new();
        if i < b.len() && b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                // Push whole UTF-8 characters.
                let ch = s[i..].chars().next().unwrap_or('\u{fffd}');
                val.push(ch);
                i += ch.len_utf8();
            }
            i += 1;
        } else {
            let vs = i;
            while i < b.len() && b[i] != b',' {
                i += 1;
            }
            val = s[vs..i].trim().to_string();
        }
        if !key.is_empty() {
            out.insert(key, val);
        }
    }
    out
}

/// Where credentials meant for an upstream may be sent when its challenge names a token realm:
/// the upstream's own origin (scheme, host and port of its `url`) and the origins listed in
/// `upstreams[].auth.realms` (for `docker.io`, by default, `https://auth.docker.io`), and never
/// over plain HTTP unless the upstream itself is reached over plain HTTP. A challenge is written
/// by whoever answers the upstream's URL; without this, a hostile or compromised upstream (or
/// anyone on the path of a plain-HTTP one) could name any realm and collect the credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RealmPolicy {
    allowed: Vec<url::Origin>,
    plain_ok: bool,
}

/// The token service of Docker Hub: the default `realms` of an upstream named `docker.io`.
pub const DOCKER_HUB_REALM: &str = "https://auth.docker.io";

impl RealmPolicy {
    /// The policy of a configured upstream (`None` when its `url` does not parse:
    /// `Config::validate` refuses that).
    pub fn of(upstream: &crate::config::UpstreamConfig) -> Option<RealmPolicy> {
        let base = url::Url::parse(&upstream.url).ok()?;
        let realms = upstream.auth.as_ref().and_then(|a| a.realms.as_deref());
        Some(RealmPolicy::new(&upstream.name, &base, realms))
    }

    /// The policy for an upstream at `base` with the configured `realms` (`None`: the default
    /// for the upstream `name`).
    pub fn new(name: &str, base: &url::Url, realms: Option<&[String]>) -> RealmPolicy {
        let mut allowed = vec![base.origin()];
        let default: &[String] = &[];
        let listed = realms.unwrap_or(default);
        let hub = [DOCKER_HUB_REALM.to_string()];
        let listed = if realms.is_none() && name == "docker.io" {
            &hub[..]
        } else {
            listed
        };
        for r in listed {
            if let Ok(u) = url::Url::parse(r) {
                allowed.push(u.origin());
            }
        }
        RealmPolicy {
            allowed,
            plain_ok: base.scheme() == "http",
        }
    }

    /// Whether credentials may go to `realm` (the URL a challenge names).
    pub fn allows(&self, realm: &str) -> bool {
        let Ok(u) = url::Url::parse(realm) else {
            return false;
        };
        if u.scheme() != "https" && !(u.scheme() == "http" && self.plain_ok) {
            return false;
        }
        let o = u.origin();
        o.is_tuple() && self.allowed.contains(&o)
    }
}

/// The token endpoint's answer (Docker's `token` or OAuth2's `access_token`).
#[derive(Deserialize)]
pub struct TokenResponse {
    pub token: Option<String>,
    pub access_token: Option<String>,
    pub expires_in: Option<u64>,
}

impl TokenResponse {
    pub fn into_token(self) -> Option<(String, Duration)> {
        let t = self.token.or(self.access_token).filter(|t| !t.is_empty())?;
        // The distribution token spec says 60 s when unspecified; never trust more than an hour.
        let ttl = Duration::from_secs(self.expires_in.unwrap_or(60).clamp(10, 3600));
        Some((t, ttl))
    }
}

/// Tokens by scope, each valid until shortly before it expires.
#[derive(Default, Debug)]
pub struct TokenCache {
    tokens: RwLock<HashMap<String, (String, Instant)>>,
}

impl TokenCache {
    pub fn get(&self, scope: &str) -> Option<String> {
        let map = self.tokens.read().ok()?;
        let (tok, until) = map.get(scope)?;
        (Instant::now() < *until).then(|| tok.clone())
    }

    pub fn put(&self, scope: &str, token: String, ttl: Duration) {
        // Renew a little early so a token never expires mid-request.
        let until = Instant::now()
            + ttl
                .saturating_sub(Duration::from_secs(5))
                .max(Duration::from_secs(1));
        if let Ok(mut map) = self.tokens.write() {
            if map.len() > 10_000 {
                let now = Instant::now();
                map.retain(|_, (_, u)| *u > now);
            }
            map.insert(scope.to_string(), (token, until));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_challenge() {
        let h = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push""#;
        assert_eq!(
            parse_challenge(h),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into())
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="x""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Bearer service=x"), None);
        assert_eq!(
            parse_challenge(r#"Bearer realm="file:///etc/passwd""#),
            None
        );
        assert_eq!(parse_challenge(""), None);
        assert_eq!(parse_challenge("Bearer realm=\"unterminated"), None);
    }

    #[test]
    fn realm_policy() {
        let base = url::Url::parse("https://registry.example:5000/").unwrap();
        let p = RealmPolicy::new("registry.example", &base, None);
        assert!(p.allows("https://registry.example:5000/token?x=1"));
        assert!(p.allows("https://REGISTRY.example:5000/auth"));
        // Another port, host or scheme is another origin.
        assert!(!p.allows("https://registry.example/token"));
        assert!(!p.allows("https://registry.example:5001/token"));
        assert!(!p.allows("http://registry.example:5000/token"));
        assert!(!p.allows("https://evil.example:5000/token"));
        assert!(!p.allows("https://registry.example:5000@evil.example/token"));
        assert!(!p.allows("not a url"));
        let p = RealmPolicy::new(
            "registry.example",
            &base,
            Some(&["https://auth.example".to_string()]),
        );
        assert!(p.allows("https://auth.example/token"));
        assert!(p.allows("https://auth.example:443/token"));
        assert!(!p.allows("http://auth.example/token"));
        // Docker Hub's token service by default, and only for docker.io.
        let hub = url::Url::parse("https://registry-1.docker.io").unwrap();
        assert!(RealmPolicy::new("docker.io", &hub, None).allows("https://auth.docker.io/token"));
        assert!(
            !RealmPolicy::new("docker.io", &hub, Some(&[])).allows("https://auth.docker.io/token")
        );
        assert!(!RealmPolicy::new("ghcr.io", &hub, None).allows("https://auth.docker.io/token"));
        // A plain-HTTP upstream may have a plain-HTTP realm at its own origin or a listed one.
        let plain = url::Url::parse("http://127.0.0.1:5000").unwrap();
        let p = RealmPolicy::new("x", &plain, Some(&["http://127.0.0.1:5001".to_string()]));
        assert!(p.allows("http://127.0.0.1:5000/token"));
        assert!(p.allows("http://127.0.0.1:5001/token"));
        assert!(!p.allows("http://127.0.0.1:5002/token"));
    }

    #[test]
    fn token_cache_expires() {
        let c = TokenCache::default();
        c.put("s", "t".into(), Duration::from_secs(60));
        assert_eq!(c.get("s").as_deref(), Some("t"));
        assert_eq!(c.get("other"), None);
    }
}
