#!/usr/bin/env bash
# Tools that check the deployment files (tests/unit/test_deploy.py), installed once into a
# cached, git-ignored folder: helm built from source with `go install` (Go is the only
# prerequisite; no release tarball host needs to be reachable), the Compose Specification
# schema taken from the compose-go module (the loader `docker compose` itself uses) and
# compose-check (.ci/tools/compose-check: that loader as a command, i.e. `docker compose
# config` without an engine), and
# the CRDs of the custom resources the chart can render (ServiceMonitor, ScaledObject,
# TriggerAuthentication) from the prometheus-operator and KEDA modules, and the offline
# Kubernetes schema validator from PyPI.
#   usage: .ci/tools/install-deploy-tools.sh [TOOLS_DIR] [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/../.."
TOOLS="$(mkdir -p "${1:-.tools}" && cd "${1:-.tools}" && pwd)"
PY="${2:-.venv/bin/python}"
HELM_VERSION="${HELM_VERSION:-v3.21.4}"
# One pin for the schema and compose-check: compose-check's go.mod.
COMPOSE_GO_VERSION="$(awk '$1 == "require" && $2 == "github.com/compose-spec/compose-go/v2" {print $3}' \
                      .ci/tools/compose-check/go.mod)"
PROM_OPERATOR_VERSION="${PROM_OPERATOR_VERSION:-v0.85.0}"
KEDA_VERSION="${KEDA_VERSION:-v2.21.0}"

moddir() {  # the module cache folder of one module version (downloaded once)
  go mod download -json "$1" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["Dir"])'
}

mkdir -p "$TOOLS/bin"
stamp="$TOOLS/bin/.helm-${HELM_VERSION}"
if [ ! -x "$TOOLS/bin/helm" ] || [ ! -e "$stamp" ]; then
  # The ldflags of helm's own Makefile: its version, and the Kubernetes version that
  # `helm template`/`helm lint` assume (from the client-go it is built with; without
  # them helm would assume Kubernetes 1.20).
  src="$(moddir "helm.sh/helm/v3@${HELM_VERSION}")"
  kminor="$(awk '$1 == "k8s.io/client-go" {split($2, v, "."); print v[2]}' "$src/go.mod")"
  pkg=helm.sh/helm/v3
  GOBIN="$TOOLS/bin" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w \
    -X $pkg/internal/version.version=${HELM_VERSION} \
    -X $pkg/pkg/lint/rules.k8sVersionMajor=1 -X $pkg/pkg/lint/rules.k8sVersionMinor=${kminor} \
    -X $pkg/pkg/chartutil.k8sVersionMajor=1 -X $pkg/pkg/chartutil.k8sVersionMinor=${kminor}" \
    "$pkg/cmd/helm@${HELM_VERSION}"
  rm -f "$TOOLS"/bin/.helm-* && touch "$stamp"
fi
"$TOOLS/bin/helm" version --short

schema="$TOOLS/compose-spec.json"
if [ ! -s "$schema" ]; then
  dir="$(moddir "github.com/compose-spec/compose-go/v2@${COMPOSE_GO_VERSION}")"
  cp "$dir/schema/compose-spec.json" "$schema.tmp" && chmod u+w "$schema.tmp" && mv "$schema.tmp" "$schema"
fi
echo "compose schema: $schema (compose-go ${COMPOSE_GO_VERSION})"
# Pinned by its go.mod/go.sum; a no-op when nothing changed.
(cd .ci/tools/compose-check && CGO_ENABLED=0 go build -trimpath -o "$TOOLS/bin/compose-check" .)
echo "compose-check: $TOOLS/bin/compose-check"

crds="$TOOLS/crds"
if [ ! -s "$crds/keda.sh_scaledobjects.yaml" ]; then
  mkdir -p "$crds.tmp"
  prom="$(moddir "github.com/prometheus-operator/prometheus-operator@${PROM_OPERATOR_VERSION}")"
  keda="$(moddir "github.com/kedacore/keda/v2@${KEDA_VERSION}")"
  cp "$prom/example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml" \
     "$keda/config/crd/bases/keda.sh_scaledobjects.yaml" \
     "$keda/config/crd/bases/keda.sh_triggerauthentications.yaml" "$crds.tmp/"
  chmod -R u+w "$crds.tmp" && rm -rf "$crds" && mv "$crds.tmp" "$crds"
fi
echo "CRDs: $crds (prometheus-operator ${PROM_OPERATOR_VERSION}, KEDA ${KEDA_VERSION})"

"$PY" -m pip install -q "kubernetes-validate>=1.31" "jsonschema>=4.18" pyyaml
"$PY" -c 'import kubernetes_validate, importlib.metadata as m; print("kubernetes-validate", m.version("kubernetes-validate"))'
