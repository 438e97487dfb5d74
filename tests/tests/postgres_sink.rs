//! The PostgreSQL sink with real processes: a PostgreSQL server in a temporary folder
//! (tests/src/pg.rs), hub replicas sharing it, gateways, Mosquitto or the embedded
//! broker, and the device simulator.
//!
//! - Two replicas, one gateway switching between them mid-stream (one replica stopped,
//!   then the other killed): every acked message once in the database.
//! - A replica killed between its commit and its ack: the other replica reads the
//!   marks from the database, nothing is lost, nothing doubled.
//! - PostgreSQL restarted while two gateways send: the hub holds acks and retries,
//!   stays up, and everything arrives once.
//!
//! Blocking harness code (no async runtime on this thread): std's clock for timeouts.
#![allow(clippy::disallowed_types)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use voither_tests::check::{check, ExportRow};
use voither_tests::pg::Postgres;
use voither_tests::procs::{wait_for, Gateway, GatewayOpts, Hub, Mosquitto, Pki};
use voither_tests::sim::{self, SimConfig};

fn on_hub(gw: &Gateway, id: &str, timeout: Duration) -> bool {
    wait_for(timeout, || {
        let st = gw.status()?;
        (st["uplink"]["connected"] == true && st["uplink"]["hub_id"] == id).then_some(())
    })
    .is_some()
}

fn only(rows: &[ExportRow], gateway: &str) -> Vec<ExportRow> {
    rows.iter().filter(|r| matches!(r, ExportRow::Record { gateway: g, .. } if g == gateway)).cloned().collect()
}

#[test]
fn two_replicas_exactly_once_while_the_gateway_switches_between_them() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let mosquitto = Mosquitto::start(&dir.path().join("mosquitto"));
    let pki = Pki::generate(&dir.path().join("pki"), &["gw-1"]);
    let mut a = Hub::start_full(&dir.path().join("hub-a"), &pki, "hub-a", &[], &pg.sink_toml());
    let mut b = Hub::start_full(&dir.path().join("hub-b"), &pki, "hub-b", &[], &pg.sink_toml());
    let gw = Gateway::start(
        &dir.path().join("gw"),
        &pki,
        &GatewayOpts::external("gw-1", mosquitto.port, vec![a.addr, b.addr]),
    );
    assert!(on_hub(&gw, "hub-a", Duration::from_secs(20)), "starts on replica A\n{}", gw.log_tail());

    let rt = tokio::runtime::Runtime::new().unwrap();
    let cfg = SimConfig { port: mosquitto.port, devices: 4, messages: 1_500, rate: 150.0, ..Default::default() };
    let sim = rt.spawn(sim::run(cfg, Arc::default()));

    let stored_on = |h: &Hub, n: f64| {
        wait_for(Duration::from_secs(30), || h.metric("voither_hub_stored_records_total").filter(|v| *v >= n))
    };
    assert!(stored_on(&a, 500.0).is_some(), "A stores\n{}", a.log_tail());
    // Mid-stream: A goes away (SIGTERM), the gateway moves to B...
    a.stop();
    assert!(on_hub(&gw, "hub-b", Duration::from_secs(30)), "moves to B\n{}", gw.log_tail());
    assert!(stored_on(&b, 500.0).is_some(), "B stores\n{}", b.log_tail());
    // ...then B dies (SIGKILL) with A back: the gateway moves to A again.
    a.restart();
    b.kill();
    assert!(on_hub(&gw, "hub-a", Duration::from_secs(30)), "back on A\n{}", gw.log_tail());

    let report = rt.block_on(sim).unwrap();
    assert_eq!(report.total_acked(), 6_000);
    let mut rows = Vec::new();
    let rep = wait_for(Duration::from_secs(60), || {
        rows = a.export();
        let rep = check(&rows, &report.acked);
        (rep.missing.is_empty() && gw.backlog() == Some(0)).then_some(rep)
    })
    .unwrap_or_else(|| panic!("not all delivered: {}\n{}", check(&rows, &report.acked).summary(), gw.log_tail()));
    assert!(rep.ok(), "{}", rep.summary());
    let in_db: u64 = pg.sql("SELECT count(*) FROM voither_records").parse().unwrap();
    let distinct: u64 = pg.sql("SELECT count(DISTINCT (gateway, lane, seq)) FROM voither_records").parse().unwrap();
    assert_eq!(in_db, distinct, "no (gateway, lane, seq) twice");
    assert_eq!(in_db, rows.iter().filter(|r| matches!(r, ExportRow::Record { .. })).count() as u64);
    let marks = pg.sql("SELECT string_agg(lane || '=' || mark, ',' ORDER BY lane) FROM voither_marks");
    let max_seq = pg.sql("SELECT string_agg(lane || '=' || m, ',' ORDER BY lane) FROM (SELECT lane, max(seq) AS m FROM voither_records GROUP BY lane) x");
    assert_eq!(marks, max_seq, "each lane's mark is its highest stored seq");
    // The schema: migration 1 applied once (two replicas started against it), records
    // in day partitions, none in the default one, the next days' made ahead.
    assert_eq!(pg.sql("SELECT string_agg(version::text, ',') FROM voither_schema_migrations"), "1");
    assert_eq!(pg.sql("SELECT count(*) FROM voither_records_default"), "0");
    let in_days =
        pg.sql("SELECT count(*) FROM voither_records WHERE tableoid::regclass::text ~ '^voither_records_[0-9]{8}$'");
    assert_eq!(in_days, in_db.to_string(), "every record in a day partition");
    let parts: u64 =
        pg.sql("SELECT count(*) FROM pg_inherits WHERE inhparent = 'voither_records'::regclass").parse().unwrap();
    assert!(parts >= 5, "default + today + 3 days ahead, got {parts}");
    println!("two replicas: {} records in PostgreSQL, {}", in_db, rep.summary());
}

#[test]
fn a_replica_killed_between_commit_and_ack_loses_nothing() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let mosquitto = Mosquitto::start(&dir.path().join("mosquitto"));
    let pki = Pki::generate(&dir.path().join("pki"), &["gw-1"]);
    let mut a = Hub::start_full(&dir.path().join("hub-a"), &pki, "hub-a", &[], &pg.sink_toml());
    // The crash window: A exits right after its 20th commit, before that commit's ack.
    a.stop();
    a.env.push(("VOITHER_HUB_FAILPOINT".into(), "exit-after-commit:20".into()));
    a.restart();
    let b = Hub::start_full(&dir.path().join("hub-b"), &pki, "hub-b", &[], &pg.sink_toml());
    let gw = Gateway::start(
        &dir.path().join("gw"),
        &pki,
        &GatewayOpts::external("gw-1", mosquitto.port, vec![a.addr, b.addr]),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cfg = SimConfig { port: mosquitto.port, devices: 4, messages: 1_000, rate: 200.0, ..Default::default() };
    let sim = rt.spawn(sim::run(cfg, Arc::default()));
    assert_eq!(a.wait_exit(Duration::from_secs(60)), Some(86), "A dies at its failpoint\n{}", a.log_tail());
    assert!(on_hub(&gw, "hub-b", Duration::from_secs(30)), "moves to B\n{}", gw.log_tail());
    let report = rt.block_on(sim).unwrap();
    let mut rows = Vec::new();
    let rep = wait_for(Duration::from_secs(60), || {
        rows = b.export();
        let rep = check(&rows, &report.acked);
        (rep.missing.is_empty() && gw.backlog() == Some(0)).then_some(rep)
    })
    .unwrap_or_else(|| panic!("not all delivered: {}\n{}", check(&rows, &report.acked).summary(), gw.log_tail()));
    assert!(rep.ok(), "{}", rep.summary());
    // What A committed without acking is there once: the gateway learned it from B's
    // Welcome (marks from the database) or resent it and B skipped it.
    let skipped = b.metric("voither_hub_duplicate_records_total").unwrap_or(0.0);
    println!("replica killed mid-batch: {}; B skipped {skipped} resent records", rep.summary());
}

#[test]
fn postgres_restart_while_gateways_send_holds_acks_and_loses_nothing() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&dir.path().join("pki"), &["gw-1", "gw-2"]);
    let mut hub = Hub::start_full(&dir.path().join("hub"), &pki, "hub-1", &[], &pg.sink_toml());
    let pid = hub.proc.as_ref().unwrap().pid();
    let ports = [voither_tests::procs::free_tcp_port(), voither_tests::procs::free_tcp_port()];
    let gws: Vec<Gateway> = ["gw-1", "gw-2"]
        .iter()
        .zip(ports)
        .map(|(id, port)| Gateway::start(&dir.path().join(id), &pki, &GatewayOpts::embedded(id, port, vec![hub.addr])))
        .collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sims: Vec<_> = ports
        .iter()
        .map(|port| {
            let cfg = SimConfig { port: *port, devices: 3, messages: 1_200, rate: 150.0, ..Default::default() };
            rt.spawn(sim::run(cfg, Arc::default()))
        })
        .collect();
    assert!(
        wait_for(Duration::from_secs(30), || hub.metric("voither_hub_stored_records_total").filter(|v| *v >= 800.0))
            .is_some(),
        "stores before the restart\n{}",
        hub.log_tail()
    );
    pg.stop();
    let down = Instant::now();
    // The hub notices on its next commit, holds the acks and retries.
    assert!(
        wait_for(Duration::from_secs(30), || hub.metric("voither_hub_sink_retries_total").filter(|v| *v >= 1.0))
            .is_some(),
        "hub retries while the database is down\n{}",
        hub.log_tail()
    );
    assert_eq!(hub.metric("voither_hub_sink_up"), Some(0.0));
    // Devices keep publishing and the gateways keep storing: their backlogs grow while
    // the hub holds the acks.
    let ingested = |gw: &Gateway| gw.metric("voither_gateway_ingested_records_total").unwrap_or(0.0);
    let synced = |gw: &Gateway| gw.metric("voither_gateway_synced_records_total").unwrap_or(0.0);
    let at_down: Vec<(f64, f64)> = gws.iter().map(|g| (ingested(g), synced(g))).collect();
    for (gw, (ing, _)) in gws.iter().zip(&at_down) {
        assert!(
            wait_for(Duration::from_secs(30), || (ingested(gw) >= ing + 300.0).then_some(())).is_some(),
            "gateways keep ingesting while the database is down\n{}",
            gw.log_tail()
        );
    }
    for (gw, (_, syn)) in gws.iter().zip(&at_down) {
        assert_eq!(synced(gw), *syn, "no ack while the database is down");
    }
    assert_eq!(hub.metric("voither_hub_sink_up"), Some(0.0), "still down: nothing was acked meanwhile");
    pg.restart();
    let outage = down.elapsed();
    let reports: Vec<_> = sims.into_iter().map(|s| rt.block_on(s).unwrap()).collect();
    for ((gw, report), id) in gws.iter().zip(&reports).zip(["gw-1", "gw-2"]) {
        let mut rows = Vec::new();
        let rep = wait_for(Duration::from_secs(60), || {
            rows = only(&hub.export(), id);
            let rep = check(&rows, &report.acked);
            (rep.missing.is_empty() && gw.backlog() == Some(0)).then_some(rep)
        })
        .unwrap_or_else(|| {
            panic!("{}: not all delivered: {}\n{}", id, check(&rows, &report.acked).summary(), gw.log_tail())
        });
        assert!(rep.ok(), "{}: {}", id, rep.summary());
        assert_eq!(rep.expected, 3_600);
    }
    assert!(hub.proc.as_mut().unwrap().running(), "the hub stayed up\n{}", hub.log_tail());
    assert_eq!(hub.proc.as_ref().unwrap().pid(), pid);
    assert!(wait_for(Duration::from_secs(10), || hub.metric("voither_hub_sink_up").filter(|v| *v == 1.0)).is_some());
    let retries = hub.metric("voither_hub_sink_retries_total").unwrap_or(0.0);
    let errors = hub.metric("voither_hub_session_errors_total").unwrap_or(0.0);
    println!(
        "PostgreSQL down {:.1} s: hub retried {retries} sink calls, {errors} sessions failed; every record once",
        outage.as_secs_f64()
    );
}

#[test]
fn a_hub_whose_database_cannot_be_reached_says_so_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&dir.path().join("pki"), &["gw-1"]);
    let port = voither_tests::procs::free_tcp_port();
    let config = dir.path().join("hub.toml");
    std::fs::write(
        &config,
        format!(
            "[tls]\nca = \"{p}/ca.pem\"\ncert = \"{p}/hub.pem\"\nkey = \"{p}/hub.key\"\n\n[sink]\nkind = \"postgres\"\n\
             url = \"postgresql://voither:s3cret@127.0.0.1:{port}/voither\"\nconnect_timeout_ms = 500\n",
            p = pki.dir.display()
        ),
    )
    .unwrap();
    let out = voither_tests::procs::output_within(
        std::process::Command::new(voither_tests::procs::bin("voither-hub")).arg("run").arg("--config").arg(&config),
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("sink.url") && err.contains(&format!("127.0.0.1:{port}")) && err.contains("refused"),
        "names the key, the server and the cause: {err}"
    );
    assert!(!err.contains("s3cret"), "never prints the password: {err}");
}

#[test]
fn migrate_applies_the_schema_once_and_names_a_wrong_sink_kind() {
    let pg = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&dir.path().join("pki"), &["gw-1"]);
    let tls =
        format!("[tls]\nca = \"{p}/ca.pem\"\ncert = \"{p}/hub.pem\"\nkey = \"{p}/hub.key\"\n", p = pki.dir.display());
    let config = dir.path().join("hub.toml");
    std::fs::write(&config, format!("{tls}\n{}", pg.sink_toml())).unwrap();
    let migrate = |config: &std::path::Path| {
        voither_tests::procs::output_within(
            std::process::Command::new(voither_tests::procs::bin("voither-hub"))
                .arg("migrate")
                .arg("--config")
                .arg(config),
            Duration::from_secs(60),
        )
    };
    for _ in 0..2 {
        let out = migrate(&config);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("schema version 1"));
    }
    assert_eq!(pg.sql("SELECT count(*) FROM voither_schema_migrations"), "1");
    let embedded = dir.path().join("embedded.toml");
    std::fs::write(&embedded, &tls).unwrap();
    let out = migrate(&embedded);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sink.kind"), "{}", String::from_utf8_lossy(&out.stderr));
}
