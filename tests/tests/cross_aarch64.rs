//! The aarch64 gateway that `cross/build.sh` produces, run under qemu-user on this
//! x86_64 machine, ingests from a real Mosquitto and syncs over QUIC with mutual TLS to
//! the x86_64 hub: every acknowledged message reaches the hub's export exactly once, in
//! per-lane order, intact; the gateway counts them as synced and stops cleanly on
//! SIGTERM.
//!
//! The binary comes from `cross/build.sh`: in the test command (`scripts/test.sh`) built
//! in the `cross-check` profile, which compiles fastest; for a release in `release-edge`,
//! the one that ships. The test does not build it, because a cross build takes minutes
//! and needs Debian's cross toolchain. It takes `VOITHER_CROSS_GATEWAY` when set, otherwise
//! `<target dir>/cross/aarch64-unknown-linux-gnu/voither-gateway` (where
//! `cross/build.sh` puts it). If neither exists the test fails and says to run
//! `cross/check.sh`: a cross build that silently did not run must not look green.
//!
//! qemu: `VOITHER_QEMU_AARCH64` (default `qemu-aarch64-static`, Debian's
//! qemu-user-static) with `-L VOITHER_CROSS_SYSROOT` (default `/usr/aarch64-linux-gnu`,
//! Debian's libc6-arm64-cross) so the dynamic loader and glibc are the aarch64 ones,
//! and `LD_LIBRARY_PATH=<sysroot>/lib`: the loader searches /lib/aarch64-linux-gnu
//! first, and where the host has libc6:arm64 (libstd-rust-web-dev:arm64 pulls it in)
//! qemu finds that glibc there, a different build from the cross loader's, and the
//! first pthread_create spins forever.

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use voither_tests::check;
use voither_tests::procs::{self, free_tcp_port, http_get, wait_for, Hub, Mosquitto, Pki, DEFAULT_LANES};
use voither_tests::sim::{self, SimConfig, SimProgress};

const TRIPLE: &str = "aarch64-unknown-linux-gnu";
/// ELF `e_machine` of AArch64.
const EM_AARCH64: u16 = 183;

/// The aarch64 gateway binary: `VOITHER_CROSS_GATEWAY`, else where cross/build.sh
/// writes it in this build's target folder.
fn cross_gateway() -> PathBuf {
    let from_env = std::env::var_os("VOITHER_CROSS_GATEWAY").map(PathBuf::from);
    let path = from_env.clone().unwrap_or_else(|| {
        // <target>/debug/deps/cross_aarch64-… → <target>
        let exe = std::env::current_exe().expect("current exe");
        let mut dir = exe.parent().expect("exe folder").to_path_buf();
        if dir.ends_with("deps") {
            dir.pop();
        }
        dir.pop();
        dir.join("cross").join(TRIPLE).join("voither-gateway")
    });
    assert!(
        path.is_file(),
        "the aarch64 gateway {} does not exist{}: run `cross/check.sh` (or `cross/build.sh aarch64`), which \
         installs Debian's cross toolchain and qemu-user-static, builds it and runs this test",
        path.display(),
        if from_env.is_some() { " (VOITHER_CROSS_GATEWAY)" } else { " (VOITHER_CROSS_GATEWAY is not set)" }
    );
    let head = std::fs::read(&path).expect("read the gateway binary");
    assert!(
        head.len() > 20 && head[..4] == *b"\x7fELF" && head[5] == 1,
        "{} is not a little-endian ELF file",
        path.display()
    );
    let machine = u16::from_le_bytes([head[18], head[19]]);
    assert_eq!(machine, EM_AARCH64, "{} is not an aarch64 binary (e_machine {machine})", path.display());
    path
}

/// The qemu-user program and the sysroot it loads aarch64 libraries from.
fn qemu() -> (PathBuf, PathBuf) {
    let name = std::env::var_os("VOITHER_QEMU_AARCH64").unwrap_or_else(|| "qemu-aarch64-static".into());
    let exe = if Path::new(&name).is_absolute() {
        Some(PathBuf::from(&name))
    } else {
        ["/usr/bin", "/usr/local/bin"].iter().map(|d| Path::new(d).join(&name)).find(|p| p.is_file())
    };
    let exe = exe.filter(|p| p.is_file()).unwrap_or_else(|| {
        panic!("{} not found: run `cross/check.sh` (it installs qemu-user-static)", Path::new(&name).display())
    });
    let sysroot = std::env::var_os("VOITHER_CROSS_SYSROOT")
        .map_or_else(|| PathBuf::from("/usr/aarch64-linux-gnu"), PathBuf::from);
    assert!(
        sysroot.join("lib/ld-linux-aarch64.so.1").exists(),
        "no aarch64 dynamic loader in {}: run `cross/check.sh` (it installs libc6-dev-arm64-cross)",
        sysroot.display()
    );
    (exe, sysroot)
}

/// `qemu -L sysroot [-E LD_LIBRARY_PATH] <aarch64 gateway>`, arguments to follow.
fn qemu_gateway_command() -> Command {
    let (qemu, sysroot) = qemu();
    let mut cmd = Command::new(qemu);
    cmd.arg("-L").arg(&sysroot).env("LD_LIBRARY_PATH", sysroot.join("lib")).arg(cross_gateway());
    cmd
}

/// The aarch64 gateway under qemu; killed on drop.
#[derive(Debug)]
struct QemuGateway {
    child: Option<Child>,
    log: PathBuf,
    admin: SocketAddr,
}

impl QemuGateway {
    fn start(dir: &Path, config: &Path, admin: SocketAddr) -> QemuGateway {
        let log = dir.join("gateway.log");
        let out = OpenOptions::new().create(true).append(true).open(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let mut cmd = qemu_gateway_command();
        let child = cmd
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info,rumqttd=warn,quinn=warn")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        QemuGateway { child: Some(child), log, admin }
    }

    fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    fn status(&self) -> Option<serde_json::Value> {
        let (st, body) = http_get(self.admin, "/status").ok()?;
        (st == 200).then(|| serde_json::from_str(&body).ok()).flatten()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- last lines of the aarch64 gateway log {} ---\n{}",
            self.log.display(),
            lines[lines.len().saturating_sub(40)..].join("\n")
        )
    }

    /// SIGTERM, then the exit status (SIGKILL after `grace`).
    fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        match wait_for(grace, || c.try_wait().ok().flatten()) {
            Some(st) => Some(st),
            None => {
                let _ = c.kill();
                let _ = c.wait();
                None
            }
        }
    }
}

impl Drop for QemuGateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
#[ignore = "needs the aarch64 cross build and qemu-user: cross/check.sh (run by scripts/test.sh) builds them and runs this"]
fn aarch64_gateway_under_qemu_syncs_to_the_x86_hub() {
    // Fail before starting anything when the binary or qemu is missing.
    cross_gateway();
    qemu();

    // `--version` under qemu: the binary, its loader and glibc fit together.
    let out = procs::output_within(qemu_gateway_command().arg("--version"), Duration::from_secs(60));
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success() && version.contains(env!("CARGO_PKG_VERSION")),
        "`voither-gateway --version` under qemu: {version:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::Builder::new().prefix("voither-cross-").tempdir().expect("tempdir");
    let mosquitto = Mosquitto::start(&dir.path().join("mosquitto"));
    let pki = Pki::generate(&dir.path().join("pki"), &["gw-arm"]);
    let hub = Hub::start(&dir.path().join("hub"), &pki, "hub-x86");

    let gw_dir = dir.path().join("gw");
    std::fs::create_dir_all(&gw_dir).expect("gateway dir");
    let admin: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().expect("addr");
    let config = gw_dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\ndata_dir = \"{data}\"\n\n\
             [mqtt]\nhost = \"127.0.0.1\"\nport = {port}\nclient_id = \"voither-gw-arm\"\n\n\
             [broker]\nenabled = false\n\n{DEFAULT_LANES}\n\
             [uplink]\nendpoints = [\"{hub}\"]\nserver_name = \"voither-hub\"\n\
             ca = \"{p}/ca.pem\"\ncert = \"{p}/gw-arm.pem\"\nkey = \"{p}/gw-arm.key\"\n\
             keep_alive_ms = 1000\nidle_timeout_ms = 10000\nconnect_timeout_ms = 10000\n\
             backoff_min_ms = 100\nbackoff_max_ms = 1000\n\n\
             [admin]\nlisten = \"{admin}\"\n",
            data = gw_dir.join("data").display(),
            port = mosquitto.port,
            hub = hub.addr,
            p = pki.dir.display(),
        ),
    )
    .expect("gateway.toml");

    // The config check runs in the aarch64 binary too.
    let out = procs::output_within(
        qemu_gateway_command().arg("check-config").arg("--config").arg(&config),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "check-config under qemu: {}", String::from_utf8_lossy(&out.stderr));

    let mut gw = QemuGateway::start(&gw_dir, &config, admin);
    // Emulation is slower than the native gateway: generous start-up limits.
    let ready = wait_for(Duration::from_secs(90), || http_get(admin, "/readyz").ok().filter(|(s, _)| *s == 200));
    assert!(ready.is_some() && gw.running(), "the aarch64 gateway did not become ready\n{}", gw.log_tail());
    let subscribed =
        wait_for(Duration::from_secs(60), || gw.status().filter(|s| s["mqtt"]["subscribed"] == true).map(|_| ()));
    assert!(subscribed.is_some(), "the aarch64 gateway did not subscribe to Mosquitto\n{}", gw.log_tail());

    // Records published: 4 devices × 500 QoS 1 messages, every 20th an alarm.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let cfg = SimConfig {
        port: mosquitto.port,
        devices: 4,
        messages: 500,
        payload_size: 256,
        alarm_every: 20,
        client_prefix: "voither-cross-sim".into(),
        ..Default::default()
    };
    let report = rt.block_on(sim::run(cfg, Arc::new(SimProgress::default())));
    assert_eq!(report.total_acked(), 2_000, "the broker acknowledged every publish");

    // Exported: every acknowledged message is in the hub's export once, in order, intact.
    let mut rep = check::check(&hub.export(), &report.acked);
    let delivered = wait_for(Duration::from_secs(180), || {
        rep = check::check(&hub.export(), &report.acked);
        rep.missing.is_empty().then_some(())
    });
    assert!(delivered.is_some() && rep.ok(), "{}\n{}\n{}", rep.summary(), gw.log_tail(), hub.log_tail());
    assert_eq!(rep.found, 2_000, "{}", rep.summary());
    assert_eq!(rep.unexpected, 0, "{}", rep.summary());
    assert_eq!(rep.per_lane.get("alarms"), Some(&100), "every 20th message is an alarm: {}", rep.summary());
    let from_arm = hub
        .export()
        .iter()
        .filter(|r| matches!(r, check::ExportRow::Record { gateway, .. } if gateway == "gw-arm"))
        .count();
    assert_eq!(from_arm, 2_000, "the hub took the gateway id from the aarch64 gateway's certificate");

    // Synced: the gateway counts them, holds nothing back, and the hub saw no duplicates.
    let drained = wait_for(Duration::from_secs(30), || {
        let s = gw.status()?;
        let backlog: u64 = s["lanes"].as_array()?.iter().map(|l| l["backlog_records"].as_u64().unwrap_or(0)).sum();
        (backlog == 0).then_some(())
    });
    assert!(drained.is_some(), "the aarch64 gateway's backlog did not reach 0\n{}", gw.log_tail());
    assert_eq!(procs::metric(admin, "voither_gateway_stored_records_total"), Some(2_000.0));
    assert_eq!(procs::metric(admin, "voither_gateway_synced_records_total"), Some(2_000.0));
    assert_eq!(hub.metric("voither_hub_duplicate_records_total"), Some(0.0));

    // SIGTERM reaches the emulated process and it drains and exits 0.
    let st = gw.terminate(Duration::from_secs(30));
    assert!(
        st.is_some_and(|s| s.success()),
        "the aarch64 gateway did not stop cleanly on SIGTERM: {st:?}\n{}",
        gw.log_tail()
    );
}
