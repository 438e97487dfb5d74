//! A bare QUIC client for tests that must misbehave: no certificate, a foreign
//! certificate, malformed or oversized frames.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

fn certs(path: &Path) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    let data = std::fs::read(path).expect("cert file");
    rustls_pemfile::certs(&mut data.as_slice()).collect::<Result<_, _>>().expect("PEM")
}

/// A client endpoint trusting `ca`, presenting `client` (certificate, key) if given.
pub fn endpoint(ca: &Path, client: Option<(&Path, &Path)>) -> quinn::Endpoint {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca) {
        roots.add(c).expect("CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots);
    let mut tls = match client {
        Some((cert, key)) => {
            let data = std::fs::read(key).expect("key file");
            let key = rustls_pemfile::private_key(&mut data.as_slice()).expect("PEM").expect("a key");
            builder.with_client_auth_cert(certs(cert), key).expect("client cert")
        }
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![voither_proto::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS");
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    ep
}

/// Connects, opens the sync stream, writes `bytes`, and reads until the hub ends the
/// stream or the connection. Returns what was read, and the error that ended it.
pub async fn exchange(ep: &quinn::Endpoint, hub: SocketAddr, bytes: &[u8]) -> (Vec<u8>, Option<String>) {
    let conn = match ep.connect(hub, "voither-hub") {
        Ok(c) => match c.await {
            Ok(c) => c,
            Err(e) => return (Vec::new(), Some(e.to_string())),
        },
        Err(e) => return (Vec::new(), Some(e.to_string())),
    };
    let why = |e: String| Some(conn.close_reason().map_or(e, |r| r.to_string()));
    let (mut send, mut recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => return (Vec::new(), why(e.to_string())),
    };
    if let Err(e) = send.write_all(bytes).await {
        return (Vec::new(), why(e.to_string()));
    }
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match recv.read(&mut buf).await {
            Ok(Some(n)) => got.extend_from_slice(&buf[..n]),
            Ok(None) => return (got, conn.close_reason().map(|r| r.to_string())),
            Err(e) => return (got, why(e.to_string())),
        }
    }
}

/// The frames in `bytes`.
pub fn frames(bytes: &[u8]) -> Vec<voither_proto::Frame> {
    let mut d = voither_proto::FrameDecoder::default();
    d.push(bytes);
    let mut v = Vec::new();
    while let Ok(Some(f)) = d.next_frame() {
        v.push(f);
    }
    v
}

/// A bare QUIC server with the hub's certificate from a lab PKI folder, for tests that
/// need a hub that misbehaves. Client certificates are not asked for.
pub fn server(pki: &Path) -> quinn::Endpoint {
    let chain = certs(&pki.join("hub.pem"));
    let data = std::fs::read(pki.join("hub.key")).expect("key file");
    let key = rustls_pemfile::private_key(&mut data.as_slice()).expect("PEM").expect("a key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server cert");
    tls.alpn_protocols = vec![voither_proto::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).expect("QUIC TLS");
    let cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().expect("addr")).expect("endpoint")
}
