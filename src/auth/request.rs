//! What a request presents and asks for: the credentials of its `Authorization` header, and the
//! scopes of a `/token` request.

use http::HeaderMap;

use super::{Action, Creds};

/// The credentials a request carries.
#[derive(Debug)]
pub enum Presented {
    None,
    Basic(Creds),
    Bearer(String),
    /// An `Authorization` header we cannot read: refused rather than taken as anonymous, so a
    /// client with broken credentials learns it.
    Malformed,
}

/// Reads the `Authorization` header. Schemes other than Basic and Bearer count as none.
pub fn presented(headers: &HeaderMap) -> Presented {
    use base64::Engine as _;
    let Some(v) = headers.get(http::header::AUTHORIZATION) else {
        return Presented::None;
    };
    let Ok(v) = v.to_str() else {
        return Presented::Malformed;
    };
    let (scheme, rest) = v.trim().split_once(' ').unwrap_or((v.trim(), ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return if rest.is_empty() {
            Presented::Malformed
        } else {
            Presented::Bearer(rest.to_string())
        };
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return Presented::None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest)
        .ok()
        .and_then(|b| String::from_utf8(b).ok());
    match decoded.as_deref().and_then(|s| s.split_once(':')) {
        Some((u, p)) if !u.is_empty() => Presented::Basic(Creds {
            user: u.to_string(),
            password: p.to_string(),
            from: None,
        }),
        _ => Presented::Malformed,
    }
}

/// Parses `/token` scopes (`repository:<name>:<actions>`, several per parameter when separated
/// by spaces). Other resource types (`registry:catalog:*`) grant nothing and are skipped.
pub fn parse_scopes<'a>(params: impl IntoIterator<Item = &'a str>) -> Vec<(String, Vec<Action>)> {
    let mut out = Vec::new();
    for p in params {
        for s in p.split(' ').filter(|s| !s.is_empty()) {
            let Some((kind, rest)) = s.split_once(':') else {
                continue;
            };
            let Some((name, actions)) = rest.rsplit_once(':') else {
                continue;
            };
            if kind != "repository" || name.is_empty() {
                continue;
            }
            out.push((name.to_string(), Action::parse_list(actions)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse() {
        let s = parse_scopes([
            "repository:library/a:pull,push",
            "repository:b:* registry:catalog:* repository:c:delete",
            "garbage",
        ]);
        assert_eq!(
            s,
            vec![
                ("library/a".into(), vec![Action::Pull, Action::Push]),
                ("b".into(), vec![Action::Pull, Action::Push, Action::Delete]),
                ("c".into(), vec![Action::Delete]),
            ]
        );
    }

    #[test]
    fn authorization_headers() {
        let mut h = HeaderMap::new();
        assert!(matches!(presented(&h), Presented::None));
        h.insert("authorization", "Basic YWxpY2U6cDpx".parse().unwrap()); // alice:p:q
        assert!(
            matches!(presented(&h), Presented::Basic(c) if c.user == "alice" && c.password == "p:q")
        );
        h.insert("authorization", "Basic !!".parse().unwrap());
        assert!(matches!(presented(&h), Presented::Malformed));
        h.insert("authorization", "Bearer abc".parse().unwrap());
        assert!(matches!(presented(&h), Presented::Bearer(t) if t == "abc"));
        h.insert("authorization", "Negotiate xyz".parse().unwrap());
        assert!(matches!(presented(&h), Presented::None));
    }
}
