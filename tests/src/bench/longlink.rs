//! Scenario `longlink`: the drain through the fault proxy with 50 ms added each way
//! (100 ms round trip) and 1% loss in each direction.
//!
//! A backlog is ingested with the hub down, the proxy's faults are set, the hub starts,
//! and the drain runs until the backlog is gone or the time limit passes; the rate is
//! the records durable in the sink over the time from the first to the last one seen.
//!
//! What the window allows: with W batches of R records in flight, at most W × R records
//! can be sent per round trip, so the drain can reach at most
//! `min(loopback drain rate, W × R / RTT)`. The ratio is against that. Beside it, a bare
//! quinn stream through the same proxy shows what QUIC's congestion control itself
//! makes of this loss and delay.

use std::sync::Arc;
use std::time::{Duration, Instant};

use voither_tests::procs::{Gateway, GatewayOpts, Hub, Mosquitto, Pki};
use voither_tests::proxy::{FaultProxy, Faults};
use voither_tests::sim::{self, SimProgress};

use super::pipeline::sim_config;
use super::{counter, poll_until, Opts, Row, BENCH_LANES, PAYLOAD};

/// One-way delay added in each direction.
pub const ONE_WAY: Duration = Duration::from_millis(50);
/// Loss in each direction.
pub const LOSS: f64 = 0.01;
/// The gateway's defaults: `uplink.window_batches` and `uplink.batch_records`.
pub const WINDOW_BATCHES: u64 = 8;
/// See [`WINDOW_BATCHES`].
pub const BATCH_RECORDS: u64 = 1024;

fn faults() -> Faults {
    Faults { loss: LOSS, delay: ONE_WAY, ..Faults::default() }
}

/// Runs the scenario; `loopback_rate` is the loopback drain rate (records/s) of
/// scenario `sync`, when it ran.
pub fn run(o: &Opts, rt: &tokio::runtime::Runtime, loopback_rate: Option<f64>, rows: &mut Vec<Row>) {
    let dir = super::tempdir("voither-bench-longlink-");
    let n = o.records.min(if o.quick { 100_000 } else { 400_000 });
    let limit = o.secs(40, 10);
    let mosq = Mosquitto::start(&dir.path().join("mosquitto"));
    let pki = Pki::generate(&dir.path().join("pki"), &["gw-1"]);
    let mut hub = Hub::start(&dir.path().join("hub"), &pki, "hub-1");
    hub.stop();
    let proxy = rt.block_on(FaultProxy::start(hub.addr)).expect("proxy");
    let mut gw = Gateway::start(
        &dir.path().join("gw"),
        &pki,
        &GatewayOpts { lanes: BENCH_LANES.into(), ..GatewayOpts::external("gw-1", mosq.port, vec![proxy.addr()]) },
    );
    gw.stop();
    gw.set_config("uplink", &[("backoff_max_ms", "200"), ("connect_timeout_ms", "500")]);
    gw.restart();
    eprintln!("[longlink] ingesting a {n}-record backlog …");
    let _ = rt.block_on(sim::run(sim_config(mosq.port, n, "bench-longlink"), Arc::new(SimProgress::default())));
    let admin = gw.admin;
    poll_until(Duration::from_secs(600), Duration::from_millis(20), || {
        counter(admin, "voither_gateway_stored_records").unwrap_or(0.0) >= n as f64
    })
    .expect("backlog stored");

    // Phase 1, delay only: does the window keep a 100 ms pipe full? Phase 2, delay and
    // loss: what is left under QUIC's congestion control.
    proxy.control().set(Faults { delay: ONE_WAY, ..Faults::default() });
    eprintln!("[longlink] draining through +{} ms RTT, no loss …", 2 * ONE_WAY.as_millis());
    hub.restart();
    let hub_admin = hub.admin;
    let stored = || counter(hub_admin, "voither_hub_stored_records").unwrap_or(0.0);
    let ready = Instant::now();
    let phase1_target = (n * 3 / 4) as f64;
    let mut first: Option<(Instant, f64)> = None;
    let mut last = (ready, 0.0);
    let _ = poll_until(limit, Duration::from_millis(20), || {
        let c = stored();
        let now = Instant::now();
        if c > 0.0 && first.is_none() {
            first = Some((now, c));
        }
        if c > last.1 {
            last = (now, c);
        }
        c >= phase1_target
    });
    let rtt = metric_gauge(admin, "voither_gateway_uplink_rtt_seconds");
    let clean_rate = match first {
        Some((t1, c1)) if last.0 > t1 => (last.1 - c1) / (last.0 - t1).as_secs_f64(),
        _ => 0.0,
    };
    let clean_note = format!(
        "{:.0} records in {:.1} s after the hub came up; QUIC smoothed RTT seen by the gateway {:.0} ms",
        last.1,
        (last.0 - ready).as_secs_f64(),
        rtt * 1000.0
    );
    eprintln!("[longlink] no loss: {clean_rate:.0} records/s");

    proxy.control().set(faults());
    eprintln!("[longlink] now with {}% loss each way, for {} s …", LOSS * 100.0, limit.as_secs());
    std::thread::sleep(Duration::from_secs(2));
    let (t1, c1) = (Instant::now(), stored());
    let mut last = (t1, c1);
    let _ = poll_until(limit, Duration::from_millis(20), || {
        let c = stored();
        if c > last.1 {
            last = (Instant::now(), c);
        }
        c >= n as f64
    });
    let rate = if last.0 > t1 { (last.1 - c1) / (last.0 - t1).as_secs_f64() } else { 0.0 };
    let note = format!(
        "{:.0} records in {:.1} s, measured from 2 s after the loss began",
        last.1 - c1,
        (last.0 - t1).as_secs_f64()
    );
    let stats = proxy.control().stats();
    eprintln!("[longlink] drain: {rate:.0} records/s");
    gw.stop();
    hub.stop();

    // Bare quinn through the same proxy setting, for the same time.
    eprintln!("[longlink] bare quinn through the same proxy …");
    let raw = rt.block_on(async {
        let server = super::transport::server(&pki.dir);
        let saddr = server.local_addr().expect("addr");
        let p2 = FaultProxy::start(saddr).await.expect("proxy");
        p2.control().set(faults());
        let srv = tokio::spawn(super::transport::serve_one(server));
        let (bytes, el) = super::transport::bulk(&pki.dir, p2.addr(), u64::MAX, o.secs(20, 8)).await;
        let _ = srv.await;
        bytes as f64 / el.as_secs_f64()
    });
    let raw_rate = raw / PAYLOAD as f64;
    eprintln!("[longlink] bare quinn: {raw_rate:.0} records/s equivalent");

    let window = (WINDOW_BATCHES * BATCH_RECORDS) as f64 / (2 * ONE_WAY).as_secs_f64();
    let allowed = loopback_rate.map_or(window, |l| l.min(window));
    rows.push(
        Row::new("longlink", "drain through +100 ms RTT, no loss", clean_rate, "records/s")
            .baseline("min(loopback drain, window ÷ RTT)", allowed)
            .target("≥ 0.70 of what the window allows", clean_rate / allowed >= 0.7)
            .note(format!(
                "{clean_note}; window {WINDOW_BATCHES} × {BATCH_RECORDS} records ÷ 100 ms = {window:.0} records/s"
            )),
    );
    // Mathis et al.: a loss-based congestion controller sustains about
    // MSS / RTT × 1.22 / sqrt(p) with random loss p.
    let mathis = 1200.0 / (2 * ONE_WAY).as_secs_f64() * 1.22 / LOSS.sqrt() / PAYLOAD as f64;
    rows.push(
        Row::new("longlink", "drain through +100 ms RTT, 1% loss each way", rate, "records/s")
            .baseline("min(loopback drain, window ÷ RTT)", allowed)
            .target("≥ 0.70 of what the window allows", rate / allowed >= 0.7)
            .note(format!(
                "{note}; proxy dropped {} datagrams up, {} down; loss-based congestion control allows about {mathis:.0} records/s (1200-byte packets, Mathis formula)",
                stats.up.dropped, stats.down.dropped
            )),
    );
    rows.push(
        Row::new("longlink", "drain through the proxy vs bare quinn through it", rate, "records/s")
            .baseline("bare quinn stream, same proxy settings", raw_rate)
            .note(format!("bare quinn moved {:.2} MB/s; QUIC's loss-based congestion control bounds both", raw / 1e6)),
    );
    drop(proxy);
    drop(mosq);
}

fn metric_gauge(addr: std::net::SocketAddr, name: &str) -> f64 {
    voither_tests::procs::metric(addr, name).unwrap_or(0.0)
}
