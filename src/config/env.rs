//! Every environment variable ociedge reads, in one place.

/// Overrides `storage.preference`: the local engine of this machine (Quay's
/// `QUAY_DISTRIBUTED_STORAGE_PREFERENCE`).
pub const STORAGE_PREFERENCE: &str = "OCIEDGE_STORAGE_PREFERENCE";

/// `tracing` filter directives (`info`, `ociedge=debug`, ...).
pub const LOG: &str = "OCIEDGE_LOG";

/// Overrides `cluster.advertise`: where the region's other processes reach this one (in
/// Kubernetes, `http://$(POD_IP):5080` through the downward API).
pub const CLUSTER_ADVERTISE: &str = "OCIEDGE_CLUSTER_ADVERTISE";
