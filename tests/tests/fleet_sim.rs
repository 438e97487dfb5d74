//! The fleet simulator against a real hub (embedded sink, then the PostgreSQL sink with
//! its group commit): 50 simulated gateways, each
//! with its own certificate and QUIC connection, send for a few seconds; afterwards
//! every record a gateway was acked for is in the hub's sink exactly once, intact, and
//! nothing is stored that a gateway did not generate. No timing assertions: this proves
//! the simulator speaks the protocol truthfully, so its figures mean something.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine;
use voither_tests::check::ExportRow;
use voither_tests::fleet::{self, FleetOpts, LANE};

#[test]
fn every_acked_record_of_every_simulated_gateway_is_in_the_sink_once() {
    fifty_gateways(String::new());
}

#[test]
fn every_acked_record_of_every_simulated_gateway_is_in_postgresql_once() {
    let pg = voither_tests::pg::Postgres::start();
    fifty_gateways(pg.sink_toml());
}

fn fifty_gateways(hub_extra_config: String) {
    let opts = FleetOpts {
        hub_extra_config,
        gateways: 50,
        rate: 20.0,
        record_bytes: 64,
        batch: 16,
        window: 4,
        duration: Duration::from_secs(3),
        ramp: Duration::from_secs(1),
        drain: Duration::from_secs(5),
        ..FleetOpts::default()
    };
    let run = fleet::run(&opts).expect("fleet run");
    let rep = &run.report;
    println!("{}", rep.table());
    assert_eq!(
        rep.connect.connected,
        50,
        "every simulated gateway connects: {:?}\n{}",
        rep.connect.errors,
        run.hub.log_tail()
    );
    assert_eq!(rep.connect.dropped, 0, "no session ends early: {:?}\n{}", rep.connect.errors, run.hub.log_tail());

    // What the sink holds, per gateway: seq → how often, and the payload.
    let mut sink: HashMap<String, HashMap<u64, (u32, Vec<u8>)>> = HashMap::new();
    for row in run.hub.export() {
        if let ExportRow::Record { gateway, lane, seq, payload, .. } = row {
            assert_eq!(lane, LANE);
            let bytes = base64::engine::general_purpose::STANDARD.decode(payload).expect("base64 payload");
            let e = sink.entry(gateway).or_default().entry(seq).or_insert((0, bytes));
            e.0 += 1;
        }
    }
    let mut acked_total = 0u64;
    for g in &run.gateways {
        assert!(g.acked_through > 0, "{} got acks", g.id);
        assert!(g.acked_through <= g.generated);
        acked_total += g.acked_through;
        let held = sink.remove(&g.id).unwrap_or_default();
        for seq in 1..=g.acked_through {
            let Some((times, bytes)) = held.get(&seq) else {
                panic!("{} seq {seq} was acked but is not in the sink", g.id);
            };
            assert_eq!(*times, 1, "{} seq {seq} is in the sink {times} times", g.id);
            assert_eq!(bytes, &fleet::payload(g.index, seq, opts.record_bytes), "{} seq {seq} payload", g.id);
        }
        // Unacked records may or may not have been committed; none beyond what was generated.
        assert!(held.keys().all(|&s| s >= 1 && s <= g.generated), "{} has seqs it never generated", g.id);
    }
    assert!(sink.is_empty(), "records of gateways that were not simulated: {:?}", sink.keys().collect::<Vec<_>>());
    assert!(acked_total >= 50, "records flowed: {acked_total}");
}
