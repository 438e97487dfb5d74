//! Hub TLS: server configuration requiring client certificates, and the gateway
//! identity taken from a verified certificate.

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
    /// The file holds no usable PEM item.
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

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.into(), source })
}

/// Reads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = read(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem { path: path.into(), what: format!("bad PEM: {e}") })?;
    if certs.is_empty() {
        return Err(TlsError::Pem { path: path.into(), what: "no CERTIFICATE found".into() });
    }
    Ok(certs)
}

/// Reads a private key, refusing one that others may read.
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
    let data = read(path)?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(|e| TlsError::Pem { path: path.into(), what: format!("bad PEM: {e}") })?
        .ok_or_else(|| TlsError::Pem { path: path.into(), what: "no PRIVATE KEY found".into() })
}

/// QUIC server configuration: TLS 1.3 only, client certificates required and verified
/// against `ca`, ALPN `voither-sync/1`; `stream_window` is the flow-control window of a
/// stream (the connection's is twice it).
pub fn server_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
    idle_timeout: Duration,
    stream_window: u64,
) -> Result<quinn::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).map_err(|e| TlsError::Pem { path: ca.into(), what: format!("unusable CA certificate: {e}") })?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Pem { path: ca.into(), what: format!("cannot verify clients with it: {e}") })?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)?;
    tls.alpn_protocols = vec![voither_proto::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Pem { path: cert.into(), what: format!("not usable for QUIC: {e}") })?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(idle_timeout.try_into().expect("idle timeout within QUIC's range")));
    transport.keep_alive_interval(Some(idle_timeout / 3));
    transport.max_concurrent_bidi_streams(4u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    let window = quinn::VarInt::from_u64(stream_window).unwrap_or(quinn::VarInt::MAX);
    transport.stream_receive_window(window);
    transport.receive_window(quinn::VarInt::from_u64(stream_window.saturating_mul(2)).unwrap_or(quinn::VarInt::MAX));
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// The gateway id in a verified client certificate: its first DNS subject alternative
/// name, or else its common name.
pub fn gateway_id(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::prelude::*;
    let (_, x) = X509Certificate::from_der(cert.as_ref()).ok()?;
    if let Ok(Some(san)) = x.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                return Some((*d).to_string());
            }
        }
    }
    let cn = x.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_string);
    cn
}

/// When the first certificate of a PEM file expires.
pub fn not_after(path: &Path) -> Option<std::time::SystemTime> {
    use x509_parser::prelude::*;
    let certs = load_certs(path).ok()?;
    let (_, x) = X509Certificate::from_der(certs.first()?.as_ref()).ok()?;
    let secs = u64::try_from(x.validity().not_after.timestamp()).ok()?;
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

/// A CA certificate of `auth.allowed_issuers`: its subject and public key.
#[derive(Debug, Clone)]
pub struct IssuerKey {
    subject: Vec<u8>,
    spki: Vec<u8>,
}

/// Every certificate of a PEM file as an [`IssuerKey`].
pub fn issuer_keys(path: &Path) -> Result<Vec<IssuerKey>, TlsError> {
    use x509_parser::prelude::*;
    load_certs(path)?
        .iter()
        .map(|c| {
            X509Certificate::from_der(c.as_ref())
                .map(|(_, x)| IssuerKey { subject: x.subject().as_raw().to_vec(), spki: x.public_key().raw.to_vec() })
                .map_err(|e| TlsError::Pem { path: path.into(), what: format!("unreadable certificate: {e}") })
        })
        .collect()
}

/// Did `issuer` sign `cert` (names match and the signature verifies with its key)?
pub fn issued_by(cert: &[u8], issuer: &IssuerKey) -> bool {
    use x509_parser::prelude::*;
    let Ok((_, x)) = X509Certificate::from_der(cert) else { return false };
    let Ok((_, spki)) = SubjectPublicKeyInfo::from_der(&issuer.spki) else { return false };
    x.issuer().as_raw() == issuer.subject.as_slice() && x.verify_signature(Some(&spki)).is_ok()
}
