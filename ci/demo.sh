#!/usr/bin/env bash
# Build the image, then show it working: target + initiator VMs, a verified copy.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup-host.sh
bash ci/build-image.sh
"${STORAGETM_CACHE:-/var/cache/storagetm}/venv/bin/python" -m ci.demo
