//! The VOITHER Edge sync protocol, sans-IO.
//!
//! This crate holds everything that gateway and hub must agree on, and nothing that
//! touches a socket, a task or a clock: time is passed in by the caller as a
//! monotonic [`std::time::Duration`] since an arbitrary origin, bytes go in and out
//! through [`codec`], and the session state machines ([`GatewaySession`],
//! [`HubSession`]) only queue frames and events for their drivers to act on.
//!
//! # Wire format
//!
//! A connection (QUIC, ALPN [`ALPN`]) carries one bidirectional stream. Every frame on
//! it is a 4-byte big-endian length followed by that many bytes of CBOR encoding one
//! [`Frame`]. Frames larger than the decoder's limit (default [`codec::MAX_FRAME_LEN`])
//! are refused before any of their body is buffered; malformed or unknown frames are
//! errors, never panics.
//!
//! ```text
//! gateway                                   hub
//!   Hello {version, boot id, lanes}   ──▶
//!                                     ◀──   Welcome {hub id, region, per-lane high-water mark}
//!   Batch {lane, id, records, gaps}   ──▶   (window of batches in flight)
//!   Batch …                           ──▶   sink commit
//!                                     ◀──   Ack {lane, through_seq}
//!   Status (periodic)                 ──▶
//!                                     ◀──   Command (slow down, redirect, …)
//! ```
//!
//! # Invariants
//!
//! 1. Sequence numbers are per (gateway, lane), start at 1, are assigned by the
//!    gateway's store at durable append and never reused. `0` means "nothing".
//! 2. The hub keeps, per (gateway, lane), the high-water mark (HWM): every seq at or
//!    below it is durably in its sink or durably recorded as a gap. It only ever grows.
//! 3. The hub accepts an item (record or gap) only if it continues the HWM without a
//!    hole: items at or below the HWM are ignored (retransmits), an item beyond
//!    `HWM + 1` means an earlier batch was lost, and the batch is refused with a
//!    [`Ack`] whose `rejected_batch` names it, so the gateway rewinds.
//! 4. The hub sends `Ack {through_seq}` only after its sink has committed everything
//!    through `through_seq`. The gateway deletes records only on such an ack.
//! 5. Together, 2–4 make delivery effectively once: retransmits after loss, crashes,
//!    reconnects or failovers never produce a duplicate in the sink, and nothing the
//!    gateway deleted is missing from it.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod codec;
pub mod frame;
pub mod gateway;
pub mod hub;
pub mod limit;
pub mod records;
pub mod workload;

#[cfg(test)]
mod tests;

pub use codec::{encode_frame, DecodeError, EncodeError, FrameDecoder, MAX_FRAME_LEN};
pub use frame::*;
pub use gateway::{GatewayConfig, GatewayEvent, GatewaySession, LaneInit, SendSlot};
pub use hub::{HubEvent, HubInfo, HubSession, StoreRequest};
pub use workload::{ArtifactChunk, FetchArtifact, SignedManifest, WorkloadState};

/// ALPN protocol id of the sync protocol, version 1.
pub const ALPN: &[u8] = b"voither-sync/1";

/// Protocol version carried in [`Hello`]; a hub refuses versions it does not speak.
pub const PROTOCOL_VERSION: u32 = 1;

/// Errors a session reports for frames that break the protocol.
///
/// The driver should close the connection with [`ProtoError::code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// A frame arrived that is not allowed in the session's current state.
    #[error("unexpected {got} frame while {state}")]
    UnexpectedFrame {
        /// Name of the frame kind received.
        got: &'static str,
        /// The state the session was in.
        state: &'static str,
    },
    /// The peer speaks a protocol version this side does not.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u32),
    /// A batch is internally inconsistent (sequence numbers not increasing, etc.).
    #[error("invalid batch for lane {lane}: {reason}")]
    InvalidBatch {
        /// Lane named by the batch.
        lane: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The peer acknowledged a sequence number it was never sent.
    #[error("ack for lane {lane} through {through_seq} beyond what was sent ({sent_through})")]
    AckBeyondSent {
        /// Lane of the ack.
        lane: String,
        /// The acknowledged seq.
        through_seq: u64,
        /// The highest seq actually sent.
        sent_through: u64,
    },
    /// The hub's high-water mark is at or beyond the next seq of the gateway's store:
    /// the hub holds seqs this store never assigned (a replaced store, a copied
    /// certificate). The gateway refuses to delete anything on that word.
    #[error("hub mark {hub_mark} for lane {lane} is at or beyond this store's next seq {next_seq}: the store was replaced or the identity is shared; refusing to sync this lane")]
    MarkBeyondStore {
        /// Lane.
        lane: String,
        /// The hub's mark.
        hub_mark: u64,
        /// The store's next seq.
        next_seq: u64,
    },
    /// The peer closed the session with an error frame.
    #[error("peer error {code}: {reason}")]
    Peer {
        /// The peer's error code.
        code: u32,
        /// The peer's reason text.
        reason: String,
    },
}

impl ProtoError {
    /// Application error code to close the connection or stream with.
    pub fn code(&self) -> u32 {
        match self {
            ProtoError::UnexpectedFrame { .. } => error_code::PROTOCOL,
            ProtoError::UnsupportedVersion(_) => error_code::VERSION,
            ProtoError::InvalidBatch { .. } => error_code::PROTOCOL,
            ProtoError::AckBeyondSent { .. } => error_code::PROTOCOL,
            ProtoError::MarkBeyondStore { .. } => error_code::PROTOCOL,
            ProtoError::Peer { code, .. } => *code,
        }
    }
}

/// Application error codes used to close connections and in [`ErrorFrame`].
pub mod error_code {
    /// Orderly shutdown.
    pub const NONE: u32 = 0;
    /// A frame broke the protocol.
    pub const PROTOCOL: u32 = 1;
    /// A frame could not be decoded or was too large.
    pub const FRAME: u32 = 2;
    /// Unsupported protocol version.
    pub const VERSION: u32 = 3;
    /// The peer is not allowed (unknown or revoked identity).
    pub const FORBIDDEN: u32 = 4;
    /// The receiving side failed internally (for example its sink).
    pub const INTERNAL: u32 = 5;
    /// The session was idle for too long or timed out.
    pub const TIMEOUT: u32 = 6;
}
