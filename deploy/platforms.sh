#!/bin/sh
# deploy/platforms.sh — the one list of image platforms and the one way each k3sense binary is built.
# deploy/build-image.sh, deploy/test-image.sh and deploy/Dockerfile all call it, so a platform is added,
# or a build flag changed, in this file only.
#
#   platforms.sh list                   the platforms, one per line (linux/amd64 …)
#   platforms.sh target PLATFORM        its Rust target triple
#   platforms.sh slug PLATFORM          a name for files and tags: linux/arm/v7 → linux-arm-v7
#   platforms.sh arch PLATFORM          the tag suffix of its single-platform image: amd64, arm64, armv7
#   platforms.sh qemu PLATFORM          the qemu-user-static binary that runs it on another machine
#   platforms.sh setup PLATFORM…        installs what `build` needs with rustup (targets, nightly rust-src)
#   platforms.sh build PLATFORM OUT     builds the static, stripped release binary and copies it to OUT
#   platforms.sh rootfs PLATFORM DIR    builds it into DIR/usr/local/bin/k3sense beside DIR/etc/passwd and
#                                       DIR/etc/group: the image's whole root filesystem
#   platforms.sh pip-requirements       the zig and cargo-zigbuild versions this was tested with (PyPI)
#
# Every platform is a static musl executable cross-compiled with cargo-zigbuild (zig is the C compiler
# and linker; it ships musl for every target). linux/arm/v7 has no prebuilt Rust standard library for
# armv7-unknown-linux-musleabihf on this project's rustup mirror (404), so for it the standard library is
# compiled from source with the nightly toolchain's `-Zbuild-std` (see deploy/README.md, "Building the
# image"). The nightly toolchain is $K3SENSE_NIGHTLY (default: nightly); everything else uses the
# default toolchain. Cargo's output goes to $CARGO_TARGET_DIR (default: target). Plain POSIX sh: the Dockerfile runs it with the build image's /bin/sh.
set -eu

nightly=${K3SENSE_NIGHTLY:-nightly}

# zig and cargo-zigbuild from PyPI, as deploy/Dockerfile and .ci/run install them.
pip_requirements() {
  printf '%s\n' ziglang==0.17.1 cargo-zigbuild==0.24.1
}

usage() {
  sed -n '2,17p' "$0" >&2
  exit 2
}

# platform → target triple; the single source of the list.
target_of() {
  case "$1" in
    linux/amd64) echo x86_64-unknown-linux-musl ;;
    linux/arm64) echo aarch64-unknown-linux-musl ;;
    linux/arm/v7) echo armv7-unknown-linux-musleabihf ;;
    *)
      echo "platforms.sh: unsupported platform '$1' (supported: $(echo $(list)))" >&2
      return 1
      ;;
  esac
}

list() {
  printf '%s\n' linux/amd64 linux/arm64 linux/arm/v7
}

# Platforms whose standard library rustup cannot install: built from source on nightly.
needs_build_std() {
  [ "$1" = linux/arm/v7 ]
}

arch_of() {
  case "$1" in
    linux/amd64) echo amd64 ;;
    linux/arm64) echo arm64 ;;
    linux/arm/v7) echo armv7 ;;
    *) target_of "$1" >/dev/null ;;
  esac
}

qemu_of() {
  case "$1" in
    linux/amd64) echo qemu-x86_64-static ;;
    linux/arm64) echo qemu-aarch64-static ;;
    linux/arm/v7) echo qemu-arm-static ;;
    *) target_of "$1" >/dev/null ;;
  esac
}

setup() {
  for platform in "$@"; do
    triple=$(target_of "$platform")
    if needs_build_std "$platform"; then
      # Install nightly only when it is missing: `rustup toolchain install` would update it.
      if rustup run "$nightly" rustc --version >/dev/null 2>&1; then
        rustup component add rust-src --toolchain "$nightly"
      else
        rustup toolchain install "$nightly" --profile minimal --component rust-src
      fi
    else
      rustup target add "$triple"
    fi
  done
}

build() {
  platform=$1
  out=$2
  triple=$(target_of "$platform")
  # --locked: the Cargo.lock that CI tested. The release profile (Cargo.toml) is lto=fat,
  # codegen-units=1, strip=true; musl targets link statically by default (crt-static).
  if needs_build_std "$platform"; then
    # -Zbuild-std compiles std (with panic_unwind: the release profile unwinds) from the nightly
    # toolchain's rust-src. Without a rust-std component there is no self-contained directory with
    # musl's crt1.o, crti.o, crtbegin.o and libunwind.a, which rustc would hand the linker by name;
    # link-self-contained=no leaves them to zig, which builds musl's start files and libunwind itself.
    env "CARGO_TARGET_$(echo "$triple" | tr 'a-z-' 'A-Z_')_RUSTFLAGS=-C link-self-contained=no" \
      cargo "+$nightly" zigbuild --release --locked --bin k3sense --target "$triple" \
      -Zbuild-std=std,panic_abort
  else
    cargo zigbuild --release --locked --bin k3sense --target "$triple"
  fi
  mkdir -p "$(dirname "$out")"
  cp "${CARGO_TARGET_DIR:-target}/$triple/release/k3sense" "$out"
  chmod 0755 "$out"
}

# The root filesystem of the image: the binary, and passwd/group entries for the user it runs as
# (65532 "nonroot", as in distroless) so tools that map ids to names show one. No shell, no libc
# files, no CA certificates: the binary is static and opens no TLS connection out.
rootfs() {
  platform=$1
  dir=$2
  rm -rf "$dir"
  build "$platform" "$dir/usr/local/bin/k3sense"
  mkdir -p "$dir/etc"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$dir/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$dir/etc/group"
  chmod 0755 "$dir" "$dir/etc" "$dir/usr" "$dir/usr/local" "$dir/usr/local/bin"
  chmod 0644 "$dir/etc/passwd" "$dir/etc/group"
  # Reproducible file times when the caller sets SOURCE_DATE_EPOCH.
  if [ -n "${SOURCE_DATE_EPOCH:-}" ]; then
    find "$dir" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
  fi
}

[ $# -ge 1 ] || usage
command=$1
shift
case "$command" in
  list) list ;;
  target) [ $# -eq 1 ] || usage; target_of "$1" ;;
  slug) [ $# -eq 1 ] || usage; target_of "$1" >/dev/null && echo "$1" | tr '/' '-' ;;
  arch) [ $# -eq 1 ] || usage; arch_of "$1" ;;
  qemu) [ $# -eq 1 ] || usage; qemu_of "$1" ;;
  setup) setup "$@" ;;
  build) [ $# -eq 2 ] || usage; build "$1" "$2" ;;
  rootfs) [ $# -eq 2 ] || usage; rootfs "$1" "$2" ;;
  pip-requirements) pip_requirements ;;
  *) usage ;;
esac
