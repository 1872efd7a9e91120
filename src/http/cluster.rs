//! `GET /_ociedge/cluster/fills/<alg>/<hex>?from=N`: the region's other processes stream a fill
//! this process runs (it holds the digest's lease) from its spool, as a local follower reads it:
//! the last byte only after the digest matched, a mismatch breaks the stream. Authenticated with
//! the region's shared secret; the route does not exist without `cluster:`.

use std::sync::Arc;
use std::time::Duration;

use http::{Response, StatusCode};

use super::body::{self, Body};
use crate::app::App;
use crate::cluster::{SECRET_HEADER, SIZE_HEADER};
use crate::error::{Error, Result};
use crate::oci::{Digest, ErrorCode, OciError};

/// How long the route waits for the fill's source to answer before it says so.
const STARTED: Duration = Duration::from_secs(20);

/// The digest of a cluster route's path, `None` when the path is not one.
pub fn parse(path: &str) -> Option<std::result::Result<Digest, ()>> {
    let rest = path.strip_prefix("/_ociedge/cluster/fills/")?;
    let (alg, hex) = rest.split_once('/').ok_or(()).ok()?;
    Some(format!("{alg}:{hex}").parse::<Digest>().map_err(|_| ()))
}

fn status(code: ErrorCode, status: StatusCode, msg: &str) -> Error {
    Error::Client(OciError::new(code, msg).with_status(status))
}

pub async fn fill(
    app: &Arc<App>,
    parts: &http::request::Parts,
    digest: std::result::Result<Digest, ()>,
) -> Result<Response<Body>> {
    let Some(cluster) = &app.cluster else {
        return Err(status(
            ErrorCode::NameUnknown,
            StatusCode::NOT_FOUND,
            "no such route",
        ));
    };
    let Some(given) = parts.headers.get(SECRET_HEADER) else {
        return Err(status(
            ErrorCode::Unauthorized,
            StatusCode::UNAUTHORIZED,
            "the region's secret is required",
        ));
    };
    if !cluster.authorized(given.as_bytes()) {
        return Err(status(
            ErrorCode::Denied,
            StatusCode::FORBIDDEN,
            "wrong secret",
        ));
    }
    let digest = digest.map_err(|_| {
        status(
            ErrorCode::DigestInvalid,
            StatusCode::BAD_REQUEST,
            "invalid digest",
        )
    })?;
    let from = super::route::query(parts.uri.query())
        .into_iter()
        .find(|(k, _)| k == "from")
        .map(|(_, v)| v.parse::<u64>())
        .transpose()
        .map_err(|_| status(ErrorCode::Unsupported, StatusCode::BAD_REQUEST, "bad from"))?
        .unwrap_or(0);
    let Some(state) = app.puller.fills().get(&digest) else {
        return Err(status(
            ErrorCode::BlobUnknown,
            StatusCode::NOT_FOUND,
            "no fill of this digest runs here",
        ));
    };
    let (size, _) = match tokio::time::timeout(STARTED, state.started()).await {
        Ok(Ok(s)) => s,
        Ok(Err(_)) => {
            return Err(status(
                ErrorCode::BlobUnknown,
                StatusCode::NOT_FOUND,
                "the fill of this digest failed",
            ))
        }
        Err(_) => {
            return Err(Error::transient("cluster", "the fill has no source yet"));
        }
    };
    if from > size {
        return Err(status(
            ErrorCode::Unsupported,
            StatusCode::RANGE_NOT_SATISFIABLE,
            "from is past the end of the blob",
        ));
    }
    let stream = state.follow(from, size - from).into_stream();
    Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_LENGTH, size - from)
        .header(http::header::CONTENT_TYPE, "application/octet-stream")
        .header(SIZE_HEADER, size)
        .body(body::stream(stream))
        .map_err(|e| Error::permanent("http", e))
}
