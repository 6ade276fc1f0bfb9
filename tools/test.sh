#!/usr/bin/env bash
# The test command: creates/reuses the virtual environment, installs the package with its test
# extras, and runs pytest. Extra arguments go to pytest, e.g.
#   bash tools/test.sh -m "not multiprocess"    # the fast unit subset
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/tools/env.sh"
cd "$REPO"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$PY" -m pytest "$@"
