//! Scenario `store`: the gateway's store alone, in this process, against the disk's own
//! limit.
//!
//! - **Store**: [`Store::append_batch`] of B records (256-byte payloads, with the MQTT
//!   packet ids and hashes the ingest path passes) in a loop for a fixed time; each call
//!   is one fsync-durable redb commit (group commit of B records).
//! - **Raw**: a plain file opened for append, and a loop of `write(B × 256 bytes)` +
//!   `fdatasync` for the same time: the most records per second this disk can make
//!   durable at that batch size when nothing but the payload is written.
//!
//! Both write into a fresh folder under `TMPDIR` on the same file system.

use std::io::Write;
use std::time::{Duration, Instant};

use voither_gateway::store::{FullPolicy, LaneSpec, NewRecord, Store};

use super::{Opts, Row, PAYLOAD};

/// Batch sizes measured: one record per commit, a small batch, and the gateway's default
/// `mqtt.batch_max_messages` (512).
pub const BATCHES: [usize; 3] = [1, 64, 512];

/// Records/s and commits/s of the store at batch size `b` for `dur`.
fn store_rate(b: usize, dur: Duration) -> (f64, f64) {
    let dir = super::tempdir("voither-bench-store-");
    let lane = LaneSpec {
        name: "telemetry".into(),
        priority: 1,
        max_bytes: 64 << 30,
        ttl_ms: None,
        policy: FullPolicy::DropOldest,
    };
    let store = Store::open(&dir.path().join("store.redb"), 16 << 20, &[lane], 64 << 30).expect("store opens");
    let now_ms = voither_gateway::unix_ms();
    let mut counter = 0u64;
    let mut commits = 0u64;
    let t0 = Instant::now();
    while t0.elapsed() < dur {
        let recs: Vec<NewRecord> = (0..b as u64)
            .map(|i| NewRecord {
                lane: "telemetry".into(),
                ingest_ts_ms: now_ms,
                source: "devices/0/telemetry".into(),
                content_type: None,
                payload: voither_tests::sim::payload(0, counter + i, PAYLOAD),
            })
            .collect();
        let mqtt: Vec<(u16, u64)> = (0..b as u64).map(|i| (((counter + i) % 65_535 + 1) as u16, counter + i)).collect();
        store.append_batch(&recs, &mqtt).expect("append");
        counter += b as u64;
        commits += 1;
    }
    let secs = t0.elapsed().as_secs_f64();
    (counter as f64 / secs, commits as f64 / secs)
}

/// Records/s (and syncs/s) of `write` + `fdatasync` of `b × 256` bytes for `dur`.
fn raw_rate(b: usize, dur: Duration) -> (f64, f64) {
    let dir = super::tempdir("voither-bench-raw-");
    let mut f =
        std::fs::OpenOptions::new().create(true).append(true).open(dir.path().join("raw.log")).expect("raw file");
    let buf = vec![0x5au8; b * PAYLOAD];
    let mut syncs = 0u64;
    let t0 = Instant::now();
    while t0.elapsed() < dur {
        f.write_all(&buf).expect("write");
        f.sync_data().expect("fdatasync");
        syncs += 1;
    }
    let secs = t0.elapsed().as_secs_f64();
    ((syncs * b as u64) as f64 / secs, syncs as f64 / secs)
}

/// Runs the scenario.
pub fn run(o: &Opts, rows: &mut Vec<Row>) {
    let dur = o.secs(4, 1);
    for b in BATCHES {
        eprintln!("[store] batch {b}: store group commit vs write + fdatasync, {} s each …", dur.as_secs());
        let (raw, syncs) = raw_rate(b, dur);
        let (st, commits) = store_rate(b, dur);
        eprintln!("[store] batch {b}: store {st:.0} records/s, raw {raw:.0} records/s");
        rows.push(
            Row::new("store", &format!("store append, {b} records per durable commit"), st, "records/s")
                .baseline(&format!("write + fdatasync of {b} × {PAYLOAD} B"), raw)
                .target("≥ 0.50 of raw fdatasync", st / raw >= 0.5)
                .note(format!("store {commits:.0} commits/s, raw {syncs:.0} fdatasync/s")),
        );
    }
}
