//! The hub refuses gateways without a certificate or with one from another CA, and
//! closes a stream that carries malformed or oversized frames, without harm to the
//! gateways that behave.

use std::time::Duration;

use voither_proto::{encode_frame, error_code, Frame, Hello, MAX_FRAME_LEN, PROTOCOL_VERSION};
use voither_tests::procs::{wait_for, Gateway, GatewayOpts, Hub, Pki};
use voither_tests::raw;

fn hello() -> Vec<u8> {
    hello_with(vec![])
}

/// A Hello frame announcing `lanes`.
fn hello_with(lanes: Vec<voither_proto::LaneCursor>) -> Vec<u8> {
    let mut out = Vec::new();
    let f = Frame::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "raw".into(),
        boot_id: 1,
        lanes,
        capabilities: vec![],
        manifest_version: None,
    });
    encode_frame(&f, &mut out, MAX_FRAME_LEN).unwrap();
    out
}

struct Setup {
    dir: tempfile::TempDir,
    pki: Pki,
    other: Pki,
    hub: Hub,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&dir.path().join("pki"), &["gw-1"]);
    let other = Pki::generate(&dir.path().join("other"), &["gw-1"]);
    let hub = Hub::start(&dir.path().join("hub"), &pki, "hub-1");
    Setup { dir, pki, other, hub }
}

impl Setup {
    /// A client endpoint with gw-1's certificate (call inside a runtime).
    fn gw1(&self) -> quinn::Endpoint {
        raw::endpoint(
            &self.pki.dir.join("ca.pem"),
            Some((&self.pki.dir.join("gw-1.pem"), &self.pki.dir.join("gw-1.key"))),
        )
    }
}

#[test]
fn no_certificate_and_foreign_certificate_are_refused() {
    let s = setup();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let refused_before = s.hub.metric("voither_hub_refused_handshakes_total").unwrap();

    // No client certificate at all.
    let (got, err) = rt.block_on(async {
        let ep = raw::endpoint(&s.pki.dir.join("ca.pem"), None);
        raw::exchange(&ep, s.hub.addr, &hello()).await
    });
    assert!(got.is_empty(), "nothing is answered to a gateway without a certificate");
    let err = err.expect("the connection fails");
    assert!(err.to_lowercase().contains("certificate"), "the refusal names the certificate: {err}");

    // A certificate for the same gateway id, signed by another CA.
    let (got, err) = rt.block_on(async {
        let ep = raw::endpoint(
            &s.pki.dir.join("ca.pem"),
            Some((&s.other.dir.join("gw-1.pem"), &s.other.dir.join("gw-1.key"))),
        );
        raw::exchange(&ep, s.hub.addr, &hello()).await
    });
    assert!(got.is_empty());
    let err = err.expect("the connection fails");
    assert!(err.to_lowercase().contains("certificate") || err.contains("CA"), "{err}");

    let refused = wait_for(Duration::from_secs(10), || {
        s.hub.metric("voither_hub_refused_handshakes_total").filter(|n| *n >= refused_before + 2.0)
    });
    assert!(refused.is_some(), "the hub counts both refusals\n{}", s.hub.log_tail());
    assert!(s.hub.export().is_empty(), "nothing was stored");
}

#[test]
fn gateway_process_with_a_foreign_certificate_is_refused_and_keeps_its_data() {
    let s = setup();
    // The gateway trusts the right hub CA but presents a certificate of another CA.
    let mixed = s.dir.path().join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    std::fs::copy(s.pki.dir.join("ca.pem"), mixed.join("ca.pem")).unwrap();
    std::fs::copy(s.other.dir.join("gw-1.pem"), mixed.join("gw-1.pem")).unwrap();
    std::fs::copy(s.other.dir.join("gw-1.key"), mixed.join("gw-1.key")).unwrap();
    let mixed = Pki { dir: mixed };
    let port = voither_tests::procs::free_tcp_port();
    let gw = Gateway::start(&s.dir.path().join("gw"), &mixed, &GatewayOpts::embedded("gw-1", port, vec![s.hub.addr]));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cfg = voither_tests::sim::SimConfig { port, devices: 2, messages: 50, ..Default::default() };
    let report = rt.block_on(voither_tests::sim::run(cfg, Default::default()));
    assert_eq!(report.total_acked(), 100);
    let held = wait_for(Duration::from_secs(20), || {
        let st = gw.status()?;
        let err = st["uplink"]["last_error"].as_str()?.to_string();
        (gw.backlog()? == 100 && st["uplink"]["connected"] == false).then_some(err)
    });
    let err = held.unwrap_or_else(|| panic!("gateway should hold its 100 records, not connected\n{}", gw.log_tail()));
    assert!(!err.is_empty());
    assert!(s.hub.metric("voither_hub_refused_handshakes_total").unwrap() >= 1.0);
    assert!(s.hub.export().is_empty(), "nothing from the refused gateway was stored");
}

#[test]
fn malformed_and_oversized_frames_close_the_stream_and_nothing_else() {
    let s = setup();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let ep = s.gw1();

    // Garbage where a frame should be.
    let mut garbage = 5u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(&[0xff, 0x13, 0x37, 0x00, 0x99]);
    let (got, err) = rt.block_on(raw::exchange(&ep, s.hub.addr, &garbage));
    let frames = raw::frames(&got);
    assert!(
        matches!(frames.last(), Some(Frame::Error(e)) if e.code == error_code::FRAME),
        "hub answers a malformed frame with an Error frame: {frames:?} {err:?}"
    );

    // A length prefix far over the limit: refused before any body is read.
    let huge = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes();
    let (got, _) = rt.block_on(raw::exchange(&ep, s.hub.addr, &huge));
    let frames = raw::frames(&got);
    assert!(
        matches!(frames.last(), Some(Frame::Error(e)) if e.code == error_code::FRAME && e.reason.contains("exceeds")),
        "oversized frame refused: {frames:?}"
    );

    // A well-formed frame out of order (Ack before Hello).
    let mut out = Vec::new();
    let ack = Frame::Ack(voither_proto::Ack { lane: "x".into(), through_seq: 1, rejected_batch: None });
    encode_frame(&ack, &mut out, MAX_FRAME_LEN).unwrap();
    let (got, _) = rt.block_on(raw::exchange(&ep, s.hub.addr, &out));
    let frames = raw::frames(&got);
    assert!(matches!(frames.last(), Some(Frame::Error(e)) if e.code == error_code::PROTOCOL), "{frames:?}");

    // A stream that ends in the middle of a frame.
    let mut truncated = Vec::new();
    encode_frame(
        &Frame::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "raw".into(),
            boot_id: 2,
            lanes: vec![],
            capabilities: vec![],
            manifest_version: None,
        }),
        &mut truncated,
        MAX_FRAME_LEN,
    )
    .unwrap();
    truncated.truncate(truncated.len() - 3);
    rt.block_on(async {
        let conn = ep.connect(s.hub.addr, "voither-hub").unwrap().await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&truncated).await.unwrap();
        send.finish().unwrap();
        let mut buf = vec![0u8; 4096];
        let _ = recv.read(&mut buf).await;
    });
    let frame_errors =
        wait_for(Duration::from_secs(10), || s.hub.metric("voither_hub_session_errors_total").filter(|n| *n >= 3.0));
    assert!(
        frame_errors.is_some(),
        "malformed, oversized, out-of-place and truncated input are counted\n{}",
        s.hub.log_tail()
    );

    // The hub is still up and serves a proper session.
    let (got, _) = rt.block_on(async {
        let conn = ep.connect(s.hub.addr, "voither-hub").unwrap().await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&hello()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = recv.read(&mut buf).await.unwrap().unwrap();
        conn.close(0u32.into(), b"done");
        (buf[..n].to_vec(), ())
    });
    assert!(matches!(raw::frames(&got).first(), Some(Frame::Welcome(w)) if w.gateway_id == "gw-1"));
}

/// A batch and a bad frame in one write: the hub reads on while it commits, and still
/// stores and acks the batch before it answers the bad frame with an Error frame.
#[test]
fn a_batch_before_a_bad_frame_is_stored_and_acked_first() {
    use voither_proto::{Batch, LaneCursor, Record};
    let s = setup();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let ep = s.gw1();
    let hello = hello_with(vec![LaneCursor { lane: "x".into(), oldest_unacked: 1, next_seq: 4 }]);
    let mut out = Vec::new();
    let records = (1..=3)
        .map(|seq| Record {
            seq,
            ingest_ts_ms: 5,
            source: "raw".into(),
            content_type: None,
            payload: vec![1; 8].into(),
        })
        .collect();
    let batch = Frame::Batch(Batch { lane: "x".into(), batch_id: 1, records, gaps: vec![] });
    encode_frame(&batch, &mut out, MAX_FRAME_LEN).unwrap();
    out.extend_from_slice(&5u32.to_be_bytes());
    out.extend_from_slice(&[0xff, 0x13, 0x37, 0x00, 0x99]);
    let got = rt.block_on(async {
        let conn = ep.connect(s.hub.addr, "voither-hub").unwrap().await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&hello).await.unwrap();
        // The Welcome first: batches come after it.
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        while raw::frames(&got).is_empty() {
            let n = recv.read(&mut buf).await.unwrap().expect("a Welcome");
            got.extend_from_slice(&buf[..n]);
        }
        send.write_all(&out).await.unwrap();
        while let Ok(Some(n)) = recv.read(&mut buf).await {
            got.extend_from_slice(&buf[..n]);
        }
        got
    });
    let frames = raw::frames(&got);
    assert!(matches!(frames.first(), Some(Frame::Welcome(_))), "{frames:?}");
    let ack = frames.iter().position(|f| matches!(f, Frame::Ack(a) if a.lane == "x" && a.through_seq == 3));
    let error = frames.iter().position(|f| matches!(f, Frame::Error(e) if e.code == error_code::FRAME));
    assert!(matches!((ack, error), (Some(a), Some(e)) if a < e), "ack of seq 3, then the error: {frames:?}");
    assert_eq!(s.hub.metric("voither_hub_stored_records_total"), Some(3.0));
}
