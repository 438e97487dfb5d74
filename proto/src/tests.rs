//! Gateway and hub sessions driven against each other: see `sim` for the harness.
//!
//! The harness follows quinn-proto's `Pair`: both state machines run in one thread
//! against a virtual clock, frames cross a simulated network (latency, loss,
//! reordering, duplication) as encoded bytes, the gateway reads from a simulated
//! durable store and the hub commits to a simulated sink with pipelined, delayed
//! commits. Every end-to-end test finishes with [`sim::Sim::check_exactly_once`]:
//! every record appended is in the sink(s) exactly once, in seq order, payload intact,
//! and the gateway's store is empty.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::codec::{encode_frame, FrameDecoder, MAX_FRAME_LEN};
use crate::frame::*;
use crate::gateway::{GatewayConfig, GatewayEvent, GatewaySession, LaneInit};
use crate::hub::{HubEvent, HubInfo, HubSession, StoreRequest};
use crate::{error_code, ProtoError, PROTOCOL_VERSION};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

mod sim {
    use super::*;

    /// Behaviour of the simulated network (both directions).
    #[derive(Debug, Clone)]
    pub(super) struct NetConfig {
        /// Base one-way delay.
        pub latency: Duration,
        /// Extra random delay in `[0, jitter]` per frame: frames overtake each other.
        pub jitter: Duration,
        /// Probability that a frame is dropped.
        pub loss: f64,
        /// Probability that a frame is delivered twice.
        pub dup: f64,
    }

    impl Default for NetConfig {
        fn default() -> Self {
            Self { latency: ms(10), jitter: Duration::ZERO, loss: 0.0, dup: 0.0 }
        }
    }

    /// Faults injected at random.
    #[derive(Debug, Clone, Default)]
    pub(super) struct FaultConfig {
        /// Per-step probability of a gateway crash.
        pub gateway_crash: f64,
        /// Per-step probability of a hub crash.
        pub hub_crash: f64,
        /// Per-step probability of a connection reset (both processes survive).
        pub reset: f64,
        /// Per-commit probability that the hub crashes right after the sink commit,
        /// before its ack reaches the wire.
        pub hub_crash_after_commit: f64,
        /// Most random faults over the run.
        pub budget: u32,
    }

    #[derive(Debug, Clone)]
    pub(super) struct SimConfig {
        pub seed: u64,
        /// (lane name, priority).
        pub lanes: Vec<(String, u8)>,
        pub gateway: GatewayConfig,
        pub net: NetConfig,
        /// Sink commit latency (commits are pipelined but complete in order).
        pub commit_delay: Duration,
        pub commit_jitter: Duration,
        /// The drivers give up on a connection whose handshake does not finish in time.
        pub handshake_timeout: Duration,
        pub faults: FaultConfig,
        /// Number of hubs, each with its own sink (failover).
        pub hubs: usize,
        /// The hub driver only reports marks of lanes its sink already knows.
        pub omit_unknown_lanes_in_marks: bool,
        /// The hub sends a `Command` after each `Welcome`.
        pub send_commands: bool,
        pub max_steps: u64,
        pub max_time: Duration,
    }

    impl SimConfig {
        pub fn new(seed: u64, lanes: &[(&str, u8)]) -> Self {
            Self {
                seed,
                lanes: lanes.iter().map(|(n, p)| ((*n).to_owned(), *p)).collect(),
                gateway: GatewayConfig {
                    window_batches: 8,
                    max_batch_records: 64,
                    max_batch_bytes: 16 * 1024,
                    ack_timeout: ms(500),
                    status_interval: Duration::from_secs(1),
                    starvation_slots: 4,
                },
                net: NetConfig::default(),
                commit_delay: ms(2),
                commit_jitter: ms(3),
                handshake_timeout: ms(500),
                faults: FaultConfig::default(),
                hubs: 1,
                omit_unknown_lanes_in_marks: false,
                send_commands: false,
                max_steps: 3_000_000,
                max_time: Duration::from_secs(24 * 3600),
            }
        }
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) enum Fault {
        /// Gateway process dies: session and connection gone, store kept.
        GatewayCrash,
        /// Hub process dies: session, connection and uncommitted commits gone, sink kept.
        HubCrash,
        /// Connection breaks, both processes survive (in-flight commits still land).
        Reset,
        /// Connection breaks and the gateway reconnects to hub `n` (its own sink).
        Failover(usize),
    }

    // ---------------------------------------------------------------- gateway store

    #[derive(Debug, Default)]
    struct StoreLane {
        priority: u8,
        records: BTreeMap<u64, Record>,
        bytes: u64,
        next_seq: u64,
    }

    /// The gateway's durable store: survives gateway crashes.
    #[derive(Debug, Default)]
    pub(super) struct GatewayStore {
        lanes: BTreeMap<String, StoreLane>,
    }

    impl GatewayStore {
        pub fn new(lanes: &[(String, u8)]) -> Self {
            let lanes = lanes
                .iter()
                .map(|(n, p)| (n.clone(), StoreLane { priority: *p, next_seq: 1, ..Default::default() }))
                .collect();
            Self { lanes }
        }

        fn lane(&self, lane: &str) -> &StoreLane {
            self.lanes.get(lane).unwrap_or_else(|| panic!("unknown lane {lane}"))
        }

        /// Durable append: assigns the next seq (never reused).
        pub fn append(
            &mut self,
            lane: &str,
            ingest_ts_ms: u64,
            source: String,
            content_type: Option<String>,
            payload: Vec<u8>,
        ) -> Record {
            let l = self.lanes.get_mut(lane).expect("known lane");
            let record = Record { seq: l.next_seq, ingest_ts_ms, source, content_type, payload: payload.into() };
            l.next_seq += 1;
            l.bytes += record.approx_size() as u64;
            l.records.insert(record.seq, record.clone());
            record
        }

        pub fn next_seq(&self, lane: &str) -> u64 {
            self.lane(lane).next_seq
        }

        pub fn held(&self, lane: &str) -> usize {
            self.lane(lane).records.len()
        }

        pub fn is_empty(&self) -> bool {
            self.lanes.values().all(|l| l.records.is_empty())
        }

        /// What a starting session is told about each lane.
        pub fn lane_inits(&self) -> Vec<LaneInit> {
            self.lanes
                .iter()
                .map(|(name, l)| LaneInit {
                    name: name.clone(),
                    priority: l.priority,
                    oldest_unacked: l.records.keys().next().copied().unwrap_or(l.next_seq),
                    next_seq: l.next_seq,
                })
                .collect()
        }

        /// Records with seq >= `from`, up to `max_records` and `max_bytes` (but always
        /// at least one if there is one, so a large record cannot stall the lane).
        pub fn read(&self, lane: &str, from: u64, max_records: usize, max_bytes: usize) -> Vec<Record> {
            let mut out = Vec::new();
            let mut bytes = 0;
            for r in self.lane(lane).records.range(from..).map(|(_, r)| r) {
                if out.len() >= max_records || (!out.is_empty() && bytes + r.approx_size() > max_bytes) {
                    break;
                }
                bytes += r.approx_size();
                out.push(r.clone());
            }
            out
        }

        /// Seqs held at or below `through`.
        pub fn seqs_through(&self, lane: &str, through: u64) -> Vec<u64> {
            self.lane(lane).records.range(..=through).map(|(s, _)| *s).collect()
        }

        pub fn delete_through(&mut self, lane: &str, through: u64) {
            let l = self.lanes.get_mut(lane).expect("known lane");
            let keep = l.records.split_off(&(through + 1));
            for r in l.records.values() {
                l.bytes -= r.approx_size() as u64;
            }
            l.records = keep;
        }

        pub fn status(&self, uptime_s: u64) -> Status {
            Status {
                uptime_s,
                lanes: self
                    .lanes
                    .iter()
                    .map(|(n, l)| LaneStatus {
                        lane: n.clone(),
                        backlog_records: l.records.len() as u64,
                        backlog_bytes: l.bytes,
                        oldest_unsynced_age_ms: 0,
                    })
                    .collect(),
                store_used_bytes: Some(self.lanes.values().map(|l| l.bytes).sum()),
                store_budget_bytes: None,
                manifest_version: None,
                workloads: None,
            }
        }
    }

    // ---------------------------------------------------------------- hub sink

    #[derive(Debug, Default)]
    pub(super) struct SinkLane {
        pub records: BTreeMap<u64, Record>,
        pub gaps: Vec<Gap>,
        pub hwm: u64,
        /// Seqs in the order they were committed.
        pub log: Vec<u64>,
    }

    /// A hub's durable sink: survives hub crashes.
    #[derive(Debug, Default)]
    pub(super) struct Sink {
        pub lanes: BTreeMap<String, SinkLane>,
        /// Records committed although their seq was already present.
        pub duplicates: u64,
        /// Commits whose `through_seq` was below the durable mark.
        pub hwm_regressions: u64,
        pub commits: u64,
    }

    impl Sink {
        pub fn hwm(&self, lane: &str) -> u64 {
            self.lanes.get(lane).map_or(0, |l| l.hwm)
        }

        pub fn knows(&self, lane: &str) -> bool {
            self.lanes.contains_key(lane)
        }

        pub fn get(&self, lane: &str, seq: u64) -> Option<&Record> {
            self.lanes.get(lane).and_then(|l| l.records.get(&seq))
        }

        pub fn apply(&mut self, req: &StoreRequest) {
            self.commits += 1;
            let l = self.lanes.entry(req.lane.clone()).or_default();
            if req.through_seq < l.hwm {
                self.hwm_regressions += 1;
            }
            for r in req.records.to_vec() {
                assert!(
                    r.seq <= req.through_seq,
                    "store request {} holds seq {} beyond its mark",
                    req.through_seq,
                    r.seq
                );
                if l.records.insert(r.seq, r.clone()).is_some() {
                    self.duplicates += 1;
                }
                l.log.push(r.seq);
            }
            l.gaps.extend(req.gaps.iter().cloned());
            l.hwm = req.through_seq;
        }
    }

    // ---------------------------------------------------------------- network

    #[derive(Debug)]
    struct Link {
        /// (deliver_at, frame id) → encoded frame.
        queue: BTreeMap<(Duration, u64), Vec<u8>>,
        decoder: FrameDecoder,
        last_delivered: u64,
    }

    impl Link {
        fn new() -> Self {
            Self { queue: BTreeMap::new(), decoder: FrameDecoder::new(MAX_FRAME_LEN), last_delivered: 0 }
        }

        fn next_at(&self) -> Option<Duration> {
            self.queue.keys().next().map(|k| k.0)
        }
    }

    #[derive(Debug)]
    struct Commit {
        done_at: Duration,
        /// Hub session generation that asked for it.
        generation: u64,
        hub: usize,
        req: StoreRequest,
    }

    /// A batch handed to the gateway session, in order.
    #[derive(Debug, Clone)]
    pub(super) struct Sent {
        pub lane: String,
        pub first: u64,
        pub last: u64,
    }

    #[derive(Debug, Default, Clone)]
    pub(super) struct Stats {
        pub steps: u64,
        pub sessions: u64,
        pub frames_sent: u64,
        pub frames_lost: u64,
        pub frames_duplicated: u64,
        pub frames_reordered: u64,
        pub batches_sent: u64,
        pub records_sent: u64,
        pub records_resent: u64,
        pub acks_received: u64,
        pub rejections: u64,
        pub acked_events: u64,
        /// Acks the gateway learned from a `Welcome` (the hub held more than was acked).
        pub welcome_acks: u64,
        pub commands: u64,
        pub statuses: u64,
        pub commits: u64,
        /// Commits that landed after the session that requested them was gone.
        pub orphan_commits: u64,
        pub empty_reads: u64,
        pub gateway_crashes: u64,
        pub hub_crashes: u64,
        pub hub_crashes_after_commit: u64,
        pub resets: u64,
        pub failovers: u64,
        pub handshake_timeouts: u64,
    }

    /// Gateway, hub, store, sink(s) and network under one virtual clock.
    #[derive(Debug)]
    pub(super) struct Sim {
        pub cfg: SimConfig,
        rng: StdRng,
        pub now: Duration,
        pub store: GatewayStore,
        pub sinks: Vec<Sink>,
        pub active_hub: usize,
        pub gw: GatewaySession,
        gw_started: Duration,
        gw_welcomed: bool,
        boot_id: u64,
        pub hub: HubSession,
        hub_generation: u64,
        /// `Hello` waiting for the sink's marks.
        hello: Option<Hello>,
        commits: VecDeque<Commit>,
        to_hub: Link,
        to_gw: Link,
        frame_id: u64,
        appends: VecDeque<(Duration, String)>,
        /// Everything ever appended, per lane, in seq order.
        pub expected: BTreeMap<String, Vec<Record>>,
        max_sent: BTreeMap<String, u64>,
        pub stats: Stats,
        pub send_log: Vec<Sent>,
        pub errors: Vec<ProtoError>,
        faults_left: u32,
        scheduled: BTreeMap<u64, Fault>,
        pending_fault: Option<Fault>,
    }

    impl Sim {
        pub fn new(cfg: SimConfig) -> Self {
            let mut rng = StdRng::seed_from_u64(cfg.seed);
            let store = GatewayStore::new(&cfg.lanes);
            let boot_id = rng.random();
            let gw = GatewaySession::new(cfg.gateway.clone(), "sim", boot_id, store.lane_inits());
            let hub = HubSession::new("gw-sim", HubInfo::default());
            let mut sim = Self {
                rng,
                now: Duration::ZERO,
                store,
                sinks: (0..cfg.hubs).map(|_| Sink::default()).collect(),
                active_hub: 0,
                gw,
                gw_started: Duration::ZERO,
                gw_welcomed: false,
                boot_id,
                hub,
                hub_generation: 0,
                hello: None,
                commits: VecDeque::new(),
                to_hub: Link::new(),
                to_gw: Link::new(),
                frame_id: 0,
                appends: VecDeque::new(),
                expected: cfg.lanes.iter().map(|(n, _)| (n.clone(), Vec::new())).collect(),
                max_sent: BTreeMap::new(),
                stats: Stats::default(),
                send_log: Vec::new(),
                errors: Vec::new(),
                faults_left: cfg.faults.budget,
                scheduled: BTreeMap::new(),
                pending_fault: None,
                cfg,
            };
            sim.connect();
            sim
        }

        // ------------------------------------------------------------ workload

        fn append_one(&mut self, lane: &str) {
            let len = self.rng.random_range(0..64);
            let payload: Vec<u8> = (0..len).map(|_| self.rng.random()).collect();
            let seq = self.store.next_seq(lane);
            let record = self.store.append(
                lane,
                1_700_000_000_000 + self.now.as_millis() as u64,
                format!("sensors/{lane}/{}", seq % 7),
                seq.is_multiple_of(3).then(|| "application/cbor".to_owned()),
                payload,
            );
            self.expected.get_mut(lane).expect("known lane").push(record);
            self.gw.notify_appended(lane, self.store.next_seq(lane));
        }

        /// Appends `n` records to `lane` now.
        pub fn append_now(&mut self, lane: &str, n: usize) {
            for _ in 0..n {
                self.append_one(lane);
            }
            self.pump();
        }

        /// Schedules `n` appends at random times in `[now, now + span)` over random lanes.
        pub fn schedule_appends(&mut self, n: usize, span: Duration) {
            let lanes: Vec<String> = self.cfg.lanes.iter().map(|(n, _)| n.clone()).collect();
            let mut all: Vec<(Duration, String)> = self.appends.drain(..).collect();
            for _ in 0..n {
                let at = self.now + Duration::from_nanos(self.rng.random_range(0..span.as_nanos().max(1) as u64));
                let lane = lanes[self.rng.random_range(0..lanes.len())].clone();
                all.push((at, lane));
            }
            all.sort_by_key(|(t, _)| *t);
            self.appends = all.into();
        }

        /// Schedules `fault` to happen at step `step`.
        pub fn schedule_fault(&mut self, step: u64, fault: Fault) {
            self.scheduled.insert(step, fault);
        }

        pub fn scheduled_faults_left(&self) -> usize {
            self.scheduled.len()
        }

        // ------------------------------------------------------------ connections

        fn connect(&mut self) {
            self.gw = GatewaySession::new(self.cfg.gateway.clone(), "sim", self.boot_id, self.store.lane_inits());
            self.hub = HubSession::new(
                "gw-sim",
                HubInfo { hub_id: format!("hub-{}", self.active_hub), region: "sim".into(), endpoints: Vec::new() },
            );
            self.hub_generation += 1;
            self.hello = None;
            self.to_hub = Link::new();
            self.to_gw = Link::new();
            self.gw_started = self.now;
            self.gw_welcomed = false;
            self.stats.sessions += 1;
        }

        fn apply_fault(&mut self, fault: Fault) {
            // Frames are delivered whole, so a broken connection leaves no partial frame.
            self.to_hub.decoder.finish().expect("no partial frame towards the hub");
            self.to_gw.decoder.finish().expect("no partial frame towards the gateway");
            match fault {
                Fault::GatewayCrash => {
                    self.stats.gateway_crashes += 1;
                    self.boot_id = self.rng.random();
                }
                Fault::HubCrash => {
                    self.stats.hub_crashes += 1;
                    let hub = self.active_hub;
                    self.commits.retain(|c| c.hub != hub);
                }
                Fault::Reset => self.stats.resets += 1,
                Fault::Failover(n) => {
                    self.stats.failovers += 1;
                    self.active_hub = n;
                }
            }
            self.connect();
        }

        /// Gateway reconnects to hub `n` (quiescent or not).
        pub fn failover(&mut self, n: usize) {
            self.apply_fault(Fault::Failover(n));
            self.pump();
        }

        fn fault_later(&mut self, fault: Fault) {
            if self.pending_fault.is_none() {
                self.pending_fault = Some(fault);
            }
        }

        fn protocol_error(&mut self, e: ProtoError) {
            self.errors.push(e);
            // The driver closes the connection with e.code() and reconnects.
            self.fault_later(Fault::Reset);
        }

        // ------------------------------------------------------------ network

        fn transmit(&mut self, to_hub: bool, frame: &Frame) {
            let mut bytes = Vec::new();
            encode_frame(frame, &mut bytes, MAX_FRAME_LEN).expect("frame within the limit");
            self.stats.frames_sent += 1;
            let net = self.cfg.net.clone();
            if net.loss > 0.0 && self.rng.random_bool(net.loss) {
                self.stats.frames_lost += 1;
                return;
            }
            let copies = if net.dup > 0.0 && self.rng.random_bool(net.dup) {
                self.stats.frames_duplicated += 1;
                2
            } else {
                1
            };
            for _ in 0..copies {
                let extra = Duration::from_nanos(self.rng.random_range(0..=net.jitter.as_nanos() as u64));
                self.frame_id += 1;
                let link = if to_hub { &mut self.to_hub } else { &mut self.to_gw };
                link.queue.insert((self.now + net.latency + extra, self.frame_id), bytes.clone());
            }
        }

        fn deliver(&mut self, to_hub: bool) {
            let link = if to_hub { &mut self.to_hub } else { &mut self.to_gw };
            let ((_, id), bytes) = link.queue.pop_first().expect("a frame is due");
            if id < link.last_delivered {
                self.stats.frames_reordered += 1;
            }
            link.last_delivered = link.last_delivered.max(id);
            // Feed the bytes in two pieces so the decoder sees partial frames.
            let split = self.rng.random_range(0..=bytes.len());
            link.decoder.push(&bytes[..split]);
            if split < bytes.len() {
                assert_eq!(link.decoder.next_frame(), Ok(None), "partial frame must not decode");
            }
            link.decoder.push(&bytes[split..]);
            let frame = link.decoder.next_frame().expect("valid frame").expect("a whole frame");
            assert_eq!(link.decoder.next_frame(), Ok(None));
            assert_eq!(link.decoder.pending(), 0);
            if to_hub {
                if let Err(e) = self.hub.handle_frame(frame) {
                    self.protocol_error(e);
                }
            } else {
                if let Frame::Ack(a) = &frame {
                    self.stats.acks_received += 1;
                    if a.rejected_batch.is_some() {
                        self.stats.rejections += 1;
                    }
                }
                if let Err(e) = self.gw.handle_frame(self.now, frame) {
                    self.protocol_error(e);
                }
            }
        }

        // ------------------------------------------------------------ drivers

        fn on_acked(&mut self, lane: &str, through: u64) {
            self.stats.acked_events += 1;
            if !self.gw_welcomed {
                self.stats.welcome_acks += 1;
            }
            assert!(through < self.store.next_seq(lane), "ack of {lane} through {through}: never appended");
            // Invariant 4: nothing the gateway deletes may be missing from a sink.
            for seq in self.store.seqs_through(lane, through) {
                let original = &self.expected[lane][seq as usize - 1];
                assert!(
                    self.sinks.iter().any(|s| s.get(lane, seq) == Some(original)),
                    "gateway deletes {lane}#{seq} on an ack but no sink holds it"
                );
            }
            self.store.delete_through(lane, through);
        }

        fn pump_gateway(&mut self) -> bool {
            let mut progressed = false;
            while let Some(ev) = self.gw.poll_event() {
                progressed = true;
                match ev {
                    GatewayEvent::Welcomed(w) => {
                        assert_eq!(w.hub_id, format!("hub-{}", self.active_hub));
                        self.gw_welcomed = true;
                    }
                    GatewayEvent::Acked { lane, through_seq } => self.on_acked(&lane, through_seq),
                    GatewayEvent::Command(_) => self.stats.commands += 1,
                    GatewayEvent::Manifest(_) | GatewayEvent::ArtifactChunk(_) => {
                        unreachable!("this harness's hub sends no workloads")
                    }
                }
            }
            if self.gw.is_ready() {
                self.gw.set_status(self.store.status(self.now.as_secs()));
            }
            while let Some(slot) = self.gw.poll_send_slot() {
                progressed = true;
                let records = self.store.read(&slot.lane, slot.from_seq, slot.max_records, slot.max_bytes);
                assert!(records.len() <= slot.max_records);
                if let (Some(first), Some(last)) = (records.first(), records.last()) {
                    assert_eq!(
                        first.seq, slot.from_seq,
                        "the session asked for {} seqs the store no longer holds",
                        slot.lane
                    );
                    let max = self.max_sent.entry(slot.lane.clone()).or_insert(0);
                    self.stats.batches_sent += 1;
                    self.stats.records_sent += records.len() as u64;
                    self.stats.records_resent += records.iter().filter(|r| r.seq <= *max).count() as u64;
                    *max = (*max).max(last.seq);
                    self.send_log.push(Sent { lane: slot.lane.clone(), first: first.seq, last: last.seq });
                } else {
                    self.stats.empty_reads += 1;
                }
                self.gw
                    .send_batch(self.now, &slot.lane, records.into(), Vec::new())
                    .expect("a batch read from the store is valid");
            }
            while let Some(frame) = self.gw.poll_transmit() {
                progressed = true;
                self.transmit(true, &frame);
            }
            progressed
        }

        fn queue_commit(&mut self, req: StoreRequest) {
            let jitter = Duration::from_nanos(self.rng.random_range(0..=self.cfg.commit_jitter.as_nanos() as u64));
            let mut done_at = self.now + self.cfg.commit_delay + jitter;
            if let Some(last) = self.commits.back() {
                done_at = done_at.max(last.done_at);
            }
            self.commits.push_back(Commit { done_at, generation: self.hub_generation, hub: self.active_hub, req });
        }

        fn pump_hub(&mut self) -> bool {
            let mut progressed = false;
            while let Some(ev) = self.hub.poll_event() {
                progressed = true;
                match ev {
                    HubEvent::Hello(h) => {
                        assert!(self.hello.is_none(), "second Hello event in one session");
                        self.hello = Some(h);
                    }
                    HubEvent::Store(req) => self.queue_commit(req),
                    HubEvent::Status(_) => self.stats.statuses += 1,
                    HubEvent::FetchArtifact(_) => unreachable!("this harness's gateway fetches no artifacts"),
                }
            }
            // Marks are read only once commits of earlier sessions with this gateway
            // have landed: a commit landing after the read would be accepted again.
            let hub = self.active_hub;
            if self.hello.is_some() && !self.commits.iter().any(|c| c.hub == hub) {
                let hello = self.hello.take().expect("checked");
                let sink = &self.sinks[hub];
                let marks: Vec<(String, u64)> = hello
                    .lanes
                    .iter()
                    .filter(|c| !self.cfg.omit_unknown_lanes_in_marks || sink.knows(&c.lane))
                    .map(|c| (c.lane.clone(), sink.hwm(&c.lane)))
                    .collect();
                self.hub.accept(&marks, 0);
                if self.cfg.send_commands {
                    self.hub.command(Command::SlowDown(0));
                }
                progressed = true;
            }
            while let Some(frame) = self.hub.poll_transmit() {
                progressed = true;
                self.transmit(false, &frame);
            }
            progressed
        }

        fn complete_commit(&mut self) {
            let c = self.commits.pop_front().expect("a commit is due");
            self.sinks[c.hub].apply(&c.req);
            self.stats.commits += 1;
            if c.generation != self.hub_generation {
                // The session that asked for it is gone: its ack has nowhere to go.
                self.stats.orphan_commits += 1;
                return;
            }
            let p = self.cfg.faults.hub_crash_after_commit;
            if self.faults_left > 0 && p > 0.0 && self.pending_fault.is_none() && self.rng.random_bool(p) {
                self.faults_left -= 1;
                self.stats.hub_crashes_after_commit += 1;
                if self.stats.hub_crashes_after_commit.is_multiple_of(2) {
                    // The Ack is queued but dies with the process before it is written.
                    self.hub.stored(&c.req.lane, c.req.through_seq);
                }
                self.fault_later(Fault::HubCrash);
                return;
            }
            self.hub.stored(&c.req.lane, c.req.through_seq);
        }

        fn pump(&mut self) {
            while self.pump_gateway() | self.pump_hub() {}
        }

        fn maybe_fault(&mut self) {
            if let Some(f) = self.scheduled.remove(&self.stats.steps) {
                if self.pending_fault.is_none() {
                    self.pending_fault = Some(f);
                } else {
                    // Collides with another fault: move it to the next free step.
                    let mut at = self.stats.steps + 1;
                    while self.scheduled.contains_key(&at) {
                        at += 1;
                    }
                    self.scheduled.insert(at, f);
                }
            }
            if self.faults_left == 0 || self.pending_fault.is_some() {
                return;
            }
            let f = self.cfg.faults.clone();
            let roll = |rng: &mut StdRng, p: f64| p > 0.0 && rng.random_bool(p);
            let fault = if roll(&mut self.rng, f.gateway_crash) {
                Fault::GatewayCrash
            } else if roll(&mut self.rng, f.hub_crash) {
                Fault::HubCrash
            } else if roll(&mut self.rng, f.reset) {
                Fault::Reset
            } else {
                return;
            };
            self.faults_left -= 1;
            self.fault_later(fault);
        }

        /// Advances to the next event and processes it. Panics if there is none.
        fn step(&mut self) {
            self.stats.steps += 1;
            let handshake_deadline = (!self.gw.is_ready()).then(|| self.gw_started + self.cfg.handshake_timeout);
            let candidates = [
                self.commits.front().map(|c| c.done_at),
                self.to_gw.next_at(),
                self.to_hub.next_at(),
                self.appends.front().map(|a| a.0),
                handshake_deadline,
                self.gw.poll_timeout(),
            ];
            let next = candidates.iter().flatten().min().copied();
            let next = next.unwrap_or_else(|| panic!("stalled with nothing scheduled: {}", self.summary()));
            self.now = self.now.max(next);
            let now = self.now;
            let due = move |t: Option<Duration>| t.is_some_and(|t| t <= now);
            if due(candidates[0]) {
                self.complete_commit();
            } else if due(candidates[1]) {
                self.deliver(false);
            } else if due(candidates[2]) {
                self.deliver(true);
            } else if due(candidates[3]) {
                let (_, lane) = self.appends.pop_front().expect("due");
                self.append_one(&lane);
            } else if due(candidates[4]) {
                self.stats.handshake_timeouts += 1;
                self.fault_later(Fault::Reset);
            } else {
                self.gw.handle_timeout(self.now);
            }
            self.maybe_fault();
            if let Some(f) = self.pending_fault.take() {
                self.apply_fault(f);
            }
            self.pump();
        }

        /// All appends done, all acked (store empty), no commit pending.
        pub fn done(&self) -> bool {
            self.appends.is_empty() && self.store.is_empty() && self.commits.is_empty()
        }

        pub fn run(&mut self) {
            self.run_until(|_| false);
        }

        /// Runs until `done()` or `pred` holds.
        pub fn run_until(&mut self, mut pred: impl FnMut(&Sim) -> bool) {
            self.pump();
            while !self.done() && !pred(self) {
                assert!(self.stats.steps < self.cfg.max_steps, "step limit reached: {}", self.summary());
                assert!(self.now < self.cfg.max_time, "virtual time limit reached: {}", self.summary());
                self.step();
            }
        }

        /// Every committed item of the active hub is acked and nothing is being committed.
        pub fn quiescent(&self) -> bool {
            let sink = &self.sinks[self.active_hub];
            self.commits.is_empty()
                && self.gw.is_ready()
                && self.cfg.lanes.iter().all(|(l, _)| self.gw.acked(l) == Some(sink.hwm(l)))
        }

        pub fn summary(&self) -> String {
            let held: Vec<(String, usize)> =
                self.cfg.lanes.iter().map(|(l, _)| (l.clone(), self.store.held(l))).collect();
            format!(
                "seed {} t={:?} held={held:?} commits={} errors={:?} {:?}",
                self.cfg.seed,
                self.now,
                self.commits.len(),
                self.errors,
                self.stats
            )
        }

        /// The property every end-to-end test asserts.
        pub fn check_exactly_once(&self) {
            let ctx = self.summary();
            assert!(self.store.is_empty(), "gateway store not empty: {ctx}");
            for (i, sink) in self.sinks.iter().enumerate() {
                assert_eq!(sink.duplicates, 0, "sink {i} stored duplicates: {ctx}");
                assert_eq!(sink.hwm_regressions, 0, "sink {i} mark went backwards: {ctx}");
                for (lane, l) in &sink.lanes {
                    assert!(l.gaps.is_empty(), "nothing was evicted, so no gap may be recorded");
                    assert!(l.log.windows(2).all(|w| w[0] < w[1]), "sink {i} lane {lane} committed out of seq order");
                    assert_eq!(l.log.len(), l.records.len());
                }
            }
            for (lane, expected) in &self.expected {
                for (i, r) in expected.iter().enumerate() {
                    assert_eq!(r.seq, i as u64 + 1, "the store assigns seqs from 1 without holes");
                    let holders: Vec<&Record> = self.sinks.iter().filter_map(|s| s.get(lane, r.seq)).collect();
                    assert_eq!(holders.len(), 1, "{lane}#{} is in {} sinks: {ctx}", r.seq, holders.len());
                    assert_eq!(holders[0], r, "{lane}#{} altered on the way", r.seq);
                }
                let stored: usize = self.sinks.iter().map(|s| s.lanes.get(lane).map_or(0, |l| l.records.len())).sum();
                assert_eq!(stored, expected.len(), "{lane}: sinks hold records never appended");
                let top = self.sinks.iter().map(|s| s.hwm(lane)).max().unwrap_or(0);
                assert_eq!(top, expected.len() as u64, "{lane}: highest mark is the last seq");
            }
            self.check_stats();
        }

        /// Cross-checks of the counters against each other.
        fn check_stats(&self) {
            let s = &self.stats;
            assert!(s.frames_lost <= s.frames_sent && s.batches_sent <= s.frames_sent);
            assert!(s.records_resent <= s.records_sent && s.batches_sent <= s.records_sent);
            assert!(s.welcome_acks <= s.acked_events && s.rejections <= s.acks_received);
            assert_eq!(s.commits, self.sinks.iter().map(|k| k.commits).sum::<u64>());
            assert!(s.orphan_commits <= s.commits);
            let faults = s.gateway_crashes + s.hub_crashes + s.resets + s.failovers;
            assert_eq!(s.sessions, faults + 1, "every fault starts exactly one new session");
            assert!(s.hub_crashes_after_commit <= s.hub_crashes);
            assert!(s.handshake_timeouts <= s.resets);
            assert_eq!(s.empty_reads, 0, "the session never asks for seqs the store does not hold yet");
        }
    }
}

use sim::{Fault, FaultConfig, NetConfig, Sim, SimConfig};

const THREE_LANES: &[(&str, u8)] = &[("alarms", 0), ("telemetry", 1), ("bulk", 5)];

/// Protocol errors the simulated network can cause but a reliable stream cannot: a
/// duplicated `Hello`/`Welcome`, or (with reordering) a frame overtaking `Welcome`.
fn assert_only_network_artifacts(errors: &[ProtoError]) {
    for e in errors {
        assert!(
            matches!(e, ProtoError::UnexpectedFrame { got: "Hello" | "Welcome", .. }),
            "protocol error not explained by duplication: {e:?}"
        );
    }
}

// -------------------------------------------------------------------- end to end

#[test]
fn clean_link_three_lanes_ten_thousand_records() {
    let mut cfg = SimConfig::new(1, THREE_LANES);
    cfg.gateway.ack_timeout = Duration::from_secs(30);
    cfg.send_commands = true;
    let mut sim = Sim::new(cfg);
    sim.append_now("bulk", 1_000);
    sim.schedule_appends(9_000, Duration::from_secs(20));
    sim.run();
    sim.check_exactly_once();
    let s = &sim.stats;
    assert_eq!(sim.expected.values().map(Vec::len).sum::<usize>(), 10_000);
    assert!(sim.errors.is_empty(), "{:?}", sim.errors);
    assert_eq!(s.sessions, 1);
    assert_eq!(s.rejections, 0);
    assert_eq!(s.records_resent, 0, "a clean link needs no retransmission");
    assert_eq!(s.records_sent, 10_000);
    assert_eq!(s.empty_reads, 0);
    assert!(s.statuses > 0, "status reports reach the hub");
    assert_eq!(s.commands, 1, "the hub's command reaches the gateway");
    assert!(sim.send_log.iter().all(|b| b.last - b.first < 64));
    for (lane, _) in THREE_LANES {
        assert!(sim.expected[*lane].len() > 1_000, "appends were spread over all lanes");
    }
}

fn lossy(seed: u64, loss: f64, records: usize) -> Sim {
    let mut cfg = SimConfig::new(seed, THREE_LANES);
    cfg.gateway.ack_timeout = ms(200);
    cfg.net.loss = loss;
    let mut sim = Sim::new(cfg);
    sim.schedule_appends(records, Duration::from_secs(5));
    sim.run();
    sim.check_exactly_once();
    assert!(sim.errors.is_empty(), "loss alone must not cause protocol errors: {:?}", sim.errors);
    assert!(sim.stats.frames_lost > 0);
    assert!(sim.stats.rejections > 0, "losing batches leads to refusals: {:?}", sim.stats);
    assert!(sim.stats.records_resent > 0, "and to rewinds");
    sim
}

#[test]
fn ten_percent_loss() {
    lossy(2, 0.10, 3_000);
}

#[test]
fn thirty_percent_loss() {
    lossy(3, 0.30, 2_000);
}

#[test]
fn reordering_and_duplication() {
    let mut cfg = SimConfig::new(4, THREE_LANES);
    cfg.net = NetConfig { latency: ms(10), jitter: ms(30), loss: 0.0, dup: 0.10 };
    let mut sim = Sim::new(cfg);
    sim.schedule_appends(3_000, Duration::from_secs(5));
    sim.run();
    sim.check_exactly_once();
    assert!(sim.stats.frames_duplicated > 0 && sim.stats.frames_reordered > 0, "{:?}", sim.stats);
    assert!(sim.stats.rejections > 0, "a batch overtaking its predecessor is refused");
    assert_only_network_artifacts(&sim.errors);
}

#[test]
fn duplication_without_reordering() {
    let mut cfg = SimConfig::new(5, THREE_LANES);
    cfg.net.dup = 0.25;
    let mut sim = Sim::new(cfg);
    sim.schedule_appends(3_000, Duration::from_secs(5));
    sim.run();
    sim.check_exactly_once();
    assert!(sim.stats.frames_duplicated > 0);
    assert_eq!(sim.stats.frames_reordered, 0);
    assert_eq!(sim.stats.rejections, 0, "in-order duplicates are plain retransmits, never holes");
    assert_only_network_artifacts(&sim.errors);
}

/// Runs `cfg` once without faults and returns how many steps that took, to spread
/// scheduled faults over a run of the same shape.
fn baseline_steps(cfg: &SimConfig, records: usize, span: Duration) -> u64 {
    let mut sim = Sim::new(cfg.clone());
    sim.schedule_appends(records, span);
    sim.run();
    sim.check_exactly_once();
    sim.stats.steps
}

#[test]
fn fifty_gateway_crashes() {
    let cfg = SimConfig::new(6, THREE_LANES);
    let span = Duration::from_secs(10);
    // Crashes make batches bigger and runs shorter in steps: stay in the first 3/4.
    let steps = baseline_steps(&cfg, 5_000, span) * 3 / 4;
    let mut sim = Sim::new(cfg);
    let mut rng = StdRng::seed_from_u64(66);
    let mut at = BTreeSet::new();
    while at.len() < 50 {
        at.insert(rng.random_range(1..steps));
    }
    for s in at {
        sim.schedule_fault(s, Fault::GatewayCrash);
    }
    sim.schedule_appends(5_000, span);
    sim.run();
    sim.check_exactly_once();
    assert_eq!(sim.scheduled_faults_left(), 0);
    assert_eq!(sim.stats.gateway_crashes, 50);
    assert!(sim.stats.records_resent > 0, "crashes lose in-flight batches");
    assert!(sim.stats.orphan_commits > 0, "some commits landed after their session died");
    assert!(sim.errors.is_empty(), "{:?}", sim.errors);
}

#[test]
fn hub_crashes_including_between_commit_and_ack() {
    let mut cfg = SimConfig::new(7, THREE_LANES);
    cfg.commit_delay = ms(5);
    cfg.commit_jitter = ms(10);
    cfg.faults = FaultConfig { hub_crash_after_commit: 0.05, budget: 30, ..Default::default() };
    let span = Duration::from_secs(10);
    let steps = baseline_steps(&cfg, 5_000, span) * 3 / 4;
    let mut sim = Sim::new(cfg);
    let mut rng = StdRng::seed_from_u64(77);
    for _ in 0..20 {
        sim.schedule_fault(rng.random_range(1..steps), Fault::HubCrash);
    }
    sim.schedule_appends(5_000, span);
    sim.run();
    sim.check_exactly_once();
    let s = &sim.stats;
    assert_eq!(sim.scheduled_faults_left(), 0);
    assert_eq!(s.hub_crashes_after_commit, 30, "{s:?}");
    assert_eq!(s.hub_crashes, 50, "scheduled and after-commit crashes: {s:?}");
    assert!(s.welcome_acks >= 10, "the gateway learns of committed-but-unacked records from Welcome: {s:?}");
    assert!(sim.errors.is_empty(), "{:?}", sim.errors);
}

/// The precise case: the sink committed, the hub died before its ack went out.
#[test]
fn hub_crash_after_commit_before_ack_does_not_duplicate() {
    for variant in 0..2 {
        let mut cfg = SimConfig::new(8 + variant, &[("t", 0)]);
        cfg.faults = FaultConfig { hub_crash_after_commit: 1.0, budget: 1 + variant as u32, ..Default::default() };
        let mut sim = Sim::new(cfg);
        sim.append_now("t", 300);
        sim.run();
        sim.check_exactly_once();
        assert_eq!(sim.stats.hub_crashes_after_commit, 1 + variant);
        // The first commit was 1..=64 and its ack was never sent; the next session's
        // Welcome told the gateway, so none of it was sent again.
        assert_eq!(sim.stats.welcome_acks, 1 + variant);
        assert_eq!(sim.sinks[0].lanes["t"].log.len(), 300);
        assert_eq!(sim.send_log.iter().filter(|b| b.first == 1).count(), 1, "1..=64 is never resent");
    }
}

#[test]
fn connection_resets_with_commits_in_flight() {
    let mut cfg = SimConfig::new(10, THREE_LANES);
    cfg.commit_delay = ms(20);
    cfg.faults = FaultConfig { reset: 0.01, budget: 40, ..Default::default() };
    let mut sim = Sim::new(cfg);
    sim.schedule_appends(4_000, Duration::from_secs(10));
    sim.run();
    sim.check_exactly_once();
    assert!(sim.stats.resets >= 40, "{:?}", sim.stats);
    assert!(sim.stats.orphan_commits > 0);
    assert!(sim.stats.welcome_acks > 0);
}

fn failover_to_fresh_hub(omit_unknown_lanes_in_marks: bool) {
    let mut cfg = SimConfig::new(11, &[("alarms", 0), ("telemetry", 1)]);
    cfg.hubs = 2;
    cfg.omit_unknown_lanes_in_marks = omit_unknown_lanes_in_marks;
    cfg.max_time = Duration::from_secs(120);
    let mut sim = Sim::new(cfg);
    sim.append_now("alarms", 500);
    sim.append_now("telemetry", 500);
    sim.run();
    sim.check_exactly_once();
    assert_eq!(sim.sinks[0].hwm("alarms"), 500);

    // Hub 1 has never seen this gateway; the gateway holds nothing below 501.
    sim.failover(1);
    sim.schedule_appends(1_000, Duration::from_secs(2));
    sim.run();
    sim.check_exactly_once();
    assert_eq!(sim.stats.rejections, 0, "hub 1 must not wait for seqs 1..=500");
    for lane in ["alarms", "telemetry"] {
        let l = &sim.sinks[1].lanes[lane];
        assert_eq!(l.log.first(), Some(&501), "hub 1 starts at the gateway's floor");
        assert_eq!(l.hwm, sim.expected[lane].len() as u64);
    }

    // Fail back to hub 0 in the middle of a backlog, at a point where everything hub 1
    // committed has been acked: hub 0 (mark 500) must start at the new floor.
    sim.append_now("alarms", 1_000);
    sim.append_now("telemetry", 1_000);
    let floor = sim.sinks[1].hwm("telemetry");
    sim.run_until(|s| s.sinks[1].hwm("telemetry") > floor + 300 && s.quiescent());
    assert!(sim.store.held("telemetry") > 100);
    assert!(!sim.done());
    let floor = sim.sinks[1].hwm("telemetry");
    sim.failover(0);
    sim.run();
    sim.check_exactly_once();
    assert_eq!(sim.stats.rejections, 0);
    let l = &sim.sinks[0].lanes["telemetry"];
    assert_eq!(l.log.iter().find(|s| **s > 500), Some(&(floor + 1)), "hub 0 resumes at the floor, not at 501");
    assert!(sim.errors.is_empty(), "{:?}", sim.errors);
}

#[test]
fn fresh_hub_accepts_from_the_gateways_floor() {
    failover_to_fresh_hub(false);
}

/// Same, with a hub driver that only reports marks of lanes its sink knows.
#[test]
fn fresh_hub_accepts_from_the_floor_of_lanes_missing_from_marks() {
    failover_to_fresh_hub(true);
}

#[test]
fn hub_session_starts_at_floor_without_waiting() {
    for marks in [vec![("t".to_owned(), 0)], vec![]] {
        let mut hub = HubSession::new("gw", HubInfo::default());
        hub.handle_frame(Frame::Hello(hello(&[("t", 501, 600)]))).unwrap();
        assert!(matches!(hub.poll_event(), Some(HubEvent::Hello(_))));
        hub.accept(&marks, 0);
        let Some(Frame::Welcome(w)) = hub.poll_transmit() else { panic!("Welcome expected") };
        if !marks.is_empty() {
            assert_eq!(w.lanes, vec![LaneMark { lane: "t".into(), hwm: 500 }]);
        }
        hub.handle_frame(Frame::Batch(batch("t", 1, 501..=510))).unwrap();
        let Some(HubEvent::Store(req)) = hub.poll_event() else { panic!("store request expected") };
        assert_eq!(req.records.first_seq(), Some(501));
        assert_eq!(req.through_seq, 510);
        assert_eq!(hub.poll_transmit(), None, "no refusal (marks {marks:?})");
    }
}

// -------------------------------------------------------------------- priority

#[test]
fn priority_order_without_starvation() {
    // Names sort opposite to priority, so ordering by name would fail.
    let lanes = [("a_bulk", 2), ("m_events", 1), ("z_alarms", 0)];
    let starvation_slots = 4;
    let cfg = GatewayConfig {
        window_batches: 1_000,
        max_batch_records: 10,
        starvation_slots,
        ack_timeout: Duration::from_secs(60),
        ..Default::default()
    };
    let mut store = sim::GatewayStore::new(&lanes.iter().map(|(n, p)| ((*n).to_owned(), *p)).collect::<Vec<_>>());
    for (lane, _) in lanes {
        for i in 0..200 {
            store.append(lane, i, "s".into(), None, vec![1]);
        }
    }
    let mut gw = GatewaySession::new(cfg, "t", 1, store.lane_inits());
    assert!(matches!(gw.poll_transmit(), Some(Frame::Hello(_))));
    assert_eq!(gw.poll_send_slot(), None, "nothing is sent before Welcome");
    gw.handle_frame(Duration::ZERO, Frame::Welcome(welcome(&[("a_bulk", 0), ("m_events", 0), ("z_alarms", 0)])))
        .unwrap();
    let mut order: Vec<&str> = Vec::new();
    while let Some(slot) = gw.poll_send_slot() {
        let recs = store.read(&slot.lane, slot.from_seq, slot.max_records, slot.max_bytes);
        assert_eq!(recs.len(), 10);
        let lane = lanes.iter().find(|(n, _)| *n == slot.lane).unwrap().0;
        order.push(lane);
        gw.send_batch(Duration::ZERO, lane, recs.into(), Vec::new()).unwrap();
        while gw.poll_transmit().is_some() {}
    }
    assert_eq!(order.len(), 60);
    assert_eq!(order[0], "z_alarms");
    let last = |l: &str| order.iter().rposition(|x| *x == l).unwrap();
    assert!(last("z_alarms") < last("m_events") && last("m_events") < last("a_bulk"), "{order:?}");
    // While the top lane had data it got most slots, but the others were served.
    let prefix = &order[..=last("z_alarms")];
    let count = |l: &str| prefix.iter().filter(|x| **x == l).count();
    assert!(count("z_alarms") > count("m_events") + count("a_bulk"), "{order:?}");
    assert!(count("m_events") >= 5 && count("a_bulk") >= 5, "{order:?}");
    // No lane with data waits more than starvation_slots plus one slot per other
    // starved lane.
    for (lane, _) in lanes {
        let mut waited = 0;
        for x in &order[..last(lane)] {
            waited = if *x == lane { 0 } else { waited + 1 };
            assert!(waited <= starvation_slots as usize + 1, "{lane} starved: {order:?}");
        }
    }
}

#[test]
fn priority_order_end_to_end() {
    let lanes = [("a_bulk", 2), ("m_events", 1), ("z_alarms", 0)];
    let mut cfg = SimConfig::new(12, &lanes);
    cfg.gateway.max_batch_records = 10;
    let mut sim = Sim::new(cfg);
    // All appended while the handshake is still under way.
    for (lane, _) in lanes {
        sim.append_now(lane, 500);
    }
    assert!(!sim.gw.is_ready());
    sim.run();
    sim.check_exactly_once();
    let order: Vec<&str> = sim.send_log.iter().map(|b| b.lane.as_str()).collect();
    assert_eq!(order[0], "z_alarms");
    let last = |l: &str| order.iter().rposition(|x| *x == l).unwrap();
    assert!(last("z_alarms") < last("m_events") && last("m_events") < last("a_bulk"));
    let prefix = &order[..=last("z_alarms")];
    assert!(prefix.contains(&"m_events") && prefix.contains(&"a_bulk"), "lower lanes are not starved");
}

#[test]
fn empty_read_marks_lane_drained_until_next_append() {
    let mut gw = GatewaySession::new(GatewayConfig::default(), "t", 1, vec![lane_init("t", 1, 3)]);
    gw.poll_transmit();
    gw.handle_frame(Duration::ZERO, Frame::Welcome(welcome(&[("t", 0)]))).unwrap();
    let slot = gw.poll_send_slot().unwrap();
    assert_eq!(slot.from_seq, 1);
    // The store turns out to hold nothing (yet): the lane is drained.
    gw.send_batch(Duration::ZERO, "t", Records::default(), Vec::new()).unwrap();
    assert_eq!(gw.poll_send_slot(), None);
    assert_eq!(gw.poll_transmit(), None, "an empty read sends nothing");
    gw.notify_appended("t", 4);
    assert_eq!(gw.poll_send_slot().map(|s| s.from_seq), Some(1));
}

// -------------------------------------------------------------------- protocol errors

#[test]
fn batch_before_hello_is_unexpected() {
    let mut hub = HubSession::new("gw", HubInfo::default());
    let err = hub.handle_frame(Frame::Batch(batch("t", 1, 1..=3))).unwrap_err();
    assert_eq!(err, ProtoError::UnexpectedFrame { got: "Batch", state: "awaiting Hello" });
    assert_eq!(err.code(), error_code::PROTOCOL);
    assert_eq!(hub.poll_event(), None, "nothing is stored");
    // Nor between Hello and accept.
    hub.handle_frame(Frame::Hello(hello(&[("t", 1, 4)]))).unwrap();
    let err = hub.handle_frame(Frame::Batch(batch("t", 1, 1..=3))).unwrap_err();
    assert_eq!(err, ProtoError::UnexpectedFrame { got: "Batch", state: "looking up marks" });
    assert!(matches!(hub.poll_event(), Some(HubEvent::Hello(_))));
    assert_eq!(hub.poll_event(), None);
}

#[test]
fn wrong_protocol_version_is_refused_with_error_frame() {
    let mut hub = HubSession::new("gw", HubInfo::default());
    let mut h = hello(&[("t", 1, 1)]);
    h.protocol_version = PROTOCOL_VERSION + 1;
    let err = hub.handle_frame(Frame::Hello(h)).unwrap_err();
    assert_eq!(err, ProtoError::UnsupportedVersion(PROTOCOL_VERSION + 1));
    assert_eq!(err.code(), error_code::VERSION);
    assert_eq!(hub.poll_event(), None, "no Hello event for the driver");
    let Some(Frame::Error(e)) = hub.poll_transmit() else { panic!("Error frame expected") };
    assert_eq!(e.code, error_code::VERSION);
    assert_eq!(hub.poll_transmit(), None);
    // The session is closed.
    let err = hub.handle_frame(Frame::Hello(hello(&[("t", 1, 1)]))).unwrap_err();
    assert_eq!(err, ProtoError::UnexpectedFrame { got: "Hello", state: "closed" });

    // The gateway receiving it through the codec reports the peer's code.
    let mut bytes = Vec::new();
    encode_frame(&Frame::Error(e.clone()), &mut bytes, MAX_FRAME_LEN).unwrap();
    let mut dec = FrameDecoder::default();
    dec.push(&bytes);
    let frame = dec.next_frame().unwrap().unwrap();
    let mut gw = GatewaySession::new(GatewayConfig::default(), "t", 1, vec![lane_init("t", 1, 1)]);
    let err = gw.handle_frame(Duration::ZERO, frame).unwrap_err();
    assert_eq!(err, ProtoError::Peer { code: error_code::VERSION, reason: e.reason });
    assert_eq!(err.code(), error_code::VERSION);
    assert!(!gw.is_ready());
}

#[test]
fn ack_beyond_sent_is_an_error() {
    let mut store = sim::GatewayStore::new(&[("t".to_owned(), 0)]);
    for i in 0..20 {
        store.append("t", i, "s".into(), None, vec![]);
    }
    let cfg = GatewayConfig { max_batch_records: 10, window_batches: 1, ..Default::default() };
    let mut gw = GatewaySession::new(cfg, "t", 1, store.lane_inits());
    let ack = |through_seq| Frame::Ack(Ack { lane: "t".into(), through_seq, rejected_batch: None });
    let err = gw.handle_frame(Duration::ZERO, ack(1)).unwrap_err();
    assert_eq!(err, ProtoError::UnexpectedFrame { got: "Ack", state: "awaiting Welcome" });
    gw.handle_frame(Duration::ZERO, Frame::Welcome(welcome(&[("t", 0)]))).unwrap();
    let slot = gw.poll_send_slot().unwrap();
    gw.send_batch(
        Duration::ZERO,
        "t",
        store.read("t", slot.from_seq, slot.max_records, slot.max_bytes).into(),
        Vec::new(),
    )
    .unwrap();
    assert_eq!(gw.poll_send_slot(), None, "window of one batch is full");
    let err = gw.handle_frame(Duration::ZERO, ack(11)).unwrap_err();
    assert_eq!(err, ProtoError::AckBeyondSent { lane: "t".into(), through_seq: 11, sent_through: 10 });
    assert_eq!(err.code(), error_code::PROTOCOL);
    // Nothing was deleted on the bogus ack.
    assert!(matches!(gw.poll_event(), Some(GatewayEvent::Welcomed(_))));
    assert_eq!(gw.poll_event(), None);
    assert_eq!(gw.acked("t"), Some(0));
    gw.handle_frame(Duration::ZERO, ack(10)).unwrap();
    assert_eq!(gw.poll_event(), Some(GatewayEvent::Acked { lane: "t".into(), through_seq: 10 }));
    assert_eq!(gw.poll_send_slot().map(|s| s.from_seq), Some(11));
}

// -------------------------------------------------------------------- hub details

/// A hub session past Hello and Welcome, lane `t` at mark 0.
fn ready_hub() -> HubSession {
    let mut hub = HubSession::new("gw", HubInfo::default());
    hub.handle_frame(Frame::Hello(hello(&[("t", 1, 20)]))).unwrap();
    hub.poll_event();
    hub.accept(&[("t".into(), 0)], 0);
    hub.poll_transmit();
    hub
}

#[test]
fn gaps_continue_the_mark_and_retransmits_are_trimmed() {
    let mut hub = ready_hub();
    let gap = |from_seq, through_seq| Gap { from_seq, through_seq, reason: GapReason::Ttl };
    let mut b = batch("t", 1, 1..=3);
    let more = batch("t", 0, 7..=7).records;
    b.records = b.records.iter().chain(more.iter()).collect();
    b.gaps.push(gap(4, 6));
    hub.handle_frame(Frame::Batch(b)).unwrap();
    let Some(HubEvent::Store(req)) = hub.poll_event() else { panic!() };
    assert_eq!(req.records.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 3, 7]);
    assert_eq!(req.gaps, vec![gap(4, 6)]);
    assert_eq!(req.through_seq, 7);
    // A retransmit overlapping the mark keeps only what is new.
    let mut b = batch("t", 2, 7..=9);
    b.gaps.push(gap(5, 6));
    hub.handle_frame(Frame::Batch(b)).unwrap();
    let Some(HubEvent::Store(req)) = hub.poll_event() else { panic!() };
    assert_eq!(req.records.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![8, 9]);
    assert!(req.gaps.is_empty());
    assert_eq!(hub.poll_transmit(), None);
    // A batch beyond the mark is refused, claiming nothing.
    hub.handle_frame(Frame::Batch(batch("t", 3, 11..=12))).unwrap();
    assert_eq!(hub.poll_event(), None);
    assert_eq!(
        hub.poll_transmit(),
        Some(Frame::Ack(Ack { lane: "t".into(), through_seq: 0, rejected_batch: Some(3) }))
    );
    // A pure retransmit is re-acked through the mark, in order behind pending commits.
    hub.handle_frame(Frame::Batch(batch("t", 4, 1..=5))).unwrap();
    assert_eq!(
        hub.poll_event(),
        Some(HubEvent::Store(StoreRequest {
            lane: "t".into(),
            records: Records::default(),
            gaps: vec![],
            through_seq: 9
        }))
    );
}

/// Driver contract for the hub: marks must be read after every commit of an earlier
/// session with the same gateway has landed. `HubSession` cannot enforce it (it only
/// sees its own session); this test shows what goes wrong otherwise, and that waiting
/// fixes it.
#[test]
fn hub_driver_must_read_marks_after_earlier_commits_land() {
    for wait in [false, true] {
        let mut sink = sim::Sink::default();
        let mut hub = HubSession::new("gw", HubInfo::default());
        hub.handle_frame(Frame::Hello(hello(&[("t", 1, 11)]))).unwrap();
        hub.poll_event();
        hub.accept(&[("t".into(), 0)], 0);
        hub.handle_frame(Frame::Batch(batch("t", 1, 1..=10))).unwrap();
        let Some(HubEvent::Store(old_commit)) = hub.poll_event() else { panic!() };
        // The connection breaks while the commit is in flight; the gateway reconnects.
        let mut hub = HubSession::new("gw", HubInfo::default());
        hub.handle_frame(Frame::Hello(hello(&[("t", 1, 11)]))).unwrap();
        hub.poll_event();
        if wait {
            sink.apply(&old_commit);
        }
        hub.accept(&[("t".into(), sink.hwm("t"))], 0);
        if !wait {
            sink.apply(&old_commit);
        }
        hub.handle_frame(Frame::Batch(batch("t", 1, 1..=10))).unwrap();
        let Some(HubEvent::Store(req)) = hub.poll_event() else { panic!() };
        sink.apply(&req);
        assert_eq!(sink.duplicates, if wait { 0 } else { 10 });
    }
}

// -------------------------------------------------------------------- seed sweep

#[test]
fn randomized_seed_sweep() {
    let mut total = sim::Stats::default();
    for seed in 0..200 {
        let mut r = StdRng::seed_from_u64(seed);
        let lanes: &[(&str, u8)] = match r.random_range(0..3) {
            0 => &[("t", 0)],
            1 => &[("a", 1), ("b", 0)],
            _ => THREE_LANES,
        };
        let mut cfg = SimConfig::new(seed, lanes);
        cfg.gateway.window_batches = r.random_range(1..=8);
        cfg.gateway.max_batch_records = r.random_range(1..=32);
        cfg.gateway.max_batch_bytes = r.random_range(64..=4096);
        cfg.gateway.starvation_slots = r.random_range(1..=6);
        cfg.gateway.ack_timeout = ms(r.random_range(100..=400));
        cfg.net = NetConfig {
            latency: ms(r.random_range(1..=20)),
            jitter: if r.random_bool(0.5) { ms(r.random_range(0..=20)) } else { Duration::ZERO },
            loss: if r.random_bool(0.5) { r.random_range(0.0..0.15) } else { 0.0 },
            dup: if r.random_bool(0.3) { r.random_range(0.0..0.1) } else { 0.0 },
        };
        cfg.commit_delay = ms(r.random_range(0..=20));
        cfg.commit_jitter = ms(r.random_range(0..=10));
        cfg.faults = FaultConfig {
            gateway_crash: r.random_range(0.0..0.005),
            hub_crash: r.random_range(0.0..0.005),
            reset: r.random_range(0.0..0.005),
            hub_crash_after_commit: r.random_range(0.0..0.05),
            budget: r.random_range(0..=10),
        };
        cfg.omit_unknown_lanes_in_marks = r.random_bool(0.5);
        cfg.max_steps = 200_000;
        let records = r.random_range(20..=250);
        let mut sim = Sim::new(cfg);
        sim.schedule_appends(records, ms(r.random_range(1..=3_000)));
        sim.run();
        sim.check_exactly_once();
        assert_only_network_artifacts(&sim.errors);
        let s = &sim.stats;
        total.frames_lost += s.frames_lost;
        total.frames_duplicated += s.frames_duplicated;
        total.frames_reordered += s.frames_reordered;
        total.rejections += s.rejections;
        total.gateway_crashes += s.gateway_crashes;
        total.hub_crashes += s.hub_crashes;
        total.hub_crashes_after_commit += s.hub_crashes_after_commit;
        total.resets += s.resets;
        total.handshake_timeouts += s.handshake_timeouts;
        total.welcome_acks += s.welcome_acks;
        total.orphan_commits += s.orphan_commits;
        total.records_sent += s.records_sent;
    }
    // The mix did exercise every kind of trouble.
    let t = &total;
    for (what, n) in [
        ("lost frames", t.frames_lost),
        ("duplicated frames", t.frames_duplicated),
        ("reordered frames", t.frames_reordered),
        ("refusals", t.rejections),
        ("gateway crashes", t.gateway_crashes),
        ("hub crashes", t.hub_crashes),
        ("hub crashes after a commit", t.hub_crashes_after_commit),
        ("resets", t.resets),
        ("handshake timeouts", t.handshake_timeouts),
        ("acks learned from Welcome", t.welcome_acks),
        ("orphan commits", t.orphan_commits),
    ] {
        assert!(n >= 10, "only {n} {what} over the sweep: {t:?}");
    }
}

// -------------------------------------------------------------------- helpers

fn lane_init(name: &str, oldest_unacked: u64, next_seq: u64) -> LaneInit {
    LaneInit { name: name.into(), priority: 0, oldest_unacked, next_seq }
}

fn hello(lanes: &[(&str, u64, u64)]) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "test".into(),
        boot_id: 1,
        lanes: lanes
            .iter()
            .map(|(l, o, n)| LaneCursor { lane: (*l).into(), oldest_unacked: *o, next_seq: *n })
            .collect(),
        capabilities: vec![],
        manifest_version: None,
    }
}

fn welcome(marks: &[(&str, u64)]) -> Welcome {
    Welcome {
        hub_id: "hub".into(),
        region: "r".into(),
        gateway_id: "gw".into(),
        lanes: marks.iter().map(|(l, h)| LaneMark { lane: (*l).into(), hwm: *h }).collect(),
        endpoints: vec![],
        manifest_version: 0,
    }
}

fn batch(lane: &str, batch_id: u64, seqs: std::ops::RangeInclusive<u64>) -> Batch {
    Batch {
        lane: lane.into(),
        batch_id,
        records: seqs
            .map(|seq| Record {
                seq,
                ingest_ts_ms: seq,
                source: "s".into(),
                content_type: None,
                payload: vec![seq as u8].into(),
            })
            .collect(),
        gaps: vec![],
    }
}

#[test]
fn welcome_mark_beyond_the_store_is_refused_and_deletes_nothing() {
    let lanes = vec![crate::LaneInit { name: "t".into(), priority: 0, oldest_unacked: 3, next_seq: 5 }];
    let mut g = GatewaySession::new(GatewayConfig::default(), "test", 1, lanes);
    let _hello = g.poll_transmit();
    let w = Welcome {
        hub_id: "h".into(),
        region: "r".into(),
        gateway_id: "g".into(),
        lanes: vec![LaneMark { lane: "t".into(), hwm: 9 }],
        endpoints: vec![],
        manifest_version: 0,
    };
    let err = g.handle_frame(Duration::ZERO, Frame::Welcome(w)).unwrap_err();
    assert!(matches!(err, ProtoError::MarkBeyondStore { hub_mark: 9, next_seq: 5, .. }), "{err}");
    assert_eq!(g.poll_event(), None, "no Acked event: nothing may be deleted");
    assert!(!g.is_ready());
}

#[test]
fn record_ref_encodes_to_the_same_bytes_as_record() {
    for (ct, payload) in [(None, vec![]), (Some("application/json"), b"{\"t\":21.5}".to_vec()), (None, vec![7u8; 300])]
    {
        let owned = Record {
            seq: 42,
            ingest_ts_ms: 1_700_000_000_123,
            source: "devices/7/telemetry".into(),
            content_type: ct.map(String::from),
            payload: payload.clone().into(),
        };
        let borrowed = RecordRef {
            seq: 42,
            ingest_ts_ms: 1_700_000_000_123,
            source: "devices/7/telemetry",
            content_type: ct,
            payload: &payload,
        };
        let a = minicbor::to_vec(&owned).unwrap();
        let b = minicbor::to_vec(borrowed).unwrap();
        assert_eq!(a, b);
        assert_eq!(minicbor::decode::<Record>(&b).unwrap(), owned);
    }
}

// -------------------------------------------------------------------- records as bytes

/// `Batch` as it was when its records were a `Vec<Record>`: the wire format a
/// `Records` must keep.
#[derive(minicbor::Encode)]
struct VecBatch {
    #[n(0)]
    lane: String,
    #[n(1)]
    batch_id: u64,
    #[n(2)]
    records: Vec<Record>,
    #[n(3)]
    gaps: Vec<Gap>,
}

#[test]
fn records_encode_to_the_bytes_of_a_vec_of_records() {
    let mut rng = StdRng::seed_from_u64(11);
    for n in [0usize, 1, 2, 57] {
        let recs: Vec<Record> = (1..=n as u64)
            .map(|seq| Record {
                seq,
                ingest_ts_ms: rng.random(),
                source: "x".repeat(rng.random_range(0..40)),
                content_type: rng.random_bool(0.5).then(|| "application/cbor".into()),
                payload: (0..rng.random_range(0..600)).map(|_| rng.random()).collect::<Vec<u8>>().into(),
            })
            .collect();
        let gaps = vec![Gap { from_seq: 1000, through_seq: 1001, reason: GapReason::Capacity }];
        let new = Batch { lane: "a".into(), batch_id: 3, records: recs.clone().into(), gaps: gaps.clone() };
        let old = VecBatch { lane: "a".into(), batch_id: 3, records: recs.clone(), gaps };
        let bytes = minicbor::to_vec(&new).unwrap();
        assert_eq!(bytes, minicbor::to_vec(&old).unwrap(), "{n} records");
        // Decoding gives back the same records, each kept as its own encoding.
        let back: Batch = minicbor::decode(&bytes).unwrap();
        assert_eq!(back, new);
        assert_eq!(back.records.to_vec(), recs);
        for (i, r) in recs.iter().enumerate() {
            assert_eq!(back.records.raw(i), minicbor::to_vec(r).unwrap().as_slice());
            assert_eq!(back.records.payload_len(i), r.payload.len());
        }
        assert_eq!(back.records.payload_bytes(), recs.iter().map(|r| r.payload.len()).sum::<usize>());
    }
}

#[test]
fn records_decode_from_an_indefinite_array() {
    let recs: Vec<Record> = batch("t", 1, 4..=6).records.to_vec();
    let mut e = minicbor::Encoder::new(Vec::new());
    e.begin_array().unwrap();
    for r in &recs {
        e.encode(r).unwrap();
    }
    e.end().unwrap();
    e.u8(9).unwrap();
    let bytes = e.into_writer();
    let mut d = minicbor::Decoder::new(&bytes);
    let got: Records = d.decode().unwrap();
    assert_eq!(got.to_vec(), recs);
    assert_eq!(d.u8().unwrap(), 9, "the decoder stops right after the array");
}

#[test]
fn a_record_that_is_not_one_is_refused_and_nothing_is_added() {
    let good = minicbor::to_vec(batch("t", 1, 1..=1).records.get(0)).unwrap();
    let mut recs = Records::default();
    assert_eq!(recs.push_raw(&good).unwrap(), 1);
    let mut trailing = good.clone();
    trailing.push(0);
    let not_a_record = minicbor::to_vec(("seq", 2u64)).unwrap();
    for bad in [&good[..good.len() - 1], &trailing[..], &not_a_record[..], &[][..]] {
        assert!(recs.push_raw(bad).is_err(), "{bad:?} taken as a record");
    }
    assert_eq!(recs.len(), 1);
    assert_eq!(recs.as_bytes(), good.as_slice());
    // In a frame, a record that is not one makes the frame malformed.
    let mut frame = Vec::new();
    let b = batch("t", 1, 1..=2);
    encode_frame(&Frame::Batch(b), &mut frame, MAX_FRAME_LEN).unwrap();
    let at = frame.windows(good.len()).position(|w| w == good.as_slice()).unwrap();
    frame[at + 1] = 0x60; // the seq becomes an empty text string
    let mut dec = FrameDecoder::default();
    dec.push(&frame);
    assert!(matches!(dec.next_frame(), Err(crate::DecodeError::Malformed(_))));
}

#[test]
fn a_record_inside_a_gap_is_not_stored() {
    // Gaps and records must not overlap; a peer that sends them overlapping gets each
    // seq stored once, as the first item that continued the mark.
    let mut hub = ready_hub();
    let mut b = batch("t", 1, 1..=1);
    let more = batch("t", 0, 3..=5).records;
    b.records = b.records.iter().chain(more.iter()).collect();
    b.gaps.push(Gap { from_seq: 2, through_seq: 4, reason: GapReason::Ttl });
    hub.handle_frame(Frame::Batch(b)).unwrap();
    let Some(HubEvent::Store(req)) = hub.poll_event() else { panic!("store request expected") };
    assert_eq!(req.records.seqs().collect::<Vec<_>>(), vec![1, 5]);
    assert_eq!(req.records.to_vec(), vec![batch("t", 0, 1..=1).records.get(0).to_owned(), more.get(2).to_owned()]);
    assert_eq!(req.through_seq, 5);
}
