//! The gateway is killed with SIGKILL in the middle of ingest and in the middle of
//! sync, and restarted: nothing the broker had a PUBACK for is missing or duplicated
//! at the hub.

use std::sync::Arc;
use std::time::Duration;

use voither_tests::procs::{wait_for, Lab};
use voither_tests::sim::{self, SimConfig, SimProgress};

#[test]
fn sigkill_during_ingest_and_sync_loses_and_doubles_nothing() {
    let mut lab = Lab::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cfg = SimConfig {
        port: lab.mosquitto.port,
        devices: 10,
        messages: 1_500,
        rate: 150.0,
        alarm_every: 10,
        ..Default::default()
    };
    let sim = rt.spawn(sim::run(cfg, Arc::new(SimProgress::default())));
    let mut redelivered = 0.0;
    for cycle in 0..4 {
        // Mid-ingest: commits are happening.
        let stored = wait_for(Duration::from_secs(60), || {
            lab.gateway.metric("voither_gateway_stored_records_total").filter(|n| *n >= 800.0)
        });
        assert!(stored.is_some(), "cycle {cycle}: ingest did not progress\n{}", lab.logs());
        if cycle % 2 == 1 {
            // Mid-sync: batches in flight, the hub acking.
            let syncing = wait_for(Duration::from_secs(60), || {
                let synced = lab.gateway.metric("voither_gateway_synced_records_total")?;
                let backlog = lab.gateway.backlog()?;
                (synced > 0.0 && backlog > 0).then_some(())
            });
            assert!(syncing.is_some(), "cycle {cycle}: sync did not progress\n{}", lab.logs());
        }
        redelivered += lab.gateway.metric("voither_gateway_mqtt_redelivered_duplicates_total").unwrap_or(0.0);
        lab.gateway.kill();
        lab.gateway.restart();
    }
    let report = rt.block_on(sim).unwrap();
    assert_eq!(report.total_acked(), 15_000);
    let rep = lab.wait_delivered(&report.acked, Duration::from_secs(120));
    assert!(rep.ok(), "{}\n{}", rep.summary(), lab.logs());
    assert_eq!(rep.found, 15_000, "{}", rep.summary());
    redelivered += lab.gateway.metric("voither_gateway_mqtt_redelivered_duplicates_total").unwrap_or(0.0);
    println!("4 SIGKILLs; broker redeliveries recognised as already stored: {redelivered}");
}
