//! `voither-demo`: the whole pipeline on one machine, no external services.
//!
//! Creates a lab PKI, starts a hub (embedded sink) and a gateway with its embedded MQTT
//! broker, publishes from simulated devices, prints live progress from the gateway's
//! `/status`, and ends by checking the hub's export: every acknowledged message exactly
//! once.
//!
//! A blocking program outside the async runtime: `std::time::Instant` and sleeps
//! between `/status` polls are fine here.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use voither_tests::procs::{free_tcp_port, Gateway, GatewayOpts, Hub, Pki};
use voither_tests::sim::{SimConfig, SimProgress};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Run hub, gateway (embedded broker) and simulated devices, then check exactly-once delivery."
)]
struct Cli {
    /// Working folder (PKI, configs, data, logs); emptied first.
    #[arg(long, default_value = "demo-run")]
    dir: PathBuf,
    /// Number of simulated devices.
    #[arg(long, default_value_t = 10)]
    devices: u32,
    /// Messages per device.
    #[arg(long, default_value_t = 2000)]
    messages: u64,
    /// Payload size, bytes.
    #[arg(long, default_value_t = 256)]
    payload_size: usize,
    /// Messages per second per device (0: as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = std::fs::remove_dir_all(&cli.dir);
    std::fs::create_dir_all(&cli.dir).expect("work dir");
    let dir = std::fs::canonicalize(&cli.dir).expect("work dir");
    println!("==> PKI (CA, hub and gateway certificates) in {}", dir.join("pki").display());
    let pki = Pki::generate(&dir.join("pki"), &["gateway-1"]);
    println!("==> hub (embedded sink)");
    let mut hub = Hub::start(&dir.join("hub"), &pki, "hub-1");
    println!("    QUIC {}  admin http://{}", hub.addr, hub.admin);
    let mqtt_port = free_tcp_port();
    println!("==> gateway with embedded MQTT broker on 127.0.0.1:{mqtt_port}");
    let mut gw =
        Gateway::start(&dir.join("gateway"), &pki, &GatewayOpts::embedded("gateway-1", mqtt_port, vec![hub.addr]));
    println!("    admin http://{}  (/status /metrics /healthz /readyz)", gw.admin);
    let cfg = SimConfig {
        port: mqtt_port,
        devices: cli.devices,
        messages: cli.messages,
        payload_size: cli.payload_size,
        rate: cli.rate,
        alarm_every: 50,
        ..Default::default()
    };
    let total = u64::from(cli.devices) * cli.messages;
    println!(
        "==> {} devices publishing {} messages each ({} bytes, QoS 1)",
        cli.devices, cli.messages, cli.payload_size
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let progress = Arc::new(SimProgress::default());
    let sim = rt.spawn(voither_tests::sim::run(cfg, progress.clone()));
    let started = Instant::now();
    let mut ingest_done: Option<Duration> = None;
    let mut last = String::new();
    let report = loop {
        std::thread::sleep(Duration::from_millis(500));
        let st = gw.status();
        let (ingested, stored, synced, backlog) = st.as_ref().map_or((0, 0, 0, 0), |s| {
            let lanes = s["lanes"].as_array().cloned().unwrap_or_default();
            let sum = |k: &str| lanes.iter().map(|l| l[k].as_u64().unwrap_or(0)).sum::<u64>();
            (sum("ingested_records"), sum("stored_records"), sum("synced_records"), sum("backlog_records"))
        });
        let line = format!(
            "[{:>5.1}s] devices acked {:>7}  ingested {:>7}  stored {:>7}  synced {:>7}  backlog {:>6}",
            started.elapsed().as_secs_f64(),
            progress.acked.load(Ordering::Relaxed),
            ingested,
            stored,
            synced,
            backlog
        );
        if line[9..] != last[last.len().min(9)..] {
            println!("{line}");
            last = line;
        }
        if ingest_done.is_none() && stored >= total {
            ingest_done = Some(started.elapsed());
        }
        if sim.is_finished() && synced >= total && backlog == 0 {
            break rt.block_on(sim).expect("simulator");
        }
        if started.elapsed() > Duration::from_secs(600) {
            eprintln!("FAILED: pipeline did not drain within 10 minutes\n{}\n{}", gw.log_tail(), hub.log_tail());
            return ExitCode::from(1);
        }
    };
    let all = started.elapsed();
    let ingest = ingest_done.unwrap_or(all);
    println!("==> checking the hub's export");
    let rows = hub.export();
    let rep = voither_tests::check::check(&rows, &report.acked);
    gw.stop();
    hub.stop();
    let mb = (total * cli.payload_size as u64) as f64 / 1e6;
    println!(
        "ingest: {total} records in {:.2} s = {:.0} records/s ({:.1} MB/s payload); end to end (synced at hub): {:.2} s = {:.0} records/s",
        ingest.as_secs_f64(),
        total as f64 / ingest.as_secs_f64(),
        mb / ingest.as_secs_f64(),
        all.as_secs_f64(),
        total as f64 / all.as_secs_f64()
    );
    println!("{}", rep.summary());
    if rep.ok() && rep.expected == total {
        println!(
            "OK: all {total} messages from {} devices reached the hub exactly once, in order, intact.",
            cli.devices
        );
        ExitCode::SUCCESS
    } else {
        println!("FAILED: delivery check did not pass; logs are in {}", dir.display());
        ExitCode::from(1)
    }
}
