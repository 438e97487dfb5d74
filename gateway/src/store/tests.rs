use super::log::{crc32c, seg_path, HEADER_LEN};
use super::*;
use rand::Rng;
use std::io::BufRead;

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
    let s = open(&dir.path().join("s"), &lanes(), u64::MAX);
    s.append_batch(&[rec("a", 1)], &[]).unwrap();
    s.stats().unwrap()[0].bytes
}

#[test]
fn append_read_ack_and_seqs_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s");
    let sz = size();
    {
        let s = open(&p, &lanes(), u64::MAX);
        let app = s.append_batch(&[rec("a", 1), rec("b", 2), rec("a", 3)], &[(7, 99)]).unwrap();
        assert_eq!(app.seqs, vec![1, 1, 2]);
        assert!(app.evicted.is_empty());
        let (got, gaps) = s.read_from("a", 1, 10, 1 << 20).unwrap();
        let got = got.to_vec();
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
    let s = open(&dir.path().join("s"), &lanes(), u64::MAX);
    let batch: Vec<_> = (0..50).map(|i| rec("a", i)).collect();
    s.append_batch(&batch, &[]).unwrap();
    assert_eq!(s.read_from("a", 1, 7, 1 << 20).unwrap().0.len(), 7);
    assert_eq!(s.read_from("a", 1, 100, 1).unwrap().0.len(), 1, "at least one item");
    assert_eq!(s.read_from("a", 45, 100, 1 << 20).unwrap().0.len(), 6);
}

#[test]
fn unknown_lane_is_an_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir.path().join("s"), &lanes(), u64::MAX);
    let err = s.append_batch(&[rec("a", 1), rec("zzz", 2)], &[]).unwrap_err();
    assert!(matches!(err, StoreError::UnknownLane(ref l) if l == "zzz"), "{err}");
    assert_eq!(s.count_rows("a").unwrap(), 0);
    assert_eq!(s.append_batch(&[rec("a", 1)], &[]).unwrap().seqs, vec![1], "no seq was consumed");
}

#[test]
fn drop_oldest_evicts_records_and_reports_a_merged_gap() {
    let dir = tempfile::tempdir().unwrap();
    let sz = size();
    let s = open(&dir.path().join("s"), &[spec("a", 5 * sz, FullPolicy::DropOldest)], u64::MAX);
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
    let recs = recs.to_vec();
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
    let recs = recs.to_vec();
    assert!(gaps.is_empty());
    assert_eq!(recs.len(), 3);
}

#[test]
fn backpressure_refuses_and_writes_nothing_until_space_frees() {
    let dir = tempfile::tempdir().unwrap();
    let sz = size();
    let s = open(&dir.path().join("s"), &[spec("a", 3 * sz, FullPolicy::Backpressure)], u64::MAX);
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
    let s = open(&dir.path().join("s"), &[important, bulk], 6 * sz);
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
    let s = open(&dir.path().join("s"), &[l], u64::MAX);
    // ingest times 1000..1004
    s.append_batch(&(0..5).map(|i| rec("a", i)).collect::<Vec<_>>(), &[]).unwrap();
    assert!(s.expire(1050).unwrap().is_empty());
    let ev = s.expire(1103).unwrap();
    assert_eq!((ev[0].from_seq, ev[0].through_seq, ev[0].reason), (1, 3, GapReason::Ttl));
    assert_eq!(s.stats().unwrap()[0].records, 2);
}

#[test]
fn space_comes_back_as_segments_empty_and_compaction_drops_the_last() {
    let dir = tempfile::tempdir().unwrap();
    let s =
        Store::open(&dir.path().join("s"), 1 << 20, &[spec("a", 64 << 20, FullPolicy::DropOldest)], u64::MAX).unwrap();
    let big = NewRecord { payload: vec![1; 4096], ..rec("a", 0) };
    for _ in 0..20 {
        s.append_batch(&vec![big.clone(); 100], &[]).unwrap();
    }
    let full = s.file_size();
    assert!(full > 8_000_000, "the segments hold 8 MB of records: {full}");
    assert_eq!(s.compact_if_idle().unwrap(), None, "not idle while records are held");
    s.ack_through("a", 1000).unwrap();
    let half = s.file_size();
    assert!(half < full * 2 / 3, "acking half deleted the emptied segments: {full} -> {half}");
    s.ack_through("a", u64::MAX).unwrap();
    assert!(s.file_size() <= 2 << 20, "only the active segment is left: {}", s.file_size());
    let (before, after) = s.compact_if_idle().unwrap().expect("idle");
    assert!(after < 4096, "compaction leaves one fresh segment: {before} -> {after}");
    println!("store of 2000 records of 4 KiB: {full} bytes; half acked: {half}; drained: {before}; compacted: {after}");
}

#[test]
fn corrupt_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s");
    std::fs::create_dir(&p).unwrap();
    let seg = p.join("0000000000000001.seg");
    std::fs::write(&seg, vec![0x5a; 8192]).unwrap();
    let err = Store::open(&p, 1 << 20, &lanes(), u64::MAX).unwrap_err();
    assert!(err.is_corrupt(), "{err}");
    assert!(err.to_string().contains(&seg.display().to_string()), "{err}");
    assert_eq!(std::fs::read(&seg).unwrap(), vec![0x5a; 8192], "the damaged file is left as it was for inspection");
}

#[test]
fn a_cut_newest_segment_is_reported_by_check_and_cut_to_whole_batches_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s");
    {
        let s = open(&p, &lanes(), u64::MAX);
        let big = NewRecord { payload: vec![9; 2048], ..rec("a", 0) };
        for _ in 0..10 {
            s.append_batch(&vec![big.clone(); 50], &[]).unwrap();
        }
    }
    let seg = seg_files(&p).pop().unwrap();
    let len = std::fs::metadata(&seg).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(len / 3).unwrap();
    drop(f);
    let copy = std::fs::read(&seg).unwrap();
    // The read-only check says what a start would cut, and changes nothing.
    let rep = check(&p).unwrap();
    assert!(rep.torn_tail_bytes > 0, "{rep:?}");
    assert!(rep.lanes.iter().all(|l| l.records < 500), "{rep:?}");
    assert_eq!(std::fs::read(&seg).unwrap(), copy, "check changes nothing");
    // Opening cuts the torn entry: whole batches remain, seqs go on after them.
    let (s, r) = Store::open_with_recovery(&p, 1 << 20, &lanes(), u64::MAX).unwrap();
    assert_eq!(r.truncated_bytes, rep.torn_tail_bytes);
    let held = s.stats().unwrap()[0].records;
    assert!(held < 500 && held % 50 == 0, "{held}");
    assert_eq!(s.append_batch(&[rec("a", 1)], &[]).unwrap().seqs, vec![held + 1]);
    drop(s);
    let rep = check(&p).unwrap();
    assert!(rep.problems.is_empty() && rep.torn_tail_bytes == 0, "{rep:?}");
}

#[test]
fn message_hash_tells_topic_from_payload() {
    assert_ne!(message_hash("a", b"bc"), message_hash("ab", b"c"));
    assert_eq!(message_hash("t", b"x"), message_hash("t", b"x"));
}

/// Lanes whose budgets never evict in these tests.
fn big_lanes() -> Vec<LaneSpec> {
    vec![spec("a", 1 << 40, FullPolicy::DropOldest), spec("b", 1 << 40, FullPolicy::DropOldest)]
}

/// A record whose payload names `counter`, so a reader can tell which one it is.
fn crec(lane: &str, counter: u64) -> NewRecord {
    let mut payload = counter.to_le_bytes().to_vec();
    payload.resize(200, counter as u8);
    NewRecord { lane: lane.into(), ingest_ts_ms: 1000 + counter, source: "t".into(), content_type: None, payload }
}

fn counter_of(r: &Record) -> u64 {
    u64::from_le_bytes(r.payload[..8].try_into().unwrap())
}

fn read_all(log: &Store, lane: &str) -> Vec<Record> {
    let mut out: Vec<Record> = Vec::new();
    loop {
        let from = out.last().map_or(0, |r| r.seq + 1);
        let got = log.read_from(lane, from, 97, 1 << 20).unwrap().0.to_vec();
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
    // The CPU's CRC instruction agrees with the bit-at-a-time definition at every
    // length and alignment (the instruction paths work in 8-byte steps, with a tail).
    let bitwise = |data: &[u8]| {
        let mut crc = !0u32;
        for b in data {
            crc ^= u32::from(*b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
            }
        }
        !crc
    };
    let data: Vec<u8> = (0..300u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    for start in 0..17 {
        for end in start..data.len() {
            assert_eq!(crc32c(&data[start..end]), bitwise(&data[start..end]), "bytes {start}..{end}");
        }
    }
}

#[test]
fn segments_rotate_and_are_deleted_once_acked() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = Store::open_with_recovery(dir.path(), 4 << 10, &big_lanes(), u64::MAX).unwrap();
    let mut c = 0;
    for _ in 0..40 {
        let batch: Vec<_> = (0..10)
            .map(|i| {
                c += 1;
                crec(if i % 3 == 0 { "b" } else { "a" }, c)
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
    let (log, rec_) = Store::open_with_recovery(dir.path(), 4 << 10, &big_lanes(), u64::MAX).unwrap();
    assert_eq!(rec_.truncated_bytes, 0);
    assert_eq!(
        read_all(&log, "b").iter().map(|r| r.seq).collect::<Vec<_>>(),
        (mid + 1..=b.last().unwrap().seq).collect::<Vec<_>>()
    );
    assert!(read_all(&log, "a").is_empty());
    assert_eq!(log.stats().unwrap()[0].next_seq, a.last().unwrap().seq + 1);
    assert_eq!(log.mqtt_inflight().unwrap()[&400], 400, "the redelivery hashes survive rotation");
    log.ack_through("b", u64::MAX).unwrap();
    assert_eq!(seg_files(dir.path()).len(), 1, "only the active segment is left");
    drop(log);
    let (log, _) = Store::open_with_recovery(dir.path(), 4 << 10, &big_lanes(), u64::MAX).unwrap();
    assert_eq!(log.append_batch(&[crec("b", 999)], &[]).unwrap().seqs, vec![b.last().unwrap().seq + 1]);
}

#[test]
fn a_torn_tail_is_cut_and_everything_before_it_kept() {
    let dir = tempfile::tempdir().unwrap();
    let seg;
    let before;
    {
        let (log, _) = Store::open_with_recovery(dir.path(), DEFAULT_SEGMENT_BYTES, &big_lanes(), u64::MAX).unwrap();
        for c in 0..5 {
            log.append_batch(&[crec("a", c), crec("a", c + 100)], &[]).unwrap();
        }
        seg = seg_files(dir.path()).pop().unwrap();
        before = std::fs::metadata(&seg).unwrap().len();
        log.append_batch(&[crec("a", 50), crec("a", 51)], &[]).unwrap();
    }
    let full = std::fs::read(&seg).unwrap();
    // Every cut inside the last entry, and garbage after it.
    let mut cases: Vec<Vec<u8>> = (before as usize + 1..full.len()).step_by(7).map(|n| full[..n].to_vec()).collect();
    let mut junk = full[..before as usize].to_vec();
    junk.extend_from_slice(&[0u8; 300]);
    cases.push(junk);
    let mut flipped = full.clone();
    *flipped.last_mut().unwrap() ^= 0x40;
    cases.push(flipped);
    for (i, bytes) in cases.iter().enumerate() {
        std::fs::write(&seg, bytes).unwrap();
        let (log, r) = Store::open_with_recovery(dir.path(), DEFAULT_SEGMENT_BYTES, &big_lanes(), u64::MAX).unwrap();
        assert_eq!(r.truncated_bytes, bytes.len() as u64 - before, "case {i}");
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), before, "case {i}: cut back to the last whole entry");
        let got = read_all(&log, "a");
        assert_eq!(got.len(), 10, "case {i}");
        assert_eq!(log.append_batch(&[crec("a", 7)], &[]).unwrap().seqs, vec![11], "case {i}");
        drop(log);
    }
}

#[test]
fn a_segment_cut_while_being_created_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (log, _) = Store::open_with_recovery(dir.path(), 4 << 10, &big_lanes(), u64::MAX).unwrap();
        for c in 0..40 {
            log.append_batch(&[crec("a", c)], &[]).unwrap();
        }
    }
    let newest = seg_files(dir.path()).pop().unwrap();
    let id = u64::from_str_radix(newest.file_stem().unwrap().to_str().unwrap(), 16).unwrap();
    let full = std::fs::read(&newest).unwrap();
    // The next segment cut after its header, inside its snapshot, empty, and all zeros
    // (its size reached the disk, its data did not).
    let zeros = vec![0u8; 4096];
    for (cut, bytes) in [
        (HEADER_LEN as usize, &full[..HEADER_LEN as usize]),
        (HEADER_LEN as usize + 5, &full[..HEADER_LEN as usize + 5]),
        (3, &full[..3]),
        (0, &full[..0]),
        (4096, &zeros[..]),
    ] {
        let next = seg_path(dir.path(), id + 1);
        std::fs::write(&next, bytes).unwrap();
        let (log, r) = Store::open_with_recovery(dir.path(), 4 << 10, &big_lanes(), u64::MAX).unwrap();
        assert_eq!(r.truncated_bytes, cut as u64, "cut {cut}");
        assert!(!next.exists(), "cut {cut}");
        assert_eq!(read_all(&log, "a").len(), 40, "cut {cut}");
    }
    let (log, _) = Store::open_with_recovery(dir.path(), 4 << 10, &big_lanes(), u64::MAX).unwrap();
    assert_eq!(log.append_batch(&[crec("a", 99)], &[]).unwrap().seqs, vec![41]);
}

#[test]
fn damage_before_the_newest_segment_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (log, _) = Store::open_with_recovery(dir.path(), 4 << 10, &big_lanes(), u64::MAX).unwrap();
        for c in 0..60 {
            log.append_batch(&[crec("a", c)], &[]).unwrap();
        }
    }
    let files = seg_files(dir.path());
    assert!(files.len() > 2);
    let victim = &files[1];
    let mut bytes = std::fs::read(victim).unwrap();
    bytes[HEADER_LEN as usize + 40] ^= 0xff;
    std::fs::write(victim, &bytes).unwrap();
    let err = Store::open_with_recovery(dir.path(), 4 << 10, &big_lanes(), u64::MAX).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&victim.display().to_string()) && msg.contains("offset"), "{msg}");
    assert_eq!(std::fs::read(victim).unwrap(), bytes, "the damaged file is left for inspection");
    std::fs::write(victim, b"not a log at all, but long enough to be a header").unwrap();
    let msg = Store::open_with_recovery(dir.path(), 4 << 10, &big_lanes(), u64::MAX).unwrap_err().to_string();
    assert!(msg.contains("not a VOITHER store segment"), "{msg}");
}

/// The writer of the SIGKILL loop: appends random batches to two lanes, acks a
/// prefix now and then. It prints each append (`A lane first_seq n first_counter`)
/// only after the call returned, and each ack (`K lane seq`) before the call, as a
/// hub's ack arrives before the store deletes.
fn sigkill_child(dir: &Path, mut counter: u64) -> ! {
    let (log, _) = Store::open_with_recovery(dir, 32 << 10, &big_lanes(), u64::MAX).unwrap();
    let mut rng = rand::rng();
    let out = std::io::stdout();
    // The harness has printed "test <name> ... " without a newline.
    writeln!(out.lock()).unwrap();
    loop {
        let lane = if rng.random_bool(0.7) { "a" } else { "b" };
        let n = rng.random_range(1..=80u64);
        let batch: Vec<_> = (0..n).map(|i| crec(lane, counter + i)).collect();
        let app = log.append_batch(&batch, &[]).unwrap();
        writeln!(out.lock(), "A {lane} {} {n} {counter}", app.seqs[0]).unwrap();
        counter += n;
        if rng.random_bool(0.4) {
            let st = log.stats().unwrap();
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
    if let (Ok(dir), Ok(c)) = (std::env::var("VOITHER_STORE_CHILD_DIR"), std::env::var("VOITHER_STORE_COUNTER")) {
        sigkill_child(Path::new(&dir), c.parse().unwrap());
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = rand::rng();
    // Per lane: seq -> counter of every append that returned; the highest ack sent.
    let mut known: HashMap<&str, BTreeMap<u64, u64>> = HashMap::from([("a", BTreeMap::new()), ("b", BTreeMap::new())]);
    let mut acked: HashMap<&str, u64> = HashMap::from([("a", 0), ("b", 0)]);
    let mut counter = 0u64;
    let mut cut_total = 0;
    const CYCLES: usize = 200;
    for cycle in 0..CYCLES {
        let mut child = std::process::Command::new(&exe)
            .args([
                "--exact",
                "store::tests::sigkill_loop_loses_nothing_acknowledged_and_reuses_no_seq",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("VOITHER_STORE_CHILD_DIR", dir.path())
            .env("VOITHER_STORE_COUNTER", counter.to_string())
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
        let (log, r) = Store::open_with_recovery(dir.path(), 32 << 10, &big_lanes(), u64::MAX).unwrap();
        cut_total += r.truncated_bytes;
        for lane in ["a", "b"] {
            let k = &known[lane];
            let got = read_all(&log, lane);
            let st = log.stats().unwrap().into_iter().find(|s| s.lane == lane).unwrap();
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
    let (log, _) = Store::open_with_recovery(dir.path(), 32 << 10, &big_lanes(), u64::MAX).unwrap();
    println!(
        "store SIGKILL loop: {CYCLES} kills, {counter} records appended, {} torn bytes cut, {} segments left",
        cut_total,
        log.segments()
    );
    assert!(counter > 0);
}

#[test]
fn a_second_open_is_refused_while_the_store_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s");
    let s = open(&p, &lanes(), u64::MAX);
    let err = Store::open(&p, 1 << 20, &lanes(), u64::MAX).unwrap_err();
    assert!(err.to_string().contains("open in another process"), "{err}");
    assert!(!err.is_corrupt(), "a locked store is not moved aside");
    let err = check(&p).unwrap_err();
    assert!(err.to_string().contains("open in another process"), "{err}");
    drop(s);
    assert!(check(&p).unwrap().problems.is_empty());
}

/// Writes a store in the layout of earlier versions (one redb file).
fn write_redb_store(path: &Path) {
    use redb::{Database, TableDefinition};
    let db = Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut lanes = txn.open_table(TableDefinition::<&str, (u64, u64, u64)>::new("lanes")).unwrap();
        let mut a = txn.open_table(TableDefinition::<u64, &[u8]>::new("lane/a")).unwrap();
        let mut bytes = 0;
        // Lane a: seqs 1-3 evicted (a gap), 4-9 held, next seq 10.
        for seq in 4..10u64 {
            let r = Record {
                seq,
                ingest_ts_ms: 1000 + seq,
                source: "t".into(),
                content_type: None,
                payload: vec![seq as u8; 10].into(),
            };
            let buf = minicbor::to_vec(&r).unwrap();
            bytes += buf.len() as u64;
            a.insert(seq, buf.as_slice()).unwrap();
        }
        lanes.insert("a", (10, 6, bytes)).unwrap();
        let mut ga = txn.open_table(TableDefinition::<u64, (u64, u8)>::new("gaps/a")).unwrap();
        ga.insert(1, (3, 0)).unwrap();
        // Lane b: everything through 41 acknowledged, nothing held.
        txn.open_table(TableDefinition::<u64, &[u8]>::new("lane/b")).unwrap();
        txn.open_table(TableDefinition::<u64, (u64, u8)>::new("gaps/b")).unwrap();
        lanes.insert("b", (42, 0, 0)).unwrap();
        let mut inflight = txn.open_table(TableDefinition::<u16, u64>::new("mqtt_inflight")).unwrap();
        inflight.insert(7, 99).unwrap();
    }
    txn.commit().unwrap();
}

#[test]
fn a_redb_store_of_an_earlier_version_is_moved_over_once() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("store.redb");
    let new = dir.path().join("store");
    write_redb_store(&old);
    let before = check(&old).unwrap();
    assert!(before.problems.is_empty(), "{before:?}");
    let m = migrate_redb(&old, &new).unwrap().expect("an old store to move");
    assert_eq!((m.lanes, m.records, m.gaps), (2, 6, 1));
    assert!(!old.exists() && m.old_file.exists(), "the old file is kept under a new name");
    assert_eq!(migrate_redb(&old, &new).unwrap(), None, "done once");
    let rep = check(&new).unwrap();
    assert!(rep.problems.is_empty() && rep.lanes.iter().map(|l| l.records).sum::<u64>() == 6, "{rep:?}");
    let s = open(&new, &lanes(), u64::MAX);
    let st = s.stats().unwrap();
    assert_eq!((st[0].next_seq, st[0].records, st[0].oldest_seq, st[0].oldest_ingest_ts_ms), (10, 6, 1, Some(1004)));
    assert_eq!((st[1].next_seq, st[1].records, st[1].oldest_seq), (42, 0, 42));
    let (recs, gaps) = s.read_from("a", 1, 100, 1 << 20).unwrap();
    let recs = recs.to_vec();
    assert_eq!(gaps, vec![Gap { from_seq: 1, through_seq: 3, reason: GapReason::Capacity }]);
    assert_eq!(recs.iter().map(|r| r.seq).collect::<Vec<_>>(), (4..10).collect::<Vec<_>>());
    assert_eq!(recs[0].payload.as_slice(), &[4; 10]);
    assert_eq!(s.mqtt_inflight().unwrap()[&7], 99);
    assert_eq!(s.append_batch(&[rec("b", 1)], &[]).unwrap().seqs, vec![42], "seqs are never reused");
    drop(s);
    let rep = check(&new).unwrap();
    assert!(rep.problems.is_empty(), "{rep:?}");
}

#[test]
fn a_migration_cut_short_is_done_again_and_one_finished_only_renames() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("store.redb");
    let new = dir.path().join("store");
    write_redb_store(&old);
    // A crash while writing: a half-written folder beside the old file.
    let tmp = new.with_extension("migrating");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("0000000000000001.seg"), b"VOITHLOG half").unwrap();
    let m = migrate_redb(&old, &new).unwrap().unwrap();
    assert_eq!(m.records, 6);
    assert!(!tmp.exists());
    // A crash after the folder was renamed, before the old file was.
    let m2 = m.old_file.clone();
    std::fs::rename(&m2, &old).unwrap();
    let again = migrate_redb(&old, &new).unwrap().unwrap();
    assert_eq!(again.records, 0, "the segments are not written twice");
    assert!(!old.exists());
    let s = open(&new, &lanes(), u64::MAX);
    assert_eq!(s.stats().unwrap()[0].records, 6);
}

#[test]
fn a_damaged_redb_store_is_not_moved_and_is_called_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("store.redb");
    std::fs::write(&old, vec![0x5a; 8192]).unwrap();
    let err = migrate_redb(&old, &dir.path().join("store")).unwrap_err();
    assert!(err.is_corrupt() && err.to_string().contains("store.redb"), "{err}");
    assert_eq!(std::fs::read(&old).unwrap(), vec![0x5a; 8192]);
    assert!(!dir.path().join("store").exists() && !dir.path().join("store.migrating").exists());
}

#[test]
fn a_lane_no_longer_configured_is_kept_then_evicted_first_when_space_is_needed() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s");
    let sz = size();
    {
        let s = Store::open(&p, 4 << 10, &lanes(), u64::MAX).unwrap();
        s.append_batch(&(0..30).map(|i| rec("b", i)).collect::<Vec<_>>(), &[]).unwrap();
    }
    // Lane b is gone from the configuration: its records stay while there is room.
    let only_a = vec![spec("a", 1 << 20, FullPolicy::DropOldest)];
    let s = Store::open(&p, 4 << 10, &only_a, 40 * sz).unwrap();
    assert!(s.read_from("b", 1, 10, 1 << 20).is_err(), "an unconfigured lane is not read");
    let app = s.append_batch(&(0..5).map(|i| rec("a", i)).collect::<Vec<_>>(), &[]).unwrap();
    assert!(app.evicted.is_empty());
    let segments = s.segments();
    // Over the store budget: b's records go before any of a's.
    let app = s.append_batch(&(0..20).map(|i| rec("a", i)).collect::<Vec<_>>(), &[]).unwrap();
    assert_eq!(app.evicted.len(), 1);
    let ev = app.evicted[0].clone();
    assert_eq!((ev.lane.as_str(), ev.from_seq), ("b", 1));
    assert!((15..=16).contains(&ev.records), "about 15 records of b make room for 20 of a: {ev:?}");
    assert_eq!(s.stats().unwrap()[0].records, 25, "a lost nothing");
    assert!(s.segments() < segments + 2, "segments pinned by b are freed as its records go");
    drop(s);
    // Configured again, the lane reports the eviction as a gap before what is left.
    let s = open(&p, &lanes(), u64::MAX);
    let (recs, gaps) = s.read_from("b", 1, 100, 1 << 20).unwrap();
    let recs = recs.to_vec();
    assert_eq!(gaps, vec![Gap { from_seq: 1, through_seq: ev.through_seq, reason: GapReason::Capacity }]);
    assert_eq!(recs.first().map(|r| r.seq), Some(ev.through_seq + 1));
    assert_eq!(recs.last().map(|r| r.seq), Some(30));
}

/// Reads ahead of acks, in batches of every size, acks at read boundaries and between
/// them, rewinds as after a reconnect, segments rotating under it all: the counters
/// an ack keeps from what reads found match a recount from disk at every reopen.
#[test]
fn acks_of_what_was_read_keep_the_counters_a_recount_finds() {
    use rand::{rngs::StdRng, SeedableRng};
    let dir = tempfile::tempdir().unwrap();
    let lanes = big_lanes();
    // Another test of this process may be starting a child right now: between its fork
    // and its exec the child shares our lock file's description, so the lock we just
    // dropped can look held for that moment. Only that error is tried again.
    let reopen = || {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while tokio::time::Instant::now() < deadline {
            match Store::open_with_recovery(dir.path(), 4 << 10, &lanes, u64::MAX) {
                Ok((s, _)) => return s,
                Err(StoreError::Open { message, .. }) if message.contains("another process") => {
                    std::thread::yield_now()
                }
                Err(e) => panic!("reopen: {e}"),
            }
        }
        panic!("the store's lock stayed held for 5 s after the store was dropped");
    };
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let mut s = reopen();
    let names = ["a", "b"];
    // Per lane: next seq to read, highest acked, highest appended.
    let mut read = [1u64; 2];
    let mut acked = [0u64; 2];
    let mut last = [0u64; 2];
    let mut c = 0u64;
    for step in 0..600 {
        let i = rng.random_range(0..2usize);
        let lane = names[i];
        match rng.random_range(0..10) {
            0..=3 => {
                let batch: Vec<_> = (0..rng.random_range(1..20))
                    .map(|_| {
                        c += 1;
                        let mut r = crec(if rng.random_bool(0.7) { "a" } else { "b" }, c);
                        r.payload.truncate(rng.random_range(8..200));
                        r
                    })
                    .collect();
                for (r, seq) in batch.iter().zip(s.append_batch(&batch, &[]).unwrap().seqs) {
                    let j = names.iter().position(|n| *n == r.lane).unwrap();
                    last[j] = seq;
                }
            }
            4..=6 => {
                let got = s.read_from(lane, read[i], rng.random_range(1..40), 1 << 20).unwrap().0.to_vec();
                if let Some(r) = got.last() {
                    read[i] = r.seq + 1;
                }
            }
            7..=8 if read[i] > acked[i] + 1 => {
                // Mostly where a read stopped, sometimes part way.
                let to = if rng.random_bool(0.8) { read[i] - 1 } else { rng.random_range(acked[i] + 1..read[i]) };
                let before = s.stats().unwrap()[i].clone();
                let (n, bytes) = s.ack_through(lane, to).unwrap();
                let after = s.stats().unwrap()[i].clone();
                assert_eq!((n, bytes), (before.records - after.records, before.bytes - after.bytes), "step {step}");
                assert_eq!(n, to - acked[i], "step {step}: every record through the ack was held");
                acked[i] = to;
            }
            _ => read[i] = acked[i] + 1,
        }
        if step % 25 == 24 {
            let counted: Vec<(u64, u64)> = s.stats().unwrap().iter().map(|l| (l.records, l.bytes)).collect();
            drop(s);
            s = reopen();
            let recount: Vec<(u64, u64)> = s.stats().unwrap().iter().map(|l| (l.records, l.bytes)).collect();
            assert_eq!(counted, recount, "step {step}");
            for j in 0..2 {
                assert_eq!(counted[j].0, last[j].max(acked[j]) - acked[j], "step {step}, lane {}", names[j]);
                let seqs: Vec<u64> = read_all(&s, names[j]).iter().map(|r| r.seq).collect();
                assert_eq!(seqs, (acked[j] + 1..=last[j]).collect::<Vec<_>>(), "step {step}");
            }
            read = [acked[0] + 1, acked[1] + 1];
        }
    }
    assert!(s.segments() > 1);
}
