//! Workload manifests on the hub side: serving signed manifests and artifacts to
//! gateways, and the offline tools to make keys and sign manifests.
//!
//! The hub never needs the signing key and never checks a manifest's signature: the
//! gateway does, against keys pinned in its own config. A hub (or anyone between hub
//! and gateway) can withhold a manifest but cannot make a gateway run code that the
//! operator did not sign.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use base64::Engine;
use voither_proto::workload::{Manifest, SignedManifest, MAX_CHUNK};
use voither_proto::ArtifactChunk;

use crate::config::WorkloadsSection;

/// Lowercase hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Errors of the signing tools, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The input is not usable.
    #[error("{path}: {message}")]
    Bad {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ToolError + '_ {
    move |source| ToolError::Io { path: path.to_owned(), source }
}

fn bad(path: &Path, message: impl Into<String>) -> ToolError {
    ToolError::Bad { path: path.to_owned(), message: message.into() }
}

/// Writes `<out>.key` (PKCS#8, base64, mode 0600) and `<out>.pub` (base64 of the
/// 32-byte public key, what gateways pin in `workloads.trusted_keys`). Returns the
/// public key's base64.
pub fn keygen(out: &Path) -> Result<String, ToolError> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| bad(out, "key generation failed"))?;
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| bad(out, "bad key"))?;
    let public = base64::engine::general_purpose::STANDARD.encode(ring::signature::KeyPair::public_key(&pair));
    let key = out.with_extension("key");
    if key.exists() {
        return Err(bad(&key, "exists; not overwriting a signing key"));
    }
    {
        use std::io::Write;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&key).map_err(io(&key))?;
        f.write_all(base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref()).as_bytes()).map_err(io(&key))?;
        f.write_all(b"\n").map_err(io(&key))?;
    }
    let public_path = out.with_extension("pub");
    std::fs::write(&public_path, format!("{public}\n")).map_err(io(&public_path))?;
    Ok(public)
}

fn load_key(path: &Path) -> Result<ring::signature::Ed25519KeyPair, ToolError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let der = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| bad(path, format!("not a key made by `workloads keygen` (base64: {e})")))?;
    ring::signature::Ed25519KeyPair::from_pkcs8(&der).map_err(|e| bad(path, format!("not an Ed25519 PKCS#8 key: {e}")))
}

/// Reads a TOML manifest, fills in or checks each artifact's `sha256` and `size` from
/// the file of the same name in `artifacts` (when given), checks it, and signs it.
pub fn sign(manifest: &Path, key: &Path, artifacts: Option<&Path>) -> Result<SignedManifest, ToolError> {
    let text = std::fs::read_to_string(manifest).map_err(io(manifest))?;
    let mut m: Manifest = toml::from_str(&text).map_err(|e| bad(manifest, e.to_string()))?;
    if let Some(dir) = artifacts {
        for w in &mut m.workloads {
            for a in &mut w.artifacts {
                let p = dir.join(&a.name);
                let Ok(data) = std::fs::read(&p) else { continue };
                let (sum, size) = (sha256_hex(&data), data.len() as u64);
                if (!a.sha256.is_empty() && a.sha256 != sum) || (a.size != 0 && a.size != size) {
                    return Err(bad(
                        &p,
                        format!("workload {}: artifact {} differs from the manifest's sha256/size", w.name, a.name),
                    ));
                }
                a.sha256 = sum;
                a.size = size;
            }
        }
    }
    m.check().map_err(|e| bad(manifest, e.to_string()))?;
    let pair = load_key(key)?;
    let body = m.to_body();
    let mut signed = SignedManifest {
        body: body.into(),
        public_key: ring::signature::KeyPair::public_key(&pair).as_ref().to_vec().into(),
        signature: Vec::new().into(),
    };
    signed.signature = pair.sign(&signed.signed_message()).as_ref().to_vec().into();
    Ok(signed)
}

/// An artifact file and its mtime and length when it was hashed.
type Indexed = (PathBuf, Option<SystemTime>, u64);

/// Where manifests and artifacts are served from.
#[derive(Debug)]
pub struct Catalog {
    dir: Option<PathBuf>,
    groups: std::collections::BTreeMap<String, Vec<String>>,
    /// sha256 → the file, as it was when hashed.
    index: Mutex<HashMap<String, Indexed>>,
}

/// A manifest file as last read.
#[derive(Debug, Clone)]
pub struct Served {
    /// The envelope.
    pub signed: SignedManifest,
    /// Its manifest's version.
    pub version: u64,
    /// Which file.
    pub path: PathBuf,
}

impl Catalog {
    /// From the hub's `[workloads]`.
    pub fn new(cfg: &WorkloadsSection) -> Self {
        Self { dir: cfg.dir.clone(), groups: cfg.groups.clone(), index: Mutex::default() }
    }

    /// The manifest file for `gateway`: its own, its group's, or the default one.
    pub fn manifest_path(&self, gateway: &str) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?;
        let own = dir.join(format!("{gateway}.signed"));
        if own.is_file() {
            return Some(own);
        }
        for (g, members) in &self.groups {
            if members.iter().any(|m| m == gateway) {
                let p = dir.join(format!("{g}.signed"));
                if p.is_file() {
                    return Some(p);
                }
            }
        }
        let p = dir.join("default.signed");
        p.is_file().then_some(p)
    }

    /// The manifest to serve `gateway` now, if any; a file that does not decode is
    /// logged and skipped.
    pub fn manifest_for(&self, gateway: &str) -> Option<Served> {
        let path = self.manifest_path(gateway)?;
        let bytes = std::fs::read(&path).ok()?;
        let decoded = SignedManifest::from_bytes(&bytes).and_then(|s| s.manifest().map(|m| (s, m)));
        match decoded {
            Ok((signed, m)) => Some(Served { signed, version: m.version, path }),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "Manifest file is not a signed manifest; not served.");
                None
            }
        }
    }

    /// A chunk of the artifact with this hash (blocking: reads and may hash files).
    pub fn chunk(&self, sha256: &str, offset: u64, max_len: u32) -> ArtifactChunk {
        let missing =
            ArtifactChunk { sha256: sha256.to_owned(), offset, total: 0, found: false, data: Vec::new().into() };
        let Some(path) = self.find(sha256) else { return missing };
        let read = || -> std::io::Result<(u64, Vec<u8>)> {
            use std::io::{Read, Seek, SeekFrom};
            let mut f = std::fs::File::open(&path)?;
            let total = f.metadata()?.len();
            f.seek(SeekFrom::Start(offset.min(total)))?;
            let mut data = Vec::new();
            f.take(u64::from(max_len.min(MAX_CHUNK))).read_to_end(&mut data)?;
            Ok((total, data))
        };
        match read() {
            Ok((total, data)) => {
                ArtifactChunk { sha256: sha256.to_owned(), offset, total, found: true, data: data.into() }
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "Cannot read an artifact.");
                missing
            }
        }
    }

    /// The file with this content hash in `<dir>/artifacts/`, rescanning when unknown
    /// or changed since it was hashed.
    fn find(&self, sha256: &str) -> Option<PathBuf> {
        let stamp = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.modified().ok(), m.len()));
        {
            let idx = self.index.lock().expect("index lock");
            if let Some((p, t, len)) = idx.get(sha256) {
                if stamp(p) == Some((*t, *len)) {
                    return Some(p.clone());
                }
            }
        }
        let dir = self.dir.as_ref()?.join("artifacts");
        let mut idx = self.index.lock().expect("index lock");
        idx.retain(|_, (p, t, len)| stamp(p) == Some((*t, *len)));
        let known: Vec<PathBuf> = idx.values().map(|(p, _, _)| p.clone()).collect();
        for e in std::fs::read_dir(&dir).ok()?.flatten() {
            let p = e.path();
            if !p.is_file() || known.contains(&p) {
                continue;
            }
            let Some((t, len)) = stamp(&p) else { continue };
            if let Ok(data) = std::fs::read(&p) {
                idx.insert(sha256_hex(&data), (p, t, len));
            }
        }
        idx.get(sha256).map(|(p, _, _)| p.clone())
    }
}
