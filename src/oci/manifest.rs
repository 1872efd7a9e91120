//! Manifest validation: parse the JSON, check its media type, and list what it references
//! (blobs, child manifests, subject) so a push can refuse a manifest whose content is missing,
//! replication can copy children before their parents and eviction can keep what a kept
//! manifest needs.

use serde::Deserialize;
use serde_json::Value;

use super::{media, Digest, ErrorCode, OciError};

/// A refusal is a `MANIFEST_INVALID` error.
type Result<T> = std::result::Result<T, OciError>;

/// Manifests larger than this are refused (the spec's bound).
pub const MAX_MANIFEST: usize = 4 << 20;

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    digest: String,
    #[serde(default)]
    size: Option<i64>,
    #[serde(default)]
    urls: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct Raw {
    #[serde(rename = "schemaVersion")]
    schema_version: Option<i64>,
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(rename = "artifactType", default)]
    artifact_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    subject: Option<Descriptor>,
    #[serde(default)]
    annotations: Option<Value>,
}

/// What a pushed manifest references.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub media_type: String,
    /// Config and layers that must exist (foreign, `urls`-addressed layers excluded).
    pub blobs: Vec<Digest>,
    /// Child manifests of an index.
    pub manifests: Vec<Digest>,
    pub subject: Option<Digest>,
    /// `artifactType`, or the config's media type (what the referrers API reports).
    pub artifact_type: Option<String>,
    pub annotations: Option<Value>,
}

fn invalid(msg: impl Into<String>) -> OciError {
    OciError::new(ErrorCode::ManifestInvalid, msg)
}

fn digest(d: &str) -> Result<Digest> {
    d.parse()
        .map_err(|e| invalid(format!("descriptor digest {d:?}: {e}")))
}

/// Parses and checks a manifest. `content_type` is the request's `Content-Type`, if any.
pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Parsed> {
    if bytes.len() > MAX_MANIFEST {
        return Err(invalid("manifest larger than 4 MiB"));
    }
    let raw: Raw =
        serde_json::from_slice(bytes).map_err(|e| invalid(format!("not a manifest: {e}")))?;
    if raw.schema_version != Some(2) {
        return Err(invalid("schemaVersion must be 2"));
    }
    let ct = content_type
        .map(|c| c.split(';').next().unwrap_or(c).trim())
        .filter(|c| !c.is_empty());
    let media_type = match (&raw.media_type, ct) {
        (Some(m), Some(c)) if m != c => {
            return Err(invalid(format!(
                "mediaType {m:?} does not match Content-Type {c:?}"
            )))
        }
        (Some(m), _) => m.clone(),
        (None, Some(c)) => c.to_string(),
        (None, None) => media::sniff_manifest(bytes)
            .ok_or_else(|| invalid("not a manifest: no manifest media type"))?,
    };
    if !media::is_manifest_type(&media_type) {
        return Err(invalid(format!(
            "{:?} is not a manifest media type (accepted: {})",
            media_type.chars().take(100).collect::<String>(),
            media::MANIFEST_TYPES.join(", ")
        )));
    }
    let mut blobs = Vec::new();
    let mut manifests = Vec::new();
    let is_index = media_type == media::OCI_INDEX || media_type == media::DOCKER_LIST;
    if is_index {
        for m in raw.manifests.as_deref().unwrap_or_default() {
            manifests.push(digest(&m.digest)?);
        }
    } else {
        let config = raw
            .config
            .as_ref()
            .ok_or_else(|| invalid("an image manifest needs a config"))?;
        blobs.push(digest(&config.digest)?);
        for l in raw.layers.as_deref().unwrap_or_default() {
            let d = digest(&l.digest)?;
            if l.size.is_some_and(|s| s < 0) {
                return Err(invalid("negative descriptor size"));
            }
            // Foreign layers live elsewhere (their `urls`): not required here.
            let foreign = l.urls.as_ref().is_some_and(|u| !u.is_empty())
                || l.media_type
                    .as_deref()
                    .is_some_and(|m| m.contains("foreign") || m.contains("nondistributable"));
            if !foreign {
                blobs.push(d);
            }
        }
    }
    let subject = raw
        .subject
        .as_ref()
        .map(|s| digest(&s.digest))
        .transpose()?;
    let artifact_type = raw
        .artifact_type
        .clone()
        .or_else(|| raw.config.as_ref().and_then(|c| c.media_type.clone()));
    Ok(Parsed {
        media_type,
        blobs,
        manifests,
        subject,
        artifact_type,
        annotations: raw.annotations,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn image_and_index() {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"x","digest":"{}","size":1}},"layers":[{{"digest":"{}","size":2}},{{"digest":"{}","size":3,"urls":["http://x"]}}],"subject":{{"digest":"{}","size":4}}}}"#,
            media::OCI_MANIFEST,
            d('a'),
            d('b'),
            d('c'),
            d('e')
        );
        let p = parse(m.as_bytes(), Some(media::OCI_MANIFEST)).unwrap();
        assert_eq!(p.blobs.len(), 2, "foreign layer skipped");
        assert_eq!(p.subject.unwrap().to_string(), d('e'));
        assert_eq!(p.artifact_type.as_deref(), Some("x"));
        let i = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{{"digest":"{}","size":1}}]}}"#,
            media::OCI_INDEX,
            d('f')
        );
        let p = parse(i.as_bytes(), None).unwrap();
        assert_eq!(p.manifests.len(), 1);
    }

    #[test]
    fn refusals() {
        for bad in [
            "",
            "{",
            "[]",
            r#"{"schemaVersion":1}"#,
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#,
        ] {
            assert!(parse(bad.as_bytes(), None).is_err(), "{bad}");
        }
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[]}}"#,
            media::OCI_INDEX
        );
        assert!(
            parse(m.as_bytes(), Some(media::OCI_MANIFEST)).is_err(),
            "content type mismatch"
        );
        let bad_digest = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{{"digest":"sha256:zz"}}]}}"#,
            media::OCI_INDEX
        );
        assert!(parse(bad_digest.as_bytes(), None).is_err());
    }
}
