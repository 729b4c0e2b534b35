#!/usr/bin/env bash
# Builds the S3-compatible server of the results-store tests (tests/results.rs): s3s-fs from
# crates.io (an S3 API over a folder, by the s3s project), once per version.
#
# Output: the cache folder holding bin/s3s-fs, as the LAST line of stdout (progress on stderr).
#
# Environment:
#   S3_SERVER_CACHE  root of the cache (default: $HOME/.cache/notebook-operator/s3)
#
# 0.14.1 is the newest s3s-fs whose rust-version (1.92) the toolchain here (1.95) meets; 0.15 and
# later want 1.96. --locked builds it with the dependency versions it was published with. A cold
# build takes about 4 minutes on 2 cores. A folder whose binary answers --version with the pinned
# version is reused as is; the build goes to a temporary folder renamed into place, so an
# interrupted build never leaves a half-filled cache folder. Concurrent runs wait on flock.
set -euo pipefail

S3S_FS_VERSION=0.14.1

CACHE_ROOT="${S3_SERVER_CACHE:-$HOME/.cache/notebook-operator/s3}"
OUT="${CACHE_ROOT}/s3s-fs-${S3S_FS_VERSION}"

log() { printf '[s3] %s\n' "$*" >&2; }

check() {
  local out
  [[ -x "$1/bin/s3s-fs" ]] || return 1
  out="$("$1/bin/s3s-fs" --version 2>/dev/null)" || return 1
  [[ "${out}" == "s3s-fs ${S3S_FS_VERSION}" ]]
}

if check "${OUT}"; then
  log "reusing ${OUT}"
  printf '%s\n' "${OUT}"
  exit 0
fi

command -v cargo >/dev/null 2>&1 || { log "error: cargo is not on PATH"; exit 1; }
mkdir -p "${CACHE_ROOT}"
exec 9>"${CACHE_ROOT}/.s3s-fs-${S3S_FS_VERSION}.lock"
flock 9
if check "${OUT}"; then
  log "reusing ${OUT}"
  printf '%s\n' "${OUT}"
  exit 0
fi

rm -rf "${CACHE_ROOT}/.s3s-fs-${S3S_FS_VERSION}".tmp.*
TMP="$(mktemp -d "${CACHE_ROOT}/.s3s-fs-${S3S_FS_VERSION}.tmp.XXXXXX")"
cleanup() { rm -rf "${TMP}"; }
trap cleanup EXIT

start=${SECONDS}
log "building s3s-fs ${S3S_FS_VERSION} from crates.io (a few minutes)"
CARGO_TARGET_DIR="${TMP}/target" cargo install s3s-fs --version "${S3S_FS_VERSION}" --locked \
  --features binary --root "${TMP}/root" >&2
mkdir -p "${TMP}/out/bin"
mv "${TMP}/root/bin/s3s-fs" "${TMP}/out/bin/s3s-fs"
check "${TMP}/out" || { log "error: the built s3s-fs does not answer --version with ${S3S_FS_VERSION}"; exit 1; }
rm -rf "${OUT}"
mv "${TMP}/out" "${OUT}"
log "built ${OUT} in $((SECONDS - start)) s"
printf '%s\n' "${OUT}"
