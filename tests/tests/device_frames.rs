//! Device frames from the simulator go through a real Mosquitto, the gateway and QUIC to
//! the hub, and `voither-hub export` shows every one decoded, with the values the
//! devices sent.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use voither_tests::check::ExportRow;
use voither_tests::procs::Lab;
use voither_tests::sim::{self, SimConfig, SimProgress};

#[test]
fn device_frames_are_decoded_in_the_hub_export() {
    let lab = Lab::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cfg = SimConfig {
        port: lab.mosquitto.port,
        devices: 3,
        messages: 200,
        alarm_every: 50,
        frames: true,
        ..Default::default()
    };
    let report = rt.block_on(sim::run(cfg, Arc::new(SimProgress::default())));
    assert_eq!(report.total_acked(), 600, "the broker acknowledged every publish");

    // The checker recognises frames by (device_id, counter) and checks their readings.
    let rep = lab.wait_delivered(&report.acked, Duration::from_secs(60));
    assert!(rep.ok(), "{}\n{}", rep.summary(), lab.logs());
    assert_eq!(rep.found, 600, "{}", rep.summary());
    assert_eq!(rep.unexpected, 0, "{}", rep.summary());
    assert_eq!(rep.per_lane.get("alarms"), Some(&12), "every 50th message is an alarm: {}", rep.summary());

    // The values read back from the hub's export, decoded by the hub.
    let mut seen = BTreeSet::new();
    for row in lab.hub.export() {
        let ExportRow::Record { source, decoded, .. } = row else { continue };
        let d = decoded.unwrap_or_else(|| panic!("record from {source} has no decoded frame"));
        let device = u32::try_from(d["device_id"].as_u64().expect("device_id")).unwrap();
        let counter = u32::try_from(d["counter"].as_u64().expect("counter")).unwrap();
        let want_topic = if counter % 50 == 49 { "alarm" } else { "frame" };
        assert_eq!(source, format!("devices/{device}/{want_topic}"), "{d}");
        assert_eq!(d["timestamp_ms"].as_u64(), Some(1_700_000_000_000 + u64::from(counter)), "{d}");
        let readings = d["readings"].as_array().expect("readings");
        assert_eq!(readings.len(), 2, "{d}");
        let temperature = 20_000 + i64::from(device) * 100 + i64::from(counter % 1000);
        assert_eq!(
            readings[0],
            serde_json::json!({"quantity": "temperature", "unit": "celsius", "value": temperature, "exponent": -3}),
            "{d}"
        );
        let humidity = 30_000 + (u64::from(device) * 7 + u64::from(counter) * 13) % 40_000;
        assert_eq!(
            readings[1],
            serde_json::json!({"quantity": "relative_humidity", "unit": "percent", "value": humidity, "exponent": -3}),
            "{d}"
        );
        assert!(seen.insert((device, counter)), "frame {device}/{counter} exported twice");
    }
    let want: BTreeSet<(u32, u32)> = (0..3).flat_map(|d| (0..200).map(move |c| (d, c))).collect();
    assert_eq!(seen, want, "every frame of every device, decoded");
}
