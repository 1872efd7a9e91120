//! `POST /_ociedge/prewarm` starts a prewarm job (`crate::prewarm`); `GET /_ociedge/prewarm/<id>`
//! shows its progress. Under `auth:`, starting one needs `push` on every repository it names
//! (decided on storage names, as every route is); reading one needs that too, or the operator's
//! view (`pull` on `_ociedge`). Without `auth:` they are open, as pushes and the status are.

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, Limited};

use super::access;
use super::body::{self, Body, RequestBody};
use crate::app::App;
use crate::auth::Action;
use crate::engine::set::Routed;
use crate::error::{Error, Result};
use crate::oci::{ErrorCode, OciError};
use crate::prewarm::job::FieldError;
use crate::prewarm::{parse_image, Spec};

/// A request body larger than this is refused (1000 names of 255 bytes fit).
const MAX_BODY: usize = 512 << 10;
/// The whole body must arrive within this.
const BODY_DEADLINE: Duration = Duration::from_secs(30);

/// A `400` naming the field that does not validate.
fn bad_field(code: ErrorCode, f: &FieldError) -> Error {
    Error::Client(
        OciError::new(code, f.to_string())
            .with_status(StatusCode::BAD_REQUEST)
            .with_detail(serde_json::json!({ "field": f.field })),
    )
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(body::full(v.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The route's handler.
pub async fn handle(
    app: &Arc<App>,
    parts: &Parts,
    body: RequestBody,
    id: Option<&str>,
) -> Result<Response<Body>> {
    match (id, &parts.method) {
        (None, &Method::POST) => submit(app, parts, body).await,
        (Some(id), m) if super::route::is_read(m) => show(app, parts, id).await,
        (_, m) => Err(Error::client(
            ErrorCode::Unsupported,
            format!("{m} is not allowed on this endpoint"),
        )),
    }
}

/// Every image routed as a pull routes it (no `?ns=`): the storage names access is decided on.
fn route_all(app: &App, spec: &Spec) -> std::result::Result<Vec<Routed>, (ErrorCode, FieldError)> {
    let engines = app.puller.engines();
    let mut out = Vec::with_capacity(spec.images.len());
    for (i, im) in spec.images.iter().enumerate() {
        let field = || format!("images[{i}]");
        let (name, _) = parse_image(im).map_err(|e| {
            (
                ErrorCode::NameInvalid,
                FieldError {
                    field: field(),
                    message: e,
                },
            )
        })?;
        let r = engines.route(&name, None).map_err(|e| {
            let code = match &e {
                Error::Client(o) => o.code,
                _ => ErrorCode::NameUnknown,
            };
            (
                code,
                FieldError {
                    field: field(),
                    message: e.to_string(),
                },
            )
        })?;
        out.push(r);
    }
    Ok(out)
}

async fn submit(app: &Arc<App>, parts: &Parts, body: RequestBody) -> Result<Response<Body>> {
    let bytes =
        match tokio::time::timeout(BODY_DEADLINE, Limited::new(body, MAX_BODY).collect()).await {
            Ok(Ok(c)) => c.to_bytes(),
            Ok(Err(_)) => {
                return Err(Error::Client(
                    OciError::new(
                        ErrorCode::SizeInvalid,
                        format!("body: unreadable or larger than {} KiB", MAX_BODY >> 10),
                    )
                    .with_status(StatusCode::PAYLOAD_TOO_LARGE)
                    .with_detail(serde_json::json!({ "field": "body" })),
                ))
            }
            Err(_) => {
                return Err(Error::Client(
                    OciError::new(ErrorCode::SizeInvalid, "body: not sent in time")
                        .with_status(StatusCode::REQUEST_TIMEOUT),
                ))
            }
        };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let spec = Spec::from_json(&bytes, now).map_err(|f| {
        let code = if f.field.starts_with("images[") {
            ErrorCode::NameInvalid
        } else {
            ErrorCode::Unsupported
        };
        bad_field(code, &f)
    })?;
    let routed = route_all(app, &spec).map_err(|(code, f)| bad_field(code, &f))?;
    if let Some(auth) = &app.auth {
        if let Some(refused) = access::check_all(app, auth, parts, &routed, Action::Push).await {
            return Ok(refused);
        }
    }
    let id = app.prewarmer.submit(spec).await?;
    let mut r = json(StatusCode::ACCEPTED, &serde_json::json!({ "id": id }));
    if let Ok(v) = HeaderValue::from_str(&format!("/_ociedge/prewarm/{id}")) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    Ok(r)
}

fn unknown(id: &str) -> Error {
    Error::Client(
        OciError::new(ErrorCode::Unsupported, format!("no prewarm job {id}"))
            .with_status(StatusCode::NOT_FOUND),
    )
}

async fn show(app: &Arc<App>, parts: &Parts, id: &str) -> Result<Response<Body>> {
    let record = app.prewarmer.get(id).await?;
    if let Some(auth) = &app.auth {
        if let Some(refused) = access::check_operator(app, auth, parts).await {
            // Not an operator: whoever may push every repository of the job may read it; to
            // anyone else an unknown job and a forbidden one look the same.
            let Some(rec) = &record else {
                return Ok(refused);
            };
            let Ok(routed) = route_all(app, &rec.spec) else {
                return Ok(refused);
            };
            if let Some(refused) = access::check_all(app, auth, parts, &routed, Action::Push).await
            {
                return Ok(refused);
            }
        }
    }
    match record {
        Some(r) => Ok(json(StatusCode::OK, &r.view())),
        None => Err(unknown(id)),
    }
}
