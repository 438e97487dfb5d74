//! End-to-end support for VOITHER Edge: the device simulator, the checker that proves
//! exactly-once delivery, and helpers that run Mosquitto, hubs and gateways as real
//! processes. Used by the integration tests in `tests/tests/`, the quick-start demo
//! (`voither-demo`), the simulator binary (`voither-sim`) and the fleet simulator
//! (`voither-fleet`).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod check;
pub mod fleet;
pub mod pg;
pub mod procs;
pub mod proxy;
pub mod raw;
pub mod sim;
