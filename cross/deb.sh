#!/usr/bin/env bash
# Builds a .deb of voither-gateway and one of voither-hub for each target, with
# dpkg-deb and hand-written control files (no debhelper, no cargo-deb: the binaries
# come from cross/build.sh, which already built and stripped them).
#
#   cross/deb.sh [x86_64|aarch64|armv7 ...]      default: all three
#
# Output: $CARGO_TARGET_DIR/cross/deb/<binary>_<version>_<arch>.deb (default ./target).
#
# Each package holds:
#   /usr/bin/<binary>
#   /lib/systemd/system/<binary>.service         systemd/<binary>.service, unchanged
#   /etc/<binary>/<gateway|hub>.toml              systemd/<…>.toml, a conffile
#   /usr/lib/sysusers.d/<binary>.conf             the system user <binary>
#   /usr/share/doc/<binary>/                      copyright, README.md (the gateway
#                                                 also examples/sensors.conf, the
#                                                 I2C drop-in)
# The units run with DynamicUser=yes. systemd uses a static user of the unit's name
# when one exists instead of allocating a dynamic one, so the package's system user
# (made by systemd-sysusers in postinst, or adduser where systemd is absent) gives the
# service a stable, named uid for its state folder across reinstalls, with the same
# sandbox. postinst only reloads systemd: the service needs its certificates in
# /etc/<binary>/pki/ first (see the unit's header), so it is not enabled or started.
# Removing the package stops the service; purging it keeps the state folder
# (/var/lib/private/<binary>: records not yet synced), which the operator removes.
#
# VOITHER_DEB_XZ_LEVEL: xz level of the packages (default 6, dpkg-deb's own; the test
# command uses 1, since its packages are only installed into scratch roots).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=cross/lib.sh
. cross/lib.sh

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(x86_64 aarch64 armv7)
version=$(workspace_version)
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
export SOURCE_DATE_EPOCH=$epoch
debs=$cross_out/deb
mkdir -p "$debs"

step_begin ".deb: tools"
have_cmd dpkg-deb || apt_install dpkg
step_end

# depends ELF TARGET: the Depends: line from the ELF's NEEDED libraries and the newest
# symbol versions it asks of them.
depends() {
  local elf=$1 t=$2 readelf glibc gcc deps
  readelf=$(readelf_of "$t")
  glibc=$("$readelf" -VW "$elf" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
  deps="libc6 (>= ${glibc:-2.36})"
  if "$readelf" -dW "$elf" | grep -q 'NEEDED.*\[libgcc_s\.so\.1\]'; then
    gcc=$("$readelf" -VW "$elf" | grep -o 'GCC_[0-9][0-9.]*' | sed 's/GCC_//' | sort -uV | tail -1)
    deps+=", libgcc-s1 (>= ${gcc:-3.0})"
  fi
  echo "$deps"
}

for t in "${targets[@]}"; do
  triple=$(triple_of "$t")
  arch=$(deb_arch_of "$t")
  step_begin ".deb for $arch"
  for bin in voither-gateway voither-hub; do
    short=${bin#voither-}
    case $bin in
      voither-gateway) what="the edge agent: MQTT ingest, durable store, QUIC uplink"
        long=" Subscribes to an MQTT broker (or runs its own), writes every message durably
 to a local store before acknowledging it, and syncs the records to a voither-hub
 over QUIC with mutual TLS, deleting them only once the hub has them." ;;
      voither-hub) what="the central sync endpoint for VOITHER Edge gateways"
        long=" Accepts gateways over QUIC with mutual TLS, stores their records in its
 sink exactly once and acknowledges them after its durable commit." ;;
    esac
    pkg=$cross_out/deb-build/${bin}_$arch
    rm -rf "$pkg"
    install -D -m 0755 "$cross_out/$triple/$bin" "$pkg/usr/bin/$bin"
    install -D -m 0644 "systemd/$bin.service" "$pkg/lib/systemd/system/$bin.service"
    install -D -m 0644 "systemd/$short.toml" "$pkg/etc/$bin/$short.toml"
    install -d -m 0755 "$pkg/usr/lib/sysusers.d"
    printf '# The system user of %s.service (DynamicUser=yes uses it when it exists).\nu %s - "VOITHER Edge %s" /var/lib/%s\n' \
      "$bin" "$bin" "$short" "$bin" >"$pkg/usr/lib/sysusers.d/$bin.conf"
    install -D -m 0644 README.md "$pkg/usr/share/doc/$bin/README.md"
    if [ "$bin" = voither-gateway ]; then
      install -D -m 0644 systemd/voither-gateway-sensors.conf "$pkg/usr/share/doc/$bin/examples/sensors.conf"
    fi
    cat >"$pkg/usr/share/doc/$bin/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: VOITHER Edge
Source: $(awk -F'"' '/^repository *=/ { print $2; exit }' Cargo.toml)

Files: *
Copyright: VOITHER Edge authors
License: Apache-2.0
 On Debian systems, the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
EOF
    chmod 0644 "$pkg/usr/share/doc/$bin/copyright"

    mkdir -p "$pkg/DEBIAN"
    cat >"$pkg/DEBIAN/control" <<EOF
Package: $bin
Version: $version
Architecture: $arch
Maintainer: VOITHER Edge <edge@example.invalid>
Installed-Size: $(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
Depends: $(depends "$pkg/usr/bin/$bin" "$t")
Recommends: systemd
Section: net
Priority: optional
Homepage: $(awk -F'"' '/^repository *=/ { print $2; exit }' Cargo.toml)
Description: VOITHER Edge: $what
$long
EOF
    echo "/etc/$bin/$short.toml" >"$pkg/DEBIAN/conffiles"
    cat >"$pkg/DEBIAN/postinst" <<EOF
#!/bin/sh
# DPKG_ROOT is set when dpkg installs into another root (dpkg --root, chrootless).
set -e
if [ "\$1" = configure ]; then
  if command -v systemd-sysusers >/dev/null 2>&1; then
    systemd-sysusers \${DPKG_ROOT:+--root="\$DPKG_ROOT"} $bin.conf
  elif [ -z "\${DPKG_ROOT:-}" ] && ! getent passwd $bin >/dev/null; then
    adduser --system --group --no-create-home --home /var/lib/$bin --gecos "VOITHER Edge $short" $bin
  fi
  if [ -z "\${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
    # An upgrade restarts a running service; a first install starts nothing (the
    # service needs /etc/$bin/pki/ first).
    [ -z "\$2" ] || systemctl try-restart $bin.service || true
  fi
fi
exit 0
EOF
    cat >"$pkg/DEBIAN/prerm" <<EOF
#!/bin/sh
set -e
if [ "\$1" = remove ] && [ -z "\${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
  systemctl disable --now $bin.service || true
fi
exit 0
EOF
    cat >"$pkg/DEBIAN/postrm" <<EOF
#!/bin/sh
set -e
if [ -z "\${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload || true
fi
exit 0
EOF
    chmod 0755 "$pkg/DEBIAN/postinst" "$pkg/DEBIAN/prerm" "$pkg/DEBIAN/postrm"
    find "$pkg" -exec touch -h -d "@$epoch" {} +
    out=$debs/${bin}_${version}_$arch.deb
    dpkg-deb --root-owner-group -Zxz "-z${VOITHER_DEB_XZ_LEVEL:-6}" --build "$pkg" "$out" >/dev/null
    echo "    $out: $(du -h "$out" | cut -f1), Depends: $(dpkg-deb -f "$out" Depends)"
  done
  step_end
done
echo "OK: packages in $debs/"
