//! Content digests (`algorithm:hex`) and streaming verification.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256, Sha512};

/// A validated content digest.
///
/// Invariants: the algorithm is `sha256` or `sha512` (the two the OCI image spec registers) and the
/// encoded part is lowercase hex of exactly the algorithm's length. A `Digest` is therefore safe to
/// use as a path component of the storage layout.
///
/// ```
/// use ociedge::oci::Digest;
/// let d: Digest = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".parse().unwrap();
/// assert_eq!(d.algorithm(), "sha256");
/// assert!("sha256:E3B0".parse::<Digest>().is_err());
/// assert!("md5:abc".parse::<Digest>().is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    text: Box<str>,
    colon: usize,
}

/// Why a digest string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    #[error("digest must be algorithm:hex")]
    Malformed,
    #[error("unsupported digest algorithm {0:?} (sha256 and sha512 are supported)")]
    Algorithm(String),
    #[error("digest hex must be {0} lowercase hex characters")]
    Encoded(usize),
}

impl Digest {
    /// The algorithm name, `sha256` or `sha512`.
    pub fn algorithm(&self) -> &str {
        &self.text[..self.colon]
    }

    /// The lowercase hex part.
    pub fn hex(&self) -> &str {
        &self.text[self.colon + 1..]
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The sha256 digest of `data`.
    pub fn sha256_of(data: &[u8]) -> Digest {
        let hex = hex::encode(Sha256::digest(data));
        Digest {
            text: format!("sha256:{hex}").into(),
            colon: 6,
        }
    }

    /// A digest of `data` with the same algorithm as `self`.
    pub fn same_algorithm_of(&self, data: &[u8]) -> Digest {
        let mut v = Verifier::new(self);
        v.update(data);
        v.finish()
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let colon = s.find(':').ok_or(DigestError::Malformed)?;
        let (alg, enc) = (&s[..colon], &s[colon + 1..]);
        let len = match alg {
            "sha256" => 64,
            "sha512" => 128,
            _ if alg.is_empty() || enc.is_empty() => return Err(DigestError::Malformed),
            other => return Err(DigestError::Algorithm(other.chars().take(32).collect())),
        };
        if enc.len() != len
            || !enc
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(DigestError::Encoded(len));
        }
        Ok(Digest {
            text: s.into(),
            colon,
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Incremental hash of a byte stream, compared with the expected digest at the end.
///
/// Every byte that will be committed under a digest goes through one of these first.
pub enum Verifier {
    Sha256(Sha256),
    Sha512(Sha512),
}

impl Verifier {
    pub fn new(expected: &Digest) -> Verifier {
        match expected.algorithm() {
            "sha512" => Verifier::Sha512(Sha512::new()),
            _ => Verifier::Sha256(Sha256::new()),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Verifier::Sha256(h) => h.update(data),
            Verifier::Sha512(h) => h.update(data),
        }
    }

    /// The digest of everything fed in.
    pub fn finish(self) -> Digest {
        let (text, colon) = match self {
            Verifier::Sha256(h) => (format!("sha256:{}", hex::encode(h.finalize())), 6),
            Verifier::Sha512(h) => (format!("sha512:{}", hex::encode(h.finalize())), 6),
        };
        Digest {
            text: text.into(),
            colon,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let ok = format!("sha256:{}", "a".repeat(64));
        assert!(ok.parse::<Digest>().is_ok());
        assert!(format!("sha512:{}", "0".repeat(128))
            .parse::<Digest>()
            .is_ok());
        for bad in [
            "",
            "sha256",
            "sha256:",
            ":abc",
            "sha256:abc",
            &format!("sha256:{}", "A".repeat(64)),
            &format!("sha256:{}", "g".repeat(64)),
            &format!("sha256:{}", "a".repeat(65)),
            &format!("sha384:{}", "a".repeat(96)),
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad}");
        }
    }

    #[test]
    fn verifier_matches_known_value() {
        let empty: Digest =
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
                .parse()
                .unwrap();
        assert_eq!(Verifier::new(&empty).finish(), empty);
        assert_eq!(Digest::sha256_of(b""), empty);
    }
}
