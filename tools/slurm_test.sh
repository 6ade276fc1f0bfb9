#!/usr/bin/env bash
# The SLURM tests (tests/slurm) against a two-node cluster on this machine: starts it with
# `tools/slurm_local.sh start --nodes 2` (root and apt needed; idempotent), runs the tests, and
# stops the cluster again unless it was running before. Extra arguments go to pytest.
#   bash tools/slurm_test.sh            # ~5 minutes: one- and two-node jobs train, are
#                                       # preempted by SLURM, resume; launch failures
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
was_running=0
bash "$REPO/tools/slurm_local.sh" status >/dev/null 2>&1 && was_running=1
bash "$REPO/tools/slurm_local.sh" start --nodes 2
if [ "$was_running" = 0 ]; then
    trap 'bash "$REPO/tools/slurm_local.sh" stop' EXIT
fi
# A controller or a second node that cannot be reached is a failure here, not a skip.
FUSEDKV_REQUIRE_SLURM=2 bash "$REPO/tools/test.sh" "$REPO/tests/slurm" "$@"
