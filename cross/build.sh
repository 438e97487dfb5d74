#!/usr/bin/env bash
# Builds voither-gateway and voither-hub for the targets that ship, with Debian's Rust
# (rustc-web, cargo-web) and Debian's cross gcc, in the size-tuned `release-edge`
# profile (cross/cargo-config.toml), and prints the stripped sizes.
#
#   cross/build.sh [x86_64|aarch64|armv7 ...]      default: all three
#   cross/build.sh --prepare [targets]             only install the toolchains (apt),
#                                                  so that a build in the background
#                                                  never needs the dpkg lock
#
# Output, under the Cargo target folder ($CARGO_TARGET_DIR, default ./target):
#   cross/<triple>/voither-gateway, cross/<triple>/voither-hub   stripped binaries
#   cross/sizes.txt                                               their sizes
#   cross/timings.txt                                             seconds per step
#
# Installs what is missing with apt-get (needs root or sudo): rustc-web, cargo-web and
# the target's libstd-rust-web-dev, gcc-<triple>, libc6-dev-<arch>-cross.
#
# armv7: Debian 12 has rustc-web 1.96 (bookworm-security) with its std for amd64 and
# arm64, but the armhf std there is older (1.85), and a std must come from the very
# compiler that uses it. When the armhf std of the installed rustc-web's version is not
# to be had, std is compiled from Debian's own source of that compiler (rust-web-src)
# with Cargo's build-std (RUSTC_BOOTSTRAP=1: the same 1.96 compiler, not a nightly).
#
# Environment:
#   VOITHER_GATEWAY_FEATURES   gateway features beyond the defaults (default: sensors)
#   VOITHER_CROSS_PROFILE      Cargo profile (default: release-edge; the test command
#                              uses cross-check, which builds fastest)
#   VOITHER_CROSS_X86_64_FROM  a folder holding x86_64 voither-gateway and voither-hub
#                              already built on this host (the test command passes its
#                              own target/debug): x86_64 is then stripped from there
#                              instead of built again
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=cross/lib.sh
. cross/lib.sh

# strip_into TARGET FROM OUT: stripped copies of both binaries from FROM in OUT (each
# written beside, then renamed, never over a file a running process may hold).
strip_into() {
  local b
  for b in voither-gateway voither-hub; do
    "$(strip_of "$1")" -o "$3/$b.tmp" "$2/$b"
    mv "$3/$b.tmp" "$3/$b"
  done
}

prepare=0
if [ "${1:-}" = --prepare ]; then
  prepare=1
  shift
fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(x86_64 aarch64 armv7)
features=${VOITHER_GATEWAY_FEATURES-sensors}
profile=${VOITHER_CROSS_PROFILE:-release-edge}
x86_64_from=${VOITHER_CROSS_X86_64_FROM:-}

step_begin "apt: Debian's Rust"
need_pkgs=()
have_cmd /usr/bin/rustc || need_pkgs+=(rustc-web)
have_cmd /usr/bin/cargo || need_pkgs+=(cargo-web)
have_cmd x86_64-linux-gnu-gcc || need_pkgs+=(gcc)
[ ${#need_pkgs[@]} -eq 0 ] || apt_install "${need_pkgs[@]}"
rust_version=$(dpkg-query -W -f '${Version}' rustc-web)
echo "    rustc-web $rust_version: $(/usr/bin/rustc --version), $(/usr/bin/cargo --version)"
step_end

for t in "${targets[@]}"; do
  triple=$(triple_of "$t")
  arch=$(deb_arch_of "$t")
  step_begin "$t: toolchain ($triple)"
  pkgs=()
  if [ "$arch" != amd64 ]; then
    gnu=$(gnu_of "$t")
    have_cmd "$gnu-gcc" || pkgs+=("gcc-$gnu")
    [ -e "/usr/$gnu/lib/libc.so" ] || pkgs+=("libc6-dev-$arch-cross")
  fi
  if [ ! -d "/usr/lib/rustlib/$triple/lib" ]; then
    add_arch "$arch"
    apt_update
    # The target std only when it is of the installed compiler's version.
    cand=$(apt-cache policy "libstd-rust-web-dev:$arch" | sed -n 's/ *Candidate: //p')
    if [ "$cand" = "$rust_version" ]; then
      pkgs+=("libstd-rust-web-dev:$arch=$rust_version")
    else
      echo "    libstd-rust-web-dev:$arch is ${cand:-missing}, rustc-web is $rust_version: std is built from rust-web-src"
      [ -f /usr/lib/rustlib/src/rust/library/Cargo.lock ] || pkgs+=("rust-web-src=$rust_version")
    fi
  fi
  [ ${#pkgs[@]} -eq 0 ] || apt_install "${pkgs[@]}"
  step_end
  [ "$prepare" = 0 ] || continue

  out=$cross_out/$triple
  mkdir -p "$out"
  if [ "$arch" = amd64 ] && [ -n "$x86_64_from" ]; then
    step_begin "$t: strip the host's own build from $x86_64_from"
    for b in voither-gateway voither-hub; do
      [ -x "$x86_64_from/$b" ] || { echo "FAIL: VOITHER_CROSS_X86_64_FROM: no $x86_64_from/$b" >&2; exit 1; }
    done
    strip_into "$t" "$x86_64_from" "$out"
    step_end
    continue
  fi

  step_begin "$t: cargo build --profile $profile"
  env=(RUSTC=/usr/bin/rustc)
  args=()
  if [ ! -d "/usr/lib/rustlib/$triple/lib" ]; then
    env+=(RUSTC_BOOTSTRAP=1)
    args=("-Zbuild-std=std,panic_unwind")
  fi
  env "${env[@]}" /usr/bin/cargo build --config cross/cargo-config.toml --target "$triple" \
    --profile "$profile" --locked -p voither-gateway -p voither-hub \
    ${features:+--features "voither-gateway/$features"} "${args[@]}"
  # profile release-edge already strips; strip again in case another profile ran.
  strip_into "$t" "$target/$triple/$profile" "$out"
  step_end
done

if [ "$prepare" = 1 ]; then
  echo "OK: toolchains ready for ${targets[*]}"
  exit 0
fi

{
  printf '%-32s %-16s %10s %8s\n' target binary bytes MiB
  for t in "${targets[@]}"; do
    triple=$(triple_of "$t")
    for b in voither-gateway voither-hub; do
      s=$(stat -c %s "$cross_out/$triple/$b")
      printf '%-32s %-16s %10d %8.2f\n' "$triple" "$b" "$s" "$(awk -v s="$s" 'BEGIN { print s / 1048576 }')"
    done
  done
} | tee "$cross_out/sizes.txt"
echo "OK: binaries in $cross_out/<triple>/ (profile $profile, gateway features: ${features:-default})"
