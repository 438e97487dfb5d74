//! The device simulator: N devices publishing QoS 1 to a broker, each message carrying
//! its device id and a counter, so a checker can prove that none is missing or doubled.
//!
//! Payload layout (big-endian): `b"VSIM"`, device id `u32`, counter `u64`, then
//! padding up to the payload size, each padding byte a function of (device, counter,
//! position) so corruption anywhere is detected.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

/// Smallest payload: magic, device id and counter.
pub const HEADER_LEN: usize = 16;

/// What the simulator should do.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Number of devices (one MQTT connection each).
    pub devices: u32,
    /// Messages per device.
    pub messages: u64,
    /// Messages per second per device (0: as fast as the broker acks).
    pub rate: f64,
    /// Payload size in bytes (at least [`HEADER_LEN`]).
    pub payload_size: usize,
    /// Every n-th message goes to the `alarm` topic instead of `telemetry` (0: never).
    pub alarm_every: u64,
    /// Client id prefix.
    pub client_prefix: String,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 1883,
            devices: 10,
            messages: 1000,
            rate: 0.0,
            payload_size: 256,
            alarm_every: 0,
            client_prefix: "voither-sim".into(),
        }
    }
}

/// Live counters of a run.
#[derive(Debug, Default)]
pub struct SimProgress {
    /// Messages handed to the MQTT client.
    pub published: AtomicU64,
    /// Messages the broker acknowledged (PUBACK).
    pub acked: AtomicU64,
}

/// Result of a run.
#[derive(Debug, Clone)]
pub struct SimReport {
    /// Per device: the counters the broker acknowledged, each once.
    pub acked: Vec<Vec<u64>>,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl SimReport {
    /// Total acknowledged messages.
    pub fn total_acked(&self) -> u64 {
        self.acked.iter().map(|v| v.len() as u64).sum()
    }
}

/// Topic of a device's message `counter`.
pub fn topic(cfg: &SimConfig, device: u32, counter: u64) -> String {
    if cfg.alarm_every > 0 && counter % cfg.alarm_every == cfg.alarm_every - 1 {
        format!("devices/{device}/alarm")
    } else {
        format!("devices/{device}/telemetry")
    }
}

fn pad_byte(device: u32, counter: u64, i: usize) -> u8 {
    (device as u64).wrapping_mul(31).wrapping_add(counter.wrapping_mul(17)).wrapping_add(i as u64 * 7) as u8
}

/// Builds the payload of `device`'s message `counter`.
pub fn payload(device: u32, counter: u64, size: usize) -> Vec<u8> {
    let size = size.max(HEADER_LEN);
    let mut p = Vec::with_capacity(size);
    p.extend_from_slice(b"VSIM");
    p.extend_from_slice(&device.to_be_bytes());
    p.extend_from_slice(&counter.to_be_bytes());
    for i in HEADER_LEN..size {
        p.push(pad_byte(device, counter, i));
    }
    p
}

/// Parses a simulator payload; `None` if it is not one or is corrupt.
pub fn parse(p: &[u8]) -> Option<(u32, u64)> {
    if p.len() < HEADER_LEN || &p[..4] != b"VSIM" {
        return None;
    }
    let device = u32::from_be_bytes(p[4..8].try_into().ok()?);
    let counter = u64::from_be_bytes(p[8..16].try_into().ok()?);
    for (i, b) in p.iter().enumerate().skip(HEADER_LEN) {
        if *b != pad_byte(device, counter, i) {
            return None;
        }
    }
    Some((device, counter))
}

/// Runs all devices to completion.
pub async fn run(cfg: SimConfig, progress: Arc<SimProgress>) -> SimReport {
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for d in 0..cfg.devices {
        tasks.push(tokio::spawn(device(cfg.clone(), d, progress.clone())));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.push(t.await.expect("device task"));
    }
    SimReport { acked, elapsed: started.elapsed() }
}

async fn device(cfg: SimConfig, d: u32, progress: Arc<SimProgress>) -> Vec<u64> {
    let mut opts = MqttOptions::new(format!("{}-{d}", cfg.client_prefix), cfg.host.clone(), cfg.port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_inflight(100);
    opts.set_max_packet_size(cfg.payload_size + 64 * 1024, cfg.payload_size + 64 * 1024);
    let (client, mut ev) = AsyncClient::new(opts, 200);
    let total = cfg.messages;
    let c2 = client.clone();
    let cfg2 = cfg.clone();
    let prog = progress.clone();
    let publisher = tokio::spawn(async move {
        let interval = if cfg2.rate > 0.0 { Some(Duration::from_secs_f64(1.0 / cfg2.rate)) } else { None };
        let start = tokio::time::Instant::now();
        for n in 0..total {
            if let Some(iv) = interval {
                tokio::time::sleep_until(start + iv.mul_f64(n as f64)).await;
            }
            let t = topic(&cfg2, d, n);
            if c2.publish(t, QoS::AtLeastOnce, false, payload(d, n, cfg2.payload_size)).await.is_err() {
                break;
            }
            prog.published.fetch_add(1, Ordering::Relaxed);
        }
    });
    // pkid → counter of messages sent and not yet acked.
    let mut pending: std::collections::HashMap<u16, u64> = std::collections::HashMap::new();
    let mut next_counter = 0u64;
    let mut acked = Vec::with_capacity(total as usize);
    let mut seen = std::collections::HashSet::new();
    while (acked.len() as u64) < total {
        match ev.poll().await {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                // rumqttc sends publishes in the order they were queued; retransmits after a
                // reconnect reuse their pkid and are not new counters.
                if let std::collections::hash_map::Entry::Vacant(e) = pending.entry(pkid) {
                    e.insert(next_counter);
                    next_counter += 1;
                }
            }
            Ok(Event::Incoming(Packet::PubAck(a))) => {
                if let Some(c) = pending.remove(&a.pkid) {
                    if seen.insert(c) {
                        acked.push(c);
                        progress.acked.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let _ = publisher.await;
    let _ = client.disconnect().await;
    acked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trip_and_corruption() {
        let p = payload(7, 123456, 256);
        assert_eq!(p.len(), 256);
        assert_eq!(parse(&p), Some((7, 123456)));
        let mut q = p.clone();
        q[200] ^= 1;
        assert_eq!(parse(&q), None);
        assert_eq!(parse(&payload(1, 2, 3)), Some((1, 2)), "payloads are never shorter than the header");
    }
}
