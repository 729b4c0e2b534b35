#!/usr/bin/env bash
# Builds the integration-test control plane from Go modules, once per version
# set: kube-apiserver, kube-controller-manager, kubectl, etcd and helm, plus
# kubelet and kube-scheduler for the tests' real node.
#
# Output: the cache folder holding the seven binaries, as the LAST line of
# stdout (progress goes to stderr). Use it as KUBEBUILDER_ASSETS:
#     export KUBEBUILDER_ASSETS="$(tests/control-plane/build.sh | tail -n1)"
#
# Environment:
#   CONTROL_PLANE_CACHE  root of the cache
#                        (default: $HOME/.cache/notebook-operator/control-plane)
#   GOCACHE, GOMODCACHE, GOPROXY, ...  as usual for go
#
# A folder that holds all seven binaries, each answering its version command
# with the pinned version, is reused as is. Otherwise the binaries are built
# into a temporary folder next to it, checked, then renamed into place, so an
# interrupted build never leaves a half-filled cache folder. Concurrent runs
# are serialised with flock.
#
# To bump a version, see README.md in this folder.
set -euo pipefail

K8S_VERSION=v1.35.4
ETCD_VERSION=v3.6.16
HELM_VERSION=v3.22.0
# "-node": the set includes kubelet and kube-scheduler, so a folder built before
# they were added is never taken for a complete one.
CACHE_KEY="k8s-${K8S_VERSION}-etcd-${ETCD_VERSION}-helm-${HELM_VERSION}-node"

CACHE_ROOT="${CONTROL_PLANE_CACHE:-$HOME/.cache/notebook-operator/control-plane}"
OUT="${CACHE_ROOT}/${CACHE_KEY}"
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl etcd helm)

cd "$(dirname "${BASH_SOURCE[0]}")"
HERE="$(pwd -P)"

log() { printf '[control-plane] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

command -v go >/dev/null 2>&1 || die "go is not on PATH (need Go >= 1.26)"

# The wrapper modules must pin the same versions as this script.
grep -Eq "^(require )?[[:space:]]*k8s\.io/kubernetes ${K8S_VERSION}( |\$)" kubernetes/go.mod \
  || die "kubernetes/go.mod does not require k8s.io/kubernetes ${K8S_VERSION}"
grep -Eq "^(require )?[[:space:]]*go\.etcd\.io/etcd/server/v3 ${ETCD_VERSION}( |\$)" etcd/go.mod \
  || die "etcd/go.mod does not require go.etcd.io/etcd/server/v3 ${ETCD_VERSION}"

# check DIR: true when DIR holds all seven binaries at the pinned versions.
# (Outputs are captured first: `cmd | grep -q` can fail under pipefail when
# grep exits early and cmd gets SIGPIPE.)
check() {
  local dir="$1" b out
  for b in "${BINARIES[@]}"; do
    [[ -x "${dir}/${b}" ]] || return 1
  done
  for b in kube-apiserver kube-controller-manager kube-scheduler kubelet; do
    out="$("${dir}/${b}" --version 2>/dev/null)" || return 1
    [[ "${out}" == "Kubernetes ${K8S_VERSION}" ]] || return 1
  done
  out="$("${dir}/kubectl" version --client 2>/dev/null)" || return 1
  [[ $'\n'"${out}"$'\n' == *$'\n'"Client Version: ${K8S_VERSION}"$'\n'* ]] || return 1
  out="$("${dir}/etcd" --version 2>/dev/null)" || return 1
  [[ $'\n'"${out}"$'\n' == *$'\n'"etcd Version: ${ETCD_VERSION#v}"$'\n'* ]] || return 1
  out="$("${dir}/helm" version --template '{{.Version}}' 2>/dev/null)" || return 1
  [[ "${out}" == "${HELM_VERSION}" ]] || return 1
}

if check "${OUT}"; then
  log "reusing ${OUT}"
  printf '%s\n' "${OUT}"
  exit 0
fi

mkdir -p "${CACHE_ROOT}"
exec 9>"${CACHE_ROOT}/.${CACHE_KEY}.lock"
log "waiting for the build lock ${CACHE_ROOT}/.${CACHE_KEY}.lock"
flock 9

# Another run may have finished the build while we waited.
if check "${OUT}"; then
  log "reusing ${OUT}"
  printf '%s\n' "${OUT}"
  exit 0
fi

# We hold the lock: any temporary folder left for this key is from a killed run.
rm -rf "${CACHE_ROOT}/.${CACHE_KEY}".tmp.* "${CACHE_ROOT}/.${CACHE_KEY}".old.*

TMP="$(mktemp -d "${CACHE_ROOT}/.${CACHE_KEY}.tmp.XXXXXX")"
chmod 755 "${TMP}"
cleanup() { rm -rf "${TMP}"; }
trap cleanup EXIT

export CGO_ENABLED=0
export GOWORK=off
# go.sum is complete: never rewrite go.mod/go.sum during a build.
export GOFLAGS=-mod=readonly

start=${SECONDS}

# --- Kubernetes: kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl
k8s_ver="${K8S_VERSION#v}"
k8s_major="${k8s_ver%%.*}"
k8s_minor="${k8s_ver#*.}"
k8s_minor="${k8s_minor%%.*}"
k8s_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags+=" -X ${pkg}.gitVersion=${K8S_VERSION}"
  k8s_ldflags+=" -X ${pkg}.gitMajor=${k8s_major}"
  k8s_ldflags+=" -X ${pkg}.gitMinor=${k8s_minor}"
  k8s_ldflags+=" -X ${pkg}.gitTreeState=clean"
done
log "building kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl ${K8S_VERSION} (takes a while)"
(
  cd "${HERE}/kubernetes"
  go build -trimpath -buildvcs=false -ldflags "${k8s_ldflags}" -o "${TMP}/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubelet \
    k8s.io/kubernetes/cmd/kubectl
) >&2

# --- etcd ------------------------------------------------------------------
log "building etcd ${ETCD_VERSION}"
(
  cd "${HERE}/etcd"
  go build -trimpath -buildvcs=false \
    -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=${ETCD_VERSION}" \
    -o "${TMP}/etcd" .
) >&2

# --- helm ------------------------------------------------------------------
# Like helm's Makefile, the default Kubernetes version of `helm template`
# follows the client-go that helm itself requires.
log "building helm ${HELM_VERSION}"
helm_gomod="$(GOFLAGS= go mod download -json "helm.sh/helm/v3@${HELM_VERSION}" \
  | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
[[ -n "${helm_gomod}" && -f "${helm_gomod}" ]] || die "cannot download helm.sh/helm/v3@${HELM_VERSION}"
cg_ver="$(sed -n 's/^[[:space:]]*k8s\.io\/client-go v0\.\([0-9]*\)\..*/\1/p' "${helm_gomod}" | head -n1)"
[[ -n "${cg_ver}" ]] || die "cannot read the client-go version from ${helm_gomod}"
helm_ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}"
helm_ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  helm_ldflags+=" -X ${pkg}.k8sVersionMajor=1 -X ${pkg}.k8sVersionMinor=${cg_ver}"
done
GOBIN="${TMP}" GOFLAGS= go install -trimpath -buildvcs=false -ldflags "${helm_ldflags}" \
  "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}" >&2

# --- check and publish -----------------------------------------------------
check "${TMP}" || die "the fresh binaries in ${TMP} do not report the pinned versions"
if [[ -e "${OUT}" ]]; then
  # A stale or broken folder for this key: move it aside, then drop it.
  old="$(mktemp -u "${CACHE_ROOT}/.${CACHE_KEY}.old.XXXXXX")"
  mv -T "${OUT}" "${old}"
  rm -rf "${old}"
fi
mv -T "${TMP}" "${OUT}"
trap - EXIT
log "built in $((SECONDS - start))s: ${OUT}"
printf '%s\n' "${OUT}"
