//! `voither-bench`: the side-by-side benchmark of README "Performance". Not a test.
//!
//! Each scenario measures VOITHER Edge next to a baseline taken in the same run on the
//! same machine (the broker's own ceiling, the disk's fdatasync limit, bare quinn, a
//! Mosquitto bridge), prints a table and writes it as JSON.
//!
//! ```text
//! cargo build --release -p voither-tests -p voither-gateway -p voither-hub --bins
//! VOITHER_BIN_DIR=target/release target/release/voither-bench --out bench.json
//! ```
//!
//! This is blocking harness code around other processes; its few async parts run on a
//! runtime it owns, so the workspace's ban on `std::time::Instant` and
//! `std::thread::sleep` (meant for async code) does not apply to it.
#![forbid(unsafe_code)]
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

#[path = "../bench/mod.rs"]
mod bench;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bench::{Opts, Row, PAYLOAD};
use clap::Parser;

/// Runs the VOITHER Edge benchmark scenarios and prints a table (also written as JSON).
#[derive(Debug, Parser)]
#[command(name = "voither-bench")]
struct Cli {
    /// Records for durable ingest and the sync backlog (default 1,000,000; 100,000 with --quick).
    #[arg(long)]
    records: Option<u64>,
    /// A fast smoke run: fewer records, shorter phases.
    #[arg(long)]
    quick: bool,
    /// Where to write the JSON results.
    #[arg(long, default_value = "voither-bench.json")]
    out: PathBuf,
    /// Run only these scenarios (comma separated): ingest, store, sync, latency, footprint, longlink.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Folder with aarch64 builds of voither-gateway and voither-hub, for their stripped size.
    #[arg(long, env = "VOITHER_BENCH_AARCH64_DIR")]
    aarch64_dir: Option<PathBuf>,
    /// Internal: serve one bare quinn bulk transfer with the lab PKI in this folder,
    /// printing the address first and this process's CPU time last (the two-process
    /// transport baseline of `sync`).
    #[arg(long, hide = true)]
    quinn_server: Option<PathBuf>,
}

const SCENARIOS: [&str; 6] = ["ingest", "store", "sync", "latency", "footprint", "longlink"];

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    if let Some(pki) = cli.quinn_server {
        rt.block_on(bench::transport::serve_child(&pki));
        return ExitCode::SUCCESS;
    }
    if let Some(bad) = cli.only.iter().find(|s| !SCENARIOS.contains(&s.as_str())) {
        eprintln!("voither-bench: unknown scenario {bad:?}; known: {}", SCENARIOS.join(", "));
        return ExitCode::from(64);
    }
    let want = |s: &str| cli.only.is_empty() || cli.only.iter().any(|o| o == s);
    let opts = Opts { records: cli.records.unwrap_or(if cli.quick { 100_000 } else { 1_000_000 }), quick: cli.quick };
    let meta_start = meta();
    let started = std::time::Instant::now();
    let mut rows: Vec<Row> = Vec::new();

    let loopback = if want("ingest") || want("sync") {
        let p = bench::pipeline::run(&opts, &rt, want("ingest"), want("sync"), &mut rows);
        if want("sync") {
            sync_rows(&opts, &rt, &p, &mut rows)
        } else {
            None
        }
    } else {
        None
    };
    if want("store") {
        bench::store::run(&opts, &mut rows);
    }
    if want("latency") {
        bench::latency::run(&opts, &rt, &mut rows);
    }
    if want("longlink") {
        bench::longlink::run(&opts, &rt, loopback, &mut rows);
    }
    if want("footprint") {
        binary_sizes(cli.aarch64_dir.as_deref(), &mut rows);
    }

    let meta_end = meta();
    print_table(&rows);
    let json = serde_json::json!({
        "tool": "voither-bench",
        "records": opts.records,
        "quick": opts.quick,
        "payload_bytes": PAYLOAD,
        "wall_seconds": started.elapsed().as_secs_f64(),
        "start": meta_start,
        "end": meta_end,
        "rows": rows,
    });
    if let Err(e) = std::fs::write(&cli.out, serde_json::to_string_pretty(&json).expect("json")) {
        eprintln!("voither-bench: cannot write {}: {e}", cli.out.display());
        return ExitCode::from(1);
    }
    eprintln!("written: {}", cli.out.display());
    ExitCode::SUCCESS
}

/// Scenario `sync`: the drain measured by the pipeline, bare quinn with the same bytes,
/// and the Mosquitto bridge with the same records. Returns the drain rate (records/s).
fn sync_rows(
    opts: &Opts,
    rt: &tokio::runtime::Runtime,
    p: &bench::pipeline::PipelineResult,
    rows: &mut Vec<Row>,
) -> Option<f64> {
    let (secs, fl) = (p.drain_secs?, p.drain_first_last_secs?);
    let n = p.records;
    let rate = n as f64 / fl;
    let bytes = n * PAYLOAD as u64;

    eprintln!("[sync] bare quinn: {bytes} bytes on one stream over loopback …");
    let pki_dir = bench::tempdir("voither-bench-quinn-");
    voither_tests::procs::Pki::generate(pki_dir.path(), &["gw-1"]);
    let (got, el) = rt.block_on(async {
        let server = bench::transport::server(pki_dir.path());
        let addr = server.local_addr().expect("addr");
        let srv = tokio::spawn(bench::transport::serve_one(server));
        let r = bench::transport::bulk(pki_dir.path(), addr, bytes, Duration::from_secs(600)).await;
        let _ = srv.await;
        r
    });
    // Records of the transfers (bytes ÷ payload size), records/s and MB/s.
    let records = |b: u64| b as f64 / PAYLOAD as f64;
    let (quinn_rate, quinn_mbps) = (records(got) / el.as_secs_f64(), got as f64 / el.as_secs_f64() / 1e6);
    eprintln!("[sync] bare quinn: {quinn_mbps:.1} MB/s");
    eprintln!("[sync] bare quinn, server in a second process: {bytes} bytes …");
    let child = rt.block_on(bench::transport::bulk_to_child(pki_dir.path(), bytes));
    let secs2 = child.elapsed.as_secs_f64();
    let (quinn2_rate, quinn2_mbps) = (records(child.bytes) / secs2, child.bytes as f64 / secs2 / 1e6);
    eprintln!("[sync] bare quinn, two processes: {quinn2_mbps:.1} MB/s");

    let bridge = bench::bridge::run(opts, rt, n);
    let mbps = bench::pipeline::drain_mbps(n, fl);
    rows.push(
        Row::new("sync", &format!("drain {n} records gateway → hub (embedded sink), first → last"), rate, "records/s")
            .baseline("bare quinn, same bytes, one stream", quinn_rate)
            .target("≥ 0.50 of bare quinn", rate / quinn_rate >= 0.5)
            .note(format!("{mbps:.1} MB/s of payload; bare quinn {quinn_mbps:.1} MB/s")),
    );
    rows.push(
        Row::new("sync", "drain vs bare quinn with client and server in two processes", rate, "records/s")
            .baseline("bare quinn, same bytes, one stream, server in a second process", quinn2_rate)
            .note(format!(
                "context for the row above: gateway and hub are two processes; bare quinn that way moved {quinn2_mbps:.1} MB/s"
            )),
    );
    if let Some((gcpu, hcpu)) = p.drain_cpu_s {
        // CPU per million records, of the drain and of the transport alone.
        let per_m = |cpu: f64, records: f64| cpu * 1e6 / records;
        let quinn_records = records(child.bytes);
        let drain_cpu = per_m(gcpu + hcpu, n as f64);
        let quinn_cpu = per_m(child.client_cpu_s + child.server_cpu_s, quinn_records);
        rows.push(
            Row::new(
                "sync",
                "CPU per million records: drain (gateway + hub) vs bare quinn in two processes",
                drain_cpu,
                "CPU s",
            )
            .baseline("bare quinn client + server, same bytes", quinn_cpu)
            .note(format!(
                "gateway {:.2} + hub {:.2}; quinn client {:.2} + server {:.2} CPU s per million records",
                per_m(gcpu, n as f64),
                per_m(hcpu, n as f64),
                per_m(child.client_cpu_s, quinn_records),
                per_m(child.server_cpu_s, quinn_records)
            )),
        );
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        rows.push(
            Row::new(
                "sync",
                "drain rate the drain's CPU cost allows on this machine",
                cores as f64 * 1e6 / drain_cpu,
                "records/s",
            )
            .baseline("bare quinn, same bytes, one stream", quinn_rate)
            .note(format!(
                "{cores} cores ÷ the row above's CPU per record, every core busy with the drain and nothing else: \
                     the ratio is the most of the sync target's baseline the drain could reach at this CPU cost"
            )),
        );
    }
    match bridge {
        Some(b) => {
            let br = b.records as f64 / b.first_last_secs;
            rows.push(
                Row::new("sync", "drain vs Mosquitto bridge, same records", rate, "records/s")
                    .baseline("edge Mosquitto → bridge (QoS 1) → central Mosquitto", br)
                    .target("≥ 3× the bridge", rate / br >= 3.0)
                    .note(format!(
                        "bridge first → last {:.2} s ({:.2} s from central start); the brokers do not fsync per message",
                        b.first_last_secs, b.from_start_secs
                    )),
            );
        }
        None => rows.push(Row::new("sync", "Mosquitto bridge", 0.0, "records/s").note("not every record arrived")),
    }
    let per_m = secs * 1e6 / n as f64;
    rows.push(
        Row::new("sync", "drain time per 1M records, hub up → last record durable", per_m, "s")
            .target("< 10 s", per_m < 10.0)
            .note(format!("{secs:.2} s for {n} records, including the gateway's reconnect (backoff ≤ 200 ms, connect timeout 500 ms)")),
    );
    rows.push(Row::new("sync", "drain payload throughput", mbps, "MB/s"));
    Some(rate)
}

/// Stripped size of the release binaries (x86_64 from `VOITHER_BIN_DIR`, aarch64 from
/// `--aarch64-dir` when given).
fn binary_sizes(aarch64: Option<&std::path::Path>, rows: &mut Vec<Row>) {
    let tmp = bench::tempdir("voither-bench-strip-");
    let mut one = |arch: &str, path: PathBuf, strip: &str| {
        if !path.exists() {
            rows.push(
                Row::new("footprint", &format!("stripped binary {} ({arch})", file_name(&path)), 0.0, "MiB")
                    .note(format!("{} not found: not measured", path.display())),
            );
            return;
        }
        let out = tmp.path().join(format!("{arch}-{}", file_name(&path)));
        let ok = std::process::Command::new(strip)
            .arg("-o")
            .arg(&out)
            .arg(&path)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        let size = std::fs::metadata(if ok { &out } else { &path }).map(|m| m.len()).unwrap_or(0);
        let mib = bench::mib(size);
        rows.push(
            Row::new("footprint", &format!("stripped binary {} ({arch})", file_name(&path)), mib, "MiB")
                .target("< 10 MiB", mib < 10.0)
                .note(if ok {
                    format!("{strip} of {}", path.display())
                } else {
                    format!("{strip} failed; size as built")
                }),
        );
    };
    for b in ["voither-gateway", "voither-hub"] {
        one("x86_64", voither_tests::procs::bin(b), "strip");
    }
    if let Some(dir) = aarch64 {
        for b in ["voither-gateway", "voither-hub"] {
            one("aarch64", dir.join(b), "aarch64-linux-gnu-strip");
        }
    }
}

fn file_name(p: &std::path::Path) -> String {
    p.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Date, commit, machine and load, for the record.
fn meta() -> serde_json::Value {
    let sh = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    serde_json::json!({
        "date": sh("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "commit": sh("git", &["rev-parse", "--short", "HEAD"]),
        "dirty": !sh("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty(),
        "nproc": sh("nproc", &[]),
        "cpu": cpu,
        "loadavg": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "kernel": sh("uname", &["-r"]),
    })
}

fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        "n/a".into()
    } else if v.abs() >= 1000.0 {
        let s = format!("{:.0}", v);
        let (neg, digits) = s.strip_prefix('-').map_or((false, s.as_str()), |d| (true, d));
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        if neg {
            format!("-{out}")
        } else {
            out
        }
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn print_table(rows: &[Row]) {
    println!("| scenario | figure | value | baseline | ratio | target | met? |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        let base = r.baseline.as_ref().map_or(String::new(), |(n, v)| format!("{} {} ({n})", fmt_num(*v), r.unit));
        let ratio = r.ratio.map_or(String::new(), |x| format!("{x:.2}"));
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "",
        };
        println!(
            "| {} | {} | {} {} | {base} | {ratio} | {} | {met} |",
            r.scenario,
            r.figure,
            fmt_num(r.value),
            r.unit,
            r.target
        );
    }
}
