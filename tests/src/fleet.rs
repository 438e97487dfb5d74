//! The fleet simulator: thousands of simulated gateways against one real hub process,
//! to measure what one hub replica sustains.
//!
//! Every simulated gateway has its own client certificate (issued in this process
//! with rcgen by the CA that `voither-hub pki` made) and its own QUIC connection; all
//! connections share one quinn client [`quinn::Endpoint`] (one UDP socket), each made
//! with [`quinn::Endpoint::connect_with`] and that gateway's TLS configuration. A
//! gateway speaks the real protocol through [`voither_proto::GatewaySession`], the way
//! the agent's uplink does: `Hello`, `Welcome`, a window of `Batch`es in flight, `Ack`s
//! after the hub's sink commit, periodic `Status`.
//!
//! Records are generated at `rate` per second per gateway, from the moment the hub
//! welcomed it, into an in-memory "store" of one lane ([`LANE`]): seqs 1, 2, 3 … per
//! gateway, never reused, payload `record_bytes` long and starting with the gateway
//! index and the seq ([`payload`]), so a checker can verify the sink afterwards
//! ([`FleetRun::gateways`] says how far each gateway was acked). Records are appended
//! in groups at most every `flush_ms` (like the agent's ingest group commit) and sent
//! in batches of at most `batch` records. A gateway whose unacked backlog reaches its
//! share of a memory budget stops generating until acks free space: the records it
//! could not generate count as offered but not sent ("shed").
//!
//! # What is measured
//!
//! The steady window starts when every gateway's connect attempt is over (and not
//! before `ramp` has passed) and lasts `duration`. In it: offered records/s (the
//! schedule of all connected gateways), achieved records/s and payload MB/s (acks),
//! ack latency per batch (from writing the batch to the ack that covers it), the hub's
//! RSS (median and peak), the hub's and this process's CPU (utime + stime, with the
//! hub's split by thread name), the whole machine's busy and iowait shares, the hub's
//! sink commits (count and time, from its `/metrics`), and UDP receive-buffer drops.
//! The simulator shares the machine with the hub: its own CPU is reported next to the
//! hub's for that reason.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use voither_proto::{
    encode_frame, FrameDecoder, GatewayConfig, GatewayEvent, GatewaySession, LaneInit, LaneStatus, Record, Records,
    Status, MAX_FRAME_LEN,
};

use crate::procs::{self, Hub, Pki};

/// The one lane every simulated gateway sends.
pub const LANE: &str = "telemetry";

/// Memory for unacked records over all simulated gateways, bytes.
const BACKLOG_BUDGET: usize = 512 * 1024 * 1024;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct FleetOpts {
    /// Simulated gateways.
    pub gateways: usize,
    /// Records per second per gateway.
    pub rate: f64,
    /// Payload bytes per record.
    pub record_bytes: usize,
    /// Most records per batch.
    pub batch: usize,
    /// Batches in flight per gateway.
    pub window: usize,
    /// Records become sendable in groups at most this often (ms).
    pub flush_ms: u64,
    /// Length of the steady window.
    pub duration: Duration,
    /// Connects are spread evenly over this time.
    pub ramp: Duration,
    /// Give up a connect (handshake and `Welcome`) after this long.
    pub connect_timeout: Duration,
    /// After the window, wait this long at most for acks of batches in flight.
    pub drain: Duration,
    /// TOML appended to the hub's config (whole sections, e.g. `[sink]`).
    pub hub_extra_config: String,
    /// Worker threads of the simulator's runtime (0: one per core).
    pub threads: usize,
    /// `RUST_LOG` of the hub (empty: the test helper's `info,quinn=warn`).
    pub hub_log: String,
    /// Folder for the PKI and the hub's data (None: a temporary folder).
    pub dir: Option<PathBuf>,
    /// Print progress to stderr.
    pub progress: bool,
}

impl Default for FleetOpts {
    fn default() -> Self {
        Self {
            gateways: 1000,
            rate: 1.0,
            record_bytes: 256,
            batch: 1024,
            window: 8,
            flush_ms: 10,
            duration: Duration::from_secs(30),
            ramp: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(20),
            drain: Duration::from_secs(5),
            hub_extra_config: String::new(),
            threads: 0,
            hub_log: String::new(),
            dir: None,
            progress: false,
        }
    }
}

/// Errors that stop a run before it measures anything.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The options are not usable.
    #[error("{0}")]
    Opts(String),
    /// Reading the CA or issuing a gateway certificate failed.
    #[error("PKI: {0}")]
    Pki(String),
    /// A file or socket could not be used.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
}

/// How one simulated gateway ended.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayOutcome {
    /// Gateway id (its certificate's name).
    pub id: String,
    /// Index in the fleet (first bytes of every payload).
    pub index: u32,
    /// The hub welcomed it.
    pub connected: bool,
    /// From the start of its connect to `Welcome`, ms.
    pub connect_ms: Option<f64>,
    /// Why it failed to connect or lost its session early, if it did.
    pub error: Option<String>,
    /// Records generated: seqs `1..=generated` of [`LANE`].
    pub generated: u64,
    /// The hub acked every seq through this one: they are in its sink.
    pub acked_through: u64,
}

/// A percentile summary, milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    /// Samples (batches acked in the window).
    pub samples: usize,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

/// Connecting the fleet.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectReport {
    /// Gateways that got `Welcome`.
    pub connected: usize,
    /// Gateways that did not.
    pub failed: usize,
    /// Connected gateways whose session ended before the window did.
    pub dropped: usize,
    /// From the first connect to the last `Welcome`, seconds.
    pub connect_all_s: f64,
    /// Connect (handshake, stream, `Hello` → `Welcome`) time per gateway.
    pub connect_time: Latency,
    /// The first few distinct errors, with counts.
    pub errors: BTreeMap<String, usize>,
}

/// One process's resources over the window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProcReport {
    /// Median RSS in the window, MiB.
    pub rss_steady_mib: f64,
    /// Peak RSS since the process started (`VmHWM`), MiB.
    pub rss_peak_mib: f64,
    /// CPU (user + system) used in the window, seconds.
    pub cpu_s: f64,
    /// `cpu_s` per second of window: cores kept busy.
    pub cores: f64,
    /// CPU seconds per million records achieved.
    pub cpu_s_per_million_records: f64,
    /// Threads at the end of the window.
    pub threads: u64,
    /// CPU seconds in the window of the busiest threads (`name/tid`), largest first;
    /// the last entry sums the others.
    pub cpu_by_thread: Vec<(String, f64)>,
}

/// The hub's sink, from its `/metrics`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SinkReport {
    /// Commits in the window.
    pub commits: f64,
    /// Commits per second.
    pub commits_per_s: f64,
    /// Mean commit time, ms (the hub measures from asking a blocking thread to the end
    /// of the transaction, so waiting for the sink's single writer is included).
    pub commit_mean_ms: f64,
    /// Records stored per commit.
    pub records_per_commit: f64,
    /// Sum of commit times over the window length: how many commits were under way on
    /// average (above 1: they queue for the writer).
    pub commits_in_progress: f64,
}

/// The whole machine over the window, from `/proc/stat` and `/proc/net/snmp`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MachineReport {
    /// Cores.
    pub cores: usize,
    /// Share of all cores' time not idle and not waiting for I/O.
    pub busy: f64,
    /// Share of all cores' time idle while waiting for I/O (fsync).
    pub iowait: f64,
    /// Cores used by processes other than the hub and the simulator (builds, other
    /// tests): above a few hundredths, the figures were taken on a busy machine.
    pub other_cores: f64,
    /// Load average at the end of the window.
    pub loadavg_end: String,
    /// UDP datagrams dropped for a full receive buffer, in the window.
    pub udp_rcvbuf_errors: u64,
    /// UDP datagrams dropped for a full send buffer, in the window.
    pub udp_sndbuf_errors: u64,
    /// Datagrams dropped on the hub's socket (receive buffer full), from the first
    /// connect to the end of the window: lost handshakes and keep-alives.
    pub udp_drops_hub_socket: u64,
    /// The same on the simulator's socket.
    pub udp_drops_simulator_socket: u64,
    /// The kernel's default socket receive buffer (`net.core.rmem_default`), bytes;
    /// neither quinn socket asks for more.
    pub rmem_default: u64,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct FleetReport {
    /// Date, commit, machine.
    pub meta: serde_json::Value,
    /// The options, as run.
    pub opts: serde_json::Value,
    /// Issuing the gateways' certificates, seconds.
    pub pki_s: f64,
    /// Connecting.
    pub connect: ConnectReport,
    /// Steady window length, seconds.
    pub window_s: f64,
    /// Records per second the connected gateways were scheduled to produce.
    pub offered_records_per_s: f64,
    /// Records per second acked by the hub.
    pub achieved_records_per_s: f64,
    /// Offered payload, MB/s (10^6 bytes).
    pub offered_mb_per_s: f64,
    /// Acked payload, MB/s.
    pub achieved_mb_per_s: f64,
    /// Records not generated because a gateway's backlog was full (hub too slow).
    pub shed_records: u64,
    /// Records generated but not acked at the end of the window, over all gateways.
    pub backlog_records_end: u64,
    /// Batches sent in the window.
    pub batches: u64,
    /// Ack latency per batch in the window.
    pub ack_latency: Latency,
    /// The hub process.
    pub hub: ProcReport,
    /// This process (the simulated gateways), which shares the machine with the hub.
    pub simulator: ProcReport,
    /// The hub's sink commits.
    pub sink: SinkReport,
    /// The machine.
    pub machine: MachineReport,
    /// Things to know when reading the figures.
    pub notes: Vec<String>,
}

/// A finished run; the hub is still running (for an export) until this is dropped.
#[derive(Debug)]
pub struct FleetRun {
    /// The figures.
    pub report: FleetReport,
    /// Every gateway's outcome, by index.
    pub gateways: Vec<GatewayOutcome>,
    /// The hub.
    pub hub: Hub,
    /// The PKI folder.
    pub pki: Pki,
    /// The temporary folder holding PKI and hub data, unless `dir` was given.
    pub tmp: Option<tempfile::TempDir>,
}

/// Payload of record `seq` of gateway `index`: index (4 bytes BE), seq (8 bytes BE),
/// then filler, `len` bytes in all (at least 12).
pub fn payload(index: u32, seq: u64, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(len.max(12));
    p.extend_from_slice(&index.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    let fill = (index as u8) ^ (seq as u8);
    p.resize(len.max(12), fill);
    p
}

/// Gateway id of index `i`.
pub fn gateway_id(i: usize) -> String {
    format!("fleet-{i:05}")
}

/// One gateway's credentials.
struct Identity {
    id: String,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

/// Issues a client certificate per gateway with the CA in `pki_dir` (`ca.pem`,
/// `ca.key` from `voither-hub pki`), the way `voither-hub pki-issue` does, in memory.
fn issue(pki_dir: &Path, n: usize) -> Result<Vec<Identity>, FleetError> {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose};
    let read = |name: &str| {
        let p = pki_dir.join(name);
        std::fs::read_to_string(&p).map_err(|source| FleetError::Io { what: format!("read {}", p.display()), source })
    };
    let pki = |e: rcgen::Error| FleetError::Pki(e.to_string());
    let ca_key = KeyPair::from_pem(&read("ca.key")?).map_err(pki)?;
    let issuer = Issuer::from_ca_cert_pem(&read("ca.pem")?, ca_key).map_err(pki)?;
    let now = std::time::SystemTime::now() - Duration::from_secs(3600);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let id = gateway_id(i);
        let key = KeyPair::generate().map_err(pki)?;
        let mut params = CertificateParams::new(vec![id.clone()]).map_err(pki)?;
        params.distinguished_name.push(DnType::CommonName, id.as_str());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = now.into();
        params.not_after = (now + Duration::from_secs(2 * 86_400)).into();
        let cert = params.signed_by(&key, &issuer).map_err(pki)?;
        out.push(Identity {
            id,
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        });
    }
    Ok(out)
}

/// The QUIC client configuration of one gateway: like the agent's (TLS 1.3, the CA
/// pinned, ALPN, keep-alive and idle timeout of the agent's defaults).
fn client_config(
    roots: &Arc<rustls::RootCertStore>,
    transport: &Arc<quinn::TransportConfig>,
    who: Identity,
) -> Result<quinn::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(who.chain, who.key)
        .map_err(|e| e.to_string())?;
    tls.alpn_protocols = vec![voither_proto::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(transport.clone());
    Ok(cfg)
}

/// Counters shared by all simulated gateways.
#[derive(Debug, Default)]
struct Counters {
    /// Records the connected gateways were scheduled to produce.
    scheduled: AtomicU64,
    /// Scheduled records not generated (backlog full).
    shed: AtomicU64,
    /// Records acked.
    acked: AtomicU64,
    /// Records generated, not yet acked.
    backlog: AtomicU64,
    /// Batches written.
    batches: AtomicU64,
    /// Gateways whose connect attempt is over.
    attempted: AtomicUsize,
    /// Gateways welcomed.
    welcomed: AtomicUsize,
}

/// What every gateway task needs.
#[derive(Debug)]
struct Ctx {
    endpoint: quinn::Endpoint,
    hub: SocketAddr,
    opts: FleetOpts,
    /// Most unacked records per gateway.
    backlog_cap: usize,
    counters: Counters,
    /// Ack latency samples: (when acked, latency in µs), from every gateway.
    samples: Mutex<Vec<(Instant, u32)>>,
}

/// A batch in flight.
struct Flight {
    last_seq: u64,
    sent: Instant,
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// One simulated gateway: connect at `start`, send until `stop` turns true, drain.
async fn gateway(
    ctx: Arc<Ctx>,
    index: u32,
    id: String,
    cfg: quinn::ClientConfig,
    start: Instant,
    mut stop: watch::Receiver<bool>,
) -> GatewayOutcome {
    tokio::time::sleep_until(start).await;
    let mut out =
        GatewayOutcome { id, index, connected: false, connect_ms: None, error: None, generated: 0, acked_through: 0 };
    let res = session(&ctx, index, cfg, &mut stop, &mut out).await;
    if !out.connected {
        ctx.counters.attempted.fetch_add(1, Ordering::Relaxed);
    }
    if let Err(e) = res {
        out.error = Some(e);
    }
    ctx.counters.backlog.fetch_sub(out.generated - out.acked_through, Ordering::Relaxed);
    out
}

async fn session(
    ctx: &Ctx,
    index: u32,
    cfg: quinn::ClientConfig,
    stop: &mut watch::Receiver<bool>,
    out: &mut GatewayOutcome,
) -> Result<(), String> {
    let o = &ctx.opts;
    let began = Instant::now();
    let deadline = began + o.connect_timeout;
    let connecting = ctx.endpoint.connect_with(cfg, ctx.hub, "voither-hub").map_err(|e| format!("connect: {e}"))?;
    let conn = tokio::time::timeout_at(deadline, connecting)
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| format!("handshake: {e}"))?;
    let res = drive(ctx, index, &conn, began, deadline, stop, out).await;
    conn.close(0u32.into(), b"done");
    res
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    ctx: &Ctx,
    index: u32,
    conn: &quinn::Connection,
    began: Instant,
    welcome_deadline: Instant,
    stop: &mut watch::Receiver<bool>,
    out: &mut GatewayOutcome,
) -> Result<(), String> {
    let o = &ctx.opts;
    let c = &ctx.counters;
    let (mut send, mut recv) = tokio::time::timeout_at(welcome_deadline, conn.open_bi())
        .await
        .map_err(|_| "stream open timed out".to_string())?
        .map_err(|e| format!("stream: {e}"))?;
    let pcfg = GatewayConfig {
        window_batches: o.window,
        max_batch_records: o.batch,
        max_batch_bytes: MAX_FRAME_LEN / 4,
        status_interval: Duration::from_secs(5),
        ..GatewayConfig::default()
    };
    let lanes = vec![LaneInit { name: LANE.into(), priority: 1, oldest_unacked: 1, next_seq: 1 }];
    let mut sess =
        GatewaySession::new(pcfg, concat!("voither-fleet/", env!("CARGO_PKG_VERSION")), rand::random(), lanes);
    let origin = Instant::now();
    let mut dec = FrameDecoder::new(MAX_FRAME_LEN);
    let mut buf = vec![0u8; 4096];
    let mut wire = Vec::new();
    // The "store": generated records not yet acked, seqs `acked + 1 ..= generated`.
    let mut store: VecDeque<Record> = VecDeque::new();
    let mut flights: VecDeque<Flight> = VecDeque::new();
    let mut samples: Vec<(Instant, u32)> = Vec::new();
    // Generation: record k (1-based, scheduled) is due at gen_start + (k - 1) / rate.
    let mut gen_start: Option<Instant> = None;
    let mut scheduled = 0u64;
    let flush = Duration::from_millis(o.flush_ms.max(1));
    let mut next_gen: Option<Instant> = None;
    let mut stopping: Option<Instant> = None;
    let source = format!("fleet/{}", out.id);
    let result: Result<(), String> = async {
        loop {
            while let Some(ev) = sess.poll_event() {
                match ev {
                    GatewayEvent::Welcomed(_) => {
                        let now = Instant::now();
                        out.connected = true;
                        out.connect_ms = Some((now - began).as_secs_f64() * 1e3);
                        c.attempted.fetch_add(1, Ordering::Relaxed);
                        c.welcomed.fetch_add(1, Ordering::Relaxed);
                        if stopping.is_none() {
                            gen_start = Some(now);
                            next_gen = Some(now);
                        }
                    }
                    GatewayEvent::Acked { through_seq, .. } => {
                        let now = Instant::now();
                        let n = through_seq.saturating_sub(out.acked_through);
                        out.acked_through = out.acked_through.max(through_seq);
                        c.acked.fetch_add(n, Ordering::Relaxed);
                        c.backlog.fetch_sub(n, Ordering::Relaxed);
                        while store.front().is_some_and(|r| r.seq <= through_seq) {
                            store.pop_front();
                        }
                        while flights.front().is_some_and(|f| f.last_seq <= through_seq) {
                            let f = flights.pop_front().expect("checked");
                            samples.push((now, u32::try_from((now - f.sent).as_micros()).unwrap_or(u32::MAX)));
                        }
                        sess.set_status(Status {
                            uptime_s: origin.elapsed().as_secs(),
                            lanes: vec![LaneStatus {
                                lane: LANE.into(),
                                backlog_records: store.len() as u64,
                                backlog_bytes: (store.len() * o.record_bytes) as u64,
                                oldest_unsynced_age_ms: 0,
                            }],
                            store_used_bytes: Some((store.len() * o.record_bytes) as u64),
                            store_budget_bytes: Some((ctx.backlog_cap * o.record_bytes) as u64),
                            manifest_version: None,
                            workloads: None,
                        });
                    }
                    GatewayEvent::Command(_) | GatewayEvent::Manifest(_) | GatewayEvent::ArtifactChunk(_) => {}
                }
            }
            if let Some(until) = stopping {
                if sess.inflight_batches() == 0 || Instant::now() >= until {
                    return Ok(());
                }
            }
            if !sess.is_ready() && Instant::now() >= welcome_deadline {
                return Err("no Welcome in time".to_string());
            }
            // Fill the window from the store.
            while let Some(slot) = sess.poll_send_slot() {
                let first = store.front().map_or(slot.from_seq, |r| r.seq);
                let skip = usize::try_from(slot.from_seq.saturating_sub(first)).unwrap_or(usize::MAX);
                let mut bytes = 0usize;
                let records: Records = store
                    .iter()
                    .skip(skip)
                    .take(slot.max_records)
                    .take_while(|r| {
                        bytes += r.payload.len();
                        bytes <= slot.max_bytes
                    })
                    .map(Record::as_ref)
                    .collect();
                let Some(last) = records.last_seq() else { break };
                sess.send_batch(origin.elapsed(), &slot.lane, records, Vec::new()).map_err(|e| e.to_string())?;
                flights.push_back(Flight { last_seq: last, sent: Instant::now() });
                c.batches.fetch_add(1, Ordering::Relaxed);
            }
            wire.clear();
            while let Some(f) = sess.poll_transmit() {
                encode_frame(&f, &mut wire, MAX_FRAME_LEN).map_err(|e| e.to_string())?;
            }
            if !wire.is_empty() {
                send.write_all(&wire).await.map_err(|e| format!("write: {e}"))?;
            }
            let timeout = sess.poll_timeout().map(|t| origin + t);
            tokio::select! {
                r = recv.read(&mut buf) => match r {
                    Ok(Some(n)) => {
                        dec.push(&buf[..n]);
                        loop {
                            match dec.next_frame() {
                                Ok(Some(f)) => sess.handle_frame(origin.elapsed(), f).map_err(|e| e.to_string())?,
                                Ok(None) => break,
                                Err(e) => return Err(format!("frame: {e}")),
                            }
                        }
                    }
                    Ok(None) => return Err("hub closed the stream".to_string()),
                    Err(e) => return Err(format!("read: {e}")),
                },
                _ = sleep_until_opt(next_gen) => {
                    let now = Instant::now();
                    let start = gen_start.expect("generation started");
                    // Everything due by now (the (k+1)-th record is due at k / rate).
                    let due = ((now - start).as_secs_f64() * o.rate).floor() as u64 + 1;
                    if due > scheduled {
                        let n = due - scheduled;
                        scheduled = due;
                        c.scheduled.fetch_add(n, Ordering::Relaxed);
                        let room = ctx.backlog_cap.saturating_sub(store.len()) as u64;
                        let make = n.min(room);
                        c.shed.fetch_add(n - make, Ordering::Relaxed);
                        let ts = unix_ms();
                        for _ in 0..make {
                            out.generated += 1;
                            store.push_back(Record {
                                seq: out.generated,
                                ingest_ts_ms: ts,
                                source: source.clone(),
                                content_type: None,
                                payload: payload(index, out.generated, o.record_bytes).into(),
                            });
                        }
                        c.backlog.fetch_add(make, Ordering::Relaxed);
                        sess.notify_appended(LANE, out.generated + 1);
                    }
                    let next_due = start + Duration::from_secs_f64(scheduled as f64 / o.rate);
                    next_gen = Some(next_due.max(now + flush));
                }
                _ = sleep_until_opt(timeout) => sess.handle_timeout(origin.elapsed()),
                _ = stop.changed(), if stopping.is_none() => {
                    stopping = Some(Instant::now() + o.drain);
                    next_gen = None;
                }
                _ = sleep_until_opt(stopping) => {}
                _ = sleep_until_opt((!sess.is_ready()).then_some(welcome_deadline)) => {}
            }
        }
    }
    .await;
    let _ = send.finish();
    ctx.samples.lock().expect("samples").extend(samples);
    result
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// CPU and memory of a process from `/proc/<pid>`.
#[derive(Debug, Clone, Default)]
struct ProcSample {
    rss: u64,
    hwm: u64,
    threads: u64,
    cpu_s: f64,
    by_thread: BTreeMap<String, f64>,
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// utime + stime (seconds) and the name of a `/proc/…/stat` line.
fn stat_cpu(stat: &str) -> Option<(String, f64)> {
    let (head, rest) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1.to_string();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    Some((name, (t(11) + t(12)) / clock_ticks()))
}

fn sample_proc(pid: &str, threads: bool) -> Option<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |key: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (_, cpu_s) = stat_cpu(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    let mut by_thread = BTreeMap::new();
    if threads {
        for t in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
            let tid = t.file_name().to_string_lossy().into_owned();
            if let Some((name, s)) = std::fs::read_to_string(t.path().join("stat")).ok().as_deref().and_then(stat_cpu) {
                by_thread.insert(format!("{name}/{tid}"), s);
            }
        }
    }
    Some(ProcSample {
        rss: field("VmRSS:") * 1024,
        hwm: field("VmHWM:") * 1024,
        threads: field("Threads:"),
        cpu_s,
        by_thread,
    })
}

/// Jiffies of all cores: (busy, iowait, total).
fn machine_cpu() -> (f64, f64, f64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> =
        text.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let g = |i: usize| v.get(i).copied().unwrap_or(0.0);
    // user nice system idle iowait irq softirq steal
    let total: f64 = (0..8).map(g).sum();
    (total - g(3) - g(4), g(4), total)
}

/// Datagrams the kernel dropped on the UDP socket bound to `port` (the last column of
/// `/proc/net/udp`: receive buffer full), if there is one.
fn socket_drops(port: u16) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/udp").ok()?;
    let want = format!(":{port:04X}");
    text.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1)?.ends_with(&want)).then(|| f.last()?.parse().ok()).flatten()
    })
}

/// UDP `RcvbufErrors` and `SndbufErrors` from `/proc/net/snmp`.
fn udp_drops() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(h), Some(v)) = (lines.next(), lines.next()) else { return (0, 0) };
    let get = |name: &str| {
        h.split_whitespace()
            .position(|k| k == name)
            .and_then(|i| v.split_whitespace().nth(i))
            .and_then(|x| x.parse().ok())
            .unwrap_or(0)
    };
    (get("RcvbufErrors"), get("SndbufErrors"))
}

fn percentiles(mut v: Vec<f64>) -> Latency {
    if v.is_empty() {
        return Latency::default();
    }
    v.sort_by(f64::total_cmp);
    let p = |q: f64| v[(((v.len() - 1) as f64) * q).round() as usize];
    Latency { samples: v.len(), p50_ms: p(0.5), p99_ms: p(0.99), p999_ms: p(0.999), max_ms: v[v.len() - 1] }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Date, commit, machine.
pub fn meta() -> serde_json::Value {
    // git runs in the workspace this was built from, wherever the binary runs.
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let sh = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .current_dir(if cmd == "git" { repo } else { "/" })
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<u64>().ok()))
        .map_or(0.0, |kb| kb as f64 / 1024.0 / 1024.0);
    serde_json::json!({
        "date": sh("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "commit": sh("git", &["rev-parse", "--short", "HEAD"]),
        "dirty": !sh("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty(),
        "nproc": sh("nproc", &[]),
        "cpu": cpu,
        "mem_gib": (mem * 10.0).round() / 10.0,
        "kernel": sh("uname", &["-r"]),
        "loadavg_start": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    })
}

fn log(o: &FleetOpts, msg: impl AsRef<str>) {
    if o.progress {
        eprintln!("[fleet] {}", msg.as_ref());
    }
}

/// A hub metric summed over label sets (blocking HTTP on a blocking thread).
async fn hub_metric(admin: SocketAddr, name: &'static str) -> f64 {
    tokio::task::spawn_blocking(move || procs::metric(admin, name)).await.ok().flatten().unwrap_or(0.0)
}

fn opts_json(o: &FleetOpts) -> serde_json::Value {
    serde_json::json!({
        "gateways": o.gateways,
        "rate_per_gateway": o.rate,
        "record_bytes": o.record_bytes,
        "batch": o.batch,
        "window": o.window,
        "flush_ms": o.flush_ms,
        "duration_s": o.duration.as_secs_f64(),
        "ramp_s": o.ramp.as_secs_f64(),
        "connect_timeout_s": o.connect_timeout.as_secs_f64(),
        "hub_extra_config": o.hub_extra_config,
        "threads": o.threads,
        "hub_log": o.hub_log,
    })
}

/// Starts a hub, runs the fleet against it, and returns the figures with the hub still
/// running.
pub fn run(opts: &FleetOpts) -> Result<FleetRun, FleetError> {
    let o = opts.clone();
    if o.gateways == 0 || !(o.rate > 0.0 && o.rate.is_finite()) || o.batch == 0 || o.window == 0 {
        return Err(FleetError::Opts("gateways, rate, batch and window must be above 0".into()));
    }
    if o.record_bytes < 12 {
        return Err(FleetError::Opts("record_bytes must be at least 12 (gateway index and seq)".into()));
    }
    if let Some(l) = o.hub_extra_config.lines().map(str::trim).find(|l| ["[hub]", "[tls]", "[admin]"].contains(l)) {
        return Err(FleetError::Opts(format!(
            "the extra hub config must not repeat {l}: the simulator writes that section"
        )));
    }
    let meta = meta();
    let (tmp, dir) = match &o.dir {
        Some(d) if d.join("hub").exists() || d.join("pki").exists() => {
            return Err(FleetError::Opts(format!(
                "{} holds a previous run (pki/, hub/): give a new folder; a hub that kept its sink would refuse the new gateways' seqs",
                d.display()
            )))
        }
        Some(d) => (None, d.clone()),
        None => {
            let t = tempfile::Builder::new()
                .prefix("voither-fleet-")
                .tempdir()
                .map_err(|source| FleetError::Io { what: "temporary folder".into(), source })?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    std::fs::create_dir_all(&dir)
        .map_err(|source| FleetError::Io { what: format!("create {}", dir.display()), source })?;

    // The CA and the hub's certificate from the product's own tool; gateways' here.
    let pki = Pki::generate(&dir.join("pki"), &["fleet-probe"]);
    let t = Instant::now();
    let ids = issue(&pki.dir, o.gateways)?;
    let pki_s = t.elapsed().as_secs_f64();
    log(&o, format!("issued {} gateway certificates in {pki_s:.2} s", o.gateways));

    let mut hub = Hub::start_full(&dir.join("hub"), &pki, "hub-fleet", &[], &o.hub_extra_config);
    // The test helper's config is made for small labs (3 s idle timeout): give the hub
    // its production idle timeout and room for the whole fleet.
    hub.stop();
    let conns = (o.gateways + 100).max(20_000).to_string();
    hub.set_config("hub", &[("max_connections", &conns), ("idle_timeout_ms", "10000")]);
    if !o.hub_log.is_empty() {
        hub.env.push(("RUST_LOG".into(), o.hub_log.clone()));
    }
    hub.restart();
    let hub_pid = hub.proc.as_ref().map_or(0, procs::Proc::pid).to_string();
    log(&o, format!("hub started (pid {hub_pid}, {})", hub.addr));

    let threads = if o.threads == 0 { std::thread::available_parallelism().map_or(2, |n| n.get()) } else { o.threads };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("fleet-worker")
        .enable_all()
        .build()
        .map_err(|source| FleetError::Io { what: "runtime".into(), source })?;

    let roots = {
        let data = std::fs::read(pki.dir.join("ca.pem"))
            .map_err(|source| FleetError::Io { what: "read ca.pem".into(), source })?;
        let mut r = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut data.as_slice()) {
            let c = c.map_err(|source| FleetError::Io { what: "ca.pem".into(), source })?;
            r.add(c).map_err(|e| FleetError::Pki(e.to_string()))?;
        }
        Arc::new(r)
    };
    let mut transport = quinn::TransportConfig::default();
    // The agent's defaults (uplink.keep_alive_ms, uplink.idle_timeout_ms).
    transport.keep_alive_interval(Some(Duration::from_millis(1_000)));
    transport.max_idle_timeout(Some(Duration::from_millis(5_000).try_into().expect("in range")));
    let transport = Arc::new(transport);

    let (report, gateways) = rt.block_on(async {
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("literal"))
            .map_err(|source| FleetError::Io { what: "UDP socket".into(), source })?;
        let backlog_cap = (BACKLOG_BUDGET / o.gateways / (o.record_bytes + 64)).max(o.batch.min(1024)).max(16);
        let ctx = Arc::new(Ctx {
            endpoint: endpoint.clone(),
            hub: hub.addr,
            opts: o.clone(),
            backlog_cap,
            counters: Counters::default(),
            samples: Mutex::new(Vec::new()),
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let sim_port = endpoint.local_addr().map_or(0, |a| a.port());
        let hd0 = socket_drops(hub.addr.port()).unwrap_or(0);
        let sd0 = socket_drops(sim_port).unwrap_or(0);
        let t0 = Instant::now() + Duration::from_millis(100);
        let n = o.gateways;
        let mut tasks = Vec::with_capacity(n);
        for (i, who) in ids.into_iter().enumerate() {
            let id = who.id.clone();
            let cfg = client_config(&roots, &transport, who).map_err(FleetError::Pki)?;
            let at = t0 + o.ramp.mul_f64(i as f64 / n as f64);
            tasks.push(tokio::spawn(gateway(ctx.clone(), i as u32, id, cfg, at, stop_rx.clone())));
        }
        let sim_pid = std::process::id().to_string();
        // Wait for every connect attempt to be over (and for the ramp to pass).
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut last_log = Instant::now();
        loop {
            tick.tick().await;
            let attempted = ctx.counters.attempted.load(Ordering::Relaxed);
            if last_log.elapsed() >= Duration::from_secs(2) {
                last_log = Instant::now();
                log(
                    &o,
                    format!(
                        "connecting: {attempted}/{n} attempted, {} welcomed",
                        ctx.counters.welcomed.load(Ordering::Relaxed)
                    ),
                );
            }
            if attempted >= n && Instant::now() >= t0 + o.ramp {
                break;
            }
        }
        log(&o, format!("steady window: {:.0} s", o.duration.as_secs_f64()));
        // The steady window.
        let w0 = Instant::now();
        let c = &ctx.counters;
        let snap = |c: &Counters| {
            (c.scheduled.load(Ordering::Relaxed), c.shed.load(Ordering::Relaxed), c.acked.load(Ordering::Relaxed), c.batches.load(Ordering::Relaxed))
        };
        let s0 = snap(c);
        let hub0 = sample_proc(&hub_pid, true).unwrap_or_default();
        let sim0 = sample_proc(&sim_pid, true).unwrap_or_default();
        let m0 = machine_cpu();
        let u0 = udp_drops();
        let commits0 = hub_metric(hub.admin, "voither_hub_sink_commit_seconds_count").await;
        let commit_s0 = hub_metric(hub.admin, "voither_hub_sink_commit_seconds_sum").await;
        let stored0 = hub_metric(hub.admin, "voither_hub_stored_records_total").await;
        let end = w0 + o.duration;
        let mut hub_rss = Vec::new();
        let mut sim_rss = Vec::new();
        let mut last_log = Instant::now();
        let mut last_acked = s0.2;
        while Instant::now() < end {
            tick.tick().await;
            if let Some(s) = sample_proc(&hub_pid, false) {
                hub_rss.push(s.rss);
            }
            if let Some(s) = sample_proc(&sim_pid, false) {
                sim_rss.push(s.rss);
            }
            if last_log.elapsed() >= Duration::from_secs(5) {
                let acked = c.acked.load(Ordering::Relaxed);
                log(
                    &o,
                    format!(
                        "{:.0} s: {:.0} records/s acked, backlog {}, hub RSS {:.0} MiB",
                        w0.elapsed().as_secs_f64(),
                        (acked - last_acked) as f64 / last_log.elapsed().as_secs_f64(),
                        c.backlog.load(Ordering::Relaxed),
                        mib(hub_rss.last().copied().unwrap_or(0))
                    ),
                );
                last_acked = acked;
                last_log = Instant::now();
            }
        }
        let w1 = Instant::now();
        let s1 = snap(c);
        let hub1 = sample_proc(&hub_pid, true).unwrap_or_default();
        let sim1 = sample_proc(&sim_pid, true).unwrap_or_default();
        let m1 = machine_cpu();
        let u1 = udp_drops();
        let hd1 = socket_drops(hub.addr.port()).unwrap_or(0);
        let sd1 = socket_drops(sim_port).unwrap_or(0);
        let commits1 = hub_metric(hub.admin, "voither_hub_sink_commit_seconds_count").await;
        let commit_s1 = hub_metric(hub.admin, "voither_hub_sink_commit_seconds_sum").await;
        let stored1 = hub_metric(hub.admin, "voither_hub_stored_records_total").await;
        let backlog_end = c.backlog.load(Ordering::Relaxed);
        let _ = stop_tx.send(true);
        log(&o, "window over; draining acks in flight and closing");
        let mut gateways = Vec::with_capacity(n);
        for t in tasks {
            gateways.push(t.await.expect("gateway task"));
        }
        endpoint.close(0u32.into(), b"done");
        let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;

        let secs = (w1 - w0).as_secs_f64();
        let achieved = (s1.2 - s0.2) as f64;
        let per_s = |x: f64| x / secs;
        let proc_report = |a: &ProcSample, b: &ProcSample, rss: &mut Vec<u64>| {
            rss.sort_unstable();
            let cpu = b.cpu_s - a.cpu_s;
            let mut by: Vec<(String, f64)> = b
                .by_thread
                .iter()
                .map(|(k, v)| (k.clone(), ((v - a.by_thread.get(k).copied().unwrap_or(0.0)) * 100.0).round() / 100.0))
                .filter(|(_, v)| *v > 0.0)
                .collect();
            by.sort_by(|x, y| y.1.total_cmp(&x.1));
            // The busiest threads one by one (tokio names workers and blocking threads
            // alike: the busiest few are the workers), the rest summed.
            if by.len() > 6 {
                let rest = by.split_off(5);
                let sum: f64 = rest.iter().map(|x| x.1).sum();
                by.push((format!("{} other threads", rest.len()), (sum * 100.0).round() / 100.0));
            }
            ProcReport {
                rss_steady_mib: mib(rss.get(rss.len() / 2).copied().unwrap_or(b.rss)),
                rss_peak_mib: mib(b.hwm),
                cpu_s: cpu,
                cores: cpu / secs,
                cpu_s_per_million_records: if achieved > 0.0 { cpu * 1e6 / achieved } else { f64::NAN },
                threads: b.threads,
                cpu_by_thread: by,
            }
        };
        let samples: Vec<f64> = ctx
            .samples
            .lock()
            .expect("samples")
            .iter()
            .filter(|(t, _)| *t >= w0 && *t <= w1)
            .map(|(_, us)| f64::from(*us) / 1e3)
            .collect();
        let connected = gateways.iter().filter(|g| g.connected).count();
        let mut errors = BTreeMap::new();
        for e in gateways.iter().filter_map(|g| g.error.as_ref()) {
            if errors.len() < 8 || errors.contains_key(e) {
                *errors.entry(e.clone()).or_insert(0) += 1;
            }
        }
        let connect_times: Vec<f64> = gateways.iter().filter_map(|g| g.connect_ms).collect();
        let last_welcome = gateways
            .iter()
            .filter_map(|g| g.connect_ms.map(|ms| o.ramp.as_secs_f64() * g.index as f64 / n as f64 + ms / 1e3))
            .fold(0.0, f64::max);
        let commits = commits1 - commits0;
        let commit_s = commit_s1 - commit_s0;
        let (busy, iow, total) = (m1.0 - m0.0, m1.1 - m0.1, m1.2 - m0.2);
        let payload = o.record_bytes as f64;
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let sim_cores = (sim1.cpu_s - sim0.cpu_s) / secs;
        let mut notes = vec![
            format!(
                "The simulator runs on the same {cores}-core machine as the hub: the {sim_cores:.2} cores it used were not available to the hub."
            ),
            "Ack latency is per batch: from writing the batch to the stream to reading the ack that covers it.".into(),
            "MB/s counts payload bytes (10^6 bytes), not the protocol's framing or QUIC.".into(),
        ];
        if s1.1 > s0.1 {
            notes.push(format!(
                "{} scheduled records were not generated because gateways' backlogs were full: the hub did not keep up.",
                s1.1 - s0.1
            ));
        }
        let report = FleetReport {
            meta,
            opts: opts_json(&o),
            pki_s,
            connect: ConnectReport {
                connected,
                failed: n - connected,
                dropped: gateways.iter().filter(|g| g.connected && g.error.is_some()).count(),
                connect_all_s: last_welcome,
                connect_time: percentiles(connect_times),
                errors,
            },
            window_s: secs,
            offered_records_per_s: per_s((s1.0 - s0.0) as f64),
            achieved_records_per_s: per_s(achieved),
            offered_mb_per_s: per_s((s1.0 - s0.0) as f64 * payload) / 1e6,
            achieved_mb_per_s: per_s(achieved * payload) / 1e6,
            shed_records: s1.1 - s0.1,
            backlog_records_end: backlog_end,
            batches: s1.3 - s0.3,
            ack_latency: percentiles(samples),
            hub: proc_report(&hub0, &hub1, &mut hub_rss),
            simulator: proc_report(&sim0, &sim1, &mut sim_rss),
            sink: SinkReport {
                commits,
                commits_per_s: commits / secs,
                commit_mean_ms: if commits > 0.0 { commit_s * 1e3 / commits } else { 0.0 },
                records_per_commit: if commits > 0.0 { (stored1 - stored0) / commits } else { 0.0 },
                commits_in_progress: commit_s / secs,
            },
            machine: MachineReport {
                cores,
                busy: if total > 0.0 { busy / total } else { 0.0 },
                iowait: if total > 0.0 { iow / total } else { 0.0 },
                other_cores: (busy / total.max(1.0) * cores as f64
                    - (hub1.cpu_s - hub0.cpu_s + sim1.cpu_s - sim0.cpu_s) / secs)
                    .max(0.0),
                loadavg_end: std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_string(),
                udp_rcvbuf_errors: u1.0.saturating_sub(u0.0),
                udp_sndbuf_errors: u1.1.saturating_sub(u0.1),
                udp_drops_hub_socket: hd1.saturating_sub(hd0),
                udp_drops_simulator_socket: sd1.saturating_sub(sd0),
                rmem_default: std::fs::read_to_string("/proc/sys/net/core/rmem_default")
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0),
            },
            notes,
        };
        Ok::<_, FleetError>((report, gateways))
    })?;
    rt.shutdown_timeout(Duration::from_secs(2));
    Ok(FleetRun { report, gateways, hub, pki, tmp })
}

fn fmt_n(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    if v.abs() >= 10_000.0 {
        let s = format!("{v:.0}");
        let mut out = String::new();
        for (i, ch) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(ch);
        }
        out
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

impl FleetReport {
    /// The figures as a Markdown table, with the CPU split and notes after it.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let mut row = |k: &str, v: String| s.push_str(&format!("| {k} | {v} |\n"));
        let o = &self.opts;
        row("figure", "value".into());
        row("---", "---".into());
        row(
            "gateways connected / failed / dropped",
            format!("{} / {} / {}", self.connect.connected, self.connect.failed, self.connect.dropped),
        );
        row(
            "connecting all (ramp)",
            format!(
                "{:.1} s (ramp {} s); connect p50 {} ms, p99 {} ms",
                self.connect.connect_all_s,
                o["ramp_s"],
                fmt_n(self.connect.connect_time.p50_ms),
                fmt_n(self.connect.connect_time.p99_ms)
            ),
        );
        row(
            "rate per gateway, record size, batch, window",
            format!(
                "{} rec/s, {} B, ≤ {} records, {} batches",
                o["rate_per_gateway"], o["record_bytes"], o["batch"], o["window"]
            ),
        );
        row("steady window", format!("{:.1} s", self.window_s));
        row(
            "records/s offered → achieved",
            format!("{} → {}", fmt_n(self.offered_records_per_s), fmt_n(self.achieved_records_per_s)),
        );
        row("payload MB/s offered → achieved", format!("{:.2} → {:.2}", self.offered_mb_per_s, self.achieved_mb_per_s));
        row("shed (backlog full) / backlog at end", format!("{} / {}", self.shed_records, self.backlog_records_end));
        row(
            "ack latency p50 / p99 / p99.9 / max",
            format!(
                "{} / {} / {} / {} ms ({} batches)",
                fmt_n(self.ack_latency.p50_ms),
                fmt_n(self.ack_latency.p99_ms),
                fmt_n(self.ack_latency.p999_ms),
                fmt_n(self.ack_latency.max_ms),
                self.ack_latency.samples
            ),
        );
        row(
            "hub RSS steady / peak",
            format!("{:.0} / {:.0} MiB ({} threads)", self.hub.rss_steady_mib, self.hub.rss_peak_mib, self.hub.threads),
        );
        row(
            "hub CPU",
            format!(
                "{:.2} cores ({} CPU-s per million records)",
                self.hub.cores,
                fmt_n(self.hub.cpu_s_per_million_records)
            ),
        );
        row(
            "simulator CPU (same machine)",
            format!("{:.2} cores, RSS {:.0} MiB", self.simulator.cores, self.simulator.rss_steady_mib),
        );
        row(
            "sink commits",
            format!(
                "{}/s, mean {:.2} ms, {:.1} records per commit, {:.1} under way on average",
                fmt_n(self.sink.commits_per_s),
                self.sink.commit_mean_ms,
                self.sink.records_per_commit,
                self.sink.commits_in_progress
            ),
        );
        row(
            "machine",
            format!(
                "{} cores, {:.0}% busy, {:.0}% iowait, other processes {:.2} cores; UDP receive-buffer drops in the window {}, since the first connect on the hub's socket {} and on the simulator's {}; send-buffer drops {}",
                self.machine.cores,
                self.machine.busy * 100.0,
                self.machine.iowait * 100.0,
                self.machine.other_cores,
                self.machine.udp_rcvbuf_errors,
                self.machine.udp_drops_hub_socket,
                self.machine.udp_drops_simulator_socket,
                self.machine.udp_sndbuf_errors
            ),
        );
        let top =
            |p: &ProcReport| p.cpu_by_thread.iter().map(|(n, c)| format!("{n} {c:.2}")).collect::<Vec<_>>().join(", ");
        s.push_str(&format!("\nhub CPU-s by thread: {}\n", top(&self.hub)));
        s.push_str(&format!("simulator CPU-s by thread: {}\n", top(&self.simulator)));
        if !self.connect.errors.is_empty() {
            s.push_str(&format!("errors: {:?}\n", self.connect.errors));
        }
        for n in &self.notes {
            s.push_str(&format!("note: {n}\n"));
        }
        s
    }
}
