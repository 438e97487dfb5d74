//! Signed workloads against real processes: the hub serves a signed manifest and its
//! artifact, the gateway verifies, caches and runs it as a child process, and its
//! output reaches the hub through the `logs` lane. The workload keeps running without
//! the hub, and comes back from the cache when the gateway restarts while the hub is
//! still down. A crashing workload backs off; a removed one stops. A manifest signed
//! with an unknown key, a tampered one, a rolled-back version and an artifact whose
//! bytes do not match its hash are each refused and change nothing on the device.
//!
//! Blocking harness code (no async runtime on this thread): std's clock measures.
#![allow(clippy::disallowed_types)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use voither_proto::workload::SignedManifest;
use voither_proto::{encode_frame, Frame, FrameDecoder, LaneMark, Welcome, MAX_FRAME_LEN};
use voither_tests::check::ExportRow;
use voither_tests::procs::{bin, wait_for, Gateway, GatewayOpts, Lab, Pki, DEFAULT_LANES};

const WORKER: &str = "#!/bin/sh\necho \"worker $VOITHER_WORKLOAD up\"\ni=0\nwhile true; do\n  i=$((i+1))\n  echo \"tick $i\"\n  sleep 0.2\ndone\n";
const CRASHER: &str = "#!/bin/sh\necho crashing\nexit 3\n";

fn lanes() -> String {
    format!("{DEFAULT_LANES}\n[[lanes]]\nname = \"logs\"\npriority = 2\ntopics = []\n")
}

fn hub_tool(args: &[&str]) -> String {
    let out = std::process::Command::new(bin("voither-hub")).args(args).output().expect("voither-hub");
    assert!(out.status.success(), "voither-hub {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A signing key; returns its public key (base64).
fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    std::fs::create_dir_all(dir).unwrap();
    let out = dir.join(name);
    let public = hub_tool(&["workloads", "keygen", "--out", out.to_str().unwrap()]);
    (out.with_extension("key"), public)
}

/// Writes `manifest.toml` with `body` and signs it with `key` into `out`.
fn sign(dir: &Path, key: &Path, body: &str, out: &Path) -> SignedManifest {
    let toml = dir.join(format!("{}.toml", out.file_name().unwrap().to_string_lossy()));
    std::fs::write(&toml, body).unwrap();
    let artifacts = dir.join("src");
    hub_tool(&[
        "workloads",
        "sign",
        "--manifest",
        toml.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--artifacts",
        artifacts.to_str().unwrap(),
    ]);
    SignedManifest::from_bytes(&std::fs::read(out).unwrap()).unwrap()
}

fn worker_spec(name: &str, file: &str) -> String {
    format!(
        "[[workloads]]\nname = \"{name}\"\ncommand = \"{file}\"\nrestart = \"always\"\nbackoff_min_ms = 200\n\
         backoff_max_ms = 2000\n[[workloads.artifacts]]\nname = \"{file}\"\nexecutable = true\n"
    )
}

fn workload(gw: &Gateway, name: &str) -> Option<serde_json::Value> {
    let st = gw.status()?;
    st["workloads"]["items"].as_array()?.iter().find(|w| w["name"] == name).cloned()
}

fn running_pid(gw: &Gateway, name: &str) -> Option<u32> {
    let w = workload(gw, name)?;
    (w["state"] == "running").then(|| w["pid"].as_u64()).flatten().map(|p| p as u32)
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
}

fn log_lines(rows: &[ExportRow], source: &str) -> Vec<(u64, String)> {
    use base64::Engine;
    rows.iter()
        .filter_map(|r| match r {
            ExportRow::Record { lane, source: s, payload, ingest_ts_ms, .. } if lane == "logs" && s == source => {
                let b = base64::engine::general_purpose::STANDARD.decode(payload).ok()?;
                Some((*ingest_ts_ms, String::from_utf8_lossy(&b).into_owned()))
            }
            _ => None,
        })
        .collect()
}

/// A lab whose hub serves `<tmp>/catalog` and whose gateway trusts the operator key.
struct WorkloadLab {
    lab: Lab,
    _keys: tempfile::TempDir,
    catalog: PathBuf,
    work: PathBuf,
    key: PathBuf,
}

impl WorkloadLab {
    fn start() -> Self {
        let keys = tempfile::tempdir().unwrap();
        let (key, public) = keygen(keys.path(), "operator");
        let extra = format!("\n[workloads]\ntrusted_keys = [\"{public}\"]\nstop_grace_ms = 3000\n");
        let mut lab = Lab::start_with(&lanes(), &extra);
        let catalog = lab.dir.path().join("catalog");
        let work = lab.dir.path().join("work");
        std::fs::create_dir_all(catalog.join("artifacts")).unwrap();
        std::fs::create_dir_all(work.join("src")).unwrap();
        lab.hub.stop();
        let mut text = std::fs::read_to_string(&lab.hub.config).unwrap();
        text.push_str(&format!("\n[workloads]\ndir = \"{}\"\n", catalog.display()));
        std::fs::write(&lab.hub.config, text).unwrap();
        lab.hub.restart();
        WorkloadLab { lab, _keys: keys, catalog, work, key }
    }

    /// Puts an artifact where `sign` and the hub find it.
    fn artifact(&self, name: &str, content: &str) {
        std::fs::write(self.work.join("src").join(name), content).unwrap();
        std::fs::write(self.catalog.join("artifacts").join(name), content).unwrap();
    }

    /// Signs `body` and publishes it as the hub's default manifest.
    fn publish(&self, body: &str) -> SignedManifest {
        let out = self.work.join(format!("m{}.signed", body.len()));
        let s = sign(&self.work, &self.key, body, &out);
        let tmp = self.catalog.join("default.signed.tmp");
        std::fs::copy(&out, &tmp).unwrap();
        std::fs::rename(&tmp, self.catalog.join("default.signed")).unwrap();
        s
    }
}

#[test]
fn a_signed_workload_runs_offline_and_restarts_from_the_cache() {
    let mut w = WorkloadLab::start();
    w.artifact("worker.sh", WORKER);
    w.publish(&format!("version = 1\n{}", worker_spec("worker", "worker.sh")));
    let gw = &w.lab.gateway;

    // 1. The manifest reaches the gateway, the workload runs, its output reaches the hub.
    let pid = wait_for(Duration::from_secs(30), || running_pid(gw, "worker"))
        .unwrap_or_else(|| panic!("workload not running\n{}", w.lab.logs()));
    assert!(alive(pid));
    let st = gw.status().unwrap();
    assert_eq!(st["workloads"]["manifest_version"], 1);
    let lines = wait_for(Duration::from_secs(30), || {
        let l = log_lines(&w.lab.hub.export(), "workload/worker/stdout");
        (l.len() >= 3).then_some(l)
    })
    .unwrap_or_else(|| panic!("no workload output at the hub\n{}", w.lab.logs()));
    assert_eq!(lines[0].1, "worker worker up", "first line as printed");
    assert!(lines[1].1.starts_with("tick "), "{lines:?}");
    // The hub's fleet view carries the gateway's workloads from its Status.
    let fleet = wait_for(Duration::from_secs(30), || {
        let (_, body) = voither_tests::procs::http_get(w.lab.hub.admin, "/fleet").ok()?;
        let rows: serde_json::Value = serde_json::from_str(&body).ok()?;
        let g = rows.as_array()?.iter().find(|r| r["gateway"] == "gw-1")?.clone();
        (g["manifest_version"] == 1 && g["workloads"][0]["state"] == "running").then_some(g)
    });
    assert!(fleet.is_some(), "fleet shows the workload");

    // 2. Hub down: the workload keeps running and its output is kept on the gateway.
    w.lab.hub.stop();
    let logs_backlog = |gw: &Gateway| -> Option<u64> {
        let st = gw.status()?;
        st["lanes"].as_array()?.iter().find(|l| l["lane"] == "logs")?["backlog_records"].as_u64()
    };
    let held = wait_for(Duration::from_secs(30), || logs_backlog(gw).filter(|n| *n >= 5));
    assert!(held.is_some(), "output is buffered while the hub is down");
    assert_eq!(running_pid(gw, "worker"), Some(pid), "the same process keeps running");
    assert!(alive(pid));

    // The gateway restarts while the hub is still down: the workload is back from the cache.
    w.lab.gateway.stop();
    assert!(!alive(pid), "the gateway stopped its workload (no orphan, no zombie)");
    let t0 = Instant::now();
    w.lab.gateway.restart();
    let gw = &w.lab.gateway;
    let pid2 = wait_for(Duration::from_secs(10), || running_pid(gw, "worker"))
        .unwrap_or_else(|| panic!("workload not restarted from the cache\n{}", gw.log_tail()));
    println!("workload running again {:.2} s after the gateway was started, hub down", t0.elapsed().as_secs_f64());
    assert_ne!(pid2, pid);
    assert!(gw.log_tail().contains("Starting cached workloads"));

    // Hub back: output from both runs arrives.
    w.lab.hub.restart();
    let ups = wait_for(Duration::from_secs(30), || {
        let l = log_lines(&w.lab.hub.export(), "workload/worker/stdout");
        (l.iter().filter(|(_, s)| s == "worker worker up").count() >= 2).then_some(l.len())
    });
    assert!(ups.is_some(), "output of both runs reaches the hub\n{}", w.lab.logs());
}

#[test]
fn a_crashing_workload_backs_off_and_reconcile_starts_stops_and_restarts() {
    let w = WorkloadLab::start();
    w.artifact("worker.sh", WORKER);
    w.artifact("crasher.sh", CRASHER);
    let crasher = "[[workloads]]\nname = \"crasher\"\ncommand = \"crasher.sh\"\nrestart = \"on-failure\"\n\
                   backoff_min_ms = 200\nbackoff_max_ms = 10000\n[[workloads.artifacts]]\nname = \"crasher.sh\"\n\
                   executable = true\n";
    let sleeper =
        |arg: &str| format!("[[workloads]]\nname = \"sleeper\"\ncommand = \"/bin/sleep\"\nargs = [\"{arg}\"]\n");
    let worker = worker_spec("worker", "worker.sh");
    // Runs, but its health probe finds nothing listening: restarted as unhealthy.
    let prober = format!(
        "[[workloads]]\nname = \"prober\"\ncommand = \"/bin/sleep\"\nargs = [\"600\"]\nbackoff_min_ms = 100\n\
         [workloads.health]\nhttp_port = {}\ninterval_ms = 200\nfailures = 2\n",
        voither_tests::procs::free_tcp_port()
    );
    w.publish(&format!("version = 1\n{worker}{}{crasher}{prober}", sleeper("600")));
    let gw = &w.lab.gateway;
    let pid = wait_for(Duration::from_secs(30), || running_pid(gw, "worker"))
        .unwrap_or_else(|| panic!("worker not running\n{}", w.lab.logs()));
    let sleeper_pid = wait_for(Duration::from_secs(30), || running_pid(gw, "sleeper")).unwrap();

    // The crasher exits with 3 at once; each restart waits twice as long as the last.
    let starts = wait_for(Duration::from_secs(60), || {
        let l = log_lines(&w.lab.hub.export(), "workload/crasher/stdout");
        (l.len() >= 5).then_some(l)
    })
    .unwrap_or_else(|| panic!("crasher not restarted 4 times\n{}", w.lab.logs()));
    let gaps: Vec<u64> = starts.windows(2).map(|p| p[1].0 - p[0].0).collect();
    println!("crasher restarts after {gaps:?} ms");
    for (i, g) in gaps.iter().take(4).enumerate() {
        let backoff = 200u64 << i;
        assert!(*g >= backoff, "restart {i} came after {g} ms, before its backoff of {backoff} ms");
    }
    let unhealthy = wait_for(Duration::from_secs(30), || {
        let p = workload(gw, "prober")?;
        (p["last_exit"].as_str()?.starts_with("unhealthy") && p["restarts"].as_u64()? >= 1).then_some(p)
    });
    assert!(unhealthy.is_some(), "failing health probe did not restart the workload\n{}", gw.log_tail());
    let c = workload(gw, "crasher").unwrap();
    assert_eq!(c["last_exit"], "exit 3");
    assert!(c["restarts"].as_u64().unwrap() >= 3);
    assert!(gw.metric("voither_gateway_workload_restarts_total").unwrap() >= 3.0);

    // Version 2: the worker is unchanged, the sleeper changed, the crasher is gone.
    w.publish(&format!("version = 2\n{worker}{}", sleeper("700")));
    let changed = wait_for(Duration::from_secs(30), || {
        let p = running_pid(gw, "sleeper")?;
        (p != sleeper_pid && workload(gw, "crasher").is_none() && workload(gw, "prober").is_none()).then_some(p)
    })
    .unwrap_or_else(|| panic!("v2 not reconciled\n{}", gw.log_tail()));
    assert_eq!(running_pid(gw, "worker"), Some(pid), "an unchanged workload is left running");
    assert!(!alive(sleeper_pid), "a changed workload's old process is gone");
    assert_eq!(gw.status().unwrap()["workloads"]["manifest_version"], 2);

    // Version 3 drops the sleeper: its process is stopped.
    w.publish(&format!("version = 3\n{worker}"));
    let gone = wait_for(Duration::from_secs(30), || workload(gw, "sleeper").is_none().then_some(()));
    assert!(gone.is_some(), "sleeper still listed\n{}", gw.log_tail());
    assert!(!alive(changed), "the removed workload's process is gone");
    assert_eq!(running_pid(gw, "worker"), Some(pid));
}

/// Artifacts a fake hub serves: (sha256, bytes).
type Artifacts = Vec<(String, Vec<u8>)>;

/// A "hub" that answers `Hello` with `Welcome` and then the current manifest, and
/// serves artifacts from a map (bytes as given, matching their hash or not).
struct FakeHub {
    addr: std::net::SocketAddr,
    offer: Arc<Mutex<(SignedManifest, Artifacts)>>,
    _rt: tokio::runtime::Runtime,
}

impl FakeHub {
    fn start(pki: &Pki, first: SignedManifest, artifacts: Artifacts) -> Self {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _g = rt.enter();
        let ep = voither_tests::raw::server(&pki.dir);
        let addr = ep.local_addr().unwrap();
        let offer = Arc::new(Mutex::new((first, artifacts)));
        let o = offer.clone();
        rt.spawn(async move {
            while let Some(inc) = ep.accept().await {
                let Ok(conn) = inc.await else { continue };
                let o = o.clone();
                tokio::spawn(async move {
                    let Ok((mut send, mut recv)) = conn.accept_bi().await else { return };
                    let mut dec = FrameDecoder::new(MAX_FRAME_LEN);
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(Some(n)) = recv.read(&mut buf).await {
                        dec.push(&buf[..n]);
                        while let Ok(Some(f)) = dec.next_frame() {
                            let mut out = Vec::new();
                            let (manifest, arts) = o.lock().unwrap().clone();
                            match f {
                                Frame::Hello(h) => {
                                    let w = Welcome {
                                        hub_id: "fake".into(),
                                        region: "x".into(),
                                        gateway_id: "gw-1".into(),
                                        lanes: h
                                            .lanes
                                            .iter()
                                            .map(|l| LaneMark { lane: l.lane.clone(), hwm: 0 })
                                            .collect(),
                                        endpoints: vec![],
                                        manifest_version: 0,
                                    };
                                    encode_frame(&Frame::Welcome(w), &mut out, MAX_FRAME_LEN).unwrap();
                                    // Unlike a real hub, this one sends older versions too.
                                    let v = manifest.manifest().map_or(0, |m| m.version);
                                    if h.manifest_version != Some(v) {
                                        encode_frame(&Frame::Manifest(manifest), &mut out, MAX_FRAME_LEN).unwrap();
                                    }
                                }
                                Frame::FetchArtifact(f) => {
                                    let data = arts.iter().find(|(s, _)| *s == f.sha256).map(|(_, d)| d.clone());
                                    let chunk = voither_proto::ArtifactChunk {
                                        sha256: f.sha256,
                                        offset: f.offset,
                                        total: data.as_ref().map_or(0, |d| d.len() as u64),
                                        found: data.is_some(),
                                        data: data.map(|d| d[f.offset as usize..].to_vec()).unwrap_or_default().into(),
                                    };
                                    encode_frame(&Frame::ArtifactChunk(chunk), &mut out, MAX_FRAME_LEN).unwrap();
                                }
                                _ => {}
                            }
                            if send.write_all(&out).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        FakeHub { addr, offer, _rt: rt }
    }

    /// Serves `m` from the next connection on. The gateway reconnects about every second
    /// (this hub never acks, and the test sets a 1 s ack-progress timeout).
    fn offer(&self, m: SignedManifest, artifacts: Artifacts) {
        *self.offer.lock().unwrap() = (m, artifacts);
    }
}

#[test]
fn bad_manifests_and_artifacts_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&dir.path().join("pki"), &["gw-1"]);
    let work = dir.path().join("work");
    std::fs::create_dir_all(work.join("src")).unwrap();
    let (key, public) = keygen(&work, "operator");
    let (other_key, _) = keygen(&work, "intruder");
    std::fs::write(work.join("src").join("worker.sh"), WORKER).unwrap();
    let v5 =
        sign(&work, &key, &format!("version = 5\n{}", worker_spec("worker", "worker.sh")), &work.join("v5.signed"));
    let worker_sha = v5.manifest().unwrap().workloads[0].artifacts[0].sha256.clone();
    let good_art = vec![(worker_sha.clone(), WORKER.as_bytes().to_vec())];
    let hub = FakeHub::start(&pki, v5, good_art.clone());

    let gw = Gateway::start(
        &dir.path().join("gw"),
        &pki,
        &GatewayOpts {
            lanes: lanes(),
            extra: format!("\n[workloads]\ntrusted_keys = [\"{public}\"]\nstop_grace_ms = 3000\n"),
            ..GatewayOpts::embedded("gw-1", voither_tests::procs::free_tcp_port(), vec![hub.addr])
        },
    );
    gw.set_config("uplink", &[("ack_progress_timeout_ms", "1000")]);
    let mut gw = gw;
    gw.stop();
    gw.restart();
    let pid = wait_for(Duration::from_secs(30), || running_pid(&gw, "worker"))
        .unwrap_or_else(|| panic!("v5 not installed\n{}", gw.log_tail()));
    let data = dir.path().join("gw").join("data").join("workloads");
    let cached = std::fs::read(data.join("manifest.signed")).unwrap();
    let artifacts_before: Vec<_> =
        std::fs::read_dir(data.join("artifacts")).unwrap().flatten().map(|e| e.file_name()).collect();

    let refused = |reason: &str| -> f64 {
        let (_, page) = voither_tests::procs::http_get(gw.admin, "/metrics").unwrap();
        let key = format!("voither_gateway_manifest_refusals_total{{reason=\"{reason}\"}} ");
        page.lines().find_map(|l| l.strip_prefix(&key)).map_or(0.0, |v| v.parse().unwrap())
    };
    let worker6 = format!("version = 6\n{}", worker_spec("worker", "worker.sh"))
        .replace("restart = \"always\"", "restart = \"always\"\nargs = [\"changed\"]");
    // The same content as the worker, with another name and a different artifact.
    std::fs::write(work.join("src").join("other.sh"), "#!/bin/sh\necho other\nsleep 60\n").unwrap();
    let with_other =
        sign(&work, &key, &format!("version = 7\n{}", worker_spec("other", "other.sh")), &work.join("v7.signed"));
    let other_sha = with_other.manifest().unwrap().workloads[0].artifacts[0].sha256.clone();

    let cases: Vec<(&str, SignedManifest, Artifacts)> = vec![
        ("unknown_key", sign(&work, &other_key, &worker6, &work.join("intruder.signed")), good_art.clone()),
        (
            "bad_signature",
            {
                let mut s = sign(&work, &key, &worker6, &work.join("v6.signed"));
                let mut m = s.manifest().unwrap();
                m.workloads[0].args = vec!["tampered".into()];
                s.body = m.to_body().into();
                s
            },
            good_art.clone(),
        ),
        (
            "rollback",
            sign(&work, &key, &format!("version = 4\n{}", worker_spec("worker", "worker.sh")), &work.join("v4.signed")),
            good_art.clone(),
        ),
        ("artifact", with_other, {
            // Same length, other bytes: the hash check must catch it.
            let mut wrong = b"#!/bin/sh\necho other\nsleep 60\n".to_vec();
            wrong[12] = b'X';
            vec![(other_sha, wrong)]
        }),
    ];
    for (reason, manifest, arts) in cases {
        let before = refused(reason);
        hub.offer(manifest, arts);
        let counted = wait_for(Duration::from_secs(30), || (refused(reason) > before).then_some(()));
        assert!(counted.is_some(), "{reason} not refused\n{}", gw.log_tail());
        assert_eq!(running_pid(&gw, "worker"), Some(pid), "{reason}: the workload is untouched");
        assert!(alive(pid));
        assert_eq!(std::fs::read(data.join("manifest.signed")).unwrap(), cached, "{reason}: cache unchanged");
        let now: Vec<_> = std::fs::read_dir(data.join("artifacts")).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(now, artifacts_before, "{reason}: no artifact kept");
        assert_eq!(gw.status().unwrap()["workloads"]["manifest_version"], 5);
    }
    let log = gw.log_tail();
    assert!(log.contains("Workload manifest refused"), "{log}");
    assert!(workload(&gw, "other").is_none());
}

/// `kubernetes-validate`, as `scripts/check-ship.sh` installs it (or on `PATH`).
fn kubernetes_validate() -> PathBuf {
    let venv = std::env::var_os("VOITHER_SHIP_VENV").map(PathBuf::from).unwrap_or_else(|| {
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache"));
        cache.join("voither-edge").join("ship-venv")
    });
    let in_venv = venv.join("bin").join("kubernetes-validate");
    if in_venv.is_file() {
        return in_venv;
    }
    let on_path = std::process::Command::new("kubernetes-validate").arg("--version").output();
    assert!(
        on_path.is_ok_and(|o| o.status.success()),
        "kubernetes-validate is not installed: run scripts/check-ship.sh (it installs it into {}) \
         or `pip install kubernetes-validate`",
        venv.display()
    );
    PathBuf::from("kubernetes-validate")
}

#[test]
fn on_k3s_workloads_become_valid_static_pods() {
    let validate = kubernetes_validate();
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = keygen(keys.path(), "operator");
    let pods = keys.path().join("pod-manifests");
    let extra = format!(
        "\n[workloads]\ntrusted_keys = [\"{public}\"]\nruntime = \"static-pod\"\nstatic_pod_dir = \"{}\"\n",
        pods.display()
    );
    let mut lab = Lab::start_with(&lanes(), &extra);
    let catalog = lab.dir.path().join("catalog");
    let work = lab.dir.path().join("work");
    std::fs::create_dir_all(catalog.join("artifacts")).unwrap();
    std::fs::create_dir_all(work.join("src")).unwrap();
    for dir in [catalog.join("artifacts"), work.join("src")] {
        std::fs::write(dir.join("adapter.sh"), WORKER).unwrap();
    }
    lab.hub.stop();
    let mut text = std::fs::read_to_string(&lab.hub.config).unwrap();
    text.push_str(&format!("\n[workloads]\ndir = \"{}\"\n", catalog.display()));
    std::fs::write(&lab.hub.config, text).unwrap();
    lab.hub.restart();
    let spec = "[[workloads]]\nname = \"modbus_adapter\"\ncommand = \"adapter.sh\"\nargs = [\"--port\", \"502\"]\n\
                env = { RUST_LOG = \"info\" }\nrestart = \"always\"\n\
                image = \"registry.example.net/voither/modbus-adapter:1.4.2\"\n\
                [[workloads.artifacts]]\nname = \"adapter.sh\"\nexecutable = true\n\
                [workloads.health]\nhttp_port = 8080\n";
    let publish = |version: u64, body: &str| {
        let out = work.join(format!("v{version}.signed"));
        sign(&work, &key, &format!("version = {version}\n{body}"), &out);
        std::fs::copy(&out, catalog.join("default.signed.tmp")).unwrap();
        std::fs::rename(catalog.join("default.signed.tmp"), catalog.join("default.signed")).unwrap();
    };
    publish(1, spec);
    let file = pods.join("voither-modbus-adapter.yaml");
    let written = wait_for(Duration::from_secs(30), || file.is_file().then_some(()));
    assert!(written.is_some(), "no static pod written\n{}", lab.logs());
    let pod: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(pod["spec"]["containers"][0]["image"], "registry.example.net/voither/modbus-adapter:1.4.2");
    assert_eq!(pod["spec"]["containers"][0]["command"][0], "/voither/workload/adapter.sh");
    assert_eq!(pod["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"], 8080);
    let host = pod["spec"]["volumes"][0]["hostPath"]["path"].as_str().unwrap();
    assert!(Path::new(host).join("adapter.sh").is_file(), "the artifacts folder is what the pod mounts");
    let out = std::process::Command::new(&validate)
        .args(["--strict", "-k", "1.37.0"])
        .arg(&file)
        .output()
        .expect("kubernetes-validate");
    assert!(
        out.status.success(),
        "kubernetes-validate --strict: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let st = lab.gateway.status().unwrap();
    assert_eq!(st["workloads"]["items"][0]["state"], "static-pod");

    // Removed from the manifest: the kubelet's file goes too.
    publish(2, "");
    let removed = wait_for(Duration::from_secs(30), || (!file.exists()).then_some(()));
    assert!(removed.is_some(), "static pod of a removed workload left behind\n{}", lab.logs());
}
