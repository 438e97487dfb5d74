//! Driver for the Sensirion SHT3x-DIS (SHT30, SHT31, SHT35) humidity and temperature sensor.
//!
//! Single-shot measurements with clock stretching disabled: the driver sends the
//! measurement command, waits the datasheet's worst-case measurement duration with
//! [`DelayNs`], then reads the result. It never relies on the sensor holding SCL low,
//! which some I²C controllers (and Linux's i2c-dev on several SoCs) handle badly.
//!
//! # Bus transactions
//!
//! | operation | write | wait | read |
//! |---|---|---|---|
//! | [`Sht3x::measure`] (high repeatability) | `24 00` | 15.5 ms | 6 bytes: T msb, T lsb, CRC, RH msb, RH lsb, CRC |
//! | [`Sht3x::soft_reset`] | `30 A2` | 1.5 ms | — |
//! | [`Sht3x::serial_number`] | `36 82` | 1 ms | 6 bytes: two words, each with its CRC |
//!
//! Every 16-bit word the sensor sends is followed by a CRC-8 ([`crc8`]: polynomial 0x31,
//! initial value 0xFF); a mismatch is [`Error::Crc`] and no value is returned.
//!
//! # Conversion
//!
//! `T = -45 °C + 175 °C × S_T / 65535` and `RH = 100 % × S_RH / 65535`, computed in integers
//! and rounded to the nearest milli-degree and milli-percent ([`convert_temperature`],
//! [`convert_humidity`]).
//!
//! # Example
//!
//! ```
//! # use embedded_hal_mock::eh1::{delay::NoopDelay, i2c::{Mock, Transaction}};
//! use voither_firmware::sht3x::{Address, Sht3x};
//! # let i2c = Mock::new(&[
//! #     Transaction::write(0x44, vec![0x24, 0x00]),
//! #     Transaction::read(0x44, vec![0x66, 0x66, 0x93, 0x73, 0x33, 0x01]),
//! # ]);
//! # let delay = NoopDelay::new();
//!
//! let mut sensor = Sht3x::new(i2c, delay, Address::Default);
//! let m = sensor.measure()?;
//! assert_eq!(m.temperature_milli_celsius, 25_000);
//! assert_eq!(m.humidity_milli_percent, 45_000);
//! let (mut i2c, _delay) = sensor.destroy();
//! # i2c.done();
//! # Ok::<(), voither_firmware::sht3x::Error<embedded_hal::i2c::ErrorKind>>(())
//! ```

use core::fmt;

use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::I2c;

use crate::frame::Reading;

/// Single shot, high repeatability, clock stretching disabled.
const CMD_MEASURE_HIGH: [u8; 2] = [0x24, 0x00];
/// Single shot, medium repeatability, clock stretching disabled.
const CMD_MEASURE_MEDIUM: [u8; 2] = [0x24, 0x0B];
/// Single shot, low repeatability, clock stretching disabled.
const CMD_MEASURE_LOW: [u8; 2] = [0x24, 0x16];
/// Soft reset.
const CMD_SOFT_RESET: [u8; 2] = [0x30, 0xA2];
/// Read the 32-bit serial number (electronic identification code), clock stretching disabled.
const CMD_SERIAL_NUMBER: [u8; 2] = [0x36, 0x82];

/// Soft reset time, maximum (datasheet table 4, `t_SR`).
pub const SOFT_RESET_TIME_US: u32 = 1_500;
/// Minimum idle time between a command and the next bus access (datasheet, `t_IDLE`).
pub const IDLE_TIME_US: u32 = 1_000;

/// The sensor's 7-bit I²C address, set by its ADDR pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Address {
    /// ADDR pin low: 0x44.
    #[default]
    Default,
    /// ADDR pin high: 0x45.
    Alternate,
}

impl Address {
    /// The 7-bit address on the bus.
    pub const fn addr(self) -> u8 {
        match self {
            Address::Default => 0x44,
            Address::Alternate => 0x45,
        }
    }
}

/// Measurement repeatability: higher repeatability means less noise and a longer measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Repeatability {
    /// High repeatability (0.04 °C, 0.08 %RH typical); 15.5 ms worst case.
    #[default]
    High,
    /// Medium repeatability (0.08 °C, 0.15 %RH typical); 6.5 ms worst case.
    Medium,
    /// Low repeatability (0.15 °C, 0.21 %RH typical); 4.5 ms worst case.
    Low,
}

impl Repeatability {
    /// The single-shot command (clock stretching disabled) for this repeatability.
    const fn command(self) -> [u8; 2] {
        match self {
            Repeatability::High => CMD_MEASURE_HIGH,
            Repeatability::Medium => CMD_MEASURE_MEDIUM,
            Repeatability::Low => CMD_MEASURE_LOW,
        }
    }

    /// Worst-case measurement duration in microseconds over the whole supply range
    /// (2.15 V to 5.5 V; the datasheet's maximum below 2.4 V, which also covers the
    /// shorter maximum above it).
    pub const fn measurement_time_us(self) -> u32 {
        match self {
            Repeatability::High => 15_500,
            Repeatability::Medium => 6_500,
            Repeatability::Low => 4_500,
        }
    }
}

/// Errors from the SHT3x driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error<E> {
    /// The I²C bus reported an error (including a NACK from an absent or busy sensor).
    Bus(E),
    /// A word read from the sensor did not match its CRC-8: the data was corrupted on the
    /// bus and has been discarded.
    Crc,
}

impl<E: fmt::Debug> fmt::Display for Error<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Bus(e) => write!(f, "SHT3x: I2C bus error: {e:?}"),
            Error::Crc => f.write_str("SHT3x: CRC mismatch in data read from the sensor"),
        }
    }
}

impl<E: fmt::Debug> core::error::Error for Error<E> {}

/// One temperature and humidity measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// Temperature in milli-degrees Celsius (`21_500` is 21.5 °C).
    pub temperature_milli_celsius: i32,
    /// Relative humidity in milli-percent (`45_200` is 45.2 %RH), `0..=100_000`.
    pub humidity_milli_percent: u32,
    /// The raw temperature word `S_T` as sent by the sensor.
    pub raw_temperature: u16,
    /// The raw humidity word `S_RH` as sent by the sensor.
    pub raw_humidity: u16,
}

impl Measurement {
    /// The measurement as frame readings: temperature (m°C) and relative humidity (m%).
    pub fn readings(&self) -> [Reading; 2] {
        [
            Reading::temperature_milli_celsius(self.temperature_milli_celsius),
            Reading::relative_humidity_milli_percent(self.humidity_milli_percent),
        ]
    }
}

/// SHT3x driver. Owns the I²C bus and a delay until [`Sht3x::destroy`].
#[derive(Debug)]
pub struct Sht3x<I2C, D> {
    i2c: I2C,
    delay: D,
    address: u8,
}

impl<I2C, D, E> Sht3x<I2C, D>
where
    I2C: I2c<Error = E>,
    D: DelayNs,
{
    /// Creates a driver for the sensor at `address`. Does not touch the bus.
    pub fn new(i2c: I2C, delay: D, address: Address) -> Self {
        Sht3x { i2c, delay, address: address.addr() }
    }

    /// Destroys the driver and returns the bus and the delay.
    pub fn destroy(self) -> (I2C, D) {
        (self.i2c, self.delay)
    }

    /// Measures temperature and humidity once with high repeatability.
    ///
    /// Blocks for 15.5 ms in the delay. Equivalent to
    /// `measure_with(Repeatability::High)`.
    pub fn measure(&mut self) -> Result<Measurement, Error<E>> {
        self.measure_with(Repeatability::High)
    }

    /// Measures temperature and humidity once with the given repeatability.
    ///
    /// Sends the single-shot command (clock stretching disabled), waits
    /// [`Repeatability::measurement_time_us`], reads six bytes and checks both CRCs.
    pub fn measure_with(&mut self, repeatability: Repeatability) -> Result<Measurement, Error<E>> {
        self.i2c.write(self.address, &repeatability.command()).map_err(Error::Bus)?;
        self.delay.delay_us(repeatability.measurement_time_us());
        let [raw_temperature, raw_humidity] = self.read_words()?;
        Ok(Measurement {
            temperature_milli_celsius: convert_temperature(raw_temperature),
            humidity_milli_percent: convert_humidity(raw_humidity),
            raw_temperature,
            raw_humidity,
        })
    }

    /// Resets the sensor by command and waits the soft reset time (1.5 ms).
    ///
    /// The sensor must be idle (not measuring) for it to accept the command.
    pub fn soft_reset(&mut self) -> Result<(), Error<E>> {
        self.i2c.write(self.address, &CMD_SOFT_RESET).map_err(Error::Bus)?;
        self.delay.delay_us(SOFT_RESET_TIME_US);
        Ok(())
    }

    /// Reads the sensor's unique 32-bit serial number (electronic identification code).
    ///
    /// Uses the command without clock stretching (0x3682) and waits `t_IDLE` (1 ms)
    /// before reading. Early SHT3x lots may only know the clock-stretching variant
    /// (0x3780) and NACK this one, which shows as [`Error::Bus`].
    pub fn serial_number(&mut self) -> Result<u32, Error<E>> {
        self.i2c.write(self.address, &CMD_SERIAL_NUMBER).map_err(Error::Bus)?;
        self.delay.delay_us(IDLE_TIME_US);
        let [high, low] = self.read_words()?;
        Ok((u32::from(high) << 16) | u32::from(low))
    }

    /// Reads two CRC-protected words.
    fn read_words(&mut self) -> Result<[u16; 2], Error<E>> {
        let mut buf = [0u8; 6];
        self.i2c.read(self.address, &mut buf).map_err(Error::Bus)?;
        Ok([checked_word(&buf[0..3])?, checked_word(&buf[3..6])?])
    }
}

/// Returns the word in `chunk[0..2]` if `chunk[2]` is its CRC.
fn checked_word<E>(chunk: &[u8]) -> Result<u16, Error<E>> {
    match chunk {
        [msb, lsb, crc] if crc8(&[*msb, *lsb]) == *crc => Ok(u16::from_be_bytes([*msb, *lsb])),
        _ => Err(Error::Crc),
    }
}

/// Sensirion's CRC-8: polynomial 0x31 (x⁸ + x⁵ + x⁴ + 1), initial value 0xFF, no
/// reflection, no final XOR. `crc8(&[0xBE, 0xEF]) == 0x92`.
pub const fn crc8(data: &[u8]) -> u8 {
    let mut crc: u8 = 0xFF;
    let mut i = 0;
    while i < data.len() {
        crc ^= data[i];
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x80 != 0 { (crc << 1) ^ 0x31 } else { crc << 1 };
            bit += 1;
        }
        i += 1;
    }
    crc
}

/// Converts a raw temperature word to milli-degrees Celsius:
/// `-45_000 + 175_000 × raw / 65535`, rounded to nearest. Range `-45_000..=130_000`.
pub const fn convert_temperature(raw: u16) -> i32 {
    // 175_000 × 65_535 < 2^34: exact in u64; the quotient is at most 175_000.
    let scaled = (175_000u64 * raw as u64 + 65_535 / 2) / 65_535;
    scaled as i32 - 45_000
}

/// Converts a raw humidity word to milli-percent relative humidity:
/// `100_000 × raw / 65535`, rounded to nearest. Range `0..=100_000`.
pub const fn convert_humidity(raw: u16) -> u32 {
    ((100_000u64 * raw as u64 + 65_535 / 2) / 65_535) as u32
}
