#!/usr/bin/env bash
# Builds the container images of the tests' real node, once per recipe: no
# registry is reachable, so nothing is pulled.
#
#   localhost/pause:test                  the sandbox image: a static Go binary (pause/)
#   localhost/notebook-runner:test        shaped like Jupyter docker-stacks: Debian
#                                         bookworm (debootstrap) + a venv with the
#                                         runner's pinned packages (src/runner/
#                                         requirements.txt), user jovyan, numeric
#                                         USER 1000, writable HOME, tini as entrypoint
#   localhost/notebook-runner:test-root   the same layer with USER 0 (for the test
#                                         of an image that runs as root)
#
# Output: the cache folder holding pause.oci.tar and runner.oci.tar (OCI archives
# for `ctr images import`; the runner archive holds both runner tags, which share
# their one layer) and images.json, as the LAST line of stdout (progress goes to
# stderr).
#
# Environment:
#   IMAGES_CACHE   root of the cache (default: $HOME/.cache/notebook-operator/images)
#   DEBIAN_MIRROR  the Debian mirror for debootstrap (default: the one apt uses)
#
# The folder is named by a hash of the recipe: this script, mkoci.py, pause/, the
# runner's requirements, the host's tini and Go versions. A complete folder is
# reused as is; otherwise the images are built into a temporary folder next to it
# and renamed into place, so an interrupted build never leaves a half-filled one.
# Concurrent runs are serialised with flock. Needs root (debootstrap, chroot),
# debootstrap, tini (its static binary goes into the image), go and python3.
set -euo pipefail

SUITE=bookworm
PAUSE_IMAGE=localhost/pause:test
RUNNER_IMAGE=localhost/notebook-runner:test
ROOT_IMAGE=localhost/notebook-runner:test-root
TINI=/usr/bin/tini-static

cd "$(dirname "${BASH_SOURCE[0]}")"
HERE="$(pwd -P)"
REQUIREMENTS="${HERE}/../../src/runner/requirements.txt"

log() { printf '[images] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

((EUID == 0)) || die "needs root (debootstrap and chroot build the runner's root filesystem)"
for tool in debootstrap go python3 tar flock; do
  command -v "${tool}" >/dev/null 2>&1 || die "${tool} is not installed"
done
[[ -x "${TINI}" ]] || die "${TINI} is missing (Debian package tini)"
[[ -f "${REQUIREMENTS}" ]] || die "${REQUIREMENTS} is missing"

recipe="$(
  {
    cat "${HERE}/build.sh" "${HERE}/mkoci.py" "${HERE}/pause/go.mod" "${HERE}/pause/main.go" "${REQUIREMENTS}"
    sha256sum <"${TINI}"
    go env GOVERSION
  } | sha256sum | cut -c1-16
)"
CACHE_ROOT="${IMAGES_CACHE:-$HOME/.cache/notebook-operator/images}"
OUT="${CACHE_ROOT}/${recipe}"

complete() { [[ -s "$1/pause.oci.tar" && -s "$1/runner.oci.tar" && -s "$1/images.json" ]]; }

if complete "${OUT}"; then
  log "reusing ${OUT}"
  printf '%s\n' "${OUT}"
  exit 0
fi

mkdir -p "${CACHE_ROOT}"
exec 9>"${CACHE_ROOT}/.${recipe}.lock"
log "waiting for the build lock ${CACHE_ROOT}/.${recipe}.lock"
flock 9
if complete "${OUT}"; then
  log "reusing ${OUT}"
  printf '%s\n' "${OUT}"
  exit 0
fi
rm -rf "${CACHE_ROOT}/.${recipe}".tmp.*

TMP="$(mktemp -d "${CACHE_ROOT}/.${recipe}.tmp.XXXXXX")"
ROOTFS="${TMP}/rootfs"
# debootstrap mounts /proc and /sys in the target while it installs: never leave them behind.
cleanup() {
  local m
  for m in $(awk -v root="${TMP}/" 'index($5, root) == 1 {print $5}' /proc/self/mountinfo | sort -r); do
    umount "${m}" 2>/dev/null || umount -l "${m}" 2>/dev/null || true
  done
  rm -rf --one-file-system "${TMP}"
}
trap cleanup EXIT
start=${SECONDS}

# --- pause -----------------------------------------------------------------
# USER 65535, like upstream's pause image.
mkdir -p "${TMP}/pause-rootfs"
(
  cd "${HERE}/pause"
  CGO_ENABLED=0 GOWORK=off GOFLAGS= go build -trimpath -buildvcs=false -ldflags "-s -w" -o "${TMP}/pause-rootfs/pause" .
) >&2
python3 "${HERE}/mkoci.py" "${TMP}/pause-rootfs" "${TMP}/pause.oci.tar" \
  --tag "${PAUSE_IMAGE}=65535:65535" --entrypoint '["/pause"]' >"${TMP}/pause.json"
log "pause built in $((SECONDS - start))s"

# --- notebook runner ---------------------------------------------------------
mirror="${DEBIAN_MIRROR:-}"
if [[ -z "${mirror}" ]]; then
  mirror="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
    | sed -n 's/^URIs: *\([^ ]*\/debian\)\/\{0,1\}$/\1/p; s/^deb \(\[[^]]*\] \)\{0,1\}\([^ ]*\/debian\)\/\{0,1\} .*/\2/p' \
    | head -n1 || true)"
fi
[[ -n "${mirror}" ]] || die "no Debian mirror in the apt sources; set DEBIAN_MIRROR"
# Downloaded packages are kept beside the images, so a new recipe does not fetch them again.
mkdir -p "${CACHE_ROOT}/.debs"
log "debootstrap ${SUITE} minbase + python3 from ${mirror}"
debootstrap --variant=minbase --include=python3,python3-venv --cache-dir="${CACHE_ROOT}/.debs" \
  "${SUITE}" "${ROOTFS}" "${mirror}" >"${TMP}/debootstrap.log" 2>&1 \
  || die "debootstrap failed: $(tail -n 20 "${TMP}/debootstrap.log")"
log "debootstrap done at $((SECONDS - start))s; pip install -r src/runner/requirements.txt"

cp /etc/resolv.conf "${ROOTFS}/etc/resolv.conf"
# This host's trust store: pip inside the chroot reaches PyPI the way the host does.
cp /etc/ssl/certs/ca-certificates.crt "${ROOTFS}/tmp/host-ca.crt"
cp "${REQUIREMENTS}" "${ROOTFS}/tmp/requirements.txt"
cp "${TINI}" "${ROOTFS}/usr/bin/tini"
# env -i: the host's PIP_* settings (find-links, ...) do not apply inside the chroot.
chroot "${ROOTFS}" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
  PIP_CERT=/tmp/host-ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_DEFAULT_TIMEOUT=120 \
  /bin/sh -ec '
    python3 -m venv /opt/venv
    /opt/venv/bin/pip install --quiet -r /tmp/requirements.txt
    useradd --create-home --uid 1000 --gid 100 --shell /bin/bash jovyan
    chmod 0775 /home/jovyan' >"${TMP}/pip.log" 2>&1 \
  || die "pip install in the image failed: $(tail -n 20 "${TMP}/pip.log")"
# Slim: no package lists or caches, docs, man pages, locales or logs; no host files.
rm -rf "${ROOTFS}"/tmp/* "${ROOTFS}"/var/lib/apt/lists/* "${ROOTFS}"/var/cache/apt/* \
  "${ROOTFS}"/usr/share/doc/* "${ROOTFS}"/usr/share/man/* "${ROOTFS}"/usr/share/info/* \
  "${ROOTFS}"/usr/share/locale/* "${ROOTFS}"/var/log/* "${ROOTFS}"/root/.cache
: >"${ROOTFS}/etc/resolv.conf"
python3 "${HERE}/mkoci.py" "${ROOTFS}" "${TMP}/runner.oci.tar" \
  --tag "${RUNNER_IMAGE}=1000" --tag "${ROOT_IMAGE}=0" \
  --entrypoint '["/usr/bin/tini", "-g", "--"]' --cmd '["python3"]' --workdir /home/jovyan \
  --env PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env HOME=/home/jovyan --env LANG=C.UTF-8 --env SHELL=/bin/bash \
  --env NB_USER=jovyan --env NB_UID=1000 --env NB_GID=100 >"${TMP}/runner.json"
rm -rf --one-file-system "${ROOTFS}"
cat "${TMP}/pause.json" "${TMP}/runner.json" | python3 -c \
  'import json, sys; json.dump([json.loads(l) for l in sys.stdin if l.strip()], sys.stdout, indent=1)' \
  >"${TMP}/images.json"
rm -f "${TMP}"/*.log "${TMP}/pause.json" "${TMP}/runner.json"
rm -rf "${TMP}/pause-rootfs"

# --- publish -----------------------------------------------------------------
complete "${TMP}" || die "the build in ${TMP} is incomplete"
chmod 755 "${TMP}"
if [[ -e "${OUT}" ]]; then
  old="$(mktemp -u "${CACHE_ROOT}/.${recipe}.old.XXXXXX")"
  mv -T "${OUT}" "${old}"
  rm -rf "${old}"
fi
mv -T "${TMP}" "${OUT}"
trap - EXIT
log "built in $((SECONDS - start))s: ${OUT} (runner $(du -h "${OUT}/runner.oci.tar" | cut -f1))"
printf '%s\n' "${OUT}"
