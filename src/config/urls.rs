//! The URL checks of the config that need no connection: storage engine URLs and the token
//! realms an upstream's credentials may go to (`engine::storage` checks its URL again with
//! [`check_storage_url`] when it opens).

/// Checks an engine URL without connecting (for `check-config`).
pub fn check_storage_url(
    url: &str,
    _options: &std::collections::BTreeMap<String, String>,
) -> Result<(), String> {
    if let Some(rest) = url.strip_prefix("file://") {
        if rest.is_empty() {
            return Err("file:// needs a directory".into());
        }
        return Ok(());
    }
    let parsed = url::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    match parsed.scheme() {
        "memory" | "s3" | "s3a" | "gs" | "az" | "adl" | "azure" | "abfs" | "abfss" => Ok(()),
        other => Err(format!(
            "unsupported scheme {other:?}; use file://, memory://, s3://, gs:// or az://"
        )),
    }
}

/// Checks one `realms` entry: an `http(s)://host[:port]` origin; plain HTTP only for an upstream
/// reached over plain HTTP (`base`). The error is the message for the key.
pub fn check_upstream_realm(entry: &str, base: &url::Url) -> Result<(), String> {
    let u = url::Url::parse(entry).map_err(|e| format!("{entry:?}: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") || u.host().is_none() {
        return Err(format!("{entry:?} is not an http(s) origin"));
    }
    if u.path() != "/" || u.query().is_some() || u.fragment().is_some() || !u.username().is_empty()
    {
        return Err(format!(
            "{entry:?}: an origin is scheme://host[:port], without path, query or user"
        ));
    }
    if u.scheme() == "http" && base.scheme() != "http" {
        return Err(format!(
            "{entry:?}: credentials of an https upstream are never sent over plain http"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn realm_entries_checked() {
        let https = url::Url::parse("https://r.example").unwrap();
        let http = url::Url::parse("http://r.example").unwrap();
        assert!(check_upstream_realm("https://auth.example", &https).is_ok());
        assert!(check_upstream_realm("https://auth.example:8443/", &https).is_ok());
        assert!(check_upstream_realm("http://auth.example", &https).is_err());
        assert!(check_upstream_realm("http://auth.example", &http).is_ok());
        assert!(check_upstream_realm("https://auth.example/token", &https).is_err());
        assert!(check_upstream_realm("ftp://auth.example", &https).is_err());
        assert!(check_upstream_realm("auth.example", &https).is_err());
    }
}
