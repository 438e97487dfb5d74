//! Scenarios `ingest` and `sync` (the gateway side), with the gateway's footprint.
//!
//! 1. Mosquitto alone: the simulator publishes N records (10 devices, QoS 1, 256 bytes)
//!    to a subscriber that acks each message at once and keeps nothing — the broker's
//!    ceiling. No gateway is connected yet, so the broker serves only this subscriber.
//! 2. The same N records, same broker, to the gateway (hub down): timed from the first
//!    publish until the gateway's `stored_records` counter reaches N, i.e. until the
//!    last record is durable in the store (PUBACK follows the commit). That is the
//!    backlog of the drain.
//! 3. The hub starts: timed until the hub's `stored_records` counter reaches N (every
//!    record durable in the hub's embedded sink).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use voither_tests::procs::{Gateway, GatewayOpts, Hub, Mosquitto, Pki};
use voither_tests::sim::{self, SimConfig, SimProgress};

use super::{counter, mib, poll_until, Opts, Row, Watch, BENCH_LANES, PAYLOAD};

/// Devices (MQTT connections) the simulator publishes from.
pub const DEVICES: u32 = 10;

/// Messages a counting subscriber has received.
#[derive(Debug, Default)]
pub struct SubCount {
    /// Messages received.
    pub n: AtomicU64,
    /// When the first one came.
    pub first: Mutex<Option<Instant>>,
    /// When the latest one came.
    pub last: Mutex<Option<Instant>>,
}

/// A subscriber to `devices/#` (QoS 1) on `port` that acks each message as soon as it
/// is read and keeps nothing but a count. Returns once the subscription is acknowledged.
pub async fn subscriber(
    port: u16,
    id: &str,
    clean: bool,
    counts: Arc<SubCount>,
) -> (AsyncClient, tokio::task::JoinHandle<()>) {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_clean_session(clean);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(1 << 20, 1 << 20);
    o.set_inflight(1000);
    let (client, mut ev) = AsyncClient::new(o, 1000);
    client.subscribe("devices/#", QoS::AtLeastOnce).await.expect("subscribe request");
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut tx = Some(tx);
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(t) = tx.take() {
                        let _ = t.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    let now = Instant::now();
                    counts.first.lock().expect("first").get_or_insert(now);
                    *counts.last.lock().expect("last") = Some(now);
                    counts.n.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), rx).await.expect("SUBACK within 10 s").expect("subscriber task");
    (client, task)
}

/// The simulator configuration for `records` records from [`DEVICES`] devices.
pub fn sim_config(port: u16, records: u64, prefix: &str) -> SimConfig {
    SimConfig {
        port,
        devices: DEVICES,
        messages: records / u64::from(DEVICES),
        payload_size: PAYLOAD,
        client_prefix: prefix.into(),
        ..SimConfig::default()
    }
}

/// What the gateway run measured.
#[derive(Debug, Clone, Default)]
pub struct PipelineResult {
    /// Records published and stored.
    pub records: u64,
    /// Broker ceiling, records/s (when measured).
    pub ceiling: Option<f64>,
    /// Durable ingest, records/s.
    pub ingest: f64,
    /// Drain: seconds from the hub being up to the last record durable in its sink.
    pub drain_secs: Option<f64>,
    /// Drain: seconds from the first record to the last record durable in the sink.
    pub drain_first_last_secs: Option<f64>,
    /// Drain: CPU seconds of the gateway and of the hub, from the hub's start to the
    /// last record durable.
    pub drain_cpu_s: Option<(f64, f64)>,
}

/// Runs the broker ceiling (if `ceiling`), durable ingest, and the drain (if `drain`).
pub fn run(o: &Opts, rt: &tokio::runtime::Runtime, ceiling: bool, drain: bool, rows: &mut Vec<Row>) -> PipelineResult {
    let dir = super::tempdir("voither-bench-pipeline-");
    let n = o.records / u64::from(DEVICES) * u64::from(DEVICES);
    let mosq = Mosquitto::start(&dir.path().join("mosquitto"));
    let pki = Pki::generate(&dir.path().join("pki"), &["gw-1"]);
    let mut res = PipelineResult { records: n, ..Default::default() };

    if ceiling {
        eprintln!("[ingest] broker ceiling: {n} records to a subscriber that acks at once …");
        let counts = Arc::new(SubCount::default());
        let (client, task) = rt.block_on(subscriber(mosq.port, "bench-null-subscriber", false, counts.clone()));
        let t0 = Instant::now();
        let pub_task = rt.spawn(sim::run(sim_config(mosq.port, n, "bench-ceiling"), Arc::new(SimProgress::default())));
        let done =
            poll_until(Duration::from_secs(900), Duration::from_millis(5), || counts.n.load(Ordering::Relaxed) >= n)
                .expect("the null subscriber got every record");
        let rate = n as f64 / (done - t0).as_secs_f64();
        let _ = rt.block_on(pub_task);
        // Leave no session behind that the broker would keep queuing for.
        rt.block_on(async {
            let _ = client.unsubscribe("devices/#").await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = client.disconnect().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        });
        task.abort();
        eprintln!("[ingest] broker ceiling: {rate:.0} records/s");
        res.ceiling = Some(rate);
    }

    // The hub exists (its address goes into the gateway's config) but is down until the drain.
    let mut hub = Hub::start(&dir.path().join("hub"), &pki, "hub-1");
    hub.stop();
    let mut gw = Gateway::start(
        &dir.path().join("gw"),
        &pki,
        &GatewayOpts { lanes: BENCH_LANES.into(), ..GatewayOpts::external("gw-1", mosq.port, vec![hub.addr]) },
    );
    // Reconnect quickly once the hub is up, so the drain is not timing a backoff or a
    // connection attempt to the dead hub waiting out its timeout.
    gw.stop();
    gw.set_config("uplink", &[("backoff_max_ms", "200"), ("connect_timeout_ms", "500")]);
    if let Ok(w) = std::env::var("VOITHER_BENCH_WINDOW_BATCHES") {
        gw.set_config("uplink", &[("window_batches", w.as_str())]);
    }
    gw.restart();
    let gpid = gw.proc.as_ref().expect("gateway runs").pid();
    let watch = Watch::start(gpid);

    eprintln!("[ingest] durable ingest: {n} records, Mosquitto → gateway store …");
    let cpu0 = watch.now().cpu_s;
    let t0 = Instant::now();
    let pub_task = rt.spawn(sim::run(sim_config(mosq.port, n, "bench-ingest"), Arc::new(SimProgress::default())));
    let admin = gw.admin;
    let done = poll_until(Duration::from_secs(1800), Duration::from_millis(20), || {
        counter(admin, "voither_gateway_stored_records").unwrap_or(0.0) >= n as f64
    })
    .unwrap_or_else(|| panic!("the gateway did not store {n} records\n{}", gw.log_tail()));
    let ingest_secs = (done - t0).as_secs_f64();
    let cpu_ingest = watch.now().cpu_s - cpu0;
    let _ = rt.block_on(pub_task);
    res.ingest = n as f64 / ingest_secs;
    eprintln!("[ingest] durable ingest: {:.0} records/s ({ingest_secs:.2} s)", res.ingest);
    let mut row = Row::new("ingest", "durable ingest, Mosquitto → gateway store (QoS 1, PUBACK after commit)", res.ingest, "records/s")
        .note(format!("{n} records, {DEVICES} publishers, {PAYLOAD}-byte payloads, {ingest_secs:.2} s from first publish to last record durable"));
    if let Some(c) = res.ceiling {
        row = row.baseline("Mosquitto → subscriber that acks at once", c);
        let r = res.ingest / c;
        row = row.target("≥ 0.90 of broker ceiling", r >= 0.9);
        rows.push(row);
        rows.push(
            Row::new("ingest", "broker ceiling, Mosquitto → null subscriber", c, "records/s")
                .note("same broker, same publishers, no gateway connected"),
        );
    } else {
        rows.push(row);
    }

    // Steady memory with the whole backlog held.
    std::thread::sleep(Duration::from_secs(1));
    let w0 = Instant::now();
    std::thread::sleep(o.secs(5, 2));
    let steady_backlog = watch.median_rss(w0, Instant::now());
    let backlog = gw.backlog().unwrap_or(0);
    let after_ingest = watch.now();
    rows.push(
        Row::new(
            "footprint",
            &format!("gateway RSS, steady, idle with a {backlog}-record backlog"),
            mib(steady_backlog),
            "MiB",
        )
        .target("< 32 MiB", mib(steady_backlog) < 32.0)
        .note("median VmRSS over the idle window after ingest, hub down"),
    );
    rows.push(
        Row::new("footprint", "gateway CPU per million records ingested", cpu_ingest * 1e6 / n as f64, "CPU s")
            .note("utime+stime of the gateway process from /proc/<pid>/stat during ingest"),
    );

    if drain {
        // The drain is only timed from a full backlog: anything else (a hub of another
        // run still listening on these ports, say) would time records already synced.
        assert!(
            backlog >= n,
            "the gateway holds {backlog} records before the drain, not {n}: something synced them while the hub was down\n{}",
            gw.log_tail()
        );
        eprintln!("[sync] drain: {n}-record backlog, gateway → hub (embedded sink) …");
        let gcpu0 = watch.now().cpu_s;
        hub.restart();
        let ready = Instant::now();
        let hpid = hub.proc.as_ref().expect("hub runs").pid();
        let hcpu0 = super::sample(hpid).unwrap_or_default().cpu_s;
        let mut first = None;
        let hub_admin = hub.admin;
        let end = poll_until(Duration::from_secs(1800), Duration::from_millis(10), || {
            let c = counter(hub_admin, "voither_hub_stored_records").unwrap_or(0.0);
            if c > 0.0 && first.is_none() {
                first = Some(Instant::now());
            }
            c >= n as f64
        })
        .unwrap_or_else(|| panic!("the hub did not store {n} records\n{}\n{}", gw.log_tail(), hub.log_tail()));
        // How many sink commits the drain took and how long they ran.
        if std::env::var_os("VOITHER_BENCH_DUMP").is_some() {
            for (who, a) in [("hub", hub_admin), ("gw", gw.admin)] {
                if let Ok((_, body)) = voither_tests::procs::http_get(a, "/metrics") {
                    for l in
                        body.lines().filter(|l| !l.starts_with('#') && (l.contains("seconds") || l.contains("commit")))
                    {
                        eprintln!("[dump {who}] {l}");
                    }
                }
            }
        }
        let gcpu = watch.now().cpu_s - gcpu0;
        let hcpu = super::sample(hpid).unwrap_or_default().cpu_s - hcpu0;
        let secs = (end - ready).as_secs_f64();
        let fl = (end - first.unwrap_or(ready)).as_secs_f64();
        res.drain_secs = Some(secs);
        res.drain_first_last_secs = Some(fl);
        res.drain_cpu_s = Some((gcpu, hcpu));
        eprintln!("[sync] drain: {secs:.2} s from hub up ({fl:.2} s first → last record)");
        let peak = watch.now().hwm;
        std::thread::sleep(Duration::from_secs(1));
        let w0 = Instant::now();
        std::thread::sleep(o.secs(3, 1));
        let steady_empty = watch.median_rss(w0, Instant::now());
        rows.push(
            Row::new("footprint", "gateway RSS, peak during ingest + drain", mib(peak), "MiB")
                .note(format!("VmHWM; after ingest alone it was {:.1} MiB", mib(after_ingest.hwm))),
        );
        rows.push(Row::new("footprint", "gateway RSS, steady after the drain", mib(steady_empty), "MiB"));
        rows.push(Row::new("footprint", "gateway CPU per million records drained", gcpu * 1e6 / n as f64, "CPU s"));
        rows.push(Row::new("footprint", "hub CPU per million records drained", hcpu * 1e6 / n as f64, "CPU s"));
        let dup = counter(hub_admin, "voither_hub_duplicate_records").unwrap_or(0.0);
        if dup > 0.0 {
            eprintln!("[sync] note: the hub ignored {dup} duplicate records");
        }
    }
    drop(watch);
    gw.stop();
    hub.stop();
    drop(mosq);
    res
}

/// The records/s and MB/s rows of a drain of `records` in `secs`.
pub fn drain_mbps(records: u64, secs: f64) -> f64 {
    records as f64 * PAYLOAD as f64 / secs / 1e6
}
