//! Registry tokens: short-lived ES256 JWTs in the Docker token format (`access` claim listing
//! `{type, name, actions}`), signed with this region's key and checked against every configured
//! public key. The `kid` header is the key's RFC 7638 thumbprint, so a verifier picks the key
//! without trying them all, and several keys can be accepted during a rotation.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::config::auth::{is_inline_pem, TokenConfig};

/// `iss` and `aud` of our tokens, and the `service` of our challenges.
pub const SERVICE: &str = "ociedge";

/// Clock skew tolerated between regions when checking `exp` and `nbf`.
const LEEWAY_SECS: u64 = 5;

/// The DER prefix of a P-256 `SubjectPublicKeyInfo` holding an uncompressed point: the SPKI of
/// every P-256 public key is this prefix and the 65 point bytes.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// One `access` entry: the actions granted on one resource.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessEntry {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

/// The claims of a token.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    /// The user name; empty for an anonymous client.
    #[serde(default)]
    pub sub: String,
    pub aud: String,
    pub exp: u64,
    pub nbf: u64,
    pub iat: u64,
    pub jti: String,
    #[serde(default)]
    pub access: Vec<AccessEntry>,
    /// Who vouched for `sub`: `htpasswd`, or `upstream` for a user only a passthrough upstream
    /// knows (whose name must not be mistaken for a local user's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idp: Option<String>,
}

impl Claims {
    /// Whether the token grants `action` on repository `name`.
    pub fn grants(&self, name: &str, action: &str) -> bool {
        self.access.iter().any(|a| {
            a.kind == "repository" && a.name == name && a.actions.iter().any(|x| x == action)
        })
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The signing key and the accepted public keys.
pub struct Keys {
    kid: String,
    signing: EncodingKey,
    verifying: HashMap<String, DecodingKey>,
    ttl: Duration,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("kid", &self.kid)
            .field("verify_kids", &self.verifying.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Reads a key setting: the PEM text itself, or a file holding it.
fn read_pem(setting: &str) -> Result<pem::Pem, String> {
    let text = if is_inline_pem(setting) {
        setting.to_string()
    } else {
        std::fs::read_to_string(setting).map_err(|e| format!("{setting}: {e}"))?
    };
    let what = if is_inline_pem(setting) {
        "inline PEM".to_string()
    } else {
        setting.to_string()
    };
    pem::parse(text.trim()).map_err(|e| format!("{what}: not PEM: {e}"))
}

/// The JWK thumbprint (RFC 7638) of a P-256 public key given as its uncompressed point.
pub fn kid(point: &[u8]) -> String {
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwk = format!(
        r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
        b64(&point[1..33]),
        b64(&point[33..65])
    );
    b64(&sha2::Sha256::digest(jwk.as_bytes()))
}

fn decoding_key(point: &[u8]) -> Result<DecodingKey, String> {
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    DecodingKey::from_ec_components(&b64(&point[1..33]), &b64(&point[33..65]))
        .map_err(|e| e.to_string())
}

/// A P-256 private key (SEC1 `EC PRIVATE KEY` or PKCS#8 `PRIVATE KEY`): the key to sign with
/// and its public point.
fn signing_key(p: &pem::Pem) -> Result<(EncodingKey, Vec<u8>), String> {
    use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
    if p.tag() != "EC PRIVATE KEY" && p.tag() != "PRIVATE KEY" {
        return Err(format!(
            "expected an EC PRIVATE KEY or PRIVATE KEY, found {}",
            p.tag()
        ));
    }
    let pair = EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_FIXED_SIGNING, p.contents())
        .map_err(|e| format!("not an ECDSA P-256 private key: {e}"))?;
    let pkcs8 = pair
        .to_pkcs8v1()
        .map_err(|_| "cannot re-encode the private key".to_string())?;
    Ok((
        EncodingKey::from_ec_der(pkcs8.as_ref()),
        pair.public_key().as_ref().to_vec(),
    ))
}

/// A P-256 public key (`PUBLIC KEY`, SubjectPublicKeyInfo): its uncompressed point.
fn public_point(p: &pem::Pem) -> Result<Vec<u8>, String> {
    let der = p.contents();
    if p.tag() != "PUBLIC KEY" {
        return Err(format!("expected a PUBLIC KEY, found {}", p.tag()));
    }
    match der.strip_prefix(&P256_SPKI_PREFIX[..]) {
        Some(point) if point.len() == 65 && point[0] == 4 => Ok(point.to_vec()),
        _ => Err("not an ECDSA P-256 public key".into()),
    }
}

impl Keys {
    /// Loads the keys of `auth.token`; errors name the setting.
    pub fn load(cfg: &TokenConfig) -> Result<Keys, String> {
        let p = read_pem(&cfg.signing_key).map_err(|e| format!("auth.token.signing_key: {e}"))?;
        let (signing, point) =
            signing_key(&p).map_err(|e| format!("auth.token.signing_key: {e}"))?;
        let kid = kid(&point);
        let mut verifying = HashMap::new();
        verifying.insert(kid.clone(), decoding_key(&point)?);
        for (i, v) in cfg.verify_keys.iter().enumerate() {
            let at = |e: String| format!("auth.token.verify_keys[{i}]: {e}");
            let point = public_point(&read_pem(v).map_err(at)?).map_err(at)?;
            verifying.insert(super::token::kid(&point), decoding_key(&point).map_err(at)?);
        }
        Ok(Keys {
            kid,
            signing,
            verifying,
            ttl: cfg.ttl.0,
        })
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Signs `claims` as they are (tests use it to make expired tokens).
    pub fn sign(&self, claims: &Claims) -> Result<String, String> {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(self.kid.clone());
        h.typ = Some("JWT".into());
        jsonwebtoken::encode(&h, claims, &self.signing).map_err(|e| e.to_string())
    }

    /// A token for `sub` granting `access`, valid for the configured ttl.
    pub fn issue(
        &self,
        sub: &str,
        idp: Option<&str>,
        access: Vec<AccessEntry>,
    ) -> Result<String, String> {
        let now = now_secs();
        self.sign(&Claims {
            iss: SERVICE.into(),
            sub: sub.into(),
            aud: SERVICE.into(),
            exp: now + self.ttl.as_secs(),
            nbf: now.saturating_sub(1),
            iat: now,
            jti: format!("{:032x}", rand::random::<u128>()),
            access,
            idp: idp.map(str::to_string),
        })
    }

    /// Checks signature (by `kid`), algorithm, issuer, audience and lifetime.
    pub fn verify(&self, token: &str) -> Result<Claims, String> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
        if header.alg != Algorithm::ES256 {
            return Err(format!("algorithm {:?} is not accepted", header.alg));
        }
        let kid = header.kid.ok_or("the token names no key (kid)")?;
        let key = self
            .verifying
            .get(&kid)
            .ok_or_else(|| format!("the token's key {kid:?} is not a configured key"))?;
        let mut v = Validation::new(Algorithm::ES256);
        v.leeway = LEEWAY_SECS;
        v.validate_nbf = true;
        v.set_audience(&[SERVICE]);
        v.set_issuer(&[SERVICE]);
        v.set_required_spec_claims(&["exp", "nbf", "iss", "aud"]);
        jsonwebtoken::decode::<Claims>(token, key, &v)
            .map(|d| d.claims)
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

    /// A fresh key pair as PEM: (PKCS#8 private, SPKI public).
    pub fn keypair() -> (String, String) {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, doc.as_ref()).unwrap();
        let mut spki = P256_SPKI_PREFIX.to_vec();
        spki.extend_from_slice(pair.public_key().as_ref());
        (
            pem::encode(&pem::Pem::new("PRIVATE KEY", doc.as_ref().to_vec())),
            pem::encode(&pem::Pem::new("PUBLIC KEY", spki)),
        )
    }

    fn keys(signing: &str, verify: &[&str]) -> Keys {
        Keys::load(&TokenConfig {
            signing_key: signing.into(),
            verify_keys: verify.iter().map(|s| s.to_string()).collect(),
            ttl: crate::config::HumanDuration(Duration::from_secs(300)),
            realm: None,
        })
        .unwrap()
    }

    #[test]
    fn tokens_verify_across_keys_and_expire() {
        let (a_priv, a_pub) = keypair();
        let (b_priv, _) = keypair();
        let a = keys(&a_priv, &[]);
        let b = keys(&b_priv, &[&a_pub]);
        let entry = AccessEntry {
            kind: "repository".into(),
            name: "team/app".into(),
            actions: vec!["pull".into()],
        };
        let t = a.issue("alice", Some("htpasswd"), vec![entry]).unwrap();
        let c = b.verify(&t).unwrap();
        assert_eq!(c.sub, "alice");
        assert!(c.grants("team/app", "pull"));
        assert!(!c.grants("team/app", "push"));
        assert!(!c.grants("team/other", "pull"));
        // b's key is unknown to a.
        let tb = b.issue("alice", None, vec![]).unwrap();
        assert!(a.verify(&tb).unwrap_err().contains("not a configured key"));
        // Expired.
        let mut old = c.clone();
        old.exp = now_secs() - 60;
        assert!(b.verify(&a.sign(&old).unwrap()).is_err());
        // A tampered payload.
        let mut parts: Vec<&str> = t.split('.').collect();
        let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"iss":"ociedge","aud":"ociedge","sub":"root","exp":9999999999,"nbf":0,"iat":0,"jti":"x"}"#);
        parts[1] = &forged;
        assert!(b.verify(&parts.join(".")).is_err());
    }

    #[test]
    fn bad_keys_are_named() {
        let (_, a_pub) = keypair();
        let e = Keys::load(&TokenConfig {
            signing_key: a_pub,
            verify_keys: vec![],
            ttl: crate::config::HumanDuration(Duration::from_secs(300)),
            realm: None,
        })
        .unwrap_err();
        assert!(e.contains("auth.token.signing_key"), "{e}");
        let e = Keys::load(&TokenConfig {
            signing_key: "/nonexistent/key.pem".into(),
            verify_keys: vec![],
            ttl: crate::config::HumanDuration(Duration::from_secs(300)),
            realm: None,
        })
        .unwrap_err();
        assert!(e.contains("/nonexistent/key.pem"), "{e}");
    }
}
