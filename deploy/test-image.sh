#!/usr/bin/env bash
# deploy/test-image.sh — proves that what deploy/build-image.sh built runs, per platform:
#
#   binary  target/image/<os-arch>/k3sense is a static executable for that CPU; under qemu-user-static
#           (natively on its own CPU) `k3sense all` serves a simulated reading on GET /api/sensors, and
#           broker, publisher and gateway as three processes reach each other by host name (localhost:
#           the name lookup the pods do for the Service `broker`)
#   image   NAME:TAG-<arch> (or the platform's image in --archive) runs under podman as uid 65532 with a
#           read-only root filesystem, no capabilities and no-new-privileges, and `k3sense all` in it
#           serves a reading
#   archive with --archive FILE.tar: `podman load -i` takes it, and a containerd (the engine inside k3s)
#           imports it with `ctr images import --platform P` under NAME:TAG, as `k3s ctr` does on a node
#
#   deploy/test-image.sh [--platform LIST] [--image NAME:TAG] [--archive FILE.tar]
#   deploy/test-image.sh --setup-only       only prepare the host (below), then exit
#
# --platform defaults to every platform that has a built binary. Prepares the host first (idempotent,
# needs root): mounts binfmt_misc and registers qemu-aarch64/qemu-arm from /usr/lib/binfmt.d (Debian's
# qemu-user-static; inside a container nothing else does), and sets `default_ulimits = []` in the
# [containers] table of /etc/containers/containers.conf (podman otherwise raises RLIMIT_NOFILE to
# 1048576, which some hosts refuse), leaving other settings alone. Podman runs with --runtime runc.
# Prints PASS/FAIL per check and platform; exits non-zero on any failure. Outside CI a missing optional
# tool (containerd) is a SKIP; with CI=true it is a failure.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
platforms_sh="$here/platforms.sh"
cd "$root"

version=$(sed -n '/^\[workspace.package\]/,/^\[/ s/^version = "\(.*\)"/\1/p' Cargo.toml)
image="ghcr.io/k3sense/k3sense:$version"
platform_arg=""
archive=""
setup_only=false
# Generous deadlines: an emulated arm binary starts in a few seconds, but CI machines are shared.
deadline=${K3SENSE_TEST_DEADLINE:-120}

usage() {
  sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
while (($#)); do
  case "$1" in
    --platform) platform_arg=${2:?--platform needs a value}; shift 2 ;;
    --platform=*) platform_arg=${1#*=}; shift ;;
    --image) image=${2:?--image needs a value}; shift 2 ;;
    --image=*) image=${1#*=}; shift ;;
    --archive) archive=${2:?--archive needs a file}; shift 2 ;;
    --archive=*) archive=${1#*=}; shift ;;
    --setup-only) setup_only=true; shift ;;
    -h | --help) usage ;;
    *) printf 'test-image.sh: unknown argument %s\n\n' "$1" >&2; usage ;;
  esac
done

say() { printf '==> %s\n' "$*"; }
results=()
failed=0
pass() {
  results+=("PASS $*")
  printf 'PASS %s\n' "$*"
}
fail() {
  results+=("FAIL $*")
  printf 'FAIL %s\n' "$*" >&2
  failed=1
}
skip_or_fail() {
  if [[ ${CI:-} == true ]]; then fail "$* (required in CI)"; else
    results+=("SKIP $*")
    printf 'SKIP %s\n' "$*"
  fi
}

work=$(mktemp -d)
pids=()
containers=()
cleanup() {
  local pid name
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  for name in "${containers[@]}"; do podman rm -f --time 2 "$name" >/dev/null 2>&1 || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# --- host preparation ---------------------------------------------------------------------------
setup_binfmt() {
  local dir=/proc/sys/fs/binfmt_misc name
  if [[ ! -e $dir/register ]]; then
    mount -t binfmt_misc binfmt_misc "$dir" 2>/dev/null ||
      { echo "test-image.sh: cannot mount binfmt_misc at $dir (needs root)" >&2; return 1; }
  fi
  for name in qemu-aarch64 qemu-arm; do
    [[ -e $dir/$name ]] && continue
    [[ -f /usr/lib/binfmt.d/$name.conf ]] ||
      { echo "test-image.sh: /usr/lib/binfmt.d/$name.conf is missing: apt-get install qemu-user-static" >&2; return 1; }
    # The F flag in Debian's lines makes the kernel open the interpreter now, so it also works
    # inside containers that do not have it.
    grep -v '^#' "/usr/lib/binfmt.d/$name.conf" >"$dir/register" ||
      { echo "test-image.sh: registering $name in $dir failed" >&2; return 1; }
    echo "registered $name in $dir"
  done
}

setup_containers_conf() {
  local conf=/etc/containers/containers.conf
  if [[ -f $conf ]] && grep -Eq '^[[:space:]]*default_ulimits[[:space:]]*=' "$conf"; then
    grep -Eq '^[[:space:]]*default_ulimits[[:space:]]*=[[:space:]]*\[[[:space:]]*\]' "$conf" ||
      echo "note: $conf sets default_ulimits already; left as it is" >&2
    return 0
  fi
  [[ -w /etc ]] || { echo "note: cannot write $conf (not root); podman may fail to raise RLIMIT_NOFILE" >&2; return 0; }
  mkdir -p /etc/containers
  if [[ -f $conf ]] && grep -Eq '^[[:space:]]*\[containers\][[:space:]]*$' "$conf"; then
    sed -i '0,/^[[:space:]]*\[containers\][[:space:]]*$/s//&\ndefault_ulimits = []/' "$conf"
  else
    printf '\n[containers]\n# k3sense deploy/test-image.sh: do not raise RLIMIT_NOFILE to 1048576 (refused on some hosts).\ndefault_ulimits = []\n' >>"$conf"
  fi
  echo "set default_ulimits = [] in $conf"
}

setup_binfmt
setup_containers_conf
$setup_only && exit 0

# --- what to test -------------------------------------------------------------------------------
platforms=()
if [[ -z $platform_arg ]]; then
  while read -r p; do
    [[ -x target/image/$(sh "$platforms_sh" slug "$p")/k3sense ]] && platforms+=("$p")
  done < <(sh "$platforms_sh" list)
  ((${#platforms[@]})) || { echo "test-image.sh: nothing built; run deploy/build-image.sh first" >&2; exit 1; }
elif [[ $platform_arg == all ]]; then
  mapfile -t platforms < <(sh "$platforms_sh" list)
else
  IFS=, read -r -a platforms <<<"$platform_arg"
fi
for p in "${platforms[@]}"; do sh "$platforms_sh" target "$p" >/dev/null || exit 2; done
for tool in curl jq readelf podman python3; do
  command -v "$tool" >/dev/null || { echo "test-image.sh: $tool is missing" >&2; exit 1; }
done
say "testing ${platforms[*]} (image $image${archive:+, archive $archive})"

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits until GET http://127.0.0.1:PORT/api/sensors lists SENSOR with a latest reading; prints it.
await_reading() { # PORT SENSOR LABEL
  local port=$1 sensor=$2 label=$3 end=$((SECONDS + deadline)) body reading
  while ((SECONDS < end)); do
    if body=$(curl -fsS --max-time 5 "http://127.0.0.1:$port/api/sensors" 2>/dev/null); then
      reading=$(jq -c --arg id "$sensor" \
        '.[] | select(.sensor_id == $id and (.latest.temperature_c | type) == "number" and (.latest.humidity_pct | type) == "number") | .latest' \
        <<<"$body" 2>/dev/null || true)
      if [[ -n $reading ]]; then
        echo "$reading"
        return 0
      fi
    fi
    sleep 1
  done
  echo "$label: no reading of $sensor on http://127.0.0.1:$port/api/sensors within ${deadline}s (last answer: ${body:-none})" >&2
  return 1
}

elf_machine() { # PLATFORM → readelf's Machine line
  case "$1" in
    linux/amd64) echo 'Advanced Micro Devices X86-64' ;;
    linux/arm64) echo 'AArch64' ;;
    linux/arm/v7) echo 'ARM' ;;
  esac
}

# Runs the binary of PLATFORM: natively on its own CPU, else under qemu-user-static.
runner_for() { # PLATFORM
  local host
  host=$(uname -m)
  case "$1:$host" in
    linux/amd64:x86_64 | linux/arm64:aarch64 | linux/arm/v7:armv7l) echo "" ;;
    *) sh "$platforms_sh" qemu "$1" ;;
  esac
}

start_bg() { # LOG COMMAND… (PID in $started)
  local log=$1
  shift
  "$@" >"$log" 2>&1 &
  started=$!
  pids+=("$started")
}

stop_bg() { # PID…
  local pid
  for pid in "$@"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}

test_binary() { # PLATFORM
  local p=$1 slug bin runner run=() mqtt http mqtt2 http2 reading log b g pub
  slug=$(sh "$platforms_sh" slug "$p")
  bin=target/image/$slug/k3sense
  if [[ ! -x $bin ]]; then
    fail "$p binary: $bin is missing (deploy/build-image.sh --platform $p)"
    return
  fi
  if ! readelf -hW "$bin" | grep -q "Machine:.*$(elf_machine "$p")\$"; then
    fail "$p binary: $bin is not an $(elf_machine "$p") executable: $(readelf -hW "$bin" | grep Machine:)"
    return
  fi
  if readelf -lW "$bin" | grep -q 'program interpreter' || readelf -dW "$bin" | grep -q '(NEEDED)'; then
    fail "$p binary: $bin is dynamically linked"
    return
  fi
  runner=$(runner_for "$p")
  if [[ -n $runner ]]; then
    command -v "$runner" >/dev/null || { fail "$p binary: $runner is missing (apt-get install qemu-user-static)"; return; }
    run=("$runner")
  fi

  # 1. `k3sense all`: broker, simulated publisher and gateway in one process.
  mqtt=$(free_port)
  http=$(free_port)
  log=$work/$slug-all.log
  start_bg "$log" "${run[@]}" "$bin" all --mqtt-listen "127.0.0.1:$mqtt" --http-listen "127.0.0.1:$http"
  local pid_all=$started
  if reading=$(await_reading "$http" sim-1 "$p binary"); then
    pass "$p binary${runner:+ (under $runner)}: k3sense all served $reading"
  else
    tail -20 "$log" >&2
    fail "$p binary${runner:+ (under $runner)}: k3sense all served no reading"
  fi
  stop_bg "$pid_all"

  # 2. Three processes that find the broker by host name, as the pods find the Service `broker`.
  mqtt2=$(free_port)
  http2=$(free_port)
  start_bg "$work/$slug-broker.log" "${run[@]}" "$bin" broker --listen "127.0.0.1:$mqtt2" --metrics-listen "127.0.0.1:$(free_port)"
  b=$started
  start_bg "$work/$slug-gateway.log" "${run[@]}" "$bin" gateway --broker "localhost:$mqtt2" --listen "127.0.0.1:$http2"
  g=$started
  start_bg "$work/$slug-publisher.log" "${run[@]}" "$bin" publisher --broker "localhost:$mqtt2" --sensor sim \
    --sensor-id sim-dns --interval 1s --metrics-listen off
  pub=$started
  if reading=$(await_reading "$http2" sim-dns "$p split"); then
    pass "$p binary: broker, publisher and gateway as three processes via localhost:$mqtt2 served $reading"
  else
    tail -10 "$work/$slug-broker.log" "$work/$slug-gateway.log" "$work/$slug-publisher.log" >&2
    fail "$p binary: publisher and gateway did not reach the broker by host name"
  fi
  stop_bg "$pub" "$g" "$b"
}

test_container() { # PLATFORM
  local p=$1 arch ref mqtt http name reading pid uid readonly_root
  arch=$(sh "$platforms_sh" arch "$p")
  ref=$image-$arch
  if [[ -n $archive ]]; then
    # The platform's image inside the archive, as a node of that CPU would import it.
    if ! ref=$(podman pull --quiet --platform "$p" "oci-archive:$archive" 2>"$work/pull-$arch.log"); then
      cat "$work/pull-$arch.log" >&2
      fail "$p image: podman pull --platform $p oci-archive:$archive failed"
      return
    fi
  elif ! podman image exists "$ref"; then
    fail "$p image: $ref is not in the local image store (deploy/build-image.sh --platform $p)"
    return
  fi
  # The image's own configuration: what the manifests rely on.
  local config want
  config=$(podman image inspect --format '{{.Os}}/{{.Architecture}} user={{.Config.User}} entrypoint={{.Config.Entrypoint}} cmd={{.Config.Cmd}}' "$ref")
  # podman shows os/architecture without the variant: linux/arm/v7 → linux/arm.
  want="${p%/v*} user=65532:65532 entrypoint=[/usr/local/bin/k3sense] cmd=[all]"
  if [[ $config != "$want" ]]; then
    fail "$p image: configuration is '$config', expected '$want'"
    return
  fi

  mqtt=$(free_port)
  http=$(free_port)
  name=k3sense-test-image-$arch-$$
  containers+=("$name")
  if ! podman run -d --name "$name" --runtime runc --network host \
    --read-only --user 65532:65532 --cap-drop=ALL --security-opt no-new-privileges \
    "$ref" all --mqtt-listen "127.0.0.1:$mqtt" --http-listen "127.0.0.1:$http" >"$work/run-$arch.log" 2>&1; then
    cat "$work/run-$arch.log" >&2
    fail "$p image: podman run failed"
    return
  fi
  if reading=$(await_reading "$http" sim-1 "$p image"); then
    # The process as the kernel sees it (for arm: qemu, started by binfmt_misc inside the container).
    pid=$(podman inspect --format '{{.State.Pid}}' "$name")
    uid=$(awk '/^Uid:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo "?")
    readonly_root=$(podman inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$name")
    if [[ $uid != 65532 || $readonly_root != true ]]; then
      fail "$p image: the container's process runs as uid $uid (want 65532), read-only root $readonly_root"
    else
      pass "$p image (podman: uid $uid, read-only root, no capabilities): k3sense all served $reading"
    fi
  else
    podman logs --tail 20 "$name" >&2 || true
    fail "$p image: k3sense all in the container served no reading"
  fi
  podman rm -f --time 2 "$name" >/dev/null 2>&1 || true
}

test_archive_containerd() {
  if ! command -v containerd >/dev/null || ! command -v ctr >/dev/null; then
    skip_or_fail "archive: containerd and ctr are missing (apt-get install containerd): ctr images import not tested"
    return
  fi
  # A private containerd: its own root, state and socket, nothing shared with a system one.
  local dir=$work/containerd sock p listing
  mkdir -p "$dir"
  sock=$dir/containerd.sock
  cat >"$dir/config.toml" <<EOF
version = 2
root = "$dir/root"
state = "$dir/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
EOF
  start_bg "$dir/log" containerd -c "$dir/config.toml"
  local cpid=$started end=$((SECONDS + 30))
  until ctr -a "$sock" version >/dev/null 2>&1; do
    if ((SECONDS > end)); then
      tail -20 "$dir/log" >&2
      fail "archive: the private containerd did not start"
      stop_bg "$cpid"
      return
    fi
    sleep 0.5
  done
  for p in "${platforms[@]}"; do
    # What `sudo k3s ctr images import FILE.tar` does on a node of that CPU (k3s ctr: namespace k8s.io).
    if ctr -a "$sock" -n k8s.io images import --platform "$p" "$archive" >"$dir/import.log" 2>&1 &&
      listing=$(ctr -a "$sock" -n k8s.io images ls) &&
      grep -E "^$image[[:space:]]" <<<"$listing" | grep -q "$p"; then
      pass "$p archive: ctr images import --platform $p took $archive as $image"
    else
      cat "$dir/import.log" >&2
      echo "${listing:-}" >&2
      fail "$p archive: ctr images import --platform $p did not yield $image for $p"
    fi
    ctr -a "$sock" -n k8s.io images rm "$image" >/dev/null 2>&1 || true
  done
  stop_bg "$cpid"
}

for p in "${platforms[@]}"; do
  say "$p: the binary"
  test_binary "$p"
done
if [[ -n $archive ]]; then
  [[ -f $archive ]] || { echo "test-image.sh: $archive does not exist" >&2; exit 1; }
  archive=$(cd "$(dirname "$archive")" && pwd)/$(basename "$archive")
  say "archive: ctr images import (containerd $(containerd --version 2>/dev/null | awk '{ print $3 }'))"
  test_archive_containerd
fi
for p in "${platforms[@]}"; do
  say "$p: the image under podman"
  test_container "$p"
done
if [[ -n $archive ]]; then
  # Last, so that NAME:TAG in the store is the archive's image for this machine's CPU.
  host_platform=$(podman info --format '{{.Host.OS}}/{{.Host.Arch}}')
  if [[ ${#platforms[@]} -gt 1 && " ${platforms[*]} " != *" $host_platform "* ]]; then
    # From an index podman loads this machine's platform only; an index without it (arm64 + arm/v7
    # tested on an x86_64 machine) has nothing for it to load. Each platform's import was checked
    # with ctr above.
    echo "SKIP archive: podman load takes only this machine's platform ($host_platform) from a multi-platform archive, and $archive has none"
  elif loaded=$(podman load -i "$archive" 2>&1) && grep -q "Loaded image.*$image" <<<"$loaded"; then
    # From an index podman loads this machine's platform; from a one-platform archive, that platform.
    want_platform=$host_platform
    if [[ " ${platforms[*]} " != *" $host_platform "* && ${#platforms[@]} == 1 ]]; then
      want_platform=${platforms[0]%/v*}
    fi
    loaded_platform=$(podman image inspect --format '{{.Os}}/{{.Architecture}}' "$image" 2>&1 || true)
    if [[ $loaded_platform == "$want_platform" ]]; then
      pass "archive: podman load -i $archive loaded $image ($loaded_platform)"
    else
      fail "archive: after podman load, $image is '$loaded_platform', not the $want_platform image"
    fi
  else
    echo "$loaded" >&2
    fail "archive: podman load -i $archive did not load $image"
  fi
fi

echo
echo "== deploy/test-image.sh summary"
printf '%s\n' "${results[@]}"
if ((failed)); then
  echo "deploy/test-image.sh: FAILED" >&2
  exit 1
fi
echo "deploy/test-image.sh: all checks passed"
