//! A hub hands the gateway a newer endpoint list; the gateway persists it, so after a
//! restart while its configured hub is gone it still finds the other region.

use std::sync::Arc;
use std::time::Duration;

use voither_tests::procs::{free_tcp_port, wait_for, Gateway, GatewayOpts, Hub, Pki};

#[test]
fn endpoint_list_from_welcome_survives_a_restart_while_offline() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&dir.path().join("pki"), &["gw-1"]);
    let hub_b = Hub::start(&dir.path().join("hub-b"), &pki, "hub-b");
    // Hub A advertises the region list (here: region B).
    let mut hub_a = Hub::start_advertising(&dir.path().join("hub-a"), &pki, "hub-a", &[hub_b.addr]);
    let port = free_tcp_port();
    // The gateway's config knows only hub A.
    let mut gw = Gateway::start(&dir.path().join("gw"), &pki, &GatewayOpts::embedded("gw-1", port, vec![hub_a.addr]));
    let want = vec![hub_b.addr.to_string()];
    let adopted = wait_for(Duration::from_secs(30), || {
        let st = gw.status()?;
        let list: Vec<String> = serde_json::from_value(st["uplink"]["endpoints"].clone()).ok()?;
        (list == want).then_some(())
    });
    assert!(adopted.is_some(), "the gateway takes the hub's list: {:?}\n{}", gw.status(), gw.log_tail());
    let saved = std::fs::read_to_string(dir.path().join("gw/data/endpoints.json")).unwrap();
    assert_eq!(serde_json::from_str::<Vec<String>>(&saved).unwrap(), want, "and persists it");

    // Reboot while hub A is gone: the gateway goes to B from the saved list.
    gw.stop();
    hub_a.stop();
    gw.restart();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cfg = voither_tests::sim::SimConfig { port, devices: 2, messages: 100, ..Default::default() };
    let report = rt.block_on(voither_tests::sim::run(cfg, Arc::default()));
    let rep = wait_for(Duration::from_secs(60), || {
        let rep = voither_tests::check::check(&hub_b.export(), &report.acked);
        rep.missing.is_empty().then_some(rep)
    })
    .unwrap_or_else(|| panic!("records did not reach hub B\n{}", gw.log_tail()));
    assert!(rep.ok() && rep.found == 200, "{}", rep.summary());
    assert_eq!(gw.status().unwrap()["uplink"]["hub_id"], "hub-b");
}
