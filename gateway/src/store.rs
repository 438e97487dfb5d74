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
//! | `mqtt_inflight` | MQTT packet id (`u16`) | FNV-1a hash of topic and payload |
//!
//! # Invariants
//!
//! 1. **Durable before ack.** [`Store::append_batch`] writes a whole batch in one
//!    transaction committed with `Durability::Immediate` (fsync) and returns only
//!    then; the ingest path acknowledges MQTT messages only after it returns.
//! 2. **Seqs are never reused.** `next_seq` of a lane is stored in the same transaction
//!    as the records it numbered, and only grows, also when records are deleted.
//! 3. **Delete only on hub ack.** Records leave only through [`Store::ack_through`],
//!    which the uplink calls when a hub acknowledged them durable.
//! 4. **Counters match contents.** `records` and `bytes` of a lane change in the same
//!    transaction as the rows they count.
//! 5. **Redelivery is recognised.** Each append also records, per MQTT packet id, a
//!    hash of what was stored under it. A message the broker redelivers (DUP set) after
//!    a crash between commit and PUBACK matches its entry and is acknowledged without
//!    being stored twice.
//! 6. **Bounded memory.** The page cache is capped by `cache_bytes`; reads are bounded
//!    by count and bytes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use voither_proto::Record;

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
}

macro_rules! io_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Io(e.to_string())
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

/// What a lane holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LaneStats {
    /// Lane name.
    pub lane: String,
    /// Next seq to assign.
    pub next_seq: u64,
    /// Oldest seq held (== `next_seq` when empty).
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
    db: Database,
    path: PathBuf,
    tables: HashMap<String, String>,
    meta: Mutex<HashMap<String, LaneMeta>>,
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
    /// Opens (or creates) the store at `path` for the configured `lanes`.
    pub fn open(path: &Path, cache_bytes: usize, lanes: &[String]) -> Result<Self, StoreError> {
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(path)
            .map_err(|e| StoreError::Open { path: path.into(), source: Box::new(e) })?;
        let tables: HashMap<String, String> = lanes.iter().map(|l| (l.clone(), format!("lane/{l}"))).collect();
        let mut meta = HashMap::new();
        let txn = db.begin_write()?;
        {
            let mut t = txn.open_table(LANES)?;
            txn.open_table(MQTT_INFLIGHT)?;
            for lane in lanes {
                let existing = t.get(lane.as_str())?.map(|v| v.value());
                let m = match existing {
                    Some((next_seq, records, bytes)) => LaneMeta { next_seq, records, bytes },
                    None => {
                        t.insert(lane.as_str(), (1, 0, 0))?;
                        LaneMeta { next_seq: 1, records: 0, bytes: 0 }
                    }
                };
                txn.open_table(TableDefinition::<u64, &[u8]>::new(&tables[lane]))?;
                meta.insert(lane.clone(), m);
            }
        }
        txn.commit()?;
        Ok(Self { db, path: path.into(), tables, meta: Mutex::new(meta) })
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

    /// Appends `records` in one durable commit and returns the seq each got, in order.
    ///
    /// `mqtt` lists `(packet id, message hash)` of the MQTT messages in the batch, kept
    /// for redelivery checks (invariant 5).
    pub fn append_batch(&self, records: &[NewRecord], mqtt: &[(u16, u64)]) -> Result<Vec<u64>, StoreError> {
        let mut meta = self.meta.lock().expect("store meta lock");
        let mut next = meta.clone();
        let mut seqs = Vec::with_capacity(records.len());
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut lanes = txn.open_table(LANES)?;
            let mut by_lane: HashMap<&str, Vec<(usize, &NewRecord)>> = HashMap::new();
            for (i, r) in records.iter().enumerate() {
                by_lane.entry(r.lane.as_str()).or_default().push((i, r));
            }
            seqs.resize(records.len(), 0);
            let mut buf = Vec::new();
            for (lane, recs) in by_lane {
                let m = next.get_mut(lane).ok_or_else(|| StoreError::UnknownLane(lane.into()))?;
                let mut t = txn.open_table(self.table(lane)?)?;
                for (i, r) in recs {
                    let seq = m.next_seq;
                    m.next_seq += 1;
                    m.records += 1;
                    m.bytes += r.payload.len() as u64;
                    buf.clear();
                    let rec = Record {
                        seq,
                        ingest_ts_ms: r.ingest_ts_ms,
                        source: r.source.clone(),
                        content_type: r.content_type.clone(),
                        payload: r.payload.clone().into(),
                    };
                    minicbor::encode(&rec, &mut buf).expect("encoding into a Vec is infallible");
                    t.insert(seq, buf.as_slice())?;
                    seqs[i] = seq;
                }
                lanes.insert(lane, (m.next_seq, m.records, m.bytes))?;
            }
            let mut inflight = txn.open_table(MQTT_INFLIGHT)?;
            for (pkid, hash) in mqtt {
                inflight.insert(*pkid, *hash)?;
            }
        }
        txn.commit()?;
        *meta = next;
        Ok(seqs)
    }

    /// The MQTT packet ids and message hashes of the latest appends (invariant 5).
    pub fn mqtt_inflight(&self) -> Result<HashMap<u16, u64>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(MQTT_INFLIGHT)?;
        let mut out = HashMap::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.insert(k.value(), v.value());
        }
        Ok(out)
    }

    /// Reads records of `lane` with seq ≥ `from_seq`, at most `max_records` and about
    /// `max_bytes` of payload (at least one record if any).
    pub fn read_from(
        &self,
        lane: &str,
        from_seq: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(self.table(lane)?)?;
        let mut out = Vec::new();
        let mut bytes = 0;
        for row in t.range(from_seq..)? {
            let (k, v) = row?;
            let seq = k.value();
            let rec: Record = minicbor::decode(v.value()).map_err(|e| StoreError::Corrupt {
                lane: lane.into(),
                seq,
                message: e.to_string(),
            })?;
            bytes += rec.payload.len();
            out.push(rec);
            if out.len() >= max_records || bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// Next seq of each lane (one past the newest record), from memory.
    pub fn next_seqs(&self) -> Vec<(String, u64)> {
        self.meta.lock().expect("store meta lock").iter().map(|(l, m)| (l.clone(), m.next_seq)).collect()
    }

    /// Deletes the records of `lane` through `seq`: a hub holds them. Returns how many
    /// records and payload bytes were deleted.
    pub fn ack_through(&self, lane: &str, seq: u64) -> Result<(u64, u64), StoreError> {
        let mut meta = self.meta.lock().expect("store meta lock");
        let m = *meta.get(lane).ok_or_else(|| StoreError::UnknownLane(lane.into()))?;
        let mut removed = 0u64;
        let mut removed_bytes = 0u64;
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut t = txn.open_table(self.table(lane)?)?;
            for row in t.extract_from_if(..=seq, |_, _| true)? {
                let (_, v) = row?;
                let rec: Record = minicbor::decode(v.value()).map_err(|e| StoreError::Corrupt {
                    lane: lane.into(),
                    seq,
                    message: e.to_string(),
                })?;
                removed += 1;
                removed_bytes += rec.payload.len() as u64;
            }
            let mut lanes = txn.open_table(LANES)?;
            lanes.insert(lane, (m.next_seq, m.records - removed, m.bytes - removed_bytes))?;
        }
        txn.commit()?;
        let mm = meta.get_mut(lane).expect("lane checked above");
        mm.records -= removed;
        mm.bytes -= removed_bytes;
        Ok((removed, removed_bytes))
    }

    /// What each lane holds.
    pub fn stats(&self) -> Result<Vec<LaneStats>, StoreError> {
        let meta = self.meta.lock().expect("store meta lock").clone();
        let txn = self.db.begin_read()?;
        let mut out = Vec::with_capacity(meta.len());
        for lane in self.lanes() {
            let m = meta[&lane];
            let t = txn.open_table(self.table(&lane)?)?;
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
                oldest_seq,
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
        let txn = self.db.begin_read()?;
        let t = txn.open_table(self.table(lane)?)?;
        Ok(t.len()?)
    }
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

    fn lanes() -> Vec<String> {
        vec!["a".into(), "b".into()]
    }

    #[test]
    fn append_read_ack_and_seqs_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.redb");
        {
            let s = Store::open(&p, 1 << 20, &lanes()).unwrap();
            let seqs = s.append_batch(&[rec("a", 1), rec("b", 2), rec("a", 3)], &[(7, 99)]).unwrap();
            assert_eq!(seqs, vec![1, 1, 2]);
            let got = s.read_from("a", 1, 10, 1 << 20).unwrap();
            assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2]);
            assert_eq!(got[1].payload.as_slice(), &[3; 10]);
            assert_eq!(s.ack_through("a", 2).unwrap(), (2, 20));
            assert_eq!(s.mqtt_inflight().unwrap()[&7], 99);
        }
        let s = Store::open(&p, 1 << 20, &lanes()).unwrap();
        let st = s.stats().unwrap();
        assert_eq!(
            st[0],
            LaneStats { lane: "a".into(), next_seq: 3, oldest_seq: 3, records: 0, bytes: 0, oldest_ingest_ts_ms: None }
        );
        assert_eq!(st[1].records, 1);
        assert_eq!(st[1].bytes, 10);
        assert_eq!(s.count_rows("b").unwrap(), 1);
        // Seqs are never reused, even after everything was deleted.
        assert_eq!(s.append_batch(&[rec("a", 4)], &[]).unwrap(), vec![3]);
    }

    #[test]
    fn reads_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("s.redb"), 1 << 20, &lanes()).unwrap();
        let batch: Vec<_> = (0..50).map(|i| rec("a", i)).collect();
        s.append_batch(&batch, &[]).unwrap();
        assert_eq!(s.read_from("a", 1, 7, 1 << 20).unwrap().len(), 7);
        assert_eq!(s.read_from("a", 1, 100, 25).unwrap().len(), 3);
        assert_eq!(s.read_from("a", 45, 100, 1 << 20).unwrap().len(), 6);
    }

    #[test]
    fn unknown_lane_is_an_error_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("s.redb"), 1 << 20, &lanes()).unwrap();
        let err = s.append_batch(&[rec("a", 1), rec("zzz", 2)], &[]).unwrap_err();
        assert!(matches!(err, StoreError::UnknownLane(ref l) if l == "zzz"), "{err}");
        assert_eq!(s.count_rows("a").unwrap(), 0);
        assert_eq!(s.append_batch(&[rec("a", 1)], &[]).unwrap(), vec![1], "no seq was consumed");
    }

    #[test]
    fn corrupt_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.redb");
        std::fs::write(&p, vec![0x5a; 8192]).unwrap();
        let err = Store::open(&p, 1 << 20, &lanes()).unwrap_err().to_string();
        assert!(err.contains("s.redb"), "{err}");
        assert_eq!(std::fs::read(&p).unwrap(), vec![0x5a; 8192], "the corrupt file is left as it was for inspection");
    }

    #[test]
    fn message_hash_tells_topic_from_payload() {
        assert_ne!(message_hash("a", b"bc"), message_hash("ab", b"c"));
        assert_eq!(message_hash("t", b"x"), message_hash("t", b"x"));
    }
}
