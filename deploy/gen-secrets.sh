#!/usr/bin/env bash
# Writes the three credential files that deploy/base/kustomization.yaml's secretGenerator reads,
# with random passwords: users.txt (for the broker, each account with its role), publisher.password
# and gateway.password.
# Usage: deploy/gen-secrets.sh [DIR]   (DIR defaults to deploy/base/secrets next to this script)
# Refuses to overwrite existing files, so running it twice never changes a working password.
set -euo pipefail
dir=${1:-"$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/base/secrets"}
mkdir -p "$dir"
for f in users.txt publisher.password gateway.password; do
  if [[ -e "$dir/$f" ]]; then
    echo "gen-secrets: $dir/$f exists; remove it first if you mean to change passwords" >&2
    exit 1
  fi
done
random_password() { head -c 18 /dev/urandom | base64 | tr '+/' '-_'; }
publisher=$(random_password)
gateway=$(random_password)
umask 077
printf '%s' "$publisher" >"$dir/publisher.password"
printf '%s' "$gateway" >"$dir/gateway.password"
# One role per component (broker/README.md): the publisher may publish the topics of any sensor
# id (its id is the node's name, known only at run time: `*`); the gateway reads, and may only
# publish replay requests.
{
  printf '# username:password:role  (see broker/README.md; add e.g. `viewer:<password>:reader`)\n'
  printf 'publisher:%s:publisher:*\n' "$publisher"
  printf 'gateway:%s:gateway\n' "$gateway"
} >"$dir/users.txt"
echo "gen-secrets: wrote users.txt, publisher.password and gateway.password in $dir"
