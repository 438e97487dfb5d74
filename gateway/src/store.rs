//! The durable local store: records per lane, on disk, until a hub acknowledges them.
//!
//! # On-disk layout
//!
//! One redb file, `store.redb`, in the data folder:
//!
//! | table | key | value |
//! |---|---|---|
//! | `lanes` | lane name | `(next_seq, records, bytes)` |
//! | `lane/<name>` | seq (`u64`) | the [`Record`] in CBOR |
//! | `gaps/<name>` | first evicted seq | `(last evicted seq, reason)` |
//! | `mqtt_inflight` | MQTT packet id (`u16`) | FNV-1a hash of topic and payload |
//!
//! `bytes` counts the encoded size of the records held (payload and metadata): it is
//! what the lane budgets and the store budget limit.
//!
//! # Invariants
//!
//! 1. **Durable before ack.** [`Store::append_batch`] writes a whole batch in one
//!    transaction committed with `Durability::Immediate` (fsync) and returns only
//!    then; the ingest path acknowledges MQTT messages only after it returns.
//! 2. **Seqs are never reused.** `next_seq` of a lane is stored in the same transaction
//!    as the records it numbered, and only grows, also when records are deleted.
//! 3. **Delete only on hub ack.** Records leave only through [`Store::ack_through`],
//!    which the uplink calls when a hub acknowledged them durable. Those deletes are
//!    not fsynced one by one: every [`ACKS_PER_DURABLE_COMMIT`]-th ack, an ack that
//!    empties its lane, and every append make them durable. A crash can therefore
//!    bring back records the hub already has; the uplink resends them and the hub
//!    skips them by its high-water mark. It never loses one.
//! 4. **Counters match contents.** `records` and `bytes` of a lane change in the same
//!    transaction as the rows they count.
//! 5. **Redelivery is recognised.** Each append also records, per MQTT packet id, a
//!    hash of what was stored under it. A message the broker redelivers (DUP set) after
//!    a crash between commit and PUBACK matches its entry and is acknowledged without
//!    being stored twice.
//! 6. **Bounded memory.** The page cache is capped by `cache_bytes`; reads are bounded
//!    by count and bytes (a read returns at least one item when there is one).
//! 7. **Bounded disk, loss never silent.** After an append, a `drop_oldest` lane over its
//!    byte budget (or the store over its total budget) loses its oldest records in the
//!    same transaction, and the evicted range is written to `gaps/<lane>` (merged with
//!    an adjacent range of the same reason). A `backpressure` lane is never evicted: an
//!    append that would take it over budget fails with [`StoreError::Full`] and writes
//!    nothing. TTL expiry ([`Store::expire`]) evicts from the front the same way.
//! 8. **No hole.** Seqs held, plus the recorded gaps, cover every seq from the oldest
//!    unacknowledged one to `next_seq - 1`; [`Store::read_from`] returns both, so the
//!    uplink can always tell the hub what happened to each seq.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use voither_proto::{Gap, GapReason, Record, RecordRef};

/// Acks whose deletes may wait for a later fsync (see invariant 3).
pub const ACKS_PER_DURABLE_COMMIT: u64 = 32;

const LANES: TableDefinition<'_, &str, (u64, u64, u64)> = TableDefinition::new("lanes");
const MQTT_INFLIGHT: TableDefinition<'_, u16, u64> = TableDefinition::new("mqtt_inflight");

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be opened (corrupt, locked, or unreadable).
    #[error("cannot open store {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<redb::DatabaseError>,
    },
    /// A transaction failed.
    #[error("store transaction failed: {0}")]
    Io(String),
    /// The file system failed (disk full, I/O error); the store reopens the file and
    /// the caller retries later. Nothing was committed.
    #[error("store disk error: {0}")]
    Disk(String),
    /// The store file could not be reopened after a disk error yet.
    #[error("store unavailable after a disk error: {0}")]
    Unavailable(String),
    /// A stored row could not be decoded.
    #[error("corrupt record in lane {lane} at seq {seq}: {message}")]
    Corrupt {
        /// Lane.
        lane: String,
        /// Seq of the row.
        seq: u64,
        /// Decoder message.
        message: String,
    },
    /// The lane is not configured.
    #[error("unknown lane {0:?}")]
    UnknownLane(String),
    /// A `backpressure` lane (or the store) has no room for the records; nothing was
    /// written.
    #[error("lane {lane} is full ({held} of {budget} bytes held); holding new messages until space frees")]
    Full {
        /// The full lane.
        lane: String,
        /// Bytes it holds.
        held: u64,
        /// Its budget.
        budget: u64,
    },
}

impl StoreError {
    /// True when the error means the file is not a usable store (corrupt, truncated,
    /// not a store at all), as opposed to locked, unreadable or a transient failure.
    pub fn is_corrupt(&self) -> bool {
        match self {
            StoreError::Open { source, .. } => match source.as_ref() {
                redb::DatabaseError::RepairAborted => true,
                redb::DatabaseError::Storage(redb::StorageError::Corrupted(_)) => true,
                redb::DatabaseError::Storage(redb::StorageError::Io(e)) => {
                    matches!(e.kind(), std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof)
                }
                _ => false,
            },
            StoreError::Corrupt { .. } => true,
            _ => false,
        }
    }
}

/// What a lane does when its byte budget is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FullPolicy {
    /// Evict the oldest records, record the range as a gap.
    #[default]
    DropOldest,
    /// Refuse new records: the ingest stops acking the broker, which keeps them.
    Backpressure,
}

/// Limits of one lane.
#[derive(Debug, Clone)]
pub struct LaneSpec {
    /// Lane name.
    pub name: String,
    /// Priority (lower is more important; under the store budget, the least important
    /// `drop_oldest` lane is evicted first).
    pub priority: u8,
    /// Byte budget of the records held.
    pub max_bytes: u64,
    /// Records older than this (ms) are evicted; `None`: kept until acked.
    pub ttl_ms: Option<u64>,
    /// Behaviour when full.
    pub policy: FullPolicy,
}

/// One eviction: a range of one lane that will never be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eviction {
    /// Lane.
    pub lane: String,
    /// First evicted seq.
    pub from_seq: u64,
    /// Last evicted seq.
    pub through_seq: u64,
    /// Records evicted.
    pub records: u64,
    /// Bytes freed.
    pub bytes: u64,
    /// Why.
    pub reason: GapReason,
}

fn reason_code(r: GapReason) -> u8 {
    match r {
        GapReason::Capacity => 0,
        GapReason::Ttl => 1,
    }
}

fn reason_from(c: u8) -> GapReason {
    if c == 1 {
        GapReason::Ttl
    } else {
        GapReason::Capacity
    }
}

macro_rules! io_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                let m = e.to_string();
                // redb reports file-system failures (ENOSPC, EIO) as "I/O error" and, after
                // one, refuses further writes until the database is reopened.
                if m.contains("I/O error") {
                    StoreError::Disk(m)
                } else {
                    StoreError::Io(m)
                }
            }
        }
    )*};
}
io_err!(redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError, redb::SetDurabilityError);

/// A record to append; the store assigns its seq.
#[derive(Debug, Clone)]
pub struct NewRecord {
    /// Lane name.
    pub lane: String,
    /// Ingest time, ms since the Unix epoch.
    pub ingest_ts_ms: u64,
    /// MQTT topic or sensor id.
    pub source: String,
    /// Optional content type.
    pub content_type: Option<String>,
    /// Payload.
    pub payload: Vec<u8>,
}

/// Result of an append.
#[derive(Debug, Clone, Default)]
pub struct Appended {
    /// Seq of each record, in the order given.
    pub seqs: Vec<u64>,
    /// What was evicted to make room.
    pub evicted: Vec<Eviction>,
}

/// What a lane holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LaneStats {
    /// Lane name.
    pub lane: String,
    /// Next seq to assign.
    pub next_seq: u64,
    /// Oldest seq not yet acknowledged, record or gap (== `next_seq` when none).
    pub oldest_seq: u64,
    /// Records held.
    pub records: u64,
    /// Payload bytes held.
    pub bytes: u64,
    /// Ingest time of the oldest record held, ms since the epoch.
    pub oldest_ingest_ts_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default)]
struct LaneMeta {
    next_seq: u64,
    records: u64,
    bytes: u64,
}

/// The store. Calls block on disk I/O: call them from a blocking thread.
#[derive(Debug)]
pub struct Store {
    /// Read-locked by every operation, write-locked only to compact or to reopen after
    /// a disk error (then `None` until the reopen succeeds).
    db: RwLock<Option<Database>>,
    path: PathBuf,
    cache_bytes: usize,
    /// Why the store is degraded (a disk error not yet recovered from).
    degraded: Mutex<Option<String>>,
    tables: HashMap<String, String>,
    gap_tables: HashMap<String, String>,
    specs: HashMap<String, LaneSpec>,
    max_total_bytes: u64,
    meta: Mutex<HashMap<String, LaneMeta>>,
    /// Acks committed without fsync since the last durable commit.
    lazy_acks: std::sync::atomic::AtomicU64,
}

/// FNV-1a over topic and payload: the identity of an MQTT message for redelivery checks.
pub fn message_hash(topic: &str, payload: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in topic.as_bytes().iter().chain([0u8].iter()).chain(payload) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl Store {
    /// Opens (or creates) the store at `path` for `lanes`, holding at most
    /// `max_total_bytes` over all lanes.
    pub fn open(path: &Path, cache_bytes: usize, lanes: &[LaneSpec], max_total_bytes: u64) -> Result<Self, StoreError> {
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(path)
            .map_err(|e| StoreError::Open { path: path.into(), source: Box::new(e) })?;
        let tables: HashMap<String, String> =
            lanes.iter().map(|l| (l.name.clone(), format!("lane/{}", l.name))).collect();
        let gap_tables: HashMap<String, String> =
            lanes.iter().map(|l| (l.name.clone(), format!("gaps/{}", l.name))).collect();
        let mut meta = HashMap::new();
        let txn = db.begin_write()?;
        {
            let mut t = txn.open_table(LANES)?;
            txn.open_table(MQTT_INFLIGHT)?;
            for lane in lanes {
                let name = lane.name.as_str();
                let existing = t.get(name)?.map(|v| v.value());
                let m = match existing {
                    Some((next_seq, records, bytes)) => LaneMeta { next_seq, records, bytes },
                    None => {
                        t.insert(name, (1, 0, 0))?;
                        LaneMeta { next_seq: 1, records: 0, bytes: 0 }
                    }
                };
                txn.open_table(TableDefinition::<u64, &[u8]>::new(&tables[name]))?;
                txn.open_table(TableDefinition::<u64, (u64, u8)>::new(&gap_tables[name]))?;
                meta.insert(lane.name.clone(), m);
            }
        }
        txn.commit()?;
        Ok(Self {
            db: RwLock::new(Some(db)),
            path: path.into(),
            cache_bytes,
            degraded: Mutex::new(None),
            tables,
            gap_tables,
            specs: lanes.iter().map(|l| (l.name.clone(), l.clone())).collect(),
            max_total_bytes,
            meta: Mutex::new(meta),
            lazy_acks: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Lanes the store was opened with.
    pub fn lanes(&self) -> Vec<String> {
        let mut v: Vec<String> = self.tables.keys().cloned().collect();
        v.sort();
        v
    }

    fn table(&self, lane: &str) -> Result<TableDefinition<'_, u64, &'static [u8]>, StoreError> {
        let name = self.tables.get(lane).ok_or_else(|| StoreError::UnknownLane(lane.into()))?;
        Ok(TableDefinition::new(name))
    }

    fn gap_table(&self, lane: &str) -> Result<TableDefinition<'_, u64, (u64, u8)>, StoreError> {
        let name = self.gap_tables.get(lane).ok_or_else(|| StoreError::UnknownLane(lane.into()))?;
        Ok(TableDefinition::new(name))
    }

    /// The open database, reopening it first after a disk error.
    fn db(&self) -> Result<std::sync::RwLockReadGuard<'_, Option<Database>>, StoreError> {
        {
            let g = self.db.read().expect("store db lock");
            if g.is_some() {
                return Ok(g);
            }
        }
        {
            let mut w = self.db.write().expect("store db lock");
            if w.is_none() {
                let db = Database::builder()
                    .set_cache_size(self.cache_bytes)
                    .create(&self.path)
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?;
                // Counters come back from the file: the failed transaction left no trace.
                let txn = db.begin_read()?;
                let t = txn.open_table(LANES)?;
                let mut meta = self.meta.lock().expect("store meta lock");
                for (lane, m) in meta.iter_mut() {
                    if let Some(v) = t.get(lane.as_str())? {
                        let (next_seq, records, bytes) = v.value();
                        *m = LaneMeta { next_seq, records, bytes };
                    }
                }
                drop(t);
                drop(txn);
                *w = Some(db);
                tracing::info!(store = %self.path.display(), "Store reopened after a disk error.");
            }
        }
        Ok(self.db.read().expect("store db lock"))
    }

    /// Records the outcome of a write: a disk error drops the database so the next call
    /// reopens it (redb refuses writes after an I/O error); success clears the state.
    fn outcome<T>(&self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        match &r {
            Ok(_) => {
                let mut d = self.degraded.lock().expect("degraded lock");
                if d.take().is_some() {
                    tracing::info!(store = %self.path.display(), "Store writes again.");
                }
            }
            Err(StoreError::Disk(m)) | Err(StoreError::Unavailable(m)) => {
                *self.degraded.lock().expect("degraded lock") = Some(m.clone());
                if matches!(r, Err(StoreError::Disk(_))) {
                    *self.db.write().expect("store db lock") = None;
                }
            }
            Err(_) => {}
        }
        r
    }

    /// Why the store cannot write, while a disk error is not recovered from.
    pub fn degraded(&self) -> Option<String> {
        self.degraded.lock().expect("degraded lock").clone()
    }

    /// Evicts the oldest records of `lane` inside `txn` until `fits(bytes held)` or the
    /// lane is empty (or `until_seq` is passed), recording the range as a gap.
    fn evict_front(
        &self,
        txn: &redb::WriteTransaction,
        lane: &str,
        m: &mut LaneMeta,
        reason: GapReason,
        mut stop: impl FnMut(&LaneMeta, &Record) -> bool,
    ) -> Result<Option<Eviction>, StoreError> {
        let mut t = txn.open_table(self.table(lane)?)?;
        let mut ev: Option<Eviction> = None;
        loop {
            let Some((k, v)) = t.first()?.map(|(k, v)| (k.value(), v.value().to_vec())) else { break };
            let rec: Record = minicbor::decode(&v).map_err(|e| StoreError::Corrupt {
                lane: lane.into(),
                seq: k,
                message: e.to_string(),
            })?;
            if stop(m, &rec) {
                break;
            }
            t.remove(k)?;
            m.records -= 1;
            m.bytes -= v.len() as u64;
            let e = ev.get_or_insert(Eviction {
                lane: lane.into(),
                from_seq: k,
                through_seq: k,
                records: 0,
                bytes: 0,
                reason,
            });
            e.through_seq = k;
            e.records += 1;
            e.bytes += v.len() as u64;
        }
        if let Some(e) = &ev {
            let mut g = txn.open_table(self.gap_table(lane)?)?;
            // Merge with the previous range when adjacent and of the same reason.
            let prev = g.last()?.map(|(k, v)| (k.value(), v.value()));
            match prev {
                Some((from, (through, r))) if through + 1 == e.from_seq && r == reason_code(reason) => {
                    g.insert(from, (e.through_seq, r))?;
                }
                _ => {
                    g.insert(e.from_seq, (e.through_seq, reason_code(reason)))?;
                }
            }
        }
        Ok(ev)
    }

    /// Appends `records` in one durable commit and returns the seq each got, in order,
    /// and what was evicted to make room (invariant 7).
    ///
    /// `mqtt` lists `(packet id, message hash)` of the MQTT messages in the batch, kept
    /// for redelivery checks (invariant 5).
    pub fn append_batch(&self, records: &[NewRecord], mqtt: &[(u16, u64)]) -> Result<Appended, StoreError> {
        let r = self.append_batch_inner(records, mqtt);
        self.outcome(r)
    }

    fn append_batch_inner(&self, records: &[NewRecord], mqtt: &[(u16, u64)]) -> Result<Appended, StoreError> {
        let guard = self.db()?;
        let db = guard.as_ref().expect("db() returns an open database");
        let mut meta = self.meta.lock().expect("store meta lock");
        let mut next = meta.clone();
        let mut seqs = vec![0; records.len()];
        let mut evicted = Vec::new();
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut by_lane: Vec<(&str, Vec<(usize, &NewRecord)>)> = Vec::new();
            for (i, r) in records.iter().enumerate() {
                match by_lane.iter_mut().find(|(l, _)| *l == r.lane) {
                    Some((_, v)) => v.push((i, r)),
                    None => by_lane.push((r.lane.as_str(), vec![(i, r)])),
                }
            }
            let mut buf = Vec::new();
            for (lane, recs) in &by_lane {
                let spec = self.specs.get(*lane).ok_or_else(|| StoreError::UnknownLane((*lane).into()))?;
                let m = next.get_mut(*lane).expect("meta of every configured lane");
                let mut t = txn.open_table(self.table(lane)?)?;
                for (i, r) in recs {
                    let seq = m.next_seq;
                    buf.clear();
                    let rec = RecordRef {
                        seq,
                        ingest_ts_ms: r.ingest_ts_ms,
                        source: &r.source,
                        content_type: r.content_type.as_deref(),
                        payload: &r.payload,
                    };
                    minicbor::encode(rec, &mut buf).expect("encoding into a Vec is infallible");
                    if spec.policy == FullPolicy::Backpressure && m.bytes + buf.len() as u64 > spec.max_bytes {
                        return Err(StoreError::Full { lane: (*lane).into(), held: m.bytes, budget: spec.max_bytes });
                    }
                    t.insert(seq, buf.as_slice())?;
                    m.next_seq += 1;
                    m.records += 1;
                    m.bytes += buf.len() as u64;
                    seqs[*i] = seq;
                }
            }
            // Lane budgets of drop_oldest lanes.
            for (lane, _) in &by_lane {
                let spec = &self.specs[*lane];
                if spec.policy == FullPolicy::DropOldest {
                    let m = next.get_mut(*lane).expect("meta");
                    let budget = spec.max_bytes;
                    if let Some(e) = self.evict_front(&txn, lane, m, GapReason::Capacity, |m, _| m.bytes <= budget)? {
                        evicted.push(e);
                    }
                }
            }
            // The store budget: least important drop_oldest lanes first.
            let mut total: u64 = next.values().map(|m| m.bytes).sum();
            if total > self.max_total_bytes {
                let mut order: Vec<&LaneSpec> =
                    self.specs.values().filter(|s| s.policy == FullPolicy::DropOldest).collect();
                order.sort_by_key(|s| std::cmp::Reverse(s.priority));
                for spec in order {
                    if total <= self.max_total_bytes {
                        break;
                    }
                    let m = next.get_mut(&spec.name).expect("meta");
                    let before = m.bytes;
                    let other = total - before;
                    let max = self.max_total_bytes;
                    if let Some(e) =
                        self.evict_front(&txn, &spec.name, m, GapReason::Capacity, |m, _| other + m.bytes <= max)?
                    {
                        evicted.push(e);
                    }
                    total = other + m.bytes;
                }
                if total > self.max_total_bytes {
                    let (lane, _) = by_lane[0];
                    return Err(StoreError::Full { lane: lane.into(), held: total, budget: self.max_total_bytes });
                }
            }
            let mut lanes = txn.open_table(LANES)?;
            for (lane, m) in &next {
                if meta.get(lane).is_none_or(|old| old.next_seq != m.next_seq || old.bytes != m.bytes) {
                    lanes.insert(lane.as_str(), (m.next_seq, m.records, m.bytes))?;
                }
            }
            let mut inflight = txn.open_table(MQTT_INFLIGHT)?;
            for (pkid, hash) in mqtt {
                inflight.insert(*pkid, *hash)?;
            }
        }
        txn.commit()?;
        *meta = next;
        Ok(Appended { seqs, evicted })
    }

    /// Evicts records older than their lane's TTL (`now_ms` is the wall clock).
    pub fn expire(&self, now_ms: u64) -> Result<Vec<Eviction>, StoreError> {
        let r = self.expire_inner(now_ms);
        self.outcome(r)
    }

    fn expire_inner(&self, now_ms: u64) -> Result<Vec<Eviction>, StoreError> {
        let guard = self.db()?;
        let db = guard.as_ref().expect("db() returns an open database");
        let mut meta = self.meta.lock().expect("store meta lock");
        let mut next = meta.clone();
        let mut evicted = Vec::new();
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            for spec in self.specs.values() {
                let Some(ttl) = spec.ttl_ms else { continue };
                let m = next.get_mut(&spec.name).expect("meta");
                let cutoff = now_ms.saturating_sub(ttl);
                if let Some(e) =
                    self.evict_front(&txn, &spec.name, m, GapReason::Ttl, |_, r| r.ingest_ts_ms >= cutoff)?
                {
                    evicted.push(e);
                }
            }
            if !evicted.is_empty() {
                let mut lanes = txn.open_table(LANES)?;
                for e in &evicted {
                    let m = next[&e.lane];
                    lanes.insert(e.lane.as_str(), (m.next_seq, m.records, m.bytes))?;
                }
            }
        }
        if evicted.is_empty() {
            txn.abort()?;
            return Ok(evicted);
        }
        txn.commit()?;
        *meta = next;
        Ok(evicted)
    }

    /// The MQTT packet ids and message hashes of the latest appends (invariant 5).
    pub fn mqtt_inflight(&self) -> Result<HashMap<u16, u64>, StoreError> {
        let txn = self.db()?.as_ref().expect("db() returns an open database").begin_read()?;
        let t = txn.open_table(MQTT_INFLIGHT)?;
        let mut out = HashMap::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.insert(k.value(), v.value());
        }
        Ok(out)
    }

    /// Reads what `lane` holds from `from_seq` on: records and the evicted ranges among
    /// them, at most `max_records` items and about `max_bytes` of records (at least one
    /// item if there is any). Gaps are trimmed to start at `from_seq` or later.
    pub fn read_from(
        &self,
        lane: &str,
        from_seq: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<(Vec<Record>, Vec<Gap>), StoreError> {
        let txn = self.db()?.as_ref().expect("db() returns an open database").begin_read()?;
        let t = txn.open_table(self.table(lane)?)?;
        let g = txn.open_table(self.gap_table(lane)?)?;
        let mut gaps: Vec<Gap> = Vec::new();
        for row in g.iter()? {
            let (k, v) = row?;
            let (through, reason) = v.value();
            if through >= from_seq {
                gaps.push(Gap { from_seq: k.value().max(from_seq), through_seq: through, reason: reason_from(reason) });
            }
        }
        let mut out = Vec::new();
        let mut kept_gaps = Vec::new();
        let mut bytes = 0;
        let mut gaps = gaps.into_iter().peekable();
        let mut rows = t.range(from_seq..)?.peekable();
        while out.len() + kept_gaps.len() < max_records && bytes < max_bytes {
            let next_record = match rows.peek() {
                Some(Ok((k, _))) => Some(k.value()),
                Some(Err(_)) => Some(0),
                None => None,
            };
            let take_gap = match (next_record, gaps.peek()) {
                (None, None) => break,
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (Some(r), Some(g)) => g.from_seq < r,
            };
            if take_gap {
                kept_gaps.push(gaps.next().expect("peeked"));
                continue;
            }
            let (k, v) = rows.next().expect("peeked")?;
            let seq = k.value();
            let rec: Record = minicbor::decode(v.value()).map_err(|e| StoreError::Corrupt {
                lane: lane.into(),
                seq,
                message: e.to_string(),
            })?;
            bytes += v.value().len();
            out.push(rec);
        }
        Ok((out, kept_gaps))
    }

    /// Next seq of each lane (one past the newest record), from memory.
    pub fn next_seqs(&self) -> Vec<(String, u64)> {
        self.meta.lock().expect("store meta lock").iter().map(|(l, m)| (l.clone(), m.next_seq)).collect()
    }

    /// Deletes the records (and gaps) of `lane` through `seq`: a hub holds them.
    /// Returns how many records and bytes were deleted.
    pub fn ack_through(&self, lane: &str, seq: u64) -> Result<(u64, u64), StoreError> {
        let r = self.ack_through_inner(lane, seq);
        self.outcome(r)
    }

    fn ack_through_inner(&self, lane: &str, seq: u64) -> Result<(u64, u64), StoreError> {
        let guard = self.db()?;
        let db = guard.as_ref().expect("db() returns an open database");
        let mut meta = self.meta.lock().expect("store meta lock");
        let m = *meta.get(lane).ok_or_else(|| StoreError::UnknownLane(lane.into()))?;
        let mut removed = 0u64;
        let mut removed_bytes = 0u64;
        let mut txn = db.begin_write()?;
        {
            let mut t = txn.open_table(self.table(lane)?)?;
            for row in t.extract_from_if(..=seq, |_, _| true)? {
                let (_, v) = row?;
                removed += 1;
                removed_bytes += v.value().len() as u64;
            }
            let mut g = txn.open_table(self.gap_table(lane)?)?;
            let covered: Vec<(u64, u64, u8)> = g
                .range(..=seq)?
                .map(|r| r.map(|(k, v)| (k.value(), v.value().0, v.value().1)))
                .collect::<Result<_, _>>()?;
            for (from, through, reason) in covered {
                g.remove(from)?;
                if through > seq {
                    g.insert(seq + 1, (through, reason))?;
                }
            }
            let mut lanes = txn.open_table(LANES)?;
            lanes.insert(lane, (m.next_seq, m.records - removed, m.bytes - removed_bytes))?;
        }
        // The hub has these records durably; losing the delete costs a resend, not a
        // record. Fsync now and then, and when the lane is empty (end of a drain).
        use std::sync::atomic::Ordering;
        let lazy = self.lazy_acks.fetch_add(1, Ordering::Relaxed) + 1;
        let durable = lazy >= ACKS_PER_DURABLE_COMMIT || m.records == removed;
        txn.set_durability(if durable { Durability::Immediate } else { Durability::None })?;
        txn.commit()?;
        if durable {
            self.lazy_acks.store(0, Ordering::Relaxed);
        }
        let mm = meta.get_mut(lane).expect("lane checked above");
        mm.records -= removed;
        mm.bytes -= removed_bytes;
        Ok((removed, removed_bytes))
    }

    /// Gives unused pages back to the file system when the store is idle (nothing held).
    /// Returns the file size before and after, or `None` when not idle.
    pub fn compact_if_idle(&self) -> Result<Option<(u64, u64)>, StoreError> {
        if self.meta.lock().expect("store meta lock").values().any(|m| m.records > 0) {
            return Ok(None);
        }
        let before = self.file_size();
        let mut guard = self.db.write().expect("store db lock");
        let Some(db) = guard.as_mut() else { return Ok(None) };
        // Holding the write lock: no transaction is open, none can start.
        while db.compact().map_err(|e| StoreError::Io(e.to_string()))? {}
        drop(guard);
        Ok(Some((before, self.file_size())))
    }

    /// What each lane holds.
    pub fn stats(&self) -> Result<Vec<LaneStats>, StoreError> {
        let meta = self.meta.lock().expect("store meta lock").clone();
        let txn = self.db()?.as_ref().expect("db() returns an open database").begin_read()?;
        let mut out = Vec::with_capacity(meta.len());
        for lane in self.lanes() {
            let m = meta[&lane];
            let t = txn.open_table(self.table(&lane)?)?;
            let g = txn.open_table(self.gap_table(&lane)?)?;
            let gap_from = g.first()?.map(|(k, _)| k.value());
            let (oldest_seq, oldest_ts) = match t.first()? {
                Some((k, v)) => {
                    let rec: Record = minicbor::decode(v.value()).map_err(|e| StoreError::Corrupt {
                        lane: lane.clone(),
                        seq: k.value(),
                        message: e.to_string(),
                    })?;
                    (k.value(), Some(rec.ingest_ts_ms))
                }
                None => (m.next_seq, None),
            };
            out.push(LaneStats {
                lane,
                next_seq: m.next_seq,
                oldest_seq: gap_from.map_or(oldest_seq, |g| g.min(oldest_seq)),
                records: m.records,
                bytes: m.bytes,
                oldest_ingest_ts_ms: oldest_ts,
            });
        }
        Ok(out)
    }

    /// Size of the database file on disk, bytes.
    pub fn file_size(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }

    /// Number of rows of a lane, counted from the table (for checks against `stats`).
    pub fn count_rows(&self, lane: &str) -> Result<u64, StoreError> {
        let txn = self.db()?.as_ref().expect("db() returns an open database").begin_read()?;
        let t = txn.open_table(self.table(lane)?)?;
        Ok(t.len()?)
    }
}

/// What `voither-gateway store check` found, without changing the file.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CheckReport {
    /// The file.
    pub path: String,
    /// Size on disk.
    pub file_bytes: u64,
    /// Per lane found in the file.
    pub lanes: Vec<CheckedLane>,
    /// Problems found (empty: healthy).
    pub problems: Vec<String>,
}

/// One lane as found by [`check`].
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CheckedLane {
    /// Lane name.
    pub lane: String,
    /// Next seq recorded.
    pub next_seq: u64,
    /// Records counted in the table.
    pub records: u64,
    /// Bytes counted in the table.
    pub bytes: u64,
    /// Evicted ranges not yet acknowledged.
    pub gaps: u64,
}

/// Reads a store file read-only and checks that every row decodes and the counters
/// match the rows. The file is not changed; a store open in a running gateway cannot be
/// checked (the error says so).
pub fn check(path: &Path) -> Result<CheckReport, StoreError> {
    let db =
        redb::ReadOnlyDatabase::open(path).map_err(|e| StoreError::Open { path: path.into(), source: Box::new(e) })?;
    let mut rep = CheckReport {
        path: path.display().to_string(),
        file_bytes: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        ..Default::default()
    };
    let txn = db.begin_read()?;
    let lanes = txn.open_table(LANES)?;
    for row in lanes.iter()? {
        let (k, v) = row?;
        let lane = k.value().to_string();
        let (next_seq, records, bytes) = v.value();
        let name = format!("lane/{lane}");
        let gname = format!("gaps/{lane}");
        let mut found = CheckedLane { lane: lane.clone(), next_seq, ..Default::default() };
        match txn.open_table(TableDefinition::<u64, &[u8]>::new(&name)) {
            Ok(t) => {
                for row in t.iter()? {
                    let (k, v) = row?;
                    found.records += 1;
                    found.bytes += v.value().len() as u64;
                    if k.value() >= next_seq {
                        rep.problems.push(format!("lane {lane}: seq {} at or beyond next_seq {next_seq}", k.value()));
                    }
                    if let Err(e) = minicbor::decode::<Record>(v.value()) {
                        rep.problems.push(format!("lane {lane}: record {} does not decode: {e}", k.value()));
                    }
                }
            }
            Err(e) => rep.problems.push(format!("lane {lane}: table missing: {e}")),
        }
        if let Ok(g) = txn.open_table(TableDefinition::<u64, (u64, u8)>::new(&gname)) {
            found.gaps = g.len()?;
        }
        if (found.records, found.bytes) != (records, bytes) {
            rep.problems.push(format!(
                "lane {lane}: counters say {records} records / {bytes} bytes, rows hold {} / {}",
                found.records, found.bytes
            ));
        }
        rep.lanes.push(found);
    }
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(lane: &str, n: u8) -> NewRecord {
        NewRecord {
            lane: lane.into(),
            ingest_ts_ms: 1000 + n as u64,
            source: "t".into(),
            content_type: None,
            payload: vec![n; 10],
        }
    }

    fn spec(name: &str, max_bytes: u64, policy: FullPolicy) -> LaneSpec {
        LaneSpec { name: name.into(), priority: 1, max_bytes, ttl_ms: None, policy }
    }

    fn lanes() -> Vec<LaneSpec> {
        vec![spec("a", 1 << 20, FullPolicy::DropOldest), spec("b", 1 << 20, FullPolicy::DropOldest)]
    }

    fn open(p: &Path, lanes: &[LaneSpec], total: u64) -> Store {
        Store::open(p, 1 << 20, lanes, total).unwrap()
    }

    /// Encoded size of `rec(_, n)` records: what budgets count.
    fn size() -> u64 {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir.path().join("s.redb"), &lanes(), u64::MAX);
        s.append_batch(&[rec("a", 1)], &[]).unwrap();
        s.stats().unwrap()[0].bytes
    }

    #[test]
    fn append_read_ack_and_seqs_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.redb");
        let sz = size();
        {
            let s = open(&p, &lanes(), u64::MAX);
            let app = s.append_batch(&[rec("a", 1), rec("b", 2), rec("a", 3)], &[(7, 99)]).unwrap();
            assert_eq!(app.seqs, vec![1, 1, 2]);
            assert!(app.evicted.is_empty());
            let (got, gaps) = s.read_from("a", 1, 10, 1 << 20).unwrap();
            assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2]);
            assert!(gaps.is_empty());
            assert_eq!(got[1].payload.as_slice(), &[3; 10]);
            assert_eq!(s.ack_through("a", 2).unwrap(), (2, 2 * sz));
            assert_eq!(s.mqtt_inflight().unwrap()[&7], 99);
        }
        let s = open(&p, &lanes(), u64::MAX);
        let st = s.stats().unwrap();
        assert_eq!(
            st[0],
            LaneStats { lane: "a".into(), next_seq: 3, oldest_seq: 3, records: 0, bytes: 0, oldest_ingest_ts_ms: None }
        );
        assert_eq!((st[1].records, st[1].bytes), (1, sz));
        assert_eq!(s.count_rows("b").unwrap(), 1);
        // Seqs are never reused, even after everything was deleted.
        assert_eq!(s.append_batch(&[rec("a", 4)], &[]).unwrap().seqs, vec![3]);
    }

    #[test]
    fn reads_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir.path().join("s.redb"), &lanes(), u64::MAX);
        let batch: Vec<_> = (0..50).map(|i| rec("a", i)).collect();
        s.append_batch(&batch, &[]).unwrap();
        assert_eq!(s.read_from("a", 1, 7, 1 << 20).unwrap().0.len(), 7);
        assert_eq!(s.read_from("a", 1, 100, 1).unwrap().0.len(), 1, "at least one item");
        assert_eq!(s.read_from("a", 45, 100, 1 << 20).unwrap().0.len(), 6);
    }

    #[test]
    fn unknown_lane_is_an_error_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir.path().join("s.redb"), &lanes(), u64::MAX);
        let err = s.append_batch(&[rec("a", 1), rec("zzz", 2)], &[]).unwrap_err();
        assert!(matches!(err, StoreError::UnknownLane(ref l) if l == "zzz"), "{err}");
        assert_eq!(s.count_rows("a").unwrap(), 0);
        assert_eq!(s.append_batch(&[rec("a", 1)], &[]).unwrap().seqs, vec![1], "no seq was consumed");
    }

    #[test]
    fn drop_oldest_evicts_records_and_reports_a_merged_gap() {
        let dir = tempfile::tempdir().unwrap();
        let sz = size();
        let s = open(&dir.path().join("s.redb"), &[spec("a", 5 * sz, FullPolicy::DropOldest)], u64::MAX);
        let first: Vec<_> = (0..7).map(|i| rec("a", i)).collect();
        let app = s.append_batch(&first, &[]).unwrap();
        assert_eq!(app.evicted.len(), 1);
        let e = &app.evicted[0];
        assert_eq!((e.from_seq, e.through_seq, e.records, e.reason), (1, 2, 2, GapReason::Capacity));
        let app = s.append_batch(&[rec("a", 9)], &[]).unwrap();
        assert_eq!((app.evicted[0].from_seq, app.evicted[0].through_seq), (3, 3));
        let st = &s.stats().unwrap()[0];
        assert_eq!((st.records, st.bytes, st.oldest_seq), (5, 5 * sz, 1), "the gap is still unacknowledged");
        // Records and the merged gap cover every seq from 1.
        let (recs, gaps) = s.read_from("a", 1, 100, 1 << 20).unwrap();
        assert_eq!(gaps, vec![Gap { from_seq: 1, through_seq: 3, reason: GapReason::Capacity }]);
        assert_eq!(recs.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![4, 5, 6, 7, 8]);
        // A read starting inside the gap gets it trimmed.
        let (_, gaps) = s.read_from("a", 2, 100, 1 << 20).unwrap();
        assert_eq!(gaps[0].from_seq, 2);
        // Acking through 2 trims the gap; through 5 removes it.
        s.ack_through("a", 2).unwrap();
        assert_eq!(s.read_from("a", 1, 100, 1 << 20).unwrap().1[0].from_seq, 3);
        s.ack_through("a", 5).unwrap();
        let (recs, gaps) = s.read_from("a", 1, 100, 1 << 20).unwrap();
        assert!(gaps.is_empty());
        assert_eq!(recs.len(), 3);
    }

    #[test]
    fn backpressure_refuses_and_writes_nothing_until_space_frees() {
        let dir = tempfile::tempdir().unwrap();
        let sz = size();
        let s = open(&dir.path().join("s.redb"), &[spec("a", 3 * sz, FullPolicy::Backpressure)], u64::MAX);
        s.append_batch(&[rec("a", 1), rec("a", 2), rec("a", 3)], &[]).unwrap();
        let err = s.append_batch(&[rec("a", 4)], &[(1, 1)]).unwrap_err();
        assert!(matches!(err, StoreError::Full { .. }), "{err}");
        assert!(s.mqtt_inflight().unwrap().is_empty(), "a refused append writes nothing");
        s.ack_through("a", 1).unwrap();
        assert_eq!(s.append_batch(&[rec("a", 4)], &[]).unwrap().seqs, vec![4], "no seq was consumed by the refusal");
    }

    #[test]
    fn store_budget_evicts_the_least_important_lane_first() {
        let dir = tempfile::tempdir().unwrap();
        let sz = size();
        let mut important = spec("alarms", 100 * sz, FullPolicy::DropOldest);
        important.priority = 0;
        let mut bulk = spec("logs", 100 * sz, FullPolicy::DropOldest);
        bulk.priority = 9;
        let s = open(&dir.path().join("s.redb"), &[important, bulk], 6 * sz);
        s.append_batch(&(0..4).map(|i| rec("logs", i)).collect::<Vec<_>>(), &[]).unwrap();
        let app = s.append_batch(&(0..4).map(|i| rec("alarms", i)).collect::<Vec<_>>(), &[]).unwrap();
        assert_eq!(app.evicted.len(), 1);
        assert_eq!((app.evicted[0].lane.as_str(), app.evicted[0].records), ("logs", 2));
        let total: u64 = s.stats().unwrap().iter().map(|l| l.bytes).sum();
        assert!(total <= 6 * sz);
    }

    #[test]
    fn ttl_expiry_evicts_from_the_front() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = spec("a", 1 << 20, FullPolicy::DropOldest);
        l.ttl_ms = Some(100);
        let s = open(&dir.path().join("s.redb"), &[l], u64::MAX);
        // ingest times 1000..1004
        s.append_batch(&(0..5).map(|i| rec("a", i)).collect::<Vec<_>>(), &[]).unwrap();
        assert!(s.expire(1050).unwrap().is_empty());
        let ev = s.expire(1103).unwrap();
        assert_eq!((ev[0].from_seq, ev[0].through_seq, ev[0].reason), (1, 3, GapReason::Ttl));
        assert_eq!(s.stats().unwrap()[0].records, 2);
    }

    #[test]
    fn compaction_gives_space_back_after_a_drain() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(&dir.path().join("s.redb"), &[spec("a", 64 << 20, FullPolicy::DropOldest)], u64::MAX);
        let big = NewRecord { payload: vec![1; 4096], ..rec("a", 0) };
        for _ in 0..20 {
            s.append_batch(&vec![big.clone(); 100], &[]).unwrap();
        }
        assert_eq!(s.compact_if_idle().unwrap(), None, "not idle while records are held");
        s.ack_through("a", u64::MAX).unwrap();
        let (before, after) = s.compact_if_idle().unwrap().expect("idle");
        assert!(before > 8 << 20, "the file held 8 MiB of records: {before}");
        assert!(after * 4 < before, "compaction shrank the file: {before} -> {after}");
        println!("store file after draining 2000 records of 4 KiB: {before} bytes, compacted: {after} bytes");
    }

    #[test]
    fn corrupt_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.redb");
        std::fs::write(&p, vec![0x5a; 8192]).unwrap();
        let err = Store::open(&p, 1 << 20, &lanes(), u64::MAX).unwrap_err();
        assert!(err.is_corrupt(), "{err}");
        assert!(err.to_string().contains("s.redb"), "{err}");
        assert_eq!(std::fs::read(&p).unwrap(), vec![0x5a; 8192], "the corrupt file is left as it was for inspection");
    }

    #[test]
    fn truncated_file_is_detected_at_open_and_by_check() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.redb");
        {
            let s = open(&p, &lanes(), u64::MAX);
            let big = NewRecord { payload: vec![9; 2048], ..rec("a", 0) };
            for _ in 0..10 {
                s.append_batch(&vec![big.clone(); 50], &[]).unwrap();
            }
        }
        let len = std::fs::metadata(&p).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(len / 3).unwrap();
        drop(f);
        let copy = std::fs::read(&p).unwrap();
        // The read-only check never takes it for a healthy store.
        let check = check(&p);
        let healthy = matches!(&check, Ok(r) if r.problems.is_empty() && r.lanes.iter().any(|l| l.records == 500));
        assert!(!healthy, "a store cut to a third cannot still hold all 500 records: {check:?}");
        assert_eq!(std::fs::read(&p).unwrap(), copy, "check changes nothing");
        let err = Store::open(&p, 1 << 20, &lanes(), u64::MAX).expect_err("a truncated store is refused at open");
        assert!(err.is_corrupt(), "and classed as corrupt, so it is moved aside: {err}");
    }

    #[test]
    fn message_hash_tells_topic_from_payload() {
        assert_ne!(message_hash("a", b"bc"), message_hash("ab", b"c"));
        assert_eq!(message_hash("t", b"x"), message_hash("t", b"x"));
    }
}
