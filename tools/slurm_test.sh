#!/usr/bin/env bash
# The SLURM tests (tests/slurm) against a one-node cluster on this machine: starts it with
# tools/slurm_local.sh (root and apt needed; idempotent), runs the tests, and stops the cluster
# again unless it was running before. Extra arguments go to pytest.
#   bash tools/slurm_test.sh            # ~2 minutes: the real job trains, is preempted, resumes
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
was_running=0
bash "$REPO/tools/slurm_local.sh" status >/dev/null 2>&1 && was_running=1
bash "$REPO/tools/slurm_local.sh" start
if [ "$was_running" = 0 ]; then
    trap 'bash "$REPO/tools/slurm_local.sh" stop' EXIT
fi
# A controller that cannot be reached is a failure here, not a skip.
FUSEDKV_REQUIRE_SLURM=1 bash "$REPO/tools/test.sh" "$REPO/tests/slurm" "$@"
