#!/usr/bin/env bash
# Real-cluster tests (`#[ignore = "needs a cluster with Tekton"]`): run them against KUBECONFIG.
#
# Needs: a cluster with Tekton Pipelines and a default StorageClass (kind, k3d and minikube all
# have one), kubectl, cargo. INSTALL_TEKTON=1 installs the latest Tekton Pipelines release first.
# The tests create and delete their own namespace and apply crds/workflowrun.yaml.
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

cargo build --bin bobbin
cargo test --test e2e -- --ignored --nocapture --test-threads=1 "$@"
