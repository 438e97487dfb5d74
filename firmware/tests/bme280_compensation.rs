//! BME280 compensation: known answers, an independent floating-point reference, the
//! odd dig_H4/dig_H5 packing, and no panic on nonsense input.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use voither_firmware::bme280::{Calibration, Oversampling, RawData, Settings};

mod common;
use common::CALIB;

/// The datasheet's double-precision formulas (BME280 datasheet §8.1), written
/// independently of the integer ones under test. Returns °C and `t_fine`, which the
/// datasheet's double code also truncates to an integer before P and H use it.
fn float_t(c: &Calibration, adc_t: i32) -> (f64, f64) {
    let adc = f64::from(adc_t);
    let t1 = f64::from(c.dig_t1);
    let var1 = (adc / 16384.0 - t1 / 1024.0) * f64::from(c.dig_t2);
    let d = adc / 131072.0 - t1 / 8192.0;
    let var2 = d * d * f64::from(c.dig_t3);
    ((var1 + var2) / 5120.0, f64::from((var1 + var2) as i32))
}

/// Pa.
fn float_p(c: &Calibration, adc_p: i32, t_fine: f64) -> f64 {
    let mut var1 = t_fine / 2.0 - 64000.0;
    let mut var2 = var1 * var1 * f64::from(c.dig_p6) / 32768.0;
    var2 += var1 * f64::from(c.dig_p5) * 2.0;
    var2 = var2 / 4.0 + f64::from(c.dig_p4) * 65536.0;
    var1 = (f64::from(c.dig_p3) * var1 * var1 / 524288.0 + f64::from(c.dig_p2) * var1) / 524288.0;
    var1 = (1.0 + var1 / 32768.0) * f64::from(c.dig_p1);
    let mut p = 1048576.0 - f64::from(adc_p);
    p = (p - var2 / 4096.0) * 6250.0 / var1;
    let var1 = f64::from(c.dig_p9) * p * p / 2147483648.0;
    let var2 = p * f64::from(c.dig_p8) / 32768.0;
    p + (var1 + var2 + f64::from(c.dig_p7)) / 16.0
}

/// %RH.
fn float_h(c: &Calibration, adc_h: i32, t_fine: f64) -> f64 {
    let mut h = t_fine - 76800.0;
    h = (f64::from(adc_h) - (f64::from(c.dig_h4) * 64.0 + f64::from(c.dig_h5) / 16384.0 * h))
        * (f64::from(c.dig_h2) / 65536.0
            * (1.0 + f64::from(c.dig_h6) / 67108864.0 * h * (1.0 + f64::from(c.dig_h3) / 67108864.0 * h)));
    h *= 1.0 - f64::from(c.dig_h1) * h / 524288.0;
    h.clamp(0.0, 100.0)
}

#[test]
fn temperature_known_answer() {
    // Datasheet example: adc_T = 519888 gives t_fine = 128422 and T = 25.08 °C.
    assert_eq!(CALIB.compensate_temperature(519_888), (2508, 128_422));
    let (t, t_fine) = float_t(&CALIB, 519_888);
    assert!((t - 25.08).abs() < 0.005, "{t}");
    assert_eq!(t_fine as i32, 128_422);
}

#[test]
fn pressure_known_answer() {
    // adc_P = 415148 with t_fine = 128422. The BMP280 datasheet's example table prints
    // 25767236 for the 64-bit formula; executing that formula as published gives
    // 25767233 (checked independently with arbitrary-precision integers). Both are
    // 100653.27 Pa within 0.02 Pa, which is what the float formula gives.
    let p = CALIB.compensate_pressure(415_148, 128_422);
    assert_eq!(p, 25_767_233);
    let pa = f64::from(p) / 256.0;
    assert!((pa - 100_653.27).abs() < 0.02, "{pa}");
    let float = float_p(&CALIB, 415_148, float_t(&CALIB, 519_888).1);
    assert!((pa - float).abs() < 0.02, "{pa} vs {float}");
}

#[test]
fn humidity_known_answers() {
    // Values from an independent arbitrary-precision evaluation of
    // bme280_compensate_H_int32 with t_fine = 128422.
    let t_fine = 128_422;
    for (adc_h, expected) in [(27_000, 39_190), (27_179, 40_220), (30_000, 56_317), (0, 0), (65_535, 102_400)] {
        let h = CALIB.compensate_humidity(adc_h, t_fine);
        assert_eq!(h, expected, "adc_H {adc_h}");
        let float = float_h(&CALIB, adc_h, float_t(&CALIB, 519_888).1);
        assert!((f64::from(h) / 1024.0 - float).abs() < 0.01, "adc_H {adc_h}: {h} vs {float}");
    }
}

#[test]
fn integer_formulas_track_the_float_reference_over_the_sensor_range() {
    // -40 °C..85 °C, 300 hPa..1100 hPa, 0..100 %RH for this calibration. The integer and
    // double temperature paths give slightly different t_fine (13 LSB, 0.0025 °C, at
    // -15 °C), which moves pressure by up to half a pascal; so P and H are compared both
    // with the same t_fine (the formula alone) and end to end.
    let mut rng = StdRng::seed_from_u64(0xB3E2_8000);
    let mut worst = [0f64; 5];
    for _ in 0..20_000 {
        let adc_t = rng.random_range(380_000..620_000);
        let (t, t_fine) = CALIB.compensate_temperature(adc_t);
        let (ft, ft_fine) = float_t(&CALIB, adc_t);
        worst[0] = worst[0].max((f64::from(t) / 100.0 - ft).abs());

        let adc_p = rng.random_range(200_000..800_000);
        let p = f64::from(CALIB.compensate_pressure(adc_p, t_fine)) / 256.0;
        let same_t_fine = float_p(&CALIB, adc_p, f64::from(t_fine));
        if (30_000.0..=110_000.0).contains(&same_t_fine) {
            worst[1] = worst[1].max((p - same_t_fine).abs());
            worst[2] = worst[2].max((p - float_p(&CALIB, adc_p, ft_fine)).abs());
        }

        let adc_h = rng.random_range(0..65_536);
        let h = f64::from(CALIB.compensate_humidity(adc_h, t_fine)) / 1024.0;
        worst[3] = worst[3].max((h - float_h(&CALIB, adc_h, f64::from(t_fine))).abs());
        worst[4] = worst[4].max((h - float_h(&CALIB, adc_h, ft_fine)).abs());
    }
    // Integer T is rounded to 0.01 °C; P is Q24.8 (1/256 Pa); H is Q22.10 (1/1024 %).
    let [t, p, p_end, h, h_end] = worst;
    assert!(t <= 0.0101, "temperature off by {t} °C");
    assert!(p < 0.02, "pressure formula off by {p} Pa");
    assert!(p_end < 1.0, "pressure end to end off by {p_end} Pa");
    assert!(h < 0.01, "humidity formula off by {h} %RH");
    assert!(h_end < 0.02, "humidity end to end off by {h_end} %RH");
}

#[test]
fn h4_and_h5_share_register_0xe5() {
    // 0xE4 = 0x13, 0xE5 = 0x29, 0xE6 = 0x03: dig_H4 = 0x139 = 313, dig_H5 = 0x032 = 50.
    let block2 = [0x6A, 0x01, 0x00, 0x13, 0x29, 0x03, 0x1E];
    let c = Calibration::from_registers(&[0; 26], &block2);
    assert_eq!((c.dig_h2, c.dig_h3, c.dig_h4, c.dig_h5, c.dig_h6), (362, 0, 313, 50, 30));

    // Negative 12-bit values take their sign from 0xE4 and 0xE6: 0xFF8 = -8, 0xFE7 = -25.
    let block2 = [0xFF, 0xFF, 0xFF, 0xFF, 0x78, 0xFE, 0x80];
    let c = Calibration::from_registers(&[0; 26], &block2);
    assert_eq!((c.dig_h2, c.dig_h3, c.dig_h4, c.dig_h5, c.dig_h6), (-1, 255, -8, -25, -128));
}

#[test]
fn block1_is_little_endian_with_h1_at_0xa1() {
    let mut block1 = [0u8; 26];
    for (i, b) in block1.iter_mut().enumerate() {
        *b = i as u8 + 1;
    }
    let c = Calibration::from_registers(&block1, &[0; 7]);
    assert_eq!(c.dig_t1, 0x0201);
    assert_eq!(c.dig_t2, 0x0403);
    assert_eq!(c.dig_p1, 0x0807);
    assert_eq!(c.dig_p9, 0x1817);
    assert_eq!(c.dig_h1, 26); // 0xA1; 0xA0 (25) is skipped
}

#[test]
fn raw_data_unpacks_twenty_and_sixteen_bit_values() {
    let data = [0x65, 0x5A, 0xC0, 0x7E, 0xED, 0x00, 0x75, 0x30];
    let raw = RawData::from_registers(&data, &Settings::default());
    assert_eq!(raw, RawData { temperature: 519_888, pressure: Some(415_148), humidity: Some(30_000) });
    let settings = Settings { humidity: Oversampling::Skipped, ..Settings::default() };
    assert_eq!(RawData::from_registers(&data, &settings).humidity, None);
}

#[test]
fn nonsense_calibration_and_input_never_panic() {
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..50_000 {
        let mut b1 = [0u8; 26];
        let mut b2 = [0u8; 7];
        rng.fill(&mut b1[..]);
        rng.fill(&mut b2[..]);
        let c = Calibration::from_registers(&b1, &b2);
        let (_, t_fine) = c.compensate_temperature(rng.random());
        let _ = c.compensate_pressure(rng.random(), t_fine);
        let h = c.compensate_humidity(rng.random(), t_fine);
        assert!(h <= 102_400);
        let raw = RawData { temperature: rng.random(), pressure: Some(rng.random()), humidity: Some(rng.random()) };
        let m = c.compensate(&raw);
        assert!(m.humidity_milli_percent.unwrap() <= 100_000);
    }
}

#[test]
fn pressure_guard_against_division_by_zero() {
    let c = Calibration { dig_p1: 0, ..CALIB };
    assert_eq!(c.compensate_pressure(415_148, 128_422), 0);
}
