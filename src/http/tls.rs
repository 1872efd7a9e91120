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

/// Largest certificate chain or key file read: real ones are a few KiB.
const MAX_PEM_FILE: u64 = 1 << 20;

/// Reads a certificate or key file: only a regular file (a link to one is followed, as Kubernetes
/// secret volumes need) of at most [`MAX_PEM_FILE`] bytes. A FIFO would block the reader for
/// good and `/dev/zero` would grow without end.
fn read_pem(path: &Path, key: &str) -> Result<Vec<u8>> {
    crate::fileio::read_regular_capped(path, MAX_PEM_FILE)
        .map_err(|e| Error::Config(format!("{key}: {}: {e}", path.display())))
}

/// Reads a PEM chain and key, and checks that the key belongs to the leaf certificate.
fn load(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey> {
    let cert_pem = read_pem(cert, "tls.cert")?;
    let key_pem = read_pem(key, "tls.key")?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Config(format!("tls.cert: {}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(Error::Config(format!(
            "tls.cert: {}: no PEM certificate in the file",
            cert.display()
        )));
    }
    let pkey = PrivateKeyDer::from_pem_slice(&key_pem)
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

    /// The resident set size of this process, in bytes.
    fn rss() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
        let pages: u64 = statm
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        pages * 4096
    }

    /// Reloads in a thread and waits at most 10 s for the verdict (`None`: still blocked).
    fn reload_within(tls: &Tls) -> Option<Result<bool>> {
        let cert = tls.cert.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(cert.reload(true));
        });
        rx.recv_timeout(Duration::from_secs(10)).ok()
    }

    fn served(tls: &Tls) -> String {
        fingerprint(&tls.cert.current.read().expect("lock"))
    }

    #[test]
    fn a_fifo_or_a_device_as_certificate_keeps_the_old_one_in_service() {
        let d = tempfile::tempdir().expect("tempdir");
        let (cert, key) = (d.path().join("tls.crt"), d.path().join("tls.key"));
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("cert");
        std::fs::write(&cert, ck.cert.pem()).expect("write");
        std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write");
        let cfg = TlsConfig {
            cert: cert.clone(),
            key: key.clone(),
            plain_listen: None,
            reload_interval: crate::config::HumanDuration(Duration::from_secs(5)),
        };
        let tls = Tls::new(&cfg).expect("tls");
        let first = served(&tls);
        let before = rss();

        // A FIFO nobody writes to: opening it for reading would wait for a writer for ever.
        std::fs::remove_file(&cert).expect("rm");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &cert,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .expect("mkfifo");
        let r = reload_within(&tls).expect("a FIFO blocked the reload");
        let e = r.expect_err("a FIFO is no certificate").to_string();
        assert!(e.starts_with("tls.cert:"), "{e}");
        assert_eq!(served(&tls), first, "the previous certificate stays");

        // Links to /dev/zero, as the certificate and as the key: refused without reading.
        for path in [&cert, &key] {
            let _ = std::fs::remove_file(&cert);
            std::fs::write(&cert, ck.cert.pem()).expect("write");
            let _ = std::fs::remove_file(path);
            std::os::unix::fs::symlink("/dev/zero", path).expect("symlink");
            let r = reload_within(&tls).expect("/dev/zero blocked the reload");
            assert!(r.is_err(), "/dev/zero is no PEM file");
            assert_eq!(served(&tls), first, "the previous certificate stays");
        }
        let grown = rss().saturating_sub(before);
        assert!(grown < 64 << 20, "memory grew by {grown} bytes");

        // An oversized regular file is refused too.
        let _ = std::fs::remove_file(&key);
        std::fs::write(&key, vec![b'A'; (MAX_PEM_FILE + 1) as usize]).expect("write");
        assert!(reload_within(&tls).expect("reload").is_err());
        assert_eq!(served(&tls), first);
        // And a good pair is loaded again.
        let ck2 = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("cert");
        std::fs::write(&cert, ck2.cert.pem()).expect("write");
        std::fs::write(&key, ck2.signing_key.serialize_pem()).expect("write");
        assert!(reload_within(&tls).expect("reload").expect("loads"));
        assert_ne!(served(&tls), first, "the new certificate is served");
    }
}
