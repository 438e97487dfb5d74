//! Stores of earlier versions: one redb file, `store.redb`, with the tables
//!
//! | table | key | value |
//! |---|---|---|
//! | `lanes` | lane name | `(next_seq, records, bytes)` |
//! | `lane/<name>` | seq (`u64`) | the [`Record`] in CBOR |
//! | `gaps/<name>` | first evicted seq | `(last evicted seq, reason)` |
//! | `mqtt_inflight` | MQTT packet id (`u16`) | message hash |
//!
//! [`migrate_redb`] moves such a store into the segment layout once, at start;
//! [`check_redb`] reads one without changing it.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use voither_proto::Record;

use super::log::{create_segment, put_evictions, put_mqtt, put_name, seal, segment_ids, Lane, ENTRY_HEAD, KIND_COMMIT};
use super::{reason_from, CheckReport, CheckedLane, StoreError};

const LANES: TableDefinition<'_, &str, (u64, u64, u64)> = TableDefinition::new("lanes");
const MQTT_INFLIGHT: TableDefinition<'_, u16, u64> = TableDefinition::new("mqtt_inflight");
/// Records, and bytes, per commit entry written by the migration (well under the
/// store's entry limit).
const MIGRATE_BATCH: usize = 1024;
const MIGRATE_BATCH_BYTES: usize = 16 << 20;

fn redb_error(path: &Path, e: impl std::fmt::Display) -> StoreError {
    let m = e.to_string();
    // What redb says of a file that is not a (whole) database.
    let corrupt = ["orrupt", "repair", "invalid", "nexpected end", "failed to fill whole buffer", "magic"]
        .iter()
        .any(|k| m.contains(k));
    if corrupt {
        StoreError::Damaged { path: path.into(), offset: 0, what: m }
    } else {
        StoreError::Open { path: path.into(), message: m }
    }
}

fn open_redb(path: &Path) -> Result<redb::ReadOnlyDatabase, StoreError> {
    redb::ReadOnlyDatabase::open(path).map_err(|e| match e {
        redb::DatabaseError::RepairAborted | redb::DatabaseError::Storage(redb::StorageError::Corrupted(_)) => {
            StoreError::Damaged { path: path.into(), offset: 0, what: e.to_string() }
        }
        redb::DatabaseError::Storage(redb::StorageError::Io(ref io))
            if matches!(io.kind(), std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof) =>
        {
            StoreError::Damaged { path: path.into(), offset: 0, what: e.to_string() }
        }
        e => redb_error(path, e),
    })
}

/// What [`migrate_redb`] moved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Migrated {
    /// Where the old file went.
    pub old_file: PathBuf,
    /// Lanes moved.
    pub lanes: usize,
    /// Records moved.
    pub records: u64,
    /// Evicted ranges moved.
    pub gaps: u64,
}

/// Moves the redb store at `redb_path` into a segment store in folder `dir` (which
/// must not hold segments yet), then renames the old file to
/// `store.redb.migrated-<unix seconds>` (it is never deleted). Returns `None` when
/// there is no old file.
///
/// Crash safe: the segments are written to `<dir>.migrating`, made durable and
/// renamed to `dir` in one step; a crash before that leaves the old file in charge
/// and the next start migrates again; a crash after it only leaves the rename of the
/// old file to do.
pub fn migrate_redb(redb_path: &Path, dir: &Path) -> Result<Option<Migrated>, StoreError> {
    if !redb_path.exists() {
        return Ok(None);
    }
    let parent = dir.parent().unwrap_or(Path::new("."));
    let io = |p: &Path, e: std::io::Error| StoreError::Open { path: p.into(), message: e.to_string() };
    let old_file = redb_path.with_extension(format!("redb.migrated-{}", crate::unix_ms() / 1000));
    let done = dir.is_dir() && !segment_ids(dir)?.is_empty();
    let mut moved = Migrated { old_file: old_file.clone(), ..Default::default() };
    if !done {
        let tmp = dir.with_extension("migrating");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        moved = match write_segments(redb_path, &tmp) {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        moved.old_file = old_file.clone();
        if dir.exists() {
            // A folder without segments (only its lock file): nothing to keep.
            std::fs::remove_dir_all(dir).map_err(|e| io(dir, e))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| io(dir, e))?;
        File::open(parent).and_then(|f| f.sync_all()).map_err(|e| io(parent, e))?;
    }
    std::fs::rename(redb_path, &old_file).map_err(|e| io(redb_path, e))?;
    File::open(parent).and_then(|f| f.sync_all()).map_err(|e| io(parent, e))?;
    Ok(Some(moved))
}

/// Writes the contents of the redb store as segments 1 (a snapshot at the first seq
/// held, then the records) and 2 (a snapshot with the old `next_seq`).
fn write_segments(redb_path: &Path, tmp: &Path) -> Result<Migrated, StoreError> {
    let db = open_redb(redb_path)?;
    let e = |err: redb::Error| redb_error(redb_path, err);
    let txn = db.begin_read().map_err(|x| e(x.into()))?;
    let lanes_t = txn.open_table(LANES).map_err(|x| e(x.into()))?;
    let mut lanes: BTreeMap<String, Lane> = BTreeMap::new();
    let mut next_seqs: BTreeMap<String, u64> = BTreeMap::new();
    let mut moved = Migrated::default();
    for row in lanes_t.iter().map_err(|x| e(x.into()))? {
        let (k, v) = row.map_err(|x| e(x.into()))?;
        let name = k.value().to_string();
        let (next_seq, _, _) = v.value();
        let t = txn.open_table(TableDefinition::<u64, &[u8]>::new(&format!("lane/{name}"))).map_err(|x| e(x.into()))?;
        let first = t.first().map_err(|x| e(x.into()))?.map_or(next_seq, |(k, _)| k.value());
        let mut l = Lane { next_seq: first, front: first.saturating_sub(1), ..Default::default() };
        if let Ok(g) = txn.open_table(TableDefinition::<u64, (u64, u8)>::new(&format!("gaps/{name}"))) {
            for row in g.iter().map_err(|x| e(x.into()))? {
                let (k, v) = row.map_err(|x| e(x.into()))?;
                let (through, reason) = v.value();
                l.gaps.insert(k.value(), (through, reason_from(reason)));
                moved.gaps += 1;
            }
        }
        l.acked = l.gaps.keys().next().copied().unwrap_or(first).min(first).saturating_sub(1);
        next_seqs.insert(name.clone(), next_seq);
        lanes.insert(name, l);
    }
    let mqtt: HashMap<u16, u64> = match txn.open_table(MQTT_INFLIGHT) {
        Ok(t) => t
            .iter()
            .map_err(|x| e(x.into()))?
            .map(|r| r.map(|(k, v)| (k.value(), v.value())))
            .collect::<Result<_, _>>()
            .map_err(|x| e(x.into()))?,
        Err(_) => HashMap::new(),
    };
    let seg1 = super::log::seg_path(tmp, 1);
    let (mut f, _) = create_segment(tmp, 1, &lanes, &mqtt)?;
    let w = |f: &mut File, buf: &[u8]| f.write_all(buf).map_err(|x| super::log::disk(&seg1, &x));
    let mut body = Vec::new();
    for (name, l) in &lanes {
        let t = txn.open_table(TableDefinition::<u64, &[u8]>::new(&format!("lane/{name}"))).map_err(|x| e(x.into()))?;
        let mut expect = l.next_seq;
        let mut batch: Vec<(u64, Vec<u8>)> = Vec::with_capacity(MIGRATE_BATCH);
        let mut flush = |batch: &mut Vec<(u64, Vec<u8>)>, first: u64| -> Result<(), StoreError> {
            if batch.is_empty() {
                return Ok(());
            }
            body.clear();
            body.extend_from_slice(&[0; ENTRY_HEAD]);
            body.push(KIND_COMMIT);
            body.extend_from_slice(&1u16.to_le_bytes());
            put_name(&mut body, name);
            body.extend_from_slice(&first.to_le_bytes());
            body.extend_from_slice(&(batch.len() as u32).to_le_bytes());
            for (ts, raw) in batch.iter() {
                body.extend_from_slice(&(raw.len() as u32).to_le_bytes());
                body.extend_from_slice(&ts.to_le_bytes());
                body.extend_from_slice(raw);
            }
            put_evictions(&mut body, &[]);
            put_mqtt(&mut body, 0, std::iter::empty());
            seal(&mut body);
            w(&mut f, &body)?;
            batch.clear();
            Ok(())
        };
        let mut batch_first = expect;
        let mut batch_bytes = 0usize;
        for row in t.iter().map_err(|x| e(x.into()))? {
            let (k, v) = row.map_err(|x| e(x.into()))?;
            let seq = k.value();
            if seq != expect {
                return Err(StoreError::Damaged {
                    path: redb_path.into(),
                    offset: 0,
                    what: format!("lane {name}: seqs {expect}..{} missing; not moved", seq.saturating_sub(1)),
                });
            }
            let rec: Record = minicbor::decode(v.value()).map_err(|err| StoreError::Corrupt {
                lane: name.clone(),
                seq,
                message: err.to_string(),
            })?;
            batch_bytes += v.value().len();
            batch.push((rec.ingest_ts_ms, v.value().to_vec()));
            moved.records += 1;
            expect = seq + 1;
            if batch.len() == MIGRATE_BATCH || batch_bytes >= MIGRATE_BATCH_BYTES {
                flush(&mut batch, batch_first)?;
                batch_first = expect;
                batch_bytes = 0;
            }
        }
        flush(&mut batch, batch_first)?;
    }
    f.sync_all().map_err(|x| super::log::disk(&seg1, &x))?;
    // Segment 2 carries the old next_seq: seqs acknowledged at the end of a lane are
    // never handed out again.
    let mut after = lanes.clone();
    for (name, l) in after.iter_mut() {
        l.next_seq = next_seqs[name].max(l.next_seq);
    }
    create_segment(tmp, 2, &after, &mqtt)?;
    moved.lanes = lanes.len();
    Ok(moved)
}

/// Reads a redb store file (of an earlier version) read-only and checks that every row
/// decodes and the counters match the rows. A file open in a running gateway cannot be
/// checked (the error says so).
pub fn check_redb(path: &Path) -> Result<CheckReport, StoreError> {
    let db = open_redb(path)?;
    let e = |err: redb::Error| redb_error(path, err);
    let mut rep = CheckReport {
        path: path.display().to_string(),
        file_bytes: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        segments: 0,
        ..Default::default()
    };
    let txn = db.begin_read().map_err(|x| e(x.into()))?;
    let lanes = txn.open_table(LANES).map_err(|x| e(x.into()))?;
    for row in lanes.iter().map_err(|x| e(x.into()))? {
        let (k, v) = row.map_err(|x| e(x.into()))?;
        let lane = k.value().to_string();
        let (next_seq, records, bytes) = v.value();
        let mut found = CheckedLane { lane: lane.clone(), next_seq, ..Default::default() };
        match txn.open_table(TableDefinition::<u64, &[u8]>::new(&format!("lane/{lane}"))) {
            Ok(t) => {
                for row in t.iter().map_err(|x| e(x.into()))? {
                    let (k, v) = row.map_err(|x| e(x.into()))?;
                    found.records += 1;
                    found.bytes += v.value().len() as u64;
                    if k.value() >= next_seq {
                        rep.problems.push(format!("lane {lane}: seq {} at or beyond next_seq {next_seq}", k.value()));
                    }
                    if let Err(err) = minicbor::decode::<Record>(v.value()) {
                        rep.problems.push(format!("lane {lane}: record {} does not decode: {err}", k.value()));
                    }
                }
            }
            Err(err) => rep.problems.push(format!("lane {lane}: table missing: {err}")),
        }
        if let Ok(g) = txn.open_table(TableDefinition::<u64, (u64, u8)>::new(&format!("gaps/{lane}"))) {
            found.gaps = g.len().map_err(|x| e(x.into()))?;
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
