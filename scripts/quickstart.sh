#!/usr/bin/env bash
# Builds VOITHER Edge and runs the whole pipeline on this machine with no external
# services: a lab PKI, a hub with its embedded sink, a gateway with its embedded MQTT
# broker, and simulated devices; it ends by checking the hub received every message
# exactly once. Extra arguments go to voither-demo (see --help), for example
#
#   scripts/quickstart.sh --devices 20 --messages 5000
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins --locked
exec target/release/voither-demo "$@"
