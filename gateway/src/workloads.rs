//! Signed workloads: verified, cached on disk, and run with or without a hub.
//!
//! A manifest ([`voither_proto::workload::Manifest`]) arrives from the hub in a
//! [`SignedManifest`]. Before anything is cached or run, [`Workloads::verify`] checks:
//!
//! 1. the signer's public key is one of `workloads.trusted_keys` (pinned in the config);
//! 2. the Ed25519 signature over `SIGNING_CONTEXT || body` is valid;
//! 3. the body decodes and passes [`Manifest::check`];
//! 4. its version is above the one in use (no rollback, no replay).
//!
//! Then the artifacts not yet cached are fetched over the sync connection
//! ([`Download`]): written to a temporary file, checked against size and SHA-256, made
//! durable and renamed to `artifacts/<sha256>`. Only when every artifact is in place is
//! the envelope written (atomically) as `manifest.signed` and the runtime reconciled.
//! Any refusal is logged with its reason, counted in
//! `voither_gateway_manifest_refusals_total{reason}`, and changes nothing.
//!
//! At start, the cached envelope is verified again with the same keys and its workloads
//! are started before and without any hub.
//!
//! Layout of `<data_dir>/workloads/`: `manifest.signed`, `artifacts/<sha256>`,
//! `run/<workload>/` (a copy of the workload's artifacts under their names; its default
//! working directory).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tracing::{info, warn};
use voither_proto::workload::{Artifact, Manifest, ManifestError, SignedManifest, WorkloadSpec, WorkloadState};

use crate::config::{Config, WorkloadRuntime};
use crate::metrics::Metrics;
use crate::supervisor::Supervisor;

/// Why a manifest was refused. Nothing on the device changes.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// `workloads.trusted_keys` is empty.
    #[error("no trusted keys configured (workloads.trusted_keys): manifests are refused")]
    NoKeys,
    /// Signed with a key that is not pinned.
    #[error("signed with a key that is not in workloads.trusted_keys")]
    UnknownKey,
    /// The signature does not verify.
    #[error("signature does not verify (tampered or wrongly signed)")]
    BadSignature,
    /// The body is not a usable manifest.
    #[error("{0}")]
    Invalid(#[from] ManifestError),
    /// Not newer than the manifest in use.
    #[error("version {got} is not above the version in use ({have}): rollback refused")]
    Rollback {
        /// In use.
        have: u64,
        /// Offered.
        got: u64,
    },
    /// An artifact's content does not match the manifest.
    #[error("artifact {name}: {problem}")]
    Artifact {
        /// Artifact name.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// Writing the cache failed.
    #[error("cannot write the workload cache {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl Refusal {
    /// Label of `voither_gateway_manifest_refusals_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NoKeys => "no_keys",
            Refusal::UnknownKey => "unknown_key",
            Refusal::BadSignature => "bad_signature",
            Refusal::Invalid(_) => "invalid",
            Refusal::Rollback { .. } => "rollback",
            Refusal::Artifact { .. } => "artifact",
            Refusal::Io { .. } => "io",
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Refusal + '_ {
    move |source| Refusal::Io { path: path.to_owned(), source }
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The runtime workloads go to.
#[derive(Debug)]
enum Runtime {
    Process(Supervisor),
    StaticPod(crate::static_pod::StaticPods),
}

/// The manifest in use, the cache, and the runtime.
#[derive(Debug)]
pub struct Workloads {
    dir: PathBuf,
    keys: Vec<[u8; 32]>,
    current: Mutex<Option<Manifest>>,
    runtime: Runtime,
    metrics: Arc<Metrics>,
}

impl Workloads {
    /// Sets up the cache folder and the runtime; nothing runs until
    /// [`Workloads::start_cached`].
    pub fn new(cfg: &Config, metrics: Arc<Metrics>, supervisor: Supervisor) -> std::io::Result<Self> {
        let dir = cfg.gateway.data_dir.join("workloads");
        std::fs::create_dir_all(dir.join("artifacts"))?;
        std::fs::create_dir_all(dir.join("run"))?;
        let runtime = match cfg.workloads.runtime {
            WorkloadRuntime::Process => Runtime::Process(supervisor),
            WorkloadRuntime::StaticPod => {
                Runtime::StaticPod(crate::static_pod::StaticPods::new(cfg.workloads.static_pod_dir.clone()))
            }
        };
        Ok(Self { dir, keys: cfg.workloads.keys(), current: Mutex::new(None), runtime, metrics })
    }

    /// The cached envelope's path.
    pub fn manifest_path(&self) -> PathBuf {
        self.dir.join("manifest.signed")
    }

    /// Version of the manifest in use (0: none).
    pub fn version(&self) -> u64 {
        self.current.lock().expect("workloads lock").as_ref().map_or(0, |m| m.version)
    }

    /// Starts the cached manifest's workloads, if there is a cached manifest that still
    /// verifies with the configured keys. Needs no hub.
    pub async fn start_cached(&self) {
        let path = self.manifest_path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "Cannot read the cached workload manifest; running no workloads until a hub sends one.");
                return;
            }
        };
        let signed = match SignedManifest::from_bytes(&bytes) {
            Ok(s) => s,
            Err(e) => {
                self.refused(&Refusal::Invalid(e), "cache");
                return;
            }
        };
        let manifest = match self.verify_signature(&signed).and_then(|()| Ok(signed.manifest()?)) {
            Ok(m) => m,
            Err(r) => {
                self.refused(&r, "cache");
                return;
            }
        };
        info!(version = manifest.version, workloads = manifest.workloads.len(), "Starting cached workloads.");
        self.metrics.manifest_version.set(manifest.version as i64);
        *self.current.lock().expect("workloads lock") = Some(manifest.clone());
        self.reconcile(&manifest).await;
    }

    fn verify_signature(&self, s: &SignedManifest) -> Result<(), Refusal> {
        if self.keys.is_empty() {
            return Err(Refusal::NoKeys);
        }
        let key = self.keys.iter().find(|k| k[..] == s.public_key[..]).ok_or(Refusal::UnknownKey)?;
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
            .verify(&s.signed_message(), &s.signature)
            .map_err(|_| Refusal::BadSignature)
    }

    /// Checks key, signature, content and version of a manifest a hub sent.
    pub fn verify(&self, s: &SignedManifest) -> Result<Manifest, Refusal> {
        self.verify_signature(s)?;
        let m = s.manifest()?;
        let have = self.version();
        if m.version <= have {
            return Err(Refusal::Rollback { have, got: m.version });
        }
        Ok(m)
    }

    /// Logs and counts a refusal; `from` says where the manifest came from.
    pub fn refused(&self, r: &Refusal, from: &str) {
        self.metrics.manifest_refusals.get_or_create(&crate::metrics::ReasonLabel { reason: r.reason().into() }).inc();
        warn!(from, reason = r.reason(), problem = %r, version_in_use = self.version(), "Workload manifest refused; the running workloads stay as they are.");
    }

    fn artifact_path(&self, sha256: &str) -> PathBuf {
        self.dir.join("artifacts").join(sha256)
    }

    /// Artifacts of `m` that are not in the cache, once each.
    pub fn missing(&self, m: &Manifest) -> Vec<Artifact> {
        let mut out: Vec<Artifact> = Vec::new();
        for a in m.workloads.iter().flat_map(|w| &w.artifacts) {
            let have = std::fs::metadata(self.artifact_path(&a.sha256)).is_ok_and(|md| md.len() == a.size);
            if !have && !out.iter().any(|o| o.sha256 == a.sha256) {
                out.push(a.clone());
            }
        }
        out
    }

    /// Starts receiving an artifact.
    pub fn download(&self, a: &Artifact) -> Result<Download, Refusal> {
        let tmp = self.dir.join("artifacts").join(format!(".{}.part", a.sha256));
        let file = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        Ok(Download {
            artifact: a.clone(),
            file,
            tmp,
            dest: self.artifact_path(&a.sha256),
            hash: ring::digest::Context::new(&ring::digest::SHA256),
            written: 0,
        })
    }

    /// Makes `signed` (verified as `m`, its artifacts cached) the manifest in use:
    /// writes it atomically and reconciles the runtime.
    pub async fn install(&self, signed: &SignedManifest, m: Manifest) -> Result<(), Refusal> {
        if let Some(a) = self.missing(&m).first() {
            return Err(Refusal::Artifact { name: a.name.clone(), problem: "not in the cache".into() });
        }
        let path = self.manifest_path();
        write_atomic(&path, &signed.to_bytes()).map_err(io_err(&path))?;
        info!(version = m.version, workloads = m.workloads.len(), "New workload manifest accepted.");
        self.metrics.manifest_version.set(m.version as i64);
        *self.current.lock().expect("workloads lock") = Some(m.clone());
        self.reconcile(&m).await;
        Ok(())
    }

    /// Copies each workload's artifacts into its run folder and hands the specs to the
    /// runtime, which starts what is new, stops what is gone and restarts what changed.
    async fn reconcile(&self, m: &Manifest) {
        let mut ready: Vec<(WorkloadSpec, PathBuf)> = Vec::new();
        for w in &m.workloads {
            match self.materialize(w) {
                Ok(dir) => ready.push((w.clone(), dir)),
                Err(e) => warn!(workload = %w.name, error = %e, "Workload not started: its artifacts are not usable."),
            }
        }
        match &self.runtime {
            Runtime::Process(s) => s.reconcile(ready).await,
            Runtime::StaticPod(p) => {
                if let Err(e) = p.reconcile(&ready) {
                    warn!(error = %e, "Cannot write the static pod manifests.");
                }
            }
        }
    }

    /// `run/<name>/` with the artifacts under their names; re-copied when changed.
    fn materialize(&self, w: &WorkloadSpec) -> Result<PathBuf, String> {
        let dir = self.dir.join("run").join(&w.name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for a in &w.artifacts {
            let src = self.artifact_path(&a.sha256);
            let data = std::fs::read(&src).map_err(|e| format!("{}: {e}", src.display()))?;
            if data.len() as u64 != a.size || sha256_hex(&data) != a.sha256 {
                // Damaged in the cache: remove it so the next hub session fetches it again.
                let _ = std::fs::remove_file(&src);
                return Err(format!("cached artifact {} does not match its hash; removed", a.name));
            }
            let dest = dir.join(&a.name);
            let same = std::fs::read(&dest).is_ok_and(|d| d == data);
            if !same {
                let tmp = dir.join(format!(".{}.tmp", a.name));
                std::fs::write(&tmp, &data).map_err(|e| format!("{}: {e}", tmp.display()))?;
                std::fs::rename(&tmp, &dest).map_err(|e| format!("{}: {e}", dest.display()))?;
            }
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = if a.executable { 0o755 } else { 0o644 };
                std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode))
                    .map_err(|e| format!("{}: {e}", dest.display()))?;
            }
        }
        Ok(dir)
    }

    /// State of every workload, for `/status` and the hub.
    pub fn states(&self) -> Vec<WorkloadState> {
        match &self.runtime {
            Runtime::Process(s) => s.states(),
            Runtime::StaticPod(p) => p.states(),
        }
    }

    /// Stops every workload (gateway shutdown). Static pods stay with the kubelet.
    pub async fn shutdown(&self) {
        if let Runtime::Process(s) = &self.runtime {
            s.stop_all().await;
        }
    }
}

/// An artifact being received, chunk by chunk, in order.
pub struct Download {
    /// What is being fetched.
    pub artifact: Artifact,
    file: std::fs::File,
    tmp: PathBuf,
    dest: PathBuf,
    hash: ring::digest::Context,
    /// Bytes received so far.
    pub written: u64,
}

impl std::fmt::Debug for Download {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Download").field("artifact", &self.artifact).field("written", &self.written).finish()
    }
}

impl Download {
    /// Appends a chunk received at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), Refusal> {
        let bad = |problem: String| Refusal::Artifact { name: self.artifact.name.clone(), problem };
        if offset != self.written {
            return Err(bad(format!("chunk at offset {offset}, expected {}", self.written)));
        }
        if self.written + data.len() as u64 > self.artifact.size {
            return Err(bad(format!("hub sends more than the manifest's size of {} bytes", self.artifact.size)));
        }
        self.file.write_all(data).map_err(io_err(&self.tmp))?;
        self.hash.update(data);
        self.written += data.len() as u64;
        Ok(())
    }

    /// True when every byte arrived.
    pub fn complete(&self) -> bool {
        self.written == self.artifact.size
    }

    /// Checks the hash, makes the file durable and moves it into the cache.
    pub fn finish(self) -> Result<(), Refusal> {
        let got = hex(self.hash.finish().as_ref());
        if got != self.artifact.sha256 {
            let _ = std::fs::remove_file(&self.tmp);
            return Err(Refusal::Artifact {
                name: self.artifact.name.clone(),
                problem: format!("sha256 is {got}, the manifest says {}", self.artifact.sha256),
            });
        }
        self.file.sync_all().map_err(io_err(&self.tmp))?;
        std::fs::rename(&self.tmp, &self.dest).map_err(io_err(&self.dest))?;
        sync_dir(self.dest.parent());
        Ok(())
    }

    /// Drops a partial download.
    pub fn abandon(self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

fn sync_dir(dir: Option<&Path>) {
    if let Some(d) = dir.and_then(|d| std::fs::File::open(d).ok()) {
        let _ = d.sync_all();
    }
}

/// Temporary file, fsync, rename, fsync of the folder.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    sync_dir(path.parent());
    Ok(())
}
