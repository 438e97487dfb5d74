#!/usr/bin/env bash
# Builds multi-arch OCI images of voither-gateway and voither-hub without a container
# engine or daemon, with umoci (Debian's package), FROM scratch: each image holds the
# binary, the shared libraries it loads (and their loader) from the cross sysroot
# (/usr/<gnu triple>) or this host for amd64, /etc/ssl/certs/ca-certificates.crt, a
# minimal /etc/passwd, /etc/group and /etc/nsswitch.conf, the state folder owned by
# uid 10001, and runs as USER 10001:10001.
#
#   cross/image.sh [x86_64|aarch64|armv7 ...]      default: all three
#
# Needs the binaries of cross/build.sh for the same targets. Output, under
# $CARGO_TARGET_DIR/cross (default ./target/cross):
#   oci/voither-gateway, oci/voither-hub      OCI layouts; tag <version> is an image index
#                                             (linux/amd64, linux/arm64, linux/arm/v7),
#                                             tags <version>-<arch> the single images
#   voither-gateway-<version>.oci.tar, …      the index as an oci-archive
#
# The images are named like the Kubernetes manifests name them
# (edge-k8s/base/*: voither/voither-gateway:<version>, voither/voither-hub:<version>);
# the layout's index.json carries that name for containerd (io.containerd.image.name),
# so `k3s ctr images import --all-platforms voither-gateway-<version>.oci.tar` makes
# exactly the image the DaemonSet runs. To a registry:
#   skopeo copy --all oci:target/cross/oci/voither-gateway:0.1.0 \
#     docker://registry.example/voither/voither-gateway:0.1.0
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=cross/lib.sh
. cross/lib.sh

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(x86_64 aarch64 armv7)
version=$(workspace_version)
uid=10001
# Reproducible: file times and the image's creation time are the last commit's.
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)

step_begin "images: tools"
pkgs=()
have_cmd umoci || pkgs+=(umoci)
have_cmd skopeo || pkgs+=(skopeo)
have_cmd jq || pkgs+=(jq)
[ -f /etc/ssl/certs/ca-certificates.crt ] || pkgs+=(ca-certificates)
[ ${#pkgs[@]} -eq 0 ] || apt_install "${pkgs[@]}"
step_end

# copy_with_libs ELF ROOTFS TARGET: the dynamic loader and every NEEDED library,
# transitively, from the target's sysroot into ROOTFS (/lib/<gnu>/, the loader at its
# PT_INTERP path).
copy_with_libs() {
  local elf=$1 rootfs=$2 t=$3 gnu readelf interp sysroot_lib todo=() seen=" " f lib src
  gnu=$(gnu_of "$t")
  readelf=$(readelf_of "$t")
  if [ "$(deb_arch_of "$t")" = "$(dpkg --print-architecture)" ]; then
    sysroot_lib=(/lib/"$gnu" /usr/lib/"$gnu" /lib64 /lib)
  else
    sysroot_lib=(/usr/"$gnu"/lib)
  fi
  interp=$("$readelf" -lW "$elf" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
  [ -n "$interp" ] || { echo "FAIL: $elf has no program interpreter (static?)" >&2; return 1; }
  src=""
  for d in "${sysroot_lib[@]}"; do [ -e "$d/$(basename "$interp")" ] && { src=$d/$(basename "$interp"); break; }; done
  [ -n "$src" ] || { echo "FAIL: loader $interp not found in ${sysroot_lib[*]}" >&2; return 1; }
  install -D -m 0755 "$(readlink -f "$src")" "$rootfs$interp"
  seen+="$(basename "$interp") "
  todo=("$elf")
  while [ ${#todo[@]} -gt 0 ]; do
    f=${todo[0]}
    todo=("${todo[@]:1}")
    for lib in $("$readelf" -dW "$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
      case $seen in *" $lib "*) continue ;; esac
      seen+="$lib "
      src=""
      for d in "${sysroot_lib[@]}"; do [ -e "$d/$lib" ] && { src=$d/$lib; break; }; done
      [ -n "$src" ] || { echo "FAIL: $lib (needed by $f) not found in ${sysroot_lib[*]}" >&2; return 1; }
      install -D -m 0755 "$(readlink -f "$src")" "$rootfs/lib/$gnu/$lib"
      todo+=("$rootfs/lib/$gnu/$lib")
    done
  done
}

# make_rootfs BIN TARGET ROOTFS
make_rootfs() {
  local bin=$1 t=$2 rootfs=$3 triple
  triple=$(triple_of "$t")
  rm -rf "$rootfs"
  mkdir -p "$rootfs"
  install -D -m 0755 "$cross_out/$triple/$bin" "$rootfs/usr/bin/$bin"
  copy_with_libs "$rootfs/usr/bin/$bin" "$rootfs" "$t"
  install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nvoither:x:%d:%d:VOITHER Edge:/var/lib/%s:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n' \
    "$uid" "$uid" "$bin" >"$rootfs/etc/passwd"
  printf 'root:x:0:\nvoither:x:%d:\nnogroup:x:65534:\n' "$uid" >"$rootfs/etc/group"
  # glibc without /etc/nsswitch.conf would try NIS and more; files and DNS are built in.
  printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$rootfs/etc/nsswitch.conf"
  chmod 0644 "$rootfs"/etc/passwd "$rootfs"/etc/group "$rootfs"/etc/nsswitch.conf
  # Mount points of the manifests: config (read-only) and the state folder (the
  # gateway's store / the hub's sink), the latter owned by the image's user.
  install -d -m 0755 "$rootfs/etc/$bin"
  install -d -m 0700 -o "$uid" -g "$uid" "$rootfs/var/lib/$bin"
  install -d -m 1777 "$rootfs/tmp"
  find "$rootfs" -exec touch -h -d "@$epoch" {} +
}

for bin in voither-gateway voither-hub; do
  step_begin "image $bin:$version (${targets[*]})"
  layout=$cross_out/oci/$bin
  rm -rf "$layout"
  mkdir -p "$(dirname "$layout")"
  umoci init --layout "$layout"
  descs=()
  for t in "${targets[@]}"; do
    triple=$(triple_of "$t")
    read -r arch variant <<<"$(oci_platform_of "$t")"
    tag=$version-$arch${variant:-}
    rootfs=$cross_out/rootfs/$bin-$arch${variant:-}
    make_rootfs "$bin" "$t" "$rootfs"
    umoci new --image "$layout:$tag"
    umoci insert --image "$layout:$tag" --history.created "$created" \
      --history.created_by "cross/image.sh: $bin for $triple" "$rootfs" /
    umoci config --image "$layout:$tag" --created "$created" --history.created "$created" \
      --architecture "$arch" --os linux \
      --config.user "$uid:$uid" \
      --config.entrypoint "/usr/bin/$bin" \
      --config.cmd run --config.cmd --config --config.cmd "/etc/$bin/${bin#voither-}.toml" \
      --config.env PATH=/usr/bin \
      --config.env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
      --config.workingdir / \
      --config.label "org.opencontainers.image.title=$bin" \
      --config.label "org.opencontainers.image.version=$version" \
      --config.label "org.opencontainers.image.licenses=Apache-2.0"
    umoci gc --layout "$layout"
    # The single image's descriptor, with its platform, for the index.
    descs+=("$(jq -c --arg tag "$tag" --arg arch "$arch" --arg variant "${variant:-}" '
      .manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $tag)
      | del(.annotations)
      | .platform = ({architecture: $arch, os: "linux"} + (if $variant == "" then {} else {variant: $variant} end))
    ' "$layout/index.json")")
  done
  # The image index (what `docker manifest create` would make), tagged <version>.
  index=$(printf '%s\n' "${descs[@]}" | jq -cs '{schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json", manifests: .}')
  digest=$(printf '%s' "$index" | sha256sum | cut -d' ' -f1)
  printf '%s' "$index" >"$layout/blobs/sha256/$digest"
  jq --arg digest "sha256:$digest" --argjson size "${#index}" --arg tag "$version" \
    --arg name "docker.io/voither/$bin:$version" '
    .manifests += [{
      mediaType: "application/vnd.oci.image.index.v1+json", digest: $digest, size: $size,
      annotations: {"org.opencontainers.image.ref.name": $tag, "io.containerd.image.name": $name}
    }]' "$layout/index.json" >"$layout/index.json.new"
  mv "$layout/index.json.new" "$layout/index.json"
  rm -f "$cross_out/$bin-$version.oci.tar"
  skopeo copy -q --all "oci:$layout:$version" "oci-archive:$cross_out/$bin-$version.oci.tar:voither/$bin:$version"
  echo "    oci:$layout:$version: $(skopeo inspect --raw "oci:$layout:$version" |
    jq -r '[.manifests[].platform | "\(.os)/\(.architecture)\(if .variant then "/" + .variant else "" end)"] | join(", ")')"
  echo "    $cross_out/$bin-$version.oci.tar: $(du -h "$cross_out/$bin-$version.oci.tar" | cut -f1)"
  step_end
done
echo "OK: images voither/voither-gateway:$version and voither/voither-hub:$version in $cross_out/oci/"
