//! The uplink: drives a [`GatewaySession`] over a QUIC connection to a hub.
//!
//! The driver only moves bytes, time and store calls in and out of the session:
//! records are read from the store for the slots the session asks for, acked records
//! are deleted only on the session's `Acked` events (the hub committed them), and a
//! broken connection is retried with exponential backoff and full jitter, moving to
//! the next endpoint of the list.
//!
//! An endpoint is unhealthy when the connection cannot be made in
//! `uplink.connect_timeout_ms`, when QUIC's idle timeout ends it (keep-alives keep a
//! healthy one open), or when batches are in flight and no ack came for
//! `uplink.ack_progress_timeout_ms` (a hub that accepts data but cannot make it durable).
//!
//! Writes are paced by a token bucket when `uplink.rate_limit_bytes_per_s` is set or a
//! hub sent `SlowDown`; the lower of the two applies. Each batch is a `sync_batch`
//! tracing span from send to ack, so a trace exporter shows gateway → hub-durable latency.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{debug, info, warn};
use voither_proto::{
    encode_frame, Command, FrameDecoder, GatewayConfig, GatewayEvent, GatewaySession, LaneInit, LaneStatus, Status,
    MAX_FRAME_LEN,
};

use crate::config::Config;
use crate::metrics::{EndpointLabel, Metrics};
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
    /// Smoothed round-trip time of the session, milliseconds.
    pub rtt_ms: Option<f64>,
    /// Effective rate limit, bytes per second (0: none).
    pub rate_limit_bytes_per_s: u64,
    /// Rate the hub asked for with `SlowDown` in this session (0: none).
    pub hub_rate_limit_bytes_per_s: u64,
    /// When the gateway's certificate expires, seconds since the Unix epoch.
    pub cert_not_after_unix: Option<u64>,
    /// Days until then (negative: expired).
    pub cert_expires_in_days: Option<f64>,
}

/// The lower of two limits where 0 means none.
fn lower_limit(a: u64, b: u64) -> u64 {
    match (a, b) {
        (0, x) | (x, 0) => x,
        (a, b) => a.min(b),
    }
}

/// A token bucket kept as a balance: writing is allowed while the balance is not
/// negative, each write takes its size (it may go into debt, so a large batch is not
/// split), and the balance refills at `rate` bytes per second up to one second's worth.
#[derive(Debug)]
struct Pace {
    rate: u64,
    balance: f64,
    at: Instant,
}

impl Pace {
    fn new(rate: u64, now: Instant) -> Self {
        Self { rate, balance: rate as f64, at: now }
    }

    fn set_rate(&mut self, rate: u64, now: Instant) {
        self.refill(now);
        self.rate = rate;
        self.balance = self.balance.min(rate as f64);
    }

    fn refill(&mut self, now: Instant) {
        if self.rate > 0 {
            let dt = now.saturating_duration_since(self.at).as_secs_f64();
            self.balance = (self.balance + dt * self.rate as f64).min(self.rate as f64);
        }
        self.at = now;
    }

    /// When writing may go on, or `None` when it may now.
    fn blocked_until(&mut self, now: Instant) -> Option<Instant> {
        if self.rate == 0 {
            return None;
        }
        self.refill(now);
        (self.balance < 0.0).then(|| now + Duration::from_secs_f64(-self.balance / self.rate as f64))
    }

    fn spend(&mut self, bytes: usize, now: Instant) {
        if self.rate > 0 {
            self.refill(now);
            self.balance -= bytes as f64;
        }
    }
}

/// A batch on its way: for the ack-latency histogram and the `sync_batch` span.
#[derive(Debug)]
struct Flight {
    lane: String,
    last_seq: u64,
    sent: Instant,
    _span: tracing::Span,
}

/// Most batches tracked for latency at once (rewinds resend; old entries are dropped).
const MAX_FLIGHTS: usize = 4096;

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
    #[error("no ack for {0} ms with batches in flight (uplink.ack_progress_timeout_ms)")]
    AckStall(u64),
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
    /// Workloads, which take manifests and artifacts from the hub (None: not handled).
    pub workloads: Option<Arc<crate::workloads::Workloads>>,
}

/// A manifest whose artifacts are being fetched in this session.
#[derive(Debug)]
struct PendingManifest {
    signed: voither_proto::SignedManifest,
    manifest: voither_proto::workload::Manifest,
    queue: VecDeque<voither_proto::workload::Artifact>,
    current: Option<crate::workloads::Download>,
}

impl Uplink {
    /// A manifest arrived: verify it, then fetch what it needs or install it.
    async fn on_manifest(
        &self,
        sess: &mut GatewaySession,
        signed: voither_proto::SignedManifest,
    ) -> Option<PendingManifest> {
        let w = self.workloads.as_ref()?;
        let manifest = match w.verify(&signed) {
            Ok(m) => m,
            Err(r) => {
                w.refused(&r, "hub");
                return None;
            }
        };
        let queue: VecDeque<_> = w.missing(&manifest).into();
        info!(
            version = manifest.version,
            artifacts_to_fetch = queue.len(),
            "Hub sent a workload manifest; signature verified."
        );
        self.next_artifact(sess, PendingManifest { signed, manifest, queue, current: None }).await
    }

    /// Starts the next artifact download, or installs the manifest when none is left.
    async fn next_artifact(&self, sess: &mut GatewaySession, mut p: PendingManifest) -> Option<PendingManifest> {
        let w = self.workloads.as_ref()?;
        match p.queue.pop_front() {
            Some(a) => match w.download(&a) {
                Ok(d) => {
                    sess.fetch_artifact(voither_proto::FetchArtifact {
                        sha256: a.sha256.clone(),
                        offset: 0,
                        max_len: voither_proto::workload::MAX_CHUNK,
                    });
                    p.current = Some(d);
                    Some(p)
                }
                Err(r) => {
                    w.refused(&r, "hub");
                    None
                }
            },
            None => {
                if let Err(r) = w.install(&p.signed, p.manifest).await {
                    w.refused(&r, "hub");
                }
                None
            }
        }
    }

    /// A piece of the artifact being fetched.
    async fn on_chunk(
        &self,
        sess: &mut GatewaySession,
        mut p: PendingManifest,
        c: voither_proto::ArtifactChunk,
    ) -> Option<PendingManifest> {
        let w = self.workloads.as_ref()?;
        let Some(mut d) = p.current.take() else { return Some(p) };
        if d.artifact.sha256 != c.sha256 {
            p.current = Some(d);
            return Some(p);
        }
        let step = if c.found {
            d.write(c.offset, &c.data)
        } else {
            Err(crate::workloads::Refusal::Artifact {
                name: d.artifact.name.clone(),
                problem: "the hub does not have it".into(),
            })
        };
        if let Err(r) = step {
            d.abandon();
            w.refused(&r, "hub");
            return None;
        }
        if !d.complete() {
            sess.fetch_artifact(voither_proto::FetchArtifact {
                sha256: c.sha256,
                offset: d.written,
                max_len: voither_proto::workload::MAX_CHUNK,
            });
            p.current = Some(d);
            return Some(p);
        }
        if let Err(r) = d.finish() {
            w.refused(&r, "hub");
            return None;
        }
        self.next_artifact(sess, p).await
    }
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
        let tls_files = [ups.ca.as_path(), ups.cert.as_path(), ups.key.as_path()];
        let mut tls_stamps = crate::tls::stamps(&tls_files);
        self.cert_expiry();
        let mut idx = 0usize;
        let mut failures = 0u32;
        // An endpoint whose acks stalled answers handshakes but cannot make data durable:
        // probes of it do not count as healthy for a while.
        let mut stalled: Option<(String, Instant)> = None;
        loop {
            if *shutdown.borrow() {
                break;
            }
            // Rotation: new certificate, key or CA files are used from the next connection.
            let now = crate::tls::stamps(&tls_files);
            if now != tls_stamps {
                tls_stamps = now;
                match crate::tls::client_config(&ups.ca, &ups.cert, &ups.key, ups.keep_alive(), ups.idle_timeout()) {
                    Ok(c) => {
                        endpoint.set_default_client_config(c);
                        self.metrics.tls_reloads.inc();
                        info!(cert = %ups.cert.display(), "TLS certificate, key or CA changed; the next connection uses them.");
                    }
                    Err(e) => warn!(error = %e, "TLS files changed but are not usable; keeping the previous ones."),
                }
                self.cert_expiry();
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
            let hold = stalled.as_ref().filter(|(ep, _)| Some(ep) == preferred.as_ref()).map(|(_, until)| *until);
            let res = self.session(&endpoint, &target, preferred.as_deref(), hold, &mut shutdown).await;
            self.metrics.uplink_connected.set(0);
            self.metrics.uplink_endpoint.get_or_create(&EndpointLabel { endpoint: target.clone() }).set(0);
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
                    if matches!(e, SessionError::AckStall(_)) {
                        self.metrics.uplink_ack_stalls.inc();
                        stalled = Some((target.clone(), Instant::now() + stall_hold_down(ups)));
                    }
                    if list.len() > 1 {
                        idx += 1;
                        self.metrics.uplink_failovers.inc();
                        info!(from = %target, to = %list[idx % list.len()], "Failing over to the next endpoint.");
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
        hold_until: Option<Instant>,
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
            max_batch_bytes: batch_bytes_for(ups.rate_limit_bytes_per_s),
            status_interval: Duration::from_secs(5),
            ..GatewayConfig::default()
        };
        let mut sess = GatewaySession::new(pcfg, env!("CARGO_PKG_VERSION"), self.boot_id, inits);
        if let Some(w) = &self.workloads {
            sess.set_manifest_version(w.version());
        }
        let mut pending: Option<PendingManifest> = None;
        let origin = Instant::now();
        let mut dec = FrameDecoder::new(MAX_FRAME_LEN);
        let mut buf = vec![0u8; 64 * 1024];
        let mut out = Vec::with_capacity(64 * 1024);
        let mut status_tick = tokio::time::interval(Duration::from_secs(1));
        // The session has no timer before Welcome; a hub that never answers must not
        // hold the gateway on a connection kept alive by QUIC keep-alives.
        let welcome_deadline = origin + ups.connect_timeout();
        let stall = Duration::from_millis(ups.ack_progress_timeout_ms);
        // Acks make progress: the last ack, or when the pipe went from idle to busy.
        let mut progress_at = Instant::now();
        let mut flights: VecDeque<Flight> = VecDeque::new();
        let mut pace = Pace::new(ups.rate_limit_bytes_per_s, Instant::now());
        self.set_rate(ups.rate_limit_bytes_per_s, 0);
        loop {
            if !sess.is_ready() && Instant::now() >= welcome_deadline {
                return Err(SessionError::Timeout);
            }
            self.heartbeat.uplink.tick();
            // Act on events.
            while let Some(ev) = sess.poll_event() {
                match ev {
                    GatewayEvent::Welcomed(w) => {
                        info!(endpoint = %target, hub = %w.hub_id, region = %w.region, gateway = %w.gateway_id, "Hub session established.");
                        self.metrics.uplink_connected.set(1);
                        {
                            let mut st = self.status.lock().expect("status lock");
                            st.connected = true;
                            st.hub_id = Some(w.hub_id);
                            st.region = Some(w.region);
                            st.last_error = None;
                            st.sessions += 1;
                        }
                        self.metrics.uplink_endpoint.get_or_create(&EndpointLabel { endpoint: target.into() }).set(1);
                        self.adopt_endpoints(w.endpoints);
                        if std::env::var("VOITHER_GATEWAY_FAILPOINT").is_ok_and(|v| v == "stall-uplink") {
                            // Test hook: a hung uplink loop, for the watchdog test. Unset in production.
                            tracing::error!("Failpoint stall-uplink: the uplink loop hangs now.");
                            std::future::pending::<()>().await;
                        }
                    }
                    GatewayEvent::Acked { lane, through_seq } => {
                        let store = self.store.clone();
                        let l = lane.clone();
                        let (n, bytes) = tokio::task::spawn_blocking(move || store.ack_through(&l, through_seq))
                            .await
                            .expect("ack task")?;
                        debug!(%lane, through_seq, deleted = n, "Hub acknowledged.");
                        let now = Instant::now();
                        progress_at = now;
                        flights.retain(|f| {
                            let done = f.lane == lane && f.last_seq <= through_seq;
                            if done {
                                self.metrics.uplink_ack_latency_seconds.observe((now - f.sent).as_secs_f64());
                            }
                            !done
                        });
                        self.space.notify_waiters();
                        self.metrics.synced_records.get_or_create(&Metrics::lane(&lane)).inc_by(n);
                        self.metrics.synced_bytes.get_or_create(&Metrics::lane(&lane)).inc_by(bytes);
                    }
                    GatewayEvent::Command(Command::SlowDown(rate)) => {
                        let effective = lower_limit(ups.rate_limit_bytes_per_s, rate);
                        pace.set_rate(effective, Instant::now());
                        sess.set_max_batch_bytes(batch_bytes_for(effective));
                        self.set_rate(effective, rate);
                        info!(
                            hub_rate_bytes_per_s = rate,
                            effective_bytes_per_s = effective,
                            "Hub asked the uplink to slow down."
                        );
                    }
                    GatewayEvent::Command(c) => {
                        info!(command = ?c, "Hub command received; this version does not act on it.");
                    }
                    GatewayEvent::Manifest(m) => {
                        if let Some(d) = pending.take().and_then(|p| p.current) {
                            d.abandon();
                        }
                        pending = self.on_manifest(&mut sess, m).await;
                    }
                    GatewayEvent::ArtifactChunk(c) => {
                        if let Some(p) = pending.take() {
                            pending = self.on_chunk(&mut sess, p, c).await;
                        }
                    }
                }
            }
            // Fill the window from the store, as far as the rate limit allows.
            if sess.inflight_batches() == 0 {
                progress_at = Instant::now();
            }
            out.clear();
            while pace.blocked_until(Instant::now()).is_none() {
                let Some(slot) = sess.poll_send_slot() else { break };
                let store = self.store.clone();
                let lane = slot.lane.clone();
                let (records, gaps) = tokio::task::spawn_blocking(move || {
                    store.read_from(&lane, slot.from_seq, slot.max_records, slot.max_bytes)
                })
                .await
                .expect("read task")?;
                let first = records.first_seq().into_iter().chain(gaps.iter().map(|g| g.from_seq)).min();
                let last = records.last_seq().into_iter().chain(gaps.iter().map(|g| g.through_seq)).max();
                let bytes = records.payload_bytes();
                let n = records.len();
                sess.send_batch(origin.elapsed(), &slot.lane, records, gaps)?;
                if let (Some(first), Some(last)) = (first, last) {
                    let span = tracing::info_span!(
                        "sync_batch",
                        lane = %slot.lane,
                        first_seq = first,
                        last_seq = last,
                        records = n,
                        bytes,
                        endpoint = %target
                    );
                    if flights.len() >= MAX_FLIGHTS {
                        flights.pop_front();
                    }
                    flights.push_back(Flight {
                        lane: slot.lane.clone(),
                        last_seq: last,
                        sent: Instant::now(),
                        _span: span,
                    });
                }
                // Write each batch as it is read, so the pace sees its size.
                let before = out.len();
                while let Some(f) = sess.poll_transmit() {
                    encode_frame(&f, &mut out, MAX_FRAME_LEN).expect("batches are sized under the frame limit");
                }
                pace.spend(out.len() - before, Instant::now());
            }
            // Write what the session queued.
            while let Some(f) = sess.poll_transmit() {
                encode_frame(&f, &mut out, MAX_FRAME_LEN).expect("batches are sized under the frame limit");
            }
            if !out.is_empty() {
                send.write_all(&out).await?;
                self.metrics.uplink_sent_bytes.inc_by(out.len() as u64);
            }
            let timeout = sess.poll_timeout().map(|t| origin + t);
            let stall_at = (sess.inflight_batches() > 0).then_some(progress_at + stall);
            let paced = pace.blocked_until(Instant::now());
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
                _ = sleep_until_opt(stall_at) => {
                    let _ = send.finish();
                    conn.close(0u32.into(), b"acks stalled");
                    return Err(SessionError::AckStall(ups.ack_progress_timeout_ms));
                }
                _ = sleep_until_opt(paced) => {}
                _ = probe_tick.tick(), if preferred.is_some() && probe.is_none() => {
                    let ep = endpoint.clone();
                    let name = ups.server_name.clone();
                    let to = ups.connect_timeout();
                    let target = preferred.unwrap_or_default().to_string();
                    probe = Some(tokio::spawn(async move { probe_endpoint(&ep, &target, &name, to).await }));
                }
                ok = async { probe.as_mut().expect("guarded").await.unwrap_or(false) }, if probe.is_some() => {
                    probe = None;
                    if ok && hold_until.is_none_or(|t| Instant::now() >= t) {
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
                    self.cert_time_left();
                    let rtt = conn.rtt();
                    self.metrics.uplink_rtt_seconds.set(rtt.as_secs_f64());
                    self.status.lock().expect("status lock").rtt_ms = Some((rtt.as_secs_f64() * 100_000.0).round() / 100.0);
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
                            store_used_bytes: Some(stats.iter().map(|s| s.bytes).sum()),
                            store_budget_bytes: Some(self.cfg.store_max_bytes()),
                            manifest_version: self.workloads.as_ref().map(|w| w.version()),
                            workloads: self.workloads.as_ref().map(|w| w.states()),
                        });
                    }
                }
            }
        }
    }
}

impl Uplink {
    /// Updates the certificate expiry in metrics and `/status`.
    /// Reads the certificate's expiry (at start and when the TLS files change).
    fn cert_expiry(&self) {
        let not_after = crate::tls::not_after(&self.cfg.uplink.cert)
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs());
        self.status.lock().expect("status lock").cert_not_after_unix = not_after;
        self.cert_time_left();
    }

    /// Updates the time left on the certificate from the expiry read last.
    fn cert_time_left(&self) {
        let mut st = self.status.lock().expect("status lock");
        let Some(t) = st.cert_not_after_unix else { return };
        let left = t as f64 - crate::unix_ms() as f64 / 1000.0;
        self.metrics.tls_cert_expiry_seconds.set(left);
        st.cert_expires_in_days = Some((left / 86_400.0 * 10.0).round() / 10.0);
    }

    fn set_rate(&self, effective: u64, hub: u64) {
        self.metrics.uplink_rate_limit_bytes.set(i64::try_from(effective).unwrap_or(i64::MAX));
        let mut st = self.status.lock().expect("status lock");
        st.rate_limit_bytes_per_s = effective;
        st.hub_rate_limit_bytes_per_s = hub;
    }

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

/// Payload bytes per batch: under a rate limit about a second of the link, so pacing
/// stays smooth; else a quarter of the frame limit.
fn batch_bytes_for(rate: u64) -> usize {
    match rate {
        0 => MAX_FRAME_LEN / 4,
        r => usize::try_from(r).unwrap_or(usize::MAX).clamp(16 * 1024, MAX_FRAME_LEN / 4),
    }
}

/// How long an endpoint whose acks stalled is not failed back to: ten ack-progress
/// timeouts, at least the fail-back delay.
fn stall_hold_down(ups: &crate::config::UplinkSection) -> Duration {
    Duration::from_millis(ups.ack_progress_timeout_ms.saturating_mul(10).max(ups.failback_after_ms))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_combine_to_the_lower_one() {
        assert_eq!(lower_limit(0, 0), 0);
        assert_eq!(lower_limit(0, 5_000), 5_000);
        assert_eq!(lower_limit(8_000, 0), 8_000);
        assert_eq!(lower_limit(8_000, 5_000), 5_000);
    }

    #[test]
    fn pace_holds_writes_to_the_rate() {
        let t0 = Instant::now();
        let mut p = Pace::new(10_000, t0);
        assert_eq!(p.blocked_until(t0), None, "a full bucket lets the first write through");
        p.spend(25_000, t0);
        // 25 kB taken from a 10 kB balance: 15 kB of debt, 1.5 s at 10 kB/s.
        let until = p.blocked_until(t0).expect("in debt");
        assert_eq!(until - t0, Duration::from_millis(1_500));
        assert!(p.blocked_until(t0 + Duration::from_millis(1_499)).is_some());
        assert_eq!(p.blocked_until(t0 + Duration::from_millis(1_500)), None);
        // Idle time refills at most one second's worth.
        let later = t0 + Duration::from_secs(60);
        p.spend(10_000, later);
        assert_eq!(p.blocked_until(later), None);
        p.spend(1, later);
        assert!(p.blocked_until(later).is_some());
    }

    #[test]
    fn no_rate_never_blocks_and_a_lower_rate_caps_the_balance() {
        let t0 = Instant::now();
        let mut p = Pace::new(0, t0);
        p.spend(usize::MAX / 2, t0);
        assert_eq!(p.blocked_until(t0), None);
        let mut p = Pace::new(100_000, t0);
        p.set_rate(2_000, t0);
        p.spend(3_000, t0);
        assert_eq!(p.blocked_until(t0).map(|u| u - t0), Some(Duration::from_millis(500)));
    }
}
