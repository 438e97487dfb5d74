#!/usr/bin/env bash
# What the test command runs for cross/: builds the aarch64 binaries, runs the
# end-to-end sync with the aarch64 gateway under qemu-user against the x86_64 hub
# (tests/tests/cross_aarch64.rs), builds the OCI image index and checks it, builds the
# .deb files and installs them into a scratch root, and checks that the Kubernetes
# manifests name the images this makes.
#
#   cross/check.sh           aarch64 only (what scripts/test.sh runs)
#   cross/check.sh --all     x86_64, aarch64 and armv7: the full image index
#                            (linux/amd64, linux/arm64, linux/arm/v7) and every .deb
#
# VOITHER_CROSS_SKIP_BUILD=1 checks the binaries already in $CARGO_TARGET_DIR/cross/
# without running cross/build.sh.
#
# Installs what it needs with apt-get (mosquitto for the test, qemu-user-static, the
# cross toolchain, umoci, skopeo). Honors CARGO_TARGET_DIR. Prints the seconds of each
# step at the end ($CARGO_TARGET_DIR/cross/timings.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=cross/lib.sh
. cross/lib.sh

targets=(aarch64)
if [ "${1:-}" = --all ]; then
  targets=(x86_64 aarch64 armv7)
elif [ $# -gt 0 ]; then
  echo "usage: cross/check.sh [--all]" >&2
  exit 64
fi
version=$(workspace_version)
: >"$cross_out/timings.txt"
t_start=$(date +%s)

# ---------------------------------------------------------------------------------
if [ "${VOITHER_CROSS_SKIP_BUILD:-0}" = 1 ]; then
  for t in "${targets[@]}"; do
    for b in voither-gateway voither-hub; do
      [ -x "$cross_out/$(triple_of "$t")/$b" ] || { echo "FAIL: no $cross_out/$(triple_of "$t")/$b: run cross/build.sh $t"; exit 1; }
    done
  done
else
  cross/build.sh "${targets[@]}"
fi

# ---------------------------------------------------------------------------------
step_begin "e2e: aarch64 gateway under qemu-user, x86_64 hub (tests/tests/cross_aarch64.rs)"
pkgs=()
have_cmd qemu-aarch64-static || pkgs+=(qemu-user-static)
have_cmd mosquitto || [ -x /usr/sbin/mosquitto ] || pkgs+=(mosquitto)
[ ${#pkgs[@]} -eq 0 ] || apt_install "${pkgs[@]}"
# The hub, the PKI tool and the test itself are the host's ordinary debug build, built
# for the whole workspace as the test command builds it (selecting one package with -p
# would unify features differently and compile the dependencies again).
cargo build --locked --quiet --workspace --bins
VOITHER_CROSS_GATEWAY=$cross_out/aarch64-unknown-linux-gnu/voither-gateway \
  cargo test --locked --quiet --workspace --test cross_aarch64 -- --ignored --test-threads=1
step_end

# ---------------------------------------------------------------------------------
cross/image.sh "${targets[@]}"

step_begin "images: check the index, the platforms, the user and the contents"
want=$(for t in "${targets[@]}"; do
  read -r a v <<<"$(oci_platform_of "$t")"
  echo "linux/$a${v:+/$v}"
done | sort | paste -sd' ')
for bin in voither-gateway voither-hub; do
  ref="oci:$cross_out/oci/$bin:$version"
  raw=$(skopeo inspect --raw "$ref")
  media=$(jq -r .mediaType <<<"$raw")
  [ "$media" = application/vnd.oci.image.index.v1+json ] || { echo "FAIL: $ref is $media, not an image index"; exit 1; }
  got=$(jq -r '.manifests[].platform | "\(.os)/\(.architecture)\(if .variant then "/" + .variant else "" end)"' <<<"$raw" | sort | paste -sd' ')
  [ "$got" = "$want" ] || { echo "FAIL: $ref platforms are [$got], expected [$want]"; exit 1; }
  echo "    skopeo inspect --raw $ref: $(jq -c '[.manifests[] | {platform, digest: .digest[0:19]}]' <<<"$raw")"
  # The archive holds the same index.
  araw=$(skopeo inspect --raw "oci-archive:$cross_out/$bin-$version.oci.tar")
  [ "$(jq -S . <<<"$araw")" = "$(jq -S . <<<"$raw")" ] || { echo "FAIL: $bin-$version.oci.tar holds another index"; exit 1; }
  for t in "${targets[@]}"; do
    read -r a v <<<"$(oci_platform_of "$t")"
    cfg=$(skopeo inspect --config --override-os linux --override-arch "$a" ${v:+--override-variant "$v"} "$ref")
    user=$(jq -r .config.User <<<"$cfg")
    carch=$(jq -r .architecture <<<"$cfg")
    entry=$(jq -r '.config.Entrypoint | join(" ")' <<<"$cfg")
    [ "$user" = 10001:10001 ] || { echo "FAIL: $bin ($a) runs as '$user', not 10001:10001"; exit 1; }
    [ "$carch" = "$a" ] || { echo "FAIL: $bin ($a) config says architecture $carch"; exit 1; }
    [ "$entry" = "/usr/bin/$bin" ] || { echo "FAIL: $bin ($a) entrypoint is '$entry'"; exit 1; }
    # Unpack the single image and run the binary in it as uid 10001, chrooted, so it
    # can reach nothing outside the image: the loader, glibc and libgcc_s it needs are
    # in the image (a foreign binary runs through a static qemu copied in for the
    # check only).
    bundle=$cross_out/unpacked/$bin-$a${v:-}
    rm -rf "$bundle"
    umoci unpack --image "$cross_out/oci/$bin:$version-$a${v:-}" "$bundle" >/dev/null
    rootfs=$bundle/rootfs
    files=$(cd "$rootfs" && find . -type f | sort | paste -sd' ')
    run=()
    case $a in
      amd64) ;;
      arm64) run=(/.qemu-aarch64-static) ;;
      arm) run=(/.qemu-arm-static) ;;
    esac
    if [ ${#run[@]} -gt 0 ]; then
      have_cmd "${run[0]#/.}" || apt_install qemu-user-static
      cp "$(command -v "${run[0]#/.}")" "$rootfs${run[0]}"
    fi
    out=$(chroot --userspec=10001:10001 "$rootfs" "${run[@]}" "/usr/bin/$bin" --version 2>&1) ||
      { echo "FAIL: $bin ($a) does not run in its image: $out"; echo "    files: $files"; exit 1; }
    [[ $out == *"$version"* ]] || { echo "FAIL: $bin ($a) --version in the image printed: $out"; exit 1; }
    echo "    $bin linux/$a${v:+/$v}: user $user, runs in the image ($out); files: $files"
    rm -rf "$bundle"
  done
done
step_end

# ---------------------------------------------------------------------------------
echo "==> Kubernetes manifests name the images this makes"
for bin in voither-gateway voither-hub; do
  hits=$(grep -rhoE "image: *voither/$bin(:[^ ]*)?" edge-k8s | sed 's/image: *//' | sort -u)
  [ "$hits" = "voither/$bin:$version" ] || { echo "FAIL: edge-k8s names [$hits], the image is voither/$bin:$version"; exit 1; }
  # kustomize `images:` entries pin the tag the overlays render.
  tags=$(grep -rh -A2 -E "name: *voither/$bin *$" edge-k8s --include=kustomization.yaml | sed -n 's/.*newTag: *//p' | sort -u)
  [ -z "$tags" ] || [ "$tags" = "$version" ] || { echo "FAIL: edge-k8s overlays set tag(s) [$tags] for $bin, the image is $version"; exit 1; }
  echo "    voither/$bin:$version: $(grep -rlE "image: *voither/$bin:" edge-k8s | paste -sd' ')"
done

# ---------------------------------------------------------------------------------
cross/deb.sh "${targets[@]}"

step_begin ".deb: contents, install into a scratch root, systemd-analyze verify"
have_cmd systemd-analyze || apt_install systemd
for t in "${targets[@]}"; do
  arch=$(deb_arch_of "$t")
  triple=$(triple_of "$t")
  root=$cross_out/deb-root-$arch
  rm -rf "$root"
  # A merged-/usr root like Debian 12's, with an empty dpkg database that accepts
  # packages of every architecture checked here.
  mkdir -p "$root"/usr/{bin,sbin,lib} "$root"/etc "$root"/var/lib/dpkg/{info,updates,triggers} "$root"/usr/lib/systemd
  ln -s usr/bin "$root/bin"
  ln -s usr/sbin "$root/sbin"
  ln -s usr/lib "$root/lib"
  : >"$root/var/lib/dpkg/status"
  printf '%s\n' amd64 arm64 armhf >"$root/var/lib/dpkg/arch"
  # The host's system units, so that verify resolves network-online.target & co.
  cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
  for bin in voither-gateway voither-hub; do
    short=${bin#voither-}
    deb=$cross_out/deb/${bin}_${version}_$arch.deb
    [ "$(dpkg-deb -f "$deb" Package Architecture | paste -sd' ')" = "Package: $bin Architecture: $arch" ] ||
      { echo "FAIL: $deb control: $(dpkg-deb -f "$deb")"; exit 1; }
    list=$(dpkg-deb -c "$deb" | awk '{ print $1, $2, $6 }')
    for want in "-rwxr-xr-x root/root ./usr/bin/$bin" \
      "-rw-r--r-- root/root ./lib/systemd/system/$bin.service" \
      "-rw-r--r-- root/root ./etc/$bin/$short.toml" \
      "-rw-r--r-- root/root ./usr/lib/sysusers.d/$bin.conf"; do
      grep -qxF -- "$want" <<<"$list" || { echo "FAIL: $deb lacks '$want':"; echo "$list"; exit 1; }
    done
    [ "$(dpkg-deb -I "$deb" conffiles)" = "/etc/$bin/$short.toml" ] || { echo "FAIL: $deb conffiles"; exit 1; }
    # Dependencies (libc6, libgcc-s1) are not in the scratch root; maintainer scripts
    # run without chroot with DPKG_ROOT set, as for any `dpkg --root` bootstrap.
    dpkg --root="$root" --force-script-chrootless --force-depends -i "$deb" >"$cross_out/dpkg-$bin-$arch.log" 2>&1 ||
      { cat "$cross_out/dpkg-$bin-$arch.log"; echo "FAIL: dpkg --root -i $deb"; exit 1; }
    dpkg --root="$root" -s "$bin" | grep -qx 'Status: install ok installed' || { echo "FAIL: $bin not installed"; exit 1; }
    cmp "$root/usr/bin/$bin" "$cross_out/$triple/$bin"
    cmp "$root/lib/systemd/system/$bin.service" "systemd/$bin.service"
    cmp "$root/etc/$bin/$short.toml" "systemd/$short.toml"
    grep -q "^$bin:x:[0-9]*:[0-9]*:VOITHER Edge $short:/var/lib/$bin:" "$root/etc/passwd" ||
      { echo "FAIL: postinst made no system user $bin:"; cat "$root/etc/passwd"; exit 1; }
  done
  out=$(systemd-analyze verify --root="$root" voither-gateway.service voither-hub.service 2>&1) ||
    { echo "$out"; echo "FAIL: systemd-analyze verify (installed units, $arch)"; exit 1; }
  [ -z "$out" ] || { echo "$out"; echo "FAIL: systemd-analyze verify printed the messages above ($arch)"; exit 1; }
  # Remove keeps the conffile, purge takes it.
  dpkg --root="$root" --force-script-chrootless -r voither-gateway >/dev/null
  if [ -e "$root/usr/bin/voither-gateway" ] || [ ! -f "$root/etc/voither-gateway/gateway.toml" ]; then
    echo "FAIL: dpkg -r voither-gateway ($arch)"
    exit 1
  fi
  dpkg --root="$root" --force-script-chrootless -P voither-gateway >/dev/null
  [ ! -e "$root/etc/voither-gateway/gateway.toml" ] || { echo "FAIL: dpkg -P kept the conffile ($arch)"; exit 1; }
  echo "    ${arch}: both packages install (files, conffile, system users), units verify, remove/purge clean"
done
step_end

echo "==> seconds per step"
cat "$cross_out/timings.txt"
echo "OK: cross/ checked for ${targets[*]} in $(($(date +%s) - t_start)) s"
