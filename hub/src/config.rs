//! Hub configuration: TOML, typed, with defaults and checks that name the key and file.
//!
//! ```toml
//! [hub]
//! id = "hub-eu-1"
//! region = "eu-central"
//! listen = "0.0.0.0:7700"
//! data_dir = "/var/lib/voither-hub"
//! endpoints = ["hub-eu.example.net:7700", "hub-us.example.net:7700"]
//!
//! [tls]
//! ca = "pki/ca.pem"          # gateways' client certificates must chain to this
//! cert = "pki/hub.pem"
//! key = "pki/hub.key"
//!
//! [admin]
//! listen = "127.0.0.1:9200"
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

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
    /// The file is not valid TOML, or a key is unknown or of the wrong type.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, naming the key.
        message: String,
    },
    /// A value is out of range.
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

/// The whole hub configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Identity, listen address, state.
    #[serde(default)]
    pub hub: HubSection,
    /// TLS material.
    pub tls: TlsSection,
    /// Admin endpoint.
    #[serde(default)]
    pub admin: AdminSection,
    /// Sink.
    #[serde(default)]
    pub sink: SinkSection,
    /// Logging.
    #[serde(default)]
    pub log: LogSection,
    /// Signed workload manifests and artifacts served to gateways.
    #[serde(default)]
    pub workloads: WorkloadsSection,
    /// Which gateways may connect.
    #[serde(default)]
    pub auth: AuthSection,
}

/// `[auth]`: which gateways may connect, beyond holding a certificate from `tls.ca`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    /// Gateway ids allowed to connect (with `allowed_gateways_file`: both count). Both
    /// empty: any gateway with a certificate from the CA.
    #[serde(default)]
    pub allowed_gateways: Vec<String>,
    /// A file of allowed gateway ids, one per line; re-read when it changes.
    #[serde(default)]
    pub allowed_gateways_file: Option<PathBuf>,
    /// CA certificates (PEM files) of sites: a gateway whose certificate one of them
    /// issued is allowed, whatever its id. Combined with the id lists: allowed when any
    /// of them allows it. The issuing CAs must also chain to `tls.ca`.
    #[serde(default)]
    pub allowed_issuers: Vec<PathBuf>,
    /// A file of revoked gateway ids, one per line; re-read when it changes. A revoked
    /// gateway is refused at its next handshake and its live connection is closed.
    #[serde(default)]
    pub revoked_file: Option<PathBuf>,
}

/// `[workloads]`: where signed manifests and artifacts are.
///
/// A gateway gets `<dir>/<gateway-id>.signed` if it exists, else the file of the first
/// group (in `groups`) that lists it, `<dir>/<group>.signed`, else `<dir>/default.signed`.
/// Artifacts are any files in `<dir>/artifacts/`, found by their SHA-256.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadsSection {
    /// The folder (empty: no workloads are served).
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Gateway groups: group name → gateway ids.
    #[serde(default)]
    pub groups: std::collections::BTreeMap<String, Vec<String>>,
}

/// `[hub]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubSection {
    /// Id of this hub instance, reported to gateways.
    #[serde(default = "default_id")]
    pub id: String,
    /// Region served.
    #[serde(default = "default_region")]
    pub region: String,
    /// QUIC listen address.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// State folder (embedded sink).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Endpoint list of the failover plane handed to gateways (empty: none).
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Most gateway connections at once.
    #[serde(default = "default_max_conns")]
    pub max_connections: u32,
    /// Idle timeout of a gateway connection, milliseconds.
    #[serde(default = "default_idle")]
    pub idle_timeout_ms: u64,
    /// Asks every gateway to send at most this many bytes per second (0: no limit), for
    /// a region that must shed load; a gateway's own lower limit still applies.
    #[serde(default)]
    pub gateway_rate_limit_bytes_per_s: u64,
    /// QUIC flow-control window of a gateway's stream, bytes: how much a gateway may
    /// have sent that this hub has not read yet. It caps a gateway's throughput at
    /// window ÷ round trip, and this hub's buffer memory at connections × window (the
    /// connection window is twice it).
    #[serde(default = "default_stream_window")]
    pub stream_receive_window_bytes: u64,
}

impl Default for HubSection {
    fn default() -> Self {
        Self {
            id: default_id(),
            region: default_region(),
            listen: default_listen(),
            data_dir: default_data_dir(),
            endpoints: Vec::new(),
            max_connections: default_max_conns(),
            idle_timeout_ms: default_idle(),
            gateway_rate_limit_bytes_per_s: 0,
            stream_receive_window_bytes: default_stream_window(),
        }
    }
}

/// Above the uplink's default in-flight window (8 batches of 1,024 records, about
/// 2.5 MB), so that window, not QUIC flow control, paces a gateway on a long link.
const fn default_stream_window() -> u64 {
    4 * 1024 * 1024
}

fn default_id() -> String {
    "voither-hub".into()
}
fn default_region() -> String {
    "default".into()
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 7700))
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/voither-hub")
}
const fn default_max_conns() -> u32 {
    20_000
}
const fn default_idle() -> u64 {
    10_000
}

/// `[tls]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// CA bundle (PEM) that gateway certificates must chain to.
    pub ca: PathBuf,
    /// The hub's certificate chain (PEM).
    pub cert: PathBuf,
    /// The hub's private key (PEM).
    pub key: PathBuf,
}

/// `[admin]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Listen address of `/metrics`, `/healthz`, `/fleet`, `/export`.
    #[serde(default = "default_admin")]
    pub listen: SocketAddr,
    /// Serve `/export` (stored records) also when `listen` is not on loopback. Off by
    /// default: on the network, the admin endpoint serves no data records.
    #[serde(default)]
    pub export_on_network: bool,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self { listen: default_admin(), export_on_network: false }
    }
}

fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9200))
}

/// `[sink]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkSection {
    /// `embedded` (the default: a redb file in `hub.data_dir`, one per hub) or
    /// `postgres` (a shared database: any replica serves any gateway).
    #[serde(default = "default_kind")]
    pub kind: String,
    /// Page cache of the embedded sink, bytes.
    #[serde(default = "default_cache")]
    pub cache_bytes: usize,
    /// `postgres`: connection string, as a URL (`postgresql://voither@db:5432/voither`)
    /// or libpq key/values (`host=db port=5432 user=voither dbname=voither`).
    #[serde(default)]
    pub url: Option<String>,
    /// `postgres`: file holding the password (kept out of `url` and this file); read
    /// at start. Relative to the config file's folder.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// `postgres`: most connections this hub opens (commits of different gateways run
    /// on different connections at once).
    #[serde(default = "default_pool")]
    pub pool_size: usize,
    /// `postgres`: timeout of one connection attempt, ms.
    #[serde(default = "default_pg_connect")]
    pub connect_timeout_ms: u64,
}

impl Default for SinkSection {
    fn default() -> Self {
        Self {
            kind: default_kind(),
            cache_bytes: default_cache(),
            url: None,
            password_file: None,
            pool_size: default_pool(),
            connect_timeout_ms: default_pg_connect(),
        }
    }
}

const fn default_pool() -> usize {
    8
}
const fn default_pg_connect() -> u64 {
    5000
}

fn default_kind() -> String {
    "embedded".into()
}
const fn default_cache() -> usize {
    64 * 1024 * 1024
}

/// `[log]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// JSON lines instead of text.
    #[serde(default)]
    pub json: bool,
}

impl Config {
    /// Reads and checks `path`; relative paths are taken from the file's folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let mut cfg = Self::parse(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut paths = vec![&mut cfg.hub.data_dir, &mut cfg.tls.ca, &mut cfg.tls.cert, &mut cfg.tls.key];
        if let Some(d) = cfg.workloads.dir.as_mut() {
            paths.push(d);
        }
        if let Some(p) = cfg.auth.allowed_gateways_file.as_mut() {
            paths.push(p);
        }
        if let Some(p) = cfg.auth.revoked_file.as_mut() {
            paths.push(p);
        }
        if let Some(p) = cfg.sink.password_file.as_mut() {
            paths.push(p);
        }
        paths.extend(cfg.auth.allowed_issuers.iter_mut());
        for p in paths {
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
        let bad = |key: &str, message: String| ConfigError::Invalid { path: path.into(), key: key.into(), message };
        match cfg.sink.kind.as_str() {
            "embedded" => {
                if cfg.sink.url.is_some() {
                    return Err(bad(
                        "sink.url",
                        "is for kind = \"postgres\"; the embedded sink lives in hub.data_dir".into(),
                    ));
                }
            }
            "postgres" => {
                let Some(url) = &cfg.sink.url else {
                    return Err(bad("sink.url", "kind = \"postgres\" needs a connection string".into()));
                };
                if let Err(e) = crate::pg::parse_url(url) {
                    return Err(bad("sink.url", format!("not a PostgreSQL connection string: {e}")));
                }
                if cfg.sink.pool_size == 0 || cfg.sink.pool_size > 1024 {
                    return Err(bad("sink.pool_size", "must be 1 to 1024".into()));
                }
                if cfg.sink.connect_timeout_ms < 100 {
                    return Err(bad("sink.connect_timeout_ms", "must be at least 100".into()));
                }
            }
            other => {
                return Err(bad("sink.kind", format!("{other:?} is not a sink this hub has (embedded, postgres)")));
            }
        }
        if cfg.hub.id.is_empty() {
            return Err(bad("hub.id", "must not be empty".into()));
        }
        if cfg.hub.max_connections == 0 {
            return Err(bad("hub.max_connections", "must be at least 1".into()));
        }
        if cfg.hub.gateway_rate_limit_bytes_per_s != 0 && cfg.hub.gateway_rate_limit_bytes_per_s < 1024 {
            return Err(bad("hub.gateway_rate_limit_bytes_per_s", "must be 0 (no limit) or at least 1024".into()));
        }
        for g in cfg.workloads.groups.keys() {
            if !voither_proto::workload::valid_name(g) || g == "default" {
                return Err(bad(
                    &format!("workloads.groups.{g}"),
                    "a group name is 1 to 63 of A-Z a-z 0-9 - _, and not \"default\"".into(),
                ));
            }
        }
        if !(64 * 1024..=256 * 1024 * 1024).contains(&cfg.hub.stream_receive_window_bytes) {
            return Err(bad("hub.stream_receive_window_bytes", "must be 65536 (64 KiB) to 268435456 (256 MiB)".into()));
        }
        if cfg.hub.idle_timeout_ms < 500 {
            return Err(bad("hub.idle_timeout_ms", "must be at least 500".into()));
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_file_and_key() {
        let base = "[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n";
        assert!(Config::parse(base, Path::new("h.toml")).is_ok());
        let e = Config::parse(&format!("{base}[sink]\nkind = \"s3\"\n"), Path::new("h.toml")).unwrap_err().to_string();
        assert!(e.contains("sink.kind") && e.contains("h.toml"), "{e}");
        let e = Config::parse(&format!("{base}[sink]\nkind = \"postgres\"\n"), Path::new("h.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("sink.url"), "{e}");
        let e = Config::parse(
            &format!("{base}[sink]\nkind = \"postgres\"\nurl = \"host=db port=nope\"\n"),
            Path::new("h.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("sink.url") && e.contains("h.toml"), "{e}");
        let ok = format!("{base}[sink]\nkind = \"postgres\"\nurl = \"postgresql://voither@db:5432/voither\"\n");
        assert!(Config::parse(&ok, Path::new("h.toml")).is_ok());
        let e =
            Config::parse(&format!("{base}[sink]\nurl = \"host=db\"\n"), Path::new("h.toml")).unwrap_err().to_string();
        assert!(e.contains("sink.url") && e.contains("embedded"), "{e}");
        let e =
            Config::parse(&format!("{base}[hub]\nlisten = \"nope\"\n"), Path::new("h.toml")).unwrap_err().to_string();
        assert!(e.contains("listen"), "{e}");
        let e = Config::parse(&format!("[hub]\nstream_receive_window_bytes = 1000\n{base}"), Path::new("h.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("hub.stream_receive_window_bytes"), "{e}");
        let e = Config::parse("[hub]\nid = \"x\"\n", Path::new("h.toml")).unwrap_err().to_string();
        assert!(e.contains("tls"), "{e}");
    }
}
