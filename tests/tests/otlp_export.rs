//! Built with the cargo feature `otlp` and given `OTEL_EXPORTER_OTLP_ENDPOINT`, the gateway
//! exports a `sync_batch` span per batch (sent until the hub acked it durable) and the hub
//! a `sink_commit` span per sink commit, over OTLP/HTTP JSON to `<endpoint>/v1/traces`;
//! a build without the feature says in its log that it exports nothing.
//!
//! The feature binaries come from `VOITHER_OTLP_BIN_DIR` when it is set. Otherwise the
//! test builds them itself in the same target folder (`cargo build --workspace --bins
//! --features voither-gateway/otlp,voither-hub/otlp`: only the telemetry, gateway and hub
//! crates are compiled again, every dependency is shared), copies them to
//! `<target>/<profile>/otlp/`, and builds the default binaries back for the other tests.
//!
//! Blocking harness code outside any async runtime, like `procs`.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use voither_tests::procs::{output_within, wait_for, Lab};
use voither_tests::sim::{self, SimConfig, SimProgress};

/// `<target>/<profile>`: where the test executable's binaries are.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe folder").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// A folder with `voither-gateway` and `voither-hub` built with the feature `otlp` (and
/// the gateway's `sensors`).
fn otlp_bins() -> PathBuf {
    if let Some(dir) = std::env::var_os("VOITHER_OTLP_BIN_DIR") {
        return dir.into();
    }
    let profile_dir = profile_dir();
    let target = profile_dir.parent().expect("target folder");
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_string(),
        Some(p) => p.to_string(),
    };
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let build = |features: Option<&str>| {
        let mut cmd = Command::new(&cargo);
        cmd.current_dir(workspace).env("CARGO_TARGET_DIR", target).args([
            "build",
            "--workspace",
            "--bins",
            "--profile",
        ]);
        cmd.arg(&profile);
        if let Some(f) = features {
            cmd.args(["--features", f]);
        }
        let started = Instant::now();
        let out = output_within(&mut cmd, Duration::from_secs(1200));
        assert!(out.status.success(), "{cmd:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        eprintln!("{cmd:?}: {:.1} s", started.elapsed().as_secs_f64());
    };
    // Every optional feature, the set `scripts/test.sh` unit-tests at its end: that step
    // then finds these crates built and compiles only the test harnesses.
    build(Some("voither-gateway/sensors,voither-gateway/otlp,voither-hub/otlp,voither-telemetry/otlp"));
    let out = profile_dir.join("otlp");
    std::fs::create_dir_all(&out).expect("otlp bin folder");
    for name in ["voither-gateway", "voither-hub"] {
        // Copy to a new file (not over one a running process may hold).
        let tmp = out.join(format!(".{name}.tmp"));
        std::fs::copy(profile_dir.join(name), &tmp).expect("copy binary");
        std::fs::rename(&tmp, out.join(name)).expect("rename binary");
    }
    // The other tests run the default build: link it back (nothing is compiled again).
    build(None);
    out
}

/// A request the fake collector got.
#[derive(Debug, Clone)]
struct Request {
    path: String,
    content_type: String,
    body: Value,
}

/// A fake OTLP/HTTP collector: answers every POST with 200 and keeps the JSON bodies.
#[derive(Debug)]
struct Collector {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Request>>>,
}

impl Collector {
    fn start() -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let reqs = requests.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let reqs = reqs.clone();
                std::thread::spawn(move || {
                    if let Some(r) = serve(conn) {
                        reqs.lock().expect("requests").push(r);
                    }
                });
            }
        });
        Collector { addr, requests }
    }

    /// Every span received: (service.name, service.instance.id, span).
    fn spans(&self) -> Vec<(String, String, Value)> {
        let mut out = Vec::new();
        for r in self.requests.lock().expect("requests").iter() {
            for rs in r.body["resourceSpans"].as_array().into_iter().flatten() {
                let res = &rs["resource"]["attributes"];
                let service = attr(res, "service.name").and_then(|v| v["stringValue"].as_str()).unwrap_or("");
                let instance = attr(res, "service.instance.id").and_then(|v| v["stringValue"].as_str()).unwrap_or("");
                for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                    for span in ss["spans"].as_array().into_iter().flatten() {
                        out.push((service.to_string(), instance.to_string(), span.clone()));
                    }
                }
            }
        }
        out
    }
}

/// Reads one HTTP/1.1 request with a `Content-Length` body and answers 200.
fn serve(mut conn: TcpStream) -> Option<Request> {
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut reader = BufReader::new(conn.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let path = line.split_whitespace().nth(1)?.to_string();
    let (mut len, mut content_type) = (0usize, String::new());
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 || line == "\r\n" {
            break;
        }
        let (k, v) = line.split_once(':')?;
        match k.trim().to_ascii_lowercase().as_str() {
            "content-length" => len = v.trim().parse().ok()?,
            "content-type" => content_type = v.trim().to_string(),
            _ => {}
        }
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    let _ = conn.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    );
    Some(Request { path, content_type, body: serde_json::from_slice(&body).unwrap_or(Value::Null) })
}

/// The value of attribute `key` in an OTLP attribute list.
fn attr<'a>(attrs: &'a Value, key: &str) -> Option<&'a Value> {
    attrs.as_array()?.iter().find(|a| a["key"] == key).map(|a| &a["value"])
}

/// An integer attribute (OTLP/JSON sends 64-bit integers as strings).
fn int_attr(span: &Value, key: &str) -> Option<u64> {
    attr(&span["attributes"], key)?["intValue"].as_str()?.parse().ok()
}

#[test]
fn gateway_and_hub_export_sync_spans_over_otlp() {
    let bins = otlp_bins();
    let collector = Collector::start();
    // The only test in this binary: no other thread reads the environment. Children
    // inherit both variables.
    std::env::set_var("VOITHER_BIN_DIR", &bins);
    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{}", collector.addr));

    let lab = Lab::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cfg = SimConfig {
        port: lab.mosquitto.port,
        devices: 2,
        messages: 100,
        payload_size: 64,
        alarm_every: 10,
        ..Default::default()
    };
    let report = rt.block_on(sim::run(cfg, Arc::new(SimProgress::default())));
    assert_eq!(report.total_acked(), 200, "the broker acknowledged every publish");
    let rep = lab.wait_delivered(&report.acked, Duration::from_secs(60));
    assert!(rep.ok(), "{}\n{}", rep.summary(), lab.logs());

    // A batch's span closes when the hub acks it; the exporter posts within a second.
    let gateway_records = |spans: &[(String, String, Value)]| -> u64 {
        spans
            .iter()
            .filter(|(svc, _, s)| svc == "voither-gateway" && s["name"] == "sync_batch")
            .filter_map(|(_, _, s)| int_attr(s, "records"))
            .sum()
    };
    let exported = wait_for(Duration::from_secs(20), || {
        let spans = collector.spans();
        let hub = spans.iter().any(|(svc, _, s)| svc == "voither-hub" && s["name"] == "sink_commit");
        (gateway_records(&spans) >= 200 && hub).then_some(spans)
    });
    let spans = exported.unwrap_or_else(|| {
        let spans = collector.spans();
        let names: Vec<String> = spans.iter().map(|(svc, _, s)| format!("{svc}/{}", s["name"])).collect();
        panic!(
            "the collector did not get sync_batch spans for all 200 records and a sink_commit span: {} records, spans {names:?}\n{}",
            gateway_records(&spans),
            lab.logs()
        )
    });

    for r in collector.requests.lock().unwrap().iter() {
        assert_eq!(r.path, "/v1/traces");
        assert_eq!(r.content_type, "application/json");
    }
    let mut lanes = std::collections::BTreeSet::new();
    for (svc, instance, s) in &spans {
        assert_eq!(s["traceId"].as_str().map(str::len), Some(32), "{s}");
        assert_eq!(s["spanId"].as_str().map(str::len), Some(16), "{s}");
        let start: u64 = s["startTimeUnixNano"].as_str().unwrap().parse().unwrap();
        let end: u64 = s["endTimeUnixNano"].as_str().unwrap().parse().unwrap();
        assert!(start > 0 && start <= end, "{s}");
        if svc == "voither-gateway" && s["name"] == "sync_batch" {
            let (first, last) = (int_attr(s, "first_seq").unwrap(), int_attr(s, "last_seq").unwrap());
            assert!(first >= 1 && first <= last, "{s}");
            assert!(int_attr(s, "bytes").is_some(), "{s}");
            let endpoint = attr(&s["attributes"], "endpoint").and_then(|v| v["stringValue"].as_str());
            assert_eq!(endpoint, Some(lab.hub.addr.to_string().as_str()), "{s}");
            lanes.insert(attr(&s["attributes"], "lane").and_then(|v| v["stringValue"].as_str()).unwrap().to_string());
        }
        if svc == "voither-hub" {
            assert_eq!(instance, "hub-1", "the hub's service.instance.id is its id");
        }
    }
    assert_eq!(lanes.into_iter().collect::<Vec<_>>(), ["alarms", "telemetry"]);
    let hub_records: u64 = spans
        .iter()
        .filter(|(svc, _, s)| svc == "voither-hub" && s["name"] == "sink_commit")
        .filter_map(|(_, _, s)| int_attr(s, "records"))
        .sum();
    assert!(hub_records >= 200, "sink_commit spans cover every record: {hub_records}");

    // `run --help` documents both switches.
    let help =
        output_within(Command::new(bins.join("voither-gateway")).args(["run", "--help"]), Duration::from_secs(30));
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--log-json") && help.contains("--otlp-endpoint"), "{help}");
    assert!(help.contains("OTEL_EXPORTER_OTLP_ENDPOINT"), "{help}");

    // A default build with the variable set runs as before and says it exports nothing.
    let mut lab = lab;
    lab.hub.stop();
    let mut hub = Command::new(profile_dir().join("voither-hub"))
        .args(["run", "--config"])
        .arg(&lab.hub.config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("default hub");
    let stderr = hub.stderr.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let end = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    let warned = loop {
        match lines.recv_timeout(end.saturating_duration_since(Instant::now())) {
            Ok(l) if l.contains("this build has no OTLP export") => break true,
            Ok(l) => seen.push(l),
            Err(_) => break false,
        }
    };
    let _ = hub.kill();
    let _ = hub.wait();
    assert!(warned, "the default hub did not warn about OTEL_EXPORTER_OTLP_ENDPOINT:\n{}", seen.join("\n"));
}
