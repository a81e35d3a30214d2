#!/usr/bin/env bash
# deploy/build-image.sh — builds the k3sense image without Docker: a static binary per platform,
# cross-compiled with cargo-zigbuild, in an OCI image assembled with buildah FROM scratch.
#
#   deploy/build-image.sh [--platform LIST] [--image NAME:TAG] [--output FILE.tar] [--push REF [--insecure]]
#                         [--reuse-binaries]
#
#   --platform LIST   comma-separated: linux/amd64, linux/arm64, linux/arm/v7, or `all` (default: all)
#   --image NAME:TAG  the name in the local image store (default ghcr.io/k3sense/k3sense:<Cargo version>,
#                     the name the manifests in deploy/base use)
#   --output FILE.tar write an OCI archive: `sudo k3s ctr images import FILE.tar` and `podman load -i FILE.tar`
#                     take it. One platform: a single image; several: a multi-arch image index.
#   --push REF        push to a registry (docker://REF; log in first with `buildah login`)
#   --insecure        with --push: a registry without TLS (e.g. a LAN registry on http://pi:5000)
#   --reuse-binaries  do not compile: take target/image/<os-arch>/rootfs from an earlier run (e.g. to put
#                     platforms built one at a time, or on several machines, into one archive)
#
# Results, all in the local (buildah/podman) image store and under target/image/:
#   NAME:TAG-<arch>            one single-platform image per platform (arch: amd64, arm64, armv7)
#   NAME:TAG                   that image itself when one platform was built; the manifest list otherwise
#   target/image/<os-arch>/    the binary (k3sense) and the image's root filesystem (rootfs/)
#
# Needs: cargo + rustup, cargo-zigbuild and zig (`pip install ziglang cargo-zigbuild`), buildah,
# readelf (binutils), jq. linux/arm/v7 also needs the nightly toolchain with rust-src (installed on demand).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
platforms_sh="$here/platforms.sh"
cd "$root"

say() { printf '==> %s\n' "$*"; }
die() {
  printf 'build-image.sh: %s\n' "$*" >&2
  exit 1
}
usage() {
  sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

version=$(sed -n '/^\[workspace.package\]/,/^\[/ s/^version = "\(.*\)"/\1/p' Cargo.toml)
[[ -n $version ]] || die "cannot read the version from Cargo.toml's [workspace.package]"

platform_arg=all
image="ghcr.io/k3sense/k3sense:$version"
output=""
push=""
insecure=false
reuse=false
while (($#)); do
  case "$1" in
    --platform) platform_arg=${2:?--platform needs a value}; shift 2 ;;
    --platform=*) platform_arg=${1#*=}; shift ;;
    --image) image=${2:?--image needs a value}; shift 2 ;;
    --image=*) image=${1#*=}; shift ;;
    --output) output=${2:?--output needs a file name}; shift 2 ;;
    --output=*) output=${1#*=}; shift ;;
    --push) push=${2:?--push needs REGISTRY/NAME:TAG}; shift 2 ;;
    --push=*) push=${1#*=}; shift ;;
    --insecure) insecure=true; shift ;;
    --reuse-binaries) reuse=true; shift ;;
    -h | --help) usage ;;
    *) printf 'build-image.sh: unknown argument %s\n\n' "$1" >&2; usage ;;
  esac
done

# The last path component must carry a tag: the per-platform images are tagged <TAG>-<arch>.
[[ $image == */* && ${image##*/} =~ ^[a-z0-9._-]+:[A-Za-z0-9_][A-Za-z0-9_.-]*$ ]] ||
  die "--image must be HOST/PATH:TAG, e.g. ghcr.io/k3sense/k3sense:$version or localhost/k3sense:dev (got '$image')"

platforms=()
if [[ $platform_arg == all ]]; then
  mapfile -t platforms < <(sh "$platforms_sh" list)
else
  IFS=, read -r -a platforms <<<"$platform_arg"
fi
((${#platforms[@]})) || die "no platform given"
for p in "${platforms[@]}"; do
  sh "$platforms_sh" target "$p" >/dev/null || exit 2
done

missing=()
for tool in cargo rustup cargo-zigbuild buildah readelf jq; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
  die "missing: ${missing[*]}
  Debian/Ubuntu: apt-get install buildah binutils jq; pip install ziglang cargo-zigbuild; Rust from https://rustup.rs"
fi
if [[ -n $output ]]; then
  [[ $output == *.tar ]] || die "--output must name a .tar file (got '$output')"
  mkdir -p "$(dirname "$output")"
  output=$(cd "$(dirname "$output")" && pwd)/$(basename "$output")
fi

# Reproducible timestamps: the last commit's time (or now, outside git).
epoch=$(git log -1 --format=%ct 2>/dev/null || date +%s)
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)

say "image $image for ${platforms[*]} (k3sense $version, revision ${revision:0:12})"
if ! $reuse; then
  say "rustup: targets and components for ${platforms[*]}"
  sh "$platforms_sh" setup "${platforms[@]}"
fi

declare -A build_secs binary_bytes layer_bytes image_bytes
for p in "${platforms[@]}"; do
  slug=$(sh "$platforms_sh" slug "$p")
  arch=$(sh "$platforms_sh" arch "$p")
  triple=$(sh "$platforms_sh" target "$p")
  dir="target/image/$slug"
  if $reuse; then
    [[ -x $dir/rootfs/usr/local/bin/k3sense ]] ||
      die "$p: --reuse-binaries, but $dir/rootfs/usr/local/bin/k3sense does not exist"
    say "$p: reusing $dir/rootfs"
    build_secs[$p]=reused
  else
    say "$p: cargo zigbuild --release --target $triple (lto=fat, codegen-units=1: minutes per target)"
    start=$SECONDS
    SOURCE_DATE_EPOCH=$epoch sh "$platforms_sh" rootfs "$p" "$dir/rootfs"
    build_secs[$p]=$((SECONDS - start))
  fi
  cp "$dir/rootfs/usr/local/bin/k3sense" "$dir/k3sense"
  # A static executable has no program interpreter and no shared-library dependency.
  if readelf -lW "$dir/k3sense" | grep -q 'program interpreter' || readelf -dW "$dir/k3sense" | grep -q '(NEEDED)'; then
    die "$p: $dir/k3sense is dynamically linked; a FROM-scratch image cannot run it"
  fi
  binary_bytes[$p]=$(stat -c %s "$dir/k3sense")
  image_bytes[$p]=$(du -sb --apparent-size "$dir/rootfs" | cut -f1)
  say "$p: static binary $dir/k3sense, ${binary_bytes[$p]} bytes (build: ${build_secs[$p]} s)"

  rootfs="$dir/rootfs"
  os=${p%%/*}
  rest=${p#*/}
  cpu=${rest%%/*}
  variant=""
  [[ $rest == */* ]] && variant=${rest#*/}
  ctr=$(buildah from --os "$os" --arch "$cpu" ${variant:+--variant "$variant"} scratch)
  buildah copy --quiet --chown 0:0 "$ctr" "$rootfs" / >/dev/null
  buildah config \
    --os "$os" --arch "$cpu" ${variant:+--variant "$variant"} \
    --user 65532:65532 \
    --workingdir / \
    --entrypoint '["/usr/local/bin/k3sense"]' \
    --cmd '["all"]' \
    --port 1883/tcp --port 8080/tcp --port 9101/tcp \
    --label org.opencontainers.image.title=k3sense \
    --label "org.opencontainers.image.description=Live DHT11/DHT22 readings from a Raspberry Pi k3s cluster: MQTT broker, sensor publisher and web gateway in one binary" \
    --label org.opencontainers.image.source=https://github.com/k3sense/k3sense \
    --label org.opencontainers.image.licenses=Apache-2.0 \
    --label "org.opencontainers.image.version=$version" \
    --label "org.opencontainers.image.revision=$revision" \
    "$ctr"
  buildah commit --quiet --rm --format oci --timestamp "$epoch" "$ctr" "$image-$arch" >/dev/null
  say "$p: image $image-$arch"
done

# NAME:TAG: the one image, or a manifest list of all of them. An earlier build's list or image of
# the same name is removed first (the per-platform images above are kept).
buildah manifest rm "$image" >/dev/null 2>&1 || buildah rmi "$image" >/dev/null 2>&1 || true
if ((${#platforms[@]} == 1)); then
  arch=$(sh "$platforms_sh" arch "${platforms[0]}")
  buildah tag "$image-$arch" "$image"
  say "$image is the ${platforms[0]} image"
else
  buildah manifest create "$image" >/dev/null
  for p in "${platforms[@]}"; do
    arch=$(sh "$platforms_sh" arch "$p")
    buildah manifest add "$image" "containers-storage:$image-$arch" >/dev/null
  done
  say "$image is a manifest list of ${platforms[*]}"
fi

# Sizes as a registry or `ctr images import` sees them: the gzip-compressed layer of each platform.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for p in "${platforms[@]}"; do
  arch=$(sh "$platforms_sh" arch "$p")
  buildah push --quiet --format oci "$image-$arch" "oci:$work/$arch:$arch" >/dev/null
  manifest_digest=$(jq -r '.manifests[0].digest' "$work/$arch/index.json")
  layer_bytes[$p]=$(jq '[.layers[].size] | add' "$work/$arch/blobs/sha256/${manifest_digest#sha256:}")
done

push_all() { # SOURCE DESTINATION
  if ((${#platforms[@]} == 1)); then
    buildah push --format oci "$@"
  else
    buildah manifest push --all --format oci "$@"
  fi
}

if [[ -n $output ]]; then
  say "writing $output (OCI archive, $([[ ${#platforms[@]} == 1 ]] && echo "one image" || echo "image index of ${#platforms[@]} platforms"))"
  rm -f "$output"
  push_all --quiet "$image" "oci-archive:$output:$image" >/dev/null
fi
if [[ -n $push ]]; then
  say "pushing $image to docker://$push"
  tls=()
  $insecure && tls=(--tls-verify=false)
  push_all "${tls[@]}" "$image" "docker://$push"
fi

mb() { awk -v b="$1" 'BEGIN { printf "%.1f MB", b / 1000000 }'; }
echo
printf '%-14s %10s %12s %16s %18s\n' platform "build (s)" binary "image (layer)" "image (unpacked)"
for p in "${platforms[@]}"; do
  printf '%-14s %10s %12s %16s %18s\n' "$p" "${build_secs[$p]}" "$(mb "${binary_bytes[$p]}")" \
    "$(mb "${layer_bytes[$p]}")" "$(mb "${image_bytes[$p]}")"
done
[[ -n $output ]] && printf '%s: %s\n' "$output" "$(mb "$(stat -c %s "$output")")"
say "done: $image"
