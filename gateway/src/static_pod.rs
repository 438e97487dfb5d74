//! The static-pod runtime for k3s nodes: each workload becomes a Pod manifest in the
//! kubelet's static pod folder (`workloads.static_pod_dir`, k3s's
//! `/var/lib/rancher/k3s/agent/pod-manifests` by default). The kubelet then keeps it
//! running without the API server, through disconnection and reboots.
//!
//! Files are named `voither-<name>.yaml` and written atomically (a dot-file renamed
//! into place, which the kubelet ignores until then); a file is rewritten only when its
//! content changes, and files of workloads no longer in the manifest are removed. Only
//! `voither-*.yaml` files are touched. The content is JSON, which is YAML.
//!
//! The workload's artifacts folder is mounted read-only at [`MOUNT`]; a `command` that
//! names an artifact runs from there. The container runs as non-root with a read-only
//! root filesystem, no privilege escalation and no capabilities.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::{json, Value};
use voither_proto::workload::{RestartPolicy, WorkloadSpec, WorkloadState};

/// Where a workload's artifacts appear inside its container.
pub const MOUNT: &str = "/voither/workload";

/// The static pod folder and what was last written there.
#[derive(Debug)]
pub struct StaticPods {
    dir: PathBuf,
    states: Mutex<BTreeMap<String, WorkloadState>>,
}

/// A workload name as a DNS label: lowercase, `_` as `-`.
pub fn pod_name(workload: &str) -> String {
    let n: String = workload.chars().map(|c| if c == '_' { '-' } else { c.to_ascii_lowercase() }).collect();
    format!("voither-{}", n.trim_matches('-'))
}

/// The Pod manifest of one workload, or why it cannot be one.
pub fn render(spec: &WorkloadSpec, artifacts: &Path) -> Result<Value, String> {
    let image = spec.image.as_deref().ok_or("no image: the static-pod runtime needs `image` in the workload spec")?;
    let command =
        if spec.command.starts_with('/') { spec.command.clone() } else { format!("{MOUNT}/{}", spec.command) };
    let mut container = json!({
        "name": pod_name(&spec.name).trim_start_matches("voither-"),
        "image": image,
        "command": [command],
        "args": spec.args,
        "env": spec.env.iter().map(|(k, v)| json!({"name": k, "value": v})).collect::<Vec<_>>(),
        "workingDir": spec.working_dir.clone().unwrap_or_else(|| MOUNT.into()),
        "volumeMounts": [{"name": "artifacts", "mountPath": MOUNT, "readOnly": true}],
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "runAsNonRoot": true,
            "runAsUser": 65534,
            "capabilities": {"drop": ["ALL"]},
        },
    });
    if let Some(h) = &spec.health {
        container["livenessProbe"] = json!({
            "httpGet": {"host": "127.0.0.1", "port": h.http_port, "path": h.http_path},
            "periodSeconds": (h.interval_ms / 1000).max(1),
            "failureThreshold": h.failures,
        });
    }
    Ok(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(&spec.name),
            "labels": {
                "app.kubernetes.io/name": pod_name(&spec.name),
                "app.kubernetes.io/managed-by": "voither-gateway",
            },
            "annotations": {"voither.io/workload": spec.name},
        },
        "spec": {
            "restartPolicy": match spec.restart {
                RestartPolicy::Always => "Always",
                RestartPolicy::OnFailure => "OnFailure",
                RestartPolicy::Never => "Never",
            },
            "containers": [container],
            "volumes": [{"name": "artifacts", "hostPath": {"path": artifacts.display().to_string(), "type": "Directory"}}],
        },
    }))
}

impl StaticPods {
    /// Manages `voither-*.yaml` in `dir`.
    pub fn new(dir: PathBuf) -> Self {
        Self { dir, states: Mutex::default() }
    }

    /// Writes a manifest per workload and removes those of workloads that are gone.
    pub fn reconcile(&self, want: &[(WorkloadSpec, PathBuf)]) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let mut states = BTreeMap::new();
        let mut keep = Vec::new();
        for (spec, artifacts) in want {
            let file = format!("{}.yaml", pod_name(&spec.name));
            let state = match render(spec, artifacts) {
                Ok(pod) => {
                    let text = serde_json::to_string_pretty(&pod).expect("json") + "\n";
                    let path = self.dir.join(&file);
                    if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                        let tmp = self.dir.join(format!(".{file}.tmp"));
                        std::fs::write(&tmp, &text)?;
                        std::fs::rename(&tmp, &path)?;
                        tracing::info!(workload = %spec.name, path = %path.display(), "Static pod manifest written.");
                    }
                    keep.push(file);
                    ("static-pod".to_string(), None)
                }
                Err(e) => {
                    tracing::warn!(workload = %spec.name, problem = %e, "Workload not written as a static pod.");
                    ("failed".to_string(), Some(e))
                }
            };
            states.insert(
                spec.name.clone(),
                WorkloadState { name: spec.name.clone(), state: state.0, restarts: 0, last_exit: state.1, pid: None },
            );
        }
        for e in std::fs::read_dir(&self.dir)? {
            let name = e?.file_name().to_string_lossy().into_owned();
            if name.starts_with("voither-") && name.ends_with(".yaml") && !keep.contains(&name) {
                std::fs::remove_file(self.dir.join(&name))?;
                tracing::info!(file = %name, "Static pod manifest of a removed workload deleted.");
            }
        }
        *self.states.lock().expect("states lock") = states;
        Ok(())
    }

    /// What was written.
    pub fn states(&self) -> Vec<WorkloadState> {
        self.states.lock().expect("states lock").values().cloned().collect()
    }
}
