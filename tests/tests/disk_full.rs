//! The store's file system fills up: the gateway keeps running, stops acking the broker,
//! says so in `/readyz`, `/status` and metrics, and recovers by itself when space
//! returns. Nothing is lost and the store is not corrupt.
//!
//! The test mounts a small tmpfs (it runs as root in CI); if it cannot mount, it fails
//! and says why.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use voither_tests::procs::{bin, http_get, output_within, wait_for, Gateway, GatewayOpts, Hub, Mosquitto, Pki};
use voither_tests::sim::{self, SimConfig};

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .expect("mount(8) not found: this test needs util-linux's mount and root");
        assert!(
            out.status.success(),
            "cannot mount a tmpfs at {} (this test needs root, as in CI): {}",
            at.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.into())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn free_bytes(p: &Path) -> u64 {
    let out = Command::new("df").args(["--output=avail", "-B1"]).arg(p).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().nth(1).and_then(|l| l.trim().parse().ok()).unwrap_or(0)
}

#[test]
fn disk_full_holds_the_broker_and_recovers_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let mosquitto = Mosquitto::start(&dir.path().join("mosquitto"));
    let pki = Pki::generate(&dir.path().join("pki"), &["gw-1"]);
    let mut hub = Hub::start(&dir.path().join("hub"), &pki, "hub-1");
    hub.stop();
    // The gateway's data folder is a 16 MiB tmpfs, mostly taken by a filler file.
    let data = dir.path().join("gw/data");
    let _fs = Tmpfs::mount(&data, "16m");
    let filler = data.join("filler");
    std::fs::write(&filler, vec![0u8; 14 << 20]).unwrap();
    let mut gw =
        Gateway::start(&dir.path().join("gw"), &pki, &GatewayOpts::external("gw-1", mosquitto.port, vec![hub.addr]));
    let rt = tokio::runtime::Runtime::new().unwrap();
    // About 3 MB of records for a disk with under 2 MB free.
    let cfg = SimConfig { port: mosquitto.port, devices: 5, messages: 2_000, ..Default::default() };
    let report = rt.block_on(sim::run(cfg, Arc::default()));
    assert_eq!(report.total_acked(), 10_000);

    let degraded = wait_for(Duration::from_secs(60), || {
        let (code, body) = http_get(gw.admin, "/readyz").ok()?;
        (code == 503).then_some(body)
    });
    let body = degraded.unwrap_or_else(|| panic!("/readyz should report the full disk\n{}", gw.log_tail()));
    assert!(body.contains("store cannot write"), "{body}");
    let st = gw.status().expect("the gateway keeps running and answering");
    assert!(st["store_error"].as_str().is_some_and(|e| !e.is_empty()), "{st}");
    assert_eq!(gw.metric("voither_gateway_store_degraded"), Some(1.0));
    let stored_full =
        st["lanes"].as_array().unwrap().iter().map(|l| l["stored_records"].as_u64().unwrap()).sum::<u64>();
    assert!(stored_full < 10_000, "not everything fit: {stored_full}");
    // The disk really is full: the store says so, and what is free is less than one
    // batch (the store cuts a failed write back, so a batch's worth may come free).
    let why = st["store_error"].as_str().unwrap_or_default();
    assert!(why.contains("No space left on device"), "{why}");
    let free = free_bytes(&data);
    assert!(free < 512 * 1024, "only a failed batch's bytes are free: {free}");

    // Space returns: the gateway recovers by itself and takes the rest from the broker.
    std::fs::remove_file(&filler).unwrap();
    let recovered = wait_for(Duration::from_secs(60), || {
        let (code, _) = http_get(gw.admin, "/readyz").ok()?;
        let st = gw.status()?;
        let stored: u64 = st["lanes"].as_array()?.iter().map(|l| l["stored_records"].as_u64().unwrap_or(0)).sum();
        (code == 200 && stored == 10_000).then_some(())
    });
    assert!(recovered.is_some(), "no recovery after space returned: {:?}\n{}", gw.status(), gw.log_tail());
    assert_eq!(gw.metric("voither_gateway_store_degraded"), Some(0.0));

    hub.restart();
    let rep = wait_for(Duration::from_secs(120), || {
        let rep = voither_tests::check::check(&hub.export(), &report.acked);
        rep.missing.is_empty().then_some(rep)
    })
    .unwrap_or_else(|| panic!("not delivered\n{}\n{}", gw.log_tail(), hub.log_tail()));
    assert!(rep.ok() && rep.found == 10_000, "{}", rep.summary());

    // The store file is healthy.
    gw.stop();
    let out = output_within(
        Command::new(bin("voither-gateway")).args(["store", "check", "--config"]).arg(&gw.config),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "store check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("stored {stored_full} of 10000 before the disk filled; all delivered after space returned");
}
