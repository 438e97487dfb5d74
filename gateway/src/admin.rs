//! The admin HTTP endpoint: `/healthz`, `/readyz`, `/metrics`, `/status`.
//!
//! It listens on loopback by default and serves no data records.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::metrics::Metrics;
use crate::store::Store;
use crate::uplink::UplinkStatus;
use crate::Heartbeat;

/// Everything the admin handlers read.
#[derive(Debug)]
pub struct AdminState {
    /// The store (None until open).
    pub store: Arc<Store>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Uplink status.
    pub uplink: Arc<Mutex<UplinkStatus>>,
    /// Loop liveness.
    pub heartbeat: Arc<Heartbeat>,
    /// True once the store is open and the pipeline started.
    pub ready: AtomicBool,
    /// Configured lanes in order.
    pub lanes: Vec<crate::store::LaneSpec>,
    /// The store's total budget.
    pub store_budget: u64,
    /// Workloads.
    pub workloads: Arc<crate::workloads::Workloads>,
}

/// The router.
pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(state)
}

async fn healthz(State(s): State<Arc<AdminState>>) -> Response {
    let stale = s.heartbeat.stale(Duration::from_secs(30));
    if stale.is_empty() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("stalled: {}\n", stale.join(", "))).into_response()
    }
}

async fn readyz(State(s): State<Arc<AdminState>>) -> Response {
    if let Some(why) = s.store.degraded() {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("store cannot write: {why}\n")).into_response();
    }
    if s.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    }
}

/// Refreshes the gauges derived from the store.
pub fn refresh_gauges(s: &AdminState) -> Result<Vec<crate::store::LaneStats>, crate::store::StoreError> {
    let stats = s.store.stats()?;
    let now = crate::unix_ms();
    for st in &stats {
        let l = Metrics::lane(&st.lane);
        s.metrics.backlog_records.get_or_create(&l).set(st.records as i64);
        s.metrics.backlog_bytes.get_or_create(&l).set(st.bytes as i64);
        let age = st.oldest_ingest_ts_ms.map_or(0.0, |t| now.saturating_sub(t) as f64 / 1000.0);
        s.metrics.oldest_unsynced_age.get_or_create(&l).set(age);
    }
    s.metrics.store_disk_bytes.set(s.store.file_size() as i64);
    s.metrics.store_budget_bytes.set(s.store_budget as i64);
    s.metrics.store_used_bytes.set(stats.iter().map(|l| l.bytes).sum::<u64>() as i64);
    s.metrics.store_degraded.set(i64::from(s.store.degraded().is_some()));
    Ok(stats)
}

async fn metrics(State(s): State<Arc<AdminState>>) -> Response {
    let s2 = s.clone();
    let _ = tokio::task::spawn_blocking(move || refresh_gauges(&s2)).await;
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], s.metrics.encode()).into_response()
}

#[derive(serde::Serialize)]
struct LaneView {
    lane: String,
    priority: u8,
    next_seq: u64,
    oldest_seq: u64,
    backlog_records: u64,
    backlog_bytes: u64,
    oldest_unsynced_age_s: f64,
    ingested_records: u64,
    stored_records: u64,
    synced_records: u64,
    budget_bytes: u64,
    full_policy: crate::store::FullPolicy,
    evicted: Evicted,
}

#[derive(serde::Serialize)]
struct MqttView {
    connected: bool,
    subscribed: bool,
}

#[derive(serde::Serialize)]
struct Evicted {
    capacity: u64,
    ttl: u64,
}

#[derive(serde::Serialize)]
struct StatusView {
    agent_version: &'static str,
    uptime_s: u64,
    ready: bool,
    store_path: String,
    store_disk_bytes: u64,
    store_budget_bytes: u64,
    store_error: Option<String>,
    held_messages: i64,
    mqtt: MqttView,
    lanes: Vec<LaneView>,
    uplink: UplinkStatus,
    workloads: WorkloadsView,
}

#[derive(serde::Serialize)]
struct WorkloadsView {
    manifest_version: u64,
    items: Vec<voither_proto::WorkloadState>,
}

async fn status(State(s): State<Arc<AdminState>>) -> Response {
    let s2 = s.clone();
    let stats = match tokio::task::spawn_blocking(move || refresh_gauges(&s2)).await {
        Ok(Ok(st)) => st,
        Ok(Err(e)) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("store: {e}\n")).into_response(),
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    };
    let now = crate::unix_ms();
    let lanes = stats
        .into_iter()
        .map(|st| {
            let l = Metrics::lane(&st.lane);
            let spec = s.lanes.iter().find(|l| l.name == st.lane);
            let ev = |reason: &str| {
                s.metrics
                    .evicted_records
                    .get_or_create(&crate::metrics::DropLabel { lane: st.lane.clone(), reason: reason.into() })
                    .get()
            };
            LaneView {
                priority: spec.map_or(255, |l| l.priority),
                budget_bytes: spec.map_or(0, |l| l.max_bytes),
                full_policy: spec.map(|l| l.policy).unwrap_or_default(),
                evicted: Evicted { capacity: ev("capacity"), ttl: ev("ttl") },
                next_seq: st.next_seq,
                oldest_seq: st.oldest_seq,
                backlog_records: st.records,
                backlog_bytes: st.bytes,
                oldest_unsynced_age_s: st.oldest_ingest_ts_ms.map_or(0.0, |t| now.saturating_sub(t) as f64 / 1000.0),
                ingested_records: s.metrics.ingested_records.get_or_create(&l).get(),
                stored_records: s.metrics.stored_records.get_or_create(&l).get(),
                synced_records: s.metrics.synced_records.get_or_create(&l).get(),
                lane: st.lane,
            }
        })
        .collect();
    Json(StatusView {
        agent_version: env!("CARGO_PKG_VERSION"),
        uptime_s: s.heartbeat.uptime().as_secs(),
        ready: s.ready.load(Ordering::Acquire),
        store_path: s.store.path().display().to_string(),
        store_disk_bytes: s.store.file_size(),
        store_budget_bytes: s.store_budget,
        store_error: s.store.degraded(),
        held_messages: s.metrics.held_messages.get(),
        mqtt: MqttView {
            connected: s.heartbeat.mqtt_connected.load(Ordering::Relaxed),
            subscribed: s.heartbeat.mqtt_subscribed.load(Ordering::Relaxed),
        },
        lanes,
        uplink: s.uplink.lock().expect("status lock").clone(),
        workloads: WorkloadsView { manifest_version: s.workloads.version(), items: s.workloads.states() },
    })
    .into_response()
}
