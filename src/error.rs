//! The crate's semantic error. Failover code matches on the variant (is this "absent", "the
//! engine is broken", "the bytes were wrong"?) and never on a message; `http/` maps it to the wire.

use crate::oci::{ErrorCode, OciError};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request error already decided for the client: bad input, unknown content, unsupported.
    #[error("{0}")]
    Client(OciError),
    /// Bytes read for a digest hashed to something else. Never committed, never served cleanly.
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: String, actual: String },
    /// An engine (storage or upstream registry) failed: network, 5xx, protocol. Another engine
    /// may succeed, so the miss path tries the next one.
    #[error("engine {engine}: {message}")]
    Engine { engine: String, message: String },
    /// Local I/O (spools, sockets).
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A bad configuration value, with the key path.
    #[error("{0}")]
    Config(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn client(code: ErrorCode, message: impl Into<String>) -> Error {
        Error::Client(OciError::new(code, message))
    }

    pub fn engine(engine: &str, message: impl std::fmt::Display) -> Error {
        Error::Engine {
            engine: engine.to_string(),
            message: message.to_string(),
        }
    }

    /// The wire form: client errors as decided; engine failures as `UNAVAILABLE` 502/503 so a
    /// mirror client falls back to the upstream.
    pub fn to_oci(&self) -> OciError {
        match self {
            Error::Client(e) => e.clone(),
            Error::DigestMismatch { .. } => OciError::new(
                ErrorCode::Unavailable,
                "upstream content did not match its digest",
            )
            .with_status(http::StatusCode::BAD_GATEWAY),
            Error::Engine { .. } => {
                OciError::new(ErrorCode::Unavailable, "no engine could serve the request")
                    .with_status(http::StatusCode::BAD_GATEWAY)
            }
            Error::Io(_) | Error::Config(_) => {
                OciError::new(ErrorCode::Unavailable, "internal error")
                    .with_status(http::StatusCode::INTERNAL_SERVER_ERROR)
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

impl From<object_store::Error> for Error {
    fn from(e: object_store::Error) -> Self {
        Error::Engine {
            engine: "storage".into(),
            message: e.to_string(),
        }
    }
}
