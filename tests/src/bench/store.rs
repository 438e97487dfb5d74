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
//! All three write into a fresh folder under `TMPDIR` on the same file system. Each
//! also reports its write amplification: the bytes `/proc/self/io` `write_bytes` counts
//! for the loop (pages sent to the storage layer, so a 256-byte commit costs a whole
//! page) per payload byte.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use voither_gateway::store::{Appended, FullPolicy, LaneSpec, NewRecord, Store, StoreError, DEFAULT_SEGMENT_BYTES};
use voither_proto::RecordRef;

use super::{Opts, Row, PAYLOAD};

/// Batch sizes measured: one record per commit, a small batch, and the gateway's default
/// `mqtt.batch_max_messages` (512).
pub const BATCHES: [usize; 3] = [1, 64, 512];

/// What one loop measured.
struct Rate {
    records_s: f64,
    commits_s: f64,
    /// Bytes sent to storage per payload byte.
    amplification: f64,
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

/// Calls `append` with a batch of `b` records (256-byte payloads, with the packet ids
/// and hashes the ingest path passes) for `dur`. The batch is built once, outside the
/// timed loop: what is measured is the store, as in the raw loop.
fn append_rate(
    b: usize,
    dur: Duration,
    mut append: impl FnMut(&[NewRecord], &[(u16, u64)]) -> Result<Appended, StoreError>,
) -> Rate {
    let now_ms = voither_gateway::unix_ms();
    let recs: Vec<NewRecord> = (0..b as u64)
        .map(|i| NewRecord {
            lane: "telemetry".into(),
            ingest_ts_ms: now_ms,
            source: "devices/0/telemetry".into(),
            content_type: None,
            payload: voither_tests::sim::payload(0, i, PAYLOAD),
        })
        .collect();
    let mqtt: Vec<(u16, u64)> = (0..b as u64).map(|i| ((i % 65_535 + 1) as u16, i)).collect();
    let mut counter = 0u64;
    let mut commits = 0u64;
    let written = written_bytes();
    let t0 = Instant::now();
    while t0.elapsed() < dur {
        append(&recs, &mqtt).expect("append");
        counter += b as u64;
        commits += 1;
    }
    let secs = t0.elapsed().as_secs_f64();
    Rate {
        records_s: counter as f64 / secs,
        commits_s: commits as f64 / secs,
        amplification: (written_bytes() - written) as f64 / (counter * PAYLOAD as u64) as f64,
    }
}

/// `store.segment_bytes` for the store loop: the default, or
/// `VOITHER_BENCH_SEGMENT_BYTES` to compare sizes.
fn segment_bytes() -> u64 {
    std::env::var("VOITHER_BENCH_SEGMENT_BYTES").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_SEGMENT_BYTES)
}

/// The segment store at batch size `b` for `dur`, writing in `dir`.
fn store_rate(b: usize, dur: Duration, dir: &Path) -> Rate {
    let store = Store::open(dir, segment_bytes(), &[lane()], 64 << 30).expect("store opens");
    append_rate(b, dur, |r, m| store.append_batch(r, m))
}

/// redb as the store of earlier versions used it, at batch size `b` for `dur`.
fn redb_rate(b: usize, dur: Duration, dir: &Path) -> Rate {
    use redb::{Database, Durability, TableDefinition};
    const LANES: TableDefinition<'_, &str, (u64, u64, u64)> = TableDefinition::new("lanes");
    const ROWS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("lane/telemetry");
    const INFLIGHT: TableDefinition<'_, u16, u64> = TableDefinition::new("mqtt_inflight");
    let db = Database::builder().set_cache_size(4 << 20).create(dir.join("store.redb")).expect("redb opens");
    let (mut next, mut held, mut bytes) = (1u64, 0u64, 0u64);
    let mut buf = Vec::new();
    append_rate(b, dur, |recs, mqtt| {
        let redb = |e: redb::Error| StoreError::Io(e.to_string());
        let mut txn = db.begin_write().map_err(|e| redb(e.into()))?;
        txn.set_durability(Durability::Immediate).map_err(|e| redb(e.into()))?;
        let mut seqs = Vec::with_capacity(recs.len());
        {
            let mut rows = txn.open_table(ROWS).map_err(|e| redb(e.into()))?;
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
                rows.insert(next, buf.as_slice()).map_err(|e| redb(e.into()))?;
                seqs.push(next);
                next += 1;
                held += 1;
                bytes += buf.len() as u64;
            }
            let mut lanes = txn.open_table(LANES).map_err(|e| redb(e.into()))?;
            lanes.insert("telemetry", (next, held, bytes)).map_err(|e| redb(e.into()))?;
            let mut inflight = txn.open_table(INFLIGHT).map_err(|e| redb(e.into()))?;
            for (p, h) in mqtt {
                inflight.insert(*p, *h).map_err(|e| redb(e.into()))?;
            }
        }
        txn.commit().map_err(|e| redb(e.into()))?;
        Ok(Appended { seqs, evicted: Vec::new() })
    })
}

/// `write` + `fdatasync` of `b × 256` bytes for `dur`.
fn raw_rate(b: usize, dur: Duration, dir: &Path) -> Rate {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("raw.log")).expect("raw file");
    let buf = vec![0x5au8; b * PAYLOAD];
    let mut syncs = 0u64;
    let written = written_bytes();
    let t0 = Instant::now();
    while t0.elapsed() < dur {
        f.write_all(&buf).expect("write");
        f.sync_data().expect("fdatasync");
        syncs += 1;
    }
    let secs = t0.elapsed().as_secs_f64();
    Rate {
        records_s: (syncs * b as u64) as f64 / secs,
        commits_s: syncs as f64 / secs,
        amplification: (written_bytes() - written) as f64 / (syncs * (b * PAYLOAD) as u64) as f64,
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
        eprintln!("[store] batch {b}: write + fdatasync, redb, segment store, {} s each …", dur.as_secs());
        let raw = raw_rate(b, dur, &sub("raw"));
        let old = redb_rate(b, dur, &sub("redb"));
        let st = store_rate(b, dur, &sub("store"));
        eprintln!(
            "[store] batch {b}: segment store {:.0}, redb {:.0}, raw {:.0} records/s",
            st.records_s, old.records_s, raw.records_s
        );
        let baseline = format!("write + fdatasync of {b} × {PAYLOAD} B");
        let amp = |r: &Rate| format!("{:.2}", r.amplification);
        rows.push(
            Row::new("store", &format!("store append, {b} records per durable commit"), st.records_s, "records/s")
                .baseline(&baseline, raw.records_s)
                .target("≥ 0.50 of raw fdatasync", st.records_s / raw.records_s >= 0.5)
                .note(format!(
                    "{:.0} commits/s (raw {:.0} fdatasync/s); bytes to storage per payload byte: {} (raw {})",
                    st.commits_s,
                    raw.commits_s,
                    amp(&st),
                    amp(&raw)
                )),
        );
        rows.push(
            Row::new(
                "store",
                &format!("redb (earlier store), {b} records per durable commit"),
                old.records_s,
                "records/s",
            )
            .baseline(&baseline, raw.records_s)
            .note(format!(
                "{:.0} commits/s; bytes to storage per payload byte: {}",
                old.commits_s,
                amp(&old)
            )),
        );
    }
}
