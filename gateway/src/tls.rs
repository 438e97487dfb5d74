//! Loading the gateway's TLS material and building the QUIC client configuration.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// TLS material that could not be loaded; the message names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file holds no usable PEM item of the kind needed.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is missing or wrong.
        what: String,
    },
    /// The private key may be read by group or others.
    #[error("private key {path} is readable by group or others (mode {mode:o}); run: chmod 600 {path}")]
    KeyPermissions {
        /// The file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = std::fs::read(path).map_err(|source| TlsError::Read { path: path.into(), source })?;
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut data.as_slice()).collect();
    let certs = certs.map_err(|e| TlsError::Pem { path: path.into(), what: format!("bad PEM: {e}") })?;
    if certs.is_empty() {
        return Err(TlsError::Pem { path: path.into(), what: "no CERTIFICATE found".into() });
    }
    Ok(certs)
}

/// Reads the private key of a PEM file, refusing keys others may read.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|source| TlsError::Read { path: path.into(), source })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(TlsError::KeyPermissions { path: path.into(), mode });
        }
    }
    let data = std::fs::read(path).map_err(|source| TlsError::Read { path: path.into(), source })?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(|e| TlsError::Pem { path: path.into(), what: format!("bad PEM: {e}") })?
        .ok_or_else(|| TlsError::Pem { path: path.into(), what: "no PRIVATE KEY found".into() })
}

/// The QUIC client configuration: TLS 1.3 only, the hub's CA pinned, the gateway's
/// certificate presented, ALPN `voither-sync/1`, keep-alive and idle timeout set.
pub fn client_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
    keep_alive: Duration,
    idle_timeout: Duration,
) -> Result<quinn::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).map_err(|e| TlsError::Pem { path: ca.into(), what: format!("unusable CA certificate: {e}") })?;
    }
    let chain = load_certs(cert)?;
    let key = load_key(key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    tls.alpn_protocols = vec![voither_proto::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Pem { path: cert.into(), what: format!("not usable for QUIC: {e}") })?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(keep_alive));
    transport.max_idle_timeout(Some(idle_timeout.try_into().expect("idle timeout within QUIC's range")));
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// When the first certificate of a PEM file expires.
pub fn not_after(path: &Path) -> Option<std::time::SystemTime> {
    use x509_parser::prelude::*;
    let certs = load_certs(path).ok()?;
    let (_, x) = X509Certificate::from_der(certs.first()?.as_ref()).ok()?;
    let secs = u64::try_from(x.validity().not_after.timestamp()).ok()?;
    Some(std::time::UNIX_EPOCH + Duration::from_secs(secs))
}

/// Size and modification time of the TLS files, to notice when they change.
pub fn stamps(files: &[&Path]) -> Vec<Option<(Option<std::time::SystemTime>, u64)>> {
    files.iter().map(|p| std::fs::metadata(p).ok().map(|m| (m.modified().ok(), m.len()))).collect()
}
