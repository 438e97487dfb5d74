//! A small PKI for trying the product out: a CA, a hub certificate and gateway
//! certificates, written as PEM files with private keys readable by the owner only.
//!
//! Production fleets use their own CA; this is for labs, demos and tests.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

/// PKI generation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// rcgen failed.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A name is not usable.
    #[error("invalid name {0:?}: use letters, digits, '-', '_' and '.'")]
    Name(String),
}

fn write(path: &Path, data: &str, mode: u32) -> Result<(), PkiError> {
    let err = |source| PkiError::Write { path: path.into(), source };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    let mut f = opts.open(path).map_err(err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(err)?;
    }
    f.write_all(data.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)
}

fn check_name(n: &str) -> Result<(), PkiError> {
    if n.is_empty() || !n.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err(PkiError::Name(n.into()));
    }
    Ok(())
}

/// Files written by [`generate`].
#[derive(Debug, Clone)]
pub struct Written {
    /// All paths written.
    pub files: Vec<PathBuf>,
}

/// Writes `ca.pem`/`ca.key`, `hub.pem`/`hub.key` (names `hub_names`, plus 127.0.0.1 and
/// ::1) and `<gateway>.pem`/`<gateway>.key` for each gateway id into `dir`.
pub fn generate(
    dir: &Path,
    ca_name: &str,
    hub_names: &[String],
    gateways: &[String],
    days: u32,
) -> Result<Written, PkiError> {
    for n in hub_names.iter().chain(gateways) {
        check_name(n)?;
    }
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Write { path: dir.into(), source })?;
    let mut files = Vec::new();
    let now = time_now();
    let until = now + std::time::Duration::from_secs(u64::from(days) * 86_400);

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    ca.not_before = now.into();
    ca.not_after = until.into();
    let ca_cert = ca.self_signed(&ca_key)?;
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca, ca_key);
    let p = dir.join("ca.pem");
    write(&p, &ca_cert.pem(), 0o644)?;
    files.push(p);
    let p = dir.join("ca.key");
    write(&p, &ca_key_pem, 0o600)?;
    files.push(p);

    let mut leaf = |file: &str, names: Vec<String>, ips: bool, server: bool| -> Result<(), PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.clone())?;
        if ips {
            params.subject_alt_names.push(rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
            params.subject_alt_names.push(rcgen::SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()));
        }
        params.distinguished_name.push(DnType::CommonName, names[0].clone());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![if server { ExtendedKeyUsagePurpose::ServerAuth } else { ExtendedKeyUsagePurpose::ClientAuth }];
        params.not_before = now.into();
        params.not_after = until.into();
        let cert = params.signed_by(&key, &issuer)?;
        let p = dir.join(format!("{file}.pem"));
        write(&p, &cert.pem(), 0o644)?;
        files.push(p);
        let p = dir.join(format!("{file}.key"));
        write(&p, &key.serialize_pem(), 0o600)?;
        files.push(p);
        Ok(())
    };
    leaf("hub", hub_names.to_vec(), true, true)?;
    for g in gateways {
        leaf(g, vec![g.clone()], false, false)?;
    }
    Ok(Written { files })
}

/// Issues a certificate for gateway `id` with the CA in `dir` (`ca.pem`, `ca.key` from
/// [`generate`]), valid from `from` for `days` days; writes `<file>.pem` and
/// `<file>.key` (default file name: the id). For rotating a gateway's certificate, and
/// for tests of expired or not-yet-valid certificates.
pub fn issue(
    dir: &Path,
    id: &str,
    file: Option<&str>,
    from: std::time::SystemTime,
    days: u32,
) -> Result<Written, PkiError> {
    check_name(id)?;
    let file = file.unwrap_or(id);
    check_name(file)?;
    let read = |name: &str| {
        let p = dir.join(name);
        std::fs::read_to_string(&p).map_err(|source| PkiError::Write { path: p, source })
    };
    let ca_key = KeyPair::from_pem(&read("ca.key")?)?;
    let issuer = Issuer::from_ca_cert_pem(&read("ca.pem")?, ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![id.to_string()])?;
    params.distinguished_name.push(DnType::CommonName, id);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = from.into();
    params.not_after = (from + std::time::Duration::from_secs(u64::from(days) * 86_400)).into();
    let cert = params.signed_by(&key, &issuer)?;
    let mut files = Vec::new();
    // Key first, then the certificate: a gateway that reloads on change sees a matching
    // pair once the certificate lands.
    let p = dir.join(format!("{file}.key"));
    write(&p, &key.serialize_pem(), 0o600)?;
    files.push(p);
    let p = dir.join(format!("{file}.pem"));
    write(&p, &cert.pem(), 0o644)?;
    files.push(p);
    Ok(Written { files })
}

fn time_now() -> std::time::SystemTime {
    // Back-date by an hour so a device with a slightly slow clock accepts the certificates.
    std::time::SystemTime::now() - std::time::Duration::from_secs(3600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_keys_owner_only_and_ids_come_back_from_certs() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), "test CA", &["voither-hub".into()], &["gw-1".into()], 30).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("gw-1.key")).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let certs = crate::tls::load_certs(&dir.path().join("gw-1.pem")).unwrap();
        assert_eq!(crate::tls::gateway_id(&certs[0]).as_deref(), Some("gw-1"));
        issue(dir.path(), "gw-2", None, std::time::SystemTime::now(), 1).unwrap();
        let certs = crate::tls::load_certs(&dir.path().join("gw-2.pem")).unwrap();
        assert_eq!(crate::tls::gateway_id(&certs[0]).as_deref(), Some("gw-2"));
        assert!(generate(dir.path(), "x", &["hub".into()], &["../evil".into()], 1).is_err());
    }
}
