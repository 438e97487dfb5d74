//! 200 simulated gateways reconnecting after a hub restart spread their reconnects over
//! the backoff window instead of arriving at once.
//!
//! The simulated gateways are 200 instances of the gateway's own uplink (the code the
//! agent runs, with its backoff and full jitter), each with its own certificate, store
//! and QUIC socket, in this one process, against a real hub process. The hub is stopped
//! (it closes every connection at the same instant, the worst case), kept down until
//! every gateway has failed a few reconnects, and started again; the test records when
//! each gateway's second session is established.
//!
//! Blocking harness code around a runtime for the uplinks: std's clock measures.
#![allow(clippy::disallowed_types)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use voither_gateway::config::Config;
use voither_gateway::metrics::Metrics;
use voither_gateway::store::Store;
use voither_gateway::uplink::{Uplink, UplinkStatus};
use voither_gateway::{tls, Heartbeat};
use voither_tests::procs::{wait_for, Hub, Pki};

const GATEWAYS: usize = 200;

struct Sim {
    status: Arc<Mutex<UplinkStatus>>,
    metrics: Arc<Metrics>,
}

impl Sim {
    fn sessions(&self) -> u64 {
        let st = self.status.lock().unwrap();
        if st.connected {
            st.sessions
        } else {
            0
        }
    }
}

#[test]
fn reconnects_after_a_hub_restart_spread_over_the_backoff_window() {
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<String> = (0..GATEWAYS).map(|i| format!("gw-{i:03}")).collect();
    let pki = Pki::generate(&dir.path().join("pki"), &ids.iter().map(String::as_str).collect::<Vec<_>>());
    let mut hub = Hub::start(&dir.path().join("hub"), &pki, "hub-1");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut sims = Vec::new();
    let mut tasks = Vec::new();
    for id in &ids {
        let gdir = dir.path().join("gw").join(id);
        std::fs::create_dir_all(&gdir).unwrap();
        let text = format!(
            "[gateway]\ndata_dir = \"{data}\"\n\n[uplink]\nendpoints = [\"{hub}\"]\nca = \"{p}/ca.pem\"\n\
             cert = \"{p}/{id}.pem\"\nkey = \"{p}/{id}.key\"\nkeep_alive_ms = 500\nidle_timeout_ms = 3000\n\
             connect_timeout_ms = 1000\nbackoff_min_ms = 200\nbackoff_max_ms = 4000\n",
            data = gdir.display(),
            hub = hub.addr,
            p = pki.dir.display(),
        );
        let cfg = Config::parse(&text, &gdir.join("gateway.toml")).expect("simulated gateway config");
        let store = Store::open(&gdir.join("store"), 1 << 20, &cfg.lane_specs(), cfg.store_max_bytes()).unwrap();
        let u = &cfg.uplink;
        let client = tls::client_config(&u.ca, &u.cert, &u.key, cfg.uplink.keep_alive(), cfg.uplink.idle_timeout())
            .expect("client TLS");
        let status = Arc::new(Mutex::new(UplinkStatus::default()));
        let metrics = Arc::new(Metrics::new());
        let uplink = Uplink {
            endpoints: Mutex::new(cfg.uplink.endpoints.clone()),
            cfg: Arc::new(cfg),
            store: Arc::new(store),
            metrics: metrics.clone(),
            status: status.clone(),
            appended: Arc::new(Notify::new()),
            space: Arc::new(Notify::new()),
            heartbeat: Arc::new(Heartbeat::default()),
            boot_id: rand::random(),
            workloads: None,
        };
        tasks.push(rt.spawn(uplink.run(client, stop_rx.clone())));
        sims.push(Sim { status, metrics });
    }
    let all = wait_for(Duration::from_secs(60), || sims.iter().all(|s| s.sessions() == 1).then_some(()));
    assert!(all.is_some(), "all {GATEWAYS} simulated gateways connect\n{}", hub.log_tail());
    assert_eq!(hub.metric("voither_hub_connected_gateways"), Some(GATEWAYS as f64));

    // The hub goes away: every connection closes at the same instant.
    hub.stop();
    // Down until every gateway has failed three reconnects, so the backoff has grown.
    let failed =
        wait_for(Duration::from_secs(60), || sims.iter().all(|s| s.metrics.uplink_reconnects.get() >= 4).then_some(()));
    assert!(failed.is_some(), "gateways retry while the hub is down");
    hub.restart();
    let up = Instant::now();
    let mut at: Vec<Option<Duration>> = vec![None; GATEWAYS];
    let done = wait_for(Duration::from_secs(60), || {
        for (i, s) in sims.iter().enumerate() {
            if at[i].is_none() && s.sessions() == 2 {
                at[i] = Some(up.elapsed());
            }
        }
        at.iter().all(Option::is_some).then_some(())
    });
    let _ = stop_tx.send(true);
    rt.block_on(async {
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    });
    assert!(done.is_some(), "{} of {GATEWAYS} reconnected", at.iter().flatten().count());

    let mut times: Vec<f64> = at.iter().flatten().map(Duration::as_secs_f64).collect();
    times.sort_by(f64::total_cmp);
    let pct = |p: f64| times[((times.len() - 1) as f64 * p) as usize];
    // The busiest 100 ms: how many gateways would hit the hub at the same moment.
    let busiest = times.iter().map(|&t| times.iter().filter(|&&u| u >= t && u < t + 0.1).count()).max().unwrap_or(0);
    println!("reconnects after the hub restart (seconds after it answered), {GATEWAYS} gateways:");
    let bucket = 0.25;
    let last = (pct(1.0) / bucket).ceil() as usize;
    for b in 0..last.max(1) {
        let n = times.iter().filter(|&&t| t >= b as f64 * bucket && t < (b + 1) as f64 * bucket).count();
        println!("  {:5.2}-{:5.2} s {:4} {}", b as f64 * bucket, (b + 1) as f64 * bucket, n, "#".repeat(n / 2));
    }
    println!(
        "first {:.2} s, p10 {:.2} s, p50 {:.2} s, p90 {:.2} s, last {:.2} s; busiest 100 ms window: {busiest}",
        pct(0.0),
        pct(0.1),
        pct(0.5),
        pct(0.9),
        pct(1.0)
    );
    assert!(
        busiest <= GATEWAYS / 4,
        "{busiest} of {GATEWAYS} gateways reconnected within the same 100 ms: the reconnects are not spread"
    );
    assert!(pct(0.9) - pct(0.1) >= 0.5, "reconnects spread over at least half a second");
}
