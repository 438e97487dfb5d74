//! Length-prefixed CBOR framing with a hard size limit.
//!
//! A frame is `len: u32 big-endian` followed by `len` bytes of CBOR. The decoder checks
//! the length against its limit as soon as the 4 prefix bytes are in, so an oversized
//! frame is refused before its body is buffered: memory per stream is bounded by the
//! limit plus one read chunk.

use crate::frame::Frame;

/// Default hard limit on one frame's body, in bytes.
pub const MAX_FRAME_LEN: usize = 4 * 1024 * 1024;

/// Errors while encoding a frame.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The encoded frame is larger than the limit the peer will accept.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Encoded length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Errors while decoding frames from a byte stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The length prefix announces a frame larger than the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The body is not a valid CBOR frame (or a kind this version does not know).
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({0} bytes pending)")]
    Truncated(usize),
}

/// Appends the length-prefixed encoding of `frame` to `out`.
pub fn encode_frame(frame: &Frame, out: &mut Vec<u8>, max: usize) -> Result<(), EncodeError> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    // Writing into a Vec cannot fail; an error here could only come from a custom
    // encoder, and the frame types have none.
    minicbor::encode(frame, &mut *out).expect("encoding into a Vec is infallible");
    let len = out.len() - start - 4;
    if len > max {
        out.truncate(start);
        return Err(EncodeError::TooLarge { len, max });
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Incremental decoder: push bytes as they arrive, pop whole frames.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    pos: usize,
    max: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(MAX_FRAME_LEN)
    }
}

impl FrameDecoder {
    /// A decoder refusing frames whose body is longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        Self { buf: Vec::new(), pos: 0, max }
    }

    /// Feeds received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 64 * 1024 && self.pos * 2 > self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// How many more bytes are needed to complete the frame being received, if known.
    pub fn wanted(&self) -> usize {
        let avail = self.pending();
        if avail < 4 {
            return 4 - avail;
        }
        let len = self.peek_len();
        (4 + len).saturating_sub(avail)
    }

    fn peek_len(&self) -> usize {
        let p = &self.buf[self.pos..self.pos + 4];
        u32::from_be_bytes([p[0], p[1], p[2], p[3]]) as usize
    }

    /// Returns the next whole frame, `Ok(None)` if more bytes are needed.
    ///
    /// After an error the stream is unusable: close it with [`crate::error_code::FRAME`].
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        let avail = self.pending();
        if avail < 4 {
            return Ok(None);
        }
        let len = self.peek_len();
        if len > self.max {
            return Err(DecodeError::TooLarge { len, max: self.max });
        }
        if avail < 4 + len {
            return Ok(None);
        }
        let body = &self.buf[self.pos + 4..self.pos + 4 + len];
        let frame = minicbor::decode::<Frame>(body).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        self.pos += 4 + len;
        Ok(Some(frame))
    }

    /// Call at end of stream: errors if a partial frame is left.
    pub fn finish(&self) -> Result<(), DecodeError> {
        match self.pending() {
            0 => Ok(()),
            n => Err(DecodeError::Truncated(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::*;

    fn sample() -> Frame {
        Frame::Batch(Batch {
            lane: "telemetry".into(),
            batch_id: 7,
            records: vec![Record {
                seq: 1,
                ingest_ts_ms: 1_700_000_000_000,
                source: "devices/1/t".into(),
                content_type: None,
                payload: vec![1, 2, 3].into(),
            }]
            .into(),
            gaps: vec![Gap { from_seq: 2, through_seq: 5, reason: GapReason::Ttl }],
        })
    }

    #[test]
    fn round_trip_byte_by_byte() {
        let mut out = Vec::new();
        encode_frame(&sample(), &mut out, MAX_FRAME_LEN).unwrap();
        encode_frame(
            &Frame::Ack(Ack { lane: "a".into(), through_seq: 9, rejected_batch: None }),
            &mut out,
            MAX_FRAME_LEN,
        )
        .unwrap();
        let mut dec = FrameDecoder::default();
        let mut frames = Vec::new();
        for b in &out {
            dec.push(std::slice::from_ref(b));
            while let Some(f) = dec.next_frame().unwrap() {
                frames.push(f);
            }
        }
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0], sample());
        dec.finish().unwrap();
    }

    #[test]
    fn oversized_prefix_is_refused_before_body() {
        let mut dec = FrameDecoder::new(1024);
        dec.push(&(1025u32).to_be_bytes());
        assert_eq!(dec.next_frame(), Err(DecodeError::TooLarge { len: 1025, max: 1024 }));
    }

    #[test]
    fn encode_refuses_oversized_frame() {
        let mut out = vec![0xAA];
        let err = encode_frame(&sample(), &mut out, 8).unwrap_err();
        assert!(matches!(err, EncodeError::TooLarge { max: 8, .. }));
        assert_eq!(out, vec![0xAA], "nothing of the refused frame is left in the buffer");
    }

    #[test]
    fn garbage_is_malformed_not_panic() {
        let mut dec = FrameDecoder::default();
        let body = [0xff, 0x00, 0x13, 0x37, 0x99];
        dec.push(&(body.len() as u32).to_be_bytes());
        dec.push(&body);
        assert!(matches!(dec.next_frame(), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn unknown_frame_kind_is_malformed() {
        // [99, []]: a variant index no version defines.
        let body = [0x82, 0x18, 0x63, 0x80];
        let mut dec = FrameDecoder::default();
        dec.push(&(body.len() as u32).to_be_bytes());
        dec.push(&body);
        assert!(matches!(dec.next_frame(), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn truncated_stream_is_reported() {
        let mut out = Vec::new();
        encode_frame(&sample(), &mut out, MAX_FRAME_LEN).unwrap();
        let mut dec = FrameDecoder::default();
        dec.push(&out[..out.len() - 1]);
        assert_eq!(dec.next_frame(), Ok(None));
        assert!(matches!(dec.finish(), Err(DecodeError::Truncated(_))));
    }

    #[test]
    fn random_bytes_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        let mut valid = Vec::new();
        encode_frame(&sample(), &mut valid, MAX_FRAME_LEN).unwrap();
        for _ in 0..20_000 {
            let mut bytes = valid.clone();
            let flips = rng.random_range(1..6);
            for _ in 0..flips {
                let i = rng.random_range(4..bytes.len());
                bytes[i] = rng.random();
            }
            let mut dec = FrameDecoder::new(MAX_FRAME_LEN);
            dec.push(&bytes);
            let _ = dec.next_frame();
        }
    }
}
