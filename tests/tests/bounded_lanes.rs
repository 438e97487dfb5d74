//! Bounded lanes end to end: a `drop_oldest` lane over budget and a lane past its TTL
//! evict, count and report the ranges to the hub as gaps; a `backpressure` lane stops
//! acking the broker and loses nothing.

use std::sync::Arc;
use std::time::Duration;

use voither_tests::check::ExportRow;
use voither_tests::procs::{wait_for, Lab};
use voither_tests::sim::{self, SimConfig};

const LANE: &str = "[[lanes]]\nname = \"telemetry\"\ntopics = [\"devices/#\"]\nmax_bytes = 300000\n";

fn publish(lab: &Lab, devices: u32, messages: u64) -> Vec<Vec<u64>> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cfg = SimConfig { port: lab.mosquitto.port, devices, messages, ..Default::default() };
    let rep = rt.block_on(sim::run(cfg, Arc::default()));
    assert_eq!(rep.total_acked(), u64::from(devices) * messages);
    rep.acked
}

fn lane_status(lab: &Lab) -> serde_json::Value {
    lab.gateway.status().expect("status")["lanes"][0].clone()
}

/// Waits until the gateway holds nothing unacknowledged, records or gaps.
fn wait_all_acked(lab: &Lab) {
    let done = wait_for(Duration::from_secs(90), || {
        let l = lane_status(lab);
        (l["oldest_seq"] == l["next_seq"]).then_some(())
    });
    assert!(done.is_some(), "gateway still holds unacknowledged seqs: {}\n{}", lane_status(lab), lab.logs());
}

fn gaps(rows: &[ExportRow]) -> Vec<(u64, u64, String)> {
    rows.iter()
        .filter_map(|r| match r {
            ExportRow::Gap { from_seq, through_seq, reason, .. } => Some((*from_seq, *through_seq, reason.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn drop_oldest_evicts_counts_and_reports_gaps_to_the_hub() {
    let mut lab = Lab::start_with(LANE, "");
    lab.hub.stop();
    let acked = publish(&lab, 3, 1_000);
    let evicted = wait_for(Duration::from_secs(60), || {
        let l = lane_status(&lab);
        let stored = l["stored_records"].as_u64()?;
        (stored == 3_000).then(|| l["evicted"]["capacity"].as_u64().unwrap_or(0))
    })
    .unwrap_or_else(|| panic!("not all stored: {}\n{}", lane_status(&lab), lab.logs()));
    assert!(evicted >= 1_500, "a 300 kB lane cannot hold 3000 records of ~290 bytes: evicted {evicted}");
    let l = lane_status(&lab);
    assert!(l["backlog_bytes"].as_u64().unwrap() <= 300_000, "budget holds: {l}");
    let metric = lab.gateway.metric("voither_gateway_evicted_records_total").unwrap();
    assert_eq!(metric as u64, evicted, "metric and /status agree");

    lab.hub.restart();
    wait_all_acked(&lab);
    let rows = lab.hub.export();
    let gaps = gaps(&rows);
    assert!(!gaps.is_empty() && gaps.iter().all(|g| g.2 == "capacity"), "{gaps:?}");
    let in_gaps: u64 = gaps.iter().map(|g| g.1 - g.0 + 1).sum();
    assert_eq!(in_gaps, evicted, "the hub's gaps cover exactly the evicted records");
    let rep = voither_tests::check::check(&rows, &acked);
    assert!(rep.duplicates.is_empty() && rep.corrupt == 0, "{}", rep.summary());
    assert_eq!(rep.missing.len() as u64, evicted, "every missing message is accounted for by a gap: {}", rep.summary());
    assert_eq!(rep.found + evicted, 3_000);
}

#[test]
fn ttl_expiry_is_reported_as_ttl_gaps() {
    let lanes = format!("{LANE}ttl_s = 1\n");
    let mut lab = Lab::start_with(&lanes, "");
    lab.hub.stop();
    let acked = publish(&lab, 2, 100);
    let expired = wait_for(Duration::from_secs(30), || {
        let l = lane_status(&lab);
        (l["evicted"]["ttl"].as_u64()? == 200).then_some(())
    });
    assert!(expired.is_some(), "records older than the TTL are evicted: {}", lane_status(&lab));
    lab.hub.restart();
    wait_all_acked(&lab);
    let rows = lab.hub.export();
    let gaps = gaps(&rows);
    assert_eq!(gaps.iter().map(|g| g.1 - g.0 + 1).sum::<u64>(), 200, "{gaps:?}");
    assert!(gaps.iter().all(|g| g.2 == "ttl"));
    let rep = voither_tests::check::check(&rows, &acked);
    assert_eq!((rep.found, rep.missing.len()), (0, 200), "{}", rep.summary());
}

#[test]
fn backpressure_holds_the_broker_and_loses_nothing() {
    let lanes = format!("{LANE}full_policy = \"backpressure\"\n");
    let mut lab = Lab::start_with(&lanes, "");
    lab.hub.stop();
    let acked = publish(&lab, 3, 1_000);
    let held = wait_for(Duration::from_secs(60), || {
        let st = lab.gateway.status()?;
        let l = &st["lanes"][0];
        let stored = l["stored_records"].as_u64()?;
        (st["held_messages"].as_i64()? > 0 && stored < 3_000).then_some(stored)
    });
    let stored = held.unwrap_or_else(|| panic!("gateway should hold messages: {}\n{}", lane_status(&lab), lab.logs()));
    assert!(lane_status(&lab)["backlog_bytes"].as_u64().unwrap() <= 300_000);
    assert_eq!(lane_status(&lab)["evicted"]["capacity"], 0);
    lab.hub.restart();
    let rep = lab.wait_delivered(&acked, Duration::from_secs(120));
    assert!(rep.ok() && rep.found == 3_000, "{}\n{}", rep.summary(), lab.logs());
    assert!(gaps(&lab.hub.export()).is_empty(), "nothing was evicted");
    println!("stored {stored} of 3000 before holding the broker");
}
