//! The Kubernetes manifests in `edge-k8s/` agree with the binaries they run.
//!
//! `scripts/check-ship.sh` renders every overlay (`edge-k8s/overlays/*`) with kustomize
//! and writes each as a JSON array of documents to `<target>/ship/rendered/` (or
//! `$VOITHER_SHIP_RENDERED`). This test reads those, takes each workload's config file
//! out of its ConfigMap, runs the real `check-config` on it, parses it with the
//! binaries' own config types (so defaults are the real ones), and checks what the
//! pod depends on against it: probe ports against `admin.listen`, the volume mounts
//! against `gateway.data_dir` / `hub.data_dir` and the certificate paths, the UDP
//! Service against `hub.listen`, the broker's port, the image tags against the
//! workspace version. It then starts a real hub and gateway and fetches every probe
//! path the manifests name. The monitoring ConfigMaps must carry the files of
//! `edge-k8s/monitoring/` unchanged.
//!
//! Rendered files that are missing or older than a file under `edge-k8s/` fail the
//! test, with the command that makes them: it never skips.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use voither_tests::procs::{bin, free_tcp_port, http_get, output_within, wait_for, GatewayOpts, Hub, Pki};

const HOW: &str = "run scripts/check-ship.sh: it installs the renderer (kustomize via kubectl) and \
kubernetes-validate when missing, renders edge-k8s/overlays/* to <target>/ship/rendered/ and runs this test";

/// The gateway's peak RSS measured under load (README, Performance), bytes.
const GATEWAY_MEASURED_RSS: u64 = 56 * 1024 * 1024;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn edge_k8s() -> PathBuf {
    repo().join("edge-k8s")
}

/// `$VOITHER_SHIP_RENDERED`, else `<target>/ship/rendered` next to this test's binary.
fn rendered_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VOITHER_SHIP_RENDERED") {
        return d.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    // <target>/debug/deps/ship_manifests-…
    let target = exe.ancestors().nth(3).expect("target folder");
    target.join("ship").join("rendered")
}

fn newest_mtime(dir: &Path) -> (SystemTime, PathBuf) {
    let mut newest = (SystemTime::UNIX_EPOCH, dir.to_path_buf());
    for e in std::fs::read_dir(dir).expect("read edge-k8s") {
        let p = e.expect("entry").path();
        let m =
            if p.is_dir() { newest_mtime(&p) } else { (p.metadata().and_then(|m| m.modified()).expect("mtime"), p) };
        if m.0 > newest.0 {
            newest = m;
        }
    }
    newest
}

/// Every overlay's rendered documents, by overlay name.
fn rendered() -> Vec<(String, Vec<Value>)> {
    let mut names: Vec<String> = std::fs::read_dir(edge_k8s().join("overlays"))
        .expect("edge-k8s/overlays")
        .map(|e| e.expect("entry"))
        .filter(|e| e.path().join("kustomization.yaml").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no overlay with a kustomization.yaml in edge-k8s/overlays");
    let (newest, newest_file) = newest_mtime(&edge_k8s());
    let dir = rendered_dir();
    names
        .into_iter()
        .map(|name| {
            let file = dir.join(format!("{name}.json"));
            let meta = file
                .metadata()
                .unwrap_or_else(|e| panic!("rendered overlay {name} not found at {} ({e}): {HOW}", file.display()));
            assert!(
                meta.modified().expect("mtime") >= newest,
                "{} is older than {}: render again: {HOW}",
                file.display(),
                newest_file.display()
            );
            let docs: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&file).expect("read rendered"))
                .unwrap_or_else(|e| panic!("{} is not a JSON array of documents: {e}: {HOW}", file.display()));
            (name, docs)
        })
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter().find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

fn all<'a>(docs: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    docs.iter().filter(move |d| d["kind"] == kind)
}

fn arr(v: &Value) -> &[Value] {
    v.as_array().map_or(&[], |a| a.as_slice())
}

fn named<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    arr(list).iter().find(|x| x["name"] == name)
}

/// True when every label of `selector` is on `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    selector.as_object().is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| &labels[k] == v))
}

/// The container port a probe, Service or policy port names (by number or name).
fn container_port<'a>(c: &'a Value, port: &Value) -> &'a Value {
    let found = arr(&c["ports"]).iter().find(|p| match port {
        Value::String(name) => p["name"] == *name,
        Value::Number(n) => p["containerPort"].as_u64() == n.as_u64(),
        _ => false,
    });
    found.unwrap_or_else(|| panic!("container {} has no port {port}", c["name"]))
}

fn port_number(p: &Value) -> u16 {
    p["containerPort"].as_u64().expect("containerPort") as u16
}

/// The mount of `c` under which `path` lies (the longest), and its volume.
fn mount_of<'a>(spec: &'a Value, c: &'a Value, path: &Path) -> (&'a Value, &'a Value) {
    let m = arr(&c["volumeMounts"])
        .iter()
        .filter(|m| path.starts_with(m["mountPath"].as_str().unwrap_or("\0")))
        .max_by_key(|m| m["mountPath"].as_str().map_or(0, str::len))
        .unwrap_or_else(|| panic!("container {} mounts nothing at {}", c["name"], path.display()));
    let v = named(&spec["volumes"], m["name"].as_str().expect("mount name"))
        .unwrap_or_else(|| panic!("no volume {} for mount {}", m["name"], m["mountPath"]));
    (m, v)
}

/// The config file a workload's container runs with: its path from `--config`, and
/// the text from the ConfigMap mounted there.
fn config_of(docs: &[Value], spec: &Value, c: &Value) -> (PathBuf, String) {
    let args: Vec<&str> = arr(&c["args"]).iter().filter_map(Value::as_str).collect();
    assert_eq!(args.first(), Some(&"run"), "container {} does not `run`: {args:?}", c["name"]);
    let i = args.iter().position(|a| *a == "--config").expect("--config in args");
    let path = PathBuf::from(args[i + 1]);
    let (m, v) = mount_of(spec, c, &path);
    assert_eq!(m["readOnly"], true, "config mount {} should be read-only", m["mountPath"]);
    let cm_name = v["configMap"]["name"].as_str().expect("config volume is a ConfigMap");
    let cm = find(docs, "ConfigMap", cm_name).unwrap_or_else(|| panic!("ConfigMap {cm_name} not rendered"));
    let rel = path.strip_prefix(m["mountPath"].as_str().expect("mountPath")).expect("under mount");
    let key = rel.to_str().expect("utf-8");
    let text = cm["data"][key].as_str().unwrap_or_else(|| panic!("ConfigMap {cm_name} has no key {key}"));
    (path, text.to_string())
}

/// The real binary accepts the file: `check-config` exits 0.
fn check_config(binary: &str, text: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("config.toml");
    std::fs::write(&file, text).expect("write config");
    let out = output_within(
        Command::new(bin(binary)).arg("check-config").arg("--config").arg(&file),
        Duration::from_secs(20),
    );
    assert!(
        out.status.success(),
        "{binary} check-config refused the ConfigMap's config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn quantity_bytes(q: &Value) -> u64 {
    let s = q.as_str().map(str::to_string).or_else(|| q.as_u64().map(|n| n.to_string())).expect("quantity");
    let units =
        [("Ki", 1u64 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30), ("k", 1000), ("M", 1_000_000), ("G", 1_000_000_000)];
    for (u, f) in units {
        if let Some(n) = s.strip_suffix(u) {
            return n.parse::<u64>().expect("quantity number") * f;
        }
    }
    s.parse().expect("quantity")
}

/// Non-root, read-only root filesystem, no privilege escalation, every capability
/// dropped; requests and limits set.
fn check_hardening(spec: &Value, c: &Value) {
    let pod = &spec["securityContext"];
    let sc = &c["securityContext"];
    assert_eq!(pod["runAsNonRoot"], true, "pod runAsNonRoot");
    assert!(pod["runAsUser"].as_u64().is_some_and(|u| u != 0), "pod runAsUser non-zero");
    assert!(
        sc["runAsUser"].is_null() && sc["runAsNonRoot"].is_null(),
        "container {} overrides the pod's user",
        c["name"]
    );
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{} readOnlyRootFilesystem", c["name"]);
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{} allowPrivilegeEscalation", c["name"]);
    assert!(arr(&sc["capabilities"]["drop"]).contains(&Value::from("ALL")), "{} drops ALL capabilities", c["name"]);
    assert!(arr(&sc["capabilities"]["add"]).is_empty(), "{} adds no capability", c["name"]);
    assert_eq!(spec["automountServiceAccountToken"], false, "no API token in the pod");
    for k in ["requests", "limits"] {
        for r in ["cpu", "memory"] {
            assert!(!c["resources"][k][r].is_null(), "{} resources.{k}.{r}", c["name"]);
        }
    }
}

/// Each TLS file lies in a memory emptyDir that an init container fills from a Secret
/// (copying, so the key gets mode 0600), naming the file.
fn check_tls(spec: &Value, c: &Value, files: &[&Path], secret: &str) {
    for f in files {
        let (m, v) = mount_of(spec, c, f);
        assert_eq!(v["emptyDir"]["medium"], "Memory", "{} should be in a memory emptyDir", f.display());
        let dir = m["mountPath"].as_str().expect("mountPath");
        let name = f.file_name().and_then(|n| n.to_str()).expect("file name");
        let filler = arr(&spec["initContainers"]).iter().find(|ic| {
            arr(&ic["volumeMounts"])
                .iter()
                .any(|im| im["name"] == m["name"] && im["mountPath"] == dir && im["readOnly"] != true)
        });
        let filler = filler.unwrap_or_else(|| panic!("no init container writes {dir} (for {})", f.display()));
        let script: String = arr(&filler["command"]).iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" ");
        assert!(script.contains(dir), "init container {} does not write into {dir}", filler["name"]);
        assert!(script.contains(name), "init container {} does not write {name}:\n{script}", filler["name"]);
        assert!(script.contains("umask 077"), "init container {} must create the files with mode 0600", filler["name"]);
        let from_secret = arr(&filler["volumeMounts"]).iter().any(|im| {
            named(&spec["volumes"], im["name"].as_str().unwrap_or(""))
                .is_some_and(|v| v["secret"]["secretName"] == secret)
        });
        assert!(from_secret, "init container {} does not mount Secret {secret}", filler["name"]);
    }
}

/// The probe paths of `c`, after checking that each probe's port is `admin`.
fn probes(c: &Value, admin: SocketAddr) -> Vec<(&'static str, String)> {
    assert!(!admin.ip().is_loopback(), "admin.listen {admin} is loopback: the kubelet cannot probe it");
    let mut out = Vec::new();
    for kind in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let p = &c[kind]["httpGet"];
        if c[kind].is_null() {
            continue;
        }
        let port = container_port(c, &p["port"]);
        assert_eq!(port_number(port), admin.port(), "{kind} port of {} vs admin.listen {admin}", c["name"]);
        assert!(port["protocol"].is_null() || port["protocol"] == "TCP", "{kind} port is TCP");
        out.push((kind, p["path"].as_str().expect("probe path").to_string()));
    }
    assert!(out.iter().any(|(k, _)| *k == "livenessProbe"), "{} has no liveness probe", c["name"]);
    assert!(out.iter().any(|(k, _)| *k == "readinessProbe"), "{} has no readiness probe", c["name"]);
    out
}

fn image_is_workspace_version(c: &Value, repo_name: &str) {
    let want = format!("voither/{repo_name}:{}", env!("CARGO_PKG_VERSION"));
    assert_eq!(c["image"], want.as_str(), "image of {} (workspace version)", c["name"]);
}

/// Checks the gateway DaemonSet of one overlay; returns its probe paths.
fn check_gateway(overlay: &str, docs: &[Value], ds: &Value) -> Vec<String> {
    let spec = &ds["spec"]["template"]["spec"];
    let c = named(&spec["containers"], "voither-gateway").expect("container voither-gateway");
    image_is_workspace_version(c, "voither-gateway");
    let (path, text) = config_of(docs, spec, c);
    check_config("voither-gateway", &text);
    let cfg = voither_gateway::Config::parse(&text, &path).expect("gateway config parses");

    let paths = probes(c, cfg.admin.listen);
    assert!(
        paths.contains(&("livenessProbe", "/healthz".into())),
        "{overlay}: gateway liveness on /healthz: {paths:?}"
    );
    assert!(
        paths.contains(&("readinessProbe", "/readyz".into())),
        "{overlay}: gateway readiness on /readyz: {paths:?}"
    );

    // The store: data_dir is exactly a writable hostPath mount, owned by the pod's user.
    let (m, v) = mount_of(spec, c, &cfg.gateway.data_dir);
    assert_eq!(
        Path::new(m["mountPath"].as_str().unwrap()),
        cfg.gateway.data_dir,
        "{overlay}: data_dir is the mount itself"
    );
    assert!(m["readOnly"] != true, "{overlay}: the store mount is writable");
    assert!(
        v["hostPath"]["path"].is_string(),
        "{overlay}: the store is on the node (hostPath) to survive pod restarts"
    );
    let uid = spec["securityContext"]["runAsUser"].as_u64().expect("runAsUser");
    let gid = spec["securityContext"]["runAsGroup"].as_u64().unwrap_or(uid);
    let owner = arr(&spec["initContainers"])
        .iter()
        .find(|ic| arr(&ic["volumeMounts"]).iter().any(|im| im["name"] == m["name"]))
        .expect("an init container prepares the hostPath folder");
    let script: String = arr(&owner["command"]).iter().filter_map(Value::as_str).collect();
    assert!(
        script.contains(&format!("chown {uid}:{gid}")) && script.contains(m["mountPath"].as_str().unwrap()),
        "{overlay}: init container {} must hand {} to {uid}:{gid}:\n{script}",
        owner["name"],
        m["mountPath"]
    );

    check_tls(spec, c, &[&cfg.uplink.ca, &cfg.uplink.cert, &cfg.uplink.key], "voither-gateway-tls");

    if cfg.broker.enabled {
        assert!(!cfg.broker.listen.ip().is_loopback(), "{overlay}: devices cannot reach a loopback broker");
        let p = container_port(c, &Value::from(cfg.broker.listen.port()));
        assert!(p["protocol"].is_null() || p["protocol"] == "TCP");
        assert_eq!(cfg.mqtt.port, cfg.broker.listen.port(), "{overlay}: the gateway subscribes to its embedded broker");
    }

    check_hardening(spec, c);
    let mem = quantity_bytes(&c["resources"]["requests"]["memory"]);
    assert!(mem >= GATEWAY_MEASURED_RSS, "{overlay}: memory request {mem} below the measured 56 MiB");
    assert!(quantity_bytes(&c["resources"]["limits"]["memory"]) > mem, "{overlay}: memory limit above the request");

    let upd = &ds["spec"]["updateStrategy"];
    assert_eq!(upd["type"], "RollingUpdate", "{overlay}: gateway update strategy");
    let max = &upd["rollingUpdate"]["maxUnavailable"];
    let partial = match max {
        Value::Number(n) => n.as_u64() == Some(1),
        Value::String(s) => s.strip_suffix('%').and_then(|p| p.parse::<u32>().ok()).is_some_and(|p| p > 0 && p <= 25),
        _ => false,
    };
    assert!(partial, "{overlay}: maxUnavailable {max} must never take all gateways down (1 or at most 25%)");
    assert!(matches!(&upd["rollingUpdate"]["maxSurge"], Value::Null) || upd["rollingUpdate"]["maxSurge"] == 0);
    assert!(!spec["nodeSelector"].as_object().is_none_or(|m| m.is_empty()), "{overlay}: edge node selector");
    assert!(!arr(&spec["tolerations"]).is_empty(), "{overlay}: edge node tolerations");
    paths.into_iter().map(|(_, p)| p).collect()
}

/// Checks the hub Deployment of one overlay and what belongs to it; returns its probe paths.
fn check_hub(overlay: &str, docs: &[Value], dep: &Value) -> Vec<String> {
    let spec = &dep["spec"]["template"]["spec"];
    let labels = &dep["spec"]["template"]["metadata"]["labels"];
    let c = named(&spec["containers"], "voither-hub").expect("container voither-hub");
    image_is_workspace_version(c, "voither-hub");
    let (path, text) = config_of(docs, spec, c);
    check_config("voither-hub", &text);
    let cfg = voither_hub::Config::parse(&text, &path).expect("hub config parses");

    let paths = probes(c, cfg.admin.listen);
    assert!(paths.iter().all(|(_, p)| p == "/healthz"), "{overlay}: hub probes on /healthz: {paths:?}");

    // QUIC: a UDP Service port that reaches hub.listen.
    assert!(!cfg.hub.listen.ip().is_loopback(), "{overlay}: hub.listen {} is loopback", cfg.hub.listen);
    let udp = all(docs, "Service")
        .filter(|s| selects(&s["spec"]["selector"], labels))
        .flat_map(|s| arr(&s["spec"]["ports"]).iter())
        .find(|p| p["protocol"] == "UDP")
        .unwrap_or_else(|| panic!("{overlay}: no UDP Service port selects the hub pods"));
    let target = if udp["targetPort"].is_null() { &udp["port"] } else { &udp["targetPort"] };
    let cp = container_port(c, target);
    assert_eq!(cp["protocol"], "UDP", "{overlay}: the hub's QUIC container port is UDP");
    assert_eq!(port_number(cp), cfg.hub.listen.port(), "{overlay}: UDP Service target vs hub.listen");

    let (m, _) = mount_of(spec, c, &cfg.hub.data_dir);
    assert_eq!(
        Path::new(m["mountPath"].as_str().unwrap()),
        cfg.hub.data_dir,
        "{overlay}: hub data_dir is the mount itself"
    );
    assert!(m["readOnly"] != true, "{overlay}: the sink mount is writable");
    check_tls(spec, c, &[&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key], "voither-hub-tls");
    check_hardening(spec, c);

    let name = dep["metadata"]["name"].as_str().unwrap();
    let hpa = all(docs, "HorizontalPodAutoscaler")
        .find(|h| h["spec"]["scaleTargetRef"]["kind"] == "Deployment" && h["spec"]["scaleTargetRef"]["name"] == name)
        .unwrap_or_else(|| panic!("{overlay}: no HPA for Deployment {name}"));
    assert!(hpa["spec"]["minReplicas"].as_u64().unwrap_or(1) >= 2, "{overlay}: HPA keeps at least 2 hubs");
    assert!(
        all(docs, "PodDisruptionBudget").any(|p| selects(&p["spec"]["selector"]["matchLabels"], labels)),
        "{overlay}: no PodDisruptionBudget selects the hub pods"
    );
    let np = all(docs, "NetworkPolicy")
        .find(|p| selects(&p["spec"]["podSelector"]["matchLabels"], labels))
        .unwrap_or_else(|| panic!("{overlay}: no NetworkPolicy selects the hub pods"));
    let allowed: Vec<(u16, String)> = arr(&np["spec"]["ingress"])
        .iter()
        .flat_map(|r| arr(&r["ports"]).iter())
        .map(|p| (port_number(container_port(c, &p["port"])), p["protocol"].as_str().unwrap_or("TCP").to_string()))
        .collect();
    assert!(
        allowed.contains(&(cfg.hub.listen.port(), "UDP".into())),
        "{overlay}: NetworkPolicy admits QUIC: {allowed:?}"
    );
    assert!(
        allowed.contains(&(cfg.admin.listen.port(), "TCP".into())),
        "{overlay}: NetworkPolicy admits the admin port: {allowed:?}"
    );
    paths.into_iter().map(|(_, p)| p).collect()
}

/// The monitoring ConfigMaps carry `edge-k8s/monitoring/` unchanged.
fn check_monitoring(overlay: &str, docs: &[Value]) -> bool {
    let mut found = false;
    for (cm, file) in [("voither-edge-alerts", "alerts.yaml"), ("voither-edge-dashboard", "dashboard.json")] {
        if let Some(doc) = find(docs, "ConfigMap", cm) {
            let want = std::fs::read_to_string(edge_k8s().join("monitoring").join(file)).expect("monitoring file");
            assert_eq!(
                doc["data"][file].as_str(),
                Some(want.as_str()),
                "{overlay}: ConfigMap {cm} differs from monitoring/{file}"
            );
            found = true;
        }
    }
    found
}

#[test]
fn manifests_agree_with_the_binaries() {
    let mut gateway_paths = BTreeSet::new();
    let mut hub_paths = BTreeSet::new();
    let mut monitoring = false;
    for (overlay, docs) in rendered() {
        let mut workloads = 0;
        for ds in all(&docs, "DaemonSet").filter(|d| d["metadata"]["name"] == "voither-gateway") {
            gateway_paths.extend(check_gateway(&overlay, &docs, ds));
            workloads += 1;
        }
        for dep in all(&docs, "Deployment").filter(|d| d["metadata"]["name"] == "voither-hub") {
            hub_paths.extend(check_hub(&overlay, &docs, dep));
            workloads += 1;
        }
        monitoring |= check_monitoring(&overlay, &docs);
        assert!(workloads > 0, "overlay {overlay} deploys neither the gateway nor the hub");
    }
    assert!(!gateway_paths.is_empty(), "no overlay deploys the gateway DaemonSet");
    assert!(!hub_paths.is_empty(), "no overlay deploys the hub Deployment");
    assert!(monitoring, "no overlay ships the monitoring ConfigMaps");

    // Every probe path is served by the real binaries (200 once started and ready).
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::generate(&dir.path().join("pki"), &["gw-ship"]);
    let hub = Hub::start(&dir.path().join("hub"), &pki, "hub-ship");
    let gw = voither_tests::procs::Gateway::start(
        &dir.path().join("gw"),
        &pki,
        &GatewayOpts::embedded("gw-ship", free_tcp_port(), vec![hub.addr]),
    );
    for (admin, paths, who) in [(gw.admin, &gateway_paths, "gateway"), (hub.admin, &hub_paths, "hub")] {
        for p in paths {
            let ok = wait_for(Duration::from_secs(30), || http_get(admin, p).ok().filter(|(s, _)| *s == 200));
            assert!(ok.is_some(), "the {who} does not answer 200 on probe path {p}: {:?}", http_get(admin, p));
        }
    }
}
