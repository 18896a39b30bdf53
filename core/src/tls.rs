//! TLS material from PEM files, and a reloader that notices when cert-manager (or anyone) rewrites
//! them and rebuilds the TLS configuration without a restart. A bad rewrite keeps the old config.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: PathBuf },
    #[error("{path} is not valid PEM: {detail}")]
    BadPem { path: PathBuf, detail: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// All certificates in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = std::fs::read(path).map_err(|source| TlsError::Read { path: path.into(), source })?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem { path: path.into(), detail: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.into() });
    }
    Ok(certs)
}

/// The private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = std::fs::read(path).map_err(|source| TlsError::Read { path: path.into(), source })?;
    PrivateKeyDer::from_pem_slice(&data).map_err(|_| TlsError::NoKey { path: path.into() })
}

/// A root store from the CA certificates in a PEM file.
pub fn load_roots(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::Config(format!("CA in {}: {e}", path.display())))?;
    }
    Ok(roots)
}

/// A value built from files, rebuilt when any of them changes.
pub struct Reloading<T> {
    current: RwLock<Arc<T>>,
    files: Vec<PathBuf>,
    build: Box<dyn Fn() -> Result<T, TlsError> + Send + Sync>,
    stamps: RwLock<Vec<Option<SystemTime>>>,
}

impl<T: Send + Sync + 'static> Reloading<T> {
    /// Builds the value once (an error here is a start-up error) and remembers the files' times.
    pub fn new(
        files: Vec<PathBuf>,
        build: impl Fn() -> Result<T, TlsError> + Send + Sync + 'static,
    ) -> Result<Arc<Self>, TlsError> {
        let value = build()?;
        let stamps = stamps(&files);
        Ok(Arc::new(Reloading {
            current: RwLock::new(Arc::new(value)),
            files,
            build: Box::new(build),
            stamps: RwLock::new(stamps),
        }))
    }

    /// The current value.
    pub fn get(&self) -> Arc<T> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Rebuilds if any file changed since the last good load; returns whether it did. A failed
    /// build (say, the certificate rewritten but not yet its key) is tried again next time.
    pub fn reload_if_changed(&self) -> bool {
        let now = stamps(&self.files);
        if *self.stamps.read().unwrap_or_else(|e| e.into_inner()) == now {
            return false;
        }
        match (self.build)() {
            Ok(value) => {
                *self.stamps.write().unwrap_or_else(|e| e.into_inner()) = now;
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(value);
                tracing::info!(files = ?self.files, "TLS files changed; reloaded");
                true
            }
            Err(error) => {
                tracing::error!(%error, "TLS files changed but cannot be loaded; keeping the previous ones");
                false
            }
        }
    }

    /// Checks the files every `every` until the process ends.
    pub fn spawn_watch(self: &Arc<Self>, every: Duration) {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match this.upgrade() {
                    Some(this) => {
                        this.reload_if_changed();
                    }
                    None => return,
                }
            }
        });
    }
}

fn stamps(files: &[PathBuf]) -> Vec<Option<SystemTime>> {
    // Kubernetes secret volumes swap a symlink; metadata() follows it, so the time changes.
    files.iter().map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_empty_files_say_which_file() {
        let dir = std::env::temp_dir().join(format!("imdsgate-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not pem at all").unwrap();
        let err = load_certs(&dir.join("missing.pem")).unwrap_err().to_string();
        assert!(err.contains("missing.pem"), "{err}");
        let err = load_certs(&empty).unwrap_err().to_string();
        assert!(err.contains("no PEM certificate"), "{err}");
        let err = load_key(&empty).unwrap_err().to_string();
        assert!(err.contains("no PEM private key"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reloads_when_a_file_changes_and_keeps_the_old_value_on_error() {
        let dir = std::env::temp_dir().join(format!("imdsgate-reload-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("value");
        std::fs::write(&file, "1").unwrap();
        let path = file.clone();
        let r = Reloading::new(vec![file.clone()], move || {
            let text = std::fs::read_to_string(&path).map_err(|e| TlsError::Config(e.to_string()))?;
            text.trim().parse::<u32>().map_err(|e| TlsError::Config(e.to_string()))
        })
        .unwrap();
        assert_eq!(*r.get(), 1);
        assert!(!r.reload_if_changed());
        // Rewrite the file and stamp it with a chosen time (file systems may be coarse).
        let rewrite = |text: &str, at: SystemTime| {
            std::fs::write(&file, text).unwrap();
            std::fs::File::options().write(true).open(&file).unwrap().set_modified(at).unwrap();
        };
        let later = SystemTime::now() + Duration::from_secs(5);
        rewrite("2", later);
        assert!(r.reload_if_changed());
        assert_eq!(*r.get(), 2);
        rewrite("garbage", later + Duration::from_secs(5));
        assert!(!r.reload_if_changed());
        assert_eq!(*r.get(), 2);
        // Caught mid-rotation: the next look retries even though nothing changed since.
        rewrite("3", later + Duration::from_secs(5));
        assert!(r.reload_if_changed());
        assert_eq!(*r.get(), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
