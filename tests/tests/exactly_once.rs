//! 20,000 QoS 1 messages from 10 devices through a real Mosquitto, the gateway and a
//! real QUIC connection reach the hub's sink exactly once, in per-lane order, intact.

use std::sync::Arc;
use std::time::Duration;

use voither_tests::procs::Lab;
use voither_tests::sim::{self, SimConfig, SimProgress};

#[test]
fn twenty_thousand_messages_arrive_exactly_once_in_order() {
    let lab = Lab::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cfg = SimConfig {
        port: lab.mosquitto.port,
        devices: 10,
        messages: 2_000,
        payload_size: 256,
        alarm_every: 20,
        ..Default::default()
    };
    let report = rt.block_on(sim::run(cfg, Arc::new(SimProgress::default())));
    assert_eq!(report.total_acked(), 20_000, "the broker acknowledged every publish");

    let rep = lab.wait_delivered(&report.acked, Duration::from_secs(120));
    assert!(rep.ok(), "{}\n{}", rep.summary(), lab.logs());
    assert_eq!(rep.found, 20_000, "{}", rep.summary());
    assert_eq!(rep.unexpected, 0, "{}", rep.summary());
    assert_eq!(rep.per_lane.get("alarms"), Some(&1_000), "every 20th message is an alarm: {}", rep.summary());

    // Per-lane seqs at the hub are exactly 1..=n: nothing skipped, nothing doubled.
    let rows = lab.hub.export();
    let mut by_lane: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for r in rows {
        if let voither_tests::check::ExportRow::Record { lane, seq, source, .. } = r {
            assert!(source.starts_with("devices/"), "source is the MQTT topic: {source}");
            by_lane.entry(lane).or_default().push(seq);
        }
    }
    for (lane, seqs) in by_lane {
        let want: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, want, "lane {lane} seqs are contiguous from 1");
    }

    // The gateway holds nothing once the hub acknowledged everything, and says so.
    let drained = voither_tests::procs::wait_for(Duration::from_secs(10), || lab.gateway.backlog().filter(|b| *b == 0));
    assert!(drained.is_some(), "gateway backlog did not reach 0\n{}", lab.logs());
    let synced = lab.gateway.metric("voither_gateway_synced_records_total").unwrap();
    assert_eq!(synced, 20_000.0);
    assert_eq!(lab.gateway.metric("voither_gateway_stored_records_total"), Some(20_000.0));
    assert_eq!(lab.gateway.metric("voither_gateway_stored_bytes_total"), Some(20_000.0 * 256.0));
    assert_eq!(lab.hub.metric("voither_hub_duplicate_records_total"), Some(0.0));

    // The same state, for people: `voither-gateway status` and `voither-hub fleet`.
    let out = voither_tests::procs::output_within(
        std::process::Command::new(voither_tests::procs::bin("voither-gateway"))
            .args(["status", "--config"])
            .arg(&lab.gateway.config),
        Duration::from_secs(30),
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(table.contains("connected to") && table.contains("alarms") && table.contains("telemetry"), "{table}");
    println!("{table}");
    let out = voither_tests::procs::output_within(
        std::process::Command::new(voither_tests::procs::bin("voither-hub"))
            .args(["fleet", "--config"])
            .arg(&lab.hub.config),
        Duration::from_secs(30),
    );
    let fleet = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(fleet.contains("gw-1") && fleet.contains("connected") && fleet.contains("1 gateway(s)"), "{fleet}");
    println!("{fleet}");

    // The gateway's periodic Status (every 5 s) carries its store use and budget to /fleet.
    let reported = voither_tests::procs::wait_for(Duration::from_secs(30), || {
        let (_, body) = voither_tests::procs::http_get(lab.hub.admin, "/fleet").ok()?;
        let rows: serde_json::Value = serde_json::from_str(&body).ok()?;
        let gw = rows.as_array()?.iter().find(|r| r["gateway"] == "gw-1")?.clone();
        (gw["store_budget_bytes"].as_u64()? > 0).then_some(gw)
    });
    let gw = reported.unwrap_or_else(|| {
        panic!(
            "no Status with the store budget reached /fleet
{}",
            lab.logs()
        )
    });
    assert_eq!(
        gw["store_budget_bytes"].as_u64(),
        lab.gateway.metric("voither_gateway_store_budget_bytes").map(|b| b as u64)
    );
    assert_eq!(gw["backlog_records"], 0);
}
