//! Arbitrary frames (decoded from fuzz input) fed to a gateway and a hub session, with
//! arbitrary time steps: errors are fine, panics are not, and the gateway never reports
//! an ack beyond what it sent.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use voither_proto::{
    FrameDecoder, GatewayConfig, GatewayEvent, GatewaySession, HubEvent, HubInfo, HubSession, LaneInit, Record,
};

fuzz_target!(|data: &[u8]| {
    let mut dec = FrameDecoder::new(1 << 20);
    dec.push(data);
    let lanes = vec![
        LaneInit { name: "a".into(), priority: 0, oldest_unacked: 1, next_seq: 50 },
        LaneInit { name: "b".into(), priority: 1, oldest_unacked: 10, next_seq: 20 },
    ];
    let mut gw = GatewaySession::new(GatewayConfig::default(), "fuzz", 1, lanes);
    let mut hub = HubSession::new("gw", HubInfo::default());
    let mut now = Duration::ZERO;
    let mut sent_max = 0u64;
    let mut i = 0u64;
    while let Ok(Some(frame)) = dec.next_frame() {
        i += 1;
        now += Duration::from_millis(i * 37 % 5000);
        let _ = gw.handle_frame(now, frame.clone());
        let _ = hub.handle_frame(frame);
        gw.handle_timeout(now);
        while let Some(slot) = gw.poll_send_slot() {
            let recs: Vec<Record> = (slot.from_seq..slot.from_seq + 3)
                .map(|seq| Record {
                    seq,
                    ingest_ts_ms: 0,
                    source: "s".into(),
                    content_type: None,
                    payload: vec![1].into(),
                })
                .collect();
            sent_max = sent_max.max(slot.from_seq + 2);
            if gw.send_batch(now, &slot.lane, recs.into(), Vec::new()).is_err() {
                break;
            }
        }
        while let Some(ev) = gw.poll_event() {
            if let GatewayEvent::Acked { through_seq, .. } = ev {
                // Welcome marks may exceed what this session sent (acked elsewhere) but
                // never the store's next seq, which the session refuses.
                assert!(through_seq < 50 || through_seq <= sent_max, "acked {through_seq} beyond the store");
            }
        }
        while let Some(ev) = hub.poll_event() {
            match ev {
                HubEvent::Hello(h) => {
                    let marks: Vec<(String, u64)> = h.lanes.iter().map(|l| (l.lane.clone(), 0)).collect();
                    hub.accept(&marks, 0);
                }
                HubEvent::Store(r) => hub.stored(&r.lane, r.through_seq),
                HubEvent::Status(_) | HubEvent::FetchArtifact(_) => {}
            }
        }
        while gw.poll_transmit().is_some() {}
        while hub.poll_transmit().is_some() {}
    }
});
