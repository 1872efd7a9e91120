//! The OCI vocabulary: validated names, references and digests, media types, and the wire error
//! format. Everything that crosses the HTTP edge is parsed into these types once; nothing below
//! `http/` takes a raw `&str` name or digest.

pub mod digest;
pub mod error;
pub mod manifest;
pub mod media;
pub mod name;

pub use digest::{Digest, Verifier};
pub use error::{ErrorCode, OciError};
pub use name::{Reference, RepoName, Tag};
