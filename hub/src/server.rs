//! The QUIC server: accepts gateways, takes their id from the verified certificate,
//! and drives one [`HubSession`] per connection against the sink.
//!
//! Store requests that arrive together are committed together (one durable sink
//! transaction for all batches read so far), and acked only after that commit.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, info, warn};
use voither_proto::{
    encode_frame, error_code, ErrorFrame, Frame, FrameDecoder, HubEvent, HubInfo, HubSession, StoreRequest,
    MAX_FRAME_LEN,
};

use crate::metrics::Metrics;
use crate::sink::{AnySink, SinkError};

/// What the fleet view knows of one gateway.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FleetEntry {
    /// Gateway id (from its certificate).
    pub gateway: String,
    /// `connected` or `disconnected`.
    pub state: String,
    /// Last frame received, ms since the epoch.
    pub last_seen_ms: u64,
    /// Remote address of the current or last connection.
    pub remote: String,
    /// Agent version from `Hello`.
    pub agent_version: String,
    /// Region of this hub.
    pub region: String,
    /// Records the gateway still holds, from its last status.
    pub backlog_records: u64,
    /// Age of its oldest unsynced record, from its last status (ms).
    pub oldest_unsynced_age_ms: u64,
    /// Its uptime, from its last status (s).
    pub uptime_s: u64,
    /// Bytes the gateway still holds, from its last status.
    pub backlog_bytes: u64,
    /// Bytes its store holds, from its last status.
    pub store_used_bytes: u64,
    /// Its store's budget, from its last status (0: not reported).
    pub store_budget_bytes: u64,
    /// Version of the workload manifest it runs, from its last status.
    pub manifest_version: u64,
    /// Its workloads, from its last status.
    pub workloads: Vec<voither_proto::WorkloadState>,
    /// Records stored at this hub from this gateway since the hub started.
    pub stored_records: u64,
}

/// Shared hub state.
#[derive(Debug)]
pub struct Hub {
    /// The sink.
    pub sink: AnySink,
    /// Identity and failover list.
    pub info: HubInfo,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Fleet view.
    pub fleet: Mutex<HashMap<String, FleetEntry>>,
    /// Most gateway connections at once (`hub.max_connections`).
    pub max_connections: u32,
    /// Allow-list and revocation list.
    pub auth: Arc<crate::auth::Auth>,
    /// Signed workload manifests and artifacts.
    pub catalog: Arc<crate::workloads::Catalog>,
    /// Bytes per second every gateway is asked to stay under (0: no limit).
    pub gateway_rate_limit: u64,
    /// Sink commits since start.
    pub commits: std::sync::atomic::AtomicU64,
    /// Rate limit of log lines about misbehaving peers.
    pub log_limit: Mutex<voither_proto::limit::LogLimiter>,
    /// Start time, for the rate limiter.
    pub started: tokio::time::Instant,
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("read: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("frame: {0}")]
    Decode(#[from] voither_proto::DecodeError),
    #[error("protocol: {0}")]
    Proto(#[from] voither_proto::ProtoError),
    #[error("sink: {0}")]
    Sink(#[from] crate::sink::SinkError),
    #[error("gateway closed the stream")]
    Closed,
    #[error("shutting down")]
    Shutdown,
    #[error("gateway {}", .0.as_str())]
    Forbidden(crate::auth::Refused),
}

impl ConnError {
    fn code(&self) -> u32 {
        match self {
            ConnError::Decode(_) => error_code::FRAME,
            ConnError::Proto(p) => p.code(),
            ConnError::Sink(_) => error_code::INTERNAL,
            ConnError::Forbidden(_) => error_code::FORBIDDEN,
            _ => error_code::NONE,
        }
    }
}

/// Test hooks, read once at start from `VOITHER_HUB_FAILPOINT`; unset in production.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failpoint {
    /// `exit-after-commit:N`: exit (code 86) right after the N-th sink commit, before
    /// the ack is sent: the crash window that effectively-once delivery must survive.
    ExitAfterCommit(u64),
    /// `hold-acks`: answer the handshake but never commit nor ack a batch, like a hub
    /// whose sink hangs: gateways must see acks stop making progress.
    HoldAcks,
}

fn failpoint() -> Option<Failpoint> {
    static AT: std::sync::OnceLock<Option<Failpoint>> = std::sync::OnceLock::new();
    *AT.get_or_init(|| {
        let v = std::env::var("VOITHER_HUB_FAILPOINT").ok()?;
        if v == "hold-acks" {
            return Some(Failpoint::HoldAcks);
        }
        v.strip_prefix("exit-after-commit:").and_then(|n| n.parse().ok()).map(Failpoint::ExitAfterCommit)
    })
}

fn failpoint_after_commit(commits: &std::sync::atomic::AtomicU64) {
    let n = commits.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
    if failpoint() == Some(Failpoint::ExitAfterCommit(n)) {
        tracing::error!(commit = n, "Failpoint exit-after-commit reached: exiting before the ack.");
        std::process::exit(86);
    }
}

const SINK_RETRY_MIN: Duration = Duration::from_millis(100);
const SINK_RETRY_MAX: Duration = Duration::from_secs(2);

/// Counts and logs an unavailable sink, then waits out the backoff (doubling to
/// [`SINK_RETRY_MAX`]); ends the session if the gateway goes away or the hub stops.
async fn sink_unavailable(
    hub: &Hub,
    gw: &str,
    e: &SinkError,
    backoff: &mut Duration,
    conn: &quinn::Connection,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), ConnError> {
    hub.metrics.sink_retries.inc();
    hub.metrics.sink_up.set(0);
    let now = hub.started.elapsed();
    if let Some(suppressed) = hub.log_limit.lock().expect("limit lock").allow("sink-unavailable", now) {
        warn!(gateway = %gw, error = %e, retry_in_ms = backoff.as_millis() as u64, suppressed, "Sink unavailable; holding acks and retrying.");
    }
    tokio::select! {
        () = tokio::time::sleep(*backoff) => {}
        e = conn.closed() => return Err(ConnError::Connection(e)),
        _ = shutdown.changed() => return Err(ConnError::Shutdown),
    }
    *backoff = (*backoff * 2).min(SINK_RETRY_MAX);
    Ok(())
}

fn sink_available(hub: &Hub, backoff: &mut Duration) {
    if *backoff > SINK_RETRY_MIN {
        info!("Sink available again.");
    }
    *backoff = SINK_RETRY_MIN;
    hub.metrics.sink_up.set(1);
}

/// Accepts connections until `shutdown` turns true.
pub async fn serve(hub: Arc<Hub>, endpoint: quinn::Endpoint, shutdown: watch::Receiver<bool>) {
    let mut stop = shutdown.clone();
    loop {
        let incoming = tokio::select! {
            _ = stop.changed() => break,
            i = endpoint.accept() => match i { Some(i) => i, None => break },
        };
        if hub.metrics.connected.get() >= i64::from(hub.max_connections) {
            hub.metrics.refused_handshakes.inc();
            warn!(remote = %incoming.remote_address(), limit = hub.max_connections, "Connection limit reached (hub.max_connections), refused.");
            incoming.refuse();
            continue;
        }
        let hub = hub.clone();
        let sd = shutdown.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    hub.metrics.refused_handshakes.inc();
                    let now = hub.started.elapsed();
                    if let Some(suppressed) = hub.log_limit.lock().expect("limit lock").allow("handshake", now) {
                        warn!(%remote, error = %e, suppressed, "Handshake refused.");
                    }
                    return;
                }
            };
            handle(hub, conn, remote, sd).await;
        });
    }
    endpoint.close(0u32.into(), b"hub shutting down");
}

/// The catalog's manifest for `gw` when it is newer than `than`.
async fn newer_manifest(hub: &Hub, gw: &str, than: u64) -> Option<crate::workloads::Served> {
    let catalog = hub.catalog.clone();
    let g = gw.to_owned();
    let served = tokio::task::spawn_blocking(move || catalog.manifest_for(&g)).await.ok()??;
    (served.version > than).then_some(served)
}

/// The gateway id and the DER of the verified client certificate.
fn peer_id(conn: &quinn::Connection) -> Option<(String, Vec<u8>)> {
    let any = conn.peer_identity()?;
    let certs = any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok()?;
    let leaf = certs.first()?;
    Some((crate::tls::gateway_id(leaf)?, leaf.as_ref().to_vec()))
}

async fn handle(hub: Arc<Hub>, conn: quinn::Connection, remote: SocketAddr, shutdown: watch::Receiver<bool>) {
    let Some((gw, cert_der)) = peer_id(&conn) else {
        warn!(%remote, "Client certificate names no gateway, refused.");
        conn.close(error_code::FORBIDDEN.into(), b"no gateway id in certificate");
        return;
    };
    if let Err(why) = hub.auth.check(&gw, &cert_der) {
        hub.metrics.refused_handshakes.inc();
        hub.metrics.auth_refusals.get_or_create(&crate::metrics::ReasonLabel { reason: why.as_str().into() }).inc();
        let now = hub.started.elapsed();
        if let Some(suppressed) = hub.log_limit.lock().expect("limit lock").allow("auth", now) {
            warn!(gateway = %gw, %remote, reason = why.as_str(), suppressed, "Gateway refused by the allow-list or revocation list.");
        }
        conn.close(error_code::FORBIDDEN.into(), why.as_str().as_bytes());
        return;
    }
    hub.metrics.connections.inc();
    hub.metrics.connected.inc();
    {
        let mut f = hub.fleet.lock().expect("fleet lock");
        let e = f.entry(gw.clone()).or_default();
        e.gateway = gw.clone();
        e.state = "connected".into();
        e.remote = remote.to_string();
        e.last_seen_ms = unix_ms();
        e.region = hub.info.region.clone();
    }
    info!(gateway = %gw, %remote, "Gateway connected.");
    let res = session(&hub, &conn, &gw, &cert_der, shutdown).await;
    hub.metrics.connected.dec();
    if let Some(e) = hub.fleet.lock().expect("fleet lock").get_mut(&gw) {
        e.state = "disconnected".into();
    }
    match res {
        Ok(()) | Err(ConnError::Closed) => info!(gateway = %gw, "Gateway disconnected."),
        Err(ConnError::Shutdown) => {
            conn.close(0u32.into(), b"hub shutting down");
        }
        Err(ConnError::Connection(e)) => info!(gateway = %gw, reason = %e, "Gateway connection ended."),
        Err(ConnError::Forbidden(why)) => {
            hub.metrics.auth_refusals.get_or_create(&crate::metrics::ReasonLabel { reason: why.as_str().into() }).inc();
            warn!(gateway = %gw, reason = why.as_str(), "Gateway revoked or no longer allowed; closing its live connection.");
            conn.close(error_code::FORBIDDEN.into(), why.as_str().as_bytes());
        }
        Err(e) => {
            let kind = match &e {
                ConnError::Decode(_) => "frame",
                ConnError::Proto(_) => "protocol",
                ConnError::Sink(_) => "sink",
                _ => "other",
            };
            hub.metrics.session_errors.get_or_create(&crate::metrics::KindLabel { kind: kind.into() }).inc();
            let now = hub.started.elapsed();
            if let Some(suppressed) = hub.log_limit.lock().expect("limit lock").allow(kind, now) {
                warn!(gateway = %gw, error = %e, suppressed, "Gateway session failed, closing.");
            }
            conn.close(e.code().into(), e.to_string().as_bytes());
        }
    }
}

/// Most store requests a session holds while a commit runs: reads stop there, and QUIC
/// flow control holds the gateway back until the commit ends. A gateway keeps its own
/// window of batches in flight well under this.
const MAX_PENDING_BATCHES: usize = 64;

/// Most payload bytes a session holds while a commit runs (see [`MAX_PENDING_BATCHES`]).
const MAX_PENDING_BYTES: usize = 64 * 1024 * 1024;

type CommitDone = Result<(Vec<StoreRequest>, Duration), ConnError>;

/// Commits `pending` durably, retrying while the sink is unavailable (the gateway keeps
/// its records and its window meanwhile, nothing is lost), and counts what it stored.
/// Returns the requests, to ack, and the backoff to carry on with.
async fn commit_pending(
    hub: &Hub,
    gw: &str,
    conn: &quinn::Connection,
    mut shutdown: watch::Receiver<bool>,
    mut pending: Vec<StoreRequest>,
    mut backoff: Duration,
) -> CommitDone {
    let started = tokio::time::Instant::now();
    let span = tracing::info_span!(
        "sink_commit",
        gateway = %gw,
        batches = pending.len(),
        records = pending.iter().map(|r| r.records.len()).sum::<usize>()
    );
    let (reqs, stats) = loop {
        let (reqs, r) = tracing::Instrument::instrument(hub.sink.commit(gw, pending), span.clone()).await;
        match r {
            Err(e) if e.is_transient() => {
                pending = reqs;
                sink_unavailable(hub, gw, &e, &mut backoff, conn, &mut shutdown).await?;
            }
            r => break (reqs, r),
        }
    };
    sink_available(hub, &mut backoff);
    let stats = stats?;
    hub.metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
    hub.metrics.stored_records.inc_by(stats.records);
    hub.metrics.stored_bytes.inc_by(stats.bytes);
    hub.metrics.duplicate_records.inc_by(stats.duplicates);
    hub.metrics.gaps.inc_by(stats.gaps);
    hub.metrics.gap_records.inc_by(stats.gap_records);
    if let Some(e) = hub.fleet.lock().expect("fleet lock").get_mut(gw) {
        e.stored_records += stats.records;
        e.last_seen_ms = unix_ms();
    }
    failpoint_after_commit(&hub.commits);
    Ok((reqs, backoff))
}

/// One gateway's session. Reading goes on while a commit runs: what arrives meanwhile is
/// committed together in the next one, so the sink's fsync and the decoding overlap.
/// One commit at a time, so acks leave in order and each commit sees the marks of the
/// one before.
async fn session(
    hub: &Hub,
    conn: &quinn::Connection,
    gw: &str,
    cert_der: &[u8],
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ConnError> {
    let (mut send, mut recv) = tokio::select! {
        _ = shutdown.changed() => return Err(ConnError::Shutdown),
        s = conn.accept_bi() => s?,
    };
    let mut sess = HubSession::new(gw, hub.info.clone());
    let mut dec = FrameDecoder::new(MAX_FRAME_LEN);
    let mut buf = vec![0u8; 256 * 1024];
    let mut out = Vec::new();
    // The manifest version the gateway runs (from Hello and Status) and the highest
    // this session sent; a newer file in the catalog is pushed within a few seconds.
    let mut gateway_manifest = 0u64;
    let mut sent_manifest = 0u64;
    let mut ready = false;
    let mut auth_changed = hub.auth.subscribe();
    let mut backoff = SINK_RETRY_MIN;
    let mut manifest_tick = tokio::time::interval(Duration::from_secs(2));
    manifest_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending: Vec<StoreRequest> = Vec::new();
    let mut pending_bytes = 0usize;
    let mut committing: Option<std::pin::Pin<Box<dyn std::future::Future<Output = CommitDone> + Send + '_>>> = None;
    // A bad frame or the end of the stream: what came before it is still committed and
    // acked, then the session ends with this.
    let mut ending: Option<ConnError> = None;
    loop {
        let can_read = ending.is_none() && pending.len() < MAX_PENDING_BATCHES && pending_bytes < MAX_PENDING_BYTES;
        tokio::select! {
            _ = shutdown.changed() => return Err(ConnError::Shutdown),
            done = async { committing.as_mut().expect("guarded by is_some").await }, if committing.is_some() => {
                committing = None;
                let (reqs, b) = done?;
                backoff = b;
                for r in reqs {
                    sess.stored(&r.lane, r.through_seq);
                }
            }
            r = recv.read(&mut buf), if can_read => {
                match r? {
                    Some(n) => {
                        dec.push(&buf[..n]);
                        let mut frames = Vec::new();
                        let decoded = loop {
                            match dec.next_frame() {
                                Ok(Some(f)) => frames.push(f),
                                Ok(None) => break Ok(()),
                                Err(e) => break Err(e),
                            }
                        };
                        ending = decoded.err().map(ConnError::from);
                        for f in frames {
                            if let Err(e) = sess.handle_frame(f) {
                                ending = Some(e.into());
                                break;
                            }
                        }
                    }
                    None => ending = Some(dec.finish().err().map_or(ConnError::Closed, ConnError::from)),
                }
            }
            _ = auth_changed.changed() => {
                hub.auth.check(gw, cert_der).map_err(ConnError::Forbidden)?;
                continue;
            }
            _ = manifest_tick.tick(), if ready => {
                if let Some(s) = newer_manifest(hub, gw, gateway_manifest.max(sent_manifest)).await {
                    sent_manifest = s.version;
                    sess.send_manifest(s.signed);
                }
            }
        }
        // Events: Hello → marks; Store → pending, for the next commit.
        while let Some(ev) = sess.poll_event() {
            match ev {
                HubEvent::Hello(h) => {
                    let lanes: Vec<String> = h.lanes.iter().map(|l| l.lane.clone()).collect();
                    let marks = loop {
                        match hub.sink.marks(gw, lanes.clone()).await {
                            Err(e) if e.is_transient() => {
                                sink_unavailable(hub, gw, &e, &mut backoff, conn, &mut shutdown).await?
                            }
                            r => break r?,
                        }
                    };
                    sink_available(hub, &mut backoff);
                    if let Some(e) = hub.fleet.lock().expect("fleet lock").get_mut(gw) {
                        e.agent_version = h.agent_version.clone();
                    }
                    debug!(gateway = %gw, ?marks, "Hello.");
                    gateway_manifest = h.manifest_version.unwrap_or(0);
                    let offer = newer_manifest(hub, gw, gateway_manifest).await;
                    sess.accept(&marks, offer.as_ref().map_or(0, |s| s.version));
                    ready = true;
                    if hub.gateway_rate_limit > 0 {
                        sess.command(voither_proto::Command::SlowDown(hub.gateway_rate_limit));
                    }
                    if let Some(s) = offer {
                        info!(gateway = %gw, version = s.version, file = %s.path.display(), "Sending a workload manifest.");
                        sent_manifest = s.version;
                        sess.send_manifest(s.signed);
                    }
                }
                HubEvent::Store(req) => {
                    pending_bytes += req.records.payload_bytes();
                    pending.push(req);
                }
                HubEvent::FetchArtifact(f) => {
                    let catalog = hub.catalog.clone();
                    let chunk = tokio::task::spawn_blocking(move || catalog.chunk(&f.sha256, f.offset, f.max_len))
                        .await
                        .expect("artifact task");
                    if !chunk.found {
                        warn!(gateway = %gw, sha256 = %chunk.sha256, "Gateway asked for an artifact this hub does not have.");
                    }
                    sess.send_chunk(chunk);
                }
                HubEvent::Status(s) => {
                    gateway_manifest = s.manifest_version.unwrap_or(gateway_manifest);
                    if let Some(e) = hub.fleet.lock().expect("fleet lock").get_mut(gw) {
                        e.backlog_records = s.lanes.iter().map(|l| l.backlog_records).sum();
                        e.backlog_bytes = s.lanes.iter().map(|l| l.backlog_bytes).sum();
                        e.oldest_unsynced_age_ms = s.lanes.iter().map(|l| l.oldest_unsynced_age_ms).max().unwrap_or(0);
                        e.uptime_s = s.uptime_s;
                        e.store_used_bytes = s.store_used_bytes.unwrap_or(0);
                        e.store_budget_bytes = s.store_budget_bytes.unwrap_or(0);
                        e.manifest_version = s.manifest_version.unwrap_or(0);
                        e.workloads = s.workloads.clone().unwrap_or_default();
                        e.last_seen_ms = unix_ms();
                    }
                }
            }
        }
        if failpoint() == Some(Failpoint::HoldAcks) {
            pending.clear();
        }
        if committing.is_none() && !pending.is_empty() {
            pending_bytes = 0;
            committing =
                Some(Box::pin(commit_pending(hub, gw, conn, shutdown.clone(), std::mem::take(&mut pending), backoff)));
        }
        out.clear();
        while let Some(f) = sess.poll_transmit() {
            encode_frame(&f, &mut out, MAX_FRAME_LEN).expect("hub frames are small");
        }
        if committing.is_none() {
            if let Some(e) = ending.take() {
                if matches!(e, ConnError::Closed) {
                    let _ = send.write_all(&out).await;
                    return Err(e);
                }
                let frame = Frame::Error(ErrorFrame { code: e.code(), reason: e.to_string() });
                let _ = encode_frame(&frame, &mut out, MAX_FRAME_LEN);
                let _ = send.write_all(&out).await;
                let _ = send.finish();
                // Give the error frame a moment to leave before the connection closes.
                let _ = tokio::time::timeout(Duration::from_millis(200), send.stopped()).await;
                return Err(e);
            }
        }
        if !out.is_empty() {
            send.write_all(&out).await?;
        }
    }
}
