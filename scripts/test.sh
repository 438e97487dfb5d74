#!/usr/bin/env bash
# Runs every test of VOITHER Edge on this machine, installing what the tests need.
#
#   scripts/test.sh            format check, clippy, build, all tests
#
# The end-to-end tests start their own Mosquitto, hubs and gateways on free loopback
# ports; Mosquitto and PostgreSQL come from Debian's packages and are installed here
# when missing.
#
# cross/ (ARM builds, the aarch64 gateway under qemu, the multi-arch image index, the
# .deb files) runs here too: the aarch64 and armv7 builds (Debian's Rust, profile
# cross-check) start in the background at the lowest priority once the host build is
# done, so they use what the tests leave of the two cores; cross/check.sh --all then
# checks them, with the host's own x86_64 build as the amd64 image and package. Each
# step's seconds are printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-$PWD/target}
[[ $target = /* ]] || target=$PWD/$target
mkdir -p "$target/cross"
timings=$target/test-timings.txt
: >"$timings"
t_all=$SECONDS
t_step=$SECONDS
step_name=""
step() { # NAME: ends the step before, prints the header of this one
  [ -z "$step_name" ] || printf '%6d s  %s\n' $((SECONDS - t_step)) "$step_name" >>"$timings"
  step_name=$1
  t_step=$SECONDS
  [ -z "$1" ] || echo "==> $1"
}
cross_pid=""
deny_pid=""
cross_log=$target/cross/build-background.log
deny_log=$target/cargo-deny-install.log
# The optional cargo features, checked and unit-tested once with all of them on
# (tests/tests/otlp_export.rs builds its binaries with the same list, so the unit tests
# at the end reuse that build).
features=voither-gateway/sensors,voither-gateway/otlp,voither-hub/otlp,voither-telemetry/otlp
# The background jobs (cross builds, cargo-deny install) run in their own process groups
# (setsid), so a failing step stops them together with their cargo and rustc.
trap 'for p in $cross_pid $deny_pid; do kill -- "-$p" 2>/dev/null || true; done' EXIT
# wait_background PID LOG WHAT: waits for a background step; on failure shows its log.
wait_background() {
  if ! wait "$1"; then
    tail -n 40 "$2"
    echo "FAIL: $3 failed (the whole log: $2)"
    exit 1
  fi
  tail -n 8 "$2"
}

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

step "cargo fmt --check"
cargo fmt --all --check
# cargo-deny is built once per machine (about 6 CPU-minutes) and cached; the build runs
# in the background and the checks near the end.
echo "    cargo-deny: installed in the background when missing (log: $deny_log)"
setsid nice -n 19 scripts/check-deps.sh --install-only >"$deny_log" 2>&1 &
deny_pid=$!
step "cross: Debian's Rust and cross gcc (apt, when missing)"
cross/build.sh --prepare aarch64 armv7
step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
# The optional features in one pass over the workspace (with -p, the dependencies would
# be checked again under other feature sets).
cargo clippy --workspace --all-targets --locked --features "$features" -- -D warnings
# The cargo-fuzz targets are their own workspace (fuzz/); checking them keeps them in
# step with the protocol crate. Their lock file is not kept, hence no --locked.
step "fuzz targets compile (cargo check in fuzz/)"
(cd fuzz && cargo check --bins --quiet)
step "cargo build (binaries used by the end-to-end tests)"
cargo build --workspace --bins --locked
echo "    cross builds of aarch64 and armv7 start in the background (log: $cross_log)"
VOITHER_CROSS_PROFILE=cross-check setsid nice -n 19 cross/build.sh aarch64 armv7 >"$cross_log" 2>&1 &
cross_pid=$!
step "systemd units and Kubernetes manifests"
scripts/check-ship.sh
step "cargo test"
cargo test --workspace --locked -- --test-threads=2
step "cross: wait for the aarch64 and armv7 builds"
wait_background "$cross_pid" "$cross_log" "the cross builds"
cross_pid=""
step "cross/check.sh --all: aarch64 under qemu, image index, .deb files"
VOITHER_CROSS_X86_64_FROM=$target/debug cross/build.sh x86_64
VOITHER_CROSS_SKIP_BUILD=1 VOITHER_DEB_XZ_LEVEL=1 cross/check.sh --all
step "dependencies: cargo deny (bans, licenses, sources; advisories where the database can be had)"
wait_background "$deny_pid" "$deny_log" "installing cargo-deny"
deny_pid=""
scripts/check-deps.sh
# Last, because it builds the gateway and the crates above it with other features.
step "cargo test (unit tests with the features sensors and otlp)"
cargo test --workspace --locked --features "$features" --lib
step ""
echo "==> seconds per step"
cat "$timings"
echo "OK: every test passed in $((SECONDS - t_all)) s"
