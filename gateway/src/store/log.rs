//! The store's on-disk format: segment files of checksummed entries, and the replay
//! that rebuilds the store's state from them. See the [`store`](super) module for the
//! layout and the invariants.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use voither_proto::GapReason;

use super::{reason_code, reason_from, StoreError};

pub(super) const MAGIC: &[u8; 8] = b"VOITHLOG";
pub(super) const FORMAT: u32 = 1;
pub(super) const HEADER_LEN: u64 = 16;
pub(super) const ENTRY_HEAD: usize = 8;
pub(super) const KIND_SNAPSHOT: u8 = 1;
pub(super) const KIND_COMMIT: u8 = 2;
pub(super) const KIND_ACK: u8 = 3;
pub(super) const KIND_EVICT: u8 = 4;
/// Largest entry body accepted when reading: a length beyond it is a torn or corrupt
/// length field, not an allocation to attempt.
pub const MAX_BODY: u32 = 256 << 20;

/// CRC-32C (Castagnoli) of `data`: the CPU's CRC instruction where it has one
/// (x86_64 SSE 4.2, aarch64 CRC), tables otherwise.
pub(super) fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
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

/// Reads entries of a segment from `offset`; `Ok(None)` at a clean end.
pub(super) struct Scanner {
    r: BufReader<File>,
    pub offset: u64,
    pub len: u64,
    pub body: Vec<u8>,
}

/// Why a scan stopped before the end of the file.
pub(super) enum Bad {
    /// The entry at this offset is cut short or fails its CRC.
    Torn(u64, &'static str),
    Io(std::io::Error),
}

impl Scanner {
    pub fn open(path: &Path, offset: u64) -> std::io::Result<Scanner> {
        let f = File::open(path)?;
        let len = f.metadata()?.len();
        let mut r = BufReader::with_capacity(128 << 10, f);
        r.seek(SeekFrom::Start(offset))?;
        Ok(Scanner { r, offset, len, body: Vec::new() })
    }

    /// The next commit entry, skipping other kinds: its offset and contents. The end of
    /// the file is an error here: callers look for records an index says are there.
    pub fn next_commit(&mut self, path: &Path) -> Result<(u64, Commit<'_>), StoreError> {
        loop {
            let at = match self.next() {
                Ok(Some(at)) => at,
                Ok(None) => return Err(corrupt(path, self.offset, "records of a lane missing from the segment")),
                Err(Bad::Io(e)) => return Err(disk(path, &e)),
                Err(Bad::Torn(at, what)) => return Err(corrupt(path, at, what)),
            };
            if self.body[0] == KIND_COMMIT {
                let commit = parse_commit(&self.body).ok_or_else(|| corrupt(path, at, "malformed commit"))?;
                return Ok((at, commit));
            }
        }
    }

    /// The next entry: its offset, and its body in `self.body`.
    pub fn next(&mut self) -> Result<Option<u64>, Bad> {
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

pub(super) fn corrupt(path: &Path, offset: u64, what: &str) -> StoreError {
    StoreError::Damaged { path: path.to_path_buf(), offset, what: what.to_string() }
}

pub(super) fn disk(path: &Path, e: &std::io::Error) -> StoreError {
    StoreError::Disk(format!("{}: {e}", path.display()))
}

pub(super) fn seg_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.seg"))
}

/// Segment ids in `dir`, oldest first.
pub(super) fn segment_ids(dir: &Path) -> Result<Vec<u64>, StoreError> {
    let mut ids = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| disk(dir, &e))? {
        let e = e.map_err(|e| disk(dir, &e))?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if let Some(id) = name.strip_suffix(".seg").and_then(|h| u64::from_str_radix(h, 16).ok()) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

pub(super) fn put_name(out: &mut Vec<u8>, name: &str) {
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
}

/// An evicted range as entries carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct EvictRange {
    pub lane: String,
    pub from_seq: u64,
    pub through_seq: u64,
    pub reason: GapReason,
}

pub(super) fn put_evictions(out: &mut Vec<u8>, ev: &[EvictRange]) {
    out.extend_from_slice(&(ev.len() as u16).to_le_bytes());
    for e in ev {
        put_name(out, &e.lane);
        out.extend_from_slice(&e.from_seq.to_le_bytes());
        out.extend_from_slice(&e.through_seq.to_le_bytes());
        out.push(reason_code(e.reason));
    }
}

fn get_evictions(b: &mut Body<'_>) -> Option<Vec<EvictRange>> {
    let n = b.u16()?;
    let mut v = Vec::with_capacity(n as usize);
    for _ in 0..n {
        v.push(EvictRange {
            lane: b.name()?.to_string(),
            from_seq: b.u64()?,
            through_seq: b.u64()?,
            reason: reason_from(b.u8()?),
        });
    }
    Some(v)
}

pub(super) fn put_mqtt<'a>(out: &mut Vec<u8>, n: usize, pairs: impl Iterator<Item = (&'a u16, &'a u64)>) {
    out.extend_from_slice(&(n as u32).to_le_bytes());
    for (p, h) in pairs {
        out.extend_from_slice(&p.to_le_bytes());
        out.extend_from_slice(&h.to_le_bytes());
    }
}

fn get_mqtt(b: &mut Body<'_>) -> Option<Vec<(u16, u64)>> {
    let n = b.u32()?;
    let mut v = Vec::with_capacity(n.min(1 << 16) as usize);
    for _ in 0..n {
        v.push((b.u16()?, b.u64()?));
    }
    Some(v)
}

/// One lane's records in a commit entry.
pub(super) struct Group<'a> {
    pub lane: &'a str,
    pub first_seq: u64,
    /// `(ingest time, CBOR bytes)` of each record, seq `first_seq + i`.
    pub records: Vec<(u64, &'a [u8])>,
}

/// A commit entry: records per lane, what the commit evicted, the MQTT `(packet id,
/// hash)` pairs.
pub(super) struct Commit<'a> {
    pub groups: Vec<Group<'a>>,
    pub evicted: Vec<EvictRange>,
    pub mqtt: Vec<(u16, u64)>,
}

pub(super) fn parse_commit(body: &[u8]) -> Option<Commit<'_>> {
    let mut b = Body { b: body, at: 1 };
    let n = b.u16()?;
    let mut groups = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let lane = b.name()?;
        let first_seq = b.u64()?;
        let n = b.u32()?;
        let mut records = Vec::with_capacity(n.min(1 << 16) as usize);
        for _ in 0..n {
            let len = b.u32()? as usize;
            let ts = b.u64()?;
            records.push((ts, b.take(len)?));
        }
        groups.push(Group { lane, first_seq, records });
    }
    let evicted = get_evictions(&mut b)?;
    let mqtt = get_mqtt(&mut b)?;
    (b.at == body.len()).then_some(Commit { groups, evicted, mqtt })
}

/// One lane in a snapshot.
pub(super) struct SnapLane {
    pub name: String,
    pub next_seq: u64,
    pub front: u64,
    pub acked: u64,
    pub gaps: Vec<(u64, u64, GapReason)>,
}

/// A snapshot entry: its lanes and the MQTT `(packet id, hash)` pairs.
type Snapshot = (Vec<SnapLane>, Vec<(u16, u64)>);

fn parse_snapshot(body: &[u8]) -> Option<Snapshot> {
    let mut b = Body { b: body, at: 1 };
    let n = b.u16()?;
    let mut lanes = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let name = b.name()?.to_string();
        let (next_seq, front, acked) = (b.u64()?, b.u64()?, b.u64()?);
        let g = b.u32()?;
        let mut gaps = Vec::with_capacity(g.min(1 << 16) as usize);
        for _ in 0..g {
            gaps.push((b.u64()?, b.u64()?, reason_from(b.u8()?)));
        }
        lanes.push(SnapLane { name, next_seq, front, acked, gaps });
    }
    let mqtt = get_mqtt(&mut b)?;
    (b.at == body.len()).then_some((lanes, mqtt))
}

fn parse_ack(body: &[u8]) -> Option<(&str, u64)> {
    let mut b = Body { b: body, at: 1 };
    let r = (b.name()?, b.u64()?);
    (b.at == body.len()).then_some(r)
}

fn parse_evict(body: &[u8]) -> Option<Vec<EvictRange>> {
    let mut b = Body { b: body, at: 1 };
    let r = get_evictions(&mut b)?;
    (b.at == body.len()).then_some(r)
}

/// The records of one lane in one segment that are still held.
#[derive(Debug, Clone)]
pub(super) struct Chunk {
    pub seg: u64,
    /// Offset of the entry holding `first_seq` (where a scan for it starts).
    pub offset: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub records: u64,
    pub bytes: u64,
}

/// What the store knows of one lane.
#[derive(Debug, Clone)]
pub(super) struct Lane {
    pub next_seq: u64,
    /// Every record at or below this seq is gone (acknowledged or evicted).
    pub front: u64,
    /// The highest seq a hub acknowledged.
    pub acked: u64,
    pub records: u64,
    pub bytes: u64,
    pub chunks: VecDeque<Chunk>,
    /// Evicted ranges not yet acknowledged: first seq -> (last seq, reason).
    pub gaps: BTreeMap<u64, (u64, GapReason)>,
    /// What reads found of the records ahead of the front, oldest first: acks of what
    /// was read move the front without reading those records again, and the next read
    /// goes on from where the newest one stopped.
    pub read_marks: VecDeque<ReadMark>,
}

/// Most [`ReadMark`]s a lane keeps: reads run ahead of acks by the uplink's window of
/// batches. When full, the oldest goes, and an ack of its records scans for them.
pub(super) const MAX_READ_MARKS: usize = 1024;

/// What one read found of one chunk: the lane's records `first..=through` of segment
/// `seg`, their number and bytes, and `resume_at`, the offset of the entry holding
/// `through + 1` (or, if none was written yet, where the read left the segment).
/// Records do not change once written, so a mark stays true while its records are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ReadMark {
    pub seg: u64,
    pub first: u64,
    pub through: u64,
    pub records: u64,
    pub bytes: u64,
    pub resume_at: u64,
}

impl Default for Lane {
    /// A lane that never held a record: seqs start at 1.
    fn default() -> Lane {
        Lane {
            next_seq: 1,
            front: 0,
            acked: 0,
            records: 0,
            bytes: 0,
            chunks: VecDeque::new(),
            gaps: BTreeMap::new(),
            read_marks: VecDeque::new(),
        }
    }
}

impl Lane {
    /// Keeps what a read found of one chunk (see [`ReadMark`]). Marks stay in seq
    /// order: a read that goes back (a resend after a reconnect) starts them afresh.
    pub fn mark_read(&mut self, m: ReadMark) {
        if m.records == 0 {
            return;
        }
        if self.read_marks.back().is_some_and(|b| b.through >= m.first) {
            self.read_marks.clear();
        }
        if self.read_marks.len() == MAX_READ_MARKS {
            self.read_marks.pop_front();
        }
        self.read_marks.push_back(m);
    }

    /// Records `records` (first seq `first_seq`) of the entry at `at` of segment `seg`.
    pub fn push(&mut self, seg: u64, at: u64, first_seq: u64, sizes: impl Iterator<Item = u64>) {
        let (mut n, mut bytes) = (0u64, 0u64);
        for s in sizes {
            n += 1;
            bytes += s;
        }
        if n == 0 {
            return;
        }
        let last = first_seq + n - 1;
        match self.chunks.back_mut() {
            Some(c) if c.seg == seg => {
                c.last_seq = last;
                c.records += n;
                c.bytes += bytes;
            }
            _ => self.chunks.push_back(Chunk { seg, offset: at, first_seq, last_seq: last, records: n, bytes }),
        }
        self.next_seq = self.next_seq.max(last + 1);
        self.records += n;
        self.bytes += bytes;
    }

    /// Adds an evicted range, merged with the previous one when adjacent and of the
    /// same reason.
    pub fn add_gap(&mut self, from: u64, through: u64, reason: GapReason) {
        if let Some((&f, &(t, r))) = self.gaps.iter().next_back() {
            if t + 1 == from && r == reason {
                self.gaps.insert(f, (through, r));
                return;
            }
        }
        self.gaps.insert(from, (through, reason));
    }

    /// A hub acknowledged everything through `seq`: gaps at or below it go.
    pub fn ack_gaps(&mut self, seq: u64) {
        let covered: Vec<(u64, (u64, GapReason))> = self.gaps.range(..=seq).map(|(k, v)| (*k, *v)).collect();
        for (from, (through, reason)) in covered {
            self.gaps.remove(&from);
            if through > seq {
                self.gaps.insert(seq + 1, (through, reason));
            }
        }
        self.acked = self.acked.max(seq);
    }
}

/// Calls `f(seq, encoded size, ingest time)` for the records of `l` from its oldest
/// held one on, in order, while it returns true.
pub(super) fn walk_front(
    dir: &Path,
    lane: &str,
    l: &Lane,
    mut f: impl FnMut(u64, u64, u64) -> bool,
) -> Result<(), StoreError> {
    for c in &l.chunks {
        let path = seg_path(dir, c.seg);
        let mut sc = Scanner::open(&path, c.offset).map_err(|e| disk(&path, &e))?;
        let mut next = c.first_seq;
        while next <= c.last_seq {
            let (_, commit) = sc.next_commit(&path)?;
            for g in commit.groups.iter().filter(|g| g.lane == lane) {
                for (i, (ts, rec)) in g.records.iter().enumerate() {
                    let seq = g.first_seq + i as u64;
                    if seq < next {
                        continue;
                    }
                    if !f(seq, rec.len() as u64, *ts) {
                        return Ok(());
                    }
                    next = seq + 1;
                }
            }
        }
    }
    Ok(())
}

/// Drops the records of `l` through `seq` from memory: whole chunks, and the front of
/// a chunk by scanning its segment. Returns records and bytes dropped.
pub(super) fn trim_front(dir: &Path, l: &mut Lane, lane: &str, seq: u64) -> Result<(u64, u64), StoreError> {
    // The entry that moves the front is durable already; the counters follow each
    // record dropped, so an error part way leaves them matching what is held.
    l.front = l.front.max(seq);
    let (mut n, mut bytes) = (0, 0);
    while let Some(c) = l.chunks.front_mut() {
        if c.last_seq <= seq {
            n += c.records;
            bytes += c.bytes;
            l.records -= c.records;
            l.bytes -= c.bytes;
            l.chunks.pop_front();
            continue;
        }
        if c.first_seq <= seq {
            // Marks of records no longer held, or of a part of them, are of no use.
            while l.read_marks.front().is_some_and(|m| m.seg < c.seg || (m.seg == c.seg && m.first < c.first_seq)) {
                l.read_marks.pop_front();
            }
            if let Some(m) = l.read_marks.front().copied().filter(|m| {
                m.seg == c.seg
                    && m.first == c.first_seq
                    && m.through <= seq
                    && m.through < c.last_seq
                    && m.records < c.records
                    && m.bytes <= c.bytes
            }) {
                // A read found these records: drop them without reading them again.
                l.read_marks.pop_front();
                n += m.records;
                bytes += m.bytes;
                c.records -= m.records;
                c.bytes -= m.bytes;
                c.first_seq = m.through + 1;
                c.offset = m.resume_at;
                l.records -= m.records;
                l.bytes -= m.bytes;
                continue;
            }
            let path = seg_path(dir, c.seg);
            let mut sc = Scanner::open(&path, c.offset).map_err(|e| disk(&path, &e))?;
            'scan: loop {
                let (at, commit) = sc.next_commit(&path)?;
                for g in commit.groups.iter().filter(|g| g.lane == lane) {
                    for (i, (_, rec)) in g.records.iter().enumerate() {
                        let s = g.first_seq + i as u64;
                        if s < c.first_seq {
                            continue;
                        }
                        if s > seq {
                            c.offset = at;
                            break 'scan;
                        }
                        let size = rec.len() as u64;
                        n += 1;
                        bytes += size;
                        c.records -= 1;
                        c.bytes -= size;
                        c.first_seq = s + 1;
                        l.records -= 1;
                        l.bytes -= size;
                    }
                }
            }
        }
        break;
    }
    Ok((n, bytes))
}

/// Writes the header and a snapshot of `lanes` and `mqtt` as segment `id`, durably
/// (file and folder), and returns it open for appending with its length.
pub(super) fn create_segment(
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
        buf.extend_from_slice(&l.front.to_le_bytes());
        buf.extend_from_slice(&l.acked.to_le_bytes());
        buf.extend_from_slice(&(l.gaps.len() as u32).to_le_bytes());
        for (from, (through, reason)) in &l.gaps {
            buf.extend_from_slice(&from.to_le_bytes());
            buf.extend_from_slice(&through.to_le_bytes());
            buf.push(reason_code(*reason));
        }
    }
    put_mqtt(&mut buf, mqtt.len(), mqtt.iter());
    seal(&mut buf[head..]);
    // A file of this id can only be what an earlier failed creation left: replace it.
    let written = OpenOptions::new().create(true).truncate(true).write(true).open(&path).and_then(|mut f| {
        f.write_all(&buf)?;
        f.sync_all()?;
        File::open(dir)?.sync_all()?;
        OpenOptions::new().append(true).open(&path)
    });
    match written {
        Ok(f) => Ok((f, buf.len() as u64)),
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            Err(disk(&path, &e))
        }
    }
}

/// Fills in the head (length, CRC) of the entry in `buf` (head first, then body).
pub(super) fn seal(buf: &mut [u8]) {
    let len = (buf.len() - ENTRY_HEAD) as u32;
    let crc = crc32c(&buf[ENTRY_HEAD..]);
    buf[0..4].copy_from_slice(&len.to_le_bytes());
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// The state rebuilt from a store folder.
#[derive(Debug, Default)]
pub(super) struct Replayed {
    pub lanes: BTreeMap<String, Lane>,
    pub mqtt: HashMap<u16, u64>,
    /// Segments kept, oldest first, with their lengths.
    pub segments: Vec<(u64, u64)>,
    /// Bytes cut (or, read-only, that would be cut) from the newest segment: a write
    /// torn by a crash.
    pub torn_bytes: u64,
}

/// Replays the segments of `dir` for `lanes` (lanes found in the files are kept too).
/// With `repair`, a torn tail of the newest segment is cut off and a newest segment
/// without a snapshot deleted; without it, the files are only read.
pub(super) fn replay(dir: &Path, lanes: &[String], repair: bool) -> Result<Replayed, StoreError> {
    let ids = segment_ids(dir)?;
    let mut out =
        Replayed { lanes: lanes.iter().map(|l| (l.clone(), Lane::default())).collect(), ..Default::default() };
    let last = ids.last().copied();
    for &id in &ids {
        let path = seg_path(dir, id);
        let is_last = Some(id) == last;
        let mut head = [0u8; HEADER_LEN as usize];
        let header = File::open(&path).and_then(|mut f| f.read_exact(&mut head));
        let being_created = match header {
            Ok(())
                if &head[0..8] == MAGIC && u32::from_le_bytes(head[8..12].try_into().expect("4 bytes")) == FORMAT =>
            {
                false
            }
            Ok(()) if &head[0..8] == MAGIC => return Err(corrupt(&path, 8, "segment of an unknown format version")),
            // Zeros where the header should be: the newest segment was being created
            // when the power went (its size reached the disk, its data did not).
            Ok(()) if is_last && head.iter().all(|b| *b == 0) => true,
            Ok(()) => return Err(corrupt(&path, 0, "not a VOITHER store segment")),
            Err(e) if e.kind() != std::io::ErrorKind::UnexpectedEof => return Err(disk(&path, &e)),
            Err(_) if !is_last => return Err(corrupt(&path, 0, "segment header cut short")),
            // The newest segment was being created when the process stopped.
            Err(_) => true,
        };
        if being_created {
            let len = std::fs::metadata(&path).map_err(|e| disk(&path, &e))?.len();
            drop_unfinished(&path, len, repair, &mut out.torn_bytes)?;
            continue;
        }
        let mut sc = Scanner::open(&path, HEADER_LEN).map_err(|e| disk(&path, &e))?;
        let mut first = true;
        let mut end = sc.len;
        loop {
            let at = match sc.next() {
                Ok(Some(at)) => at,
                Ok(None) => break,
                Err(Bad::Io(e)) => return Err(disk(&path, &e)),
                Err(Bad::Torn(at, what)) => {
                    if !is_last {
                        return Err(corrupt(&path, at, what));
                    }
                    end = at;
                    break;
                }
            };
            let body = &sc.body;
            let bad = |what| corrupt(&path, at, what);
            if first && body[0] != KIND_SNAPSHOT {
                return Err(bad("segment does not start with a snapshot"));
            }
            match body[0] {
                KIND_SNAPSHOT => {
                    let (ls, m) = parse_snapshot(body).ok_or_else(|| bad("malformed snapshot"))?;
                    let oldest = out.segments.is_empty() && first;
                    for s in ls {
                        let l = out.lanes.entry(s.name).or_default();
                        l.next_seq = l.next_seq.max(s.next_seq);
                        l.front = l.front.max(s.front);
                        l.acked = l.acked.max(s.acked);
                        if oldest {
                            l.gaps = s.gaps.into_iter().map(|(f, t, r)| (f, (t, r))).collect();
                        }
                    }
                    if oldest {
                        out.mqtt = m.into_iter().collect();
                    }
                }
                KIND_COMMIT => {
                    let c = parse_commit(body).ok_or_else(|| bad("malformed commit"))?;
                    for g in &c.groups {
                        let l = out.lanes.entry(g.lane.to_string()).or_default();
                        if g.first_seq < l.next_seq {
                            return Err(bad("a commit reuses seqs of its lane"));
                        }
                        l.push(id, at, g.first_seq, g.records.iter().map(|(_, r)| r.len() as u64));
                    }
                    apply_evictions(&mut out.lanes, &c.evicted);
                    out.mqtt.extend(c.mqtt);
                }
                KIND_ACK => {
                    let (name, through) = parse_ack(body).ok_or_else(|| bad("malformed ack"))?;
                    let l = out.lanes.entry(name.to_string()).or_default();
                    l.front = l.front.max(through);
                    l.ack_gaps(through);
                }
                KIND_EVICT => {
                    let ev = parse_evict(body).ok_or_else(|| bad("malformed eviction"))?;
                    apply_evictions(&mut out.lanes, &ev);
                }
                _ => return Err(bad("unknown entry kind")),
            }
            first = false;
        }
        if first {
            // No whole snapshot: the newest segment was being created (appends start
            // only once its snapshot is durable), so it holds nothing.
            if !is_last {
                return Err(corrupt(&path, HEADER_LEN, "segment without a snapshot"));
            }
            drop_unfinished(&path, sc.len, repair, &mut out.torn_bytes)?;
            continue;
        }
        if end < sc.len {
            out.torn_bytes += sc.len - end;
            if repair {
                let f = OpenOptions::new().write(true).open(&path).map_err(|e| disk(&path, &e))?;
                f.set_len(end).and_then(|()| f.sync_all()).map_err(|e| disk(&path, &e))?;
                tracing::warn!(segment = %path.display(), offset = end, cut = sc.len - end,
                    "Cut a write torn by a crash from the end of the store.");
            }
        }
        out.segments.push((id, end));
    }
    let names: Vec<String> = out.lanes.keys().cloned().collect();
    for name in names {
        let l = out.lanes.get_mut(&name).expect("listed");
        let front = l.front;
        trim_front(dir, l, &name, front)?;
    }
    Ok(out)
}

/// A newest segment that was being created holds nothing acknowledged: its `len`
/// bytes count as torn, and with `repair` the file goes.
fn drop_unfinished(path: &Path, len: u64, repair: bool, torn: &mut u64) -> Result<(), StoreError> {
    *torn += len;
    if repair {
        std::fs::remove_file(path).map_err(|e| disk(path, &e))?;
    }
    Ok(())
}

/// Applies evicted ranges (gaps in memory; the records' front moves past them). The
/// records themselves are dropped from the chunks by [`trim_front`] afterwards.
pub(super) fn apply_evictions(lanes: &mut BTreeMap<String, Lane>, ev: &[EvictRange]) {
    for e in ev {
        let l = lanes.entry(e.lane.clone()).or_default();
        l.add_gap(e.from_seq, e.through_seq, e.reason);
        l.front = l.front.max(e.through_seq);
    }
}
