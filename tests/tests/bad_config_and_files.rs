//! Bad configuration, unsafe key files and a corrupt store: each gives a clear error
//! that names the key or file, and loses nothing.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use voither_tests::procs::{
    bin, free_tcp_port, free_udp_port, output_within, wait_for, Gateway, GatewayOpts, Lab, Pki,
};

fn gateway_config(dir: &std::path::Path, pki: &Pki, extra: &str) -> std::path::PathBuf {
    let p = dir.join("gateway.toml");
    std::fs::write(
        &p,
        format!(
            "[gateway]\ndata_dir = \"{}\"\n[admin]\nlisten = \"127.0.0.1:{}\"\n[uplink]\nendpoints = [\"127.0.0.1:{}\"]\nca = \"{d}/ca.pem\"\ncert = \"{d}/gw-1.pem\"\nkey = \"{d}/gw-1.key\"\n{extra}",
            dir.join("data").display(),
            free_tcp_port(),
            free_udp_port(),
            d = pki.dir.display()
        ),
    )
    .unwrap();
    p
}

#[test]
fn bad_config_exits_64_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&dir.path().join("pki"), &["gw-1"]);
    let cases = [
        ("[mqtt]\nmax_payload_bytes = 0\n", "mqtt.max_payload_bytes"),
        ("[mqtt]\nprot = 1883\n", "prot"),
        ("[[lanes]]\nname = \"x\"\ntopics = [\"a/#/b\"]\n", "lanes[0].topics[0]"),
    ];
    for (extra, key) in cases {
        let cfg = gateway_config(dir.path(), &pki, extra);
        for sub in ["check-config", "run"] {
            let out = output_within(
                Command::new(bin("voither-gateway")).args([sub, "--config"]).arg(&cfg),
                Duration::from_secs(30),
            );
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(64), "{sub} {key}: {err}");
            assert!(
                err.contains(key) && err.contains("gateway.toml"),
                "{sub}: message names key {key} and the file: {err}"
            );
        }
    }
    let hub_cfg = dir.path().join("hub.toml");
    std::fs::write(&hub_cfg, "[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n[sink]\nkind = \"s3\"\n").unwrap();
    let out = output_within(
        Command::new(bin("voither-hub")).args(["check-config", "--config"]).arg(&hub_cfg),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sink.kind"));
}

#[test]
fn world_readable_key_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&dir.path().join("pki"), &["gw-1"]);
    let key = pki.dir.join("gw-1.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = gateway_config(dir.path(), &pki, "");
    let out = output_within(
        Command::new(bin("voither-gateway")).args(["run", "--config"]).arg(&cfg),
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("gw-1.key") && err.contains("chmod 600"), "{err}");
}

fn junk() -> Vec<u8> {
    (0..65_536u32).map(|i| (i * 7 + 3) as u8).collect()
}

#[test]
fn corrupt_store_is_refused_when_configured_so_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&dir.path().join("pki"), &["gw-1"]);
    let cfg = gateway_config(dir.path(), &pki, "[store]\non_corrupt = \"refuse\"\n");
    std::fs::create_dir_all(dir.path().join("data/store")).unwrap();
    let store = dir.path().join("data/store/0000000000000001.seg");
    std::fs::write(&store, junk()).unwrap();
    let out = output_within(
        Command::new(bin("voither-gateway")).args(["run", "--config"]).arg(&cfg),
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot open store") && err.contains("store/0000000000000001.seg"), "{err}");
    assert_eq!(std::fs::read(&store).unwrap(), junk(), "the corrupt file is not touched");
    // `store check` says the same without changing anything.
    let out = output_within(
        Command::new(bin("voither-gateway")).args(["store", "check", "--config"]).arg(&cfg),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("store/0000000000000001.seg"));
    assert_eq!(std::fs::read(&store).unwrap(), junk());
}

#[test]
fn corrupt_store_is_moved_aside_and_a_fresh_one_started() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(&dir.path().join("pki"), &["gw-1"]);
    let data = dir.path().join("gw/data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(data.join("store")).unwrap();
    std::fs::write(data.join("store/0000000000000001.seg"), junk()).unwrap();
    let port = free_tcp_port();
    let mut gw = Gateway::start(
        &dir.path().join("gw"),
        &pki,
        &GatewayOpts::embedded("gw-1", port, vec![format!("127.0.0.1:{}", free_udp_port()).parse().unwrap()]),
    );
    assert_eq!(gw.metric("voither_gateway_store_corrupt_moved_total"), Some(1.0));
    let aside: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("store.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "the damaged store folder is kept under a new name");
    assert_eq!(std::fs::read(aside[0].path().join("0000000000000001.seg")).unwrap(), junk(), "and never changed");
    gw.stop();
    let out = output_within(
        Command::new(bin("voither-gateway")).args(["store", "check", "--config"]).arg(&gw.config),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "the fresh store is healthy: {}", String::from_utf8_lossy(&out.stderr));
    let rep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rep["problems"].as_array().unwrap().len(), 0);
    assert_eq!(rep["lanes"].as_array().unwrap().len(), 2);
}

#[test]
fn oversized_mqtt_payload_is_counted_and_does_not_block_the_rest() {
    let lab = Lab::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut opts = rumqttc::MqttOptions::new("big-sender", "127.0.0.1", lab.mosquitto.port);
        opts.set_max_packet_size(2 << 20, 2 << 20);
        let (c, mut ev) = rumqttc::AsyncClient::new(opts, 10);
        c.publish("devices/9/telemetry", rumqttc::QoS::AtLeastOnce, false, vec![7u8; 300 * 1024]).await.unwrap();
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = ev.poll().await.unwrap() {
                break;
            }
        }
    });
    let dropped = wait_for(Duration::from_secs(20), || {
        lab.gateway.metric("voither_gateway_dropped_records_total").filter(|n| *n >= 1.0)
    });
    assert!(dropped.is_some(), "a payload over mqtt.max_payload_bytes is counted as dropped\n{}", lab.logs());
    // Later messages flow as usual.
    let cfg =
        voither_tests::sim::SimConfig { port: lab.mosquitto.port, devices: 2, messages: 100, ..Default::default() };
    let report = rt.block_on(voither_tests::sim::run(cfg, Arc::default()));
    let rep = lab.wait_delivered(&report.acked, Duration::from_secs(60));
    assert!(rep.ok() && rep.found == 200, "{}", rep.summary());
}

#[test]
fn message_on_a_topic_no_lane_maps_is_counted_acked_and_dropped() {
    // A lane for `legacy/#` existed; the broker's persistent session still has that
    // subscription after the lane is removed from the config.
    let mut lab = Lab::start_with(
        "[[lanes]]\nname = \"telemetry\"\ntopics = [\"devices/#\"]\n[[lanes]]\nname = \"legacy\"\ntopics = [\"legacy/#\"]\n",
        "",
    );
    lab.gateway.stop();
    let text = std::fs::read_to_string(&lab.gateway.config).unwrap();
    let text = text.replace("[[lanes]]\nname = \"legacy\"\ntopics = [\"legacy/#\"]\n", "");
    std::fs::write(&lab.gateway.config, text).unwrap();
    lab.gateway.restart();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let opts = rumqttc::MqttOptions::new("legacy-sender", "127.0.0.1", lab.mosquitto.port);
        let (c, mut ev) = rumqttc::AsyncClient::new(opts, 10);
        c.publish("legacy/1", rumqttc::QoS::AtLeastOnce, false, b"old".to_vec()).await.unwrap();
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = ev.poll().await.unwrap() {
                break;
            }
        }
    });
    let unrouted = wait_for(Duration::from_secs(20), || {
        lab.gateway.metric("voither_gateway_dropped_records_total").filter(|n| *n >= 1.0)
    });
    assert!(unrouted.is_some(), "the unmapped message is counted\n{}", lab.logs());
    // Devices on mapped topics are not held up.
    let cfg =
        voither_tests::sim::SimConfig { port: lab.mosquitto.port, devices: 2, messages: 50, ..Default::default() };
    let report = rt.block_on(voither_tests::sim::run(cfg, Arc::default()));
    let rep = lab.wait_delivered(&report.acked, Duration::from_secs(60));
    assert!(rep.ok() && rep.found == 100, "{}", rep.summary());
}
