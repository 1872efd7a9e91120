//! `/token`: the registry token endpoint. `GET` with Basic credentials (or none) and
//! `?service=&scope=` (Docker's token spec), `POST` with an OAuth2 form (`grant_type=password`).
//! Scopes name repositories the way clients do; they are routed like requests, so a token names
//! each repository as stored and serves whichever way the client names it later.

use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, Limited};

use super::access::refusal;
use super::body::{self, Body, RequestBody};
use crate::app::App;
use crate::auth::{self, Creds, Presented, Refusal, Target};
use crate::error::{Error, Result};
use crate::oci::{ErrorCode, OciError, RepoName};

/// A token request's form is a few hundred bytes; anything much larger is not one.
const MAX_FORM: usize = 64 << 10;

fn json(status: StatusCode, v: serde_json::Value) -> Result<Response<Body>> {
    Response::builder()
        .status(status)
        .header(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )
        // A token is a credential: no cache may keep it.
        .header(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))
        .body(body::full(v.to_string()))
        .map_err(|e| Error::permanent("http", e))
}

/// OAuth2's error body (RFC 6749 §5.2).
fn oauth_error(code: &str, description: &str) -> Result<Response<Body>> {
    json(
        StatusCode::BAD_REQUEST,
        serde_json::json!({ "error": code, "error_description": description }),
    )
}

pub async fn token(app: &Arc<App>, parts: &Parts, body: RequestBody) -> Result<Response<Body>> {
    let Some(auth) = &app.auth else {
        return Err(Error::Client(
            OciError::new(
                ErrorCode::Unsupported,
                "no such endpoint (no auth: section)",
            )
            .with_status(StatusCode::NOT_FOUND),
        ));
    };
    let (creds, params, oauth) = match parts.method {
        Method::GET => {
            let creds = match super::access::presented(parts) {
                Presented::Basic(c) => Some(c),
                Presented::Malformed => {
                    return Ok(refusal(
                        app,
                        parts,
                        Refusal::Unauthorized {
                            message: "unreadable Authorization header".into(),
                            scope: None,
                            error: None,
                        },
                    ))
                }
                _ => None,
            };
            (creds, super::route::query(parts.uri.query()), false)
        }
        Method::POST => {
            let bytes = match Limited::new(body, MAX_FORM).collect().await {
                Ok(c) => c.to_bytes(),
                Err(_) => return oauth_error("invalid_request", "unreadable or oversized form"),
            };
            let form: Vec<(String, String)> =
                url::form_urlencoded::parse(&bytes).into_owned().collect();
            let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            let creds = match get("grant_type").as_deref() {
                Some("password") => match (get("username"), get("password")) {
                    (Some(user), Some(password)) if !user.is_empty() => Some(Creds {
                        user,
                        password,
                        from: super::access::client_addr(parts),
                    }),
                    _ => {
                        return oauth_error(
                            "invalid_request",
                            "grant_type=password needs username and password",
                        )
                    }
                },
                Some("refresh_token") => {
                    return oauth_error(
                        "unsupported_grant_type",
                        "refresh tokens are not issued; use grant_type=password",
                    )
                }
                _ => return oauth_error("unsupported_grant_type", "use grant_type=password"),
            };
            (creds, form, true)
        }
        _ => {
            return Err(Error::client(
                ErrorCode::Unsupported,
                format!("{} is not allowed on /token", parts.method),
            ))
        }
    };
    if let Some((_, s)) = params
        .iter()
        .find(|(k, v)| k == "service" && v != auth::token::SERVICE)
    {
        let msg = format!(
            "this token service is {:?}, not {s:?}",
            auth::token::SERVICE
        );
        return oauth_error("invalid_request", &msg);
    }
    let scopes = auth::parse_scopes(
        params
            .iter()
            .filter(|(k, _)| k == "scope")
            .map(|(_, v)| v.as_str()),
    );
    // Route each scope's name as a request without `?ns=` would be; names that are not
    // repository names, or that no upstream owns, grant nothing.
    let engines = app.puller.engines();
    let routed: Vec<_> = scopes
        .into_iter()
        .filter_map(|(name, actions)| {
            let n: RepoName = name.parse().ok()?;
            engines.route(&n, None).ok().map(|r| (r, actions))
        })
        .collect();
    let wanted: Vec<(Target<'_>, Vec<auth::Action>)> = routed
        .iter()
        .map(|(r, actions)| {
            (
                Target {
                    repo: &r.storage_repo,
                    upstream: r.upstream,
                    upstream_repo: &r.upstream_repo,
                },
                actions.clone(),
            )
        })
        .collect();
    let grant = match auth.grant(creds.as_ref(), &wanted).await {
        Ok(g) => g,
        Err(r) => return Ok(refusal(app, parts, r)),
    };
    let issued_at = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let mut v = serde_json::json!({
        "access_token": grant.token,
        "expires_in": grant.expires_in.as_secs(),
        "issued_at": issued_at,
    });
    if oauth {
        v["token_type"] = "Bearer".into();
        v["scope"] = grant.scope.into();
    } else {
        v["token"] = v["access_token"].clone();
    }
    json(StatusCode::OK, v)
}
