//! The pieces of `voither-bench`: one module per scenario, and what they share — the
//! result rows, the process watcher for memory and CPU, and small timing helpers.
//!
//! Every figure is measured side by side with a baseline taken in the same run on the
//! same machine, so the ratio says how close VOITHER Edge comes to what the broker,
//! the disk or the transport allows, independently of how fast the machine is.

pub mod bridge;
pub mod latency;
pub mod longlink;
pub mod pipeline;
pub mod store;
pub mod transport;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Payload size of every record in every scenario.
pub const PAYLOAD: usize = 256;

/// What the run was asked to do.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Records for ingest and the sync backlog.
    pub records: u64,
    /// Short phases and smaller counts: a smoke run.
    pub quick: bool,
}

impl Opts {
    /// A phase length: `full` seconds, or `quick` in a quick run.
    pub fn secs(&self, full: u64, quick: u64) -> Duration {
        Duration::from_secs(if self.quick { quick } else { full })
    }
}

/// One line of the result table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Scenario (`ingest`, `store`, `sync`, `latency`, `footprint`, `longlink`).
    pub scenario: String,
    /// What was measured.
    pub figure: String,
    /// The value.
    pub value: f64,
    /// Its unit.
    pub unit: String,
    /// What it is compared with, and its value (same unit).
    pub baseline: Option<(String, f64)>,
    /// `value / baseline`.
    pub ratio: Option<f64>,
    /// The target, in words.
    pub target: String,
    /// Whether the target is met (`None`: no target, or not measurable).
    pub met: Option<bool>,
    /// How it was measured, and anything else worth knowing.
    pub note: String,
}

impl Row {
    /// A row without baseline or target.
    pub fn new(scenario: &str, figure: &str, value: f64, unit: &str) -> Row {
        Row {
            scenario: scenario.into(),
            figure: figure.into(),
            value,
            unit: unit.into(),
            baseline: None,
            ratio: None,
            target: String::new(),
            met: None,
            note: String::new(),
        }
    }

    /// Adds a baseline and computes the ratio.
    pub fn baseline(mut self, name: &str, value: f64) -> Row {
        self.ratio = (value > 0.0).then(|| self.value / value);
        self.baseline = Some((name.into(), value));
        self
    }

    /// Sets the target: `text` for the table, `met` whether it holds.
    pub fn target(mut self, text: &str, met: bool) -> Row {
        self.target = text.into();
        self.met = Some(met);
        self
    }

    /// Sets the note.
    pub fn note(mut self, note: impl Into<String>) -> Row {
        self.note = note.into();
        self
    }
}

/// Memory and CPU of one process, from `/proc/<pid>`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ProcSample {
    /// Resident set size now, bytes (`VmRSS`).
    pub rss: u64,
    /// Peak resident set size since start, bytes (`VmHWM`).
    pub hwm: u64,
    /// User + system CPU time since start, seconds.
    pub cpu_s: f64,
}

/// Reads `/proc/<pid>/status` and `/proc/<pid>/stat`; `None` once the process is gone.
pub fn sample(pid: u32) -> Option<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |key: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| rest.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let cpu_s = (ticks(11) + ticks(12)) as f64 / clock_ticks() as f64;
    Some(ProcSample { rss: kb("VmRSS:"), hwm: kb("VmHWM:"), cpu_s })
}

fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100)
    })
}

/// Samples a process's RSS every 100 ms on a thread, so a phase's steady level can be
/// read afterwards (the peak is the kernel's own `VmHWM`).
#[derive(Debug)]
pub struct Watch {
    pid: u32,
    samples: Arc<Mutex<Vec<(Instant, u64)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watch {
    /// Starts sampling `pid`.
    pub fn start(pid: u32) -> Watch {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (samples.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match sample(pid) {
                    Some(p) => s.lock().expect("samples").push((Instant::now(), p.rss)),
                    None => break,
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Watch { pid, samples, stop, thread: Some(thread) }
    }

    /// Memory and CPU now.
    pub fn now(&self) -> ProcSample {
        sample(self.pid).unwrap_or_default()
    }

    /// Median RSS of the samples taken in `from..to`.
    pub fn median_rss(&self, from: Instant, to: Instant) -> u64 {
        let mut v: Vec<u64> =
            self.samples.lock().expect("samples").iter().filter(|(t, _)| *t >= from && *t <= to).map(|s| s.1).collect();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or_else(|| self.now().rss)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Bytes as MiB.
pub fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Polls `f` every `every` until it returns true or `timeout` passes; returns when it
/// turned true.
pub fn poll_until(timeout: Duration, every: Duration, mut f: impl FnMut() -> bool) -> Option<Instant> {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return Some(Instant::now());
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// A counter metric from a Prometheus page (prometheus-client names counters `<name>_total`).
pub fn counter(addr: std::net::SocketAddr, name: &str) -> Option<f64> {
    voither_tests::procs::metric(addr, &format!("{name}_total")).or_else(|| voither_tests::procs::metric(addr, name))
}

/// A fresh temporary folder on the disk the store uses (under `TMPDIR`, usually `/tmp`).
pub fn tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir().expect("tempdir")
}

/// The lanes of a benchmark gateway: everything in `telemetry`, with a budget that holds
/// the whole backlog (the default 256 MiB would evict part of a 1M-record backlog).
pub const BENCH_LANES: &str =
    "[[lanes]]\nname = \"telemetry\"\npriority = 1\ntopics = [\"devices/#\"]\nmax_bytes = 4294967296\n";

/// Mosquitto's executable.
pub fn mosquitto_exe() -> &'static Path {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .expect("mosquitto is not installed: apt-get install -y mosquitto")
}

/// Percentile `q` (0..=1) of sorted `v`.
pub fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v[i.min(v.len() - 1)]
}
