//! Fixtures shared by the firmware test files.

use voither_firmware::bme280::Calibration;

/// T and P parameters of the datasheet's worked example (BMP280 datasheet §3.12, same
/// formulas as the BME280), humidity parameters of a real sensor.
pub const CALIB: Calibration = Calibration {
    dig_t1: 27504,
    dig_t2: 26435,
    dig_t3: -1000,
    dig_p1: 36477,
    dig_p2: -10685,
    dig_p3: 3024,
    dig_p4: 2855,
    dig_p5: 140,
    dig_p6: -7,
    dig_p7: 15500,
    dig_p8: -14600,
    dig_p9: 6000,
    dig_h1: 75,
    dig_h2: 362,
    dig_h3: 0,
    dig_h4: 313,
    dig_h5: 50,
    dig_h6: 30,
};
