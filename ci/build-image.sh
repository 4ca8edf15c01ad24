#!/usr/bin/env bash
# Builds mkosi.output/storagetm.{efi,iso,raw}. mkosi's tools tree, package cache and
# incremental cache live in $STORAGETM_CACHE (default /var/cache/storagetm), outside the
# checkout, so later builds and CI runs reuse them. Run ci/setup-host.sh first.
# `ci/build-image.sh bench` builds the benchmark image instead (mkosi.profiles/bench:
# the same image plus NBD) into mkosi.output/storagetm-bench.efi; it is never shipped.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${STORAGETM_CACHE:-/var/cache/storagetm}
mkdir -p mkosi.output

profile=${1:-}
case "$profile" in
    "") name=storagetm; profile_args=() ;;
    bench) name=storagetm-bench; profile_args=(--profile bench) ;;
    *) echo "build-image: unknown profile '$profile' (known: bench)" >&2; exit 2 ;;
esac

start=$(date +%s)
ci/mkosi.sh --force "${profile_args[@]}" build
install -m 0644 "$CACHE/out/$name.efi" "mkosi.output/$name.efi"
if [ -n "$profile" ]; then
    echo "build-image: $profile image done in $(( $(date +%s) - start )) s"
    ls -l "mkosi.output/$name.efi"
    exit 0
fi
ci/make-media.sh mkosi.output/storagetm.efi mkosi.output
echo "build-image: done in $(( $(date +%s) - start )) s"
ls -l mkosi.output/storagetm.efi mkosi.output/storagetm.iso mkosi.output/storagetm.raw
