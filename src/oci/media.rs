//! Manifest media types and what a stored manifest's media type is when nobody said.

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_V1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// Every manifest type we ask upstreams for when the client's `Accept` is missing, so that an
/// upstream never downgrades to schema 1 on our account.
pub const ALL_MANIFESTS: &[&str] = &[OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];

/// The media type of manifest bytes read back from storage, where no `Content-Type` was kept:
/// the `mediaType` field when present, else inferred from the shape (as Distribution does).
pub fn sniff_manifest(bytes: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
        #[serde(rename = "schemaVersion")]
        schema_version: Option<u32>,
    }
    match serde_json::from_slice::<Probe>(bytes) {
        Ok(p) => match p.media_type {
            Some(m) if !m.is_empty() => m,
            _ if p.manifests.is_some() => OCI_INDEX.to_string(),
            _ if p.schema_version == Some(1) => DOCKER_V1_SIGNED.to_string(),
            _ => OCI_MANIFEST.to_string(),
        },
        Err(_) => OCI_MANIFEST.to_string(),
    }
}

/// Whether bytes are a manifest at all (a JSON object with `schemaVersion` 1 or 2), as opposed to
/// some other blob stored under its digest (a layer, an image config): only such content is
/// answered as a manifest. The first byte is checked before any parse, so a binary layer costs
/// nothing.
pub fn is_manifest(bytes: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "schemaVersion")]
        schema_version: Option<u32>,
    }
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return false;
    }
    serde_json::from_slice::<Probe>(bytes)
        .is_ok_and(|p| matches!(p.schema_version, Some(1) | Some(2)))
}

/// Whether a client's `Accept` header values allow `media_type`. No `Accept` at all, or `*/*`,
/// accepts anything.
pub fn accepts(accept: &[String], media_type: &str) -> bool {
    if accept.is_empty() {
        return true;
    }
    accept.iter().flat_map(|v| v.split(',')).any(|item| {
        let t = item.split(';').next().unwrap_or("").trim();
        t == media_type || t == "*/*" || t.is_empty()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffing() {
        assert_eq!(sniff_manifest(br#"{"mediaType":"x/y"}"#), "x/y");
        assert_eq!(sniff_manifest(br#"{"manifests":[]}"#), OCI_INDEX);
        assert_eq!(sniff_manifest(br#"{"config":{}}"#), OCI_MANIFEST);
    }

    #[test]
    fn only_manifests_are_manifests() {
        assert!(is_manifest(br#" {"schemaVersion":2,"layers":[]}"#));
        assert!(is_manifest(br#"{"schemaVersion":1,"fsLayers":[]}"#));
        assert!(!is_manifest(br#"{"architecture":"amd64","config":{}}"#));
        assert!(!is_manifest(br#"{"schemaVersion":3}"#));
        assert!(!is_manifest(b"\x1f\x8b\x08\x00 a gzip layer"));
        assert!(!is_manifest(b""));
    }

    #[test]
    fn accept_lists() {
        assert!(accepts(&[], OCI_INDEX));
        assert!(accepts(
            &[format!("{OCI_MANIFEST}, {OCI_INDEX};q=0.5")],
            OCI_INDEX
        ));
        assert!(!accepts(&[DOCKER_MANIFEST.to_string()], OCI_INDEX));
    }
}
