//! `voither-fleet`: thousands of simulated gateways against one real hub, to measure
//! what one hub replica sustains. Not a test; README "Performance" → "Fleet simulator".
//!
//! ```text
//! cargo build --release -p voither-tests -p voither-hub --bins
//! VOITHER_BIN_DIR=target/release target/release/voither-fleet --gateways 1000 --rate 10 --json fleet.json
//! ```
//!
//! Blocking harness code around a runtime it owns (see [`voither_tests::fleet`]).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use voither_tests::fleet::{self, FleetOpts};

/// Simulates a fleet of gateways against one voither-hub process it starts itself, and
/// reports what the hub sustained: gateways, records/s, MB/s, ack latency, hub RSS and
/// CPU.
///
/// Every simulated gateway has its own client certificate (issued in memory by the CA
/// of a `voither-hub pki` folder) and its own QUIC connection; all of them share one UDP
/// socket of this process. They speak the real sync protocol (voither-proto's gateway
/// session) and send one lane of records with unique per-gateway seqs. The hub binary is
/// taken from VOITHER_BIN_DIR, else from next to this executable.
///
/// The simulator runs on the same machine as the hub and uses CPU of its own: the
/// report shows both.
#[derive(Debug, Parser)]
#[command(name = "voither-fleet")]
struct Cli {
    /// Simulated gateways, each with its own certificate and QUIC connection.
    #[arg(long, default_value_t = 1000)]
    gateways: usize,
    /// Records per second each gateway produces (fractions allowed, e.g. 0.2).
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Payload bytes per record.
    #[arg(long, default_value_t = 256)]
    record_bytes: usize,
    /// Most records per batch (the agent's uplink.batch_records default is 1024). A
    /// gateway sends what it has as soon as its window has room, so at low rates batches
    /// hold few records whatever this says.
    #[arg(long, default_value_t = 1024)]
    batch: usize,
    /// Batches in flight per gateway before it waits for an ack (the agent's
    /// uplink.window_batches default is 8).
    #[arg(long, default_value_t = 8)]
    window: usize,
    /// Records become sendable in groups at most this often, ms (like the agent's
    /// ingest group commit); at low rates each record is sent when it is due.
    #[arg(long, default_value_t = 10)]
    flush_ms: u64,
    /// Length of the steady window that the figures cover, seconds. It starts when
    /// every gateway has connected (or failed to) and the ramp is over.
    #[arg(long, default_value_t = 30)]
    duration_s: u64,
    /// Spread the gateways' connects evenly over this many seconds, so the hub is not
    /// hit by every handshake at once. The report says how long connecting all took.
    #[arg(long, default_value_t = 10)]
    ramp_s: u64,
    /// A gateway that has no `Welcome` this many seconds after it started connecting
    /// counts as failed.
    #[arg(long, default_value_t = 20)]
    connect_timeout_s: u64,
    /// TOML file appended to the hub's config: whole sections other than [hub], [tls]
    /// and [admin], e.g. `[sink]` with `kind = "postgres"` and `url = "…"` to measure
    /// the PostgreSQL sink instead of the embedded one.
    #[arg(long, value_name = "FILE")]
    hub_extra_config: Option<PathBuf>,
    /// RUST_LOG of the hub process (default `info,quinn=warn`: two log lines per
    /// connection, written to hub.log on the worker threads).
    #[arg(long, default_value = "info,quinn=warn")]
    hub_log: String,
    /// Worker threads of the simulator's runtime (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Folder for the PKI and the hub's data and log (must not hold a previous run;
    /// default: a temporary folder, removed at the end).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Write the report as JSON to this file.
    #[arg(long, value_name = "OUT")]
    json: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let extra = match &cli.hub_extra_config {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("voither-fleet: cannot read {}: {e}", p.display());
                return ExitCode::from(64);
            }
        },
        None => String::new(),
    };
    let opts = FleetOpts {
        gateways: cli.gateways,
        rate: cli.rate,
        record_bytes: cli.record_bytes,
        batch: cli.batch,
        window: cli.window,
        flush_ms: cli.flush_ms,
        duration: Duration::from_secs(cli.duration_s),
        ramp: Duration::from_secs(cli.ramp_s),
        connect_timeout: Duration::from_secs(cli.connect_timeout_s),
        hub_extra_config: extra,
        threads: cli.threads,
        hub_log: cli.hub_log.clone(),
        dir: cli.dir.clone(),
        progress: true,
        ..FleetOpts::default()
    };
    let mut run = match fleet::run(&opts) {
        Ok(r) => r,
        Err(e @ fleet::FleetError::Opts(_)) => {
            eprintln!("voither-fleet: {e}");
            return ExitCode::from(64);
        }
        Err(e) => {
            eprintln!("voither-fleet: {e}");
            return ExitCode::from(1);
        }
    };
    run.hub.stop();
    print!("{}", run.report.table());
    if let Some(out) = &cli.json {
        let json = serde_json::to_string_pretty(&run.report).expect("report as JSON");
        if let Err(e) = std::fs::write(out, json) {
            eprintln!("voither-fleet: cannot write {}: {e}", out.display());
            return ExitCode::from(1);
        }
        eprintln!("written: {}", out.display());
    }
    if let Some(d) = &cli.dir {
        eprintln!("PKI, hub data and hub log kept in {}", d.display());
    }
    ExitCode::SUCCESS
}
