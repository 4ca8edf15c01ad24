#!/usr/bin/env bash
# The whole test suite: host set-up, lint + type checks + unit tests, the image build,
# then the QEMU suite (target and initiator VMs under TCG). This is what .ci/run runs.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash ci/setup-host.sh
PY=${STORAGETM_CACHE:-/var/cache/storagetm}/venv/bin/python
"$PY" -m pytest tests/unit -p no:cacheprovider
bash ci/build-image.sh
# Reproducibility: the same inputs must give bit-identical outputs.
sums=$(mktemp)
(cd mkosi.output && sha256sum storagetm.efi storagetm.iso storagetm.raw) > "$sums"
bash ci/build-image.sh
(cd mkosi.output && sha256sum --check "$sums") || { echo "ci/test.sh: a rebuild gave different outputs" >&2; exit 1; }
rm -f "$sums"
export STORAGETM_VM_LOGS=${STORAGETM_VM_LOGS:-$PWD/tests/vm/logs}
rm -rf "$STORAGETM_VM_LOGS"
# The slow VM tests (network boot, RAM limits) run once for each image that comes out of
# the build: a stamp named after the UKI's hash records that they passed for it.
CACHE=${STORAGETM_CACHE:-/var/cache/storagetm}
stamp="$CACHE/slow-tests-passed/$(sha256sum mkosi.output/storagetm.efi | cut -c1-32)"
markers="vm"
if [ -e "$stamp" ] && [ -z "${STORAGETM_SLOW_TESTS:-}" ]; then
    markers="vm and not slow"
    echo "ci/test.sh: slow VM tests already passed for this image ($stamp); skipping them"
fi
if timeout 4800 "$PY" -m pytest -m "$markers" tests/vm -p no:cacheprovider -v --tb=short; then
    if [ "$markers" = vm ]; then mkdir -p "$(dirname "$stamp")" && touch "$stamp"; fi
else
    echo "VM suite failed; consoles, kernel logs and QEMU errors are in $STORAGETM_VM_LOGS" >&2
    # Kernel logs (every level, copied once a VM's shell is up) say most about a hang; a panic
    # stops the copy, so the console (which shows errors) is searched too.
    find "$STORAGETM_VM_LOGS" -name '*-console.log' | sort | while read -r console; do
        kernel=${console%-console.log}-kernel.log
        echo "===== kernel trouble, last 15 lines: ${console%-console.log}"
        cat "$kernel" "$console" 2>/dev/null | sed 's/\x1b\[[0-9;:?]*[A-Za-z]//g' \
            | grep -aiE 'error|fail|timeout|reconnect|expired|blocked|BUG|WARNING|Call Trace|Oops|panic|oom' \
            | tail -n 15 | cut -c1-200 || true
    done
    exit 1
fi
find "$STORAGETM_VM_LOGS" \( -name "*.img" -o -name "*.efi" \) -delete
echo "ci/test.sh: all done in $(( $(date +%s) - start )) s"
