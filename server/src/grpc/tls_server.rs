//! The mutual-TLS listener for gRPC: client certificates signed by `--tls-client-ca` are required;
//! the certificate, key and CA are re-read when their files change. Handshakes run in their own
//! tasks with a deadline, so a slow or hostile client cannot stall the accept loop; failed accepts
//! back off (the shared [`accept_with_backoff`]).

use crate::metrics::OutcomeLabels;
use imdsgate_core::http_server::{Backoff, accept_with_backoff};
use imdsgate_core::tls::{self, Reloading, TlsError};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds the server TLS configuration from PEM files.
pub fn server_config(cert: &Path, key: &Path, client_ca: &Path) -> Result<ServerConfig, TlsError> {
    let roots = tls::load_roots(client_ca)?;
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .map_err(|e| TlsError::Config(format!("client CA {}: {e}", client_ca.display())))?;
    let mut config = ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(tls::load_certs(cert)?, tls::load_key(key)?)
        .map_err(|e| {
            TlsError::Config(format!("certificate {} and key {}: {e}", cert.display(), key.display()))
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A reloading server TLS configuration.
pub fn reloading_config(
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
) -> Result<Arc<Reloading<ServerConfig>>, TlsError> {
    let files = vec![cert.clone(), key.clone(), client_ca.clone()];
    Reloading::new(files, move || server_config(&cert, &key, &client_ca))
}

/// Accepts TCP connections and yields those that complete a mutual-TLS handshake.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<Reloading<ServerConfig>>,
    failures: Family<OutcomeLabels, Counter>,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut listener = listener;
        let mut backoff = Backoff::default();
        loop {
            let (tcp, peer) = accept_with_backoff(&mut listener, &mut backoff, "gRPC").await;
            // An answer is a few small HTTP/2 frames written one after another: with Nagle's
            // algorithm on, the last of them waits for the agent's delayed ACK (up to 40 ms).
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.get());
            if tx.is_closed() {
                return;
            }
            let (tx, failures) = (tx.clone(), failures.clone());
            tokio::spawn(async move {
                let outcome = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                        return;
                    }
                    Ok(Err(error)) => {
                        tracing::info!(%peer, %error, "TLS handshake refused");
                        "refused"
                    }
                    Err(_) => {
                        tracing::info!(%peer, "TLS handshake timed out");
                        "timed_out"
                    }
                };
                failures.get_or_create(&OutcomeLabels { outcome }).inc();
            });
        }
    });
    ReceiverStream::new(rx)
}
