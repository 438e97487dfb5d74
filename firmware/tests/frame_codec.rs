//! Device frame codec: exact bytes of a documented example, round trips of many random
//! frames, buffer sizes, capacity.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use voither_firmware::frame::{Error, Frame, Quantity, Reading, Unit, MAX_ENCODED_LEN, MAX_READINGS};

/// The example of the module documentation: device 42, frame 7, 2023-11-14T22:13:20Z,
/// 21.5 °C and 45.2 %RH.
const EXAMPLE: [u8; 29] = [
    0x85, // array(5)
    0x01, // version 1
    0x18, 0x2A, // device_id: uint 42
    0x07, // counter: uint 7
    0x1B, 0x00, 0x00, 0x01, 0x8B, 0xCF, 0xE5, 0x68, 0x00, // timestamp_ms: uint64 1_700_000_000_000
    0x82, // array(2)
    0x84, 0x01, 0x01, 0x19, 0x53, 0xFC, 0x22, // [1, 1, 21500, -3]
    0x84, 0x02, 0x02, 0x19, 0xB0, 0x90, 0x22, // [2, 2, 45200, -3]
];

fn example() -> Frame {
    let mut frame = Frame::new(42, 7, 1_700_000_000_000);
    frame.push(Reading::temperature_milli_celsius(21_500)).unwrap();
    frame.push(Reading::relative_humidity_milli_percent(45_200)).unwrap();
    frame
}

fn random_reading(rng: &mut StdRng) -> Reading {
    // Mix small values (short CBOR forms) with extremes (long ones).
    match rng.random_range(0..3) {
        0 => {
            Reading::new(Quantity(rng.random_range(0..8)), Unit(rng.random_range(0..8)), rng.random_range(-30..30), -3)
        }
        1 => Reading::new(Quantity(rng.random()), Unit(rng.random()), rng.random(), rng.random()),
        _ => Reading::new(
            Quantity(u16::MAX),
            Unit(u16::MAX),
            if rng.random() { i32::MIN } else { i32::MAX },
            if rng.random() { i8::MIN } else { i8::MAX },
        ),
    }
}

fn random_frame(rng: &mut StdRng) -> Frame {
    let mut frame = Frame::new(
        if rng.random() { rng.random() } else { rng.random_range(0..300) },
        rng.random(),
        if rng.random() { rng.random() } else { rng.random_range(1_600_000_000_000..1_900_000_000_000) },
    );
    for _ in 0..rng.random_range(0..=MAX_READINGS) {
        frame.push(random_reading(rng)).unwrap();
    }
    frame
}

#[test]
fn documented_example_has_these_exact_bytes() {
    let mut buf = [0u8; MAX_ENCODED_LEN];
    let len = example().encode(&mut buf).unwrap();
    assert_eq!(&buf[..len], &EXAMPLE);
    let decoded = Frame::decode(&EXAMPLE).unwrap();
    assert_eq!(decoded, example());
    assert_eq!(decoded.readings()[0], Reading::new(Quantity::TEMPERATURE, Unit::CELSIUS, 21_500, -3));
}

#[test]
fn empty_frame_with_zero_fields_is_six_bytes() {
    let mut buf = [0u8; 16];
    let len = Frame::new(0, 0, 0).encode(&mut buf).unwrap();
    assert_eq!(&buf[..len], &[0x85, 0x01, 0x00, 0x00, 0x00, 0x80]);
    assert_eq!(Frame::decode(&buf[..len]).unwrap().readings(), &[]);
}

#[test]
fn random_frames_round_trip() {
    let mut rng = StdRng::seed_from_u64(0xF4A3E);
    let mut buf = [0u8; MAX_ENCODED_LEN];
    for _ in 0..20_000 {
        let frame = random_frame(&mut rng);
        let len = frame.encode(&mut buf).unwrap();
        assert!(len <= MAX_ENCODED_LEN);
        assert_eq!(Frame::decode(&buf[..len]), Ok(frame));
    }
}

#[test]
fn max_encoded_len_is_exact_for_the_worst_frame() {
    let mut frame = Frame::new(u32::MAX, u32::MAX, u64::MAX);
    for _ in 0..MAX_READINGS {
        frame.push(Reading::new(Quantity(u16::MAX), Unit(u16::MAX), i32::MIN, i8::MIN)).unwrap();
    }
    let mut buf = [0u8; MAX_ENCODED_LEN];
    assert_eq!(frame.encode(&mut buf), Ok(MAX_ENCODED_LEN));
    assert_eq!(Frame::decode(&buf), Ok(frame));
}

#[test]
fn every_too_small_buffer_is_refused() {
    let mut rng = StdRng::seed_from_u64(3);
    let mut big = [0u8; MAX_ENCODED_LEN];
    for _ in 0..200 {
        let frame = random_frame(&mut rng);
        let len = frame.encode(&mut big).unwrap();
        for short in 0..len {
            let mut buf = vec![0u8; short];
            assert_eq!(frame.encode(&mut buf), Err(Error::BufferTooSmall), "{short} of {len} bytes");
        }
        let mut exact = vec![0u8; len];
        assert_eq!(frame.encode(&mut exact), Ok(len));
        assert_eq!(exact, &big[..len]);
    }
}

#[test]
fn push_beyond_capacity_is_refused_and_changes_nothing() {
    let mut frame = Frame::new(1, 2, 3);
    for i in 0..MAX_READINGS {
        frame.push(Reading::temperature_milli_celsius(i as i32)).unwrap();
    }
    let before = frame;
    assert_eq!(frame.push(Reading::EMPTY), Err(Error::TooManyReadings));
    assert_eq!(frame, before);
}

#[test]
fn extend_is_all_or_nothing() {
    let mut frame = Frame::new(1, 2, 3);
    frame.extend([Reading::temperature_milli_celsius(1); MAX_READINGS - 2]).unwrap();
    let before = frame;
    assert_eq!(frame.extend([Reading::pressure_milli_pascal(5); 3]), Err(Error::TooManyReadings));
    assert_eq!(frame, before);
    frame.extend([Reading::pressure_milli_pascal(5); 2]).unwrap();
    assert_eq!(frame.readings().len(), MAX_READINGS);
    frame.clear_readings();
    assert!(frame.readings().is_empty());
    assert_eq!((frame.device_id, frame.counter, frame.timestamp_ms), (1, 2, 3));
}

#[test]
fn helpers_saturate_values_beyond_i32() {
    assert_eq!(Reading::pressure_milli_pascal(u32::MAX).value, i32::MAX);
    assert_eq!(Reading::relative_humidity_milli_percent(100_000).value, 100_000);
}

#[test]
fn decoding_more_than_max_readings_is_too_many() {
    let mut bytes = vec![0x85, 0x01, 0x00, 0x00, 0x00, 0x80 + MAX_READINGS as u8 + 1];
    for _ in 0..=MAX_READINGS {
        bytes.extend([0x84, 0x00, 0x00, 0x00, 0x00]);
    }
    assert_eq!(Frame::decode(&bytes), Err(Error::TooManyReadings));
    // A huge announced count is refused before reading any element.
    assert_eq!(
        Frame::decode(&[0x85, 0x01, 0x00, 0x00, 0x00, 0x9B, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]),
        Err(Error::TooManyReadings)
    );
}

#[test]
fn other_versions_are_unsupported_whatever_follows() {
    assert_eq!(Frame::decode(&[0x82, 0x02, 0x00]), Err(Error::UnsupportedVersion(2)));
    assert_eq!(Frame::decode(&[0x81, 0x18, 0xFF]), Err(Error::UnsupportedVersion(255)));
    assert_eq!(Frame::decode(&[0x81, 0x00]), Err(Error::UnsupportedVersion(0)));
}

#[test]
fn structural_errors_are_malformed() {
    let cases: &[&[u8]] = &[
        &[],                                                                                // nothing
        &[0x80],                                                                            // empty array
        &[0x84, 0x01, 0x00, 0x00, 0x00],             // version 1 with four fields
        &[0x9F, 0x01, 0x00, 0x00, 0x00, 0x80, 0xFF], // indefinite frame array
        &[0x85, 0x01, 0x00, 0x00, 0x00, 0x9F, 0xFF], // indefinite readings array
        &[0x85, 0x01, 0x1B, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0x80], // device_id above u32
        &[0x85, 0x01, 0x20, 0x00, 0x00, 0x80],       // negative device_id
        &[0x85, 0x01, 0x00, 0x00, 0x00, 0x80, 0x00], // trailing byte
        &[0x85, 0x01, 0x00, 0x00, 0x00, 0x81, 0x83, 0x00, 0x00, 0x00], // reading of three
        &[0x85, 0x01, 0x00, 0x00, 0x00, 0x81, 0x84, 0x1A, 0, 1, 0, 0, 0x00, 0x00, 0x00], // quantity above u16
        &[0x85, 0x01, 0x00, 0x00, 0x00, 0x81, 0x84, 0x00, 0x00, 0x1A, 0x80, 0, 0, 0, 0x00], // value above i32
        &[0x85, 0x01, 0x00, 0x00, 0x00, 0x81, 0x84, 0x00, 0x00, 0x00, 0x18, 0x80], // exponent 128
        &[0x85, 0x01, 0x00, 0x00, 0x00, 0x81, 0x84, 0x00, 0x00, 0x00, 0x38, 0x80], // exponent -129
        &[0x85, 0x01, 0x00, 0x00, 0x00, 0x81, 0x84, 0x00, 0x00, 0xF9, 0x3C, 0x00, 0x00], // float value
        &[0xA5, 0x01, 0x00],                         // a map
        &[0x85, 0x61, 0x31, 0x00, 0x00, 0x00, 0x80], // version as text
    ];
    for (i, bytes) in cases.iter().enumerate() {
        assert_eq!(Frame::decode(bytes), Err(Error::Malformed), "case {i}: {bytes:02X?}");
    }
}

#[test]
fn errors_display() {
    assert_eq!(Error::TooManyReadings.to_string(), format!("more than {MAX_READINGS} readings in a frame"));
    assert_eq!(Error::UnsupportedVersion(9).to_string(), "unsupported device frame version 9");
}
