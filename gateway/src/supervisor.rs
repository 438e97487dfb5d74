//! The process runtime: each workload is a child process of the gateway.
//!
//! - Each child runs in a process group of its own, with a minimal environment (`PATH`,
//!   `HOME` = its folder, `VOITHER_WORKLOAD` = its name) plus the manifest's `env`,
//!   stdin from /dev/null, stdout and stderr piped.
//! - Output lines become records in the `workloads.logs_lane` lane (source
//!   `workload/<name>/stdout` or `/stderr`, lines cut at `workloads.max_line_bytes`). A
//!   full channel drops lines and counts them; a workload never waits on the store.
//! - Restart policy `always`, `on-failure` or `never`; the delay starts at
//!   `backoff_min_ms` and doubles per consecutive failure up to `backoff_max_ms`. A run
//!   that lasted 10 s or more starts the count again.
//! - An optional HTTP health probe restarts a workload after `failures` failed probes
//!   in a row.
//! - Stopping sends SIGTERM to the process group, waits `workloads.stop_grace_ms`, then
//!   SIGKILL. The child is always waited for (no zombie), and the group is killed after
//!   the child exits so nothing it started lingers.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};
use voither_proto::workload::{HealthProbe, RestartPolicy, WorkloadSpec, WorkloadState};

use crate::metrics::{Metrics, WorkloadLabel};
use crate::store::NewRecord;

/// Content type of workload output records.
pub const LOG_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

/// A run at least this long resets the backoff.
const STABLE_RUN: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Inner {
    states: Mutex<BTreeMap<String, WorkloadState>>,
    log_tx: mpsc::Sender<NewRecord>,
    metrics: Arc<Metrics>,
    lane: String,
    grace: Duration,
    max_line: usize,
}

#[derive(Debug)]
struct Running {
    spec: WorkloadSpec,
    dir: PathBuf,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// Supervises the workloads' child processes.
#[derive(Debug)]
pub struct Supervisor {
    inner: Arc<Inner>,
    running: tokio::sync::Mutex<HashMap<String, Running>>,
}

impl Supervisor {
    /// Output lines go to `log_tx` as records of `lane`.
    pub fn new(
        log_tx: mpsc::Sender<NewRecord>,
        metrics: Arc<Metrics>,
        lane: String,
        grace: Duration,
        max_line: usize,
    ) -> Self {
        Self {
            inner: Arc::new(Inner { states: Mutex::default(), log_tx, metrics, lane, grace, max_line }),
            running: tokio::sync::Mutex::default(),
        }
    }

    /// Runs exactly `want` (spec and folder per workload): starts what is new, stops what
    /// is gone, restarts what changed, leaves the rest running.
    pub async fn reconcile(&self, want: Vec<(WorkloadSpec, PathBuf)>) {
        let mut running = self.running.lock().await;
        let stale: Vec<String> = running
            .iter()
            .filter(|(name, r)| !want.iter().any(|(s, d)| &s.name == *name && *s == r.spec && *d == r.dir))
            .map(|(n, _)| n.clone())
            .collect();
        let mut stopping = Vec::new();
        for name in stale {
            let r = running.remove(&name).expect("listed");
            let gone = !want.iter().any(|(s, _)| s.name == name);
            info!(workload = %name, "{}", if gone { "Workload removed from the manifest; stopping it." } else { "Workload changed; restarting it." });
            let _ = r.stop.send(true);
            stopping.push((name, gone, r.task));
        }
        for (name, gone, task) in stopping {
            let _ = task.await;
            if gone {
                self.inner.states.lock().expect("states lock").remove(&name);
                self.inner.metrics.workload_running.remove(&WorkloadLabel { workload: name });
            }
        }
        for (spec, dir) in want {
            if running.contains_key(&spec.name) {
                continue;
            }
            let (stop, rx) = watch::channel(false);
            let task = tokio::spawn(run(self.inner.clone(), spec.clone(), dir.clone(), rx));
            running.insert(spec.name.clone(), Running { spec, dir, stop, task });
        }
    }

    /// Stops every workload, each with its grace period, all at once.
    pub async fn stop_all(&self) {
        let mut running = self.running.lock().await;
        for r in running.values() {
            let _ = r.stop.send(true);
        }
        for (_, r) in running.drain() {
            let _ = r.task.await;
        }
    }

    /// Every workload's state.
    pub fn states(&self) -> Vec<WorkloadState> {
        self.inner.states.lock().expect("states lock").values().cloned().collect()
    }
}

impl Inner {
    fn set(&self, name: &str, f: impl FnOnce(&mut WorkloadState)) {
        let mut st = self.states.lock().expect("states lock");
        let s = st.entry(name.to_owned()).or_insert_with(|| WorkloadState {
            name: name.to_owned(),
            state: "starting".into(),
            restarts: 0,
            last_exit: None,
            pid: None,
        });
        f(s);
        let running = i64::from(s.state == "running");
        self.metrics.workload_running.get_or_create(&WorkloadLabel { workload: name.to_owned() }).set(running);
    }
}

/// What ended a run.
enum Outcome {
    Exited(std::io::Result<std::process::ExitStatus>),
    Stop,
    Unhealthy,
}

fn describe(st: &std::io::Result<std::process::ExitStatus>) -> (String, bool) {
    use std::os::unix::process::ExitStatusExt;
    match st {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => (format!("exit {c}"), c != 0),
            (None, Some(sig)) => (format!("signal {sig}"), true),
            _ => ("exit ?".into(), true),
        },
        Err(e) => (format!("wait failed: {e}"), true),
    }
}

fn signal_group(pid: u32, sig: rustix::process::Signal) {
    if let Some(p) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) {
        let _ = rustix::process::kill_process_group(p, sig);
    }
}

async fn run(inner: Arc<Inner>, spec: WorkloadSpec, dir: PathBuf, mut stop: watch::Receiver<bool>) {
    let name = spec.name.clone();
    let label = WorkloadLabel { workload: name.clone() };
    let mut failures = 0u32;
    loop {
        let started = Instant::now();
        let program =
            if spec.command.starts_with('/') { PathBuf::from(&spec.command) } else { dir.join(&spec.command) };
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(&spec.args)
            .env_clear()
            .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", &dir)
            .env("VOITHER_WORKLOAD", &name)
            .envs(&spec.env)
            .current_dir(spec.working_dir.as_ref().map_or_else(|| dir.clone(), PathBuf::from))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let (exit, failed) = match cmd.spawn() {
            Err(e) => {
                warn!(workload = %name, program = %program.display(), error = %e, "Workload cannot start.");
                (format!("cannot start: {e}"), true)
            }
            Ok(mut child) => {
                let pid = child.id().unwrap_or(0);
                info!(workload = %name, pid, "Workload started.");
                inner.set(&name, |s| {
                    s.state = "running".into();
                    s.pid = Some(pid);
                });
                let pumps: Vec<JoinHandle<()>> = [
                    child.stdout.take().map(|o| tokio::spawn(pump(inner.clone(), name.clone(), "stdout", o))),
                    child.stderr.take().map(|e| tokio::spawn(pump(inner.clone(), name.clone(), "stderr", e))),
                ]
                .into_iter()
                .flatten()
                .collect();
                let outcome = tokio::select! {
                    st = child.wait() => Outcome::Exited(st),
                    _ = stop.wait_for(|s| *s) => Outcome::Stop,
                    _ = unhealthy(spec.health.clone()) => Outcome::Unhealthy,
                };
                let result = match outcome {
                    Outcome::Exited(st) => describe(&st),
                    Outcome::Stop | Outcome::Unhealthy => {
                        signal_group(pid, rustix::process::Signal::TERM);
                        let st = match tokio::time::timeout(inner.grace, child.wait()).await {
                            Ok(st) => st,
                            Err(_) => {
                                warn!(workload = %name, pid, grace_ms = inner.grace.as_millis() as u64, "Workload ignored SIGTERM; killing it.");
                                signal_group(pid, rustix::process::Signal::KILL);
                                child.wait().await
                            }
                        };
                        let (d, _) = describe(&st);
                        if matches!(outcome, Outcome::Unhealthy) {
                            warn!(workload = %name, pid, "Workload failed its health probe; restarting it.");
                            (format!("unhealthy ({d})"), true)
                        } else {
                            (d, false)
                        }
                    }
                };
                // Whatever the workload started in its group goes with it.
                signal_group(pid, rustix::process::Signal::KILL);
                for p in pumps {
                    let _ = tokio::time::timeout(Duration::from_secs(2), p).await;
                }
                if *stop.borrow() {
                    info!(workload = %name, pid, exit = %result.0, "Workload stopped.");
                    inner.set(&name, |s| {
                        s.state = "stopped".into();
                        s.pid = None;
                        s.last_exit = Some(result.0.clone());
                    });
                    return;
                }
                result
            }
        };
        let restart = match spec.restart {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => failed,
            RestartPolicy::Never => false,
        };
        if started.elapsed() >= STABLE_RUN {
            failures = 0;
        }
        if !restart {
            info!(workload = %name, exit = %exit, "Workload exited; its restart policy keeps it stopped.");
            inner.set(&name, |s| {
                s.state = if failed { "failed" } else { "exited" }.into();
                s.pid = None;
                s.last_exit = Some(exit);
            });
            let _ = stop.wait_for(|s| *s).await;
            return;
        }
        let delay = Duration::from_millis(
            spec.backoff_min_ms.saturating_mul(1u64 << failures.min(20)).min(spec.backoff_max_ms),
        );
        failures = failures.saturating_add(1);
        warn!(workload = %name, exit = %exit, restart_in_ms = delay.as_millis() as u64, "Workload exited; restarting after a delay.");
        inner.set(&name, |s| {
            s.state = "backoff".into();
            s.pid = None;
            s.last_exit = Some(exit);
        });
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => {
                inner.set(&name, |s| s.state = "stopped".into());
                return;
            }
        }
        inner.metrics.workload_restarts.get_or_create(&label).inc();
        inner.set(&name, |s| s.restarts += 1);
    }
}

/// Resolves when the health probe failed `failures` times in a row; never without one.
async fn unhealthy(probe: Option<HealthProbe>) {
    let Some(p) = probe else { return std::future::pending().await };
    let every = Duration::from_millis(p.interval_ms);
    let mut failed = 0u32;
    loop {
        tokio::time::sleep(every).await;
        if http_ok(p.http_port, &p.http_path, every).await {
            failed = 0;
        } else {
            failed += 1;
            if failed >= p.failures {
                return;
            }
        }
    }
}

/// GET `path` on 127.0.0.1:`port`: a 2xx answer within `timeout`?
async fn http_ok(port: u16, path: &str, timeout: Duration) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).await.ok()?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await.ok()?;
        let status = std::str::from_utf8(&head[9..12]).ok()?;
        Some(status.starts_with('2'))
    };
    matches!(tokio::time::timeout(timeout, probe).await, Ok(Some(true)))
}

/// Turns output lines into records; never lets the workload wait on the store.
async fn pump(inner: Arc<Inner>, name: String, stream: &'static str, out: impl AsyncRead + Unpin) {
    let mut r = BufReader::new(out);
    let source = format!("workload/{name}/{stream}");
    let mut line: Vec<u8> = Vec::new();
    loop {
        // Read up to a newline, keeping at most `max_line` bytes of it.
        let (done, used, eof) = match r.fill_buf().await {
            Ok([]) => (!line.is_empty(), 0, true),
            Ok(buf) => match buf.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    let room = inner.max_line.saturating_sub(line.len());
                    line.extend_from_slice(&buf[..i.min(room)]);
                    (true, i + 1, false)
                }
                None => {
                    let room = inner.max_line.saturating_sub(line.len());
                    line.extend_from_slice(&buf[..buf.len().min(room)]);
                    (false, buf.len(), false)
                }
            },
            Err(_) => (!line.is_empty(), 0, true),
        };
        r.consume(used);
        if done {
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let rec = NewRecord {
                lane: inner.lane.clone(),
                ingest_ts_ms: crate::unix_ms(),
                source: source.clone(),
                content_type: Some(LOG_CONTENT_TYPE.into()),
                payload: std::mem::take(&mut line),
            };
            if inner.log_tx.try_send(rec).is_err() {
                inner.metrics.workload_log_dropped.get_or_create(&WorkloadLabel { workload: name.clone() }).inc();
            }
        }
        if eof {
            return;
        }
    }
}
