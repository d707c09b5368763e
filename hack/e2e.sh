#!/usr/bin/env bash
# Real-cluster tests: every `#[ignore = "needs a cluster with Tekton"]` test of every target
# (`cargo test -- --ignored`), against KUBECONFIG.
#
# Needs: a cluster with Tekton Pipelines and a default StorageClass (kind, k3d and minikube all
# have one), kubectl, cargo. INSTALL_TEKTON=1 installs the latest Tekton Pipelines release first.
# This script installs the WorkflowRun CRD (manifests/crds/workflowrun.yaml), creates a fresh
# namespace for the run (passed to the tests as BOBBIN_E2E_NAMESPACE) and deletes it on exit,
# whatever the outcome. Extra arguments go to the test binaries (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."

: "${KUBECONFIG:=${HOME}/.kube/config}"
export KUBECONFIG
if ! kubectl version >/dev/null 2>&1; then
  echo "error: no cluster reachable through KUBECONFIG=${KUBECONFIG}" >&2
  exit 1
fi
if ! kubectl get crd pipelineruns.tekton.dev >/dev/null 2>&1; then
  if [[ "${INSTALL_TEKTON:-0}" == 1 ]]; then
    kubectl apply -f https://storage.googleapis.com/tekton-releases/pipeline/latest/release.yaml
    kubectl -n tekton-pipelines wait --for=condition=Available deployment --all --timeout=300s
  else
    echo "error: Tekton Pipelines is not installed (INSTALL_TEKTON=1 installs it)" >&2
    exit 1
  fi
fi
if ! kubectl get storageclass -o jsonpath='{.items[?(@.metadata.annotations.storageclass\.kubernetes\.io/is-default-class=="true")].metadata.name}' | grep -q .; then
  echo "warning: no default StorageClass; per-step workspaces (PVCs) will stay Pending" >&2
fi

# The CRD as committed (a unit test keeps this copy identical to what the build generates).
kubectl apply --server-side --force-conflicts --field-manager=bobbin-e2e -f manifests/crds/workflowrun.yaml
kubectl wait --for=condition=Established crd/workflowruns.bobbin.dev --timeout=60s

BOBBIN_E2E_NAMESPACE="bobbin-e2e-$(head -c3 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export BOBBIN_E2E_NAMESPACE
cleanup() {
  # bobbin is stopped by now: drop its finalizers, or the namespace would never terminate.
  for run in $(kubectl -n "$BOBBIN_E2E_NAMESPACE" get workflowruns -o name 2>/dev/null); do
    kubectl -n "$BOBBIN_E2E_NAMESPACE" patch "$run" --type=merge -p '{"metadata":{"finalizers":null}}' >/dev/null || true
  done
  kubectl delete namespace "$BOBBIN_E2E_NAMESPACE" --wait=false --ignore-not-found >/dev/null || true
}
trap cleanup EXIT
kubectl create namespace "$BOBBIN_E2E_NAMESPACE"

cargo build --bin bobbin
# Every ignored test of every target: tests/e2e.rs (serve on Tekton) and tests/cli.rs
# (`kubectl apply --dry-run=server` of rendered PipelineRuns), one at a time.
cargo test -- --ignored --nocapture --test-threads=1 "$@"
