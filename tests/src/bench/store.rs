//! Scenario `store`: the gateway's store alone, in this process, against the disk's own
//! limit.
//!
//! - **Store**: [`Store::append_batch`] of B records (256-byte payloads, with the MQTT
//!   packet ids and hashes the ingest path passes) in a loop for a fixed time; each call
//!   is one entry appended to the segment store and one fdatasync (group commit of B
//!   records).
//! - **redb**: the same records and hashes written the way the store of earlier
//!   versions did (one redb transaction per batch: a row per record, the lane's
//!   counters, the hashes; committed with `Durability::Immediate`), for the comparison
//!   that decided between the two.
//! - **Raw**: a plain file opened for append, and a loop of `write(B × 256 bytes)` +
//!   `fdatasync` for the same time: the most records per second this disk can make
//!   durable at that batch size when nothing but the payload is written.
//!
//! All three write into a fresh folder under `TMPDIR` on the same file system, taking
//! turns of a quarter of the time each (see [`ROUNDS`]). Each
//! also reports its write amplification: the bytes `/proc/self/io` `write_bytes` counts
//! for the loop (pages sent to the storage layer, so a 256-byte commit costs a whole
//! page) per payload byte.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use voither_gateway::store::{FullPolicy, LaneSpec, NewRecord, Store, DEFAULT_SEGMENT_BYTES};
use voither_proto::RecordRef;

use super::{Opts, Row, PAYLOAD};

/// Batch sizes measured: one record per commit, a small batch, and the gateway's default
/// `mqtt.batch_max_messages` (512).
pub const BATCHES: [usize; 3] = [1, 64, 512];

/// Slices each loop gets per batch size. The three loops take turns, in a different
/// order each round, so a drift of the disk's rate during the scenario (a cache
/// filling, another writer, a throttle after a burst) weighs on all three alike instead
/// of on whichever runs last.
const ROUNDS: u32 = 4;

/// What one loop has done over its slices.
#[derive(Debug, Default)]
struct Tally {
    records: u64,
    commits: u64,
    secs: f64,
    /// Bytes sent to storage.
    written: u64,
}

impl Tally {
    fn records_s(&self) -> f64 {
        self.records as f64 / self.secs
    }

    fn commits_s(&self) -> f64 {
        self.commits as f64 / self.secs
    }

    /// Bytes sent to storage per payload byte.
    fn amplification(&self) -> f64 {
        self.written as f64 / (self.records * PAYLOAD as u64) as f64
    }

    /// Runs `commit` (one durable commit of `b` records) for `dur`, adding what it did.
    fn slice(&mut self, b: usize, dur: Duration, commit: &mut dyn FnMut()) {
        let written = written_bytes();
        let t0 = Instant::now();
        let mut n = 0u64;
        while t0.elapsed() < dur {
            commit();
            n += 1;
        }
        self.secs += t0.elapsed().as_secs_f64();
        self.commits += n;
        self.records += n * b as u64;
        self.written += written_bytes() - written;
    }
}

/// `write_bytes` of `/proc/self/io`: bytes this process sent to the storage layer.
fn written_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("write_bytes:").map(|v| v.trim().parse().unwrap_or(0))))
        .unwrap_or(0)
}

fn lane() -> LaneSpec {
    LaneSpec {
        name: "telemetry".into(),
        priority: 1,
        max_bytes: 64 << 30,
        ttl_ms: None,
        policy: FullPolicy::DropOldest,
    }
}

/// A batch of `b` records (256-byte payloads) with the packet ids and hashes the ingest
/// path passes. It is built once, outside the timed loops: what is measured is the
/// store, as in the raw loop.
fn batch(b: usize) -> (Vec<NewRecord>, Vec<(u16, u64)>) {
    let now_ms = voither_gateway::unix_ms();
    let recs = (0..b as u64)
        .map(|i| NewRecord {
            lane: "telemetry".into(),
            ingest_ts_ms: now_ms,
            source: "devices/0/telemetry".into(),
            content_type: None,
            payload: voither_tests::sim::payload(0, i, PAYLOAD),
        })
        .collect();
    let mqtt = (0..b as u64).map(|i| ((i % 65_535 + 1) as u16, i)).collect();
    (recs, mqtt)
}

/// `store.segment_bytes` for the store loop: the default, or
/// `VOITHER_BENCH_SEGMENT_BYTES` to compare sizes.
fn segment_bytes() -> u64 {
    std::env::var("VOITHER_BENCH_SEGMENT_BYTES").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_SEGMENT_BYTES)
}

/// One commit of the segment store, writing in `dir`.
fn store_commit<'a>(dir: &Path, recs: &'a [NewRecord], mqtt: &'a [(u16, u64)]) -> impl FnMut() + 'a {
    let store = Store::open(dir, segment_bytes(), &[lane()], 64 << 30).expect("store opens");
    move || {
        store.append_batch(recs, mqtt).expect("append");
    }
}

/// One commit of redb as the store of earlier versions used it, writing in `dir`.
fn redb_commit<'a>(dir: &Path, recs: &'a [NewRecord], mqtt: &'a [(u16, u64)]) -> impl FnMut() + 'a {
    use redb::{Database, Durability, TableDefinition};
    const LANES: TableDefinition<'_, &str, (u64, u64, u64)> = TableDefinition::new("lanes");
    const ROWS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("lane/telemetry");
    const INFLIGHT: TableDefinition<'_, u16, u64> = TableDefinition::new("mqtt_inflight");
    let db = Database::builder().set_cache_size(4 << 20).create(dir.join("store.redb")).expect("redb opens");
    let (mut next, mut held, mut bytes) = (1u64, 0u64, 0u64);
    let mut buf = Vec::new();
    move || {
        let mut txn = db.begin_write().expect("redb transaction");
        txn.set_durability(Durability::Immediate).expect("redb durability");
        {
            let mut rows = txn.open_table(ROWS).expect("redb table");
            for r in recs {
                buf.clear();
                let rec = RecordRef {
                    seq: next,
                    ingest_ts_ms: r.ingest_ts_ms,
                    source: &r.source,
                    content_type: r.content_type.as_deref(),
                    payload: &r.payload,
                };
                minicbor::encode(rec, &mut buf).expect("encoding into a Vec is infallible");
                rows.insert(next, buf.as_slice()).expect("redb insert");
                next += 1;
                held += 1;
                bytes += buf.len() as u64;
            }
            let mut lanes = txn.open_table(LANES).expect("redb table");
            lanes.insert("telemetry", (next, held, bytes)).expect("redb insert");
            let mut inflight = txn.open_table(INFLIGHT).expect("redb table");
            for (p, h) in mqtt {
                inflight.insert(*p, *h).expect("redb insert");
            }
        }
        txn.commit().expect("redb commit");
    }
}

/// One `write` of `b × 256` bytes + `fdatasync` to a plain file in `dir`.
fn raw_commit(dir: &Path, b: usize) -> impl FnMut() {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("raw.log")).expect("raw file");
    let buf = vec![0x5au8; b * PAYLOAD];
    move || {
        f.write_all(&buf).expect("write");
        f.sync_data().expect("fdatasync");
    }
}

/// Runs the scenario.
pub fn run(o: &Opts, rows: &mut Vec<Row>) {
    let dur = o.secs(4, 1);
    // The files stay until the end: deleting hundreds of megabytes (discarded on a
    // file system mounted with `discard`) would slow the next loop down.
    let dir = super::tempdir("voither-bench-store-");
    for b in BATCHES {
        let sub = |name: &str| {
            let p = dir.path().join(format!("{name}-{b}"));
            std::fs::create_dir(&p).expect("bench folder");
            p
        };
        eprintln!(
            "[store] batch {b}: write + fdatasync, redb, segment store, {:.1} s each in {ROUNDS} turns …",
            dur.as_secs_f64()
        );
        let (recs, mqtt) = batch(b);
        let mut loops: [(Tally, Box<dyn FnMut() + '_>); 3] = [
            (Tally::default(), Box::new(raw_commit(&sub("raw"), b))),
            (Tally::default(), Box::new(redb_commit(&sub("redb"), &recs, &mqtt))),
            (Tally::default(), Box::new(store_commit(&sub("store"), &recs, &mqtt))),
        ];
        let turns = loops.len();
        for round in 0..ROUNDS as usize {
            for k in 0..turns {
                let (tally, commit) = &mut loops[(round + k) % turns];
                tally.slice(b, dur / ROUNDS, commit.as_mut());
            }
        }
        let [(raw, _), (old, _), (st, _)] = loops;
        eprintln!(
            "[store] batch {b}: segment store {:.0}, redb {:.0}, raw {:.0} records/s",
            st.records_s(),
            old.records_s(),
            raw.records_s()
        );
        let baseline = format!("write + fdatasync of {b} × {PAYLOAD} B");
        let amp = |r: &Tally| format!("{:.2}", r.amplification());
        rows.push(
            Row::new("store", &format!("store append, {b} records per durable commit"), st.records_s(), "records/s")
                .baseline(&baseline, raw.records_s())
                .target("≥ 0.50 of raw fdatasync", st.records_s() / raw.records_s() >= 0.5)
                .note(format!(
                    "{:.0} commits/s (raw {:.0} fdatasync/s); bytes to storage per payload byte: {} (raw {})",
                    st.commits_s(),
                    raw.commits_s(),
                    amp(&st),
                    amp(&raw)
                )),
        );
        rows.push(
            Row::new(
                "store",
                &format!("redb (earlier store), {b} records per durable commit"),
                old.records_s(),
                "records/s",
            )
            .baseline(&baseline, raw.records_s())
            .note(format!(
                "{:.0} commits/s; bytes to storage per payload byte: {}",
                old.commits_s(),
                amp(&old)
            )),
        );
    }
}
