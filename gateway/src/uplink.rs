//! The uplink: drives a [`GatewaySession`] over a QUIC connection to a hub.
//!
//! The driver only moves bytes, time and store calls in and out of the session:
//! records are read from the store for the slots the session asks for, acked records
//! are deleted only on the session's `Acked` events (the hub committed them), and a
//! broken connection is retried with exponential backoff and full jitter, moving to
//! the next endpoint of the list.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{debug, info, warn};
use voither_proto::{
    encode_frame, FrameDecoder, GatewayConfig, GatewayEvent, GatewaySession, LaneInit, LaneStatus, Status,
    MAX_FRAME_LEN,
};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::Heartbeat;

/// What the uplink reports in `/status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct UplinkStatus {
    /// Endpoint of the current or last session.
    pub endpoint: Option<String>,
    /// True while a session is established.
    pub connected: bool,
    /// Hub id from the last `Welcome`.
    pub hub_id: Option<String>,
    /// Region from the last `Welcome`.
    pub region: Option<String>,
    /// Last error, if the link is down.
    pub last_error: Option<String>,
    /// Sessions established since start.
    pub sessions: u64,
    /// The endpoint list in use (from the config, or the latest a hub sent).
    pub endpoints: Vec<String>,
}

/// File in the data folder holding the latest endpoint list a hub sent.
pub const ENDPOINTS_FILE: &str = "endpoints.json";

/// The persisted endpoint list, if there is a usable one.
pub fn load_endpoints(data_dir: &std::path::Path) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(data_dir.join(ENDPOINTS_FILE)).ok()?;
    let list: Vec<String> = serde_json::from_str(&text).ok()?;
    (!list.is_empty() && list.iter().all(|e| valid_endpoint(e))).then_some(list)
}

fn valid_endpoint(e: &str) -> bool {
    e.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
}

/// Writes the list atomically (temporary file, fsync, rename), so a reboot while
/// offline still knows the regions.
fn save_endpoints(data_dir: &std::path::Path, list: &[String]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = data_dir.join(format!("{ENDPOINTS_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(serde_json::to_string(list).expect("json").as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, data_dir.join(ENDPOINTS_FILE))?;
    if let Ok(d) = std::fs::File::open(data_dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Errors that end one session.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("read: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("connect or handshake timed out")]
    Timeout,
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("protocol: {0}")]
    Proto(#[from] voither_proto::ProtoError),
    #[error("frame: {0}")]
    Decode(#[from] voither_proto::DecodeError),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("hub closed the stream")]
    Closed,
    #[error("shutting down")]
    Shutdown,
    #[error("the preferred endpoint is healthy again: failing back")]
    FailBack,
}

/// The uplink task.
#[derive(Debug)]
pub struct Uplink {
    /// Configuration.
    pub cfg: Arc<Config>,
    /// The store.
    pub store: Arc<Store>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Shared status for `/status`.
    pub status: Arc<Mutex<UplinkStatus>>,
    /// Signalled by ingest after each commit.
    pub appended: Arc<Notify>,
    /// Signalled after acked records were deleted (space for backpressure lanes).
    pub space: Arc<Notify>,
    /// Liveness.
    pub heartbeat: Arc<Heartbeat>,
    /// Random id of this start of the agent.
    pub boot_id: u64,
    /// Ordered hub endpoints: the persisted list a hub sent, else the config's.
    pub endpoints: Mutex<Vec<String>>,
}

impl Uplink {
    /// Runs until `shutdown` turns true.
    pub async fn run(self, client: quinn::ClientConfig, mut shutdown: watch::Receiver<bool>) {
        let bind: std::net::SocketAddr = "0.0.0.0:0".parse().expect("literal address");
        let mut endpoint = match quinn::Endpoint::client(bind) {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "Cannot open a UDP socket for the uplink.");
                return;
            }
        };
        endpoint.set_default_client_config(client);
        let ups = &self.cfg.uplink;
        let mut idx = 0usize;
        let mut failures = 0u32;
        loop {
            if *shutdown.borrow() {
                break;
            }
            let list = self.endpoints.lock().expect("endpoints lock").clone();
            let target = list[idx % list.len()].clone();
            {
                let mut st = self.status.lock().expect("status lock");
                st.endpoint = Some(target.clone());
                st.endpoints = list.clone();
            }
            let started = Instant::now();
            let preferred = (!idx.is_multiple_of(list.len())).then(|| list[0].clone());
            let res = self.session(&endpoint, &target, preferred.as_deref(), &mut shutdown).await;
            self.metrics.uplink_connected.set(0);
            {
                let mut st = self.status.lock().expect("status lock");
                st.connected = false;
                if let Err(e) = &res {
                    st.last_error = Some(e.to_string());
                }
            }
            match res {
                Err(SessionError::Shutdown) | Ok(()) => break,
                Err(SessionError::FailBack) => {
                    self.metrics.uplink_failbacks.inc();
                    info!(from = %target, to = %list[0], "Failing back to the preferred endpoint.");
                    idx = 0;
                    failures = 0;
                }
                Err(e) => {
                    self.metrics.uplink_reconnects.inc();
                    if matches!(e, SessionError::Proto(_) | SessionError::Decode(_)) {
                        self.metrics.uplink_protocol_errors.inc();
                    }
                    // A session that lasted is a healthy endpoint: start the backoff over.
                    if started.elapsed() > Duration::from_secs(10) {
                        failures = 0;
                    }
                    failures = failures.saturating_add(1);
                    let cap = ups.backoff_min_ms.saturating_mul(1u64 << failures.min(16)).min(ups.backoff_max_ms);
                    let wait = Duration::from_millis(
                        rand::rng().random_range(ups.backoff_min_ms / 2..=cap.max(ups.backoff_min_ms)),
                    );
                    warn!(endpoint = %target, error = %e, retry_in_ms = wait.as_millis() as u64, "Hub session ended.");
                    if list.len() > 1 {
                        idx += 1;
                    }
                    // Keep the liveness tick going while waiting: a hub outage is not a hang.
                    let until = Instant::now() + wait;
                    loop {
                        self.heartbeat.uplink.tick();
                        tokio::select! {
                            _ = shutdown.changed() => return self.close(endpoint).await,
                            _ = tokio::time::sleep_until(until.min(Instant::now() + Duration::from_secs(1))) => {}
                        }
                        if Instant::now() >= until {
                            break;
                        }
                    }
                }
            }
        }
        self.close(endpoint).await
    }

    async fn close(&self, endpoint: quinn::Endpoint) {
        endpoint.close(0u32.into(), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    }

    async fn session(
        &self,
        endpoint: &quinn::Endpoint,
        target: &str,
        preferred: Option<&str>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), SessionError> {
        let ups = &self.cfg.uplink;
        // While on a lower endpoint, probe the preferred one; fail back once it has
        // answered handshakes for `failback_after_ms` without a miss.
        let mut probe_tick = tokio::time::interval(Duration::from_millis(ups.probe_interval_ms));
        probe_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut probe: Option<tokio::task::JoinHandle<bool>> = None;
        let mut healthy_since: Option<Instant> = None;
        let addr = tokio::net::lookup_host(target)
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| SessionError::Resolve(target.into()))?;
        self.heartbeat.uplink.tick();
        let connecting = endpoint.connect(addr, &ups.server_name)?;
        let conn = tokio::select! {
            _ = shutdown.changed() => return Err(SessionError::Shutdown),
            r = tokio::time::timeout(ups.connect_timeout(), connecting) => r.map_err(|_| SessionError::Timeout)??,
        };
        let (mut send, mut recv) = conn.open_bi().await?;

        let lanes_cfg = &self.cfg.lanes;
        let store = self.store.clone();
        let stats = tokio::task::spawn_blocking(move || store.stats()).await.expect("stats task")?;
        let inits = stats
            .iter()
            .map(|s| LaneInit {
                name: s.lane.clone(),
                priority: lanes_cfg.iter().find(|l| l.name == s.lane).map_or(255, |l| l.priority),
                oldest_unacked: s.oldest_seq,
                next_seq: s.next_seq,
            })
            .collect();
        let pcfg = GatewayConfig {
            window_batches: ups.window_batches,
            max_batch_records: ups.batch_records,
            max_batch_bytes: MAX_FRAME_LEN / 4,
            ..GatewayConfig::default()
        };
        let mut sess = GatewaySession::new(pcfg, env!("CARGO_PKG_VERSION"), self.boot_id, inits);
        let origin = Instant::now();
        let mut dec = FrameDecoder::new(MAX_FRAME_LEN);
        let mut buf = vec![0u8; 64 * 1024];
        let mut out = Vec::with_capacity(64 * 1024);
        let mut status_tick = tokio::time::interval(Duration::from_secs(1));
        // The session has no timer before Welcome; a hub that never answers must not
        // hold the gateway on a connection kept alive by QUIC keep-alives.
        let welcome_deadline = origin + ups.connect_timeout();
        loop {
            if !sess.is_ready() && Instant::now() >= welcome_deadline {
                return Err(SessionError::Timeout);
            }
            self.heartbeat.uplink.tick();
            // Fill the window from the store.
            while let Some(slot) = sess.poll_send_slot() {
                let store = self.store.clone();
                let lane = slot.lane.clone();
                let (records, gaps) = tokio::task::spawn_blocking(move || {
                    store.read_from(&lane, slot.from_seq, slot.max_records, slot.max_bytes)
                })
                .await
                .expect("read task")?;
                sess.send_batch(origin.elapsed(), &slot.lane, records, gaps)?;
            }
            // Write what the session queued.
            out.clear();
            while let Some(f) = sess.poll_transmit() {
                encode_frame(&f, &mut out, MAX_FRAME_LEN).expect("batches are sized under the frame limit");
            }
            if !out.is_empty() {
                send.write_all(&out).await?;
                self.metrics.uplink_sent_bytes.inc_by(out.len() as u64);
            }
            // Act on events.
            while let Some(ev) = sess.poll_event() {
                match ev {
                    GatewayEvent::Welcomed(w) => {
                        info!(endpoint = %target, hub = %w.hub_id, region = %w.region, gateway = %w.gateway_id, "Hub session established.");
                        self.metrics.uplink_connected.set(1);
                        let mut st = self.status.lock().expect("status lock");
                        st.connected = true;
                        st.hub_id = Some(w.hub_id);
                        st.region = Some(w.region);
                        st.last_error = None;
                        st.sessions += 1;
                        drop(st);
                        self.adopt_endpoints(w.endpoints);
                    }
                    GatewayEvent::Acked { lane, through_seq } => {
                        let store = self.store.clone();
                        let l = lane.clone();
                        let (n, bytes) = tokio::task::spawn_blocking(move || store.ack_through(&l, through_seq))
                            .await
                            .expect("ack task")?;
                        debug!(%lane, through_seq, deleted = n, "Hub acknowledged.");
                        self.space.notify_waiters();
                        self.metrics.synced_records.get_or_create(&Metrics::lane(&lane)).inc_by(n);
                        self.metrics.synced_bytes.get_or_create(&Metrics::lane(&lane)).inc_by(bytes);
                    }
                    GatewayEvent::Command(c) => {
                        info!(command = ?c, "Hub command received.");
                    }
                }
            }
            let timeout = sess.poll_timeout().map(|t| origin + t);
            tokio::select! {
                _ = shutdown.changed() => {
                    let _ = send.finish();
                    conn.close(0u32.into(), b"shutdown");
                    return Err(SessionError::Shutdown);
                }
                r = recv.read(&mut buf) => {
                    match r? {
                        None => return Err(SessionError::Closed),
                        Some(n) => {
                            dec.push(&buf[..n]);
                            while let Some(f) = dec.next_frame()? {
                                sess.handle_frame(origin.elapsed(), f)?;
                            }
                        }
                    }
                }
                _ = self.appended.notified() => {
                    for (lane, next) in self.store.next_seqs() {
                        sess.notify_appended(&lane, next);
                    }
                }
                _ = sleep_until_opt(timeout.or((!sess.is_ready()).then_some(welcome_deadline))) => sess.handle_timeout(origin.elapsed()),
                _ = probe_tick.tick(), if preferred.is_some() && probe.is_none() => {
                    let ep = endpoint.clone();
                    let name = ups.server_name.clone();
                    let to = ups.connect_timeout();
                    let target = preferred.unwrap_or_default().to_string();
                    probe = Some(tokio::spawn(async move { probe_endpoint(&ep, &target, &name, to).await }));
                }
                ok = async { probe.as_mut().expect("guarded").await.unwrap_or(false) }, if probe.is_some() => {
                    probe = None;
                    if ok {
                        let since = *healthy_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= Duration::from_millis(ups.failback_after_ms) {
                            let _ = send.finish();
                            conn.close(0u32.into(), b"failing back");
                            return Err(SessionError::FailBack);
                        }
                    } else {
                        healthy_since = None;
                    }
                }
                _ = status_tick.tick() => {
                    // The stats read a transaction: keep it off the runtime's threads.
                    let store = self.store.clone();
                    if let Ok(Ok(stats)) = tokio::task::spawn_blocking(move || store.stats()).await {
                        let now = crate::unix_ms();
                        sess.set_status(Status {
                            uptime_s: self.heartbeat.uptime().as_secs(),
                            lanes: stats.iter().map(|s| LaneStatus {
                                lane: s.lane.clone(),
                                backlog_records: s.records,
                                backlog_bytes: s.bytes,
                                oldest_unsynced_age_ms: s.oldest_ingest_ts_ms.map_or(0, |t| now.saturating_sub(t)),
                            }).collect(),
                        });
                    }
                }
            }
        }
    }
}

impl Uplink {
    /// Takes a newer endpoint list from a hub: kept for the next reconnect and persisted.
    fn adopt_endpoints(&self, list: Vec<String>) {
        if list.is_empty() {
            return;
        }
        if !list.iter().all(|e| valid_endpoint(e)) || list.len() > 64 {
            warn!(?list, "Hub sent an unusable endpoint list; keeping the current one.");
            return;
        }
        let mut cur = self.endpoints.lock().expect("endpoints lock");
        if *cur == list {
            return;
        }
        match save_endpoints(&self.cfg.gateway.data_dir, &list) {
            Ok(()) => info!(?list, "Hub sent a new endpoint list; saved for reconnects and restarts."),
            Err(e) => warn!(error = %e, "Could not save the endpoint list; using it until restart."),
        }
        self.status.lock().expect("status lock").endpoints = list.clone();
        *cur = list;
    }
}

/// One handshake with `target`, closed at once: is the endpoint healthy?
async fn probe_endpoint(endpoint: &quinn::Endpoint, target: &str, server_name: &str, timeout: Duration) -> bool {
    let Some(addr) = tokio::net::lookup_host(target).await.ok().and_then(|mut a| a.next()) else {
        return false;
    };
    let Ok(connecting) = endpoint.connect(addr, server_name) else {
        return false;
    };
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(conn)) => {
            conn.close(0u32.into(), b"probe");
            true
        }
        _ => false,
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
