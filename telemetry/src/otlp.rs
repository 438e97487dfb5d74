//! OTLP/HTTP export of finished `tracing` spans (cargo feature `otlp`).
//!
//! [`OtlpLayer`] is a `tracing_subscriber` layer: it gives each span a trace id (inherited
//! from the nearest exported parent, fresh for a root) and a span id when the span is
//! created, records its fields as attributes, and on close moves it into a bounded queue.
//! One exporter thread ([`Exporter`]) takes the queue in batches of at most
//! [`MAX_BATCH`] spans, at least every [`FLUSH_INTERVAL`], and POSTs each batch as an
//! OTLP `ExportTraceServiceRequest` in the protobuf JSON encoding to `<endpoint>/v1/traces`
//! over plain HTTP/1.1 (a local collector or agent; TLS is not supported).
//!
//! Invariants:
//! - At most [`QUEUE_CAPACITY`] finished spans wait; more are dropped and counted in
//!   [`Stats::dropped`]. A span holds at most [`MAX_ATTRIBUTES`] attributes, each string
//!   at most [`MAX_VALUE_LEN`] bytes.
//! - The instrumented code never blocks on the exporter: closing a span is one `try_send`.
//! - A batch the collector does not take (unreachable, timeout, non-2xx) is dropped and
//!   counted, not retried: the queue behind it keeps moving. One warning per outage.
//!
//! Special fields, as tracing-opentelemetry reads them: `otel.name` (span name),
//! `otel.kind` (`client`, `server`, `producer`, `consumer`, `internal`),
//! `otel.status_code` (`ok`, `error`) and `otel.status_message`.

// The exporter is a plain OS thread, never async code: std's clock is the right one here.
#![allow(clippy::disallowed_types)]

use std::borrow::Cow;
use std::fmt::Debug;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::filter::{filter_fn, EnvFilter, FilterExt};
use tracing_subscriber::layer::{Context, Filter};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// Finished spans waiting for the exporter, at most.
pub const QUEUE_CAPACITY: usize = 2048;
/// Spans per request, at most.
pub const MAX_BATCH: usize = 512;
/// A non-empty batch waits this long at most.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Attributes per span, at most; more are counted in `droppedAttributesCount`.
pub const MAX_ATTRIBUTES: usize = 64;
/// Bytes of one string attribute, at most (cut at a character boundary).
pub const MAX_VALUE_LEN: usize = 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the exporter thread looks at the shutdown flag while idle.
const POLL: Duration = Duration::from_millis(100);
/// Queue-overflow warnings, at most one per this interval.
const DROP_WARN_INTERVAL: Duration = Duration::from_secs(30);

/// Why an OTLP endpoint cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    /// `https://`: the exporter speaks plain HTTP to a local collector only.
    #[error("https is not supported: point it at a local collector over plain http (http://127.0.0.1:4318)")]
    Tls,
    /// Not an `http://host[:port][/path]` URL.
    #[error("not an http://host[:port][/path] URL")]
    Syntax,
    /// The exporter thread could not be started.
    #[error("cannot start the exporter thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Where the spans go: `http://host:port/<base path>/v1/traces`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    host: String,
    port: u16,
    /// `host:port` as written, for the `Host` header.
    authority: String,
    path: String,
}

impl Endpoint {
    /// From the base endpoint (`OTEL_EXPORTER_OTLP_ENDPOINT` semantics): the traces path
    /// `/v1/traces` is appended to its path.
    pub fn from_base(url: &str) -> Result<Endpoint, EndpointError> {
        let url = url.trim();
        let rest = match url.strip_prefix("http://") {
            Some(r) => r,
            None if url.starts_with("https://") => return Err(EndpointError::Tls),
            None => return Err(EndpointError::Syntax),
        };
        let rest = rest.split(['?', '#']).next().unwrap_or_default();
        let (authority, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or(EndpointError::Syntax)?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let port = match port {
            None => 80,
            Some(p) => p.parse().map_err(|_| EndpointError::Syntax)?,
        };
        if host.is_empty() || host.contains(['@', ' ']) {
            return Err(EndpointError::Syntax);
        }
        Ok(Endpoint {
            host: host.into(),
            port,
            authority: authority.into(),
            path: format!("{}/v1/traces", path.trim_end_matches('/')),
        })
    }

    /// The URL requests go to.
    pub fn url(&self) -> String {
        format!("http://{}{}", self.authority, self.path)
    }
}

/// The resource every exported span belongs to.
#[derive(Debug, Clone, Serialize)]
pub struct Resource {
    attributes: Vec<KeyValue>,
    #[serde(skip)]
    service: String,
    #[serde(skip)]
    version: String,
}

impl Resource {
    /// `service.name`, `service.version`, `service.instance.id` (instance id or host
    /// name), `host.name`, `process.pid`, then `OTEL_RESOURCE_ATTRIBUTES` (`k=v,k=v`)
    /// for keys not set already.
    pub fn new(opts: &crate::Options) -> Resource {
        let host = host_name();
        let extra = std::env::var("OTEL_RESOURCE_ATTRIBUTES").unwrap_or_default();
        Self::with(opts.service, opts.version, opts.instance_id.clone().unwrap_or_else(|| host.clone()), host, &extra)
    }

    fn with(service: &str, version: &str, instance: String, host: String, extra: &str) -> Resource {
        let s = |v: String| AnyValue::String(v);
        let mut attributes = vec![
            KeyValue { key: "service.name".into(), value: s(service.into()) },
            KeyValue { key: "service.version".into(), value: s(version.into()) },
            KeyValue { key: "service.instance.id".into(), value: s(instance) },
            KeyValue { key: "host.name".into(), value: s(host) },
            KeyValue { key: "process.pid".into(), value: AnyValue::Int(std::process::id().to_string()) },
        ];
        for kv in extra.split(',') {
            if let Some((k, v)) = kv.split_once('=') {
                let k = k.trim();
                if !k.is_empty() && !attributes.iter().any(|a| a.key == k) {
                    attributes.push(KeyValue { key: k.into(), value: s(v.trim().into()) });
                }
            }
        }
        Resource { attributes, service: service.into(), version: version.into() }
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

/// The exporter's counters.
#[derive(Debug, Default)]
pub struct Stats {
    exported: AtomicU64,
    dropped: AtomicU64,
}

impl Stats {
    /// Spans the collector accepted.
    pub fn exported(&self) -> u64 {
        self.exported.load(Ordering::Relaxed)
    }
    /// Spans dropped: queue full, or the collector did not take their batch.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The span filter of the exporter: `VOITHER_OTLP_FILTER` (`EnvFilter` directives) or
/// `default`, spans only (events are never exported).
pub fn span_filter<S>(default: &str) -> impl Filter<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let directives = EnvFilter::try_from_env("VOITHER_OTLP_FILTER").unwrap_or_else(|_| EnvFilter::new(default));
    directives.and(filter_fn(|m| m.is_span()))
}

/// Starts the exporter thread for `endpoint` (a base URL) and returns the layer that
/// feeds it.
pub fn start(endpoint: &str, resource: Resource) -> Result<(OtlpLayer, Exporter), EndpointError> {
    let endpoint = Endpoint::from_base(endpoint)?;
    start_with(endpoint, resource, QUEUE_CAPACITY)
}

fn start_with(endpoint: Endpoint, resource: Resource, capacity: usize) -> Result<(OtlpLayer, Exporter), EndpointError> {
    let (tx, rx) = mpsc::sync_channel(capacity);
    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (done_tx, done) = mpsc::channel();
    let url = endpoint.url();
    let worker = Worker {
        rx,
        endpoint,
        resource,
        stats: stats.clone(),
        stop: stop.clone(),
        failing: false,
        dropped_reported: 0,
        last_drop_warning: None,
    };
    let thread = std::thread::Builder::new()
        .name("otlp-export".into())
        .spawn(move || {
            worker.run();
            let _ = done_tx.send(());
        })
        .map_err(EndpointError::Thread)?;
    Ok((OtlpLayer { tx, stats: stats.clone() }, Exporter { stats, stop, done, thread: Some(thread), url }))
}

/// The exporter thread's handle.
#[derive(Debug)]
pub struct Exporter {
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    done: Receiver<()>,
    thread: Option<JoinHandle<()>>,
    url: String,
}

impl Exporter {
    /// The URL spans are posted to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Its counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Exports what is queued and stops the thread, waiting at most `timeout` (a collector
    /// that does not answer is abandoned, with its spans).
    pub fn shutdown(mut self, timeout: Duration) {
        self.stop.store(true, Ordering::Release);
        if self.done.recv_timeout(timeout).is_ok() {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        } else {
            tracing::warn!(url = %self.url, "OTLP collector did not take the last spans in time; exiting without them.");
        }
    }
}

/// The `tracing` layer that hands finished spans to the [`Exporter`].
#[derive(Debug)]
pub struct OtlpLayer {
    tx: SyncSender<Box<SpanData>>,
    stats: Arc<Stats>,
}

impl<S> Layer<S> for OtlpLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        // The nearest ancestor this layer sees (its filter skips the others).
        let parent = span.parent().and_then(|p| p.extensions().get::<SpanData>().map(|d| (d.trace_id, d.span_id)));
        let (trace_id, parent_span_id) = parent.unwrap_or_else(|| (nonzero(rand::random::<u128>), 0));
        let meta = attrs.metadata();
        let mut data = SpanData {
            trace_id,
            span_id: nonzero(rand::random::<u64>),
            parent_span_id,
            name: Cow::Borrowed(meta.name()),
            kind: SPAN_KIND_INTERNAL,
            start_ns: unix_ns(),
            end_ns: 0,
            attributes: Vec::new(),
            dropped_attributes: 0,
            status: (STATUS_UNSET, None),
        };
        data.push("code.namespace", AnyValue::String(meta.target().into()));
        if let Some(file) = meta.file() {
            data.push("code.filepath", AnyValue::String(file.into()));
        }
        if let Some(line) = meta.line() {
            data.push("code.lineno", AnyValue::Int(line.to_string()));
        }
        attrs.record(&mut data);
        span.extensions_mut().insert(data);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(data) = span.extensions_mut().get_mut::<SpanData>() {
                values.record(data);
            }
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(mut data) = span.extensions_mut().remove::<SpanData>() else { return };
        data.end_ns = unix_ns();
        if self.tx.try_send(Box::new(data)).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn nonzero<T: Default + PartialEq>(mut draw: impl FnMut() -> T) -> T {
    loop {
        let v = draw();
        if v != T::default() {
            return v;
        }
    }
}

fn unix_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

const SPAN_KIND_INTERNAL: i32 = 1;
const STATUS_UNSET: i32 = 0;

/// A span between creation and export.
#[derive(Debug)]
pub struct SpanData {
    trace_id: u128,
    span_id: u64,
    parent_span_id: u64,
    name: Cow<'static, str>,
    kind: i32,
    start_ns: u64,
    end_ns: u64,
    attributes: Vec<(&'static str, AnyValue)>,
    dropped_attributes: u32,
    status: (i32, Option<String>),
}

impl SpanData {
    fn push(&mut self, key: &'static str, value: AnyValue) {
        if let Some(slot) = self.attributes.iter_mut().find(|(k, _)| *k == key) {
            slot.1 = value;
        } else if self.attributes.len() < MAX_ATTRIBUTES {
            self.attributes.push((key, value));
        } else {
            self.dropped_attributes += 1;
        }
    }

    fn set(&mut self, field: &Field, value: AnyValue) {
        let text = || match &value {
            AnyValue::String(s) => s.clone(),
            other => format!("{other:?}"),
        };
        match field.name() {
            "otel.name" => self.name = Cow::Owned(text()),
            "otel.kind" => {
                self.kind = match text().to_ascii_lowercase().as_str() {
                    "server" => 2,
                    "client" => 3,
                    "producer" => 4,
                    "consumer" => 5,
                    _ => SPAN_KIND_INTERNAL,
                }
            }
            "otel.status_code" => {
                self.status.0 = match text().to_ascii_lowercase().as_str() {
                    "ok" => 1,
                    "error" => 2,
                    _ => STATUS_UNSET,
                }
            }
            "otel.status_message" => self.status.1 = Some(text()),
            name => self.push(name, value),
        }
    }
}

fn string(mut s: String) -> AnyValue {
    if s.len() > MAX_VALUE_LEN {
        let mut end = MAX_VALUE_LEN;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    AnyValue::String(s)
}

impl Visit for SpanData {
    fn record_str(&mut self, field: &Field, value: &str) {
        let mut end = value.len().min(MAX_VALUE_LEN);
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        self.set(field, AnyValue::String(value[..end].into()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.set(field, AnyValue::Int(value.to_string()));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        // OTLP integers are signed 64-bit; larger values go as text.
        let v = if i64::try_from(value).is_ok() { AnyValue::Int(value.to_string()) } else { string(value.to_string()) };
        self.set(field, v);
    }
    fn record_i128(&mut self, field: &Field, value: i128) {
        let v = if i64::try_from(value).is_ok() { AnyValue::Int(value.to_string()) } else { string(value.to_string()) };
        self.set(field, v);
    }
    fn record_u128(&mut self, field: &Field, value: u128) {
        let v = if i64::try_from(value).is_ok() { AnyValue::Int(value.to_string()) } else { string(value.to_string()) };
        self.set(field, v);
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinities.
        let v = if value.is_finite() { AnyValue::Double(value) } else { string(value.to_string()) };
        self.set(field, v);
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.set(field, AnyValue::Bool(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.set(field, string(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        self.set(field, string(format!("{value:?}")));
    }
}

/// `AnyValue` of OTLP, in its JSON form (`{"stringValue": "…"}`; 64-bit integers as
/// decimal strings).
#[derive(Debug, Clone, Serialize)]
enum AnyValue {
    #[serde(rename = "stringValue")]
    String(String),
    #[serde(rename = "intValue")]
    Int(String),
    #[serde(rename = "doubleValue")]
    Double(f64),
    #[serde(rename = "boolValue")]
    Bool(bool),
}

#[derive(Debug, Clone, Serialize)]
struct KeyValue {
    key: String,
    value: AnyValue,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ExportRequest<'a> {
    resource_spans: [ResourceSpans<'a>; 1],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResourceSpans<'a> {
    resource: &'a Resource,
    scope_spans: [ScopeSpans<'a>; 1],
}

#[derive(Serialize)]
struct ScopeSpans<'a> {
    scope: Scope<'a>,
    spans: Vec<JsonSpan<'a>>,
}

#[derive(Serialize)]
struct Scope<'a> {
    name: &'a str,
    version: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JsonSpan<'a> {
    trace_id: String,
    span_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    parent_span_id: String,
    name: &'a str,
    kind: i32,
    start_time_unix_nano: String,
    end_time_unix_nano: String,
    attributes: Vec<JsonAttr<'a>>,
    #[serde(skip_serializing_if = "is_zero")]
    dropped_attributes_count: u32,
    status: JsonStatus<'a>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Serialize)]
struct JsonAttr<'a> {
    key: &'a str,
    value: &'a AnyValue,
}

#[derive(Serialize)]
struct JsonStatus<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
}

/// One `ExportTraceServiceRequest` in OTLP/JSON.
fn encode(resource: &Resource, spans: &[SpanData]) -> Vec<u8> {
    let spans = spans
        .iter()
        .map(|d| JsonSpan {
            trace_id: format!("{:032x}", d.trace_id),
            span_id: format!("{:016x}", d.span_id),
            parent_span_id: if d.parent_span_id == 0 { String::new() } else { format!("{:016x}", d.parent_span_id) },
            name: &d.name,
            kind: d.kind,
            start_time_unix_nano: d.start_ns.to_string(),
            end_time_unix_nano: d.end_ns.to_string(),
            attributes: d.attributes.iter().map(|(key, value)| JsonAttr { key, value }).collect(),
            dropped_attributes_count: d.dropped_attributes,
            status: JsonStatus {
                code: (d.status.0 != STATUS_UNSET).then_some(d.status.0),
                message: d.status.1.as_deref(),
            },
        })
        .collect();
    let req = ExportRequest {
        resource_spans: [ResourceSpans {
            resource,
            scope_spans: [ScopeSpans { scope: Scope { name: &resource.service, version: &resource.version }, spans }],
        }],
    };
    serde_json::to_vec(&req).expect("OTLP JSON encoding cannot fail")
}

struct Worker {
    rx: Receiver<Box<SpanData>>,
    endpoint: Endpoint,
    resource: Resource,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    /// The last request failed (one warning per outage).
    failing: bool,
    /// Queue-overflow drops already warned about.
    dropped_reported: u64,
    last_drop_warning: Option<Instant>,
}

impl Worker {
    fn run(mut self) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut next_flush = Instant::now() + FLUSH_INTERVAL;
        loop {
            if self.stop.load(Ordering::Acquire) {
                while let Ok(span) = self.rx.try_recv() {
                    batch.push(*span);
                    if batch.len() >= MAX_BATCH {
                        self.send(&mut batch);
                    }
                }
                self.send(&mut batch);
                return;
            }
            match self.rx.recv_timeout(next_flush.saturating_duration_since(Instant::now()).min(POLL)) {
                Ok(span) => {
                    batch.push(*span);
                    if batch.len() >= MAX_BATCH {
                        self.send(&mut batch);
                        next_flush = Instant::now() + FLUSH_INTERVAL;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    if Instant::now() >= next_flush {
                        self.send(&mut batch);
                        next_flush = Instant::now() + FLUSH_INTERVAL;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.send(&mut batch);
                    return;
                }
            }
        }
    }

    fn send(&mut self, batch: &mut Vec<SpanData>) {
        self.warn_overflow();
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        let body = encode(&self.resource, batch);
        batch.clear();
        match post(&self.endpoint, &body) {
            Ok(()) => {
                self.stats.exported.fetch_add(n, Ordering::Relaxed);
                if self.failing {
                    self.failing = false;
                    tracing::info!(
                        url = %self.endpoint.url(),
                        dropped_total = self.stats.dropped(),
                        "OTLP collector takes spans again."
                    );
                }
            }
            Err(error) => {
                self.stats.dropped.fetch_add(n, Ordering::Relaxed);
                if !self.failing {
                    self.failing = true;
                    tracing::warn!(
                        url = %self.endpoint.url(),
                        %error,
                        spans = n,
                        "OTLP collector did not take spans; dropping them until it does."
                    );
                }
            }
        }
        // Drops caused by this batch are part of the outage warning, not an overflow.
        self.dropped_reported = self.dropped_reported.max(self.stats.dropped());
    }

    /// Warns (at most every [`DROP_WARN_INTERVAL`]) when the queue overflowed.
    fn warn_overflow(&mut self) {
        let dropped = self.stats.dropped();
        if dropped <= self.dropped_reported || self.last_drop_warning.is_some_and(|t| t.elapsed() < DROP_WARN_INTERVAL)
        {
            return;
        }
        tracing::warn!(
            dropped = dropped - self.dropped_reported,
            dropped_total = dropped,
            capacity = QUEUE_CAPACITY,
            "OTLP span queue full; spans dropped."
        );
        self.dropped_reported = dropped;
        self.last_drop_warning = Some(Instant::now());
    }
}

/// Why a POST failed.
#[derive(Debug, thiserror::Error)]
enum PostError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the collector answered {0}")]
    Status(String),
}

/// POSTs `body` as JSON, `Connection: close`; success is a 2xx status line.
fn post(ep: &Endpoint, body: &[u8]) -> Result<(), PostError> {
    let mut last = None;
    let mut stream = None;
    for addr in (ep.host.as_str(), ep.port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let mut s = stream.ok_or_else(|| last.unwrap_or_else(|| std::io::Error::other("no address")))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         User-Agent: {}/{}\r\nConnection: close\r\n\r\n",
        ep.path,
        ep.authority,
        body.len(),
        env!("CARGO_PKG_NAME"),
        env!("CARGO_PKG_VERSION"),
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    s.flush()?;
    // Only the status line matters; the body (a partial-success report) is not read.
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 4096 {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(buf.split(|b| *b == b'\n').next().unwrap_or_default()).trim().to_string();
    match line.split_whitespace().nth(1) {
        Some(code) if line.starts_with("HTTP/1.") && code.starts_with('2') => Ok(()),
        _ if line.is_empty() => Err(PostError::Status("nothing".into())),
        _ => Err(PostError::Status(line)),
    }
}

#[cfg(test)]
mod tests {
    use std::io::BufRead;
    use std::net::TcpListener;

    use serde_json::Value;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    fn resource() -> Resource {
        Resource::with(
            "voither-test",
            "1.2.3",
            "node-7".into(),
            "host-a".into(),
            "deployment.environment=lab, service.name=x",
        )
    }

    #[test]
    fn endpoint_appends_the_traces_path() {
        let ep = |s| Endpoint::from_base(s).map(|e| (e.host, e.port, e.authority, e.path));
        let own = |h: &str, p, a: &str, path: &str| (h.to_string(), p, a.to_string(), path.to_string());
        assert_eq!(ep("http://127.0.0.1:4318").unwrap(), own("127.0.0.1", 4318, "127.0.0.1:4318", "/v1/traces"));
        assert_eq!(ep("http://otel:4318/").unwrap(), own("otel", 4318, "otel:4318", "/v1/traces"));
        assert_eq!(ep("http://otel/base/").unwrap(), own("otel", 80, "otel", "/base/v1/traces"));
        assert_eq!(ep("http://[::1]:4318").unwrap(), own("::1", 4318, "[::1]:4318", "/v1/traces"));
        assert!(matches!(ep("https://otel:4318"), Err(EndpointError::Tls)));
        for bad in ["otel:4318", "http://", "http://otel:port", "grpc://otel:4317", "http://u@otel"] {
            assert!(matches!(ep(bad), Err(EndpointError::Syntax)), "{bad}");
        }
        assert_eq!(Endpoint::from_base("http://otel:4318").unwrap().url(), "http://otel:4318/v1/traces");
    }

    #[test]
    fn resource_has_service_and_instance_and_keeps_them_over_env() {
        let r = serde_json::to_value(resource()).unwrap();
        let get =
            |k: &str| r["attributes"].as_array().unwrap().iter().find(|a| a["key"] == k).map(|a| a["value"].clone());
        assert_eq!(get("service.name").unwrap()["stringValue"], "voither-test");
        assert_eq!(get("service.version").unwrap()["stringValue"], "1.2.3");
        assert_eq!(get("service.instance.id").unwrap()["stringValue"], "node-7");
        assert_eq!(get("host.name").unwrap()["stringValue"], "host-a");
        assert_eq!(get("deployment.environment").unwrap()["stringValue"], "lab");
        assert_eq!(r["attributes"].as_array().unwrap().iter().filter(|a| a["key"] == "service.name").count(), 1);
    }

    /// A collector on loopback that answers `status` and hands each body over.
    fn collector(status: &'static str) -> (String, Receiver<Value>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                let mut r = std::io::BufReader::new(c.try_clone().unwrap());
                let mut line = String::new();
                let mut len = 0;
                r.read_line(&mut line).unwrap();
                assert!(line.starts_with("POST /v1/traces HTTP/1.1"), "{line}");
                loop {
                    line.clear();
                    r.read_line(&mut line).unwrap();
                    if line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                write!(c, "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
                let _ = tx.send(serde_json::from_slice(&body).unwrap());
            }
        });
        (url, rx)
    }

    fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
        span["attributes"].as_array().unwrap().iter().find(|a| a["key"] == key).map_or(&Value::Null, |a| &a["value"])
    }

    #[test]
    fn spans_reach_the_collector_with_fields_and_parents() {
        let (url, bodies) = collector("200 OK");
        let (layer, exporter) = start(&url, resource()).unwrap();
        let subscriber = tracing_subscriber::registry().with(layer.with_filter(span_filter("info")));
        tracing::subscriber::with_default(subscriber, || {
            let outer = tracing::info_span!("session", otel.kind = "client");
            let _g = outer.enter();
            let batch = tracing::info_span!(
                "sync_batch",
                lane = %"alarms",
                first_seq = 1u64,
                records = 3usize,
                big = u64::MAX,
                ratio = 0.5,
                ok = true,
                bytes = tracing::field::Empty
            );
            batch.record("bytes", 300u64);
            tracing::debug_span!("too_fine").in_scope(|| tracing::info!("an event, never exported"));
            drop(batch);
        });
        let stats = exporter.stats();
        exporter.shutdown(Duration::from_secs(5));
        let mut spans = Vec::new();
        while let Ok(body) = bodies.recv_timeout(Duration::from_millis(200)) {
            let rs = &body["resourceSpans"][0];
            assert_eq!(rs["resource"]["attributes"][0]["value"]["stringValue"], "voither-test");
            spans.extend(rs["scopeSpans"][0]["spans"].as_array().unwrap().iter().cloned());
        }
        let names: Vec<&str> = spans.iter().map(|s| s["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["sync_batch", "session"], "debug spans and events stay out");
        let (batch, session) = (&spans[0], &spans[1]);
        assert_eq!(batch["traceId"], session["traceId"]);
        assert_eq!(batch["parentSpanId"], session["spanId"]);
        assert!(session.get("parentSpanId").is_none());
        assert_eq!(session["kind"], 3, "otel.kind = client");
        assert_eq!(batch["kind"], 1);
        assert_eq!(attr(batch, "lane")["stringValue"], "alarms");
        assert_eq!(attr(batch, "first_seq")["intValue"], "1");
        assert_eq!(attr(batch, "records")["intValue"], "3");
        assert_eq!(attr(batch, "bytes")["intValue"], "300", "recorded after creation");
        assert_eq!(attr(batch, "big")["stringValue"], u64::MAX.to_string());
        assert_eq!(attr(batch, "ratio")["doubleValue"], 0.5);
        assert_eq!(attr(batch, "ok")["boolValue"], true);
        assert!(attr(batch, "code.namespace")["stringValue"].as_str().unwrap().starts_with("voither_telemetry"));
        assert_eq!(session["attributes"].as_array().unwrap().iter().filter(|a| a["key"] == "otel.kind").count(), 0);
        let start: u64 = batch["startTimeUnixNano"].as_str().unwrap().parse().unwrap();
        let end: u64 = batch["endTimeUnixNano"].as_str().unwrap().parse().unwrap();
        assert!(start > 0 && start <= end);
        assert_eq!((stats.exported(), stats.dropped()), (2, 0));
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let (tx, rx) = mpsc::sync_channel(4);
        let stats = Arc::new(Stats::default());
        let layer = OtlpLayer { tx, stats: stats.clone() };
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
            for i in 0..10 {
                tracing::info_span!("sync_batch", i).in_scope(|| {});
            }
        });
        assert_eq!(rx.try_iter().count(), 4);
        assert_eq!(stats.dropped(), 6);
    }

    #[test]
    fn attributes_are_bounded() {
        let mut d = SpanData {
            trace_id: 1,
            span_id: 1,
            parent_span_id: 0,
            name: Cow::Borrowed("x"),
            kind: SPAN_KIND_INTERNAL,
            start_ns: 0,
            end_ns: 0,
            attributes: Vec::new(),
            dropped_attributes: 0,
            status: (STATUS_UNSET, None),
        };
        let keys: Vec<&'static str> = (0..70).map(|i| &*Box::leak(format!("k{i}").into_boxed_str())).collect();
        for k in &keys {
            d.push(k, AnyValue::Bool(true));
        }
        assert_eq!((d.attributes.len(), d.dropped_attributes), (MAX_ATTRIBUTES, 6));
        let AnyValue::String(s) = string("é".repeat(MAX_VALUE_LEN)) else { panic!() };
        assert!(s.len() <= MAX_VALUE_LEN && s.len() > MAX_VALUE_LEN - 2);
    }

    #[test]
    fn an_absent_or_refusing_collector_costs_dropped_spans_not_time() {
        for url in [format!("http://127.0.0.1:{}", closed_port()), collector("503 Service Unavailable").0] {
            let (layer, exporter) = start(&url, resource()).unwrap();
            tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
                for _ in 0..3 {
                    tracing::info_span!("sync_batch").in_scope(|| {});
                }
            });
            let stats = exporter.stats();
            let t = Instant::now();
            exporter.shutdown(Duration::from_secs(10));
            assert!(t.elapsed() < Duration::from_secs(5), "{url}");
            assert_eq!((stats.exported(), stats.dropped()), (0, 3), "{url}");
        }
    }

    fn closed_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }
}
