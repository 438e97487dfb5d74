//! SHT3x driver: exact bus transactions and delays, CRC, conversion.

use embedded_hal::i2c::{ErrorKind, NoAcknowledgeSource};
use embedded_hal_mock::eh1::delay::{CheckedDelay, Transaction as Delay};
use embedded_hal_mock::eh1::i2c::{Mock as I2cMock, Transaction as I2c};
use voither_firmware::frame::{Quantity, Reading, Unit};
use voither_firmware::sht3x::{
    self, convert_humidity, convert_temperature, crc8, Address, Error, Repeatability, Sht3x,
};

const ADDR: u8 = 0x44;

/// A word followed by its CRC, as the sensor sends it.
fn word(w: u16) -> [u8; 3] {
    let [msb, lsb] = w.to_be_bytes();
    [msb, lsb, crc8(&[msb, lsb])]
}

fn response(t: u16, rh: u16) -> Vec<u8> {
    [word(t), word(rh)].concat()
}

fn finish(sensor: Sht3x<I2cMock, CheckedDelay>) {
    let (mut i2c, mut delay) = sensor.destroy();
    i2c.done();
    delay.done();
}

#[test]
fn crc8_matches_the_datasheet_example() {
    assert_eq!(crc8(&[0xBE, 0xEF]), 0x92);
    assert_eq!(crc8(&[]), 0xFF);
}

#[test]
fn crc8_detects_every_single_bit_error_in_a_word() {
    for w in [0x0000u16, 0xBEEF, 0x6666, 0xFFFF] {
        let crc = crc8(&w.to_be_bytes());
        for bit in 0..16 {
            assert_ne!(crc8(&(w ^ (1 << bit)).to_be_bytes()), crc, "word {w:#06x} bit {bit}");
        }
    }
}

#[test]
fn conversion_end_points_and_rounding() {
    assert_eq!(convert_temperature(0), -45_000);
    assert_eq!(convert_temperature(u16::MAX), 130_000);
    assert_eq!(convert_temperature(0x6666), 25_000); // 0x6666 / 65535 is exactly 0.4
    assert_eq!(convert_humidity(0), 0);
    assert_eq!(convert_humidity(u16::MAX), 100_000);
    assert_eq!(convert_humidity(0x8000), 50_001); // 50.00076 % rounds up
}

#[test]
fn conversion_is_within_half_a_unit_of_the_real_formula() {
    for raw in (0..=u16::MAX).step_by(7) {
        let t = -45.0 + 175.0 * f64::from(raw) / 65535.0;
        let rh = 100.0 * f64::from(raw) / 65535.0;
        assert!((f64::from(convert_temperature(raw)) / 1000.0 - t).abs() <= 0.0005 + 1e-9, "T raw {raw}");
        assert!((f64::from(convert_humidity(raw)) / 1000.0 - rh).abs() <= 0.0005 + 1e-9, "RH raw {raw}");
    }
}

#[test]
fn measure_sends_0x2400_waits_15_5_ms_and_reads_six_bytes() {
    let i2c = I2cMock::new(&[I2c::write(ADDR, vec![0x24, 0x00]), I2c::read(ADDR, response(0x6666, 0x7333))]);
    let delay = CheckedDelay::new(&[Delay::delay_us(15_500)]);
    let mut sensor = Sht3x::new(i2c, delay, Address::Default);

    let m = sensor.measure().unwrap();
    assert_eq!(m.temperature_milli_celsius, 25_000);
    assert_eq!(m.humidity_milli_percent, 45_000);
    assert_eq!((m.raw_temperature, m.raw_humidity), (0x6666, 0x7333));
    finish(sensor);
}

#[test]
fn measure_with_each_repeatability_uses_its_command_and_worst_case_time() {
    for (rep, cmd, us) in [
        (Repeatability::High, [0x24, 0x00], 15_500),
        (Repeatability::Medium, [0x24, 0x0B], 6_500),
        (Repeatability::Low, [0x24, 0x16], 4_500),
    ] {
        let i2c = I2cMock::new(&[I2c::write(ADDR, cmd.to_vec()), I2c::read(ADDR, response(0, u16::MAX))]);
        let delay = CheckedDelay::new(&[Delay::delay_us(us)]);
        let mut sensor = Sht3x::new(i2c, delay, Address::Default);
        let m = sensor.measure_with(rep).unwrap();
        assert_eq!((m.temperature_milli_celsius, m.humidity_milli_percent), (-45_000, 100_000));
        finish(sensor);
    }
}

#[test]
fn alternate_address_is_0x45() {
    let i2c = I2cMock::new(&[I2c::write(0x45, vec![0x24, 0x00]), I2c::read(0x45, response(1, 2))]);
    let delay = CheckedDelay::new(&[Delay::delay_us(15_500)]);
    let mut sensor = Sht3x::new(i2c, delay, Address::Alternate);
    sensor.measure().unwrap();
    finish(sensor);
}

#[test]
fn bad_temperature_crc_is_an_error() {
    let mut bytes = response(0x6666, 0x7333);
    bytes[2] ^= 0x01;
    let i2c = I2cMock::new(&[I2c::write(ADDR, vec![0x24, 0x00]), I2c::read(ADDR, bytes)]);
    let delay = CheckedDelay::new(&[Delay::delay_us(15_500)]);
    let mut sensor = Sht3x::new(i2c, delay, Address::Default);
    assert_eq!(sensor.measure(), Err(Error::Crc));
    finish(sensor);
}

#[test]
fn corrupted_humidity_word_is_an_error() {
    let mut bytes = response(0x6666, 0x7333);
    bytes[4] ^= 0x40; // data bit flipped on the bus, CRC left as sent
    let i2c = I2cMock::new(&[I2c::write(ADDR, vec![0x24, 0x00]), I2c::read(ADDR, bytes)]);
    let delay = CheckedDelay::new(&[Delay::delay_us(15_500)]);
    let mut sensor = Sht3x::new(i2c, delay, Address::Default);
    assert_eq!(sensor.measure(), Err(Error::Crc));
    finish(sensor);
}

#[test]
fn nack_on_the_read_is_a_bus_error() {
    let nack = ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address);
    let i2c = I2cMock::new(&[I2c::write(ADDR, vec![0x24, 0x00]), I2c::read(ADDR, response(0, 0)).with_error(nack)]);
    let delay = CheckedDelay::new(&[Delay::delay_us(15_500)]);
    let mut sensor = Sht3x::new(i2c, delay, Address::Default);
    assert_eq!(sensor.measure(), Err(Error::Bus(nack)));
    finish(sensor);
}

#[test]
fn nack_on_the_command_skips_the_wait_and_the_read() {
    let nack = ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address);
    let i2c = I2cMock::new(&[I2c::write(ADDR, vec![0x24, 0x00]).with_error(nack)]);
    let delay = CheckedDelay::new(&[]);
    let mut sensor = Sht3x::new(i2c, delay, Address::Default);
    assert_eq!(sensor.measure(), Err(Error::Bus(nack)));
    finish(sensor);
}

#[test]
fn soft_reset_sends_0x30a2_and_waits_1_5_ms() {
    let i2c = I2cMock::new(&[I2c::write(ADDR, vec![0x30, 0xA2])]);
    let delay = CheckedDelay::new(&[Delay::delay_us(1_500)]);
    let mut sensor = Sht3x::new(i2c, delay, Address::Default);
    sensor.soft_reset().unwrap();
    finish(sensor);
}

#[test]
fn serial_number_sends_0x3682_waits_1_ms_and_joins_two_words() {
    let i2c = I2cMock::new(&[I2c::write(ADDR, vec![0x36, 0x82]), I2c::read(ADDR, response(0x1234, 0xABCD))]);
    let delay = CheckedDelay::new(&[Delay::delay_us(1_000)]);
    let mut sensor = Sht3x::new(i2c, delay, Address::Default);
    assert_eq!(sensor.serial_number(), Ok(0x1234_ABCD));
    finish(sensor);
}

#[test]
fn serial_number_with_bad_crc_is_an_error() {
    let mut bytes = response(0x1234, 0xABCD);
    bytes[5] = !bytes[5];
    let i2c = I2cMock::new(&[I2c::write(ADDR, vec![0x36, 0x82]), I2c::read(ADDR, bytes)]);
    let delay = CheckedDelay::new(&[Delay::delay_us(1_000)]);
    let mut sensor = Sht3x::new(i2c, delay, Address::Default);
    assert_eq!(sensor.serial_number(), Err(Error::Crc));
    finish(sensor);
}

#[test]
fn destroy_returns_the_untouched_bus() {
    let sensor = Sht3x::new(I2cMock::new(&[]), CheckedDelay::new(&[]), Address::Default);
    finish(sensor);
}

#[test]
fn measurement_becomes_frame_readings() {
    let m = sht3x::Measurement {
        temperature_milli_celsius: -1_250,
        humidity_milli_percent: 99_999,
        raw_temperature: 0,
        raw_humidity: 0,
    };
    assert_eq!(
        m.readings(),
        [
            Reading::new(Quantity::TEMPERATURE, Unit::CELSIUS, -1_250, -3),
            Reading::new(Quantity::RELATIVE_HUMIDITY, Unit::PERCENT, 99_999, -3),
        ]
    );
}

#[test]
fn errors_display() {
    assert_eq!(Error::<ErrorKind>::Crc.to_string(), "SHT3x: CRC mismatch in data read from the sensor");
    assert!(Error::Bus(ErrorKind::Other).to_string().contains("Other"));
}
