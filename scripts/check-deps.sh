#!/usr/bin/env bash
# Checks the dependency tree against deny.toml with cargo-deny, installing it when
# missing.
#
#   scripts/check-deps.sh
#   scripts/check-deps.sh --install-only    only install cargo-deny (scripts/test.sh
#                                           does this in the background first)
#
# 1. bans: one crypto provider and one TLS stack (ring through rustls; no aws-lc-rs,
#    OpenSSL, native-tls or BoringSSL), one version of ring and of rustls, no sled,
#    no serde_cbor. Duplicate versions of other crates are warnings, counted here.
# 2. licenses: every crate under a license of the allow-list in deny.toml.
# 3. sources: crates.io only, no git dependencies.
# 4. advisories (RustSec): the database is a git repository on GitHub.
#    - VOITHER_ADVISORY_DB=DIR: a git clone of it (branch main) made elsewhere; the
#      check fetches from that clone instead of GitHub, into cargo-deny's cache
#      (~/.cargo/advisory-dbs), where later runs find it.
#    - otherwise the database is fetched from GitHub. If that fails, a copy fetched
#      earlier is used while it is less than 90 days old. Without one (no route to
#      GitHub, as on the project's build machines), the check is reported as NOT
#      CHECKED and the script still succeeds, unless VOITHER_REQUIRE_ADVISORIES=1.
#
# cargo-deny $CARGO_DENY_VERSION is built from crates.io (`cargo install --locked`) into
# $VOITHER_TOOLS (default ~/.cache/voither-edge/tools), once: 6 to 8 minutes on a busy
# 2-core machine (about 4 minutes of CPU). Later runs take about 2 seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DENY_VERSION=0.20.2
ADVISORY_DB_URL=https://github.com/RustSec/advisory-db

tools=${VOITHER_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/voither-edge/tools}
root=$tools/cargo-deny-$CARGO_DENY_VERSION
deny=$root/bin/cargo-deny

if ! [ -x "$deny" ] || [ "$("$deny" --version 2>/dev/null)" != "cargo-deny $CARGO_DENY_VERSION" ]; then
  echo "==> installing cargo-deny $CARGO_DENY_VERSION into $root (once; several minutes)"
  start=$SECONDS
  CARGO_TARGET_DIR="$tools/build" \
    cargo install --locked --quiet --root "$root" --version "$CARGO_DENY_VERSION" cargo-deny
  rm -rf "$tools/build"
  echo "    built in $((SECONDS - start)) s"
fi
if [ "${1:-}" = --install-only ]; then
  echo "OK: $("$deny" --version) in $root"
  exit 0
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT

# Runs cargo-deny checks ([--offline] CHECK...); prints the findings only when they fail.
run_check() {
  local opts=(--locked --color never)
  if [ "$1" = --offline ]; then
    opts+=(--offline)
    shift
  fi
  if "$deny" "${opts[@]}" check --hide-inclusion-graph "$@" >"$log" 2>&1; then
    local dups
    dups=$(grep -c '^warning\[duplicate\]' "$log" || true)
    echo "    ok: $*"
    if [ "$dups" -gt 0 ]; then
      echo "    warning: $dups crates in more than one version (allowed; list: cargo deny check bans)"
    fi
  else
    cat "$log"
    echo "FAILED: cargo deny check $*" >&2
    exit 1
  fi
}

echo "==> cargo deny check bans licenses sources"
run_check bans licenses sources

echo "==> cargo deny check advisories"
if [ -n "${VOITHER_ADVISORY_DB:-}" ]; then
  db=$(cd "$VOITHER_ADVISORY_DB" && pwd)
  echo "    database: the clone in $db"
  # cargo-deny fetches with the git command line: point its URL at the local clone.
  export GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0="url.file://$db.insteadOf" GIT_CONFIG_VALUE_0="$ADVISORY_DB_URL"
  run_check advisories
elif timeout 120 "$deny" fetch db >"$log" 2>&1; then
  echo "    database: fetched from $ADVISORY_DB_URL"
  run_check advisories
elif compgen -G "${CARGO_HOME:-$HOME/.cargo}/advisory-dbs/advisory-db-*/.git" >/dev/null; then
  # A copy fetched earlier: cargo-deny refuses it once it is older than 90 days.
  echo "    database: cannot fetch; using the copy fetched earlier"
  run_check --offline advisories
else
  echo "    NOT CHECKED: the RustSec advisory database cannot be fetched from here:"
  { grep -m1 '^fatal' "$log" || grep -m1 -E 'error|ERROR' "$log" || true; } | sed 's/^/      /'
  echo "    Set VOITHER_ADVISORY_DB to a clone of $ADVISORY_DB_URL to check advisories."
  if [ "${VOITHER_REQUIRE_ADVISORIES:-0}" = 1 ]; then
    echo "FAILED: VOITHER_REQUIRE_ADVISORIES=1 and no advisory database" >&2
    exit 1
  fi
fi
