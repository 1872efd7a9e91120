//! The configuration tree of DESIGN.md: one serde tree, unknown keys refused, every value
//! validated with its key path in the message. `Config::load` = parse → env overrides → validate.

pub mod auth;
pub mod env;
pub mod units;
pub mod urls;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use units::{ByteSize, HumanDuration, Percent};

/// The embedded default: a Docker Hub mirror on `0.0.0.0:5000` filling `./ociedge-data`.
pub const DEFAULT_YAML: &str = include_str!("../../config/ociedge.yaml");

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address of the HTTP listener. Default `0.0.0.0:5000`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// TLS for the listener: with it, `listen` speaks HTTPS (HTTP/1.1 and HTTP/2 by ALPN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// Region name, reported in `X-Ociedge-Region`. Default `local`.
    #[serde(default = "default_region")]
    pub region: String,
    pub storage: StorageConfig,
    /// Upstream registries, routed by registry name. The first one is the default for names
    /// that carry no registry.
    #[serde(default)]
    pub upstreams: Vec<UpstreamConfig>,
    /// Where pushes go. Without `engine`, pushes are answered `UNSUPPORTED`.
    #[serde(default)]
    pub push: PushConfig,
    /// Client authentication and per-repository rules. Without it anyone may pull (and push,
    /// when `push.engine` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<auth::AuthConfig>,
    #[serde(default)]
    pub cache: CacheConfig,
    /// Bounds on what clients may hold: connections, header size and time, idle time.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Processes sharing the local engine act as one cache (fill leases, peer streaming, reads
    /// published for eviction). Without it each process is a cache of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
}

/// `cluster:`: where the others reach this process, and the secret they share.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Base URL the other processes reach this one at (`http://10.0.0.5:5000`). Default: the
    /// listener's address (which must then not be a wildcard like `0.0.0.0`).
    /// `OCIEDGE_CLUSTER_ADVERTISE` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// The environment variable holding the region's shared secret (required, non-empty).
    pub secret_env: String,
}

impl ClusterConfig {
    /// The advertise URL, explicit or from the listener.
    pub fn advertise_url(&self, listen: SocketAddr, tls: bool) -> Result<String, ConfigError> {
        if let Some(a) = &self.advertise {
            return Ok(a.trim_end_matches('/').to_string());
        }
        if listen.ip().is_unspecified() {
            return Err(err(
                "cluster.advertise",
                format!("required when listen ({listen}) is a wildcard address: the others cannot reach this process there"),
            ));
        }
        let scheme = if tls { "https" } else { "http" };
        Ok(format!("{scheme}://{listen}"))
    }

    /// The shared secret, from the environment.
    pub fn secret(&self) -> Result<String, ConfigError> {
        match std::env::var(&self.secret_env) {
            Ok(v) if !v.is_empty() => Ok(v),
            _ => Err(err(
                "cluster.secret_env",
                format!(
                    "environment variable {} is not set (or empty)",
                    self.secret_env
                ),
            )),
        }
    }

    fn validate(&self, listen: SocketAddr, tls: bool) -> Result<(), ConfigError> {
        if let Some(a) = &self.advertise {
            match url::Url::parse(a) {
                Ok(u)
                    if (u.scheme() == "http" || u.scheme() == "https")
                        && u.host().is_some()
                        && (u.path().is_empty() || u.path() == "/")
                        && u.query().is_none() => {}
                _ => {
                    return Err(err(
                        "cluster.advertise",
                        format!("{a:?} is not an http(s) base URL (scheme, host, port)"),
                    ))
                }
            }
        }
        self.advertise_url(listen, tls)?;
        self.secret()?;
        Ok(())
    }
}

/// TLS termination on `listen`. The files are PEM; they are reloaded without a restart when
/// they change (checked every `reload_interval`) and on `SIGHUP`, so that a renewed certificate
/// (cert-manager, certbot, a Kubernetes secret update) is served without dropping connections.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// Private key of the leaf certificate (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// An optional plain-HTTP listener beside the TLS one (in-cluster clients, health checks
    /// that do not speak TLS). Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plain_listen: Option<SocketAddr>,
    /// How often the files' modification times are checked. Default 5s.
    #[serde(default = "default_tls_reload_interval")]
    pub reload_interval: HumanDuration,
}

/// Limits that keep slow or idle clients from holding the server (slow-loris), and the time
/// a shutdown may take.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Connections served at once, over all listeners. Beyond it new connections wait in the
    /// kernel's accept queue until one closes. Default 4096.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Largest request head (request line and headers; HTTP/2: the decoded header list).
    /// A larger one is answered `431`. Default 64KiB.
    #[serde(default = "default_max_header_size")]
    pub max_header_size: ByteSize,
    /// Time a client has to send a whole request head, and for TLS to finish its handshake.
    /// On HTTP/1.1 it also bounds the wait for the next request on a kept-alive connection.
    /// Default 10s.
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout: HumanDuration,
    /// A connection with no request in progress for this long is closed (HTTP/2: `GOAWAY`).
    /// Default 60s.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: HumanDuration,
    /// A connection whose client takes none of the bytes sent to it for this long (a reader
    /// that stopped, or trickles so slowly that its window stays closed) is dropped, whatever is
    /// in progress (the socket's `TCP_USER_TIMEOUT`). Default 60s.
    #[serde(default = "default_send_timeout")]
    pub send_timeout: HumanDuration,
    /// After `SIGTERM`, how long responses and fills in progress may take to finish before the
    /// process exits anyway. Default 30s.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: HumanDuration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: default_max_connections(),
            max_header_size: default_max_header_size(),
            header_read_timeout: default_header_read_timeout(),
            idle_timeout: default_idle_timeout(),
            send_timeout: default_send_timeout(),
            shutdown_grace: default_shutdown_grace(),
        }
    }
}

fn default_tls_reload_interval() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(5))
}
fn default_max_connections() -> usize {
    4096
}
fn default_max_header_size() -> ByteSize {
    ByteSize(64 * 1024)
}
fn default_header_read_timeout() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(10))
}
fn default_idle_timeout() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(60))
}
fn default_send_timeout() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(60))
}
fn default_shutdown_grace() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(30))
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Id of the local engine. `OCIEDGE_STORAGE_PREFERENCE` overrides it.
    pub preference: String,
    /// Storage engines by location id.
    pub engines: BTreeMap<String, EngineConfig>,
    /// How nearness is measured.
    #[serde(default)]
    pub probe: ProbeConfig,
    /// When set, blob GETs served from a local S3/GCS/Azure engine are answered with a redirect
    /// to a presigned URL valid this long (the bytes then flow from the store, not through
    /// ociedge). Off by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_blobs: Option<HumanDuration>,
}

/// The background prober that ranks remote engines by measured round-trip time.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeConfig {
    /// Time between probes of each engine. Default 5s.
    #[serde(default = "default_probe_interval")]
    pub interval: HumanDuration,
    /// A probe slower than this fails. Default 2s.
    #[serde(default = "default_probe_timeout")]
    pub timeout: HumanDuration,
    /// Consecutive failed probes that mark an engine down. Default 3.
    #[serde(default = "default_down_after")]
    pub down_after: u32,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            interval: default_probe_interval(),
            timeout: default_probe_timeout(),
            down_after: default_down_after(),
        }
    }
}

fn default_probe_interval() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(5))
}
fn default_probe_timeout() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(2))
}
fn default_down_after() -> u32 {
    3
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// An `object_store` URL: `file://`, `memory://`, `s3://`, `gs://`, `az://`. A relative
    /// `file://./dir` is relative to the working directory.
    pub url: String,
    /// `object_store` configuration keys for this store (`endpoint`, `region`,
    /// `access_key_id`, `allow_http`, ...), passed through as they are.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
    /// Pushed content is replicated here by default.
    #[serde(default)]
    pub replicate_by_default: bool,
    /// Breaks ties in the nearness ranking (lower first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Registry name clients use (`docker.io`, `ghcr.io`): matched against `?ns=` and a leading
    /// path component.
    pub name: String,
    /// Base URL of the registry's API (`https://registry-1.docker.io`).
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<UpstreamAuth>,
    /// `public`, `gated` or `passthrough` (see DESIGN.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<Access>,
    /// A PEM file of CA certificates trusted for this upstream, in addition to the system
    /// roots (a private registry with its own CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Consecutive failures (5xx, timeouts, resets, refused connections) that open the circuit
    /// breaker. Default 5.
    #[serde(default = "default_upstream_down_after")]
    pub down_after: u32,
    /// The longest back-off of an open breaker (it starts at 1s and doubles, with jitter).
    /// Default 60s.
    #[serde(default = "default_backoff_max")]
    pub backoff_max: HumanDuration,
    /// Below this share of its announced pull quota left, tags are served stale (within
    /// `max_stale`) instead of revalidated, and prewarming pauses. Default 10%.
    #[serde(default = "default_ratelimit_reserve")]
    pub ratelimit_reserve: Percent,
}

fn default_upstream_down_after() -> u32 {
    5
}
fn default_backoff_max() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(60))
}
fn default_ratelimit_reserve() -> Percent {
    Percent(10.0)
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamAuth {
    pub username: String,
    /// The password itself (prefer `password_env`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Name of an environment variable holding the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// Origins (`https://auth.example.com`) of token services, besides the upstream's own
    /// origin, that the upstream's `WWW-Authenticate` realm may name and that then receive these
    /// credentials (and, for `access: passthrough`, the client's). Any other realm is asked for
    /// an anonymous token. Default: none; for `docker.io`, `https://auth.docker.io`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub realms: Option<Vec<String>>,
}

impl UpstreamAuth {
    /// The password, read from the environment when `password_env` is used.
    pub fn resolve_password(&self) -> Option<String> {
        self.password.clone().or_else(|| {
            self.password_env
                .as_ref()
                .and_then(|v| std::env::var(v).ok())
        })
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    Public,
    Gated,
    Passthrough,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PushConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    /// Per-repository replication locations; the first rule whose glob matches wins. Without a
    /// match, pushed content goes to every engine with `replicate_by_default`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicate: Vec<ReplicationRule>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationRule {
    /// Repository glob (`team/**`, `library/*`).
    pub repos: String,
    /// Storage engine ids to replicate to (may be empty: keep in the preferred engine only).
    pub to: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// How long a tag→digest answer is trusted before it is revalidated. Default 60s.
    #[serde(default = "default_tag_ttl")]
    pub tag_ttl: HumanDuration,
    /// How long a stale tag is served while its authority is down. Default 24h.
    #[serde(default = "default_max_stale")]
    pub max_stale: HumanDuration,
    /// How long an upstream's "no such manifest or tag" is remembered. Default 30s; 0s: never.
    #[serde(default = "default_negative_ttl")]
    pub negative_ttl: HumanDuration,
    /// Local engine cap: least recently used cached content is evicted above it. Unset: no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size: Option<ByteSize>,
    /// Eviction stops once usage is under this fraction of `max_size`. Default 0.9.
    #[serde(default = "default_low_water")]
    pub low_water: f64,
    /// Content accessed more recently than this is never evicted. Default 0s: reads in flight
    /// are protected exactly (this process's, and with `cluster:` the region's, published), so
    /// access times only order the candidates and this need only cover the clock skew between
    /// the processes whose access times are merged, which NTP keeps far below their one-second
    /// grain. Processes sharing one engine without `cluster:` cannot see each other's reads:
    /// give them a `min_idle` longer than any transfer (the former default, 10m).
    #[serde(default = "default_min_idle")]
    pub min_idle: HumanDuration,
    /// Upload sessions and fill spools older than this are removed. Default 24h.
    #[serde(default = "default_stale_uploads")]
    pub stale_uploads: HumanDuration,
    /// A `Range` of a cold blob also starts the whole-blob fill (so later reads are local).
    /// Default true; false: only the ranges are fetched (very large blobs read sparsely).
    #[serde(default = "default_true")]
    pub fill_on_range: bool,
}

fn default_true() -> bool {
    true
}

/// The smallest `cache.max_size` accepted: below it a cache thrashes on one image.
pub const MIN_MAX_SIZE: u64 = 16 << 20;

fn default_negative_ttl() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(30))
}
fn default_low_water() -> f64 {
    0.9
}
fn default_min_idle() -> HumanDuration {
    HumanDuration(std::time::Duration::ZERO)
}
fn default_stale_uploads() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(24 * 3600))
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            tag_ttl: default_tag_ttl(),
            max_stale: default_max_stale(),
            negative_ttl: default_negative_ttl(),
            max_size: None,
            low_water: default_low_water(),
            min_idle: default_min_idle(),
            stale_uploads: default_stale_uploads(),
            fill_on_range: true,
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 5000))
}
fn default_region() -> String {
    "local".to_string()
}
fn default_tag_ttl() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(60))
}
fn default_max_stale() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(24 * 3600))
}

/// A configuration error, with the key path where there is one.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err(path: &str, msg: impl std::fmt::Display) -> ConfigError {
    ConfigError(format!("{path}: {msg}"))
}

/// Largest config file read (a real one is a few KiB).
pub const MAX_CONFIG_FILE: u64 = 4 << 20;

/// Reads the config file, at most [`MAX_CONFIG_FILE`] bytes of it: a pipe (`--config
/// /dev/stdin`) still works, `/dev/zero` is refused instead of filling memory.
fn read_config_file(p: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(p)?
        .take(MAX_CONFIG_FILE + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_CONFIG_FILE {
        return Err(std::io::Error::other(format!(
            "larger than the {MAX_CONFIG_FILE} bytes a config file may have"
        )));
    }
    Ok(text)
}

/// Deepest nesting of collections a config file may have (the config itself needs 5).
pub const MAX_NESTING: usize = 64;

/// Refuses text whose flow collections (`[`, `{`) nest deeper than [`MAX_NESTING`], in one
/// linear pass before the parser sees it. Brackets inside quoted scalars and comments do not
/// count, nor do brackets inside a plain scalar (a collection starts only where a token does).
/// (Block nesting costs the parser linear time, and its depth is bounded by the serde
/// deserializer's recursion limit.)
fn check_nesting(text: &str) -> Result<(), ConfigError> {
    let mut depth = 0usize;
    let mut line = 1usize;
    let mut chars = text.chars().peekable();
    // Whether a quote here would start a quoted scalar (at the start of a token).
    let mut token_start = true;
    while let Some(c) = chars.next() {
        match c {
            '\n' => {
                line += 1;
                token_start = true;
                continue;
            }
            '#' if token_start => {
                while chars.peek().is_some_and(|&c| c != '\n') {
                    chars.next();
                }
                continue;
            }
            '\'' | '"' if token_start => {
                while let Some(q) = chars.next() {
                    match q {
                        '\n' => line += 1,
                        '\\' if c == '"' => {
                            chars.next();
                        }
                        q if q == c => {
                            // '' is an escaped quote inside a single-quoted scalar.
                            if c == '\'' && chars.peek() == Some(&'\'') {
                                chars.next();
                                continue;
                            }
                            break;
                        }
                        _ => {}
                    }
                }
            }
            // A flow collection starts only where a token does (`team/[ab]` is a plain scalar).
            '[' | '{' if token_start => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(ConfigError(format!(
                        "line {line}: collections nested deeper than {MAX_NESTING} levels"
                    )));
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        token_start = matches!(c, ' ' | '\t' | '[' | '{' | ',' | ':' | '-' | '?');
    }
    Ok(())
}

impl Config {
    /// Loads `path`, or the embedded default when `None`, applies environment overrides and
    /// validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (text, origin) = match path {
            Some(p) => (
                read_config_file(p).map_err(|e| ConfigError(format!("{}: {e}", p.display())))?,
                p.display().to_string(),
            ),
            None => (DEFAULT_YAML.to_string(), "embedded default".to_string()),
        };
        let mut cfg =
            Config::parse(&text).map_err(|e| ConfigError(format!("{origin}: {}", e.0)))?;
        if let Ok(pref) = std::env::var(env::STORAGE_PREFERENCE) {
            if !pref.is_empty() {
                cfg.storage.preference = pref;
            }
        }
        if let (Some(c), Ok(a)) = (&mut cfg.cluster, std::env::var(env::CLUSTER_ADVERTISE)) {
            if !a.is_empty() {
                c.advertise = Some(a);
            }
        }
        cfg.validate()
            .map_err(|e| ConfigError(format!("{origin}: {}", e.0)))?;
        Ok(cfg)
    }

    /// Parses YAML; errors name the key path (`storage.engines.eu.url: ...`). A key given twice
    /// in one mapping, at any level, is an error (a map field would silently keep the last one),
    /// and so is nesting deeper than [`MAX_NESTING`] (the YAML parser takes quadratic time in
    /// the depth of flow collections: 100k levels took minutes).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        check_nesting(text)?;
        serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text)
            .map_err(|e| ConfigError(e.to_string()))?;
        let de = serde_yaml_ng::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path == "." || path.is_empty() {
                ConfigError(inner.to_string())
            } else {
                ConfigError(format!("{path}: {inner}"))
            }
        })
    }

    /// Checks what serde cannot: references between sections, URLs, features this version lacks.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(t) = &self.tls {
            t.validate(self.listen)?;
        }
        self.limits.validate()?;
        if let Some(c) = &self.cluster {
            c.validate(self.listen, self.tls.is_some())?;
        }
        if let Some(a) = &self.auth {
            a.validate()?;
        }
        if let Some(e) = &self.push.engine {
            let upstream = self.upstreams.iter().any(|u| &u.name == e);
            for (i, r) in self.push.replicate.iter().enumerate() {
                if globset::Glob::new(&r.repos).is_err() {
                    return Err(err(
                        &format!("push.replicate[{i}].repos"),
                        format!("{:?} is not a glob", r.repos),
                    ));
                }
                for t in &r.to {
                    if !self.storage.engines.contains_key(t) || t == e {
                        return Err(err(
                            &format!("push.replicate[{i}].to"),
                            format!("{t:?} is not a storage engine other than the push engine"),
                        ));
                    }
                }
            }
            if !upstream && !self.storage.engines.contains_key(e) {
                return Err(err(
                    "push.engine",
                    format!("{e:?} is neither a storage engine nor an upstream"),
                ));
            }
        }
        if self.region.is_empty()
            || !self
                .region
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(err(
                "region",
                "must be a non-empty name of letters, digits, '-', '_' or '.'",
            ));
        }
        if self.storage.engines.is_empty() {
            return Err(err(
                "storage.engines",
                "at least one storage engine is required",
            ));
        }
        for (id, e) in &self.storage.engines {
            let path = format!("storage.engines.{id}");
            if id.is_empty()
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(err(&path, "engine ids are letters, digits, '-' and '_'"));
            }
            urls::check_storage_url(&e.url, &e.options)
                .map_err(|m| err(&format!("{path}.url"), m))?;
        }
        if !self.storage.engines.contains_key(&self.storage.preference) {
            let known: Vec<_> = self.storage.engines.keys().cloned().collect();
            return Err(err(
                "storage.preference",
                format!(
                    "{:?} is not a configured engine (have: {})",
                    self.storage.preference,
                    known.join(", ")
                ),
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, u) in self.upstreams.iter().enumerate() {
            let path = format!("upstreams[{i}]");
            if u.name.is_empty()
                || u.name.contains('/')
                || u.name
                    .bytes()
                    .any(|b| b.is_ascii_uppercase() || b.is_ascii_whitespace())
            {
                return Err(err(
                    &format!("{path}.name"),
                    "a registry host name such as docker.io or ghcr.io",
                ));
            }
            // Content is stored under the registry's prefix (`host:5000` → `host-5000`): two
            // names with one prefix would share storage names.
            let prefix = crate::oci::name::registry_prefix(&u.name);
            if !names.insert(prefix.clone()) {
                return Err(err(
                    &format!("{path}.name"),
                    format!(
                        "{:?} is listed twice (or stores under the same prefix {prefix:?} as another upstream)",
                        u.name
                    ),
                ));
            }
            if prefix.parse::<crate::oci::RepoName>().is_err() {
                return Err(err(
                    &format!("{path}.name"),
                    format!("{:?} cannot be stored as a repository component", u.name),
                ));
            }
            if self.storage.engines.contains_key(&u.name) {
                return Err(err(
                    &format!("{path}.name"),
                    format!("{:?} is also a storage engine id", u.name),
                ));
            }
            let base = match url::Url::parse(&u.url) {
                Ok(p) if (p.scheme() == "http" || p.scheme() == "https") && p.host().is_some() => p,
                _ => {
                    return Err(err(
                        &format!("{path}.url"),
                        format!("{:?} is not an http(s) URL", u.url),
                    ))
                }
            };
            if let Some(a) = &u.auth {
                for (j, r) in a.realms.iter().flatten().enumerate() {
                    urls::check_upstream_realm(r, &base)
                        .map_err(|m| err(&format!("{path}.auth.realms[{j}]"), m))?;
                }
                if a.password.is_none() && a.password_env.is_none() {
                    return Err(err(
                        &format!("{path}.auth"),
                        "needs password or password_env",
                    ));
                }
                if let Some(v) = &a.password_env {
                    if std::env::var(v).is_err() {
                        return Err(err(
                            &format!("{path}.auth.password_env"),
                            format!("environment variable {v} is not set"),
                        ));
                    }
                }
            }
            if self.auth.is_none()
                && (u.access == Some(Access::Gated) || (u.access.is_none() && u.auth.is_some()))
            {
                return Err(err(&format!("{path}.access"), "gated access needs an auth: section (our rules decide who may pull what ociedge fetches with this upstream's credentials); add one, or set access: public to serve this upstream's content to every client"));
            }
            if u.down_after == 0 {
                return Err(err(&format!("{path}.down_after"), "must be at least 1"));
            }
            if u.backoff_max.0 < std::time::Duration::from_secs(1) {
                return Err(err(&format!("{path}.backoff_max"), "must be at least 1s"));
            }
            if let Some(ca) = &u.ca_file {
                if ca.as_os_str().is_empty() {
                    return Err(err(&format!("{path}.ca_file"), "must be a file path"));
                }
            }
            if self.auth.is_none() && u.access == Some(Access::Passthrough) {
                return Err(err(
                    &format!("{path}.access"),
                    "passthrough needs an auth: section (its token service carries the client's upstream credentials)",
                ));
            }
        }
        let p = &self.storage.probe;
        if p.interval.0 < std::time::Duration::from_millis(50) {
            return Err(err("storage.probe.interval", "must be at least 50ms"));
        }
        if p.timeout.0.is_zero() {
            return Err(err("storage.probe.timeout", "must be more than 0s"));
        }
        if p.down_after == 0 {
            return Err(err("storage.probe.down_after", "must be at least 1"));
        }
        if let Some(m) = self.cache.max_size {
            if m.0 < MIN_MAX_SIZE {
                return Err(err(
                    "cache.max_size",
                    format!("{m} is below the floor of 16MiB"),
                ));
            }
        }
        if !(0.1..=1.0).contains(&self.cache.low_water) {
            return Err(err("cache.low_water", "must be between 0.1 and 1.0"));
        }
        if self.cache.tag_ttl.0.is_zero() {
            return Err(err("cache.tag_ttl", "must be more than 0s"));
        }
        Ok(())
    }

    /// The effective configuration as YAML, secrets masked.
    pub fn to_masked_yaml(&self) -> String {
        let mut c = self.clone();
        c.auth = c.auth.as_ref().map(auth::AuthConfig::masked);
        for u in &mut c.upstreams {
            if let Some(a) = &mut u.auth {
                if a.password.is_some() {
                    a.password = Some("********".into());
                }
            }
        }
        for e in c.storage.engines.values_mut() {
            for (k, v) in e.options.iter_mut() {
                let k = k.to_ascii_lowercase();
                if k.contains("secret")
                    || k.contains("key")
                    || k.contains("token")
                    || k.contains("password")
                    || k.contains("sas")
                {
                    *v = "********".into();
                }
            }
        }
        serde_yaml_ng::to_string(&c).unwrap_or_else(|e| format!("# cannot print config: {e}\n"))
    }
}

impl TlsConfig {
    /// Checks the shape only: the files are read when the server starts (and on every reload),
    /// so that `check-config` also works on a machine without the secrets, such as CI.
    fn validate(&self, listen: SocketAddr) -> Result<(), ConfigError> {
        if self.cert.as_os_str().is_empty() {
            return Err(err("tls.cert", "must be a file path"));
        }
        if self.key.as_os_str().is_empty() {
            return Err(err("tls.key", "must be a file path"));
        }
        if self.plain_listen == Some(listen) {
            return Err(err(
                "tls.plain_listen",
                "must differ from listen (which serves TLS)",
            ));
        }
        if self.reload_interval.0 < std::time::Duration::from_millis(100) {
            return Err(err("tls.reload_interval", "must be at least 100ms"));
        }
        Ok(())
    }
}

impl LimitsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_connections == 0 || self.max_connections > u32::MAX as usize {
            return Err(err(
                "limits.max_connections",
                "must be between 1 and 4294967295",
            ));
        }
        // hyper's HTTP/1 read buffer cannot be smaller than 8KiB; HTTP/2 counts the header
        // list in a u32.
        if self.max_header_size.0 < 8192 || self.max_header_size.0 > u64::from(u32::MAX) {
            return Err(err(
                "limits.max_header_size",
                "must be between 8KiB and 4GiB",
            ));
        }
        for (key, d) in [
            ("limits.header_read_timeout", self.header_read_timeout),
            ("limits.idle_timeout", self.idle_timeout),
        ] {
            if d.0.is_zero() {
                return Err(err(key, "must be more than 0s"));
            }
        }
        // Set on each socket in milliseconds, as a u32.
        let send = self.send_timeout.0;
        if send < std::time::Duration::from_secs(1) || send.as_millis() > u128::from(u32::MAX) {
            return Err(err("limits.send_timeout", "must be between 1s and 49days"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
