//! The records of a batch, kept as their CBOR encoding.
//!
//! A gateway's store holds each record in the CBOR of [`Record`], and the hub's
//! embedded sink stores that same CBOR. [`Records`] carries those bytes from one end
//! to the other without decoding a record into owned parts and encoding it again: the
//! gateway appends the bytes its store read, the frame encoder writes them as they are,
//! and the hub's decoder checks each record (a [`RecordRef`] decode that borrows, so no
//! allocation per record) and keeps its bytes and seq.
//!
//! On the wire a `Records` is exactly what `Vec<Record>` was: a CBOR array of records.

use std::ops::Range;

use minicbor::decode::{Decoder, Error as DecodeError};
use minicbor::encode::{Encoder, Error as EncodeError, Write};
use minicbor::{Decode, Encode};

use crate::frame::{Record, RecordRef};

/// Records in seq order, each kept as its CBOR encoding.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Records {
    /// The encodings, one after another.
    buf: Vec<u8>,
    /// Per record, in order.
    index: Vec<Entry>,
}

/// Where one record is, and what the hub counts of it without decoding it again.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Entry {
    seq: u64,
    /// Where its encoding ends in `buf`.
    end: usize,
    /// Length of its payload.
    payload: usize,
}

impl std::fmt::Debug for Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Records")
            .field("len", &self.len())
            .field("first_seq", &self.first_seq())
            .field("last_seq", &self.last_seq())
            .field("bytes", &self.buf.len())
            .finish()
    }
}

impl Records {
    /// No records, room for `records` of about `bytes` encoded bytes in all.
    pub fn with_capacity(records: usize, bytes: usize) -> Self {
        Self { buf: Vec::with_capacity(bytes), index: Vec::with_capacity(records) }
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True when there are no records.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Encoded bytes of all records.
    pub fn encoded_len(&self) -> usize {
        self.buf.len()
    }

    /// Seq of the `i`-th record.
    pub fn seq(&self, i: usize) -> u64 {
        self.index[i].seq
    }

    /// Payload length of the `i`-th record.
    pub fn payload_len(&self, i: usize) -> usize {
        self.index[i].payload
    }

    /// Payload bytes of all records.
    pub fn payload_bytes(&self) -> usize {
        self.index.iter().map(|r| r.payload).sum()
    }

    /// Seq of the first record.
    pub fn first_seq(&self) -> Option<u64> {
        self.index.first().map(|r| r.seq)
    }

    /// Seq of the last record.
    pub fn last_seq(&self) -> Option<u64> {
        self.index.last().map(|r| r.seq)
    }

    /// True when each seq is above the one before.
    pub fn strictly_increasing(&self) -> bool {
        self.index.windows(2).all(|w| w[0].seq < w[1].seq)
    }

    /// The seqs, in order.
    pub fn seqs(&self) -> impl ExactSizeIterator<Item = u64> + '_ {
        self.index.iter().map(|r| r.seq)
    }

    fn span(&self, i: usize) -> Range<usize> {
        let start = if i == 0 { 0 } else { self.index[i - 1].end };
        start..self.index[i].end
    }

    /// The CBOR encoding of the `i`-th record.
    pub fn raw(&self, i: usize) -> &[u8] {
        &self.buf[self.span(i)]
    }

    /// The encodings of records `first..=last`, one after another (a slice of
    /// [`Records::as_bytes`]).
    pub fn raw_run(&self, first: usize, last: usize) -> &[u8] {
        &self.buf[self.span(first).start..self.span(last).end]
    }

    /// Each record's seq and encoding, in order.
    pub fn iter_raw(&self) -> impl ExactSizeIterator<Item = (u64, &[u8])> + '_ {
        (0..self.len()).map(|i| (self.index[i].seq, self.raw(i)))
    }

    /// The encodings of all records, one after another.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    /// The `i`-th record, its parts borrowed.
    pub fn get(&self, i: usize) -> RecordRef<'_> {
        minicbor::decode(self.raw(i)).expect("records are checked when they are added")
    }

    /// The records, their parts borrowed.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = RecordRef<'_>> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }

    /// The records as owned values.
    pub fn to_vec(&self) -> Vec<Record> {
        self.iter().map(RecordRef::to_owned).collect()
    }

    /// Appends a record, encoding it.
    pub fn push(&mut self, r: RecordRef<'_>) {
        minicbor::encode(r, &mut self.buf).expect("encoding into a Vec is infallible");
        self.index.push(Entry { seq: r.seq, end: self.buf.len(), payload: r.payload.len() });
    }

    /// Appends the CBOR encoding of a record after checking that it is one: returns
    /// its seq. Nothing is added when `raw` is not exactly one [`Record`].
    pub fn push_raw(&mut self, raw: &[u8]) -> Result<u64, DecodeError> {
        let mut d = Decoder::new(raw);
        let before = self.buf.len();
        let seq = self.take(&mut d)?;
        if d.position() != raw.len() {
            self.buf.truncate(before);
            self.index.pop();
            return Err(DecodeError::message("bytes after the record"));
        }
        Ok(seq)
    }

    /// Checks the record at the decoder's position and appends its bytes: returns its
    /// seq. Nothing is added when it is not a [`Record`].
    fn take(&mut self, d: &mut Decoder<'_>) -> Result<u64, DecodeError> {
        let start = d.position();
        let r: RecordRef<'_> = d.decode()?;
        self.buf.extend_from_slice(&d.input()[start..d.position()]);
        self.index.push(Entry { seq: r.seq, end: self.buf.len(), payload: r.payload.len() });
        Ok(r.seq)
    }

    /// The records at `indices` (increasing), copying bytes only when that is not all
    /// of them.
    pub fn select(self, indices: &[usize]) -> Self {
        if indices.len() == self.len() {
            return self;
        }
        let mut out = Self::with_capacity(indices.len(), 0);
        for &i in indices {
            out.buf.extend_from_slice(self.raw(i));
            out.index.push(Entry { end: out.buf.len(), ..self.index[i] });
        }
        out
    }
}

impl From<Vec<Record>> for Records {
    fn from(v: Vec<Record>) -> Self {
        v.iter().map(Record::as_ref).collect()
    }
}

impl FromIterator<Record> for Records {
    fn from_iter<I: IntoIterator<Item = Record>>(iter: I) -> Self {
        let mut out = Self::default();
        for r in iter {
            out.push(r.as_ref());
        }
        out
    }
}

impl<'a> FromIterator<RecordRef<'a>> for Records {
    fn from_iter<I: IntoIterator<Item = RecordRef<'a>>>(iter: I) -> Self {
        let mut out = Self::default();
        for r in iter {
            out.push(r);
        }
        out
    }
}

impl<C> Encode<C> for Records {
    fn encode<W: Write>(&self, e: &mut Encoder<W>, _: &mut C) -> Result<(), EncodeError<W::Error>> {
        e.array(self.len() as u64)?;
        e.writer_mut().write_all(&self.buf).map_err(EncodeError::write)
    }
}

impl<'b, C> Decode<'b, C> for Records {
    fn decode(d: &mut Decoder<'b>, _: &mut C) -> Result<Self, DecodeError> {
        let len = d.array()?;
        let mut out = Self::default();
        match len {
            Some(n) => {
                // The count comes from the peer: reserve by what the input can hold.
                out.index.reserve((n as usize).min(d.input().len() - d.position()));
                for _ in 0..n {
                    out.take(d)?;
                }
            }
            None => {
                while d.datatype()? != minicbor::data::Type::Break {
                    out.take(d)?;
                }
                // The break that ends the array is one byte.
                d.set_position(d.position() + 1);
            }
        }
        Ok(out)
    }
}
