//! A segmented append log for the store's record path, measured against the redb
//! [`Store`](crate::store::Store) by `voither-bench --only store`.
//!
//! It implements the calls the ingest and the uplink make on every record
//! ([`SegLog::append_batch`], [`SegLog::read_from`], [`SegLog::ack_through`]) with the
//! same durability contract as the store: an append returns only after one `fdatasync`
//! of everything it wrote, seqs are never reused, records leave only on a hub ack, and
//! acks are made durable lazily (every [`ACKS_PER_DURABLE_COMMIT`]-th, or when a lane
//! empties). The gateway does not run on it yet: eviction with gaps, TTL expiry,
//! compaction of pinned segments and `store check` are still only in the redb store.
//!
//! # On-disk layout
//!
//! A folder of segment files `<id as 16 hex digits>.seg`, each at most about
//! `segment_bytes` long. A segment is a 16-byte header (`VOITHLOG`, format version) and
//! a run of entries `[u32 body length][u32 CRC-32C of the body][body]`; the body's first
//! byte is its kind:
//!
//! | kind | body |
//! |---|---|
//! | snapshot (first entry of every segment) | per lane: name, `next_seq`, acked through; the MQTT redelivery hashes |
//! | commit (one per append) | per lane: name, first seq, records (`u32` length, ingest time, the [`Record`] in CBOR); MQTT `(packet id, hash)` pairs |
//! | ack | lane name, acked through |
//!
//! # Recovery
//!
//! Opening replays the segments in order from the oldest's snapshot. An entry that is
//! cut short or fails its CRC in the **newest** segment is a write torn by a crash: the
//! file is truncated there (nothing after it was ever acknowledged, since every append
//! returns only after its fdatasync). Anywhere else it is corruption, reported with the
//! file and offset, and the folder is left as it is.
//!
//! # Space
//!
//! Memory holds, per lane, one [`Chunk`] per segment it has records in, not one entry
//! per record. A segment is deleted once no lane holds a record in it, after an
//! fdatasync that makes the acks that emptied it durable.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use voither_proto::{Record, RecordRef};

use crate::store::{Appended, FullPolicy, LaneSpec, LaneStats, NewRecord, StoreError, ACKS_PER_DURABLE_COMMIT};

const MAGIC: &[u8; 8] = b"VOITHLOG";
const FORMAT: u32 = 1;
const HEADER_LEN: u64 = 16;
const ENTRY_HEAD: usize = 8;
const KIND_SNAPSHOT: u8 = 1;
const KIND_COMMIT: u8 = 2;
const KIND_ACK: u8 = 3;
/// Largest entry body accepted when reading: a length beyond it is a torn or corrupt
/// length field, not an allocation to attempt.
const MAX_BODY: u32 = 256 << 20;
/// Default size at which the log starts a new segment.
pub const DEFAULT_SEGMENT_BYTES: u64 = 8 << 20;

/// CRC-32C (Castagnoli), slicing by eight.
fn crc32c(data: &[u8]) -> u32 {
    static TABLES: std::sync::OnceLock<[[u32; 256]; 8]> = std::sync::OnceLock::new();
    let t = TABLES.get_or_init(|| {
        let mut t = [[0u32; 256]; 8];
        for i in 0..256u32 {
            let mut c = i;
            for _ in 0..8 {
                c = if c & 1 == 1 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
            }
            t[0][i as usize] = c;
        }
        for i in 0..256 {
            for k in 1..8 {
                let p = t[k - 1][i];
                t[k][i] = (p >> 8) ^ t[0][(p & 0xff) as usize];
            }
        }
        t
    });
    let mut crc = !0u32;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let lo = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) ^ crc;
        crc = t[7][(lo & 0xff) as usize]
            ^ t[6][((lo >> 8) & 0xff) as usize]
            ^ t[5][((lo >> 16) & 0xff) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][c[4] as usize]
            ^ t[2][c[5] as usize]
            ^ t[1][c[6] as usize]
            ^ t[0][c[7] as usize];
    }
    for b in chunks.remainder() {
        crc = (crc >> 8) ^ t[0][((crc ^ u32::from(*b)) & 0xff) as usize];
    }
    !crc
}

/// The records of one lane in one segment that are not acknowledged yet.
#[derive(Debug, Clone)]
struct Chunk {
    seg: u64,
    /// Offset of the entry holding `first_seq` (where a scan for it starts).
    offset: u64,
    first_seq: u64,
    last_seq: u64,
    records: u64,
    bytes: u64,
}

#[derive(Debug, Default)]
struct Lane {
    next_seq: u64,
    acked_through: u64,
    records: u64,
    bytes: u64,
    chunks: VecDeque<Chunk>,
    /// Where the last read stopped: (next seq, segment, entry offset).
    read_cursor: Option<(u64, u64, u64)>,
}

#[derive(Debug)]
struct Inner {
    active: File,
    active_id: u64,
    active_len: u64,
    /// Segment ids on disk, oldest first.
    segments: Vec<u64>,
    lanes: BTreeMap<String, Lane>,
    mqtt: HashMap<u16, u64>,
    lazy_acks: u64,
    buf: Vec<u8>,
    /// Set after a write failed and could not be undone: the log must be reopened.
    broken: Option<String>,
}

/// The segmented append log. Calls block on disk I/O.
#[derive(Debug)]
pub struct SegLog {
    dir: PathBuf,
    segment_bytes: u64,
    specs: HashMap<String, LaneSpec>,
    inner: Mutex<Inner>,
}

/// What opening found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Segments replayed.
    pub segments: usize,
    /// Bytes cut from the newest segment (a write torn by a crash).
    pub truncated_bytes: u64,
}

fn corrupt(path: &Path, offset: u64, what: &str) -> StoreError {
    StoreError::Io(format!("corrupt log segment {} at offset {offset}: {what}", path.display()))
}

fn disk(path: &Path, e: &std::io::Error) -> StoreError {
    StoreError::Disk(format!("{}: {e}", path.display()))
}

/// A bounds-checked reader over an entry body (whose CRC already matched).
struct Body<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Body<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|s| s[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|s| u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
    }
    fn name(&mut self) -> Option<&'a str> {
        let n = self.u8()? as usize;
        std::str::from_utf8(self.take(n)?).ok()
    }
}

fn put_name(out: &mut Vec<u8>, name: &str) {
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
}

/// One lane's part of a commit entry, as the replay and the scans see it.
struct Group<'a> {
    lane: &'a str,
    first_seq: u64,
    /// `(ingest time, CBOR bytes)` of each record, seq `first_seq + i`.
    records: Vec<(u64, &'a [u8])>,
}

/// A commit entry: its lane groups and MQTT `(packet id, hash)` pairs.
type Commit<'a> = (Vec<Group<'a>>, Vec<(u16, u64)>);

fn parse_commit(body: &[u8]) -> Option<Commit<'_>> {
    let mut b = Body { b: body, at: 1 };
    let groups = b.u16()?;
    let mut out = Vec::with_capacity(groups as usize);
    for _ in 0..groups {
        let lane = b.name()?;
        let first_seq = b.u64()?;
        let n = b.u32()?;
        let mut records = Vec::with_capacity(n.min(1 << 16) as usize);
        for _ in 0..n {
            let len = b.u32()? as usize;
            let ts = b.u64()?;
            records.push((ts, b.take(len)?));
        }
        out.push(Group { lane, first_seq, records });
    }
    let n = b.u32()?;
    let mut mqtt = Vec::with_capacity(n.min(1 << 16) as usize);
    for _ in 0..n {
        mqtt.push((b.u16()?, b.u64()?));
    }
    (b.at == body.len()).then_some((out, mqtt))
}

type Snapshot<'a> = (Vec<(&'a str, u64, u64)>, Vec<(u16, u64)>);

fn parse_snapshot(body: &[u8]) -> Option<Snapshot<'_>> {
    let mut b = Body { b: body, at: 1 };
    let n = b.u16()?;
    let mut lanes = Vec::with_capacity(n as usize);
    for _ in 0..n {
        lanes.push((b.name()?, b.u64()?, b.u64()?));
    }
    let m = b.u32()?;
    let mut mqtt = Vec::with_capacity(m.min(1 << 16) as usize);
    for _ in 0..m {
        mqtt.push((b.u16()?, b.u64()?));
    }
    (b.at == body.len()).then_some((lanes, mqtt))
}

fn parse_ack(body: &[u8]) -> Option<(&str, u64)> {
    let mut b = Body { b: body, at: 1 };
    let r = (b.name()?, b.u64()?);
    (b.at == body.len()).then_some(r)
}

/// Reads entries of a segment from `offset`; `Ok(None)` at a clean end.
struct Scanner {
    r: BufReader<File>,
    offset: u64,
    len: u64,
    body: Vec<u8>,
}

/// Why a scan stopped before the end of the file.
enum Bad {
    /// The entry at this offset is cut short or fails its CRC.
    Torn(u64, &'static str),
    Io(std::io::Error),
}

impl Scanner {
    fn open(path: &Path, offset: u64) -> std::io::Result<Scanner> {
        let f = File::open(path)?;
        let len = f.metadata()?.len();
        let mut r = BufReader::with_capacity(128 << 10, f);
        r.seek(SeekFrom::Start(offset))?;
        Ok(Scanner { r, offset, len, body: Vec::new() })
    }

    /// The next entry: its offset, and its body in `self.body`.
    fn next(&mut self) -> Result<Option<u64>, Bad> {
        let at = self.offset;
        if at == self.len {
            return Ok(None);
        }
        if self.len - at < ENTRY_HEAD as u64 {
            return Err(Bad::Torn(at, "entry header cut short"));
        }
        let mut head = [0u8; ENTRY_HEAD];
        self.r.read_exact(&mut head).map_err(Bad::Io)?;
        let len = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
        if len == 0 || len > MAX_BODY {
            return Err(Bad::Torn(at, "entry length out of range"));
        }
        if self.len - at - (ENTRY_HEAD as u64) < u64::from(len) {
            return Err(Bad::Torn(at, "entry body cut short"));
        }
        self.body.resize(len as usize, 0);
        self.r.read_exact(&mut self.body).map_err(Bad::Io)?;
        if crc32c(&self.body) != crc {
            return Err(Bad::Torn(at, "entry checksum mismatch"));
        }
        self.offset = at + ENTRY_HEAD as u64 + u64::from(len);
        Ok(Some(at))
    }
}

impl SegLog {
    /// Opens (or creates) the log in folder `dir` for `lanes`, starting a new segment
    /// after about `segment_bytes`.
    pub fn open(dir: &Path, lanes: &[LaneSpec], segment_bytes: u64) -> Result<(SegLog, Recovery), StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| disk(dir, &e))?;
        let mut ids: Vec<u64> = Vec::new();
        for e in std::fs::read_dir(dir).map_err(|e| disk(dir, &e))? {
            let e = e.map_err(|e| disk(dir, &e))?;
            let name = e.file_name();
            let name = name.to_string_lossy();
            if let Some(id) = name.strip_suffix(".seg").and_then(|h| u64::from_str_radix(h, 16).ok()) {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        let mut lanes_state: BTreeMap<String, Lane> =
            lanes.iter().map(|l| (l.name.clone(), Lane { next_seq: 1, ..Default::default() })).collect();
        let mut mqtt = HashMap::new();
        let mut rec = Recovery::default();
        let mut kept = Vec::new();
        let last = ids.last().copied();
        for &id in &ids {
            let path = seg_path(dir, id);
            let is_last = Some(id) == last;
            let mut head = [0u8; HEADER_LEN as usize];
            let header_ok = File::open(&path)
                .and_then(|mut f| f.read_exact(&mut head))
                .map(|()| &head[0..8] == MAGIC && u32::from_le_bytes(head[8..12].try_into().expect("4")) == FORMAT);
            match header_ok {
                Ok(true) => {}
                Ok(false) if !is_last => return Err(corrupt(&path, 0, "not a VOITHER log segment")),
                Err(e) if !is_last && e.kind() != std::io::ErrorKind::UnexpectedEof => return Err(disk(&path, &e)),
                Err(_) if !is_last => return Err(corrupt(&path, 0, "segment header cut short")),
                _ => {
                    // The newest segment was being created when the process stopped: it
                    // holds nothing acknowledged (appends start after its snapshot is
                    // durable).
                    let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                    if len > HEADER_LEN * 4 && header_ok.is_ok() {
                        return Err(corrupt(&path, 0, "not a VOITHER log segment"));
                    }
                    rec.truncated_bytes += len;
                    std::fs::remove_file(&path).map_err(|e| disk(&path, &e))?;
                    continue;
                }
            }
            let mut sc = Scanner::open(&path, HEADER_LEN).map_err(|e| disk(&path, &e))?;
            let mut first = true;
            loop {
                let at = match sc.next() {
                    Ok(Some(at)) => at,
                    Ok(None) => break,
                    Err(Bad::Io(e)) => return Err(disk(&path, &e)),
                    // Its snapshot is torn: the segment was being created (below).
                    Err(Bad::Torn(..)) if first && is_last => break,
                    Err(Bad::Torn(at, what)) => {
                        if !is_last {
                            return Err(corrupt(&path, at, what));
                        }
                        rec.truncated_bytes += sc.len - at;
                        let f = OpenOptions::new().write(true).open(&path).map_err(|e| disk(&path, &e))?;
                        f.set_len(at).map_err(|e| disk(&path, &e))?;
                        f.sync_all().map_err(|e| disk(&path, &e))?;
                        tracing::warn!(segment = %path.display(), offset = at, cut = sc.len - at, reason = what,
                            "Cut a write torn by a crash from the end of the store log.");
                        break;
                    }
                };
                let body = &sc.body;
                let bad = |what| corrupt(&path, at, what);
                match body[0] {
                    KIND_SNAPSHOT => {
                        let (ls, m) = parse_snapshot(body).ok_or_else(|| bad("malformed snapshot"))?;
                        if kept.is_empty() && first {
                            // The oldest segment kept: its snapshot is the starting state.
                            for (name, next_seq, acked) in ls {
                                let l = lanes_state.entry(name.to_string()).or_default();
                                l.next_seq = l.next_seq.max(next_seq);
                                l.acked_through = l.acked_through.max(acked);
                            }
                            mqtt = m.into_iter().collect();
                        }
                    }
                    KIND_COMMIT => {
                        let (groups, m) = parse_commit(body).ok_or_else(|| bad("malformed commit"))?;
                        for g in groups {
                            let l = lanes_state.entry(g.lane.to_string()).or_default();
                            if g.first_seq < l.next_seq {
                                return Err(bad("a commit reuses seqs of its lane"));
                            }
                            push_chunk(l, id, at, g.first_seq, &g.records);
                        }
                        mqtt.extend(m);
                    }
                    KIND_ACK => {
                        let (name, through) = parse_ack(body).ok_or_else(|| bad("malformed ack"))?;
                        let l = lanes_state.entry(name.to_string()).or_default();
                        l.acked_through = l.acked_through.max(through);
                    }
                    _ => return Err(bad("unknown entry kind")),
                }
                if first && body[0] != KIND_SNAPSHOT {
                    return Err(bad("segment does not start with a snapshot"));
                }
                first = false;
            }
            if first {
                if !is_last {
                    return Err(corrupt(&path, HEADER_LEN, "segment without a snapshot"));
                }
                // The newest segment has no snapshot: it was being created when the
                // process stopped, and holds nothing (appends start only once its
                // snapshot is durable).
                rec.truncated_bytes += sc.len;
                std::fs::remove_file(&path).map_err(|e| disk(&path, &e))?;
                continue;
            }
            kept.push(id);
        }
        for (name, l) in lanes_state.iter_mut() {
            let through = l.acked_through;
            trim_front(dir, l, name, through)?;
        }
        let (active, active_id, active_len) = match kept.last() {
            Some(&id) => {
                let path = seg_path(dir, id);
                let f = OpenOptions::new().append(true).open(&path).map_err(|e| disk(&path, &e))?;
                let len = f.metadata().map_err(|e| disk(&path, &e))?.len();
                (f, id, len)
            }
            None => {
                let (f, len) = create_segment(dir, 1, &lanes_state, &mqtt)?;
                kept.push(1);
                (f, 1, len)
            }
        };
        rec.segments = kept.len();
        let log = SegLog {
            dir: dir.to_path_buf(),
            segment_bytes,
            specs: lanes.iter().map(|l| (l.name.clone(), l.clone())).collect(),
            inner: Mutex::new(Inner {
                active,
                active_id,
                active_len,
                segments: kept,
                lanes: lanes_state,
                mqtt,
                lazy_acks: 0,
                buf: Vec::new(),
                broken: None,
            }),
        };
        Ok((log, rec))
    }

    /// The log folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes of all segment files.
    pub fn disk_bytes(&self) -> u64 {
        let g = self.inner.lock().expect("log lock");
        g.segments.iter().map(|id| std::fs::metadata(seg_path(&self.dir, *id)).map(|m| m.len()).unwrap_or(0)).sum()
    }

    /// Segment files on disk.
    pub fn segments(&self) -> usize {
        self.inner.lock().expect("log lock").segments.len()
    }

    /// Appends `records` with one fdatasync and returns the seq each got, in order.
    /// `mqtt` lists the `(packet id, message hash)` of the MQTT messages in the batch.
    pub fn append_batch(&self, records: &[NewRecord], mqtt: &[(u16, u64)]) -> Result<Appended, StoreError> {
        let mut g = self.inner.lock().expect("log lock");
        if let Some(why) = &g.broken {
            return Err(StoreError::Unavailable(why.clone()));
        }
        let mut by_lane: Vec<(&str, Vec<usize>)> = Vec::new();
        for (i, r) in records.iter().enumerate() {
            match by_lane.iter_mut().find(|(l, _)| *l == r.lane) {
                Some((_, v)) => v.push(i),
                None => by_lane.push((r.lane.as_str(), vec![i])),
            }
        }
        let mut seqs = vec![0; records.len()];
        let mut body = std::mem::take(&mut g.buf);
        body.clear();
        body.extend_from_slice(&[0; ENTRY_HEAD]);
        body.push(KIND_COMMIT);
        body.extend_from_slice(&(by_lane.len() as u16).to_le_bytes());
        let mut cbor = Vec::new();
        let mut added: Vec<(u64, u64)> = Vec::with_capacity(by_lane.len());
        for (lane, idx) in &by_lane {
            let spec = self.specs.get(*lane).ok_or_else(|| StoreError::UnknownLane((*lane).into()))?;
            let l = &g.lanes[*lane];
            put_name(&mut body, lane);
            body.extend_from_slice(&l.next_seq.to_le_bytes());
            body.extend_from_slice(&(idx.len() as u32).to_le_bytes());
            let mut bytes = 0u64;
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
                cbor.clear();
                minicbor::encode(rec, &mut cbor).expect("encoding into a Vec is infallible");
                body.extend_from_slice(&(cbor.len() as u32).to_le_bytes());
                body.extend_from_slice(&r.ingest_ts_ms.to_le_bytes());
                body.extend_from_slice(&cbor);
                bytes += cbor.len() as u64;
                seqs[*i] = seq;
            }
            if spec.policy == FullPolicy::Backpressure && l.bytes + bytes > spec.max_bytes {
                let held = l.bytes;
                g.buf = body;
                return Err(StoreError::Full { lane: (*lane).into(), held, budget: spec.max_bytes });
            }
            added.push((idx.len() as u64, bytes));
        }
        body.extend_from_slice(&(mqtt.len() as u32).to_le_bytes());
        for (p, h) in mqtt {
            body.extend_from_slice(&p.to_le_bytes());
            body.extend_from_slice(&h.to_le_bytes());
        }
        let at = g.active_len;
        let r = self.write_entry(&mut g, &mut body, true);
        g.buf = body;
        r?;
        let id = g.active_id;
        for ((lane, _), (n, bytes)) in by_lane.iter().zip(added) {
            let l = g.lanes.get_mut(*lane).expect("known lane");
            let first = l.next_seq;
            let last = first + n - 1;
            match l.chunks.back_mut() {
                Some(c) if c.seg == id => {
                    c.last_seq = last;
                    c.records += n;
                    c.bytes += bytes;
                }
                _ => l.chunks.push_back(Chunk {
                    seg: id,
                    offset: at,
                    first_seq: first,
                    last_seq: last,
                    records: n,
                    bytes,
                }),
            }
            l.next_seq = last + 1;
            l.records += n;
            l.bytes += bytes;
        }
        g.mqtt.extend(mqtt.iter().copied());
        if g.active_len >= self.segment_bytes {
            let next = g.active_id + 1;
            self.start_segment(&mut g, next)?;
        }
        Ok(Appended { seqs, evicted: Vec::new() })
    }

    /// Writes one entry (`buf` starts with room for its head) at the end of the active
    /// segment; on failure the segment is cut back to where it was.
    fn write_entry(&self, g: &mut Inner, buf: &mut [u8], sync: bool) -> Result<(), StoreError> {
        let len = (buf.len() - ENTRY_HEAD) as u32;
        let crc = crc32c(&buf[ENTRY_HEAD..]);
        buf[0..4].copy_from_slice(&len.to_le_bytes());
        buf[4..8].copy_from_slice(&crc.to_le_bytes());
        let path = seg_path(&self.dir, g.active_id);
        let r = g.active.write_all(buf).and_then(|()| if sync { g.active.sync_data() } else { Ok(()) });
        match r {
            Ok(()) => {
                g.active_len += buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Nothing after a torn entry could be read back: cut it off, or stop
                // writing until the log is reopened.
                if let Err(e2) = g.active.set_len(g.active_len).and_then(|()| g.active.sync_data()) {
                    g.broken = Some(format!("{}: {e2} (after {e})", path.display()));
                }
                Err(disk(&path, &e))
            }
        }
    }

    /// Starts segment `id` (see [`create_segment`]) and makes it the active one, then
    /// deletes the segments no lane needs any more.
    fn start_segment(&self, g: &mut Inner, id: u64) -> Result<(), StoreError> {
        let (f, len) = create_segment(&self.dir, id, &g.lanes, &g.mqtt)?;
        // The previous segment's acks are durable before any segment is deleted.
        let path = seg_path(&self.dir, g.active_id);
        g.active.sync_data().map_err(|e| disk(&path, &e))?;
        g.active = f;
        g.active_id = id;
        g.active_len = len;
        g.segments.push(id);
        self.delete_dead(g);
        Ok(())
    }

    /// Deletes the segments before the oldest one any lane holds a record in (never the
    /// active one). Acks must be durable first.
    fn delete_dead(&self, g: &mut Inner) {
        let live = g.lanes.values().filter_map(|l| l.chunks.front().map(|c| c.seg)).min().unwrap_or(u64::MAX);
        let keep_from = live.min(g.active_id);
        while g.segments.first().is_some_and(|s| *s < keep_from) {
            let id = g.segments.remove(0);
            let path = seg_path(&self.dir, id);
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(segment = %path.display(), error = %e, "Could not delete an emptied store log segment.");
            }
        }
    }

    /// Deletes the records of `lane` through `seq`: a hub holds them. The ack is made
    /// durable with every [`ACKS_PER_DURABLE_COMMIT`]-th ack, when the lane empties, and
    /// by the next append.
    pub fn ack_through(&self, lane: &str, seq: u64) -> Result<(u64, u64), StoreError> {
        let mut g = self.inner.lock().expect("log lock");
        let l = g.lanes.get(lane).ok_or_else(|| StoreError::UnknownLane(lane.into()))?;
        let seq = seq.min(l.next_seq.saturating_sub(1));
        if seq <= l.acked_through {
            return Ok((0, 0));
        }
        let front = l.chunks.front().map(|c| c.seg);
        let mut body = Vec::with_capacity(32);
        body.extend_from_slice(&[0; ENTRY_HEAD]);
        body.push(KIND_ACK);
        put_name(&mut body, lane);
        body.extend_from_slice(&seq.to_le_bytes());
        g.lazy_acks += 1;
        let empties = g.lanes[lane].chunks.back().is_none_or(|c| c.last_seq <= seq);
        let durable = g.lazy_acks >= ACKS_PER_DURABLE_COMMIT || empties;
        self.write_entry(&mut g, &mut body, durable)?;
        if durable {
            g.lazy_acks = 0;
        }
        let dir = self.dir.clone();
        let r = trim_front(&dir, g.lanes.get_mut(lane).expect("known lane"), lane, seq)?;
        if g.lanes[lane].chunks.front().map(|c| c.seg) != front {
            if !durable {
                let path = seg_path(&self.dir, g.active_id);
                g.active.sync_data().map_err(|e| disk(&path, &e))?;
                g.lazy_acks = 0;
            }
            self.delete_dead(&mut g);
        }
        Ok(r)
    }

    /// Reads `lane` from `from_seq` on: at most `max_records` records and about
    /// `max_bytes` (at least one record if there is any).
    pub fn read_from(
        &self,
        lane: &str,
        from_seq: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, StoreError> {
        let mut g = self.inner.lock().expect("log lock");
        let l = g.lanes.get_mut(lane).ok_or_else(|| StoreError::UnknownLane(lane.into()))?;
        let from = from_seq.max(l.acked_through + 1);
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let start = l.chunks.partition_point(|c| c.last_seq < from);
        let mut want = from;
        let mut cursor = None;
        'chunks: for c in l.chunks.iter().skip(start) {
            let offset = match l.read_cursor {
                Some((next, seg, off)) if next == want && seg == c.seg && want > c.first_seq => off,
                _ => c.offset,
            };
            let path = seg_path(&self.dir, c.seg);
            let mut sc = Scanner::open(&path, offset).map_err(|e| disk(&path, &e))?;
            loop {
                let at = match sc.next() {
                    Ok(Some(at)) => at,
                    Ok(None) => break,
                    Err(Bad::Io(e)) => return Err(disk(&path, &e)),
                    Err(Bad::Torn(at, what)) => return Err(corrupt(&path, at, what)),
                };
                if sc.body[0] != KIND_COMMIT {
                    continue;
                }
                let (groups, _) = parse_commit(&sc.body).ok_or_else(|| corrupt(&path, at, "malformed commit"))?;
                for gr in groups.iter().filter(|gr| gr.lane == lane) {
                    for (i, (_, raw)) in gr.records.iter().enumerate() {
                        let s = gr.first_seq + i as u64;
                        if s < want {
                            continue;
                        }
                        if out.len() >= max_records || (bytes >= max_bytes && !out.is_empty()) {
                            cursor = Some((s, c.seg, at));
                            break 'chunks;
                        }
                        let rec: Record = minicbor::decode(raw).map_err(|e| StoreError::Corrupt {
                            lane: lane.into(),
                            seq: s,
                            message: e.to_string(),
                        })?;
                        bytes += raw.len();
                        out.push(rec);
                        want = s + 1;
                    }
                }
                if want > c.last_seq {
                    break;
                }
            }
        }
        l.read_cursor = cursor;
        Ok(out)
    }

    /// The MQTT packet ids and message hashes of the latest appends.
    pub fn mqtt_inflight(&self) -> HashMap<u16, u64> {
        self.inner.lock().expect("log lock").mqtt.clone()
    }

    /// What each configured lane holds.
    pub fn stats(&self) -> Vec<LaneStats> {
        let g = self.inner.lock().expect("log lock");
        let mut names: Vec<&String> = self.specs.keys().collect();
        names.sort();
        names
            .into_iter()
            .map(|name| {
                let l = &g.lanes[name];
                LaneStats {
                    lane: name.clone(),
                    next_seq: l.next_seq,
                    oldest_seq: l.chunks.front().map_or(l.next_seq, |c| c.first_seq),
                    records: l.records,
                    bytes: l.bytes,
                    oldest_ingest_ts_ms: None,
                }
            })
            .collect()
    }
}

/// Drops the records of `lane` through `seq` from memory: whole chunks, and the
/// front of a chunk by scanning its segment. Returns records and bytes dropped.
fn trim_front(dir: &Path, l: &mut Lane, lane: &str, seq: u64) -> Result<(u64, u64), StoreError> {
    let (mut n, mut bytes) = (0, 0);
    while let Some(c) = l.chunks.front_mut() {
        if c.last_seq <= seq {
            n += c.records;
            bytes += c.bytes;
            l.chunks.pop_front();
            continue;
        }
        if c.first_seq <= seq {
            let path = seg_path(dir, c.seg);
            let mut sc = Scanner::open(&path, c.offset).map_err(|e| disk(&path, &e))?;
            'scan: loop {
                let at = match sc.next() {
                    Ok(Some(at)) => at,
                    Ok(None) => return Err(corrupt(&path, sc.offset, "records of a chunk missing")),
                    Err(Bad::Io(e)) => return Err(disk(&path, &e)),
                    Err(Bad::Torn(at, what)) => return Err(corrupt(&path, at, what)),
                };
                if sc.body[0] != KIND_COMMIT {
                    continue;
                }
                let (groups, _) = parse_commit(&sc.body).ok_or_else(|| corrupt(&path, at, "malformed commit"))?;
                for gr in groups.iter().filter(|gr| gr.lane == lane) {
                    for (i, (_, rec)) in gr.records.iter().enumerate() {
                        let s = gr.first_seq + i as u64;
                        if s < c.first_seq {
                            continue;
                        }
                        if s > seq {
                            c.offset = at;
                            break 'scan;
                        }
                        n += 1;
                        bytes += rec.len() as u64;
                        c.records -= 1;
                        c.bytes -= rec.len() as u64;
                        c.first_seq = s + 1;
                    }
                }
            }
        }
        break;
    }
    l.records -= n;
    l.bytes -= bytes;
    l.acked_through = l.acked_through.max(seq);
    Ok((n, bytes))
}

/// Creates segment `id` holding the header and a snapshot of `lanes` and `mqtt`, and
/// makes it durable (file and folder) before returning it open for appending.
fn create_segment(
    dir: &Path,
    id: u64,
    lanes: &BTreeMap<String, Lane>,
    mqtt: &HashMap<u16, u64>,
) -> Result<(File, u64), StoreError> {
    let path = seg_path(dir, id);
    let mut buf = Vec::with_capacity(64 + mqtt.len() * 10);
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&FORMAT.to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    let head = buf.len();
    buf.extend_from_slice(&[0; ENTRY_HEAD]);
    buf.push(KIND_SNAPSHOT);
    buf.extend_from_slice(&(lanes.len() as u16).to_le_bytes());
    for (name, l) in lanes {
        put_name(&mut buf, name);
        buf.extend_from_slice(&l.next_seq.to_le_bytes());
        buf.extend_from_slice(&l.acked_through.to_le_bytes());
    }
    buf.extend_from_slice(&(mqtt.len() as u32).to_le_bytes());
    for (p, h) in mqtt {
        buf.extend_from_slice(&p.to_le_bytes());
        buf.extend_from_slice(&h.to_le_bytes());
    }
    let len = (buf.len() - head - ENTRY_HEAD) as u32;
    let crc = crc32c(&buf[head + ENTRY_HEAD..]);
    buf[head..head + 4].copy_from_slice(&len.to_le_bytes());
    buf[head + 4..head + 8].copy_from_slice(&crc.to_le_bytes());
    let mut f = OpenOptions::new().create_new(true).append(true).open(&path).map_err(|e| disk(&path, &e))?;
    let written = f.write_all(&buf).and_then(|()| f.sync_all()).and_then(|()| File::open(dir)?.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(&path);
        return Err(disk(&path, &e));
    }
    Ok((f, buf.len() as u64))
}

fn push_chunk(l: &mut Lane, seg: u64, at: u64, first_seq: u64, records: &[(u64, &[u8])]) {
    if records.is_empty() {
        return;
    }
    let n = records.len() as u64;
    let bytes: u64 = records.iter().map(|(_, r)| r.len() as u64).sum();
    let last = first_seq + n - 1;
    match l.chunks.back_mut() {
        Some(c) if c.seg == seg => {
            c.last_seq = last;
            c.records += n;
            c.bytes += bytes;
        }
        _ => l.chunks.push_back(Chunk { seg, offset: at, first_seq, last_seq: last, records: n, bytes }),
    }
    l.next_seq = l.next_seq.max(last + 1);
    l.records += n;
    l.bytes += bytes;
}

fn seg_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.seg"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;
    use std::io::BufRead;

    fn spec(name: &str, max_bytes: u64, policy: FullPolicy) -> LaneSpec {
        LaneSpec { name: name.into(), priority: 1, max_bytes, ttl_ms: None, policy }
    }

    fn lanes() -> Vec<LaneSpec> {
        vec![spec("a", 1 << 30, FullPolicy::DropOldest), spec("b", 1 << 30, FullPolicy::DropOldest)]
    }

    /// A record whose payload names `counter`, so a reader can tell which one it is.
    fn rec(lane: &str, counter: u64) -> NewRecord {
        let mut payload = counter.to_le_bytes().to_vec();
        payload.resize(200, counter as u8);
        NewRecord { lane: lane.into(), ingest_ts_ms: 1000 + counter, source: "t".into(), content_type: None, payload }
    }

    fn counter_of(r: &Record) -> u64 {
        u64::from_le_bytes(r.payload[..8].try_into().unwrap())
    }

    fn read_all(log: &SegLog, lane: &str) -> Vec<Record> {
        let mut out: Vec<Record> = Vec::new();
        loop {
            let from = out.last().map_or(0, |r| r.seq + 1);
            let got = log.read_from(lane, from, 97, 1 << 20).unwrap();
            if got.is_empty() {
                return out;
            }
            out.extend(got);
        }
    }

    fn seg_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        // Slicing by eight agrees with the byte-at-a-time tail on every split.
        let data: Vec<u8> = (0..100u8).collect();
        let whole = crc32c(&data);
        assert_ne!(whole, crc32c(&data[1..]));
        assert_eq!(whole, crc32c(&data.clone()));
    }

    #[test]
    fn append_read_ack_and_seqs_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (log, rec_) = SegLog::open(dir.path(), &lanes(), DEFAULT_SEGMENT_BYTES).unwrap();
            assert_eq!(rec_, Recovery { segments: 1, truncated_bytes: 0 });
            let app = log.append_batch(&[rec("a", 1), rec("b", 2), rec("a", 3)], &[(7, 99)]).unwrap();
            assert_eq!(app.seqs, vec![1, 1, 2]);
            let got = log.read_from("a", 1, 10, 1 << 20).unwrap();
            assert_eq!(got.iter().map(|r| (r.seq, counter_of(r))).collect::<Vec<_>>(), vec![(1, 1), (2, 3)]);
            assert_eq!(log.read_from("a", 1, 1, 1 << 20).unwrap().len(), 1, "bounded by count");
            assert_eq!(log.read_from("a", 1, 10, 1).unwrap().len(), 1, "at least one record");
            let (n, bytes) = log.ack_through("a", 2).unwrap();
            assert_eq!(n, 2);
            assert_eq!(log.ack_through("a", 2).unwrap(), (0, 0), "a repeated ack deletes nothing");
            assert_eq!(log.stats()[0].bytes, 0);
            assert!(bytes > 400);
            assert_eq!(log.mqtt_inflight()[&7], 99);
        }
        let (log, _) = SegLog::open(dir.path(), &lanes(), DEFAULT_SEGMENT_BYTES).unwrap();
        let st = log.stats();
        assert_eq!((st[0].next_seq, st[0].records, st[0].oldest_seq), (3, 0, 3));
        assert_eq!((st[1].next_seq, st[1].records), (2, 1));
        assert_eq!(read_all(&log, "b").iter().map(counter_of).collect::<Vec<_>>(), vec![2]);
        assert!(read_all(&log, "a").is_empty());
        assert_eq!(log.mqtt_inflight()[&7], 99);
        assert_eq!(log.append_batch(&[rec("a", 4)], &[]).unwrap().seqs, vec![3], "seqs are never reused");
    }

    #[test]
    fn segments_rotate_and_are_deleted_once_acked() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = SegLog::open(dir.path(), &lanes(), 4 << 10).unwrap();
        let mut c = 0;
        for _ in 0..40 {
            let batch: Vec<_> = (0..10)
                .map(|i| {
                    c += 1;
                    rec(if i % 3 == 0 { "b" } else { "a" }, c)
                })
                .collect();
            log.append_batch(&batch, &[(c as u16, c)]).unwrap();
        }
        assert!(log.segments() > 10, "{} segments", log.segments());
        let a = read_all(&log, "a");
        let b = read_all(&log, "b");
        assert_eq!(a.len() + b.len(), 400);
        assert!(a.windows(2).all(|w| w[1].seq == w[0].seq + 1 && counter_of(&w[1]) > counter_of(&w[0])));
        // Acking all of `a` frees nothing while `b` still holds records in every segment.
        log.ack_through("a", u64::MAX).unwrap();
        let held = log.segments();
        assert!(held > 10);
        // Half of `b`: the segments before its oldest record go.
        let mid = b[b.len() / 2].seq;
        log.ack_through("b", mid).unwrap();
        assert!(log.segments() < held, "{} of {held}", log.segments());
        assert_eq!(read_all(&log, "b").first().unwrap().seq, mid + 1);
        drop(log);
        let (log, rec_) = SegLog::open(dir.path(), &lanes(), 4 << 10).unwrap();
        assert_eq!(rec_.truncated_bytes, 0);
        assert_eq!(
            read_all(&log, "b").iter().map(|r| r.seq).collect::<Vec<_>>(),
            (mid + 1..=b.last().unwrap().seq).collect::<Vec<_>>()
        );
        assert!(read_all(&log, "a").is_empty());
        assert_eq!(log.stats()[0].next_seq, a.last().unwrap().seq + 1);
        assert_eq!(log.mqtt_inflight()[&400], 400, "the redelivery hashes survive rotation");
        log.ack_through("b", u64::MAX).unwrap();
        assert_eq!(seg_files(dir.path()).len(), 1, "only the active segment is left");
        drop(log);
        let (log, _) = SegLog::open(dir.path(), &lanes(), 4 << 10).unwrap();
        assert_eq!(log.append_batch(&[rec("b", 999)], &[]).unwrap().seqs, vec![b.last().unwrap().seq + 1]);
    }

    #[test]
    fn a_torn_tail_is_cut_and_everything_before_it_kept() {
        let dir = tempfile::tempdir().unwrap();
        let seg;
        let before;
        {
            let (log, _) = SegLog::open(dir.path(), &lanes(), DEFAULT_SEGMENT_BYTES).unwrap();
            for c in 0..5 {
                log.append_batch(&[rec("a", c), rec("a", c + 100)], &[]).unwrap();
            }
            seg = seg_files(dir.path()).pop().unwrap();
            before = std::fs::metadata(&seg).unwrap().len();
            log.append_batch(&[rec("a", 50), rec("a", 51)], &[]).unwrap();
        }
        let full = std::fs::read(&seg).unwrap();
        // Every cut inside the last entry, and garbage after it.
        let mut cases: Vec<Vec<u8>> =
            (before as usize + 1..full.len()).step_by(7).map(|n| full[..n].to_vec()).collect();
        let mut junk = full[..before as usize].to_vec();
        junk.extend_from_slice(&[0u8; 300]);
        cases.push(junk);
        let mut flipped = full.clone();
        *flipped.last_mut().unwrap() ^= 0x40;
        cases.push(flipped);
        for (i, bytes) in cases.iter().enumerate() {
            std::fs::write(&seg, bytes).unwrap();
            let (log, r) = SegLog::open(dir.path(), &lanes(), DEFAULT_SEGMENT_BYTES).unwrap();
            assert_eq!(r.truncated_bytes, bytes.len() as u64 - before, "case {i}");
            assert_eq!(std::fs::metadata(&seg).unwrap().len(), before, "case {i}: cut back to the last whole entry");
            let got = read_all(&log, "a");
            assert_eq!(got.len(), 10, "case {i}");
            assert_eq!(log.append_batch(&[rec("a", 7)], &[]).unwrap().seqs, vec![11], "case {i}");
            drop(log);
        }
    }

    #[test]
    fn a_segment_cut_while_being_created_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (log, _) = SegLog::open(dir.path(), &lanes(), 4 << 10).unwrap();
            for c in 0..40 {
                log.append_batch(&[rec("a", c)], &[]).unwrap();
            }
        }
        let newest = seg_files(dir.path()).pop().unwrap();
        let id = u64::from_str_radix(newest.file_stem().unwrap().to_str().unwrap(), 16).unwrap();
        let full = std::fs::read(&newest).unwrap();
        // The next segment cut after its header, inside its snapshot, and empty.
        for cut in [HEADER_LEN as usize, HEADER_LEN as usize + 5, 3, 0] {
            let next = seg_path(dir.path(), id + 1);
            std::fs::write(&next, &full[..cut]).unwrap();
            let (log, r) = SegLog::open(dir.path(), &lanes(), 4 << 10).unwrap();
            assert_eq!(r.truncated_bytes, cut as u64, "cut {cut}");
            assert!(!next.exists(), "cut {cut}");
            assert_eq!(read_all(&log, "a").len(), 40, "cut {cut}");
        }
        let (log, _) = SegLog::open(dir.path(), &lanes(), 4 << 10).unwrap();
        assert_eq!(log.append_batch(&[rec("a", 99)], &[]).unwrap().seqs, vec![41]);
    }

    #[test]
    fn damage_before_the_newest_segment_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (log, _) = SegLog::open(dir.path(), &lanes(), 4 << 10).unwrap();
            for c in 0..60 {
                log.append_batch(&[rec("a", c)], &[]).unwrap();
            }
        }
        let files = seg_files(dir.path());
        assert!(files.len() > 2);
        let victim = &files[1];
        let mut bytes = std::fs::read(victim).unwrap();
        bytes[HEADER_LEN as usize + 40] ^= 0xff;
        std::fs::write(victim, &bytes).unwrap();
        let err = SegLog::open(dir.path(), &lanes(), 4 << 10).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&victim.display().to_string()) && msg.contains("offset"), "{msg}");
        assert_eq!(std::fs::read(victim).unwrap(), bytes, "the damaged file is left for inspection");
        std::fs::write(victim, b"not a log at all, but long enough to be a header").unwrap();
        let msg = SegLog::open(dir.path(), &lanes(), 4 << 10).unwrap_err().to_string();
        assert!(msg.contains("not a VOITHER log segment"), "{msg}");
    }

    #[test]
    fn backpressure_refuses_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) =
            SegLog::open(dir.path(), &[spec("a", 700, FullPolicy::Backpressure)], DEFAULT_SEGMENT_BYTES).unwrap();
        log.append_batch(&[rec("a", 1), rec("a", 2)], &[]).unwrap();
        let size = std::fs::metadata(&seg_files(dir.path())[0]).unwrap().len();
        let err = log.append_batch(&[rec("a", 3), rec("a", 4)], &[(1, 1)]).unwrap_err();
        assert!(matches!(err, StoreError::Full { .. }), "{err}");
        assert_eq!(std::fs::metadata(&seg_files(dir.path())[0]).unwrap().len(), size);
        assert!(log.mqtt_inflight().is_empty());
        log.ack_through("a", 1).unwrap();
        assert_eq!(log.append_batch(&[rec("a", 3)], &[]).unwrap().seqs, vec![3]);
        let err = log.append_batch(&[rec("zzz", 1)], &[]).unwrap_err();
        assert!(matches!(err, StoreError::UnknownLane(ref l) if l == "zzz"), "{err}");
    }

    /// The writer of the SIGKILL loop: appends random batches to two lanes, acks a
    /// prefix now and then. It prints each append (`A lane first_seq n first_counter`)
    /// only after the call returned, and each ack (`K lane seq`) before the call, as a
    /// hub's ack arrives before the store deletes.
    fn sigkill_child(dir: &Path, mut counter: u64) -> ! {
        let (log, _) = SegLog::open(dir, &lanes(), 32 << 10).unwrap();
        let mut rng = rand::rng();
        let out = std::io::stdout();
        // The harness has printed "test <name> ... " without a newline.
        writeln!(out.lock()).unwrap();
        loop {
            let lane = if rng.random_bool(0.7) { "a" } else { "b" };
            let n = rng.random_range(1..=80u64);
            let batch: Vec<_> = (0..n).map(|i| rec(lane, counter + i)).collect();
            let app = log.append_batch(&batch, &[]).unwrap();
            writeln!(out.lock(), "A {lane} {} {n} {counter}", app.seqs[0]).unwrap();
            counter += n;
            if rng.random_bool(0.4) {
                let st = log.stats();
                let l = if rng.random_bool(0.5) { &st[0] } else { &st[1] };
                if l.records > 0 {
                    let through = rng.random_range(l.oldest_seq..l.next_seq);
                    // Printed first: it stands for the hub's ack, which the store
                    // may act on (durably) before this process dies.
                    writeln!(out.lock(), "K {} {through}", l.lane).unwrap();
                    log.ack_through(&l.lane, through).unwrap();
                }
            }
        }
    }

    #[test]
    fn sigkill_loop_loses_nothing_acknowledged_and_reuses_no_seq() {
        if let (Ok(dir), Ok(c)) = (std::env::var("VOITHER_SEGLOG_CHILD_DIR"), std::env::var("VOITHER_SEGLOG_COUNTER")) {
            sigkill_child(Path::new(&dir), c.parse().unwrap());
        }
        let dir = tempfile::tempdir().unwrap();
        let exe = std::env::current_exe().unwrap();
        let mut rng = rand::rng();
        // Per lane: seq -> counter of every append that returned; the highest ack sent.
        let mut known: HashMap<&str, BTreeMap<u64, u64>> =
            HashMap::from([("a", BTreeMap::new()), ("b", BTreeMap::new())]);
        let mut acked: HashMap<&str, u64> = HashMap::from([("a", 0), ("b", 0)]);
        let mut counter = 0u64;
        let mut cut_total = 0;
        const CYCLES: usize = 200;
        for cycle in 0..CYCLES {
            let mut child = std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "seglog::tests::sigkill_loop_loses_nothing_acknowledged_and_reuses_no_seq",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("VOITHER_SEGLOG_CHILD_DIR", dir.path())
                .env("VOITHER_SEGLOG_COUNTER", counter.to_string())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
            // Wait for the child's first append (an event), then kill it at a random
            // moment in the next 0-40 ms: mid-write, mid-fsync, mid-rotation.
            let mut seen = Vec::new();
            loop {
                let l = lines.next().expect("the child appends before it is killed").unwrap();
                let first = l.starts_with("A ");
                seen.push(l);
                if first {
                    break;
                }
            }
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(std::time::Duration::from_millis(rng.random_range(0..40)));
            child.kill().unwrap();
            child.wait().unwrap();
            seen.extend(lines.map_while(Result::ok));
            let mut max_counter = counter;
            // The test harness's own lines ("running 1 test") are not the child's.
            for l in seen.iter().filter(|l| l.starts_with("A ") || l.starts_with("K ")) {
                let f: Vec<&str> = l.split(' ').collect();
                let lane = if f[1] == "a" { "a" } else { "b" };
                match f[0] {
                    "A" => {
                        let (seq, n, c): (u64, u64, u64) =
                            (f[2].parse().unwrap(), f[3].parse().unwrap(), f[4].parse().unwrap());
                        for i in 0..n {
                            known.get_mut(lane).unwrap().insert(seq + i, c + i);
                        }
                        max_counter = max_counter.max(c + n);
                    }
                    "K" => {
                        let a = acked.get_mut(lane).unwrap();
                        *a = (*a).max(f[2].parse().unwrap());
                    }
                    other => panic!("unexpected child output {other:?}"),
                }
            }
            // What the reopened log holds, against what the child was told.
            let (log, r) = SegLog::open(dir.path(), &lanes(), 32 << 10).unwrap();
            cut_total += r.truncated_bytes;
            for lane in ["a", "b"] {
                let k = &known[lane];
                let got = read_all(&log, lane);
                let st = log.stats().into_iter().find(|s| s.lane == lane).unwrap();
                assert_eq!(st.records, got.len() as u64, "cycle {cycle} lane {lane}: counters match contents");
                assert!(got.windows(2).all(|w| w[1].seq == w[0].seq + 1), "cycle {cycle} lane {lane}: no hole");
                for r in &got {
                    match k.get(&r.seq) {
                        Some(c) => assert_eq!(counter_of(r), *c, "cycle {cycle} lane {lane} seq {}", r.seq),
                        // Durable, but the child was killed before it heard: only the
                        // last batch, past everything it heard of.
                        None => assert!(
                            r.seq > k.keys().last().copied().unwrap_or(0) && counter_of(r) >= counter,
                            "cycle {cycle} lane {lane}: seq {} (counter {}) was never appended; last known {:?}, counter from {counter}",
                            r.seq,
                            counter_of(r),
                            k.iter().last()
                        ),
                    }
                }
                let want_from = acked[lane] + 1;
                let present: std::collections::HashSet<u64> = got.iter().map(|r| r.seq).collect();
                for seq in k.range(want_from..).map(|(s, _)| *s) {
                    assert!(
                        present.contains(&seq),
                        "cycle {cycle} lane {lane}: acknowledged seq {seq} lost; held {:?}..{:?} ({}), acked {}, {st:?}",
                        got.first().map(|r| r.seq),
                        got.last().map(|r| r.seq),
                        got.len(),
                        acked[lane]
                    );
                }
                let last_known = k.keys().last().copied().unwrap_or(0);
                assert!(st.next_seq > last_known, "cycle {cycle} lane {lane}: seqs are never reused");
                // Durable-but-unheard records count as the child's from now on.
                for r in got.iter().filter(|r| !k.contains_key(&r.seq)) {
                    max_counter = max_counter.max(counter_of(r) + 1);
                }
            }
            for lane in ["a", "b"] {
                for r in read_all(&log, lane) {
                    known.get_mut(lane).unwrap().insert(r.seq, counter_of(&r));
                }
            }
            counter = max_counter;
        }
        let (log, _) = SegLog::open(dir.path(), &lanes(), 32 << 10).unwrap();
        println!(
            "seglog SIGKILL loop: {CYCLES} kills, {counter} records appended, {} torn bytes cut, {} segments left",
            cut_total,
            log.segments()
        );
        assert!(counter > 0);
    }
}
