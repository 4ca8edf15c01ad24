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
if ! timeout 2700 "$PY" -m pytest -m vm tests/vm -p no:cacheprovider -v; then
    echo "VM suite failed; consoles and QEMU errors are in $STORAGETM_VM_LOGS" >&2
    for log in "$STORAGETM_VM_LOGS"/*/*-console.log; do
        [ -f "$log" ] && { echo "===== tail of $log"; tail -n 25 "$log" | sed 's/\x1b\[[0-9;?]*[A-Za-z]//g'; }
    done
    exit 1
fi
rm -f "$STORAGETM_VM_LOGS"/*/*.img
echo "ci/test.sh: all done in $(( $(date +%s) - start )) s"
