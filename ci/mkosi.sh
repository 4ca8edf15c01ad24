#!/usr/bin/env bash
# mkosi 25 (unpacked by ci/setup-host.sh) with this repository's cache, sandbox and output
# directories, so that every verb sees the image ci/build-image.sh built:
#   ci/mkosi.sh summary         # the configuration, as mkosi resolved it
#   ci/mkosi.sh vm              # boot the built UKI in QEMU with the sample disks of mkosi.conf
#   ci/mkosi.sh [OPTION…] VERB  # any other mkosi verb; options go before the verb
# KVM is off unless STORAGETM_KVM=auto (or yes): on machines whose /dev/kvm cannot run a stock
# kernel, mkosi's default (auto) would pick it and the guest would not boot.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${STORAGETM_CACHE:-/var/cache/storagetm}
MKOSI_DIR=$(ls -d "$CACHE"/mkosi-*/ 2>/dev/null | sort | tail -n 1)
[ -n "$MKOSI_DIR" ] || { echo "mkosi.sh: mkosi not found; run ci/setup-host.sh first" >&2; exit 1; }
mkdir -p "$CACHE/out" "$CACHE/cache" "$CACHE/pkgcache" "$CACHE/workspace"
PYTHONPATH="$MKOSI_DIR/usr/lib/python3/dist-packages" exec python3 -m mkosi \
    --output-directory "$CACHE/out" \
    --cache-directory "$CACHE/cache" \
    --package-cache-directory "$CACHE/pkgcache" \
    --workspace-directory "$CACHE/workspace" \
    --sandbox-tree "$CACHE/sandbox" \
    --tools-tree-sandbox-tree "$CACHE/sandbox" \
    --kvm="${STORAGETM_KVM:-no}" \
    "$@"
