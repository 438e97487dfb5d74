//! The durable local store: records per lane, on disk, until a hub acknowledges them.
//!
//! # On-disk layout
//!
//! A folder, `<gateway.data_dir>/store`, of segment files `<id, 16 hex digits>.seg`.
//! The store appends to the newest segment and starts a new one after about
//! `store.segment_bytes`. A segment is a 16-byte header (`VOITHLOG`, format version)
//! and a run of entries `[u32 body length][u32 CRC-32C of the body][body]`:
//!
//! | entry | body |
//! |---|---|
//! | snapshot (first in every segment) | per lane: `next_seq`, the front (every seq at or below it is gone), the highest ack, the gaps; the MQTT redelivery hashes |
//! | commit (one per append) | per lane: first seq and the records (`u32` length, ingest time, the [`Record`] in CBOR); the ranges the append evicted; MQTT `(packet id, hash)` pairs |
//! | ack | lane, acknowledged through |
//! | evict (TTL expiry) | lane, evicted range, reason |
//!
//! A `lock` file in the folder is locked while a gateway has the store open.
//!
//! Memory holds, per lane, the counters, the gaps and one [`log::Chunk`] per segment
//! the lane has records in (not one entry per record). A segment is deleted once no
//! lane holds a record in it, after an fdatasync that makes the acks that emptied it
//! durable. Opening replays the segments from the oldest one's snapshot.
//!
//! `record bytes` (what budgets count) are the encoded size of each record.
//!
//! # Invariants
//!
//! 1. **Durable before ack.** [`Store::append_batch`] writes a whole batch as one
//!    entry and returns only after its `fdatasync`; the ingest path acknowledges MQTT
//!    messages only after it returns. An entry is whole or, torn by a crash, fails its
//!    CRC: opening cuts a torn entry off the end of the newest segment (nothing after
//!    it was acknowledged). Damage anywhere else is an error naming the file and offset.
//! 2. **Seqs are never reused.** Seqs come from `next_seq`, which every snapshot
//!    carries and every commit advances, also when records are deleted.
//! 3. **Delete only on hub ack.** Records leave only through [`Store::ack_through`],
//!    which the uplink calls when a hub acknowledged them durable. Acks are not fsynced
//!    one by one: every [`ACKS_PER_DURABLE_COMMIT`]-th ack, an ack that empties its
//!    lane, a segment deletion and every append make them durable. A crash can
//!    therefore bring back records the hub already has; the uplink resends them and
//!    the hub skips them by its high-water mark. It never loses one.
//! 4. **Counters match contents.** Record and byte counters are rebuilt from the
//!    entries at open, and change only with the entries that change what is held.
//! 5. **Redelivery is recognised.** Each append also records, per MQTT packet id, a
//!    hash of what was stored under it. A message the broker redelivers (DUP set) after
//!    a crash between commit and PUBACK matches its entry and is acknowledged without
//!    being stored twice.
//! 6. **Bounded memory.** Reads are bounded by count and bytes (a read returns at least
//!    one item when there is one); nothing is cached but the OS page cache.
//! 7. **Bounded disk, loss never silent.** After an append, a `drop_oldest` lane over its
//!    byte budget (or the store over its total budget) loses its oldest records in the
//!    same entry, which records the evicted range as a gap (merged with an adjacent
//!    range of the same reason). A `backpressure` lane is never evicted: an append that
//!    would take it over budget fails with [`StoreError::Full`] and writes nothing. TTL
//!    expiry ([`Store::expire`]) evicts from the front the same way.
//! 8. **No hole.** Seqs held, plus the recorded gaps, cover every seq from the oldest
//!    unacknowledged one to `next_seq - 1`; [`Store::read_from`] returns both, so the
//!    uplink can always tell the hub what happened to each seq.
//!
//! A store of an earlier version (one redb file, `store.redb`) is moved into this
//! layout at start by [`migrate_redb`].

mod legacy;
mod log;

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use voither_proto::{Gap, GapReason, Record, RecordRef, Records};

pub use legacy::{check_redb, migrate_redb, Migrated};
use log::{
    apply_evictions, create_segment, disk, put_evictions, put_mqtt, put_name, seal, seg_path, trim_front, walk_front,
    EvictRange, Lane, ReadMark, Scanner, ENTRY_HEAD, KIND_ACK, KIND_COMMIT, KIND_EVICT,
};

/// Acks whose deletes may wait for a later fsync (see invariant 3).
pub const ACKS_PER_DURABLE_COMMIT: u64 = 32;

/// Default size at which the store starts a new segment.
pub const DEFAULT_SEGMENT_BYTES: u64 = 8 << 20;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store folder could not be opened (locked by another process, unreadable).
    #[error("cannot open store {path}: {message}")]
    Open {
        /// The folder.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A segment file is damaged somewhere other than a torn end.
    #[error("cannot open store: segment {path} is damaged at offset {offset}: {what}")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// Byte offset of the bad entry.
        offset: u64,
        /// What is wrong.
        what: String,
    },
    /// A failure that is not the disk's.
    #[error("store failure: {0}")]
    Io(String),
    /// The file system failed (disk full, I/O error); nothing was committed, and the
    /// caller retries later.
    #[error("store disk error: {0}")]
    Disk(String),
    /// A failed write could not be undone yet; the store refuses writes until it can.
    #[error("store unavailable after a disk error: {0}")]
    Unavailable(String),
    /// A stored record could not be decoded.
    #[error("corrupt record in lane {lane} at seq {seq}: {message}")]
    Corrupt {
        /// Lane.
        lane: String,
        /// Seq of the record.
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
    /// True when the error means the store is not usable as it is (damaged, or not a
    /// store at all), as opposed to locked, unreadable or a transient failure.
    pub fn is_corrupt(&self) -> bool {
        matches!(self, StoreError::Damaged { .. } | StoreError::Corrupt { .. })
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
    /// Lane name (at most 255 bytes).
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
    /// Record bytes held.
    pub bytes: u64,
    /// Ingest time of the oldest record held, ms since the epoch.
    pub oldest_ingest_ts_ms: Option<u64>,
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

#[derive(Debug)]
struct Inner {
    active: File,
    active_id: u64,
    active_len: u64,
    /// Segments on disk, oldest first, with their lengths (the active one's is
    /// `active_len`).
    segments: Vec<(u64, u64)>,
    lanes: BTreeMap<String, Lane>,
    mqtt: HashMap<u16, u64>,
    /// Acks written without fsync since the last fsync.
    lazy_acks: u64,
    buf: Vec<u8>,
    /// A write failed and could not be cut back: the length the active segment must
    /// be cut to before the next write.
    broken: Option<String>,
    /// Why the store is degraded (a disk error not yet recovered from).
    degraded: Option<String>,
    /// A rotation failed (disk full): retried after the next append.
    rotate_failed: bool,
}

/// The store. Calls block on disk I/O: call them from a blocking thread.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    segment_bytes: u64,
    specs: BTreeMap<String, LaneSpec>,
    max_total_bytes: u64,
    inner: Mutex<Inner>,
    /// Holds the folder's lock while the store is open.
    _lock: Option<File>,
}

/// What opening the store found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Segments replayed.
    pub segments: usize,
    /// Bytes cut from the newest segment (a write torn by a crash).
    pub truncated_bytes: u64,
}

/// Locks the folder: exclusively to open the store, shared to check it. A folder
/// without a lock file (never opened by a gateway) needs no shared lock.
fn lock_folder(dir: &Path, shared: bool) -> Result<Option<File>, StoreError> {
    let path = dir.join("lock");
    let f = match OpenOptions::new().create(!shared).truncate(false).write(!shared).read(true).open(&path) {
        Ok(f) => f,
        Err(e) if shared && e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::Open { path: dir.into(), message: format!("{}: {e}", path.display()) }),
    };
    let r = if shared { f.try_lock_shared() } else { f.try_lock() };
    match r {
        Ok(()) => Ok(Some(f)),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Open {
            path: dir.into(),
            message: "it is open in another process (a running gateway); stop that first".into(),
        }),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(StoreError::Open { path: dir.into(), message: format!("cannot lock {}: {e}", path.display()) })
        }
    }
}

impl Store {
    /// Opens (or creates) the store in folder `dir` for `lanes`, holding at most
    /// `max_total_bytes` over all lanes and starting a new segment after about
    /// `segment_bytes`.
    pub fn open(dir: &Path, segment_bytes: u64, lanes: &[LaneSpec], max_total_bytes: u64) -> Result<Self, StoreError> {
        Self::open_with_recovery(dir, segment_bytes, lanes, max_total_bytes).map(|(s, _)| s)
    }

    /// [`Store::open`], also saying what opening repaired.
    pub fn open_with_recovery(
        dir: &Path,
        segment_bytes: u64,
        lanes: &[LaneSpec],
        max_total_bytes: u64,
    ) -> Result<(Self, Recovery), StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Open { path: dir.into(), message: e.to_string() })?;
        if let Some(l) = lanes.iter().find(|l| l.name.is_empty() || l.name.len() > 255) {
            return Err(StoreError::UnknownLane(l.name.clone()));
        }
        let lock = lock_folder(dir, false)?;
        let names: Vec<String> = lanes.iter().map(|l| l.name.clone()).collect();
        let mut r = log::replay(dir, &names, true)?;
        let rec = Recovery { segments: r.segments.len(), truncated_bytes: r.torn_bytes };
        if rec.truncated_bytes > 0 {
            tracing::warn!(store = %dir.display(), bytes = rec.truncated_bytes,
                "Store opened after a crash: cut an unacknowledged torn write.");
        }
        let (active, active_id, active_len) = match r.segments.last() {
            Some(&(id, len)) => {
                let path = seg_path(dir, id);
                let f = OpenOptions::new().append(true).open(&path).map_err(|e| disk(&path, &e))?;
                (f, id, len)
            }
            None => {
                let (f, len) = create_segment(dir, 1, &r.lanes, &r.mqtt)?;
                r.segments.push((1, len));
                (f, 1, len)
            }
        };
        let store = Store {
            dir: dir.into(),
            segment_bytes,
            specs: lanes.iter().map(|l| (l.name.clone(), l.clone())).collect(),
            max_total_bytes,
            inner: Mutex::new(Inner {
                active,
                active_id,
                active_len,
                segments: r.segments,
                lanes: r.lanes,
                mqtt: r.mqtt,
                lazy_acks: 0,
                buf: Vec::new(),
                broken: None,
                degraded: None,
                rotate_failed: false,
            }),
            _lock: lock,
        };
        Ok((store, rec))
    }

    /// The store folder.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Lanes the store was opened with.
    pub fn lanes(&self) -> Vec<String> {
        self.specs.keys().cloned().collect()
    }

    /// Segment files on disk.
    pub fn segments(&self) -> usize {
        self.inner.lock().expect("store lock").segments.len()
    }

    /// Why the store cannot write, while a disk error is not recovered from.
    pub fn degraded(&self) -> Option<String> {
        self.inner.lock().expect("store lock").degraded.clone()
    }

    /// Records the outcome of a write: a disk error degrades the store until a later
    /// write succeeds.
    fn outcome<T>(&self, g: &mut Inner, r: Result<T, StoreError>) -> Result<T, StoreError> {
        match &r {
            Ok(_) => {
                if g.degraded.take().is_some() {
                    tracing::info!(store = %self.dir.display(), "Store writes again.");
                }
            }
            Err(StoreError::Disk(m)) | Err(StoreError::Unavailable(m)) => g.degraded = Some(m.clone()),
            Err(_) => {}
        }
        r
    }

    /// Cuts the active segment back after a failed write that could not be undone
    /// then; fails while that is still impossible.
    fn repair(&self, g: &mut Inner) -> Result<(), StoreError> {
        if g.broken.is_some() {
            let r = g.active.set_len(g.active_len).and_then(|()| g.active.sync_data());
            match r {
                Ok(()) => g.broken = None,
                Err(e) => {
                    let path = seg_path(&self.dir, g.active_id);
                    return Err(StoreError::Unavailable(format!("{}: {e}", path.display())));
                }
            }
        }
        Ok(())
    }

    /// Writes one entry (`buf` starts with [`ENTRY_HEAD`] bytes of room for its head)
    /// at the end of the active segment; on failure the segment is cut back to where
    /// it was.
    fn write_entry(&self, g: &mut Inner, buf: &mut [u8], sync: bool) -> Result<(), StoreError> {
        seal(buf);
        let r = g.active.write_all(buf).and_then(|()| if sync { g.active.sync_data() } else { Ok(()) });
        match r {
            Ok(()) => {
                g.active_len += buf.len() as u64;
                if let Some(s) = g.segments.last_mut() {
                    s.1 = g.active_len;
                }
                Ok(())
            }
            Err(e) => {
                let path = seg_path(&self.dir, g.active_id);
                // Nothing after a torn entry could be read back: cut it off now, or
                // before the next write.
                if let Err(e2) = g.active.set_len(g.active_len).and_then(|()| g.active.sync_data()) {
                    g.broken = Some(format!("{}: {e2}", path.display()));
                }
                Err(disk(&path, &e))
            }
        }
    }

    /// Starts segment `id` with a snapshot of the current state, then deletes the
    /// segments no lane needs any more.
    fn start_segment(&self, g: &mut Inner, id: u64) -> Result<(), StoreError> {
        // The acks in the current segment are durable before any segment is deleted.
        let path = seg_path(&self.dir, g.active_id);
        g.active.sync_data().map_err(|e| disk(&path, &e))?;
        g.lazy_acks = 0;
        let (f, len) = create_segment(&self.dir, id, &g.lanes, &g.mqtt)?;
        g.active = f;
        g.active_id = id;
        g.active_len = len;
        g.segments.push((id, len));
        self.delete_dead(g);
        Ok(())
    }

    /// Deletes the segments before the oldest one any lane holds a record in (never
    /// the active one). The acks that emptied them must be durable.
    fn delete_dead(&self, g: &mut Inner) {
        let live = g.lanes.values().filter_map(|l| l.chunks.front().map(|c| c.seg)).min().unwrap_or(u64::MAX);
        let keep_from = live.min(g.active_id);
        while g.segments.first().is_some_and(|(s, _)| *s < keep_from) {
            let (id, _) = g.segments.remove(0);
            let path = seg_path(&self.dir, id);
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(segment = %path.display(), error = %e, "Could not delete an emptied store segment.");
            }
        }
    }

    /// Appends `records` in one durable entry and returns the seq each got, in order,
    /// and what was evicted to make room (invariant 7).
    ///
    /// `mqtt` lists `(packet id, message hash)` of the MQTT messages in the batch, kept
    /// for redelivery checks (invariant 5).
    pub fn append_batch(&self, records: &[NewRecord], mqtt: &[(u16, u64)]) -> Result<Appended, StoreError> {
        let mut g = self.inner.lock().expect("store lock");
        let r = self.repair(&mut g).and_then(|()| self.append_locked(&mut g, records, mqtt));
        self.outcome(&mut g, r)
    }

    fn append_locked(&self, g: &mut Inner, records: &[NewRecord], mqtt: &[(u16, u64)]) -> Result<Appended, StoreError> {
        let mut by_lane: Vec<(&str, Vec<usize>)> = Vec::new();
        for (i, r) in records.iter().enumerate() {
            match by_lane.iter_mut().find(|(l, _)| *l == r.lane) {
                Some((_, v)) => v.push(i),
                None if self.specs.contains_key(&r.lane) => by_lane.push((r.lane.as_str(), vec![i])),
                None => return Err(StoreError::UnknownLane(r.lane.clone())),
            }
        }
        let mut seqs = vec![0; records.len()];
        let mut body = std::mem::take(&mut g.buf);
        body.clear();
        body.extend_from_slice(&[0; ENTRY_HEAD]);
        body.push(KIND_COMMIT);
        body.extend_from_slice(&(by_lane.len() as u16).to_le_bytes());
        // Per lane: (seq, encoded size) of the new records, for the budgets.
        let mut added: BTreeMap<&str, Vec<(u64, u64)>> = BTreeMap::new();
        for (lane, idx) in &by_lane {
            let l = &g.lanes[*lane];
            put_name(&mut body, lane);
            body.extend_from_slice(&l.next_seq.to_le_bytes());
            body.extend_from_slice(&(idx.len() as u32).to_le_bytes());
            let new = added.entry(lane).or_default();
            for (k, i) in idx.iter().enumerate() {
                let r = &records[*i];
                let seq = l.next_seq + k as u64;
                let rec = RecordRef {
                    seq,
                    ingest_ts_ms: r.ingest_ts_ms,
                    source: &r.source,
                    content_type: r.content_type.as_deref(),
                    payload: &r.payload,
                };
                // The record's CBOR goes straight into the entry; its length, written
                // before it, is filled in after.
                let len_at = body.len();
                body.extend_from_slice(&[0; 4]);
                body.extend_from_slice(&r.ingest_ts_ms.to_le_bytes());
                let cbor_at = body.len();
                minicbor::encode(rec, &mut body).expect("encoding into a Vec is infallible");
                let len = body.len() - cbor_at;
                body[len_at..len_at + 4].copy_from_slice(&(len as u32).to_le_bytes());
                new.push((seq, len as u64));
                seqs[*i] = seq;
            }
            let spec = &self.specs[*lane];
            let new_bytes: u64 = new.iter().map(|(_, b)| b).sum();
            if spec.policy == FullPolicy::Backpressure && l.bytes + new_bytes > spec.max_bytes {
                let held = l.bytes;
                g.buf = body;
                return Err(StoreError::Full { lane: (*lane).into(), held, budget: spec.max_bytes });
            }
        }
        let evictions = match self.plan_evictions(g, &added) {
            Ok(ev) => ev,
            Err(e) => {
                g.buf = body;
                return Err(e);
            }
        };
        put_evictions(&mut body, &evictions);
        put_mqtt(&mut body, mqtt.len(), mqtt.iter().map(|(p, h)| (p, h)));
        if body.len() - ENTRY_HEAD > log::MAX_BODY as usize {
            // Never write what could not be read back (the configuration keeps a batch
            // well under this).
            let size = body.len();
            g.buf = body;
            return Err(StoreError::Io(format!(
                "a batch of {} records takes {size} bytes, over the store's {} MiB entry limit; lower mqtt.batch_max_messages",
                records.len(),
                log::MAX_BODY >> 20
            )));
        }
        let at = g.active_len;
        let written = self.write_entry(g, &mut body, true);
        g.buf = body;
        written?;
        let id = g.active_id;
        for (lane, new) in &added {
            let l = g.lanes.get_mut(*lane).expect("configured lane");
            l.push(id, at, new[0].0, new.iter().map(|(_, b)| *b));
        }
        g.mqtt.extend(mqtt.iter().copied());
        // The entry is durable: the append succeeded even if dropping the evicted
        // records from memory fails (the front has moved; a later trim finishes it).
        let evicted = self.apply(g, &evictions).unwrap_or_else(|e| {
            tracing::error!(error = %e, "Could not drop evicted records from the store's index.");
            Vec::new()
        });
        if g.active_len >= self.segment_bytes || g.rotate_failed {
            let next = g.active_id + 1;
            // The append is durable already: a failed rotation (disk full) only
            // postpones the new segment.
            match self.start_segment(g, next) {
                Ok(()) => g.rotate_failed = false,
                Err(e) => {
                    g.rotate_failed = true;
                    tracing::warn!(error = %e, "Could not start a new store segment; retrying after the next append.");
                }
            }
        }
        Ok(Appended { seqs, evicted })
    }

    /// Applies evictions that are durable in the log: gaps, and the records dropped.
    fn apply(&self, g: &mut Inner, evictions: &[EvictRange]) -> Result<Vec<Eviction>, StoreError> {
        apply_evictions(&mut g.lanes, evictions);
        let mut out = Vec::with_capacity(evictions.len());
        for e in evictions {
            let l = g.lanes.get_mut(&e.lane).expect("evicted lane exists");
            let (records, bytes) = trim_front(&self.dir, l, &e.lane, e.through_seq)?;
            out.push(Eviction {
                lane: e.lane.clone(),
                from_seq: e.from_seq,
                through_seq: e.through_seq,
                records,
                bytes,
                reason: e.reason,
            });
        }
        if !out.is_empty() {
            self.delete_dead(g);
        }
        Ok(out)
    }

    /// The evictions that make room for `added`: each `drop_oldest` lane over its
    /// budget first, then the least important lanes while the store is over its total.
    fn plan_evictions(
        &self,
        g: &Inner,
        added: &BTreeMap<&str, Vec<(u64, u64)>>,
    ) -> Result<Vec<EvictRange>, StoreError> {
        // Per lane: bytes held after this append, and the last seq planned for eviction.
        let mut held: BTreeMap<&str, (u64, u64)> = g
            .lanes
            .iter()
            .map(|(n, l)| {
                let new: u64 = added.get(n.as_str()).map_or(0, |v| v.iter().map(|(_, b)| b).sum());
                (n.as_str(), (l.bytes + new, l.front))
            })
            .collect();
        let plan = |lane: &str, held: &mut BTreeMap<&str, (u64, u64)>, fits: &dyn Fn(u64) -> bool| {
            let l = &g.lanes[lane];
            let (mut bytes, mut through) = held[lane];
            if fits(bytes) {
                // The common case: nothing to read from disk.
                return Ok(());
            }
            let mut walk = |seq: u64, size: u64| {
                if fits(bytes) {
                    return false;
                }
                if seq > through {
                    bytes -= size;
                    through = seq;
                }
                true
            };
            let mut more = true;
            walk_front(&self.dir, lane, l, |seq, size, _| {
                more = walk(seq, size);
                more
            })?;
            if more {
                for &(seq, size) in added.get(lane).map_or(&[][..], |v| v.as_slice()) {
                    if !walk(seq, size) {
                        break;
                    }
                }
            }
            *held.get_mut(lane).expect("every lane is in held") = (bytes, through);
            Ok::<(), StoreError>(())
        };
        for lane in added.keys() {
            let spec = &self.specs[*lane];
            if spec.policy == FullPolicy::DropOldest {
                let budget = spec.max_bytes;
                plan(lane, &mut held, &|b| b <= budget)?;
            }
        }
        let total = |held: &BTreeMap<&str, (u64, u64)>| held.values().map(|(b, _)| b).sum::<u64>();
        if total(&held) > self.max_total_bytes {
            // Lanes no longer configured go first (their records would never be sent
            // until the lane comes back), then drop_oldest lanes, least important first.
            let mut specs: Vec<&LaneSpec> =
                self.specs.values().filter(|s| s.policy == FullPolicy::DropOldest).collect();
            specs.sort_by_key(|s| std::cmp::Reverse(s.priority));
            let order: Vec<&str> = g
                .lanes
                .keys()
                .map(String::as_str)
                .filter(|n| !self.specs.contains_key(*n))
                .chain(specs.iter().map(|s| s.name.as_str()))
                .collect();
            for lane in order {
                let t = total(&held);
                if t <= self.max_total_bytes {
                    break;
                }
                let other = t - held[lane].0;
                let max = self.max_total_bytes;
                plan(lane, &mut held, &|b| other + b <= max)?;
            }
            let t = total(&held);
            if t > self.max_total_bytes {
                let lane = added.keys().next().copied().unwrap_or_default();
                return Err(StoreError::Full { lane: lane.into(), held: t, budget: self.max_total_bytes });
            }
        }
        Ok(held
            .into_iter()
            .filter_map(|(lane, (_, through))| {
                let front = g.lanes[lane].front;
                (through > front).then(|| EvictRange {
                    lane: lane.to_string(),
                    from_seq: front + 1,
                    through_seq: through,
                    reason: GapReason::Capacity,
                })
            })
            .collect())
    }

    /// Evicts records older than their lane's TTL (`now_ms` is the wall clock).
    pub fn expire(&self, now_ms: u64) -> Result<Vec<Eviction>, StoreError> {
        let mut g = self.inner.lock().expect("store lock");
        let r = self.repair(&mut g).and_then(|()| self.expire_locked(&mut g, now_ms));
        self.outcome(&mut g, r)
    }

    fn expire_locked(&self, g: &mut Inner, now_ms: u64) -> Result<Vec<Eviction>, StoreError> {
        let mut ranges = Vec::new();
        for spec in self.specs.values() {
            let Some(ttl) = spec.ttl_ms else { continue };
            let cutoff = now_ms.saturating_sub(ttl);
            let l = &g.lanes[&spec.name];
            let mut through = l.front;
            walk_front(&self.dir, &spec.name, l, |seq, _, ts| {
                if ts >= cutoff {
                    return false;
                }
                through = seq;
                true
            })?;
            if through > l.front {
                ranges.push(EvictRange {
                    lane: spec.name.clone(),
                    from_seq: l.front + 1,
                    through_seq: through,
                    reason: GapReason::Ttl,
                });
            }
        }
        if ranges.is_empty() {
            return Ok(Vec::new());
        }
        let mut body = Vec::with_capacity(64);
        body.extend_from_slice(&[0; ENTRY_HEAD]);
        body.push(KIND_EVICT);
        put_evictions(&mut body, &ranges);
        self.write_entry(g, &mut body, true)?;
        self.apply(g, &ranges)
    }

    /// The MQTT packet ids and message hashes of the latest appends (invariant 5).
    pub fn mqtt_inflight(&self) -> Result<HashMap<u16, u64>, StoreError> {
        Ok(self.inner.lock().expect("store lock").mqtt.clone())
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
    ) -> Result<(Records, Vec<Gap>), StoreError> {
        let mut g = self.inner.lock().expect("store lock");
        let l = g.lanes.get_mut(lane).filter(|_| self.specs.contains_key(lane));
        let l = l.ok_or_else(|| StoreError::UnknownLane(lane.into()))?;
        // Every gap lies before every record held (both are cut from the front).
        let mut gaps: Vec<Gap> = l
            .gaps
            .iter()
            .filter(|(_, (through, _))| *through >= from_seq)
            .map(|(from, (through, reason))| Gap {
                from_seq: (*from).max(from_seq),
                through_seq: *through,
                reason: *reason,
            })
            .collect();
        gaps.truncate(max_records);
        let mut out = Records::default();
        let mut bytes = 0usize;
        let mut want = from_seq.max(l.front + 1);
        let start = l.chunks.partition_point(|c| c.last_seq < want);
        let mut marks = Vec::new();
        'chunks: for c in l.chunks.iter().skip(start) {
            if out.len() + gaps.len() >= max_records {
                break;
            }
            // Where the last read of this chunk stopped, if this read goes on from there.
            let offset = match l.read_marks.back() {
                Some(m) if m.seg == c.seg && m.through + 1 == want && want > c.first_seq => m.resume_at,
                _ => c.offset,
            };
            let path = seg_path(&self.dir, c.seg);
            let mut sc = Scanner::open(&path, offset).map_err(|e| disk(&path, &e))?;
            let mut mark = ReadMark { seg: c.seg, first: 0, through: 0, records: 0, bytes: 0, resume_at: 0 };
            while want <= c.last_seq {
                if out.len() + gaps.len() >= max_records || (bytes >= max_bytes && !out.is_empty()) {
                    // Full: stop before reading (and checking) the next entry, which the
                    // next read would read again.
                    marks.push(ReadMark { resume_at: sc.offset, ..mark });
                    break 'chunks;
                }
                let (at, commit) = sc.next_commit(&path)?;
                for gr in commit.groups.iter().filter(|gr| gr.lane == lane) {
                    for (i, (_, raw)) in gr.records.iter().enumerate() {
                        let s = gr.first_seq + i as u64;
                        if s < want {
                            continue;
                        }
                        if out.len() + gaps.len() >= max_records || (bytes >= max_bytes && !out.is_empty()) {
                            marks.push(ReadMark { resume_at: at, ..mark });
                            break 'chunks;
                        }
                        // The bytes go to the hub as they are: check that they are the
                        // record of this seq.
                        let corrupt = |message| StoreError::Corrupt { lane: lane.into(), seq: s, message };
                        let got = out.push_raw(raw).map_err(|e| corrupt(e.to_string()))?;
                        if got != s {
                            return Err(corrupt(format!("the entry holds seq {got}")));
                        }
                        bytes += raw.len();
                        want = s + 1;
                        if mark.records == 0 {
                            mark.first = s;
                        }
                        mark.through = s;
                        mark.records += 1;
                        mark.bytes += raw.len() as u64;
                    }
                }
            }
            // The chunk is read to its end: what is appended to it comes after here.
            marks.push(ReadMark { resume_at: sc.offset, ..mark });
        }
        for m in marks {
            l.mark_read(m);
        }
        Ok((out, gaps))
    }

    /// Next seq of each lane (one past the newest record), from memory.
    pub fn next_seqs(&self) -> Vec<(String, u64)> {
        let g = self.inner.lock().expect("store lock");
        self.specs.keys().map(|l| (l.clone(), g.lanes[l].next_seq)).collect()
    }

    /// Deletes the records (and gaps) of `lane` through `seq`: a hub holds them.
    /// Returns how many records and bytes were deleted.
    pub fn ack_through(&self, lane: &str, seq: u64) -> Result<(u64, u64), StoreError> {
        let mut g = self.inner.lock().expect("store lock");
        let r = self.repair(&mut g).and_then(|()| self.ack_locked(&mut g, lane, seq));
        self.outcome(&mut g, r)
    }

    fn ack_locked(&self, g: &mut Inner, lane: &str, seq: u64) -> Result<(u64, u64), StoreError> {
        let l = g.lanes.get(lane).filter(|_| self.specs.contains_key(lane));
        let l = l.ok_or_else(|| StoreError::UnknownLane(lane.into()))?;
        let seq = seq.min(l.next_seq.saturating_sub(1));
        if seq <= l.acked {
            return Ok((0, 0));
        }
        let front_seg = l.chunks.front().map(|c| c.seg);
        let empties = l.chunks.back().is_none_or(|c| c.last_seq <= seq);
        let mut body = Vec::with_capacity(32);
        body.extend_from_slice(&[0; ENTRY_HEAD]);
        body.push(KIND_ACK);
        put_name(&mut body, lane);
        body.extend_from_slice(&seq.to_le_bytes());
        // The hub has these records durably; losing the delete costs a resend, not a
        // record. Fsync now and then, and when the lane is empty (end of a drain).
        let durable = g.lazy_acks + 1 >= ACKS_PER_DURABLE_COMMIT || empties;
        self.write_entry(g, &mut body, durable)?;
        g.lazy_acks = if durable { 0 } else { g.lazy_acks + 1 };
        let l = g.lanes.get_mut(lane).expect("checked above");
        l.ack_gaps(seq);
        let r = trim_front(&self.dir, l, lane, seq)?;
        if l.chunks.front().map(|c| c.seg) != front_seg {
            if !durable {
                let path = seg_path(&self.dir, g.active_id);
                g.active.sync_data().map_err(|e| disk(&path, &e))?;
                g.lazy_acks = 0;
            }
            self.delete_dead(g);
        }
        Ok(r)
    }

    /// Gives disk space back when the store is idle (nothing held): starts a fresh
    /// segment, so the emptied one is deleted. Returns the bytes on disk before and
    /// after, or `None` when not idle.
    pub fn compact_if_idle(&self) -> Result<Option<(u64, u64)>, StoreError> {
        let mut g = self.inner.lock().expect("store lock");
        if g.lanes.values().any(|l| l.records > 0) {
            return Ok(None);
        }
        let before = disk_bytes(&g);
        if g.segments.len() > 1 || g.active_len > 64 << 10 {
            let next = g.active_id + 1;
            let r = self.repair(&mut g).and_then(|()| self.start_segment(&mut g, next));
            self.outcome(&mut g, r)?;
        }
        Ok(Some((before, disk_bytes(&g))))
    }

    /// What each configured lane holds.
    pub fn stats(&self) -> Result<Vec<LaneStats>, StoreError> {
        let g = self.inner.lock().expect("store lock");
        let mut out = Vec::with_capacity(self.specs.len());
        for name in self.specs.keys() {
            let l = &g.lanes[name];
            let mut oldest_ts = None;
            if l.records > 0 {
                walk_front(&self.dir, name, l, |_, _, ts| {
                    oldest_ts = Some(ts);
                    false
                })?;
            }
            let oldest_record = l.chunks.front().map_or(l.next_seq, |c| c.first_seq);
            out.push(LaneStats {
                lane: name.clone(),
                next_seq: l.next_seq,
                oldest_seq: l.gaps.keys().next().map_or(oldest_record, |g| (*g).min(oldest_record)),
                records: l.records,
                bytes: l.bytes,
                oldest_ingest_ts_ms: oldest_ts,
            });
        }
        Ok(out)
    }

    /// Bytes of the store's segment files.
    pub fn file_size(&self) -> u64 {
        disk_bytes(&self.inner.lock().expect("store lock"))
    }

    /// Number of records of a lane, counted from the segments (for checks against
    /// `stats`).
    pub fn count_rows(&self, lane: &str) -> Result<u64, StoreError> {
        let g = self.inner.lock().expect("store lock");
        let l = g.lanes.get(lane).ok_or_else(|| StoreError::UnknownLane(lane.into()))?;
        let mut n = 0;
        walk_front(&self.dir, lane, l, |_, _, _| {
            n += 1;
            true
        })?;
        Ok(n)
    }
}

fn disk_bytes(g: &Inner) -> u64 {
    g.segments.iter().map(|(_, len)| len).sum()
}

/// What `voither-gateway store check` found, without changing anything.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CheckReport {
    /// The store folder (or, for a store of an earlier version, its file).
    pub path: String,
    /// Size on disk.
    pub file_bytes: u64,
    /// Segment files.
    pub segments: usize,
    /// Bytes at the end of the newest segment that a crash left half-written; the next
    /// start cuts them off (nothing in them was acknowledged).
    pub torn_tail_bytes: u64,
    /// Per lane found.
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
    /// Records counted.
    pub records: u64,
    /// Bytes counted.
    pub bytes: u64,
    /// Evicted ranges not yet acknowledged.
    pub gaps: u64,
}

/// Reads a store read-only: every entry's checksum, every record held decodes, seqs
/// run without a hole. A store open in a running gateway cannot be checked (the error
/// says so). A file (a store of an earlier version) is checked by [`check_redb`].
pub fn check(path: &Path) -> Result<CheckReport, StoreError> {
    if path.is_file() {
        return check_redb(path);
    }
    let _lock = lock_folder(path, true)?;
    let r = log::replay(path, &[], false)?;
    let mut rep = CheckReport {
        path: path.display().to_string(),
        file_bytes: r.segments.iter().map(|(_, l)| l).sum::<u64>() + r.torn_bytes,
        segments: r.segments.len(),
        torn_tail_bytes: r.torn_bytes,
        ..Default::default()
    };
    for (name, l) in &r.lanes {
        let mut found =
            CheckedLane { lane: name.clone(), next_seq: l.next_seq, gaps: l.gaps.len() as u64, ..Default::default() };
        let mut expect = l.front + 1;
        let mut bad: Vec<String> = Vec::new();
        let dir = path.to_path_buf();
        for c in &l.chunks {
            let p = seg_path(&dir, c.seg);
            let mut sc = Scanner::open(&p, c.offset).map_err(|e| disk(&p, &e))?;
            // Entries past the replayed length are a torn tail, reported above.
            let end = r.segments.iter().find(|(id, _)| *id == c.seg).map_or(u64::MAX, |(_, len)| *len);
            while let Ok(Some(at)) = sc.next() {
                if at >= end {
                    break;
                }
                if sc.body[0] != KIND_COMMIT {
                    continue;
                }
                let Some(commit) = log::parse_commit(&sc.body) else { continue };
                for gr in commit.groups.iter().filter(|gr| gr.lane == name) {
                    for (i, (_, raw)) in gr.records.iter().enumerate() {
                        let seq = gr.first_seq + i as u64;
                        if seq < expect {
                            continue;
                        }
                        if seq != expect {
                            bad.push(format!("lane {name}: seqs {expect}..{} missing", seq - 1));
                        }
                        expect = seq + 1;
                        found.records += 1;
                        found.bytes += raw.len() as u64;
                        if let Err(e) = minicbor::decode::<Record>(raw) {
                            bad.push(format!("lane {name}: record {seq} does not decode: {e}"));
                        }
                    }
                }
            }
        }
        if (found.records, found.bytes) != (l.records, l.bytes) {
            bad.push(format!(
                "lane {name}: the index says {} records / {} bytes, the segments hold {} / {}",
                l.records, l.bytes, found.records, found.bytes
            ));
        }
        rep.problems.extend(bad);
        rep.lanes.push(found);
    }
    Ok(rep)
}

#[cfg(test)]
mod tests;
