//! The `auth:` section: who the clients are (htpasswd), the tokens this region signs and the keys
//! it accepts, and the per-repository rules. Only structure is checked here; the files are read
//! (and their errors reported with the same key paths) when the server starts.

use serde::{Deserialize, Serialize};

use super::{err, ConfigError, HumanDuration};

/// Client authentication and authorization. Without this section anyone may pull (and push,
/// when `push.engine` is set), exactly as before it existed.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// An htpasswd file of bcrypt entries (`htpasswd -B`). Re-read when it changes. Without it
    /// the only clients are anonymous ones and those a passthrough upstream vouches for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub htpasswd: Option<String>,
    /// The token service (`/token`) and the keys tokens are checked with.
    pub token: TokenConfig,
    /// First match wins; a repository no rule matches is denied to everyone.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// The ECDSA P-256 private key (PEM: `EC PRIVATE KEY` or PKCS#8 `PRIVATE KEY`) this region
    /// signs ES256 tokens with: a file path, or the PEM text itself (masked by `check-config`).
    /// Its public key is always accepted.
    pub signing_key: String,
    /// More public keys (PEM `PUBLIC KEY`: paths or PEM text) whose tokens are accepted: the
    /// other regions' keys, and a retired key during a rotation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verify_keys: Vec<String>,
    /// Lifetime of an issued token. Default 5m; between 10s and 1h.
    #[serde(default = "default_ttl")]
    pub ttl: HumanDuration,
    /// The token endpoint clients are sent to in `WWW-Authenticate` (`https://registry.example/token`):
    /// the name clients use, as the certificate names it. Default: `/token` at the address and
    /// scheme of the listener the client connected to. Never taken from the request's `Host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub realm: Option<String>,
}

/// One rule: which repositories, and who may do what there. Entries are user names,
/// `authenticated` (any user whose credentials were verified) or `anonymous` (everyone).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Glob on repository names as stored (`library/**`, `ghcr.io/org/*`): `*` stays within one
    /// path component, `**` crosses them.
    pub repos: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pull: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub push: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delete: Vec<String>,
}

fn default_ttl() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(300))
}

/// `auth.token.realm`: an absolute http(s) URL without query, fragment or user, and nothing that
/// would end its quoted string in the challenge.
fn check_realm(r: &str) -> Result<(), String> {
    let u = url::Url::parse(r).map_err(|e| format!("{r:?}: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") || u.host().is_none() {
        return Err(format!("{r:?} is not an http(s) URL"));
    }
    if u.query().is_some() || u.fragment().is_some() || !u.username().is_empty() {
        return Err(format!("{r:?}: no query, fragment or user"));
    }
    if r.bytes()
        .any(|b| b == b'"' || b == b'\\' || !b.is_ascii_graphic())
    {
        return Err(format!("{r:?}: only printable ASCII without quotes"));
    }
    Ok(())
}

/// Whether a key setting holds the PEM text itself rather than a path.
pub fn is_inline_pem(v: &str) -> bool {
    v.trim_start().starts_with("-----BEGIN")
}

impl AuthConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.htpasswd.as_deref().is_some_and(str::is_empty) {
            return Err(err("auth.htpasswd", "must be a file path"));
        }
        if self.token.signing_key.trim().is_empty() {
            return Err(err(
                "auth.token.signing_key",
                "must be a PEM file path or PEM text",
            ));
        }
        for (i, k) in self.token.verify_keys.iter().enumerate() {
            if k.trim().is_empty() {
                return Err(err(
                    &format!("auth.token.verify_keys[{i}]"),
                    "must be a PEM file path or PEM text",
                ));
            }
        }
        if let Some(r) = &self.token.realm {
            check_realm(r).map_err(|m| err("auth.token.realm", m))?;
        }
        let ttl = self.token.ttl.0.as_secs();
        if !(10..=3600).contains(&ttl) {
            return Err(err("auth.token.ttl", "must be between 10s and 1h"));
        }
        for (i, r) in self.rules.iter().enumerate() {
            if globset::Glob::new(&r.repos).is_err() || r.repos.is_empty() {
                return Err(err(
                    &format!("auth.rules[{i}].repos"),
                    format!("{:?} is not a glob", r.repos),
                ));
            }
            for (action, who) in [("pull", &r.pull), ("push", &r.push), ("delete", &r.delete)] {
                for (j, w) in who.iter().enumerate() {
                    if w.is_empty() || w.contains(':') || w.chars().any(char::is_whitespace) {
                        return Err(err(
                            &format!("auth.rules[{i}].{action}[{j}]"),
                            format!("{w:?} is not a user name, `authenticated` or `anonymous`"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// A copy fit for printing: a private key given inline is masked (public keys are not
    /// secrets, and paths are shown so an operator can see which files are read).
    pub fn masked(&self) -> AuthConfig {
        let mut c = self.clone();
        if is_inline_pem(&c.token.signing_key) {
            c.token.signing_key = "********".into();
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const AUTH_BASE: &str = "storage:\n  preference: a\n  engines:\n    a: { url: 'memory://' }\n";

    #[test]
    fn upstream_realms_are_origins_and_never_plain_http_for_https() {
        let up = |url: &str, realms: &str| {
            format!("{AUTH_BASE}upstreams:\n  - {{ name: r.example, url: '{url}', auth: {{ username: u, password: p, realms: [{realms}] }}, access: public }}\n")
        };
        Config::parse(&up("https://r.example", "'https://auth.example'"))
            .unwrap()
            .validate()
            .unwrap();
        Config::parse(&up("http://r.example", "'http://auth.example:8080'"))
            .unwrap()
            .validate()
            .unwrap();
        for (url, realms) in [
            ("https://r.example", "'http://auth.example'"),
            ("https://r.example", "'https://auth.example/token'"),
            ("https://r.example", "'auth.example'"),
        ] {
            let e = Config::parse(&up(url, realms))
                .unwrap()
                .validate()
                .unwrap_err()
                .0;
            assert!(e.starts_with("upstreams[0].auth.realms[0]"), "{e}");
        }
    }

    #[test]
    fn the_token_realm_is_an_absolute_url() {
        let with = |realm: &str| {
            format!("{AUTH_BASE}auth:\n  token: {{ signing_key: /k, realm: '{realm}' }}\n")
        };
        Config::parse(&with("https://registry.example/token"))
            .unwrap()
            .validate()
            .unwrap();
        for bad in [
            "/token",
            "ftp://x/token",
            "https://registry.example/token?x=1",
            "https://u@registry.example/token",
            "https://registry.example/to\"ken",
        ] {
            let e = Config::parse(&with(bad)).unwrap().validate().unwrap_err().0;
            assert!(e.starts_with("auth.token.realm"), "{bad}: {e}");
        }
    }
}
