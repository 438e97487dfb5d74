//! One task that appends records from non-MQTT sources (sensors, workload output) to
//! the store, one durable commit per batch, counting them like MQTT ingest does and
//! waking the uplink.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};
use tracing::{error, warn};
use voither_proto::limit::LogLimiter;

use crate::metrics::Metrics;
use crate::store::{NewRecord, Store};

/// Appends what the senders (sensor threads, workload log readers) send, in batches of
/// whatever is waiting (at most `max_batch`), until every sender is gone. A full
/// backpressure lane or a disk error is retried with backoff; meanwhile the channel
/// fills, which the senders see.
pub async fn append_loop(
    mut rx: mpsc::Receiver<NewRecord>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    appended: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
    max_batch: usize,
) {
    let mut limit = LogLimiter::new(Duration::from_secs(10));
    let started = tokio::time::Instant::now();
    let mut batch: Vec<NewRecord> = Vec::new();
    while rx.recv_many(&mut batch, max_batch).await > 0 {
        let records = Arc::new(std::mem::take(&mut batch));
        let mut wait = Duration::from_millis(50);
        loop {
            let (s, r) = (store.clone(), records.clone());
            let t = tokio::time::Instant::now();
            let e = match tokio::task::spawn_blocking(move || s.append_batch(r.as_slice(), &[])).await {
                Ok(Ok(app)) => {
                    metrics.store_commit_seconds.observe(t.elapsed().as_secs_f64());
                    for r in records.iter() {
                        let l = Metrics::lane(&r.lane);
                        metrics.ingested_records.get_or_create(&l).inc();
                        metrics.ingested_bytes.get_or_create(&l).inc_by(r.payload.len() as u64);
                        metrics.stored_records.get_or_create(&l).inc();
                        metrics.stored_bytes.get_or_create(&l).inc_by(r.payload.len() as u64);
                    }
                    metrics.evicted(&app.evicted);
                    appended.notify_one();
                    break;
                }
                Ok(Err(e)) => e.to_string(),
                Err(e) => format!("store task failed: {e}"),
            };
            if *shutdown.borrow() {
                error!(records = records.len(), error = %e, "Shutting down; records not yet stored are lost.");
                break;
            }
            if let Some(suppressed) = limit.allow("append", started.elapsed()) {
                warn!(records = records.len(), error = %e, suppressed, retry_in_ms = wait.as_millis() as u64, "Cannot store records yet, retrying.");
            }
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => {}
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }
}
