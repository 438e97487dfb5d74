//! Driver for the Bosch BME280 temperature, pressure and humidity sensor (I²C).
//!
//! Forced mode only: each [`Bme280::measure`] starts one measurement, waits the
//! datasheet's maximum measurement time for the configured oversampling, reads the result
//! in one burst and compensates it with the datasheet's integer formulas. Between
//! measurements the sensor sleeps (0.1 µA), which is what a battery-powered node wants.
//!
//! # Bus transactions
//!
//! Registers are written as `[register, value]` and read with a write of the first
//! register followed by a repeated start and a burst read (the address auto-increments).
//!
//! | step | transaction |
//! |---|---|
//! | [`Bme280::init`]: identity | write `D0`, read 1 byte; must be `60` ([`Error::ChipId`] otherwise) |
//! | soft reset | write `E0 B6`, wait 2 ms (start-up time, includes the NVM copy) |
//! | calibration | write `88`, read 26 bytes (`0x88..=0xA1`); write `E1`, read 7 bytes (`0xE1..=0xE7`) |
//! | IIR filter | write `F5 ff` (`ff` = filter << 2; standby and SPI bits 0) |
//! | [`Bme280::measure`]: start | write `F2 hh` (humidity oversampling), then `F4 tt` (temperature and pressure oversampling, mode `01` = forced); `ctrl_hum` only takes effect on the following write to `ctrl_meas` |
//! | wait | [`Settings::measurement_time_us`] in the delay |
//! | result | write `F7`, read 8 bytes (`0xF7..=0xFE`: pressure, temperature, humidity) |
//!
//! # Compensation
//!
//! [`Calibration`] holds the factory trimming parameters and implements
//! `BME280_compensate_T_int32`, `BME280_compensate_P_int64` and
//! `bme280_compensate_H_int32` from the datasheet (section 4.2.3), bit for bit for every
//! input the sensor can produce. The C originals overflow (undefined behaviour) on
//! nonsense calibration data; here every operation wraps, so garbage in gives garbage
//! out but never a panic.
//!
//! # Example
//!
//! ```no_run
//! # use embedded_hal_mock::eh1::{delay::NoopDelay, i2c::Mock};
//! use voither_firmware::bme280::{Address, Bme280, Settings};
//! # let i2c = Mock::new(&[]);
//! # let delay = NoopDelay::new();
//!
//! let mut sensor = Bme280::new(i2c, delay, Address::Primary);
//! sensor.init(Settings::default())?;
//! let m = sensor.measure()?;
//! let _ = (m.temperature_milli_celsius, m.pressure_milli_pascal, m.humidity_milli_percent);
//! # Ok::<(), voither_firmware::bme280::Error<embedded_hal::i2c::ErrorKind>>(())
//! ```

use core::fmt;

use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::I2c;

use crate::frame::Reading;

/// Value of the `id` register (0xD0) on a BME280.
pub const CHIP_ID: u8 = 0x60;
/// Start-up time after power-on or soft reset, maximum (datasheet table 1, `t_startup`).
pub const STARTUP_TIME_US: u32 = 2_000;

const REG_CALIB_00: u8 = 0x88;
const REG_ID: u8 = 0xD0;
const REG_RESET: u8 = 0xE0;
const REG_CALIB_26: u8 = 0xE1;
const REG_CTRL_HUM: u8 = 0xF2;
const REG_CTRL_MEAS: u8 = 0xF4;
const REG_CONFIG: u8 = 0xF5;
const REG_DATA: u8 = 0xF7;

/// The word written to the reset register to reset the sensor.
const RESET_WORD: u8 = 0xB6;
/// `mode[1:0]` of `ctrl_meas` for forced mode.
const MODE_FORCED: u8 = 0b01;

/// Number of calibration bytes at 0x88..=0xA1.
pub const CALIB_BLOCK1_LEN: usize = 26;
/// Number of calibration bytes at 0xE1..=0xE7.
pub const CALIB_BLOCK2_LEN: usize = 7;

/// The sensor's 7-bit I²C address, set by its SDO pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Address {
    /// SDO to GND: 0x76.
    #[default]
    Primary,
    /// SDO to VDDIO: 0x77.
    Secondary,
}

impl Address {
    /// The 7-bit address on the bus.
    pub const fn addr(self) -> u8 {
        match self {
            Address::Primary => 0x76,
            Address::Secondary => 0x77,
        }
    }
}

/// Oversampling of one quantity. More samples, less noise, longer measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Oversampling {
    /// Not measured. Not allowed for temperature, which every compensation needs.
    Skipped,
    /// One sample.
    #[default]
    X1,
    /// Two samples.
    X2,
    /// Four samples.
    X4,
    /// Eight samples.
    X8,
    /// Sixteen samples.
    X16,
}

impl Oversampling {
    /// The 3-bit register field (`osrs_x`).
    pub const fn bits(self) -> u8 {
        match self {
            Oversampling::Skipped => 0b000,
            Oversampling::X1 => 0b001,
            Oversampling::X2 => 0b010,
            Oversampling::X4 => 0b011,
            Oversampling::X8 => 0b100,
            Oversampling::X16 => 0b101,
        }
    }

    /// The number of samples (0 when skipped).
    pub const fn samples(self) -> u32 {
        match self {
            Oversampling::Skipped => 0,
            Oversampling::X1 => 1,
            Oversampling::X2 => 2,
            Oversampling::X4 => 4,
            Oversampling::X8 => 8,
            Oversampling::X16 => 16,
        }
    }
}

/// IIR filter coefficient for temperature and pressure (the `filter` field of `config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Filter {
    /// Filter off.
    #[default]
    Off,
    /// Coefficient 2.
    X2,
    /// Coefficient 4.
    X4,
    /// Coefficient 8.
    X8,
    /// Coefficient 16.
    X16,
}

impl Filter {
    /// The 3-bit register field.
    pub const fn bits(self) -> u8 {
        match self {
            Filter::Off => 0b000,
            Filter::X2 => 0b001,
            Filter::X4 => 0b010,
            Filter::X8 => 0b011,
            Filter::X16 => 0b100,
        }
    }
}

/// Measurement settings. The default is the datasheet's "weather monitoring" case:
/// forced mode, 1× oversampling of each quantity, filter off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Settings {
    /// Temperature oversampling; must not be [`Oversampling::Skipped`].
    pub temperature: Oversampling,
    /// Pressure oversampling; [`Oversampling::Skipped`] leaves pressure out.
    pub pressure: Oversampling,
    /// Humidity oversampling; [`Oversampling::Skipped`] leaves humidity out.
    pub humidity: Oversampling,
    /// IIR filter for temperature and pressure.
    pub filter: Filter,
}

impl Settings {
    /// Maximum measurement time in microseconds (datasheet appendix B):
    /// `1250 + 2300·T + (2300·P + 575) + (2300·H + 575)` with T, P, H the sample counts.
    ///
    /// The 575 µs terms are counted even for a skipped quantity, as Bosch's reference
    /// driver does: at most 1.15 ms too long, never too short. 9300 µs at the defaults,
    /// 112 800 µs at 16× each.
    pub const fn measurement_time_us(&self) -> u32 {
        1_250
            + 2_300 * self.temperature.samples()
            + (2_300 * self.pressure.samples() + 575)
            + (2_300 * self.humidity.samples() + 575)
    }

    /// `ctrl_meas` value for a forced measurement.
    const fn ctrl_meas(&self) -> u8 {
        (self.temperature.bits() << 5) | (self.pressure.bits() << 2) | MODE_FORCED
    }
}

/// Errors from the BME280 driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error<E> {
    /// The I²C bus reported an error (including a NACK from an absent sensor).
    Bus(E),
    /// The `id` register did not hold 0x60: the device at this address is not a BME280
    /// (0x58 is a BMP280, which has no humidity sensor; 0x61 a BME680). Carries what was read.
    ChipId(u8),
    /// [`Bme280::measure`] was called before [`Bme280::init`] succeeded, so no
    /// calibration is known.
    NotInitialized,
    /// The settings asked to skip temperature, which the pressure and humidity
    /// compensation need.
    InvalidSettings,
}

impl<E: fmt::Debug> fmt::Display for Error<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Bus(e) => write!(f, "BME280: I2C bus error: {e:?}"),
            Error::ChipId(id) => write!(f, "BME280: chip id is {id:#04x}, expected {CHIP_ID:#04x}"),
            Error::NotInitialized => f.write_str("BME280: measure called before init"),
            Error::InvalidSettings => f.write_str("BME280: temperature oversampling must not be skipped"),
        }
    }
}

impl<E: fmt::Debug> core::error::Error for Error<E> {}

/// Factory calibration ("trimming") parameters, named as in the datasheet (table 16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Calibration {
    /// `dig_T1`: Temperature trimming, 0x88/0x89.
    pub dig_t1: u16,
    /// `dig_T2`: Temperature trimming, 0x8A/0x8B.
    pub dig_t2: i16,
    /// `dig_T3`: Temperature trimming, 0x8C/0x8D.
    pub dig_t3: i16,
    /// `dig_P1`: Pressure trimming, 0x8E/0x8F.
    pub dig_p1: u16,
    /// `dig_P2`: Pressure trimming, 0x90/0x91.
    pub dig_p2: i16,
    /// `dig_P3`: Pressure trimming, 0x92/0x93.
    pub dig_p3: i16,
    /// `dig_P4`: Pressure trimming, 0x94/0x95.
    pub dig_p4: i16,
    /// `dig_P5`: Pressure trimming, 0x96/0x97.
    pub dig_p5: i16,
    /// `dig_P6`: Pressure trimming, 0x98/0x99.
    pub dig_p6: i16,
    /// `dig_P7`: Pressure trimming, 0x9A/0x9B.
    pub dig_p7: i16,
    /// `dig_P8`: Pressure trimming, 0x9C/0x9D.
    pub dig_p8: i16,
    /// `dig_P9`: Pressure trimming, 0x9E/0x9F.
    pub dig_p9: i16,
    /// `dig_H1`: Humidity trimming, 0xA1.
    pub dig_h1: u8,
    /// `dig_H2`: Humidity trimming, 0xE1/0xE2.
    pub dig_h2: i16,
    /// `dig_H3`: Humidity trimming, 0xE3.
    pub dig_h3: u8,
    /// `dig_H4`: Humidity trimming, 12 bits signed: 0xE4 bits 11..4, 0xE5 bits 3..0.
    pub dig_h4: i16,
    /// `dig_H5`: Humidity trimming, 12 bits signed: 0xE6 bits 11..4, 0xE5 bits 7..4 as bits 3..0.
    pub dig_h5: i16,
    /// `dig_H6`: Humidity trimming, 0xE7.
    pub dig_h6: i8,
}

impl Calibration {
    /// Parses the two calibration blocks: `block1` from 0x88..=0xA1, `block2` from
    /// 0xE1..=0xE7.
    ///
    /// Words are little endian. `dig_H4` and `dig_H5` are 12-bit signed values sharing
    /// register 0xE5: `dig_H4 = 0xE4[7:0] << 4 | 0xE5[3:0]` and
    /// `dig_H5 = 0xE6[7:0] << 4 | 0xE5[7:4]`, with 0xE4 and 0xE6 carrying the sign.
    pub fn from_registers(block1: &[u8; CALIB_BLOCK1_LEN], block2: &[u8; CALIB_BLOCK2_LEN]) -> Self {
        let u = |i: usize| u16::from_le_bytes([block1[i], block1[i + 1]]);
        let s = |i: usize| i16::from_le_bytes([block1[i], block1[i + 1]]);
        // The sign of the 12-bit values is in the register holding bits 11..4.
        let e4 = i16::from(block2[3] as i8);
        let e5 = i16::from(block2[4]);
        let e6 = i16::from(block2[5] as i8);
        Calibration {
            dig_t1: u(0),
            dig_t2: s(2),
            dig_t3: s(4),
            dig_p1: u(6),
            dig_p2: s(8),
            dig_p3: s(10),
            dig_p4: s(12),
            dig_p5: s(14),
            dig_p6: s(16),
            dig_p7: s(18),
            dig_p8: s(20),
            dig_p9: s(22),
            // block1[24] is 0xA0, which holds nothing.
            dig_h1: block1[25],
            dig_h2: i16::from_le_bytes([block2[0], block2[1]]),
            dig_h3: block2[2],
            dig_h4: (e4 * 16) | (e5 & 0x0F),
            dig_h5: (e6 * 16) | (e5 >> 4),
            dig_h6: block2[6] as i8,
        }
    }

    /// `BME280_compensate_T_int32`: temperature in 0.01 °C (`2508` is 25.08 °C), and
    /// `t_fine`, the fine temperature the pressure and humidity compensation take.
    ///
    /// `adc_t` is the 20-bit raw temperature.
    pub fn compensate_temperature(&self, adc_t: i32) -> (i32, i32) {
        let t1 = i32::from(self.dig_t1);
        let t2 = i32::from(self.dig_t2);
        let t3 = i32::from(self.dig_t3);
        let var1 = (adc_t >> 3).wrapping_sub(t1 << 1).wrapping_mul(t2) >> 11;
        let d = (adc_t >> 4).wrapping_sub(t1);
        let var2 = (d.wrapping_mul(d) >> 12).wrapping_mul(t3) >> 14;
        let t_fine = var1.wrapping_add(var2);
        let t = t_fine.wrapping_mul(5).wrapping_add(128) >> 8;
        (t, t_fine)
    }

    /// `BME280_compensate_P_int64`: pressure in Pa as unsigned Q24.8 (`24674867` is
    /// 24674867 / 256 = 96386.2 Pa). Returns 0 where the formula would divide by zero.
    ///
    /// `adc_p` is the 20-bit raw pressure, `t_fine` from [`Calibration::compensate_temperature`].
    pub fn compensate_pressure(&self, adc_p: i32, t_fine: i32) -> u32 {
        let p1 = i64::from(self.dig_p1);
        let p2 = i64::from(self.dig_p2);
        let p3 = i64::from(self.dig_p3);
        let p4 = i64::from(self.dig_p4);
        let p5 = i64::from(self.dig_p5);
        let p6 = i64::from(self.dig_p6);
        let p7 = i64::from(self.dig_p7);
        let p8 = i64::from(self.dig_p8);
        let p9 = i64::from(self.dig_p9);

        let mut var1 = i64::from(t_fine) - 128_000;
        let mut var2 = var1.wrapping_mul(var1).wrapping_mul(p6);
        var2 = var2.wrapping_add(var1.wrapping_mul(p5) << 17);
        var2 = var2.wrapping_add(p4 << 35);
        var1 = (var1.wrapping_mul(var1).wrapping_mul(p3) >> 8).wrapping_add(var1.wrapping_mul(p2) << 12);
        var1 = (1i64 << 47).wrapping_add(var1).wrapping_mul(p1) >> 33;
        if var1 == 0 {
            return 0; // avoid a division by zero, as the datasheet does
        }
        let mut p = 1_048_576 - i64::from(adc_p);
        p = (p << 31).wrapping_sub(var2).wrapping_mul(3125).wrapping_div(var1);
        var1 = p9.wrapping_mul(p >> 13).wrapping_mul(p >> 13) >> 25;
        var2 = p8.wrapping_mul(p) >> 19;
        p = (p.wrapping_add(var1).wrapping_add(var2) >> 8).wrapping_add(p7 << 4);
        p as u32
    }

    /// `bme280_compensate_H_int32`: relative humidity in % as unsigned Q22.10 (`47445` is
    /// 47445 / 1024 = 46.333 %RH), clamped to 0..=100 %.
    ///
    /// `adc_h` is the 16-bit raw humidity, `t_fine` from [`Calibration::compensate_temperature`].
    pub fn compensate_humidity(&self, adc_h: i32, t_fine: i32) -> u32 {
        let h1 = i32::from(self.dig_h1);
        let h2 = i32::from(self.dig_h2);
        let h3 = i32::from(self.dig_h3);
        let h4 = i32::from(self.dig_h4);
        let h5 = i32::from(self.dig_h5);
        let h6 = i32::from(self.dig_h6);

        let mut v = t_fine.wrapping_sub(76_800);
        let a = (adc_h << 14).wrapping_sub(h4 << 20).wrapping_sub(h5.wrapping_mul(v)).wrapping_add(16_384) >> 15;
        let b = (((v.wrapping_mul(h6) >> 10).wrapping_mul((v.wrapping_mul(h3) >> 11).wrapping_add(32_768)) >> 10)
            .wrapping_add(2_097_152)
            .wrapping_mul(h2)
            .wrapping_add(8_192))
            >> 14;
        v = a.wrapping_mul(b);
        v = v.wrapping_sub(((v >> 15).wrapping_mul(v >> 15) >> 7).wrapping_mul(h1) >> 4);
        v = v.clamp(0, 419_430_400);
        (v >> 12) as u32
    }

    /// Compensates one raw result into a [`Measurement`] in the crate's fixed-point units.
    pub fn compensate(&self, raw: &RawData) -> Measurement {
        let (t, t_fine) = self.compensate_temperature(raw.temperature);
        Measurement {
            temperature_milli_celsius: t.saturating_mul(10),
            pressure_milli_pascal: raw.pressure.map(|p| q24_8_to_milli(self.compensate_pressure(p, t_fine))),
            humidity_milli_percent: raw.humidity.map(|h| q22_10_to_milli(self.compensate_humidity(h, t_fine))),
        }
    }
}

/// Q24.8 pascal to milli-pascal, rounded to nearest, saturating.
fn q24_8_to_milli(q: u32) -> u32 {
    u32::try_from((u64::from(q) * 1000 + 128) / 256).unwrap_or(u32::MAX)
}

/// Q22.10 percent to milli-percent, rounded to nearest (cannot overflow: at most 100 000).
fn q22_10_to_milli(q: u32) -> u32 {
    u32::try_from((u64::from(q) * 1000 + 512) / 1024).unwrap_or(u32::MAX)
}

/// Raw ADC values of one measurement, as read from 0xF7..=0xFE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawData {
    /// 20-bit raw temperature `adc_T`.
    pub temperature: i32,
    /// 20-bit raw pressure `adc_P`, `None` when pressure was skipped.
    pub pressure: Option<i32>,
    /// 16-bit raw humidity `adc_H`, `None` when humidity was skipped.
    pub humidity: Option<i32>,
}

impl RawData {
    /// Parses the burst read of 0xF7..=0xFE. `settings` says which quantities were measured.
    pub fn from_registers(data: &[u8; 8], settings: &Settings) -> Self {
        let twenty =
            |msb: u8, lsb: u8, xlsb: u8| (i32::from(msb) << 12) | (i32::from(lsb) << 4) | (i32::from(xlsb) >> 4);
        let measured = |o: Oversampling| o != Oversampling::Skipped;
        RawData {
            temperature: twenty(data[3], data[4], data[5]),
            pressure: measured(settings.pressure).then(|| twenty(data[0], data[1], data[2])),
            humidity: measured(settings.humidity).then(|| (i32::from(data[6]) << 8) | i32::from(data[7])),
        }
    }
}

/// One compensated measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// Temperature in milli-degrees Celsius (`25_080` is 25.08 °C; the sensor resolves 0.01 °C).
    pub temperature_milli_celsius: i32,
    /// Pressure in milli-pascal (`100_653_266` is 1006.53266 hPa), `None` when skipped.
    pub pressure_milli_pascal: Option<u32>,
    /// Relative humidity in milli-percent (`46_333` is 46.333 %RH), `0..=100_000`,
    /// `None` when skipped.
    pub humidity_milli_percent: Option<u32>,
}

impl Measurement {
    /// The measurement as frame readings: temperature (m°C), then pressure (mPa) and
    /// relative humidity (m%) where measured.
    pub fn readings(&self) -> impl Iterator<Item = Reading> {
        [
            Some(Reading::temperature_milli_celsius(self.temperature_milli_celsius)),
            self.pressure_milli_pascal.map(Reading::pressure_milli_pascal),
            self.humidity_milli_percent.map(Reading::relative_humidity_milli_percent),
        ]
        .into_iter()
        .flatten()
    }
}

/// BME280 driver. Owns the I²C bus and a delay until [`Bme280::destroy`].
#[derive(Debug)]
pub struct Bme280<I2C, D> {
    i2c: I2C,
    delay: D,
    address: u8,
    settings: Settings,
    calibration: Option<Calibration>,
}

impl<I2C, D, E> Bme280<I2C, D>
where
    I2C: I2c<Error = E>,
    D: DelayNs,
{
    /// Creates a driver for the sensor at `address`. Does not touch the bus; call
    /// [`Bme280::init`] before measuring.
    pub fn new(i2c: I2C, delay: D, address: Address) -> Self {
        Bme280 { i2c, delay, address: address.addr(), settings: Settings::default(), calibration: None }
    }

    /// Destroys the driver and returns the bus and the delay.
    pub fn destroy(self) -> (I2C, D) {
        (self.i2c, self.delay)
    }

    /// Checks the chip id, resets the sensor, reads its calibration and applies `settings`.
    ///
    /// Can be called again to change settings or to recover a sensor that lost power.
    pub fn init(&mut self, settings: Settings) -> Result<(), Error<E>> {
        if settings.temperature == Oversampling::Skipped {
            return Err(Error::InvalidSettings);
        }
        self.calibration = None;
        let id = self.chip_id()?;
        if id != CHIP_ID {
            return Err(Error::ChipId(id));
        }
        self.soft_reset()?;
        let mut block1 = [0u8; CALIB_BLOCK1_LEN];
        self.read_registers(REG_CALIB_00, &mut block1)?;
        let mut block2 = [0u8; CALIB_BLOCK2_LEN];
        self.read_registers(REG_CALIB_26, &mut block2)?;
        // After reset the sensor is in sleep mode, where writes to `config` take effect.
        self.write_register(REG_CONFIG, settings.filter.bits() << 2)?;
        self.settings = settings;
        self.calibration = Some(Calibration::from_registers(&block1, &block2));
        Ok(())
    }

    /// Reads the `id` register (0x60 on a BME280).
    pub fn chip_id(&mut self) -> Result<u8, Error<E>> {
        let mut id = [0u8];
        self.read_registers(REG_ID, &mut id)?;
        Ok(id[0])
    }

    /// Resets the sensor and waits its start-up time (2 ms). Settings return to their
    /// power-on values; call [`Bme280::init`] afterwards.
    pub fn soft_reset(&mut self) -> Result<(), Error<E>> {
        self.write_register(REG_RESET, RESET_WORD)?;
        self.delay.delay_us(STARTUP_TIME_US);
        Ok(())
    }

    /// The calibration read by [`Bme280::init`], if it succeeded.
    pub fn calibration(&self) -> Option<&Calibration> {
        self.calibration.as_ref()
    }

    /// The settings applied by the last successful [`Bme280::init`].
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Runs one forced-mode measurement and returns it compensated.
    ///
    /// Blocks for [`Settings::measurement_time_us`] in the delay (9.3 ms at the defaults).
    pub fn measure(&mut self) -> Result<Measurement, Error<E>> {
        let calibration = self.calibration.ok_or(Error::NotInitialized)?;
        let raw = self.measure_raw()?;
        Ok(calibration.compensate(&raw))
    }

    /// Runs one forced-mode measurement and returns the raw ADC values.
    pub fn measure_raw(&mut self) -> Result<RawData, Error<E>> {
        if self.calibration.is_none() {
            return Err(Error::NotInitialized);
        }
        // ctrl_hum first: it takes effect only with the next write to ctrl_meas.
        self.write_register(REG_CTRL_HUM, self.settings.humidity.bits())?;
        self.write_register(REG_CTRL_MEAS, self.settings.ctrl_meas())?;
        self.delay.delay_us(self.settings.measurement_time_us());
        let mut data = [0u8; 8];
        self.read_registers(REG_DATA, &mut data)?;
        Ok(RawData::from_registers(&data, &self.settings))
    }

    fn write_register(&mut self, register: u8, value: u8) -> Result<(), Error<E>> {
        self.i2c.write(self.address, &[register, value]).map_err(Error::Bus)
    }

    fn read_registers(&mut self, first: u8, buf: &mut [u8]) -> Result<(), Error<E>> {
        self.i2c.write_read(self.address, &[first], buf).map_err(Error::Bus)
    }
}
