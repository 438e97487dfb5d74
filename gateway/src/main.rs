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
        /// Log JSON lines instead of human-readable text (same as `[log] json = true`).
        /// `RUST_LOG` picks the lines (default `info,rumqttd=warn,quinn=warn`).
        #[arg(long)]
        log_json: bool,
        /// Export tracing spans (`sync_batch`: batch sent until the hub acked it durable)
        /// over OTLP/HTTP (JSON, plain http) to `<URL>/v1/traces`, e.g. `http://127.0.0.1:4318`.
        /// Needs a build with the cargo feature `otlp`; other builds log a warning and
        /// export nothing. Spans exported: `VOITHER_OTLP_FILTER` (default: INFO spans).
        #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
        otlp_endpoint: Option<String>,
    },
    /// Check a configuration file and exit (0 if valid, 64 if not).
    CheckConfig {
        /// Configuration file (TOML).
        #[arg(short, long, env = "VOITHER_GATEWAY_CONFIG")]
        config: PathBuf,
    },
    /// Show the running gateway's `/status` as a table (or JSON).
    Status {
        /// Configuration file (TOML); the gateway's admin endpoint is `admin.listen`.
        #[arg(short, long, env = "VOITHER_GATEWAY_CONFIG")]
        config: PathBuf,
        /// Print the JSON of `/status` instead of a table.
        #[arg(long)]
        json: bool,
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
        /// Configuration file (TOML); the store is the folder `<gateway.data_dir>/store`
        /// (or, not yet moved by a start of this version, the file `store.redb`).
        #[arg(short, long, env = "VOITHER_GATEWAY_CONFIG", conflicts_with = "file")]
        config: Option<PathBuf>,
        /// A store folder (or `store.redb` file of an earlier version) to check directly.
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

/// GETs `/status` from the gateway's admin endpoint.
fn admin_status(cfg: &Config) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut addr = cfg.admin.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(s, "GET /status HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(std::io::Error::other(head.lines().next().unwrap_or("no answer").to_string()));
    }
    Ok(body.to_string())
}

fn status(cfg: &Config, json: bool) -> ExitCode {
    let body = match admin_status(cfg) {
        Ok(b) => b,
        Err(e) => {
            eprintln!(
                "voither-gateway: cannot read /status from the admin endpoint {} (key admin.listen): {e}",
                cfg.admin.listen
            );
            return ExitCode::from(1);
        }
    };
    if json {
        println!("{body}");
        return ExitCode::SUCCESS;
    }
    let st: serde_json::Value = match serde_json::from_str(&body) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("voither-gateway: /status is not JSON: {e}");
            return ExitCode::from(1);
        }
    };
    let up = &st["uplink"];
    println!(
        "voither-gateway {}  up {} s  ready {}  mqtt {}  store {} of {} bytes{}",
        st["agent_version"].as_str().unwrap_or("?"),
        st["uptime_s"],
        st["ready"],
        if st["mqtt"]["subscribed"] == true {
            "subscribed"
        } else if st["mqtt"]["connected"] == true {
            "connected"
        } else {
            "down"
        },
        st["lanes"].as_array().map_or(0, |l| l.iter().map(|x| x["backlog_bytes"].as_u64().unwrap_or(0)).sum::<u64>()),
        st["store_budget_bytes"],
        st["store_error"].as_str().map(|e| format!("  STORE ERROR: {e}")).unwrap_or_default()
    );
    println!(
        "uplink {} {}  hub {}  region {}  sessions {}  rtt {}  rate limit {}{}",
        if up["connected"] == true { "connected to" } else { "trying" },
        up["endpoint"].as_str().unwrap_or("-"),
        up["hub_id"].as_str().unwrap_or("-"),
        up["region"].as_str().unwrap_or("-"),
        up["sessions"],
        up["rtt_ms"].as_f64().map_or("-".into(), |r| format!("{r:.2} ms")),
        match up["rate_limit_bytes_per_s"].as_u64().unwrap_or(0) {
            0 => "none".to_string(),
            r => format!("{r} B/s"),
        },
        up["last_error"].as_str().map(|e| format!("  last error: {e}")).unwrap_or_default()
    );
    println!(
        "{:<16} {:>4} {:>10} {:>12} {:>11} {:>10} {:>10} {:>10} {:>12}  POLICY",
        "LANE", "PRIO", "BACKLOG", "BYTES", "OLDEST AGE", "INGESTED", "SYNCED", "EVICTED", "BUDGET"
    );
    for l in st["lanes"].as_array().into_iter().flatten() {
        let u = |k: &str| l[k].as_u64().unwrap_or(0);
        println!(
            "{:<16} {:>4} {:>10} {:>12} {:>10.1}s {:>10} {:>10} {:>10} {:>12}  {}",
            l["lane"].as_str().unwrap_or("?"),
            u("priority"),
            u("backlog_records"),
            u("backlog_bytes"),
            l["oldest_unsynced_age_s"].as_f64().unwrap_or(0.0),
            u("ingested_records"),
            u("synced_records"),
            l["evicted"]["capacity"].as_u64().unwrap_or(0) + l["evicted"]["ttl"].as_u64().unwrap_or(0),
            u("budget_bytes"),
            l["full_policy"].as_str().unwrap_or("?")
        );
    }
    ExitCode::SUCCESS
}

fn store_check(config: Option<PathBuf>, file: Option<PathBuf>) -> ExitCode {
    let path = match (config, file) {
        (_, Some(f)) => f,
        (Some(c), None) => match Config::load(&c, &ProcessEnv) {
            Ok(cfg) => {
                let dir = cfg.gateway.data_dir.join("store");
                let old = cfg.gateway.data_dir.join("store.redb");
                if !dir.exists() && old.exists() {
                    old
                } else {
                    dir
                }
            }
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
    let (path, grace, log_json, otlp_endpoint) = match cli.command {
        Command::Run { ref config, grace_s, log_json, ref otlp_endpoint } => {
            (config, Some(grace_s), log_json, otlp_endpoint.clone())
        }
        Command::CheckConfig { ref config } => (config, None, false, None),
        Command::Store { command: StoreCommand::Check { config, file } } => return store_check(config, file),
        Command::Status { ref config, json } => {
            return match Config::load(config, &ProcessEnv) {
                Ok(cfg) => status(&cfg, json),
                Err(e) => {
                    eprintln!("voither-gateway: {e}");
                    ExitCode::from(64)
                }
            };
        }
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
    let telemetry = voither_telemetry::init(voither_telemetry::Options {
        service: "voither-gateway",
        version: env!("CARGO_PKG_VERSION"),
        // The gateway's id is in its certificate, which only the hub reads: the host
        // name stands for it.
        instance_id: None,
        json: log_json || cfg.log.json,
        default_filter: "info,rumqttd=warn,quinn=warn",
        otlp_endpoint,
    });
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let code = match rt.block_on(voither_gateway::run(cfg, shutdown_signal(), Duration::from_secs(grace))) {
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
    };
    // Spans still open close with the tasks that hold them; then export what is queued.
    drop(rt);
    telemetry.shutdown(Duration::from_secs(3));
    code
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
