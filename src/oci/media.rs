//! Manifest media types and what a stored manifest's media type is when nobody said.

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_V1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
pub const DOCKER_V1: &str = "application/vnd.docker.distribution.manifest.v1+json";
/// The artifact manifest of the OCI 1.1 release candidates, still pushed by older tools.
pub const OCI_ARTIFACT: &str = "application/vnd.oci.artifact.manifest.v1+json";

/// Every media type ociedge accepts, stores and serves as a manifest. Whatever else a push or an
/// upstream calls a manifest (`text/html` with a `<script>` in an annotation) is refused: the
/// `Content-Type` of a manifest response is its media type, so this list is what keeps the
/// registry's origin from serving a page. Artifacts are image manifests with an `artifactType`.
pub const MANIFEST_TYPES: &[&str] = &[
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_LIST,
    DOCKER_V1_SIGNED,
    DOCKER_V1,
    OCI_ARTIFACT,
];

/// Whether `media_type` (parameters ignored) is a manifest media type.
pub fn is_manifest_type(media_type: &str) -> bool {
    let t = media_type.split(';').next().unwrap_or("").trim();
    MANIFEST_TYPES.contains(&t)
}

/// Every manifest type we ask upstreams for when the client's `Accept` is missing, so that an
/// upstream never downgrades to schema 1 on our account.
pub const ALL_MANIFESTS: &[&str] = &[OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];

/// The media type of manifest bytes read back from storage, where no `Content-Type` was kept:
/// the `mediaType` field when present, else inferred from the shape (as Distribution does).
/// `None` when the bytes are not a JSON object or declare a type that is not a manifest's.
pub fn sniff_manifest(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
        #[serde(rename = "schemaVersion")]
        schema_version: Option<u32>,
    }
    let p = serde_json::from_slice::<Probe>(bytes).ok()?;
    let t = match p.media_type {
        Some(m) if !m.is_empty() => m,
        _ if p.manifests.is_some() => OCI_INDEX.to_string(),
        _ if p.schema_version == Some(1) => DOCKER_V1_SIGNED.to_string(),
        _ => OCI_MANIFEST.to_string(),
    };
    is_manifest_type(&t).then_some(t)
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
        assert_eq!(sniff_manifest(br#"{"mediaType":"x/y"}"#), None);
        assert_eq!(
            sniff_manifest(br#"{"mediaType":"text/html","config":{}}"#),
            None
        );
        assert_eq!(sniff_manifest(b"\x1f\x8b\x08 a gzip layer"), None);
        assert_eq!(
            sniff_manifest(br#"{"manifests":[]}"#).as_deref(),
            Some(OCI_INDEX)
        );
        assert_eq!(
            sniff_manifest(br#"{"config":{}}"#).as_deref(),
            Some(OCI_MANIFEST)
        );
        assert!(is_manifest_type(
            "application/vnd.oci.image.index.v1+json; charset=utf-8"
        ));
        assert!(!is_manifest_type("text/html"));
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
