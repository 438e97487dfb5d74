#!/usr/bin/env bash
# Runs every test of VOITHER Edge on this machine, installing what the tests need.
#
#   scripts/test.sh            format check, clippy, build, all tests
#
# The end-to-end tests start their own Mosquitto, hubs and gateways on free loopback
# ports; Mosquitto and PostgreSQL come from Debian's packages and are installed here
# when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  missing+=(mosquitto)
fi
# PostgreSQL's server binaries for the PostgreSQL sink tests (tests/src/pg.rs starts a
# throwaway server in a temporary folder; the package's own cluster is not used).
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  missing+=(postgresql)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

echo "==> cargo fmt --check"
cargo fmt --all --check
echo "==> dependencies: cargo deny (bans, licenses, sources; advisories where the database can be had)"
scripts/check-deps.sh
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy -p voither-gateway --features sensors --all-targets --locked -- -D warnings
cargo clippy -p voither-gateway -p voither-hub -p voither-telemetry --features otlp --all-targets --locked -- -D warnings
echo "==> cargo build (binaries used by the end-to-end tests)"
cargo build --workspace --bins --locked
echo "==> systemd units and Kubernetes manifests"
scripts/check-ship.sh
echo "==> cargo test"
cargo test --workspace --locked -- --test-threads=2
echo "==> cargo test (gateway with the sensors feature)"
cargo test -p voither-gateway --features sensors --locked
echo "==> cargo test (telemetry with the otlp feature)"
cargo test -p voither-telemetry --features otlp --locked
