//! VOITHER Edge hub: the central sync endpoint.
//!
//! Accepts gateways over QUIC with mutual TLS ([`server`]), takes each gateway's id
//! from its verified certificate, stores what it sends in a sink ([`sink`]) exactly
//! once, and acks only after the sink committed. [`run`] wires it together.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod auth;
pub mod config;
pub mod metrics;
pub mod pg;
pub mod pki;
pub mod server;
pub mod sink;
pub mod tls;
pub mod watchdog;
pub mod workloads;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};
use voither_proto::HubInfo;

pub use config::Config;

/// Errors that stop the hub at start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data folder could not be created.
    #[error("cannot create data folder {path} (key hub.data_dir): {source}")]
    DataDir {
        /// The folder.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The sink could not be opened.
    #[error(transparent)]
    Sink(#[from] sink::SinkError),
    /// The sink the config key names could not be opened.
    #[error("sink (key {at}): {error}")]
    SinkAt {
        /// The config key.
        at: &'static str,
        /// Why.
        error: sink::SinkError,
    },
    /// TLS material is missing or bad.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// An allow-list or revocation list cannot be read.
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    /// A socket could not be bound.
    #[error("cannot listen on {addr} (key {key}): {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The config key.
        key: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

/// Runs the hub until `shutdown` resolves.
pub async fn run(cfg: Config, shutdown: impl std::future::Future<Output = ()>) -> Result<(), StartError> {
    let dir = &cfg.hub.data_dir;
    std::fs::create_dir_all(dir).map_err(|source| StartError::DataDir { path: dir.clone(), source })?;
    let server_cfg = tls::server_config(
        &cfg.tls.ca,
        &cfg.tls.cert,
        &cfg.tls.key,
        Duration::from_millis(cfg.hub.idle_timeout_ms),
        cfg.hub.stream_receive_window_bytes,
    )?;
    let sink = open_sink(&cfg).await?;
    let hub = Arc::new(server::Hub {
        sink,
        info: HubInfo {
            hub_id: cfg.hub.id.clone(),
            region: cfg.hub.region.clone(),
            endpoints: cfg.hub.endpoints.clone(),
        },
        metrics: Arc::new(metrics::Metrics::new()),
        fleet: Mutex::new(HashMap::new()),
        max_connections: cfg.hub.max_connections,
        gateway_rate_limit: cfg.hub.gateway_rate_limit_bytes_per_s,
        catalog: Arc::new(workloads::Catalog::new(&cfg.workloads)),
        auth: Arc::new(auth::Auth::new(&cfg.auth)?),
        commits: Default::default(),
        log_limit: Mutex::new(voither_proto::limit::LogLimiter::new(Duration::from_secs(10))),
        started: tokio::time::Instant::now(),
    });
    let listener = tokio::net::TcpListener::bind(cfg.admin.listen).await.map_err(|source| StartError::Bind {
        addr: cfg.admin.listen,
        key: "admin.listen",
        source,
    })?;
    let serve_export = cfg.admin.listen.ip().is_loopback() || cfg.admin.export_on_network;
    if !cfg.admin.listen.ip().is_loopback() {
        if serve_export {
            warn!(listen = %cfg.admin.listen, "Admin endpoint is not on loopback and admin.export_on_network is set: /export serves stored records to anyone who reaches it.");
        } else {
            warn!(listen = %cfg.admin.listen, "Admin endpoint is not on loopback; /export is off there (admin.export_on_network = false).");
        }
    }
    let endpoint = quinn::Endpoint::server(server_cfg, cfg.hub.listen).map_err(|source| StartError::Bind {
        addr: cfg.hub.listen,
        key: "hub.listen",
        source,
    })?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let admin = {
        let mut rx = stop_rx.clone();
        let app = admin::router(hub.clone(), serve_export);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.changed().await;
                })
                .await;
        })
    };
    let reload = tokio::spawn(reload_files(hub.clone(), endpoint.clone(), cfg.clone(), stop_rx.clone()));
    // Day partitions of the PostgreSQL sink: the next days' exist before their rows.
    let partitions = match &hub.sink {
        sink::AnySink::Postgres(pg, _) => {
            let pg = pg.clone();
            Some(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(3600));
                tick.tick().await;
                loop {
                    tick.tick().await;
                    if let Err(e) = pg.ensure_partitions().await {
                        warn!(error = %e, "Cannot create the next day partitions of the sink; retrying in an hour.");
                    }
                }
            }))
        }
        sink::AnySink::Embedded(..) => None,
    };
    let server = tokio::spawn(server::serve(hub.clone(), endpoint.clone(), stop_rx));
    info!(listen = %cfg.hub.listen, admin = %cfg.admin.listen, hub = %cfg.hub.id, region = %cfg.hub.region, "Hub running.");
    notify_systemd("READY=1");
    match watchdog::interval(&|k| std::env::var(k).ok(), std::process::id()) {
        // Alive: the accept loop and the admin server run, and the sink answers a read.
        Some(every) => {
            let alive = || {
                let (server, admin, sink) = (&server, &admin, hub.sink.clone());
                async move {
                    let sink_ok = matches!(tokio::time::timeout(every, sink.alive()).await, Ok(true));
                    sink_ok && !server.is_finished() && !admin.is_finished()
                }
            };
            tokio::select! {
                () = shutdown => {}
                () = watchdog::run(every, alive, notify_systemd) => {}
            }
        }
        None => shutdown.await,
    }
    info!("Shutting down.");
    let _ = stop_tx.send(true);
    reload.abort();
    if let Some(p) = partitions {
        p.abort();
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = server.await;
        let _ = admin.await;
        endpoint.wait_idle().await;
    })
    .await;
    Ok(())
}

/// Opens the sink the config names: the embedded one in `hub.data_dir`, or
/// PostgreSQL (connects, applies migrations, creates day partitions).
pub async fn open_sink(cfg: &Config) -> Result<sink::AnySink, StartError> {
    match cfg.sink.kind.as_str() {
        "postgres" => {
            let password = match &cfg.sink.password_file {
                Some(p) => Some(
                    std::fs::read_to_string(p)
                        .map_err(|e| {
                            sink::SinkError::Io(format!("cannot read {} (key sink.password_file): {e}", p.display()))
                        })?
                        .trim_end_matches(['\n', '\r'])
                        .to_owned(),
                ),
                None => None,
            };
            let opts = pg::PgOptions {
                url: cfg.sink.url.clone().unwrap_or_default(),
                password,
                pool_size: cfg.sink.pool_size,
                connect_timeout: Duration::from_millis(cfg.sink.connect_timeout_ms),
            };
            let pg = pg::PgSink::open(&opts).await.map_err(|e| StartError::SinkAt { at: "sink.url", error: e })?;
            info!(database = pg.describe(), pool = cfg.sink.pool_size, "PostgreSQL sink ready.");
            let pg = Arc::new(pg);
            Ok(sink::AnySink::Postgres(pg.clone(), pg::PgCommitter::start(pg, cfg.sink.pool_size)))
        }
        _ => {
            let path = cfg.hub.data_dir.join("sink.redb");
            let cache = cfg.sink.cache_bytes;
            let s = tokio::task::spawn_blocking(move || sink::Sink::open(&path, cache)).await.expect("open task")?;
            let s = Arc::new(s);
            Ok(sink::AnySink::Embedded(s.clone(), sink::GroupCommitter::start(s)))
        }
    }
}

/// Sends a state line to systemd when started with `Type=notify`.
pub fn notify_systemd(state: &str) {
    #[cfg(unix)]
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        if let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() {
            let _ = sock.send_to(state.as_bytes(), path);
        }
    }
}

/// Every second: re-reads the allow-list and revocation list when they changed, and the
/// hub's certificate, key and CA bundle (rotation without a restart: new handshakes use
/// the new ones; a bad new file keeps the old configuration and is logged). Also keeps
/// `voither_hub_tls_cert_expiry_seconds` current.
async fn reload_files(hub: Arc<server::Hub>, endpoint: quinn::Endpoint, cfg: Config, mut stop: watch::Receiver<bool>) {
    let files = [&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key];
    let stamps = || files.map(|p| auth::stamp(p));
    let mut last = stamps();
    let mut not_after = tls::not_after(&cfg.tls.cert);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        let h = hub.clone();
        let _ = tokio::task::spawn_blocking(move || h.auth.reload_if_changed()).await;
        if let Some(t) = not_after {
            let left = t.duration_since(std::time::SystemTime::now()).map_or(0.0, |d| d.as_secs_f64());
            hub.metrics.tls_cert_expiry_seconds.set(left);
        }
        let now = stamps();
        if now == last {
            continue;
        }
        last = now;
        not_after = tls::not_after(&cfg.tls.cert);
        match tls::server_config(
            &cfg.tls.ca,
            &cfg.tls.cert,
            &cfg.tls.key,
            Duration::from_millis(cfg.hub.idle_timeout_ms),
            cfg.hub.stream_receive_window_bytes,
        ) {
            Ok(sc) => {
                endpoint.set_server_config(Some(sc));
                hub.metrics.tls_reloads.inc();
                info!(cert = %cfg.tls.cert.display(), ca = %cfg.tls.ca.display(), "TLS certificate, key or CA changed; new handshakes use them.");
            }
            Err(e) => tracing::error!(error = %e, "TLS files changed but are not usable; keeping the previous ones."),
        }
    }
}
