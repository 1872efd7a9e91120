//! TLS termination: a rustls acceptor (HTTP/2 and HTTP/1.1 chosen by ALPN) whose certificate is
//! reloaded from its files without a restart.
//!
//! The certificate lives behind a [`ResolvesServerCert`] that hands out whatever was loaded last,
//! so a reload swaps one `Arc` and every handshake after it sees the new certificate, while
//! connections already open keep theirs. Reloads happen when the files' modification time, size
//! or inode change (polled every `tls.reload_interval`: cert-manager, certbot and Kubernetes
//! secret updates all rewrite or replace the files) and at once on `SIGHUP`. A reload that fails
//! (a half-written file, a key that does not match the certificate yet) keeps the old certificate
//! and is retried at the next poll, so a rotation done in two steps never takes the listener down.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::TlsConfig;
use crate::error::{Error, Result};

/// ALPN protocols offered, best first: clients that speak HTTP/2 get it, the rest HTTP/1.1.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The TLS side of the listener: the acceptor and the certificate it serves.
pub struct Tls {
    acceptor: TlsAcceptor,
    cert: Arc<ReloadingCert>,
    reload_interval: Duration,
}

/// What identifies a version of a file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    // `metadata` follows symlinks: a Kubernetes secret volume swaps a `..data` symlink, and it
    // is the target that changes.
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        ino: m.ino(),
    })
}

/// The certificate currently served, and the file versions it was loaded from.
#[derive(Debug)]
struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    /// Stamps of (cert, key) at the last successful load; `None` forces the next poll to load.
    loaded: Mutex<Option<(Stamp, Stamp)>>,
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // A poisoned lock still holds a valid certificate: keep serving it.
        let c = match self.current.read() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        Some(c.clone())
    }
}

/// Reads a PEM chain and key, and checks that the key belongs to the leaf certificate.
fn load(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| Error::Config(format!("tls.cert: {}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(Error::Config(format!(
            "tls.cert: {}: no PEM certificate in the file",
            cert.display()
        )));
    }
    let pkey = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| Error::Config(format!("tls.key: {}: {e}", key.display())))?;
    CertifiedKey::from_der(chain, pkey, provider).map_err(|e| {
        Error::Config(format!(
            "tls.key: {} does not fit the certificate {}: {e}",
            key.display(),
            cert.display()
        ))
    })
}

/// Short fingerprint of the leaf certificate, for the logs (which certificate is served now).
fn fingerprint(ck: &CertifiedKey) -> String {
    use sha2::Digest as _;
    match ck.end_entity_cert() {
        Ok(der) => hex::encode(&sha2::Sha256::digest(der.as_ref())[..8]),
        Err(_) => "none".into(),
    }
}

impl ReloadingCert {
    /// Loads the files if they changed since the last successful load (or unconditionally with
    /// `force`). Returns whether a new certificate is now served.
    fn reload(&self, force: bool) -> Result<bool> {
        let stamps = stamp(&self.cert_path).zip(stamp(&self.key_path));
        let unchanged = {
            let loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
            stamps.is_some() && *loaded == stamps
        };
        if unchanged && !force {
            return Ok(false);
        }
        // The stamps were taken before reading: a file replaced while we read it has a newer
        // stamp than the one recorded, so the next poll loads it again.
        let ck = load(&self.cert_path, &self.key_path, &self.provider)?;
        tracing::info!(
            cert = %self.cert_path.display(),
            sha256 = %fingerprint(&ck),
            "TLS certificate loaded"
        );
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ck);
        *self.loaded.lock().unwrap_or_else(|p| p.into_inner()) = stamps;
        Ok(true)
    }
}

impl Tls {
    /// Loads the certificate and key (a bad file is a startup error, with its key path) and
    /// builds the acceptor.
    pub fn new(cfg: &TlsConfig) -> Result<Tls> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        // Stamps first, then the read: see `ReloadingCert::reload`.
        let stamps = stamp(&cfg.cert).zip(stamp(&cfg.key));
        let first = load(&cfg.cert, &cfg.key, &provider)?;
        tracing::info!(cert = %cfg.cert.display(), sha256 = %fingerprint(&first), "TLS certificate loaded");
        let cert = Arc::new(ReloadingCert {
            cert_path: cfg.cert.clone(),
            key_path: cfg.key.clone(),
            current: RwLock::new(Arc::new(first)),
            provider: provider.clone(),
            loaded: Mutex::new(stamps),
        });
        let mut sc = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("tls: {e}")))?
            .with_no_client_auth()
            .with_cert_resolver(cert.clone());
        sc.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(sc)),
            cert,
            reload_interval: cfg.reload_interval.0,
        })
    }

    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Reloads the certificate when its files change and on `SIGHUP`, until `stop` is
    /// cancelled. Failures are logged and the old certificate stays in service.
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        use tokio::signal::unix::{signal, SignalKind};
        // Without a SIGHUP handler the signal's default action would kill the process; with TLS
        // configured, SIGHUP means "reload the certificate".
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; certificate reloads by polling only");
                None
            }
        };
        let mut tick = tokio::time::interval(self.reload_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let force = tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => false,
                Some(()) = async {
                    match hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => true,
            };
            if force {
                tracing::info!("SIGHUP: reloading the TLS certificate");
            }
            let cert = self.cert.clone();
            // File reads and key parsing are blocking work: keep them off the runtime threads.
            match tokio::task::spawn_blocking(move || cert.reload(force)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "TLS certificate not reloaded; still serving the previous one")
                }
                Err(e) => tracing::warn!(error = %e, "TLS reload task failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_name_their_key() {
        let cfg = TlsConfig {
            cert: "/nonexistent/tls.crt".into(),
            key: "/nonexistent/tls.key".into(),
            plain_listen: None,
            reload_interval: crate::config::HumanDuration(Duration::from_secs(5)),
        };
        let e = Tls::new(&cfg)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.starts_with("tls.cert: /nonexistent/tls.crt"), "{e}");
    }

    #[test]
    fn a_file_without_certificates_is_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        let cert = d.path().join("c.pem");
        std::fs::write(&cert, "not a pem\n").expect("write");
        let cfg = TlsConfig {
            cert: cert.clone(),
            key: cert,
            plain_listen: None,
            reload_interval: crate::config::HumanDuration(Duration::from_secs(5)),
        };
        let e = Tls::new(&cfg)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("no PEM certificate"), "{e}");
    }
}
