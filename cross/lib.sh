# shellcheck shell=bash
# Shared by the cross/ scripts (sourced, not run). Expects to be in the repository root.

# The Cargo target folder and, inside it, everything cross/ makes.
target=${CARGO_TARGET_DIR:-$PWD/target}
[[ $target = /* ]] || target=$PWD/$target
cross_out=$target/cross
mkdir -p "$cross_out"

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

have_cmd() { command -v "$1" >/dev/null 2>&1; }

apt_updated=""
apt_update() { # once, and again after an architecture was added
  if [ -z "$apt_updated" ]; then
    $SUDO apt-get update -qq
    apt_updated=1
  fi
}
apt_install() { # packages...: installs them from Debian's archive
  echo "    apt-get install $*"
  apt_update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

add_arch() { # dpkg architecture: lets apt install its packages (the target std)
  [ "$1" = "$(dpkg --print-architecture)" ] && return 0
  if ! dpkg --print-foreign-architectures | grep -qx "$1"; then
    echo "    dpkg --add-architecture $1"
    $SUDO dpkg --add-architecture "$1"
    apt_updated=""
  fi
}

triple_of() { # x86_64|aarch64|armv7 (or a triple) -> Rust target triple
  case $1 in
    x86_64 | amd64 | x86_64-unknown-linux-gnu) echo x86_64-unknown-linux-gnu ;;
    aarch64 | arm64 | aarch64-unknown-linux-gnu) echo aarch64-unknown-linux-gnu ;;
    armv7 | armhf | arm | armv7-unknown-linux-gnueabihf) echo armv7-unknown-linux-gnueabihf ;;
    *) echo "unknown target $1 (x86_64, aarch64, armv7)" >&2; return 1 ;;
  esac
}
deb_arch_of() { # -> Debian architecture
  case $(triple_of "$1") in
    x86_64-*) echo amd64 ;; aarch64-*) echo arm64 ;; armv7-*) echo armhf ;;
  esac
}
gnu_of() { # -> GNU triple of Debian's cross tools and sysroot (/usr/<gnu>)
  case $(triple_of "$1") in
    x86_64-*) echo x86_64-linux-gnu ;; aarch64-*) echo aarch64-linux-gnu ;; armv7-*) echo arm-linux-gnueabihf ;;
  esac
}
oci_platform_of() { # -> OCI architecture and variant ("arm v7")
  case $(triple_of "$1") in
    x86_64-*) echo amd64 ;; aarch64-*) echo arm64 ;; armv7-*) echo "arm v7" ;;
  esac
}
strip_of() { echo "$(gnu_of "$1")-strip"; }
readelf_of() { echo "$(gnu_of "$1")-readelf"; }

# The version of the workspace ([workspace.package] version in Cargo.toml).
workspace_version() {
  awk '/^\[workspace.package\]/ { p = 1; next } /^\[/ { p = 0 } p && /^version *=/ { gsub(/[" ]/, ""); sub(/version=/, ""); print; exit }' Cargo.toml
}

# Step timings: step_begin NAME ... step_end appends "seconds  NAME" to timings.txt.
_step_name="" _step_t0=0
step_begin() {
  _step_name=$1
  _step_t0=$(date +%s.%N)
  echo "==> $1"
}
step_end() {
  local s
  s=$(awk -v a="$_step_t0" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
  printf '%8.1f s  %s\n' "$s" "$_step_name" | tee -a "$cross_out/timings.txt"
}
