//! `voither-gateway`: the edge agent.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use voither_gateway::config::{Config, ProcessEnv};

/// VOITHER Edge gateway: MQTT ingest, durable local store, QUIC sync to the hub.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent until SIGTERM or SIGINT.
    Run {
        /// Configuration file (TOML).
        #[arg(short, long, env = "VOITHER_GATEWAY_CONFIG")]
        config: PathBuf,
        /// How long to drain on shutdown before stopping anyway, seconds.
        #[arg(long, default_value_t = 10)]
        grace_s: u64,
    },
    /// Check a configuration file and exit (0 if valid, 64 if not).
    CheckConfig {
        /// Configuration file (TOML).
        #[arg(short, long, env = "VOITHER_GATEWAY_CONFIG")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (path, grace) = match &cli.command {
        Command::Run { config, grace_s } => (config, Some(*grace_s)),
        Command::CheckConfig { config } => (config, None),
    };
    let cfg = match Config::load(path, &ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("voither-gateway: {e}");
            return ExitCode::from(64);
        }
    };
    let Some(grace) = grace else {
        println!("{}: ok", path.display());
        return ExitCode::SUCCESS;
    };
    init_tracing(cfg.log.json);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match rt.block_on(voither_gateway::run(cfg, shutdown_signal(), Duration::from_secs(grace))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("voither-gateway: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            eprintln!("{msg}");
            ExitCode::from(1)
        }
    }
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=warn,quinn=warn"));
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
