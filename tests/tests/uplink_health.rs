//! Health of the hub link beyond "the connection is up", against real processes:
//!
//! - a hub that takes batches but never acks them (its sink hangs) is left for the
//!   next endpoint once acks stop making progress;
//! - the uplink rate limit of the config, and the one a hub asks for with `SlowDown`,
//!   hold the bytes sent per second under the limit;
//! - systemd's watchdog gets pings while every loop ticks, and none once one hangs.
//!
//! Blocking harness code (no async runtime on this thread): std's clock measures.
#![allow(clippy::disallowed_types)]

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::{Duration, Instant};

use voither_tests::procs::{next_notify, wait_for, Gateway, GatewayOpts, Hub, Lab, Mosquitto, Pki};
use voither_tests::sim::{self, SimConfig, SimReport};

fn publish(port: u16, devices: u32, messages: u64) -> SimReport {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cfg = SimConfig { port, devices, messages, ..Default::default() };
    let report = rt.block_on(sim::run(cfg, Arc::default()));
    assert_eq!(report.total_acked(), u64::from(devices) * messages, "the broker acked every message");
    report
}

#[test]
fn a_hub_that_never_acks_is_left_for_the_next_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mosquitto = Mosquitto::start(&dir.path().join("mosquitto"));
    let pki = Pki::generate(&dir.path().join("pki"), &["gw-1"]);
    let mut a = Hub::start(&dir.path().join("hub-a"), &pki, "hub-a");
    // Hub A answers handshakes and takes batches, but its sink never commits.
    a.stop();
    a.env.push(("VOITHER_HUB_FAILPOINT".into(), "hold-acks".into()));
    a.restart();
    let b = Hub::start(&dir.path().join("hub-b"), &pki, "hub-b");
    let mut gw = Gateway::start(
        &dir.path().join("gw"),
        &pki,
        &GatewayOpts::external("gw-1", mosquitto.port, vec![a.addr, b.addr]),
    );
    gw.stop();
    gw.set_config(
        "uplink",
        &[("ack_progress_timeout_ms", "2000"), ("probe_interval_ms", "300"), ("failback_after_ms", "1000")],
    );
    gw.restart();
    let on_a = wait_for(Duration::from_secs(20), || {
        gw.status().filter(|s| s["uplink"]["connected"] == true && s["uplink"]["hub_id"] == "hub-a").map(|_| ())
    });
    assert!(on_a.is_some(), "starts on hub A\n{}", gw.log_tail());

    let t0 = Instant::now();
    let report = publish(mosquitto.port, 4, 100);
    let on_b = wait_for(Duration::from_secs(30), || {
        gw.status()
            .filter(|s| s["uplink"]["connected"] == true && s["uplink"]["hub_id"] == "hub-b")
            .map(|_| t0.elapsed())
    })
    .unwrap_or_else(|| panic!("no failover from the stalled hub\n{}", gw.log_tail()));
    let delivered = wait_for(Duration::from_secs(30), || {
        let rep = voither_tests::check::check(&b.export(), &report.acked);
        rep.missing.is_empty().then_some(rep)
    })
    .unwrap_or_else(|| panic!("not all delivered to hub B\n{}\n{}", gw.log_tail(), b.log_tail()));
    assert!(delivered.duplicates.is_empty() && delivered.corrupt == 0);
    assert!(a.export().is_empty(), "hub A never committed anything");
    assert!(gw.metric("voither_gateway_uplink_ack_stalls_total").unwrap_or(0.0) >= 1.0);
    assert!(gw.metric("voither_gateway_uplink_failovers_total").unwrap_or(0.0) >= 1.0);
    assert!(gw.metric("voither_gateway_uplink_ack_latency_seconds_count").unwrap_or(0.0) >= 1.0);
    assert!(gw.metric("voither_gateway_uplink_rtt_seconds").is_some_and(|r| r > 0.0 && r < 1.0));
    let (_, page) = voither_tests::procs::http_get(gw.admin, "/metrics").unwrap();
    assert!(
        page.contains(&format!("voither_gateway_uplink_endpoint{{endpoint=\"{}\"}} 1", b.addr)),
        "the endpoint gauge names hub B"
    );
    assert!(gw.log_tail().contains("no ack for 2000 ms"), "the log says why\n{}", gw.log_tail());
    // Hub A still answers probes, but a stalled endpoint is not failed back to at once.
    let st = gw.status().unwrap();
    assert_eq!(st["uplink"]["hub_id"], "hub-b", "stays on hub B");
    println!("stalled hub left for the next endpoint {:.1} s after publishing began", on_b.as_secs_f64());
}

/// Bytes the gateway sent, and the seconds its whole backlog took to drain once the hub
/// came back.
fn drain(lab: &mut Lab, messages: u64) -> (f64, f64) {
    lab.hub.stop();
    let report = publish(lab.mosquitto.port, 2, messages / 2);
    let held = wait_for(Duration::from_secs(30), || lab.gateway.backlog().filter(|b| *b == messages));
    assert!(held.is_some(), "backlog held while the hub is down");
    let sent_before = lab.gateway.metric("voither_gateway_uplink_sent_bytes_total").unwrap_or(0.0);
    lab.hub.restart();
    let t0 = Instant::now();
    let drained =
        wait_for(Duration::from_secs(120), || lab.gateway.backlog().filter(|b| *b == 0).map(|_| t0.elapsed()))
            .unwrap_or_else(|| panic!("backlog did not drain\n{}", lab.logs()));
    let rep = lab.wait_delivered(&report.acked, Duration::from_secs(30));
    assert!(rep.missing.is_empty() && rep.duplicates.is_empty(), "{rep:?}");
    let sent = lab.gateway.metric("voither_gateway_uplink_sent_bytes_total").unwrap() - sent_before;
    (sent, drained.as_secs_f64())
}

/// Sending `sent` bytes under `limit` bytes/s takes at least `(sent - burst) / limit`
/// seconds. The burst is the bucket (one second's worth) plus the last batch written
/// on credit (about a second's worth of payload, plus record framing). A slower machine
/// only takes longer.
fn assert_paced(sent: f64, secs: f64, limit: f64) {
    let floor = (sent - 2.5 * limit) / limit;
    println!("sent {sent:.0} bytes in {secs:.2} s: {:.0} bytes/s under a limit of {limit:.0}", sent / secs);
    assert!(sent > 4.0 * limit, "the backlog is several seconds of the limit ({sent} bytes)");
    assert!(secs >= floor, "drained {sent} bytes in {secs:.2} s, faster than {limit} bytes/s allows");
}

#[test]
fn the_configured_rate_limit_paces_the_drain() {
    let mut lab = Lab::start();
    lab.gateway.stop();
    lab.gateway.set_config("uplink", &[("rate_limit_bytes_per_s", "32768")]);
    lab.gateway.restart();
    let (sent, secs) = drain(&mut lab, 600);
    let st = lab.gateway.status().unwrap();
    assert_eq!(st["uplink"]["rate_limit_bytes_per_s"], 32768);
    assert_eq!(lab.gateway.metric("voither_gateway_uplink_rate_limit_bytes_per_second"), Some(32768.0));
    assert_paced(sent, secs, 32768.0);
}

#[test]
fn a_hub_can_slow_a_gateway_down() {
    let mut lab = Lab::start();
    lab.hub.stop();
    lab.hub.set_config("hub", &[("gateway_rate_limit_bytes_per_s", "24576")]);
    lab.hub.restart();
    // The gateway's own limit is higher: the hub's lower request wins.
    lab.gateway.stop();
    lab.gateway.set_config("uplink", &[("rate_limit_bytes_per_s", "1000000")]);
    lab.gateway.restart();
    let (sent, secs) = drain(&mut lab, 500);
    let st = lab.gateway.status().unwrap();
    assert_eq!(st["uplink"]["hub_rate_limit_bytes_per_s"], 24576);
    assert_eq!(st["uplink"]["rate_limit_bytes_per_s"], 24576);
    assert!(lab.gateway.log_tail().contains("Hub asked the uplink to slow down"));
    assert_paced(sent, secs, 24576.0);
}

#[test]
fn watchdog_pings_only_while_every_loop_ticks() {
    let mut lab = Lab::start();
    let sock_path = lab.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    lab.gateway.stop();
    lab.gateway.env = vec![
        ("NOTIFY_SOCKET".into(), sock_path.display().to_string()),
        // WatchdogSec=0.5: pings every 250 ms; a loop that has not ticked for 3 s is stuck.
        ("WATCHDOG_USEC".into(), "500000".into()),
    ];
    lab.gateway.restart();
    let ready =
        wait_for(Duration::from_secs(10), || next_notify(&sock, Duration::from_secs(1)).filter(|m| m == "READY=1"));
    assert!(ready.is_some(), "READY=1 once the store is open");
    // A healthy gateway keeps pinging: 12 pings in a row, none more than 3 s apart.
    for i in 0..12 {
        let m = next_notify(&sock, Duration::from_secs(3));
        assert_eq!(m.as_deref(), Some("WATCHDOG=1"), "ping {i}\n{}", lab.gateway.log_tail());
    }

    // Now the uplink loop hangs after its handshake: the pings must stop.
    lab.gateway.stop();
    while next_notify(&sock, Duration::from_millis(100)).is_some() {}
    lab.gateway.env.push(("VOITHER_GATEWAY_FAILPOINT".into(), "stall-uplink".into()));
    lab.gateway.restart();
    let mut pings = 0;
    let silent = wait_for(Duration::from_secs(30), || match next_notify(&sock, Duration::from_secs(5)) {
        Some(m) => {
            pings += u32::from(m == "WATCHDOG=1");
            None
        }
        None => Some(()),
    });
    assert!(silent.is_some(), "pings went on with a hung uplink loop\n{}", lab.gateway.log_tail());
    assert!(
        lab.gateway.log_tail().contains("watchdog pings stopped"),
        "the log names the stuck loop\n{}",
        lab.gateway.log_tail()
    );
    println!("{pings} pings before the hung uplink loop was noticed");
}
