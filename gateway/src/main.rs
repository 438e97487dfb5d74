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
    /// Inspect the local store.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Report the store's health (JSON) without changing it: exit 0 healthy, 2 corrupt
    /// or inconsistent, 1 when it cannot be read (for example a running gateway has it
    /// open: use its /status instead).
    Check {
        /// Configuration file (TOML); the store is `<gateway.data_dir>/store.redb`.
        #[arg(short, long, env = "VOITHER_GATEWAY_CONFIG", conflicts_with = "file")]
        config: Option<PathBuf>,
        /// A store file to check directly.
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

fn store_check(config: Option<PathBuf>, file: Option<PathBuf>) -> ExitCode {
    let path = match (config, file) {
        (_, Some(f)) => f,
        (Some(c), None) => match Config::load(&c, &ProcessEnv) {
            Ok(cfg) => cfg.gateway.data_dir.join("store.redb"),
            Err(e) => {
                eprintln!("voither-gateway: {e}");
                return ExitCode::from(64);
            }
        },
        (None, None) => {
            eprintln!("voither-gateway: store check needs --config FILE or --file STORE");
            return ExitCode::from(64);
        }
    };
    if !path.exists() {
        eprintln!("voither-gateway: no store at {}", path.display());
        return ExitCode::from(1);
    }
    match voither_gateway::store::check(&path) {
        Ok(rep) => {
            println!("{}", serde_json::to_string_pretty(&rep).expect("json"));
            if rep.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            }
        }
        Err(e) if e.is_corrupt() => {
            eprintln!("voither-gateway: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("voither-gateway: {e}");
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (path, grace) = match cli.command {
        Command::Run { ref config, grace_s } => (config, Some(grace_s)),
        Command::CheckConfig { ref config } => (config, None),
        Command::Store { command: StoreCommand::Check { config, file } } => return store_check(config, file),
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
