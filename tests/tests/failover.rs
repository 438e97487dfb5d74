//! Three hubs (three processes, three sinks): kill the primary under load and the
//! gateway is on the secondary within seconds; kill the secondary and it is on the
//! tertiary; restart the primary and it fails back. Every acknowledged message is at
//! one hub, or at two only where a hub died between its commit and its ack.
//!
//! Blocking harness code (no async runtime on this thread): std's clock measures the
//! failover times.
#![allow(clippy::disallowed_types)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use voither_tests::check::ExportRow;
use voither_tests::procs::{wait_for, Gateway, GatewayOpts, Hub, Mosquitto, Pki};
use voither_tests::sim::{self, SimConfig};

fn on_hub(gw: &Gateway, id: &str, timeout: Duration) -> Option<Duration> {
    let t = Instant::now();
    wait_for(timeout, || {
        let st = gw.status()?;
        (st["uplink"]["connected"] == true && st["uplink"]["hub_id"] == id).then(|| t.elapsed())
    })
}

#[test]
fn fails_over_down_the_list_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let mosquitto = Mosquitto::start(&dir.path().join("mosquitto"));
    let pki = Pki::generate(&dir.path().join("pki"), &["gw-1"]);
    let mut a = Hub::start(&dir.path().join("hub-a"), &pki, "hub-a");
    let mut b = Hub::start(&dir.path().join("hub-b"), &pki, "hub-b");
    let c = Hub::start(&dir.path().join("hub-c"), &pki, "hub-c");
    let gw = Gateway::start(
        &dir.path().join("gw"),
        &pki,
        &GatewayOpts::external("gw-1", mosquitto.port, vec![a.addr, b.addr, c.addr]),
    );
    // The gateway config of the harness: idle timeout 3 s, keep-alive 0.5 s; probing and
    // fail-back are tuned here through the config file.
    let text = std::fs::read_to_string(&gw.config).unwrap().replace(
        "backoff_max_ms = 1000\n",
        "backoff_max_ms = 1000\nprobe_interval_ms = 300\nfailback_after_ms = 1500\n",
    );
    std::fs::write(&gw.config, text).unwrap();
    let mut gw = gw;
    gw.stop();
    gw.restart();
    assert!(on_hub(&gw, "hub-a", Duration::from_secs(20)).is_some(), "starts on the primary\n{}", gw.log_tail());

    let rt = tokio::runtime::Runtime::new().unwrap();
    let cfg = SimConfig { port: mosquitto.port, devices: 5, messages: 1_500, rate: 100.0, ..Default::default() };
    let sim = rt.spawn(sim::run(cfg, Arc::default()));

    let synced =
        wait_for(Duration::from_secs(30), || gw.metric("voither_gateway_synced_records_total").filter(|n| *n >= 500.0));
    assert!(synced.is_some());
    a.kill();
    let to_b =
        on_hub(&gw, "hub-b", Duration::from_secs(30)).unwrap_or_else(|| panic!("no failover to B\n{}", gw.log_tail()));
    let synced_b = wait_for(Duration::from_secs(30), || {
        let n = gw.metric("voither_gateway_synced_records_total")?;
        (b.metric("voither_hub_stored_records_total")? > 0.0).then_some(n)
    });
    assert!(synced_b.is_some(), "keeps syncing on the secondary");
    b.kill();
    let to_c =
        on_hub(&gw, "hub-c", Duration::from_secs(30)).unwrap_or_else(|| panic!("no failover to C\n{}", gw.log_tail()));
    a.restart();
    let back =
        on_hub(&gw, "hub-a", Duration::from_secs(30)).unwrap_or_else(|| panic!("no fail-back to A\n{}", gw.log_tail()));
    assert!(gw.metric("voither_gateway_uplink_failbacks_total").unwrap_or(0.0) >= 1.0);

    let report = rt.block_on(sim).unwrap();
    assert_eq!(report.total_acked(), 7_500);
    b.restart();
    // Everything is somewhere; at two hubs only what a killed hub had committed unacked.
    let mut rows: Vec<ExportRow> = Vec::new();
    let done = wait_for(Duration::from_secs(60), || {
        rows = [&a, &b, &c].iter().flat_map(|h| h.export()).collect();
        let rep = voither_tests::check::check(&rows, &report.acked);
        (rep.missing.is_empty() && gw.backlog() == Some(0)).then_some(rep)
    });
    let rep = done.unwrap_or_else(|| panic!("not all delivered\n{}", gw.log_tail()));
    assert_eq!(rep.corrupt, 0);
    for h in [&a, &b, &c] {
        let one = voither_tests::check::check(&h.export(), &[]);
        assert!(one.duplicates.is_empty(), "no duplicate within one hub's sink");
    }
    assert!(rep.duplicates.iter().all(|d| d.2 == 2), "never at more than two hubs");
    let per_hub: HashMap<&str, usize> =
        [("a", a.export().len()), ("b", b.export().len()), ("c", c.export().len())].into_iter().collect();
    println!(
        "failover A->B {:.1} s, B->C {:.1} s, fail-back C->A {:.1} s after A restarted; records per hub {per_hub:?}; \
         at two hubs (commit without ack when a hub died): {}",
        to_b.as_secs_f64(),
        to_c.as_secs_f64(),
        back.as_secs_f64(),
        rep.duplicates.len()
    );
    assert!(to_b < Duration::from_secs(10) && to_c < Duration::from_secs(10), "failover within seconds");
}
