//! A "hub" that answers with garbage, an unknown frame, or an oversized frame: the
//! gateway counts it, keeps running, keeps its data, and syncs once a real hub is there.

use std::sync::Arc;
use std::time::Duration;

use voither_proto::{encode_frame, Frame, LaneMark, Welcome, MAX_FRAME_LEN};
use voither_tests::procs::{free_tcp_port, http_get, wait_for, Gateway, GatewayOpts, Hub, Pki};
use voither_tests::raw;

/// What the fake hub sends after reading the gateway's Hello.
fn answers() -> Vec<(&'static str, Vec<u8>)> {
    let mut welcome = Vec::new();
    let w = Welcome {
        hub_id: "fake".into(),
        region: "x".into(),
        gateway_id: "gw-1".into(),
        lanes: vec![LaneMark { lane: "telemetry".into(), hwm: 0 }],
        endpoints: vec![],
        manifest_version: 0,
    };
    encode_frame(&Frame::Welcome(w), &mut welcome, MAX_FRAME_LEN).unwrap();
    let mut unknown = welcome.clone();
    unknown.extend_from_slice(&4u32.to_be_bytes());
    unknown.extend_from_slice(&[0x82, 0x18, 0x63, 0x80]); // [99, []]: no such frame kind
    let mut oversized = welcome.clone();
    oversized.extend_from_slice(&u32::MAX.to_be_bytes());
    vec![
        ("garbage", b"\x00\x00\x00\x05\xff\xff\xff\xff\xff".to_vec()),
        ("unknown frame", unknown),
        ("oversized frame", oversized),
    ]
}

#[test]
fn gateway_survives_a_hub_that_sends_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&dir.path().join("pki"), &["gw-1"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _g = rt.enter();
    let fake = raw::server(&pki.dir);
    let fake_addr = fake.local_addr().unwrap();
    // The fake hub: every connection gets the next kind of bad answer, in turn.
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let s2 = served.clone();
    rt.spawn(async move {
        let answers = answers();
        while let Some(inc) = fake.accept().await {
            let Ok(conn) = inc.await else { continue };
            let n = s2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let bytes = answers[n % answers.len()].1.clone();
            tokio::spawn(async move {
                if let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let mut buf = [0u8; 4096];
                    let _ = recv.read(&mut buf).await;
                    let _ = send.write_all(&bytes).await;
                    let _ = conn.closed().await;
                }
            });
        }
    });
    let port = free_tcp_port();
    let mut gw = Gateway::start(
        &dir.path().join("gw"),
        &pki,
        &GatewayOpts {
            lanes: "[[lanes]]\nname = \"telemetry\"\ntopics = [\"devices/#\"]\n".into(),
            ..GatewayOpts::embedded("gw-1", port, vec![fake_addr])
        },
    );
    let cfg = voither_tests::sim::SimConfig { port, devices: 2, messages: 100, ..Default::default() };
    let report = rt.block_on(voither_tests::sim::run(cfg, Arc::default()));
    assert_eq!(report.total_acked(), 200);
    // Every kind of bad answer was served at least once and counted as a protocol error.
    let counted = wait_for(Duration::from_secs(60), || {
        let n = gw.metric("voither_gateway_uplink_protocol_errors_total")?;
        (served.load(std::sync::atomic::Ordering::SeqCst) >= 4 && n >= 3.0).then_some(n)
    });
    assert!(
        counted.is_some(),
        "protocol errors counted: {:?}\n{}",
        gw.metric("voither_gateway_uplink_protocol_errors_total"),
        gw.log_tail()
    );
    assert!(gw.proc.as_mut().unwrap().running(), "the gateway is still running");
    assert_eq!(http_get(gw.admin, "/readyz").unwrap().0, 200);
    assert_eq!(gw.backlog(), Some(200), "nothing was deleted on a garbage hub's word");

    // A real hub at a new address: the gateway is restarted with it and delivers everything.
    let hub = Hub::start(&dir.path().join("hub"), &pki, "hub-1");
    let cfg_text = std::fs::read_to_string(&gw.config).unwrap().replace(&fake_addr.to_string(), &hub.addr.to_string());
    std::fs::write(&gw.config, cfg_text).unwrap();
    gw.stop();
    gw.restart();
    let rep = wait_for(Duration::from_secs(60), || {
        let rep = voither_tests::check::check(&hub.export(), &report.acked);
        rep.missing.is_empty().then_some(rep)
    })
    .unwrap_or_else(|| panic!("not delivered\n{}", gw.log_tail()));
    assert!(rep.ok() && rep.found == 200, "{}", rep.summary());
}
