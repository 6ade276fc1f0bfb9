#!/usr/bin/env bash
# The test command: creates/reuses the virtual environment, installs the package with its test
# extras, and runs pytest. Extra arguments go to pytest, e.g.
#   bash tools/test.sh -m "not multiprocess"    # the fast unit subset
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/tools/env.sh"
cd "$REPO"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# DeepSpeed on CPU compiles a C++ op at start-up (the fusedkv-finetune-hf tests); torch caches
# the build here, so one test run (one CI run on a clean clone) compiles it once.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}"
exec "$PY" -m pytest "$@"
