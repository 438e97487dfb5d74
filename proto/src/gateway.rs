//! The gateway side of a sync session.
//!
//! The driver feeds it received frames ([`GatewaySession::handle_frame`]), time
//! ([`GatewaySession::handle_timeout`]) and news from the store
//! ([`GatewaySession::notify_appended`]); it asks [`GatewaySession::poll_send_slot`]
//! which lane to read next and hands the records to [`GatewaySession::send_batch`].
//! Frames to write come out of [`GatewaySession::poll_transmit`], things to do (delete
//! acknowledged records, learn endpoints) out of [`GatewaySession::poll_event`].
//!
//! Lanes are served by priority (lower number first) with a window of batches in flight
//! per lane. A lower lane is not starved: after [`GatewayConfig::starvation_slots`]
//! consecutive slots given to others while it had data, it gets the next one.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use crate::frame::*;
use crate::{ProtoError, PROTOCOL_VERSION};

/// Tunables of the gateway session.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Batches in flight per lane.
    pub window_batches: usize,
    /// Most records in one batch.
    pub max_batch_records: usize,
    /// Most payload bytes in one batch (keep well under the frame limit).
    pub max_batch_bytes: usize,
    /// Resend from the last ack when the oldest batch in flight is not acked in time.
    pub ack_timeout: Duration,
    /// Interval of [`Status`] reports.
    pub status_interval: Duration,
    /// Give a waiting lower-priority lane a slot after this many slots went elsewhere.
    pub starvation_slots: u32,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            window_batches: 8,
            max_batch_records: 1024,
            max_batch_bytes: 1024 * 1024,
            ack_timeout: Duration::from_secs(30),
            status_interval: Duration::from_secs(10),
            starvation_slots: 4,
        }
    }
}

/// What the gateway's store holds of one lane when a session starts.
#[derive(Debug, Clone)]
pub struct LaneInit {
    /// Lane name.
    pub name: String,
    /// Priority, lower is served first.
    pub priority: u8,
    /// Oldest seq still in the store (or `next_seq` when empty).
    pub oldest_unacked: u64,
    /// Next seq the store will assign.
    pub next_seq: u64,
}

/// Things the driver must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayEvent {
    /// The hub answered `Hello`.
    Welcomed(Welcome),
    /// The hub holds everything of `lane` through `through_seq`: delete it locally.
    Acked {
        /// Lane name.
        lane: String,
        /// Delete through this seq.
        through_seq: u64,
    },
    /// The hub sent a command.
    Command(Command),
    /// The hub sent a workload manifest (verify it before anything else).
    Manifest(crate::workload::SignedManifest),
    /// The hub sent a piece of an artifact that was asked for.
    ArtifactChunk(crate::workload::ArtifactChunk),
}

/// Where the driver should read records next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendSlot {
    /// Lane to read.
    pub lane: String,
    /// First seq wanted (records below it are already sent or acked).
    pub from_seq: u64,
    /// Most records to put in the batch.
    pub max_records: usize,
    /// Most payload bytes to put in the batch.
    pub max_bytes: usize,
}

#[derive(Debug)]
struct InFlight {
    batch_id: u64,
    last_seq: u64,
    sent_at: Duration,
}

#[derive(Debug)]
struct LaneTx {
    priority: u8,
    /// Highest seq the hub acknowledged.
    acked: u64,
    /// Next seq to send.
    next_send: u64,
    /// Highest seq sent in this session (rewinds do not lower it).
    sent_max: u64,
    /// One past the last seq the store holds.
    store_end: u64,
    inflight: VecDeque<InFlight>,
    /// Slots given to other lanes while this one had data.
    waited: u32,
}

impl LaneTx {
    /// The store's next seq as known at session start (or later appends).
    fn next_seq_floor(&self) -> u64 {
        self.store_end
    }

    fn has_data(&self) -> bool {
        self.next_send < self.store_end
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitWelcome,
    Ready,
    Closed,
}

/// The gateway half of a sync session.
#[derive(Debug)]
pub struct GatewaySession {
    cfg: GatewayConfig,
    state: State,
    lanes: BTreeMap<String, LaneTx>,
    out: VecDeque<Frame>,
    events: VecDeque<GatewayEvent>,
    next_batch_id: u64,
    next_status: Option<Duration>,
    status_source: Option<Status>,
}

impl GatewaySession {
    /// Starts a session: queues `Hello` describing `lanes`.
    pub fn new(cfg: GatewayConfig, agent_version: &str, boot_id: u64, lanes: Vec<LaneInit>) -> Self {
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: agent_version.to_owned(),
            boot_id,
            lanes: lanes
                .iter()
                .map(|l| LaneCursor { lane: l.name.clone(), oldest_unacked: l.oldest_unacked, next_seq: l.next_seq })
                .collect(),
            capabilities: vec!["gaps".into(), "workloads".into()],
            manifest_version: None,
        };
        let lanes = lanes
            .into_iter()
            .map(|l| {
                let acked = l.oldest_unacked.saturating_sub(1);
                (
                    l.name,
                    LaneTx {
                        priority: l.priority,
                        acked,
                        next_send: acked + 1,
                        sent_max: acked,
                        store_end: l.next_seq,
                        inflight: VecDeque::new(),
                        waited: 0,
                    },
                )
            })
            .collect();
        let mut out = VecDeque::new();
        out.push_back(Frame::Hello(hello));
        Self {
            cfg,
            state: State::AwaitWelcome,
            lanes,
            out,
            events: VecDeque::new(),
            next_batch_id: 1,
            next_status: None,
            status_source: None,
        }
    }

    /// Says in `Hello` which manifest version the gateway runs. Call before the first
    /// [`GatewaySession::poll_transmit`].
    pub fn set_manifest_version(&mut self, version: u64) {
        for f in self.out.iter_mut() {
            if let Frame::Hello(h) = f {
                h.manifest_version = Some(version);
            }
        }
    }

    /// Asks the hub for a piece of an artifact (after `Welcome`).
    pub fn fetch_artifact(&mut self, fetch: crate::workload::FetchArtifact) {
        if self.state == State::Ready {
            self.out.push_back(Frame::FetchArtifact(fetch));
        }
    }

    /// True once the hub's `Welcome` has been processed.
    pub fn is_ready(&self) -> bool {
        self.state == State::Ready
    }

    /// The store appended records: it now holds seqs below `next_seq` for `lane`.
    pub fn notify_appended(&mut self, lane: &str, next_seq: u64) {
        if let Some(l) = self.lanes.get_mut(lane) {
            l.store_end = l.store_end.max(next_seq);
        }
    }

    /// Seqs of `lane` that were sent but not yet acked, and records not yet sent.
    pub fn unacked_range(&self, lane: &str) -> Option<(u64, u64)> {
        self.lanes.get(lane).map(|l| (l.acked + 1, l.store_end))
    }

    /// Highest seq the hub acknowledged for `lane`.
    pub fn acked(&self, lane: &str) -> Option<u64> {
        self.lanes.get(lane).map(|l| l.acked)
    }

    /// Number of batches in flight over all lanes.
    pub fn inflight_batches(&self) -> usize {
        self.lanes.values().map(|l| l.inflight.len()).sum()
    }

    /// The lane the driver should read next, if any lane has data and window space.
    pub fn poll_send_slot(&mut self) -> Option<SendSlot> {
        if self.state != State::Ready {
            return None;
        }
        let window = self.cfg.window_batches;
        let eligible = |l: &LaneTx| l.has_data() && l.inflight.len() < window;
        // A starved lane goes first, then by priority.
        let starved = self
            .lanes
            .iter()
            .filter(|(_, l)| eligible(l) && l.waited >= self.cfg.starvation_slots)
            .max_by_key(|(_, l)| l.waited)
            .map(|(n, _)| n.clone());
        let chosen = starved.or_else(|| {
            self.lanes.iter().filter(|(_, l)| eligible(l)).min_by_key(|(_, l)| l.priority).map(|(n, _)| n.clone())
        })?;
        for (name, l) in self.lanes.iter_mut() {
            if *name == chosen {
                l.waited = 0;
            } else if eligible(l) {
                l.waited = l.waited.saturating_add(1);
            }
        }
        let l = &self.lanes[&chosen];
        Some(SendSlot {
            lane: chosen,
            from_seq: l.next_send,
            max_records: self.cfg.max_batch_records,
            max_bytes: self.cfg.max_batch_bytes,
        })
    }

    /// Queues a batch of `lane` read from the store for a slot.
    ///
    /// `records` must be strictly increasing and start at or after the slot's
    /// `from_seq`; `gaps` name evicted ranges among them, so that records and gaps
    /// together continue the lane without a hole. An empty batch tells the session that
    /// the store holds nothing more of the lane for now.
    pub fn send_batch(
        &mut self,
        now: Duration,
        lane: &str,
        records: Records,
        gaps: Vec<Gap>,
    ) -> Result<(), ProtoError> {
        let l =
            self.lanes.get_mut(lane).ok_or(ProtoError::InvalidBatch { lane: lane.into(), reason: "unknown lane" })?;
        if !records.strictly_increasing() {
            return Err(ProtoError::InvalidBatch { lane: lane.into(), reason: "records not strictly increasing" });
        }
        if records.is_empty() && gaps.is_empty() {
            l.store_end = l.next_send;
            return Ok(());
        }
        let batch = Batch { lane: lane.to_owned(), batch_id: self.next_batch_id, records, gaps };
        let last = batch.last_seq();
        if batch.first_seq() < l.next_send {
            return Err(ProtoError::InvalidBatch { lane: lane.into(), reason: "batch starts before the send cursor" });
        }
        self.next_batch_id += 1;
        l.next_send = last + 1;
        l.sent_max = l.sent_max.max(last);
        l.store_end = l.store_end.max(l.next_send);
        l.inflight.push_back(InFlight { batch_id: batch.batch_id, last_seq: last, sent_at: now });
        self.out.push_back(Frame::Batch(batch));
        Ok(())
    }

    /// Changes the most payload bytes of the next batches (a rate limit keeps batches
    /// small so that pacing stays smooth). Batches in flight are not affected.
    pub fn set_max_batch_bytes(&mut self, max_bytes: usize) {
        self.cfg.max_batch_bytes = max_bytes.max(1);
    }

    /// Sets what the next periodic `Status` report says.
    pub fn set_status(&mut self, status: Status) {
        self.status_source = Some(status);
    }

    /// Processes one frame received from the hub.
    pub fn handle_frame(&mut self, now: Duration, frame: Frame) -> Result<(), ProtoError> {
        match (self.state, frame) {
            (_, Frame::Error(e)) => {
                self.state = State::Closed;
                Err(ProtoError::Peer { code: e.code, reason: e.reason })
            }
            (State::AwaitWelcome, Frame::Welcome(w)) => {
                // A mark at or beyond the store's next seq means the hub holds seqs this
                // store never assigned (the store was replaced, or the certificate moved to
                // another device). Trusting it would delete new records unsent: refuse.
                if let Some((mark, l)) = w
                    .lanes
                    .iter()
                    .find_map(|m| self.lanes.get(&m.lane).filter(|l| m.hwm >= l.next_seq_floor()).map(|l| (m, l)))
                {
                    self.state = State::Closed;
                    return Err(ProtoError::MarkBeyondStore {
                        lane: mark.lane.clone(),
                        hub_mark: mark.hwm,
                        next_seq: l.next_seq_floor(),
                    });
                }
                for mark in &w.lanes {
                    if let Some(l) = self.lanes.get_mut(&mark.lane) {
                        // The hub may hold more than we know was acked (an ack lost in a
                        // crash): resume after its mark and delete what it has.
                        if mark.hwm > l.acked {
                            l.acked = mark.hwm;
                            self.events
                                .push_back(GatewayEvent::Acked { lane: mark.lane.clone(), through_seq: mark.hwm });
                        }
                        l.next_send = l.acked + 1;
                        l.sent_max = l.sent_max.max(l.acked);
                        l.store_end = l.store_end.max(l.next_send);
                    }
                }
                self.state = State::Ready;
                self.next_status = Some(now + self.cfg.status_interval);
                self.events.push_back(GatewayEvent::Welcomed(w));
                Ok(())
            }
            (State::Ready, Frame::Ack(a)) => self.on_ack(a),
            (State::Ready, Frame::Command(c)) => {
                self.events.push_back(GatewayEvent::Command(c));
                Ok(())
            }
            (State::Ready, Frame::Manifest(m)) => {
                self.events.push_back(GatewayEvent::Manifest(m));
                Ok(())
            }
            (State::Ready, Frame::ArtifactChunk(c)) => {
                self.events.push_back(GatewayEvent::ArtifactChunk(c));
                Ok(())
            }
            (state, f) => Err(ProtoError::UnexpectedFrame {
                got: f.kind(),
                state: match state {
                    State::AwaitWelcome => "awaiting Welcome",
                    State::Ready => "ready",
                    State::Closed => "closed",
                },
            }),
        }
    }

    fn on_ack(&mut self, a: Ack) -> Result<(), ProtoError> {
        let Some(l) = self.lanes.get_mut(&a.lane) else {
            return Err(ProtoError::InvalidBatch { lane: a.lane, reason: "ack for a lane never sent" });
        };
        let sent_through = l.sent_max;
        if a.through_seq > sent_through {
            return Err(ProtoError::AckBeyondSent { lane: a.lane, through_seq: a.through_seq, sent_through });
        }
        if a.through_seq > l.acked {
            l.acked = a.through_seq;
            l.next_send = l.next_send.max(a.through_seq + 1);
            while l.inflight.front().is_some_and(|f| f.last_seq <= a.through_seq) {
                l.inflight.pop_front();
            }
            self.events.push_back(GatewayEvent::Acked { lane: a.lane.clone(), through_seq: a.through_seq });
        }
        if let Some(id) = a.rejected_batch {
            // Rewind only for a batch of this generation still in flight; refusals of
            // batches sent before an earlier rewind are stale.
            if l.inflight.iter().any(|f| f.batch_id == id) {
                l.inflight.clear();
                l.next_send = l.acked + 1;
            }
        }
        Ok(())
    }

    /// Processes the passage of time: ack timeouts and status reports.
    pub fn handle_timeout(&mut self, now: Duration) {
        if self.state != State::Ready {
            return;
        }
        let timeout = self.cfg.ack_timeout;
        for l in self.lanes.values_mut() {
            if l.inflight.front().is_some_and(|f| now >= f.sent_at + timeout) {
                l.inflight.clear();
                l.next_send = l.acked + 1;
            }
        }
        if self.next_status.is_some_and(|t| now >= t) {
            if let Some(s) = self.status_source.clone() {
                self.out.push_back(Frame::Status(s));
            }
            self.next_status = Some(now + self.cfg.status_interval);
        }
    }

    /// When [`GatewaySession::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Duration> {
        if self.state != State::Ready {
            return None;
        }
        let ack =
            self.lanes.values().filter_map(|l| l.inflight.front().map(|f| f.sent_at + self.cfg.ack_timeout)).min();
        match (ack, self.next_status) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Next frame to write to the hub.
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.out.pop_front()
    }

    /// Next thing for the driver to do.
    pub fn poll_event(&mut self) -> Option<GatewayEvent> {
        self.events.pop_front()
    }
}
