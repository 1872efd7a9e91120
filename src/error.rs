//! The crate's semantic error. Failover code matches on the variant (is this "absent", "the
//! engine is broken", "the bytes were wrong"?) and an engine failure's [`EngineError`] kind, never
//! on a message; `http/` maps it to the wire through [`Error::to_oci`], the one place where
//! kinds become OCI codes and statuses.

use std::sync::Arc;

use http::StatusCode;

use crate::oci::{ErrorCode, OciError};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The error an engine failure came from, kept whole (its type and chain, not its string) and
/// shared: a fill's failure reaches every reader of the fill.
pub type Source = Arc<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request error already decided for the client: bad input, unknown content, unsupported.
    #[error("{0}")]
    Client(OciError),
    /// Bytes read for a digest hashed to something else. Never committed, never served cleanly.
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: String, actual: String },
    /// An engine (storage or upstream registry) failed, classified by [`EngineError`] where it
    /// happened; callers decide by the kind (retry, move to the next engine, give up).
    #[error("engine {engine}: {error}")]
    Engine { engine: String, error: EngineError },
    /// Local I/O (spools, sockets).
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A bad configuration value, with the key path.
    #[error("{0}")]
    Config(String),
}

/// What kind of failure an engine had: decided where the failure is seen (an object store's error
/// variant, a registry's HTTP status, an I/O error's kind), so that callers never read messages.
#[derive(Clone, Debug, thiserror::Error)]
pub enum EngineError {
    /// The object is not there (where absence is a failure, not an `Ok(None)` answer).
    #[error("not found")]
    NotFound,
    /// A create-only write found the object there.
    #[error("already exists")]
    AlreadyExists,
    /// A conditional write lost: the object changed since it was read.
    #[error("precondition failed: the object changed")]
    Precondition,
    /// The engine cannot do this (a registry engine asked to store a blob).
    #[error("does not support {0}")]
    Unsupported(&'static str),
    /// A range the content does not have.
    #[error("range not satisfiable: {0}")]
    RangeInvalid(String),
    /// The engine refused our credentials (HTTP 401/403): permanent until the config changes.
    #[error("{0}")]
    Denied(Source),
    /// The engine asks us to slow down (HTTP 429): transient.
    #[error("{0}")]
    RateLimited(Source),
    /// Not asked: the engine told us to come back later (`Retry-After` on a `429` or `503`), or
    /// its circuit breaker is open after failing again and again. Answered at once; transient.
    #[error("{0}")]
    Backoff(Backoff),
    /// May succeed if tried again: a timeout, a dropped or refused connection, a 5xx, a stream
    /// too slow.
    #[error("{0}")]
    Transient(Source),
    /// Will fail again the same way: a protocol violation, an oversized body, a corrupt object,
    /// a 4xx that is not about access.
    #[error("{0}")]
    Permanent(Source),
}

/// Why and until when an engine is not asked (see [`EngineError::Backoff`]).
#[derive(Clone, Debug)]
pub struct Backoff {
    /// When it may be asked again.
    pub until: std::time::Instant,
    /// A rate limit (`429`: answered `TOOMANYREQUESTS`), else the engine is unavailable (`503`).
    pub rate_limited: bool,
    pub why: Arc<str>,
}

impl Backoff {
    /// Whole seconds until [`Backoff::until`], at least 1 (a `Retry-After` value).
    pub fn retry_after(&self) -> u64 {
        let left = self
            .until
            .saturating_duration_since(std::time::Instant::now());
        left.as_secs_f64().ceil().max(1.0) as u64
    }
}

impl std::fmt::Display for Backoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}; retry in {}s", self.why, self.retry_after())
    }
}

/// A plain message as a [`Source`].
#[derive(Debug)]
struct Message(String);

impl std::fmt::Display for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Message {}

fn source(e: impl Into<BoxError>) -> Source {
    Arc::from(e.into())
}

impl EngineError {
    /// A transient failure caused by `e` (an error, or a message).
    pub fn transient(e: impl Into<BoxError>) -> EngineError {
        EngineError::Transient(source(e))
    }

    /// A permanent failure caused by `e` (an error, or a message).
    pub fn permanent(e: impl Into<BoxError>) -> EngineError {
        EngineError::Permanent(source(e))
    }

    /// Whether trying the same request again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            EngineError::Transient(_) | EngineError::RateLimited(_) | EngineError::Backoff(_)
        )
    }

    /// The kind of an answer with this HTTP status (`message` says what was asked and by whom).
    pub fn from_status(status: StatusCode, message: String) -> EngineError {
        let m = source(Message(message));
        match status {
            StatusCode::NOT_FOUND => EngineError::NotFound,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => EngineError::Denied(m),
            StatusCode::TOO_MANY_REQUESTS => EngineError::RateLimited(m),
            StatusCode::PRECONDITION_FAILED => EngineError::Precondition,
            StatusCode::CONFLICT => EngineError::AlreadyExists,
            StatusCode::METHOD_NOT_ALLOWED | StatusCode::NOT_IMPLEMENTED => {
                EngineError::Permanent(m)
            }
            StatusCode::REQUEST_TIMEOUT => EngineError::Transient(m),
            s if s.is_server_error() => EngineError::Transient(m),
            _ => EngineError::Permanent(m),
        }
    }

    /// The kind of an I/O error.
    pub fn from_io(e: std::io::Error) -> EngineError {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::NotFound => EngineError::NotFound,
            K::AlreadyExists => EngineError::AlreadyExists,
            K::InvalidData | K::InvalidInput | K::PermissionDenied | K::Unsupported => {
                EngineError::permanent(e)
            }
            _ => EngineError::transient(e),
        }
    }

    /// The kind of an HTTP client error: the request never got a whole answer (connect,
    /// timeout, a body cut short: reqwest reports a reset body as a decode error) is transient; a
    /// request that cannot be made or a redirect loop is not.
    pub fn from_reqwest(e: reqwest::Error) -> EngineError {
        if let Some(s) = e.status() {
            return EngineError::from_status(s, e.to_string());
        }
        if e.is_redirect() || e.is_builder() {
            EngineError::permanent(e)
        } else {
            EngineError::transient(e)
        }
    }

    /// The kind of an object store error.
    pub fn from_object_store(e: object_store::Error) -> EngineError {
        use object_store::Error as E;
        match e {
            E::NotFound { .. } => EngineError::NotFound,
            E::AlreadyExists { .. } => EngineError::AlreadyExists,
            // A conditional request whose condition did not hold.
            E::Precondition { .. } | E::NotModified { .. } => EngineError::Precondition,
            E::NotSupported { .. } | E::NotImplemented { .. } => {
                EngineError::Unsupported("this operation on its object store")
            }
            E::PermissionDenied { .. } | E::Unauthenticated { .. } => {
                EngineError::Denied(source(e))
            }
            E::InvalidPath { .. } | E::UnknownConfigurationKey { .. } => EngineError::permanent(e),
            // What the store's client saw under the generic error decides.
            e => {
                let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
                while let Some(c) = cause {
                    // Connect, request, timeout, interrupted, and decode (how a body cut short
                    // is reported): no whole answer came; another try may get one.
                    if c.is::<object_store::client::HttpError>() {
                        return EngineError::transient(e);
                    }
                    if let Some(io) = c.downcast_ref::<std::io::Error>() {
                        return match EngineError::from_io(std::io::Error::new(io.kind(), "")) {
                            EngineError::Permanent(_) => EngineError::permanent(e),
                            EngineError::NotFound => EngineError::NotFound,
                            EngineError::AlreadyExists => EngineError::AlreadyExists,
                            _ => EngineError::transient(e),
                        };
                    }
                    cause = c.source();
                }
                // Unknown: the store's client retried what it knew to be transient already;
                // another try later costs little.
                EngineError::transient(e)
            }
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn client(code: ErrorCode, message: impl Into<String>) -> Error {
        Error::Client(OciError::new(code, message))
    }

    /// A failure of `engine`, of the kind `error`.
    pub fn engine(engine: &str, error: EngineError) -> Error {
        Error::Engine {
            engine: engine.to_string(),
            error,
        }
    }

    /// A transient failure of `engine` caused by `e` (an error, or a message).
    pub fn transient(engine: &str, e: impl Into<BoxError>) -> Error {
        Error::engine(engine, EngineError::transient(e))
    }

    /// A permanent failure of `engine` caused by `e` (an error, or a message).
    pub fn permanent(engine: &str, e: impl Into<BoxError>) -> Error {
        Error::engine(engine, EngineError::permanent(e))
    }

    /// An object store error of `engine`, classified.
    pub fn object_store(engine: &str, e: object_store::Error) -> Error {
        Error::engine(engine, EngineError::from_object_store(e))
    }

    /// An HTTP client error talking to `engine`, classified.
    pub fn reqwest(engine: &str, e: reqwest::Error) -> Error {
        Error::engine(engine, EngineError::from_reqwest(e))
    }

    /// The engine failure's kind, if this is one.
    pub fn engine_error(&self) -> Option<&EngineError> {
        match self {
            Error::Engine { error, .. } => Some(error),
            _ => None,
        }
    }

    /// Whether the same request may succeed later: a transient engine failure, or local I/O.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Engine { error, .. } => error.is_transient(),
            Error::Io(_) => true,
            _ => false,
        }
    }

    /// The seconds a client should wait before asking again, when an engine said so or is
    /// backing off ([`EngineError::Backoff`]).
    pub fn retry_after(&self) -> Option<u64> {
        match self.engine_error() {
            Some(EngineError::Backoff(b)) => Some(b.retry_after()),
            _ => None,
        }
    }

    /// Whether an engine refused for its rate limit (a `429`, or backing off after one).
    pub fn is_rate_limited(&self) -> bool {
        match self.engine_error() {
            Some(EngineError::RateLimited(_)) => true,
            Some(EngineError::Backoff(b)) => b.rate_limited,
            _ => false,
        }
    }

    /// Whether this is the answer to give the client rather than an engine's fault that another
    /// engine may not have: a decided client error, or an engine's refusal of the request
    /// itself (access denied, a range the content does not have). The miss path stops asking
    /// engines on it. A rate limit is not: it is the engine's state, not an answer about the
    /// content (another engine may have it; a stale tag may be served).
    pub fn is_answer(&self) -> bool {
        matches!(
            self,
            Error::Client(_)
                | Error::Engine {
                    error: EngineError::Denied(_)
                        | EngineError::RangeInvalid(_)
                        | EngineError::Unsupported(_),
                    ..
                }
        )
    }

    /// The wire form: client errors as decided; engine failures by kind: refusals as the
    /// engine's refusal, everything else as `UNAVAILABLE` 502 so a mirror client falls back to
    /// the upstream.
    pub fn to_oci(&self) -> OciError {
        match self {
            Error::Client(e) => e.clone(),
            Error::DigestMismatch { .. } => OciError::new(
                ErrorCode::Unavailable,
                "upstream content did not match its digest",
            )
            .with_status(StatusCode::BAD_GATEWAY),
            Error::Engine { engine, error } => match error {
                EngineError::Denied(m) => OciError::new(ErrorCode::Denied, m.to_string()),
                EngineError::RateLimited(m) => {
                    OciError::new(ErrorCode::TooManyRequests, m.to_string())
                }
                EngineError::Backoff(b) => {
                    let code = if b.rate_limited {
                        ErrorCode::TooManyRequests
                    } else {
                        ErrorCode::Unavailable
                    };
                    OciError::new(code, b.to_string()).with_retry_after(b.retry_after())
                }
                EngineError::RangeInvalid(m) => OciError::new(ErrorCode::RangeInvalid, m.clone()),
                EngineError::Unsupported(what) => OciError::new(
                    ErrorCode::Unsupported,
                    format!("engine {engine} does not support {what}"),
                ),
                EngineError::Precondition => OciError::new(
                    ErrorCode::Unavailable,
                    "a concurrent write changed the content first; try again",
                )
                .with_status(StatusCode::CONFLICT),
                EngineError::NotFound
                | EngineError::AlreadyExists
                | EngineError::Transient(_)
                | EngineError::Permanent(_) => {
                    OciError::new(ErrorCode::Unavailable, "no engine could serve the request")
                        .with_status(StatusCode::BAD_GATEWAY)
                }
            },
            Error::Io(_) | Error::Config(_) => {
                OciError::new(ErrorCode::Unavailable, "internal error")
                    .with_status(StatusCode::INTERNAL_SERVER_ERROR)
            }
        }
    }
}

impl Error {
    /// Adds a `detail` to a client error (other errors are returned as they are).
    pub fn with_detail(self, detail: serde_json::Value) -> Error {
        match self {
            Error::Client(e) => Error::Client(e.with_detail(detail)),
            other => other,
        }
    }
}

/// A copy for every reader of a shared failure (a fill's): I/O errors keep their kind and
/// message.
impl Clone for Error {
    fn clone(&self) -> Error {
        match self {
            Error::Client(e) => Error::Client(e.clone()),
            Error::DigestMismatch { expected, actual } => Error::DigestMismatch {
                expected: expected.clone(),
                actual: actual.clone(),
            },
            Error::Engine { engine, error } => Error::Engine {
                engine: engine.clone(),
                error: error.clone(),
            },
            Error::Io(e) => Error::Io(std::io::Error::new(e.kind(), e.to_string())),
            Error::Config(m) => Error::Config(m.clone()),
        }
    }
}

/// A content-addressed write (or link) that found its object already there did what it was
/// asked: success. Other results as they are.
pub fn idempotent(r: Result<()>) -> Result<()> {
    match r {
        Err(Error::Engine {
            error: EngineError::AlreadyExists,
            ..
        }) => Ok(()),
        r => r,
    }
}

impl From<object_store::Error> for Error {
    fn from(e: object_store::Error) -> Self {
        Error::object_store("storage", e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_decided_where_the_failure_is_seen() {
        let s = |c: u16| EngineError::from_status(StatusCode::from_u16(c).unwrap(), "x".into());
        assert!(matches!(s(404), EngineError::NotFound));
        assert!(matches!(s(401), EngineError::Denied(_)));
        assert!(matches!(s(403), EngineError::Denied(_)));
        assert!(s(429).is_transient() && s(503).is_transient() && s(500).is_transient());
        assert!(matches!(s(400), EngineError::Permanent(_)));
        assert!(matches!(s(412), EngineError::Precondition));

        let os = |e| EngineError::from_object_store(e);
        let src = || -> BoxError { "x".into() };
        let path = || "p".to_string();
        assert!(matches!(
            os(object_store::Error::NotFound {
                path: path(),
                source: src()
            }),
            EngineError::NotFound
        ));
        assert!(matches!(
            os(object_store::Error::AlreadyExists {
                path: path(),
                source: src()
            }),
            EngineError::AlreadyExists
        ));
        assert!(matches!(
            os(object_store::Error::Precondition {
                path: path(),
                source: src()
            }),
            EngineError::Precondition
        ));
        assert!(matches!(
            os(object_store::Error::NotModified {
                path: path(),
                source: src()
            }),
            EngineError::Precondition
        ));
        let generic = |e: BoxError| object_store::Error::Generic {
            store: "S3",
            source: e,
        };
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(os(generic(Box::new(refused))).is_transient());
        let corrupt = std::io::Error::new(std::io::ErrorKind::InvalidData, "corrupt");
        assert!(matches!(
            os(generic(Box::new(corrupt))),
            EngineError::Permanent(_)
        ));
        let timeout = object_store::client::HttpError::new(
            object_store::client::HttpErrorKind::Timeout,
            std::io::Error::other("slow"),
        );
        assert!(os(generic(Box::new(timeout))).is_transient());

        assert!(EngineError::from_io(std::io::ErrorKind::TimedOut.into()).is_transient());
        assert!(!EngineError::from_io(std::io::ErrorKind::InvalidData.into()).is_transient());
    }

    #[test]
    fn kinds_map_to_oci_codes_in_one_place() {
        let e = |k| Error::engine("up", k).to_oci();
        let m = || source(Message("refused".into()));
        assert_eq!(e(EngineError::Denied(m())).code, ErrorCode::Denied);
        assert_eq!(e(EngineError::Denied(m())).status, StatusCode::FORBIDDEN);
        assert_eq!(
            e(EngineError::RateLimited(m())).code,
            ErrorCode::TooManyRequests
        );
        assert_eq!(
            e(EngineError::Unsupported("x")).code,
            ErrorCode::Unsupported
        );
        assert_eq!(
            e(EngineError::Transient(m())).status,
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(e(EngineError::Permanent(m())).code, ErrorCode::Unavailable);
    }
}
