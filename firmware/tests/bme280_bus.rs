//! BME280 driver: exact bus transactions and delays for init and forced measurements.

// Register values are written grouped by field: `0b001_001_01` is osrs_t, osrs_p, mode.
#![allow(clippy::unusual_byte_groupings)]

use embedded_hal::i2c::{ErrorKind, NoAcknowledgeSource};
use embedded_hal_mock::eh1::delay::{CheckedDelay, Transaction as Delay};
use embedded_hal_mock::eh1::i2c::{Mock as I2cMock, Transaction as I2c};
use voither_firmware::bme280::{Address, Bme280, Calibration, Error, Filter, Measurement, Oversampling, Settings};

const ADDR: u8 = 0x76;

mod common;
use common::CALIB;

/// The register images of a calibration: 0x88..=0xA1 and 0xE1..=0xE7.
fn calib_registers(c: &Calibration) -> (Vec<u8>, Vec<u8>) {
    let mut b1 = Vec::new();
    b1.extend(c.dig_t1.to_le_bytes());
    for w in [c.dig_t2, c.dig_t3] {
        b1.extend(w.to_le_bytes());
    }
    b1.extend(c.dig_p1.to_le_bytes());
    for w in [c.dig_p2, c.dig_p3, c.dig_p4, c.dig_p5, c.dig_p6, c.dig_p7, c.dig_p8, c.dig_p9] {
        b1.extend(w.to_le_bytes());
    }
    b1.push(0x00); // 0xA0, unused
    b1.push(c.dig_h1);
    assert_eq!(b1.len(), 26);
    let mut b2 = Vec::new();
    b2.extend(c.dig_h2.to_le_bytes());
    b2.push(c.dig_h3);
    b2.push((c.dig_h4 >> 4) as u8);
    b2.push(((c.dig_h4 & 0x0F) as u8) | (((c.dig_h5 & 0x0F) as u8) << 4));
    b2.push((c.dig_h5 >> 4) as u8);
    b2.push(c.dig_h6 as u8);
    (b1, b2)
}

/// The exact init sequence for `settings` with calibration `CALIB`.
fn init_transactions(filter_bits: u8) -> Vec<I2c> {
    let (b1, b2) = calib_registers(&CALIB);
    vec![
        I2c::write_read(ADDR, vec![0xD0], vec![0x60]),
        I2c::write(ADDR, vec![0xE0, 0xB6]),
        I2c::write_read(ADDR, vec![0x88], b1),
        I2c::write_read(ADDR, vec![0xE1], b2),
        I2c::write(ADDR, vec![0xF5, filter_bits << 2]),
    ]
}

/// Burst read image of 0xF7..=0xFE.
fn data_registers(adc_p: u32, adc_t: u32, adc_h: u16) -> Vec<u8> {
    let p = adc_p << 4;
    let t = adc_t << 4;
    vec![
        (p >> 16) as u8,
        (p >> 8) as u8,
        p as u8,
        (t >> 16) as u8,
        (t >> 8) as u8,
        t as u8,
        (adc_h >> 8) as u8,
        adc_h as u8,
    ]
}

fn finish(sensor: Bme280<I2cMock, CheckedDelay>) {
    let (mut i2c, mut delay) = sensor.destroy();
    i2c.done();
    delay.done();
}

#[test]
fn calibration_registers_round_trip_through_the_parser() {
    let (b1, b2) = calib_registers(&CALIB);
    let parsed = Calibration::from_registers(&b1.try_into().unwrap(), &b2.try_into().unwrap());
    assert_eq!(parsed, CALIB);
}

#[test]
fn init_then_forced_measurement_at_defaults() {
    let mut expected = init_transactions(0);
    expected.extend([
        I2c::write(ADDR, vec![0xF2, 0b001]),
        I2c::write(ADDR, vec![0xF4, 0b001_001_01]),
        I2c::write_read(ADDR, vec![0xF7], data_registers(415_148, 519_888, 30_000)),
    ]);
    let i2c = I2cMock::new(&expected);
    // Start-up time after the soft reset, then 1.25 + 3 × 2.3 + 2 × 0.575 ms for 1× each.
    let delay = CheckedDelay::new(&[Delay::delay_us(2_000), Delay::delay_us(9_300)]);
    let mut sensor = Bme280::new(i2c, delay, Address::Primary);

    sensor.init(Settings::default()).unwrap();
    assert_eq!(sensor.calibration(), Some(&CALIB));
    let m = sensor.measure().unwrap();
    assert_eq!(
        m,
        Measurement {
            temperature_milli_celsius: 25_080,
            // 25767233 / 256 Pa = 100653.25390625 Pa
            pressure_milli_pascal: Some(100_653_254),
            // 56317 / 1024 % = 54.9970703125 %
            humidity_milli_percent: Some(54_997),
        }
    );
    finish(sensor);
}

#[test]
fn oversampling_and_filter_reach_the_registers_and_the_wait() {
    let settings = Settings {
        temperature: Oversampling::X2,
        pressure: Oversampling::X16,
        humidity: Oversampling::X4,
        filter: Filter::X16,
    };
    let mut expected = init_transactions(0b100);
    expected.extend([
        I2c::write(ADDR, vec![0xF2, 0b011]),
        I2c::write(ADDR, vec![0xF4, 0b010_101_01]),
        I2c::write_read(ADDR, vec![0xF7], data_registers(415_148, 519_888, 30_000)),
    ]);
    let i2c = I2cMock::new(&expected);
    // 1250 + 2300·2 + (2300·16 + 575) + (2300·4 + 575) µs
    let delay = CheckedDelay::new(&[Delay::delay_us(2_000), Delay::delay_us(53_000)]);
    let mut sensor = Bme280::new(i2c, delay, Address::Primary);
    sensor.init(settings).unwrap();
    assert_eq!(sensor.settings(), &settings);
    sensor.measure().unwrap();
    finish(sensor);
}

#[test]
fn skipped_quantities_are_none_and_not_enabled() {
    let settings = Settings { pressure: Oversampling::Skipped, humidity: Oversampling::Skipped, ..Settings::default() };
    let mut expected = init_transactions(0);
    expected.extend([
        I2c::write(ADDR, vec![0xF2, 0b000]),
        I2c::write(ADDR, vec![0xF4, 0b001_000_01]),
        // The sensor reports skipped channels as 0x80000 / 0x8000.
        I2c::write_read(ADDR, vec![0xF7], data_registers(0x80000, 519_888, 0x8000)),
    ]);
    let i2c = I2cMock::new(&expected);
    let delay = CheckedDelay::new(&[Delay::delay_us(2_000), Delay::delay_us(1_250 + 2_300 + 575 + 575)]);
    let mut sensor = Bme280::new(i2c, delay, Address::Primary);
    sensor.init(settings).unwrap();
    let m = sensor.measure().unwrap();
    assert_eq!(
        m,
        Measurement { temperature_milli_celsius: 25_080, pressure_milli_pascal: None, humidity_milli_percent: None }
    );
    assert_eq!(m.readings().count(), 1);
    finish(sensor);
}

#[test]
fn secondary_address_is_0x77() {
    let i2c = I2cMock::new(&[I2c::write_read(0x77, vec![0xD0], vec![0x60])]);
    let mut sensor = Bme280::new(i2c, CheckedDelay::new(&[]), Address::Secondary);
    assert_eq!(sensor.chip_id(), Ok(0x60));
    finish(sensor);
}

#[test]
fn wrong_chip_id_stops_init_and_destroy_returns_the_bus() {
    // A BMP280 answers 0x58: no reset, no calibration read, no measurement possible.
    let i2c = I2cMock::new(&[I2c::write_read(ADDR, vec![0xD0], vec![0x58])]);
    let mut sensor = Bme280::new(i2c, CheckedDelay::new(&[]), Address::Primary);
    assert_eq!(sensor.init(Settings::default()), Err(Error::ChipId(0x58)));
    assert_eq!(sensor.calibration(), None);
    assert_eq!(sensor.measure(), Err(Error::NotInitialized));
    finish(sensor);
}

#[test]
fn measure_before_init_touches_nothing() {
    let mut sensor = Bme280::new(I2cMock::new(&[]), CheckedDelay::new(&[]), Address::Primary);
    assert_eq!(sensor.measure(), Err(Error::NotInitialized));
    assert_eq!(sensor.measure_raw(), Err(Error::NotInitialized));
    finish(sensor);
}

#[test]
fn skipping_temperature_is_refused_before_any_bus_traffic() {
    let settings = Settings { temperature: Oversampling::Skipped, ..Settings::default() };
    let mut sensor = Bme280::new(I2cMock::new(&[]), CheckedDelay::new(&[]), Address::Primary);
    assert_eq!(sensor.init(settings), Err(Error::InvalidSettings));
    finish(sensor);
}

#[test]
fn bus_error_during_calibration_read_leaves_the_driver_uninitialised() {
    let nack = ErrorKind::NoAcknowledge(NoAcknowledgeSource::Data);
    let i2c = I2cMock::new(&[
        I2c::write_read(ADDR, vec![0xD0], vec![0x60]),
        I2c::write(ADDR, vec![0xE0, 0xB6]),
        I2c::write_read(ADDR, vec![0x88], vec![0; 26]).with_error(nack),
    ]);
    let delay = CheckedDelay::new(&[Delay::delay_us(2_000)]);
    let mut sensor = Bme280::new(i2c, delay, Address::Primary);
    assert_eq!(sensor.init(Settings::default()), Err(Error::Bus(nack)));
    assert_eq!(sensor.measure(), Err(Error::NotInitialized));
    finish(sensor);
}

#[test]
fn bus_error_on_the_data_read_is_reported() {
    let nack = ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address);
    let mut expected = init_transactions(0);
    expected.extend([
        I2c::write(ADDR, vec![0xF2, 0b001]),
        I2c::write(ADDR, vec![0xF4, 0b001_001_01]),
        I2c::write_read(ADDR, vec![0xF7], vec![0; 8]).with_error(nack),
    ]);
    let i2c = I2cMock::new(&expected);
    let delay = CheckedDelay::new(&[Delay::delay_us(2_000), Delay::delay_us(9_300)]);
    let mut sensor = Bme280::new(i2c, delay, Address::Primary);
    sensor.init(Settings::default()).unwrap();
    assert_eq!(sensor.measure(), Err(Error::Bus(nack)));
    finish(sensor);
}

#[test]
fn measurement_time_formula() {
    assert_eq!(Settings::default().measurement_time_us(), 9_300);
    let max = Settings {
        temperature: Oversampling::X16,
        pressure: Oversampling::X16,
        humidity: Oversampling::X16,
        filter: Filter::Off,
    };
    assert_eq!(max.measurement_time_us(), 112_800);
}

#[test]
fn errors_display() {
    assert_eq!(Error::<ErrorKind>::ChipId(0x58).to_string(), "BME280: chip id is 0x58, expected 0x60");
}
