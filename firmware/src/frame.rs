//! The device frame: one set of readings from one device, as compact CBOR.
//!
//! A device publishes one encoded [`Frame`] as one MQTT payload. The gateway stores and
//! forwards payloads without parsing them; this codec is for the device, and for whoever
//! reads the data at the other end.
//!
//! Encoding writes into a byte slice the caller owns and returns the length used;
//! decoding reads from a slice into a fixed-capacity [`Frame`]. Neither allocates, and
//! neither panics on any input: a buffer that is too small, a frame with more than
//! [`MAX_READINGS`] readings, and bytes that are not a frame are each an [`Error`].
//!
//! # Wire format (version 1)
//!
//! One CBOR definite-length array, integers in their shortest form:
//!
//! ```text
//! frame   = [version: 1, device_id: uint32, counter: uint32, timestamp_ms: uint64, [* reading]]
//! reading = [quantity: uint16, unit: uint16, value: int32, exponent: int8]
//! ```
//!
//! - `device_id` identifies the device within its site (its MQTT client id says the rest).
//! - `counter` counts frames sent since boot (or since whatever the device persists) and
//!   wraps at 2³²; together with the boot it lets a reader spot gaps and duplicates.
//! - `timestamp_ms` is milliseconds since the Unix epoch, or 0 when the device has no
//!   wall clock (the gateway's ingest time then stands in).
//! - A reading's physical value is `value × 10^exponent` in its [`Unit`]:
//!   `[1, 1, 21500, -3]` is 21.500 °C.
//!
//! A decoder refuses indefinite-length arrays, trailing bytes and integers out of their
//! field's range ([`Error::Malformed`]). A frame whose version is not 1 is
//! [`Error::UnsupportedVersion`] whatever follows, so version 2 may change the layout.
//!
//! # Example
//!
//! ```
//! use voither_firmware::frame::{Frame, Reading, MAX_ENCODED_LEN};
//!
//! let mut frame = Frame::new(42, 7, 1_700_000_000_000);
//! frame.push(Reading::temperature_milli_celsius(21_500))?;
//! frame.push(Reading::relative_humidity_milli_percent(45_200))?;
//!
//! let mut buf = [0u8; MAX_ENCODED_LEN];
//! let len = frame.encode(&mut buf)?;
//! assert_eq!(
//!     &buf[..len],
//!     &[
//!         0x85, // array(5)
//!         0x01, // version 1
//!         0x18, 0x2A, // device_id 42
//!         0x07, // counter 7
//!         0x1B, 0x00, 0x00, 0x01, 0x8B, 0xCF, 0xE5, 0x68, 0x00, // timestamp_ms 1_700_000_000_000
//!         0x82, // array(2): the readings
//!         0x84, 0x01, 0x01, 0x19, 0x53, 0xFC, 0x22, // [temperature, °C, 21500, -3]
//!         0x84, 0x02, 0x02, 0x19, 0xB0, 0x90, 0x22, // [relative humidity, %, 45200, -3]
//!     ]
//! );
//! assert_eq!(Frame::decode(&buf[..len])?, frame);
//! # Ok::<(), voither_firmware::frame::Error>(())
//! ```
//!
//! # Codes
//!
//! | code | [`Quantity`] | usual [`Unit`] (code) |
//! |---|---|---|
//! | 0 | unspecified | unspecified (0) |
//! | 1 | [`Quantity::TEMPERATURE`] | [`Unit::CELSIUS`] (1) |
//! | 2 | [`Quantity::RELATIVE_HUMIDITY`] | [`Unit::PERCENT`] (2) |
//! | 3 | [`Quantity::PRESSURE`] | [`Unit::PASCAL`] (3) |
//! | 4 | [`Quantity::CO2`] | [`Unit::PPM`] (4) |
//! | 5 | [`Quantity::ILLUMINANCE`] | [`Unit::LUX`] (5) |
//! | 6 | [`Quantity::VOLTAGE`] | [`Unit::VOLT`] (6) |
//!
//! Codes from 32768 up are left for site-specific use; the codec carries any `u16`.

use core::fmt;

use minicbor_no_alloc::encode::write::Cursor;
use minicbor_no_alloc::{decode, Decoder, Encoder};

/// The format version this codec writes and the only one it reads.
pub const FORMAT_VERSION: u8 = 1;

/// The most readings a [`Frame`] holds.
pub const MAX_READINGS: usize = 16;

/// The largest encoding of a [`Frame`]: a buffer this long always suffices.
pub const MAX_ENCODED_LEN: usize = FRAME_OVERHEAD + MAX_READINGS * MAX_READING_LEN;

/// array(5) + version + uint32 + uint32 + uint64 + array header for up to 23 readings.
const FRAME_OVERHEAD: usize = 1 + 1 + 5 + 5 + 9 + 1;
/// array(4) + uint16 + uint16 + int32 + int8.
const MAX_READING_LEN: usize = 1 + 3 + 3 + 5 + 2;
const _: () = assert!(MAX_READINGS <= 23, "the readings array header must stay one byte");

/// Errors from encoding or decoding a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The output buffer is too small for the encoded frame; [`MAX_ENCODED_LEN`] always fits.
    BufferTooSmall,
    /// More than [`MAX_READINGS`] readings: pushed onto a full frame, or announced by a
    /// frame being decoded.
    TooManyReadings,
    /// The bytes are not a frame: not CBOR, truncated, wrong structure or types, an
    /// integer out of its field's range, an indefinite length, or bytes after the frame.
    Malformed,
    /// A well-formed array whose version field is not [`FORMAT_VERSION`]. Carries the version.
    UnsupportedVersion(u64),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BufferTooSmall => f.write_str("buffer too small for the encoded frame"),
            Error::TooManyReadings => write!(f, "more than {MAX_READINGS} readings in a frame"),
            Error::Malformed => f.write_str("malformed device frame"),
            Error::UnsupportedVersion(v) => write!(f, "unsupported device frame version {v}"),
        }
    }
}

impl core::error::Error for Error {}

/// What a reading measures. A `u16` code; see the module docs for the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Quantity(pub u16);

impl Quantity {
    /// Not specified.
    pub const UNSPECIFIED: Quantity = Quantity(0);
    /// Air or surface temperature.
    pub const TEMPERATURE: Quantity = Quantity(1);
    /// Relative humidity.
    pub const RELATIVE_HUMIDITY: Quantity = Quantity(2);
    /// Absolute (barometric) pressure.
    pub const PRESSURE: Quantity = Quantity(3);
    /// Carbon dioxide concentration.
    pub const CO2: Quantity = Quantity(4);
    /// Illuminance.
    pub const ILLUMINANCE: Quantity = Quantity(5);
    /// Supply or battery voltage.
    pub const VOLTAGE: Quantity = Quantity(6);
}

/// The unit of a reading's value. A `u16` code; see the module docs for the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Unit(pub u16);

impl Unit {
    /// Not specified.
    pub const UNSPECIFIED: Unit = Unit(0);
    /// Degree Celsius.
    pub const CELSIUS: Unit = Unit(1);
    /// Percent (for relative humidity: %RH).
    pub const PERCENT: Unit = Unit(2);
    /// Pascal.
    pub const PASCAL: Unit = Unit(3);
    /// Parts per million.
    pub const PPM: Unit = Unit(4);
    /// Lux.
    pub const LUX: Unit = Unit(5);
    /// Volt.
    pub const VOLT: Unit = Unit(6);
}

/// One value: `value × 10^exponent` [`Unit`]s of a [`Quantity`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Reading {
    /// What is measured.
    pub quantity: Quantity,
    /// The unit of the scaled value.
    pub unit: Unit,
    /// The mantissa.
    pub value: i32,
    /// The decimal exponent: -3 makes `value` thousandths of the unit.
    pub exponent: i8,
}

impl Reading {
    /// An all-zero reading, for filling arrays.
    pub const EMPTY: Reading = Reading::new(Quantity::UNSPECIFIED, Unit::UNSPECIFIED, 0, 0);

    /// A reading from its parts.
    pub const fn new(quantity: Quantity, unit: Unit, value: i32, exponent: i8) -> Self {
        Reading { quantity, unit, value, exponent }
    }

    /// Temperature in milli-degrees Celsius (exponent -3).
    pub const fn temperature_milli_celsius(value: i32) -> Self {
        Reading::new(Quantity::TEMPERATURE, Unit::CELSIUS, value, -3)
    }

    /// Relative humidity in milli-percent (exponent -3). Saturates at `i32::MAX`.
    pub fn relative_humidity_milli_percent(value: u32) -> Self {
        Reading::new(Quantity::RELATIVE_HUMIDITY, Unit::PERCENT, saturate(value), -3)
    }

    /// Pressure in milli-pascal (exponent -3). Saturates at `i32::MAX` (2.1 MPa).
    pub fn pressure_milli_pascal(value: u32) -> Self {
        Reading::new(Quantity::PRESSURE, Unit::PASCAL, saturate(value), -3)
    }
}

fn saturate(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

/// A reading set: who, which, when, and up to [`MAX_READINGS`] readings.
#[derive(Debug, Clone, Copy)]
pub struct Frame {
    /// The device's id.
    pub device_id: u32,
    /// Frame counter, wrapping.
    pub counter: u32,
    /// Milliseconds since the Unix epoch, 0 when unknown.
    pub timestamp_ms: u64,
    readings: [Reading; MAX_READINGS],
    len: usize,
}

impl PartialEq for Frame {
    fn eq(&self, other: &Self) -> bool {
        self.device_id == other.device_id
            && self.counter == other.counter
            && self.timestamp_ms == other.timestamp_ms
            && self.readings() == other.readings()
    }
}

impl Eq for Frame {}

impl Frame {
    /// An empty frame.
    pub const fn new(device_id: u32, counter: u32, timestamp_ms: u64) -> Self {
        Frame { device_id, counter, timestamp_ms, readings: [Reading::EMPTY; MAX_READINGS], len: 0 }
    }

    /// The readings, in the order they were pushed or decoded.
    pub fn readings(&self) -> &[Reading] {
        &self.readings[..self.len]
    }

    /// Appends a reading; [`Error::TooManyReadings`] if the frame is full.
    pub fn push(&mut self, reading: Reading) -> Result<(), Error> {
        let slot = self.readings.get_mut(self.len).ok_or(Error::TooManyReadings)?;
        *slot = reading;
        self.len += 1;
        Ok(())
    }

    /// Appends all `readings`, or none of them and [`Error::TooManyReadings`] if they
    /// do not all fit.
    pub fn extend<I: IntoIterator<Item = Reading>>(&mut self, readings: I) -> Result<(), Error> {
        let start = self.len;
        for reading in readings {
            if let Err(e) = self.push(reading) {
                self.truncate(start);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Removes all readings, keeping id, counter and timestamp.
    pub fn clear_readings(&mut self) {
        self.truncate(0);
    }

    fn truncate(&mut self, len: usize) {
        for slot in self.readings.iter_mut().skip(len) {
            *slot = Reading::EMPTY;
        }
        self.len = len.min(self.len);
    }

    /// Encodes the frame into `buf` and returns the number of bytes written.
    ///
    /// [`Error::BufferTooSmall`] if it does not fit; `buf` then holds a partial encoding.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, Error> {
        let mut e = Encoder::new(Cursor::new(buf));
        e.array(5)
            .and_then(|e| e.u8(FORMAT_VERSION))
            .and_then(|e| e.u32(self.device_id))
            .and_then(|e| e.u32(self.counter))
            .and_then(|e| e.u64(self.timestamp_ms))
            .and_then(|e| e.array(self.len as u64))
            .map_err(|_| Error::BufferTooSmall)?;
        for r in self.readings() {
            e.array(4)
                .and_then(|e| e.u16(r.quantity.0))
                .and_then(|e| e.u16(r.unit.0))
                .and_then(|e| e.i32(r.value))
                .and_then(|e| e.i8(r.exponent))
                .map_err(|_| Error::BufferTooSmall)?;
        }
        Ok(e.into_writer().position())
    }

    /// Decodes a frame that fills `bytes` exactly.
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        let mut d = Decoder::new(bytes);
        let fields = definite_array(&mut d)?;
        if fields == 0 {
            return Err(Error::Malformed);
        }
        let version = d.u64().map_err(malformed)?;
        if version != u64::from(FORMAT_VERSION) {
            return Err(Error::UnsupportedVersion(version));
        }
        if fields != 5 {
            return Err(Error::Malformed);
        }
        let mut frame =
            Frame::new(d.u32().map_err(malformed)?, d.u32().map_err(malformed)?, d.u64().map_err(malformed)?);
        let count = definite_array(&mut d)?;
        if count > MAX_READINGS as u64 {
            return Err(Error::TooManyReadings);
        }
        for _ in 0..count {
            if definite_array(&mut d)? != 4 {
                return Err(Error::Malformed);
            }
            let reading = Reading::new(
                Quantity(d.u16().map_err(malformed)?),
                Unit(d.u16().map_err(malformed)?),
                d.i32().map_err(malformed)?,
                d.i8().map_err(malformed)?,
            );
            frame.push(reading)?;
        }
        if d.position() != bytes.len() {
            return Err(Error::Malformed);
        }
        Ok(frame)
    }
}

fn malformed(_: decode::Error) -> Error {
    Error::Malformed
}

/// Reads an array header and returns its length; indefinite arrays are malformed here.
fn definite_array(d: &mut Decoder<'_>) -> Result<u64, Error> {
    d.array().map_err(malformed)?.ok_or(Error::Malformed)
}
