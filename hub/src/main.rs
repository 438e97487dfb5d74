//! `voither-hub`: the central sync endpoint.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use voither_hub::config::Config;

/// VOITHER Edge hub: receives gateway sync over QUIC and stores it exactly once.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the hub until SIGTERM or SIGINT.
    Run {
        /// Configuration file (TOML).
        #[arg(short, long, env = "VOITHER_HUB_CONFIG")]
        config: PathBuf,
        /// Log JSON lines instead of human-readable text (same as `[log] json = true`).
        /// `RUST_LOG` picks the lines (default `info,quinn=warn`).
        #[arg(long)]
        log_json: bool,
        /// Export tracing spans (`sink_commit`: one sink commit) over OTLP/HTTP (JSON,
        /// plain http) to `<URL>/v1/traces`, e.g. `http://127.0.0.1:4318`. Needs a build
        /// with the cargo feature `otlp`; other builds log a warning and export nothing.
        /// Spans exported: `VOITHER_OTLP_FILTER` (default: INFO spans).
        #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
        otlp_endpoint: Option<String>,
    },
    /// Print stored records and gaps as JSON lines (payload in base64).
    ///
    /// Embedded sink: reads the sink file directly when the hub is stopped, and asks the
    /// running hub's admin endpoint otherwise. PostgreSQL sink: reads the database.
    Export {
        /// Configuration file (TOML).
        #[arg(short, long, env = "VOITHER_HUB_CONFIG")]
        config: PathBuf,
        /// Only this gateway.
        #[arg(long)]
        gateway: Option<String>,
        /// Only this lane.
        #[arg(long)]
        lane: Option<String>,
    },
    /// Issue one more gateway certificate with the CA of a `pki` folder: to rotate a
    /// gateway's certificate, or to add a gateway. Writes <file>.key then <file>.pem.
    PkiIssue {
        /// The folder `pki` wrote (holds ca.pem and ca.key).
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// The gateway id (the certificate's DNS name).
        #[arg(long)]
        gateway: String,
        /// File name without extension (default: the gateway id).
        #[arg(long)]
        file: Option<String>,
        /// Validity, days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Valid from this many days from now (negative: in the past; default -1/24, an
        /// hour back for slow device clocks).
        #[arg(long, allow_hyphen_values = true)]
        start_days: Option<f64>,
    },
    /// Workload manifests: make a signing key, sign a manifest (offline tools).
    Workloads {
        #[command(subcommand)]
        command: WorkloadsCommand,
    },
    /// Create a CA, a hub certificate and gateway certificates for trying things out.
    Pki {
        /// Folder to write into (created if missing).
        #[arg(long, default_value = "pki")]
        out: PathBuf,
        /// Gateway ids to issue certificates for.
        #[arg(long, value_delimiter = ',', default_value = "gateway-1")]
        gateways: Vec<String>,
        /// DNS names of the hub certificate (127.0.0.1 and ::1 are always added).
        #[arg(long, value_delimiter = ',', default_value = "voither-hub,localhost")]
        hub_names: Vec<String>,
        /// Common name of the CA.
        #[arg(long, default_value = "VOITHER Edge lab CA")]
        ca_name: String,
        /// Validity, days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Show the running hub's fleet view: every gateway, state, last seen, backlog.
    Fleet {
        /// Configuration file (TOML); the hub's admin endpoint is `admin.listen`.
        #[arg(short, long, env = "VOITHER_HUB_CONFIG")]
        config: PathBuf,
        /// Print the JSON of `/fleet` instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Apply the PostgreSQL sink's schema migrations and exit (`[sink] kind = "postgres"`).
    ///
    /// Every hub start applies them too (under a lock, so replicas starting together
    /// are safe); this is for operators who migrate before a rollout.
    Migrate {
        /// Configuration file (TOML).
        #[arg(short, long, env = "VOITHER_HUB_CONFIG")]
        config: PathBuf,
    },
    /// Check a configuration file and exit (0 if valid, 64 if not).
    CheckConfig {
        /// Configuration file (TOML).
        #[arg(short, long, env = "VOITHER_HUB_CONFIG")]
        config: PathBuf,
    },
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("voither-hub: {e}");
        ExitCode::from(64)
    })
}

fn report(e: &dyn std::error::Error) -> ExitCode {
    let mut msg = format!("voither-hub: {e}");
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    eprintln!("{msg}");
    ExitCode::from(1)
}

#[derive(Debug, Subcommand)]
enum WorkloadsCommand {
    /// Make an Ed25519 signing key: writes OUT.key (keep it offline, mode 0600) and
    /// OUT.pub, the public key that gateways pin in `workloads.trusted_keys`.
    Keygen {
        /// Path without extension, e.g. `keys/operator`.
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a manifest (TOML) with a key from `keygen`; the output goes into the hub's
    /// `workloads.dir` as `<gateway-id>.signed`, `<group>.signed` or `default.signed`.
    Sign {
        /// The manifest, TOML: `version = N` and `[[workloads]]` entries.
        #[arg(long)]
        manifest: PathBuf,
        /// The signing key (`.key` from `keygen`).
        #[arg(long)]
        key: PathBuf,
        /// Where to write the signed manifest.
        #[arg(long)]
        out: PathBuf,
        /// Folder holding the artifacts under their names: fills in (or checks) each
        /// artifact's `sha256` and `size`.
        #[arg(long)]
        artifacts: Option<PathBuf>,
    },
}

fn workloads_tool(command: WorkloadsCommand) -> ExitCode {
    match command {
        WorkloadsCommand::Keygen { out } => match voither_hub::workloads::keygen(&out) {
            Ok(public) => {
                println!("{public}");
                eprintln!(
                    "wrote {} (secret, keep offline) and {}",
                    out.with_extension("key").display(),
                    out.with_extension("pub").display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => report(&e),
        },
        WorkloadsCommand::Sign { manifest, key, out, artifacts } => {
            match voither_hub::workloads::sign(&manifest, &key, artifacts.as_deref()) {
                Ok(signed) => {
                    let version = signed.manifest().map_or(0, |m| m.version);
                    let tmp = out.with_extension("tmp");
                    let written = std::fs::write(&tmp, signed.to_bytes()).and_then(|()| std::fs::rename(&tmp, &out));
                    match written {
                        Ok(()) => {
                            println!("{}: version {version} signed", out.display());
                            ExitCode::SUCCESS
                        }
                        Err(e) => {
                            eprintln!("voither-hub: {}: {e}", out.display());
                            ExitCode::from(1)
                        }
                    }
                }
                Err(e) => report(&e),
            }
        }
    }
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run { config, log_json, otlp_endpoint } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let telemetry = voither_telemetry::init(voither_telemetry::Options {
                service: "voither-hub",
                version: env!("CARGO_PKG_VERSION"),
                instance_id: Some(cfg.hub.id.clone()),
                json: log_json || cfg.log.json,
                default_filter: "info,quinn=warn",
                otlp_endpoint,
            });
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
            let code = match rt.block_on(voither_hub::run(cfg, shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => report(&e),
            };
            // Spans still open close with the tasks that hold them; then export what is queued.
            drop(rt);
            telemetry.shutdown(std::time::Duration::from_secs(3));
            code
        }
        Command::Migrate { config } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if cfg.sink.kind != "postgres" {
                eprintln!(
                    "voither-hub: {}: sink.kind is {:?}; migrate is for kind = \"postgres\" (the embedded sink needs none)",
                    config.display(),
                    cfg.sink.kind
                );
                return ExitCode::from(64);
            }
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
            rt.block_on(async {
                match voither_hub::open_sink(&cfg).await {
                    Ok(voither_hub::sink::AnySink::Postgres(pg, _)) => {
                        println!("{}: schema version {}", pg.describe(), pg.migrate().await.unwrap_or_default());
                        ExitCode::SUCCESS
                    }
                    Ok(_) => ExitCode::SUCCESS,
                    Err(e) => report(&e),
                }
            })
        }
        Command::CheckConfig { config } => match load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Pki { out, gateways, hub_names, ca_name, days } => {
            match voither_hub::pki::generate(&out, &ca_name, &hub_names, &gateways, days) {
                Ok(w) => {
                    for f in w.files {
                        println!("{}", f.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => report(&e),
            }
        }
        Command::PkiIssue { dir, gateway, file, days, start_days } => {
            let now = std::time::SystemTime::now();
            let offset = std::time::Duration::from_secs_f64(start_days.unwrap_or(-1.0 / 24.0).abs() * 86_400.0);
            let from = if start_days.unwrap_or(-1.0) < 0.0 { now - offset } else { now + offset };
            match voither_hub::pki::issue(&dir, &gateway, file.as_deref(), from, days) {
                Ok(w) => {
                    for f in w.files {
                        println!("{}", f.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => report(&e),
            }
        }
        Command::Workloads { command } => workloads_tool(command),
        Command::Fleet { config, json } => match load(&config) {
            Ok(cfg) => fleet(&cfg, json),
            Err(code) => code,
        },
        Command::Export { config, gateway, lane } => {
            let cfg = match load(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            export(&cfg, gateway, lane)
        }
    }
}

fn export(cfg: &Config, gateway: Option<String>, lane: Option<String>) -> ExitCode {
    if cfg.sink.kind == "postgres" {
        return export_postgres(cfg, gateway, lane);
    }
    let path = cfg.hub.data_dir.join("sink.redb");
    if !path.exists() {
        eprintln!("voither-hub: no sink at {} (key hub.data_dir): has the hub run with this config?", path.display());
        return ExitCode::from(1);
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match voither_hub::sink::Sink::open(&path, 16 * 1024 * 1024) {
        Ok(sink) => {
            let mut ok = true;
            let res = sink.export(gateway.as_deref(), lane.as_deref(), |row| {
                ok = serde_json::to_writer(&mut out, &row).is_ok() && out.write_all(b"\n").is_ok();
                ok
            });
            let _ = out.flush();
            match res {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => report(&e),
            }
        }
        Err(voither_hub::sink::SinkError::Open { source, .. })
            if matches!(*source, redb::DatabaseError::DatabaseAlreadyOpen) =>
        {
            // The hub holds the file: ask it.
            match export_http(cfg, gateway, lane, &mut out) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!(
                        "voither-hub: the sink is in use by a running hub and its admin endpoint {} failed: {e}",
                        cfg.admin.listen
                    );
                    ExitCode::from(1)
                }
            }
        }
        Err(e) => report(&e),
    }
}

fn export_postgres(cfg: &Config, gateway: Option<String>, lane: Option<String>) -> ExitCode {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    rt.block_on(async {
        let sink = match voither_hub::open_sink(cfg).await {
            Ok(s) => s,
            Err(e) => return report(&e),
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let export = tokio::spawn(async move { sink.export_ndjson(gateway, lane, tx).await });
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let mut failed = false;
        while let Some(chunk) = rx.recv().await {
            failed |= chunk.ends_with(b"\n")
                && chunk.rsplit(|b| *b == b'\n').nth(1).is_some_and(|l| l.starts_with(b"{\"kind\":\"error\""));
            if out.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = out.flush();
        let _ = export.await;
        if failed {
            eprintln!("voither-hub: the export ended early (see its last line)");
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        }
    })
}

/// A minimal HTTP/1.0 GET of the running hub's `/export` (loopback admin endpoint).
fn export_http(
    cfg: &Config,
    gateway: Option<String>,
    lane: Option<String>,
    out: &mut impl Write,
) -> std::io::Result<()> {
    let mut q = Vec::new();
    if let Some(g) = gateway {
        q.push(format!("gateway={}", urlencode(&g)));
    }
    if let Some(l) = lane {
        q.push(format!("lane={}", urlencode(&l)));
    }
    admin_get(cfg, &format!("/export?{}", q.join("&")), out)
}

/// GETs `path` from the hub's admin endpoint and copies the body to `out`.
fn admin_get(cfg: &Config, path: &str, out: &mut impl Write) -> std::io::Result<()> {
    let mut addr = cfg.admin.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut r = std::io::BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    if !line.contains(" 200 ") {
        return Err(std::io::Error::other(format!("unexpected answer {line:?}")));
    }
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
    }
    std::io::copy(&mut r, out)?;
    out.flush()
}

/// `voither-hub fleet`: the running hub's `/fleet` as a table (or JSON).
fn fleet(cfg: &Config, json: bool) -> ExitCode {
    let mut body = Vec::new();
    if let Err(e) = admin_get(cfg, "/fleet", &mut body) {
        eprintln!(
            "voither-hub: cannot read /fleet from the hub's admin endpoint {} (key admin.listen): {e}",
            cfg.admin.listen
        );
        return ExitCode::from(1);
    }
    if json {
        println!("{}", String::from_utf8_lossy(&body));
        return ExitCode::SUCCESS;
    }
    let rows: Vec<serde_json::Value> = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("voither-hub: /fleet answered something that is not JSON: {e}");
            return ExitCode::from(1);
        }
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    println!(
        "{:<24} {:<13} {:>10} {:<12} {:>9} {:>12} {:>7} {:>10} {:>9}",
        "GATEWAY", "STATE", "LAST SEEN", "REGION", "BACKLOG", "OLDEST AGE", "STORE", "STORED", "VERSION"
    );
    for r in &rows {
        let u = |k: &str| r[k].as_u64().unwrap_or(0);
        let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
        println!(
            "{:<24} {:<13} {:>9}s {:<12} {:>9} {:>11.1}s {:>7} {:>10} {:>9}",
            s("gateway"),
            s("state"),
            now.saturating_sub(u("last_seen_ms")) / 1000,
            s("region"),
            u("backlog_records"),
            u("oldest_unsynced_age_ms") as f64 / 1000.0,
            match u("store_budget_bytes") {
                0 => "-".to_string(),
                b => format!("{:.1}%", u("store_used_bytes") as f64 * 100.0 / b as f64),
            },
            u("stored_records"),
            s("agent_version")
        );
    }
    println!("{} gateway(s)", rows.len());
    ExitCode::SUCCESS
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
