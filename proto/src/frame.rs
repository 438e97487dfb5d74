//! The frames of the sync protocol and the records they carry.
//!
//! Every type here is encoded with minicbor's derive, fields keyed by index so that
//! later versions can add optional fields without breaking older peers.

use minicbor::bytes::ByteVec;
use minicbor::{Decode, Encode};

pub use crate::records::Records;
use crate::workload::{ArtifactChunk, FetchArtifact, SignedManifest, WorkloadState};

/// One frame on the sync stream.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[non_exhaustive]
pub enum Frame {
    /// Gateway → hub, first frame of a connection.
    #[n(0)]
    Hello(#[n(0)] Hello),
    /// Hub → gateway, answer to `Hello`.
    #[n(1)]
    Welcome(#[n(0)] Welcome),
    /// Gateway → hub, records (and evicted ranges) of one lane.
    #[n(2)]
    Batch(#[n(0)] Batch),
    /// Hub → gateway, everything of a lane through a seq is durable in the sink.
    #[n(3)]
    Ack(#[n(0)] Ack),
    /// Gateway → hub, periodic state report.
    #[n(4)]
    Status(#[n(0)] Status),
    /// Hub → gateway, an instruction.
    #[n(5)]
    Command(#[n(0)] Command),
    /// Either way, the sender is closing the session because of an error.
    #[n(6)]
    Error(#[n(0)] ErrorFrame),
    /// Hub → gateway, a signed workload manifest newer than the gateway's.
    #[n(7)]
    Manifest(#[n(0)] SignedManifest),
    /// Gateway → hub, send a piece of an artifact.
    #[n(8)]
    FetchArtifact(#[n(0)] FetchArtifact),
    /// Hub → gateway, a piece of an artifact.
    #[n(9)]
    ArtifactChunk(#[n(0)] ArtifactChunk),
}

impl Frame {
    /// Short name of the frame kind, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "Hello",
            Frame::Welcome(_) => "Welcome",
            Frame::Batch(_) => "Batch",
            Frame::Ack(_) => "Ack",
            Frame::Status(_) => "Status",
            Frame::Command(_) => "Command",
            Frame::Error(_) => "Error",
            Frame::Manifest(_) => "Manifest",
            Frame::FetchArtifact(_) => "FetchArtifact",
            Frame::ArtifactChunk(_) => "ArtifactChunk",
        }
    }
}

/// First frame of a session, gateway → hub.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Hello {
    /// Protocol version the gateway speaks ([`crate::PROTOCOL_VERSION`]).
    #[n(0)]
    pub protocol_version: u32,
    /// The gateway agent's version string.
    #[n(1)]
    pub agent_version: String,
    /// Random id chosen at each start of the agent.
    #[n(2)]
    pub boot_id: u64,
    /// Per lane: what the gateway still holds.
    #[n(3)]
    pub lanes: Vec<LaneCursor>,
    /// Optional features the gateway supports.
    #[n(4)]
    pub capabilities: Vec<String>,
    /// Version of the workload manifest the gateway runs (absent or 0: none).
    #[n(5)]
    pub manifest_version: Option<u64>,
}

/// What a gateway holds of one lane.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct LaneCursor {
    /// Lane name.
    #[n(0)]
    pub lane: String,
    /// Oldest seq not yet acknowledged by a hub (`next_seq` when none).
    #[n(1)]
    pub oldest_unacked: u64,
    /// Next seq the store will assign.
    #[n(2)]
    pub next_seq: u64,
}

/// Answer to `Hello`, hub → gateway.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Welcome {
    /// Id of the hub instance.
    #[n(0)]
    pub hub_id: String,
    /// Region the hub serves.
    #[n(1)]
    pub region: String,
    /// The gateway id the hub took from the client certificate.
    #[n(2)]
    pub gateway_id: String,
    /// Per lane named in `Hello`: the hub's high-water mark.
    #[n(3)]
    pub lanes: Vec<LaneMark>,
    /// Ordered endpoint list of the failover plane (may be empty: keep yours).
    #[n(4)]
    pub endpoints: Vec<String>,
    /// Version of the workload manifest the hub holds for this gateway (0: none).
    #[n(5)]
    pub manifest_version: u64,
}

/// The hub's high-water mark of one lane.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct LaneMark {
    /// Lane name.
    #[n(0)]
    pub lane: String,
    /// Every seq at or below this is durable at the hub (0: nothing yet).
    #[n(1)]
    pub hwm: u64,
}

/// One stored record as it travels.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Record {
    /// Per-lane sequence number assigned by the gateway store.
    #[n(0)]
    pub seq: u64,
    /// Ingest time, milliseconds since the Unix epoch (gateway clock).
    #[n(1)]
    pub ingest_ts_ms: u64,
    /// Where it came from: MQTT topic or sensor id.
    #[n(2)]
    pub source: String,
    /// Optional content type of the payload.
    #[n(3)]
    pub content_type: Option<String>,
    /// The opaque payload.
    #[n(4)]
    pub payload: ByteVec,
}

/// A [`Record`] made of borrowed parts: it encodes to the same bytes, so a store can
/// encode what it was given without copying the payload first, and decoding one checks
/// a record without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct RecordRef<'a> {
    /// See [`Record::seq`].
    #[n(0)]
    pub seq: u64,
    /// See [`Record::ingest_ts_ms`].
    #[n(1)]
    pub ingest_ts_ms: u64,
    /// See [`Record::source`].
    #[b(2)]
    pub source: &'a str,
    /// See [`Record::content_type`].
    #[b(3)]
    pub content_type: Option<&'a str>,
    /// See [`Record::payload`].
    #[cbor(b(4), with = "minicbor::bytes")]
    pub payload: &'a [u8],
}

impl RecordRef<'_> {
    /// The record with its parts copied.
    pub fn to_owned(self) -> Record {
        Record {
            seq: self.seq,
            ingest_ts_ms: self.ingest_ts_ms,
            source: self.source.to_owned(),
            content_type: self.content_type.map(str::to_owned),
            payload: self.payload.to_vec().into(),
        }
    }
}

impl Record {
    /// The record's parts, borrowed.
    pub fn as_ref(&self) -> RecordRef<'_> {
        RecordRef {
            seq: self.seq,
            ingest_ts_ms: self.ingest_ts_ms,
            source: &self.source,
            content_type: self.content_type.as_deref(),
            payload: &self.payload,
        }
    }

    /// Bytes this record takes on the wire, roughly (payload plus metadata).
    pub fn approx_size(&self) -> usize {
        self.payload.len() + self.source.len() + self.content_type.as_ref().map_or(0, String::len) + 24
    }
}

/// Why records were evicted before they reached a hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Encode, Decode)]
#[cbor(index_only)]
pub enum GapReason {
    /// The lane or the disk was over its byte budget.
    #[n(0)]
    Capacity,
    /// The records were older than the lane's TTL.
    #[n(1)]
    Ttl,
}

impl GapReason {
    /// Lower-case name used in metrics and exports.
    pub fn as_str(self) -> &'static str {
        match self {
            GapReason::Capacity => "capacity",
            GapReason::Ttl => "ttl",
        }
    }
}

/// A range of seqs that were evicted on the gateway and will never be sent.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Gap {
    /// First evicted seq.
    #[n(0)]
    pub from_seq: u64,
    /// Last evicted seq (inclusive).
    #[n(1)]
    pub through_seq: u64,
    /// Why.
    #[n(2)]
    pub reason: GapReason,
}

/// Records and gaps of one lane, in seq order.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Batch {
    /// Lane name.
    #[n(0)]
    pub lane: String,
    /// Per-session id of this batch, echoed in a refusal.
    #[n(1)]
    pub batch_id: u64,
    /// Records, strictly increasing seq.
    #[n(2)]
    pub records: Records,
    /// Evicted ranges, increasing, not overlapping records.
    #[n(3)]
    pub gaps: Vec<Gap>,
}

impl Batch {
    /// Highest seq covered by the batch (record or gap), 0 if empty.
    pub fn last_seq(&self) -> u64 {
        let r = self.records.last_seq().unwrap_or(0);
        let g = self.gaps.iter().map(|g| g.through_seq).max().unwrap_or(0);
        r.max(g)
    }

    /// Lowest seq covered by the batch (record or gap), 0 if empty.
    pub fn first_seq(&self) -> u64 {
        let r = self.records.first_seq();
        let g = self.gaps.iter().map(|g| g.from_seq).min();
        match (r, g) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => 0,
        }
    }
}

/// Hub → gateway: the sink holds everything of `lane` through `through_seq`.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Ack {
    /// Lane name.
    #[n(0)]
    pub lane: String,
    /// The lane's high-water mark after the commit (0 in a refusal: no claim).
    #[n(1)]
    pub through_seq: u64,
    /// Set when the hub refused a batch because it did not continue the high-water
    /// mark (an earlier batch was lost): the gateway resends from `through_seq + 1`.
    #[n(2)]
    pub rejected_batch: Option<u64>,
}

/// Gateway → hub periodic report.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Status {
    /// Seconds since the agent started.
    #[n(0)]
    pub uptime_s: u64,
    /// Per lane backlog.
    #[n(1)]
    pub lanes: Vec<LaneStatus>,
    /// Bytes of records held in the gateway's store (what its budget limits).
    #[n(2)]
    pub store_used_bytes: Option<u64>,
    /// The store's budget, bytes.
    #[n(3)]
    pub store_budget_bytes: Option<u64>,
    /// Version of the workload manifest the gateway runs.
    #[n(4)]
    pub manifest_version: Option<u64>,
    /// The workloads and their state.
    #[n(5)]
    pub workloads: Option<Vec<WorkloadState>>,
}

/// Backlog of one lane in a [`Status`].
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct LaneStatus {
    /// Lane name.
    #[n(0)]
    pub lane: String,
    /// Records not yet acknowledged.
    #[n(1)]
    pub backlog_records: u64,
    /// Bytes not yet acknowledged.
    #[n(2)]
    pub backlog_bytes: u64,
    /// Age of the oldest unacknowledged record, milliseconds.
    #[n(3)]
    pub oldest_unsynced_age_ms: u64,
}

/// Hub → gateway instructions.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
#[non_exhaustive]
pub enum Command {
    /// Limit the uplink to this many bytes per second (0: no limit).
    #[n(0)]
    SlowDown(#[n(0)] u64),
    /// Reconnect to another endpoint.
    #[n(1)]
    Redirect(#[n(0)] String),
}

/// The sender closes the session because of an error.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ErrorFrame {
    /// One of [`crate::error_code`].
    #[n(0)]
    pub code: u32,
    /// Human-readable reason.
    #[n(1)]
    pub reason: String,
}
