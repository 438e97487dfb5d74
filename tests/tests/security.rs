//! Identity, authorization, rotation and revocation against real processes:
//!
//! - a client with gateway A's certificate gets its records stored as A, whatever it
//!   sends: there is no field in the protocol that names a gateway;
//! - a revoked gateway is cut off live, refused while revoked, keeps its data, and
//!   delivers it once the revocation is lifted;
//! - an expired and a not-yet-valid certificate are refused; a rotated certificate is
//!   picked up without a restart and without losing what was buffered;
//! - a CA bundle rotated on the hub lets gateways of the new CA in without a restart.
//!
//! Blocking harness code (no async runtime on this thread): std's clock measures.
#![allow(clippy::disallowed_types)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use voither_proto::{
    encode_frame, Batch, Frame, FrameDecoder, Hello, LaneCursor, Record, MAX_FRAME_LEN, PROTOCOL_VERSION,
};
use voither_tests::check::ExportRow;
use voither_tests::procs::{bin, wait_for, Gateway, GatewayOpts, Hub, Lab, Mosquitto, Pki};
use voither_tests::sim::{self, SimConfig, SimReport};

fn publish(port: u16, messages: u64) -> SimReport {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cfg = SimConfig { port, devices: 2, messages, ..Default::default() };
    let report = rt.block_on(sim::run(cfg, Arc::default()));
    assert_eq!(report.total_acked(), 2 * messages);
    report
}

fn issue(pki: &Path, gateway: &str, file: &str, start_days: &str, days: &str) {
    let out = std::process::Command::new(bin("voither-hub"))
        .args(["pki-issue", "--dir"])
        .arg(pki)
        .args(["--gateway", gateway, "--file", file, "--start-days", start_days, "--days", days])
        .output()
        .unwrap();
    assert!(out.status.success(), "pki-issue: {}", String::from_utf8_lossy(&out.stderr));
}

fn connected(gw: &Gateway) -> bool {
    gw.status().is_some_and(|s| s["uplink"]["connected"] == true)
}

#[test]
fn records_are_stored_under_the_certificate_s_gateway_id_only() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&dir.path().join("pki"), &["gw-a", "gw-b"]);
    let hub = Hub::start(&dir.path().join("hub"), &pki, "hub-1");
    // A client holding gw-a's certificate sends a Hello and a batch. Nothing in the
    // protocol names a gateway, so there is nothing to forge: the hub takes the id from
    // the verified certificate.
    let hello = Frame::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "gw-b".into(),
        boot_id: 1,
        lanes: vec![LaneCursor { lane: "telemetry".into(), oldest_unacked: 1, next_seq: 4 }],
        capabilities: vec![],
        manifest_version: None,
    });
    let records = (1..=3)
        .map(|seq| Record {
            seq,
            ingest_ts_ms: 1,
            source: "devices/gw-b/telemetry".into(),
            content_type: None,
            payload: b"claims to be gw-b".to_vec().into(),
        })
        .collect();
    let batch = Frame::Batch(Batch { lane: "telemetry".into(), batch_id: 1, records, gaps: vec![] });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ep = {
        let _g = rt.enter();
        voither_tests::raw::endpoint(
            &pki.dir.join("ca.pem"),
            Some((&pki.dir.join("gw-a.pem"), &pki.dir.join("gw-a.key"))),
        )
    };
    // Hello, wait for Welcome, then the batch, and read until its Ack.
    let frames = rt.block_on(async {
        let conn = ep.connect(hub.addr, "voither-hub").unwrap().await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let mut dec = FrameDecoder::new(MAX_FRAME_LEN);
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut out = Vec::new();
        encode_frame(&hello, &mut out, MAX_FRAME_LEN).unwrap();
        send.write_all(&out).await.unwrap();
        let mut batch = Some(batch);
        tokio::time::timeout(Duration::from_secs(10), async {
            while !got.iter().any(|f| matches!(f, Frame::Ack(_))) {
                let n = recv.read(&mut buf).await.unwrap().expect("stream open");
                dec.push(&buf[..n]);
                while let Some(f) = dec.next_frame().unwrap() {
                    got.push(f);
                }
                if got.iter().any(|f| matches!(f, Frame::Welcome(_))) {
                    if let Some(b) = batch.take() {
                        out.clear();
                        encode_frame(&b, &mut out, MAX_FRAME_LEN).unwrap();
                        send.write_all(&out).await.unwrap();
                    }
                }
            }
        })
        .await
        .expect("ack within 10 s");
        got
    });
    assert!(matches!(&frames[0], Frame::Welcome(w) if w.gateway_id == "gw-a"), "{frames:?}");
    assert!(frames.iter().any(|f| matches!(f, Frame::Ack(a) if a.through_seq == 3)), "{frames:?}");
    let rows = hub.export();
    assert_eq!(rows.len(), 3);
    for r in &rows {
        assert!(matches!(r, ExportRow::Record { gateway, .. } if gateway == "gw-a"), "{r:?}");
    }
    let (_, fleet) = voither_tests::procs::http_get(hub.admin, "/fleet").unwrap();
    let fleet: serde_json::Value = serde_json::from_str(&fleet).unwrap();
    let ids: Vec<&str> = fleet.as_array().unwrap().iter().filter_map(|g| g["gateway"].as_str()).collect();
    assert_eq!(ids, ["gw-a"], "only gw-a's state exists; gw-b's is untouched");
}

#[test]
fn a_revoked_gateway_is_cut_off_live_and_keeps_its_data() {
    let mut lab = Lab::start();
    let revoked = lab.dir.path().join("revoked.txt");
    lab.hub.stop();
    let mut text = std::fs::read_to_string(&lab.hub.config).unwrap();
    text.push_str(&format!("\n[auth]\nrevoked_file = \"{}\"\n", revoked.display()));
    std::fs::write(&lab.hub.config, text).unwrap();
    lab.hub.restart();
    let gw = &lab.gateway;
    assert!(wait_for(Duration::from_secs(20), || connected(gw).then_some(())).is_some());

    std::fs::write(&revoked, "# lost in the field 2026-11-29\ngw-1\n").unwrap();
    let cut = wait_for(Duration::from_secs(10), || (!connected(gw)).then_some(()));
    assert!(cut.is_some(), "revoked gateway still connected\n{}", lab.logs());
    assert!(lab.hub.log_tail().contains("closing its live connection"), "{}", lab.hub.log_tail());
    let report = publish(lab.mosquitto.port, 100);
    // While revoked, every new handshake is refused and the data stays on the gateway.
    let refused =
        wait_for(Duration::from_secs(20), || lab.hub.metric("voither_hub_auth_refusals_total").filter(|n| *n >= 2.0));
    assert!(refused.is_some(), "reconnects are refused\n{}", lab.logs());
    let held = wait_for(Duration::from_secs(20), || gw.backlog().filter(|b| *b == 200));
    assert!(held.is_some(), "the gateway keeps what it could not send");
    assert!(!connected(gw));

    std::fs::write(&revoked, "").unwrap();
    let rep = lab.wait_delivered(&report.acked, Duration::from_secs(30));
    assert!(rep.ok() && rep.found == 200, "{}", rep.summary());
}

#[test]
fn bad_validity_is_refused_and_a_rotated_certificate_is_used_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mosquitto = Mosquitto::start(&dir.path().join("mosquitto"));
    let pki = Pki::generate(&dir.path().join("pki"), &["gw-1"]);
    let hub = Hub::start(&dir.path().join("hub"), &pki, "hub-1");
    // Expired yesterday, and valid only from tomorrow.
    issue(&pki.dir, "gw-1", "gw-1-expired", "-10", "9");
    issue(&pki.dir, "gw-1", "gw-1-future", "1", "30");
    let mut gw =
        Gateway::start(&dir.path().join("gw"), &pki, &GatewayOpts::external("gw-1", mosquitto.port, vec![hub.addr]));
    assert!(wait_for(Duration::from_secs(20), || connected(&gw).then_some(())).is_some());
    gw.stop();

    // Rotation by replacing the files the config names (as a renewal agent does).
    let swap = |from: &str| {
        std::fs::copy(pki.dir.join(format!("{from}.key")), pki.dir.join("gw-1.key")).unwrap();
        std::fs::copy(pki.dir.join(format!("{from}.pem")), pki.dir.join("gw-1.pem")).unwrap();
    };
    for bad in ["gw-1-expired", "gw-1-future"] {
        swap(bad);
        let before = hub.metric("voither_hub_refused_handshakes_total").unwrap_or(0.0);
        gw.restart();
        let refused = wait_for(Duration::from_secs(20), || {
            hub.metric("voither_hub_refused_handshakes_total").filter(|n| *n > before)
        });
        assert!(refused.is_some(), "{bad}: handshake not refused\n{}", hub.log_tail());
        assert!(!connected(&gw), "{bad}: the gateway is not connected");
        gw.stop();
    }
    // The expiry shows in /status and /metrics: days ahead, or negative once past.
    swap("gw-1-expired");
    gw.restart();
    let st = gw.status().unwrap();
    assert!(st["uplink"]["cert_expires_in_days"].as_f64().unwrap() < 0.0, "{st}");
    assert!(gw.metric("voither_gateway_tls_cert_expiry_seconds").unwrap() < 0.0);
    let pid = gw.proc.as_ref().unwrap().pid();
    let report = publish(mosquitto.port, 100);
    let held = wait_for(Duration::from_secs(20), || gw.backlog().filter(|b| *b == 200));
    assert!(held.is_some(), "buffered while the certificate is refused");

    // A renewed certificate, written in place: the running gateway picks it up.
    issue(&pki.dir, "gw-1", "gw-1", "-0.01", "90");
    let on = wait_for(Duration::from_secs(30), || connected(&gw).then_some(()));
    assert!(on.is_some(), "renewed certificate not picked up\n{}", gw.log_tail());
    assert_eq!(gw.proc.as_ref().unwrap().pid(), pid, "no restart");
    assert!(gw.metric("voither_gateway_tls_reloads_total").unwrap() >= 1.0);
    let days = gw.status().unwrap()["uplink"]["cert_expires_in_days"].as_f64().unwrap();
    assert!((89.0..=90.1).contains(&days), "{days}");
    let rep = wait_for(Duration::from_secs(30), || {
        let rep = voither_tests::check::check(&hub.export(), &report.acked);
        rep.missing.is_empty().then_some(rep)
    })
    .unwrap_or_else(|| panic!("not delivered after rotation\n{}", gw.log_tail()));
    assert!(rep.ok() && rep.found == 200, "{}", rep.summary());
}

#[test]
fn a_ca_bundle_rotated_on_the_hub_admits_the_new_ca_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mosquitto = Mosquitto::start(&dir.path().join("mosquitto"));
    let pki = Pki::generate(&dir.path().join("pki"), &["gw-1"]);
    let site_b = Pki::generate(&dir.path().join("pki-b"), &["gw-2"]);
    let hub = Hub::start(&dir.path().join("hub"), &pki, "hub-1");
    let hub_pid = hub.proc.as_ref().unwrap().pid();
    // gw-2's certificate is from site B's CA; it pins the hub's CA (site A's).
    let gw2 = dir.path().join("gw2-pki");
    std::fs::create_dir_all(&gw2).unwrap();
    std::fs::copy(pki.dir.join("ca.pem"), gw2.join("ca.pem")).unwrap();
    for f in ["gw-2.pem", "gw-2.key"] {
        std::fs::copy(site_b.dir.join(f), gw2.join(f)).unwrap();
    }
    let gw = Gateway::start(
        &dir.path().join("gw"),
        &Pki { dir: gw2 },
        &GatewayOpts::external("gw-2", mosquitto.port, vec![hub.addr]),
    );
    let refused =
        wait_for(Duration::from_secs(20), || hub.metric("voither_hub_refused_handshakes_total").filter(|n| *n >= 1.0));
    assert!(refused.is_some() && !connected(&gw), "a CA the hub does not know is refused");

    std::fs::copy(pki.dir.join("ca.pem"), dir.path().join("site-a-ca.pem")).unwrap();
    // The hub's CA bundle gets site B's CA appended: no restart needed.
    let mut bundle = std::fs::read_to_string(pki.dir.join("ca.pem")).unwrap();
    bundle.push_str(&std::fs::read_to_string(site_b.dir.join("ca.pem")).unwrap());
    std::fs::write(pki.dir.join("ca.pem.new"), bundle).unwrap();
    std::fs::rename(pki.dir.join("ca.pem.new"), pki.dir.join("ca.pem")).unwrap();
    let on = wait_for(Duration::from_secs(30), || connected(&gw).then_some(()));
    assert!(on.is_some(), "gateway of the new CA not admitted\n{}", hub.log_tail());
    assert_eq!(hub.proc.as_ref().unwrap().pid(), hub_pid, "no hub restart");
    assert!(hub.metric("voither_hub_tls_reloads_total").unwrap() >= 1.0);
    assert!(hub.metric("voither_hub_tls_cert_expiry_seconds").unwrap() > 86_400.0);

    // Authorization by issuing CA: allowing only site A's CA refuses site B's gateway,
    // though its certificate chains to the bundle; allowing site B's admits it.
    let mut hub = hub;
    let base = std::fs::read_to_string(&hub.config).unwrap();
    for (ca, admitted) in [(dir.path().join("site-a-ca.pem"), false), (site_b.dir.join("ca.pem"), true)] {
        hub.stop();
        std::fs::write(&hub.config, format!("{base}\n[auth]\nallowed_issuers = [\"{}\"]\n", ca.display())).unwrap();
        hub.restart();
        if admitted {
            let on = wait_for(Duration::from_secs(30), || connected(&gw).then_some(()));
            assert!(on.is_some(), "gateway of an allowed issuer refused\n{}", hub.log_tail());
        } else {
            let refused = wait_for(Duration::from_secs(30), || {
                let (_, page) = voither_tests::procs::http_get(hub.admin, "/metrics").ok()?;
                let key = "voither_hub_auth_refusals_total{reason=\"not_allowed\"} ";
                let n: f64 = page.lines().find_map(|l| l.strip_prefix(key))?.parse().ok()?;
                (n >= 1.0).then_some(())
            });
            assert!(refused.is_some() && !connected(&gw), "site B refused when only site A's CA is allowed");
        }
    }
}

#[test]
fn on_the_network_the_hub_admin_endpoint_serves_no_records() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&dir.path().join("pki"), &["gw-1"]);
    let mut hub = Hub::start(&dir.path().join("hub"), &pki, "hub-1");
    hub.stop();
    let port = hub.admin.port();
    hub.set_config("admin", &[("listen", &format!("\"0.0.0.0:{port}\""))]);
    hub.restart();
    let (status, body) = voither_tests::procs::http_get(hub.admin, "/export").unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("admin.export_on_network"), "{body}");
    assert_eq!(voither_tests::procs::http_get(hub.admin, "/fleet").unwrap().0, 200);
    assert!(hub.log_tail().contains("/export is off there"), "{}", hub.log_tail());
    hub.stop();
    hub.set_config("admin", &[("export_on_network", "true")]);
    hub.restart();
    assert_eq!(voither_tests::procs::http_get(hub.admin, "/export").unwrap().0, 200);
}
