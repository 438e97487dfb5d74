//! VOITHER Edge on the device: sensor drivers and the compact device frame.
//!
//! This crate is what a microcontroller runs to feed a VOITHER Edge gateway. It is
//! `#![no_std]` and needs no allocator: everything lives on the stack or in buffers the
//! caller owns, so it fits a Cortex-M0+ as well as a Linux gateway reading sensors on its
//! own I²C bus.
//!
//! - [`sht3x`]: Sensirion SHT30/SHT31/SHT35 temperature and humidity sensor.
//! - [`bme280`]: Bosch BME280 temperature, pressure and humidity sensor.
//! - [`frame`]: the device frame, a reading set encoded as CBOR into a caller-provided
//!   byte slice, ready to be published as one MQTT payload.
//!
//! The drivers are generic over the [`embedded_hal`] 1.0 traits
//! [`I2c`](embedded_hal::i2c::I2c) and [`DelayNs`](embedded_hal::delay::DelayNs): they
//! own the bus and a delay for their lifetime and hand both back from `destroy()` (use
//! `embedded-hal-bus` to share one bus between several drivers). Every wait a driver
//! needs is the datasheet's worst case, spent in `DelayNs`; nothing polls or spins.
//!
//! # Units and fixed point
//!
//! Nothing here uses floating point, so a device without an FPU needs neither soft-float
//! arithmetic nor float formatting. Physical values are integers in a small unit:
//!
//! | quantity | type | unit | example |
//! |---|---|---|---|
//! | temperature | `i32` | milli-degree Celsius (m°C) | `21_500` = 21.5 °C |
//! | relative humidity | `u32` | milli-percent (m%RH) | `45_200` = 45.2 %RH |
//! | pressure | `u32` | milli-pascal (mPa) | `100_653_270` = 1006.5327 hPa |
//!
//! On the wire a [`frame::Reading`] carries an `i32` mantissa with a decimal exponent:
//! `value × 10^exponent` in the reading's [`frame::Unit`], so the values above travel as
//! `(21_500, -3)` °C, `(45_200, -3)` % and `(100_653_270, -3)` Pa.
//!
//! # Errors
//!
//! Drivers return `Error<E>` where `E` is the bus's own error type: `Error::Bus(E)` for
//! anything the bus reported, and a variant for each way the sensor's answer can be wrong
//! (checksum, identity). The frame codec returns [`frame::Error`]. No function in this
//! crate panics on any input, from the bus or from the network.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bme280;
pub mod frame;
pub mod sht3x;
