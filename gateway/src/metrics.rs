//! Prometheus metrics of the gateway, all in the `voither_gateway_` namespace.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Label set `{lane}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LaneLabel {
    /// Lane name.
    pub lane: String,
}

/// Label set `{lane, reason}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabel {
    /// Lane name (empty when no lane matched).
    pub lane: String,
    /// Why the record was dropped.
    pub reason: String,
}

/// Label set `{sensor}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SensorLabel {
    /// Sensor name (`sensors[].name`).
    pub sensor: String,
}

/// Label set `{endpoint}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    /// Hub endpoint, `host:port`.
    pub endpoint: String,
}

/// Label set `{workload}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkloadLabel {
    /// Workload name.
    pub workload: String,
}

/// Label set `{reason}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why.
    pub reason: String,
}

/// Every metric the gateway exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Messages received from the broker, by lane.
    pub ingested_records: Family<LaneLabel, Counter>,
    /// Payload bytes received from the broker, by lane.
    pub ingested_bytes: Family<LaneLabel, Counter>,
    /// Records durably committed to the store, by lane.
    pub stored_records: Family<LaneLabel, Counter>,
    /// Payload bytes durably committed to the local store, by lane.
    pub stored_bytes: Family<LaneLabel, Counter>,
    /// Records acknowledged by a hub and deleted locally, by lane.
    pub synced_records: Family<LaneLabel, Counter>,
    /// Payload bytes acknowledged by a hub, by lane.
    pub synced_bytes: Family<LaneLabel, Counter>,
    /// Records not stored, by lane and reason.
    pub dropped_records: Family<DropLabel, Counter>,
    /// Records evicted before a hub had them, by lane and reason (`capacity`, `ttl`).
    pub evicted_records: Family<DropLabel, Counter>,
    /// Bytes evicted, by lane and reason.
    pub evicted_bytes: Family<DropLabel, Counter>,
    /// Messages held unacknowledged because a `backpressure` lane is full.
    pub held_messages: Gauge,
    /// Store files found corrupt at start and moved aside.
    pub store_corrupt_moved: Counter,
    /// 1 while the store cannot write (disk full, I/O error).
    pub store_degraded: Gauge,
    /// Hub sessions that ended with a protocol or frame error.
    pub uplink_protocol_errors: Counter,
    /// MQTT redeliveries recognised as already stored.
    pub redelivered_duplicates: Counter,
    /// Records held and not yet acknowledged, by lane.
    pub backlog_records: Family<LaneLabel, Gauge>,
    /// Payload bytes held and not yet acknowledged, by lane.
    pub backlog_bytes: Family<LaneLabel, Gauge>,
    /// Age of the oldest record not yet acknowledged, by lane (the recovery point).
    pub oldest_unsynced_age: Family<LaneLabel, Gauge<f64, AtomicU64>>,
    /// 1 while a hub session is established.
    pub uplink_connected: Gauge,
    /// Connection attempts that failed or sessions that ended.
    pub uplink_reconnects: Counter,
    /// Bytes written to hub connections.
    pub uplink_sent_bytes: Counter,
    /// Returns to the preferred endpoint after it was healthy again.
    pub uplink_failbacks: Counter,
    /// Moves to the next endpoint of the list after the active one failed.
    pub uplink_failovers: Counter,
    /// 1 for the endpoint of the established session, 0 for endpoints used before.
    pub uplink_endpoint: Family<EndpointLabel, Gauge>,
    /// QUIC's smoothed round-trip time of the current session.
    pub uplink_rtt_seconds: Gauge<f64, AtomicU64>,
    /// Time from sending a batch to the hub's ack (durable at the hub).
    pub uplink_ack_latency_seconds: Histogram,
    /// Effective uplink rate limit (the lower of config and hub request; 0: none).
    pub uplink_rate_limit_bytes: Gauge,
    /// Sessions ended because batches were in flight and acks stopped making progress.
    pub uplink_ack_stalls: Counter,
    /// Seconds until the gateway's certificate expires.
    pub tls_cert_expiry_seconds: Gauge<f64, AtomicU64>,
    /// Reloads of the gateway's certificate, key or CA after they changed.
    pub tls_reloads: Counter,
    /// Version of the workload manifest in use (0: none).
    pub manifest_version: Gauge,
    /// Manifests refused, by reason.
    pub manifest_refusals: Family<ReasonLabel, Counter>,
    /// 1 while a workload's process runs.
    pub workload_running: Family<WorkloadLabel, Gauge>,
    /// Restarts of a workload.
    pub workload_restarts: Family<WorkloadLabel, Counter>,
    /// Output lines of a workload dropped because the store could not keep up.
    pub workload_log_dropped: Family<WorkloadLabel, Counter>,
    /// Time to make a batch durable.
    pub store_commit_seconds: Histogram,
    /// Size of the store file.
    pub store_disk_bytes: Gauge,
    /// The store's budget (`store.max_bytes`, or the sum of the lane budgets).
    pub store_budget_bytes: Gauge,
    /// Bytes of records held over all lanes (what the budget limits).
    pub store_used_bytes: Gauge,
    /// MQTT connection errors.
    pub mqtt_errors: Counter,
    /// Failed polls of a sensor on the gateway's own I²C bus (bus cannot be opened,
    /// bus error or NACK, CRC mismatch, wrong chip), by sensor.
    pub sensor_errors: Family<SensorLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("voither_gateway");
        let m = Self {
            ingested_records: Family::default(),
            ingested_bytes: Family::default(),
            stored_records: Family::default(),
            stored_bytes: Family::default(),
            synced_records: Family::default(),
            synced_bytes: Family::default(),
            dropped_records: Family::default(),
            redelivered_duplicates: Counter::default(),
            evicted_records: Family::default(),
            evicted_bytes: Family::default(),
            held_messages: Gauge::default(),
            store_corrupt_moved: Counter::default(),
            store_degraded: Gauge::default(),
            uplink_protocol_errors: Counter::default(),
            backlog_records: Family::default(),
            backlog_bytes: Family::default(),
            oldest_unsynced_age: Family::default(),
            uplink_connected: Gauge::default(),
            uplink_reconnects: Counter::default(),
            uplink_sent_bytes: Counter::default(),
            uplink_failbacks: Counter::default(),
            uplink_failovers: Counter::default(),
            uplink_endpoint: Family::default(),
            uplink_rtt_seconds: Gauge::default(),
            uplink_ack_latency_seconds: Histogram::new(exponential_buckets(0.000_5, 2.0, 16)),
            uplink_rate_limit_bytes: Gauge::default(),
            uplink_ack_stalls: Counter::default(),
            tls_cert_expiry_seconds: Gauge::default(),
            tls_reloads: Counter::default(),
            manifest_version: Gauge::default(),
            manifest_refusals: Family::default(),
            workload_running: Family::default(),
            workload_restarts: Family::default(),
            workload_log_dropped: Family::default(),
            store_commit_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 14)),
            store_disk_bytes: Gauge::default(),
            store_budget_bytes: Gauge::default(),
            store_used_bytes: Gauge::default(),
            mqtt_errors: Counter::default(),
            sensor_errors: Family::default(),
            registry: Registry::default(),
        };
        registry.register("ingested_records", "Messages received from the broker", m.ingested_records.clone());
        registry.register("ingested_bytes", "Payload bytes received from the broker", m.ingested_bytes.clone());
        registry.register("stored_records", "Records durably committed to the local store", m.stored_records.clone());
        registry.register("stored_bytes", "Payload bytes durably committed to the local store", m.stored_bytes.clone());
        registry.register("synced_records", "Records acknowledged by a hub", m.synced_records.clone());
        registry.register("synced_bytes", "Payload bytes acknowledged by a hub", m.synced_bytes.clone());
        registry.register("dropped_records", "Records not stored, by reason", m.dropped_records.clone());
        registry.register(
            "evicted_records",
            "Records evicted before a hub had them (reported to the hub as gaps)",
            m.evicted_records.clone(),
        );
        registry.register("evicted_bytes", "Bytes of records evicted before a hub had them", m.evicted_bytes.clone());
        registry.register(
            "held_messages",
            "MQTT messages held unacknowledged because a backpressure lane is full",
            m.held_messages.clone(),
        );
        registry.register(
            "store_corrupt_moved",
            "Store files found corrupt at start and moved aside",
            m.store_corrupt_moved.clone(),
        );
        registry.register(
            "store_degraded",
            "1 while the store cannot write (disk full or I/O error); ingest holds the broker",
            m.store_degraded.clone(),
        );
        registry.register(
            "uplink_protocol_errors",
            "Hub sessions ended by a protocol or frame error",
            m.uplink_protocol_errors.clone(),
        );
        registry.register(
            "mqtt_redelivered_duplicates",
            "Broker redeliveries recognised as already stored and not stored again",
            m.redelivered_duplicates.clone(),
        );
        registry.register("backlog_records", "Records held, not yet acknowledged by a hub", m.backlog_records.clone());
        registry.register(
            "backlog_bytes",
            "Payload bytes held, not yet acknowledged by a hub",
            m.backlog_bytes.clone(),
        );
        registry.register(
            "oldest_unsynced_age_seconds",
            "Age of the oldest record not yet acknowledged by a hub",
            m.oldest_unsynced_age.clone(),
        );
        registry.register("uplink_connected", "1 while a hub session is established", m.uplink_connected.clone());
        registry.register("uplink_reconnects", "Hub connections that failed or ended", m.uplink_reconnects.clone());
        registry.register("uplink_sent_bytes", "Bytes written to hub connections", m.uplink_sent_bytes.clone());
        registry.register(
            "uplink_failbacks",
            "Returns to the preferred endpoint after it was healthy again",
            m.uplink_failbacks.clone(),
        );
        registry.register(
            "uplink_failovers",
            "Moves to the next hub endpoint after the active one failed",
            m.uplink_failovers.clone(),
        );
        registry.register(
            "uplink_endpoint",
            "1 for the hub endpoint of the established session, 0 for endpoints used before",
            m.uplink_endpoint.clone(),
        );
        registry.register(
            "uplink_rtt_seconds",
            "Smoothed QUIC round-trip time of the hub session",
            m.uplink_rtt_seconds.clone(),
        );
        registry.register(
            "uplink_ack_latency_seconds",
            "Time from sending a batch to the hub's ack, which it sends once the batch is durable",
            m.uplink_ack_latency_seconds.clone(),
        );
        registry.register(
            "uplink_rate_limit_bytes_per_second",
            "Effective uplink rate limit: the lower of uplink.rate_limit_bytes_per_s and the hub's request (0: none)",
            m.uplink_rate_limit_bytes.clone(),
        );
        registry.register(
            "uplink_ack_stalls",
            "Hub sessions ended because batches were in flight and no ack came within uplink.ack_progress_timeout_ms",
            m.uplink_ack_stalls.clone(),
        );
        registry.register(
            "tls_cert_expiry_seconds",
            "Seconds until the gateway's certificate (uplink.cert) expires",
            m.tls_cert_expiry_seconds.clone(),
        );
        registry.register(
            "tls_reloads",
            "Reloads of the gateway's certificate, key or CA after the files changed",
            m.tls_reloads.clone(),
        );
        registry.register(
            "manifest_version",
            "Version of the workload manifest in use (0: none)",
            m.manifest_version.clone(),
        );
        registry.register(
            "manifest_refusals",
            "Workload manifests refused (unknown_key, bad_signature, invalid, rollback, artifact, io, no_keys)",
            m.manifest_refusals.clone(),
        );
        registry.register("workload_running", "1 while the workload's process runs", m.workload_running.clone());
        registry.register("workload_restarts", "Restarts of a workload", m.workload_restarts.clone());
        registry.register(
            "workload_log_dropped_lines",
            "Output lines of a workload dropped because the store could not keep up",
            m.workload_log_dropped.clone(),
        );
        registry.register(
            "store_commit_seconds",
            "Time to make one batch durable in the store",
            m.store_commit_seconds.clone(),
        );
        registry.register("store_disk_bytes", "Size of the store file", m.store_disk_bytes.clone());
        registry.register(
            "store_budget_bytes",
            "Most bytes of records the store holds (store.max_bytes or the sum of lane budgets)",
            m.store_budget_bytes.clone(),
        );
        registry.register("store_used_bytes", "Bytes of records held over all lanes", m.store_used_bytes.clone());
        registry.register("mqtt_errors", "MQTT connection errors", m.mqtt_errors.clone());
        registry.register(
            "sensor_errors",
            "Failed polls of a sensor on the gateway's own I2C bus (open, bus, CRC or chip id errors)",
            m.sensor_errors.clone(),
        );
        Self { registry, ..m }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }

    /// Counts evictions and logs them (one line per eviction batch).
    pub fn evicted(&self, evictions: &[crate::store::Eviction]) {
        for e in evictions {
            let l = DropLabel { lane: e.lane.clone(), reason: e.reason.as_str().into() };
            self.evicted_records.get_or_create(&l).inc_by(e.records);
            self.evicted_bytes.get_or_create(&l).inc_by(e.bytes);
            tracing::warn!(
                lane = %e.lane,
                reason = e.reason.as_str(),
                from_seq = e.from_seq,
                through_seq = e.through_seq,
                records = e.records,
                "Lane over budget or TTL, evicted oldest records; the hub will be told the range."
            );
        }
    }

    /// Label helper.
    pub fn lane(lane: &str) -> LaneLabel {
        LaneLabel { lane: lane.to_owned() }
    }

    /// Label helper for `{sensor}`.
    pub fn sensor(sensor: &str) -> SensorLabel {
        SensorLabel { sensor: sensor.to_owned() }
    }
}
