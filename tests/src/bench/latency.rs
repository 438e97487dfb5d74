//! Scenario `latency`: publish → hub-durable, at a fixed publish rate.
//!
//! Method. The hub exposes no per-record commit time, so the bench observes commits
//! from outside:
//!
//! - one MQTT client publishes VSIM payloads (device = the rate, counter = n) at the
//!   fixed rate, QoS 1, and notes the time just before handing message n to the client;
//! - a thread polls the hub's `voither_hub_stored_records` counter every
//!   [`POLL`] and notes (time, count). The counter grows only after a sink commit
//!   returns, and with one gateway and one lane the hub commits in seq order, so
//!   `count ≥ s` means seq s is durable;
//! - afterwards `voither-hub export` maps each seq to its payload, hence to n.
//!
//! The latency of record s is the first poll time at which `count ≥ s` minus its publish
//! time: an upper bound, late by at most one poll interval plus one HTTP round trip
//! (both are reported).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use rumqttc::{AsyncClient, MqttOptions, QoS};
use voither_tests::check::ExportRow;
use voither_tests::procs::{Gateway, GatewayOpts, Hub, Mosquitto, Pki};

use super::{counter, percentile, poll_until, Opts, Row, Watch, BENCH_LANES, PAYLOAD};

/// Poll interval of the hub's counter.
pub const POLL: Duration = Duration::from_millis(2);

/// Publishes `count` messages at `rate`/s from one client; returns the publish instants.
async fn publish(port: u16, device: u32, rate: f64, count: u64) -> Vec<Instant> {
    let mut o = MqttOptions::new(format!("bench-latency-{device}"), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(1000);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut ev) = AsyncClient::new(o, 2000);
    let driver = tokio::spawn(async move {
        loop {
            if ev.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let mut sent = Vec::with_capacity(count as usize);
    let iv = Duration::from_secs_f64(1.0 / rate);
    let start = tokio::time::Instant::now();
    for n in 0..count {
        tokio::time::sleep_until(start + iv.mul_f64(n as f64)).await;
        let p = voither_tests::sim::payload(device, n, PAYLOAD);
        sent.push(Instant::now());
        client.publish(format!("devices/{device}/telemetry"), QoS::AtLeastOnce, false, p).await.expect("publish");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = client.disconnect().await;
    driver.abort();
    sent
}

/// Runs the scenario at each rate.
pub fn run(o: &Opts, rt: &tokio::runtime::Runtime, rows: &mut Vec<Row>) {
    let dir = super::tempdir("voither-bench-latency-");
    let mosq = Mosquitto::start(&dir.path().join("mosquitto"));
    let pki = Pki::generate(&dir.path().join("pki"), &["gw-1"]);
    let hub = Hub::start(&dir.path().join("hub"), &pki, "hub-1");
    let gw = Gateway::start(
        &dir.path().join("gw"),
        &pki,
        &GatewayOpts { lanes: BENCH_LANES.into(), ..GatewayOpts::external("gw-1", mosq.port, vec![hub.addr]) },
    );
    let watch = Watch::start(gw.proc.as_ref().expect("gateway").pid());
    let admin = hub.admin;
    poll_until(Duration::from_secs(20), Duration::from_millis(50), || {
        voither_tests::procs::metric(admin, "voither_hub_connected_gateways").unwrap_or(0.0) >= 1.0
    })
    .expect("the gateway connects to the hub");
    let secs = o.secs(10, 3).as_secs_f64();
    for rate in [1000u32, 5000] {
        let count = (f64::from(rate) * secs) as u64;
        let base = counter(admin, "voither_hub_stored_records").unwrap_or(0.0) as u64;
        eprintln!("[latency] {rate} msg/s for {secs} s …");
        let samples: Arc<Mutex<Vec<(Instant, u64, Duration)>>> = Arc::new(Mutex::new(Vec::with_capacity(100_000)));
        let stop = Arc::new(AtomicBool::new(false));
        let poller = {
            let (samples, stop) = (samples.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    if let Some(c) = counter(admin, "voither_hub_stored_records") {
                        samples.lock().expect("samples").push((Instant::now(), c as u64, t.elapsed()));
                    }
                    std::thread::sleep(POLL);
                }
            })
        };
        let sent = rt.block_on(publish(mosq.port, rate, f64::from(rate), count));
        let all = poll_until(Duration::from_secs(60), Duration::from_millis(20), || {
            samples.lock().expect("samples").last().is_some_and(|s| s.1 >= base + count)
        });
        stop.store(true, Ordering::Relaxed);
        let _ = poller.join();
        if all.is_none() {
            eprintln!("[latency] {rate} msg/s: not every record reached the hub in time");
            continue;
        }
        // seq → publish counter, from the hub's export.
        let mut seq_to_n: HashMap<u64, u64> = HashMap::new();
        for row in hub.export() {
            if let ExportRow::Record { seq, payload, .. } = row {
                let p = base64::engine::general_purpose::STANDARD.decode(payload).unwrap_or_default();
                if let Some((d, n)) = voither_tests::sim::parse(&p) {
                    if d == rate {
                        seq_to_n.insert(seq, n);
                    }
                }
            }
        }
        let samples = samples.lock().expect("samples");
        let mut lat = Vec::with_capacity(seq_to_n.len());
        let mut i = 0;
        let mut seqs: Vec<(u64, u64)> = seq_to_n.into_iter().collect();
        seqs.sort_unstable();
        for (seq, n) in &seqs {
            while i < samples.len() && samples[i].1 < *seq {
                i += 1;
            }
            if let (Some(s), Some(t)) = (samples.get(i), sent.get(*n as usize)) {
                lat.push(s.0.saturating_duration_since(*t).as_secs_f64() * 1000.0);
            }
        }
        lat.sort_by(f64::total_cmp);
        let gaps: Vec<f64> = samples.windows(2).map(|w| (w[1].0 - w[0].0).as_secs_f64() * 1000.0).collect();
        let mean_gap = gaps.iter().sum::<f64>() / gaps.len().max(1) as f64;
        let mut rtts: Vec<f64> = samples.iter().map(|s| s.2.as_secs_f64() * 1000.0).collect();
        rtts.sort_by(f64::total_cmp);
        let note = format!(
            "{} of {count} records matched; upper bound: hub counter polled every {mean_gap:.1} ms on average (poll round trip p50 {:.2} ms)",
            lat.len(),
            percentile(&rtts, 0.5)
        );
        let (p50, p99, p999) = (percentile(&lat, 0.5), percentile(&lat, 0.99), percentile(&lat, 0.999));
        eprintln!("[latency] {rate} msg/s: p50 {p50:.1} ms, p99 {p99:.1} ms, p99.9 {p999:.1} ms");
        let label = |q: &str| format!("publish → hub-durable at {rate} msg/s, {q}");
        rows.push(Row::new("latency", &label("p50"), p50, "ms").note(note.clone()));
        let mut r99 = Row::new("latency", &label("p99"), p99, "ms").note(note.clone());
        if rate == 5000 {
            r99 = r99.target("< 25 ms", p99 < 25.0);
        }
        rows.push(r99);
        rows.push(Row::new("latency", &label("p99.9"), p999, "ms").note(note));
    }
    let s = watch.now();
    rows.push(
        Row::new("footprint", "gateway RSS, peak during the latency runs", super::mib(s.hwm), "MiB")
            .note("VmHWM of the latency scenario's gateway"),
    );
    drop(watch);
    drop(gw);
    drop(hub);
    drop(mosq);
}
