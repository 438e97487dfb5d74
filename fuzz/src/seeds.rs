//! Writes seed inputs for the fuzz targets into `corpus/<target>/`: valid frame
//! sequences, so the fuzzer starts from inputs that reach the session logic.
//! Run with `cargo run --bin seeds` from this folder.

use voither_proto::*;

fn frame(out: &mut Vec<u8>, f: Frame) {
    encode_frame(&f, out, usize::MAX).expect("encode");
}

fn main() {
    let hello = Frame::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "seed".into(),
        boot_id: 7,
        lanes: vec![
            LaneCursor { lane: "a".into(), oldest_unacked: 1, next_seq: 50 },
            LaneCursor { lane: "b".into(), oldest_unacked: 10, next_seq: 20 },
        ],
        capabilities: vec!["gaps".into()],
        manifest_version: Some(1),
    });
    let welcome = Frame::Welcome(Welcome {
        hub_id: "h".into(),
        region: "r".into(),
        gateway_id: "g".into(),
        lanes: vec![LaneMark { lane: "a".into(), hwm: 3 }, LaneMark { lane: "b".into(), hwm: 9 }],
        endpoints: vec!["127.0.0.1:7700".into()],
        manifest_version: 0,
    });
    let rec = |seq| Record { seq, ingest_ts_ms: 1, source: "s".into(), content_type: None, payload: vec![1, 2].into() };
    let batch = Frame::Batch(Batch {
        lane: "a".into(),
        batch_id: 1,
        records: vec![rec(4), rec(5)].into(),
        gaps: vec![Gap { from_seq: 6, through_seq: 8, reason: GapReason::Ttl }],
    });
    let ack = Frame::Ack(Ack { lane: "a".into(), through_seq: 5, rejected_batch: None });
    let nack = Frame::Ack(Ack { lane: "a".into(), through_seq: 0, rejected_batch: Some(1) });
    let status = Frame::Status(Status {
        uptime_s: 1,
        lanes: vec![LaneStatus { lane: "a".into(), backlog_records: 1, backlog_bytes: 2, oldest_unsynced_age_ms: 3 }],
        store_used_bytes: Some(2),
        store_budget_bytes: Some(1 << 20),
        manifest_version: None,
        workloads: None,
    });
    let cmd = Frame::Command(Command::SlowDown(1000));
    let err = Frame::Error(ErrorFrame { code: 1, reason: "x".into() });
    let seqs: Vec<Vec<Frame>> = vec![
        vec![hello.clone(), welcome.clone(), batch.clone(), ack.clone()],
        vec![welcome.clone(), ack.clone(), nack.clone(), cmd.clone()],
        vec![hello.clone(), batch.clone(), status.clone(), err.clone()],
        vec![welcome, batch, ack, nack, status, cmd, err, hello],
    ];
    for target in ["sessions", "frame_decoder"] {
        let dir = std::path::Path::new("corpus").join(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        for (i, s) in seqs.iter().enumerate() {
            let mut out = if target == "frame_decoder" { vec![7u8] } else { Vec::new() };
            for f in s {
                frame(&mut out, f.clone());
            }
            std::fs::write(dir.join(format!("seed-{i}")), out).expect("write seed");
        }
    }
}
