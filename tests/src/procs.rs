//! Real processes for end-to-end tests and the demo: Mosquitto, hub, gateway.
//!
//! Each process writes its log to a file in its folder; on a failed wait the log's tail
//! is put into the error so a red test says why.
//!
//! This module is blocking harness code that runs outside any async runtime, so the
//! workspace's ban on `std::time::Instant` and `std::thread::sleep` (meant for async
//! code) does not apply; its sleeps are poll intervals on other processes' state.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the workspace's binaries are: in `VOITHER_BIN_DIR` when it is set and has
/// `name` (binaries of another build, for example with the feature `otlp`), otherwise
/// next to the running executable's folder.
pub fn bin(name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os("VOITHER_BIN_DIR").map(|d| PathBuf::from(d).join(name)).filter(|p| p.exists()) {
        return p;
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe folder").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not found: build the binaries first with `cargo build --workspace --bins` (the test command does this)",
        p.display()
    );
    p
}

/// A TCP port free on loopback now.
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A UDP port free on loopback now.
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Polls `f` every 20 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A blocking HTTP/1.0 GET; returns status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, body.to_string()))
}

/// Runs `cmd` to completion, killing it (and failing the test) after `timeout`.
pub fn output_within(cmd: &mut Command, timeout: Duration) -> std::process::Output {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let end = Instant::now() + timeout;
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > end {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("{cmd:?} did not exit within {timeout:?}; stderr:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process that is killed when dropped.
#[derive(Debug)]
pub struct Proc {
    child: Option<Child>,
    /// Its log file.
    pub log: PathBuf,
    name: String,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Proc {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Proc { child: Some(child), log, name: name.into() }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit (SIGKILL after `grace`); returns the exit status.
    pub fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        let end = Instant::now() + grace;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if Instant::now() > end {
                let _ = c.kill();
                return c.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Waits for the exit and returns the status.
    pub fn wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.take().and_then(|mut c| c.wait().ok())
    }

    /// Last lines of the log, for error messages.
    pub fn log_tail(&self) -> String {
        format!("--- last lines of {} log {} ---\n{}", self.name, self.log.display(), tail(&self.log, 40))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Mosquitto broker on a loopback port, with persistence in its folder.
#[derive(Debug)]
pub struct Mosquitto {
    /// The process.
    pub proc: Proc,
    /// Its port.
    pub port: u16,
}

impl Mosquitto {
    /// Starts Mosquitto; panics with install instructions if it is missing.
    pub fn start(dir: &Path) -> Mosquitto {
        let exe = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .unwrap_or_else(|| {
                panic!("mosquitto is not installed: run `apt-get install -y mosquitto` (scripts/test.sh does this)")
            });
        std::fs::create_dir_all(dir).expect("mosquitto dir");
        let port = free_tcp_port();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\n\
                 max_inflight_messages 1000\nmax_queued_messages 0\nmax_queued_bytes 0\n\
                 message_size_limit 1048576\nlog_dest stdout\nlog_type error\nlog_type warning\n",
                dir.display()
            ),
        )
        .expect("mosquitto.conf");
        let mut cmd = Command::new(exe);
        cmd.arg("-c").arg(&conf);
        let mut proc = Proc::spawn("mosquitto", cmd, dir.join("mosquitto.log"));
        let ok = wait_for(Duration::from_secs(10), || TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ()));
        assert!(ok.is_some() && proc.running(), "mosquitto did not start\n{}", proc.log_tail());
        Mosquitto { proc, port }
    }
}

/// A PKI folder made by `voither-hub pki`.
#[derive(Debug, Clone)]
pub struct Pki {
    /// The folder.
    pub dir: PathBuf,
}

impl Pki {
    /// Creates a CA, the hub's certificate and one per gateway id.
    pub fn generate(dir: &Path, gateways: &[&str]) -> Pki {
        let st = Command::new(bin("voither-hub"))
            .arg("pki")
            .arg("--out")
            .arg(dir)
            .arg("--gateways")
            .arg(gateways.join(","))
            .stdout(Stdio::null())
            .status()
            .expect("voither-hub pki");
        assert!(st.success(), "voither-hub pki failed");
        Pki { dir: dir.into() }
    }
}

/// A hub process and what is needed to restart it.
#[derive(Debug)]
pub struct Hub {
    /// The process (None while stopped).
    pub proc: Option<Proc>,
    /// Its config file.
    pub config: PathBuf,
    /// QUIC address.
    pub addr: SocketAddr,
    /// Admin address.
    pub admin: SocketAddr,
    /// Extra environment for the next (re)start, e.g. `VOITHER_HUB_FAILPOINT`.
    pub env: Vec<(String, String)>,
    dir: PathBuf,
}

impl Hub {
    /// Writes a config into `dir` and starts the hub.
    pub fn start(dir: &Path, pki: &Pki, id: &str) -> Hub {
        Self::start_advertising(dir, pki, id, &[])
    }

    /// Like [`Hub::start`]; the hub hands `endpoints` to gateways in `Welcome`.
    pub fn start_advertising(dir: &Path, pki: &Pki, id: &str, endpoints: &[SocketAddr]) -> Hub {
        Self::start_full(dir, pki, id, endpoints, "")
    }

    /// Like [`Hub::start_advertising`]; `extra` TOML (whole sections, e.g. a `[sink]`)
    /// is appended to the config.
    pub fn start_full(dir: &Path, pki: &Pki, id: &str, endpoints: &[SocketAddr], extra: &str) -> Hub {
        std::fs::create_dir_all(dir).expect("hub dir");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().expect("addr");
        let admin: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().expect("addr");
        let config = dir.join("hub.toml");
        std::fs::write(
            &config,
            format!(
                "[hub]\nid = \"{id}\"\nregion = \"test\"\nlisten = \"{addr}\"\ndata_dir = \"{}\"\nidle_timeout_ms = 3000\nendpoints = [{eps}]\n\n\
                 [tls]\nca = \"{p}/ca.pem\"\ncert = \"{p}/hub.pem\"\nkey = \"{p}/hub.key\"\n\n[admin]\nlisten = \"{admin}\"\n\n{extra}",
                dir.join("data").display(),
                p = pki.dir.display(),
                eps = endpoints.iter().map(|e| format!("\"{e}\"")).collect::<Vec<_>>().join(", ")
            ),
        )
        .expect("hub.toml");
        let mut h = Hub { proc: None, config, addr, admin, env: Vec::new(), dir: dir.into() };
        h.restart();
        h
    }

    /// Starts the (stopped) hub again with the same config and data.
    pub fn restart(&mut self) {
        let mut cmd = Command::new(bin("voither-hub"));
        cmd.arg("run").arg("--config").arg(&self.config).env("RUST_LOG", "info,quinn=warn");
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let mut p = Proc::spawn("hub", cmd, self.dir.join("hub.log"));
        let admin = self.admin;
        let ok = wait_for(Duration::from_secs(20), || http_get(admin, "/healthz").ok().filter(|(s, _)| *s == 200));
        assert!(ok.is_some() && p.running(), "hub did not start\n{}", p.log_tail());
        self.proc = Some(p);
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate(Duration::from_secs(10));
        }
    }

    /// Waits until the hub process exits by itself (a failpoint) and returns its code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let p = self.proc.as_mut()?;
        let end = Instant::now() + timeout;
        while p.running() {
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let code = p.wait().and_then(|s| s.code());
        self.proc = None;
        code
    }

    /// `voither-hub export` output, parsed.
    pub fn export(&self) -> Vec<crate::check::ExportRow> {
        let out = Command::new(bin("voither-hub"))
            .arg("export")
            .arg("--config")
            .arg(&self.config)
            .output()
            .expect("voither-hub export");
        assert!(out.status.success(), "export failed: {}", String::from_utf8_lossy(&out.stderr));
        crate::check::parse_export(&String::from_utf8_lossy(&out.stdout)).expect("export output")
    }

    /// A metric's value from `/metrics` (sum over label sets), if present.
    pub fn metric(&self, name: &str) -> Option<f64> {
        metric(self.admin, name)
    }

    /// Log tail.
    pub fn log_tail(&self) -> String {
        self.proc.as_ref().map_or_else(|| tail(&self.dir.join("hub.log"), 40), Proc::log_tail)
    }

    /// Edits the config file like [`Gateway::set_config`]; takes effect at the next restart.
    pub fn set_config(&self, section: &str, pairs: &[(&str, &str)]) {
        set_toml(&self.config, section, pairs);
    }
}

/// Puts `key = value` lines into `[section]` of a TOML file, replacing keys already set
/// there; the section must exist.
fn set_toml(path: &Path, section: &str, pairs: &[(&str, &str)]) {
    let text = std::fs::read_to_string(path).expect("config file");
    let header = format!("[{section}]");
    let mut out: Vec<String> = Vec::new();
    let mut inside = false;
    let mut found = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            inside = t == header;
            found |= inside;
            out.push(line.into());
            if inside {
                out.extend(pairs.iter().map(|(k, v)| format!("{k} = {v}")));
            }
            continue;
        }
        let key = t.split('=').next().unwrap_or("").trim();
        if inside && pairs.iter().any(|(k, _)| *k == key) {
            continue;
        }
        out.push(line.into());
    }
    assert!(found, "no [{section}] in {}", path.display());
    std::fs::write(path, out.join("\n") + "\n").expect("config file");
}

/// Sum of a metric's samples in a Prometheus text page at `addr`.
pub fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let (st, body) = http_get(addr, "/metrics").ok()?;
    if st != 200 {
        return None;
    }
    let mut found = None;
    for line in body.lines() {
        if line.starts_with('#') {
            continue;
        }
        let (key, val) = line.rsplit_once(' ')?;
        let base = key.split('{').next().unwrap_or(key);
        if base == name {
            *found.get_or_insert(0.0) += val.parse::<f64>().ok()?;
        }
    }
    found
}

/// Options of a test gateway.
#[derive(Debug, Clone)]
pub struct GatewayOpts {
    /// Gateway id (certificate file stem in the PKI folder).
    pub id: String,
    /// MQTT broker port.
    pub mqtt_port: u16,
    /// Start the embedded broker on `mqtt_port`.
    pub embedded_broker: bool,
    /// Hub endpoints.
    pub endpoints: Vec<SocketAddr>,
    /// Extra TOML appended to the config.
    pub extra: String,
    /// `[[lanes]]` TOML replacing the default lanes (`alarms` for `devices/+/alarm`,
    /// `telemetry` for `devices/#`) when not empty.
    pub lanes: String,
}

impl GatewayOpts {
    /// Gateway `id` with its own embedded broker on `mqtt_port`, syncing to `endpoints`,
    /// default lanes.
    pub fn embedded(id: &str, mqtt_port: u16, endpoints: Vec<SocketAddr>) -> Self {
        Self { id: id.into(), mqtt_port, embedded_broker: true, endpoints, extra: String::new(), lanes: String::new() }
    }

    /// Gateway `id` subscribing to an external broker (Mosquitto) on `mqtt_port`.
    pub fn external(id: &str, mqtt_port: u16, endpoints: Vec<SocketAddr>) -> Self {
        Self { embedded_broker: false, ..Self::embedded(id, mqtt_port, endpoints) }
    }
}

/// The lanes a test gateway has unless told otherwise.
pub const DEFAULT_LANES: &str = "[[lanes]]\nname = \"alarms\"\npriority = 0\ntopics = [\"devices/+/alarm\"]\n\n\
[[lanes]]\nname = \"telemetry\"\npriority = 1\ntopics = [\"devices/#\"]\n";

/// A gateway process and what is needed to restart it.
#[derive(Debug)]
pub struct Gateway {
    /// The process (None while stopped).
    pub proc: Option<Proc>,
    /// Config file.
    pub config: PathBuf,
    /// Admin address.
    pub admin: SocketAddr,
    /// Extra environment for the next (re)start, e.g. `NOTIFY_SOCKET`.
    pub env: Vec<(String, String)>,
    dir: PathBuf,
}

impl Gateway {
    /// Writes a config into `dir` and starts the gateway.
    pub fn start(dir: &Path, pki: &Pki, o: &GatewayOpts) -> Gateway {
        std::fs::create_dir_all(dir).expect("gateway dir");
        let admin: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().expect("addr");
        let config = dir.join("gateway.toml");
        let endpoints: Vec<String> = o.endpoints.iter().map(|e| format!("\"{e}\"")).collect();
        std::fs::write(
            &config,
            format!(
                "[gateway]\ndata_dir = \"{data}\"\n\n[mqtt]\nhost = \"127.0.0.1\"\nport = {port}\nclient_id = \"voither-{id}\"\n\n\
                 [broker]\nenabled = {eb}\nlisten = \"127.0.0.1:{port}\"\n\n{lanes}\n\
                 [uplink]\nendpoints = [{eps}]\nserver_name = \"voither-hub\"\nca = \"{p}/ca.pem\"\ncert = \"{p}/{id}.pem\"\nkey = \"{p}/{id}.key\"\n\
                 keep_alive_ms = 500\nidle_timeout_ms = 3000\nconnect_timeout_ms = 3000\nbackoff_min_ms = 100\nbackoff_max_ms = 1000\n\n\
                 [admin]\nlisten = \"{admin}\"\n{extra}",
                data = dir.join("data").display(),
                port = o.mqtt_port,
                id = o.id,
                eb = o.embedded_broker,
                eps = endpoints.join(", "),
                p = pki.dir.display(),
                extra = o.extra,
                lanes = if o.lanes.is_empty() { DEFAULT_LANES } else { &o.lanes },
            ),
        )
        .expect("gateway.toml");
        let mut g = Gateway { proc: None, config, admin, env: Vec::new(), dir: dir.into() };
        g.restart();
        g
    }

    /// Starts the (stopped) gateway again with the same config and data.
    pub fn restart(&mut self) {
        let mut cmd = Command::new(bin("voither-gateway"));
        cmd.arg("run").arg("--config").arg(&self.config).env("RUST_LOG", "info,rumqttd=warn,quinn=warn");
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let mut p = Proc::spawn("gateway", cmd, self.dir.join("gateway.log"));
        let admin = self.admin;
        let ok = wait_for(Duration::from_secs(20), || http_get(admin, "/readyz").ok().filter(|(s, _)| *s == 200));
        assert!(ok.is_some() && p.running(), "gateway did not become ready\n{}", p.log_tail());
        self.proc = Some(p);
        // Messages published before the subscription exists are not for this gateway:
        // tests start publishing only once it is subscribed.
        let subscribed =
            wait_for(Duration::from_secs(20), || self.status().filter(|s| s["mqtt"]["subscribed"] == true).map(|_| ()));
        assert!(subscribed.is_some(), "gateway did not subscribe to the broker\n{}", self.log_tail());
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate(Duration::from_secs(15));
        }
    }

    /// `/status` as JSON.
    pub fn status(&self) -> Option<serde_json::Value> {
        let (st, body) = http_get(self.admin, "/status").ok()?;
        if st != 200 {
            return None;
        }
        serde_json::from_str(&body).ok()
    }

    /// Total backlog over lanes, from `/status`.
    pub fn backlog(&self) -> Option<u64> {
        let s = self.status()?;
        Some(s["lanes"].as_array()?.iter().map(|l| l["backlog_records"].as_u64().unwrap_or(0)).sum())
    }

    /// A metric's value from `/metrics`.
    pub fn metric(&self, name: &str) -> Option<f64> {
        metric(self.admin, name)
    }

    /// Log tail.
    pub fn log_tail(&self) -> String {
        self.proc.as_ref().map_or_else(|| tail(&self.dir.join("gateway.log"), 40), Proc::log_tail)
    }

    /// Edits the config file: `key = value` lines are put into `[section]` (replacing
    /// the key where it is set). Takes effect at the next (re)start.
    pub fn set_config(&self, section: &str, pairs: &[(&str, &str)]) {
        set_toml(&self.config, section, pairs);
    }
}

/// Mosquitto, a lab PKI, one hub and one gateway, all in a temporary folder.
#[derive(Debug)]
pub struct Lab {
    /// The gateway.
    pub gateway: Gateway,
    /// The hub.
    pub hub: Hub,
    /// The broker.
    pub mosquitto: Mosquitto,
    /// The PKI.
    pub pki: Pki,
    /// Kept for the lab's lifetime; its path holds every log.
    pub dir: tempfile::TempDir,
}

impl Lab {
    /// Starts everything with gateway id `gw-1`.
    pub fn start() -> Lab {
        Self::start_with("", "")
    }

    /// Starts everything; `lanes` replaces the default lanes when not empty, `extra`
    /// TOML is appended to the gateway config.
    pub fn start_with(lanes: &str, extra: &str) -> Lab {
        Self::start_full(lanes, extra, |hub| hub)
    }

    /// Like [`Lab::start_with`]; `endpoint` maps the hub's address to the one the
    /// gateway is given (for example a fault proxy in front of the hub).
    pub fn start_full(lanes: &str, extra: &str, endpoint: impl FnOnce(SocketAddr) -> SocketAddr) -> Lab {
        let dir = tempfile::Builder::new().prefix("voither-lab-").tempdir().expect("tempdir");
        let mosquitto = Mosquitto::start(&dir.path().join("mosquitto"));
        let pki = Pki::generate(&dir.path().join("pki"), &["gw-1"]);
        let hub = Hub::start(&dir.path().join("hub"), &pki, "hub-1");
        let gateway = Gateway::start(
            &dir.path().join("gw"),
            &pki,
            &GatewayOpts {
                extra: extra.into(),
                lanes: lanes.into(),
                ..GatewayOpts::external("gw-1", mosquitto.port, vec![endpoint(hub.addr)])
            },
        );
        Lab { gateway, hub, mosquitto, pki, dir }
    }

    /// Polls the hub's export until every acked message is there (or `timeout`), and
    /// returns the last check.
    pub fn wait_delivered(&self, acked: &[Vec<u64>], timeout: Duration) -> crate::check::CheckReport {
        let end = Instant::now() + timeout;
        loop {
            let rep = crate::check::check(&self.hub.export(), acked);
            if rep.missing.is_empty() || Instant::now() > end {
                return rep;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Logs of gateway and hub, for assertion messages.
    pub fn logs(&self) -> String {
        format!("{}\n{}", self.gateway.log_tail(), self.hub.log_tail())
    }
}

/// The next `sd_notify` message (`READY=1`, `WATCHDOG=1`, …) a process sent to the
/// datagram socket given to it as `NOTIFY_SOCKET`, or None after `timeout`.
pub fn next_notify(sock: &std::os::unix::net::UnixDatagram, timeout: Duration) -> Option<String> {
    sock.set_read_timeout(Some(timeout)).expect("read timeout");
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}
