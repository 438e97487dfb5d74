//! The embedded sink: what gateways sent, on the hub's local disk.
//!
//! # On-disk layout
//!
//! One redb file, `sink.redb`, in the hub's data folder:
//!
//! | table | key | value |
//! |---|---|---|
//! | `blocks` | `(gateway, lane, first_seq)` | records of one batch, each in CBOR, one after another, up to [`BLOCK_BYTES`] |
//! | `counts` | `(gateway, lane)` | records stored |
//! | `gaps` | `(gateway, lane, from_seq)` | `(through_seq, reason)` |
//! | `marks` | `(gateway, lane)` | high-water mark |
//! | `records` | `(gateway, lane, seq)` | a record in CBOR: the layout before blocks, moved into `blocks` when the sink opens |
//!
//! A block holds records one store request brought that were above the mark, up to
//! [`BLOCK_BYTES`]: a few B-tree inserts per batch instead of one per record. Blocks of
//! a lane never overlap (marks only grow), so their keys sort the records in seq order.
//!
//! # Invariants
//!
//! 1. A commit writes records, gaps and the new mark of one or more lanes in one
//!    transaction, durable (fsync) before [`Sink::commit`] returns; the hub acks only
//!    after that.
//! 2. Nothing at or below a lane's mark is written again: the sink filters by its own
//!    durable mark, so two sessions of one gateway (a reconnect racing an old
//!    connection) cannot store a record twice.
//! 3. Marks only grow.

use std::path::{Path, PathBuf};

use base64::Engine;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use voither_proto::{GapReason, Record, Records, StoreRequest};

const RECORDS: TableDefinition<'_, (&str, &str, u64), &[u8]> = TableDefinition::new("records");
const BLOCKS: TableDefinition<'_, (&str, &str, u64), &[u8]> = TableDefinition::new("blocks");
const COUNTS: TableDefinition<'_, (&str, &str), u64> = TableDefinition::new("counts");
const GAPS: TableDefinition<'_, (&str, &str, u64), (u64, u8)> = TableDefinition::new("gaps");
const MARKS: TableDefinition<'_, (&str, &str), u64> = TableDefinition::new("marks");

/// Most bytes of records in one block (a single larger record gets a block of its
/// own). redb gives a value that fills more than a page a power-of-two run of pages,
/// and writes all of it: a batch of 1,024 records of 256 bytes in one block of 297 KB
/// wrote 512 KB. Blocks under 64 KiB (the rest is room for the leaf's header and key)
/// leave only the last block of a batch to round up.
pub const BLOCK_BYTES: usize = 63 * 1024;

/// Errors of the sink.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The sink file could not be opened.
    #[error("cannot open sink {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<redb::DatabaseError>,
    },
    /// A transaction failed.
    #[error("sink transaction failed: {0}")]
    Io(String),
    /// The sink cannot be reached for now (a database restarting, a broken
    /// connection): worth a retry; nothing was committed.
    #[error("sink unavailable: {0}")]
    Unavailable(String),
    /// A stored row could not be decoded.
    #[error("corrupt record {gateway}/{lane}/{seq}: {message}")]
    Corrupt {
        /// Gateway.
        gateway: String,
        /// Lane.
        lane: String,
        /// Seq.
        seq: u64,
        /// Decoder message.
        message: String,
    },
}

macro_rules! io_err {
    ($($t:ty),*) => {$(
        impl From<$t> for SinkError {
            fn from(e: $t) -> Self {
                SinkError::Io(e.to_string())
            }
        }
    )*};
}
io_err!(redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError, redb::SetDurabilityError);

impl SinkError {
    /// Whether a retry may succeed (the hub holds acks and retries these).
    pub fn is_transient(&self) -> bool {
        matches!(self, SinkError::Unavailable(_))
    }
}

/// Most session commits folded into one transaction.
pub const MAX_GROUP: usize = 1024;

/// Most rows of the earlier layout moved into one block per transaction when the sink
/// opens.
const MIGRATE_ROWS: usize = 1024;

type CommitReply = (Vec<StoreRequest>, Result<CommitStats, SinkError>);

#[derive(Debug)]
struct CommitJob {
    gateway: String,
    reqs: Vec<StoreRequest>,
    span: tracing::Span,
    reply: tokio::sync::oneshot::Sender<CommitReply>,
}

/// One thread that commits for every session of the embedded sink: what sessions ask
/// for while a commit runs goes into the next one, one transaction and one fsync for
/// all of them. redb has one writer at a time, so per-session transactions would queue
/// anyway, each paying its own fsync (a few hundred a second on a plain disk).
#[derive(Debug, Clone)]
pub struct GroupCommitter {
    tx: std::sync::mpsc::Sender<CommitJob>,
    thread: std::sync::Arc<std::thread::JoinHandle<()>>,
}

impl GroupCommitter {
    /// Starts the commit thread for `sink`; it ends when the last clone is dropped.
    pub fn start(sink: std::sync::Arc<Sink>) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<CommitJob>();
        let thread = std::thread::Builder::new()
            .name("sink-commit".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut jobs = vec![first];
                    while jobs.len() < MAX_GROUP {
                        match rx.try_recv() {
                            Ok(j) => jobs.push(j),
                            Err(_) => break,
                        }
                    }
                    let items: Vec<(&str, &[StoreRequest])> =
                        jobs.iter().map(|j| (j.gateway.as_str(), j.reqs.as_slice())).collect();
                    let res = {
                        let _entered = jobs[0].span.clone().entered();
                        sink.commit_group(&items)
                    };
                    drop(items);
                    match res {
                        Ok(stats) => {
                            for (j, st) in jobs.into_iter().zip(stats) {
                                let _ = j.reply.send((j.reqs, Ok(st)));
                            }
                        }
                        Err(e) if jobs.len() == 1 => {
                            let j = jobs.pop().expect("one job");
                            let _ = j.reply.send((j.reqs, Err(e)));
                        }
                        Err(_) => {
                            // One session's batch that fails must not fail the others of
                            // its group: commit each on its own.
                            for j in jobs {
                                let r = sink.commit(&j.gateway, &j.reqs);
                                let _ = j.reply.send((j.reqs, r));
                            }
                        }
                    }
                }
            })
            .expect("spawn the sink commit thread");
        GroupCommitter { tx, thread: std::sync::Arc::new(thread) }
    }

    /// Commits `reqs` of `gateway` in the next group; hands the requests back.
    pub async fn commit(&self, gateway: &str, reqs: Vec<StoreRequest>) -> CommitReply {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let job = CommitJob { gateway: gateway.to_owned(), reqs, span: tracing::Span::current(), reply };
        if let Err(std::sync::mpsc::SendError(job)) = self.tx.send(job) {
            return (job.reqs, Err(SinkError::Io("the sink commit thread has stopped".into())));
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => (Vec::new(), Err(SinkError::Io("the sink commit thread has stopped".into()))),
        }
    }

    /// The commit thread still runs.
    pub fn alive(&self) -> bool {
        !self.thread.is_finished()
    }
}

/// Size of one chunk of an NDJSON export.
pub const EXPORT_CHUNK: usize = 60 * 1024;

/// Appends `row` as one JSON line.
pub fn ndjson_line(chunk: &mut Vec<u8>, row: &ExportRow) {
    serde_json::to_writer(&mut *chunk, row).expect("serialising to a Vec");
    chunk.push(b'\n');
}

/// Appends the line that ends an export cut short by `e`.
pub fn error_line(chunk: &mut Vec<u8>, e: &SinkError) {
    chunk.extend_from_slice(format!("{{\"kind\":\"error\",\"message\":{:?}}}\n", e.to_string()).as_bytes());
}

/// The hub's sink: the embedded one (a redb file in `hub.data_dir`) or PostgreSQL
/// (`[sink] kind = "postgres"`). Cheap to clone.
#[derive(Debug, Clone)]
pub enum AnySink {
    /// [`Sink`]: reads on tokio's blocking threads, commits through its
    /// [`GroupCommitter`].
    Embedded(std::sync::Arc<Sink>, GroupCommitter),
    /// [`crate::pg::PgSink`], commits through its [`crate::pg::PgCommitter`].
    Postgres(std::sync::Arc<crate::pg::PgSink>, crate::pg::PgCommitter),
}

impl AnySink {
    /// The marks of `lanes` of `gateway` (0 for lanes never seen).
    pub async fn marks(&self, gateway: &str, lanes: Vec<String>) -> Result<Vec<(String, u64)>, SinkError> {
        match self {
            AnySink::Embedded(s, _) => {
                let (s, g) = (s.clone(), gateway.to_owned());
                tokio::task::spawn_blocking(move || s.marks(&g, &lanes)).await.expect("marks task")
            }
            AnySink::Postgres(p, _) => p.marks(gateway, &lanes).await,
        }
    }

    /// Commits the requests of `gateway`; hands the requests back with the outcome.
    pub async fn commit(
        &self,
        gateway: &str,
        reqs: Vec<StoreRequest>,
    ) -> (Vec<StoreRequest>, Result<CommitStats, SinkError>) {
        match self {
            AnySink::Embedded(_, c) => c.commit(gateway, reqs).await,
            AnySink::Postgres(_, c) => c.commit(gateway, reqs).await,
        }
    }

    /// Streams the export as NDJSON chunks of about [`EXPORT_CHUNK`] bytes into `tx`;
    /// an error ends the stream with a `{"kind":"error"}` line.
    pub async fn export_ndjson(
        &self,
        gateway: Option<String>,
        lane: Option<String>,
        tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    ) {
        match self {
            AnySink::Embedded(s, _) => {
                let s = s.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    let mut chunk = Vec::with_capacity(EXPORT_CHUNK + 4096);
                    let res = s.export(gateway.as_deref(), lane.as_deref(), |row| {
                        ndjson_line(&mut chunk, &row);
                        if chunk.len() >= EXPORT_CHUNK {
                            let full = std::mem::replace(&mut chunk, Vec::with_capacity(EXPORT_CHUNK + 4096));
                            return tx.blocking_send(full).is_ok();
                        }
                        true
                    });
                    if let Err(e) = res {
                        error_line(&mut chunk, &e);
                    }
                    let _ = tx.blocking_send(chunk);
                })
                .await;
            }
            AnySink::Postgres(p, _) => p.export_ndjson(gateway.as_deref(), lane.as_deref(), tx).await,
        }
    }

    /// Number of stored records.
    pub async fn count(&self) -> Result<u64, SinkError> {
        match self {
            AnySink::Embedded(s, _) => {
                let s = s.clone();
                tokio::task::spawn_blocking(move || s.count()).await.expect("count task")
            }
            AnySink::Postgres(p, _) => p.count().await,
        }
    }

    /// Liveness for the watchdog: the embedded sink answers a read. A database that is
    /// down does not make the hub dead (a restart would not bring it back), so the
    /// PostgreSQL sink is always alive here; its outages show in the commit retries.
    pub async fn alive(&self) -> bool {
        match self {
            AnySink::Embedded(s, c) => {
                let s = s.clone();
                c.alive() && tokio::task::spawn_blocking(move || s.marks("", &[]).is_ok()).await.unwrap_or(false)
            }
            AnySink::Postgres(..) => true,
        }
    }
}

/// What one commit did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Records written.
    pub records: u64,
    /// Payload bytes written.
    pub bytes: u64,
    /// Records skipped because they were at or below the mark already.
    pub duplicates: u64,
    /// Gap ranges recorded.
    pub gaps: u64,
    /// Records those gaps cover.
    pub gap_records: u64,
}

/// One exported row.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ExportRow {
    /// A stored record.
    Record {
        /// Gateway id (from its certificate).
        gateway: String,
        /// Lane.
        lane: String,
        /// Per-lane seq.
        seq: u64,
        /// Ingest time at the gateway, ms since the epoch.
        ingest_ts_ms: u64,
        /// MQTT topic or sensor id.
        source: String,
        /// Content type, if given.
        #[serde(skip_serializing_if = "Option::is_none")]
        content_type: Option<String>,
        /// Payload, base64.
        payload: String,
        /// The payload decoded as a device frame, when it decodes as one; records are
        /// opaque, so anything else leaves this out.
        #[serde(skip_serializing_if = "Option::is_none")]
        decoded: Option<DecodedFrame>,
    },
    /// A range of records evicted on the gateway before they could be sent.
    Gap {
        /// Gateway id.
        gateway: String,
        /// Lane.
        lane: String,
        /// First evicted seq.
        from_seq: u64,
        /// Last evicted seq.
        through_seq: u64,
        /// `capacity` or `ttl`.
        reason: String,
    },
}

/// A device frame ([`voither_firmware::frame::Frame`]) decoded from a record's payload,
/// for the export.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DecodedFrame {
    /// The device's id.
    pub device_id: u32,
    /// The device's frame counter.
    pub counter: u32,
    /// Milliseconds since the Unix epoch, 0 when the device has no clock.
    pub timestamp_ms: u64,
    /// The readings, in frame order.
    pub readings: Vec<DecodedReading>,
}

/// One reading of a [`DecodedFrame`]: `value × 10^exponent` `unit`s of `quantity`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DecodedReading {
    /// What is measured: its name for the codes the firmware crate names
    /// (`"temperature"`, `"relative_humidity"`, ...), else the numeric code.
    pub quantity: Code,
    /// The unit: its name for named codes (`"celsius"`, `"percent"`, ...), else the
    /// numeric code.
    pub unit: Code,
    /// The mantissa.
    pub value: i32,
    /// The decimal exponent.
    pub exponent: i8,
}

/// A quantity or unit code of a reading: a name when the code has one, else the number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum Code {
    /// A code the firmware crate names.
    Name(&'static str),
    /// Any other code (for example a site-specific one, 32768 and up).
    Number(u16),
}

impl DecodedFrame {
    /// Decodes `payload` as a device frame; `None` if it is not exactly one.
    pub fn from_payload(payload: &[u8]) -> Option<Self> {
        let frame = voither_firmware::frame::Frame::decode(payload).ok()?;
        Some(DecodedFrame {
            device_id: frame.device_id,
            counter: frame.counter,
            timestamp_ms: frame.timestamp_ms,
            readings: frame
                .readings()
                .iter()
                .map(|r| DecodedReading {
                    quantity: quantity_code(r.quantity),
                    unit: unit_code(r.unit),
                    value: r.value,
                    exponent: r.exponent,
                })
                .collect(),
        })
    }
}

fn quantity_code(q: voither_firmware::frame::Quantity) -> Code {
    use voither_firmware::frame::Quantity;
    Code::Name(match q {
        Quantity::UNSPECIFIED => "unspecified",
        Quantity::TEMPERATURE => "temperature",
        Quantity::RELATIVE_HUMIDITY => "relative_humidity",
        Quantity::PRESSURE => "pressure",
        Quantity::CO2 => "co2",
        Quantity::ILLUMINANCE => "illuminance",
        Quantity::VOLTAGE => "voltage",
        Quantity(n) => return Code::Number(n),
    })
}

fn unit_code(u: voither_firmware::frame::Unit) -> Code {
    use voither_firmware::frame::Unit;
    Code::Name(match u {
        Unit::UNSPECIFIED => "unspecified",
        Unit::CELSIUS => "celsius",
        Unit::PERCENT => "percent",
        Unit::PASCAL => "pascal",
        Unit::PPM => "ppm",
        Unit::LUX => "lux",
        Unit::VOLT => "volt",
        Unit(n) => return Code::Number(n),
    })
}

/// The embedded sink. Calls block on disk I/O: call them from a blocking thread.
#[derive(Debug)]
pub struct Sink {
    db: Database,
    path: PathBuf,
}

fn reason_code(r: GapReason) -> u8 {
    match r {
        GapReason::Capacity => 0,
        GapReason::Ttl => 1,
    }
}

fn reason_name(c: u8) -> &'static str {
    match c {
        0 => "capacity",
        1 => "ttl",
        _ => "unknown",
    }
}

/// Writes the records `kept` (indices into `recs`, rising) of a lane in blocks of up
/// to [`BLOCK_BYTES`], keyed by their first seq. The records' CBOR goes in as it came
/// (the decoder checked it): a block of records next to each other in the request is a
/// slice of its bytes, others are gathered in `scratch` first.
fn put_blocks(
    blocks: &mut redb::Table<'_, (&'static str, &'static str, u64), &'static [u8]>,
    (gateway, lane): (&str, &str),
    recs: &Records,
    kept: &[usize],
    scratch: &mut Vec<u8>,
) -> Result<(), SinkError> {
    let mut put = |run: &[usize]| -> Result<(), SinkError> {
        let (first, last) = (run[0], run[run.len() - 1]);
        let key = (gateway, lane, recs.seq(first));
        if last - first + 1 == run.len() {
            blocks.insert(key, recs.raw_run(first, last))?;
        } else {
            scratch.clear();
            for &i in run {
                scratch.extend_from_slice(recs.raw(i));
            }
            blocks.insert(key, scratch.as_slice())?;
        }
        Ok(())
    };
    let (mut start, mut size) = (0, 0);
    for (k, &i) in kept.iter().enumerate() {
        let len = recs.raw(i).len();
        if k > start && size + len > BLOCK_BYTES {
            put(&kept[start..k])?;
            (start, size) = (k, 0);
        }
        size += len;
    }
    put(&kept[start..])
}

/// Adds `n` records to the count of `gateway`'s `lane`.
fn add_count(
    counts: &mut redb::Table<'_, (&'static str, &'static str), u64>,
    gateway: &str,
    lane: &str,
    n: u64,
) -> Result<(), SinkError> {
    let c = counts.get((gateway, lane))?.map_or(0, |v| v.value());
    counts.insert((gateway, lane), c + n)?;
    Ok(())
}

impl Sink {
    /// Opens (or creates) the sink file.
    pub fn open(path: &Path, cache_bytes: usize) -> Result<Self, SinkError> {
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(path)
            .map_err(|e| SinkError::Open { path: path.into(), source: Box::new(e) })?;
        let txn = db.begin_write()?;
        txn.open_table(RECORDS)?;
        txn.open_table(BLOCKS)?;
        txn.open_table(COUNTS)?;
        txn.open_table(GAPS)?;
        txn.open_table(MARKS)?;
        txn.commit()?;
        let sink = Self { db, path: path.into() };
        sink.move_rows_into_blocks()?;
        Ok(sink)
    }

    /// Moves records of the earlier layout (a row per record) into blocks, up to
    /// [`MIGRATE_ROWS`] rows per transaction: a crash part way leaves every record in
    /// exactly one of the two tables, and the next open goes on.
    fn move_rows_into_blocks(&self) -> Result<(), SinkError> {
        let mut moved = 0u64;
        loop {
            let mut txn = self.db.begin_write()?;
            txn.set_durability(Durability::Immediate)?;
            let n = {
                let mut records = txn.open_table(RECORDS)?;
                let mut blocks = txn.open_table(BLOCKS)?;
                let mut counts = txn.open_table(COUNTS)?;
                // The first rows, all of the first row's lane.
                let mut lane: Option<(String, String, u64)> = None;
                let mut block = Vec::new();
                let mut last = 0u64;
                let mut n = 0u64;
                for row in records.iter()? {
                    let (k, v) = row?;
                    let (g, l, seq) = k.value();
                    match &lane {
                        None => lane = Some((g.to_owned(), l.to_owned(), seq)),
                        Some((lg, ll, _)) if lg != g || ll != l => break,
                        Some(_) => {}
                    }
                    if n as usize == MIGRATE_ROWS {
                        break;
                    }
                    block.extend_from_slice(v.value());
                    last = seq;
                    n += 1;
                }
                if let Some((g, l, first)) = &lane {
                    let (g, l) = (g.as_str(), l.as_str());
                    blocks.insert((g, l, *first), block.as_slice())?;
                    add_count(&mut counts, g, l, n)?;
                    records.retain_in((g, l, *first)..=(g, l, last), |_, _| false)?;
                }
                n
            };
            if n == 0 {
                txn.abort()?;
                break;
            }
            txn.commit()?;
            moved += n;
        }
        if moved > 0 {
            tracing::info!(records = moved, sink = %self.path.display(), "Moved records of the earlier sink layout into blocks.");
        }
        Ok(())
    }

    /// Path of the sink file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The marks of `lanes` of `gateway` (0 for lanes never seen).
    pub fn marks(&self, gateway: &str, lanes: &[String]) -> Result<Vec<(String, u64)>, SinkError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(MARKS)?;
        let mut out = Vec::with_capacity(lanes.len());
        for l in lanes {
            let m = t.get((gateway, l.as_str()))?.map_or(0, |v| v.value());
            out.push((l.clone(), m));
        }
        Ok(out)
    }

    /// Commits the requests of `gateway` in one durable transaction.
    pub fn commit(&self, gateway: &str, reqs: &[StoreRequest]) -> Result<CommitStats, SinkError> {
        Ok(self.commit_group(&[(gateway, reqs)])?.pop().expect("one stats per item"))
    }

    /// Commits the requests of several gateways (or sessions) in one durable
    /// transaction: one fsync for all of them. Items are applied in order, each against
    /// the marks the items before it left, so two sessions of one gateway in the same
    /// group never store a record twice. Returns one [`CommitStats`] per item.
    pub fn commit_group(&self, items: &[(&str, &[StoreRequest])]) -> Result<Vec<CommitStats>, SinkError> {
        let mut out = Vec::with_capacity(items.len());
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut blocks = txn.open_table(BLOCKS)?;
            let mut counts = txn.open_table(COUNTS)?;
            let mut gaps = txn.open_table(GAPS)?;
            let mut marks = txn.open_table(MARKS)?;
            let (mut kept, mut scratch) = (Vec::new(), Vec::new());
            for (gateway, reqs) in items {
                let gateway = *gateway;
                let mut stats = CommitStats::default();
                for req in *reqs {
                    let lane = req.lane.as_str();
                    let mark = marks.get((gateway, lane))?.map_or(0, |v| v.value());
                    // Only seqs above the mark and above the record before: a block
                    // holds its records in seq order, each once.
                    let recs = &req.records;
                    let mut floor = mark;
                    kept.clear();
                    for i in 0..recs.len() {
                        let seq = recs.seq(i);
                        if seq <= floor {
                            stats.duplicates += 1;
                            continue;
                        }
                        floor = seq;
                        kept.push(i);
                        stats.bytes += recs.payload_len(i) as u64;
                    }
                    if !kept.is_empty() {
                        put_blocks(&mut blocks, (gateway, lane), recs, &kept, &mut scratch)?;
                        add_count(&mut counts, gateway, lane, kept.len() as u64)?;
                        stats.records += kept.len() as u64;
                    }
                    for g in &req.gaps {
                        if g.through_seq <= mark {
                            continue;
                        }
                        let from = g.from_seq.max(mark + 1);
                        gaps.insert((gateway, lane, from), (g.through_seq, reason_code(g.reason)))?;
                        stats.gaps += 1;
                        stats.gap_records += g.through_seq - from + 1;
                    }
                    if req.through_seq > mark {
                        marks.insert((gateway, lane), req.through_seq)?;
                    }
                }
                out.push(stats);
            }
        }
        txn.commit()?;
        Ok(out)
    }

    /// Calls `f` for every stored record (ordered by gateway, lane and seq), then every
    /// recorded gap (in the same order).
    pub fn export(
        &self,
        gateway: Option<&str>,
        lane: Option<&str>,
        mut f: impl FnMut(ExportRow) -> bool,
    ) -> Result<(), SinkError> {
        let txn = self.db.begin_read()?;
        let blocks = txn.open_table(BLOCKS)?;
        let gaps = txn.open_table(GAPS)?;
        let keep = |g: &str, l: &str| gateway.is_none_or(|x| x == g) && lane.is_none_or(|x| x == l);
        for row in blocks.iter()? {
            let (k, v) = row?;
            let (g, l, first) = k.value();
            if !keep(g, l) {
                continue;
            }
            let bytes = v.value();
            let mut d = minicbor::Decoder::new(bytes);
            while d.position() < bytes.len() {
                let at = d.position();
                let r: Record = d.decode().map_err(|e| SinkError::Corrupt {
                    gateway: g.into(),
                    lane: l.into(),
                    seq: first,
                    message: format!("in the block that starts at this seq, at byte {at}: {e}"),
                })?;
                let row = ExportRow::Record {
                    gateway: g.into(),
                    lane: l.into(),
                    seq: r.seq,
                    ingest_ts_ms: r.ingest_ts_ms,
                    source: r.source,
                    content_type: r.content_type,
                    payload: base64::engine::general_purpose::STANDARD.encode(r.payload.as_slice()),
                    decoded: DecodedFrame::from_payload(r.payload.as_slice()),
                };
                if !f(row) {
                    return Ok(());
                }
            }
        }
        for row in gaps.iter()? {
            let (k, v) = row?;
            let (g, l, from) = k.value();
            if !keep(g, l) {
                continue;
            }
            let (through, reason) = v.value();
            let row = ExportRow::Gap {
                gateway: g.into(),
                lane: l.into(),
                from_seq: from,
                through_seq: through,
                reason: reason_name(reason).into(),
            };
            if !f(row) {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Number of stored records (every record is in a block once the sink is open).
    pub fn count(&self) -> Result<u64, SinkError> {
        let txn = self.db.begin_read()?;
        let mut n = 0;
        for row in txn.open_table(COUNTS)?.iter()? {
            n += row?.1.value();
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use voither_proto::Gap;

    fn rec(seq: u64) -> Record {
        Record { seq, ingest_ts_ms: 5, source: "s".into(), content_type: None, payload: vec![seq as u8; 4].into() }
    }

    #[test]
    fn a_group_commit_applies_items_in_order_against_the_marks_before_them() {
        let dir = tempfile::tempdir().unwrap();
        let s = Sink::open(&dir.path().join("sink.redb"), 1 << 20).unwrap();
        let first =
            [StoreRequest { lane: "a".into(), records: vec![rec(1), rec(2)].into(), gaps: vec![], through_seq: 2 }];
        // A second session of the same gateway resending 2 with 3, in the same group.
        let second =
            [StoreRequest { lane: "a".into(), records: vec![rec(2), rec(3)].into(), gaps: vec![], through_seq: 3 }];
        let other = [StoreRequest { lane: "a".into(), records: vec![rec(1)].into(), gaps: vec![], through_seq: 1 }];
        let stats = s.commit_group(&[("gw", &first), ("gw", &second), ("gw-2", &other)]).unwrap();
        let got: Vec<(u64, u64)> = stats.iter().map(|st| (st.records, st.duplicates)).collect();
        assert_eq!(got, vec![(2, 0), (1, 1), (1, 0)]);
        assert_eq!(s.count().unwrap(), 4);
        assert_eq!(s.marks("gw", &["a".into()]).unwrap(), vec![("a".into(), 3)]);
    }

    #[tokio::test]
    async fn the_group_committer_commits_concurrent_sessions() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(Sink::open(&dir.path().join("sink.redb"), 1 << 20).unwrap());
        let c = GroupCommitter::start(s.clone());
        let tasks: Vec<_> = (0..50u64)
            .map(|g| {
                let c = c.clone();
                tokio::spawn(async move {
                    let reqs = vec![StoreRequest {
                        lane: "a".into(),
                        records: (1..=10).map(rec).collect(),
                        gaps: vec![],
                        through_seq: 10,
                    }];
                    c.commit(&format!("gw-{g}"), reqs).await
                })
            })
            .collect();
        for t in tasks {
            let (reqs, stats) = t.await.unwrap();
            assert_eq!(reqs.len(), 1, "requests come back for the acks");
            assert_eq!(stats.unwrap().records, 10);
        }
        assert_eq!(s.count().unwrap(), 500);
        assert!(c.alive());
    }

    #[test]
    fn commit_ignores_at_or_below_mark_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sink.redb");
        {
            let s = Sink::open(&p, 1 << 20).unwrap();
            let req =
                StoreRequest { lane: "a".into(), records: vec![rec(1), rec(2)].into(), gaps: vec![], through_seq: 2 };
            assert_eq!(s.commit("gw", std::slice::from_ref(&req)).unwrap().records, 2);
            let again = s.commit("gw", &[req]).unwrap();
            assert_eq!((again.records, again.duplicates), (0, 2));
            let gap = Gap { from_seq: 3, through_seq: 9, reason: GapReason::Ttl };
            s.commit(
                "gw",
                &[StoreRequest { lane: "a".into(), records: vec![rec(10)].into(), gaps: vec![gap], through_seq: 10 }],
            )
            .unwrap();
        }
        let s = Sink::open(&p, 1 << 20).unwrap();
        assert_eq!(s.marks("gw", &["a".into(), "b".into()]).unwrap(), vec![("a".into(), 10), ("b".into(), 0)]);
        assert_eq!(s.marks("other", &["a".into()]).unwrap(), vec![("a".into(), 0)]);
        let mut rows = Vec::new();
        s.export(None, None, |r| {
            rows.push(serde_json::to_string(&r).unwrap());
            true
        })
        .unwrap();
        assert_eq!(rows.len(), 4);
        assert!(rows[3].contains("\"kind\":\"gap\"") && rows[3].contains("\"reason\":\"ttl\""), "{}", rows[3]);
        assert!(rows[0].contains("\"payload\":\"AQEBAQ==\""), "{}", rows[0]);
    }

    #[test]
    fn export_decodes_device_frames_and_leaves_other_payloads_opaque() {
        use voither_firmware::frame::{Frame, Quantity, Reading, Unit, MAX_ENCODED_LEN};
        let mut frame = Frame::new(42, 7, 1_700_000_000_000);
        frame.push(Reading::temperature_milli_celsius(21_500)).unwrap();
        frame.push(Reading::relative_humidity_milli_percent(45_200)).unwrap();
        frame.push(Reading::new(Quantity(40_000), Unit(40_001), -5, 2)).unwrap();
        let mut buf = [0u8; MAX_ENCODED_LEN];
        let len = frame.encode(&mut buf).unwrap();
        let record = |seq: u64, payload: &[u8]| Record {
            seq,
            ingest_ts_ms: 5,
            source: "devices/42/frame".into(),
            content_type: None,
            payload: payload.to_vec().into(),
        };
        // A frame with a byte cut off is not a frame any more.
        let records =
            vec![record(1, &buf[..len]), record(2, b"VSIM not a frame"), record(3, &buf[..len - 1]), record(4, b"")];
        let dir = tempfile::tempdir().unwrap();
        let s = Sink::open(&dir.path().join("sink.redb"), 1 << 20).unwrap();
        s.commit("gw", &[StoreRequest { lane: "a".into(), records: records.into(), gaps: vec![], through_seq: 4 }])
            .unwrap();
        let mut rows = Vec::new();
        s.export(None, None, |r| {
            rows.push(serde_json::to_value(&r).unwrap());
            true
        })
        .unwrap();
        assert_eq!(rows.len(), 4);
        assert_eq!(
            rows[0]["decoded"],
            serde_json::json!({
                "device_id": 42,
                "counter": 7,
                "timestamp_ms": 1_700_000_000_000u64,
                "readings": [
                    {"quantity": "temperature", "unit": "celsius", "value": 21_500, "exponent": -3},
                    {"quantity": "relative_humidity", "unit": "percent", "value": 45_200, "exponent": -3},
                    {"quantity": 40_000, "unit": 40_001, "value": -5, "exponent": 2},
                ],
            })
        );
        for row in &rows[1..] {
            assert!(row.get("decoded").is_none(), "not a frame, so no decoded field: {row}");
            assert_eq!(row["kind"], "record");
        }
    }

    fn exported(s: &Sink) -> Vec<serde_json::Value> {
        let mut rows = Vec::new();
        s.export(None, None, |r| {
            rows.push(serde_json::to_value(&r).unwrap());
            true
        })
        .unwrap();
        rows
    }

    #[test]
    fn a_sink_of_the_row_per_record_layout_is_moved_into_blocks_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sink.redb");
        {
            // What an earlier hub wrote: a row per record, and the marks.
            let db = Database::create(&p).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(RECORDS).unwrap();
                let mut buf = Vec::new();
                for (lane, n) in [("a", 2500u64), ("b", 3)] {
                    for seq in 1..=n {
                        buf.clear();
                        minicbor::encode(rec(seq), &mut buf).unwrap();
                        t.insert(("gw", lane, seq), buf.as_slice()).unwrap();
                    }
                }
                let mut m = txn.open_table(MARKS).unwrap();
                m.insert(("gw", "a"), 2500).unwrap();
                m.insert(("gw", "b"), 3).unwrap();
            }
            txn.commit().unwrap();
        }
        let s = Sink::open(&p, 1 << 20).unwrap();
        assert_eq!(s.count().unwrap(), 2503);
        {
            use redb::ReadableTableMetadata;
            let txn = s.db.begin_read().unwrap();
            assert_eq!(txn.open_table(RECORDS).unwrap().len().unwrap(), 0, "every row moved");
            // 2500 rows of lane a in blocks of at most MIGRATE_ROWS, then lane b.
            assert_eq!(txn.open_table(BLOCKS).unwrap().len().unwrap(), 4);
        }
        let rows = exported(&s);
        let seqs: Vec<(String, u64)> =
            rows.iter().map(|r| (r["lane"].as_str().unwrap().to_owned(), r["seq"].as_u64().unwrap())).collect();
        let want: Vec<(String, u64)> =
            (1..=2500).map(|q| ("a".to_owned(), q)).chain((1..=3).map(|q| ("b".to_owned(), q))).collect();
        assert_eq!(seqs, want);
        assert_eq!(rows[2502]["payload"], "AwMDAw==", "seq 3 of lane b: four bytes of 3");
        // New batches go on from the marks, after the moved records.
        let req = StoreRequest {
            lane: "a".into(),
            records: vec![rec(2500), rec(2501)].into(),
            gaps: vec![],
            through_seq: 2501,
        };
        let st = s.commit("gw", &[req]).unwrap();
        assert_eq!((st.records, st.duplicates), (1, 1));
        drop(s);
        let s = Sink::open(&p, 1 << 20).unwrap();
        assert_eq!(s.count().unwrap(), 2504);
        assert_eq!(exported(&s)[2500]["seq"], 2501);
    }

    #[test]
    fn a_block_keeps_its_records_in_seq_order_each_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = Sink::open(&dir.path().join("sink.redb"), 1 << 20).unwrap();
        // Out of order and repeated within one request: only what rises is stored.
        let req = StoreRequest {
            lane: "a".into(),
            records: vec![rec(1), rec(3), rec(2), rec(3), rec(4)].into(),
            gaps: vec![],
            through_seq: 4,
        };
        let st = s.commit("gw", &[req]).unwrap();
        assert_eq!((st.records, st.duplicates), (3, 2));
        let seqs: Vec<u64> = exported(&s).iter().map(|r| r["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, vec![1, 3, 4]);
        assert_eq!(s.count().unwrap(), 3);
    }

    /// The blocks of `gateway`'s `lane`: (first seq, bytes).
    fn blocks_of(s: &Sink, gateway: &str, lane: &str) -> Vec<(u64, usize)> {
        let txn = s.db.begin_read().unwrap();
        let t = txn.open_table(BLOCKS).unwrap();
        t.range((gateway, lane, 0)..=(gateway, lane, u64::MAX))
            .unwrap()
            .map(|r| {
                let (k, v) = r.unwrap();
                (k.value().2, v.value().len())
            })
            .collect()
    }

    #[test]
    fn a_batch_larger_than_a_block_is_stored_in_several_each_record_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = Sink::open(&dir.path().join("sink.redb"), 1 << 20).unwrap();
        let big = |seq: u64| Record { payload: vec![seq as u8; 256].into(), ..rec(seq) };
        // All new: blocks are slices of the request.
        let req = StoreRequest {
            lane: "a".into(),
            records: (1..=600).map(big).collect::<Vec<_>>().into(),
            gaps: vec![],
            through_seq: 600,
        };
        let size: usize = (0..req.records.len()).map(|i| req.records.raw(i).len()).sum();
        assert!(size > 2 * BLOCK_BYTES, "the test needs a batch of three blocks or more: {size} bytes");
        assert_eq!(s.commit("gw", &[req]).unwrap().records, 600);
        // Resent in part, then new: the filtered path splits the same way.
        let req = StoreRequest {
            lane: "a".into(),
            records: (590..=1200).map(big).collect::<Vec<_>>().into(),
            gaps: vec![],
            through_seq: 1200,
        };
        let st = s.commit("gw", &[req]).unwrap();
        assert_eq!((st.records, st.duplicates), (600, 11));
        let blocks = blocks_of(&s, "gw", "a");
        assert!(blocks.len() >= 6, "{blocks:?}");
        assert!(blocks.iter().all(|(_, len)| *len <= BLOCK_BYTES), "{blocks:?}");
        assert_eq!(blocks[0].0, 1);
        assert!(blocks.iter().any(|(first, _)| *first == 601), "the second request starts a block: {blocks:?}");
        let seqs: Vec<u64> = exported(&s).iter().map(|r| r["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, (1..=1200).collect::<Vec<u64>>());
        assert_eq!(s.count().unwrap(), 1200);
    }

    #[test]
    fn a_record_larger_than_a_block_gets_a_block_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let s = Sink::open(&dir.path().join("sink.redb"), 1 << 20).unwrap();
        let huge = Record { payload: vec![7; BLOCK_BYTES + 1].into(), ..rec(2) };
        let req =
            StoreRequest { lane: "a".into(), records: vec![rec(1), huge, rec(3)].into(), gaps: vec![], through_seq: 3 };
        assert_eq!(s.commit("gw", &[req]).unwrap().records, 3);
        let firsts: Vec<u64> = blocks_of(&s, "gw", "a").iter().map(|(f, _)| *f).collect();
        assert_eq!(firsts, vec![1, 2, 3]);
        let seqs: Vec<u64> = exported(&s).iter().map(|r| r["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, vec![1, 2, 3]);
    }

    #[test]
    fn a_damaged_block_is_an_error_naming_its_lane_and_seq() {
        let dir = tempfile::tempdir().unwrap();
        let s = Sink::open(&dir.path().join("sink.redb"), 1 << 20).unwrap();
        s.commit(
            "gw",
            &[StoreRequest { lane: "a".into(), records: vec![rec(7), rec(8)].into(), gaps: vec![], through_seq: 8 }],
        )
        .unwrap();
        {
            let txn = s.db.begin_write().unwrap();
            {
                let mut t = txn.open_table(BLOCKS).unwrap();
                let mut v = t.get(("gw", "a", 7)).unwrap().unwrap().value().to_vec();
                v.truncate(v.len() - 3);
                t.insert(("gw", "a", 7), v.as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        let mut rows = 0;
        let e = s
            .export(None, None, |_| {
                rows += 1;
                true
            })
            .unwrap_err()
            .to_string();
        assert_eq!(rows, 1, "the record before the damage is exported");
        assert!(e.contains("gw/a/7") && e.contains("in the block"), "{e}");
    }

    #[test]
    fn corrupt_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sink.redb");
        std::fs::write(&p, b"not a database at all, just text that is long enough to be read").unwrap();
        let e = Sink::open(&p, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("sink.redb"), "{e}");
    }
}
