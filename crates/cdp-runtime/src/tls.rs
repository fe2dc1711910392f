//! TLS for both servers, with rustls: gRPC through tonic's own TLS (and
//! client certificates for mutual TLS), HTTP through a listener that
//! completes handshakes concurrently and hands axum finished streams.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cdp_config::TlsConfig;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::server::TlsStream;

/// A TLS file that cannot be read or used.
#[derive(Debug, thiserror::Error)]
#[error("TLS ({field}): {reason}")]
pub struct TlsError {
    pub field: &'static str,
    pub reason: String,
}

fn read(field: &'static str, path: &std::path::Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError {
        field,
        reason: format!("{}: {e}", path.display()),
    })
}

/// tonic's TLS settings for the gRPC server.
pub fn grpc(tls: &TlsConfig) -> Result<tonic::transport::ServerTlsConfig, TlsError> {
    let identity = tonic::transport::Identity::from_pem(
        read("server.tls.cert", &tls.cert)?,
        read("server.tls.key", &tls.key)?,
    );
    // A handshake trickled byte by byte must not hold a connection long.
    let mut config = tonic::transport::ServerTlsConfig::new()
        .identity(identity)
        .timeout(HANDSHAKE);
    if let Some(ca) = &tls.client_ca {
        config = config.client_ca_root(tonic::transport::Certificate::from_pem(read(
            "server.tls.client_ca",
            ca,
        )?));
    }
    Ok(config)
}

fn server_config(tls: &TlsConfig) -> Result<rustls::ServerConfig, TlsError> {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&read("http.tls.cert", &tls.cert)?)
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError {
                field: "http.tls.cert",
                reason: e.to_string(),
            })?;
    if certs.is_empty() {
        return Err(TlsError {
            field: "http.tls.cert",
            reason: format!("{} holds no certificate", tls.cert.display()),
        });
    }
    let key =
        PrivateKeyDer::from_pem_slice(&read("http.tls.key", &tls.key)?).map_err(|e| TlsError {
            field: "http.tls.key",
            reason: e.to_string(),
        })?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| TlsError {
        field: "http.tls",
        reason: e.to_string(),
    })?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| TlsError {
        field: "http.tls.key",
        reason: e.to_string(),
    })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Longest a client may take to finish its handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// An HTTPS listener for `axum::serve`: accepts TCP connections and runs
/// each handshake in its own task, so a slow client holds up nobody.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<crate::limits::Guarded<TcpStream>>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    pub fn new(listener: crate::limits::Acceptor, tls: &TlsConfig) -> Result<Self, TlsError> {
        use axum::serve::Listener as _;
        let acceptor = TlsAcceptor::from(Arc::new(server_config(tls)?));
        let local = listener.local_addr().map_err(|e| TlsError {
            field: "http.addr",
            reason: e.to_string(),
        })?;
        let (tx, ready) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                // At most limits.max_connections, each guarded; stops when
                // the server does.
                let (tcp, peer) = tokio::select! {
                    _ = tx.closed() => break,
                    c = crate::limits::Acceptor::accept(&listener) => c,
                };
                if tx.is_closed() {
                    break;
                }
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(Err(error)) => tracing::debug!(%error, %peer, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { ready, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<crate::limits::Guarded<TcpStream>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept task only ends when this listener is gone.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
