//! The device simulator: N devices publishing QoS 1 to a broker, each message carrying
//! its device id and a counter, so a checker can prove that none is missing or doubled.
//!
//! Two payload modes:
//!
//! - **VSIM** (the default). Layout (big-endian): `b"VSIM"`, device id `u32`, counter
//!   `u64`, then padding up to the payload size, each padding byte a function of
//!   (device, counter, position) so corruption anywhere is detected.
//! - **Device frames** ([`SimConfig::frames`]). Each payload is a
//!   [`voither_firmware::frame::Frame`] as a device would publish it: device id = device
//!   number, counter = message counter, timestamp and readings computed from (device,
//!   counter) by [`frame_timestamp_ms`] and [`frame_readings`], so a checker can verify
//!   every value. Published to `devices/<n>/frame` (alarms still go to
//!   `devices/<n>/alarm`).
//!
//! [`parse`] recognises both.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use voither_firmware::frame::{Frame, Reading, MAX_ENCODED_LEN};

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
    /// Payload size in bytes (at least [`HEADER_LEN`]); ignored in frame mode, where a
    /// payload is one device frame.
    pub payload_size: usize,
    /// Every n-th message goes to the `alarm` topic instead of `telemetry` (0: never).
    pub alarm_every: u64,
    /// Client id prefix.
    pub client_prefix: String,
    /// Publish device frames ([`frame_payload`]) to `devices/<n>/frame` instead of VSIM
    /// payloads to `devices/<n>/telemetry`. The message counter must then fit a `u32`:
    /// at most 2^32 messages per device.
    pub frames: bool,
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
            frames: false,
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

/// Topic of a device's message `counter`: `devices/<n>/alarm` for every
/// [`SimConfig::alarm_every`]-th message, else `devices/<n>/telemetry`, or
/// `devices/<n>/frame` in frame mode.
pub fn topic(cfg: &SimConfig, device: u32, counter: u64) -> String {
    if cfg.alarm_every > 0 && counter % cfg.alarm_every == cfg.alarm_every - 1 {
        format!("devices/{device}/alarm")
    } else if cfg.frames {
        format!("devices/{device}/frame")
    } else {
        format!("devices/{device}/telemetry")
    }
}

/// The payload of `device`'s message `counter` in the configured mode: a device frame
/// ([`frame_payload`]) or a VSIM payload ([`payload`]).
///
/// # Panics
///
/// In frame mode, if `counter` does not fit a `u32`.
pub fn message_payload(cfg: &SimConfig, device: u32, counter: u64) -> Vec<u8> {
    if cfg.frames {
        let counter = u32::try_from(counter).expect("frame counters are u32: at most 2^32 messages per device");
        frame_payload(device, counter)
    } else {
        payload(device, counter, cfg.payload_size)
    }
}

/// The timestamp of `device`'s frame `counter`: `1_700_000_000_000 + counter` ms.
pub fn frame_timestamp_ms(counter: u32) -> u64 {
    1_700_000_000_000 + u64::from(counter)
}

/// The readings of `device`'s frame `counter`: temperature in m°C,
/// `20_000 + device × 100 + counter % 1000` (wrapping), then relative humidity in m%,
/// `30_000 + (device × 7 + counter × 13) % 40_000`.
pub fn frame_readings(device: u32, counter: u32) -> [Reading; 2] {
    let temperature = 20_000i32.wrapping_add(device.wrapping_mul(100).wrapping_add(counter % 1000) as i32);
    let humidity = 30_000 + (u64::from(device) * 7 + u64::from(counter) * 13) % 40_000;
    [Reading::temperature_milli_celsius(temperature), Reading::relative_humidity_milli_percent(humidity as u32)]
}

/// The device frame of `device`'s message `counter`, encoded: device id, counter,
/// [`frame_timestamp_ms`] and [`frame_readings`].
pub fn frame_payload(device: u32, counter: u32) -> Vec<u8> {
    let mut frame = Frame::new(device, counter, frame_timestamp_ms(counter));
    frame.extend(frame_readings(device, counter)).expect("two readings fit a frame");
    let mut buf = [0u8; MAX_ENCODED_LEN];
    let len = frame.encode(&mut buf).expect("MAX_ENCODED_LEN fits any frame");
    buf[..len].to_vec()
}

/// Parses a simulator device frame; `None` if it is not a frame, or if its timestamp or
/// readings are not the ones [`frame_payload`] gives its (device, counter).
pub fn parse_frame(p: &[u8]) -> Option<(u32, u64)> {
    let frame = Frame::decode(p).ok()?;
    let (device, counter) = (frame.device_id, frame.counter);
    (frame.timestamp_ms == frame_timestamp_ms(counter) && frame.readings() == frame_readings(device, counter))
        .then_some((device, u64::from(counter)))
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

/// Parses a simulator payload, VSIM or device frame ([`parse_frame`]), into
/// (device, counter); `None` if it is neither or is corrupt.
pub fn parse(p: &[u8]) -> Option<(u32, u64)> {
    if p.len() < HEADER_LEN || &p[..4] != b"VSIM" {
        return parse_frame(p);
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
///
/// # Panics
///
/// In frame mode, if [`SimConfig::messages`] is more than 2^32 (frame counters are `u32`).
pub async fn run(cfg: SimConfig, progress: Arc<SimProgress>) -> SimReport {
    assert!(
        !cfg.frames || cfg.messages <= 1 << 32,
        "frame mode: at most 2^32 messages per device (frame counters are u32), not {}",
        cfg.messages
    );
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
            if c2.publish(t, QoS::AtLeastOnce, false, message_payload(&cfg2, d, n)).await.is_err() {
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
        assert_eq!(parse_frame(&p), None, "a VSIM payload is not a frame");
    }

    #[test]
    fn frame_payload_round_trip_and_corruption() {
        let p = frame_payload(2, 4321);
        let frame = Frame::decode(&p).unwrap();
        assert_eq!((frame.device_id, frame.counter, frame.timestamp_ms), (2, 4321, 1_700_000_004_321));
        // 20_000 + 2 × 100 + 4321 % 1000; 30_000 + (2 × 7 + 4321 × 13) % 40_000.
        assert_eq!(frame.readings()[0], Reading::temperature_milli_celsius(20_521));
        assert_eq!(frame.readings()[1], Reading::relative_humidity_milli_percent(46_187));
        assert_eq!(parse_frame(&p), Some((2, 4321)));
        assert_eq!(parse(&p), Some((2, 4321)), "parse recognises frames too");

        // A frame whose values are not the deterministic ones for its (device, counter).
        let mut wrong = Frame::new(2, 4321, frame_timestamp_ms(4321));
        wrong.push(Reading::temperature_milli_celsius(20_522)).unwrap();
        wrong.push(frame_readings(2, 4321)[1]).unwrap();
        let mut buf = [0u8; MAX_ENCODED_LEN];
        let len = wrong.encode(&mut buf).unwrap();
        assert_eq!(parse(&buf[..len]), None);
        // Any flipped bit is either undecodable or a different (device, counter, values).
        for i in 0..p.len() {
            for bit in 0..8 {
                let mut q = p.clone();
                q[i] ^= 1 << bit;
                assert_ne!(parse(&q), Some((2, 4321)), "byte {i} bit {bit}");
            }
        }
    }

    #[test]
    fn frame_mode_topics_and_payloads() {
        let cfg = SimConfig { frames: true, alarm_every: 5, ..Default::default() };
        assert_eq!(topic(&cfg, 3, 0), "devices/3/frame");
        assert_eq!(topic(&cfg, 3, 4), "devices/3/alarm");
        assert_eq!(message_payload(&cfg, 3, 9), frame_payload(3, 9));
        let vsim = SimConfig { alarm_every: 5, ..Default::default() };
        assert_eq!(topic(&vsim, 3, 0), "devices/3/telemetry");
        assert_eq!(message_payload(&vsim, 3, 9), payload(3, 9, 256));
    }
}
