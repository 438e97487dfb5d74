//! The hub crashes between its sink commit and its ack: after the restart the gateway
//! resends what was not acked, and the sink holds no duplicate.

use std::sync::Arc;
use std::time::Duration;

use voither_tests::procs::Lab;
use voither_tests::sim::{self, SimConfig, SimProgress};

#[test]
fn crash_between_sink_commit_and_ack_creates_no_duplicate() {
    let mut lab = Lab::start();
    // Restart the hub with a failpoint: exit right after its 5th commit, before acking.
    lab.hub.stop();
    lab.hub.env = vec![("VOITHER_HUB_FAILPOINT".into(), "exit-after-commit:5".into())];
    lab.hub.restart();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cfg = SimConfig { port: lab.mosquitto.port, devices: 5, messages: 600, rate: 200.0, ..Default::default() };
    let sim = rt.spawn(sim::run(cfg, Arc::new(SimProgress::default())));
    let code = lab.hub.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(86), "the hub stopped at the failpoint\n{}", lab.logs());
    // What the crashed hub committed is in the sink although the gateway never got the ack.
    let committed_unacked = lab.hub.export().len();
    assert!(committed_unacked > 0);
    lab.hub.env.clear();
    lab.hub.restart();
    let report = rt.block_on(sim).unwrap();
    let rep = lab.wait_delivered(&report.acked, Duration::from_secs(120));
    assert!(rep.ok(), "{}\n{}", rep.summary(), lab.logs());
    assert_eq!(rep.found, 3_000);
    println!("{committed_unacked} records were committed but not acked when the hub died; no duplicate after restart");
}
