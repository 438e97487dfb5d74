//! The hub stops while devices keep publishing: the gateway buffers, the hub comes
//! back, and everything arrives exactly once.

use std::sync::Arc;
use std::time::Duration;

use voither_tests::procs::{wait_for, Lab};
use voither_tests::sim::{self, SimConfig, SimProgress};

#[test]
fn gateway_buffers_through_a_hub_outage_and_delivers_exactly_once() {
    let mut lab = Lab::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cfg = SimConfig {
        port: lab.mosquitto.port,
        devices: 10,
        messages: 600,
        rate: 100.0,
        alarm_every: 10,
        ..Default::default()
    };
    let progress = Arc::new(SimProgress::default());
    let sim = rt.spawn(sim::run(cfg, progress.clone()));

    // Sync is running…
    let synced = wait_for(Duration::from_secs(60), || {
        lab.gateway.metric("voither_gateway_synced_records_total").filter(|n| *n >= 500.0)
    });
    assert!(synced.is_some(), "sync did not start\n{}", lab.logs());
    // …then the hub goes away while devices keep publishing.
    lab.hub.stop();
    let buffered = wait_for(Duration::from_secs(60), || {
        let st = lab.gateway.status()?;
        let backlog = lab.gateway.backlog()?;
        (st["uplink"]["connected"] == false && backlog >= 1_000).then_some(backlog)
    });
    assert!(buffered.is_some(), "gateway did not buffer while the hub was down\n{}", lab.logs());
    let age = lab.gateway.metric("voither_gateway_oldest_unsynced_age_seconds").unwrap_or(0.0);
    assert!(age > 0.0, "the recovery-point gauge shows the age of the oldest unsynced record");

    lab.hub.restart();
    let report = rt.block_on(sim).unwrap();
    assert_eq!(report.total_acked(), 6_000);
    let rep = lab.wait_delivered(&report.acked, Duration::from_secs(120));
    assert!(rep.ok(), "{}\n{}", rep.summary(), lab.logs());
    assert_eq!(rep.found, 6_000);
    let sessions = lab.gateway.status().unwrap()["uplink"]["sessions"].as_u64().unwrap();
    assert!(sessions >= 2, "the gateway reconnected after the outage (sessions {sessions})");
    let drained = wait_for(Duration::from_secs(10), || lab.gateway.backlog().filter(|b| *b == 0));
    assert!(drained.is_some(), "backlog drained after the hub came back");
    println!("buffered {} records while the hub was down", buffered.unwrap());
}
