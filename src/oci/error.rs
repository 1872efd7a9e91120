//! The OCI error body (`{"errors":[{"code","message","detail"}]}`) and the spec's codes with
//! their HTTP statuses. Only `http/` turns an [`crate::Error`] into one of these.

use http::StatusCode;

/// Error codes of the OCI distribution spec (plus Docker's `TOOMANYREQUESTS` and the `UNAVAILABLE`
/// that registries use for a backend that is down).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    TooManyRequests,
    RangeInvalid,
    PaginationNumberInvalid,
    Unavailable,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            ErrorCode::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::SizeInvalid => "SIZE_INVALID",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Denied => "DENIED",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
            ErrorCode::RangeInvalid => "RANGE_INVALID",
            ErrorCode::PaginationNumberInvalid => "PAGINATION_NUMBER_INVALID",
            ErrorCode::Unavailable => "UNAVAILABLE",
        }
    }

    /// The status the spec pairs with the code.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::BlobUnknown
            | ErrorCode::BlobUploadUnknown
            | ErrorCode::ManifestUnknown
            | ErrorCode::NameUnknown => StatusCode::NOT_FOUND,
            ErrorCode::BlobUploadInvalid
            | ErrorCode::DigestInvalid
            | ErrorCode::ManifestBlobUnknown
            | ErrorCode::ManifestInvalid
            | ErrorCode::NameInvalid
            | ErrorCode::SizeInvalid
            | ErrorCode::PaginationNumberInvalid => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Denied => StatusCode::FORBIDDEN,
            ErrorCode::Unsupported => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RangeInvalid => StatusCode::RANGE_NOT_SATISFIABLE,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// One error as a client sees it.
#[derive(Clone, Debug)]
pub struct OciError {
    pub code: ErrorCode,
    pub status: StatusCode,
    pub message: String,
    pub detail: Option<serde_json::Value>,
    /// Seconds for the `Retry-After` header (`429`, `503`), when known.
    pub retry_after: Option<u64>,
}

impl OciError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> OciError {
        OciError {
            code,
            status: code.status(),
            message: message.into(),
            detail: None,
            retry_after: None,
        }
    }

    /// Says when to ask again (`Retry-After`).
    pub fn with_retry_after(mut self, secs: u64) -> OciError {
        self.retry_after = Some(secs);
        self
    }

    /// Overrides the spec's status (e.g. `502` for an upstream that answered garbage).
    pub fn with_status(mut self, status: StatusCode) -> OciError {
        self.status = status;
        self
    }

    pub fn with_detail(mut self, detail: serde_json::Value) -> OciError {
        self.detail = Some(detail);
        self
    }

    /// The JSON body.
    pub fn body(&self) -> String {
        let mut e = serde_json::json!({ "code": self.code.as_str(), "message": self.message });
        if let Some(d) = &self.detail {
            e["detail"] = d.clone();
        }
        serde_json::json!({ "errors": [e] }).to_string()
    }
}

impl std::fmt::Display for OciError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_shape() {
        let e = OciError::new(ErrorCode::NameInvalid, "bad");
        let v: serde_json::Value = serde_json::from_str(&e.body()).unwrap();
        assert_eq!(v["errors"][0]["code"], "NAME_INVALID");
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }
}
