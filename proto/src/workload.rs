//! Workload manifests: what a gateway runs, and the signed envelope it travels in.
//!
//! An operator writes a manifest as TOML, signs it offline (`voither-hub workloads
//! sign`), and the hub hands the signed envelope to gateways. The signature covers the
//! manifest's CBOR encoding exactly as carried in [`SignedManifest::body`], prefixed
//! with [`SIGNING_CONTEXT`], so a signature for anything else never verifies as a
//! manifest. This crate holds the types and the checks that need no cryptography; the
//! gateway verifies the Ed25519 signature and the hub makes it.

use std::collections::BTreeMap;

use minicbor::bytes::ByteVec;
use minicbor::{Decode, Encode};
use serde::{Deserialize, Serialize};

/// Prefix of the signed message: `SIGNING_CONTEXT || body`.
pub const SIGNING_CONTEXT: &[u8] = b"voither-workload-manifest/1\0";

/// Largest encoded manifest accepted (the envelope travels in one frame).
pub const MAX_MANIFEST_LEN: usize = 256 * 1024;

/// Most workloads in one manifest.
pub const MAX_WORKLOADS: usize = 64;

/// A manifest with its signature, as the hub sends it and the gateway caches it.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct SignedManifest {
    /// CBOR of a [`Manifest`]: the signed bytes (after [`SIGNING_CONTEXT`]).
    #[n(0)]
    pub body: ByteVec,
    /// The signer's Ed25519 public key (32 bytes), so the gateway can pick the pinned
    /// key to verify with; trust comes only from the gateway's own list.
    #[n(1)]
    pub public_key: ByteVec,
    /// Ed25519 signature (64 bytes) over `SIGNING_CONTEXT || body`.
    #[n(2)]
    pub signature: ByteVec,
}

impl SignedManifest {
    /// The message the signature covers.
    pub fn signed_message(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(SIGNING_CONTEXT.len() + self.body.len());
        m.extend_from_slice(SIGNING_CONTEXT);
        m.extend_from_slice(&self.body);
        m
    }

    /// Decodes the manifest from the body and checks it (see [`Manifest::check`]).
    /// Says nothing about the signature.
    pub fn manifest(&self) -> Result<Manifest, ManifestError> {
        if self.body.len() > MAX_MANIFEST_LEN {
            return Err(ManifestError::TooLarge(self.body.len()));
        }
        let m: Manifest = minicbor::decode(&self.body).map_err(|e| ManifestError::Decode(e.to_string()))?;
        m.check()?;
        Ok(m)
    }

    /// CBOR encoding, as cached on disk.
    pub fn to_bytes(&self) -> Vec<u8> {
        minicbor::to_vec(self).expect("encoding to a Vec cannot fail")
    }

    /// Decodes a cached envelope.
    pub fn from_bytes(b: &[u8]) -> Result<Self, ManifestError> {
        if b.len() > MAX_MANIFEST_LEN + 1024 {
            return Err(ManifestError::TooLarge(b.len()));
        }
        minicbor::decode(b).map_err(|e| ManifestError::Decode(e.to_string()))
    }
}

/// A versioned list of workloads.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Increases with every release; a gateway refuses a version not above its own.
    #[n(0)]
    pub version: u64,
    /// The workloads.
    #[n(1)]
    #[serde(default)]
    pub workloads: Vec<WorkloadSpec>,
}

/// One workload.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Unique name: letters, digits, `-` and `_`, at most 63 characters.
    #[n(0)]
    pub name: String,
    /// Program: an artifact's name (run from the workload's folder) or an absolute path.
    #[n(1)]
    pub command: String,
    /// Arguments.
    #[n(2)]
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment (added to a minimal one: `PATH`, `HOME`, `VOITHER_WORKLOAD`).
    #[n(3)]
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory; default: the workload's folder holding its artifacts.
    #[n(4)]
    #[serde(default)]
    pub working_dir: Option<String>,
    /// When to restart.
    #[n(5)]
    #[serde(default)]
    pub restart: RestartPolicy,
    /// First restart delay, milliseconds; doubles per consecutive failure.
    #[n(6)]
    #[serde(default = "default_backoff_min")]
    pub backoff_min_ms: u64,
    /// Longest restart delay, milliseconds.
    #[n(7)]
    #[serde(default = "default_backoff_max")]
    pub backoff_max_ms: u64,
    /// Files the workload needs, fetched from the hub and verified.
    #[n(8)]
    #[serde(default)]
    pub artifacts: Vec<Artifact>,
    /// Optional health probe.
    #[n(9)]
    #[serde(default)]
    pub health: Option<HealthProbe>,
    /// Container image, for the static-pod runtime (k3s nodes); the process runtime
    /// ignores it.
    #[n(10)]
    #[serde(default)]
    pub image: Option<String>,
}

const fn default_backoff_min() -> u64 {
    1_000
}
const fn default_backoff_max() -> u64 {
    60_000
}

/// When a workload that exited is started again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// After every exit.
    #[n(0)]
    #[default]
    Always,
    /// After an exit with a non-zero status or a signal.
    #[n(1)]
    OnFailure,
    /// Never.
    #[n(2)]
    Never,
}

impl RestartPolicy {
    /// The name used in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Never => "never",
        }
    }
}

/// A file a workload needs.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// File name inside the workload's folder (no `/`, not `.` or `..`).
    #[n(0)]
    pub name: String,
    /// SHA-256 of the content, lowercase hex (`workloads sign --artifacts` fills it in).
    #[n(1)]
    #[serde(default)]
    pub sha256: String,
    /// Size in bytes (`workloads sign --artifacts` fills it in).
    #[n(2)]
    #[serde(default)]
    pub size: u64,
    /// Mark the file executable.
    #[n(3)]
    #[serde(default)]
    pub executable: bool,
}

/// A health probe: an HTTP GET on loopback that must answer 2xx.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthProbe {
    /// Port on 127.0.0.1.
    #[n(0)]
    pub http_port: u16,
    /// Path, starting with `/`.
    #[n(1)]
    #[serde(default = "default_health_path")]
    pub http_path: String,
    /// Probe interval, milliseconds.
    #[n(2)]
    #[serde(default = "default_health_interval")]
    pub interval_ms: u64,
    /// Restart after this many failed probes in a row.
    #[n(3)]
    #[serde(default = "default_health_failures")]
    pub failures: u32,
}

fn default_health_path() -> String {
    "/healthz".into()
}
const fn default_health_interval() -> u64 {
    10_000
}
const fn default_health_failures() -> u32 {
    3
}

/// Why a manifest is unusable (before any signature check).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Larger than [`MAX_MANIFEST_LEN`].
    #[error("manifest is {0} bytes, more than the limit")]
    TooLarge(usize),
    /// Not a manifest encoding.
    #[error("manifest does not decode: {0}")]
    Decode(String),
    /// A field is out of range.
    #[error("workload {workload:?}: {problem}")]
    Invalid {
        /// The workload (empty for the manifest itself).
        workload: String,
        /// What is wrong.
        problem: String,
    },
}

fn invalid(workload: &str, problem: impl Into<String>) -> ManifestError {
    ManifestError::Invalid { workload: workload.into(), problem: problem.into() }
}

/// A name usable as a file name and a label: `[A-Za-z0-9_-]{1,63}`.
pub fn valid_name(n: &str) -> bool {
    !n.is_empty() && n.len() <= 63 && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn valid_file_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 255
        && n != "."
        && n != ".."
        && !n.contains('/')
        && !n.contains('\0')
        && !n.starts_with(".voither")
}

impl Manifest {
    /// Checks names, artifacts and bounds.
    pub fn check(&self) -> Result<(), ManifestError> {
        if self.version == 0 {
            return Err(invalid("", "version must be at least 1"));
        }
        if self.workloads.len() > MAX_WORKLOADS {
            return Err(invalid("", format!("{} workloads, at most {MAX_WORKLOADS}", self.workloads.len())));
        }
        let mut names = std::collections::BTreeSet::new();
        for w in &self.workloads {
            if !valid_name(&w.name) {
                return Err(invalid(&w.name, "name must be 1 to 63 of A-Z a-z 0-9 - _"));
            }
            if !names.insert(w.name.as_str()) {
                return Err(invalid(&w.name, "name used twice"));
            }
            if w.command.is_empty() {
                return Err(invalid(&w.name, "command is empty"));
            }
            if !w.command.starts_with('/') && !w.artifacts.iter().any(|a| a.name == w.command) {
                return Err(invalid(&w.name, "command must be an absolute path or the name of one of its artifacts"));
            }
            if w.backoff_min_ms == 0 || w.backoff_min_ms > w.backoff_max_ms {
                return Err(invalid(&w.name, "backoff_min_ms must be at least 1 and at most backoff_max_ms"));
            }
            if let Some(d) = &w.working_dir {
                if !d.starts_with('/') {
                    return Err(invalid(&w.name, "working_dir must be an absolute path"));
                }
            }
            for k in w.env.keys() {
                if k.is_empty() || k.contains('=') || k.contains('\0') {
                    return Err(invalid(&w.name, format!("environment variable name {k:?}")));
                }
            }
            let mut files = std::collections::BTreeSet::new();
            for a in &w.artifacts {
                if !valid_file_name(&a.name) {
                    return Err(invalid(&w.name, format!("artifact name {:?} is not a plain file name", a.name)));
                }
                if !files.insert(a.name.as_str()) {
                    return Err(invalid(&w.name, format!("artifact {:?} listed twice", a.name)));
                }
                if a.sha256.len() != 64 || !a.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                    return Err(invalid(
                        &w.name,
                        format!("artifact {:?}: sha256 must be 64 lowercase hex digits (sign with --artifacts DIR to fill it in)", a.name),
                    ));
                }
            }
            if let Some(h) = &w.health {
                if h.http_port == 0 || !h.http_path.starts_with('/') || h.interval_ms < 100 || h.failures == 0 {
                    return Err(invalid(
                        &w.name,
                        "health needs http_port > 0, http_path starting with /, interval_ms >= 100, failures >= 1",
                    ));
                }
            }
        }
        Ok(())
    }

    /// CBOR encoding: the bytes that get signed.
    pub fn to_body(&self) -> Vec<u8> {
        minicbor::to_vec(self).expect("encoding to a Vec cannot fail")
    }
}

/// A workload's state in a gateway's [`crate::Status`].
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct WorkloadState {
    /// Workload name.
    #[n(0)]
    pub name: String,
    /// `running`, `backoff`, `exited`, `stopped` or `failed`.
    #[n(1)]
    pub state: String,
    /// Restarts since the gateway started.
    #[n(2)]
    pub restarts: u64,
    /// Last exit, e.g. `exit 1` or `signal 9`.
    #[n(3)]
    pub last_exit: Option<String>,
    /// Process id while running (process runtime).
    #[n(4)]
    pub pid: Option<u32>,
}

/// Hub → gateway: a piece of an artifact the gateway asked for.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ArtifactChunk {
    /// SHA-256 of the whole artifact, lowercase hex.
    #[n(0)]
    pub sha256: String,
    /// Offset of `data` in the artifact.
    #[n(1)]
    pub offset: u64,
    /// Size of the whole artifact; 0 with `found == false`.
    #[n(2)]
    pub total: u64,
    /// False when the hub does not have it.
    #[n(3)]
    pub found: bool,
    /// The bytes.
    #[n(4)]
    pub data: ByteVec,
}

/// Gateway → hub: send a piece of an artifact.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct FetchArtifact {
    /// SHA-256 of the artifact, lowercase hex.
    #[n(0)]
    pub sha256: String,
    /// From this offset.
    #[n(1)]
    pub offset: u64,
    /// At most this many bytes.
    #[n(2)]
    pub max_len: u32,
}

/// Largest artifact chunk.
pub const MAX_CHUNK: u32 = 256 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> WorkloadSpec {
        WorkloadSpec {
            name: name.into(),
            command: "/bin/sh".into(),
            args: vec![],
            env: BTreeMap::new(),
            working_dir: None,
            restart: RestartPolicy::Always,
            backoff_min_ms: 100,
            backoff_max_ms: 1000,
            artifacts: vec![],
            health: None,
            image: None,
        }
    }

    #[test]
    fn manifests_round_trip_and_checks_name_the_workload() {
        let m = Manifest { version: 3, workloads: vec![spec("a"), spec("b")] };
        m.check().unwrap();
        let signed =
            SignedManifest { body: m.to_body().into(), public_key: vec![0; 32].into(), signature: vec![0; 64].into() };
        let back = SignedManifest::from_bytes(&signed.to_bytes()).unwrap();
        assert_eq!(back.manifest().unwrap(), m);
        assert!(back.signed_message().starts_with(SIGNING_CONTEXT));

        let dup = Manifest { version: 1, workloads: vec![spec("a"), spec("a")] };
        assert_eq!(dup.check().unwrap_err().to_string(), "workload \"a\": name used twice");
        let mut bad = spec("x");
        bad.command = "run.sh".into();
        let e = Manifest { version: 1, workloads: vec![bad] }.check().unwrap_err();
        assert!(e.to_string().contains("absolute path or the name of one of its artifacts"), "{e}");
        let mut bad = spec("y");
        bad.artifacts.push(Artifact { name: "../etc".into(), sha256: "0".repeat(64), size: 1, executable: false });
        assert!(Manifest { version: 1, workloads: vec![bad] }.check().is_err());
        assert!(Manifest { version: 0, workloads: vec![] }.check().is_err());
        assert!(!valid_name("a/b") && !valid_name("") && valid_name("modbus-adapter_2"));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(SignedManifest::from_bytes(b"\xff\x00garbage").is_err());
        let s =
            SignedManifest { body: b"\x01\x02".to_vec().into(), public_key: vec![].into(), signature: vec![].into() };
        assert!(matches!(s.manifest(), Err(ManifestError::Decode(_))));
    }
}
