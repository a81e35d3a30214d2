#!/usr/bin/env bash
# Writes the credential files that deploy/base/kustomization.yaml's secretGenerator reads, with random
# passwords: one MQTT account per sensor node, bound to that node's sensor id, and one for the gateway.
#
# Usage: deploy/gen-secrets.sh [--dir DIR] [--all-nodes] [NODE...]
#
#   NODE...      the Kubernetes names of the sensor nodes (as `kubectl get nodes` lists them)
#   (no NODE)    the nodes labelled k3sense.io/sensor (=dht11, =dht22, …), asked of the cluster with
#                `kubectl get nodes -l k3sense.io/sensor -o name`
#   --all-nodes  every node of the cluster (the dev overlay's simulated publisher may run on any)
#   --dir DIR    where to write (default: deploy/base/secrets next to this script)
#
# Files, in DIR:
#   users.txt                the broker's accounts (broker/README.md): `gateway:<pw>:gateway` and, per
#                            node N, `publisher-N:<pw>:publisher:<id>`, where <id> is N as the publisher
#                            turns a node name into a sensor id (lower-cased, other characters → `-`,
#                            at most 63, no `-` at either end), so that account may publish only the
#                            topics of the sensor on N
#   gateway.password         the gateway's password
#   publisher-passwords.env  `N=<pw>` per node: the Secret publisher-credentials, one key per node; each
#                            publisher pod reads the file named after its node (deploy/base/publisher.yaml)
#
# Running it again never changes a password: existing accounts stay as they are, and nodes that have
# none yet get one (so adding a sensor node is: label it, run this, `kubectl apply -k`). It refuses a
# users.txt that still holds the shared `publisher:…:publisher:*` account of earlier versions (see
# deploy/README.md, "Upgrading from one shared publisher account").
set -euo pipefail

die() {
  printf 'gen-secrets: %s\n' "$*" >&2
  exit 1
}

dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/base/secrets"
all_nodes=false
nodes=()
while (($#)); do
  case "$1" in
    --dir) dir=${2:?--dir needs a directory}; shift 2 ;;
    --dir=*) dir=${1#*=}; shift ;;
    --all-nodes) all_nodes=true; shift ;;
    -h | --help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) nodes+=("$1"); shift ;;
  esac
done

# The nodes, from the cluster when none are named.
if ((${#nodes[@]} == 0)); then
  selector=(-l k3sense.io/sensor)
  $all_nodes && selector=()
  command -v kubectl >/dev/null 2>&1 ||
    die "name the sensor nodes (deploy/gen-secrets.sh pi-1 pi-3), or install kubectl to ask the cluster"
  if ! listed=$(kubectl get nodes "${selector[@]}" -o name 2>&1); then
    die "kubectl get nodes ${selector[*]} failed ($(printf '%s' "$listed" | tail -n 1)); name the sensor nodes instead: deploy/gen-secrets.sh pi-1 pi-3"
  fi
  while read -r line; do
    [[ -n $line ]] && nodes+=("${line#node/}")
  done <<<"$listed"
  ((${#nodes[@]})) || die "no node is labelled k3sense.io/sensor yet: label the sensor nodes first (kubectl label node pi-1 k3sense.io/sensor=dht11), or name them: deploy/gen-secrets.sh pi-1"
fi

# A node name as the publisher turns it into a sensor id (protocol/src/sensor_id.rs, from_node_name).
sensor_id() {
  local id
  id=$(printf '%s' "$1" | tr 'A-Z' 'a-z' | sed 's/[^a-z0-9]/-/g')
  id=${id:0:63}
  id=$(printf '%s' "$id" | sed 's/^-*//; s/-*$//')
  printf '%s' "$id"
}

for node in "${nodes[@]}"; do
  # Kubernetes node names are DNS subdomains; the name is also a Secret key, a file name and part
  # of a username, so refuse anything else rather than write an account no pod can use.
  [[ $node =~ ^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$ ]] ||
    die "\`$node\` is not a Kubernetes node name (lower-case letters, digits, '-' and '.'; as \`kubectl get nodes\` lists it)"
  [[ -n $(sensor_id "$node") ]] || die "node name \`$node\` gives no sensor id"
done

users="$dir/users.txt"
gateway_file="$dir/gateway.password"
passwords="$dir/publisher-passwords.env"
mkdir -p "$dir"

if [[ -e $users ]] && grep -Eq '^[^#][^:]*:.*:publisher:[[:space:]]*\*[[:space:]]*$' "$users"; then
  die "$users still holds a publisher account for every sensor (\`…:publisher:*\`), which any publisher could use to write any sensor's readings. Remove that line and publisher.password, then run this again: see deploy/README.md, \"Upgrading from one shared publisher account\""
fi
if [[ -e $users && ! -e $gateway_file ]] || [[ ! -e $users && -e $gateway_file ]]; then
  die "only one of users.txt and gateway.password exists in $dir; remove the other too if you mean to start over"
fi

random_password() { head -c 18 /dev/urandom | base64 | tr '+/' '-_'; }
umask 077
written=()
if [[ ! -e $users ]]; then
  gateway=$(random_password)
  printf '%s' "$gateway" >"$gateway_file"
  {
    printf '# username:password:role  (see broker/README.md; add e.g. `viewer:<password>:reader`)\n'
    printf '# The gateway reads, and may publish nothing but replay requests. Each publisher-<node>\n'
    printf '# account may publish only the topics of the sensor id of its node (deploy/gen-secrets.sh).\n'
    printf 'gateway:%s:gateway\n' "$gateway"
  } >"$users"
  written+=(users.txt gateway.password)
fi
[[ -e $passwords ]] || : >"$passwords"

added=()
for node in "${nodes[@]}"; do
  has_password=false
  has_account=false
  grep -q "^${node//./\\.}=" "$passwords" && has_password=true
  grep -q "^publisher-${node//./\\.}:" "$users" && has_account=true
  if $has_password && $has_account; then
    continue
  fi
  if $has_password || $has_account; then
    die "node $node has a password in only one of users.txt and publisher-passwords.env; remove it from the other too, then run this again"
  fi
  password=$(random_password)
  printf '%s=%s\n' "$node" "$password" >>"$passwords"
  printf 'publisher-%s:%s:publisher:%s\n' "$node" "$password" "$(sensor_id "$node")" >>"$users"
  added+=("$node")
done

((${#written[@]})) && echo "gen-secrets: wrote ${written[*]} in $dir"
if ((${#added[@]})); then
  echo "gen-secrets: added a publisher account for ${added[*]} (users.txt, publisher-passwords.env)"
else
  echo "gen-secrets: every node named already has its account; nothing changed"
fi
