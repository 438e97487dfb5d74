//! The hub side of a sync session.
//!
//! The hub never acks on its own: a received batch becomes a [`StoreRequest`] event
//! holding only the items that continue the lane's high-water mark; the driver commits
//! them to its sink and then calls [`HubSession::stored`], which queues the `Ack`.
//! Requests of one lane are handed out in order and must be confirmed in order.

use std::collections::{HashMap, VecDeque};

use crate::frame::*;
use crate::{ProtoError, PROTOCOL_VERSION};

/// What the hub says about itself in `Welcome`.
#[derive(Debug, Clone, Default)]
pub struct HubInfo {
    /// Id of this hub instance.
    pub hub_id: String,
    /// Region it serves.
    pub region: String,
    /// Endpoint list of the failover plane to hand to gateways (may be empty).
    pub endpoints: Vec<String>,
}

/// Things the hub driver must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubEvent {
    /// The gateway said `Hello`: look up the marks of these lanes and call
    /// [`HubSession::accept`].
    Hello(Hello),
    /// Commit these items to the sink, then call [`HubSession::stored`].
    Store(StoreRequest),
    /// A periodic report from the gateway.
    Status(Status),
    /// The gateway asks for a piece of an artifact: answer with
    /// [`HubSession::send_chunk`].
    FetchArtifact(crate::workload::FetchArtifact),
}

/// Items of one lane the sink must commit before they are acked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreRequest {
    /// Lane name.
    pub lane: String,
    /// Records to store, continuing the mark, strictly increasing.
    pub records: Records,
    /// Gaps to record.
    pub gaps: Vec<Gap>,
    /// The lane's mark once this is committed.
    pub through_seq: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitHello,
    AwaitAccept,
    Ready,
    Closed,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::AwaitHello => "awaiting Hello",
            State::AwaitAccept => "looking up marks",
            State::Ready => "ready",
            State::Closed => "closed",
        }
    }
}

/// The hub half of a sync session with one gateway.
#[derive(Debug)]
pub struct HubSession {
    gateway_id: String,
    info: HubInfo,
    state: State,
    /// Per lane: highest seq accepted into a store request (committed or not).
    accepted: HashMap<String, u64>,
    /// Per lane: floor given by the gateway's `Hello` (what it no longer holds).
    floors: HashMap<String, u64>,
    out: VecDeque<Frame>,
    events: VecDeque<HubEvent>,
}

impl HubSession {
    /// A session for the gateway whose id was taken from its certificate.
    pub fn new(gateway_id: impl Into<String>, info: HubInfo) -> Self {
        Self {
            gateway_id: gateway_id.into(),
            info,
            state: State::AwaitHello,
            accepted: HashMap::new(),
            floors: HashMap::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// The gateway id this session serves.
    pub fn gateway_id(&self) -> &str {
        &self.gateway_id
    }

    /// Answers the gateway's `Hello` with the sink's marks of its lanes.
    ///
    /// Where the gateway no longer holds seqs above the sink's mark (they were acked
    /// by another hub with its own sink), the session's mark starts at the gateway's
    /// floor, so the lane goes on without waiting for records that will never come.
    pub fn accept(&mut self, marks: &[(String, u64)], manifest_version: u64) {
        let mut lanes = Vec::with_capacity(marks.len());
        for (lane, hwm) in marks {
            let floor = self.floors.get(lane).copied().unwrap_or(0);
            let mark = (*hwm).max(floor);
            self.accepted.insert(lane.clone(), mark);
            lanes.push(LaneMark { lane: lane.clone(), hwm: mark });
        }
        self.out.push_back(Frame::Welcome(Welcome {
            hub_id: self.info.hub_id.clone(),
            region: self.info.region.clone(),
            gateway_id: self.gateway_id.clone(),
            lanes,
            endpoints: self.info.endpoints.clone(),
            manifest_version,
        }));
        self.state = State::Ready;
    }

    /// The sink committed `req`: ack it.
    pub fn stored(&mut self, lane: &str, through_seq: u64) {
        self.out.push_back(Frame::Ack(Ack { lane: lane.to_owned(), through_seq, rejected_batch: None }));
    }

    /// Queues a signed workload manifest for the gateway (after `accept`).
    pub fn send_manifest(&mut self, manifest: crate::workload::SignedManifest) {
        if self.state == State::Ready {
            self.out.push_back(Frame::Manifest(manifest));
        }
    }

    /// Queues a piece of an artifact the gateway asked for.
    pub fn send_chunk(&mut self, chunk: crate::workload::ArtifactChunk) {
        if self.state == State::Ready {
            self.out.push_back(Frame::ArtifactChunk(chunk));
        }
    }

    /// Queues a command for the gateway.
    pub fn command(&mut self, command: Command) {
        if self.state == State::Ready {
            self.out.push_back(Frame::Command(command));
        }
    }

    /// Processes one frame received from the gateway.
    pub fn handle_frame(&mut self, frame: Frame) -> Result<(), ProtoError> {
        match (self.state, frame) {
            (_, Frame::Error(e)) => {
                self.state = State::Closed;
                Err(ProtoError::Peer { code: e.code, reason: e.reason })
            }
            (State::AwaitHello, Frame::Hello(h)) => {
                if h.protocol_version != PROTOCOL_VERSION {
                    self.state = State::Closed;
                    self.out.push_back(Frame::Error(ErrorFrame {
                        code: crate::error_code::VERSION,
                        reason: format!(
                            "protocol version {} not supported, this hub speaks {PROTOCOL_VERSION}",
                            h.protocol_version
                        ),
                    }));
                    return Err(ProtoError::UnsupportedVersion(h.protocol_version));
                }
                for c in &h.lanes {
                    self.floors.insert(c.lane.clone(), c.oldest_unacked.saturating_sub(1));
                }
                self.state = State::AwaitAccept;
                self.events.push_back(HubEvent::Hello(h));
                Ok(())
            }
            (State::Ready, Frame::Batch(b)) => self.on_batch(b),
            (State::Ready, Frame::Status(s)) => {
                self.events.push_back(HubEvent::Status(s));
                Ok(())
            }
            (State::Ready, Frame::FetchArtifact(f)) => {
                self.events.push_back(HubEvent::FetchArtifact(f));
                Ok(())
            }
            (state, f) => Err(ProtoError::UnexpectedFrame { got: f.kind(), state: state.name() }),
        }
    }

    fn on_batch(&mut self, b: Batch) -> Result<(), ProtoError> {
        if !b.records.strictly_increasing() || b.records.first_seq() == Some(0) {
            return Err(ProtoError::InvalidBatch { lane: b.lane, reason: "records not strictly increasing from 1" });
        }
        if b.gaps.iter().any(|g| g.from_seq == 0 || g.from_seq > g.through_seq) {
            return Err(ProtoError::InvalidBatch { lane: b.lane, reason: "gap range empty or starting at 0" });
        }
        let mark = match self.accepted.get(&b.lane) {
            Some(m) => *m,
            None => {
                // A lane `accept` gave no mark for (the sink does not know it yet): start
                // at the gateway's floor from Hello, 0 for a lane it did not name there.
                let floor = self.floors.get(&b.lane).copied().unwrap_or(0);
                self.accepted.insert(b.lane.clone(), floor);
                floor
            }
        };
        // Merge records and gaps in seq order and keep what continues the mark.
        let mut mark_now = mark;
        // Indices of the records kept.
        let mut keep = Vec::new();
        let mut gaps = Vec::new();
        let mut gi = b.gaps.into_iter().peekable();
        let mut ri = 0;
        let mut hole = false;
        loop {
            let take_gap = match (ri < b.records.len(), gi.peek()) {
                (false, None) => break,
                (true, None) => false,
                (false, Some(_)) => true,
                (true, Some(g)) => g.from_seq < b.records.seq(ri),
            };
            if take_gap {
                let g = gi.next().expect("peeked");
                if g.through_seq <= mark_now {
                    continue;
                }
                if g.from_seq > mark_now + 1 {
                    hole = true;
                    break;
                }
                let g = Gap { from_seq: g.from_seq.max(mark_now + 1), ..g };
                mark_now = g.through_seq;
                gaps.push(g);
            } else {
                let seq = b.records.seq(ri);
                ri += 1;
                if seq <= mark_now {
                    continue;
                }
                if seq > mark_now + 1 {
                    hole = true;
                    break;
                }
                mark_now = seq;
                keep.push(ri - 1);
            }
        }
        let records = b.records.select(&keep);
        if mark_now > mark {
            self.accepted.insert(b.lane.clone(), mark_now);
            self.events.push_back(HubEvent::Store(StoreRequest {
                lane: b.lane.clone(),
                records,
                gaps,
                through_seq: mark_now,
            }));
        }
        if hole {
            // An earlier batch was lost: tell the gateway to resend from its last ack.
            // The refusal goes out at once, ahead of acks for accepted items still being
            // committed, so it claims nothing (`through_seq` 0); retransmits at or below
            // the accepted mark are ignored.
            self.out.push_back(Frame::Ack(Ack { lane: b.lane, through_seq: 0, rejected_batch: Some(b.batch_id) }));
        } else if mark_now == mark {
            // Pure retransmit: everything was at or below the mark. Re-ack so the gateway
            // can delete, but only what it already had acked or what is committed; the
            // accepted mark may be ahead of the sink, so the driver must not ack until
            // pending requests are stored. An ack through the accepted mark is queued
            // behind them in order.
            self.pending_reack(b.lane, mark);
        }
        Ok(())
    }

    fn pending_reack(&mut self, lane: String, mark: u64) {
        self.events.push_back(HubEvent::Store(StoreRequest {
            lane,
            records: Records::default(),
            gaps: Vec::new(),
            through_seq: mark,
        }));
    }

    /// Next frame to write to the gateway.
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.out.pop_front()
    }

    /// Next thing for the driver to do.
    pub fn poll_event(&mut self) -> Option<HubEvent> {
        self.events.pop_front()
    }
}
