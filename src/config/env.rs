//! Every environment variable ociedge reads, in one place.

/// Overrides `storage.preference`: the local engine of this machine (Quay's
/// `QUAY_DISTRIBUTED_STORAGE_PREFERENCE`).
pub const STORAGE_PREFERENCE: &str = "OCIEDGE_STORAGE_PREFERENCE";

/// `tracing` filter directives (`info`, `ociedge=debug`, ...).
pub const LOG: &str = "OCIEDGE_LOG";
