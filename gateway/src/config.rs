//! Gateway configuration: a TOML file, typed, with defaults and checks that name the
//! key and the file.
//!
//! ```toml
//! [gateway]
//! data_dir = "/var/lib/voither-gateway"
//!
//! [mqtt]
//! host = "127.0.0.1"
//! port = 1883
//! client_id = "voither-gateway"
//!
//! [broker]            # the embedded broker (feature `embedded-broker`), off by default
//! enabled = true
//! listen = "127.0.0.1:1883"
//!
//! [[lanes]]
//! name = "alarms"
//! priority = 0
//! topics = ["alarms/#"]
//!
//! [[lanes]]
//! name = "telemetry"
//! priority = 1
//! topics = ["devices/#"]
//!
//! [uplink]
//! endpoints = ["127.0.0.1:7700"]
//! server_name = "voither-hub"
//! ca = "pki/ca.pem"
//! cert = "pki/gateway-1.pem"
//! key = "pki/gateway-1.key"
//!
//! [admin]
//! listen = "127.0.0.1:9100"
//!
//! [[sensors]]         # read by the gateway itself (feature `sensors`)
//! name = "sensor/room-1"
//! kind = "sht3x"
//! bus = "/dev/i2c-1"
//! lane = "telemetry"
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Most bytes one ingest batch may take (`mqtt.batch_max_messages` ×
/// (`mqtt.max_payload_bytes` + 1 KiB)): one batch is one store entry.
pub const MAX_BATCH_BYTES: u64 = 256 << 20;

/// Largest `mqtt.max_payload_bytes`: a record must fit a sync frame with room to spare.
pub const MAX_PAYLOAD_LIMIT: usize = voither_proto::MAX_FRAME_LEN / 4;

/// A configuration that could not be loaded; the message names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has a key of the wrong type or an unknown key.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, naming the key.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid config file {path}: key `{key}`: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The dotted key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// The whole gateway configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Identity and local state.
    #[serde(default)]
    pub gateway: GatewaySection,
    /// MQTT ingest.
    #[serde(default)]
    pub mqtt: MqttSection,
    /// The embedded MQTT broker.
    #[serde(default)]
    pub broker: BrokerSection,
    /// Local store.
    #[serde(default)]
    pub store: StoreSection,
    /// Lanes: priority classes that topics map to.
    #[serde(default = "default_lanes")]
    pub lanes: Vec<LaneConfig>,
    /// Sync to the hub.
    pub uplink: UplinkSection,
    /// Admin HTTP endpoint.
    #[serde(default)]
    pub admin: AdminSection,
    /// Logging.
    #[serde(default)]
    pub log: LogSection,
    /// Sensors on the gateway's own I²C buses, polled by the gateway (cargo feature
    /// `sensors`). Parsed and checked in every build, so one file serves every build;
    /// a build without the feature refuses to run with sensors configured.
    #[serde(default)]
    pub sensors: Vec<SensorConfig>,
    /// Signed workloads the gateway runs and keeps running offline.
    #[serde(default)]
    pub workloads: WorkloadsSection,
}

/// A secret from the config: `Debug` prints `***`, so it never reaches a log line.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

/// `[workloads]`: signed manifests, cached and run by the gateway.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadsSection {
    /// Ed25519 public keys (base64 of the 32 bytes) whose manifests are trusted. Empty:
    /// no manifest is accepted and nothing runs.
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// `process` (child processes supervised by the gateway) or `static-pod` (manifests
    /// written into the kubelet's static pod folder on k3s nodes).
    #[serde(default)]
    pub runtime: WorkloadRuntime,
    /// The kubelet's static pod folder (runtime `static-pod`).
    #[serde(default = "default_static_pod_dir")]
    pub static_pod_dir: PathBuf,
    /// Lane that receives the workloads' output lines (runtime `process`).
    #[serde(default = "default_logs_lane")]
    pub logs_lane: String,
    /// Between SIGTERM and SIGKILL when a workload is stopped, milliseconds.
    #[serde(default = "default_stop_grace")]
    pub stop_grace_ms: u64,
    /// Longer output lines are cut to this many bytes.
    #[serde(default = "default_max_line")]
    pub max_line_bytes: usize,
}

impl Default for WorkloadsSection {
    fn default() -> Self {
        Self {
            trusted_keys: Vec::new(),
            runtime: WorkloadRuntime::default(),
            static_pod_dir: default_static_pod_dir(),
            logs_lane: default_logs_lane(),
            stop_grace_ms: default_stop_grace(),
            max_line_bytes: default_max_line(),
        }
    }
}

/// Where workloads run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadRuntime {
    /// Child processes of the gateway.
    #[default]
    Process,
    /// Static pods of the node's kubelet (k3s).
    StaticPod,
}

fn default_static_pod_dir() -> PathBuf {
    PathBuf::from("/var/lib/rancher/k3s/agent/pod-manifests")
}
fn default_logs_lane() -> String {
    "logs".into()
}
const fn default_stop_grace() -> u64 {
    10_000
}
const fn default_max_line() -> usize {
    4096
}

impl WorkloadsSection {
    /// The pinned keys, decoded (checked at parse time).
    pub fn keys(&self) -> Vec<[u8; 32]> {
        self.trusted_keys.iter().filter_map(|k| decode_key(k).ok()).collect()
    }
}

fn decode_key(k: &str) -> Result<[u8; 32], String> {
    use base64::Engine;
    let b = base64::engine::general_purpose::STANDARD.decode(k.trim()).map_err(|e| format!("not base64: {e}"))?;
    <[u8; 32]>::try_from(b.as_slice()).map_err(|_| format!("{} bytes, an Ed25519 public key has 32", b.len()))
}

/// `[gateway]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    /// Folder for the store and other state.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
}

impl Default for GatewaySection {
    fn default() -> Self {
        Self { data_dir: default_data_dir() }
    }
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/voither-gateway")
}

/// `[mqtt]`: the broker the ingest client subscribes to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSection {
    /// Broker host.
    #[serde(default = "default_mqtt_host")]
    pub host: String,
    /// Broker port.
    #[serde(default = "default_mqtt_port")]
    pub port: u16,
    /// Fixed client id: the persistent session is keyed by it.
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// Largest payload accepted, bytes; larger messages are refused by the client.
    #[serde(default = "default_max_payload")]
    pub max_payload_bytes: usize,
    /// Keep-alive, seconds.
    #[serde(default = "default_keep_alive")]
    pub keep_alive_s: u64,
    /// Most messages in one durable commit.
    #[serde(default = "default_batch_max")]
    pub batch_max_messages: usize,
    /// Longest a message waits for its commit to fill up, milliseconds.
    #[serde(default = "default_batch_ms")]
    pub batch_max_delay_ms: u64,
    /// Optional user name.
    #[serde(default)]
    pub username: Option<String>,
    /// Optional password (never printed: its `Debug` is `***`).
    #[serde(default)]
    pub password: Option<Secret>,
}

impl Default for MqttSection {
    fn default() -> Self {
        Self {
            host: default_mqtt_host(),
            port: default_mqtt_port(),
            client_id: default_client_id(),
            max_payload_bytes: default_max_payload(),
            keep_alive_s: default_keep_alive(),
            batch_max_messages: default_batch_max(),
            batch_max_delay_ms: default_batch_ms(),
            username: None,
            password: None,
        }
    }
}

fn default_mqtt_host() -> String {
    "127.0.0.1".into()
}
const fn default_mqtt_port() -> u16 {
    1883
}
fn default_client_id() -> String {
    "voither-gateway".into()
}
const fn default_max_payload() -> usize {
    256 * 1024
}
const fn default_keep_alive() -> u64 {
    15
}
const fn default_batch_max() -> usize {
    512
}
const fn default_batch_ms() -> u64 {
    5
}

/// `[broker]`: the broker inside the agent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSection {
    /// Start the embedded broker.
    #[serde(default)]
    pub enabled: bool,
    /// Address it listens on.
    #[serde(default = "default_broker_listen")]
    pub listen: SocketAddr,
}

impl Default for BrokerSection {
    fn default() -> Self {
        Self { enabled: false, listen: default_broker_listen() }
    }
}

fn default_broker_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 1883))
}

/// `[store]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// Size at which the store starts a new segment file, bytes. Space comes back a
    /// segment at a time once every record in it is acknowledged.
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: u64,
    /// No longer used (the store of earlier versions had a page cache); accepted so
    /// existing files still load, with a warning at start.
    #[serde(default)]
    pub cache_bytes: Option<usize>,
    /// Most bytes of records held over all lanes (default: the sum of lane budgets).
    #[serde(default)]
    pub max_bytes: Option<u64>,
    /// What to do with a store file that is corrupt at start.
    #[serde(default)]
    pub on_corrupt: OnCorrupt,
}

impl Default for StoreSection {
    fn default() -> Self {
        Self {
            segment_bytes: default_segment_bytes(),
            cache_bytes: None,
            max_bytes: None,
            on_corrupt: OnCorrupt::default(),
        }
    }
}

/// `store.on_corrupt`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnCorrupt {
    /// Rename the store folder to `store.corrupt-<unix seconds>` (never delete it) and
    /// start with a fresh store.
    #[default]
    MoveAside,
    /// Refuse to start, naming the file and the problem.
    Refuse,
}

const fn default_segment_bytes() -> u64 {
    crate::store::DEFAULT_SEGMENT_BYTES
}

/// `[[lanes]]`: one priority class.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaneConfig {
    /// Lane name (letters, digits, `-`, `_`).
    pub name: String,
    /// Lower is sent first.
    #[serde(default = "default_priority")]
    pub priority: u8,
    /// MQTT topic filters whose messages go to this lane.
    #[serde(default)]
    pub topics: Vec<String>,
    /// Byte budget of the records the lane holds.
    #[serde(default = "default_lane_bytes")]
    pub max_bytes: u64,
    /// Records older than this many seconds are evicted (a counted gap); unset: kept
    /// until a hub acknowledges them.
    #[serde(default)]
    pub ttl_s: Option<u64>,
    /// `drop_oldest` (evict the oldest, counted and reported as a gap) or
    /// `backpressure` (stop acking the broker until space frees).
    #[serde(default)]
    pub full_policy: crate::store::FullPolicy,
}

const fn default_priority() -> u8 {
    5
}

const fn default_lane_bytes() -> u64 {
    256 * 1024 * 1024
}

fn default_lanes() -> Vec<LaneConfig> {
    vec![LaneConfig {
        name: "telemetry".into(),
        priority: 1,
        topics: vec!["#".into()],
        max_bytes: default_lane_bytes(),
        ttl_s: None,
        full_policy: Default::default(),
    }]
}

/// `[uplink]`: the hubs and the gateway's identity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkSection {
    /// Hub endpoints, `host:port`, in order of preference.
    pub endpoints: Vec<String>,
    /// Name the hub's certificate must carry.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// CA bundle (PEM) the hub's certificate must chain to.
    pub ca: PathBuf,
    /// This gateway's certificate chain (PEM).
    pub cert: PathBuf,
    /// This gateway's private key (PEM).
    pub key: PathBuf,
    /// QUIC keep-alive interval, milliseconds.
    #[serde(default = "default_keep_alive_ms")]
    pub keep_alive_ms: u64,
    /// Connection is dead after this long without a packet, milliseconds.
    #[serde(default = "default_idle_ms")]
    pub idle_timeout_ms: u64,
    /// Give up a connection attempt after this long, milliseconds.
    #[serde(default = "default_connect_ms")]
    pub connect_timeout_ms: u64,
    /// Batches in flight per lane.
    #[serde(default = "default_window")]
    pub window_batches: usize,
    /// Most records per batch.
    #[serde(default = "default_batch_records")]
    pub batch_records: usize,
    /// Reconnect backoff floor, milliseconds.
    #[serde(default = "default_backoff_min")]
    pub backoff_min_ms: u64,
    /// Reconnect backoff ceiling, milliseconds.
    #[serde(default = "default_backoff_max")]
    pub backoff_max_ms: u64,
    /// While on a lower endpoint, probe the first one this often, milliseconds.
    #[serde(default = "default_probe")]
    pub probe_interval_ms: u64,
    /// Fail back once the first endpoint answered probes for this long, milliseconds.
    #[serde(default = "default_failback")]
    pub failback_after_ms: u64,
    /// The endpoint is unhealthy when batches are in flight and no ack came for this
    /// long, milliseconds: the gateway fails over to the next endpoint.
    #[serde(default = "default_ack_progress")]
    pub ack_progress_timeout_ms: u64,
    /// Most bytes per second written to the hub (metered links); 0 means no limit. A hub
    /// can ask for less with a slow-down command, never for more.
    #[serde(default)]
    pub rate_limit_bytes_per_s: u64,
}

const fn default_ack_progress() -> u64 {
    20_000
}

const fn default_probe() -> u64 {
    5_000
}
const fn default_failback() -> u64 {
    30_000
}

fn default_server_name() -> String {
    "voither-hub".into()
}
const fn default_keep_alive_ms() -> u64 {
    1_000
}
const fn default_idle_ms() -> u64 {
    5_000
}
const fn default_connect_ms() -> u64 {
    5_000
}
const fn default_window() -> usize {
    8
}
const fn default_batch_records() -> usize {
    1024
}
const fn default_backoff_min() -> u64 {
    200
}
const fn default_backoff_max() -> u64 {
    30_000
}

/// `[admin]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Listen address of `/metrics`, `/healthz`, `/readyz`, `/status`.
    #[serde(default = "default_admin")]
    pub listen: SocketAddr,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self { listen: default_admin() }
    }
}

fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9100))
}

/// `[log]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// Emit JSON lines instead of text.
    #[serde(default)]
    pub json: bool,
}

/// `[[sensors]]`: one sensor on an I²C bus of the gateway itself.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensorConfig {
    /// Sensor id, unique: the `source` of its records (e.g. `sensor/room-1`); its hash
    /// is the frame's `device_id`.
    pub name: String,
    /// Which driver reads it.
    pub kind: SensorKind,
    /// The I²C bus device, an absolute path such as `/dev/i2c-1`.
    pub bus: PathBuf,
    /// 7-bit I²C address; default per kind ([`SensorKind::default_address`]).
    #[serde(default)]
    pub address: Option<u8>,
    /// Time between two readings, milliseconds.
    #[serde(default = "default_sensor_period")]
    pub period_ms: u64,
    /// The lane its records go to; must be a configured lane.
    pub lane: String,
}

impl SensorConfig {
    /// The configured address, or the kind's default.
    pub fn address(&self) -> u8 {
        self.address.unwrap_or_else(|| self.kind.default_address())
    }

    /// Time between two readings.
    pub fn period(&self) -> Duration {
        Duration::from_millis(self.period_ms)
    }
}

/// `sensors[].kind`: the supported sensor chips.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SensorKind {
    /// Sensirion SHT30/SHT31/SHT35: temperature and relative humidity.
    Sht3x,
    /// Bosch BME280: temperature, pressure and relative humidity.
    Bme280,
}

impl SensorKind {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            SensorKind::Sht3x => "sht3x",
            SensorKind::Bme280 => "bme280",
        }
    }

    /// The addresses the chip can answer on (set by a pin); the first is the default.
    pub fn addresses(self) -> [u8; 2] {
        match self {
            SensorKind::Sht3x => [0x44, 0x45],
            SensorKind::Bme280 => [0x76, 0x77],
        }
    }

    /// The address used when `address` is not set: 0x44 (SHT3x), 0x76 (BME280).
    pub fn default_address(self) -> u8 {
        self.addresses()[0]
    }
}

const fn default_sensor_period() -> u64 {
    10_000
}

/// Shortest `sensors[].period_ms`.
pub const MIN_SENSOR_PERIOD_MS: u64 = 100;
/// Longest `sensors[].period_ms`: one day.
pub const MAX_SENSOR_PERIOD_MS: u64 = 86_400_000;

/// Source of environment overrides; tests pass a map instead of touching the process.
pub trait Env {
    /// The value of `key`, if set.
    fn get(&self, key: &str) -> Option<String>;
}

/// The real process environment.
#[derive(Debug, Clone, Copy)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl Env for HashMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

impl UplinkSection {
    /// Keep-alive interval.
    pub fn keep_alive(&self) -> Duration {
        Duration::from_millis(self.keep_alive_ms)
    }
    /// Idle timeout.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
    /// Connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
}

impl Config {
    /// Reads, parses and checks `path`, then applies `VOITHER_GATEWAY_*` overrides from `env`.
    ///
    /// Relative paths in the file are taken relative to the file's folder.
    pub fn load(path: &Path, env: &dyn Env) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let mut cfg = Self::parse(&text, path)?;
        if let Some(v) = env.get("VOITHER_GATEWAY_DATA_DIR") {
            cfg.gateway.data_dir = PathBuf::from(v);
        }
        if let Some(v) = env.get("VOITHER_GATEWAY_ADMIN_LISTEN") {
            cfg.admin.listen = v.parse().map_err(|e| ConfigError::Invalid {
                path: path.into(),
                key: "VOITHER_GATEWAY_ADMIN_LISTEN".into(),
                message: format!("{e}"),
            })?;
        }
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut cfg.gateway.data_dir,
            &mut cfg.uplink.ca,
            &mut cfg.uplink.cert,
            &mut cfg.uplink.key,
            &mut cfg.workloads.static_pod_dir,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(cfg)
    }

    /// Parses and checks TOML text; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Invalid { path: path.into(), key: key.into(), message };
        let w = &self.workloads;
        for (i, k) in w.trusted_keys.iter().enumerate() {
            decode_key(k).map_err(|m| bad(&format!("workloads.trusted_keys[{i}]"), m))?;
        }
        if !w.trusted_keys.is_empty()
            && w.runtime == WorkloadRuntime::Process
            && !self.lanes.iter().any(|l| l.name == w.logs_lane)
        {
            let names: Vec<&str> = self.lanes.iter().map(|l| l.name.as_str()).collect();
            return Err(bad(
                "workloads.logs_lane",
                format!(
                    "{:?} is not a configured lane (lanes: {}); add a [[lanes]] for workload output",
                    w.logs_lane,
                    names.join(", ")
                ),
            ));
        }
        if !(64..=65_536).contains(&w.max_line_bytes) {
            return Err(bad("workloads.max_line_bytes", "must be between 64 and 65536".into()));
        }
        if w.stop_grace_ms > 600_000 {
            return Err(bad("workloads.stop_grace_ms", "must be at most 600000 (10 minutes)".into()));
        }
        if self.lanes.is_empty() {
            return Err(bad("lanes", "at least one lane is needed".into()));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, lane) in self.lanes.iter().enumerate() {
            if lane.name.is_empty()
                || lane.name.len() > 64
                || !lane.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(bad(
                    &format!("lanes[{i}].name"),
                    format!("{:?} must be 1 to 64 letters, digits, '-' or '_'", lane.name),
                ));
            }
            if !seen.insert(&lane.name) {
                return Err(bad(&format!("lanes[{i}].name"), format!("lane {:?} is defined twice", lane.name)));
            }
            let min = self.mqtt.max_payload_bytes as u64 + 4096;
            if lane.max_bytes < min {
                return Err(bad(
                    &format!("lanes[{i}].max_bytes"),
                    format!("{} is smaller than one record of mqtt.max_payload_bytes ({min} bytes)", lane.max_bytes),
                ));
            }
            if lane.ttl_s == Some(0) {
                return Err(bad(&format!("lanes[{i}].ttl_s"), "must be at least 1 (leave it out for no TTL)".into()));
            }
            for (j, t) in lane.topics.iter().enumerate() {
                if let Err(m) = check_filter(t) {
                    return Err(bad(&format!("lanes[{i}].topics[{j}]"), format!("{t:?}: {m}")));
                }
            }
        }
        if self.uplink.endpoints.is_empty() {
            return Err(bad("uplink.endpoints", "at least one hub endpoint is needed".into()));
        }
        for (i, e) in self.uplink.endpoints.iter().enumerate() {
            if e.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_none() {
                return Err(bad(&format!("uplink.endpoints[{i}]"), format!("{e:?} is not host:port")));
            }
        }
        if self.mqtt.max_payload_bytes == 0 || self.mqtt.max_payload_bytes > MAX_PAYLOAD_LIMIT {
            return Err(bad(
                "mqtt.max_payload_bytes",
                format!("must be between 1 and {MAX_PAYLOAD_LIMIT} (1 MiB, a quarter of the sync frame limit)"),
            ));
        }
        if self.mqtt.keep_alive_s < 5 {
            return Err(bad("mqtt.keep_alive_s", "must be at least 5".into()));
        }
        if self.mqtt.username.is_some() != self.mqtt.password.is_some() {
            return Err(bad("mqtt.password", "mqtt.username and mqtt.password must be set together".into()));
        }
        if self.mqtt.batch_max_messages == 0 || self.mqtt.batch_max_messages > 65_535 {
            return Err(bad("mqtt.batch_max_messages", "must be between 1 and 65535".into()));
        }
        // One batch is one store entry; with 1 KiB for topic and framing per message it
        // must stay within the store's entry limit.
        let batch_bytes = self.mqtt.batch_max_messages as u64 * (self.mqtt.max_payload_bytes as u64 + 1024);
        if batch_bytes > MAX_BATCH_BYTES {
            return Err(bad(
                "mqtt.batch_max_messages",
                format!(
                    "{} messages of up to mqtt.max_payload_bytes ({}) can take {batch_bytes} bytes, over the store's \
                     {MAX_BATCH_BYTES}-byte (256 MiB) limit for one batch",
                    self.mqtt.batch_max_messages, self.mqtt.max_payload_bytes
                ),
            ));
        }
        if self.uplink.window_batches == 0 || self.uplink.window_batches > 1024 {
            return Err(bad("uplink.window_batches", "must be between 1 and 1024".into()));
        }
        if self.uplink.batch_records == 0 || self.uplink.batch_records > 65_536 {
            return Err(bad("uplink.batch_records", "must be between 1 and 65536".into()));
        }
        if self.uplink.idle_timeout_ms <= self.uplink.keep_alive_ms {
            return Err(bad("uplink.idle_timeout_ms", "must be larger than uplink.keep_alive_ms".into()));
        }
        if self.uplink.ack_progress_timeout_ms < 1_000 {
            return Err(bad("uplink.ack_progress_timeout_ms", "must be at least 1000".into()));
        }
        if self.uplink.rate_limit_bytes_per_s != 0 && self.uplink.rate_limit_bytes_per_s < 1024 {
            return Err(bad("uplink.rate_limit_bytes_per_s", "must be 0 (no limit) or at least 1024".into()));
        }
        if self.uplink.backoff_min_ms == 0 || self.uplink.backoff_min_ms > self.uplink.backoff_max_ms {
            return Err(bad("uplink.backoff_min_ms", "must be at least 1 and at most uplink.backoff_max_ms".into()));
        }
        if let Some(total) = self.store.max_bytes {
            let min = self.mqtt.max_payload_bytes as u64 + 4096;
            if total < min {
                return Err(bad("store.max_bytes", format!("{total} is smaller than one record ({min} bytes)")));
            }
        }
        if self.uplink.probe_interval_ms < 100 {
            return Err(bad("uplink.probe_interval_ms", "must be at least 100".into()));
        }
        if !(64 << 10..=1 << 30).contains(&self.store.segment_bytes) {
            return Err(bad("store.segment_bytes", "must be between 65536 (64 KiB) and 1073741824 (1 GiB)".into()));
        }
        self.validate_sensors().map_err(|(key, message)| bad(&key, message))
    }

    /// Checks `[[sensors]]`; the error is the key and what is wrong.
    fn validate_sensors(&self) -> Result<(), (String, String)> {
        for (i, s) in self.sensors.iter().enumerate() {
            let key = |field: &str| format!("sensors[{i}].{field}");
            if s.name.is_empty() || s.name.len() > 128 || s.name.chars().any(char::is_control) {
                return Err((
                    key("name"),
                    format!("{:?} must be 1 to 128 characters, none a control character", s.name),
                ));
            }
            if let Some(j) = self.sensors[..i].iter().position(|o| o.name == s.name) {
                return Err((key("name"), format!("{:?} is already the name of sensors[{j}]", s.name)));
            }
            if !s.bus.is_absolute() {
                return Err((
                    key("bus"),
                    format!("{:?} must be an absolute device path such as \"/dev/i2c-1\"", s.bus),
                ));
            }
            let addr = s.address();
            let [a, b] = s.kind.addresses();
            if addr != a && addr != b {
                return Err((
                    key("address"),
                    format!("{addr:#04x} is not an address of a {} ({a:#04x} or {b:#04x})", s.kind.as_str()),
                ));
            }
            if let Some(j) = self.sensors[..i].iter().position(|o| o.bus == s.bus && o.address() == addr) {
                return Err((
                    key("address"),
                    format!("sensors[{j}] already reads address {addr:#04x} on {}", s.bus.display()),
                ));
            }
            if !(MIN_SENSOR_PERIOD_MS..=MAX_SENSOR_PERIOD_MS).contains(&s.period_ms) {
                return Err((
                    key("period_ms"),
                    format!("must be between {MIN_SENSOR_PERIOD_MS} and {MAX_SENSOR_PERIOD_MS} (one day)"),
                ));
            }
            if !self.lanes.iter().any(|l| l.name == s.lane) {
                let names: Vec<&str> = self.lanes.iter().map(|l| l.name.as_str()).collect();
                return Err((
                    key("lane"),
                    format!("{:?} is not a configured lane (lanes: {})", s.lane, names.join(", ")),
                ));
            }
        }
        Ok(())
    }

    /// The store's total budget: `store.max_bytes`, or the sum of the lane budgets.
    pub fn store_max_bytes(&self) -> u64 {
        self.store.max_bytes.unwrap_or_else(|| self.lanes.iter().map(|l| l.max_bytes).sum())
    }

    /// Lane limits for the store.
    pub fn lane_specs(&self) -> Vec<crate::store::LaneSpec> {
        self.lanes
            .iter()
            .map(|l| crate::store::LaneSpec {
                name: l.name.clone(),
                priority: l.priority,
                max_bytes: l.max_bytes,
                ttl_ms: l.ttl_s.map(|s| s.saturating_mul(1000)),
                policy: l.full_policy,
            })
            .collect()
    }

    /// The lane a topic maps to: the first lane with a matching filter.
    pub fn lane_for(&self, topic: &str) -> Option<&LaneConfig> {
        self.lanes.iter().find(|l| l.topics.iter().any(|f| topic_matches(f, topic)))
    }
}

/// True when every topic that `a` matches is also matched by `b`.
pub fn filter_covers(b: &str, a: &str) -> bool {
    let mut bi = b.split('/');
    let mut ai = a.split('/');
    loop {
        match (bi.next(), ai.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(x)) if x != "#" => {}
            (Some(x), Some(y)) if x == y && x != "+" && x != "#" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

impl Config {
    /// The filters to subscribe to: every lane filter, less those another one covers.
    ///
    /// Brokers may deliver a message once per matching subscription; subscribing to
    /// `devices/#` and `devices/+/alarm` would store every alarm twice. Routing to a
    /// lane is done by the agent (first lane whose filter matches), so the covering
    /// filter alone is enough.
    pub fn subscriptions(&self) -> Vec<String> {
        let all: Vec<&String> = self.lanes.iter().flat_map(|l| l.topics.iter()).collect();
        let mut out: Vec<String> = Vec::new();
        for (i, f) in all.iter().enumerate() {
            let covered =
                all.iter().enumerate().any(|(j, g)| j != i && filter_covers(g, f) && (!filter_covers(f, g) || j < i));
            if !covered && !out.contains(f) {
                out.push((*f).clone());
            }
        }
        out
    }
}

fn check_filter(f: &str) -> Result<(), &'static str> {
    if f.is_empty() {
        return Err("empty topic filter");
    }
    let levels: Vec<&str> = f.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        if l.contains('#') && (*l != "#" || i != levels.len() - 1) {
            return Err("'#' must be a whole level and the last one");
        }
        if l.contains('+') && *l != "+" {
            return Err("'+' must be a whole level");
        }
    }
    Ok(())
}

/// MQTT topic filter matching (`+` one level, `#` the rest).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[uplink]
endpoints = ["127.0.0.1:7700"]
ca = "ca.pem"
cert = "gw.pem"
key = "gw.key"
"#;

    #[test]
    fn minimal_config_has_defaults() {
        let c = Config::parse(MIN, Path::new("g.toml")).unwrap();
        assert_eq!(c.lanes.len(), 1);
        assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9100");
        assert!(!c.broker.enabled);
        assert_eq!(c.mqtt.client_id, "voither-gateway");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse(&format!("{MIN}\n[admin]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n"), Path::new("g.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("g.toml") && err.contains("lisen"), "{err}");
    }

    #[test]
    fn secrets_are_not_printed() {
        let c =
            Config::parse(&format!("[mqtt]\nusername = \"gw\"\npassword = \"hunter2\"\n{MIN}"), Path::new("g.toml"))
                .unwrap();
        assert_eq!(c.mqtt.password.as_ref().map(Secret::expose), Some("hunter2"));
        let printed = format!("{c:?}");
        assert!(!printed.contains("hunter2") && printed.contains("***"), "{printed}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases = [
            ("[[lanes]]\nname = \"a b\"\n", "lanes[0].name"),
            ("[[lanes]]\nname = \"a\"\ntopics = [\"x/#/y\"]\n", "lanes[0].topics[0]"),
            ("[[lanes]]\nname = \"a\"\n[[lanes]]\nname = \"a\"\n", "lanes[1].name"),
            ("[mqtt]\nmax_payload_bytes = 0\n", "mqtt.max_payload_bytes"),
            ("[workloads]\ntrusted_keys = [\"bm90IGEga2V5\"]\n", "workloads.trusted_keys[0]"),
            ("[workloads]\ntrusted_keys = [\"%%%\"]\n", "workloads.trusted_keys[0]"),
            // 32 zero bytes is a well-formed key; then the logs lane must exist.
            ("[workloads]\ntrusted_keys = [\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"]\n", "workloads.logs_lane"),
            ("[workloads]\nmax_line_bytes = 1\n", "workloads.max_line_bytes"),
            ("[workloads]\nruntime = \"docker\"\n", "runtime"),
            ("[store]\nsegment_bytes = 1000\n", "store.segment_bytes"),
            ("[mqtt]\nmax_payload_bytes = 1048576\nbatch_max_messages = 512\n", "mqtt.batch_max_messages"),
            ("[store]\nsegment_bytes = 2000000000\n", "store.segment_bytes"),
        ];
        for (extra, key) in cases {
            let err = Config::parse(&format!("{extra}{MIN}"), Path::new("g.toml")).unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
        let err = Config::parse(&MIN.replace("127.0.0.1:7700", "nohost"), Path::new("g.toml")).unwrap_err();
        assert!(err.to_string().contains("uplink.endpoints[0]"), "{err}");
    }

    #[test]
    fn store_cache_bytes_of_earlier_versions_still_loads() {
        let c = Config::parse(&format!("[store]\ncache_bytes = 4194304\n{MIN}"), Path::new("g.toml")).unwrap();
        assert_eq!(
            (c.store.cache_bytes, c.store.segment_bytes),
            (Some(4_194_304), crate::store::DEFAULT_SEGMENT_BYTES)
        );
    }

    #[test]
    fn env_overrides_come_from_the_given_map() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.toml");
        std::fs::write(&p, MIN).unwrap();
        let env: HashMap<String, String> =
            [("VOITHER_GATEWAY_ADMIN_LISTEN".to_string(), "127.0.0.1:9999".to_string())].into();
        let c = Config::load(&p, &env).unwrap();
        assert_eq!(c.admin.listen.port(), 9999);
        assert_eq!(c.uplink.ca, dir.path().join("ca.pem"), "relative paths are taken from the file's folder");
    }

    #[test]
    fn covered_filters_are_not_subscribed_twice() {
        let c = Config::parse(
            &format!(
                "[[lanes]]\nname = \"a\"\ntopics = [\"devices/+/alarm\", \"x/y\"]\n[[lanes]]\nname = \"t\"\ntopics = [\"devices/#\", \"x/+\", \"x/+\"]\n{MIN}"
            ),
            Path::new("g.toml"),
        )
        .unwrap();
        assert_eq!(c.subscriptions(), vec!["devices/#".to_string(), "x/+".to_string()]);
        assert_eq!(c.lane_for("devices/1/alarm").unwrap().name, "a");
        assert!(filter_covers("+/+", "a/b") && !filter_covers("a/b", "+/+") && !filter_covers("a/+", "a/#"));
    }

    #[test]
    fn sensors_parse_with_defaults() {
        let c = Config::parse(
            &format!(
                "{MIN}\n[[sensors]]\nname = \"sensor/room-1\"\nkind = \"sht3x\"\nbus = \"/dev/i2c-1\"\nlane = \"telemetry\"\n\
                 [[sensors]]\nname = \"sensor/room-2\"\nkind = \"bme280\"\nbus = \"/dev/i2c-1\"\naddress = 0x77\n\
                 period_ms = 500\nlane = \"telemetry\"\n"
            ),
            Path::new("g.toml"),
        )
        .unwrap();
        assert_eq!(c.sensors.len(), 2);
        let (a, b) = (&c.sensors[0], &c.sensors[1]);
        assert_eq!((a.kind, a.address(), a.period_ms), (SensorKind::Sht3x, 0x44, 10_000));
        assert_eq!((b.kind, b.address(), b.period()), (SensorKind::Bme280, 0x77, Duration::from_millis(500)));
        assert_eq!(a.bus, PathBuf::from("/dev/i2c-1"));
        assert!(Config::parse(MIN, Path::new("g.toml")).unwrap().sensors.is_empty());
    }

    #[test]
    fn bad_sensors_name_the_key() {
        let sensor = |extra: &str| {
            format!("[[sensors]]\nname = \"s1\"\nkind = \"sht3x\"\nbus = \"/dev/i2c-1\"\nlane = \"telemetry\"\n{extra}")
        };
        let cases = [
            (sensor("").replace("\"s1\"", "\"\""), "sensors[0].name"),
            (sensor("").replace("\"telemetry\"", "\"nope\""), "sensors[0].lane"),
            (sensor("").replace("/dev/i2c-1", "i2c-1"), "sensors[0].bus"),
            (sensor("address = 0x76\n"), "sensors[0].address"),
            (sensor("period_ms = 99\n"), "sensors[0].period_ms"),
            (sensor("period_ms = 86400001\n"), "sensors[0].period_ms"),
            (format!("{}{}", sensor(""), sensor("address = 0x45\n")), "sensors[1].name"),
            (format!("{}{}", sensor(""), sensor("").replace("\"s1\"", "\"s2\"")), "sensors[1].address"),
            (sensor("").replace("sht3x", "dht22"), "expected `sht3x` or `bme280`"),
            (sensor("colour = 1\n"), "colour"),
        ];
        for (extra, key) in cases {
            let err = Config::parse(&format!("{MIN}\n{extra}"), Path::new("g.toml")).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains("g.toml"), "{key}: {err}");
        }
    }

    #[test]
    fn topic_matching() {
        assert!(topic_matches("a/#", "a/b/c"));
        assert!(topic_matches("a/+/c", "a/b/c"));
        assert!(!topic_matches("a/+/c", "a/b/d"));
        assert!(topic_matches("#", "x"));
        assert!(!topic_matches("a/b", "a/b/c"));
    }
}
