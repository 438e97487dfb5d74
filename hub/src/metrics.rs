//! Prometheus metrics of the hub, in the `voither_hub_` namespace.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Label set `{kind}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// `frame` (malformed or oversized), `protocol` (a frame out of place), `sink`, `other`.
    pub kind: String,
}

/// Every metric the hub exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Gateway connections accepted.
    pub connections: Counter,
    /// Gateways connected now.
    pub connected: Gauge,
    /// Handshakes refused (no or unknown certificate, bad ALPN…).
    pub refused_handshakes: Counter,
    /// Records committed to the sink.
    pub stored_records: Counter,
    /// Payload bytes committed to the sink.
    pub stored_bytes: Counter,
    /// Records received again at or below the mark and ignored.
    pub duplicate_records: Counter,
    /// Sink commit time.
    pub commit_seconds: Histogram,
    /// Gateway sessions closed because of an error, by kind.
    pub session_errors: Family<KindLabel, Counter>,
    /// Evicted ranges recorded as gaps.
    pub gaps: Counter,
    /// Records covered by recorded gaps (lost at the edge, by design and counted).
    pub gap_records: Counter,
    /// Gateways known to this hub, by state (`connected`, `disconnected`).
    pub gateways: Family<StateLabel, Gauge>,
    /// Gateways refused by the allow-list or revocation list (at handshake or live).
    pub auth_refusals: Family<ReasonLabel, Counter>,
    /// Seconds until the hub's certificate expires.
    pub tls_cert_expiry_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Reloads of the hub's certificate, key or CA after they changed.
    pub tls_reloads: Counter,
    /// Sink calls that failed because the sink was unavailable and were retried while
    /// the gateway's acks waited.
    pub sink_retries: Counter,
    /// 1 while the last sink call succeeded, 0 while the sink is unavailable.
    pub sink_up: Gauge,
}

/// Label set `{reason}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why.
    pub reason: String,
}

/// Label set `{state}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// `connected` or `disconnected`.
    pub state: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("voither_hub");
        let m = Self {
            registry: Registry::default(),
            connections: Counter::default(),
            connected: Gauge::default(),
            refused_handshakes: Counter::default(),
            stored_records: Counter::default(),
            stored_bytes: Counter::default(),
            duplicate_records: Counter::default(),
            commit_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 14)),
            session_errors: Family::default(),
            gaps: Counter::default(),
            gap_records: Counter::default(),
            gateways: Family::default(),
            auth_refusals: Family::default(),
            tls_cert_expiry_seconds: Gauge::default(),
            tls_reloads: Counter::default(),
            sink_retries: Counter::default(),
            sink_up: Gauge::default(),
        };
        m.sink_up.set(1);
        registry.register(
            "sink_retries",
            "Sink calls retried because the sink was unavailable (acks held meanwhile)",
            m.sink_retries.clone(),
        );
        registry.register("sink_up", "1 while the sink answers, 0 while it is unavailable", m.sink_up.clone());
        registry.register(
            "auth_refusals",
            "Gateways refused: revoked or not in the allow-list (at handshake or closed live)",
            m.auth_refusals.clone(),
        );
        registry.register(
            "tls_cert_expiry_seconds",
            "Seconds until the hub's certificate expires",
            m.tls_cert_expiry_seconds.clone(),
        );
        registry.register("tls_reloads", "Reloads of the hub's certificate, key or CA", m.tls_reloads.clone());
        // Both reasons exist from the start at 0, so that `increase()` sees the first one.
        for reason in ["revoked", "not_allowed"] {
            let _ = m.auth_refusals.get_or_create(&ReasonLabel { reason: reason.into() });
        }
        registry.register("connections", "Gateway connections accepted", m.connections.clone());
        registry.register("connected_gateways", "Gateways connected now", m.connected.clone());
        registry.register("refused_handshakes", "Handshakes refused", m.refused_handshakes.clone());
        registry.register("stored_records", "Records committed to the sink", m.stored_records.clone());
        registry.register("stored_bytes", "Payload bytes committed to the sink", m.stored_bytes.clone());
        registry.register(
            "duplicate_records",
            "Records received at or below the high-water mark and ignored",
            m.duplicate_records.clone(),
        );
        registry.register("sink_commit_seconds", "Sink commit time", m.commit_seconds.clone());
        registry.register("gaps", "Evicted ranges recorded as gaps", m.gaps.clone());
        registry.register("gap_records", "Records covered by recorded gaps", m.gap_records.clone());
        registry.register("gateways", "Gateways known to this hub since it started, by state", m.gateways.clone());
        registry.register(
            "session_errors",
            "Gateway sessions closed because of an error (frame, protocol, sink)",
            m.session_errors.clone(),
        );
        Self { registry, ..m }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}
