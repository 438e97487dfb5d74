//! `voither-sim`: simulated devices publishing QoS 1 telemetry to an MQTT broker.
//!
//! Each message carries its device id and a counter, in the simulator's own payload
//! layout or, with `--frames`, as a VOITHER device frame (`voither_firmware::frame`)
//! with deterministic readings; with `--acked-out FILE` the simulator writes, per device, the counters the broker acknowledged, which
//! `voither-sim check` compares with a hub export.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use voither_tests::sim::{SimConfig, SimProgress};

#[derive(Debug, Parser)]
#[command(version, about = "Simulated devices for VOITHER Edge: publish, then check what reached the hub.")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Publish messages from N devices and report the acknowledged counts.
    Publish {
        /// Broker host.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Broker port.
        #[arg(long, default_value_t = 1883)]
        port: u16,
        /// Number of devices.
        #[arg(long, default_value_t = 10)]
        devices: u32,
        /// Messages per device.
        #[arg(long, default_value_t = 1000)]
        messages: u64,
        /// Messages per second per device (0: as fast as the broker acks).
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// Payload size, bytes (at least 16; ignored with --frames).
        #[arg(long, default_value_t = 256)]
        payload_size: usize,
        /// Every n-th message of a device goes to devices/<id>/alarm (0: never).
        #[arg(long, default_value_t = 0)]
        alarm_every: u64,
        /// Write the acknowledged counters (JSON) here, for `check`.
        #[arg(long)]
        acked_out: Option<PathBuf>,
        /// Publish device frames (CBOR, deterministic readings) to devices/<id>/frame
        /// instead of simulator payloads to devices/<id>/telemetry.
        #[arg(long)]
        frames: bool,
    },
    /// Compare a hub export (JSON lines on stdin or --export) with acknowledged counters.
    Check {
        /// The file written by `publish --acked-out`.
        #[arg(long)]
        acked: PathBuf,
        /// Export file (default: stdin).
        #[arg(long)]
        export: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Cmd::Publish { host, port, devices, messages, rate, payload_size, alarm_every, acked_out, frames } => {
            if frames && messages > 1 << 32 {
                eprintln!("voither-sim: --frames allows at most 4294967296 --messages (frame counters are u32)");
                return ExitCode::from(2);
            }
            let cfg = SimConfig {
                host,
                port,
                devices,
                messages,
                rate,
                payload_size,
                alarm_every,
                frames,
                ..Default::default()
            };
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            let progress = Arc::new(SimProgress::default());
            let report = rt.block_on(voither_tests::sim::run(cfg.clone(), progress));
            let total = report.total_acked();
            let secs = report.elapsed.as_secs_f64();
            let payload =
                if cfg.frames { "device frames".to_string() } else { format!("payload {} bytes", cfg.payload_size) };
            println!(
                "{total} messages acknowledged by the broker from {} devices in {secs:.2} s: {:.0} msg/s, {payload}",
                cfg.devices,
                total as f64 / secs,
            );
            if let Some(p) = acked_out {
                if let Err(e) = std::fs::write(&p, serde_json::to_vec(&report.acked).expect("json")) {
                    eprintln!("voither-sim: cannot write {}: {e}", p.display());
                    return ExitCode::from(1);
                }
            }
            ExitCode::SUCCESS
        }
        Cmd::Check { acked, export } => {
            let acked: Vec<Vec<u64>> = match std::fs::read(&acked)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("voither-sim: cannot read {}: {e}", acked.display());
                    return ExitCode::from(1);
                }
            };
            let text = match export {
                Some(p) => std::fs::read_to_string(&p).map_err(|e| format!("cannot read {}: {e}", p.display())),
                None => std::io::read_to_string(std::io::stdin()).map_err(|e| format!("cannot read stdin: {e}")),
            };
            let text = match text {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("voither-sim: {e}");
                    return ExitCode::from(1);
                }
            };
            let rows = match voither_tests::check::parse_export(&text) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("voither-sim: {e}");
                    return ExitCode::from(1);
                }
            };
            let rep = voither_tests::check::check(&rows, &acked);
            println!("{}", rep.summary());
            if rep.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
    }
}
