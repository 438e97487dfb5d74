//! VOITHER Edge gateway agent.
//!
//! Takes device telemetry from MQTT (and, with the cargo feature `sensors`, from
//! sensors on the gateway's own I²C bus, module `sensors`), keeps it durably in a
//! bounded local store ([`store`]), and syncs it to a hub over QUIC with mutual TLS
//! ([`uplink`]), effectively once. [`run`] wires the parts together; `main.rs` only
//! parses the command line and calls it.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod appender;
#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod config;
pub mod ingest;
pub mod metrics;
#[cfg(feature = "sensors")]
pub mod sensors;
pub mod static_pod;
pub mod store;
pub mod supervisor;
pub mod tls;
pub mod uplink;
pub mod workloads;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tracing::{info, warn};

pub use config::Config;

/// Milliseconds since the Unix epoch, from the wall clock.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Last tick of one loop, for `/healthz`.
#[derive(Debug, Default)]
pub struct Tick(AtomicU64);

impl Tick {
    /// Records that the loop is alive now.
    pub fn tick(&self) {
        self.0.store(unix_ms(), Ordering::Relaxed);
    }
    fn age(&self) -> Duration {
        Duration::from_millis(unix_ms().saturating_sub(self.0.load(Ordering::Relaxed)))
    }
}

/// Liveness of the pipeline's loops, and the MQTT session state.
#[derive(Debug)]
pub struct Heartbeat {
    /// True while connected to the MQTT broker.
    pub mqtt_connected: AtomicBool,
    /// True once every subscription of the current connection was acknowledged.
    pub mqtt_subscribed: AtomicBool,
    started: tokio::time::Instant,
    /// The MQTT event loop.
    pub ingest: Tick,
    /// The store committer.
    pub committer: Tick,
    /// The uplink session loop.
    pub uplink: Tick,
}

impl Default for Heartbeat {
    fn default() -> Self {
        let h = Self {
            mqtt_connected: AtomicBool::new(false),
            mqtt_subscribed: AtomicBool::new(false),
            started: tokio::time::Instant::now(),
            ingest: Tick::default(),
            committer: Tick::default(),
            uplink: Tick::default(),
        };
        h.ingest.tick();
        h.committer.tick();
        h.uplink.tick();
        h
    }
}

impl Heartbeat {
    /// Time since start.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Names of loops that have not ticked within `limit`.
    pub fn stale(&self, limit: Duration) -> Vec<&'static str> {
        let mut v = Vec::new();
        for (name, t) in [("ingest", &self.ingest), ("committer", &self.committer), ("uplink", &self.uplink)] {
            if t.age() > limit {
                v.push(name);
            }
        }
        v
    }
}

/// Workload output lines waiting for the store, at most (more are dropped and counted).
const WORKLOAD_LOG_LINES: usize = 4096;

/// Errors that stop the agent at start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data folder could not be created.
    #[error("cannot create data folder {path} (key gateway.data_dir): {source}")]
    DataDir {
        /// The folder.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// TLS material is missing or bad.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The admin endpoint could not listen.
    #[error("admin endpoint cannot listen on {addr} (key admin.listen): {source}")]
    Admin {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The embedded broker could not start.
    #[cfg(feature = "embedded-broker")]
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    /// The embedded broker was asked for but not built in.
    #[error("broker.enabled is true but this build has no embedded broker (cargo feature `embedded-broker`)")]
    NoBroker,
    /// `[[sensors]]` are configured but sensor support was not built in.
    #[error("sensors configured but this build has no sensor support (cargo feature `sensors`)")]
    NoSensors,
}

/// Runs the agent until `shutdown` resolves, then drains within `grace`.
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()>,
    grace: Duration,
) -> Result<(), StartError> {
    if !cfg.sensors.is_empty() && !cfg!(feature = "sensors") {
        return Err(StartError::NoSensors);
    }
    let cfg = Arc::new(cfg);
    let dir = &cfg.gateway.data_dir;
    std::fs::create_dir_all(dir).map_err(|source| StartError::DataDir { path: dir.clone(), source })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
    let client = tls::client_config(
        &cfg.uplink.ca,
        &cfg.uplink.cert,
        &cfg.uplink.key,
        cfg.uplink.keep_alive(),
        cfg.uplink.idle_timeout(),
    )?;
    let metrics = Arc::new(metrics::Metrics::new());
    let store = {
        let cfg = cfg.clone();
        let metrics = metrics.clone();
        Arc::new(tokio::task::spawn_blocking(move || open_store(&cfg, &metrics)).await.expect("open task")?)
    };
    let heartbeat = Arc::new(Heartbeat::default());
    // Workloads: the cached manifest's workloads start here, before and without a hub.
    let (stop_tx, stop_rx) = watch::channel(false);
    let appended = Arc::new(Notify::new());
    let (log_tx, log_rx) = tokio::sync::mpsc::channel(WORKLOAD_LOG_LINES);
    let log_task = tokio::spawn(appender::append_loop(
        log_rx,
        store.clone(),
        metrics.clone(),
        appended.clone(),
        stop_rx.clone(),
        WORKLOAD_LOG_LINES,
    ));
    let supervisor = supervisor::Supervisor::new(
        log_tx,
        metrics.clone(),
        cfg.workloads.logs_lane.clone(),
        Duration::from_millis(cfg.workloads.stop_grace_ms),
        cfg.workloads.max_line_bytes,
    );
    let workloads = Arc::new(
        workloads::Workloads::new(&cfg, metrics.clone(), supervisor)
            .map_err(|source| StartError::DataDir { path: dir.join("workloads"), source })?,
    );
    workloads.start_cached().await;
    let uplink_status = Arc::new(Mutex::new(uplink::UplinkStatus::default()));
    let admin_state = Arc::new(admin::AdminState {
        store: store.clone(),
        metrics: metrics.clone(),
        uplink: uplink_status.clone(),
        heartbeat: heartbeat.clone(),
        ready: AtomicBool::new(false),
        lanes: cfg.lane_specs(),
        store_budget: cfg.store_max_bytes(),
        workloads: workloads.clone(),
    });
    let listener = tokio::net::TcpListener::bind(cfg.admin.listen)
        .await
        .map_err(|source| StartError::Admin { addr: cfg.admin.listen, source })?;
    if !cfg.admin.listen.ip().is_loopback() {
        warn!(listen = %cfg.admin.listen, "Admin endpoint is not on loopback; it is reachable from the network.");
    }
    if cfg.broker.enabled {
        #[cfg(feature = "embedded-broker")]
        {
            broker::start(cfg.broker.listen, cfg.mqtt.max_payload_bytes, cfg.mqtt.batch_max_messages * 2).await?;
            info!(listen = %cfg.broker.listen, "Embedded MQTT broker started.");
        }
        #[cfg(not(feature = "embedded-broker"))]
        return Err(StartError::NoBroker);
    }

    let space = Arc::new(Notify::new());
    let maintenance =
        tokio::spawn(maintain(store.clone(), metrics.clone(), appended.clone(), space.clone(), stop_rx.clone()));
    let admin_task = {
        let app = admin::router(admin_state.clone());
        let mut rx = stop_rx.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.changed().await;
                })
                .await;
        })
    };
    #[cfg(feature = "sensors")]
    let sensors_task = (!cfg.sensors.is_empty()).then(|| {
        tokio::spawn(sensors::run(cfg.clone(), store.clone(), metrics.clone(), appended.clone(), stop_rx.clone()))
    });
    let ingest_task = tokio::spawn(ingest::run(
        cfg.clone(),
        store.clone(),
        metrics.clone(),
        appended.clone(),
        space.clone(),
        heartbeat.clone(),
        stop_rx.clone(),
    ));
    let up = uplink::Uplink {
        cfg: cfg.clone(),
        store: store.clone(),
        metrics: metrics.clone(),
        status: uplink_status,
        appended,
        space,
        heartbeat,
        boot_id: rand::random(),
        workloads: Some(workloads.clone()),
        endpoints: Mutex::new(
            uplink::load_endpoints(&cfg.gateway.data_dir).unwrap_or_else(|| cfg.uplink.endpoints.clone()),
        ),
    };
    let uplink_task = tokio::spawn(up.run(client, stop_rx));
    admin_state.ready.store(true, Ordering::Release);
    let stats = store.stats()?;
    info!(
        admin = %cfg.admin.listen,
        store = %store.path().display(),
        backlog = stats.iter().map(|s| s.records).sum::<u64>(),
        "Gateway running."
    );
    notify_systemd("READY=1");
    let watchdog = watchdog_interval().map(|every| {
        let hb = admin_state.heartbeat.clone();
        let mut rx = stop_tx.subscribe();
        tokio::spawn(async move { watchdog(hb, every, &mut rx).await })
    });

    shutdown.await;
    info!("Shutting down.");
    notify_systemd("STOPPING=1");
    let _ = stop_tx.send(true);
    if let Some(w) = watchdog {
        w.abort();
    }
    let drained = tokio::time::timeout(grace, async {
        let _ = ingest_task.await;
        #[cfg(feature = "sensors")]
        if let Some(t) = sensors_task {
            let _ = t.await;
        }
        let _ = uplink_task.await;
        workloads.shutdown().await;
        // Output lines already queued get their commit; the task itself waits forever.
        let _ = tokio::time::timeout(Duration::from_secs(1), log_task).await;
        let _ = admin_task.await;
        let _ = maintenance.await;
    })
    .await;
    if drained.is_err() {
        warn!(grace_ms = grace.as_millis() as u64, "Grace period over, stopping anyway.");
    }
    Ok(())
}

/// Opens the store in `<data_dir>/store`, first moving a store of an earlier version
/// (`store.redb`) into it. A damaged store is moved aside (never deleted) and a fresh
/// one started, unless `store.on_corrupt = "refuse"`.
fn open_store(cfg: &Config, metrics: &metrics::Metrics) -> Result<store::Store, StartError> {
    let dir = cfg.gateway.data_dir.join("store");
    let old = cfg.gateway.data_dir.join("store.redb");
    if cfg.store.cache_bytes.is_some() {
        tracing::warn!(
            "store.cache_bytes no longer has an effect (the store reads through the OS page cache); remove it."
        );
    }
    let move_aside = |path: &std::path::Path, e: &store::StoreError| -> Result<(), StartError> {
        let name = path.file_name().map_or_else(|| "store".into(), |n| n.to_string_lossy().into_owned());
        let aside = path.with_file_name(format!("{name}.corrupt-{}", unix_ms() / 1000));
        std::fs::rename(path, &aside).map_err(|source| StartError::DataDir { path: aside.clone(), source })?;
        metrics.store_corrupt_moved.inc();
        tracing::error!(
            store = %path.display(),
            moved_to = %aside.display(),
            problem = %e,
            "Store is damaged; moved it aside and started a fresh store. Records it held were not sent."
        );
        Ok(())
    };
    let refuse = cfg.store.on_corrupt == config::OnCorrupt::Refuse;
    match store::migrate_redb(&old, &dir) {
        Ok(Some(m)) => tracing::info!(
            from = %old.display(),
            to = %dir.display(),
            lanes = m.lanes,
            records = m.records,
            gaps = m.gaps,
            old_file = %m.old_file.display(),
            "Moved the store of an earlier version into the segment store."
        ),
        Ok(None) => {}
        Err(e) if e.is_corrupt() && !refuse => move_aside(&old, &e)?,
        Err(e) => return Err(e.into()),
    }
    let open = || store::Store::open(&dir, cfg.store.segment_bytes, &cfg.lane_specs(), cfg.store_max_bytes());
    match open() {
        Ok(s) => Ok(s),
        Err(e) if e.is_corrupt() && !refuse => {
            move_aside(&dir, &e)?;
            Ok(open()?)
        }
        Err(e) => Err(e.into()),
    }
}

/// TTL expiry every second, and compaction once a drained store has been idle a while.
async fn maintain(
    store: Arc<store::Store>,
    metrics: Arc<metrics::Metrics>,
    appended: Arc<Notify>,
    space: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut idle_ticks = 0u32;
    let mut compacted_size = 0u64;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = tick.tick() => {}
        }
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.expire(unix_ms())).await.expect("expire task") {
            Ok(ev) if !ev.is_empty() => {
                metrics.evicted(&ev);
                space.notify_waiters();
                // The uplink must learn about the new gaps.
                appended.notify_one();
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "TTL expiry failed."),
        }
        let size = store.file_size();
        let empty = store.stats().map(|st| st.iter().all(|l| l.records == 0)).unwrap_or(false);
        idle_ticks = if empty { idle_ticks + 1 } else { 0 };
        // After 10 idle seconds, when the store grew since the last time, start a fresh
        // segment so the drained one is deleted.
        if idle_ticks >= 10 && size > compacted_size.max(1024 * 1024) {
            let s = store.clone();
            match tokio::task::spawn_blocking(move || s.compact_if_idle()).await.expect("compact task") {
                Ok(Some((before, after))) => {
                    info!(before_bytes = before, after_bytes = after, "Store drained; gave its last segment back.");
                    compacted_size = after;
                }
                Ok(None) => {}
                Err(e) => warn!(error = %e, "Store compaction failed."),
            }
        }
    }
}

/// Half of systemd's `WatchdogSec` (from `WATCHDOG_USEC`), when the watchdog is on and
/// meant for this process.
fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var("WATCHDOG_PID").ok().and_then(|p| p.parse::<u32>().ok()) {
        if pid != std::process::id() {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Pings systemd's watchdog only while every loop (MQTT event loop, store committer,
/// uplink) has ticked recently: a stuck loop stops the pings and systemd restarts the
/// service. A loop counts as stuck after twice `WatchdogSec`, within 3 to 30 seconds.
async fn watchdog(hb: Arc<Heartbeat>, every: Duration, stop: &mut watch::Receiver<bool>) {
    let limit = (every * 4).clamp(Duration::from_secs(3), Duration::from_secs(30));
    let mut tick = tokio::time::interval(every);
    let mut stalled = false;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        let stale = hb.stale(limit);
        if stale.is_empty() {
            if stalled {
                info!("Every loop is ticking again; watchdog pings resumed.");
                stalled = false;
            }
            notify_systemd("WATCHDOG=1");
        } else if !stalled {
            tracing::error!(
                loops = %stale.join(","),
                stalled_for_s = limit.as_secs(),
                "A pipeline loop is stuck; watchdog pings stopped so that systemd restarts the service."
            );
            stalled = true;
        }
    }
}

/// Sends a state line to systemd when started with `Type=notify`.
pub fn notify_systemd(state: &str) {
    #[cfg(unix)]
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        let sock = match std::os::unix::net::UnixDatagram::unbound() {
            Ok(s) => s,
            Err(_) => return,
        };
        let _ = sock.send_to(state.as_bytes(), path);
    }
}

#[cfg(all(test, not(feature = "sensors")))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sensors_need_the_sensors_feature() {
        let text = r#"
[gateway]
data_dir = "/nonexistent/never-created"
[uplink]
endpoints = ["127.0.0.1:7700"]
ca = "ca.pem"
cert = "gw.pem"
key = "gw.key"
[[sensors]]
name = "sensor/room-1"
kind = "sht3x"
bus = "/dev/i2c-1"
lane = "telemetry"
"#;
        let cfg = Config::parse(text, std::path::Path::new("g.toml")).expect("valid without the feature too");
        let err = run(cfg, std::future::pending(), Duration::ZERO).await.unwrap_err();
        assert!(matches!(err, StartError::NoSensors), "{err}");
        assert!(err.to_string().contains("cargo feature `sensors`"), "{err}");
    }
}
