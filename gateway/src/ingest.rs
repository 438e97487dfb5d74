//! MQTT ingest: subscribe with QoS 1 on a persistent session, group-commit what
//! arrives, and acknowledge each message to the broker only after its commit.
//!
//! Two tasks. The event-loop task is the only one that touches rumqttc: it polls the
//! event loop, hands publishes to the committer, and queues the PUBACKs the committer
//! sends back. It never waits on the committer: rumqttc drains its request channel
//! (our PUBACKs) only while it is polled, so a poller blocked on a full hand-off
//! channel while the committer waits on a full request channel would stall both. When
//! too many publishes wait for the committer, the task stops polling for new ones (TCP
//! backpressure reaches the broker) but keeps draining acks.
//!
//! The committer collects up to `batch_max_messages` or `batch_max_delay_ms`, appends
//! them in one durable commit, then returns their PUBACKs.
//!
//! Memory is bounded: publishes waiting are at most `4 × batch_max_messages` plus one
//! batch being committed; the request channel is sized to hold an ack for each.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, error, info, warn};
use voither_proto::limit::LogLimiter;

use crate::config::Config;
use crate::metrics::{DropLabel, Metrics};
use crate::store::{message_hash, NewRecord, Store, StoreError};
use crate::Heartbeat;

/// Runs ingest until `shutdown` turns true.
pub async fn run(
    cfg: Arc<Config>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    appended: Arc<Notify>,
    space: Arc<Notify>,
    heartbeat: Arc<Heartbeat>,
    mut shutdown: watch::Receiver<bool>,
) {
    let m = &cfg.mqtt;
    let mut opts = MqttOptions::new(m.client_id.clone(), m.host.clone(), m.port);
    opts.set_clean_session(false);
    opts.set_manual_acks(true);
    opts.set_keep_alive(Duration::from_secs(m.keep_alive_s));
    // Incoming limit above the payload limit, so an oversized message is refused by us
    // (counted, acked, dropped) instead of breaking the connection for ever after.
    let incoming = (m.max_payload_bytes * 2 + 64 * 1024).max(1024 * 1024);
    opts.set_max_packet_size(incoming, 64 * 1024);
    if let (Some(u), Some(p)) = (&m.username, &m.password) {
        opts.set_credentials(u.clone(), p.expose());
    }
    let batch = m.batch_max_messages;
    let handoff = batch * 2;
    let overflow_max = batch * 4;
    // Every publish not yet acked fits: hand-off + overflow + one batch in commit.
    let cap = handoff + overflow_max + batch + 64;
    opts.set_request_channel_capacity(cap);
    let (client, mut eventloop) = AsyncClient::new(opts, cap);
    let (tx, rx) = mpsc::channel::<Publish>(handoff);
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<Vec<Publish>>();

    let filters = cfg.subscriptions();
    let committer =
        tokio::spawn(commit_loop(cfg.clone(), store, metrics.clone(), appended, space, ack_tx, rx, heartbeat.clone()));

    let mut overflow: VecDeque<Publish> = VecDeque::new();
    let mut unsent_acks: VecDeque<Publish> = VecDeque::new();
    let mut backoff = Duration::from_millis(100);
    let mut suback_pending = 0usize;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        while let Some(p) = unsent_acks.front() {
            if client.try_ack(p).is_err() {
                break;
            }
            unsent_acks.pop_front();
        }
        // PUBACKs can fall far behind commits: rumqttc's event loop sends one request
        // per poll and hands out up to ten incoming packets first, and a broker without
        // an in-flight limit keeps sending. A deque never gives its capacity back, and
        // at hundreds of thousands of entries that capacity is tens of MiB held for
        // good; return it once the acks have caught up.
        if unsent_acks.is_empty() && unsent_acks.capacity() > cap {
            unsent_acks.shrink_to(cap);
        }
        while let Some(p) = overflow.pop_front() {
            match tx.try_send(p) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(p)) => {
                    overflow.push_front(p);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
        let can_poll = overflow.len() < overflow_max;
        tokio::select! {
            _ = shutdown.changed() => break,
            acks = ack_rx.recv() => match acks {
                Some(acks) => unsent_acks.extend(acks),
                None => break,
            },
            permit = tx.reserve(), if !overflow.is_empty() => match permit {
                Ok(permit) => permit.send(overflow.pop_front().expect("non-empty")),
                Err(_) => break,
            },
            ev = eventloop.poll(), if can_poll => match ev {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backoff = Duration::from_millis(100);
                    heartbeat.mqtt_connected.store(true, Ordering::Relaxed);
                    heartbeat.mqtt_subscribed.store(false, Ordering::Relaxed);
                    suback_pending = filters.len();
                    info!(host = %cfg.mqtt.host, port = cfg.mqtt.port, session_present = ack.session_present, "Connected to the MQTT broker.");
                    for f in &filters {
                        if let Err(e) = client.try_subscribe(f.clone(), QoS::AtLeastOnce) {
                            warn!(filter = %f, error = %e, "Could not queue the subscription.");
                        }
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    heartbeat.ingest.tick();
                    overflow.push_back(p);
                }
                Ok(Event::Incoming(Packet::SubAck(s))) => {
                    debug!(pkid = s.pkid, "Subscribed.");
                    if s.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                        error!("The broker refused a subscription; check its ACL for this client.");
                    }
                    suback_pending = suback_pending.saturating_sub(1);
                    if suback_pending == 0 {
                        heartbeat.mqtt_subscribed.store(true, Ordering::Relaxed);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    heartbeat.mqtt_connected.store(false, Ordering::Relaxed);
                    heartbeat.mqtt_subscribed.store(false, Ordering::Relaxed);
                    metrics.mqtt_errors.inc();
                    warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "MQTT connection failed, retrying.");
                    tokio::select! {
                        _ = shutdown.changed() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            },
            _ = tick.tick() => heartbeat.ingest.tick(),
        }
    }
    drop(tx);
    // The committer finishes the batch it holds; its acks go out below if the broker
    // is still there, else the broker redelivers and the redelivery check catches it.
    let _ = committer.await;
    while let Ok(acks) = ack_rx.try_recv() {
        unsent_acks.extend(acks);
    }
    for p in &unsent_acks {
        let _ = client.try_ack(p);
    }
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(500), async { while eventloop.poll().await.is_ok() {} }).await;
}

#[allow(clippy::too_many_arguments)]
async fn commit_loop(
    cfg: Arc<Config>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    appended: Arc<Notify>,
    space: Arc<Notify>,
    acks: mpsc::UnboundedSender<Vec<Publish>>,
    mut rx: mpsc::Receiver<Publish>,
    heartbeat: Arc<Heartbeat>,
) {
    let max = cfg.mqtt.batch_max_messages;
    let delay = Duration::from_millis(cfg.mqtt.batch_max_delay_ms);
    let held_cap = max * 4;
    let mut inflight: HashMap<u16, u64> = match store.mqtt_inflight() {
        Ok(m) => m,
        Err(e) => {
            error!(error = %e, "Cannot read the MQTT redelivery table; redeliveries after a crash may be stored twice.");
            HashMap::new()
        }
    };
    let mut limit = LogLimiter::new(Duration::from_secs(10));
    let started = tokio::time::Instant::now();
    // Messages of full backpressure lanes, oldest first, not acked.
    let mut held: Vec<Publish> = Vec::new();
    let mut open = true;
    while open || !held.is_empty() {
        heartbeat.committer.tick();
        let mut batch: Vec<Publish> = Vec::new();
        if held.len() < held_cap && open {
            let first = tokio::select! {
                p = rx.recv() => p,
                _ = space.notified(), if !held.is_empty() => None,
                _ = tokio::time::sleep(Duration::from_secs(1)) => None,
            };
            match first {
                Some(p) => {
                    batch.push(p);
                    let deadline = tokio::time::Instant::now() + delay;
                    while batch.len() < max {
                        match tokio::time::timeout_at(deadline, rx.recv()).await {
                            Ok(Some(p)) => batch.push(p),
                            Ok(None) => {
                                open = false;
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                }
                None if rx.is_closed() && rx.is_empty() => open = false,
                None => {}
            }
        } else if !held.is_empty() {
            // Full: wait for the uplink or the TTL sweep to free space.
            tokio::select! {
                _ = space.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            if !open && held.is_empty() {
                break;
            }
        }
        if batch.is_empty() && held.is_empty() {
            continue;
        }
        let mut candidates = std::mem::take(&mut held);
        candidates.extend(batch);
        let (done, still_held) = commit(&cfg, &store, &metrics, &mut inflight, candidates, &mut limit, started).await;
        held = still_held;
        metrics.held_messages.set(held.len() as i64);
        if !done.is_empty() {
            appended.notify_one();
            if acks.send(done).is_err() {
                break;
            }
        }
        if !open && !held.is_empty() {
            // Shutting down with messages held: they stay unacked; the broker keeps them.
            break;
        }
    }
}

/// Commits what it can of `batch`; returns the PUBACKs to send and the messages held
/// back because their backpressure lane is full (in order).
async fn commit(
    cfg: &Config,
    store: &Arc<Store>,
    metrics: &Metrics,
    inflight: &mut HashMap<u16, u64>,
    batch: Vec<Publish>,
    limit: &mut LogLimiter,
    started: tokio::time::Instant,
) -> (Vec<Publish>, Vec<Publish>) {
    let mut cands: Vec<(Publish, String, u64)> = Vec::with_capacity(batch.len());
    let mut ack_only = Vec::new();
    let mut held = Vec::new();
    let now_ms = crate::unix_ms();
    for p in batch {
        let hash = message_hash(&p.topic, &p.payload);
        if p.dup && inflight.get(&p.pkid) == Some(&hash) {
            // Stored before a crash or reconnect, PUBACK lost: acknowledge, do not store.
            metrics.redelivered_duplicates.inc();
            ack_only.push(Publish { payload: Default::default(), ..p });
            continue;
        }
        let Some(lane) = cfg.lane_for(&p.topic) else {
            if let Some(suppressed) = limit.allow("unrouted", started.elapsed()) {
                warn!(topic = %p.topic, suppressed, "Message matches no lane, dropped.");
            }
            metrics.dropped_records.get_or_create(&DropLabel { lane: String::new(), reason: "unrouted".into() }).inc();
            ack_only.push(Publish { payload: Default::default(), ..p });
            continue;
        };
        if p.payload.len() > cfg.mqtt.max_payload_bytes {
            if let Some(suppressed) = limit.allow("oversize", started.elapsed()) {
                warn!(topic = %p.topic, bytes = p.payload.len(), limit = cfg.mqtt.max_payload_bytes, suppressed, "Payload over mqtt.max_payload_bytes, dropped.");
            }
            metrics
                .dropped_records
                .get_or_create(&DropLabel { lane: lane.name.clone(), reason: "oversize".into() })
                .inc();
            ack_only.push(Publish { payload: Default::default(), ..p });
            continue;
        }
        cands.push((p, lane.name.clone(), hash));
    }
    let mut wait = Duration::from_millis(50);
    while !cands.is_empty() {
        let records: Vec<NewRecord> = cands
            .iter()
            .map(|(p, lane, _)| NewRecord {
                lane: lane.clone(),
                ingest_ts_ms: now_ms,
                source: p.topic.clone(),
                content_type: None,
                payload: p.payload.to_vec(),
            })
            .collect();
        let entries: Vec<(u16, u64)> = cands.iter().map(|(p, _, h)| (p.pkid, *h)).collect();
        let s = store.clone();
        let started = tokio::time::Instant::now();
        let ents = entries.clone();
        match tokio::task::spawn_blocking(move || s.append_batch(&records, &ents)).await {
            Ok(Ok(app)) => {
                metrics.store_commit_seconds.observe(started.elapsed().as_secs_f64());
                for (p, lane, _) in &cands {
                    let l = Metrics::lane(lane);
                    metrics.ingested_records.get_or_create(&l).inc();
                    metrics.ingested_bytes.get_or_create(&l).inc_by(p.payload.len() as u64);
                    metrics.stored_records.get_or_create(&l).inc();
                    metrics.stored_bytes.get_or_create(&l).inc_by(p.payload.len() as u64);
                }
                metrics.evicted(&app.evicted);
                for (pkid, hash) in &entries {
                    inflight.insert(*pkid, *hash);
                }
                let mut acks: Vec<Publish> =
                    cands.into_iter().map(|(p, _, _)| Publish { payload: Default::default(), ..p }).collect();
                acks.extend(ack_only);
                return (acks, held);
            }
            Ok(Err(StoreError::Full { lane, held: bytes, budget })) => {
                // Backpressure: keep the newer half of this lane's messages unacked and
                // retry with the older half, down to single messages, so whatever fits is
                // committed and the order within the lane is kept.
                let positions: Vec<usize> =
                    cands.iter().enumerate().filter(|(_, (_, l, _))| *l == lane).map(|(i, _)| i).collect();
                let keep = positions.len() / 2;
                let tail: std::collections::HashSet<usize> = positions[keep..].iter().copied().collect();
                let mut rest = Vec::with_capacity(cands.len());
                let mut newly_held = Vec::new();
                for (i, c) in cands.into_iter().enumerate() {
                    if tail.contains(&i) {
                        newly_held.push(c.0);
                    } else {
                        rest.push(c);
                    }
                }
                debug!(%lane, bytes, budget, holding = newly_held.len(), "Lane full, holding messages.");
                // Older than anything held before in this call: they go first.
                held.splice(0..0, newly_held);
                cands = rest;
            }
            Ok(Err(e)) => {
                // Not acked, so not lost: retry; the broker keeps the messages meanwhile.
                error!(error = %e, records = cands.len(), retry_in_ms = wait.as_millis() as u64, "Store commit failed, retrying.");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                error!(error = %e, "Store commit task failed, retrying.");
                tokio::time::sleep(wait).await;
            }
        }
    }
    // Held messages keep their order relative to the new ones of the same lane because
    // candidates were built from held first.
    (ack_only, held)
}
