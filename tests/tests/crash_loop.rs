//! Ingest and sync under load while the gateway is killed with SIGKILL at random
//! moments: every message the broker got a PUBACK for is at the hub exactly once.
//! 25 cycles here; `cargo test --test crash_loop -- --ignored` runs 500.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use voither_tests::procs::{wait_for, Lab};
use voither_tests::sim::{self, SimConfig, SimProgress};

fn crash_loop(cycles: u32) {
    let mut lab = Lab::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let per_device = 40 * u64::from(cycles) + 200;
    let cfg = SimConfig {
        port: lab.mosquitto.port,
        devices: 10,
        messages: per_device,
        rate: 60.0,
        alarm_every: 10,
        ..Default::default()
    };
    let sim = rt.spawn(sim::run(cfg, Arc::new(SimProgress::default())));
    let mut rng = rand::rng();
    let mut redelivered = 0.0;
    for cycle in 0..cycles {
        // Let the new process make progress (an event), then kill it at a random moment
        // in the next 0–600 ms: inside a commit, between commit and PUBACK, mid-batch…
        let progressed = wait_for(Duration::from_secs(60), || {
            lab.gateway.metric("voither_gateway_stored_records_total").filter(|n| *n >= 1.0)
        });
        assert!(progressed.is_some(), "cycle {cycle}: no ingest progress\n{}", lab.logs());
        // Not a synchronisation: the random delay picks the moment of the kill.
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(Duration::from_millis(rng.random_range(0..600)));
        redelivered += lab.gateway.metric("voither_gateway_mqtt_redelivered_duplicates_total").unwrap_or(0.0);
        lab.gateway.kill();
        lab.gateway.restart();
    }
    let report = rt.block_on(sim).unwrap();
    let total = 10 * per_device;
    assert_eq!(report.total_acked(), total);
    let rep = lab.wait_delivered(&report.acked, Duration::from_secs(300));
    println!(
        "crash loop: {cycles} SIGKILLs, {total} messages checked, missing {}, duplicated {}, redeliveries recognised {redelivered}",
        rep.missing.len(),
        rep.duplicates.len()
    );
    assert!(rep.ok(), "{}\n{}", rep.summary(), lab.logs());
    assert_eq!(rep.found, total);
}

#[test]
fn twenty_five_sigkills_lose_and_double_nothing() {
    crash_loop(25);
}

#[test]
#[ignore = "long: 500 SIGKILL cycles, about 10 minutes"]
fn five_hundred_sigkills_lose_and_double_nothing() {
    crash_loop(500);
}
