//! Link faults between gateway and hub, injected by the UDP fault proxy: loss of 10%
//! and 30%, delay with reordering and duplication, a partition longer than the idle
//! timeout, and a link that flaps for a minute. Every acknowledged message arrives
//! exactly once.

use std::sync::Arc;
use std::time::Duration;

use voither_tests::procs::{wait_for, Lab};
use voither_tests::proxy::{FaultProxy, Faults};
use voither_tests::sim::{self, SimConfig, SimProgress};

struct Setup {
    lab: Lab,
    proxy: FaultProxy,
    rt: tokio::runtime::Runtime,
}

fn setup() -> Setup {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut proxy = None;
    let lab = Lab::start_full("", "", |hub| {
        let p = rt.block_on(FaultProxy::start(hub)).expect("proxy");
        let addr = p.addr();
        proxy = Some(p);
        addr
    });
    Setup { lab, proxy: proxy.unwrap(), rt }
}

fn run(s: &Setup, devices: u32, messages: u64, rate: f64, during: impl FnOnce()) -> Vec<Vec<u64>> {
    let cfg = SimConfig { port: s.lab.mosquitto.port, devices, messages, rate, alarm_every: 10, ..Default::default() };
    let sim = s.rt.spawn(sim::run(cfg, Arc::new(SimProgress::default())));
    during();
    let rep = s.rt.block_on(sim).unwrap();
    assert_eq!(rep.total_acked(), u64::from(devices) * messages);
    rep.acked
}

fn assert_exactly_once(s: &Setup, acked: &[Vec<u64>], n: u64, timeout: Duration) {
    let rep = s.lab.wait_delivered(acked, timeout);
    let st = s.proxy.control().stats();
    assert!(rep.ok(), "{}\nproxy {st:?}\n{}", rep.summary(), s.lab.logs());
    assert_eq!(rep.found, n, "{}", rep.summary());
    println!("{} delivered exactly once; proxy up {:?} down {:?}", n, st.up, st.down);
}

fn lossy(loss: f64) {
    let s = setup();
    s.proxy.control().set(Faults { loss, ..Default::default() });
    let acked = run(&s, 5, 1_000, 250.0, || {});
    assert_exactly_once(&s, &acked, 5_000, Duration::from_secs(240));
    let st = s.proxy.control().stats();
    assert!(st.up.dropped > 0 && st.down.dropped > 0, "the proxy really dropped datagrams: {st:?}");
}

#[test]
fn ten_percent_loss() {
    lossy(0.10);
}

#[test]
fn thirty_percent_loss() {
    lossy(0.30);
}

#[test]
fn delay_reordering_and_duplication() {
    let s = setup();
    s.proxy.control().set(Faults {
        delay: Duration::from_millis(40),
        jitter: Duration::from_millis(30),
        duplicate: 0.05,
        loss: 0.02,
        ..Default::default()
    });
    let acked = run(&s, 5, 1_000, 250.0, || {});
    assert_exactly_once(&s, &acked, 5_000, Duration::from_secs(180));
    let st = s.proxy.control().stats();
    assert!(st.up.duplicated > 0 && st.down.duplicated > 0, "{st:?}");
}

#[test]
fn partition_longer_than_the_idle_timeout_then_recovery() {
    let s = setup();
    let acked = run(&s, 5, 1_000, 100.0, || {
        // Sync is running, then the link goes dark for twice the idle timeout (3 s).
        let synced = wait_for(Duration::from_secs(60), || {
            s.lab.gateway.metric("voither_gateway_synced_records_total").filter(|n| *n >= 300.0)
        });
        assert!(synced.is_some(), "sync did not start\n{}", s.lab.logs());
        s.proxy.control().set_blackhole(true);
        let dropped = wait_for(Duration::from_secs(30), || {
            s.lab.gateway.status().filter(|st| st["uplink"]["connected"] == false).map(|_| ())
        });
        assert!(dropped.is_some(), "the gateway noticed the dead link within the idle timeout");
        let backlog_grew = wait_for(Duration::from_secs(30), || s.lab.gateway.backlog().filter(|b| *b >= 500));
        assert!(backlog_grew.is_some(), "devices keep publishing and the gateway buffers");
        s.proxy.control().set_blackhole(false);
    });
    assert_exactly_once(&s, &acked, 5_000, Duration::from_secs(120));
    let sessions = s.lab.gateway.status().unwrap()["uplink"]["sessions"].as_u64().unwrap();
    assert!(sessions >= 2, "reconnected after the partition ({sessions} sessions)");
}

#[test]
fn link_flapping_for_a_minute() {
    let s = setup();
    let _rt = s.rt.enter();
    let flap = s.proxy.control().flap(Duration::from_secs(3), Duration::from_secs(2), Duration::from_secs(60));
    // 60 s of publishing at 100 msg/s in all.
    let acked = run(&s, 5, 1_200, 20.0, || {});
    s.rt.block_on(flap).unwrap();
    assert_exactly_once(&s, &acked, 6_000, Duration::from_secs(120));
    assert!(s.proxy.control().stats().up.dropped > 0, "the link really went down");
}
